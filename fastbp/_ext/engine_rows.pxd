# Declarations of the row-parallel training step (implemented in
# csrc/engine_rows.pyx), cimported by engine.pyx: ``_train_batches`` fills a
# RowsJob once per call with what its batches share, asks ``rows_parallel``
# whether a batch's step can run in row ranges, and then runs
# ``forward_rows`` and ``backward_rows`` in place of the interpreter's
# forward_all and backward_all.
from libc.stdint cimport int64_t

from fastbp._ext.dense cimport floating, fbp_gemm_job

cdef struct RowsJob:
    const int64_t* prog          # the program, N_COLS per layer
    int64_t m, s, d, k, parts
    int dbl
    int failed                   # a product could not run in our kernels
    bint gather
    const void* X
    const void* Y
    const void* W
    const int64_t* order
    void* xb
    void* yb
    void* wb
    const void* x0
    void* params
    void* acts
    # the loss, when it is a C softmax loss (softmax_which >= 0; else -1):
    # each range also computes its rows' gradient and loss terms
    int loss_which
    double scale                 # 1 / (sum of the batch's sample weights)
    double* terms                # (m,) each row's term of the loss sum
    const void* y0               # the batch's targets and weights (gathered
    const void* w0               # by the forward ranges if job.gather)
    void* g0                     # dL/d(output), (m, k)
    # backward job of one layer
    int64_t layer
    fbp_gemm_job dw              # its weight gradient's product, in parts
    int dw_parts
    void* g                      # its delta (m, n_out), read only
    void* dx                     # where the delta below goes (NULL: none)
    void* db


cdef int rows_parallel(const int64_t[:, ::1] prog, const double[:, ::1] reg,
                       const double[:, ::1] floats, int64_t m, bint dbl) noexcept nogil

cdef int forward_rows(RowsJob* job, const int64_t[:, ::1] prog, const floating* W) noexcept nogil

cdef void backward_rows(RowsJob* job, const int64_t[:, ::1] prog, floating* params,
                        floating* grad, floating* acts, floating* deltas, int64_t half,
                        const floating* x0) noexcept nogil
