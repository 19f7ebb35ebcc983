"""Hostile optimizer state dicts (issue 15, item 6: the public state protocol).

Each trial trains an optimizer a little, takes its ``state_dict()``, corrupts
one to three entries (wrong types, bools, NumPy scalars, huge or negative
step counts, step marks past t + 1, state arrays of the wrong shape, dtype,
order or kind, read-only, non-contiguous, holding NaN, infinity or negative
second moments, extra or missing keys), and hands it to ``load_state_dict``
of a fresh optimizer bound to a model, which then trains and is saved and
loaded.  The trials run in child processes with glibc's heap checks on, many
per child, each outcome reported as it happens, so a crash or hang is pinned
on its trial and the child restarted for the rest.

Outcomes: "ok" (accepted: the state is a private copy that trains to finite
parameters or a DivergenceError, and survives save and load bitwise),
"ValueError" (refused, the optimizer unchanged); anything else (another
exception, an accepted state that aliases the caller's array, a crash or a
hang) is a failure.

    python tests/adversarial/optimizer_state.py --trials 2000
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _children  # noqa: E402

HANG_SECONDS = 30

CHILD = r"""
import os, random, sys, tempfile, warnings, numpy as np, fastbp
from fastbp import optim
warnings.simplefilter("ignore")
# seed: set by the trial loop _children.run_trials appends
X = np.random.default_rng(0).normal(size=(30, 4))
y = np.random.default_rng(1).integers(0, 3, 30)
NAMES = ["SGD", "Adam", "AdamW", "RMSprop", "Rprop", "Adagrad"]
KWARGS = {"SGD": dict(momentum=0.9), "RMSprop": dict(momentum=0.5, centered=True),
          "Adam": dict(amsgrad=True)}
FOLDER = tempfile.mkdtemp()

def hostile_scalar(rng, t):
    return rng.choice([-1, 0, 1, t, t + 1, t + 2, 2 ** 53 - 1, 2 ** 53, 2 ** 63, 10 ** 400,
                       True, False, 1.0, float("nan"), "3", None, np.int64(t), np.int8(1),
                       np.uint64(2 ** 64 - 1), np.float64(t), np.bool_(True), [t], object()])

def hostile_array(rng, state):
    n_slots, n = state.shape
    choice = rng.randrange(16)
    if choice == 0: return state.astype(np.float32 if state.dtype == np.float64 else np.float64)
    if choice == 1: return state.astype(np.int64)
    if choice == 2: return state.astype(object)
    if choice == 3: return state.tolist()
    if choice == 4: return state[:, : rng.randrange(n + 1)].copy()
    if choice == 5: return np.zeros((n_slots + rng.choice([-1, 1]), n), state.dtype)
    if choice == 6: return state.reshape(-1)
    if choice == 7: return np.asfortranarray(state)
    if choice == 8: return np.repeat(state, 2, axis=1)[:, ::2]  # a strided view
    if choice == 9:
        ro = state.copy(); ro.flags.writeable = False; return ro
    if choice == 10:
        bad = state.copy(); bad.flat[rng.randrange(bad.size)] = rng.choice([np.nan, np.inf, -np.inf, -1.0, -1e-300]); return bad
    if choice == 11: return np.ma.masked_array(state)
    if choice == 12: return np.zeros((n_slots, n, 1), state.dtype)
    if choice == 13: return state.astype(state.dtype.newbyteorder())
    if choice == 14: return np.float64(1.0)
    return state.copy()

def trial(i):
    rng = random.Random(seed * 1_000_003 + i)
    name = rng.choice(NAMES)
    dtype = rng.choice(["float32", "float64"])
    net = fastbp.Sequential([fastbp.Dense(rng.choice([5, 64]), activation="tanh"),
                             fastbp.Dense(3)], dtype=dtype, seed=i)
    net.fit(X, y, loss="cross_entropy", optimizer=getattr(optim, name)(**KWARGS.get(name, {})),
            epochs=1, batch_size=8, verbose=0)
    sd = net.optimizer.state_dict()
    good = net.optimizer.state_dict()  # what the corruptions start from
    for _ in range(rng.randrange(1, 4)):
        what = rng.randrange(6)
        if what == 0: sd["t"] = hostile_scalar(rng, good["t"])
        elif what == 1 and good["extra"]: sd["extra"] = {k: hostile_scalar(rng, good["t"]) for k in good["extra"]}
        elif what == 1: sd["extra"] = rng.choice([{}, {"momentum_start": 1}, None, []])
        elif what in (2, 3): sd["state"] = hostile_array(rng, good["state"])
        elif what == 4: sd = dict(sd, **{rng.choice(["lr", "state_sum", "T"]): 1})
        else: sd.pop(rng.choice(["t", "extra", "state"]), None)
    opt = getattr(optim, name)(**KWARGS.get(name, {}))
    net.optimizer = opt
    before = opt.state_dict()
    try:
        opt.load_state_dict(sd)
    except ValueError:
        after = opt.state_dict()
        if after["t"] != before["t"] or after["extra"] != before["extra"] or after["state"] is not None:
            return "FAIL refused but changed"
        return "ValueError"
    if isinstance(sd.get("state"), np.ndarray) and opt.state is not None:
        if np.shares_memory(opt.state, sd["state"]):
            return "FAIL loaded state aliases the caller's array"
        if not (opt.state.flags.c_contiguous and opt.state.flags.writeable):
            return "FAIL loaded state not a writeable C array"
    try:
        net.fit(X, y, loss="cross_entropy", epochs=1, batch_size=8, verbose=0)
    except ValueError:
        return "ValueError"  # a state of another dtype or size: fit refuses it
    except fastbp.DivergenceError:
        return "ok"
    if not np.isfinite(net.params).all():
        return "FAIL non-finite parameters without an error"
    path = os.path.join(FOLDER, "m.fbp")
    if opt.t >= 2 ** 53:
        # accepted at t < 2**53, counted past it by the fit: files refuse such a count
        try:
            net.save(path)
        except ValueError:
            return "ok (t past 2**53: save refused)"
        return "FAIL saved a step count past 2**53"
    net.save(path)
    back = fastbp.load(path).optimizer.state_dict()
    mine = net.optimizer.state_dict()
    if back["t"] != mine["t"] or back["extra"] != mine["extra"] or \
            back["state"].tobytes() != mine["state"].tobytes():
        return "FAIL save/load round trip differs"
    return "ok"
"""


def run(trials=2000, seed=0, per_child=500):
    """Returns (counts, failures) (``_children.run_trials``)."""
    return _children.run_trials(CHILD, trials, seed, per_child, HANG_SECONDS)


def main(argv=None):
    return _children.command_line(run, __doc__, 2000, argv)


if __name__ == "__main__":
    sys.exit(main())
