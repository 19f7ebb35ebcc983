# cython: language_level=3
"""Dense-layer kernels: BLAS GEMM with a fused bias + activation epilogue.

Design
------
This module owns the BLAS-bound work of one dense layer, in float32 and
float64 (the ``floating`` fused type):

* ``dense_forward_ptr``  : out = act(x @ w + b), one GEMM then one pass over
  ``out`` adding the bias and applying the activation in place.
* ``dense_backward_ptr`` : given g = dL/d(out) and the layer's *output* a,
  turns g into dL/d(pre-activation) in place (derivative written in terms of
  the output, as scikit-learn does), then db = column sums of g,
  dw = x.T @ g, and (if dx is not NULL) dx = g @ w.T.

Small products (every layer of a small network; with AVX-512 also those of
medium ones, while the operand they sweep fits in cache) go to the
register-blocked kernels of ``smallgemm.h`` instead of BLAS, which spends
much of its time on such operands packing them; smallgemm.h gives the
bounds.

Arrays are row-major (C order).  BLAS is column-major, so ``gemm_rm`` hands
it C = op(A) op(B) as C.T = op(B).T op(A).T by swapping the operands, with
no copy or transpose of our own (the packed kernels of packedgemm.h copy
panels of the operands, as BLAS does inside).  The ``cdef ... nogil``
kernels take raw pointers and never validate: callers (the engine's modules, or the
``def`` wrappers below) own shapes and dtypes.  The ``def`` wrappers are for
tests and for Python users: ``gemm``, ``dense_forward`` and
``dense_backward`` have twins of the same name and signature in
``fastbp.reference``; the ``*_kernel`` functions are test hooks that run one
path (an instruction-set level, the small or the packed kernels) and are
held to the reference's ``gemm``, ``bias_activation`` and
``activation_backward``.

Threads: the calling thread declares how many the kernels may use
(``set_threads``; ``fit`` declares its ``n_threads``).  Our own GEMMs split
large products across a persistent worker pool (csrc/pool.h, no OpenMP, safe
across fork), bitwise the same on any thread count (csrc/gemm.h); BLAS uses
its own threads, limited with threadpoolctl by the caller.  The elementwise
epilogues here run on the calling thread: split on their own, the hand-off
costs more than the pass on small layers.  engine_rows.pyx's row-parallel steps
run them on every thread instead, each on its own rows, in the same job as
that range's product.
"""
import numpy as np

from libc.math cimport exp, expf, expm1, expm1f, log1p, log1pf, tanh, tanhf
from libc.stdint cimport int64_t
from libc.string cimport memset
from scipy.linalg.cython_blas cimport dgemm, sgemm

from fastbp._validation import check_dtype

from fastbp._ext.engine cimport ELU, IDENTITY, LEAKY_RELU, RELU, SIGMOID, SOFTPLUS, TANH

# Softplus follows torch.nn.Softplus(beta=1, threshold=20): linear above 20.
cdef double SOFTPLUS_THRESHOLD = 20.0
# torch.nn.LeakyReLU's default negative slope, torch.nn.ELU's default alpha.
cdef double LEAKY_SLOPE = 0.01
cdef double ELU_ALPHA = 1.0


cdef inline floating _exp(floating x) noexcept nogil:
    if floating is float:
        return expf(x)
    else:
        return exp(x)


cdef inline floating _expm1(floating x) noexcept nogil:
    if floating is float:
        return expm1f(x)
    else:
        return expm1(x)


cdef inline floating _log1p(floating x) noexcept nogil:
    if floating is float:
        return log1pf(x)
    else:
        return log1p(x)


cdef inline floating _tanh(floating x) noexcept nogil:
    if floating is float:
        return tanhf(x)
    else:
        return tanh(x)


cdef extern from "smallgemm.h" nogil:
    int fbp_gemm_small_isa_f32(int isa, int trans_a, int trans_b, int m, int n, int k,
                               const float* a, int lda, const float* b, int ldb,
                               float* c, int ldc)
    int fbp_gemm_small_isa_f64(int isa, int trans_a, int trans_b, int m, int n, int k,
                               const double* a, int lda, const double* b, int ldb,
                               double* c, int ldc)
    int fbp_isa_best()
    int fbp_isa_detect()


