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

The engine's modules, one job each (each compiled, cimporting the others
through its .pxd in fastbp/_ext/):

* engine.pyx (this module): the program interpreter (``forward_all``,
  ``backward_all``), ``EngineState``, the training loop
  (``train_batches``), ``forward`` (predict), ``loss_grad`` and the phase
  profile;
* engine_ops.pyx: the per-layer ops other than the products (dropout,
  residual add, activity penalty, BatchNorm, weight penalties, clipping),
  each with a checked ``def`` twin named like its fastbp.reference twin;
* engine_rows.pyx: the row-parallel step of a plain dense stack;
* engine_optim.pyx: the optimizer's update, split across threads;
* dense.pyx (products, activations, the thread pool) and losses.pyx (the C
  softmax losses), which the others call.
"""
from libc.math cimport isfinite
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy, memset

from libc.stdlib cimport free, malloc

import numpy as np

from fastbp._ext.losses cimport softmax_which
from fastbp._ext.dense cimport (floating, dense_forward_ptr, dense_backward_ptr,
                                now, profiling, profile_gemm_seconds)
from fastbp._ext.engine_ops cimport (BNSync, GOLDEN, activity_penalty_op, batchnorm_backward_op,
                                     batchnorm_forward_op, clip_and_measure_op,
                                     dropout_backward_op, dropout_forward_op, penalize_op,
                                     ptr_or_null, residual_add_op, weight_sum, zero_if_frozen)
from fastbp._ext.engine_optim cimport optimizer_step
from fastbp._ext.engine_rows cimport RowsJob, backward_rows, forward_rows, rows_parallel

from fastbp._ext.checks import FLOATS, field, real

cdef extern from "platform.h" nogil:
    void fbp_prefetch(const void* p)

# The next batch's rows are prefetched during a step when they are this
# small in all (bytes): S's 32 rows of 80 bytes, spread over its 1.6 MB of
# X, then arrive while the step computes instead of when it gathers them.
# Larger batches (M: 200 KB a batch) would push the step's own data out.
cdef int64_t PREFETCH_BYTES = 1 << 14


cdef inline void _prefetch_rows(const char* base, const int64_t* order, int64_t m,
                                int64_t row_bytes) noexcept nogil:
    """Prefetch every cache line of rows order[0..m-1] of a matrix with
    rows of row_bytes bytes starting at base."""
    cdef int64_t r, off, line
    for r in range(m):
        off = order[r] * row_bytes
        for line in range(0, row_bytes, 64):
            fbp_prefetch(base + off + line)
        fbp_prefetch(base + off + row_bytes - 1)


# loss(z, y, w, g, m, k) -> weighted mean loss; writes g = dL/dz.
# (fastbp/_numba/losses.py)
ctypedef double (*loss_f32)(float*, float*, float*, float*, int64_t, int64_t) noexcept nogil
ctypedef double (*loss_f64)(double*, double*, double*, double*, int64_t, int64_t) noexcept nogil


cdef inline double call_loss(size_t addr, floating* z, floating* y, floating* w,
                             floating* g, int64_t m, int64_t k) noexcept nogil:
    if floating is float:
        return (<loss_f32>addr)(z, y, w, g, m, k)
    else:
        return (<loss_f64>addr)(z, y, w, g, m, k)


cdef struct Share:
    # A rank's part of a global batch in data-parallel training: its rows
    # are rows row0 .. row0 + m - 1 of the batch's ``rows`` rows; ``bn``:
    # BatchNorm's statistics over the global batch (NULL: each rank's own).
    int64_t row0
    int64_t rows
    BNSync* bn



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
                                 floats[l, MOMENTUM], floats[l, EPS], counter != NULL,
                                 share.bn if share != NULL else NULL)
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


cdef double backward_all(const int64_t[:, ::1] prog, const floating* x0,
                         floating* params, floating* grad, floating* acts,
                         floating* deltas, int64_t half, int64_t m,
                         const double[:, ::1] reg, const double[:, ::1] floats,
                         floating* aux, bint training, int64_t act_rows=0,
                         BNSync* bn=NULL) noexcept nogil:
    """Backward through every layer (of a training forward pass).  On entry
    deltas[0:half] holds dL/d(output of the last layer); on exit ``grad``
    holds every dW, db.  Returns the layers' activity penalties, whose
    gradients it adds on the way: means over ``act_rows`` rows (0: the m
    rows here; data-parallel training: the global batch's).  ``bn``:
    BatchNorm with the global batch's statistics (see forward_all)."""
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
                                  other if l > 0 else NULL, m, n_out, training, bn)
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
        zero_if_frozen(prog, l, grad)
        tmp = g
        g = other
        other = tmp
    return activity


