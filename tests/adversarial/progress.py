"""Adversarial: what a fit says about how it ended, and its progress bar.

Each trial is one fit with random settings (data size, batch size, epochs,
verbose, mini-batch or Levenberg-Marquardt, a resumed partial epoch) and a
random mix of what can end it: EarlyStopping (with or without restoring),
StopAtLoss, StopOnSmallUpdate, TerminateOnNaN, a callback that sets
``net.stop_training`` at a random epoch (with or without a reason of its
own), a learning rate that makes it diverge (raise or warn), Ctrl-C (a real
SIGINT) after a random call into the engine or from a random callback hook,
with or without a ProgressBar (on or disabled).  The trials run in child
interpreters, a batch at a time, so a crash or a hang is counted, not fatal.
Each trial checks what the README promises:

* a fit that ran all its epochs has ``stop_reason`` and ``stopped_by`` None;
  any other end has both, ``stopped_by`` one of ``history.STOP_KINDS``:
  "interrupt" for a KeyboardInterrupt, "divergence" for a DivergenceError
  or its warning;
* at verbose=1 exactly one "Stopped ..." line when it stopped early (a
  "Finished ..." line when it ran all its epochs but holds restored
  weights), naming the weights the model holds; at verbose=0 nothing on
  stdout;
* with an enabled ProgressBar no per-epoch lines, the bar closed, its last
  state at the epochs run (100% when stopped early, "stopped=<kind>");
* the history reads as a mapping: ``dict(h) == h.history``, every metric
  list as long as ``h.n_epochs``;
* every epoch's ``samples_per_s * time`` is the rows it ran in this fit
  (all of them, or a resumed epoch's rest);
* nothing else is raised.

Usage::

    python tests/adversarial/progress.py --trials 200

Prints the trials run, passed and failures by kind.
"""
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _children  # noqa: E402

HANG_SECONDS = 60
PER_CHILD = 25