cdef extern from "packedgemm.h" nogil:
    int fbp_gemm_packed_isa_f32(int isa, int trans_a, int trans_b, int m, int n, int k,
                                const float* a, int lda, const float* b, int ldb,
                                float* c, int ldc)
    int fbp_gemm_packed_isa_f64(int isa, int trans_a, int trans_b, int m, int n, int k,
                                const double* a, int lda, const double* b, int ldb,
                                double* c, int ldc)


cdef extern from "peak.h" nogil:
    double fbp_fma_probe(int isa, int dbl, int64_t iters)


cdef extern from "gemm.h" nogil:
    ctypedef void (*fbp_task_fn)(void* ctx, int task) noexcept nogil
    int fbp_pool_run(int width, fbp_task_fn fn, void* ctx, int n_tasks)
    int fbp_gemm_f32(int threads, int trans_a, int trans_b, int m, int n, int k,
                     const float* a, int lda, const float* b, int ldb, float* c, int ldc)
    int fbp_gemm_f64(int threads, int trans_a, int trans_b, int m, int n, int k,
                     const double* a, int lda, const double* b, int ldb, double* c, int ldc)
    int fbp_pool_workers()
    int fbp_gemm_prepare(fbp_gemm_job* j, int dbl, int threads, int trans_a, int trans_b,
                         int m, int n, int k, const void* a, int lda, const void* b, int ldb,
                         void* c, int ldc)
    void fbp_gemm_task(void* ctx, int task)
    int fbp_gemm_kind(int dbl, int trans_a, int trans_b, int m, int n, int k)
    int fbp_gemm_rows(int dbl, int trans_b, int m, int lo, int hi, int n, int k,
                      const void* a, int lda, const void* b, int ldb, void* c, int ldc)


cdef int gemm_prepare(fbp_gemm_job* job, bint dbl, int threads, bint trans_a, bint trans_b,
                      int m, int n, int k, const void* a, int lda, const void* b, int ldb,
                      void* c, int ldc) noexcept nogil:
    return fbp_gemm_prepare(job, dbl, threads, trans_a, trans_b, m, n, k, a, lda, b, ldb,
                            c, ldc)


cdef void gemm_task(void* job, int task) noexcept nogil:
    fbp_gemm_task(job, task)


cdef int gemm_kind(bint dbl, bint trans_a, bint trans_b, int m, int n, int k) noexcept nogil:
    return fbp_gemm_kind(dbl, trans_a, trans_b, m, n, k)


cdef int gemm_rows(bint dbl, bint trans_b, int m, int lo, int hi, int n, int k,
                   const void* a, int lda, const void* b, int ldb, void* c,
                   int ldc) noexcept nogil:
    return fbp_gemm_rows(dbl, trans_b, m, lo, hi, n, k, a, lda, b, ldb, c, ldc)


# Vectorized bias + activation and activation backward + bias gradient
# (csrc/epilogue.h); they return 0 for activations they leave to the loops
# below.
cdef extern from "epilogue.h" nogil:
    int FBP_ACT_IDENTITY
    int FBP_ACT_RELU
    int FBP_ACT_LEAKY_RELU
    int fbp_bias_act_f32(int isa, float* z, const float* b, int64_t m, int64_t n,
                         int act, float slope)
    int fbp_bias_act_f64(int isa, double* z, const double* b, int64_t m, int64_t n,
                         int act, double slope)
    int fbp_act_backward_db_f32(int isa, float* g, const float* a, float* db,
                                int64_t m, int64_t n, int act, float slope)
    int fbp_act_backward_db_f64(int isa, double* g, const double* a, double* db,
                                int64_t m, int64_t n, int act, double slope)


