"""Sequential: layout, training against the reference, worked examples."""
import numpy as np
import pytest

import fastbp
from fastbp import reference
from fastbp.model import DivergenceError, NotBuiltError

from helpers import DTYPES, assert_close


def _net(dtype="float64", seed=0, widths=(8, 6), act="tanh", n_out=3):
    layers = [fastbp.Dense(w, activation=act) for w in widths] + [fastbp.Dense(n_out)]
    return fastbp.Sequential(layers, dtype=dtype, seed=seed)


def _classification(rng, n=64, d=5, k=3, dtype="float64"):
    X = rng.normal(size=(n, d)).astype(dtype)
    y = rng.integers(0, k, n)
    return X, y


def test_params_are_one_flat_vector_with_layer_views():
    net = _net().build(5)
    assert net.params.ndim == 1 and net.params.size == 5 * 8 + 8 + 8 * 6 + 6 + 6 * 3 + 3
    for layer in net.layers:
        assert np.shares_memory(layer.W, net.params) and np.shares_memory(layer.b, net.params)
    net.layers[1].W[0, 0] = 42.0
    assert 42.0 in net.params
    net.params[:] = 0
    assert not net.layers[0].W.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_is_preserved_end_to_end(rng, dtype):
    X, y = _classification(rng)
    net = _net(dtype)
    net.fit(X, y, loss="cross_entropy", epochs=1, verbose=0)
    assert net.params.dtype == dtype
    assert net.predict(X).dtype == dtype
    assert net.predict(X.astype("float64")).dtype == dtype
    assert net.loss_and_grad(X, y, loss="cross_entropy")[1].dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", ["mse", "binary_cross_entropy", "cross_entropy"])
