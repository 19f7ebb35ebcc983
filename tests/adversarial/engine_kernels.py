"""Hostile calls of the engine's per-layer def entry points
(fastbp._ext.engine_ops: dropout_forward, dropout_backward, residual_add,
activity_penalty, batchnorm_forward, batchnorm_backward, penalize,
clip_and_measure; fastbp._ext.losses.softmax_rows): random shapes, dtypes,
layouts, program offsets and scalars, in a child interpreter.  Each trial
must return or raise ValueError; anything else (another exception, a crash,
a hang) is a failure.

Usage: python -P tests/adversarial/engine_kernels.py --trials 300 [--seed 0]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _children  # noqa: E402

HANG_SECONDS = 60

CHILD = r'''
import numpy as np
from fastbp._ext import engine_ops, losses
from fastbp._ext.engine import N_COLS, N_REG

# seed: set by the trial loop _children.run_trials appends

def arr(rng, shape):
    kind = rng.integers(0, 8)
    dtype = [np.float32, np.float64, np.float64, np.float32, np.int64, np.float16,
             np.complex128, np.float64][kind]
    a = (rng.normal(size=shape) * 10 ** rng.integers(-3, 4)).astype(dtype)
    if rng.random() < 0.1 and a.ndim and a.shape[-1] > 1:
        a = a[..., ::2]          # not contiguous
    if rng.random() < 0.05:
        a = a.tolist()           # not an array
    elif rng.random() < 0.05:
        a.flags.writeable = False
    return a

def shape(rng, ndim=None):
    ndim = rng.integers(0, 3) if ndim is None else ndim
    return tuple(int(v) for v in rng.integers(0, 6, ndim))

def scalar(rng):
    return [0.0, 0.5, -1.0, 1.0, float("nan"), float("inf"), 1e300, "x", None][rng.integers(0, 9)]

def program(rng):
    rows = int(rng.integers(0, 5))
    p = rng.integers(-3, 40, size=(rows, N_COLS)).astype(np.int64)
    p[:, 0] = rng.integers(0, 6, rows)   # kinds, some unknown
    if rng.random() < 0.1:
        p = p.astype(np.int32)
    return p

def attack(rng):
    which = rng.integers(0, 9)
    s2 = shape(rng, 2)
    if which == 0:
        c = np.zeros(rng.integers(0, 3), [np.uint64, np.int64][rng.integers(0, 2)])
        return engine_ops.dropout_forward(arr(rng, shape(rng)), scalar(rng), c)
    if which == 1:
        return engine_ops.dropout_backward(arr(rng, s2), arr(rng, s2 if rng.random() < .7 else shape(rng)))
    if which == 2:
        return engine_ops.residual_add(arr(rng, s2), arr(rng, s2 if rng.random() < .7 else shape(rng)))
    if which == 3:
        return engine_ops.activity_penalty(arr(rng, s2), arr(rng, s2), scalar(rng))
    w = s2[1] if len(s2) > 1 else 0
    vec = lambda: arr(rng, (w if rng.random() < .8 else int(rng.integers(0, 6)),))
    if which == 4:
        return engine_ops.batchnorm_forward(arr(rng, s2), vec(), vec(), vec(), vec(), scalar(rng),
                                        scalar(rng), bool(rng.integers(0, 2)))
    if which == 5:
        return engine_ops.batchnorm_backward(arr(rng, s2), arr(rng, s2), vec(), vec(),
                                         bool(rng.integers(0, 2)))
    p = program(rng)
    n = int(rng.integers(0, 60))
    if which == 6:
        reg = np.abs(rng.normal(size=(p.shape[0], N_REG))) * (rng.random() < .7)
        return engine_ops.penalize(p, reg, bool(rng.integers(0, 2)), arr(rng, (int(rng.integers(0, 4)),)),
                               arr(rng, (n,)), arr(rng, (n,)))
    if which == 7:
        return engine_ops.clip_and_measure(p, arr(rng, (n,)), scalar(rng), scalar(rng))
    m, k = s2
    lo, hi = sorted(int(v) for v in rng.integers(-1, m + 2, 2))
    return losses.softmax_rows(int(rng.integers(-1, 3)), arr(rng, s2), arr(rng, s2),
                               arr(rng, (m,)), arr(rng, s2), lo, hi, 1.0,
                               int(rng.integers(-1, 4)))

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
