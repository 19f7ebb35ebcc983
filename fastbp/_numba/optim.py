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
hyperparameters.  ``step_function(name)``, the same kernel, is called
directly from Python by ``Optimizer.step``.

Each kernel is declared where it is defined, by ``@update_kernel(name,
slots=..., flags=...)``: its signature is ``(p, g, *slots, [t], *hyper)``,
the parameters and gradient, its state slots (rows of ``state``, in order),
the step count ``t`` if it takes one (1 at the first update), and its
hyperparameters (entries of ``hyper``, in order); ``flags`` names the
hyperparameters that are yes/no (packed as 0.0 or 1.0).  The decorator
checks the signature against the slots and records the declaration in
``SPECS``; everything else follows from it: the C entry point that unpacks
``state`` and ``hyper`` for the kernel is generated from it (``_wrapper_source``),
fastbp/_optimizer.py sizes every optimizer's state from ``slots`` and packs
``hyper`` from ``hyper`` by name.  A kernel's slots do not depend on its
hyperparameters, so no hyperparameter value can make it index outside the
state: an optimizer always holds all of them (a slot that is off, such as
Adam's ``vmax`` without amsgrad, is left as allocated until it is turned on).

Adding an optimizer: write ``<name>_step`` here under ``@update_kernel``, its
arguments named as above; then a ``fastbp.optim`` class with ``kernel =
"<name>"`` whose checked hyperparameters (``_validated``, or
``_kernel_values``) give every name of the kernel's ``hyper``.

Size: about 520 lines: the kernels and the arithmetic they call (the
division by a constant, the finiteness flag) share one file because
Numba's cache of a kernel is keyed to the file that defines it, and a
helper changed in another file would leave the cached kernels stale.
"""
import inspect
import platform
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic

from .._config import NJIT, pin_module
from . import _X86, c_entry_point, register_address, target_features


class KernelSpec(NamedTuple):
    """What an update kernel reads besides ``p`` and ``g``."""

    slots: tuple     # names of its state vectors (rows of ``state``), in order
    uses_step: bool  # whether it takes the step count t (1 at the first update)
    hyper: tuple     # names of its scalar arguments (entries of ``hyper``), in order
    flags: tuple = ()  # those of ``hyper`` that are yes/no: read as ``hyper[i] != 0``


#: every kernel's declaration, by name, filled by ``update_kernel``
SPECS = {}
_KERNELS = {}  # the kernels, by the same names
_C_WRAPPERS = {}  # their C entry points, generated at first use


def update_kernel(name, slots, flags=()):
    """Declare the compiled kernel below as the update ``name``.

    The kernel's arguments must be ``p, g``, then ``slots`` in order, then
    optionally ``t``, then its hyperparameters; ``flags`` names the
    hyperparameters that are booleans.  TypeError (at import) otherwise.
    """
    if not name.isidentifier():
        raise TypeError(f"update kernel name {name!r} must be a Python identifier")

    def declare(kernel):
        args = tuple(inspect.signature(kernel.py_func).parameters)
        n = len(slots)
        if args[:2] != ("p", "g") or args[2:2 + n] != tuple(slots):
            raise TypeError(f"update kernel {name!r}: its arguments {args} must start with "
                            f"p, g and its slots {tuple(slots)}")
        rest = args[2 + n:]
        uses_step = rest[:1] == ("t",)
        hyper = rest[1:] if uses_step else rest
        unknown = [f for f in flags if f not in hyper]
        if unknown or name in SPECS:
            raise TypeError(f"update kernel {name!r}: declared twice, or flags {unknown} "
                            f"are not among its hyperparameters {hyper}")
        SPECS[name] = KernelSpec(tuple(slots), uses_step, hyper, tuple(flags))
        _KERNELS[name] = kernel
        return kernel
    return declare


# --- Division by a constant without the divider -----------------------------
#
# ``div_by_constant(a, c, inv_c)`` is ``a / c`` to the last bit, from one
# multiply and two fused multiply-adds.  Adam divides every parameter's
# sqrt(v) by the same bias correction sqrt(1 - beta2 ** t): a division runs
# at the divider's rate (slower still with subnormal operands), multiply-adds
# at the FMA units', so Adam's kernel runs about 10-15% (float32) and 25%
# (float64) faster and still gives torch.optim's bits.
#
# Why it is exact (Markstein's theorem; Muller et al., Handbook of
# Floating-Point Arithmetic, 2nd ed., sec. 4.9): with r = RN(1 / c),
# q = RN(a * r) is within one unit in the last place of a / c, the residual
# e = a - q * c is a floating-point number (so fma computes it exactly), and
# RN(q + e * r) = RN(a / c), provided nothing underflows or overflows.
# Adam's a = sqrt(v) is 0 or at least sqrt of the least subnormal (2**-75
# in float32, 2**-537 in float64), so the residual stays normal, and c lies
# in (1e-8, 1].  a = inf makes the residual NaN: q (inf) is the answer, as
# it is when the residual is 0 (where the last step would turn -0 into +0).
# tests/test_optim_division.py compares it with NumPy's division bit for
# bit, for every float32 significand over a set of divisors and on random
# and special values in both dtypes.
#
# Only where multiply-add is one instruction: elsewhere (an x86-64 CPU
# without FMA, or Numba told to compile without it: NUMBA_CPU_NAME=generic,
# NUMBA_CPU_FEATURES) LLVM would call the C library's fma, slower than the
# division it replaces, so it divides.
#
# It lives here rather than in a module of its own because Numba's cache of
# a kernel is keyed to the file that defines the kernel: a change to a
# helper in another file would leave the cached kernels stale.

def fused_multiply_add_instruction():
    """Whether the CPU Numba compiles for has a multiply-add instruction
    (x86-64: the FMA extension; AArch64, POWER and z: always)."""
    machine = platform.machine().lower()
    if machine not in _X86:
        return machine in ("aarch64", "arm64", "ppc64le", "ppc64", "s390x")
    return "fma" in target_features()


#: read once, at import; compiled into the kernels as a constant
FUSED = fused_multiply_add_instruction()


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c with one rounding (LLVM's llvm.fma), for three floats of
    one type."""
    if not (a == b == c) or str(a) not in ("float32", "float64"):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)
    return a(a, b, c), codegen


