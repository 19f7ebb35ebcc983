# cython: language_level=3
"""Network-level loops: predict, loss-and-gradient, and training steps.

Design
------
A model is described to this module by a *program*: an int64 table with one
row per layer, whose columns (KIND, N_IN, ...), layer kinds (``Kind``) and
activation codes (``Act``) are declared in fastbp/_ext/engine.pxd with the
other numbers Python and C share; by ``floats``, a float64 table of each
row's drop RATE, BatchNorm MOMENTUM and EPS (fastbp.program compiles both
from the layers); and by flat arrays that Python allocated once:

* ``params`` / ``grad``  : every weight and bias of the model, in one vector
  each; a layer's W (n_in, n_out) and b (n_out,) live at offsets in it.
* ``acts``   : the output of every layer for up to B rows (B = the batch
  size the workspace was made for).  ``program[l, ACT_OFF]`` is the sum of
  the widths of the layers before l, so for a batch of m rows layer l's
  (m, n_out) output starts at ``m * program[l, ACT_OFF]``: the layers pack
  tightly for any m <= B.
* ``deltas`` : two ping-pong buffers of B * max_width for dL/d(activation).
* ``xb``/``yb``/``wb``: the gathered mini-batch (inputs, targets, sample
  weights), when rows are shuffled.
* ``reg`` (n_layers, N_REG) float64: each layer's (L2, L1) weight penalty,
  added as ``s * (l2/2 ||W||^2 + l1 |W|_1)`` to the loss and
  ``s * (l2 W + l1 sign W)`` to dW, where s = 1 / (sum of the batch's sample
  weights) if ``reg_per_weight`` (scikit-learn's alpha) else 1; and its L1
  activity penalty c (ACTIVITY_L1): ``c/m * sum |a|`` over the layer's
  output a (m rows), whose gradient c/m sign(a) joins dL/da in the backward
  pass.

What persists across one fit's calls (the program and tables, params,
grad, the workspaces, aux, buffers, the dropout counter, the optimizer's
state and hyperparameters, the loss and update addresses) is held by an
``EngineState``, which checks every array and every program offset once,
when it is made; its docstring says which fields the engine reads (IN),
writes (OUT) or updates (INOUT).  ``train_batches(state, X, Y, W, order,
first, count, gather, step0, batch_loss)`` takes it and the call's own
values, checks those against it, and then trusts both.

``train_batches`` runs many mini-batch steps in one call without the GIL:
gather rows by index, forward through every layer (dense.pyx), loss and its
gradient, backward through every layer, then the optimizer update over the
flat parameter vector.  The loss and the optimizer are Numba ``cfunc``s
(fastbp/_numba), called through their C addresses, so one Python call drives
any number of steps whatever the depth, and nothing is allocated per step.

A dense row with ``floats[l, RATE] > 0`` uses DropConnect in training: each batch
draws a mask M on W (same stream and rule as dropout), computes with
W_eff = W * M (M = 1/(1 - rate) or 0), kept with M at ``aux[AUX_OFF:]``
(2 n_in n_out values), and scales dW by M on the way back.
A ``BATCHNORM`` row follows torch.nn.BatchNorm1d: gamma at
``W_OFF`` and beta at ``B_OFF`` in ``params``; running mean, running
variance at ``buffers[BUF_OFF:]`` (width each); its momentum and eps at
``floats[l, MOMENTUM]`` and ``floats[l, EPS]``.  In training it normalizes with the batch mean and biased
variance, keeps x_hat after its output in ``acts`` and 1/std in ``aux``, and
updates the running statistics (unbiased variance); otherwise it uses them.
Residual blocks are two rows around the block's rows: ``RES_BEGIN``
copies its input x to its slot, ``RES_END`` outputs block(x) + x; each
keeps its partner's row index in column ``W_OFF``.  In the
backward pass the end row stashes dL/d(output) in its own slot (no longer
needed by then) and the begin row adds it to the gradient leaving the block.
A ``DROPOUT`` row has no parameters: in training its output is
x * mask with mask = 1/(1 - rate) or 0 (inverted dropout), and the mask is
kept right after the output in ``acts`` for the backward pass; in predict it
passes x through.  ``floats[l, RATE]`` is the drop rate of row l.  Masks come from
a counter-based splitmix64 stream whose one uint64 counter (``rng[0]``)
lives on the model: reproducible from the seed, saved in checkpoints, and
computed identically by ``fastbp.reference.dropout_mask``.

``train_batches`` returns a ``Status``: OK, LOSS_NONFINITE (the loss of a
batch was not finite; nothing updated for that batch) or PARAMS_NONFINITE
(an update produced a non-finite parameter; the caller restores a
snapshot).

A batch whose sample weights sum to zero has no weighted mean loss (0/0):
``train_batches`` skips it (no forward pass, no update, the optimizer's
step count not advanced; its ``batch_loss`` is 0), so no shuffle can turn
it into a divergence.
"""
from libc.math cimport isfinite, sqrt
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy, memset

from libc.stdlib cimport free, malloc

import numpy as np

from fastbp._ext.losses cimport softmax_rows_op, softmax_which
from fastbp._ext.dense cimport (floating, dense_forward_ptr, dense_backward_ptr,
                                kernel_threads, pool_run, bias_activation,
                                activation_backward, fbp_gemm_job, gemm_prepare, gemm_task,
                                gemm_kind, gemm_rows, gemm_rm, GEMM_BY_SMALL, GEMM_BY_BLAS,
                                now, profiling, profile_gemm_seconds)

# loss(z, y, w, g, m, k) -> weighted mean loss; writes g = dL/dz.
# (fastbp/_numba/losses.py)
ctypedef double (*loss_f32)(float*, float*, float*, float*, int64_t, int64_t) noexcept nogil
ctypedef double (*loss_f64)(double*, double*, double*, double*, int64_t, int64_t) noexcept nogil
# step(p, g, state, n, stride, hyper, t) -> 1 if every updated p is finite.
# (fastbp/_numba/optim.py)
ctypedef int (*step_f32)(float*, float*, float*, int64_t, int64_t, double*, int64_t) noexcept nogil
ctypedef int (*step_f64)(double*, double*, double*, int64_t, int64_t, double*, int64_t) noexcept nogil


cdef inline double call_loss(size_t addr, floating* z, floating* y, floating* w,
                             floating* g, int64_t m, int64_t k) noexcept nogil:
    if floating is float:
        return (<loss_f32>addr)(z, y, w, g, m, k)
    else:
        return (<loss_f64>addr)(z, y, w, g, m, k)


cdef inline double weight_sum(const floating* w, int64_t m) noexcept nogil:
    """w[0] + ... + w[m-1] in double, left to right (as the loss kernels add them)."""
    cdef double total = 0.0
    cdef int64_t i
    for i in range(m):
        total += w[i]
    return total


cdef struct Share:
    # A rank's part of a global batch in data-parallel training: its rows
    # are rows row0 .. row0 + m - 1 of the batch's ``rows`` rows.
    int64_t row0
    int64_t rows


cdef double penalize_op(const int64_t[:, ::1] prog, const double[:, ::1] reg,
                        bint per_weight, double wsum, floating* params,
                        floating* grad) noexcept nogil:
    """Add the weight penalties of every trainable layer to ``grad``; return
    their value (0 when no layer has one).  With ``per_weight`` they are
    divided by ``wsum``, the batch's weight sum."""
    cdef int64_t l, i, size, size4
    cdef double s = 1.0 / wsum if per_weight else 1.0, total = 0.0, l2, l1, sq, ab
    cdef double sq0, sq1, sq2, sq3, ab0, ab1, ab2, ab3
    cdef floating* W
    cdef floating* dW
    cdef floating c2, c1, v, v0, v1, v2, v3
    for l in range(prog.shape[0]):
        l2 = reg[l, L2]
        l1 = reg[l, L1]
        if (l2 == 0 and l1 == 0) or not prog[l, TRAINABLE]:
            continue
        size = prog[l, N_IN] * prog[l, N_OUT]
        W = params + prog[l, W_OFF]
        dW = grad + prog[l, W_OFF]
        c2 = <floating>(s * l2)
        c1 = <floating>(s * l1)
        # Four independent partial sums (i mod 4), then the tail: one serial
        # chain of adds would wait on each add's latency.  dW is computed
        # element by element as before; only the penalty's value depends on
        # the summation order.
        sq0 = 0.0
        sq1 = 0.0
        sq2 = 0.0
        sq3 = 0.0
        ab0 = 0.0
        ab1 = 0.0
        ab2 = 0.0
        ab3 = 0.0
        size4 = size - size % 4
        if l1 == 0:  # L2 alone (scikit-learn's alpha): no sign, no |W|
            for i in range(0, size4, 4):
                v0 = W[i]
                v1 = W[i + 1]
                v2 = W[i + 2]
                v3 = W[i + 3]
                sq0 += v0 * v0
                sq1 += v1 * v1
                sq2 += v2 * v2
                sq3 += v3 * v3
                dW[i] += c2 * v0
                dW[i + 1] += c2 * v1
                dW[i + 2] += c2 * v2
                dW[i + 3] += c2 * v3
            for i in range(size4, size):
                v = W[i]
                sq0 += v * v
                dW[i] += c2 * v
        else:
            for i in range(0, size4, 4):
                v0 = W[i]
                v1 = W[i + 1]
                v2 = W[i + 2]
                v3 = W[i + 3]
                sq0 += v0 * v0
                sq1 += v1 * v1
                sq2 += v2 * v2
                sq3 += v3 * v3
                ab0 += v0 if v0 >= 0 else -v0
                ab1 += v1 if v1 >= 0 else -v1
                ab2 += v2 if v2 >= 0 else -v2
                ab3 += v3 if v3 >= 0 else -v3
                dW[i] += c2 * v0 + (c1 if v0 > 0 else (-c1 if v0 < 0 else 0))
                dW[i + 1] += c2 * v1 + (c1 if v1 > 0 else (-c1 if v1 < 0 else 0))
                dW[i + 2] += c2 * v2 + (c1 if v2 > 0 else (-c1 if v2 < 0 else 0))
                dW[i + 3] += c2 * v3 + (c1 if v3 > 0 else (-c1 if v3 < 0 else 0))
            for i in range(size4, size):
                v = W[i]
                sq0 += v * v
                ab0 += v if v >= 0 else -v
                dW[i] += c2 * v + (c1 if v > 0 else (-c1 if v < 0 else 0))
        sq = (sq0 + sq1) + (sq2 + sq3)
        ab = (ab0 + ab1) + (ab2 + ab3)
        total += s * (0.5 * l2 * sq + l1 * ab)
    return total


