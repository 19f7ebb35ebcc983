"""Optimizer settings changed after the state exists (issue 13, item 1).

Each trial builds an optimizer, trains a little with it, then changes one to
three of its attributes to hostile values (slot-using settings turned on or
off, numpy arrays, bools, strings, huge, negative, NaN, a step count of
2**63 - 1, a state of the wrong shape) between fits, from a callback between
epochs, or before ``Optimizer.step``, and trains again.  The trials run in
child processes, many per child, each outcome reported as it happens, so a
crash or hang is pinned on its trial and the child restarted for the rest.

Outcomes: "ok" (the change worked; the parameters are finite), "ValueError"
(refused before anything ran: parameters, state and step count unchanged),
"DivergenceError" (a valid but extreme setting; the model keeps its last
finite weights); anything else, a crash or a hang is a failure.

    python tests/adversarial/optimizer_settings.py --trials 2000
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _children  # noqa: E402

HANG_SECONDS = 30

CHILD = r"""
import random, sys, warnings, numpy as np, fastbp
from fastbp import optim
warnings.simplefilter("ignore")
first, count, seed = (int(a) for a in sys.argv[1:4])
X = np.random.default_rng(0).normal(size=(30, 4))
y = np.random.default_rng(1).integers(0, 3, 30)
CLASSES = {"SGD": ["lr", "momentum", "dampening", "nesterov", "weight_decay"],
           "Adam": ["lr", "betas", "eps", "weight_decay", "amsgrad"],
           "AdamW": ["lr", "betas", "eps", "weight_decay", "amsgrad"],
           "RMSprop": ["lr", "alpha", "eps", "weight_decay", "momentum", "centered"],
           "Rprop": ["lr", "etas", "step_sizes"],
           "Adagrad": ["lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"]}
GOOD = {"momentum": [0.0, 0.5, 0.9], "amsgrad": [True, False], "centered": [True, False],
        "nesterov": [False], "dampening": [0.0, 0.3], "lr": [1e-3, 0.05]}
#: the settings that turn a state slot on or off: half the trials change one
SLOTS = {"SGD": "momentum", "Adam": "amsgrad", "AdamW": "amsgrad", "RMSprop": "centered"}
ON = {"momentum": [0.5, 0.9], "amsgrad": [True], "centered": [True]}

def hostile(rng):
    return rng.choice([0.0, 0.9, 1.0, -0.5, -1e-300, 2.0, 1e39, 1e308, float("nan"),
                       float("inf"), True, False, 1, 2, "0.9", None, np.float32(0.9),
                       np.array(0.9), np.array([0.9, 0.5]), np.array([]), (0.9, 0.99),
                       (0.9, 1.0), [0.5, 1.2], (1e-6, 50), 10 ** 400, object()])