def forward(Network net, const floating[:, ::1] X, floating[::1] acts, floating[:, ::1] out,
            int64_t chunk, floating[::1] aux):
    """Predict: out = network(X), ``chunk`` rows at a time (acts holds chunk
    rows); dropout is off.  ``net`` is the checked program and its arrays;
    what varies per call is checked here."""
    cdef int64_t n = X.shape[0], start, m
    net._check_dtype(floating is double)
    if X.shape[1] != net.n_features or out.shape[0] != n or out.shape[1] != net.n_outputs:
        raise ValueError(f"X and out must be (n, {net.n_features}) and (n, {net.n_outputs}); "
                         f"got ({n}, {X.shape[1]}) and ({out.shape[0]}, {out.shape[1]})")
    if chunk < 1 or chunk > acts.shape[0] // net.act_width:
        raise ValueError(f"chunk must be from 1 to acts' rows ({acts.shape[0] // net.act_width}),"
                         f" not {chunk}")
    if aux.shape[0] < net.n_aux:
        raise ValueError(f"aux must have at least {net.n_aux} elements, not {aux.shape[0]}")
    cdef floating[::1] params = net.params
    cdef floating[::1] buffers = net.buffers
    with nogil:
        start = 0
        while start < n:
            m = chunk if n - start > chunk else n - start
            forward_all(net.program, &X[start, 0], ptr_or_null(params), &acts[0],
                        &out[start, 0], m, net.floats, NULL, ptr_or_null(aux),
                        ptr_or_null(buffers))
            start += m


def loss_grad(Network net, const floating[:, ::1] X, const floating[:, ::1] Y,
              const floating[::1] W, floating[::1] grad, floating[::1] acts,
              floating[::1] deltas, size_t loss_addr, const double[:, ::1] reg,
              bint reg_per_weight, floating[::1] aux):
    """Full-batch weighted mean loss over all rows of X (plus the weight
    penalties ``reg``, which the caller may change between calls), and its
    gradient into ``grad``.  ``net`` as for ``forward``."""
    cdef int64_t n = X.shape[0], k = Y.shape[1], half = deltas.shape[0] // 2
    cdef int64_t last = net.n_layers - 1
    cdef double loss
    net._check_dtype(floating is double)
    if n < 1 or X.shape[1] != net.n_features or Y.shape[0] != n or k != net.n_outputs \
            or W.shape[0] != n:
        raise ValueError(f"X, Y, W must be (n, {net.n_features}), (n, {net.n_outputs}), (n,) "
                         f"with n >= 1; got ({n}, {X.shape[1]}), ({Y.shape[0]}, {k}), "
                         f"({W.shape[0]},)")
    if grad.shape[0] != net.n_params:
        raise ValueError(f"grad must have {net.n_params} elements, not {grad.shape[0]}")
    if n > acts.shape[0] // net.act_width or n > half // net.delta_width:
        raise ValueError(f"acts and deltas must hold {n} rows ({n} x {net.act_width} and "
                         f"2 x {n} x {net.delta_width} elements)")
    if aux.shape[0] < net.n_aux:
        raise ValueError(f"aux must have at least {net.n_aux} elements, not {aux.shape[0]}")
    _check_address(loss_addr, "loss", floating is double)
    net._check_reg(reg)
    cdef floating[::1] params = net.params
    cdef floating[::1] buffers = net.buffers
    with nogil:
        forward_all(net.program, &X[0, 0], ptr_or_null(params), &acts[0], NULL, n, net.floats,
                    NULL, ptr_or_null(aux), ptr_or_null(buffers))
        loss = call_loss(loss_addr, &acts[0] + net.program[last, ACT_OFF] * n,
                         <floating*>&Y[0, 0], <floating*>&W[0], &deltas[0], n, k)
        loss += backward_all(net.program, &X[0, 0], ptr_or_null(params), ptr_or_null(grad),
                             &acts[0], &deltas[0], half, n, reg, net.floats, ptr_or_null(aux),
                             False)
        loss += penalize_op(net.program, reg, reg_per_weight, weight_sum(&W[0], n),
                            ptr_or_null(params), ptr_or_null(grad))
    return loss