cdef inline int call_step(size_t addr, floating* p, floating* g, floating* state,
                          int64_t n, int64_t stride, double* hyper,
                          int64_t t) noexcept nogil:
    if floating is float:
        return (<step_f32>addr)(p, g, state, n, stride, hyper, t)
    else:
        return (<step_f64>addr)(p, g, state, n, stride, hyper, t)


# Below this many bytes of parameters an update takes a couple of
# microseconds and runs on the calling thread alone (digits' 7,510 float64
# Adam parameters, 60 KB, took 3.7-4.9 us: split on two threads the fit
# ran 3% faster).
cdef int64_t PARALLEL_STEP_BYTES = 1 << 15
cdef enum:
    MAX_STEP_TASKS = 64


cdef struct StepJob:
    size_t addr
    void* params
    void* grad
    void* state
    const int64_t* segments   # (n_segments, 2): start, length
    int64_t n_segments, total, stride, t
    double* hyper
    int n_tasks
    int is_double
    int ok[MAX_STEP_TASKS]   # each task's result


cdef int _step_range(const StepJob* job, int64_t lo, int64_t hi) noexcept nogil:
    """Update parameters lo .. hi - 1 of the concatenated segments; 1 if
    every updated parameter is finite."""
    cdef int64_t j, start, length, seg_lo = 0, a, b
    cdef int ok = 1
    for j in range(job.n_segments):
        start = job.segments[2 * j]
        length = job.segments[2 * j + 1]
        a = lo - seg_lo if lo > seg_lo else 0
        b = hi - seg_lo if hi - seg_lo < length else length
        seg_lo += length
        if a >= b:
            continue
        if job.is_double:
            ok &= call_step(job.addr, <double*>job.params + start + a,
                            <double*>job.grad + start + a,
                            <double*>job.state + start + a if job.state != NULL else NULL,
                            b - a, job.stride, job.hyper, job.t)
        else:
            ok &= call_step(job.addr, <float*>job.params + start + a,
                            <float*>job.grad + start + a,
                            <float*>job.state + start + a if job.state != NULL else NULL,
                            b - a, job.stride, job.hyper, job.t)
    return ok


cdef void _step_task(void* ctx, int task) noexcept nogil:
    cdef StepJob* job = <StepJob*>ctx
    # Ranges cut at multiples of 64 parameters (whole cache lines).
    cdef int64_t units = (job.total + 63) // 64
    cdef int64_t lo = units * task // job.n_tasks * 64
    cdef int64_t hi = units * (task + 1) // job.n_tasks * 64
    job.ok[task] = _step_range(job, lo, hi if hi < job.total else job.total)


cdef int optimizer_step(size_t addr, floating* params, floating* grad, floating* state,
                        const int64_t[:, ::1] segments, int64_t stride, double* hyper,
                        int64_t t) noexcept nogil:
    """The optimizer's update of every trainable segment (elementwise, so
    any split gives the same values); 1 if every updated parameter is
    finite.  Large models split it across the kernels' threads."""
    cdef StepJob job
    cdef int64_t j
    cdef int i, ok = 1
    job.addr = addr
    job.params = params
    job.grad = grad
    job.state = state
    job.segments = &segments[0, 0] if segments.shape[0] > 0 else NULL
    job.n_segments = segments.shape[0]
    job.stride = stride
    job.hyper = hyper
    job.t = t
    job.is_double = floating is double
    job.total = 0
    for j in range(job.n_segments):
        job.total += segments[j, 1]
    job.n_tasks = kernel_threads()
    if job.n_tasks > MAX_STEP_TASKS:
        job.n_tasks = MAX_STEP_TASKS
    if job.n_tasks < 2 or job.total * <int64_t>sizeof(floating) < PARALLEL_STEP_BYTES:
        return _step_range(&job, 0, job.total)
    pool_run(_step_task, &job, job.n_tasks)
    for i in range(job.n_tasks):
        ok &= job.ok[i]
    return ok


cdef inline floating* _ptr(floating[::1] a) noexcept nogil:
    return &a[0] if a.shape[0] > 0 else NULL


# splitmix64's counter step: draw i of a stream is the one after counter + i * GOLDEN.
cdef uint64_t GOLDEN = <uint64_t>0x9E3779B97F4A7C15


cdef inline uint64_t splitmix64(uint64_t* counter) noexcept nogil:
    cdef uint64_t z
    counter[0] += GOLDEN
    z = counter[0]
    z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EB
    return z ^ (z >> 31)


cdef void dropout_forward_op(const floating* x, floating* out, floating* mask, int64_t size,
                             double rate, uint64_t* counter) noexcept nogil:
    """out = x * mask; an element is kept when the top 24 bits of its draw
    are below (1 - rate) 2^24."""
    cdef int64_t i
    cdef uint64_t keep = <uint64_t>((1.0 - rate) * 16777216.0)
    cdef floating scale = <floating>(1.0 / (1.0 - rate))
    for i in range(size):
        mask[i] = scale if (splitmix64(counter) >> 40) < keep else 0
        out[i] = x[i] * mask[i]


cdef inline void dropout_backward_op(const floating* g, const floating* mask, floating* out,
                                     int64_t size) noexcept nogil:
    """out = g * mask (out may be g): the gradient through a dropout mask,
    and DropConnect's dW scaled by its mask on W."""
    cdef int64_t i
    for i in range(size):
        out[i] = g[i] * mask[i]


cdef inline void residual_add_op(const floating* x, const floating* skip, floating* out,
                                 int64_t size) noexcept nogil:
    """out = x + skip (out may be x): a residual block's output, and in the
    backward pass the skip path's gradient joining the block's."""
    cdef int64_t i
    for i in range(size):
        out[i] = x[i] + skip[i]


cdef inline double activity_penalty_op(const floating* a, floating* g, int64_t m,
                                       int64_t size, double c) noexcept nogil:
    """Adds c/m sign(a) to g (size values, m rows); returns c/m sum |a|
    (summed in double, left to right)."""
    cdef int64_t i
    cdef double total = 0.0
    cdef floating step = <floating>(c / m)
    for i in range(size):
        total += a[i] if a[i] >= 0 else -a[i]
        g[i] += step if a[i] > 0 else (-step if a[i] < 0 else 0)
    return c / m * total


cdef void batchnorm_forward_op(const floating* x, floating* out, floating* xhat,
                               floating* inv_std, const floating* gamma, const floating* beta,
                               floating* buf, int64_t m, int64_t w, double momentum,
                               double eps, bint training) noexcept nogil:
    cdef int64_t i, j
    cdef double mean, var, d
    cdef floating mu, inv
    for j in range(w):
        if training:
            mean = 0.0
            for i in range(m):
                mean += x[i * w + j]
            mean /= m
            var = 0.0
            for i in range(m):
                d = x[i * w + j] - mean
                var += d * d
            var /= m
            buf[j] = <floating>((1 - momentum) * buf[j] + momentum * mean)
            buf[w + j] = <floating>((1 - momentum) * buf[w + j] + momentum * var * m / (m - 1))
        else:
            mean = buf[j]
            var = buf[w + j]
        mu = <floating>mean
        inv = <floating>(1.0 / sqrt(var + eps))
        inv_std[j] = inv
        for i in range(m):
            xhat[i * w + j] = (x[i * w + j] - mu) * inv
            out[i * w + j] = gamma[j] * xhat[i * w + j] + beta[j]


cdef void batchnorm_backward_op(floating* g, const floating* xhat, const floating* inv_std,
                                const floating* gamma, floating* dgamma, floating* dbeta,
                                floating* dx, int64_t m, int64_t w, bint training) noexcept nogil:
    """dgamma = sum g x_hat, dbeta = sum g; dx = gamma inv/m (m g - dbeta -
    x_hat dgamma) with batch statistics, gamma inv g with running ones."""
    cdef int64_t i, j
    cdef double sg, sgx
    cdef floating c
    for j in range(w):
        sg = 0.0
        sgx = 0.0
        for i in range(m):
            sg += g[i * w + j]
            sgx += g[i * w + j] * xhat[i * w + j]
        dgamma[j] = <floating>sgx
        dbeta[j] = <floating>sg
        if dx == NULL:
            continue
        c = gamma[j] * inv_std[j]
        for i in range(m):
            if training:
                dx[i * w + j] = <floating>(c / m * (m * g[i * w + j] - sg - xhat[i * w + j] * sgx))
            else:
                dx[i * w + j] = c * g[i * w + j]


