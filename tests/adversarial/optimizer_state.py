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
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _children  # noqa: E402

HANG_SECONDS = 30

CHILD = r"""
import os, random, sys, tempfile, warnings, numpy as np, fastbp
from fastbp import optim
warnings.simplefilter("ignore")
first, count, seed = (int(a) for a in sys.argv[1:4])
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

for i in range(first, first + count):
    print(f"start {i}", flush=True)
    try:
        outcome = trial(i)
    except Exception as exc:
        import traceback
        where = traceback.extract_tb(exc.__traceback__)[-1]
        outcome = (f"FAIL {type(exc).__name__}: {str(exc)[:150]!r} at "
                   f"{os.path.basename(where.filename)}:{where.lineno}")
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
