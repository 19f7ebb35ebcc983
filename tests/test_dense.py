"""Compiled dense kernels (fastbp._ext.dense) against fastbp.reference."""
import os
import platform
import sys

import numpy as np
import pytest

from fastbp import activations, reference
from fastbp._ext import dense

from helpers import DTYPES, assert_close

ACTS = list(activations.ACTIVATION_CODES)


def _data(rng, dtype, m=7, n_in=5, n_out=4, scale=2.0):
    x = (scale * rng.normal(size=(m, n_in))).astype(dtype)
    w = rng.normal(size=(n_in, n_out)).astype(dtype)
    b = rng.normal(size=n_out).astype(dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_gemm_matches_numpy(rng, dtype, trans_a, trans_b):
    a = rng.normal(size=(6, 3) if trans_a else (3, 6)).astype(dtype)
    b = rng.normal(size=(4, 6) if trans_b else (6, 4)).astype(dtype)
    out = dense.gemm(a, b, trans_a, trans_b)
    assert out.dtype == dtype and out.shape == (3, 4)
    assert_close(out, reference.gemm(a, b, trans_a, trans_b), dtype)


# Shapes that reach every branch of csrc/smallgemm_impl.h in both dtypes
# (vector length 8 floats / 4 doubles): whole blocks, a last block flush
# with the edge (overlapping the one before), fewer rows than a block (8, 6
# or 4 rows by level), C
# narrower than one or two vectors (transposed-B dot products for A @ B,
# C written transposed for A.T @ B), a shared dimension with a scalar tail,
# and A @ B.T with a short shared dimension (B copied transposed) or a long
# one (dot products).
SMALL_SHAPES = [
    (1, 1, 1), (1, 9, 3), (2, 3, 5), (3, 2, 64), (4, 16, 4), (5, 17, 9),
    (7, 8, 33), (8, 12, 10), (9, 5, 13), (13, 40, 7), (16, 1, 20),
    (20, 64, 32), (31, 2, 64), (32, 64, 64), (33, 23, 65), (64, 10, 128),
    (100, 10, 32), (96, 96, 96),
    # AVX2's 6-row blocks: whole ones, and a last one flush with the edge
    (54, 40, 9), (50, 33, 17),
]


# Every instruction-set variant this machine can run (0 baseline, 1 AVX2,
# 2 AVX-512; the project machine and CI have all three).
ISAS = list(range(dense.small_gemm_isa() + 1))


@pytest.mark.vector_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("m,n,k", SMALL_SHAPES)
def test_small_gemm_kernels_match_reference(rng, dtype, trans_a, trans_b, m, n, k):
    a = rng.normal(size=(k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.normal(size=(n, k) if trans_b else (k, n)).astype(dtype)
    exact = reference.gemm(a.astype(np.float64), b.astype(np.float64), trans_a, trans_b)
    for isa in ISAS:
        out = dense.gemm_small_kernel(a, b, trans_a, trans_b, isa)
        assert out is not None, f"isa {isa} declined a shape it should take"
        assert out.dtype == dtype and out.shape == (m, n)
        assert np.isfinite(out).all(), f"isa {isa} left an entry of C unwritten"
        # Relative to the size of a dot product of k terms, not to max |C|.
        assert_close(out, exact, dtype, scale=max(np.sqrt(k) * 4, 1.0))


def _cpu_level():
    """The level /proc/cpuinfo says this CPU has (0 baseline, 1 AVX2, 2 AVX-512)."""
    flags = open("/proc/cpuinfo").read().split() if sys.platform == "linux" else []
    if platform.machine() not in ("x86_64", "AMD64") or not flags:
        return 0
    return 2 if "avx512f" in flags and "fma" in flags else 1 if "avx2" in flags and "fma" in flags else 0


@pytest.mark.vector_kernels
def test_kernels_run_the_widest_vectors_the_cpu_has_unless_capped():
    best = _cpu_level()
    assert dense.isa_hardware() == best
    cap = {"baseline": 0, "avx2": 1, "avx512": 2}.get(os.environ.get("FASTBP_ISA"), best)
    assert dense.small_gemm_isa() == min(best, cap)


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_gemm_declines_large_and_tt_and_blas_takes_over(rng, dtype):
    a = rng.normal(size=(100, 100)).astype(dtype)
    b = rng.normal(size=(100, 100)).astype(dtype)
    wide = rng.normal(size=(100, 1024 // np.dtype(dtype).itemsize)).astype(dtype)
    deep = rng.normal(size=(2048, 64)).astype(dtype)
    big = rng.normal(size=(400, 400)).astype(dtype)
    assert dense.gemm_small_kernel(big, big) is None             # above every cap
    assert dense.gemm_small_kernel(a, b, isa=0) is None          # baseline: above 96^3
    if 1 in ISAS:
        # AVX2 takes 100^3 with rows of 400-800 bytes, but not 1 KB rows
        # above 96^3, nor a B it sweeps beyond 256 KB (csrc/smallgemm.h)
        assert dense.gemm_small_kernel(a, b, isa=1) is not None
        assert dense.gemm_small_kernel(a, wide, isa=1) is None
        tall = rng.normal(size=(16, 2048)).astype(dtype)
        assert dense.gemm_small_kernel(tall[:, :512].copy(), deep[:512], isa=1) is not None
        assert dense.gemm_small_kernel(tall, deep, isa=1) is None
    assert dense.gemm_small_kernel(a[:8, :8].copy(), b[:8, :8].copy(), True, True) is None
    for ta in (False, True):
        for tb in (False, True):
            assert_close(dense.gemm(a, b, ta, tb), reference.gemm(a, b, ta, tb), dtype)


@pytest.mark.vector_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(2048, 10, 256), (1000, 4, 300), (600, 12, 1030)])
def test_narrow_weight_gradients_above_the_caps_run_the_narrow_path(rng, dtype, m, n, k):
    """A.T @ B with 4-12 columns above the small kernels' caps (a weight
    gradient into a 10-class output layer) runs the narrow small path at
    AVX2 and AVX-512, not the packed kernels, with the packed kernels' bits
    (each entry one chain of multiply-adds in k order); 13 columns or an A
    of more than 8 MiB stay packed."""
    a = rng.normal(size=(k, m)).astype(dtype)
    b = rng.normal(size=(k, n)).astype(dtype)
    exact = reference.gemm(a.astype(np.float64), b.astype(np.float64), True, False)
    for isa in ISAS[1:]:
        out = dense.gemm_small_kernel(a, b, True, False, isa)
        assert out is not None, f"isa {isa} left {m} x {n} x {k} to the packed kernels"
        assert_close(out, exact, dtype, scale=max(np.sqrt(k) * 4, 1.0))
        np.testing.assert_array_equal(out, dense.gemm_packed_kernel(a, b, True, False, isa))
    if ISAS[-1] >= 1:
        assert dense.gemm_kernel(m, n, k, True, False, dtype) == "small"
        # split into row ranges on two threads: the same bits
        previous = dense.set_threads(1)
        try:
            one = dense.gemm(a, b, True, False)
            dense.set_threads(2)
            np.testing.assert_array_equal(dense.gemm(a, b, True, False), one)
        finally:
            dense.set_threads(previous)
        # beyond the caps (2048 x 13 x 256 = 2**22.7 multiply-adds) but too
        # wide, or with an A of just over 8 MiB: packed
        assert dense.gemm_kernel(2048, 13, 256, True, False, dtype) == "packed"
        deep = (8 << 20) // (2048 * np.dtype(dtype).itemsize) + 1
        assert dense.gemm_kernel(2048, n, deep, True, False, dtype) == "packed"
    else:
        assert dense.gemm_kernel(m, n, k, True, False, dtype) == "blas"


# Shapes for the packed kernels: whole register tiles, edge tiles in rows
# and columns at every level's tile (8 x 32 and 4 x 32 at AVX-512, 4 x 24
# and 4 x 12 at AVX2, 4 x 8 baseline), several cache blocks of the shared
# dimension (KC 128-256) and of rows and columns (MC, NC).
PACKED_SHAPES = [(1, 1, 1), (3, 5, 7), (4, 24, 9), (9, 33, 17), (17, 70, 300),
                 (150, 40, 513), (301, 1100, 65), (64, 256, 784)]


@pytest.mark.vector_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True),
                                             (True, True)])