cdef inline int bias_act_vec(int isa, floating* z, const floating* b, int64_t m, int64_t n,
                             int act) noexcept nogil:
    if floating is float:
        return fbp_bias_act_f32(isa, z, b, m, n, act, <float>LEAKY_SLOPE)
    else:
        return fbp_bias_act_f64(isa, z, b, m, n, act, LEAKY_SLOPE)


cdef inline int backward_db_vec(int isa, floating* g, const floating* a, floating* db,
                                int64_t m, int64_t n, int act) noexcept nogil:
    if floating is float:
        return fbp_act_backward_db_f32(isa, g, a, db, m, n, act, <float>LEAKY_SLOPE)
    else:
        return fbp_act_backward_db_f64(isa, g, a, db, m, n, act, LEAKY_SLOPE)


# epilogue.h's activation codes are engine.pxd's (a build error otherwise).
cdef extern from "interface.h":
    void FBP_SAME(int c_value, int pxd_value)
FBP_SAME(FBP_ACT_IDENTITY, IDENTITY)
FBP_SAME(FBP_ACT_RELU, RELU)
FBP_SAME(FBP_ACT_LEAKY_RELU, LEAKY_RELU)


# How many threads the calling thread's kernels may use, as it last declared
# (set_threads; 0: not declared, which counts as 1).  Thread-local, so
# concurrent fits with different n_threads in different Python threads each
# see their own.
cdef extern from *:
    """
    #include "platform.h"
    static FBP_THREAD_LOCAL int fbp_threads = 0;
    #ifdef FBP_VECTORS
    #define FBP_HAS_VECTORS 1
    #else
    #define FBP_HAS_VECTORS 0
    #endif
    """
    int fbp_threads
    const int FBP_HAS_VECTORS


def vector_kernels():
    """True if this build has fastbp's vector kernels (GCC or Clang on
    64-bit Linux or macOS: csrc/platform.h); False for the portable build
    (MSVC, or -DFBP_NO_VECTORS), whose products all go to BLAS."""
    return bool(FBP_HAS_VECTORS)


# Phase profiling (fastbp.bench --phases; off by default): when on, gemm_rm
# adds the time of every product it computes to PROFILE_GEMM, and the
# engine times the phases of its steps (engine._phase_seconds).  Process
# wide and unsynchronized: meant for one fit on one Python thread.
cdef extern from * nogil:
    """
    #include "platform.h"   /* fbp_now */
    static int fbp_profile_on = 0;
    static double fbp_profile_gemm = 0.0;
    """
    int fbp_profile_on
    double fbp_profile_gemm
    double fbp_now()


cdef double now() noexcept nogil:
    return fbp_now()


cdef bint profiling() noexcept nogil:
    return fbp_profile_on


cdef double profile_gemm_seconds(bint reset) noexcept nogil:
    global fbp_profile_gemm
    cdef double t = fbp_profile_gemm
    if reset:
        fbp_profile_gemm = 0.0
    return t


def _set_profiling(bint on):
    """Turn phase profiling on or off (see engine._phase_seconds); returns
    the previous setting."""
    global fbp_profile_on, fbp_profile_gemm
    previous = bool(fbp_profile_on)
    if on and not previous:
        fbp_profile_gemm = 0.0
    fbp_profile_on = on
    return previous


def set_threads(int n):
    """Declare, for the calling thread, how many threads the kernels may use:
    our GEMMs split products across that many (gemm.h), and BLAS is expected
    to be limited to it by the caller.  Returns the previous value."""
    global fbp_threads
    previous = fbp_threads
    fbp_threads = max(n, 0)
    return previous


cdef int kernel_threads() noexcept nogil:
    return fbp_threads if fbp_threads > 1 else 1


cdef void pool_run(task_fn fn, void* ctx, int n_tasks) noexcept nogil:
    fbp_pool_run(kernel_threads(), <fbp_task_fn>fn, ctx, n_tasks)


def pool_workers():
    """Worker threads the kernels' pool has started in this process."""
    return fbp_pool_workers()