cdef void forward_all(const int64_t[:, ::1] prog, const floating* x0,
                      floating* params, floating* acts, floating* last_out,
                      int64_t m, const double[:, ::1] floats, uint64_t* counter,
                      floating* aux, floating* buffers, const Share* share=NULL) noexcept nogil:
    """Forward through every layer; the last one writes to ``last_out`` if it
    is not NULL (predict), else to its slot in ``acts``.  ``counter`` NULL
    means predict: dropout layers pass their input through, BatchNorm uses
    its running statistics.  ``share`` (data-parallel training): these m
    rows are rows share.row0 .. share.row0 + m - 1 of a global batch of
    share.rows rows, so a dropout layer draws the masks those rows get in
    one process and leaves the counter where the whole batch leaves it."""
    cdef int64_t l, i, n_layers = prog.shape[0], width
    cdef uint64_t c0
    cdef const floating* x = x0
    cdef floating* out
    cdef floating* mask
    cdef floating* weff
    cdef const floating* skip
    for l in range(n_layers):
        out = acts + prog[l, ACT_OFF] * m
        if l == n_layers - 1 and last_out != NULL:
            out = last_out
        if prog[l, KIND] == RES_BEGIN:
            width = prog[l, N_OUT]
            out = acts + prog[l, ACT_OFF] * m
            memcpy(out, x, m * width * sizeof(floating))
        elif prog[l, KIND] == RES_END:
            width = prog[l, N_OUT]
            skip = acts + prog[prog[l, W_OFF], ACT_OFF] * m
            residual_add_op(x, skip, out, m * width)
        elif prog[l, KIND] == DROPOUT:
            width = prog[l, N_OUT]
            mask = acts + prog[l, ACT_OFF] * m + m * width
            if counter != NULL and share != NULL:
                c0 = counter[0]
                counter[0] = c0 + <uint64_t>(share.row0 * width) * GOLDEN
                dropout_forward_op(x, out, mask, m * width, floats[l, RATE], counter)
                counter[0] = c0 + <uint64_t>(share.rows * width) * GOLDEN
            elif counter != NULL:
                dropout_forward_op(x, out, mask, m * width, floats[l, RATE], counter)
            elif last_out == NULL:
                # loss_grad without dropout: identity, with a mask of ones so
                # that backward_all passes gradients straight through
                memcpy(out, x, m * width * sizeof(floating))
                for i in range(m * width):
                    mask[i] = 1
            else:
                continue  # predict: pass x on unchanged (never the last layer)
        elif prog[l, KIND] == BATCHNORM:
            width = prog[l, N_OUT]
            batchnorm_forward_op(x, out, acts + prog[l, ACT_OFF] * m + m * width,
                                 aux + prog[l, AUX_OFF], params + prog[l, W_OFF],
                                 params + prog[l, B_OFF], buffers + prog[l, BUF_OFF], m, width,
                                 floats[l, MOMENTUM], floats[l, EPS], counter != NULL)
        elif counter != NULL and floats[l, RATE] > 0:  # DropConnect
            width = prog[l, N_IN] * prog[l, N_OUT]
            weff = aux + prog[l, AUX_OFF]
            dropout_forward_op(params + prog[l, W_OFF], weff, weff + width, width,
                               floats[l, RATE], counter)
            dense_forward_ptr(x, weff, params + prog[l, B_OFF], out,
                              m, prog[l, N_IN], prog[l, N_OUT], <int>prog[l, ACT])
        else:
            dense_forward_ptr(x, params + prog[l, W_OFF], params + prog[l, B_OFF], out,
                              m, prog[l, N_IN], prog[l, N_OUT], <int>prog[l, ACT])
        x = out


cdef inline void _zero_if_frozen(const int64_t[:, ::1] prog, int64_t l,
                                 floating* grad) noexcept nogil:
    # A frozen dense layer still passes the gradient down; its own is zero.
    if not prog[l, TRAINABLE]:
        memset(grad + prog[l, W_OFF], 0, prog[l, N_IN] * prog[l, N_OUT] * sizeof(floating))
        memset(grad + prog[l, B_OFF], 0, prog[l, N_OUT] * sizeof(floating))


cdef double backward_all(const int64_t[:, ::1] prog, const floating* x0,
                         floating* params, floating* grad, floating* acts,
                         floating* deltas, int64_t half, int64_t m,
                         const double[:, ::1] reg, const double[:, ::1] floats,
                         floating* aux, bint training, int64_t act_rows=0) noexcept nogil:
    """Backward through every layer (of a training forward pass).  On entry
    deltas[0:half] holds dL/d(output of the last layer); on exit ``grad``
    holds every dW, db.  Returns the layers' activity penalties, whose
    gradients it adds on the way: means over ``act_rows`` rows (0: the m
    rows here; data-parallel training: the global batch's)."""
    cdef int64_t l, i, n_in, n_out, n_layers = prog.shape[0]
    cdef double activity = 0.0, c
    cdef floating* weff
    cdef const floating* stash
    cdef floating* g = deltas
    cdef floating* other = deltas + half
    cdef floating* dx
    cdef floating* tmp
    cdef const floating* x
    cdef const floating* mask
    for l in range(n_layers - 1, -1, -1):
        n_in = prog[l, N_IN]
        n_out = prog[l, N_OUT]
        if prog[l, KIND] == RES_END:
            # the skip path gets the same gradient: keep it for the begin row
            memcpy(acts + prog[l, ACT_OFF] * m, g, m * n_out * sizeof(floating))
            continue
        if prog[l, KIND] == RES_BEGIN:
            stash = acts + prog[prog[l, W_OFF], ACT_OFF] * m
            residual_add_op(g, stash, g, m * n_out)
            continue
        if prog[l, KIND] == DROPOUT:
            if l == 0:
                break  # dropout on the inputs: nothing below needs a gradient
            mask = acts + prog[l, ACT_OFF] * m + m * n_out
            dropout_backward_op(g, mask, other, m * n_out)
            tmp = g
            g = other
            other = tmp
            continue
        if prog[l, KIND] == BATCHNORM:
            batchnorm_backward_op(g, acts + prog[l, ACT_OFF] * m + m * n_out,
                                  aux + prog[l, AUX_OFF], params + prog[l, W_OFF],
                                  grad + prog[l, W_OFF], grad + prog[l, B_OFF],
                                  other if l > 0 else NULL, m, n_out, training)
            if not prog[l, TRAINABLE]:
                memset(grad + prog[l, W_OFF], 0, 2 * n_out * sizeof(floating))
            tmp = g
            g = other
            other = tmp
            continue
        x = x0 if l == 0 else acts + prog[l - 1, ACT_OFF] * m
        dx = other if l > 0 else NULL
        c = reg[l, ACTIVITY_L1]
        if c > 0:
            activity += activity_penalty_op(acts + prog[l, ACT_OFF] * m, g,
                                            act_rows if act_rows else m, m * n_out, c)
        if training and floats[l, RATE] > 0:  # DropConnect: the batch used W_eff = W * M
            weff = aux + prog[l, AUX_OFF]
            dense_backward_ptr(x, weff, acts + prog[l, ACT_OFF] * m, g,
                               grad + prog[l, W_OFF], grad + prog[l, B_OFF], dx,
                               m, n_in, n_out, <int>prog[l, ACT])
            dropout_backward_op(grad + prog[l, W_OFF], weff + n_in * n_out,
                                grad + prog[l, W_OFF], n_in * n_out)
        else:
            dense_backward_ptr(x, params + prog[l, W_OFF], acts + prog[l, ACT_OFF] * m, g,
                               grad + prog[l, W_OFF], grad + prog[l, B_OFF], dx,
                               m, n_in, n_out, <int>prog[l, ACT])
        _zero_if_frozen(prog, l, grad)
        tmp = g
        g = other
        other = tmp
    return activity


# ---------------------------------------------------------------------------
# Row-parallel steps.  With more than one thread, a stack of plain dense
# layers spends most of a step outside the GEMMs (digits, 200 x 64-100-10
# float64 on two threads: 27 of 75 us) if only the GEMMs are split: the
# gather, the bias and activation passes and the activation derivatives run
# on one thread while the others wait.  Those are all row-local, so here the
# batch's rows are cut into ranges, one per thread, and each thread gathers
# its rows and runs them through every layer's product and epilogue
# (forward), or through a layer's A @ W.T and the activation derivative
# below it (backward), in one job; the weight gradients' products and the
# bias gradients' column sums join the same backward job.  Every product
# takes the path planned for the whole batch (gemm_rows), and each bias
# gradient is summed row by row from 0 as in dense_backward_ptr, so a step
# gives bitwise the result of the one-thread path.

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
        _zero_if_frozen(prog, l, grad)
        tmp = g
        g = other
        other = tmp


cdef inline int64_t _n_row_params(const int64_t[:, ::1] prog, int64_t l) noexcept nogil:
    if prog[l, KIND] == BATCHNORM:
        return 2 * prog[l, N_OUT]
    return prog[l, N_IN] * prog[l, N_OUT] + prog[l, N_OUT]


