# Declarations of the dense-layer kernels (implemented in dense.pyx), shared
# with engine.pyx, engine_rows.pyx and engine_optim.pyx through cimport.  ``act`` arguments are activation codes
# (``Act``, fastbp/_ext/engine.pxd).
from libc.stdint cimport int64_t

ctypedef fused floating:
    float
    double

cdef void gemm_rm(bint trans_a, bint trans_b, int m, int n, int k,
                  floating alpha, const floating* a, int lda,
                  const floating* b, int ldb,
                  floating beta, floating* c, int ldc) noexcept nogil

cdef void bias_activation(floating* z, const floating* b, int64_t m, int64_t n,
                          int act) noexcept nogil

cdef void activation_backward(floating* g, const floating* a, int64_t m, int64_t n,
                              int act) noexcept nogil

cdef void dense_forward_ptr(const floating* x, const floating* w, const floating* b,
                            floating* out, int64_t m, int64_t n_in, int64_t n_out,
                            int act) noexcept nogil

cdef void dense_backward_ptr(const floating* x, const floating* w, const floating* a,
                             floating* g, floating* dw, floating* db, floating* dx,
                             int64_t m, int64_t n_in, int64_t n_out,
                             int act) noexcept nogil

# The kernels' worker pool (csrc/pool.h), one per process, shared with the
# engine's modules: run fn(ctx, i) for i < n_tasks on up to kernel_threads()
# threads, the caller included.
ctypedef void (*task_fn)(void* ctx, int task) noexcept nogil

cdef int kernel_threads() noexcept nogil

# Phase profiling (dense.pyx): a monotonic clock in seconds, whether it is
# on, and the seconds gemm_rm has spent since the last reset.
cdef double now() noexcept nogil
cdef bint profiling() noexcept nogil
cdef double profile_gemm_seconds(bint reset) noexcept nogil

cdef void pool_run(task_fn fn, void* ctx, int n_tasks) noexcept nogil

# Our GEMM kernels as parts the engine schedules itself (csrc/gemm.h):
# gemm_prepare plans a product and its split (0: BLAS should take it),
# gemm_task(job, i) computes part i < job.parts; gemm_rows computes a row
# range of a product on the path planned for all its rows; gemm_kind says
# which kernels take a product (GEMM_BY_*).
cdef extern from "gemm.h" nogil:
    ctypedef struct fbp_gemm_job:
        int parts
        int failed
    enum:
        GEMM_BY_BLAS "FBP_BY_BLAS"
        GEMM_BY_SMALL "FBP_BY_SMALL"
        GEMM_BY_PACKED "FBP_BY_PACKED"

cdef int gemm_prepare(fbp_gemm_job* job, bint dbl, int threads, bint trans_a, bint trans_b,
                      int m, int n, int k, const void* a, int lda, const void* b, int ldb,
                      void* c, int ldc) noexcept nogil

cdef void gemm_task(void* job, int task) noexcept nogil

cdef int gemm_kind(bint dbl, bint trans_a, bint trans_b, int m, int n, int k) noexcept nogil

cdef int gemm_rows(bint dbl, bint trans_b, int m, int lo, int hi, int n, int k,
                   const void* a, int lda, const void* b, int ldb, void* c,
                   int ldc) noexcept nogil