cdef inline int gemm_small(int isa, bint trans_a, bint trans_b, int m, int n, int k,
                           const floating* a, int lda, const floating* b, int ldb,
                           floating* c, int ldc) noexcept nogil:
    """Row-major C = op(A) @ op(B) without BLAS, at instruction-set level isa
    (-1: the best this machine has); 0 if the shape is not one the small
    kernels take (then nothing is written)."""
    if floating is float:
        return fbp_gemm_small_isa_f32(isa, trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc)
    else:
        return fbp_gemm_small_isa_f64(isa, trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc)


cdef void gemm_rm(bint trans_a, bint trans_b, int m, int n, int k,
                  floating alpha, const floating* a, int lda,
                  const floating* b, int ldb,
                  floating beta, floating* c, int ldc) noexcept nogil:
    """Row-major C[m, n] = alpha * op(A) @ op(B) + beta * C.

    lda, ldb, ldc are row-major leading dimensions (row lengths as stored).
    """
    global fbp_profile_gemm
    cdef double t0
    if fbp_profile_on:
        t0 = fbp_now()
        _gemm_rm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
        fbp_profile_gemm += fbp_now() - t0
    else:
        _gemm_rm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)


cdef inline void _gemm_rm(bint trans_a, bint trans_b, int m, int n, int k,
                          floating alpha, const floating* a, int lda,
                          const floating* b, int ldb,
                          floating beta, floating* c, int ldc) noexcept nogil:
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    if m <= 0 or n <= 0:
        return
    # Our kernels first (gemm.h says which, and how they use threads); they
    # decline what BLAS does better.
    if alpha == 1 and beta == 0:
        if floating is float:
            if fbp_gemm_f32(fbp_threads, trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc):
                return
        else:
            if fbp_gemm_f64(fbp_threads, trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc):
                return
    # Column-major view: C.T[n, m] = op(B).T @ op(A).T -> swap the operands.
    if floating is float:
        sgemm(&tb, &ta, &n, &m, &k, &alpha, <float*>b, &ldb, <float*>a, &lda,
              &beta, c, &ldc)
    else:
        dgemm(&tb, &ta, &n, &m, &k, &alpha, <double*>b, &ldb, <double*>a, &lda,
              &beta, c, &ldc)


cdef void bias_activation(floating* z, const floating* b, int64_t m, int64_t n,
                          int act) noexcept nogil:
    """z[i, j] = act(z[i, j] + b[j]) in place."""
    bias_activation_at(-1, z, b, m, n, act)


cdef void bias_activation_at(int isa, floating* z, const floating* b, int64_t m, int64_t n,
                             int act) noexcept nogil:
    """bias_activation with the vectorized pass at instruction-set level isa
    (-1: the best this machine has).  The others have one loop per
    activation so the compiler sees a branch-free inner loop."""
    cdef int64_t i, j
    cdef floating v, e
    cdef floating* row
    if bias_act_vec(isa, z, b, m, n, act):
        return  # identity, relu, leaky_relu: vectorized, same values
    if act == IDENTITY:
        for i in range(m):
            row = z + i * n
            for j in range(n):
                row[j] = row[j] + b[j]
    elif act == RELU:
        for i in range(m):
            row = z + i * n
            for j in range(n):
                v = row[j] + b[j]
                row[j] = 0 if v <= 0 else v  # NaN stays NaN, as np.maximum
    elif act == SIGMOID:
        for i in range(m):
            row = z + i * n
            for j in range(n):
                v = row[j] + b[j]
                # Stable on both sides: never exp of a large positive number.
                if v >= 0:
                    row[j] = 1 / (1 + _exp(-v))
                else:
                    e = _exp(v)
                    row[j] = e / (1 + e)
    elif act == TANH:
        for i in range(m):
            row = z + i * n
            for j in range(n):
                row[j] = _tanh(row[j] + b[j])
    elif act == LEAKY_RELU:
        for i in range(m):
            row = z + i * n
            for j in range(n):
                v = row[j] + b[j]
                row[j] = v if v > 0 else <floating>LEAKY_SLOPE * v
    elif act == ELU:
        for i in range(m):
            row = z + i * n
            for j in range(n):
                v = row[j] + b[j]
                row[j] = v if v > 0 else <floating>ELU_ALPHA * _expm1(v)
    elif act == SOFTPLUS:
        for i in range(m):
            row = z + i * n
            for j in range(n):
                v = row[j] + b[j]
                row[j] = v if v > SOFTPLUS_THRESHOLD else _log1p(_exp(v))