cdef void clip_and_measure_op(const int64_t[:, ::1] prog, floating* grad, double clip_value,
                              double clip_norm, double* norms) noexcept nogil:
    """Clip the trainable gradients: each element to [-clip_value, clip_value]
    (if > 0), then the whole vector to global L2 norm clip_norm (if > 0) as
    torch.nn.utils.clip_grad_norm_ does (scale by clip_norm / (norm + 1e-6)
    when that is below 1).  Adds each layer's gradient norm (after value
    clipping, before norm clipping) to norms[l] if norms is not NULL."""
    cdef int64_t l, i, start, size
    cdef double total = 0.0, layer, coef
    cdef floating v, hi = <floating>clip_value
    for l in range(prog.shape[0]):
        if prog[l, KIND] == DROPOUT or not prog[l, TRAINABLE]:
            continue
        start = prog[l, W_OFF]
        size = _n_row_params(prog, l)  # W then b (gamma then beta), contiguous
        layer = 0.0
        for i in range(start, start + size):
            v = grad[i]
            if clip_value > 0:
                v = hi if v > hi else (-hi if v < -hi else v)
                grad[i] = v
            layer += v * v
        total += layer
        if norms != NULL:
            norms[l] += sqrt(layer)
    if clip_norm > 0:
        coef = clip_norm / (sqrt(total) + 1e-6)
        if coef < 1.0:
            for l in range(prog.shape[0]):
                if prog[l, KIND] == DROPOUT or not prog[l, TRAINABLE]:
                    continue
                start = prog[l, W_OFF]
                size = _n_row_params(prog, l)
                for i in range(start, start + size):
                    grad[i] = <floating>(grad[i] * coef)


def forward(const floating[:, ::1] X, const int64_t[:, ::1] program,
            const double[:, ::1] floats, floating[::1] params, floating[::1] acts, floating[:, ::1] out,
            int64_t chunk, floating[::1] aux, floating[::1] buffers):
    """Predict: out = network(X), ``chunk`` rows at a time (acts holds chunk
    rows); dropout is off."""
    cdef int64_t n = X.shape[0], start, m
    with nogil:
        start = 0
        while start < n:
            m = chunk if n - start > chunk else n - start
            forward_all(program, &X[start, 0], _ptr(params), &acts[0], &out[start, 0], m,
                        floats, NULL, _ptr(aux), _ptr(buffers))
            start += m


def loss_grad(const floating[:, ::1] X, const floating[:, ::1] Y, const floating[::1] W,
              const int64_t[:, ::1] program, const double[:, ::1] floats,
              floating[::1] params, floating[::1] grad, floating[::1] acts,
              floating[::1] deltas, size_t loss_addr, const double[:, ::1] reg, bint reg_per_weight,
              floating[::1] aux, floating[::1] buffers):
    """Full-batch weighted mean loss over all rows of X (plus the weight
    penalties), and its gradient into ``grad``."""
    cdef int64_t n = X.shape[0], k = Y.shape[1], half = deltas.shape[0] // 2
    cdef int64_t last = program.shape[0] - 1
    cdef double loss
    with nogil:
        forward_all(program, &X[0, 0], _ptr(params), &acts[0], NULL, n, floats, NULL,
                    _ptr(aux), _ptr(buffers))
        loss = call_loss(loss_addr, &acts[0] + program[last, ACT_OFF] * n,
                         <floating*>&Y[0, 0], <floating*>&W[0], &deltas[0], n, k)
        loss += backward_all(program, &X[0, 0], _ptr(params), _ptr(grad), &acts[0],
                             &deltas[0], half, n, reg, floats, _ptr(aux), False)
        loss += penalize_op(program, reg, reg_per_weight, weight_sum(&W[0], n), _ptr(params),
                            _ptr(grad))
    return loss


# ---------------------------------------------------------------------------
# The state of one fit, checked once: train_batches trusts nothing else.

_INT64, _UINT64, _DOUBLE = np.dtype(np.int64), np.dtype(np.uint64), np.dtype(np.float64)