def test_loss_and_grad_matches_reference(rng, dtype, loss):
    X = rng.normal(size=(40, 5)).astype(dtype)
    net = _net(dtype, act="relu").build(5)
    if loss == "cross_entropy":
        y = rng.integers(0, 3, 40)
        Y = np.eye(3, dtype=dtype)[y]
    elif loss == "binary_cross_entropy":
        y = Y = rng.integers(0, 2, size=(40, 3)).astype(dtype)
    else:
        y = Y = rng.normal(size=(40, 3)).astype(dtype)
    value, grad = net.loss_and_grad(X, y, loss=loss)
    value_ref, grad_ref = reference.loss_grad(X, Y, net._program, net.params, loss)
    assert_close(value, value_ref, dtype)
    assert_close(grad, grad_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_predict_matches_reference_forward(rng, dtype):
    X = rng.normal(size=(3000, 5)).astype(dtype)  # several predict chunks
    net = _net(dtype, act="sigmoid").build(5)
    assert_close(net.predict(X), reference.forward(X, net._program, net.params), dtype)


def _reference_training(net, X, Y, loss, batch_size, epochs, opt_ref):
    """Train a copy of net's parameters with fastbp.reference, no shuffling."""
    params = net.params.copy()
    order = np.arange(X.shape[0])
    for _ in range(epochs):
        reference.train_batches(X, Y, order, batch_size, net._program, params, loss, opt_ref)
    return params


def _reference_adam(n, dtype, lr):
    m, v = np.zeros(n, dtype), np.zeros(n, dtype)
    t = [0]

    def step(p, g):
        t[0] += 1
        reference.adam_step(p, g, m, v, None, t[0], lr, 0.9, 0.999, 1e-8, 0.0, False, False)
    return step


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_size", [1, 16, 50, None])
def test_fit_matches_reference_training(rng, dtype, batch_size):
    X, y = _classification(rng, n=50, dtype=dtype)
    net = _net(dtype).build(5)
    Y = np.eye(3, dtype=dtype)[y]
    expected = _reference_training(net, X, Y, "cross_entropy", batch_size or 50, 2,
                                   _reference_adam(net.n_params, dtype, 1e-2))
    net.fit(X, y, loss="cross_entropy", optimizer=fastbp.optim.Adam(lr=1e-2), epochs=2,
            batch_size=batch_size, shuffle=False, verbose=0)
    # float32 runs drift by rounding over 2 epochs of up to 100 steps.
    if dtype == "float32":
        np.testing.assert_allclose(net.params, expected, rtol=0, atol=2e-4)
    else:
        assert_close(net.params, expected, dtype)


def test_epoch_loss_is_the_mean_of_batch_losses(rng):
    X, y = _classification(rng, n=50)
    net = _net().build(5)
    net2 = _net().build(5)
    net.fit(X, y, loss="cross_entropy", optimizer=fastbp.optim.SGD(lr=0.0), epochs=1,
            batch_size=50, shuffle=False, verbose=0)
    assert net.history["loss"][0] == pytest.approx(net2.evaluate(X, y, loss="cross_entropy"),
                                                   rel=1e-12)


def test_xor_network_learns_xor():
    """The classic: 3 inputs (two bits and a constant 1), 4 sigmoid hidden
    units, 1 sigmoid output, squared error, full-batch gradient descent."""
    X = np.array([[0, 0, 1], [0, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=float)
    y = np.array([0, 1, 1, 0], dtype=float)
    net = fastbp.Sequential([fastbp.Dense(4, activation="sigmoid"),
                             fastbp.Dense(1, activation="sigmoid")], dtype="float64", seed=1)
    before = net.evaluate(X, y, loss="mse") if net.built else None
    hist = net.fit(X, y, loss="mse", optimizer=fastbp.optim.SGD(lr=2.0, momentum=0.9),
                   epochs=2000, batch_size=None, shuffle=False, verbose=0)
    out = net.predict(X).ravel()
    assert before is None
    assert hist["loss"][-1] < 0.01 < hist["loss"][0]
    np.testing.assert_array_equal(out > 0.5, y > 0.5)


def test_one_step_worked_by_hand():
    """x = (1, 2), y = 1; hidden Dense(2, relu), output Dense(1); MSE; SGD lr 0.1.

    forward : h = relu(x W1 + b1) = relu(0.7, 1.0) = (0.7, 1.0)
              z = h W2 + b2 = 0.35 - 0.5 + 0.1 = -0.05,  L = (z - y)^2 = 1.1025
    backward: dL/dz = 2 (z - y) = -2.1
              dW2 = h^T dz = (-1.47, -2.1),  db2 = -2.1
              dh = dz W2^T = (-1.05, 1.05) (relu passes both)
              dW1 = x^T dh = [[-1.05, 1.05], [-2.1, 2.1]],  db1 = (-1.05, 1.05)
    update  : p <- p - 0.1 dp
    """
    net = fastbp.Sequential([fastbp.Dense(2, activation="relu"), fastbp.Dense(1)],
                            dtype="float64").build(2)
    net.layers[0].W[...] = [[0.1, 0.2], [0.3, 0.4]]
    net.layers[0].b[...] = [0.0, 0.0]
    net.layers[1].W[...] = [[0.5], [-0.5]]
    net.layers[1].b[...] = [0.1]
    X, y = np.array([[1.0, 2.0]]), np.array([1.0])
    loss, grad = net.loss_and_grad(X, y, loss="mse")
    assert loss == pytest.approx(1.1025, abs=1e-15)
    np.testing.assert_allclose(grad, [-1.05, 1.05, -2.1, 2.1, -1.05, 1.05, -1.47, -2.1, -2.1],
                               atol=1e-14)
    net.fit(X, y, loss="mse", optimizer=fastbp.optim.SGD(lr=0.1), epochs=1, batch_size=1,
            verbose=0)
    np.testing.assert_allclose(net.layers[0].W, [[0.205, 0.095], [0.51, 0.19]], atol=1e-14)
    np.testing.assert_allclose(net.layers[0].b, [0.105, -0.105], atol=1e-14)
    np.testing.assert_allclose(net.layers[1].W, [[0.647], [-0.29]], atol=1e-14)
    np.testing.assert_allclose(net.layers[1].b, [0.31], atol=1e-14)


def test_same_seed_gives_bitwise_identical_training(rng):
    X, y = _classification(rng, n=200)
    runs = []
    for _ in range(2):
        net = _net(seed=7)
        net.fit(X, y, loss="cross_entropy", epochs=3, batch_size=16, verbose=0)
        runs.append(net.params.copy())
    np.testing.assert_array_equal(runs[0], runs[1])
    other = _net(seed=8)
    other.fit(X, y, loss="cross_entropy", epochs=3, batch_size=16, verbose=0)
    assert not np.array_equal(other.params, runs[0])


def test_fitting_again_with_the_same_optimizer_continues(rng):
    X, y = _classification(rng, n=100)
    a, b = _net(seed=3), _net(seed=3)
    opt_a, opt_b = fastbp.optim.Adam(lr=1e-2), fastbp.optim.Adam(lr=1e-2)
    a.fit(X, y, loss="cross_entropy", optimizer=opt_a, epochs=4, batch_size=10, verbose=0)
    b.fit(X, y, loss="cross_entropy", optimizer=opt_b, epochs=2, batch_size=10, verbose=0)
    b.fit(X, y, loss="cross_entropy", optimizer=opt_b, epochs=2, batch_size=10, verbose=0)
    np.testing.assert_array_equal(a.params, b.params)
    assert opt_b.t == 40 and b.history.epoch == [1, 2, 3, 4]


def test_history_records_losses_validation_and_time(rng):
    X, y = _classification(rng, n=120)
    net = _net()
    hist = net.fit(X[:100], y[:100], loss="cross_entropy", epochs=5, batch_size=20,
                   validation_data=(X[100:], y[100:]), optimizer=fastbp.optim.Adam(lr=1e-2),
                   verbose=0)
    assert hist is net.history and hist.epoch == [1, 2, 3, 4, 5]
    for key in ("loss", "val_loss", "val_accuracy", "time", "samples_per_s"):
        assert len(hist[key]) == 5, key
    assert hist["loss"][-1] < hist["loss"][0]
    assert all(0 <= a <= 1 for a in hist["val_accuracy"])
    assert hist["val_loss"][-1] == pytest.approx(net.evaluate(X[100:], y[100:], "cross_entropy"))


def test_verbose_prints_one_line_per_epoch(rng, capsys):
    X, y = _classification(rng, n=40)
    _net().fit(X, y, loss="cross_entropy", epochs=3, verbose=1)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("epoch 1/3") and "samples/s" in lines[0]


def test_frozen_layer_keeps_its_parameters(rng):
    X, y = _classification(rng, n=60)
    net = _net().build(5)
    net.layers[0].trainable = False
    net.build(5)  # the program reads trainable flags at build time
    W0 = net.layers[0].W.copy()
    W1 = net.layers[1].W.copy()
    net.fit(X, y, loss="cross_entropy", optimizer=fastbp.optim.AdamW(lr=1e-2), epochs=2,
            verbose=0)
    np.testing.assert_array_equal(net.layers[0].W, W0)
    assert not np.array_equal(net.layers[1].W, W1)


def test_the_engine_is_called_a_constant_number_of_times_per_epoch(rng, monkeypatch):
    """Python enters compiled code for runs of batches, not per batch or layer."""
    from fastbp import _runner as model

    calls = []
    real = model._engine.train_batches

    def counting(*args):
        calls.append(args[6])  # number of batches in this call
        return real(*args)

    monkeypatch.setattr(model, "_engine", _Proxy(model._engine, counting))
    X, y = _classification(rng, n=2000)
    for depth in (1, 6):
        calls.clear()
        net = _net(widths=(16,) * depth)
        net.fit(X, y, loss="cross_entropy", epochs=2, batch_size=10, verbose=0)
        assert sum(calls) == 2 * 200  # every batch of both epochs was run ...
        assert len(calls) <= 20, (depth, len(calls))  # ... in a few calls, not 400


class _Proxy:
    def __init__(self, module, train_batches):
        self._module, self.train_batches = module, train_batches

    def __getattr__(self, name):
        return getattr(self._module, name)


def test_divergence_stops_keeps_finite_weights_and_reports(rng):
    X = rng.normal(size=(64, 5))
    y = rng.normal(size=(64, 3)) * 100
    net = _net()
    with pytest.raises(DivergenceError, match="diverged at epoch") as info:
        net.fit(X, y, loss="mse", optimizer=fastbp.optim.SGD(lr=100.0), epochs=500, verbose=0)
    assert np.isfinite(net.params).all()
    assert info.value.epoch >= 1 and info.value.batch >= 1
    assert "diverged" in net.history.stop_reason
    assert np.isfinite(net.predict(X)).all()


def test_divergence_in_the_update_rolls_back_to_the_last_finite_step(rng):
    """A finite loss whose update overflows: the weights return to exactly
    those after the previous batch (epoch snapshot + replay)."""
    X, y = _classification(rng, n=40)
    X[:30] *= 1e-12  # three batches of 10 with harmless updates,
    X[30:] *= 1e300  # then one whose logits are finite but whose update overflows
    net = fastbp.Sequential([fastbp.Dense(3)], dtype="float64", seed=5).build(5)
    twin = fastbp.Sequential([fastbp.Dense(3)], dtype="float64", seed=5).build(5)
    opt = fastbp.optim.SGD(lr=1e10)
    with pytest.warns(RuntimeWarning, match="batch 4"):
        net.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=10,
                shuffle=False, verbose=0, on_divergence="warn")
    twin.fit(X[:30], y[:30], loss="cross_entropy", optimizer=fastbp.optim.SGD(lr=1e10),
             epochs=1, batch_size=10, shuffle=False, verbose=0)
    assert np.isfinite(net.params).all()
    np.testing.assert_array_equal(net.params, twin.params)
    assert opt.t == 3


def test_user_arrays_are_not_modified_and_read_only_input_works(rng):
    X, y = _classification(rng, n=50)
    X = np.asfortranarray(X)[:, ::-1]  # non-contiguous view of Fortran data
    X_copy, y_copy = X.copy(), y.copy()
    X.flags.writeable = False if X.base is None else X.flags.writeable
    Xr = np.array(X)
    Xr.setflags(write=False)
    net = _net()
    net.fit(Xr, y, loss="cross_entropy", epochs=2, verbose=0)
    net.fit(X, y, loss="cross_entropy", epochs=1, verbose=0)
    np.testing.assert_array_equal(X, X_copy)
    np.testing.assert_array_equal(y, y_copy)


def test_predict_proba(rng):
    X, y = _classification(rng, n=30)
    net = _net()
    net.fit(X, y, loss="cross_entropy", epochs=1, verbose=0)
    p = net.predict_proba(X)
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-12)
    np.testing.assert_array_equal(p.argmax(1), net.predict(X).argmax(1))


def test_summary_and_repr():
    net = _net().build(5)
    text = net.summary()
    assert "total parameters: %d" % net.n_params in text and "Dense(8" in text
    assert "Sequential(" in repr(net)


def test_summary_on_every_layer_kind(capsys):
    """summary() used to read layer.W of every layer: AttributeError on any
    model with Dropout, BatchNorm or a Residual block."""
    net = fastbp.Sequential([
        fastbp.Dense(8, activation="relu", dropconnect=0.25),
        fastbp.Residual([fastbp.Dense(8, trainable=False),
                         fastbp.Residual([fastbp.BatchNorm()])]),
        fastbp.Dropout(0.1), fastbp.Dense(3)])
    assert str(net) == repr(net)  # not built: no table yet
    with pytest.raises(NotBuiltError):
        net.summary()
    net.build(4)
    text = net.summary()
    rows = text.splitlines()[2:-1]
    assert [row.split()[0] for row in rows] == [str(i) for i in range(9)]
    for row, layer in zip(rows, net.layers):
        assert repr(layer) in row
    # outputs and parameters of each row: Dense 4*8+8, BatchNorm 2*8, Dense 8*3+3
    assert [row.split()[-2:] for row in rows] == [
        ["8", "40"], ["8", "0"], ["8", "72"], ["8", "0"], ["8", "16"], ["8", "0"], ["8", "0"],
        ["8", "0"], ["3", "27"]]
    # a residual block's layers are indented under its begin row
    assert rows[2].index("Dense") > rows[1].index("ResidualBegin")
    assert rows[4].index("BatchNorm") > rows[3].index("ResidualBegin") > rows[1].index("R")
    assert text.splitlines()[-1] == "  total parameters: 155 (83 trainable)"
    print(net)
    assert capsys.readouterr().out == text + "\n"


def test_pickles_leave_fit_scratch_behind_and_train_on(rng):
    """fit's workspace is scratch: not pickled, remade by the next fit."""
    import pickle
    X, y = _classification(rng)
    net = _net()
    net.fit(X, y, loss="cross_entropy", epochs=1, verbose=0)
    assert "_fit_workspace" not in net.__getstate__()
    twin = pickle.loads(pickle.dumps(net))
    twin.fit(X, y, loss="cross_entropy", epochs=1, verbose=0)
    net.fit(X, y, loss="cross_entropy", epochs=1, verbose=0)
    np.testing.assert_array_equal(twin.params, net.params)


def test_an_unpickled_models_layers_are_views_of_its_params(rng):
    """Pickle copies views apart: an unpickled model's layer.W, b (gamma,
    beta, running statistics) were copies, so set_weights changed nothing
    and get_weights went stale once it trained."""
    import pickle
    X, y = _classification(rng)
    net = fastbp.Sequential([fastbp.Dense(4), fastbp.BatchNorm(), fastbp.Dense(3)], seed=0)
    net.fit(X, y, loss="cross_entropy", epochs=1, verbose=0)
    twin = pickle.loads(pickle.dumps(net))
    dense, norm = twin.layers[0], twin.layers[1]
    for view, base in [(dense.W, twin.params), (dense.b, twin.params),
                       (norm.gamma, twin.params), (norm.running_var, twin._buffers)]:
        assert np.shares_memory(view, base)
    twin.set_weights([(np.ones((5, 4)), np.zeros(4)), (np.ones((4, 3)), np.zeros(3))])
    np.testing.assert_array_equal(twin.params[:20], 1)
    twin.fit(X, y, loss="cross_entropy", epochs=1, verbose=0)
    np.testing.assert_array_equal(twin.get_weights()[0][0].ravel(), twin.params[:20])
    np.testing.assert_array_equal(norm.running_mean, twin._buffers[:4])


def test_two_models_train_concurrently_in_two_threads(rng):
    """The engine releases the GIL; two threads training two models must
    neither crash nor disturb each other's results."""
    import threading

    X, y = _classification(rng, n=400)
    expected = []
    for seed in (1, 2):
        net = _net(seed=seed)
        net.fit(X, y, loss="cross_entropy", epochs=5, batch_size=8, verbose=0)
        expected.append(net.params.copy())
    nets = [_net(seed=1), _net(seed=2)]
    errors = []

    def train(net):
        try:
            net.fit(X, y, loss="cross_entropy", epochs=5, batch_size=8, verbose=0)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=train, args=(net,)) for net in nets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for net, want in zip(nets, expected):
        np.testing.assert_array_equal(net.params, want)


