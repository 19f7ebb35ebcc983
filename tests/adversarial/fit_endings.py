"""Adversarial: the end of every fit, through the one epoch loop (fastbp._loop).

Each trial is one fit with random settings through one of the three fronts
of the loop: ``Sequential.fit`` with a mini-batch optimizer, with
Levenberg-Marquardt (``optimizer=LevenbergMarquardt()``), or an estimator's
sgd/adam (``MLPRegressor``/``MLPClassifier``, ``fit`` or ``partial_fit``,
with or without early stopping).  Something random may end it: a callback
(one of up to four) that at a random hook and epoch raises, presses Ctrl-C
(a real SIGINT), sets ``net.stop_training`` or makes the hyperparameters
invalid; a learning rate or targets that make it diverge (raise or warn);
LM without progress; for the estimators Ctrl-C or an exception in their
bookkeeping.  The trials run in child interpreters, a batch at a time, so a
crash or a hang is counted, not fatal.  Each trial checks the contract:

* every callback whose ``on_train_begin`` returned gets ``on_train_end``
  exactly once, and it runs to its end (a Ctrl-C during it waits, unless
  it is the second Ctrl-C, which interrupts at once); a callback whose
  ``on_train_begin`` raised, and those after it, get none;
* what the fit raises is what the injected event explains (RuntimeError
  from a hook, KeyboardInterrupt from Ctrl-C, ValueError for invalid
  hyperparameters or an estimator's divergence, DivergenceError), and
  nothing when nothing was injected;
* the history agrees: one ``on_epoch_end`` per recorded epoch, and a fit
  that ended by KeyboardInterrupt records ``stopped_by`` "interrupt" (or
  LM's "no_progress" or "divergence", found in the iteration it lets
  finish), unless the Ctrl-C
  came during ``on_train_end``, after the record was made;
* an estimator ends once (its weights copied into ``coefs_``), with
  ``n_iter_ == len(loss_curve_)``.

Usage::

    python -P tests/adversarial/fit_endings.py --trials 300

Prints the trials run, passed and failures by kind.
"""
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _children  # noqa: E402

HANG_SECONDS = 60
PER_CHILD = 40

