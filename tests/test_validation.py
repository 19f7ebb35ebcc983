"""Bad input raises ValueError naming the problem, before compiled code runs."""
import sys

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
    assert net.history.n_epochs == 0


def test_float64_values_that_overflow_float32_are_rejected():
    net = fastbp.Sequential([fastbp.Dense(2)], dtype="float32").build(2)
    with pytest.raises(ValueError, match=r"X holds 1e\+300 at index \(0, 0\), beyond the range "
                                         r"of the model's float32 .*3\.40282e\+38"):
        net.predict(np.array([[1e300, 0.0]]))


def _float32_net(outputs=1):
    return fastbp.Sequential([fastbp.Dense(3, activation="tanh"), fastbp.Dense(outputs)],
                             dtype="float32", seed=0).build(2)


_OVERFLOW = [  # (what, call on a built float32 net, X (4, 2), y (4,), w (4,))
    ("evaluate", lambda net, X, y, w: net.evaluate(X, y, sample_weight=w)),
    ("loss_and_grad", lambda net, X, y, w: net.loss_and_grad(X, y, sample_weight=w)),
    ("fit", lambda net, X, y, w: net.fit(X, y, sample_weight=w, verbose=0)),
    ("validation_data", lambda net, X, y, w: net.fit(np.ones((4, 2)), np.ones(4), verbose=0,
                                                     validation_data=(X, y))),
]


@pytest.mark.parametrize("where, what, call", [
    (where, what, call) for what, call in _OVERFLOW for where in ("X", "y", "sample_weight")
    if not (what == "validation_data" and where == "sample_weight")])  # it has no weights
def test_values_beyond_float32_are_checked_after_conversion(where, what, call):
    """y = 1e39 or sample_weight = 1e39 used to pass (the NaN/inf check ran
    before the cast) and become inf: an inf/NaN loss with no error, or a
    DivergenceError from fit."""
    arrays = {"X": np.ones((4, 2)), "y": np.ones(4), "sample_weight": np.ones(4)}
    arrays[where][1] = 1e39  # finite in float64
    name = {"X": "X", "y": "y", "sample_weight": "sample_weight"}[where]
    if what == "validation_data":
        name += "_val"
    net = _float32_net()
    before = net.params.copy()
    with pytest.raises(ValueError, match=rf"^{name} holds 1e\+39 at index .*float32"):
        call(net, arrays["X"], arrays["y"], arrays["sample_weight"])
    np.testing.assert_array_equal(net.params, before)


def test_huge_integer_class_labels_are_refused_before_the_cast():
    net = _float32_net(outputs=3)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\].* to 1e\+30"):
        net.fit(np.ones((2, 2)), np.array([0.0, 1e30]), loss="cross_entropy", verbose=0)


@pytest.mark.parametrize("bad, message", [
    (lambda n: np.full(n.params.shape, 1e39), r"params holds 1e\+39 .*float32"),
    (lambda n: np.full(n.params.shape, np.nan), "params contains NaN"),
    (lambda n: np.ones(3), r"params must have shape"),
    (lambda n: np.array(["a"] * n.params.size), "numeric"),
])
def test_set_params_checks_values_in_the_models_dtype(bad, message):
    net = _float32_net()
    before = net.params.copy()
    with pytest.raises(ValueError, match=message):
        net.set_params(bad(net))
    np.testing.assert_array_equal(net.params, before)


def test_set_weights_checks_values_in_the_models_dtype():
    net = _float32_net()
    weights = net.get_weights()
    weights[1] = (weights[1][0].astype(np.float64), np.array([1e39]))
    before = net.params.copy()
    with pytest.raises(ValueError, match=r"dense layer 1's b holds 1e\+39"):
        net.set_weights(weights)
    np.testing.assert_array_equal(net.params, before)
    with pytest.raises(ValueError, match="expected a \\(W, b\\) pair"):
        net.set_weights([weights[0], 3])


def test_missing_values_from_pandas_are_named():
    import pandas as pd
    net = _float32_net()
    X = pd.DataFrame({"a": pd.array([1.0, None, 2.0], dtype="Float64"), "b": [1.0, 2.0, 3.0]})
    for call in (net.predict, lambda X: net.fit(X, np.ones(3), verbose=0)):
        with pytest.raises(ValueError, match=r"X contains missing values .*pd\.NA.*\(1, 0\)"):
            call(X)
    y = pd.Series(pd.array([1, None, 0], dtype="Int64")).astype(object)
    with pytest.raises(ValueError, match="y contains missing values"):
        net.fit(np.ones((3, 2)), y, verbose=0)


