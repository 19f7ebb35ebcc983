"""fastbp._numba.optim.div_by_constant: division by a constant without the divider, to the
last bit (Adam's sqrt(v) / sqrt(1 - beta2 ** t))."""
import os

import numpy as np
import pytest
from numba import njit

from fastbp._numba import optim as exact

DTYPES = (np.float32, np.float64)


@njit
def _divide_all(a, c, inv_c, out):
    for i in range(a.shape[0]):
        out[i] = exact.div_by_constant(a[i], c, inv_c)


def _divisors(dtype):
    """Adam's bias corrections sqrt(1 - beta2 ** t), as the kernel casts
    them, for common beta2 and t, then 1 and a few random ones."""
    T = np.dtype(dtype).type
    cs = [T((1 - beta2 ** t) ** 0.5) for beta2 in (0.999, 0.99, 0.9)
          for t in (1, 2, 7, 100, 5000)]
    rng = np.random.default_rng(5)
    cs += [T(1)] + [T(x) for x in 2.0 ** rng.uniform(-26, 0, size=4)]
    return cs


def _quotients(a, c):
    T = a.dtype.type
    out = np.empty_like(a)
    _divide_all(a, T(c), T(1) / T(c), out)
    return out


def test_every_float32_significand_divides_exactly():
    """Every a in [1, 2) (each float32 significand once; scaling by a power
    of two scales a / c exactly) gives NumPy's quotient bit for bit."""
    a = (np.arange(1 << 23, dtype=np.uint32) + np.uint32(0x3F800000)).view(np.float32)
    rounded_once = 0
    for c in _divisors(np.float32):
        got = _quotients(a, c)
        expected = a / c
        bad = np.flatnonzero(got.view(np.uint32) != expected.view(np.uint32))
        assert bad.size == 0, (f"a / {c!r} differs at a = {a[bad[:3]]}: "
                               f"{got[bad[:3]]} vs {expected[bad[:3]]}")
        rounded_once += np.count_nonzero(a * (np.float32(1) / c) != expected)
    # The correction step matters: the product with the reciprocal alone is
    # off in the last bit for many of these.
    assert exact.FUSED is False or rounded_once > 1_000_000


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_and_special_values_divide_exactly(dtype):
    """sqrt's outputs over the whole exponent range, and 0, inf, NaN and
    the largest number: NumPy's quotient bit for bit (NaN where NumPy's is)."""
    T = np.dtype(dtype).type
    info = np.finfo(dtype)
    rng = np.random.default_rng(11)
    v = np.concatenate([
        2.0 ** rng.uniform(np.log2(info.smallest_subnormal), np.log2(info.max), 200_000),
        [0.0, info.smallest_subnormal, info.tiny, 1.0, info.max, np.inf, np.nan]])
    a = np.sqrt(v.astype(dtype))   # Adam's numerators: sqrt of a second moment
    a = np.concatenate([a, -a])    # and their negatives (any sign divides exactly)
    with np.errstate(over="ignore"):
        for c in _divisors(dtype):
            got = _quotients(a, c)
            expected = a / T(c)
            same = (got == expected) & (np.signbit(got) == np.signbit(expected))
            same |= np.isnan(got) & np.isnan(expected)
            assert same.all(), f"a / {c!r} differs at a = {a[~same][:3]}"


def test_without_fused_multiply_add_it_divides(monkeypatch):
    """Where multiply-add is not one instruction the helper is a division
    (the Python function, as compiled with FUSED False)."""
    monkeypatch.setattr(exact, "FUSED", False)
    for a, c in ((np.float32(1.7), np.float32(0.031622775)), (np.float64(3.0), 0.3)):
        assert exact.div_by_constant.py_func(a, c, 1 / c) == a / c


def test_fused_flag_matches_this_cpu():
    """FUSED says whether the CPU Numba compiles for has a multiply-add
    instruction: on Linux x86-64, exactly when /proc/cpuinfo lists the fma
    flag, unless Numba is told which features to compile for."""
    import platform

    from numba import config
    assert isinstance(exact.FUSED, bool)
    if platform.machine().lower() in ("x86_64", "amd64") and \
            os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
        if config.CPU_FEATURES is None:
            assert exact.FUSED == ("fma" in flags)
        else:   # NUMBA_CPU_FEATURES, or NUMBA_CPU_NAME=generic (no features)
            assert exact.FUSED == ("+fma" in config.CPU_FEATURES.split(","))
