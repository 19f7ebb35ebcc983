"""Optimizer update kernels (Numba): one fused pass over the flat parameters.

Every kernel follows the single-tensor form of the matching ``torch.optim``
algorithm operation for operation (``lerp`` for first moments, the same
order of sqrt, division and eps), with the hyperparameters cast to the
parameters' dtype as torch does, so float64 runs agree with torch to
rounding and float32 runs to float32 rounding.  Each returns True when every
updated parameter is finite; the engine stops on False.

``step_cfunc(name, dtype)`` is the C address of a cached cfunc
``int(T* p, T* g, T* state, int64 n, int64 stride, double* hyper, int64 t)``:
``state`` holds the optimizer's per-parameter vectors as slots
``state[j * stride : j * stride + n]`` and ``hyper`` the packed
hyperparameters.  The same ``<name>_step`` kernels are called directly from
Python by ``Optimizer.step``.

``SPECS`` below is the one declaration of what each kernel reads: its state
slots (rows of ``state``, in order), whether it takes the step count ``t``,
and its hyperparameters (entries of ``hyper``, in order), named as the
kernel's own arguments (tests/test_optim.py holds the two together).
fastbp/optim.py sizes every optimizer's state and packs ``hyper`` from it,
and the C entry points below read exactly that many slots and entries.  A
kernel's slots do not depend on its hyperparameters, so no hyperparameter
value can make it index outside the state: an optimizer always holds all
of them (a slot that is off, such as Adam's ``vmax`` without amsgrad, is
left as allocated until it is turned on).
"""
from typing import NamedTuple

import numpy as np
from numba import carray, njit, types

from .._config import NJIT
from . import c_entry_point


class KernelSpec(NamedTuple):
    """What an update kernel reads besides ``p`` and ``g``."""

    slots: tuple     # names of its state vectors (rows of ``state``), in order
    uses_step: bool  # whether it takes the step count t (1 at the first update)
    hyper: tuple     # names of its scalar arguments (entries of ``hyper``), in order