cdef class Network:
    """A built model's program and the arrays its rows index (parameters,
    running statistics), checked once, for ``forward`` and ``loss_grad``:
    those check only what varies per call (X, out, the scratch), so a
    one-row predict pays a few comparisons, not a check of every row.

    The program and per-row floats are copied here (a caller changing its
    own array after the check cannot move an offset), and params and
    buffers are held, so they cannot be resized while the network lives.

    Parameters
    ----------
    program : int64 (n_layers, N_COLS)
    floats : float64 (n_layers, N_FLOATS)
    params : float32 or float64 (n_params,)
    buffers : (n_buffers,), params' dtype
    n_aux : int
        The scratch's size (aux of each call must have at least this many).
    """
    cdef readonly int64_t n_layers, n_features, n_outputs, n_params, n_aux
    cdef readonly int64_t act_width, delta_width
    cdef readonly bint is_double
    cdef readonly object params, buffers
    cdef const int64_t[:, ::1] program
    cdef const double[:, ::1] floats

    def __cinit__(self, *, program, floats, params, buffers, n_aux):
        prog, fl = _copied_program(program, floats)
        n_layers = prog.shape[0]
        if not isinstance(params, np.ndarray) or params.dtype not in FLOATS:
            raise ValueError("params must be a float32 or float64 numpy array")
        params = field("params", params, params.dtype, shape=(None,))
        buffers = field("buffers", buffers, params.dtype, shape=(None,))
        if isinstance(n_aux, bool) or not isinstance(n_aux, int) or not 0 <= n_aux < 2 ** 62:
            raise ValueError(f"n_aux must be an int >= 0, not {n_aux!r}")
        act_width, delta_width = _check_rows(prog, fl, np.zeros((n_layers, N_REG)),
                                             params.shape[0], n_aux, buffers.shape[0])
        self.program, self.floats = prog, fl
        self.n_layers = n_layers
        self.n_features, self.n_outputs = prog[0, N_IN], prog[n_layers - 1, N_OUT]
        self.params, self.buffers = params, buffers
        self.n_params, self.n_aux = params.shape[0], n_aux
        self.act_width, self.delta_width = act_width, delta_width
        self.is_double = params.dtype == _DOUBLE

    def _check_dtype(self, bint double):
        if double != self.is_double:
            raise ValueError(f"the arrays must be {'float64' if self.is_double else 'float32'},"
                             " as the network's parameters")

    def _check_reg(self, const double[:, ::1] reg):
        """ValueError unless ``reg`` has a row per layer of finite penalties
        >= 0, on dense rows only (the penalties take a row as a dense W)."""
        cdef int64_t l, j
        if reg.shape[0] != self.n_layers or reg.shape[1] != N_REG:
            raise ValueError(f"reg must have shape ({self.n_layers}, {N_REG})")
        for l in range(self.n_layers):
            for j in range(N_REG):
                if not (isfinite(reg[l, j]) and reg[l, j] >= 0):
                    raise ValueError("reg's penalties must be finite and >= 0")
                if reg[l, j] != 0 and self.program[l, KIND] != DENSE:
                    raise ValueError(f"program row {l}: only a dense row has penalties")


