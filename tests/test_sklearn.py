"""fastbp.MLPClassifier / fastbp.MLPRegressor: drop-in replacements for scikit-learn's.

The yardstick is scikit-learn's own ``sklearn.neural_network`` estimators: for the same
data, parameters and ``random_state`` a float64 fit must reproduce sklearn's weights,
loss curve, iteration counters, validation scores and warnings to ~1e-8 relative
(L-BFGS: ~1e-6, as it amplifies rounding).  On top of that come the fastbp extras
(``class_weight``, more activations, ``dtype``, ``n_threads``, ``X_val``/``y_val``).
Everything uses fixed seeds and small data; no speed is asserted here.
"""
import inspect
import pickle
import warnings
from functools import lru_cache

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn import neural_network as sknn
from sklearn.base import clone, is_classifier, is_regressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_sample_weight
from sklearn.utils.estimator_checks import estimator_checks_generator

import fastbp
from fastbp.sklearn import MLPClassifier, MLPRegressor

SkC = sknn.MLPClassifier
SkR = sknn.MLPRegressor

#: relative tolerance of fastbp vs sklearn in float64 (stochastic solvers, L-BFGS)
RTOL = 1e-8
RTOL_LBFGS = 1e-6

ignore_convergence = pytest.mark.filterwarnings(
    "ignore::sklearn.exceptions.ConvergenceWarning")


# ----------------------------------------------------------------------------- helpers
def assert_rel(actual, expected, rtol=RTOL, what="value"):
    """max |actual - expected| <= rtol * max |expected| (scale-relative, so entries
    near zero are held to the same absolute standard as the largest one)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != sklearn's {e.shape}"
    assert np.isfinite(a).all() == np.isfinite(e).all(), f"{what}: non-finite values"
    if e.size == 0:
        return
    scale = max(float(np.abs(e).max()), 1e-300)
    err = float(np.abs(a - e).max()) / scale
    assert err <= rtol, f"{what}: max relative error {err:.3g} > {rtol:g}"


def fit_recording(est, X, y, **fit_kw):
    """Fit and return the list of warnings raised during the fit."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        est.fit(X, y, **fit_kw)
    return rec


def n_convergence_warnings(rec):
    return sum(issubclass(w.category, ConvergenceWarning) for w in rec)


def assert_same_state(fb, sk, rtol=RTOL, what=""):
    """The fitted state of a fastbp estimator equals sklearn's."""
    assert fb.n_iter_ == sk.n_iter_, f"{what} n_iter_ {fb.n_iter_} != sklearn {sk.n_iter_}"
    assert fb.t_ == sk.t_, f"{what} t_ {fb.t_} != sklearn {sk.t_}"
    assert fb.n_layers_ == sk.n_layers_
    assert fb.n_outputs_ == sk.n_outputs_
    assert fb.out_activation_ == sk.out_activation_
    assert len(fb.coefs_) == len(sk.coefs_) and len(fb.intercepts_) == len(sk.intercepts_)
    for i, (a, e) in enumerate(zip(fb.coefs_, sk.coefs_)):
        assert a.dtype == e.dtype, f"{what} coefs_[{i}] dtype {a.dtype} != {e.dtype}"
        assert_rel(a, e, rtol, f"{what} coefs_[{i}]")
    for i, (a, e) in enumerate(zip(fb.intercepts_, sk.intercepts_)):
        assert a.dtype == e.dtype, f"{what} intercepts_[{i}] dtype {a.dtype} != {e.dtype}"
        assert_rel(a, e, rtol, f"{what} intercepts_[{i}]")
    assert_rel(fb.loss_, sk.loss_, rtol, f"{what} loss_")
    for name in ("loss_curve_", "best_loss_", "validation_scores_", "best_validation_score_"):
        if not hasattr(sk, name):  # L-BFGS: sklearn has no loss curve / best loss
            continue
        assert hasattr(fb, name), f"{what} missing attribute {name}"
        exp, act = getattr(sk, name), getattr(fb, name)
        if exp is None:
            assert act is None, f"{what} {name} is {act!r}, sklearn has None"
        else:
            assert act is not None, f"{what} {name} is None, sklearn has {exp!r}"
            assert_rel(act, exp, rtol, f"{what} {name}")


# -------------------------------------------------------------------------------- data
def make_classification(n=120, d=5, k=3, seed=0, labels=None):
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(n, d))
    W = rng.normal(size=(d, k))
    y = (X @ W + 0.7 * rng.normal(size=(n, k))).argmax(axis=1)
    if labels is not None:
        y = np.asarray(labels)[y]
    return X, y


def make_multilabel(n=120, d=5, k=3, seed=1):
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(n, d))
    Y = (X @ rng.normal(size=(d, k)) + 0.5 * rng.normal(size=(n, k)) > 0).astype(int)
    return X, Y


def make_regression(n=110, d=5, n_out=1, seed=2):
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(n, d))
    Y = np.tanh(X @ rng.normal(size=(d, n_out))) + 0.1 * rng.normal(size=(n, n_out))
    Y = 3.0 * Y + 1.0
    return X, (Y.ravel() if n_out == 1 else Y)


def make_poisson(n=120, d=4, seed=3):
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(n, d))
    y = rng.poisson(np.exp(0.4 * X @ rng.normal(size=d) + 0.5)).astype(np.float64)
    return X, y


def make_weights(n, seed=4):
    return np.random.RandomState(seed).uniform(0.1, 3.0, size=n)


DATA = {
    "multiclass": lambda: make_classification(),
    "binary-n230": lambda: make_classification(n=230, k=2, seed=5),
    "binary-strings": lambda: make_classification(k=2, seed=6, labels=["neg", "pos"]),
    "multiclass-strings": lambda: make_classification(k=3, seed=7, labels=["b", "c", "a"]),
    "multilabel": lambda: make_multilabel(),
    "regression": lambda: make_regression(),
    "regression-n230-2out": lambda: make_regression(n=230, n_out=2, seed=8),
    "regression-2out": lambda: make_regression(n_out=2, seed=9),
    "poisson": lambda: make_poisson(),
}