_CHILD = r"""
import contextlib, io, json, re, signal, sys, warnings
import numpy as np
import fastbp
import fastbp._runner as fm
from fastbp import callbacks as cb
from fastbp.history import STOP_KINDS

REAL_CALL = fm._EpochRunner._call


class Halt(cb.Callback):
    def __init__(self, at, reason):
        self.at = at
        if reason:
            self.stop_reason = "custom reason"

    def on_epoch_end(self, net, epoch, logs):
        if epoch >= self.at:
            net.stop_training = True


class SigintAt(cb.Callback):
    def __init__(self, hook, at):
        self.hook, self.at = hook, at

    def _maybe(self, epoch):
        if epoch == self.at:
            signal.raise_signal(signal.SIGINT)

    def on_epoch_begin(self, net, epoch):
        if self.hook == "begin":
            self._maybe(epoch)

    def on_epoch_end(self, net, epoch, logs):
        if self.hook == "end":
            self._maybe(epoch)


def trial(s):
    rng = np.random.default_rng(s["seed"])
    n = s["n"]
    X = rng.normal(size=(n, 4))
    y = X @ rng.normal(size=4) + 0.1 * rng.normal(size=n)
    lm = s["lm"]
    net = fastbp.Sequential([fastbp.Dense(5, activation="tanh"), fastbp.Dense(1)],
                            dtype="float64", seed=s["seed"])
    fm._CALL_SECONDS = s["call_seconds"]
    fm._EpochRunner._call = REAL_CALL
    if s["resume"] and not lm:
        # an unfinished epoch to resume: Ctrl-C after a few calls of a first fit
        calls = []
        def call(self, first, count):
            out = REAL_CALL(self, first, count)
            calls.append(1)
            if len(calls) == s["resume"]:
                signal.raise_signal(signal.SIGINT)
            return out
        fm._EpochRunner._call = call
        try:
            net.fit(X, y, loss="mse", epochs=3, batch_size=s["batch"], verbose=0)
        except KeyboardInterrupt:
            pass
        fm._EpochRunner._call = REAL_CALL
    pending = net._position
    first = net.history.n_epochs
    callbacks = []
    for kind in s["callbacks"]:
        if kind == "es":
            callbacks.append(cb.EarlyStopping(monitor="loss", patience=s["patience"],
                                              min_delta=s["min_delta"],
                                              restore_best_weights=s["restore"]))
        elif kind == "target":
            callbacks.append(cb.StopAtLoss(s["target"]))
        elif kind == "small":
            callbacks.append(cb.StopOnSmallUpdate(s["tol"]))
        elif kind == "nan":
            callbacks.append(cb.TerminateOnNaN())
        elif kind == "halt":
            callbacks.append(Halt(first + s["halt_at"], s["halt_reason"]))
        elif kind == "sigint":
            callbacks.append(SigintAt(s["sigint_hook"], first + s["sigint_at"]))
    bar_out = io.StringIO()
    if s["bar"]:
        callbacks.append(cb.ProgressBar(file=bar_out, mininterval=0, miniters=0, ascii=True,
                                        disable=s["bar"] == "disabled"))
    if s["sigint_call"] and not lm:
        calls = []
        def call(self, first_b, count):
            out = REAL_CALL(self, first_b, count)
            calls.append(1)
            if len(calls) == s["sigint_call"]:
                signal.raise_signal(signal.SIGINT)
            return out
        fm._EpochRunner._call = call
    if lm:
        opt = fastbp.optim.LevenbergMarquardt(mu=s["mu"], mu_max=s["mu_max"])
    else:
        opt = fastbp.optim.SGD(lr=s["lr"])
    out = io.StringIO()
    outcome = "returned"
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            net.fit(X, y, loss="mse", optimizer=opt, epochs=s["epochs"],
                    batch_size=None if lm else s["batch"], verbose=s["verbose"],
                    on_divergence=s["on_divergence"], callbacks=callbacks)
        if any("diverged" in str(w.message) for w in caught):
            outcome = "warned"
    except KeyboardInterrupt:
        outcome = "interrupt"
    except fastbp.DivergenceError:
        outcome = "divergence"
    finally:
        fm._EpochRunner._call = REAL_CALL
    fails = check(s, net, first, pending, outcome, out.getvalue(), bar_out.getvalue(), callbacks)
    return {"fails": fails, "ended": net.history.stopped_by or "completed"}


def check(s, net, first, pending, outcome, out, bar, callbacks):
    h = net.history
    fails = []
    ran = h.n_epochs - first
    complete = outcome == "returned" and ran == s["epochs"] and h.stop_reason is None
    if complete:
        if h.stopped_by is not None:
            fails.append("kind_without_reason")
    else:
        if not h.stop_reason or h.stopped_by not in STOP_KINDS:
            fails.append("no_reason")
        # A Ctrl-C that lands in the call that diverged (or the LM iteration
        # that found no step) is raised after that stop was recorded.
        if outcome == "interrupt" and h.stopped_by not in ("interrupt", "no_progress",
                                                           "divergence"):
            fails.append("wrong_kind_interrupt")
        if outcome in ("divergence", "warned") and h.stopped_by != "divergence":
            fails.append("wrong_kind_divergence")
        if outcome == "returned" and ran == s["epochs"] and h.stopped_by is None:
            fails.append("no_reason")
    lines = [l for l in out.splitlines() if l.startswith(("Stopped ", "Finished "))]
    epoch_lines = [l for l in out.splitlines() if re.match(r"epoch \d+/\d+ - ", l)]
    bar_on = s["bar"] == "on"
    if not s["verbose"]:
        if out:
            fails.append("output_at_verbose_0")
    else:
        restored = h.weights_epoch is not None and h.weights_epoch != (h.epoch or [None])[-1]
        want = 1 if (h.stop_reason is not None or restored) else 0
        if len(lines) != want:
            fails.append("stop_line_count")
        if lines and "; the model holds " not in lines[0]:
            fails.append("stop_line_weights")
        if lines and h.stop_reason and h.stop_reason not in lines[0]:
            fails.append("stop_line_reason")
        if bar_on and epoch_lines:
            fails.append("epoch_lines_with_bar")
        if not bar_on and len(epoch_lines) != ran:
            fails.append("epoch_line_count")
    for c in callbacks:
        if isinstance(c, cb.ProgressBar) and c.bar is not None:
            fails.append("bar_not_closed")
    if bar_on:
        frames = [f.strip() for f in bar.replace("\n", "\r").split("\r") if f.strip()]
        last = frames[-1] if frames else ""
        m = re.search(r"\| ([\d.]+)/([\d.]+) \[", last)
        if not m:
            fails.append("bar_unreadable")
        elif not complete and h.stopped_by is not None:
            if "stopped=" + h.stopped_by not in last or m.group(1) not in ("0", m.group(2)):
                fails.append("bar_frozen")
        elif complete and float(m.group(1)) != s["epochs"]:
            fails.append("bar_short")
    if dict(h) != h.history or any(len(v) != h.n_epochs for v in h.history.values()):
        fails.append("mapping")
    if len(h) != h.n_epochs or list(h) != list(h.history):
        fails.append("mapping")
    if not s["lm"]:
        n = s["n"]
        batch = min(s["batch"], n)
        for i in range(first, h.n_epochs):
            rows = n
            if i == first and pending is not None:
                rows = n - pending["batch"] * batch
            got = h["samples_per_s"][i] * h["time"][i]
            if abs(got - rows) > 1e-6 * rows:
                fails.append("rate")
    return fails


first = int(sys.argv[1])
for i, spec in enumerate(json.loads(sys.argv[2]), first):
    print(f"start {i}", flush=True)
    try:
        result = trial(spec)
    except Exception as exc:  # anything else raised is a failure
        result = {"fails": ["exception:" + type(exc).__name__], "ended": "?"}
    print(f"done {i} {json.dumps(result)}", flush=True)
"""