@pytest.mark.parametrize("m,n,k", PACKED_SHAPES)
def test_packed_gemm_kernels_match_reference_at_every_level(rng, dtype, trans_a, trans_b,
                                                            m, n, k):
    a = rng.normal(size=(k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.normal(size=(n, k) if trans_b else (k, n)).astype(dtype)
    exact = reference.gemm(a.astype(np.float64), b.astype(np.float64), trans_a, trans_b)
    outs = []
    for isa in ISAS:
        out = dense.gemm_packed_kernel(a, b, trans_a, trans_b, isa)
        assert out is not None and out.dtype == dtype and out.shape == (m, n)
        assert np.isfinite(out).all(), f"isa {isa} left an entry of C unwritten"
        assert_close(out, exact, dtype, scale=max(np.sqrt(k) * 4, 1.0))
        outs.append(out)
    # every entry is one chain of multiply-adds in k order, whatever the
    # blocking: column and row ranges computed apart give the same bits
    if not trans_b and n > 24:
        left = dense.gemm_packed_kernel(a, b[:, :24].copy() if not trans_b else b, trans_a,
                                        trans_b, ISAS[-1])
        np.testing.assert_array_equal(left, outs[-1][:, :24])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fma_peak_probe_runs_at_every_level(dtype):
    # A rate, so only its sanity is asserted (speed is for benchmarks).
    for isa in ISAS:
        peak = dense.fma_peak_gflops(dtype, isa, seconds=0.01, repeats=1)
        assert np.isfinite(peak) and peak > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_gemm_is_deterministic_and_leaves_inputs_alone(rng, dtype):
    a = rng.normal(size=(33, 23)).astype(dtype)
    b = rng.normal(size=(65, 23)).astype(dtype)
    a0, b0 = a.copy(), b.copy()
    first = dense.gemm(a, b, False, True)
    assert np.array_equal(first, dense.gemm(a, b, False, True))
    assert np.array_equal(a, a0) and np.array_equal(b, b0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
def test_dense_forward_matches_reference(rng, dtype, act):
    x, w, b = _data(rng, dtype)
    code = activations.code(act)
    out = dense.dense_forward(x, w, b, code)
    assert out.dtype == dtype
    assert_close(out, reference.dense_forward(x, w, b, code), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
def test_dense_backward_matches_reference(rng, dtype, act):
    x, w, b = _data(rng, dtype)
    code = activations.code(act)
    a = reference.dense_forward(x, w, b, code)
    g = rng.normal(size=a.shape).astype(dtype)
    got = dense.dense_backward(x, w, a, g, code)
    want = reference.dense_backward(x, w, a, g, code)
    for name, got_i, want_i in zip(("dW", "db", "dX"), got, want):
        assert got_i.dtype == dtype, name
        assert_close(got_i, want_i, dtype)


@pytest.mark.parametrize("act", ACTS)
def test_activation_derivative_matches_finite_differences(rng, act):
    """The derivative written in terms of the output equals d f / d x."""
    code = activations.code(act)
    x = np.concatenate([rng.normal(scale=3, size=200), [-30.0, -5.0, 5.0, 19.0, 21.0, 30.0]])
    x = x[np.abs(x) > 1e-3]  # stay off the kink of relu-like functions
    eps = 1e-6
    numeric = (reference.activation(x + eps, code) - reference.activation(x - eps, code)) / (2 * eps)
    analytic = reference.activation_derivative(reference.activation(x, code), code)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_preactivations_stay_finite(dtype):
    big = 1000.0 if dtype == "float64" else 100.0
    x = np.array([[-big, big, 0.0]], dtype=dtype)
    w = np.eye(3, dtype=dtype)
    b = np.zeros(3, dtype=dtype)
    with np.errstate(all="raise"):
        for act in ACTS:
            out = dense.dense_forward(x, w, b, activations.code(act))
            assert np.isfinite(out).all(), act


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_accept_read_only_inputs_and_do_not_modify_them(rng, dtype):
    x, w, b = _data(rng, dtype)
    a = dense.dense_forward(x, w, b, 2)
    g = rng.normal(size=a.shape).astype(dtype)
    copies = [arr.copy() for arr in (x, w, b, a, g)]
    for arr in (x, w, b, a, g):
        arr.setflags(write=False)
    dense.dense_forward(x, w, b, 2)
    dense.dense_backward(x, w, a, g, 2)
    for arr, copy in zip((x, w, b, a, g), copies):
        np.testing.assert_array_equal(arr, copy)


def test_shape_mismatch_is_an_error(rng):
    x, w, b = _data(rng, "float64")
    with pytest.raises(ValueError, match="shapes"):
        dense.dense_forward(x, w, b[:-1], 0)


# The vectorized epilogues (csrc/epilogue.h) at every level: widths that are
# whole vectors, bands of four, and leave tails of every length, for both
# vector lengths (4 and 8 doubles, 8 and 16 floats).
EPILOGUE_WIDTHS = [1, 3, 4, 7, 8, 10, 15, 16, 17, 33, 64, 100, 129]


def _rows_by_rows_sum(d):
    """Column sums added row by row from 0, the order the kernels keep."""
    total = np.zeros(d.shape[1], dtype=d.dtype)
    for row in d:
        total += row
    return total


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("n", EPILOGUE_WIDTHS)
def test_epilogues_are_bitwise_the_scalar_loops(rng, dtype, act, n):
    code = activations.ACTIVATION_CODES[act]
    m = 5
    z = (2 * rng.normal(size=(m, n))).astype(dtype)
    b = rng.normal(size=n).astype(dtype)
    g = rng.normal(size=(m, n)).astype(dtype)
    out0 = dense.bias_activation_kernel(z, b, code, 0)
    d0, db0 = dense.activation_backward_db_kernel(g, out0, code, 0)
    assert out0.dtype == dtype and d0.dtype == dtype and db0.dtype == dtype
    if act in ("identity", "relu", "leaky_relu"):
        # exact operations: the reference gives the same bits
        np.testing.assert_array_equal(out0, reference.bias_activation(z, b, code))
        np.testing.assert_array_equal(d0, reference.activation_backward(g, out0, code))
    else:
        assert_close(out0, reference.bias_activation(z, b, code), dtype)
        assert_close(d0, reference.activation_backward(g, out0, code), dtype)
    np.testing.assert_array_equal(db0, _rows_by_rows_sum(d0))
    for isa in ISAS[1:]:
        np.testing.assert_array_equal(dense.bias_activation_kernel(z, b, code, isa), out0)
        d, db = dense.activation_backward_db_kernel(g, out0, code, isa)
        np.testing.assert_array_equal(d, d0)
        np.testing.assert_array_equal(db, db0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", ISAS)
def test_relu_epilogues_keep_the_scalar_nan_and_zero_rules(dtype, isa):
    # `0 if v <= 0 else v`: -0 gives +0 and NaN stays NaN (np.maximum's and
    # torch.relu's rule; it was `v if v > 0 else 0`, which hid NaN); the
    # derivative is g where a > 0, else 0 (torch's threshold_backward)
    relu, leaky = activations.ACTIVATION_CODES["relu"], activations.ACTIVATION_CODES["leaky_relu"]
    z = np.array([[np.nan, -0.0, 0.0, 2.0, -2.0, np.inf, -np.inf, 1e-30, -1e-30] * 3],
                 dtype=dtype)
    b = np.zeros(z.shape[1], dtype=dtype)
    out = dense.bias_activation_kernel(z, b, relu, isa)
    expected = np.where(z <= 0, 0, z).astype(dtype)
    np.testing.assert_array_equal(out, expected)
    assert np.isnan(out[0, 0]) and not np.signbit(out[~np.isnan(out)]).any()
    slope = np.asarray(0.01, dtype)
    np.testing.assert_array_equal(dense.bias_activation_kernel(z, b, leaky, isa),
                                  np.where(z > 0, z, slope * z))
    g = np.full_like(z, 3.0)
    d, db = dense.activation_backward_db_kernel(g, z, relu, isa)
    np.testing.assert_array_equal(d, np.where(z > 0, g, 0))
    np.testing.assert_array_equal(db, d[0])


@pytest.mark.parametrize("code", [-1, 7, 99, 2 ** 31 - 1, 2 ** 40])
def test_unknown_activation_codes_are_refused(code):
    """An unknown code fell through every branch: the bias and activation
    were silently skipped."""
    x, w, b = np.ones((2, 3)), np.ones((3, 2)), np.ones(2)
    for call in (lambda: dense.dense_forward(x, w, b, code),
                 lambda: dense.dense_backward(x, w, np.ones((2, 2)), np.ones((2, 2)), code),
                 lambda: dense.bias_activation_kernel(np.ones((2, 2)), b, code),
                 lambda: dense.activation_backward_db_kernel(np.ones((2, 2)), np.ones((2, 2)),
                                                             code)):
        with pytest.raises(ValueError, match="unknown activation code"):
            call()


def test_dimensions_beyond_the_kernels_int_are_refused():
    """The kernels take C ints: a width of 2**31 was cut (2**32 + 3 became 3,
    a wrong answer).  np.zeros maps untouched pages lazily: 8 GiB each of
    address space, next to nothing resident."""
    n = 2 ** 31
    x = np.zeros((1, n), dtype=np.float32)
    w = np.zeros((n, 1), dtype=np.float32)
    with pytest.raises(ValueError, match="limit"):
        dense.dense_forward(x, w, np.zeros(1, dtype=np.float32), 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "identity"])
def test_non_finite_values_pass_the_epilogue_as_in_the_reference(dtype, act):
    """NaN, inf and signed zeros through the forward epilogue at every level
    and in the scalar loop, against the reference bit for bit (NaN as NaN):
    ReLU made NaN 0 (`v > 0 ? v : 0`) where np.maximum and torch keep it."""
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1.5, -1.5], dtype=dtype)
    z = np.tile(special, (9, 3)).reshape(9, -1)  # wide enough for the vector loop and its tail
    b = np.zeros(z.shape[1], dtype=dtype)
    want = reference.bias_activation(z, b, act)
    for isa in ISAS:
        got = dense.bias_activation_kernel(z, b, activations.code(act), isa)
        np.testing.assert_array_equal(got, want, err_msg=f"{act} at level {isa}")
        assert np.array_equal(np.isnan(got), np.isnan(want))
        assert np.array_equal(np.signbit(got[~np.isnan(got)]), np.signbit(want[~np.isnan(want)]))


@pytest.mark.parametrize("kw", [dict(seconds=float("nan")), dict(seconds=float("inf")),
                                dict(seconds=0.0), dict(repeats=0), dict(dtype="int8")])
def test_peak_probe_refuses_what_it_cannot_time(kw):
    """seconds=nan never ended its calibration loop (a hang); repeats=0
    returned 0 GFLOP/s; an int8 dtype was timed as float32."""
    with pytest.raises(ValueError):
        dense.fma_peak_gflops(**kw)


def test_gemm_kernel_refuses_negative_sizes_and_other_dtypes():
    with pytest.raises(ValueError):
        dense.gemm_kernel(-5, -1, -7)
    with pytest.raises(ValueError):
        dense.gemm_kernel(4, 4, 4, dtype="int32")