def test_numeric_object_arrays_and_nullable_columns_without_missing_values_work():
    import pandas as pd
    net = _float32_net()
    X = np.array([[1, 2.5], [np.float32(3), True]], dtype=object)
    np.testing.assert_array_equal(net.predict(X),
                                  net.predict(np.array([[1, 2.5], [3, 1]], dtype=np.float32)))
    frame = pd.DataFrame({"a": pd.array([1, 2], dtype="Int64"), "b": [0.5, 1.5]})
    assert np.isfinite(net.predict(frame)).all()
    with pytest.raises(ValueError, match=r"numeric, got dtype object holding 'x' \(str\)"):
        net.predict(np.array([[1, "x"]], dtype=object))


def test_sparse_targets_are_named():
    """X may be sparse (tests/test_sparse.py); targets and weights may not."""
    import scipy.sparse as sparse
    net = _float32_net()
    with pytest.raises(ValueError, match=r"y is a scipy\.sparse matrix.*y\.toarray\(\)"):
        net.fit(np.ones((2, 2)), sparse.csr_matrix(np.ones((2, 1))), verbose=0)


# -- errors that point the right way (issue 16) ---------------------------------------

@pytest.mark.parametrize("labels", [
    np.array([0, 2, 1, 1]), np.array([0.0, 2.0, 1.0, 1.0]), np.array([[0], [2], [1], [1]]),
    np.array([True, False, True, True])])
@pytest.mark.parametrize("call", ["fit", "fit_bce", "evaluate"])
def test_class_labels_with_a_regression_loss_point_to_cross_entropy(labels, call):
    """Labels with fit's default loss="mse" used to get only "y must have
    shape (4, 3) ..., got (4,)"."""
    net = fastbp.Sequential([fastbp.Dense(3)], dtype="float64", seed=0).build(2)
    X = np.ones((4, 2))
    run = {"fit": lambda: net.fit(X, labels, verbose=0),
           "fit_bce": lambda: net.fit(X, labels, loss="binary_cross_entropy", verbose=0),
           "evaluate": lambda: net.evaluate(X, labels)}[call]
    with pytest.raises(ValueError, match=r"shape \(4, 3\).* y looks like class labels "
                                         r"\(integers from 0 to [12]\), which loss='(mse|binary_"
                                         r"cross_entropy)' does not take: pass "
                                         r"loss='cross_entropy'.*fastbp\.MLPClassifier"):
        run()
    assert net.history.n_epochs == 0


@pytest.mark.parametrize("targets", [np.array([0.5, 1.0, 2.0, 0.0]), np.array([-1, 0, 1, 2]),
                                     np.ones((4, 2))])
def test_targets_that_are_not_labels_get_no_label_hint(targets):
    net = fastbp.Sequential([fastbp.Dense(3)], dtype="float64", seed=0).build(2)
    with pytest.raises(ValueError, match=r"must have shape \(4, 3\)") as info:
        net.fit(np.ones((4, 2)), targets, verbose=0)
    assert "class labels" not in str(info.value)


@pytest.mark.parametrize("labels", [np.array(["cat", "dog", "cat"]),
                                    np.array(["cat", "dog", "cat"], dtype=object),
                                    ["cat", "dog", "cat"]])
def test_string_labels_name_label_encoder_and_mlp_classifier(labels):
    net = fastbp.Sequential([fastbp.Dense(2)], seed=0)
    with pytest.raises(ValueError, match=r"y must be numeric.*LabelEncoder.*fastbp\.MLPClassifier"):
        net.fit(np.ones((3, 2)), labels, loss="cross_entropy", verbose=0)
    assert net.history.n_epochs == 0  # refused before any training


def test_string_X_does_not_get_the_label_hint():
    net = fastbp.Sequential([fastbp.Dense(2)], seed=0)
    with pytest.raises(ValueError, match="X must be numeric") as info:
        net.fit(np.array([["a", "b"]]), [0], loss="cross_entropy", verbose=0)
    assert "LabelEncoder" not in str(info.value)