# --- Whether every updated parameter is finite, without a reduction of bools
#
# ``nonfinite = no_nonfinite(q)`` first, ``nonfinite = or_nonfinite(
# nonfinite, q)`` for each result, ``all_finite(nonfinite)`` at the end: an
# OR of integers of the floats' width, one vector instruction an iteration.
# ``finite &= np.isfinite(q)`` had LLVM narrow the compare to bytes and
# repack it every iteration, which cost a fifth of Adam's time at AVX2
# (AVX-512 has mask registers for it).  An exponent field of all ones (inf,
# NaN) plus its lowest bit carries into the sign bit; no other value's
# does.  The OR is done here too: Numba would widen a uint32 | uint32.

#: float type name -> (its width, its significand bits, the unsigned
#: integer type of its width)
_WORDS = {"float32": (32, 23, types.uint32), "float64": (64, 52, types.uint64)}
_WIDTHS = {str(uint): width for width, _, uint in _WORDS.values()}


def _carry_into_sign(builder, x, width, mant):
    word = ir.IntType(width)
    exponent = ir.Constant(word, ((1 << (width - 1 - mant)) - 1) << mant)
    lowest = ir.Constant(word, 1 << mant)
    return builder.add(builder.and_(builder.bitcast(x, word), exponent), lowest)


@intrinsic
def no_nonfinite(typingctx, x):
    """The starting value of ``or_nonfinite``'s accumulator for floats of
    x's type (x's value is not read)."""
    if str(x) not in _WORDS:
        return None
    width, _, uint = _WORDS[str(x)]

    def codegen(context, builder, signature, args):
        return ir.Constant(ir.IntType(width), 0)
    return uint(x), codegen


