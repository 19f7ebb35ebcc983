"""The engine's per-layer ops (fastbp._ext.engine_ops, and softmax_rows in
fastbp._ext.losses) against their twins in fastbp.reference, name for name:
values in float32 and float64, gradients by finite differences in float64,
softmax_rows at every instruction-set level, and bad arguments refused with
a ValueError before any compiled code runs.

Each ``def`` tested here runs the cdef function the engine's step calls
(engine_ops.pyx: ``*_op``; losses.h: ``LS(softmax_rows)``), so a difference
here is a difference in training."""
import numpy as np
import pytest

from fastbp import reference
from fastbp._ext import dense, engine, engine_ops
from fastbp._ext import losses as c_losses
from fastbp._ext.engine import (B_OFF, KIND, L1, L2, N_COLS, N_IN, N_OUT, N_REG, TRAINABLE,
                                W_OFF, Kind, Loss)

from helpers import DTYPES, adversarial, assert_close

ISAS = list(range(dense.small_gemm_isa() + 1))


def _finite_difference(f, x, h=1e-6):
    """d f / d x by central differences (f: array -> float, x float64)."""
    out = np.zeros_like(x)
    flat, grad = x.reshape(-1), out.reshape(-1)
    for i in range(flat.size):
        keep = flat[i]
        flat[i] = keep + h
        up = f(x)
        flat[i] = keep - h
        down = f(x)
        flat[i] = keep
        grad[i] = (up - down) / (2 * h)
    return out


def _assert_fd(analytic, numeric):
    # central differences in float64: error about h^2 f''' + eps f / h
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-7)


# --- dropout -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rate", [0.0, 0.3, 0.9])
@pytest.mark.parametrize("shape", [(7, 5), (1, 1), (0, 3), (33,)])
def test_dropout_forward_matches_reference(rng, dtype, rate, shape):
    x = rng.normal(size=shape).astype(dtype)
    c_kernel, c_ref = np.array([987654321], np.uint64), np.array([987654321], np.uint64)
    for _ in range(2):   # the counter carries over from call to call
        out, mask = engine_ops.dropout_forward(x, rate, c_kernel)
        out_ref, mask_ref = reference.dropout_forward(x, rate, c_ref)
        assert out.dtype == mask.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(mask, mask_ref)
        assert_close(out, out_ref, dtype)
        assert c_kernel[0] == c_ref[0]
    assert set(np.unique(mask)) <= {0, np.dtype(dtype).type(1 / (1 - rate))}


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_backward_matches_reference_and_finite_differences(rng, dtype):
    x = rng.normal(size=(6, 4)).astype(dtype)
    g = rng.normal(size=(6, 4)).astype(dtype)
    _, mask = engine_ops.dropout_forward(x, 0.4, np.array([5], np.uint64))
    assert_close(engine_ops.dropout_backward(g, mask), reference.dropout_backward(g, mask), dtype)
    if dtype == "float64":
        # L(x) = sum(g * dropout(x)) with the same draws
        loss = lambda v: float(np.sum(g * engine_ops.dropout_forward(v, 0.4,
                                                                 np.array([5], np.uint64))[0]))
        _assert_fd(engine_ops.dropout_backward(g, mask), _finite_difference(loss, x.copy()))