cdef void activation_backward(floating* g, const floating* a, int64_t m, int64_t n,
                              int act) noexcept nogil:
    """g *= act'(x) in place, with the derivative written in terms of the
    activation's output a = act(x) (so the forward pass keeps only outputs)."""
    cdef int64_t i, size = m * n
    cdef floating v
    if act == IDENTITY:
        return
    elif act == RELU:
        for i in range(size):
            g[i] = g[i] if a[i] > 0 else 0
    elif act == SIGMOID:
        for i in range(size):
            g[i] = g[i] * (a[i] * (1 - a[i]))
    elif act == TANH:
        for i in range(size):
            g[i] = g[i] * (1 - a[i] * a[i])
    elif act == LEAKY_RELU:
        for i in range(size):
            g[i] = g[i] if a[i] > 0 else <floating>LEAKY_SLOPE * g[i]
    elif act == ELU:
        # a = alpha (e^x - 1) for x <= 0, so d a / d x = alpha e^x = a + alpha.
        for i in range(size):
            g[i] = g[i] if a[i] > 0 else g[i] * (a[i] + <floating>ELU_ALPHA)
    elif act == SOFTPLUS:
        # a = log(1 + e^x)  =>  sigmoid(x) = 1 - e^{-a}.
        for i in range(size):
            v = a[i]
            g[i] = g[i] if v > SOFTPLUS_THRESHOLD else g[i] * (-_expm1(-v))


cdef void activation_backward_db(int isa, floating* g, const floating* a, floating* db,
                                 int64_t m, int64_t n, int act) noexcept nogil:
    """g *= act'(x) and db = sum over rows of g, row by row from 0
    (epilogue.h at level isa, -1: the best): in one pass for identity, relu
    and leaky_relu, else after activation_backward's loop."""
    if not backward_db_vec(isa, g, a, db, m, n, act):
        activation_backward(g, a, m, n, act)
        backward_db_vec(isa, g, a, db, m, n, IDENTITY)


cdef void dense_forward_ptr(const floating* x, const floating* w, const floating* b,
                            floating* out, int64_t m, int64_t n_in, int64_t n_out,
                            int act) noexcept nogil:
    gemm_rm(False, False, <int>m, <int>n_out, <int>n_in, <floating>1.0,
            x, <int>n_in, w, <int>n_out, <floating>0.0, out, <int>n_out)
    bias_activation(out, b, m, n_out, act)


cdef void dense_backward_ptr(const floating* x, const floating* w, const floating* a,
                             floating* g, floating* dw, floating* db, floating* dx,
                             int64_t m, int64_t n_in, int64_t n_out,
                             int act) noexcept nogil:
    activation_backward_db(-1, g, a, db, m, n_out, act)
    # dw[n_in, n_out] = x.T @ g
    gemm_rm(True, False, <int>n_in, <int>n_out, <int>m, <floating>1.0,
            x, <int>n_in, g, <int>n_out, <floating>0.0, dw, <int>n_out)
    if dx != NULL:
        # dx[m, n_in] = g @ w.T
        gemm_rm(False, True, <int>m, <int>n_in, <int>n_out, <floating>1.0,
                g, <int>n_out, w, <int>n_out, <floating>0.0, dx, <int>n_in)


# ---------------------------------------------------------------------------
# Python-callable twins of the kernels (tests, fastbp.reference comparisons).
# Inputs may be read-only (const memoryviews); outputs are new arrays.

