"""Hostile engine states and train_batches calls (fastbp._ext.engine:
EngineState, train_batches), in a child interpreter.

Each trial builds the state of a real model (dense, DropConnect, dropout,
BatchNorm and a residual block) and its optimizer, breaks one thing (a
program cell, a table, an array's dtype, shape, size, layout or
writability, an address, a scalar; or one argument of the call: X, Y, W,
order, the batch range, batch_loss) and trains.  Each trial must return or
raise ValueError; anything else (another exception, a crash, a hang) is a
failure.  One trial in eight breaks nothing and must train.

Usage: python -P tests/adversarial/engine_state.py --trials 300 [--seed 0]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _children  # noqa: E402

HANG_SECONDS = 60

CHILD = r'''
import numpy as np
import fastbp
from fastbp._ext import engine
from fastbp._ext.engine import N_COLS
from fastbp._numba.losses import loss_cfunc
from fastbp._numba.optim import step_cfunc

# seed: set by the trial loop _children.run_trials appends
BATCH, N, D, K = 8, 30, 5, 3


def valid(dtype, rng):
    """A state's keyword arguments and a call's arguments, both valid."""
    net = fastbp.Sequential([fastbp.Dense(6, activation="relu", dropconnect=0.2),
                             fastbp.Dropout(0.3), fastbp.BatchNorm(),
                             fastbp.Residual([fastbp.Dense(6, activation="tanh")]),
                             fastbp.Dense(K)], seed=0, dtype=dtype)
    net.build(D)
    opt = fastbp.optim.Adam()
    state = opt._bind(net.n_params, net.dtype).reshape(-1)
    ws = net._workspace(BATCH)
    kw = dict(program=net._program.copy(), floats=net._floats.copy(), reg=net._reg.copy(),
              reg_per_weight=False, params=net._params, grad=net._grad, acts=ws.acts,
              deltas=ws.deltas, xb=ws.xb, yb=ws.yb, wb=ws.wb, aux=net._aux,
              buffers=net._buffers, rng=net._dropout_rng, opt_state=state,
              n_slots=opt._n_slots(), hyper=opt._hyper(), n_hyper=len(opt._spec.hyper),
              segments=net._segments(), loss_addr=loss_cfunc("cross_entropy", dtype),
              step_addr=step_cfunc(opt.kernel, dtype), batch_size=BATCH, clip_value=0.0,
              clip_norm=1.0, grad_norms=np.zeros(len(net.layers)))
    X = rng.normal(size=(N, D)).astype(dtype)
    Y = np.eye(K, dtype=dtype)[rng.integers(0, K, N)]
    W = np.ones(N, dtype=dtype)
    call = [X, Y, W, rng.permutation(N).astype(np.int64), 0, 4, True, 0,
            np.zeros(4)]
    return kw, call


def broken(rng, a):
    """a with one thing wrong: dtype, shape, size, layout, writability or type."""
    how = rng.integers(0, 7)
    if how == 0:
        return a.astype([np.float32, np.float64, np.int64, np.int32, np.uint64][rng.integers(0, 5)])
    if how == 1:
        return a.reshape(-1) if a.ndim > 1 else a.reshape(1, -1)
    if how == 2:
        return a.reshape(-1)[:max(0, a.size - int(rng.integers(1, 4)))].copy()
    if how == 3:
        return np.repeat(a.reshape(-1), 2)[::2]
    if how == 4:
        b = a.copy()
        b.flags.writeable = False
        return b
    if how == 5:
        return a.tolist()
    return np.empty((0,) + a.shape[1:], a.dtype)


def attack(rng):
    dtype = [np.float32, np.float64][rng.integers(0, 2)]
    kw, call = valid(dtype, rng)
    which = rng.integers(0, 8)
    if which == 1:    # a program cell
        p = kw["program"]
        p[rng.integers(0, p.shape[0]), rng.integers(0, N_COLS)] = \
            [-1, 0, 1, 7, 40, 10 ** 6, 2 ** 40, -(2 ** 62)][rng.integers(0, 8)]
    elif which == 2:  # a float table cell
        name = ["floats", "reg"][rng.integers(0, 2)]
        t = kw[name]
        t[rng.integers(0, t.shape[0]), rng.integers(0, t.shape[1])] = \
            [-1.0, 1.0, 2.0, float("nan"), float("inf"), 1e300][rng.integers(0, 6)]
    elif which == 3:  # an array of the state
        names = [n for n, v in kw.items() if isinstance(v, np.ndarray)]
        name = names[rng.integers(0, len(names))]
        kw[name] = broken(rng, kw[name])
    elif which == 4:  # a scalar of the state
        name = ["n_slots", "n_hyper", "batch_size", "loss_addr", "step_addr", "clip_value",
                "clip_norm"][rng.integers(0, 7)]
        kw[name] = [0, -1, 1, 100, 2 ** 40, float("nan"), -0.5][rng.integers(0, 7)]
        if name.endswith("addr") and kw[name] != 0:
            kw[name] = 0   # a nonzero address is trusted (machine code cannot be checked)
    elif which == 5:  # an array of the call
        i = [0, 1, 2, 3, 8][rng.integers(0, 5)]
        call[i] = broken(rng, call[i])
    elif which == 6:  # the batch range, or an index of order
        i = rng.integers(4, 7)
        if i == 6:
            call[3][rng.integers(0, N)] = [-1, N, 2 ** 40][rng.integers(0, 3)]
        else:
            call[i] = [-1, 3, 4, 5, 100, -(2 ** 40)][rng.integers(0, 6)]
    elif which == 7:  # the other dtype's X, Y, W
        other = np.float64 if dtype == np.float32 else np.float32
        call[:3] = [a.astype(other) for a in call[:3]]
    state = engine.EngineState(**kw)
    done, steps, status = engine.train_batches(state, *call)
    if which == 0 and (done, steps) != (4, 4):
        raise RuntimeError(f"a valid call ran {done} batches, {steps} steps")


def trial(i):
    """Trial i: "returned" or "refused" (a ValueError) pass."""
    try:
        attack(np.random.default_rng([seed, i]))
    except ValueError:
        return "refused"
    return "returned"
'''


def run(trials, seed=0, per_child=100):
    """Returns (counts, failures) (``_children.run_trials``)."""
    return _children.run_trials(CHILD, trials, seed, per_child, HANG_SECONDS)


def main(argv=None):
    return _children.command_line(run, __doc__, 300, argv)


if __name__ == "__main__":
    sys.exit(main())
