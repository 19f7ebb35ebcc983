"""The shared base of ``fastbp.MLPClassifier`` and ``fastbp.MLPRegressor``
(``fastbp.sklearn``): scikit-learn's parameter constraints, the fastbp
network that holds ``coefs_`` and ``intercepts_``, ``fit``'s checks and
initialization, the lbfgs solver (``scipy.optimize.minimize`` on the
compiled loss and gradient, in scikit-learn's packing) and prediction.  The
stochastic solvers (sgd, adam) are ``fastbp._sklearn_stochastic``'s, mixed
in.  Each step mirrors scikit-learn's ``_multilayer_perceptron.py`` so it
can be read against it.
"""
from __future__ import annotations

import functools
import threading
from numbers import Integral, Real

import numpy as np
import scipy.optimize
import scipy.sparse
from scipy.special import expit
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, Options, StrOptions
from sklearn.utils.optimize import _check_optimize_result
from sklearn.utils.validation import _check_sample_weight, validate_data

from ._ext.engine import B_OFF, L2, N_OUT, W_OFF
from ._sklearn_stochastic import _StochasticSolvers
from ._threads import _blas_threads
from ._validation import MAX_THREADS, check_n_threads, to_dtype
from .layers import Dense, Dropout
from .model import Sequential, _OverflowError

#: sklearn activation name -> fastbp activation name
_ACTIVATIONS = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu",
                "leaky_relu": "leaky_relu", "elu": "elu", "softplus": "softplus"}
#: (output activation, sklearn loss) -> fastbp loss kernel
_LOSSES = {"identity": "sk_squared_error", "exp": "sk_poisson", "softmax": "sk_log_loss",
           "logistic": "sk_binary_log_loss"}

try:  # scipy >= 1.15 warns about iprint; sklearn passes it only where supported
    from sklearn.utils.fixes import _get_additional_lbfgs_options_dict

    _LBFGS_HAS_IPRINT = bool(_get_additional_lbfgs_options_dict("iprint", -1))
except ImportError:  # pragma: no cover - older scikit-learn
    _LBFGS_HAS_IPRINT = True


def _one_fit_at_a_time(method):
    """Fits of one estimator called from several threads run one after the
    other (each would otherwise train the same network at once).  The lock
    is made on first use (``__init__`` stores parameters only, as
    scikit-learn asks); ``dict.setdefault`` keeps the first one made."""
    @functools.wraps(method)
    def serialized(self, *args, **kwargs):
        with self.__dict__.setdefault("_fit_lock", threading.Lock()):
            return method(self, *args, **kwargs)
    return serialized


def _store_params(estimator, params):
    """What scikit-learn asks of ``__init__``: store every parameter, as given,
    under its own name (the signature is what ``get_params`` reads)."""
    for name, value in params.items():
        if name not in ("self", "__class__"):
            setattr(estimator, name, value)