def _product_shape(a, b, bint trans_a, bint trans_b, name):
    """(m, n, k) of op(a) @ op(b); ValueError if the inner dimensions differ."""
    m, k = (a.shape[1], a.shape[0]) if trans_a else (a.shape[0], a.shape[1])
    kb, n = (b.shape[1], b.shape[0]) if trans_b else (b.shape[0], b.shape[1])
    if k != kb:
        raise ValueError(f"{name}: inner dimensions differ ({k} and {kb})")
    return m, n, k


def gemm(const floating[:, ::1] a, const floating[:, ::1] b,
         bint trans_a=False, bint trans_b=False):
    """Row-major ``op(a) @ op(b)`` as the engine computes it (test hook for
    ``gemm_rm``): the small kernels where they apply, else BLAS."""
    cdef int m, n, k
    m, n, k = _product_shape(a, b, trans_a, trans_b, "gemm")
    dtype = np.float32 if floating is float else np.float64
    out = np.empty((m, n), dtype=dtype)
    cdef floating[:, ::1] c = out
    if m == 0 or n == 0:
        return out
    with nogil:
        gemm_rm(trans_a, trans_b, m, n, k, <floating>1.0, &a[0, 0], <int>a.shape[1],
                &b[0, 0], <int>b.shape[1], <floating>0.0, &c[0, 0], n)
    return out


def small_gemm_isa():
    """Instruction-set level this module's kernels run at: 0 baseline,
    1 AVX2 + FMA, 2 AVX-512 (the best the CPU has, capped by FASTBP_ISA;
    see fastbp/_isa.py)."""
    return fbp_isa_best()


def isa_hardware():
    """The best instruction-set level this CPU (and OS) supports, whatever
    FASTBP_ISA says: 0 baseline, 1 AVX2 + FMA, 2 AVX-512."""
    return fbp_isa_detect()


def fma_peak_gflops(dtype="float32", int isa=-1, double seconds=0.1, int repeats=5):
    """Multiply-add peak of one core at instruction-set level ``isa`` (-1:
    this process's level), measured now: independent chains of vector
    multiply-adds (csrc/peak.h) timed for about ``seconds``, best of
    ``repeats``.  Returns GFLOP/s (2 flops a multiply-add)."""
    import time
    dtype = check_dtype(dtype)
    # (a NaN or infinite time never ended the calibration loop)
    if not 0 < seconds <= 60 or repeats < 1:
        raise ValueError(f"seconds must be in (0, 60] and repeats >= 1, not {seconds!r}, "
                         f"{repeats!r}")
    cdef int dbl = dtype == np.float64
    cdef int64_t iters = 1 << 16
    cdef double flops
    best = 0.0
    while True:   # calibrate: long enough to time well and reach full clock
        t0 = time.perf_counter()
        with nogil:
            flops = fbp_fma_probe(isa, dbl, iters)
        t = time.perf_counter() - t0
        if t >= seconds / 4 or iters > (<int64_t>1 << 40):
            break
        iters *= 4
    for _ in range(repeats):
        t0 = time.perf_counter()
        with nogil:
            flops = fbp_fma_probe(isa, dbl, iters)
        best = max(best, flops / (time.perf_counter() - t0) / 1e9)
    return best


def gemm_kernel(int m, int n, int k, bint trans_a=False, bint trans_b=False, dtype="float32"):
    """Which kernels compute ``op(A) @ op(B)`` of shape (m, n) over k at this
    process's instruction-set level: "small" (csrc/smallgemm.h), "packed"
    (csrc/packedgemm.h) or "blas"."""
    if m < 0 or n < 0 or k < 0:
        raise ValueError(f"m, n and k must be >= 0, not {m}, {n}, {k}")
    cdef bint dbl = check_dtype(dtype) == np.float64
    kind = gemm_kind(dbl, trans_a, trans_b, m, n, k)
    return {GEMM_BY_SMALL: "small", GEMM_BY_PACKED: "packed"}.get(kind, "blas")