SPECS = {
    "sgd": KernelSpec(("buf",), True,
                      ("lr", "momentum", "dampening", "nesterov", "weight_decay",
                       "momentum_start")),
    "adam": KernelSpec(("m", "v", "vmax"), True,
                       ("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad", "decoupled")),
    "rmsprop": KernelSpec(("square_avg", "grad_avg", "buf"), False,
                          ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")),
    "rprop": KernelSpec(("prev", "step_size"), False,
                        ("etaminus", "etaplus", "step_min", "step_max")),
    "adagrad": KernelSpec(("state_sum",), True, ("lr", "lr_decay", "weight_decay", "eps")),
    "sk_sgd": KernelSpec(("velocity",), False, ("lr", "momentum", "nesterov")),
    "sk_adam": KernelSpec(("m", "v"), True, ("lr", "beta1", "beta2", "eps")),
}


def _sizes(name):
    return len(SPECS[name].slots), len(SPECS[name].hyper)


# (slots, hyperparameters) of each kernel: compile-time constants of the
# entry points at the end of this module.
_SGD_SLOTS, _SGD_HYPER = _sizes("sgd")
_ADAM_SLOTS, _ADAM_HYPER = _sizes("adam")
_RMSPROP_SLOTS, _RMSPROP_HYPER = _sizes("rmsprop")
_RPROP_SLOTS, _RPROP_HYPER = _sizes("rprop")
_ADAGRAD_SLOTS, _ADAGRAD_HYPER = _sizes("adagrad")
_SK_SGD_SLOTS, _SK_SGD_HYPER = _sizes("sk_sgd")
_SK_ADAM_SLOTS, _SK_ADAM_HYPER = _sizes("sk_adam")


@njit(**NJIT)
def _lerp(start, end, weight, one_minus_weight):
    # torch.lerp: two formulas so the result is exact at both ends.  Both
    # weights come in the parameters' dtype, so float32 stays float32.
    if weight < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * one_minus_weight


@njit(**NJIT)
def sgd_step(p, g, buf, t, lr, momentum, dampening, nesterov, weight_decay, momentum_start=1):
    # momentum_start: the step that creates the buffer, as a copy of its
    # gradient (torch creates it at the first step with momentum).
    T = p.dtype.type
    lr, momentum, damp, wd = T(lr), T(momentum), T(1 - dampening), T(weight_decay)
    finite = True
    for i in range(p.shape[0]):
        d = g[i]
        if wd != 0:
            d = d + wd * p[i]
        if momentum != 0:
            if t == momentum_start:
                b = d
            else:
                b = buf[i] * momentum + damp * d
            buf[i] = b
            d = d + momentum * b if nesterov else b
        q = p[i] - lr * d
        p[i] = q
        finite &= np.isfinite(q)
    return finite


@njit(**NJIT)
def adam_step(p, g, m, v, vmax, t, lr, beta1, beta2, eps, weight_decay, amsgrad,
              decoupled):
    T = p.dtype.type
    bc2_sqrt = T((1 - beta2 ** t) ** 0.5)
    step_size = T(lr / (1 - beta1 ** t))
    decay = T(1 - lr * weight_decay)
    w1, b2, w2, eps, wd = T(1 - beta1), T(beta2), T(1 - beta2), T(eps), T(weight_decay)
    w1c = T(1) - w1
    finite = True
    for i in range(p.shape[0]):
        q = p[i]
        d = g[i]
        if wd != 0:
            if decoupled:
                q = q * decay
            else:
                d = d + wd * q
        mi = _lerp(m[i], d, w1, w1c)
        vi = v[i] * b2 + w2 * d * d
        m[i] = mi
        v[i] = vi
        if amsgrad:
            # torch.maximum: a NaN on either side wins (Python's max drops it).
            vm = vmax[i]
            vi = vi if (vi > vm or vi != vi) else vm
            vmax[i] = vi
        denom = np.sqrt(vi) / bc2_sqrt + eps
        q = q - (step_size * mi) / denom  # torch addcdiv: (value * t1) / t2
        p[i] = q
        finite &= np.isfinite(q)
    return finite


@njit(**NJIT)
def rmsprop_step(p, g, square_avg, grad_avg, buf, lr, alpha, eps, weight_decay,
                 momentum, centered):
    T = p.dtype.type
    lr, a, w, eps, wd, mom = T(lr), T(alpha), T(1 - alpha), T(eps), T(weight_decay), T(momentum)
    wc = T(1) - w
    finite = True
    for i in range(p.shape[0]):
        d = g[i]
        if wd != 0:
            d = d + wd * p[i]
        sq = square_avg[i] * a + w * d * d
        square_avg[i] = sq
        if centered:
            ga = _lerp(grad_avg[i], d, w, wc)
            grad_avg[i] = ga
            avg = np.sqrt(sq - ga * ga) + eps
        else:
            avg = np.sqrt(sq) + eps
        if mom > 0:
            b = buf[i] * mom + d / avg
            buf[i] = b
            q = p[i] - lr * b
        else:
            q = p[i] - (lr * d) / avg
        p[i] = q
        finite &= np.isfinite(q)
    return finite


@njit(**NJIT)
def rprop_step(p, g, prev, step_size, etaminus, etaplus, step_min, step_max):
    T = p.dtype.type
    em, ep, smin, smax = T(etaminus), T(etaplus), T(step_min), T(step_max)
    finite = True
    for i in range(p.shape[0]):
        d = g[i]
        s = d * prev[i]
        if s > 0:
            factor = ep
        elif s < 0:
            factor = em
        else:
            factor = T(1)
        st = min(max(step_size[i] * factor, smin), smax)
        step_size[i] = st
        if factor == em:
            d = T(0)  # after a sign change torch skips the step and forgets the gradient
        sgn = T(1) if d > 0 else (T(-1) if d < 0 else T(0))
        q = p[i] - sgn * st
        p[i] = q
        prev[i] = d
        finite &= np.isfinite(q)
    return finite


@njit(**NJIT)
def adagrad_step(p, g, state_sum, t, lr, lr_decay, weight_decay, eps):
    T = p.dtype.type
    clr = T(lr / (1 + (t - 1) * lr_decay))
    wd, eps = T(weight_decay), T(eps)
    finite = True
    for i in range(p.shape[0]):
        d = g[i]
        if wd != 0:
            d = d + wd * p[i]
        s = state_sum[i] + d * d
        state_sum[i] = s
        q = p[i] - (clr * d) / (np.sqrt(s) + eps)
        p[i] = q
        finite &= np.isfinite(q)
    return finite


# scikit-learn's optimizers (sklearn/neural_network/_stochastic_optimizers.py):
# used by fastbp.MLPClassifier / MLPRegressor to reproduce sklearn's numbers.

@njit(**NJIT)
def sk_sgd_step(p, g, velocity, lr, momentum, nesterov):
    T = p.dtype.type
    lr, mom = T(lr), T(momentum)
    finite = True
    for i in range(p.shape[0]):
        vel = mom * velocity[i] - lr * g[i]
        velocity[i] = vel
        q = p[i] + (mom * vel - lr * g[i] if nesterov else vel)
        p[i] = q
        finite &= np.isfinite(q)
    return finite


@njit(**NJIT)
def sk_adam_step(p, g, m, v, t, lr, beta1, beta2, eps):
    T = p.dtype.type
    # sklearn's rate is a NumPy float64 scalar, so (NEP 50) the update is
    # computed in float64 even for float32 parameters: keep it float64 here.
    neg_rate = -(lr * np.sqrt(1 - beta2 ** t) / (1 - beta1 ** t))
    b1, w1, b2, w2, eps = T(beta1), T(1 - beta1), T(beta2), T(1 - beta2), T(eps)
    finite = True
    for i in range(p.shape[0]):
        d = g[i]
        mi = b1 * m[i] + w1 * d
        vi = b2 * v[i] + w2 * (d * d)
        m[i] = mi
        v[i] = vi
        q = p[i] + (neg_rate * mi) / (np.sqrt(vi) + eps)
        p[i] = q
        finite &= np.isfinite(q)
    return finite


# C entry points: unpack slots and hyperparameters, then call the kernel.
# Each reads exactly the slots and entries SPECS declares for its kernel.
def _sgd_c(p, g, state, n, stride, hyper, t):
    s = carray(state, (_SGD_SLOTS, stride))
    h = carray(hyper, (_SGD_HYPER,))
    return sgd_step(carray(p, (n,)), carray(g, (n,)), s[0, :n], t,
                    h[0], h[1], h[2], h[3] != 0, h[4], h[5])


def _adam_c(p, g, state, n, stride, hyper, t):
    s = carray(state, (_ADAM_SLOTS, stride))
    h = carray(hyper, (_ADAM_HYPER,))
    return adam_step(carray(p, (n,)), carray(g, (n,)), s[0, :n], s[1, :n], s[2, :n], t,
                     h[0], h[1], h[2], h[3], h[4], h[5] != 0, h[6] != 0)


def _rmsprop_c(p, g, state, n, stride, hyper, t):
    s = carray(state, (_RMSPROP_SLOTS, stride))
    h = carray(hyper, (_RMSPROP_HYPER,))
    return rmsprop_step(carray(p, (n,)), carray(g, (n,)), s[0, :n], s[1, :n], s[2, :n],
                        h[0], h[1], h[2], h[3], h[4], h[5] != 0)


def _rprop_c(p, g, state, n, stride, hyper, t):
    s = carray(state, (_RPROP_SLOTS, stride))
    h = carray(hyper, (_RPROP_HYPER,))
    return rprop_step(carray(p, (n,)), carray(g, (n,)), s[0, :n], s[1, :n],
                      h[0], h[1], h[2], h[3])


def _adagrad_c(p, g, state, n, stride, hyper, t):
    s = carray(state, (_ADAGRAD_SLOTS, stride))
    h = carray(hyper, (_ADAGRAD_HYPER,))
    return adagrad_step(carray(p, (n,)), carray(g, (n,)), s[0, :n], t,
                        h[0], h[1], h[2], h[3])


def _sk_sgd_c(p, g, state, n, stride, hyper, t):
    s = carray(state, (_SK_SGD_SLOTS, stride))
    h = carray(hyper, (_SK_SGD_HYPER,))
    return sk_sgd_step(carray(p, (n,)), carray(g, (n,)), s[0, :n], h[0], h[1], h[2] != 0)


def _sk_adam_c(p, g, state, n, stride, hyper, t):
    s = carray(state, (_SK_ADAM_SLOTS, stride))
    h = carray(hyper, (_SK_ADAM_HYPER,))
    return sk_adam_step(carray(p, (n,)), carray(g, (n,)), s[0, :n], s[1, :n], t,
                        h[0], h[1], h[2], h[3])


_C_WRAPPERS = {"sgd": _sgd_c, "adam": _adam_c, "rmsprop": _rmsprop_c,
               "rprop": _rprop_c, "adagrad": _adagrad_c,
               "sk_sgd": _sk_sgd_c, "sk_adam": _sk_adam_c}


def _signature(t):
    p = types.CPointer(t)
    return types.int32(p, p, p, types.int64, types.int64, types.CPointer(types.float64),
                       types.int64)


def step_cfunc(name, dtype):
    """C address of the cached update cfunc for optimizer kernel ``name``."""
    return c_entry_point(_C_WRAPPERS[name], dtype, _signature)