@intrinsic
def or_nonfinite(typingctx, acc, x):
    """``acc`` with its top bit set if x (float32 or float64) is inf or NaN;
    acc is an unsigned integer of x's width (from ``no_nonfinite``)."""
    if str(x) not in _WORDS or acc != _WORDS[str(x)][2]:
        return None
    width, mant, _ = _WORDS[str(x)]

    def codegen(context, builder, signature, args):
        return builder.or_(args[0], _carry_into_sign(builder, args[1], width, mant))
    return acc(acc, x), codegen


@intrinsic
def all_finite(typingctx, nonfinite):
    """True when the top bit of ``nonfinite`` (``or_nonfinite``'s
    accumulator) is clear."""
    if str(nonfinite) not in _WIDTHS:
        return None
    width = _WIDTHS[str(nonfinite)]

    def codegen(context, builder, signature, args):
        top = ir.Constant(ir.IntType(width), 1 << (width - 1))
        return builder.icmp_unsigned("<", args[0], top)
    return types.boolean(nonfinite), codegen


@njit(**NJIT)
def div_by_constant(a, c, inv_c):
    """``a / c`` correctly rounded, for ``inv_c = 1 / c`` (rounded) with c in
    (2**-60, 1] and a = 0, inf, NaN or ``abs(a)`` at least 2**-75 (float32)
    / 2**-537 (float64): the values ``sqrt`` gives.  One multiply and two
    multiply-adds (see the comment above); a division without FMA."""
    if not FUSED:
        return a / c
    q = a * inv_c
    e = fma(-q, c, a)   # exactly a - q * c
    # e = 0: q is exact (and keeps a's sign when a = -0); e NaN: a = inf or NaN
    return fma(e, inv_c, q) if abs(e) > 0 else q


@njit(**NJIT)
def _pow(x, y):
    """x ** y for a finite float x and a float (or integer) y as Python
    computes it, with the C library's pow: torch.optim and the reference
    compute their bias
    corrections in Python.  Numba computes x ** (an integer) by repeated
    multiplication, and x ** 0.5 as sqrt(x), which differed from Python in
    the last bit for 55% of beta ** t (t up to 20,000) and for 1 in 1,150
    of (1 - beta2 ** t) ** 0.5.  Adding 0 * x keeps the exponent from being
    a constant LLVM could rewrite."""
    return x ** (float(y) + 0.0 * x)


@njit(**NJIT)
def _lerp(start, end, weight, one_minus_weight):
    # torch.lerp: two formulas so the result is exact at both ends.  Both
    # weights come in the parameters' dtype, so float32 stays float32.
    if weight < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * one_minus_weight


@njit(**NJIT)
def _check_lengths(p, a):
    """Python can call the kernels too: refuse a gradient or state slot
    shorter than the parameters (the loops index them without bounds
    checks).  In the engine's calls every one has p's length."""
    if a.shape[0] < p.shape[0]:
        raise ValueError("an update kernel's gradient and state slots must be as long as "
                         "its parameters")


@update_kernel("sgd", slots=("buf",), flags=("nesterov",))
@njit(**NJIT)
def sgd_step(p, g, buf, t, lr, momentum, dampening, nesterov, weight_decay, momentum_start=1):
    _check_lengths(p, g)
    _check_lengths(p, buf)
    # momentum_start: the step that creates the buffer, as a copy of its
    # gradient (torch creates it at the first step with momentum).
    T = p.dtype.type
    lr, momentum, damp, wd = T(lr), T(momentum), T(1 - dampening), T(weight_decay)
    # A loop with the buffer and one without (as adam_step, below).
    if momentum != 0:
        return _sgd_loop(p, g, buf, True, t == momentum_start, lr, momentum, damp, nesterov, wd)
    return _sgd_loop(p, g, buf, False, False, lr, momentum, damp, nesterov, wd)