def _kernel_product(const floating[:, ::1] a, const floating[:, ::1] b, bint trans_a,
                    bint trans_b, int isa, bint packed, name):
    """op(a) @ op(b) through the small (packed: the packed) kernels alone,
    on one thread, at level isa; None where they decline the shape."""
    cdef int m, n, k, done
    m, n, k = _product_shape(a, b, trans_a, trans_b, name)
    dtype = np.float32 if floating is float else np.float64
    out = np.full((m, n), np.nan, dtype=dtype)   # an entry left unwritten shows
    cdef floating[:, ::1] c = out
    if m == 0 or n == 0 or k == 0:
        return None
    with nogil:
        if not packed:
            done = gemm_small(isa, trans_a, trans_b, m, n, k, &a[0, 0], <int>a.shape[1],
                              &b[0, 0], <int>b.shape[1], &c[0, 0], n)
        elif floating is float:
            done = fbp_gemm_packed_isa_f32(isa, trans_a, trans_b, m, n, k, &a[0, 0],
                                           <int>a.shape[1], &b[0, 0], <int>b.shape[1],
                                           &c[0, 0], n)
        else:
            done = fbp_gemm_packed_isa_f64(isa, trans_a, trans_b, m, n, k, &a[0, 0],
                                           <int>a.shape[1], &b[0, 0], <int>b.shape[1],
                                           &c[0, 0], n)
    return out if done else None


def gemm_small_kernel(a, b, bint trans_a=False, bint trans_b=False, int isa=-1):
    """Row-major ``op(a) @ op(b)`` through the small kernels only (test hook),
    at instruction-set level ``isa`` (-1: this process's level).

    Returns None when the shape is one they decline (BLAS or the packed
    kernels would take it).
    """
    return _kernel_product(a, b, trans_a, trans_b, isa, False, "gemm_small_kernel")


def gemm_packed_kernel(a, b, bint trans_a=False, bint trans_b=False, int isa=-1):
    """Row-major ``op(a) @ op(b)`` through the packed kernels only (test
    hook), on one thread, at instruction-set level ``isa`` (-1: this
    process's level).  Returns None when they decline (an empty shape)."""
    return _kernel_product(a, b, trans_a, trans_b, isa, True, "gemm_packed_kernel")


def _check_layer_call(name, int64_t activation, dims):
    """ValueError unless ``activation`` is a known code and every dimension
    fits the kernels' C int (an unknown code fell through every branch and
    left the output unactivated; a dimension of 2**32 + 3 was cut to 3)."""
    if activation < <int64_t>IDENTITY or activation > <int64_t>SOFTPLUS:
        raise ValueError(f"{name}: unknown activation code {activation}; the codes are "
                         "fastbp.activations.ACTIVATION_CODES' values")
    for d in dims:
        if d > 2 ** 31 - 1:
            raise ValueError(f"{name}: a dimension of {d} is more than the kernels' limit "
                             f"(2**31 - 1)")


def dense_forward(const floating[:, ::1] x, const floating[:, ::1] w,
                  const floating[::1] b, int64_t activation):
    """out = act(x @ w + b).  x: (m, n_in), w: (n_in, n_out), b: (n_out,)."""
    cdef int64_t m = x.shape[0], n_in = x.shape[1], n_out = w.shape[1]
    if w.shape[0] != n_in or b.shape[0] != n_out:
        raise ValueError("dense_forward: shapes of x, w, b do not agree")
    _check_layer_call("dense_forward", activation, (m, n_in, n_out))
    dtype = np.float32 if floating is float else np.float64
    out = np.empty((m, n_out), dtype=dtype)
    cdef floating[:, ::1] o = out
    if m == 0:
        return out
    with nogil:
        dense_forward_ptr(&x[0, 0], &w[0, 0], &b[0], &o[0, 0], m, n_in, n_out, activation)
    return out