def _field(name, a, dtype, shape=None, size=None, writable=False):
    """a itself if it is a C-contiguous ndarray of ``dtype`` with ``shape``
    (if given; None in it: any length) or at least ``size`` elements (if
    given), writable if ``writable``; else a ValueError saying what to pass."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, not {type(a).__name__}")
    if a.dtype != dtype:
        raise ValueError(f"{name} is {a.dtype}; it must be {dtype}")
    if shape is not None and (a.ndim != len(shape) or any(
            s is not None and a.shape[i] != s for i, s in enumerate(shape))):
        want = "(" + ", ".join("any" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} has shape {a.shape}; it must be {want}")
    if size is not None and (a.ndim != 1 or a.shape[0] < size):
        raise ValueError(f"{name} has shape {a.shape}; it must be 1-D with at least "
                         f"{size} elements")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if writable and not a.flags.writeable:
        raise ValueError(f"{name} is written in place and must be writable")
    return a


def _check_row(prog, floats, reg, int64_t l, int64_t n_params, int64_t n_aux,
               int64_t n_buffers):
    """ValueError unless row l's codes are known and its parameters,
    scratch, running statistics and residual partner lie inside their
    arrays (the engine indexes them without bounds checks)."""
    kind, n_in, n_out, act, w_off, b_off, act_off, trainable, aux_off, buf_off = (
        int(v) for v in prog[l, :N_COLS])
    where = f"program row {l}"

    def inside(what, off, size, limit):
        if off < 0 or size < 0 or off + size > limit:
            raise ValueError(f"{where}: {what} [{off}, {off + size}) is outside [0, {limit})")

    if kind not in (DENSE, DROPOUT, BATCHNORM, RES_BEGIN, RES_END):
        raise ValueError(f"{where}: unknown kind {kind}")
    if n_in < 1 or n_out < 1:
        raise ValueError(f"{where}: widths must be >= 1, not n_in={n_in}, n_out={n_out}")
    if act_off < 0 or trainable not in (0, 1):
        raise ValueError(f"{where}: act_off {act_off} < 0 or trainable {trainable} not 0/1")
    if l > 0 and n_in != prog[l - 1, N_OUT]:
        raise ValueError(f"{where}: n_in {n_in} != the previous row's n_out {prog[l - 1, N_OUT]}")
    rate = floats[l, RATE]
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{where}: rate {rate} is outside [0, 1)")
    if kind == DENSE:
        if not IDENTITY <= act <= SOFTPLUS:
            raise ValueError(f"{where}: unknown activation {act}")
        inside("W and b", w_off, n_in * n_out + n_out, n_params)
        inside("b", b_off, n_out, n_params)
        if rate > 0:
            inside("DropConnect's scratch", aux_off, 2 * n_in * n_out, n_aux)
        return
    if n_in != n_out:
        raise ValueError(f"{where}: a kind {kind} row keeps its width, not {n_in} -> {n_out}")
    if act != IDENTITY:
        raise ValueError(f"{where}: only a dense row has an activation, not {act}")
    if reg[l, L2] or reg[l, L1] or reg[l, ACTIVITY_L1]:
        # the penalties take the row as a dense W (n_in, n_out) at W_OFF
        raise ValueError(f"{where}: only a dense row has penalties")
    if trainable and kind != BATCHNORM:
        # clipping would take the row as a dense W and b at W_OFF
        raise ValueError(f"{where}: a kind {kind} row has no parameters to train")
    if kind == BATCHNORM:
        inside("gamma and beta", w_off, 2 * n_out, n_params)
        inside("beta", b_off, n_out, n_params)
        inside("1/std", aux_off, n_out, n_aux)
        inside("running statistics", buf_off, 2 * n_out, n_buffers)
    elif kind in (RES_BEGIN, RES_END):
        partner = w_off
        inside("the partner row", partner, 1, prog.shape[0])
        want = RES_END if kind == RES_BEGIN else RES_BEGIN
        if prog[partner, KIND] != want or (partner > l) != (kind == RES_BEGIN) \
                or prog[partner, N_OUT] != n_out:
            raise ValueError(f"{where}: partner row {partner} is not its residual "
                             f"{'end' if kind == RES_BEGIN else 'begin'} of width {n_out}")


def _act_columns(kind, n_out):
    """Columns of the activation workspace a row uses per batch row: its
    output, and dropout's mask or BatchNorm's x_hat after it."""
    return 2 * n_out if kind in (DROPOUT, BATCHNORM) else n_out


cdef class EngineState:
    """What ``train_batches`` reads and writes across the calls of one fit,
    checked once here so that no call can index outside an array.

    Every array must be C-contiguous; the floating ones all have params'
    dtype (float32 or float64).  The state holds a reference to each, so
    none is freed or (by ``ndarray.resize``, which refuses a referenced
    array unless told ``refcheck=False``, NumPy's own unsafe switch)
    reallocated while it lives, and exposes none of them.  IN: read by the
    engine; OUT: written (its contents on entry do not matter); INOUT: read
    and updated in place.

    Parameters
    ----------
    program : int64 (n_layers, N_COLS), IN
        The program rows (fastbp.program.Program.rows).
    floats : float64 (n_layers, N_FLOATS), IN
        Each row's drop rate, BatchNorm momentum and eps.
    reg : float64 (n_layers, N_REG), IN
        Each row's L2, L1 and activity-L1 penalties.
    reg_per_weight : bool, IN
        Scale the weight penalties by 1 / (the batch's weight sum).
    params : (n_params,), INOUT
        Every weight and bias; the optimizer updates it.
    grad : (n_params,), OUT
        Each step's gradient.
    acts : (batch_size * act_width,), OUT
        Every row's output (and masks, x_hat) for a batch: workspace.
    deltas : (2 * batch_size * max n_out,), OUT
        The two gradient ping-pong buffers: workspace.
    xb, yb, wb : (batch_size * n_features,), (batch_size * n_outputs,), (batch_size,), OUT
        A gathered batch's inputs, targets and weights: workspace.
    aux : (n_aux,), OUT
        Per-step scratch (DropConnect's W_eff and mask, BatchNorm's 1/std).
    buffers : (n_buffers,), INOUT
        BatchNorm's running mean and variance.
    rng : uint64 (1,), INOUT
        The dropout stream's counter.
    opt_state : (n_slots * n_params,) (or more), INOUT
        The optimizer's state slots, slot s of parameter i at s * n_params + i.
    n_slots, n_hyper : int, IN
        The slots and hyperparameters the optimizer's kernel reads.
    hyper : float64 (n_hyper,) (or more), IN
        The optimizer's hyperparameters, in its kernel's order (the caller
        may change their values in place between calls).
    segments : int64 (n_segments, 2), IN
        (start, length) of each run of trainable parameters in params.
    loss_addr, step_addr : int, IN
        C addresses of the loss and of the optimizer's update for params'
        dtype (fastbp._numba.losses.loss_cfunc, fastbp._numba.optim.step_cfunc).
        Machine code cannot be checked: they are trusted to be those.
    batch_size : int, IN
        The most rows of a batch (the workspaces' size).
    clip_value, clip_norm : float, IN
        Gradient clipping (0: off).
    grad_norms : float64 (0,) or (n_layers,), INOUT
        If (n_layers,), each batch's per-layer gradient norms are added to it.
    """

    def __cinit__(self, *, program, floats, reg, reg_per_weight, params, grad, acts, deltas,
                  xb, yb, wb, aux, buffers, rng, opt_state, n_slots, hyper, n_hyper, segments,
                  loss_addr, step_addr, batch_size, clip_value, clip_norm, grad_norms):
        self.terms = NULL
        self._check_program(program, floats, reg)
        self._check_float_arrays(params, grad, acts, deltas, xb, yb, wb, aux, buffers,
                                 opt_state, n_slots, batch_size)
        self.rng = _field("rng", rng, _UINT64, shape=(1,), writable=True)
        self.hyper = _field("hyper", hyper, _DOUBLE, size=int(n_hyper))
        seg = _field("segments", segments, _INT64, shape=(None, 2))
        if seg.size and (np.any(seg < 0) or np.any(seg[:, 0] + seg[:, 1] > self.n_params)):
            raise ValueError(f"segments must lie inside [0, {self.n_params})")
        self.segments = seg
        if grad_norms.shape not in ((0,), (self.n_layers,)):
            raise ValueError(f"grad_norms must have 0 or {self.n_layers} entries")
        self.grad_norms = _field("grad_norms", grad_norms, _DOUBLE, writable=True)
        self.reg_per_weight = bool(reg_per_weight)
        self.clip_value = _real("clip_value", clip_value, 0.0, np.inf)
        self.clip_norm = _real("clip_norm", clip_norm, 0.0, np.inf)
        for name, addr in (("loss_addr", loss_addr), ("step_addr", step_addr)):
            if not isinstance(addr, int) or not 0 < addr < 2 ** 64:
                raise ValueError(f"{name} must be a C address (a positive int), not {addr!r}")
        self.loss_addr, self.step_addr = loss_addr, step_addr
        self.loss_which = softmax_which(self.loss_addr, self.is_double)
        if self.loss_which >= 0:
            # each row's loss term, for steps in row ranges
            self.terms = <double*>malloc(self.batch_size * sizeof(double))
            if self.terms == NULL:
                raise MemoryError()

    def __dealloc__(self):
        free(self.terms)

    def set_comm(self, *, allreduce, ptr_handles, comm, op_sum, type_float, type_double,
                 in_place, success, rank, n_ranks, sharded):
        """Train data-parallel over ``n_ranks`` MPI ranks, as rank ``rank``:
        each step adds the ranks' shares of the gradient and loss with one
        MPI_Allreduce(SUM) at ``allreduce`` (its C address in the MPI library
        the process loaded; trusted, like loss_addr) on the communicator
        ``comm``, with the library's handles and constants (ints; pointer
        handles when ``ptr_handles``: see csrc/comm.h).  Replicated data
        (``sharded`` false): every rank has every row and trains its
        contiguous slice of each batch.  Sharded: each rank's X holds its own
        rows and batch_size is its share of a global batch; a rank whose
        rows are done contributes nothing."""
        values = dict(allreduce=allreduce, comm=comm, op_sum=op_sum, type_float=type_float,
                      type_double=type_double, in_place=in_place, success=success)
        for name, v in values.items():
            if isinstance(v, bool) or not isinstance(v, int) or not -2 ** 63 <= v < 2 ** 64:
                raise ValueError(f"{name} must be an int (a C handle or address), not {v!r}")
        if not 0 < allreduce < 2 ** 64:
            raise ValueError("allreduce must be a C address")
        if not isinstance(n_ranks, int) or not isinstance(rank, int) or \
                not 0 <= rank < n_ranks < 2 ** 31:
            raise ValueError(f"rank must be in [0, n_ranks): {rank!r}, {n_ranks!r}")
        def word(v):   # the bits of a C handle (int or pointer) as intptr_t
            return v - 2 ** 64 if v >= 2 ** 63 else v
        self.comm.allreduce = <void*><size_t>allreduce
        self.comm.ptr_handles = bool(ptr_handles)
        self.comm.comm = word(comm)
        self.comm.op_sum = word(op_sum)
        self.comm.type_float = word(type_float)
        self.comm.type_double = word(type_double)
        self.comm.in_place = word(in_place)
        self.comm.success = success
        self.comm.error = 0
        self.rank, self.n_ranks, self.sharded = rank, n_ranks, bool(sharded)

    @property
    def comm_error(self):
        """The MPI error code of the first failed allreduce (0: none)."""
        return self.comm.error

    def _check_program(self, program, floats, reg):
        prog = _field("program", program, _INT64, shape=(None, N_COLS))
        if prog.shape[0] == 0:
            raise ValueError("program has no rows")
        self.n_layers = prog.shape[0]
        self.floats = _field("floats", floats, _DOUBLE, shape=(self.n_layers, N_FLOATS))
        self.reg = _field("reg", reg, _DOUBLE, shape=(self.n_layers, N_REG))
        if not (np.isfinite(reg).all() and (reg >= 0).all()):
            raise ValueError("reg's penalties must be finite and >= 0")
        self.program = prog
        self.n_features = prog[0, N_IN]
        self.n_outputs = prog[self.n_layers - 1, N_OUT]

    def _check_float_arrays(self, params, grad, acts, deltas, xb, yb, wb, aux, buffers,
                            opt_state, n_slots, batch):
        # sizes in Python ints: no product of hostile values can wrap around
        prog = np.asarray(self.program)
        floats = np.asarray(self.floats)
        reg = np.asarray(self.reg)
        if not isinstance(params, np.ndarray) or params.dtype not in _FLOATS:
            raise ValueError("params must be a float32 or float64 numpy array")
        dtype = params.dtype
        self.params = _field("params", params, dtype, shape=(None,), writable=True)
        self.n_params = params.shape[0]
        self.grad = _field("grad", grad, dtype, shape=(self.n_params,), writable=True)
        self.aux = _field("aux", aux, dtype, shape=(None,), writable=True)
        self.buffers = _field("buffers", buffers, dtype, shape=(None,), writable=True)
        n_slots, batch = int(n_slots), int(batch)
        if batch < 1 or n_slots < 0:
            raise ValueError(f"batch_size must be >= 1 and n_slots >= 0, not {batch}, {n_slots}")
        # (two statements: Cython 3.3.0 compiles ``a = b = 0`` of untyped
        # names leaving b NULL, a segfault; tests/test_packaging.py)
        act_width = 0
        delta_width = 0
        for l in range(self.n_layers):
            _check_row(prog, floats, reg, l, self.n_params, aux.shape[0], buffers.shape[0])
            act_width = max(act_width, int(prog[l, ACT_OFF])
                            + _act_columns(int(prog[l, KIND]), int(prog[l, N_OUT])))
            delta_width = max(delta_width, int(prog[l, N_OUT]))
        self.acts = _field("acts", acts, dtype, size=batch * act_width, writable=True)
        self.batch_size = batch   # now at most acts' length
        self.deltas = _field("deltas", deltas, dtype, size=2 * batch * delta_width,
                             writable=True)
        self.xb = _field("xb", xb, dtype, size=batch * int(self.n_features), writable=True)
        self.yb = _field("yb", yb, dtype, size=batch * int(self.n_outputs), writable=True)
        self.wb = _field("wb", wb, dtype, size=batch, writable=True)
        self.opt_state = _field("opt_state", opt_state, dtype, size=n_slots * int(self.n_params),
                                writable=True)
        self.is_double = dtype == _DOUBLE


cdef _check_call(EngineState state, int64_t n, int64_t d, int64_t k, int64_t y_rows,
                 int64_t w_rows, const int64_t[::1] order, int64_t first, int64_t count,
                 bint gather, int64_t n_losses):
    """ValueError unless a train_batches call's arrays fit the state and its
    batches (and, when gathering, their rows' indices) lie inside X."""
    cdef int64_t i, hi
    if d != state.n_features or k != state.n_outputs or y_rows != n or w_rows != n:
        raise ValueError(f"X, Y, W must be (n, {state.n_features}), (n, {state.n_outputs}), "
                         f"(n,); got ({n}, {d}), ({y_rows}, {k}), ({w_rows},)")
    # (compared so that no sum or product of hostile values can wrap around)
    if first < 0 or count < 0 or first > n_losses or count > n_losses - first or \
            (first + count > (n + state.batch_size - 1) // state.batch_size
             and not state.sharded):
        raise ValueError(f"batches {first} .. {first + count - 1} are not batches of X "
                         f"({n} rows) with a loss slot each ({n_losses})")
    if not gather:
        return
    if order.shape[0] != n:
        raise ValueError(f"order must have one index per row of X ({n}), not {order.shape[0]}")
    hi = (first + count) * state.batch_size
    if hi > n:
        hi = n
    for i in range(first * state.batch_size, hi):
        if order[i] < 0 or order[i] >= n:
            raise ValueError(f"order[{i}] = {order[i]} is not a row of X ({n} rows)")


# Phase profiling (dense._set_profiling): seconds spent in each phase of
# train_batches' steps, and the steps timed, since the last read.
PHASE_NAMES = ("gather", "forward", "loss", "backward", "penalty", "clip", "optimizer",
               "row-parallel forward", "allreduce")
cdef double PHASE_SECONDS[9]
cdef int64_t PHASE_STEPS = 0


cdef inline void _lap(bint on, int phase, double* t) noexcept nogil:
    """Adds the time since t[0] to the phase and restarts t[0] (if on)."""
    cdef double t1
    if on:
        t1 = now()
        PHASE_SECONDS[phase] += t1 - t[0]
        t[0] = t1


def _phase_seconds():
    """Seconds per phase of the steps timed since the last call, with
    "gemm" (products computed through gemm_rm, a part of forward and
    backward) and "steps"; then resets the counts."""
    global PHASE_STEPS
    out = {name: PHASE_SECONDS[i] for i, name in enumerate(PHASE_NAMES)}
    out["gemm"] = profile_gemm_seconds(True)
    out["steps"] = PHASE_STEPS
    for i in range(len(PHASE_NAMES)):
        PHASE_SECONDS[i] = 0.0
    PHASE_STEPS = 0
    return out


def train_batches(EngineState state, X, Y, W, order, first_batch, n_batches, gather, step0,
                  batch_loss):
    """Run mini-batches first_batch .. first_batch + n_batches - 1 of an epoch
    (see ``_train_batches``), after checking every argument: a ValueError
    names the first one that does not fit the state."""
    dtype = state.params.dtype
    X = _field("X", X, dtype, shape=(None, None))
    Y = _field("Y", Y, dtype, shape=(None, None))
    W = _field("W", W, dtype, shape=(None,))
    order = _field("order", order, _INT64, shape=(None,))
    batch_loss = _field("batch_loss", batch_loss, _DOUBLE, shape=(None,), writable=True)
    return _train_batches(state, X, Y, W, order, _int64("first_batch", first_batch),
                          _int64("n_batches", n_batches), bool(gather),
                          _int64("step0", step0), batch_loss)


def _int64(name, value):
    """value as an int that fits int64; else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or \
            not -2 ** 63 <= value < 2 ** 63:
        raise ValueError(f"{name} must be an int64, not {value!r}")
    return int(value)


def _train_batches(EngineState state, const floating[:, ::1] X, const floating[:, ::1] Y,
                   const floating[::1] W, const int64_t[::1] order, int64_t first_batch,
                   int64_t n_batches, bint gather, int64_t step0, double[::1] batch_loss):
    """Run mini-batches first_batch .. first_batch + n_batches - 1 of an epoch
    of X (n, d), Y (n, k), sample weights W (n,) on ``state`` (an
    ``EngineState``: the model, its workspaces, the loss and optimizer).

    Batch b holds rows order[b*B : (b+1)*B] (B: state.batch_size; the last
    one may be short).  With ``gather`` false the rows are taken in place
    from X (no copy) and ``order`` is not read.  The optimizer's step
    counter for batch i of this call is step0 + i + 1.  ``batch_loss[b]``
    (OUT) receives each batch's mean loss.  Gradients are clipped by
    ``clip_and_measure`` when state.clip_value or clip_norm is > 0; if the
    state's grad_norms has one entry per layer, each batch's per-layer
    gradient norms are added to it.  A batch whose weights sum to zero
    (added left to right in double, as the loss kernels add them) is
    skipped: batch_loss 0, no update, and the step counter is step0 +
    (updates so far) + 1.  Returns (batches_done, steps, status):
    batches_done counts the batches finished (updated or skipped; on a
    non-OK status, those before the failing one), steps the updates applied.
    The arrays are checked against the state (ValueError) before any
    step runs.
    """
    cdef bint dbl = floating is double
    if state.is_double != dbl:
        raise ValueError(f"X is {'float64' if dbl else 'float32'} but the state's arrays are "
                         f"{state.params.dtype}; pass X, Y and W in the model's dtype")
    _check_call(state, X.shape[0], X.shape[1], Y.shape[1], Y.shape[0], W.shape[0], order,
                first_batch, n_batches, gather, batch_loss.shape[0])
    # The state's arrays as this dtype's memoryviews (checked at construction).
    cdef const int64_t[:, ::1] program = state.program
    cdef const double[:, ::1] reg = state.reg
    cdef const double[:, ::1] floats = state.floats
    cdef const int64_t[:, ::1] segments = state.segments
    cdef const double[::1] hyper = state.hyper
    cdef uint64_t[::1] rng = state.rng
    cdef double[::1] grad_norms = state.grad_norms
    cdef floating[::1] params = state.params
    cdef floating[::1] grad = state.grad
    cdef floating[::1] acts = state.acts
    cdef floating[::1] deltas = state.deltas
    cdef floating[::1] xb = state.xb
    cdef floating[::1] yb = state.yb
    cdef floating[::1] wb = state.wb
    cdef floating[::1] aux = state.aux
    cdef floating[::1] buffers = state.buffers
    cdef floating[::1] opt_state = state.opt_state
    cdef int64_t batch_size = state.batch_size
    cdef size_t loss_addr = state.loss_addr, step_addr = state.step_addr
    cdef bint reg_per_weight = state.reg_per_weight
    cdef double clip_value = state.clip_value, clip_norm = state.clip_norm
    cdef int64_t n = X.shape[0], d = X.shape[1], k = Y.shape[1]
    cdef int64_t half = deltas.shape[0] // 2, n_params = params.shape[0]
    cdef int64_t last = program.shape[0] - 1
    cdef int64_t b, i, r, s, m, j, done = 0, steps = 0
    cdef int status = OK, ok
    global PHASE_STEPS
    cdef double loss, wsum, wl, scale, t_phase = 0.0
    cdef double red[2]
    cdef Share share
    cdef int64_t m_all
    cdef bint dist = state.comm.allreduce != NULL, sharded = state.sharded
    cdef int64_t rank = state.rank, n_ranks = state.n_ranks
    cdef bint prof = profiling()
    cdef const floating* x0
    cdef floating* y0
    cdef floating* w0
    cdef floating* slots = _ptr(opt_state)
    cdef floating* out_last
    cdef double* norms = &grad_norms[0] if grad_norms.shape[0] == program.shape[0] else NULL
    cdef bint clip = clip_value > 0 or clip_norm > 0 or norms != NULL
    cdef RowsJob rows
    rows.prog = &program[0, 0]
    rows.d = d
    rows.k = k
    rows.dbl = floating is double
    rows.gather = gather
    rows.X = &X[0, 0]
    rows.Y = &Y[0, 0]
    rows.W = &W[0]
    rows.order = &order[0] if order.shape[0] > 0 else NULL
    rows.xb = _ptr(xb)
    rows.yb = _ptr(yb)
    rows.wb = _ptr(wb)
    rows.params = &params[0]
    rows.acts = &acts[0]
    rows.g0 = &deltas[0]
    rows.loss_which = state.loss_which
    rows.terms = state.terms   # each row's loss term, for steps in row ranges
    with nogil:
        for i in range(n_batches):
            b = first_batch + i
            s = b * batch_size
            m = batch_size if n - s > batch_size else n - s
            if sharded:
                # this rank's next rows (none once its shard is done); the
                # global batch's rows and weight sum are the ranks' sums
                if m < 0:
                    m = 0
                wl = 0.0
                for r in range(m):
                    wl += W[order[s + r]] if gather else W[s + r]
                red[0] = m
                red[1] = wl
                if fbp_allreduce_sum(&state.comm, red, 2, 1):
                    status = COMM_FAILED
                    break
                share.rows = n_ranks * batch_size   # a slot of batch_size rows per rank
                share.row0 = rank * batch_size
                m_all = <int64_t>red[0]
                wsum = red[1]
            else:
                wsum = 0.0
                for r in range(m):
                    wsum += W[order[s + r]] if gather else W[s + r]
                m_all = m
                wl = wsum
                if dist:
                    # this rank's contiguous slice of the global batch
                    share.rows = m
                    share.row0 = m * rank // n_ranks
                    s += share.row0
                    m = m * (rank + 1) // n_ranks - share.row0
                    wl = 0.0
                    for r in range(m):
                        wl += W[order[s + r]] if gather else W[s + r]
            if wsum == 0:
                batch_loss[b] = 0
                done += 1
                continue
            if gather:
                x0 = &xb[0]
                y0 = &yb[0]
                w0 = &wb[0]
            else:
                x0 = &X[s, 0] if m else &X[0, 0]
                y0 = <floating*>&Y[s, 0] if m else <floating*>&Y[0, 0]
                w0 = <floating*>&W[s] if m else <floating*>&W[0]
            if prof:
                t_phase = now()
            rows.parts = 0 if dist else rows_parallel(program, reg, floats, m,
                                                        floating is double)
            if rows.parts:
                rows.m = m
                rows.s = s
                rows.x0 = x0
                rows.y0 = y0
                rows.w0 = w0
                if not forward_rows(&rows, program, &W[0]):
                    rows.parts = 0   # a product could not run here: the whole step again
                _lap(prof, 7, &t_phase)
            loss = 0.0
            if m == 0:
                memset(&grad[0], 0, n_params * sizeof(floating))   # nothing to add here
            else:
                if not rows.parts:
                    if gather:
                        for r in range(m):
                            memcpy(&xb[r * d], &X[order[s + r], 0], d * sizeof(floating))
                            memcpy(&yb[r * k], &Y[order[s + r], 0], k * sizeof(floating))
                            wb[r] = W[order[s + r]]
                        _lap(prof, 0, &t_phase)
                    forward_all(program, x0, &params[0], &acts[0], NULL, m, floats, &rng[0],
                                _ptr(aux), _ptr(buffers), &share if dist else NULL)
                    _lap(prof, 1, &t_phase)
                out_last = &acts[0] + program[last, ACT_OFF] * m
                if rows.parts and rows.loss_which >= 0:
                    for r in range(m):
                        loss += rows.terms[r]
                    loss *= rows.scale
                elif wl != 0:
                    loss = call_loss(loss_addr, out_last, y0, w0, &deltas[0], m, k)
                else:
                    # every weight of this rank's rows is 0 (the batch's are not)
                    memset(&deltas[0], 0, m * k * sizeof(floating))
                if dist and wl != 0 and wl != wsum:
                    # this rank's share of the batch's weighted mean
                    scale = wl / wsum
                    loss *= scale
                    for r in range(m * k):
                        deltas[r] = <floating>(deltas[r] * scale)
                _lap(prof, 2, &t_phase)
                if not dist and not isfinite(loss):
                    batch_loss[b] = loss
                    status = LOSS_NONFINITE
                    break
                if rows.parts:
                    backward_rows(&rows, program, &params[0], &grad[0], &acts[0], &deltas[0],
                                  half, x0)
                else:
                    loss += backward_all(program, x0, &params[0], &grad[0], &acts[0],
                                         &deltas[0], half, m, reg, floats, _ptr(aux), True,
                                         m_all)
                _lap(prof, 3, &t_phase)
            if dist:
                # the one collective of a step: the ranks' shares summed
                red[0] = loss
                if fbp_allreduce_sum(&state.comm, red, 1, 1) or \
                        fbp_allreduce_sum(&state.comm, &grad[0], n_params, floating is double):
                    status = COMM_FAILED
                    break
                loss = red[0]
                _lap(prof, 8, &t_phase)
                if not isfinite(loss):
                    batch_loss[b] = loss
                    status = LOSS_NONFINITE
                    break
            loss += penalize_op(program, reg, reg_per_weight, wsum, &params[0], &grad[0])
            _lap(prof, 4, &t_phase)
            batch_loss[b] = loss
            if clip:
                clip_and_measure_op(program, &grad[0], clip_value, clip_norm, norms)
                _lap(prof, 5, &t_phase)
            ok = optimizer_step(step_addr, &params[0], &grad[0], slots, segments, n_params,
                                <double*>&hyper[0], step0 + steps + 1)
            _lap(prof, 6, &t_phase)
            PHASE_STEPS += prof
            if not ok:
                status = PARAMS_NONFINITE
                break
            done += 1
            steps += 1
    return done, steps, status


# ---------------------------------------------------------------------------
# The per-layer ops for Python: each ``def`` below checks its arguments, then
# runs the very cdef function the interpreter above calls in a step, and is
# named like its twin in fastbp.reference (tests/test_engine.py holds the
# two to each other).  For tests and for reading; the engine never calls
# them.

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _array(name, a, dtype=None, ndim=None, like=None, writable=False):
    """a itself if it is a C-contiguous ndarray of a float dtype (``dtype``
    if given), with ``ndim`` dimensions (if given) and ``like``'s shape (if
    given); else a ValueError that says what to pass."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, not {type(a).__name__}")
    if dtype is None and a.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float32 or float64, not {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        raise ValueError(f"{name} is {a.dtype}; pass it as {np.dtype(dtype)} "
                         f"(the dtype of the other arrays)")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), not shape {a.shape}")
    if like is not None and a.shape != like.shape:
        raise ValueError(f"{name} has shape {a.shape}; it must be {like.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (np.ascontiguousarray({name}))")
    if writable and not a.flags.writeable:
        raise ValueError(f"{name} is written in place and must be writable")
    return a


def _real(name, value, lo, hi, hi_open=False):
    """value as a float in [lo, hi] ([lo, hi) if hi_open); else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a real number, not {type(value).__name__}")
    v = float(value)
    if not (lo <= v and (v < hi if hi_open else v <= hi)):
        raise ValueError(f"{name} must be in [{lo}, {hi}{')' if hi_open else ']'}, not {value!r}")
    return v


def _counter(counter):
    if (not isinstance(counter, np.ndarray) or counter.dtype != np.uint64
            or counter.shape != (1,) or not counter.flags.writeable):
        raise ValueError("counter must be a writable uint64 array of shape (1,) "
                         "(np.zeros(1, np.uint64)); it is advanced in place")
    return counter


def _kernel_dropout_forward(const floating[::1] x, floating[::1] out, floating[::1] mask,
                            double rate, uint64_t[::1] counter):
    with nogil:
        dropout_forward_op(&x[0], &out[0], &mask[0], x.shape[0], rate, &counter[0])


def dropout_forward(x, rate, counter):
    """Inverted dropout in training: ``x * mask`` (the engine's DROPOUT row,
    and DropConnect's mask on W).

    Parameters
    ----------
    x : ndarray of float32 or float64, any shape, C-contiguous
    rate : float in [0, 1)
        The fraction dropped.
    counter : ndarray of uint64, shape (1,)
        The splitmix64 stream's counter; advanced in place by ``x.size``.

    Returns
    -------
    out, mask : ndarray of x's shape and dtype
        mask is 1/(1 - rate) where the top 24 bits of an element's draw are
        below (1 - rate) 2^24, else 0.
    """
    x = _array("x", x)
    rate = _real("rate", rate, 0.0, 1.0, hi_open=True)
    counter = _counter(counter)
    out, mask = np.empty_like(x), np.empty_like(x)
    if x.size:
        _kernel_dropout_forward(x.reshape(-1), out.reshape(-1), mask.reshape(-1), rate, counter)
    return out, mask


def _kernel_dropout_backward(const floating[::1] g, const floating[::1] mask,
                             floating[::1] out):
    with nogil:
        dropout_backward_op(&g[0], &mask[0], &out[0], g.shape[0])


def dropout_backward(g, mask):
    """The gradient through a dropout mask, ``g * mask`` (a DROPOUT row's
    backward; a DropConnect row's dW scaled by its mask).

    Parameters
    ----------
    g, mask : ndarray, same shape and dtype (float32 or float64)

    Returns
    -------
    ndarray of g's shape and dtype
    """
    g = _array("g", g)
    mask = _array("mask", mask, g.dtype, like=g)
    out = np.empty_like(g)
    if g.size:
        _kernel_dropout_backward(g.reshape(-1), mask.reshape(-1), out.reshape(-1))
    return out


def _kernel_residual_add(const floating[::1] x, const floating[::1] skip, floating[::1] out):
    with nogil:
        residual_add_op(&x[0], &skip[0], &out[0], x.shape[0])


def residual_add(x, skip):
    """``x + skip``: a RES_END row's output (block(x) + x), and in the
    backward pass the skip path's gradient joining the block's at RES_BEGIN.

    Parameters
    ----------
    x, skip : ndarray, same shape and dtype (float32 or float64)

    Returns
    -------
    ndarray of x's shape and dtype
    """
    x = _array("x", x)
    skip = _array("skip", skip, x.dtype, like=x)
    out = np.empty_like(x)
    if x.size:
        _kernel_residual_add(x.reshape(-1), skip.reshape(-1), out.reshape(-1))
    return out


def _kernel_activity_penalty(const floating[::1] a, floating[::1] g, int64_t m, double c):
    cdef double value
    with nogil:
        value = activity_penalty_op(&a[0], &g[0], m, a.shape[0], c)
    return value


def activity_penalty(a, g, c):
    """The L1 activity penalty of a layer's output: adds ``c/m sign(a)`` to
    g in place and returns ``c/m sum |a|``.

    Parameters
    ----------
    a : ndarray of shape (m, n), float32 or float64
        The layer's output, m >= 1 rows.
    g : ndarray of shape (m, n), a's dtype
        dL/da, updated in place.
    c : float >= 0
        The penalty's coefficient (``reg[l, ACTIVITY_L1]``).

    Returns
    -------
    float
    """
    a = _array("a", a, ndim=2)
    g = _array("g", g, a.dtype, like=a, writable=True)
    c = _real("c", c, 0.0, float("inf"), hi_open=True)
    if a.shape[0] < 1:
        raise ValueError("a must have at least one row")
    if a.size == 0:
        return 0.0
    return _kernel_activity_penalty(a.reshape(-1), g.reshape(-1), a.shape[0], c)


def _kernel_batchnorm_forward(const floating[:, ::1] x, floating[:, ::1] out,
                              floating[:, ::1] xhat, floating[::1] inv_std,
                              const floating[::1] gamma, const floating[::1] beta,
                              floating[::1] buf, double momentum, double eps, bint training):
    with nogil:
        batchnorm_forward_op(&x[0, 0], &out[0, 0], &xhat[0, 0], &inv_std[0], &gamma[0], &beta[0],
                             &buf[0], x.shape[0], x.shape[1], momentum, eps, training)


def batchnorm_forward(x, gamma, beta, running_mean, running_var, eps, momentum, training):
    """A BATCHNORM row's forward (torch.nn.BatchNorm1d).

    Parameters
    ----------
    x : ndarray of shape (m, w), float32 or float64
        m >= 2 rows in training, m >= 1 otherwise.
    gamma, beta : ndarray of shape (w,), x's dtype
    running_mean, running_var : ndarray of shape (w,), x's dtype
        Updated in place in training (momentum-weighted, the variance
        unbiased); used instead of the batch's statistics otherwise.
    eps : float >= 0
        Added to the variance.
    momentum : float in [0, 1]
    training : bool

    Returns
    -------
    y, x_hat : ndarray of shape (m, w)
        ``y = gamma x_hat + beta``, ``x_hat = (x - mean) / sqrt(var + eps)``.
    inv_std : ndarray of shape (w,)
        ``1 / sqrt(var + eps)``.
    """
    x = _array("x", x, ndim=2)
    vectors = [_array(name, v, x.dtype, ndim=1, writable=name.startswith("running"))
               for name, v in (("gamma", gamma), ("beta", beta),
                               ("running_mean", running_mean), ("running_var", running_var))]
    m, w = x.shape
    for name, v in zip(("gamma", "beta", "running_mean", "running_var"), vectors):
        if v.shape != (w,):
            raise ValueError(f"{name} has shape {v.shape}; it must be ({w},), x's width")
    eps = _real("eps", eps, 0.0, float("inf"), hi_open=True)
    momentum = _real("momentum", momentum, 0.0, 1.0)
    if m < (2 if training else 1):
        raise ValueError(f"batchnorm_forward needs at least {2 if training else 1} rows "
                         f"{'in training' if training else ''}, got {m}")
    out, xhat = np.empty_like(x), np.empty_like(x)
    inv_std = np.empty(w, x.dtype)
    if w == 0:
        return out, xhat, inv_std
    buf = np.concatenate([running_mean, running_var])   # the engine's layout
    _kernel_batchnorm_forward(x, out, xhat, inv_std, vectors[0], vectors[1], buf, momentum,
                              eps, bool(training))
    if training:
        running_mean[...] = buf[:w]
        running_var[...] = buf[w:]
    return out, xhat, inv_std


def _kernel_batchnorm_backward(const floating[:, ::1] g, const floating[:, ::1] xhat,
                               const floating[::1] inv_std, const floating[::1] gamma,
                               floating[::1] dgamma, floating[::1] dbeta, floating[:, ::1] dx,
                               bint training):
    with nogil:
        batchnorm_backward_op(<floating*>&g[0, 0], &xhat[0, 0], &inv_std[0], &gamma[0], &dgamma[0],
                              &dbeta[0], &dx[0, 0], g.shape[0], g.shape[1], training)


def batchnorm_backward(g, xhat, inv_std, gamma, training):
    """A BATCHNORM row's backward.

    Parameters
    ----------
    g : ndarray of shape (m, w), float32 or float64
        dL/dy, m >= 1.
    xhat : ndarray of shape (m, w)
        The forward pass's x_hat.
    inv_std : ndarray of shape (w,)
        The forward pass's 1 / sqrt(var + eps).
    gamma : ndarray of shape (w,)
    training : bool
        Whether the forward pass used the batch's statistics (then they
        depend on x) or the running ones.

    Returns
    -------
    dgamma, dbeta : ndarray of shape (w,)
    dx : ndarray of shape (m, w)
    """
    g = _array("g", g, ndim=2)
    xhat = _array("xhat", xhat, g.dtype, like=g)
    m, w = g.shape
    for name, v in (("inv_std", inv_std), ("gamma", gamma)):
        _array(name, v, g.dtype, ndim=1)
        if v.shape != (w,):
            raise ValueError(f"{name} has shape {v.shape}; it must be ({w},), g's width")
    if m < 1:
        raise ValueError("g must have at least one row")
    dgamma, dbeta, dx = np.empty(w, g.dtype), np.empty(w, g.dtype), np.empty_like(g)
    if w:
        _kernel_batchnorm_backward(g, xhat, inv_std, gamma, dgamma, dbeta, dx, bool(training))
    return dgamma, dbeta, dx


def _program(program, n_rows=None):
    if (not isinstance(program, np.ndarray) or program.dtype != np.int64 or program.ndim != 2
            or program.shape[1] != N_COLS or not program.flags.c_contiguous):
        raise ValueError(f"program must be a C-contiguous int64 array of shape (n_layers, "
                         f"{N_COLS}) (net.program.rows)")
    return program


def _check_span(program, l, start, size, n, what):
    """Rows l's ``size`` values from ``start`` lie inside a vector of n."""
    if program[l, N_IN] < 0 or program[l, N_OUT] < 0 or start < 0 or start + size > n:
        raise ValueError(f"program row {l}: its {what} ({size} values from {start}) do not "
                         f"fit in the {n} parameters")


def _kernel_penalize(const int64_t[:, ::1] program, const double[:, ::1] reg, bint per_weight,
                     const floating[::1] w, floating[::1] params, floating[::1] grad):
    cdef double value
    with nogil:
        value = penalize_op(program, reg, per_weight, weight_sum(&w[0], w.shape[0]),
                            _ptr(params), _ptr(grad))
    return value


def penalize(program, reg, per_weight, w, params, grad):
    """Adds every trainable dense row's weight penalty's gradient
    ``s (l2 W + l1 sign W)`` to grad in place; returns the penalty
    ``s sum (l2/2 ||W||^2 + l1 |W|_1)``.

    Parameters
    ----------
    program : ndarray of int64, shape (n_layers, N_COLS)
    reg : ndarray of float64, shape (n_layers, N_REG)
        Columns L2, L1 (ACTIVITY_L1 is not read here).
    per_weight : bool
        s = 1 / sum(w) if true (scikit-learn's alpha), else 1.
    w : ndarray of shape (m,), m >= 1
        The batch's sample weights.
    params, grad : ndarray of shape (n_params,), w's dtype
        grad is updated in place.

    Returns
    -------
    float
    """
    program = _program(program)
    if (not isinstance(reg, np.ndarray) or reg.dtype != np.float64
            or reg.shape != (program.shape[0], N_REG) or not reg.flags.c_contiguous):
        raise ValueError(f"reg must be a C-contiguous float64 array of shape "
                         f"({program.shape[0]}, {N_REG})")
    w = _array("w", w, ndim=1)
    params = _array("params", params, w.dtype, ndim=1)
    grad = _array("grad", grad, w.dtype, like=params, writable=True)
    if w.shape[0] < 1:
        raise ValueError("w must hold at least one sample weight")
    for l in range(program.shape[0]):
        if (reg[l, L2] != 0 or reg[l, L1] != 0) and program[l, TRAINABLE]:
            if program[l, KIND] != DENSE:
                raise ValueError(f"program row {l}: weight penalties apply to DENSE rows only")
            _check_span(program, l, int(program[l, W_OFF]),
                        int(program[l, N_IN]) * int(program[l, N_OUT]), params.shape[0], "W")
    return _kernel_penalize(program, reg, bool(per_weight), w, params, grad)


def _kernel_clip_and_measure(const int64_t[:, ::1] program, floating[::1] grad,
                             double clip_value, double clip_norm, double[::1] norms):
    with nogil:
        clip_and_measure_op(program, _ptr(grad), clip_value, clip_norm, &norms[0])


def clip_and_measure(program, grad, clip_value=0.0, clip_norm=0.0):
    """Clips the trainable rows' gradients in place: each element to
    [-clip_value, clip_value] (if > 0), then the whole to global L2 norm
    clip_norm (if > 0) like torch.nn.utils.clip_grad_norm_.

    Parameters
    ----------
    program : ndarray of int64, shape (n_layers, N_COLS)
    grad : ndarray of shape (n_params,), float32 or float64
        Updated in place.
    clip_value, clip_norm : float >= 0
        0 turns that clipping off.

    Returns
    -------
    ndarray of float64, shape (n_layers,)
        Each row's gradient norm after value clipping, before norm clipping
        (0 for rows without trainable parameters).
    """
    program = _program(program)
    grad = _array("grad", grad, ndim=1, writable=True)
    clip_value = _real("clip_value", clip_value, 0.0, float("inf"))
    clip_norm = _real("clip_norm", clip_norm, 0.0, float("inf"))
    for l in range(program.shape[0]):
        if program[l, KIND] != DROPOUT and program[l, TRAINABLE]:
            size = (2 * int(program[l, N_OUT]) if program[l, KIND] == BATCHNORM
                    else int(program[l, N_IN]) * int(program[l, N_OUT]) + int(program[l, N_OUT]))
            _check_span(program, l, int(program[l, W_OFF]), size, grad.shape[0], "parameters")
    norms = np.zeros(max(program.shape[0], 1))
    _kernel_clip_and_measure(program, grad, clip_value, clip_norm, norms)
    return norms[:program.shape[0]]