@pytest.mark.parametrize("built", [False, True])
def test_predict_proba_before_fit_says_the_model_is_not_fitted(built):
    """It said "unknown loss ''" (the loss of a fit that never ran)."""
    net = fastbp.Sequential([fastbp.Dense(3)], seed=0)
    if built:
        net.build(2)
    with pytest.raises(ValueError, match=r"not been fitted yet.*loss='cross_entropy'"):
        net.predict_proba(np.ones((2, 2)))
    if built:  # naming the loss needs no fit
        p = net.predict_proba(np.ones((2, 2)), loss="cross_entropy")
        np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown loss ''"):  # an explicit '' is still wrong
        net.predict_proba(np.ones((2, 2)), loss="")


def test_one_sample_as_a_1d_array_gets_the_one_sample_hint(net):
    """net.predict(X[0]) was told to use X.reshape(-1, 1): a column of 5
    one-feature samples, which then fails on the feature count."""
    X = np.ones((3, 5))
    with pytest.raises(ValueError, match=r"got shape \(5,\) \(use X\.reshape\(1, -1\) for one "
                                         r"sample of the model's 5 features\)") as info:
        net.predict(X[0])
    assert "reshape(-1, 1)" not in str(info.value)
    assert net.predict(X[0].reshape(1, -1)).shape == (1, 3)


def test_1d_X_hints_by_what_the_model_takes():
    one = fastbp.Sequential([fastbp.Dense(2)], seed=0).build(1)
    with pytest.raises(ValueError, match=r"X\.reshape\(-1, 1\): the model takes one feature"):
        one.predict(np.ones(4))
    wide = fastbp.Sequential([fastbp.Dense(2)], seed=0).build(3)
    with pytest.raises(ValueError, match=r"\(the model takes 3 features a sample\)$"):
        wide.predict(np.ones(4))
    unbuilt = fastbp.Sequential([fastbp.Dense(2)], seed=0)
    with pytest.raises(ValueError, match=r"X\.reshape\(-1, 1\) if it holds one feature, "
                                         r"X\.reshape\(1, -1\) if it is one sample"):
        unbuilt.fit(np.ones(4), np.ones(4), verbose=0)
    with pytest.raises(ValueError, match=r"X_val must be 2-D.*X_val\.reshape\(1, -1\)"):
        wide.fit(np.ones((4, 3)), np.ones((4, 2)), validation_data=(np.ones(3), np.ones((1, 2))),
                 verbose=0)


@pytest.mark.parametrize("name", ["n_params", "params"])
def test_properties_of_an_unbuilt_model_raise_only_attribute_errors(name):
    """hasattr(net, "n_params") raised ValueError on an unbuilt model."""
    net = fastbp.Sequential([fastbp.Dense(2)], seed=0)
    assert not hasattr(net, name)
    assert getattr(net, name, "absent") == "absent"
    with pytest.raises(ValueError, match="not built yet"):  # and still a ValueError
        getattr(net, name)
    net.build(3)
    assert hasattr(net, name)
    assert net.n_params == 8


@pytest.mark.parametrize("dtype, source, off, ok", [
    ("float32", np.float32, 1e-4, True),     # float32 rounding of a softmax
    ("float32", np.float64, 1e-3, False),
    ("float64", np.float64, 1e-9, True),
    ("float64", np.float64, 1e-6, False),
    ("float64", np.float32, 1e-4, True),     # float32 probabilities in a float64 model
    ("float64", np.float32, 1e-3, False),
])
def test_cross_entropy_probabilities_must_sum_to_one(dtype, source, off, ok):
    """Rows of class probabilities that do not sum to 1 (within the square
    root of the larger epsilon of the targets' and the model's dtype) used
    to be accepted silently."""
    net = fastbp.Sequential([fastbp.Dense(3)], dtype=dtype, seed=0).build(2)
    Y = np.array([[0.2, 0.3, 0.5], [0.0, 1.0, 0.0]], dtype=source)
    Y[0, 2] += source(off)
    if ok:
        assert np.isfinite(net.evaluate(np.ones((2, 2)), Y, loss="cross_entropy"))
    else:
        with pytest.raises(ValueError, match=r"row 0 sums to 1\.00.*normalize the rows"):
            net.evaluate(np.ones((2, 2)), Y, loss="cross_entropy")


def test_sample_weights_whose_sum_overflows_are_refused():
    net = fastbp.Sequential([fastbp.Dense(1)], dtype="float64", seed=0).build(2)
    with pytest.raises(ValueError, match="sample_weight sums to more than float64"):
        net.evaluate(np.ones((2, 2)), np.ones(2), sample_weight=np.full(2, 1e308))


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