def trial(i):
    rng = random.Random(seed * 1_000_003 + i)
    name = rng.choice(list(CLASSES))
    opt = getattr(optim, name)()
    dtype = rng.choice(["float32", "float64"])
    # small and larger models: writing past a larger state corrupts the heap visibly
    net = fastbp.Sequential([fastbp.Dense(rng.choice([5, 64, 512]), activation="tanh"),
                             fastbp.Dense(3)], dtype=dtype, seed=i)
    kw = dict(loss="cross_entropy", batch_size=rng.choice([None, 7, 30]), shuffle=False,
              verbose=0)
    net.fit(X, y, optimizer=opt, epochs=rng.choice([1, 2]), **kw)
    changes = []
    if name in SLOTS and rng.random() < 0.5:
        changes.append((SLOTS[name], rng.choice(ON[SLOTS[name]])))
        if name == "RMSprop" and rng.random() < 0.5:
            changes.append(("momentum", 0.9))
    for _ in range(rng.choice([0, 1, 1, 2, 3]) if changes else rng.choice([1, 1, 2, 3])):
        attr = rng.choice(CLASSES[name] + ["t", "state"])
        if attr == "t":
            value = rng.choice([0, 5, -1, 2 ** 53, 2 ** 63 - 1, 1.5, True])
        elif attr == "state":
            n = net.n_params
            value = rng.choice([None, np.zeros((1, n), dtype), np.zeros((3, n), "float64"),
                                np.zeros((3, n + 1), dtype), np.zeros((4, n), dtype)])
        elif attr in GOOD and rng.random() < 0.6:
            value = rng.choice(GOOD[attr])
        else:
            value = hostile(rng)
        changes.append((attr, value))
    path = rng.choice(["between fits", "callback", "step"])
    before = (net.params.copy(), None if opt.state is None else opt.state.copy(), opt.t)

    class Change:
        def on_epoch_begin(self, net, epoch):
            if epoch == net.history.n_epochs + 1 and not getattr(self, "done", False):
                self.done = True
                for attr, value in changes:
                    setattr(net.optimizer, attr, value)
    try:
        if path == "between fits":
            for attr, value in changes:
                setattr(opt, attr, value)
            net.fit(X, y, epochs=2, **kw)
        elif path == "callback":
            net.fit(X, y, epochs=3, callbacks=[Change()], **kw)
        else:
            for attr, value in changes:
                setattr(opt, attr, value)
            g = np.random.default_rng(i).normal(size=net.n_params).astype(dtype)
            for _ in range(3):
                opt.step(net.params, g)
    except ValueError:
        if path != "callback":  # refused before anything ran
            t = dict(changes).get("t", before[2])  # the step count as the trial left it
            if not (np.array_equal(net.params, before[0]) and opt.t == t
                    and type(opt.t) is type(t)):
                return "FAIL ValueError after something ran"
        return "ValueError"
    except fastbp.DivergenceError:
        return "DivergenceError"
    if not np.isfinite(net.params).all() and path != "step":
        return "FAIL non-finite parameters without an error"
    return "ok"

for i in range(first, first + count):
    print(f"start {i}", flush=True)
    try:
        outcome = trial(i)
    except Exception as exc:
        outcome = f"FAIL {type(exc).__name__}: {str(exc)[:150]!r}"
    print(f"done {i} {outcome}", flush=True)
"""


def run(trials=2000, seed=0, per_child=500):
    """Returns (counts, failures)."""
    counts, failures = {}, []
    start = 0
    while start < trials:
        count = min(per_child, trials - start)
        current = _child(start, count, seed, counts, failures)
        start = start + count if current is None else current + 1
    return counts, failures


def _child(first, count, seed, counts, failures):
    """Run trials first .. first + count - 1 in one child; the trial it
    crashed or hung in, or None."""
    # glibc checks the heap at every free: a write past a buffer aborts the
    # child near the trial that made it, instead of corrupting it silently
    env = dict(os.environ, MALLOC_CHECK_="3", MALLOC_PERTURB_="165")
    def done(index, outcome):
        key = "failure" if outcome.startswith("FAIL") else outcome
        counts[key] = counts.get(key, 0) + 1
        if key == "failure":
            failures.append(f"trial {index}: {outcome}")
    current, returncode, err = _children.follow(CHILD, [first, count, seed], env, done,
                                                HANG_SECONDS)
    if current is not None:
        counts["crash/hang"] = counts.get("crash/hang", 0) + 1
        failures.append(f"trial {current}: crash or hang (exit {returncode}): {err}")
    elif returncode != 0:
        failures.append(f"child exited {returncode}: {err}")
    return current


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    counts, failures = run(args.trials, args.seed)
    done = sum(counts.values())
    bad = counts.get("failure", 0) + counts.get("crash/hang", 0)
    print(f"trials run: {done}, passed: {done - bad}, failures: {bad} "
          f"({time.perf_counter() - start:.1f} s)")
    for key, value in sorted(counts.items()):
        print(f"  {key}: {value}")
    for line in failures[:30]:
        print("FAILURE", line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