@njit(inline="always", **NJIT)
def _sgd_loop(p, g, buf, with_momentum, first, lr, momentum, damp, nesterov, wd):
    nonfinite = no_nonfinite(p.dtype.type(0))
    for i in range(p.shape[0]):
        d = g[i]
        if wd != 0:
            d = d + wd * p[i]
        if with_momentum:
            if first:
                b = d
            else:
                b = buf[i] * momentum + damp * d
            buf[i] = b
            d = d + momentum * b if nesterov else b
        q = p[i] - lr * d
        p[i] = q
        nonfinite = or_nonfinite(nonfinite, q)
    return all_finite(nonfinite)


@update_kernel("adam", slots=("m", "v", "vmax"), flags=("amsgrad", "decoupled"))
@njit(**NJIT)
def adam_step(p, g, m, v, vmax, t, lr, beta1, beta2, eps, weight_decay, amsgrad,
              decoupled):
    _check_lengths(p, g)
    _check_lengths(p, m)
    _check_lengths(p, v)
    _check_lengths(p, vmax)
    T = p.dtype.type
    bc2_sqrt = T(_pow(1 - _pow(beta2, t), 0.5))
    inv_bc2_sqrt = T(1) / bc2_sqrt
    step_size = T(lr / (1 - _pow(beta1, t)))
    decay = T(1 - lr * weight_decay)
    w1, b2, w2, eps, wd = T(1 - beta1), T(beta2), T(1 - beta2), T(eps), T(weight_decay)
    w1c = T(1) - w1
    # A loop for each of amsgrad and weight decay on or off, so that each
    # holds only its own work: with those tests in one loop, LLVM computed
    # both sides of them, blended, and wrote vmax with a masked store.  At
    # AVX2 (no mask registers) that and the old finiteness test made Adam
    # 1.8x slower than at AVX-512 on Zen 4, whose divider has the same rate
    # per element at both widths (M's 235,146 parameters: 145.6 against
    # 80.6 us; split, 108; the README has the steps).
    if amsgrad:
        if wd != 0:
            return _adam_loop(p, g, m, v, vmax, True, True, decoupled, bc2_sqrt,
                              inv_bc2_sqrt, step_size, decay, w1, w1c, b2, w2, eps, wd)
        return _adam_loop(p, g, m, v, vmax, True, False, decoupled, bc2_sqrt, inv_bc2_sqrt,
                          step_size, decay, w1, w1c, b2, w2, eps, wd)
    if wd != 0:
        return _adam_loop(p, g, m, v, vmax, False, True, decoupled, bc2_sqrt, inv_bc2_sqrt,
                          step_size, decay, w1, w1c, b2, w2, eps, wd)
    return _adam_loop(p, g, m, v, vmax, False, False, decoupled, bc2_sqrt, inv_bc2_sqrt,
                      step_size, decay, w1, w1c, b2, w2, eps, wd)


@njit(inline="always", **NJIT)
def _adam_loop(p, g, m, v, vmax, amsgrad, decay_on, decoupled, bc2_sqrt, inv_bc2_sqrt,
               step_size, decay, w1, w1c, b2, w2, eps, wd):
    # adam_step's loop; inlined by Numba where adam_step calls it, so that
    # amsgrad and decay_on (wd != 0) are constants there and their branches
    # fold away.
    nonfinite = no_nonfinite(p.dtype.type(0))
    for i in range(p.shape[0]):
        q = p[i]
        d = g[i]
        if decay_on:
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
        # sqrt(vi) / bc2_sqrt to the last bit, without a division (div_by_constant)
        denom = div_by_constant(np.sqrt(vi), bc2_sqrt, inv_bc2_sqrt) + eps
        q = q - (step_size * mi) / denom  # torch addcdiv: (value * t1) / t2
        p[i] = q
        nonfinite = or_nonfinite(nonfinite, q)
    return all_finite(nonfinite)


