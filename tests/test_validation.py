"""Bad input raises ValueError naming the problem, before compiled code runs."""
import numpy as np
import pytest

import fastbp


@pytest.fixture
def net():
    return fastbp.Sequential([fastbp.Dense(4, activation="relu"), fastbp.Dense(3)],
                             dtype="float64", seed=0).build(5)


@pytest.fixture
def data(rng):
    return rng.normal(size=(20, 5)), rng.integers(0, 3, 20)


@pytest.mark.parametrize("bad, message", [
    (np.ones((20, 4)), "4 features, but the model expects 5"),
    (np.ones(20), "must be 2-D"),
    (np.ones((0, 5)), "empty"),
    (np.full((20, 5), np.nan), "NaN or infinity"),
    (np.full((20, 5), np.inf), "NaN or infinity"),
    (np.ones((20, 5), dtype=complex), "complex"),
    (np.array([["a"] * 5] * 20), "numeric"),
    ("not an array", "array-like"),
])
def test_bad_X(net, data, bad, message):
    with pytest.raises(ValueError, match=message):
        net.fit(bad, data[1], loss="cross_entropy", verbose=0)


def test_bad_X_in_predict(net):
    with pytest.raises(ValueError, match="4 features"):
        net.predict(np.ones((3, 4)))


@pytest.mark.parametrize("loss, bad, message", [
    ("cross_entropy", np.arange(20) % 4, r"labels must be in \[0, 2\]"),
    ("cross_entropy", -np.ones(20), r"labels must be in"),
    ("cross_entropy", np.full(20, 0.5), "must be integers"),
    ("cross_entropy", np.ones(19), "19 samples, X has 20"),
    ("mse", np.ones((20, 2)), r"shape \(20, 3\)"),
    ("mse", np.full((20, 3), np.nan), "NaN"),
    ("binary_cross_entropy", np.full((20, 3), 2.0), r"\[0, 1\]"),
])
def test_bad_targets(net, data, loss, bad, message):
    with pytest.raises(ValueError, match=message):
        net.fit(data[0], bad, loss=loss, verbose=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"loss": "hinge"}, "unknown loss 'hinge'"),
    ({"optimizer": "lbfgs"}, "unknown optimizer"),
    ({"epochs": 0}, "epochs must be a positive integer"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"validation_data": (np.ones((3, 5)),)}, "validation_data must be a pair"),
    ({"validation_data": (np.ones((3, 4)), np.zeros(3))}, "X_val has 4 features"),
    ({"on_divergence": "ignore"}, "on_divergence"),
])
def test_bad_fit_arguments(net, data, kwargs, message):
    kwargs = {"loss": "cross_entropy", **kwargs}
    with pytest.raises(ValueError, match=message):
        net.fit(*data, verbose=0, **kwargs)


@pytest.mark.parametrize("make, message", [
    (lambda: fastbp.Dense(4, activation="swish"), "unknown activation 'swish'"),
    (lambda: fastbp.Dense(0), "units must be a positive integer"),
    (lambda: fastbp.Dense(4, kernel_init="orthogonal"), "unknown initializer"),
    (lambda: fastbp.Sequential([fastbp.Dense(2)], dtype="float16"), "float32 or float64"),
    (lambda: fastbp.Sequential([]), "at least one layer"),
    (lambda: fastbp.Sequential(["dense"]), "unsupported layer"),
    (lambda: fastbp.optim.Adam(lr=-1), "invalid learning rate"),
    (lambda: fastbp.optim.Adam(betas=(0.9, 1.0)), "invalid betas"),
    (lambda: fastbp.optim.SGD(lr=0.1, nesterov=True), "nesterov"),
])
def test_bad_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_unbuilt_model_says_so():
    net = fastbp.Sequential([fastbp.Dense(2)])
    with pytest.raises(ValueError, match="not built"):
        net.predict(np.ones((2, 2)))


def test_errors_come_before_any_training(net, data):
    before = net.params.copy()
    y = data[1].copy()
    y[-1] = 7
    with pytest.raises(ValueError):
        net.fit(data[0], y, loss="cross_entropy", verbose=0)
    np.testing.assert_array_equal(net.params, before)
    assert len(net.history) == 0


def test_float64_values_that_overflow_float32_are_rejected():
    net = fastbp.Sequential([fastbp.Dense(2)], dtype="float32").build(2)
    with pytest.raises(ValueError, match="NaN or infinity"):
        net.predict(np.array([[1e300, 0.0]]))


def test_aliases():
    assert fastbp.Dense(2, activation="logistic").activation == "sigmoid"
    assert fastbp.Dense(2, activation=None).activation == "identity"
    assert fastbp.losses.resolve("BCE") == "binary_cross_entropy"


@pytest.mark.parametrize("make, message", [
    (lambda: fastbp.optim.SGD(lr="fast"), "not a real number"),
    (lambda: fastbp.optim.SGD(lr=0.1, dampening=-1), "dampening"),
    (lambda: fastbp.optim.Adam(lr=float("nan")), "learning rate"),
    (lambda: fastbp.optim.Adam(betas=0.9), "betas"),
    (lambda: fastbp.optim.RMSprop(alpha=None), "alpha"),
    (lambda: fastbp.optim.Rprop(etas=(0.5,)), "etas"),
    (lambda: fastbp.optim.Adagrad(lr=10 ** 400), "learning rate"),
    (lambda: fastbp.Sequential([fastbp.Dense(2)], seed=-1), "seed"),
    (lambda: fastbp.Sequential([fastbp.Dense(2)], seed="abc"), "seed"),
    (lambda: fastbp.layers.from_config({"units": 3}), "unknown layer type"),
    (lambda: fastbp.layers.from_config({"type": "Dense", "units": 3, "size": 2}), "invalid Dense"),
])
def test_bad_hyperparameters_and_configs(make, message):
    with pytest.raises(ValueError, match=message):
        make()