# case id -> (estimator kind, data set, constructor params, fit options)
# fit options: "sample_weight" (non-uniform weights) and "sparse" (X as CSR matrix)
CASES = {
    # ---- classifier, Adam
    "clf-adam-relu-multiclass-bs32": (
        "clf", "multiclass",
        dict(hidden_layer_sizes=(8,), learning_rate_init=0.01, batch_size=32, alpha=1e-3,
             max_iter=12), ()),
    "clf-adam-tanh-binary-auto-batch-short-last": (  # n=230: batches of 200 and 30
        "clf", "binary-n230",
        dict(hidden_layer_sizes=(6, 5), activation="tanh", learning_rate_init=0.01,
             max_iter=8), ()),
    "clf-adam-logistic-strings-noshuffle-int-hidden": (
        "clf", "binary-strings",
        dict(hidden_layer_sizes=7, activation="logistic", batch_size=50, shuffle=False,
             learning_rate_init=0.02, max_iter=10), ()),
    "clf-adam-identity-multiclass-strings": (
        "clf", "multiclass-strings",
        dict(hidden_layer_sizes=(6,), activation="identity", batch_size=45,
             learning_rate_init=0.01, alpha=0.05, max_iter=10), ()),
    "clf-adam-multilabel": (
        "clf", "multilabel",
        dict(hidden_layer_sizes=(8,), activation="tanh", batch_size=32,
             learning_rate_init=0.01, max_iter=10), ()),
    "clf-adam-sample-weight": (
        "clf", "multiclass",
        dict(hidden_layer_sizes=(8,), batch_size=32, learning_rate_init=0.01, max_iter=10),
        ("sample_weight",)),
    "clf-adam-early-stopping": (
        "clf", "multiclass",
        dict(hidden_layer_sizes=(8,), batch_size=20, learning_rate_init=0.02,
             early_stopping=True, validation_fraction=0.25, n_iter_no_change=3,
             max_iter=60), ()),
    "clf-adam-early-stopping-multilabel": (  # no stratification for multilabel
        "clf", "multilabel",
        dict(hidden_layer_sizes=(8,), batch_size=20, learning_rate_init=0.01,
             early_stopping=True, validation_fraction=0.2, max_iter=8), ()),
    "clf-adam-sparse-input": (
        "clf", "multiclass",
        dict(hidden_layer_sizes=(8,), batch_size=32, learning_rate_init=0.01, max_iter=6),
        ("sparse",)),
    # ---- classifier, SGD
    "clf-sgd-nesterov-constant-tanh": (
        "clf", "multiclass",
        dict(hidden_layer_sizes=(8,), solver="sgd", activation="tanh", learning_rate_init=0.05,
             momentum=0.9, nesterovs_momentum=True, batch_size=40, alpha=1e-2,
             max_iter=10), ()),
    "clf-sgd-momentum-invscaling-identity": (
        "clf", "multiclass",
        dict(hidden_layer_sizes=(8,), solver="sgd", activation="identity",
             learning_rate="invscaling", learning_rate_init=0.5, power_t=0.4, momentum=0.5,
             nesterovs_momentum=False, batch_size=32, max_iter=10), ()),
    "clf-sgd-adaptive-relu": (  # learning rate divided by 5 until <= 1e-6, then stop
        "clf", "multiclass",
        dict(hidden_layer_sizes=(8,), solver="sgd", learning_rate="adaptive",
             learning_rate_init=0.1, momentum=0.9, tol=0.05, n_iter_no_change=2,
             batch_size=32, max_iter=100), ()),
    "clf-sgd-plain-logistic-noshuffle": (
        "clf", "binary-n230",
        dict(hidden_layer_sizes=(6,), solver="sgd", activation="logistic", momentum=0.0,
             learning_rate_init=0.2, shuffle=False, batch_size=64, max_iter=10), ()),
    "clf-sgd-sample-weight-early-stopping": (
        "clf", "multiclass",
        dict(hidden_layer_sizes=(8,), solver="sgd", learning_rate_init=0.05, batch_size=25,
             early_stopping=True, validation_fraction=0.2, n_iter_no_change=2,
             max_iter=25), ("sample_weight",)),
    # ---- classifier, L-BFGS
    "clf-lbfgs-tanh-multiclass": (
        "clf", "multiclass",
        dict(hidden_layer_sizes=(8,), solver="lbfgs", activation="tanh", alpha=1e-2,
             max_iter=30), ()),
    "clf-lbfgs-logistic-binary-sample-weight": (
        "clf", "binary-strings",
        dict(hidden_layer_sizes=(5,), solver="lbfgs", activation="logistic", max_iter=30),
        ("sample_weight",)),
    "clf-lbfgs-converges": (  # tol large enough that L-BFGS stops by itself
        "clf", "binary-n230",
        dict(hidden_layer_sizes=(3,), solver="lbfgs", activation="tanh", alpha=1.0, tol=1e-3,
             max_iter=200), ()),
    # ---- regressor
    "reg-adam-relu-bs25-short-last": (  # n=110: 4 batches of 25 and one of 10
        "reg", "regression",
        dict(hidden_layer_sizes=(8,), batch_size=25, learning_rate_init=0.01, alpha=1e-3,
             max_iter=12), ()),
    "reg-adam-two-hidden-multioutput-auto-batch": (
        "reg", "regression-n230-2out",
        dict(hidden_layer_sizes=(7, 4), activation="tanh", learning_rate_init=0.01,
             max_iter=8), ()),
    "reg-sgd-nesterov-tanh-multioutput": (
        "reg", "regression-2out",
        dict(hidden_layer_sizes=(8,), solver="sgd", activation="tanh", learning_rate_init=0.01,
             batch_size=20, max_iter=10), ()),
    "reg-sgd-invscaling-logistic-noshuffle": (
        "reg", "regression",
        dict(hidden_layer_sizes=(8,), solver="sgd", activation="logistic",
             learning_rate="invscaling", learning_rate_init=0.5, nesterovs_momentum=False,
             shuffle=False, batch_size=16, max_iter=10), ()),
    "reg-sgd-adaptive-identity": (
        "reg", "regression",
        dict(hidden_layer_sizes=(6,), solver="sgd", activation="identity",
             learning_rate="adaptive", learning_rate_init=0.01, tol=0.5, n_iter_no_change=1,
             batch_size=20, max_iter=100), ()),
    "reg-sgd-sample-weight": (
        "reg", "regression",
        dict(hidden_layer_sizes=(8,), solver="sgd", learning_rate_init=0.01, batch_size=30,
             max_iter=10), ("sample_weight",)),
    "reg-adam-early-stopping": (
        "reg", "regression",
        dict(hidden_layer_sizes=(8,), learning_rate_init=0.05, batch_size=10,
             early_stopping=True, validation_fraction=0.2, n_iter_no_change=3,
             max_iter=60), ()),
    "reg-adam-poisson": (
        "reg", "poisson",
        dict(loss="poisson", hidden_layer_sizes=(8,), activation="tanh", batch_size=32,
             learning_rate_init=0.01, alpha=1e-3, max_iter=10), ()),
    "reg-sgd-poisson-sample-weight": (
        "reg", "poisson",
        dict(loss="poisson", hidden_layer_sizes=(6,), solver="sgd", learning_rate_init=0.005,
             batch_size=30, max_iter=8), ("sample_weight",)),
    "reg-lbfgs-relu-multioutput": (
        "reg", "regression-2out",
        dict(hidden_layer_sizes=(8,), solver="lbfgs", max_iter=30), ()),
    "reg-lbfgs-poisson": (
        "reg", "poisson",
        dict(loss="poisson", hidden_layer_sizes=(5,), solver="lbfgs", activation="tanh",
             max_iter=30), ()),
}


def case_inputs(case):
    kind, data, params, opts = CASES[case]
    X, y = DATA[data]()
    fit_kw = {}
    if "sample_weight" in opts:
        fit_kw["sample_weight"] = make_weights(X.shape[0])
    if "sparse" in opts:
        X = X.copy()
        X[np.abs(X) < 0.6] = 0.0
        X = sp.csr_matrix(X)
    params = dict(params, random_state=0)
    return kind, X, y, params, fit_kw


@lru_cache(maxsize=None)
def fitted_pair(case):
    """(fastbp fit, sklearn fit, fastbp warnings, sklearn warnings), fitted once."""
    kind, X, y, params, fit_kw = case_inputs(case)
    fb_cls, sk_cls = (MLPClassifier, SkC) if kind == "clf" else (MLPRegressor, SkR)
    sk = sk_cls(**params)
    sk_rec = fit_recording(sk, X, y, **fit_kw)
    fb = fb_cls(**params)
    fb_rec = fit_recording(fb, X, y, **fit_kw)
    return fb, sk, fb_rec, sk_rec


def rtol_for(case):
    return RTOL_LBFGS if CASES[case][2].get("solver") == "lbfgs" else RTOL


# ---------------------------------------------------------- 1. constructor parameters
def test_exported_from_package():
    assert fastbp.MLPClassifier is MLPClassifier
    assert fastbp.MLPRegressor is MLPRegressor
    assert is_classifier(MLPClassifier()) and not is_regressor(MLPClassifier())
    assert is_regressor(MLPRegressor()) and not is_classifier(MLPRegressor())


@pytest.mark.parametrize("fb_cls, sk_cls, extras", [
    (MLPClassifier, SkC, {"class_weight": None, "dropout": 0.0, "dtype": None, "n_threads": None}),
    (MLPRegressor, SkR, {"dropout": 0.0, "dtype": None, "n_threads": None}),
], ids=["classifier", "regressor"])
def test_get_params_defaults_match_sklearn(fb_cls, sk_cls, extras):
    fb_params = fb_cls().get_params()
    sk_params = sk_cls().get_params()
    assert set(fb_params) == set(sk_params) | set(extras)
    for name, default in sk_params.items():
        assert fb_params[name] == default, f"default of {name}: {fb_params[name]!r} != {default!r}"
    for name, default in extras.items():  # defaults that keep sklearn's behaviour
        assert fb_params[name] == default, f"extra parameter {name} must default to {default!r}"


@pytest.mark.parametrize("fb_cls, sk_cls", [(MLPClassifier, SkC), (MLPRegressor, SkR)],
                         ids=["classifier", "regressor"])
def test_positional_parameters_match_sklearn(fb_cls, sk_cls):
    """Positional calls such as ``MLPRegressor("poisson", (10,))`` mean the same."""
    def positional(cls):
        return [p.name for p in inspect.signature(cls.__init__).parameters.values()
                if p.kind == p.POSITIONAL_OR_KEYWORD and p.name != "self"]
    assert positional(fb_cls) == positional(sk_cls)