# ---------------------------------------------------------------------------
# The state of one fit, checked once: train_batches trusts nothing else.

_INT64, _UINT64, _DOUBLE = np.dtype(np.int64), np.dtype(np.uint64), np.dtype(np.float64)


def _copied_program(program, floats):
    """Checked copies of a program and its per-row floats: a caller
    changing its own arrays after the check cannot move an offset."""
    prog = field("program", program, _INT64, shape=(None, N_COLS)).copy()
    if prog.shape[0] == 0:
        raise ValueError("program has no rows")
    return prog, field("floats", floats, _DOUBLE, shape=(prog.shape[0], N_FLOATS)).copy()


def _check_rows(prog, floats, reg, int64_t n_params, int64_t n_aux, int64_t n_buffers):
    """``_check_row`` for every row; returns the widths of the activations'
    and the deltas' rows that the program needs (act_width, delta_width)."""
    # (two statements: Cython 3.3.0 compiles ``a = b = 0`` of untyped
    # names leaving b NULL, a segfault; tests/test_packaging.py)
    act_width = 0
    delta_width = 0
    for l in range(prog.shape[0]):
        _check_row(prog, floats, reg, l, n_params, n_aux, n_buffers)
        act_width = max(act_width, int(prog[l, ACT_OFF])
                        + _act_columns(int(prog[l, KIND]), int(prog[l, N_OUT])))
        delta_width = max(delta_width, int(prog[l, N_OUT]))
    return act_width, delta_width


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