def dense_backward(const floating[:, ::1] x, const floating[:, ::1] w,
                   const floating[:, ::1] a, const floating[:, ::1] g, int64_t activation):
    """Backward pass of one dense layer.

    Parameters: x (m, n_in) input, w (n_in, n_out), a (m, n_out) the layer's
    output act(x @ w + b), g (m, n_out) = dL/da.  Returns (dw, db, dx) with
    shapes (n_in, n_out), (n_out,), (m, n_in).  ``g`` is not modified.
    """
    cdef int64_t m = x.shape[0], n_in = x.shape[1], n_out = w.shape[1]
    if (w.shape[0] != n_in or a.shape[0] != m or a.shape[1] != n_out
            or g.shape[0] != m or g.shape[1] != n_out):
        raise ValueError("dense_backward: shapes of x, w, a, g do not agree")
    _check_layer_call("dense_backward", activation, (m, n_in, n_out))
    dtype = np.float32 if floating is float else np.float64
    gd = np.array(g, dtype=dtype, order="C", copy=True)
    dw = np.empty((n_in, n_out), dtype=dtype)
    db = np.empty(n_out, dtype=dtype)
    dx = np.empty((m, n_in), dtype=dtype)
    cdef floating[:, ::1] gv = gd, dwv = dw, dxv = dx
    cdef floating[::1] dbv = db
    if m == 0:
        dw[...] = 0
        db[...] = 0
        return dw, db, dx
    with nogil:
        dense_backward_ptr(&x[0, 0], &w[0, 0], &a[0, 0], &gv[0, 0], &dwv[0, 0],
                           &dbv[0], &dxv[0, 0], m, n_in, n_out, activation)
    return dw, db, dx


def bias_activation_kernel(const floating[:, ::1] z, const floating[::1] b, int64_t activation,
                           int isa=-1):
    """``act(z + b)`` as the forward epilogue computes it (test hook):
    identity, relu and leaky_relu through csrc/epilogue.h at instruction-set
    level ``isa`` (-1: the best this machine has), the others through the
    scalar loops.

    Parameters
    ----------
    z : ndarray of shape (m, n)
    b : ndarray of shape (n,)
    activation : int
        Activation code (fastbp.activations.ACTIVATION_CODES).
    isa : int, default=-1

    Returns
    -------
    ndarray of shape (m, n), z's dtype
    """
    cdef int64_t m = z.shape[0], n = z.shape[1]
    if b.shape[0] != n:
        raise ValueError("bias_activation_kernel: shapes of z and b do not agree")
    _check_layer_call("bias_activation_kernel", activation, (m, n))
    out = np.array(z, copy=True, order="C")
    cdef floating[:, ::1] o = out
    if m == 0 or n == 0:
        return out
    with nogil:
        bias_activation_at(isa, &o[0, 0], &b[0], m, n, activation)
    return out


def activation_backward_db_kernel(const floating[:, ::1] g, const floating[:, ::1] a,
                                  int64_t activation, int isa=-1):
    """The backward epilogue (test hook): ``d = g * act'(a)`` and its column
    sums ``db``, summed row by row, as ``dense_backward`` computes them;
    identity, relu and leaky_relu in one pass of csrc/epilogue.h at level
    ``isa`` (-1: the best), the others through the scalar loop first.

    Parameters
    ----------
    g, a : ndarray of shape (m, n)
        dL/d(output) and the layer's output.
    activation : int
        Activation code.
    isa : int, default=-1

    Returns
    -------
    d : ndarray of shape (m, n)
    db : ndarray of shape (n,)
    """
    cdef int64_t m = g.shape[0], n = g.shape[1]
    if a.shape[0] != m or a.shape[1] != n:
        raise ValueError("activation_backward_db_kernel: shapes of g and a do not agree")
    _check_layer_call("activation_backward_db_kernel", activation, (m, n))
    d = np.array(g, copy=True, order="C")
    db = np.zeros(n, dtype=d.dtype)
    cdef floating[:, ::1] dv = d
    cdef floating[::1] dbv = db
    if m == 0 or n == 0:
        return d, db
    with nogil:
        activation_backward_db(isa, &dv[0, 0], &a[0, 0], &dbv[0], m, n, activation)
    return d, db