@update_kernel("rmsprop", slots=("square_avg", "grad_avg", "buf"), flags=("centered",))
@njit(**NJIT)
def rmsprop_step(p, g, square_avg, grad_avg, buf, lr, alpha, eps, weight_decay,
                 momentum, centered):
    _check_lengths(p, g)
    _check_lengths(p, square_avg)
    _check_lengths(p, grad_avg)
    _check_lengths(p, buf)
    T = p.dtype.type
    lr, a, w, eps, wd, mom = T(lr), T(alpha), T(1 - alpha), T(eps), T(weight_decay), T(momentum)
    wc = T(1) - w
    # A loop for each of centered and momentum, each writing only its own
    # slots (as adam_step).
    if centered:
        if mom > 0:
            return _rmsprop_loop(p, g, square_avg, grad_avg, buf, True, True, lr, a, w, wc,
                                 eps, wd, mom)
        return _rmsprop_loop(p, g, square_avg, grad_avg, buf, True, False, lr, a, w, wc, eps,
                             wd, mom)
    if mom > 0:
        return _rmsprop_loop(p, g, square_avg, grad_avg, buf, False, True, lr, a, w, wc, eps,
                             wd, mom)
    return _rmsprop_loop(p, g, square_avg, grad_avg, buf, False, False, lr, a, w, wc, eps, wd,
                         mom)


@njit(inline="always", **NJIT)
def _rmsprop_loop(p, g, square_avg, grad_avg, buf, centered, with_momentum, lr, a, w, wc, eps,
                  wd, mom):
    nonfinite = no_nonfinite(p.dtype.type(0))
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
        if with_momentum:
            b = buf[i] * mom + d / avg
            buf[i] = b
            q = p[i] - lr * b
        else:
            q = p[i] - (lr * d) / avg
        p[i] = q
        nonfinite = or_nonfinite(nonfinite, q)
    return all_finite(nonfinite)


@update_kernel("rprop", slots=("prev", "step_size"))
@njit(**NJIT)
def rprop_step(p, g, prev, step_size, etaminus, etaplus, step_min, step_max):
    _check_lengths(p, g)
    _check_lengths(p, prev)
    _check_lengths(p, step_size)
    T = p.dtype.type
    em, ep, smin, smax = T(etaminus), T(etaplus), T(step_min), T(step_max)
    nonfinite = no_nonfinite(p.dtype.type(0))
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
        nonfinite = or_nonfinite(nonfinite, q)
    return all_finite(nonfinite)


@update_kernel("adagrad", slots=("state_sum",))
@njit(**NJIT)
def adagrad_step(p, g, state_sum, t, lr, lr_decay, weight_decay, eps):
    _check_lengths(p, g)
    _check_lengths(p, state_sum)
    T = p.dtype.type
    clr = T(lr / (1 + (t - 1) * lr_decay))
    wd, eps = T(weight_decay), T(eps)
    nonfinite = no_nonfinite(p.dtype.type(0))
    for i in range(p.shape[0]):
        d = g[i]
        if wd != 0:
            d = d + wd * p[i]
        s = state_sum[i] + d * d
        state_sum[i] = s
        q = p[i] - (clr * d) / (np.sqrt(s) + eps)
        p[i] = q
        nonfinite = or_nonfinite(nonfinite, q)
    return all_finite(nonfinite)


# scikit-learn's optimizers (sklearn/neural_network/_stochastic_optimizers.py):
# used by fastbp.MLPClassifier / MLPRegressor to reproduce sklearn's numbers.

@update_kernel("sk_sgd", slots=("velocity",), flags=("nesterov",))
@njit(**NJIT)
def sk_sgd_step(p, g, velocity, lr, momentum, nesterov):
    _check_lengths(p, g)
    _check_lengths(p, velocity)
    T = p.dtype.type
    lr, mom = T(lr), T(momentum)
    nonfinite = no_nonfinite(p.dtype.type(0))
    for i in range(p.shape[0]):
        vel = mom * velocity[i] - lr * g[i]
        velocity[i] = vel
        q = p[i] + (mom * vel - lr * g[i] if nesterov else vel)
        p[i] = q
        nonfinite = or_nonfinite(nonfinite, q)
    return all_finite(nonfinite)


