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
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _children  # noqa: E402

HANG_SECONDS = 30

CHILD = r"""
import random, sys, warnings, numpy as np, fastbp
from fastbp import optim
warnings.simplefilter("ignore")
# seed: set by the trial loop _children.run_trials appends
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
"""


def run(trials=2000, seed=0, per_child=500):
    """Returns (counts, failures) (``_children.run_trials``)."""
    return _children.run_trials(CHILD, trials, seed, per_child, HANG_SECONDS)


def main(argv=None):
    return _children.command_line(run, __doc__, 2000, argv)


if __name__ == "__main__":
    sys.exit(main())