def test_results_that_overflow_the_dtype_are_an_error_not_inf():
    """Finite float32 inputs of 1e30: the outputs are finite but the
    gradient of the first layer (1e30 x 1e29) is not representable;
    loss_and_grad returned it as inf.  The loss itself is a float64 and
    finite (fastbp._numba.losses adds its terms in float64)."""
    net = fastbp.Sequential([fastbp.Dense(2, activation="relu"), fastbp.Dense(1)],
                            dtype="float32", seed=0).build(3)
    X = np.array([[1e30, 1.0, 1.0], [1.0, 2.0, 3.0], [0.5, 1.0, -1.0]])
    y = np.zeros(3)
    with pytest.raises(ValueError, match=r"the gradient has \d+ NaN or infinite entries: .*"
                                         r"overflow float32 .*dtype='float64'"):
        net.loss_and_grad(X, y)
    assert np.isfinite(net.evaluate(X, y))
    net.set_params(np.full(net.n_params, 1e30))  # outputs of 1e90: inf in float32
    with pytest.raises(ValueError, match="the loss is inf"):
        net.evaluate(np.ones((2, 3)), np.zeros(2))


def test_fuzzed_inputs_pass():
    """A few hundred trials of tests/adversarial/fuzz_inputs.py (each batch
    in a subprocess with a timeout): every call returns a finite result of
    the right shape or raises ValueError/TypeError with a message, and no
    input is mutated."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent / "adversarial" / "fuzz_inputs.py"
    spec = importlib.util.spec_from_file_location("fuzz_inputs", path)
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    results = fuzz._run_batch(seed=2024, start=0, count=200, timeout=300, python=sys.executable)
    failures = [r for r in results if r["kind"] not in fuzz.PASS]
    assert len(results) == 200
    assert not failures, failures[:5]


def test_python_ints_beyond_float64_are_a_value_error():
    net = _float32_net()
    for X in ([[10 ** 400, 1]], np.array([[1, -10 ** 400]], dtype=object)):
        with pytest.raises(ValueError, match="integer at index .* beyond the range of float64"):
            net.predict(X)


# -- sizes the compiled kernels cannot index -----------------------------------
# They take a product's rows, columns and depth as C ints (as BLAS does); a
# larger width, feature count or batch was cut to its low 32 bits there
# (a 2**32 + 5 row batch computed 5 rows, the rest left as they were).

def test_layer_widths_beyond_the_kernels_are_refused_before_allocating():
    net = fastbp.Sequential([fastbp.Dense(2 ** 31, activation="relu"), fastbp.Dense(2)])
    with pytest.raises(ValueError, match=r"width of layer 0 \(Dense\) is 2147483648.*"
                                         r"use fewer units"):
        net.build(3)
    assert not net.built


def test_feature_counts_beyond_the_kernels_are_refused_before_allocating():
    net = fastbp.Sequential([fastbp.Dense(2)])
    with pytest.raises(ValueError, match="number of features is 2147483648"):
        net.build(2 ** 31)
    assert not net.built


@pytest.mark.parametrize("batch_size", [None, 150])
def test_batches_beyond_the_kernels_are_refused_before_training(monkeypatch, batch_size):
    # (a batch of 2**31 rows needs gigabytes: the limit is lowered to show
    # that every way to a batch is checked against it)
    from fastbp import _validation

    monkeypatch.setattr(_validation, "MAX_DIM", 100)
    X = np.random.default_rng(0).random((300, 4))
    y = np.arange(300) % 2
    net = fastbp.Sequential([fastbp.Dense(2)])
    with pytest.raises(ValueError, match="pass a smaller batch_size"):
        net.fit(X, y, batch_size=batch_size, epochs=1, loss="cross_entropy", verbose=0)
    assert not net.built or not net.history
    net.fit(X, y, batch_size=100, epochs=1, loss="cross_entropy", verbose=0)   # at the limit
    with pytest.raises(ValueError, match="batch_size is 150"):
        fastbp.MLPClassifier(batch_size=150, max_iter=1).fit(X, y)


def test_a_validation_target_of_the_wrong_length_names_x_val():
    """The message said "X has 30" for validation_data's X_val."""
    import fastbp
    net = fastbp.Sequential([fastbp.Dense(4), fastbp.Dense(1)])
    with pytest.raises(ValueError, match="y_val has 20 samples, X_val has 30"):
        net.fit(np.ones((40, 3)), np.ones(40), validation_data=(np.ones((30, 3)), np.ones(20)),
                verbose=0)