def _spec(rng):
    lm = rng.random() < 0.2
    callbacks = rng.sample(["es", "target", "small", "nan", "halt", "sigint"],
                           rng.randint(0, 3))
    return {
        "seed": rng.randrange(10 ** 6),
        "n": rng.choice([1, 7, 64, 200, 1000]),
        "batch": rng.choice([1, 8, 32, 64, 500]),
        "epochs": rng.randint(1, 12),
        "verbose": rng.choice([0, 1, True]),
        "lm": lm,
        "mu": rng.choice([1e-3, 10.0]),
        "mu_max": rng.choice([1.0, 1e10]),
        "lr": rng.choice([1e-3, 1e-1, 1e3, 1e30]),
        "on_divergence": rng.choice(["raise", "warn"]),
        "call_seconds": rng.choice([1e-12, 0.05]),
        "resume": 0 if lm or rng.random() < 0.6 else rng.randint(1, 6),
        "sigint_call": 0 if rng.random() < 0.7 else rng.randint(1, 20),
        "callbacks": callbacks,
        "patience": rng.randint(0, 3),
        "min_delta": rng.choice([0.0, 1e-3, 10.0]),
        "restore": rng.random() < 0.5,
        "target": rng.choice([0.0, 0.5, 5.0, 1e9]),
        "tol": rng.choice([1e-12, 1e-3, 1e3]),
        "halt_at": rng.randint(1, 6),
        "halt_reason": rng.random() < 0.5,
        "sigint_hook": rng.choice(["begin", "end"]),
        "sigint_at": rng.randint(1, 6),
        "bar": rng.choice([None, "on", "on", "disabled"]),
    }


def run(trials=100, seed=0, show=False):
    """Run ``trials`` trials; returns a Counter of trials, passed and failures
    by kind, and a Counter of how the fits ended (``stopped_by``)."""
    rng = random.Random(seed)
    specs = [_spec(rng) for _ in range(trials)]
    return _children.run_specs(_CHILD, specs, PER_CHILD, HANG_SECONDS, show)


def main():
    return _children.specs_command_line(run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