# --- residual add, activity penalty -------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_add_matches_reference(rng, dtype):
    x, skip = rng.normal(size=(2, 9, 3)).astype(dtype)
    assert_close(engine_ops.residual_add(x, skip), reference.residual_add(x, skip), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_activity_penalty_matches_reference_and_finite_differences(rng, dtype):
    a = rng.normal(size=(10, 7)).astype(dtype)
    a[0, :3] = 0   # sign(0) = 0 on both sides
    g0 = rng.normal(size=(10, 7)).astype(dtype)
    g, g_ref = g0.copy(), g0.copy()
    value = engine_ops.activity_penalty(a, g, 0.3)
    value_ref = reference.activity_penalty(a, g_ref, 0.3)
    assert value == pytest.approx(value_ref, rel=1e-12)
    assert_close(g, g_ref, dtype)
    if dtype == "float64":
        a[0, :3] = 0.5   # |a| has no derivative at 0
        g = np.zeros_like(a)
        engine_ops.activity_penalty(a, g, 0.3)
        numeric = _finite_difference(
            lambda v: engine_ops.activity_penalty(v, np.zeros_like(v), 0.3), a.copy())
        _assert_fd(g, numeric)


# --- batch normalization ---------------------------------------------------------

def _bn_inputs(rng, dtype, m=9, w=5):
    x = (rng.normal(size=(m, w)) * 3 + 1).astype(dtype)
    gamma, beta = rng.normal(size=(2, w)).astype(dtype)
    running = [rng.normal(size=w).astype(dtype), rng.uniform(0.5, 2, size=w).astype(dtype)]
    return x, gamma, beta, running


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_forward_matches_reference(rng, dtype, training):
    x, gamma, beta, (rm, rv) = _bn_inputs(rng, dtype)
    rm_ref, rv_ref = rm.copy(), rv.copy()
    y, xhat, inv = engine_ops.batchnorm_forward(x, gamma, beta, rm, rv, 1e-5, 0.1, training)
    y_ref, xhat_ref, inv_ref = reference.batchnorm_forward(x, gamma, beta, rm_ref, rv_ref, 1e-5,
                                                           0.1, training)
    for ours, theirs in ((y, y_ref), (xhat, xhat_ref), (inv, inv_ref), (rm, rm_ref),
                         (rv, rv_ref)):
        assert ours.dtype == np.dtype(dtype)
        assert_close(ours, theirs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_backward_matches_reference(rng, dtype, training):
    x, gamma, beta, (rm, rv) = _bn_inputs(rng, dtype)
    _, xhat, inv = reference.batchnorm_forward(x, gamma, beta, rm, rv, 1e-5, 0.1, training)
    g = rng.normal(size=x.shape).astype(dtype)
    ours = engine_ops.batchnorm_backward(g, xhat, inv, gamma, training)
    theirs = reference.batchnorm_backward(g, xhat, inv, gamma, training)
    for a, b in zip(ours, theirs):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_backward_is_the_gradient_of_forward(rng, training):
    x, gamma, beta, (rm, rv) = _bn_inputs(rng, "float64", m=6, w=3)
    r = rng.normal(size=x.shape)

    def loss(x_, gamma_, beta_):   # running statistics untouched between calls
        y = engine_ops.batchnorm_forward(x_, gamma_, beta_, rm.copy(), rv.copy(), 1e-3, 0.1,
                                     training)[0]
        return float(np.sum(r * y))

    _, xhat, inv = engine_ops.batchnorm_forward(x, gamma, beta, rm.copy(), rv.copy(), 1e-3, 0.1,
                                            training)
    dgamma, dbeta, dx = engine_ops.batchnorm_backward(r, xhat, inv, gamma, training)
    _assert_fd(dx, _finite_difference(lambda v: loss(v, gamma, beta), x.copy()))
    _assert_fd(dgamma, _finite_difference(lambda v: loss(x, v, beta), gamma.copy()))
    _assert_fd(dbeta, _finite_difference(lambda v: loss(x, gamma, v), beta.copy()))


# --- weight penalties and gradient clipping over a program ------------------------

def _program(rows):
    """A program of dense rows (n_in, n_out, trainable) packed W then b, and
    optionally a BatchNorm and a Dropout row: only the columns these ops read."""
    program, off = np.zeros((len(rows), N_COLS), np.int64), 0
    for l, (kind, n_in, n_out, trainable) in enumerate(rows):
        program[l, KIND], program[l, N_IN], program[l, N_OUT] = kind, n_in, n_out
        program[l, TRAINABLE] = trainable
        size = (n_in * n_out if kind == Kind.DENSE else n_out if kind == Kind.BATCHNORM else 0)
        program[l, W_OFF], program[l, B_OFF] = off, off + size
        off += size + (n_out if kind in (Kind.DENSE, Kind.BATCHNORM) else 0)
    return program, off


_ROWS = [(Kind.DENSE, 5, 7, 1), (Kind.BATCHNORM, 7, 7, 1), (Kind.DROPOUT, 7, 7, 0),
         (Kind.DENSE, 7, 3, 0), (Kind.DENSE, 3, 2, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_weight", [False, True])
@pytest.mark.parametrize("l1", [0.0, 0.02])
def test_penalize_matches_reference_and_finite_differences(rng, dtype, per_weight, l1):
    program, n = _program(_ROWS)
    reg = np.zeros((len(_ROWS), N_REG))
    reg[[0, 3, 4], L2] = 0.1   # row 3 is frozen: no penalty
    reg[[0, 3, 4], L1] = l1
    params = rng.normal(size=n).astype(dtype)
    w = rng.uniform(0.5, 2, size=11).astype(dtype)
    grad0 = rng.normal(size=n).astype(dtype)
    grad, grad_ref = grad0.copy(), grad0.copy()
    value = engine_ops.penalize(program, reg, per_weight, w, params, grad)
    value_ref = reference.penalize(program, reg, per_weight, w, params, grad_ref)
    assert value == pytest.approx(value_ref, rel=1e-5 if dtype == "float32" else 1e-12)
    assert_close(grad, grad_ref, dtype)
    if dtype == "float64":
        added = grad - grad0
        numeric = _finite_difference(
            lambda p: engine_ops.penalize(program, reg, per_weight, w, p, np.zeros(n)),
            params.copy())
        _assert_fd(added, numeric)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip", [(0.0, 0.0), (0.3, 0.0), (0.0, 1.5), (0.3, 1.5), (0.0, 1e6)])
def test_clip_and_measure_matches_reference(rng, dtype, clip):
    program, n = _program(_ROWS)
    grad = rng.normal(size=n).astype(dtype)
    grad_ref = grad.copy()
    norms = engine_ops.clip_and_measure(program, grad, *clip)
    norms_ref = reference.clip_and_measure(program, grad_ref, *clip)
    assert norms.dtype == np.float64 and norms.shape == (len(_ROWS),)
    assert_close(norms, norms_ref, dtype)
    assert_close(grad, grad_ref, dtype)
    assert norms[2] == norms[3] == 0   # dropout, frozen


# --- the softmax losses by row range ---------------------------------------------

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", [Loss.SK_LOG_LOSS, Loss.CROSS_ENTROPY])
@pytest.mark.parametrize("lo, hi", [(0, 13), (3, 11), (5, 5)])
def test_softmax_rows_matches_reference_at_every_isa(rng, isa, dtype, which, lo, hi):
    m, k = 13, 6
    Z = (rng.normal(size=(m, k)) * 4).astype(dtype)
    Y = np.eye(k, dtype=dtype)[rng.integers(0, k, m)]
    Y[1] = rng.uniform(0, 1, k)   # soft targets, summing to other than 1
    w = rng.uniform(0.2, 2, size=m).astype(dtype)
    scale = 1 / w.sum(dtype=np.float64)
    G, G_ref = np.full((m, k), 7, dtype), np.full((m, k), 7, dtype)
    terms = c_losses.softmax_rows(which, Z, Y, w, G, lo, hi, scale, isa)
    terms_ref = reference.softmax_rows(which, Z, Y, w, G_ref, lo, hi, scale)
    assert terms.shape == (hi - lo,)
    assert_close(terms, terms_ref, dtype)
    assert_close(G, G_ref, dtype)
    assert (G[:lo] == 7).all() and (G[hi:] == 7).all()   # other rows untouched


@pytest.mark.parametrize("which", [Loss.SK_LOG_LOSS, Loss.CROSS_ENTROPY])
def test_softmax_rows_gradient_is_the_losss(rng, which):
    m, k = 5, 4
    Z = rng.normal(size=(m, k))
    Y = np.eye(k)[rng.integers(0, k, m)]
    w = rng.uniform(0.2, 2, size=m)
    scale = 1 / w.sum()
    G = np.empty((m, k))
    c_losses.softmax_rows(which, Z, Y, w, G, 0, m, scale)
    loss = lambda z: scale * float(np.sum(c_losses.softmax_rows(which, z, Y, w,
                                                               np.empty((m, k)), 0, m, scale)))
    _assert_fd(G, _finite_difference(loss, Z.copy()))


# --- arguments are checked before any compiled code runs ------------------------------

def _bad_calls():
    f32, f64 = np.ones((4, 3), np.float32), np.ones((4, 3))
    counter = np.zeros(1, np.uint64)
    program, n = _program(_ROWS)
    reg = np.zeros((len(_ROWS), N_REG))
    far = program.copy()
    far[4, W_OFF] = n   # its W would run past the end of params
    reg_far = reg.copy()
    reg_far[4, L2] = 1.0
    reg_bn = reg.copy()
    reg_bn[1, L2] = 1.0
    v3, v4 = np.ones(3), np.ones(4)
    Y = np.eye(3)[[0, 1, 2, 0]]
    return {
        "list input": lambda: engine_ops.dropout_forward([1.0, 2.0], 0.5, counter),
        "int dtype": lambda: engine_ops.residual_add(np.ones(3, int), np.ones(3, int)),
        "mixed dtypes": lambda: engine_ops.residual_add(f32, f64),
        "shape mismatch": lambda: engine_ops.dropout_backward(f64, np.ones((3, 4))),
        "not contiguous": lambda: engine_ops.residual_add(np.ones((4, 6))[:, ::2], f64),
        "rate 1": lambda: engine_ops.dropout_forward(f64, 1.0, counter),
        "rate nan": lambda: engine_ops.dropout_forward(f64, float("nan"), counter),
        "rate None": lambda: engine_ops.dropout_forward(f64, None, counter),
        "clip_norm str": lambda: engine_ops.clip_and_measure(program, np.ones(n), 0.0, "1"),
        "counter int64": lambda: engine_ops.dropout_forward(f64, 0.5, np.zeros(1, np.int64)),
        "counter shape": lambda: engine_ops.dropout_forward(f64, 0.5, np.zeros(2, np.uint64)),
        "read-only g": lambda: engine_ops.activity_penalty(f64, _read_only(f64), 0.1),
        "negative c": lambda: engine_ops.activity_penalty(f64, f64.copy(), -1.0),
        "bn one row": lambda: engine_ops.batchnorm_forward(np.ones((1, 3)), v3, v3, v3.copy(),
                                                       v3.copy(), 1e-5, 0.1, True),
        "bn width": lambda: engine_ops.batchnorm_forward(f64, v4, v3, v3, v3, 1e-5, 0.1, False),
        "bn momentum": lambda: engine_ops.batchnorm_forward(f64, v3, v3, v3, v3, 1e-5, 2.0, False),
        "bn backward width": lambda: engine_ops.batchnorm_backward(f64, f64, v4, v3, True),
        "program dtype": lambda: engine_ops.clip_and_measure(program.astype(np.int32), np.ones(n)),
        "program width": lambda: engine_ops.clip_and_measure(program[:, :5].copy(), np.ones(n)),
        "clip span": lambda: engine_ops.clip_and_measure(far, np.ones(n)),
        "short grad": lambda: engine_ops.clip_and_measure(program, np.ones(n - 1)),
        "penalty span": lambda: engine_ops.penalize(far, reg_far, False, v3, np.ones(n),
                                                np.ones(n)),
        "penalty on batchnorm": lambda: engine_ops.penalize(program, reg_bn, False, v3, np.ones(n),
                                                        np.ones(n)),
        "reg shape": lambda: engine_ops.penalize(program, reg[:2], False, v3, np.ones(n),
                                             np.ones(n)),
        "no weights": lambda: engine_ops.penalize(program, reg, True, np.ones(0), np.ones(n),
                                              np.ones(n)),
        "softmax which": lambda: c_losses.softmax_rows(7, f64, Y, v4, f64.copy(), 0, 4, 0.25),
        "softmax range": lambda: c_losses.softmax_rows(Loss.CROSS_ENTROPY, f64, Y, v4,
                                                       f64.copy(), 2, 5, 0.25),
        "softmax w": lambda: c_losses.softmax_rows(Loss.CROSS_ENTROPY, f64, Y, v3, f64.copy(),
                                                   0, 4, 0.25),
        "softmax dtype": lambda: c_losses.softmax_rows(Loss.CROSS_ENTROPY, f64, Y, v4,
                                                       f32.copy(), 0, 4, 0.25),
    }


def _read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_bad_arguments_are_a_value_error(name):
    with pytest.raises(ValueError):
        _bad_calls()[name]()


def test_hostile_calls_return_or_raise_value_error():
    """A few trials of tests/adversarial/engine_kernels.py (in a child
    interpreter: a crash there is a failure here, not the end of the run)."""
    engine_kernels = adversarial("engine_kernels")
    counts, failures = engine_kernels.run(60, seed=1)
    assert not failures, failures[:10]
    assert sum(counts.values()) == 60 and set(counts) <= {"returned", "refused"}


# ---------------------------------------------------------------------------
# EngineState: what train_batches reads and writes across a fit, checked once.

def _state_args(dtype=np.float64, batch=8):
    """A valid EngineState's keyword arguments (a model with every row
    kind: dense with DropConnect, dropout, BatchNorm, a residual block) and
    a valid train_batches call on it (4 shuffled batches)."""
    import fastbp
    from fastbp._numba.losses import loss_cfunc
    from fastbp._numba.optim import step_cfunc
    net = fastbp.Sequential([fastbp.Dense(6, activation="relu", dropconnect=0.2),
                             fastbp.Dropout(0.3), fastbp.BatchNorm(),
                             fastbp.Residual([fastbp.Dense(6, activation="tanh")]),
                             fastbp.Dense(3)], seed=0, dtype=dtype)
    net.build(5)
    opt = fastbp.optim.Adam()
    ws = net._workspace(batch)
    kw = dict(program=net._program.copy(), floats=net._floats.copy(), reg=net._reg.copy(),
              reg_per_weight=False, params=net._params, grad=net._grad, acts=ws.acts,
              deltas=ws.deltas, xb=ws.xb, yb=ws.yb, wb=ws.wb, aux=net._aux,
              buffers=net._buffers, rng=net._dropout_rng,
              opt_state=opt._bind(net.n_params, dtype).reshape(-1), n_slots=opt._n_slots(),
              hyper=opt._hyper(), n_hyper=len(opt._spec.hyper), segments=net._segments(),
              loss_addr=loss_cfunc("cross_entropy", dtype), step_addr=step_cfunc(opt.kernel, dtype),
              batch_size=batch, clip_value=0.0, clip_norm=0.0, grad_norms=np.zeros(0))
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 5)).astype(dtype)
    Y = np.eye(3, dtype=dtype)[rng.integers(0, 3, 30)]
    call = [X, Y, np.ones(30, dtype), rng.permutation(30), 0, 4, True, 0, np.zeros(4)]
    return net, kw, call


def test_engine_state_trains_like_the_fit_it_was_built_for():
    net, kw, call = _state_args()
    state = engine.EngineState(**kw)
    before = net._params.copy()
    done, steps, status = engine.train_batches(state, *call)
    assert (done, steps, status) == (4, 4, engine.Status.OK)
    assert not np.array_equal(net._params, before)   # params are the model's, updated in place
    assert np.all(call[8] > 0)                      # batch_loss written


def _corrupt_row(col, value, row=0):
    def corrupt(kw):
        kw["program"][row, col] = value
    return corrupt


_BAD_STATES = {
    "unknown kind": _corrupt_row(KIND, 9),
    "W beyond params": _corrupt_row(engine.W_OFF, 10 ** 6),
    "negative b offset": _corrupt_row(B_OFF, -1),
    "width chain broken": _corrupt_row(N_IN, 7, row=1),
    "act offset beyond acts": _corrupt_row(engine.ACT_OFF, 2 ** 61),
    "DropConnect scratch beyond aux": _corrupt_row(engine.AUX_OFF, 10 ** 6),
    "BatchNorm statistics beyond buffers": _corrupt_row(engine.BUF_OFF, 10 ** 6, row=2),
    "residual partner out of range": _corrupt_row(engine.W_OFF, 99, row=3),
    "trainable dropout": _corrupt_row(TRAINABLE, 1, row=1),
    "penalty on a BatchNorm row": lambda kw: kw["reg"].__setitem__((2, L2), 1.0),
    "rate of 1": lambda kw: kw["floats"].__setitem__((1, engine.RATE), 1.0),
    "float32 grad": lambda kw: kw.update(grad=kw["grad"].astype(np.float32)),
    "short acts": lambda kw: kw.update(acts=kw["acts"][:-1].copy()),
    "read-only params": lambda kw: kw.update(params=_read_only(kw["params"])),
    "strided buffers": lambda kw: kw.update(buffers=np.repeat(kw["buffers"], 2)[::2]),
    "state for fewer slots": lambda kw: kw.update(n_slots=kw["n_slots"] + 1),
    "segment beyond params": lambda kw: kw.update(segments=np.array([[0, 10 ** 6]])),
    # start + length wrapped around in int64 and passed (a segfault)
    "segment whose end wraps around": lambda kw: kw.update(
        segments=np.array([[1, 2 ** 63 - 1]], dtype=np.int64)),
    "grad_norms of the wrong length": lambda kw: kw.update(grad_norms=np.zeros(2)),
    # (tests/adversarial/engine_state.py, trials 418 and 636: an AttributeError)
    "grad_norms a list": lambda kw: kw.update(grad_norms=kw["grad_norms"].tolist()),
    "batch larger than the workspace": lambda kw: kw.update(batch_size=9),
    "null loss address": lambda kw: kw.update(loss_addr=0),
    # the engine calls what an address points at: only fastbp's own entry
    # points, of the right kind and dtype, with the kernel's own slot count
    "an address fastbp did not hand out": lambda kw: kw.update(step_addr=kw["step_addr"] + 16),
    "a loss's address as the update": lambda kw: kw.update(step_addr=kw["loss_addr"]),
    "the float32 update on float64 parameters": lambda kw: kw.update(
        step_addr=__import__("fastbp._numba.optim", fromlist=["x"]).step_cfunc("adam",
                                                                              "float32")),
    "fewer slots than the update reads": lambda kw: kw.update(
        n_slots=kw["n_slots"] - 1, opt_state=kw["opt_state"][:-1].copy()),
    "fewer hyperparameters than the update reads": lambda kw: kw.update(
        n_hyper=0, hyper=np.zeros(0)),
}


@pytest.mark.parametrize("name", list(_BAD_STATES))
def test_engine_state_refuses_what_would_index_outside_an_array(name):
    _, kw, _ = _state_args()
    _BAD_STATES[name](kw)
    with pytest.raises(ValueError):
        engine.EngineState(**kw)


_BAD_CALLS = {
    "X of another width": (0, lambda c: c[0][:, :4].copy()),
    "float32 X": (0, lambda c: c[0].astype(np.float32)),
    "X not an array": (0, lambda c: c[0].tolist()),
    "Y of fewer rows": (1, lambda c: c[1][:29].copy()),
    "order with a row beyond X": (3, lambda c: np.where(c[3] == 0, 30, c[3])),
    "short order": (3, lambda c: c[3][:20].copy()),
    "batches beyond X": (5, lambda c: 5),
    "negative first batch": (4, lambda c: -1),
    "huge count": (5, lambda c: 2 ** 62),
    "too few loss slots": (8, lambda c: np.zeros(3)),
    "read-only batch_loss": (8, lambda c: _read_only(c[8])),
    # the step counter wrapped around in int64: Adam's bias correction then
    # divided by zero and the fit "diverged"
    "step counter beyond int64": (7, lambda c: 2 ** 63 - 1),
    "step counter beyond 2**53": (7, lambda c: 2 ** 53 - 3),
    # the count after the call would be 2**53, which no optimizer or file takes
    "step counter reaching 2**53": (7, lambda c: 2 ** 53 - 4),
    "negative step counter": (7, lambda c: -1),
}


@pytest.mark.parametrize("name", list(_BAD_CALLS))
def test_train_batches_refuses_arguments_that_do_not_fit_the_state(name):
    net, kw, call = _state_args()
    state = engine.EngineState(**kw)
    before = net._params.copy()
    i, bad = _BAD_CALLS[name]
    call[i] = bad(call)
    with pytest.raises(ValueError):
        engine.train_batches(state, *call)
    np.testing.assert_array_equal(net._params, before)   # refused before any step


def test_engine_state_keeps_its_arrays_alive_and_unresizable():
    import gc
    net, kw, call = _state_args()
    kw = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    acts = kw["acts"]
    state = engine.EngineState(**kw)
    with pytest.raises(ValueError, match="resize"):
        acts.resize(acts.size * 1000)    # the state holds a reference
    del kw, acts
    gc.collect()
    assert engine.train_batches(state, *call)[:2] == (4, 4)


def test_hostile_engine_states_return_or_raise_value_error():
    """A few trials of tests/adversarial/engine_state.py (in a child
    interpreter: a crash there is a failure here, not the end of the run)."""
    engine_state = adversarial("engine_state")
    counts, failures = engine_state.run(60, seed=1)
    assert not failures, failures[:10]
    assert sum(counts.values()) == 60 and set(counts) <= {"returned", "refused"}
    assert counts.get("returned", 0) > 0 and counts.get("refused", 0) > 0


def test_engine_state_keeps_its_own_copy_of_the_program():
    """The tables are checked once; changing the caller's arrays afterwards
    (a row's offset beyond params, a penalty on a BatchNorm row) must not
    reach the engine: it trains as an untouched twin does."""
    net, kw, call = _state_args()
    state = engine.EngineState(**kw)
    kw["program"][0, engine.W_OFF] = 10 ** 9
    kw["reg"][2, L2] = 1.0
    assert engine.train_batches(state, *call)[2] == engine.Status.OK
    twin, twin_kw, twin_call = _state_args()
    engine.train_batches(engine.EngineState(**twin_kw), *twin_call)
    assert net._params.tobytes() == twin._params.tobytes()


# ---------------------------------------------------------------------------
# Network: the checked program of predict and loss_and_grad.

def _network_args(dtype=np.float64, rows=8):
    net, kw, _ = _state_args(dtype)
    ws = net._inference_state()[4].take(rows, deltas=True)
    network = engine.Network(program=kw["program"], floats=kw["floats"], params=net._params,
                             buffers=net._buffers, n_aux=int(net._compiled.n_aux))
    X = np.random.default_rng(1).normal(size=(rows, 5)).astype(dtype)
    return net, network, ws, X


def test_network_predicts_and_takes_gradients_like_the_model():
    from fastbp._numba.losses import loss_cfunc
    net, network, ws, X = _network_args()
    out = np.empty((8, 3))
    engine.forward(network, X, ws.acts, out, 8, ws.aux)
    assert np.array_equal(out, net.predict(X))
    Y = np.eye(3)[[0, 1, 2, 0, 1, 2, 0, 1]]
    grad = np.zeros(net.n_params)
    value = engine.loss_grad(network, X, Y, np.ones(8), grad, ws.acts, ws.deltas,
                             loss_cfunc("cross_entropy", "float64"), net._reg, False, ws.aux)
    want, want_grad = net.loss_and_grad(X, Y, loss="cross_entropy")
    assert value == want and grad.tobytes() == want_grad.tobytes()


_BAD_NETWORKS = {
    "W beyond params": lambda kw: kw["program"].__setitem__((0, engine.W_OFF), 10 ** 12),
    "unknown kind": lambda kw: kw["program"].__setitem__((0, KIND), 9),
    "running statistics beyond buffers": lambda kw: kw["program"].__setitem__(
        (2, engine.BUF_OFF), 10 ** 6),
    "scratch too small": lambda kw: kw.update(n_aux=0),
    "negative scratch": lambda kw: kw.update(n_aux=-1),
    "buffers of another dtype": lambda kw: kw.update(buffers=kw["buffers"].astype(np.float32)),
}


@pytest.mark.parametrize("name", list(_BAD_NETWORKS))
def test_network_refuses_a_program_that_indexes_outside_its_arrays(name):
    net, network, _, _ = _network_args()
    kw = dict(program=net._program.copy(), floats=net._floats.copy(), params=net._params,
              buffers=net._buffers, n_aux=int(net._compiled.n_aux))
    _BAD_NETWORKS[name](kw)
    with pytest.raises(ValueError):
        engine.Network(**kw)


_BAD_FORWARDS = {
    # out narrower than the network's outputs: written past (found by an attack)
    "out too narrow": lambda a: a.update(out=np.empty((8, 1))),
    "out too short": lambda a: a.update(out=np.empty((2, 3))),
    "X too narrow": lambda a: a.update(X=a["X"][:, :2].copy()),
    "acts too small": lambda a: a.update(acts=a["acts"][:3].copy()),
    "chunk 0": lambda a: a.update(chunk=0),  # looped forever with the GIL released
    "negative chunk": lambda a: a.update(chunk=-5),
    "chunk beyond acts": lambda a: a.update(chunk=10 ** 6),
    "aux too small": lambda a: a.update(aux=a["aux"][:0].copy()),
    # (zeros of the new dtype: a cast of the unset scratch overflowed)
    "float32 X": lambda a: a.update(X=a["X"].astype(np.float32),
                                    acts=np.zeros(a["acts"].shape, np.float32),
                                    out=np.zeros(a["out"].shape, np.float32),
                                    aux=np.zeros(a["aux"].shape, np.float32)),
}


@pytest.mark.parametrize("name", list(_BAD_FORWARDS))
def test_forward_refuses_arrays_that_do_not_fit_the_network(name):
    _, network, ws, X = _network_args()
    args = dict(X=X, acts=ws.acts, out=np.empty((8, 3)), chunk=8, aux=ws.aux)
    _BAD_FORWARDS[name](args)
    with pytest.raises(ValueError):
        engine.forward(network, args["X"], args["acts"], args["out"], args["chunk"], args["aux"])


_BAD_LOSS_GRADS = {
    "grad too short": lambda a: a.update(grad=np.zeros(2)),
    "W shorter than X": lambda a: a.update(W=np.ones(3)),
    "Y too narrow": lambda a: a.update(Y=a["Y"][:, :1].copy()),
    "deltas too small": lambda a: a.update(deltas=a["deltas"][:4].copy()),
    "no rows": lambda a: a.update(X=a["X"][:0].copy(), Y=a["Y"][:0].copy(), W=np.ones(0)),
    "penalty on a BatchNorm row": lambda a: a["reg"].__setitem__((2, L2), 1.0),
    "negative penalty": lambda a: a["reg"].__setitem__((0, L2), -1.0),
    "reg of the wrong shape": lambda a: a.update(reg=np.zeros((2, 3))),
    "null loss address": lambda a: a.update(loss_addr=0),
    "an address fastbp did not hand out": lambda a: a.update(loss_addr=a["loss_addr"] + 8),
    "the float32 loss on float64 arrays": lambda a: a.update(
        loss_addr=__import__("fastbp._numba.losses", fromlist=["x"]).loss_cfunc(
            "cross_entropy", "float32")),
}


@pytest.mark.parametrize("name", list(_BAD_LOSS_GRADS))
def test_loss_grad_refuses_arrays_that_do_not_fit_the_network(name):
    from fastbp._numba.losses import loss_cfunc
    net, network, ws, X = _network_args()
    args = dict(X=X, Y=np.eye(3)[[0, 1, 2, 0, 1, 2, 0, 1]], W=np.ones(8),
                grad=np.zeros(net.n_params), acts=ws.acts, deltas=ws.deltas,
                loss_addr=loss_cfunc("cross_entropy", "float64"), reg=net._reg.copy(), aux=ws.aux)
    _BAD_LOSS_GRADS[name](args)
    with pytest.raises(ValueError):
        engine.loss_grad(network, args["X"], args["Y"], args["W"], args["grad"], args["acts"],
                         args["deltas"], args["loss_addr"], args["reg"], False, args["aux"])


def test_network_keeps_its_own_copy_of_the_program():
    net, network, ws, X = _network_args()
    program = net._program.copy()
    network = engine.Network(program=program, floats=net._floats, params=net._params,
                             buffers=net._buffers, n_aux=int(net._compiled.n_aux))
    program[0, engine.W_OFF] = 10 ** 12  # after the check: must not reach the engine
    out = np.empty((8, 3))
    engine.forward(network, X, ws.acts, out, 8, ws.aux)
    assert np.array_equal(out, net.predict(X))


# ---------------------------------------------------------------------------
# The unchecked kernels behind the checked ops are Python-callable too: each
# refuses arrays too short for what it touches (they wrote past them).

def _bad_kernel_calls():
    from fastbp._ext import engine_ops as eo
    from fastbp._ext import losses as ls
    one, u = np.ones(1000), np.zeros(1, np.uint64)
    net, _, _ = _state_args()
    prog = net._program.copy()
    reg = np.zeros((prog.shape[0], engine.N_REG))
    reg[0, L2] = 1.0
    return {
        "residual_add, short out": lambda: eo._kernel_residual_add(one, one, np.empty(4)),
        "residual_add, short skip": lambda: eo._kernel_residual_add(one, np.ones(3), np.empty(1000)),
        "dropout_forward, short out": lambda: eo._kernel_dropout_forward(
            one, np.empty(4), np.empty(1000), 0.5, u),
        "dropout_forward, no counter": lambda: eo._kernel_dropout_forward(
            one, np.empty(1000), np.empty(1000), 0.5, np.zeros(0, np.uint64)),
        "dropout_backward, short mask": lambda: eo._kernel_dropout_backward(
            one, np.ones(2), np.empty(1000)),
        "activity_penalty, short g": lambda: eo._kernel_activity_penalty(one, np.empty(3), 10, 0.1),
        "activity_penalty, no rows": lambda: eo._kernel_activity_penalty(one, np.empty(1000), 0, 0.1),
        "batchnorm_forward, small out": lambda: eo._kernel_batchnorm_forward(
            np.ones((50, 20)), np.empty((1, 1)), np.empty((1, 1)), np.empty(1), np.ones(1),
            np.ones(1), np.empty(1), 0.1, 1e-5, True),
        "batchnorm_backward, short dgamma": lambda: eo._kernel_batchnorm_backward(
            np.ones((5, 20)), np.ones((5, 20)), np.ones(20), np.ones(20), np.empty(1),
            np.empty(20), np.empty((5, 20)), True),
        "penalize, W beyond params": lambda: eo._kernel_penalize(
            prog, reg, False, np.ones(4), np.ones(5), np.zeros(5)),
        "clip_and_measure, grad too short": lambda: eo._kernel_clip_and_measure(
            prog, np.ones(5), 1.0, 0.0, np.zeros(prog.shape[0])),
        "softmax_rows, hi beyond the rows": lambda: ls._kernel_softmax_rows(
            0, np.ones((4, 3)), np.ones((4, 3)), np.ones(4), np.empty((4, 3)), 0, 10 ** 6, 1.0,
            np.empty(4), -1),
        "softmax_rows, lo below 0": lambda: ls._kernel_softmax_rows(
            0, np.ones((4, 3)), np.ones((4, 3)), np.ones(4), np.empty((4, 3)), -20, 2, 1.0,
            np.empty(4), -1),
        "softmax_rows, unknown loss": lambda: ls._kernel_softmax_rows(
            7, np.ones((4, 3)), np.ones((4, 3)), np.ones(4), np.empty((4, 3)), 0, 4, 1.0,
            np.empty(4), -1),
    }


@pytest.mark.parametrize("name", list(_bad_kernel_calls()))
def test_unchecked_kernels_refuse_arrays_too_short(name):
    with pytest.raises(ValueError):
        _bad_kernel_calls()[name]()


@pytest.mark.parametrize("dtype", [np.int32, np.float16, "complex128"])
def test_entry_points_exist_for_float32_and_float64_only(dtype):
    from fastbp._numba.losses import loss_cfunc
    from fastbp._numba.optim import step_cfunc
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        loss_cfunc("mse", dtype)
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        step_cfunc("adam", dtype)


@pytest.mark.parametrize("address", ["a loss's", "any other"])
def test_set_comm_takes_only_the_allreduce_fastbp_looked_up(address):
    """The engine calls the allreduce address each step: 0xdeadbeef was taken
    (a segfault at the first step), and so was a loss's address."""
    from fastbp._numba.losses import loss_cfunc
    _, kw, _ = _state_args()
    state = engine.EngineState(**kw)
    addr = loss_cfunc("mse", "float64") if address == "a loss's" else 0xDEADBEEF
    with pytest.raises(ValueError, match="MPI_Allreduce's address"):
        state.set_comm(allreduce=addr, ptr_handles=False, comm=0, op_sum=0, type_float=0,
                       type_double=0, in_place=0, success=0, rank=0, n_ranks=2, sharded=False)