_CHILD = r"""
import json, signal, sys, warnings
import numpy as np
import fastbp
from fastbp import _sklearn_stochastic as stoch
from fastbp.callbacks import Callback
from fastbp.lm import LevenbergMarquardt

HOOKS = ("on_train_begin", "on_epoch_begin", "on_batches_end", "on_epoch_end", "on_train_end")
EXPECTED = {"raise": RuntimeError, "sigint": KeyboardInterrupt, "nan": ValueError}


class Probe(Callback):
    def __init__(self, hook, at, action):
        self.hook, self.at, self.action = hook, at, action
        self.began = self.ended = self.ended_fully = self.epoch_ends = 0
        self.fired = False

    def _event(self, hook, net, epoch=None):
        if self.fired or hook != self.hook or (epoch is not None and epoch < self.at):
            return
        self.fired = True
        if self.action == "raise":
            raise RuntimeError(hook)
        if self.action == "sigint":
            signal.raise_signal(signal.SIGINT)
        elif self.action == "stop":
            net.stop_training = True
        elif self.action == "nan":
            if isinstance(net.optimizer, LevenbergMarquardt):
                net.optimizer.mu_inc = 0.5
            else:
                net.optimizer.lr = float("nan")

    def on_train_begin(self, net):
        self._event("on_train_begin", net)
        self.began += 1

    def on_epoch_begin(self, net, epoch):
        self._event("on_epoch_begin", net, epoch)

    def on_batches_end(self, net, epoch, batch):
        self._event("on_batches_end", net, epoch)

    def on_epoch_end(self, net, epoch, logs):
        self.epoch_ends += 1
        self._event("on_epoch_end", net, epoch)

    def on_train_end(self, net):
        self.ended += 1
        self._event("on_train_end", net)
        self.ended_fully += 1


def model_trial(spec):
    rng = np.random.default_rng(spec["seed"])
    n = spec["n"]
    X = rng.normal(size=(n, 3))
    Y = np.sin(X @ np.array([1.0, -2.0, 0.5]))[:, None] * spec["scale"]
    net = fastbp.Sequential([fastbp.Dense(5, activation="tanh"), fastbp.Dense(1)],
                            dtype="float64", seed=spec["seed"] % 1000)
    probes = [Probe(*p) for p in spec["probes"]]
    if spec["kind"] == "lm":
        opt = LevenbergMarquardt(mu=spec["mu"], mu_max=spec["mu_max"])
        fit = {}
    else:
        opt = fastbp.optim.SGD(lr=spec["lr"])
        fit = dict(batch_size=spec["batch"], checkpoint_every=None)
    raised = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net.fit(X, Y, loss="mse", optimizer=opt, epochs=spec["epochs"], verbose=0,
                    on_divergence=spec["on_divergence"], callbacks=probes, **fit)
    except BaseException as exc:
        raised = type(exc).__name__
    fails = []
    sigints = [p for p in probes if p.fired and p.action == "sigint"]
    # who began: those before the first probe whose on_train_begin raised
    # (its action, or a second Ctrl-C, which interrupts at once)
    begun = True
    for p in probes:
        if begun and not p.began:
            begun = False
            if p.ended:
                fails.append("ended_without_begin")
            continue
        if not begun:
            if p.began or p.ended:
                fails.append("hooks_after_failed_begin")
            continue
        if p.ended != 1:
            fails.append(f"ended_{p.ended}_times")
        elif p.ended_fully != 1 and not (p.hook == "on_train_end" and p.action == "raise"
                                         and p.fired) and len(sigints) < 2:
            # (a second Ctrl-C interrupts at once, by design)
            fails.append("on_train_end_cut_short")
        if p.epoch_ends != net.history.n_epochs and not (
                # an earlier probe raised in on_epoch_end: this one missed it
                p.epoch_ends == net.history.n_epochs - 1 and any(
                    q.fired and q.action == "raise" and q.hook == "on_epoch_end"
                    for q in probes)):
            fails.append("epoch_ends_vs_history")
    allowed = {None}
    for p in probes:
        if p.fired and p.action in EXPECTED:
            allowed.add(EXPECTED[p.action].__name__)
    if spec["on_divergence"] == "raise":
        allowed.add("DivergenceError")
    if raised not in allowed:
        fails.append(f"raised_{raised}")
    if raised is None and any(p.fired and p.action in ("raise",) for p in probes):
        fails.append("swallowed_exception")
    # (a Ctrl-C during on_train_end comes after the fit's record was made)
    late = sigints and all(p.hook == "on_train_end" for p in sigints)
    # (LM finishes its iteration first: a divergence or no progress found
    # in it is the record, and the Ctrl-C still raises)
    if raised == "KeyboardInterrupt" and not late and net.history.stopped_by not in (
            "interrupt", "no_progress", "divergence"):
        fails.append("interrupt_not_recorded")
    return {"fails": fails, "ended": raised or net.history.stopped_by or "complete"}


def estimator_trial(spec):
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    ends = []
    real_end, real_epoch_end = stoch._StochasticFront.end, stoch._StochasticSolvers._epoch_end
    seen = []

    def end(front):
        real_end(front)
        ends.append(1)

    def epoch_end(self, *args):
        seen.append(1)
        if len(seen) == spec["at"]:
            if spec["action"] == "sigint":
                signal.raise_signal(signal.SIGINT)
            elif spec["action"] == "raise":
                raise RuntimeError("bookkeeping")
        return real_epoch_end(self, *args)

    stoch._StochasticFront.end, stoch._StochasticSolvers._epoch_end = end, epoch_end
    try:
        cls = fastbp.MLPClassifier if spec["classifier"] else fastbp.MLPRegressor
        kw = dict(hidden_layer_sizes=(spec["hidden"],), solver=spec["solver"],
                  learning_rate_init=spec["lr"], max_iter=spec["max_iter"],
                  early_stopping=spec["early"] and not spec["partial"],
                  n_iter_no_change=spec["no_change"], tol=spec["tol"],
                  batch_size=spec["batch"], random_state=spec["seed"] % 1000)
        if not spec["classifier"]:
            kw["activation"] = "identity"
        est = cls(**kw)
        raised = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if spec["partial"]:
                    args = {"classes": np.unique(y)} if spec["classifier"] else {}
                    est.partial_fit(X, y, **args)
                else:
                    est.fit(X, y)
        except BaseException as exc:
            raised = type(exc).__name__
    finally:
        stoch._StochasticFront.end, stoch._StochasticSolvers._epoch_end = real_end, real_epoch_end
    fails = []
    if len(ends) != 1:
        fails.append(f"estimator_ended_{len(ends)}_times")
    allowed = {None, "ValueError"}  # ValueError: sklearn's non-finite weights
    if spec["action"] == "raise" and len(seen) >= spec["at"]:
        allowed.add("RuntimeError")
    if raised not in allowed:
        fails.append(f"raised_{raised}")
    if raised is None and hasattr(est, "loss_curve_") and est.n_iter_ != len(est.loss_curve_):
        fails.append("n_iter_vs_loss_curve")
    return {"fails": fails, "ended": raised or "returned"}


first = int(sys.argv[1])
for i, spec in enumerate(json.loads(sys.argv[2]), first):
    print(f"start {i}", flush=True)
    try:
        result = (estimator_trial if spec["kind"] == "estimator" else model_trial)(spec)
    except BaseException as exc:  # anything the trial did not expect is a failure
        result = {"fails": ["trial_error:" + type(exc).__name__], "ended": "?"}
    print(f"done {i} {json.dumps(result)}", flush=True)
"""