class _BaseMLP(_StochasticSolvers, BaseEstimator):
    """Shared machinery of MLPClassifier and MLPRegressor."""

    _parameter_constraints: dict = {
        "hidden_layer_sizes": ["array-like", Interval(Integral, 1, None, closed="left")],
        "activation": [StrOptions(set(_ACTIVATIONS))],
        "solver": [StrOptions({"lbfgs", "sgd", "adam"})],
        "alpha": [Interval(Real, 0, None, closed="left")],
        "batch_size": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left")],
        "learning_rate": [StrOptions({"constant", "invscaling", "adaptive"})],
        "learning_rate_init": [Interval(Real, 0, None, closed="neither")],
        "power_t": [Interval(Real, 0, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "shuffle": ["boolean"],
        "random_state": ["random_state"],
        "tol": [Interval(Real, 0, None, closed="left")],
        "verbose": ["verbose"],
        "warm_start": ["boolean"],
        "momentum": [Interval(Real, 0, 1, closed="both")],
        "nesterovs_momentum": ["boolean"],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(Real, 0, 1, closed="left")],
        "beta_1": [Interval(Real, 0, 1, closed="left")],
        "beta_2": [Interval(Real, 0, 1, closed="left")],
        "epsilon": [Interval(Real, 0, None, closed="neither")],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left"), Options(Real, {np.inf})],
        "max_fun": [Interval(Integral, 1, None, closed="left")],
        "dtype": [None, StrOptions({"float32", "float64"})],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "n_threads": [None, Interval(Integral, 1, MAX_THREADS, closed="both")],
    }

    # -- the network ---------------------------------------------------------
    def _network(self, n_features, dtype):
        """The fastbp model with the current coefs_/intercepts_ copied in
        (and a Dropout after each hidden layer when ``dropout`` > 0)."""
        net = getattr(self, "_net", None)
        if net is None or not self._fits(net, n_features, dtype):
            net = self._new_network(n_features, dtype)
            self._net = net
        self._copy_weights(net)
        if getattr(self, "_dropout_counter", None) is not None:
            net._dropout_rng[0] = self._dropout_counter
        dense_rows = [isinstance(l, Dense) for l in net.layers]
        net._reg[:] = 0
        net._reg[dense_rows, L2] = self.alpha
        net._reg_per_weight = True
        return net

    def _fits(self, net, n_features, dtype):
        """Whether ``net`` has the architecture of the current parameters."""
        rate = float(getattr(self, "dropout", 0.0))
        return not (net.dtype != dtype or net.n_features != n_features or
                    [l.W.shape for l in self._dense(net)] != [c.shape for c in self.coefs_] or
                    net.layers[0].activation != _ACTIVATIONS[self.activation] or
                    (len(net.layers) != len(self.coefs_)) != (rate > 0) or
                    any(getattr(l, "rate", rate) != rate for l in net.layers))

    def _new_network(self, n_features, dtype):
        act = _ACTIVATIONS[self.activation]
        rate = float(getattr(self, "dropout", 0.0))
        layers = []
        for coef in self.coefs_[:-1]:
            layers.append(Dense(coef.shape[1], activation=act))
            if rate > 0:
                layers.append(Dropout(rate))
        layers.append(Dense(self.coefs_[-1].shape[1]))
        return Sequential(layers, dtype=dtype, seed=0).build(n_features)

    def _inference_network(self, n_features, dtype):
        """The network predict runs: ``_net`` if it holds the current
        coefs_ and intercepts_, else a new one loaded with them before it
        replaces ``_net``.  Predict writes into no network, so predicts from
        any number of threads at once read only what none of them changes."""
        net = getattr(self, "_net", None)
        if net is not None and self._fits(net, n_features, dtype) and all(
                np.array_equal(layer.W, coef, equal_nan=True)
                and np.array_equal(layer.b, intercept, equal_nan=True)
                for layer, coef, intercept in zip(self._dense(net), self.coefs_,
                                                  self.intercepts_)):
            return net
        net = self._new_network(n_features, dtype)
        self._copy_weights(net)
        self._net = net
        return net

    def _copy_weights(self, net):
        for layer, coef, intercept in zip(self._dense(net), self.coefs_, self.intercepts_):
            layer.W[...] = coef
            layer.b[...] = intercept

    @staticmethod
    def _dense(net):
        return [layer for layer in net.layers if isinstance(layer, Dense)]

    def _store(self, net):
        """Copy the network's parameters back into coefs_ and intercepts_."""
        self.coefs_ = [layer.W.copy() for layer in self._dense(net)]
        self.intercepts_ = [layer.b.copy() for layer in self._dense(net)]
        self._dropout_counter = int(net._dropout_rng[0])

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_net", None)  # rebuilt from coefs_ on demand
        state.pop("_fit_lock", None)
        return state

    # -- fitting -------------------------------------------------------------
    def _dtype_of(self, X, first_pass):
        """The dtype a fit trains in: ``dtype`` if set; else, continuing a
        fit (warm_start, partial_fit), the weights' own, which scikit-learn
        keeps (its in-place updates keep coefs_'s dtype; lbfgs returns
        float64 weights, so its warm-started fits on float32 data run in
        float64); else X's."""
        if self.dtype is not None:
            return np.dtype(self.dtype)
        return X.dtype if first_pass else self.coefs_[0].dtype

    @_one_fit_at_a_time
    def _fit(self, X, y, sample_weight=None, incremental=False, X_val=None, y_val=None):
        hidden = self.hidden_layer_sizes
        if not hasattr(hidden, "__iter__"):
            hidden = [hidden]
        hidden = list(hidden)
        if np.any(np.array(hidden) <= 0):
            raise ValueError(f"hidden_layer_sizes must be > 0, got {hidden}.")
        if self.dropout > 0 and self.solver == "lbfgs":
            raise ValueError("dropout needs a stochastic solver ('sgd' or 'adam'), not 'lbfgs'")
        first_pass = not hasattr(self, "coefs_") or (not self.warm_start and not incremental)
        y_labels = y
        X, y = self._validate_input(X, y, incremental, reset=first_pass)
        # scikit-learn checked X in its own dtype; a float64 1e39 is inf in float32.
        X = to_dtype(X, self._dtype_of(X, first_pass), "X")
        if sample_weight is not None:
            sample_weight = _check_sample_weight(sample_weight, X)
        sample_weight = self._apply_class_weight(sample_weight, y_labels, X)
        if sample_weight is not None:  # class weights may overflow float32
            sample_weight = to_dtype(sample_weight, X.dtype, "sample_weight")
        if y.ndim == 1:
            y = y.reshape((-1, 1))
        self.n_outputs_ = y.shape[1]
        layer_units = [X.shape[1]] + hidden + [self.n_outputs_]
        self._random_state = check_random_state(self.random_state)
        if first_pass:
            self._initialize(y, layer_units, X.dtype)
        if X_val is not None:
            X_val, y_val = self._validate_validation(X_val, y_val, X.dtype)
        Y = to_dtype(y, X.dtype, "y")
        with _blas_threads(check_n_threads(self.n_threads)):
            if self.solver == "lbfgs":
                self._fit_lbfgs(X, Y, sample_weight)
            else:
                self._fit_stochastic(X, Y, sample_weight, incremental, X_val, y_val)
        if not all(np.isfinite(w).all() for w in self.coefs_ + self.intercepts_):
            raise ValueError("Solver produced non-finite parameter weights. The input data may"
                             " contain large values and need to be preprocessed.")
        return self

    def _apply_class_weight(self, sample_weight, y, X):
        return sample_weight

    def _validate_validation(self, X_val, y_val, dtype):
        if y_val is None:
            raise ValueError("X_val was given without y_val")
        X_val = validate_data(self, X_val, accept_sparse=["csr", "csc"], reset=False)
        if scipy.sparse.issparse(X_val):
            X_val = X_val.toarray()
        X_val = to_dtype(X_val, dtype, "X_val")
        y_val = np.asarray(y_val)
        if y_val.shape[0] != X_val.shape[0]:
            raise ValueError(f"X_val has {X_val.shape[0]} samples, y_val has {y_val.shape[0]}")
        if self.early_stopping and X_val.shape[0] < 2:
            # scikit-learn's rule for its own split: a one-sample score (r2
            # is nan) never improves, and the initial weights would be kept.
            raise ValueError("The validation set is too small: early stopping scores the "
                             f"model on X_val, which has {X_val.shape[0]} sample; give at "
                             "least 2.")
        self._check_validation_targets(y_val)
        to_dtype(np.asarray(self._encode_targets(y_val)), dtype, "y_val")  # NaN, inf, range
        return X_val, y_val

    def _initialize(self, y, layer_units, dtype):
        self.n_iter_ = 0
        self.t_ = 0
        self.n_outputs_ = y.shape[1]
        self.n_layers_ = len(layer_units)
        self.out_activation_ = self._output_activation()
        self.coefs_, self.intercepts_ = [], []
        factor = 2.0 if self.activation == "logistic" else 6.0
        for fan_in, fan_out in zip(layer_units[:-1], layer_units[1:]):
            bound = np.sqrt(factor / (fan_in + fan_out))
            coef = self._random_state.uniform(-bound, bound, (fan_in, fan_out))
            intercept = self._random_state.uniform(-bound, bound, fan_out)
            self.coefs_.append(coef.astype(dtype, copy=False))
            self.intercepts_.append(intercept.astype(dtype, copy=False))
        self._best_coefs = [c.copy() for c in self.coefs_]
        self._best_intercepts = [i.copy() for i in self.intercepts_]
        # Dropout's mask stream is seeded from random_state after sklearn's own
        # draws (and only with dropout, so sklearn's numbers are unchanged).
        self._dropout_counter = (int(self._random_state.randint(2 ** 62)) if self.dropout > 0
                                 else None)
        if self.solver in ("sgd", "adam"):
            self.loss_curve_ = []
            self._no_improvement_count = 0
            if self.early_stopping:
                self.validation_scores_ = []
                self.best_validation_score_ = -np.inf
                self.best_loss_ = None
            else:
                self.best_loss_ = np.inf
                self.validation_scores_ = None
                self.best_validation_score_ = None

    def _loss_name(self):
        return _LOSSES[self.out_activation_]

    @staticmethod
    def _packing(net):
        """Where each of scikit-learn's packed parameters (all coefficients,
        then all intercepts, each row-major) sits in the network's flat
        vector: L-BFGS sees scikit-learn's vector, so its dot products add
        up in the same order."""
        return np.concatenate([np.arange(r[W_OFF], r[B_OFF]) for r in net._program]
                              + [np.arange(r[B_OFF], r[B_OFF] + r[N_OUT]) for r in net._program])

    @staticmethod
    def _packed_loss_grad(net, perm, x, X, Y, loss, sample_weight):
        net.params[perm] = x
        try:
            value, grad = net.loss_and_grad(X, Y, loss=loss, sample_weight=sample_weight)
        except _OverflowError as exc:  # a trial step too far: scipy backs off
            value, grad = exc.value, exc.grad
        return value, grad[perm].astype(np.float64)

    def _loss_grad_lbfgs(self, packed_coef_inter, X, y, sample_weight, activations, deltas,
                         coef_grads, intercept_grads):
        """scikit-learn's ``_loss_grad_lbfgs``: the loss (with the L2 term) and
        its gradient at the packed parameters, for targets ``y`` in the
        encoding fit trains on (binarized labels for a classifier).  The
        gradient is returned packed and also left in ``coef_grads`` and
        ``intercept_grads``; ``activations`` and ``deltas`` are not used (the
        engine keeps its own).  Code that checks gradients calls this."""
        X = np.asarray(X)
        dtype = self.coefs_[0].dtype
        X = to_dtype(X, dtype, "X")
        Y = to_dtype(np.asarray(y).reshape(X.shape[0], -1), dtype, "y")
        if sample_weight is not None:
            sample_weight = to_dtype(np.asarray(sample_weight), dtype, "sample_weight")
        net = self._network(X.shape[1], dtype)
        value, grad = self._packed_loss_grad(net, self._packing(net),
                                             np.asarray(packed_coef_inter, dtype=np.float64),
                                             X, Y, self._loss_name(), sample_weight)
        start = 0
        for out in list(coef_grads) + list(intercept_grads):
            out[...] = grad[start:start + out.size].reshape(out.shape)
            start += out.size
        return value, grad

    def _fit_lbfgs(self, X, Y, sample_weight):
        net = self._network(X.shape[1], X.dtype)
        perm = self._packing(net)
        loss = self._loss_name()

        def fun(x):
            return self._packed_loss_grad(net, perm, x, X, Y, loss, sample_weight)
        iprint = 1 if (self.verbose is True or self.verbose >= 1) else -1
        # x0 in the network's dtype, as scikit-learn packs it: scipy then
        # evaluates in that dtype (its ScalarFunction keeps x0's dtype)
        res = scipy.optimize.minimize(fun, net.params[perm], method="L-BFGS-B",
                                      jac=True, options={"maxfun": self.max_fun,
                                                         "maxiter": self.max_iter,
                                                         "gtol": self.tol, "iprint": iprint}
                                      if _LBFGS_HAS_IPRINT else
                                      {"maxfun": self.max_fun, "maxiter": self.max_iter,
                                       "gtol": self.tol})
        self.n_iter_ = _check_optimize_result("lbfgs", res, self.max_iter)
        self.loss_ = res.fun
        net.params[perm] = res.x
        self._store(net)
        if self.dtype is None and res.x.dtype != net.dtype:
            # scikit-learn unpacks scipy's last iterate, a float64 vector,
            # into coefs_: a float32 fit returns float64 weights (and then
            # predicts in float64), unrounded
            flat = np.empty(res.x.shape[0], dtype=res.x.dtype)
            flat[perm] = res.x  # the network's order (lbfgs has no dropout: all rows dense)
            self.coefs_ = [flat[r[W_OFF]:r[B_OFF]].reshape(c.shape)
                           for r, c in zip(net._program, self.coefs_)]
            self.intercepts_ = [flat[r[B_OFF]:r[B_OFF] + r[N_OUT]].copy() for r in net._program]
        if not np.isfinite(self.loss_):
            # scikit-learn returns it as the loss; fastbp does not hand back
            # a silent NaN (scipy stopped at once: the start already overflowed)
            raise ValueError(f"lbfgs stopped with a non-finite loss ({self.loss_}). The input "
                             "data may contain large values and need to be preprocessed.")

    def _check_solver(self):
        if self.solver not in ("sgd", "adam"):
            raise AttributeError("partial_fit is only available for stochastic optimizer. "
                                 "%s is not stochastic" % self.solver)
        return True

    # -- prediction ------------------------------------------------------------
    def _forward_pass_fast(self, X, check_input=True):
        if check_input:
            X = validate_data(self, X, accept_sparse=["csr", "csc"], reset=False)
        if scipy.sparse.issparse(X):
            X = X.toarray()
        dtype = self.coefs_[0].dtype
        if self.dtype is None:
            # scikit-learn's X @ coefs_ is in their common type: float64 X
            # (or int64) with float32 weights predicts in float64
            common = np.result_type(X.dtype, dtype)
            if common in (np.float32, np.float64):
                dtype = common
        X = to_dtype(X, dtype, "X")
        net = self._inference_network(X.shape[1], dtype)
        with _blas_threads(check_n_threads(self.n_threads)):
            z = net.predict(X)
        if self.out_activation_ == "softmax":
            z -= z.max(axis=1, keepdims=True)
            np.exp(z, out=z)
            z /= z.sum(axis=1, keepdims=True)
        elif self.out_activation_ == "logistic":
            expit(z, out=z)
        elif self.out_activation_ == "exp":
            np.exp(z, out=z)
        return z

    def _score_with_function(self, X, y, sample_weight, score_function):
        y_pred = self._predict(X, check_input=False)
        if np.issubdtype(y_pred.dtype, np.floating) and not np.isfinite(y_pred).all():
            return np.nan
        return score_function(y, y_pred, sample_weight=sample_weight)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags
