# cython: language_level=3
"""Row-parallel training steps: a step of a plain dense stack, its rows
split across the kernels' threads.

Design
------
With more than one thread, a stack of plain dense layers spends most of a
step outside the GEMMs (digits, 200 x 64-100-10 float64 on two threads: 27
of 75 us) if only the GEMMs are split: the
gather, the bias and activation passes and the activation derivatives run
on one thread while the others wait.  Those are all row-local, so here the
batch's rows are cut into ranges, one per thread, and each thread gathers
its rows and runs them through every layer's product and epilogue
(forward), or through a layer's A @ W.T and the activation derivative
below it (backward), in one job; the weight gradients' products and the
bias gradients' column sums join the same backward job.  Every product
takes the path planned for the whole batch (gemm_rows), and each bias
gradient is summed row by row from 0 as in dense_backward_ptr, so a step
gives bitwise the result of the one-thread path.

``_train_batches`` (engine.pyx) drives it through
fastbp/_ext/engine_rows.pxd: ``rows_parallel`` says in how many row ranges
a batch's step runs (0: the interpreter's layer-by-layer path);
``forward_rows`` gathers and runs the forward pass (and a C softmax loss's
rows) in them, ``backward_rows`` the backward pass.  A range whose product
cannot run in our kernels sets ``job.failed``, and the caller redoes that
work on the one-thread path.  ``_set_rows_parallel`` and ``_rows_steps``
are the tests' and benchmarks' hooks.
"""
from libc.stdint cimport int64_t
from libc.string cimport memcpy

from fastbp._ext.dense cimport (floating, activation_backward, bias_activation,
                                fbp_gemm_job, gemm_kind, gemm_prepare, gemm_rm, gemm_rows,
                                gemm_task, kernel_threads, pool_run, GEMM_BY_BLAS,
                                GEMM_BY_SMALL)
from fastbp._ext.engine cimport (ACT, ACT_OFF, ACTIVITY_L1, B_OFF, DENSE, KIND, N_COLS, N_IN,
                                 N_OUT, RATE, W_OFF)
from fastbp._ext.engine_ops cimport zero_if_frozen
from fastbp._ext.losses cimport softmax_rows_op


cdef inline void _row_range(const RowsJob* job, int task, int64_t* lo, int64_t* hi) noexcept nogil:
    # whole blocks of 8 rows (the small kernels' blocks); the last range
    # takes the rest
    cdef int64_t units = job.m // 8
    lo[0] = units * task // job.parts * 8
    hi[0] = job.m if task + 1 == job.parts else units * (task + 1) // job.parts * 8


cdef void _forward_rows(RowsJob* job, floating* params, floating* acts, floating* xb,
                        floating* yb, floating* wb, const floating* X, const floating* Y,
                        const floating* W, int64_t lo, int64_t hi) noexcept nogil:
    cdef int64_t r, l, o, n_in, n_out, m = job.m, d = job.d, k = job.k
    cdef const int64_t* row
    cdef const floating* x
    cdef floating* out
    if job.gather:
        for r in range(lo, hi):
            o = job.order[job.s + r]
            memcpy(&xb[r * d], &X[o * d], d * sizeof(floating))
            memcpy(&yb[r * k], &Y[o * k], k * sizeof(floating))
            wb[r] = W[o]
    x = <const floating*>job.x0
    for l in range(job.layer):
        row = job.prog + l * N_COLS
        n_in = row[N_IN]
        n_out = row[N_OUT]
        out = acts + row[ACT_OFF] * m
        if not gemm_rows(floating is double, False, <int>m, <int>lo, <int>hi, <int>n_out,
                         <int>n_in, x, <int>n_in, params + row[W_OFF], <int>n_out, out,
                         <int>n_out):
            job.failed = 1
            return
        bias_activation(out + lo * n_out, params + row[B_OFF], hi - lo, n_out, <int>row[ACT])
        x = out
    if job.loss_which >= 0:
        softmax_rows_op(job.loss_which, out, <floating*>job.y0, <floating*>job.w0,
                     <floating*>job.g0, lo, hi, k, job.scale, job.terms)


cdef void _forward_task(void* ctx, int task) noexcept nogil:
    cdef RowsJob* job = <RowsJob*>ctx
    cdef int64_t lo, hi
    _row_range(job, task, &lo, &hi)
    if job.dbl:
        _forward_rows(job, <double*>job.params, <double*>job.acts, <double*>job.xb,
                      <double*>job.yb, <double*>job.wb, <const double*>job.X,
                      <const double*>job.Y, <const double*>job.W, lo, hi)
    else:
        _forward_rows(job, <float*>job.params, <float*>job.acts, <float*>job.xb,
                      <float*>job.yb, <float*>job.wb, <const float*>job.X,
                      <const float*>job.Y, <const float*>job.W, lo, hi)


cdef void _column_sums(const floating* g, floating* db, int64_t m, int64_t n) noexcept nogil:
    # row by row from 0, as activation_backward_db sums them
    cdef int64_t i, j
    for j in range(n):
        db[j] = 0
    for i in range(m):
        for j in range(n):
            db[j] += g[i * n + j]


cdef void _backward_rows(RowsJob* job, floating* params, const floating* g, floating* dx,
                         floating* acts, int64_t lo, int64_t hi) noexcept nogil:
    # dx = g @ W.T on rows lo .. hi - 1, times the derivative of the layer
    # below's activation
    cdef const int64_t* row = job.prog + job.layer * N_COLS
    cdef const int64_t* below = row - N_COLS
    cdef int64_t m = job.m, n_in = row[N_IN], n_out = row[N_OUT]
    if not gemm_rows(floating is double, True, <int>m, <int>lo, <int>hi, <int>n_in,
                     <int>n_out, g, <int>n_out, params + row[W_OFF], <int>n_out, dx,
                     <int>n_in):
        job.failed = 1
        return
    activation_backward(dx + lo * n_in, acts + below[ACT_OFF] * m + lo * n_in, hi - lo, n_in,
                        <int>below[ACT])


cdef void _backward_task(void* ctx, int task) noexcept nogil:
    cdef RowsJob* job = <RowsJob*>ctx
    cdef int64_t lo, hi, n_out = job.prog[job.layer * N_COLS + N_OUT]
    if task < job.dw_parts:
        gemm_task(&job.dw, task)
        return
    task -= job.dw_parts
    if task == 0:
        if job.dbl:
            _column_sums(<const double*>job.g, <double*>job.db, job.m, n_out)
        else:
            _column_sums(<const float*>job.g, <float*>job.db, job.m, n_out)
        return
    _row_range(job, task - 1, &lo, &hi)
    if job.dbl:
        _backward_rows(job, <double*>job.params, <const double*>job.g, <double*>job.dx,
                       <double*>job.acts, lo, hi)
    else:
        _backward_rows(job, <float*>job.params, <const float*>job.g, <float*>job.dx,
                       <float*>job.acts, lo, hi)


cdef bint ROWS_PARALLEL = True
# Below this many multiply-adds in a batch's forward products a step is a
# few microseconds, and the jobs' hand-offs cost more than the second
# thread saves (digits' 64-100-10 on two threads: batch 32, 237k, even;
# batch 64, 474k, 11% faster; S, 176k, 9% slower).
cdef int64_t ROWS_MIN_MNK = 1 << 18
cdef int64_t ROWS_STEPS = 0   # steps run in row ranges, for tests


def _set_rows_parallel(bint on):
    """Allow (the default) or forbid row-parallel steps; returns the
    previous setting.  For tests and benchmarks, which compare the two
    paths."""
    global ROWS_PARALLEL
    previous = ROWS_PARALLEL
    ROWS_PARALLEL = on
    return previous


def _rows_steps():
    """Steps run in row ranges so far in this process (any thread; a
    test hook, counted without synchronization)."""
    return ROWS_STEPS


cdef int rows_parallel(const int64_t[:, ::1] prog, const double[:, ::1] reg,
                       const double[:, ::1] floats, int64_t m, bint dbl) noexcept nogil:
    """The number of row ranges a step of this program runs in (0: the
    layer-by-layer path): with more than one thread and at least
    ROWS_MIN_MNK multiply-adds in the forward products, for plain dense layers
    (no dropout, DropConnect, batch norm, residual or activity penalty)
    whose products by rows are all small-kernel ones (a packed product in
    row ranges would pack all of W once per range: 1024-2048-2048-10 ran
    4% slower; BLAS would start threads of its own inside them) and whose
    weight gradients' products are in our kernels."""
    cdef int64_t l, mnk = 0, parts = kernel_threads() if ROWS_PARALLEL else 1
    if parts > m // 8:
        parts = m // 8
    if parts < 2:
        return 0
    for l in range(prog.shape[0]):
        if prog[l, KIND] != DENSE or floats[l, RATE] > 0 or reg[l, ACTIVITY_L1] > 0:
            return 0
        if gemm_kind(dbl, False, False, <int>m, <int>prog[l, N_OUT],
                     <int>prog[l, N_IN]) != GEMM_BY_SMALL:
            return 0
        if l > 0 and gemm_kind(dbl, False, True, <int>m, <int>prog[l, N_IN],
                               <int>prog[l, N_OUT]) != GEMM_BY_SMALL:
            return 0
        if gemm_kind(dbl, True, False, <int>prog[l, N_IN], <int>prog[l, N_OUT],
                     <int>m) == GEMM_BY_BLAS:
            return 0
        mnk += m * prog[l, N_IN] * prog[l, N_OUT]
    return <int>parts if mnk >= ROWS_MIN_MNK else 0


cdef int forward_rows(RowsJob* job, const int64_t[:, ::1] prog, const floating* W) noexcept nogil:
    """Gather (if job.gather) and forward through every layer, in job.parts
    row ranges, and the loss's rows too if it is a softmax one
    (job.loss_which >= 0, job.terms set; W: all sample weights); 0 if a
    range failed (then the caller redoes it all)."""
    global ROWS_STEPS
    cdef int64_t r
    cdef double wsum = 0.0
    if job.loss_which >= 0:
        # the loss kernel's sum of the weights, in the same order
        for r in range(job.m):
            wsum += W[job.order[job.s + r]] if job.gather else W[job.s + r]
        job.scale = 1.0 / wsum
    job.layer = prog.shape[0]   # the forward task runs layers 0 .. layer - 1
    job.failed = 0
    pool_run(_forward_task, job, <int>job.parts)
    ROWS_STEPS += 1
    return not job.failed


cdef void backward_rows(RowsJob* job, const int64_t[:, ::1] prog, floating* params,
                        floating* grad, floating* acts, floating* deltas, int64_t half,
                        const floating* x0) noexcept nogil:
    """backward_all for a program rows_parallel accepts: on entry
    deltas[0:half] holds dL/d(output of the last layer); on exit grad holds
    every dW, db.  One job per layer computes its dW (split as gemm_rm
    would), its db, and the delta of the layer below by row ranges."""
    cdef int64_t l, m = job.m, n_in, n_out, last = prog.shape[0] - 1
    cdef floating* g = deltas
    cdef floating* other = deltas + half
    cdef floating* tmp
    cdef const floating* x
    cdef bint dw_ours
    activation_backward(g, acts + prog[last, ACT_OFF] * m, m, prog[last, N_OUT],
                        <int>prog[last, ACT])
    for l in range(last, -1, -1):
        n_in = prog[l, N_IN]
        n_out = prog[l, N_OUT]
        x = x0 if l == 0 else acts + prog[l - 1, ACT_OFF] * m
        job.layer = l
        job.g = g
        job.dx = other if l > 0 else NULL
        job.db = grad + prog[l, B_OFF]
        job.failed = 0
        dw_ours = gemm_prepare(&job.dw, floating is double, kernel_threads(), True, False,
                               <int>n_in, <int>n_out, <int>m, x, <int>n_in, g, <int>n_out,
                               grad + prog[l, W_OFF], <int>n_out)
        job.dw_parts = job.dw.parts if dw_ours else 0
        pool_run(_backward_task, job, <int>(job.dw_parts + 1 + (job.parts if l > 0 else 0)))
        if not dw_ours or job.dw.failed:
            gemm_rm(True, False, <int>n_in, <int>n_out, <int>m, <floating>1.0, x, <int>n_in,
                    g, <int>n_out, <floating>0.0, grad + prog[l, W_OFF], <int>n_out)
        if l > 0 and job.failed:
            gemm_rm(False, True, <int>m, <int>n_in, <int>n_out, <floating>1.0, g, <int>n_out,
                    params + prog[l, W_OFF], <int>n_out, <floating>0.0, other, <int>n_in)
            activation_backward(other, acts + prog[l - 1, ACT_OFF] * m, m, n_in,
                                <int>prog[l - 1, ACT])
        zero_if_frozen(prog, l, grad)
        tmp = g
        g = other
        other = tmp