@update_kernel("sk_adam", slots=("m", "v"))
@njit(**NJIT)
def sk_adam_step(p, g, m, v, t, lr, beta1, beta2, eps):
    _check_lengths(p, g)
    _check_lengths(p, m)
    _check_lengths(p, v)
    T = p.dtype.type
    # sklearn's rate is a NumPy float64 scalar, so (NEP 50) the update is
    # computed in float64 even for float32 parameters: keep it float64 here.
    neg_rate = -(lr * np.sqrt(1 - _pow(beta2, t)) / (1 - _pow(beta1, t)))
    b1, w1, b2, w2, eps = T(beta1), T(1 - beta1), T(beta2), T(1 - beta2), T(eps)
    nonfinite = no_nonfinite(p.dtype.type(0))
    for i in range(p.shape[0]):
        d = g[i]
        mi = b1 * m[i] + w1 * d
        vi = b2 * v[i] + w2 * (d * d)
        m[i] = mi
        v[i] = vi
        # computed in float64 (neg_rate), stored (and checked) in p's type:
        # a finite float64 update can overflow float32
        q = T(p[i] + (neg_rate * mi) / (np.sqrt(vi) + eps))
        p[i] = q
        nonfinite = or_nonfinite(nonfinite, q)
    return all_finite(nonfinite)


# C entry points: generated from each kernel's declaration, so that they read
# exactly the slots and entries SPECS declares, in its order.
def _wrapper_source(name):
    """Source of the C entry point of kernel ``name``: ``state`` viewed as its
    slots, ``hyper`` as its hyperparameters (flags compared with 0), passed
    to the kernel in the order of its arguments."""
    spec = SPECS[name]
    args = ["carray(p, (n,))", "carray(g, (n,))"]
    args += [f"s[{j}, :n]" for j in range(len(spec.slots))]
    args += ["t"] if spec.uses_step else []
    args += [f"h[{i}] != 0" if h in spec.flags else f"h[{i}]" for i, h in enumerate(spec.hyper)]
    return (f"def _{name}_c(p, g, state, n, stride, hyper, t):\n"
            f"    s = carray(state, ({len(spec.slots)}, stride))\n"
            f"    h = carray(hyper, ({len(spec.hyper)},))\n"
            f"    return {name}_step({', '.join(args)})\n")


def _make_wrapper(name):
    # Compiled under the kernel's file name: Numba's cache locates, names and
    # invalidates a function's cache by its file (its time stamp and size),
    # and does not notice a change in a function it calls from another file,
    # so the wrapper's cache must go stale whenever the kernel's does (here
    # the declaration, the kernels and this generator share one file).  Slot
    # and entry counts and indices are literals in the generated source:
    # Numba compiles them as constants, as in hand-written wrappers.
    kernel = _KERNELS[name]
    namespace = {"carray": carray, f"{name}_step": kernel}
    exec(compile(_wrapper_source(name), inspect.getfile(kernel.py_func), "exec"), namespace)
    wrapper = namespace[f"_{name}_c"]
    wrapper.__module__ = kernel.py_func.__module__
    return wrapper


def _signature(t):
    p = types.CPointer(t)
    return types.int32(p, p, p, types.int64, types.int64, types.CPointer(types.float64),
                       types.int64)


def step_function(name):
    """The update kernel declared as ``name`` (an njit function, called from Python)."""
    return _KERNELS[name]


def step_cfunc(name, dtype):
    """C address of the cached update cfunc for optimizer kernel ``name``."""
    wrapper = _C_WRAPPERS.get(name)
    if wrapper is None:  # generated at first use: a kernel may be declared after import
        wrapper = _C_WRAPPERS.setdefault(name, _make_wrapper(name))  # one wins a race
    return register_address(c_entry_point(wrapper, dtype, _signature), "step", name, dtype)


# Each kernel keeps its cache only in the folder fastbp checked (fastbp._config).
pin_module(globals())