def test_regressor_loss_positional_meaning():
    X, y = make_poisson()
    fb = MLPRegressor("poisson", (5,), "tanh", max_iter=5, random_state=0)
    sk = SkR("poisson", (5,), "tanh", max_iter=5, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fb.fit(X, y)
        sk.fit(X, y)
    assert fb.out_activation_ == sk.out_activation_ == "exp"
    assert_same_state(fb, sk)


@pytest.mark.parametrize("fb_cls, params", [
    (MLPClassifier, dict(activation="bogus")),
    (MLPClassifier, dict(solver="newton")),
    (MLPClassifier, dict(alpha=-1.0)),
    (MLPClassifier, dict(batch_size=0)),
    (MLPClassifier, dict(learning_rate="cyclic")),
    (MLPClassifier, dict(learning_rate_init=0.0)),
    (MLPClassifier, dict(max_iter=0)),
    (MLPClassifier, dict(momentum=1.5)),
    (MLPClassifier, dict(validation_fraction=1.0)),
    (MLPClassifier, dict(beta_1=1.0)),
    (MLPClassifier, dict(n_iter_no_change=0)),
    (MLPClassifier, dict(hidden_layer_sizes=(4, 0))),
    (MLPRegressor, dict(loss="huber")),
    (MLPRegressor, dict(activation="softmax")),
    (MLPRegressor, dict(epsilon=0.0)),
])
def test_invalid_parameters_raise_like_sklearn(fb_cls, params):
    X, y = make_classification(n=30)
    sk_cls = SkC if fb_cls is MLPClassifier else SkR
    with pytest.raises(ValueError):  # sklearn's own check, so the case list stays honest
        sk_cls(**params).fit(X, y)
    with pytest.raises(ValueError):
        fb_cls(**params).fit(X, y)


@pytest.mark.parametrize("fb_cls", [MLPClassifier, MLPRegressor])
@pytest.mark.parametrize("activation", ["leaky_relu", "elu", "softplus"])
def test_extra_activations_are_accepted(fb_cls, activation):
    assert fb_cls(activation=activation).get_params()["activation"] == activation
    X, y = make_classification(n=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fb_cls(activation=activation, hidden_layer_sizes=(4,), max_iter=2,
               random_state=0).fit(X, y)


# ------------------------------------------------- 2. same numbers as scikit-learn
@pytest.mark.parametrize("case", list(CASES))
def test_fit_matches_sklearn(case):
    fb, sk, _, _ = fitted_pair(case)
    assert_same_state(fb, sk, rtol_for(case), case)


@pytest.mark.parametrize("case", list(CASES))
def test_convergence_warning_matches_sklearn(case):
    _, _, fb_rec, sk_rec = fitted_pair(case)
    n_fb, n_sk = n_convergence_warnings(fb_rec), n_convergence_warnings(sk_rec)
    assert n_fb == n_sk, (f"fastbp raised {n_fb} ConvergenceWarning(s), sklearn {n_sk}: "
                          f"{[str(w.message) for w in fb_rec]}")


def test_case_table_covers_both_warning_outcomes():
    """Some cases stop by themselves (no warning), others run out of iterations."""
    outcomes = {n_convergence_warnings(fitted_pair(c)[3]) > 0 for c in CASES}
    assert outcomes == {True, False}
    stopped_early = {c for c in CASES
                     if CASES[c][2].get("solver") != "lbfgs"
                     and fitted_pair(c)[1].n_iter_ < CASES[c][2]["max_iter"]}
    assert {"clf-sgd-adaptive-relu", "clf-adam-early-stopping",
            "reg-sgd-adaptive-identity", "reg-adam-early-stopping"} <= stopped_early


@ignore_convergence
def test_batch_size_larger_than_data_warns_and_clips_like_sklearn():
    X, y = make_classification(n=60)
    params = dict(hidden_layer_sizes=(5,), batch_size=500, max_iter=4, random_state=0)
    sk, fb = SkC(**params), MLPClassifier(**params)
    sk_rec, fb_rec = fit_recording(sk, X, y), fit_recording(fb, X, y)

    def user_warnings(rec):
        return [w for w in rec if issubclass(w.category, UserWarning)
                and not issubclass(w.category, ConvergenceWarning)]
    assert len(user_warnings(sk_rec)) >= 1
    assert len(user_warnings(fb_rec)) >= 1, "no warning that batch_size is clipped"
    assert_same_state(fb, sk)


# ------------------------------------------- 3. predictions and fitted attributes
@pytest.mark.parametrize("case", list(CASES))
def test_predictions_match_sklearn(case):
    fb, sk, _, _ = fitted_pair(case)
    kind, X, y, _, fit_kw = case_inputs(case)
    rtol = rtol_for(case)
    assert fb.n_features_in_ == sk.n_features_in_ == X.shape[1]
    assert not hasattr(fb, "feature_names_in_")  # fitted on arrays
    pred_fb, pred_sk = fb.predict(X), sk.predict(X)
    assert pred_fb.shape == pred_sk.shape
    if kind == "clf":
        np.testing.assert_array_equal(fb.classes_, sk.classes_)
        assert fb.classes_.dtype == sk.classes_.dtype
        np.testing.assert_array_equal(pred_fb, pred_sk)
        assert pred_fb.dtype == pred_sk.dtype
        proba = fb.predict_proba(X)
        assert proba.dtype == np.float64
        assert_rel(proba, sk.predict_proba(X), rtol, "predict_proba")
        assert_rel(fb.predict_log_proba(X), sk.predict_log_proba(X), rtol,
                   "predict_log_proba")
    else:
        assert_rel(pred_fb, pred_sk, rtol, "predict")
    for sw in (None, fit_kw.get("sample_weight", make_weights(X.shape[0], seed=11))):
        s_fb, s_sk = fb.score(X, y, sample_weight=sw), sk.score(X, y, sample_weight=sw)
        assert abs(s_fb - s_sk) <= 10 * rtol, f"score {s_fb} != sklearn {s_sk}"


@pytest.mark.parametrize("case, out_activation", [
    ("clf-adam-relu-multiclass-bs32", "softmax"),
    ("clf-adam-tanh-binary-auto-batch-short-last", "logistic"),
    ("clf-adam-multilabel", "logistic"),
    ("reg-adam-relu-bs25-short-last", "identity"),
    ("reg-adam-poisson", "exp"),
])
def test_fitted_attributes(case, out_activation):
    fb, sk, _, _ = fitted_pair(case)
    kind, X, y, params, _ = case_inputs(case)
    assert fb.out_activation_ == out_activation
    hidden = params["hidden_layer_sizes"]
    assert fb.n_layers_ == len(hidden) + 2
    n_out = {"clf-adam-relu-multiclass-bs32": 3, "clf-adam-multilabel": 3}.get(case, 1)
    assert fb.n_outputs_ == n_out
    assert [c.shape for c in fb.coefs_] == [c.shape for c in sk.coefs_]
    assert [b.shape for b in fb.intercepts_] == [b.shape for b in sk.intercepts_]
    if kind == "clf":  # binary: two columns although there is one output unit
        assert fb.predict_proba(X[:7]).shape == (7, len(fb.classes_))


def test_string_labels_round_trip():
    fb, sk, _, _ = fitted_pair("clf-adam-identity-multiclass-strings")
    X, y = DATA["multiclass-strings"]()
    assert list(fb.classes_) == ["a", "b", "c"]
    assert set(fb.predict(X)) <= {"a", "b", "c"}
    np.testing.assert_array_equal(fb.predict(X), sk.predict(X))


def test_unfitted_estimator_raises_not_fitted():
    from sklearn.exceptions import NotFittedError
    X, _ = make_classification(n=10)
    for est in (MLPClassifier(), MLPRegressor()):
        with pytest.raises(NotFittedError):
            est.predict(X)
    with pytest.raises(NotFittedError):
        MLPClassifier().predict_proba(X)


@ignore_convergence
def test_wrong_number_of_features_raises():
    fb, _, _, _ = fitted_pair("clf-adam-relu-multiclass-bs32")
    with pytest.raises(ValueError):
        fb.predict(np.zeros((3, 4)))


# --------------------------------------------------------- 4. partial_fit, warm_start
def test_partial_fit_classifier_matches_sklearn():
    X, y = make_classification(n=150, seed=12)
    order = np.argsort(y == 2, kind="stable")  # first chunk lacks class 2
    X, y = X[order], y[order]
    chunks = np.array_split(np.arange(len(y)), 3)
    params = dict(hidden_layer_sizes=(8,), learning_rate_init=0.01, batch_size=20,
                  random_state=0)
    fb, sk = MLPClassifier(**params), SkC(**params)
    w = make_weights(len(y))
    for i, idx in enumerate(chunks):
        kw = {"classes": np.array([0, 1, 2])} if i == 0 else {}
        if i == 1:
            kw["sample_weight"] = w[idx]
        sk.partial_fit(X[idx], y[idx], **kw)
        fb.partial_fit(X[idx], y[idx], **kw)
        assert_same_state(fb, sk, what=f"after partial_fit #{i + 1}")
        np.testing.assert_array_equal(fb.classes_, [0, 1, 2])
    assert len(fb.loss_curve_) == 3
    assert_rel(fb.predict_proba(X), sk.predict_proba(X), RTOL, "predict_proba")


def test_partial_fit_regressor_matches_sklearn():
    X, y = make_regression(n=120, n_out=2, seed=13)
    params = dict(hidden_layer_sizes=(6,), solver="sgd", learning_rate_init=0.01,
                  batch_size=16, random_state=0)
    fb, sk = MLPRegressor(**params), SkR(**params)
    for i, idx in enumerate(np.array_split(np.arange(len(y)), 3)):
        sk.partial_fit(X[idx], y[idx])
        fb.partial_fit(X[idx], y[idx])
        assert_same_state(fb, sk, what=f"after partial_fit #{i + 1}")
    assert_rel(fb.predict(X), sk.predict(X), RTOL, "predict")


def test_partial_fit_multilabel_matches_sklearn():
    X, Y = make_multilabel(n=90, seed=14)
    params = dict(hidden_layer_sizes=(5,), learning_rate_init=0.01, random_state=0)
    fb, sk = MLPClassifier(**params), SkC(**params)
    for i, idx in enumerate(np.array_split(np.arange(len(Y)), 3)):
        kw = {"classes": np.arange(3)} if i == 0 else {}
        sk.partial_fit(X[idx], Y[idx], **kw)
        fb.partial_fit(X[idx], Y[idx], **kw)
        assert_same_state(fb, sk, what=f"after partial_fit #{i + 1}")


def test_partial_fit_errors_like_sklearn():
    X, y = make_classification(n=30)
    with pytest.raises(ValueError):  # classes= required on the first call
        MLPClassifier().partial_fit(X, y)
    fb = MLPClassifier(hidden_layer_sizes=(3,)).partial_fit(X, y, classes=[0, 1, 2])
    with pytest.raises(ValueError):  # a class not announced
        fb.partial_fit(X, y + 5)
    with pytest.raises(ValueError):  # early stopping makes no sense incrementally
        MLPRegressor(early_stopping=True).partial_fit(X, y.astype(float))
    assert not hasattr(SkC(solver="lbfgs"), "partial_fit")  # sklearn's behaviour
    assert not hasattr(MLPClassifier(solver="lbfgs"), "partial_fit")
    assert hasattr(MLPClassifier(solver="sgd"), "partial_fit")


@ignore_convergence
@pytest.mark.parametrize("kind, solver", [("clf", "adam"), ("clf", "sgd"), ("reg", "adam"),
                                          ("reg", "sgd"), ("clf", "lbfgs")])
def test_warm_start_continues_like_sklearn(kind, solver):
    if kind == "clf":
        (X, y), fb_cls, sk_cls = make_classification(seed=15), MLPClassifier, SkC
    else:
        (X, y), fb_cls, sk_cls = make_regression(seed=16), MLPRegressor, SkR
    params = dict(hidden_layer_sizes=(6,), solver=solver, learning_rate_init=0.01,
                  batch_size=32, warm_start=True, max_iter=4, random_state=0)
    fb, sk = fb_cls(**params), sk_cls(**params)
    rtol = RTOL_LBFGS if solver == "lbfgs" else RTOL
    for i, max_iter in enumerate((4, 4, 3)):
        fb.set_params(max_iter=max_iter)
        sk.set_params(max_iter=max_iter)
        rows = slice(0, 80) if i == 1 else slice(None)  # a second fit on other data
        n_sk = n_convergence_warnings(fit_recording(sk, X[rows], y[rows]))
        n_fb = n_convergence_warnings(fit_recording(fb, X[rows], y[rows]))
        assert n_fb == n_sk
        assert_same_state(fb, sk, rtol, what=f"after warm fit #{i + 1}")
    if solver != "lbfgs":
        assert len(fb.loss_curve_) == 11
    # switching warm_start off starts over
    fb.set_params(warm_start=False)
    sk.set_params(warm_start=False)
    fb.fit(X, y)
    sk.fit(X, y)
    assert_same_state(fb, sk, rtol, what="cold refit")


def test_warm_start_rejects_new_classes():
    X, y = make_classification(n=60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fb = MLPClassifier(hidden_layer_sizes=(3,), warm_start=True, max_iter=2).fit(X, y)
        with pytest.raises(ValueError):
            fb.fit(X, np.where(y == 2, 7, y))


# ---------------------------------------------------------------------- 5. dtypes
@ignore_convergence
@pytest.mark.parametrize("kind", ["clf", "reg"])
def test_float32_input_stays_float32_like_sklearn(kind):
    if kind == "clf":
        (X, y), fb_cls, sk_cls = make_classification(), MLPClassifier, SkC
    else:
        (X, y), fb_cls, sk_cls = make_regression(), MLPRegressor, SkR
    X32 = X.astype(np.float32)
    params = dict(hidden_layer_sizes=(6,), learning_rate_init=0.01, batch_size=32,
                  max_iter=3, random_state=0)
    fb, sk = fb_cls(**params).fit(X32, y), sk_cls(**params).fit(X32, y)
    for a, e in zip(fb.coefs_ + fb.intercepts_, sk.coefs_ + sk.intercepts_):
        assert a.dtype == e.dtype == np.float32
        assert_rel(a, e, 1e-4, "float32 parameters")
    out = fb.predict_proba(X32) if kind == "clf" else fb.predict(X32)
    ref = sk.predict_proba(X32) if kind == "clf" else sk.predict(X32)
    assert out.dtype == ref.dtype == np.float32
    assert_rel(out, ref, 1e-4, "float32 outputs")
    assert_rel(fb.loss_curve_, sk.loss_curve_, 1e-4, "float32 loss_curve_")


@ignore_convergence
@pytest.mark.parametrize("kind", ["clf", "reg"])
def test_lbfgs_on_float32_returns_float64_like_sklearn(kind):
    """scikit-learn's lbfgs evaluates in float32 (scipy keeps x0's dtype) but
    unpacks scipy's last iterate, a float64 vector, into coefs_: its
    weights and predictions come back float64 (fastbp's were float32)."""
    if kind == "clf":
        (X, y), fb_cls, sk_cls = make_classification(), MLPClassifier, SkC
    else:
        (X, y), fb_cls, sk_cls = make_regression(), MLPRegressor, SkR
    X32 = X.astype(np.float32)
    params = dict(hidden_layer_sizes=(6,), solver="lbfgs", max_iter=5, random_state=0)
    fb, sk = fb_cls(**params).fit(X32, y), sk_cls(**params).fit(X32, y)
    assert fb.n_iter_ == sk.n_iter_
    for a, e in zip(fb.coefs_ + fb.intercepts_, sk.coefs_ + sk.intercepts_):
        assert a.dtype == e.dtype == np.float64
        assert_rel(a, e, 1e-4, "parameters")
    out = fb.predict_proba(X32) if kind == "clf" else fb.predict(X32)
    ref = sk.predict_proba(X32) if kind == "clf" else sk.predict(X32)
    assert out.dtype == ref.dtype == np.float64
    assert_rel(out, ref, 1e-4, "outputs")
    assert_rel(fb.loss_, sk.loss_, 1e-5, "loss_")


@ignore_convergence
@pytest.mark.parametrize("solver, first, then", [("lbfgs", np.float32, np.float32),
                                                 ("adam", np.float64, np.float32),
                                                 ("sgd", np.float32, np.float64)])
def test_a_warm_started_fit_trains_in_the_weights_dtype_like_sklearn(solver, first, then):
    """scikit-learn's updates keep coefs_'s dtype, and lbfgs returns float64
    weights: a second fit with warm_start runs in the weights' dtype, not
    X's. fastbp trained a warm-started lbfgs fit on float32 data in float32
    (and returned float32 weights after Adam on float64 data then float32)."""
    (X, y), params = make_classification(), dict(hidden_layer_sizes=(6,), solver=solver,
                                                 warm_start=True, max_iter=5, random_state=0)
    fb, sk = MLPClassifier(**params).fit(X.astype(first), y), SkC(**params).fit(
        X.astype(first), y)
    # the second fits start from the same weights (lbfgs's first fit in
    # float32 agrees with scikit-learn to float32 precision only)
    fb.coefs_ = [c.copy() for c in sk.coefs_]
    fb.intercepts_ = [b.copy() for b in sk.intercepts_]
    fb.fit(X.astype(then), y)
    sk.fit(X.astype(then), y)
    for a, e in zip(fb.coefs_ + fb.intercepts_, sk.coefs_ + sk.intercepts_):
        assert a.dtype == e.dtype
        assert_rel(a, e, 1e-10 if e.dtype == np.float64 else 1e-5, "parameters")


@pytest.mark.parametrize("kind", ["clf", "reg"])
def test_float32_weights_predict_float64_x_in_float64_like_sklearn(kind):
    """scikit-learn's X @ coefs_ is in their common type: float64 (or int)
    X on float32 weights predicts float64; fastbp predicted in the
    weights' dtype."""
    if kind == "clf":
        (X, y), fb_cls, sk_cls = make_classification(), MLPClassifier, SkC
    else:
        (X, y), fb_cls, sk_cls = make_regression(), MLPRegressor, SkR
    params = dict(hidden_layer_sizes=(6,), max_iter=3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = sk_cls(**params).fit(X.astype(np.float32), y)
        fb = fb_cls(**params).fit(X.astype(np.float32), y)
    fb.coefs_ = [c.copy() for c in sk.coefs_]
    fb.intercepts_ = [b.copy() for b in sk.intercepts_]
    for data in (X, X.astype(np.float32), np.round(X * 10).astype(np.int64)):
        out = fb.predict_proba(data) if kind == "clf" else fb.predict(data)
        ref = sk.predict_proba(data) if kind == "clf" else sk.predict(data)
        assert out.dtype == ref.dtype, data.dtype
        assert_rel(out, ref, 1e-12 if ref.dtype == np.float64 else 1e-5, "outputs")


def test_poisson_refuses_negative_targets():
    """scikit-learn fits them, to a loss of NaN; fastbp says why not."""
    X, y = make_poisson()
    with pytest.raises(ValueError, match="negative which is not allowed for Poisson"):
        MLPRegressor(loss="poisson", hidden_layer_sizes=(4,), max_iter=2,
                     random_state=0).fit(X, y - 1)


@ignore_convergence
@pytest.mark.parametrize("dtype, scale", [(np.float32, 1e25), (np.float64, 1e200)])
def test_lbfgs_refuses_to_return_a_non_finite_loss(dtype, scale):
    """Data so large that the loss overflows at the start: scipy stops at
    once, and loss_ was NaN with only a ConvergenceWarning."""
    X, y = make_regression()
    est = MLPRegressor(hidden_layer_sizes=(4,), solver="lbfgs", max_iter=5, random_state=0)
    with pytest.raises(ValueError, match="non-finite loss"):
        est.fit((X * scale).astype(dtype), y)


@ignore_convergence
@pytest.mark.parametrize("x_dtype", [np.float64, np.int64])
def test_float64_is_the_default(x_dtype):
    X, y = make_classification()
    X = (10 * X).astype(x_dtype)
    fb = MLPClassifier(hidden_layer_sizes=(4,), max_iter=2, random_state=0).fit(X, y)
    assert all(c.dtype == np.float64 for c in fb.coefs_ + fb.intercepts_)
    assert fb.predict_proba(X).dtype == np.float64
    sk = SkC(hidden_layer_sizes=(4,), max_iter=2, random_state=0).fit(X, y)
    assert_same_state(fb, sk)


# -------------------------------------------------------- 6. sklearn estimator checks
#: checks that cannot apply, each with its reason (they would only skip)
NOT_APPLICABLE = {
    # fastbp computes with NumPy arrays and compiled kernels; array-API
    # namespaces (torch, cupy, ...) are not inputs it accepts, like sklearn's MLP.
    "check_array_api_input": "array API inputs are not supported (as in sklearn's MLP)",
    # MLPClassifier has no decision_function (sklearn's neither).
    "check_classifiers_multilabel_output_format_decision_function": "no decision_function",
}


def _checks():
    for est in (MLPClassifier(max_iter=100), MLPRegressor(max_iter=100)):
        for estimator, check in estimator_checks_generator(est, legacy=True):
            name = getattr(check, "func", check).__name__
            if name not in NOT_APPLICABLE:
                yield pytest.param(estimator, check, id=f"{type(estimator).__name__}-{name}")


@ignore_convergence
@pytest.mark.parametrize("estimator, check", list(_checks()))
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_not_applicable_checks_are_only_the_listed_ones():
    names = {getattr(c, "func", c).__name__
             for est in (MLPClassifier(), MLPRegressor())
             for _, c in estimator_checks_generator(est, legacy=True)}
    assert set(NOT_APPLICABLE) <= names  # the exclusions name real checks
    assert len(names) > 40


# --------------------------------------------------- 7. sklearn tooling around it
@ignore_convergence
def test_pipeline_matches_sklearn():
    X, y = make_classification(n=100, seed=17)
    X = 5 * X + 3
    params = dict(hidden_layer_sizes=(6,), learning_rate_init=0.01, max_iter=8, random_state=0)
    fb = make_pipeline(StandardScaler(), MLPClassifier(**params)).fit(X, y)
    sk = make_pipeline(StandardScaler(), SkC(**params)).fit(X, y)
    assert_rel(fb.predict_proba(X), sk.predict_proba(X), RTOL, "pipeline predict_proba")
    np.testing.assert_array_equal(fb.predict(X), sk.predict(X))
    assert fb.score(X, y) == pytest.approx(sk.score(X, y), abs=1e-12)


@ignore_convergence
def test_grid_search_n_jobs_matches_sklearn():
    X, y = make_classification(n=90, seed=18)
    params = dict(hidden_layer_sizes=(5,), learning_rate_init=0.02, max_iter=6, random_state=0)
    grid = {"alpha": [1e-4, 0.5, 5.0]}
    cv = KFold(3, shuffle=True, random_state=0)
    fb = GridSearchCV(MLPClassifier(**params), grid, cv=cv, n_jobs=2,
                      scoring="neg_log_loss").fit(X, y)
    sk = GridSearchCV(SkC(**params), grid, cv=cv, scoring="neg_log_loss").fit(X, y)
    assert_rel(fb.cv_results_["mean_test_score"], sk.cv_results_["mean_test_score"], RTOL,
               "mean_test_score")
    assert fb.best_params_ == sk.best_params_
    assert isinstance(fb.best_estimator_, MLPClassifier)
    assert_rel(fb.predict_proba(X), sk.predict_proba(X), RTOL, "best_estimator_ proba")


@ignore_convergence
def test_cross_val_score_matches_sklearn():
    X, y = make_regression(n=90, seed=19)
    params = dict(hidden_layer_sizes=(5,), learning_rate_init=0.02, max_iter=6, random_state=0)
    fb = cross_val_score(MLPRegressor(**params), X, y, cv=3)
    sk = cross_val_score(SkR(**params), X, y, cv=3)
    assert_rel(fb, sk, RTOL, "cross_val_score")


def test_clone_keeps_parameters_and_drops_fit():
    est = MLPClassifier(hidden_layer_sizes=(3, 2), activation="elu", alpha=0.5,
                        class_weight="balanced", dtype="float32", n_threads=1, max_iter=3,
                        random_state=4)
    X, y = make_classification(n=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X, y)
    twin = clone(est)
    assert type(twin) is MLPClassifier
    assert twin.get_params() == est.get_params()
    assert not hasattr(twin, "coefs_")
    reg = MLPRegressor(loss="poisson", dtype="float64", n_threads=2)
    assert clone(reg).get_params() == reg.get_params()


@pytest.mark.parametrize("case", ["clf-adam-relu-multiclass-bs32", "clf-lbfgs-tanh-multiclass",
                                  "reg-adam-poisson", "reg-sgd-nesterov-tanh-multioutput"])
def test_pickle_round_trip(case):
    fb, _, _, _ = fitted_pair(case)
    kind, X, _, _, _ = case_inputs(case)
    back = pickle.loads(pickle.dumps(fb))
    assert type(back) is type(fb)
    np.testing.assert_array_equal(back.predict(X), fb.predict(X))
    if kind == "clf":
        np.testing.assert_array_equal(back.predict_proba(X), fb.predict_proba(X))
    for a, b in zip(back.coefs_ + back.intercepts_, fb.coefs_ + fb.intercepts_):
        np.testing.assert_array_equal(a, b)


def test_pickle_keeps_training_state():
    """Like sklearn, the optimizer state travels: training continues identically."""
    X, y = make_classification(n=80, seed=20)
    fb = MLPClassifier(hidden_layer_sizes=(5,), learning_rate_init=0.01, random_state=0)
    sk = SkC(hidden_layer_sizes=(5,), learning_rate_init=0.01, random_state=0)
    for est in (fb, sk):
        est.partial_fit(X, y, classes=[0, 1, 2])
        est.partial_fit(X, y)
    fb = pickle.loads(pickle.dumps(fb))
    fb.partial_fit(X, y)
    sk.partial_fit(X, y)
    assert_same_state(fb, sk, what="partial_fit after unpickling")


@pytest.mark.parametrize("first, change", [
    ("partial_fit", dict(learning_rate="invscaling")),
    ("partial_fit", dict(learning_rate="adaptive", tol=10.0, n_iter_no_change=1)),
    ("partial_fit", dict(solver="adam")),
    ("partial_fit", dict(power_t=0.9, learning_rate_init=0.5)),
    ("fit", dict(learning_rate="invscaling")),
])
def test_settings_changed_between_partial_fits_act_as_in_sklearn(first, change):
    """scikit-learn's partial_fit keeps the optimizer it made first, with its
    schedule, initial rate and power_t, until fit makes a new one: a
    set_params in between does not change them (fastbp read the live
    settings, so its rate and weights drifted from scikit-learn's)."""
    X, y = make_regression(n=80, seed=24)
    params = dict(hidden_layer_sizes=(5,), solver="sgd", learning_rate_init=0.05, max_iter=3,
                  learning_rate="invscaling" if "solver" in change else "constant",
                  random_state=0)
    fb, sk = MLPRegressor(**params), SkR(**params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for est in (fb, sk):
            getattr(est, first)(X, y)
            est.set_params(**change)
            for _ in range(4):
                est.partial_fit(X, y)
    assert fb._optimizer.learning_rate == sk._optimizer.learning_rate
    assert_same_state(fb, sk, what=f"partial_fit after set_params({change})")


# ------------------------------------------------------------ 8. fastbp extras
def _split_val(kind, seed):
    if kind == "clf":
        X, y = make_classification(n=200, seed=seed)
    else:
        X, y = make_regression(n=200, seed=seed)
    return X[:140], y[:140], X[140:], y[140:]


def _val_loss(kind, est, X_val, y_val):
    """Data loss on the validation set (alpha=0 in these tests: no L2 term)."""
    if kind == "clf":
        return sk_log_loss(y_val, est.predict_proba(X_val), labels=est.classes_)
    return 0.5 * np.mean((est.predict(X_val) - y_val) ** 2)


def _val_score(kind, est, X_val, y_val):
    return est.score(X_val, y_val)


def _sklearn_epochs(kind, params, X, y, X_val, y_val, n_epochs):
    """Train sklearn epoch by epoch (shuffle=False, so partial_fit retraces fit) and
    record after each epoch: the model, its validation score and validation loss."""
    sk = (SkC if kind == "clf" else SkR)(**params)
    snaps, scores, losses = [], [], []
    for _ in range(n_epochs):
        if kind == "clf":
            sk.partial_fit(X, y, classes=np.unique(y))
        else:
            sk.partial_fit(X, y)
        snaps.append(([c.copy() for c in sk.coefs_], [b.copy() for b in sk.intercepts_]))
        scores.append(_val_score(kind, sk, X_val, y_val))
        losses.append(_val_loss(kind, sk, X_val, y_val))
    return sk, snaps, np.array(scores), np.array(losses)


@pytest.mark.parametrize("kind", ["clf", "reg"])
def test_validation_data_is_recorded_without_early_stopping(kind):
    X, y, X_val, y_val = _split_val(kind, seed=21)
    params = dict(hidden_layer_sizes=(6,), learning_rate_init=0.01, batch_size=35, alpha=0.0,
                  shuffle=False, max_iter=7, random_state=0)
    fb_cls, sk_cls = (MLPClassifier, SkC) if kind == "clf" else (MLPRegressor, SkR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fb = fb_cls(**params).fit(X, y, X_val=X_val, y_val=y_val)
        sk = sk_cls(**params).fit(X, y)
    assert_same_state(fb, sk, what="training must not see the validation set")
    _, _, _, losses = _sklearn_epochs(kind, params, X, y, X_val, y_val, 7)
    assert len(fb.validation_loss_curve_) == fb.n_iter_ == 7
    assert_rel(fb.validation_loss_curve_, losses, RTOL, "validation_loss_curve_")


@pytest.mark.parametrize("case", ["unknown_labels", "labels_of_another_type", "indicator_width",
                                  "outputs", "one_row_early_stopping"])
def test_validation_targets_that_do_not_fit_the_model_are_refused(case):
    """y_val must be in y's terms: labels the classifier was trained on (a
    label binarizer maps others to zero rows, which scored a loss of 0), a
    multi-label matrix of the same width, the regressor's number of
    outputs; and early stopping needs 2 rows (one row's r2 is nan, so the
    initial weights were kept)."""
    kind = "reg" if case in ("outputs", "one_row_early_stopping") else "clf"
    X, y, X_val, y_val = _split_val(kind, seed=23)
    params = dict(hidden_layer_sizes=(4,), max_iter=3, random_state=0)
    if case == "unknown_labels":
        y_val = y_val.copy()
        y_val[0] = 7
        match = r"y_val has labels the model was not trained on: \[7\]"
    elif case == "labels_of_another_type":
        y_val = np.array(["a", "b"])[y_val % 2]
        match = "not trained on"
    elif case == "indicator_width":
        y = np.stack([y % 2, (y + 1) % 2, y % 2], axis=1)
        y_val = np.stack([y_val % 2, y_val % 2], axis=1)
        match = "indicator matrix with 3 columns"
    elif case == "outputs":
        y_val = np.stack([y_val] * 3, axis=1)
        match = r"1 output\(s\) per sample"
    else:
        X_val, y_val = X_val[:1], y_val[:1]
        params["early_stopping"] = True
        match = "validation set is too small"
    est = (MLPClassifier if kind == "clf" else MLPRegressor)(**params)
    with pytest.raises(ValueError, match=match):
        est.fit(X, y, X_val=X_val, y_val=y_val)


@pytest.mark.parametrize("kind", ["clf", "reg"])
def test_validation_data_drives_early_stopping(kind):
    X, y, X_val, y_val = _split_val(kind, seed=22)
    n_iter_no_change, tol, max_iter = 2, 1e-3, 60
    params = dict(hidden_layer_sizes=(6,), learning_rate_init=0.05, batch_size=35, alpha=0.0,
                  shuffle=False, random_state=0, tol=tol)
    fb_cls = MLPClassifier if kind == "clf" else MLPRegressor
    fb = fb_cls(**params, early_stopping=True, n_iter_no_change=n_iter_no_change,
                validation_fraction=0.3, max_iter=max_iter)
    rec = fit_recording(fb, X, y, X_val=X_val, y_val=y_val)

    sk, snaps, scores, losses = _sklearn_epochs(kind, params, X, y, X_val, y_val, max_iter)
    # sklearn's early-stopping rule applied to the external validation scores
    best, best_epoch, count, n_iter = -np.inf, 0, 0, max_iter
    for i, s in enumerate(scores):
        count = count + 1 if s < best + tol else 0
        if s > best:
            best, best_epoch = s, i
        if count > n_iter_no_change:
            n_iter = i + 1
            break
    assert n_iter < max_iter, "test data must make early stopping trigger"
    assert n_convergence_warnings(rec) == 0
    assert fb.n_iter_ == n_iter
    assert fb.t_ == n_iter * X.shape[0]  # all of X is trained on: no split was taken
    assert_rel(fb.loss_curve_, sk.loss_curve_[:n_iter], RTOL, "loss_curve_")
    assert_rel(fb.validation_scores_, scores[:n_iter], RTOL, "validation_scores_")
    assert_rel(fb.best_validation_score_, best, RTOL, "best_validation_score_")
    assert len(fb.validation_loss_curve_) == n_iter
    assert_rel(fb.validation_loss_curve_, losses[:n_iter], RTOL, "validation_loss_curve_")
    coefs, intercepts = snaps[best_epoch]  # best weights restored
    for a, e in zip(fb.coefs_ + fb.intercepts_, coefs + intercepts):
        assert_rel(a, e, RTOL, "restored best parameters")


def test_validation_loss_curve_absent_without_validation_data():
    fb, _, _, _ = fitted_pair("clf-adam-relu-multiclass-bs32")
    curve = getattr(fb, "validation_loss_curve_", None)
    assert curve is None or len(curve) == 0


@pytest.mark.parametrize("solver", ["adam", "sgd", "lbfgs"])
@pytest.mark.parametrize("class_weight", ["balanced", "dict"])
def test_class_weight_equals_sklearn_sample_weight(solver, class_weight):
    X, y = make_classification(n=150, seed=23)
    keep = (y != 2) | (np.arange(len(y)) % 4 == 0)  # make class 2 rare
    X, y = X[keep], y[keep]
    cw = "balanced" if class_weight == "balanced" else {0: 1.0, 1: 3.0, 2: 0.5}
    params = dict(hidden_layer_sizes=(6,), solver=solver, learning_rate_init=0.01,
                  batch_size=25, max_iter=8 if solver != "lbfgs" else 25, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fb = MLPClassifier(class_weight=cw, **params).fit(X, y)
        sk = SkC(**params).fit(X, y, sample_weight=compute_sample_weight(cw, y))
    rtol = RTOL_LBFGS if solver == "lbfgs" else RTOL
    assert_same_state(fb, sk, rtol)
    assert_rel(fb.predict_proba(X), sk.predict_proba(X), rtol, "predict_proba")


@ignore_convergence
def test_class_weight_multiplies_sample_weight_and_accepts_string_labels():
    X, y = make_classification(n=120, k=2, seed=24, labels=["no", "yes"])
    cw = {"no": 0.4, "yes": 2.0}
    sw = make_weights(len(y), seed=25)
    params = dict(hidden_layer_sizes=(5,), learning_rate_init=0.01, batch_size=30,
                  max_iter=6, random_state=0)
    fb = MLPClassifier(class_weight=cw, **params).fit(X, y, sample_weight=sw)
    sk = SkC(**params).fit(X, y, sample_weight=sw * compute_sample_weight(cw, y))
    assert_same_state(fb, sk)


@ignore_convergence
def test_class_weight_none_is_sklearn():
    X, y = make_classification(n=80, seed=26)
    params = dict(hidden_layer_sizes=(5,), max_iter=5, random_state=0)
    assert_same_state(MLPClassifier(class_weight=None, **params).fit(X, y),
                      SkC(**params).fit(X, y))


EXTRA_ACTIVATIONS = {
    "leaky_relu": lambda z: np.where(z > 0, z, 0.01 * z),
    "elu": lambda z: np.where(z > 0, z, np.expm1(np.minimum(z, 0))),
    "softplus": lambda z: np.where(z > 20, z, np.log1p(np.exp(np.minimum(z, 20)))),
}


def _forward(coefs, intercepts, X, act, out):
    a = X
    for i, (W, b) in enumerate(zip(coefs, intercepts)):
        a = a @ W + b
        if i < len(coefs) - 1:
            a = act(a)
    if out == "softmax":
        a = np.exp(a - a.max(axis=1, keepdims=True))
        return a / a.sum(axis=1, keepdims=True)
    if out == "logistic":
        return 1 / (1 + np.exp(-a))
    return np.exp(a) if out == "exp" else a


@ignore_convergence
@pytest.mark.parametrize("activation", list(EXTRA_ACTIVATIONS))
def test_extra_activation_forward_pass(activation):
    X, y = make_classification(n=80, seed=27)
    fb = MLPClassifier(hidden_layer_sizes=(6, 4), activation=activation, max_iter=3,
                       random_state=0).fit(X, y)
    expected = _forward(fb.coefs_, fb.intercepts_, X, EXTRA_ACTIVATIONS[activation], "softmax")
    assert_rel(fb.predict_proba(X), expected, 1e-12, "predict_proba")
    Xr, yr = make_regression(n=60, seed=28)
    reg = MLPRegressor(hidden_layer_sizes=(5,), activation=activation, max_iter=3,
                       random_state=0).fit(Xr, yr)
    expected = _forward(reg.coefs_, reg.intercepts_, Xr, EXTRA_ACTIVATIONS[activation],
                        "identity").ravel()
    assert_rel(reg.predict(Xr), expected, 1e-12, "predict")


@pytest.mark.parametrize("activation", list(EXTRA_ACTIVATIONS))
def test_extra_activation_full_batch_step_follows_the_gradient(activation):
    """One full-batch SGD step without momentum moves by -lr * (numerical gradient)."""
    X, y = make_classification(n=50, d=4, seed=29)
    Y = np.eye(3)[y]
    alpha, lr = 0.05, 0.1
    fb = MLPClassifier(hidden_layer_sizes=(5,), activation=activation, solver="sgd",
                       momentum=0.0, learning_rate_init=lr, alpha=alpha, shuffle=False,
                       max_iter=1, warm_start=True, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fb.fit(X, y)
        p0 = np.concatenate([p.ravel() for p in fb.coefs_ + fb.intercepts_])
        fb.fit(X, y)
    p1 = np.concatenate([p.ravel() for p in fb.coefs_ + fb.intercepts_])
    shapes = [p.shape for p in fb.coefs_ + fb.intercepts_]

    def loss(p):
        parts, k = [], 0
        for s in shapes:
            n = int(np.prod(s))
            parts.append(p[k:k + n].reshape(s))
            k += n
        coefs, intercepts = parts[:2], parts[2:]
        P = _forward(coefs, intercepts, X, EXTRA_ACTIVATIONS[activation], "softmax")
        l2 = sum(float((W ** 2).sum()) for W in coefs)
        return -np.mean(np.sum(Y * np.log(P), axis=1)) + 0.5 * alpha * l2 / len(y)

    h = 1e-6
    grad = np.array([(loss(p0 + h * e) - loss(p0 - h * e)) / (2 * h)
                     for e in np.eye(p0.size)])
    assert_rel((p0 - p1) / lr, grad, 1e-6, "step / learning rate vs numerical gradient")
    assert fb.loss_curve_[-1] == pytest.approx(loss(p0), rel=1e-10)


@ignore_convergence
@pytest.mark.parametrize("activation", list(EXTRA_ACTIVATIONS))
@pytest.mark.parametrize("kind", ["clf", "reg"])
def test_extra_activation_trains(kind, activation):
    if kind == "clf":
        (X, y), est = make_classification(n=150, seed=30), MLPClassifier
    else:
        (X, y), est = make_regression(n=150, seed=31), MLPRegressor
    fb = est(hidden_layer_sizes=(10,), activation=activation, learning_rate_init=0.01,
             batch_size=30, max_iter=30, random_state=0).fit(X, y)
    curve = np.asarray(fb.loss_curve_)
    assert len(curve) == 30 and np.isfinite(curve).all()
    assert curve[-1] < 0.7 * curve[0]
    assert fb.score(X, y) > (0.7 if kind == "clf" else 0.5)


@ignore_convergence
@pytest.mark.parametrize("kind", ["clf", "reg"])
def test_dtype_float32_forces_float32(kind):
    if kind == "clf":
        (X, y), fb_cls, sk_cls = make_classification(), MLPClassifier, SkC
    else:
        (X, y), fb_cls, sk_cls = make_regression(), MLPRegressor, SkR
    params = dict(hidden_layer_sizes=(6,), learning_rate_init=0.01, batch_size=32,
                  max_iter=3, random_state=0)
    fb = fb_cls(dtype="float32", **params).fit(X, y)  # float64 X
    sk = sk_cls(**params).fit(X.astype(np.float32), y)
    for a, e in zip(fb.coefs_ + fb.intercepts_, sk.coefs_ + sk.intercepts_):
        assert a.dtype == np.float32
        assert_rel(a, e, 1e-4, "float32 parameters")
    out = fb.predict_proba(X) if kind == "clf" else fb.predict(X)
    assert out.dtype == np.float32


@ignore_convergence
def test_dtype_float64_forces_float64():
    X, y = make_classification()
    X32 = X.astype(np.float32)
    params = dict(hidden_layer_sizes=(6,), learning_rate_init=0.01, max_iter=4, random_state=0)
    fb = MLPClassifier(dtype="float64", **params).fit(X32, y)
    sk = SkC(**params).fit(X32.astype(np.float64), y)
    assert_same_state(fb, sk)
    assert fb.predict_proba(X32).dtype == np.float64


@ignore_convergence
@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_n_threads_1_matches_default(solver):
    X, y = make_classification(n=200, d=8, seed=32)
    params = dict(hidden_layer_sizes=(16, 8), solver=solver, batch_size=50, max_iter=6,
                  random_state=0)
    a = MLPClassifier(n_threads=1, **params).fit(X, y)
    b = MLPClassifier(**params).fit(X, y)
    c = MLPClassifier(n_threads=2, **params).fit(X, y)
    for other in (b, c):
        for p, q in zip(a.coefs_ + a.intercepts_, other.coefs_ + other.intercepts_):
            assert_rel(p, q, 1e-9, "n_threads parameters")
    assert_rel(a.predict_proba(X), b.predict_proba(X), 1e-9, "n_threads predict_proba")


# ------------------------------------------------------------------ dropout extra
@ignore_convergence
def test_dropout_trains_reproducibly_and_is_off_in_predict():
    X, y = make_classification(n=200, seed=31)
    params = dict(hidden_layer_sizes=(20, 10), max_iter=30, random_state=0, learning_rate_init=0.01)
    a = MLPClassifier(dropout=0.3, **params).fit(X, y)
    b = MLPClassifier(dropout=0.3, **params).fit(X, y)
    plain = MLPClassifier(**params).fit(X, y)
    for ca, cb in zip(a.coefs_, b.coefs_):
        np.testing.assert_array_equal(ca, cb)  # reproducible with random_state
    assert not np.allclose(a.coefs_[0], plain.coefs_[0])  # dropout changed training
    assert a.loss_curve_[-1] < 0.8 * a.loss_curve_[0]
    np.testing.assert_array_equal(a.predict_proba(X), a.predict_proba(X))  # deterministic
    other = MLPClassifier(dropout=0.3, **{**params, "random_state": 1}).fit(X, y)
    assert not np.allclose(other.coefs_[0], a.coefs_[0])


@ignore_convergence
def test_dropout_continues_across_partial_fit_and_pickle():
    X, y = make_classification(n=120, seed=32)
    params = dict(hidden_layer_sizes=(8,), random_state=0, dropout=0.25)
    a = MLPClassifier(**params)
    b = MLPClassifier(**params)
    for _ in range(2):
        a.partial_fit(X, y, classes=np.unique(y))
        b.partial_fit(X, y, classes=np.unique(y))
    b = pickle.loads(pickle.dumps(b))
    a.partial_fit(X, y)
    b.partial_fit(X, y)
    for ca, cb in zip(a.coefs_, b.coefs_):
        np.testing.assert_array_equal(ca, cb)


def test_dropout_rejects_lbfgs_and_bad_rates():
    X, y = make_classification(n=40, seed=33)
    with pytest.raises(ValueError, match="stochastic solver"):
        MLPClassifier(solver="lbfgs", dropout=0.2).fit(X, y)
    with pytest.raises(ValueError):
        MLPRegressor(dropout=1.0).fit(X, y.astype(float))


# -- inputs converted to a float32 model (issue 13, item 4) --------------------------

def _overflow_case(where):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(30, 3)), rng.normal(size=30)
    fit = {"X": X, "y": y, "sample_weight": np.ones(30)}
    if where in fit:
        fit[where] = fit[where].copy()
        fit[where][0] = 1e39  # finite in float64, inf in float32
    return X, y, fit


@ignore_convergence
@pytest.mark.parametrize("where", ["X", "y", "sample_weight", "X_val", "y_val", "predict",
                                   "class_weight"])
def test_float32_estimator_refuses_values_beyond_its_dtype(where):
    """scikit-learn checks the inputs in float64; converting them to a
    float32 model turned 1e39 into inf (NaN predictions, an inf loss)."""
    X, y, fit = _overflow_case(where)
    big = X.copy()
    big[0, 0] = 1e39
    name = {"predict": "X", "class_weight": "sample_weight"}.get(where, where)
    if where == "class_weight":
        est = MLPClassifier(dtype="float32", max_iter=2, class_weight={0: 1e30, 1: 1e30})
        call = lambda: est.fit(X, y > 0, sample_weight=np.full(30, 1e10))  # noqa: E731
    elif where == "predict":
        est = MLPRegressor(dtype="float32", max_iter=2).fit(X, y)
        call = lambda: est.predict(big)  # noqa: E731
    elif where in ("X_val", "y_val"):
        yv = y.copy()
        yv[0] = 1e39
        val = {"X_val": big if where == "X_val" else X, "y_val": yv if where == "y_val" else y}
        est = MLPRegressor(dtype="float32", max_iter=2)
        call = lambda: est.fit(X, y, **val)  # noqa: E731
    else:
        est = MLPRegressor(dtype="float32", max_iter=2)
        call = lambda: est.fit(fit["X"], fit["y"], sample_weight=fit["sample_weight"])  # noqa
    with pytest.raises(ValueError, match=rf"^{name} holds 1e\+(39|40) .*float32"):
        call()


@ignore_convergence
def test_float32_inputs_with_float64_targets_beyond_float32():
    """dtype=None follows X: a float32 X makes a float32 model, whose
    targets must fit float32 too (the message points at dtype='float64')."""
    X, y, _ = _overflow_case(None)
    y[3] = -1e39
    with pytest.raises(ValueError, match=r"y holds -1e\+39 .*dtype='float64'"):
        MLPRegressor(max_iter=2).fit(X.astype(np.float32), y)


@ignore_convergence
@pytest.mark.parametrize("weights", ["zero", "cancelling"])
@pytest.mark.parametrize("cls", [MLPRegressor, MLPClassifier])
def test_zero_weight_batch_is_skipped_as_if_its_rows_were_absent(cls, weights):
    """scikit-learn raises ZeroDivisionError on a batch whose weights sum to
    zero (np.average); fastbp skips the batch (no update, no Adam step, no
    weight in loss_curve_), so the fit equals sklearn's on the other rows."""
    X, y = make_classification(n=20, d=4, k=2, seed=3)
    w = np.ones(20)
    w[5:10] = [0, 0, 0, 0, 0] if weights == "zero" else [1, -1, 2.5, -2.5, 0]
    keep = np.r_[0:5, 10:20]
    kw = dict(hidden_layer_sizes=(6,), batch_size=5, shuffle=False, max_iter=4, random_state=0,
              learning_rate_init=0.01)
    fb = cls(**kw).fit(X, y, sample_weight=w)
    sk = getattr(sknn, cls.__name__)(**kw).fit(X[keep], y[keep], sample_weight=w[keep])
    assert fb.n_iter_ == sk.n_iter_
    assert fb._optimizer.t == sk._optimizer.t == 4 * 3  # Adam's step count: updates
    for a, e in zip(fb.coefs_ + fb.intercepts_, sk.coefs_ + sk.intercepts_):
        assert_rel(a, e, RTOL)
    assert_rel(fb.loss_curve_, sk.loss_curve_, RTOL)
    with pytest.raises(ZeroDivisionError):  # what scikit-learn itself does
        getattr(sknn, cls.__name__)(**kw).fit(X, y, sample_weight=w)


def test_epoch_whose_every_batch_weighs_zero_is_a_value_error():
    X, y = make_classification(n=8, d=3, k=2, seed=0)
    w = np.tile([1.0, -1.0], 4)   # every batch of 2 sums to zero
    with pytest.raises(ValueError, match="every mini-batch of this epoch sum to zero"):
        MLPRegressor(hidden_layer_sizes=(3,), batch_size=2, shuffle=False, max_iter=2,
                     random_state=0).fit(X, y.astype(float), sample_weight=w)


def test_private_attributes_code_reads_have_scikit_learns_meaning():
    """Code in the wild reads _loss_grad_lbfgs, _optimizer.learning_rate and
    _no_improvement_count (scikit-learn's own tests do): the same values as
    scikit-learn's estimator on the same data and seed."""
    from sklearn.neural_network import MLPClassifier as SK
    from sklearn.preprocessing import LabelBinarizer

    rng = np.random.RandomState(0)
    X = rng.rand(30, 6)
    y = rng.randint(0, 3, 30)
    for solver, schedule in (("sgd", "invscaling"), ("sgd", "adaptive"), ("adam", "constant")):
        kw = dict(hidden_layer_sizes=(7,), solver=solver, learning_rate=schedule, max_iter=5,
                  random_state=1, batch_size=10, alpha=1e-3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            ours, theirs = MLPClassifier(**kw).fit(X, y), SK(**kw).fit(X, y)
        np.testing.assert_allclose(ours._optimizer.learning_rate,
                                   theirs._optimizer.learning_rate, rtol=1e-12)
        assert ours._no_improvement_count == theirs._no_improvement_count
        Y = LabelBinarizer().fit_transform(y)
        theta = np.hstack([c.ravel() for c in theirs.coefs_ + theirs.intercepts_])
        # (scikit-learn's _fit_lbfgs sets these; its adam/sgd fits do not)
        start, theirs._coef_indptr, theirs._intercept_indptr = 0, [], []
        for c in theirs.coefs_:
            theirs._coef_indptr.append((start, start + c.size, c.shape))
            start += c.size
        for b in theirs.intercepts_:
            theirs._intercept_indptr.append((start, start + b.size))
            start += b.size
        bufs = [[np.empty((30, u)) for u in (7, 3)], [np.empty((30, u)) for u in (7, 3)]]
        grads = [[np.empty((6, 7)), np.empty((7, 3))], [np.empty(7), np.empty(3)]]
        mine = [[np.empty((6, 7)), np.empty((7, 3))], [np.empty(7), np.empty(3)]]
        v1, g1 = ours._loss_grad_lbfgs(theta, X, Y, None, [X] + bufs[0], bufs[1], *mine)
        v2, g2 = theirs._loss_grad_lbfgs(theta, X, Y, None, [X] + bufs[0], bufs[1], *grads)
        np.testing.assert_allclose(v1, v2, rtol=1e-12)
        np.testing.assert_allclose(g1, g2, rtol=1e-10, atol=1e-14)
        for a, b in zip(mine[0] + mine[1], grads[0] + grads[1]):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_divergence_with_early_stopping_keeps_the_best_weights_as_scikit_learn():
    # scikit-learn trains on with non-finite weights, scores nan on the
    # validation set to max_iter, then restores the best weights.
    from sklearn.datasets import load_iris
    from sklearn.neural_network import MLPRegressor as SK

    X, y = load_iris(return_X_y=True)
    kw = dict(hidden_layer_sizes=100, activation="identity", solver="sgd", alpha=1e-4,
              learning_rate_init=1.0, max_iter=20, early_stopping=True, n_iter_no_change=10,
              random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = MLPRegressor(**kw).fit(X, y), SK(**kw).fit(X, y)
    assert ours.n_iter_ == theirs.n_iter_ == 20
    assert len(ours.validation_scores_) == len(theirs.validation_scores_) == 20
    assert np.isnan(ours.validation_scores_[-1]) and np.isnan(theirs.validation_scores_[-1])
    first_nan = [int(np.argmax(np.isnan(m.validation_scores_))) for m in (ours, theirs)]
    assert first_nan[0] == first_nan[1]
    np.testing.assert_allclose(ours.validation_scores_[:first_nan[0]],
                               theirs.validation_scores_[:first_nan[1]], rtol=1e-8)
    for a, b in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("solver", ["adam", "sgd"])
def test_partial_fit_goes_on_after_dtype_is_changed(solver):
    """partial_fit after set_params(dtype=...) failed inside, naming the
    optimizer's state (held in the old dtype); the moments now go on in the
    new dtype with the weights."""
    X, y = make_classification()
    est = MLPClassifier(hidden_layer_sizes=(6,), solver=solver, random_state=0,
                        dtype="float32")
    est.partial_fit(X, y, classes=np.unique(y))
    for dtype in ("float64", "float32"):
        est.set_params(dtype=dtype)
        est.partial_fit(X, y)
        assert est.coefs_[0].dtype == dtype
        assert est._optimizer.state.dtype == dtype