def test_n_threads_limits_blas_during_fit_and_restores_it(rng, monkeypatch):
    from threadpoolctl import threadpool_info

    from fastbp import _runner as model

    seen = []
    real = model._engine.train_batches

    def spy(*args):
        seen.append({i["filepath"]: i["num_threads"] for i in threadpool_info()
                     if i["user_api"] == "blas"})
        return real(*args)
    monkeypatch.setattr(model, "_engine", _Proxy(model._engine, spy))
    before = {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
    X, y = _classification(rng, n=64)
    a, b = _net(seed=4), _net(seed=4)
    a.fit(X, y, loss="cross_entropy", epochs=2, verbose=0, n_threads=1)
    assert seen and all(set(s.values()) == {1} for s in seen)
    after = {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
    assert after == before
    b.fit(X, y, loss="cross_entropy", epochs=2, verbose=0)
    np.testing.assert_array_equal(a.params, b.params)  # tiny layers: same arithmetic
    with pytest.raises(ValueError, match="n_threads"):
        a.fit(X, y, loss="cross_entropy", verbose=0, n_threads=0)


def _built(seed=0):
    return fastbp.Sequential([fastbp.Dense(8, activation="tanh"), fastbp.Dense(3)],
                             seed=seed).build(4)


@pytest.mark.parametrize("value", [np.float32(1.0), np.int64(2), np.float16(0.5), 1, 0.5])
def test_clip_settings_take_numpy_scalars(value):
    X = np.ones((8, 4))
    net = _built()
    net.fit(X, np.zeros((8, 3)), epochs=1, verbose=0, clip_norm=value, clip_value=value)


@pytest.mark.parametrize("value", [np.bool_(True), True, 0, -1.0, np.float32("nan"), "1"])
def test_clip_settings_refuse_what_is_not_a_positive_number(value):
    net = _built()
    with pytest.raises(ValueError, match="clip_norm must be a positive number"):
        net.fit(np.ones((8, 4)), np.zeros((8, 3)), epochs=1, verbose=0, clip_norm=value)


def test_building_a_fitted_model_again_starts_afresh():
    """New weights, so no optimizer state, history or settings of the old
    ones: a fit without an optimizer then starts a new Adam (it went on with
    the old one's moments and step count, or refused another size)."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(16, 4)), rng.normal(size=(16, 3))
    net = fastbp.Sequential([fastbp.Dense(8, activation="tanh"), fastbp.Dense(3)],
                            dtype="float64", seed=0)
    net.fit(X, y, epochs=2, batch_size=4, verbose=0)
    assert net.optimizer.t == 8 and net.history.n_epochs == 2
    net.build(5)  # another width: the old Adam refused this model's size
    assert net.optimizer is None and net.history.n_epochs == 0
    net.fit(np.hstack([X, X[:, :1]]), y, epochs=1, batch_size=4, verbose=0)
    assert net.optimizer.t == 4
    net.build(4)
    net.fit(X, y, epochs=1, batch_size=4, verbose=0)
    fresh = fastbp.Sequential([fastbp.Dense(8, activation="tanh"), fastbp.Dense(3)],
                              dtype="float64", seed=0)
    fresh.fit(X, y, epochs=1, batch_size=4, verbose=0)
    assert net.params.tobytes() == fresh.params.tobytes()
    assert net.history["loss"] == fresh.history["loss"]


@pytest.mark.parametrize("where", ["W", "running_var"])
def test_fit_refuses_weights_set_to_nan_by_hand(where):
    """A NaN put into a built model's weights made the first step "diverge",
    reporting the weights of a last finite step while they were NaN."""
    layers = [fastbp.Dense(4, activation="tanh"), fastbp.BatchNorm(), fastbp.Dense(3)]
    net = fastbp.Sequential(layers, dtype="float64", seed=0).build(4)
    if where == "W":
        net.layers[0].W[0, 0] = np.nan
    else:
        net.layers[1].running_var[0] = np.inf
    with pytest.raises(ValueError, match="contain NaN or infinity before training"):
        net.fit(np.ones((8, 4)), np.zeros((8, 3)), epochs=1, verbose=0)


@pytest.mark.parametrize("name", ["shuffle", "grad_norms"])
@pytest.mark.parametrize("value", ["False", "no", 2, None])
def test_yes_no_fit_settings_take_true_or_false_only(name, value):
    """shuffle="False" shuffled (any truthy value was taken)."""
    net = _built()
    with pytest.raises(ValueError, match=f"invalid {name}"):
        net.fit(np.ones((8, 4)), np.zeros((8, 3)), epochs=1, verbose=0, **{name: value})