def _check_address(address, kind, bint double):
    """ValueError unless ``address`` is a C entry point fastbp handed out
    (fastbp._numba: loss_cfunc, step_cfunc) of that kind and dtype: the
    engine calls whatever it points at.  Returns the update kernel's
    declaration (its slots and hyperparameters) for a step."""
    from fastbp._numba import ADDRESSES
    from fastbp._numba.optim import SPECS
    dtype = "float64" if double else "float32"
    known = ADDRESSES.get(address) if isinstance(address, int) else None
    if known is None or known[0] != kind or known[2] != dtype:
        where = "losses.loss_cfunc" if kind == "loss" else "optim.step_cfunc"
        raise ValueError(f"{kind}_addr must be an address from fastbp._numba.{where}(name, "
                         f"{dtype!r}), not {address!r}")
    return SPECS[known[1]] if kind == "step" else None


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
        Machine code cannot be checked, so only addresses those handed out
        are taken (fastbp._numba.ADDRESSES), of this kind and params'
        dtype, and n_slots and n_hyper must be the update's own.
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
        self.rng = field("rng", rng, _UINT64, shape=(1,), writable=True)
        self.hyper = field("hyper", hyper, _DOUBLE, size=int(n_hyper))
        seg = field("segments", segments, _INT64, shape=(None, 2))
        # start > n_params - length, not start + length > n_params: the sum
        # of two hostile int64s wraps around (2**63 - 1 passed as negative)
        if seg.size and (np.any(seg < 0) or np.any(seg[:, 0] > self.n_params - seg[:, 1])):
            raise ValueError(f"segments must lie inside [0, {self.n_params})")
        self.segments = seg
        # an array first: a list has no shape to compare (an AttributeError)
        grad_norms = field("grad_norms", grad_norms, _DOUBLE, writable=True)
        if grad_norms.shape not in ((0,), (self.n_layers,)):
            raise ValueError(f"grad_norms must have 0 or {self.n_layers} entries")
        self.grad_norms = grad_norms
        self.reg_per_weight = bool(reg_per_weight)
        self.clip_value = real("clip_value", clip_value, 0.0, np.inf)
        self.clip_norm = real("clip_norm", clip_norm, 0.0, np.inf)
        for name, addr in (("loss_addr", loss_addr), ("step_addr", step_addr)):
            if not isinstance(addr, int) or not 0 < addr < 2 ** 64:
                raise ValueError(f"{name} must be a C address (a positive int), not {addr!r}")
        _check_address(loss_addr, "loss", self.is_double)
        spec = _check_address(step_addr, "step", self.is_double)
        if n_slots != len(spec.slots) or n_hyper != len(spec.hyper):
            raise ValueError(f"n_slots and n_hyper must be the update kernel's ("
                             f"{len(spec.slots)}, {len(spec.hyper)}), not {n_slots}, {n_hyper}")
        self.loss_addr, self.step_addr = loss_addr, step_addr
        self.loss_which = softmax_which(self.loss_addr, self.is_double)
        if self.loss_which >= 0:
            # each row's loss term, for steps in row ranges
            self.terms = <double*>malloc(self.batch_size * sizeof(double))
            if self.terms == NULL:
                raise MemoryError()

    def __dealloc__(self):
        free(self.terms)
        free(self.bn_scratch)

    def set_comm(self, *, allreduce, ptr_handles, comm, op_sum, type_float, type_double,
                 in_place, success, rank, n_ranks, sharded, sync_batchnorm=False,
                 sync_every=1):
        """Train data-parallel over ``n_ranks`` MPI ranks, as rank ``rank``:
        each step adds the ranks' shares of the gradient and loss with one
        MPI_Allreduce(SUM) at ``allreduce`` (its C address in the MPI library
        the process loaded, as fastbp.distributed looked it up: no other is
        taken, as for loss_addr) on the communicator
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
        from fastbp._numba import ADDRESSES
        if ADDRESSES.get(allreduce, ("",))[0] != "allreduce":
            # the engine calls it: only MPI_Allreduce as fastbp.distributed found it
            raise ValueError("allreduce must be MPI_Allreduce's address as "
                             "fastbp.distributed looks it up, not an address of another kind")
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
        self.sync_bn = bool(sync_batchnorm)
        if isinstance(sync_every, bool) or not isinstance(sync_every, int) or \
                not 1 <= sync_every < 2 ** 62:
            raise ValueError(f"sync_every must be a positive int, not {sync_every!r}")
        self.sync_every = sync_every
        if self.sync_bn and self.bn_scratch == NULL:
            prog = np.asarray(self.program)
            widest = max([int(r[N_OUT]) for r in prog if r[KIND] == BATCHNORM] + [1])
            self.bn_scratch = <double*>malloc(2 * widest * sizeof(double))
            if self.bn_scratch == NULL:
                raise MemoryError()

    @property
    def comm_error(self):
        """The MPI error code of the first failed allreduce (0: none)."""
        return self.comm.error

    def _check_program(self, program, floats, reg):
        # Copies: a caller changing its own arrays after the check cannot move
        # an offset or put a penalty on a row that is not dense.
        prog, self.floats = _copied_program(program, floats)
        self.n_layers = prog.shape[0]
        reg = field("reg", reg, _DOUBLE, shape=(self.n_layers, N_REG)).copy()
        self.reg = reg
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
        if not isinstance(params, np.ndarray) or params.dtype not in FLOATS:
            raise ValueError("params must be a float32 or float64 numpy array")
        dtype = params.dtype
        self.params = field("params", params, dtype, shape=(None,), writable=True)
        self.n_params = params.shape[0]
        self.grad = field("grad", grad, dtype, shape=(self.n_params,), writable=True)
        self.aux = field("aux", aux, dtype, shape=(None,), writable=True)
        self.buffers = field("buffers", buffers, dtype, shape=(None,), writable=True)
        n_slots, batch = int(n_slots), int(batch)
        if batch < 1 or n_slots < 0:
            raise ValueError(f"batch_size must be >= 1 and n_slots >= 0, not {batch}, {n_slots}")
        act_width, delta_width = _check_rows(prog, floats, reg, self.n_params, aux.shape[0],
                                             buffers.shape[0])
        self.acts = field("acts", acts, dtype, size=batch * act_width, writable=True)
        self.batch_size = batch   # now at most acts' length
        self.deltas = field("deltas", deltas, dtype, size=2 * batch * delta_width,
                             writable=True)
        self.xb = field("xb", xb, dtype, size=batch * int(self.n_features), writable=True)
        self.yb = field("yb", yb, dtype, size=batch * int(self.n_outputs), writable=True)
        self.wb = field("wb", wb, dtype, size=batch, writable=True)
        self.opt_state = field("opt_state", opt_state, dtype, size=n_slots * int(self.n_params),
                                writable=True)
        self.is_double = dtype == _DOUBLE


#: bound on the optimizer step count (t < MAX_STEPS): the counter of every
#: step stays exact in the float64 an update kernel computes with (beta **
#: t); the optimizers' t (fastbp._optimizer) is held to it too
cdef int64_t _MAX_STEPS = 1LL << 53
MAX_STEPS = _MAX_STEPS


cdef _check_call(EngineState state, int64_t n, int64_t d, int64_t k, int64_t y_rows,
                 int64_t w_rows, const int64_t[::1] order, int64_t first, int64_t count,
                 bint gather, int64_t n_losses, int64_t step0):
    """ValueError unless a train_batches call's arrays fit the state, its
    batches (and, when gathering, their rows' indices) lie inside X, and
    its steps' counters step0 + 1 .. step0 + count lie in 1 .. MAX_STEPS."""
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
    # (the count after the call, step0 + steps, must stay below 2**53 too:
    # the optimizers and the file format hold t to [0, 2**53))
    if step0 < 0 or step0 > _MAX_STEPS - 1 - count:
        raise ValueError(f"step0 must be in [0, 2**53 - 1 - n_batches] (the optimizer's step "
                         f"count before this call), got {step0} with {count} batches")
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
    X = field("X", X, dtype, shape=(None, None))
    Y = field("Y", Y, dtype, shape=(None, None))
    W = field("W", W, dtype, shape=(None,))
    order = field("order", order, _INT64, shape=(None,))
    batch_loss = field("batch_loss", batch_loss, _DOUBLE, shape=(None,), writable=True)
    return _train_batches(state, X, Y, W, order, _int64("first_batch", first_batch),
                          _int64("n_batches", n_batches), bool(gather),
                          _int64("step0", step0), batch_loss)


def _int64(name, value):
    """value as an int that fits int64; else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or \
            not -2 ** 63 <= value < 2 ** 63:
        raise ValueError(f"{name} must be an int64, not {value!r}")
    return int(value)


cdef int _average(EngineState state, floating* params, int64_t n, int64_t n_ranks) noexcept nogil:
    """params = the ranks' mean params (local SGD's averaging); an MPI
    error code, or 0."""
    cdef int64_t i
    cdef floating inv = <floating>(1.0 / n_ranks)
    if fbp_allreduce_sum(&state.comm, params, n, floating is double):
        return 1
    for i in range(n):
        params[i] *= inv
    return 0


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
                first_batch, n_batches, gather, batch_loss.shape[0], step0)
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
    cdef int64_t b, i, r, s, m, j, m_next, done = 0, steps = 0
    cdef int status = OK, ok
    global PHASE_STEPS
    cdef double loss, wsum, wl, scale, t_phase = 0.0
    cdef double red[2]
    cdef Share share
    cdef BNSync bn
    cdef int64_t m_all
    cdef bint dist = state.comm.allreduce != NULL, sharded = state.sharded
    # local SGD (sync_every = H > 1): each rank steps on its own rows, and
    # the ranks average their weights every H updates and at the call's end
    cdef bint local = dist and state.sync_every > 1
    cdef int64_t sync_every = state.sync_every
    cdef int64_t rank = state.rank, n_ranks = state.n_ranks
    cdef bint prof = profiling()
    cdef const floating* x0
    cdef floating* y0
    cdef floating* w0
    cdef floating* slots = ptr_or_null(opt_state)
    cdef floating* out_last
    cdef double* norms = &grad_norms[0] if grad_norms.shape[0] == program.shape[0] else NULL
    cdef bint clip = clip_value > 0 or clip_norm > 0 or norms != NULL
    cdef bint prefetch = (gather and not dist
                          and batch_size * (d + k) * <int64_t>sizeof(floating) <= PREFETCH_BYTES)
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
    rows.xb = ptr_or_null(xb)
    rows.yb = ptr_or_null(yb)
    rows.wb = ptr_or_null(wb)
    rows.params = &params[0]
    rows.acts = &acts[0]
    rows.g0 = &deltas[0]
    rows.loss_which = state.loss_which
    rows.terms = state.terms   # each row's loss term, for steps in row ranges
    share.bn = NULL
    if dist and state.sync_bn:
        # BatchNorm's statistics over the global batch: every rank has rows
        # in every batch (fastbp.distributed checks), so all take part
        bn.comm = &state.comm
        bn.scratch = state.bn_scratch
        share.bn = &bn
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
                bn.rows = m_all
            else:
                wsum = 0.0
                for r in range(m):
                    wsum += W[order[s + r]] if gather else W[s + r]
                m_all = m
                bn.rows = m
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
                        if prefetch and i + 1 < n_batches:
                            # the next batch's rows (their indices were checked)
                            m_next = n - s - batch_size
                            if m_next > batch_size:
                                m_next = batch_size
                            _prefetch_rows(<const char*>&X[0, 0], &order[s + batch_size],
                                           m_next, d * sizeof(floating))
                            _prefetch_rows(<const char*>&Y[0, 0], &order[s + batch_size],
                                           m_next, k * sizeof(floating))
                        _lap(prof, 0, &t_phase)
                    forward_all(program, x0, &params[0], &acts[0], NULL, m, floats, &rng[0],
                                ptr_or_null(aux), ptr_or_null(buffers), &share if dist else NULL)
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
                if dist and wl != 0 and wl != wsum and not local:
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
                                         &deltas[0], half, m, reg, floats, ptr_or_null(aux), True,
                                         m if local else m_all, share.bn if dist else NULL)
                _lap(prof, 3, &t_phase)
            if local:
                # this rank's own step; the batch's loss for the history is
                # the ranks' losses weighted by their share of its weight
                loss += penalize_op(program, reg, reg_per_weight, wl if wl != 0 else wsum,
                                    &params[0], &grad[0])
                _lap(prof, 4, &t_phase)
                red[0] = loss * wl / wsum
                if fbp_allreduce_sum(&state.comm, red, 1, 1) or state.comm.error:
                    status = COMM_FAILED
                    break
                loss = red[0]
                _lap(prof, 8, &t_phase)
                if not isfinite(loss):
                    batch_loss[b] = loss
                    status = LOSS_NONFINITE
                    _average(state, &params[0], n_params, n_ranks)
                    break
            else:
                if dist:
                    # the one collective of a step: the ranks' shares summed
                    red[0] = loss
                    if fbp_allreduce_sum(&state.comm, red, 1, 1) or \
                            fbp_allreduce_sum(&state.comm, &grad[0], n_params,
                                              floating is double) \
                            or state.comm.error:   # (also BatchNorm's, with sync_bn)
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
            if local:
                # each rank updated its own weights: a non-finite one on any
                # rank stops every rank
                red[1] = 0.0 if ok else 1.0
                if fbp_allreduce_sum(&state.comm, &red[1], 1, 1):
                    status = COMM_FAILED
                    break
                ok = red[1] == 0
            if not ok:
                status = PARAMS_NONFINITE
                break
            done += 1
            steps += 1
            if local and (steps % sync_every == 0 or i == n_batches - 1):
                if _average(state, &params[0], n_params, n_ranks):
                    status = COMM_FAILED
                    break
    return done, steps, status