_HOOKS = ("on_train_begin", "on_epoch_begin", "on_batches_end", "on_epoch_end", "on_train_end")


def _spec(rng):
    kind = rng.choice(["minibatch", "minibatch", "lm", "estimator"])
    spec = {"kind": kind, "seed": rng.randrange(10 ** 6)}
    if kind == "estimator":
        spec.update(classifier=rng.random() < 0.5, solver=rng.choice(["sgd", "adam"]),
                    hidden=rng.choice([2, 5, 20]), lr=rng.choice([1e-3, 1e-1, 1.0, 10.0]),
                    max_iter=rng.randint(1, 12), early=rng.random() < 0.3,
                    partial=rng.random() < 0.2, no_change=rng.randint(1, 5),
                    tol=rng.choice([1e-4, 10.0]), batch=rng.choice([1, 16, 200]),
                    at=rng.randint(1, 6), action=rng.choice(["none", "sigint", "raise"]))
        return spec
    probes = [[rng.choice(_HOOKS), rng.randint(1, 5),
               rng.choice(["none", "raise", "sigint", "stop", "nan"])]
              for _ in range(rng.randint(0, 4))]
    spec.update(n=rng.choice([2, 16, 64, 300]), batch=rng.choice([1, 8, 64]),
                epochs=rng.randint(1, 6), scale=rng.choice([1.0, 1.0, 1e3, 1e160]),
                lr=rng.choice([1e-2, 1e-2, 1e6]), mu=rng.choice([1e-3, 10.0]),
                mu_max=rng.choice([1.0, 1e10]), on_divergence=rng.choice(["raise", "warn"]),
                probes=probes)
    return spec


def run(trials=100, seed=0, show=False):
    """Run ``trials`` trials; returns a Counter of trials, passed and failures
    by kind, and a Counter of how the fits ended."""
    rng = random.Random(seed)
    specs = [_spec(rng) for _ in range(trials)]
    return _children.run_specs(_CHILD, specs, PER_CHILD, HANG_SECONDS, show)


def main():
    return _children.specs_command_line(run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
