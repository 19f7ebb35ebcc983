"""Drop-in replacements for scikit-learn's MLPClassifier and MLPRegressor.

``from fastbp import MLPClassifier`` in place of
``from sklearn.neural_network import MLPClassifier``: the same parameters,
defaults, attributes and methods as scikit-learn 1.9, and the same numbers.
Training runs in fastbp's compiled engine instead of NumPy.

What "the same numbers" rests on
--------------------------------
* Initialization draws ``random_state.uniform(-b, b, ...)`` coefficient then
  intercept, layer by layer, with sklearn's Glorot bound b (factor 2 for
  logistic); shuffling is ``sklearn.utils.shuffle`` of the running index
  permutation each epoch, and the early-stopping split is
  ``train_test_split`` with the same random state, in the same order.
* Losses are sklearn's (half squared error, log loss, binary log loss,
  Poisson deviance terms), with its clipping of probabilities, its
  ``delta = w (act(z) - y) / sum(w)`` and its L2 term ``alpha/2 ||W||^2 /
  sum(w)`` on weights only (``fastbp._numba.losses`` ``sk_*`` kernels and the
  engine's per-weight penalties).
* The optimizers are sklearn's SGD (velocity form, Nesterov) and Adam (bias
  correction folded into the learning rate), below; lbfgs calls
  ``scipy.optimize.minimize(method="L-BFGS-B")`` with the compiled loss and
  gradient, packed in sklearn's order (all coefficients, then intercepts).
* The bookkeeping (``loss_curve_``, ``best_loss_``, ``n_iter_``, ``t_``,
  learning-rate schedules, ``n_iter_no_change``, ``ConvergenceWarning``) is
  sklearn's.

Beyond scikit-learn
-------------------
``fit(X, y, sample_weight=None, X_val=None, y_val=None)`` takes an explicit
validation set (used for early stopping instead of a split) and records
``validation_loss_curve_`` whenever there is validation data;
``class_weight`` ("balanced" or a dict, classifier), ``dropout`` (a rate
for the hidden layers), the activations ``leaky_relu``, ``elu``,
``softplus``, and ``dtype`` and ``n_threads`` parameters.  Their defaults keep scikit-learn's behaviour.

A diverging fit stops at the first non-finite loss with the last finite
weights kept, and raises scikit-learn's "Solver produced non-finite parameter
weights" ValueError.

Size: about 900 lines: two estimators on one base that mirror
scikit-learn's ``_multilayer_perceptron.py`` (parameter checks, three
solvers, early stopping, partial_fit) step for step, so that each step can
be read against scikit-learn's; its two optimizers are sklearn's own.
"""
from __future__ import annotations

import functools
import threading
import warnings
from numbers import Integral, Real

import numpy as np
import scipy.optimize
import scipy.sparse
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, _fit_context, is_classifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils import check_random_state, column_or_1d
from sklearn.utils._param_validation import Interval, Options, StrOptions
from sklearn.utils.class_weight import compute_sample_weight
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import _check_partial_fit_first_call, type_of_target, unique_labels
from sklearn.utils.optimize import _check_optimize_result
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from ._ext.engine import B_OFF, L2, N_OUT, W_OFF
from ._optimizer import Optimizer, _flag, _real
from . import _loop
from ._loop import MiniBatch
from ._runner import _EpochRunner
from ._threads import _blas_threads
from ._typing import ArrayLike, MatrixLike
from ._validation import MAX_THREADS, check_n_threads, to_dtype
from .layers import Dense, Dropout
from .losses import data_loss
from .model import Sequential, _OverflowError

__all__ = ["MLPClassifier", "MLPRegressor"]

#: sklearn activation name -> fastbp activation name
_ACTIVATIONS = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu",
                "leaky_relu": "leaky_relu", "elu": "elu", "softplus": "softplus"}
#: (output activation, sklearn loss) -> fastbp loss kernel
_LOSSES = {"identity": "sk_squared_error", "exp": "sk_poisson", "softmax": "sk_log_loss",
           "logistic": "sk_binary_log_loss"}


class _SklearnSGD(Optimizer):
    r"""scikit-learn's SGD (``sklearn.neural_network._stochastic_optimizers``).

    .. math::

        v \leftarrow \mu v - \eta g, \qquad
        p \leftarrow p + (\mu v - \eta g \ \text{(nesterov)}, \ v \ \text{(otherwise)})

    with learning rate eta and momentum mu (velocity v starts at 0).  The
    ``learning_rate`` schedules act between epochs (``lr`` is updated).
    """

    kernel = "sk_sgd"

    def __init__(self, lr=0.1, momentum=0.9, nesterov=True):
        super().__init__()
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self._set_hyperparameters()

    def _validated(self):
        return dict(lr=_real(self.lr, "learning rate"), momentum=_real(self.momentum, "momentum"),
                    nesterov=_flag(self.nesterov, "nesterov"))

    @property
    def learning_rate(self):
        """scikit-learn's name for the current rate (``lr``), which its
        ``invscaling`` and ``adaptive`` schedules change."""
        return self.lr

    @learning_rate.setter
    def learning_rate(self, value):
        self.lr = value

    def _kernel_values(self, hp):
        return hp


class _SklearnAdam(Optimizer):
    r"""scikit-learn's Adam (``sklearn.neural_network._stochastic_optimizers``).

    .. math::

        m &\leftarrow \beta_1 m + (1 - \beta_1) g, \qquad
        v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        \eta_t &= \eta \sqrt{1 - \beta_2^t} / (1 - \beta_1^t), \qquad
        p \leftarrow p - \eta_t\, m / (\sqrt{v} + \epsilon)

    (the bias correction is folded into the learning rate, so epsilon is
    not rescaled as in torch's form).
    """

    kernel = "sk_adam"

    def __init__(self, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
        super().__init__()
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self._set_hyperparameters()

    def _validated(self):
        return {name: _real(getattr(self, name), name) for name in ("lr", "beta1", "beta2", "eps")}

    @property
    def learning_rate(self):
        """scikit-learn's ``learning_rate``: the step size of the last update,
        eta sqrt(1 - beta2^t) / (1 - beta1^t) (``lr`` before any)."""
        if self.t == 0:
            return self.lr
        return self.lr * np.sqrt(1 - self.beta2 ** self.t) / (1 - self.beta1 ** self.t)

    def _kernel_values(self, hp):
        return hp


class _SklearnOrder:
    """Each iteration's sample order, drawn as scikit-learn draws it:
    ``sklearn.utils.shuffle(sample_idx, random_state=...)`` of the running
    index permutation (a resample without replacement), minus its
    validation overhead (~0.2 ms an epoch)."""

    def __init__(self, random_state, n_samples):
        self.random_state = random_state
        self.sample_idx = np.arange(n_samples, dtype=int)

    def __call__(self):
        perm = np.arange(len(self.sample_idx))
        self.random_state.shuffle(perm)
        self.sample_idx = self.sample_idx[perm]
        return self.sample_idx


class _StochasticFront:
    """What an estimator's sgd/adam fit does around the epochs of the shared
    loop (``fastbp._loop.train``): scikit-learn's bookkeeping after each
    iteration (``_BaseMLP._epoch_end``), its ValueError on divergence (or,
    with early stopping, its epochs of nan scores), a KeyboardInterrupt on
    Ctrl-C (which ``_fit_stochastic`` turns into scikit-learn's warning),
    and, however the fit ends, the network's weights copied back into
    ``coefs_`` and ``intercepts_`` (scikit-learn trains those in place)."""

    def __init__(self, estimator, runner, n_samples, incremental, early_stopping, validation):
        self.estimator, self.runner, self.net = estimator, runner, runner.net
        self.n_samples, self.incremental = n_samples, incremental
        self.early_stopping, self.validation = early_stopping, validation

    def begin(self):
        pass

    def epoch_begin(self, epoch):
        pass

    def epoch_end(self, epoch, result, seconds):
        return self.estimator._epoch_end(self.runner, self.n_samples,
                                         self.incremental, self.early_stopping,
                                         self.validation)

    def diverged(self, epoch, divergence):
        if not self.early_stopping:
            raise ValueError("Solver produced non-finite parameter weights. The input data may "
                             "contain large values and need to be preprocessed.")
        self.estimator._diverged_epochs(self.n_samples, self.incremental)

    def interrupted_in(self, epoch, stop):
        raise KeyboardInterrupt  # mid-epoch: not counted, as in scikit-learn

    def interrupted_after(self, epoch, reason):
        raise KeyboardInterrupt

    def interrupted(self):
        pass

    def end(self):
        self.estimator._store(self.net)


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


class _BaseMLP(BaseEstimator):
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
    def _dtype_of(self, X):
        return np.dtype(self.dtype) if self.dtype is not None else X.dtype

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
        X = to_dtype(X, self._dtype_of(X), "X")
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
        res = scipy.optimize.minimize(fun, net.params[perm].astype(np.float64), method="L-BFGS-B",
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

    def _check_solver(self):
        if self.solver not in ("sgd", "adam"):
            raise AttributeError("partial_fit is only available for stochastic optimizer. "
                                 "%s is not stochastic" % self.solver)
        return True

    def _make_optimizer(self):
        if self.solver == "sgd":
            return _SklearnSGD(self.learning_rate_init, self.momentum, self.nesterovs_momentum)
        return _SklearnAdam(self.learning_rate_init, self.beta_1, self.beta_2, self.epsilon)

    def _fit_stochastic(self, X, Y, sample_weight, incremental, X_val, y_val):
        net = self._network(X.shape[1], X.dtype)
        if not incremental or not hasattr(self, "_optimizer"):
            self._optimizer = self._make_optimizer()
        opt = self._optimizer
        if self.early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        early_stopping = self.early_stopping
        sw_val = None
        if early_stopping and X_val is None:
            # scikit-learn splits on its binarized labels as bool: a class it
            # names in an error is 'True', not '1.0'
            stratify = (Y.astype(bool) if (is_classifier(self) and self.n_outputs_ == 1)
                        else None)
            if sample_weight is None:
                X, X_val, Y, y_val = train_test_split(
                    X, Y, random_state=self._random_state, test_size=self.validation_fraction,
                    stratify=stratify)
            else:
                X, X_val, Y, y_val, sample_weight, sw_val = train_test_split(
                    X, Y, sample_weight, random_state=self._random_state,
                    test_size=self.validation_fraction, stratify=stratify)
            if X_val.shape[0] < 2:
                raise ValueError("The validation set is too small. Increase "
                                 "'validation_fraction' or the size of your dataset.")
            X, Y = np.ascontiguousarray(X), np.ascontiguousarray(Y)
            if is_classifier(self):
                y_val = self._label_binarizer.inverse_transform(y_val)
        track_val = X_val is not None
        if track_val and (not hasattr(self, "validation_loss_curve_") or not
                          (incremental or self.warm_start)):
            self.validation_loss_curve_ = []
        n_samples = X.shape[0]
        if self.batch_size == "auto":
            batch_size = min(200, n_samples)
        else:
            if self.batch_size > n_samples:
                warnings.warn("Got `batch_size` less than 1 or larger than sample size. "
                              "It is going to be clipped")
            batch_size = int(np.clip(self.batch_size, 1, n_samples))
        W = (np.ones(n_samples, dtype=X.dtype) if sample_weight is None
             else np.ascontiguousarray(sample_weight, dtype=X.dtype))
        state = opt._bind(net.n_params, net.dtype)
        runner = _EpochRunner(net, X, Y, W, batch_size, False, self._loss_name(), opt, state,
                              count_by_samples=True)
        order = _SklearnOrder(self._random_state, n_samples) if self.shuffle else None
        front = _StochasticFront(self, runner, n_samples, incremental, early_stopping,
                                 (X_val, y_val, sw_val) if X_val is not None else None)
        self.n_iter_ = 0
        # Ctrl-C stops training as in scikit-learn (a warning, and fit returns
        # the model as it is), but at a call boundary or the end of an
        # iteration, so the weights, n_iter_ and loss_curve_ agree.
        try:
            # need_steps: an epoch of zero-weight batches is a ValueError
            # (scikit-learn raises ZeroDivisionError on such a batch)
            _loop.train(MiniBatch(runner, order=order, need_steps=True), front, range(1, self.max_iter + 1))
        except KeyboardInterrupt:
            warnings.warn("Training interrupted by user.")
        if early_stopping:
            self.coefs_ = self._best_coefs
            self.intercepts_ = self._best_intercepts
            self._copy_weights(net)  # predict then finds them in the network

    def _epoch_end(self, runner, n_samples, incremental, early_stopping, validation):
        """scikit-learn's bookkeeping after an iteration of ``_fit_stochastic``;
        True when training stops."""
        opt = self._optimizer
        self.n_iter_ += 1
        self.loss_ = runner.epoch_loss()
        self.t_ += n_samples
        self.loss_curve_.append(self.loss_)
        if self.verbose:
            print("Iteration %d, loss = %.8f" % (self.n_iter_, self.loss_))
        X_val, y_val, sw_val = validation or (None, None, None)
        if validation is not None or early_stopping:
            self._store(runner.net)
        if validation is not None:
            self.validation_loss_curve_.append(self._validation_loss(X_val, y_val))
        self._update_no_improvement_count(early_stopping, X_val, y_val, sw_val)
        if self.solver == "sgd" and self.learning_rate == "invscaling":
            # taken up by the runner before the next iteration (refresh)
            opt.lr = float(self.learning_rate_init) / (self.t_ + 1) ** self.power_t
        if self._no_improvement_count > self.n_iter_no_change:
            what = "Validation score" if early_stopping else "Training loss"
            msg = (f"{what} did not improve more than tol={self.tol:f} for "
                   f"{self.n_iter_no_change} consecutive epochs.")
            if self._trigger_stopping(opt, msg):
                return True
            self._no_improvement_count = 0
        if incremental:
            return True
        if self.n_iter_ == self.max_iter:
            warnings.warn("Stochastic Optimizer: Maximum iterations (%d) reached and the "
                          "optimization hasn't converged yet." % self.max_iter,
                          ConvergenceWarning)
        return False

    def _diverged_epochs(self, n_samples, incremental):
        """The epochs scikit-learn runs after its weights overflow, with early
        stopping: it trains on with non-finite weights, every validation score
        is nan (no improvement, but nan compares false, so the count of
        epochs without one restarts), and it stops at max_iter, then restores
        the best weights.  fastbp's engine stops at the overflow, so the
        bookkeeping of those epochs is written here: the diverged epoch and
        the rest record a nan loss and a nan validation score."""
        while self.n_iter_ < self.max_iter:
            self.n_iter_ += 1
            self.loss_ = np.nan
            self.t_ += n_samples
            self.loss_curve_.append(np.nan)
            self.validation_scores_.append(np.nan)
            if self.verbose:
                print("Iteration %d, loss = %.8f" % (self.n_iter_, self.loss_))
                print("Validation score: %f" % np.nan)
            self._no_improvement_count = 0
            if self.solver == "sgd" and self.learning_rate == "invscaling":
                self._optimizer.lr = (float(self.learning_rate_init)
                                      / (self.t_ + 1) ** self.power_t)
            if incremental:
                return
        warnings.warn("Stochastic Optimizer: Maximum iterations (%d) reached and the "
                      "optimization hasn't converged yet." % self.max_iter, ConvergenceWarning)

    def _trigger_stopping(self, opt, msg):
        """sklearn's trigger_stopping: adaptive SGD divides the rate by 5."""
        if self.solver != "sgd" or self.learning_rate != "adaptive":
            if self.verbose:
                print(msg + " Stopping.")
            return True
        if opt.lr <= 1e-6:
            if self.verbose:
                print(msg + " Learning rate too small. Stopping.")
            return True
        opt.lr /= 5.0
        if self.verbose:
            print(msg + " Setting learning rate to %f" % opt.lr)
        return False

    def _update_no_improvement_count(self, early_stopping, X_val, y_val, sw_val):
        if early_stopping:
            score = self._score(X_val, y_val, sample_weight=sw_val)
            self.validation_scores_.append(score)
            if self.verbose:
                print("Validation score: %f" % score)
            if score < self.best_validation_score_ + self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if score > self.best_validation_score_:
                self.best_validation_score_ = score
                self._best_coefs = [c.copy() for c in self.coefs_]
                self._best_intercepts = [i.copy() for i in self.intercepts_]
        else:
            if self.loss_curve_[-1] > self.best_loss_ - self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if self.loss_curve_[-1] < self.best_loss_:
                self.best_loss_ = self.loss_curve_[-1]

    def _validation_loss(self, X_val, y_val):
        """The data loss (sklearn's definition, no L2 term) on the validation set."""
        Z = self._network(X_val.shape[1], X_val.dtype).predict(X_val)
        Y = np.ascontiguousarray(self._encode_targets(y_val), dtype=Z.dtype)
        return data_loss(self._loss_name(), Z, Y)

    # -- prediction ------------------------------------------------------------
    def _forward_pass_fast(self, X, check_input=True):
        if check_input:
            X = validate_data(self, X, accept_sparse=["csr", "csc"], reset=False)
        if scipy.sparse.issparse(X):
            X = X.toarray()
        dtype = self.coefs_[0].dtype
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


try:  # scipy >= 1.15 warns about iprint; sklearn passes it only where supported
    from sklearn.utils.fixes import _get_additional_lbfgs_options_dict

    _LBFGS_HAS_IPRINT = bool(_get_additional_lbfgs_options_dict("iprint", -1))
except ImportError:  # pragma: no cover - older scikit-learn
    _LBFGS_HAS_IPRINT = True


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """Multi-layer perceptron classifier: scikit-learn's, trained by fastbp.

    Parameters, attributes and methods are those of
    ``sklearn.neural_network.MLPClassifier`` (scikit-learn 1.9), with the
    same defaults and, given the same ``random_state``, the same numbers.
    Extra parameters (their defaults keep sklearn's behaviour):

    class_weight : "balanced", dict or None
        Multiplies each sample's weight by its class's weight (as
        ``compute_sample_weight``).
    dropout : float in [0, 1), default 0
        Inverted dropout after every hidden layer during training (off in
        predict); needs solver "sgd" or "adam".  Its masks are seeded from
        ``random_state``.
    activation : also "leaky_relu", "elu", "softplus"
    dtype : {"float32", "float64"} or None
        Training dtype (None: float32 if X is float32, else float64).
    n_threads : int or None
        Threads for fit and predict, BLAS's and fastbp's kernels' (1 to
        2**31 - 1; more than the CPUs this process may run on counts as
        that many).

    ``predict``, ``predict_proba`` and ``score`` may be called from any
    number of threads at once on one fitted estimator; fits of one estimator
    run one at a time.

    ``fit`` also takes ``X_val, y_val``: a validation set used for early
    stopping instead of a split of X, and recorded in
    ``validation_loss_curve_`` (the loss on it after each epoch).
    """

    _parameter_constraints: dict = {
        **_BaseMLP._parameter_constraints,
        "class_weight": [None, StrOptions({"balanced"}), dict],
    }

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000,
                 class_weight=None, dropout=0.0, dtype=None, n_threads=None):
        _store_params(self, locals())

    def _output_activation(self):
        return "softmax" if self._label_binarizer.y_type_ == "multiclass" else "logistic"

    def _validate_input(self, X, y, incremental, reset):
        X, y = validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True,
                             dtype=(np.float64, np.float32), reset=reset)
        if scipy.sparse.issparse(X):
            X = X.toarray()
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if (not hasattr(self, "classes_")) or (not self.warm_start and not incremental):
            self._label_binarizer = LabelBinarizer()
            self._label_binarizer.fit(y)
            self.classes_ = self._label_binarizer.classes_
        else:
            classes = unique_labels(y)
            if self.warm_start:
                if set(classes) != set(self.classes_):
                    raise ValueError(
                        "warm_start can only be used where `y` has the same classes as in the "
                        f"previous call to fit. Previously got {self.classes_}, `y` has {classes}")
            elif len(np.setdiff1d(classes, self.classes_, assume_unique=True)):
                raise ValueError("`y` has classes not in `self.classes_`. `self.classes_` has "
                                 f"{self.classes_}. 'y' has {classes}.")
        y = self._label_binarizer.transform(y).astype(bool)
        return X, y

    def _apply_class_weight(self, sample_weight, y, X):
        if self.class_weight is None:
            return sample_weight
        cw = compute_sample_weight(self.class_weight, np.asarray(y)).astype(X.dtype)
        return cw if sample_weight is None else sample_weight * cw

    def _encode_targets(self, y):
        Y = self._label_binarizer.transform(np.asarray(y))
        return Y.reshape(len(Y), -1)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: MatrixLike, y: ArrayLike, sample_weight: ArrayLike | None = None,
            X_val: MatrixLike | None = None, y_val: ArrayLike | None = None) -> MLPClassifier:
        """Fit the model to X, y (see ``sklearn.neural_network.MLPClassifier.fit``).

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        sample_weight : array-like of shape (n_samples,), optional
        X_val, y_val : optional
            Validation set: used for early stopping instead of a split, and
            its loss recorded in ``validation_loss_curve_``.

        Returns
        -------
        self
        """
        return self._fit(X, y, sample_weight=sample_weight, incremental=False,
                         X_val=X_val, y_val=y_val)

    @available_if(lambda est: est._check_solver())
    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X: MatrixLike, y: ArrayLike, sample_weight: ArrayLike | None = None,
                    classes: ArrayLike | None = None) -> MLPClassifier:
        """One epoch over (X, y) (see sklearn's ``MLPClassifier.partial_fit``;
        only with the stochastic solvers)."""
        if _check_partial_fit_first_call(self, classes):
            self._label_binarizer = LabelBinarizer()
            if type_of_target(y).startswith("multilabel"):
                self._label_binarizer.fit(y)
            else:
                self._label_binarizer.fit(classes)
        return self._fit(X, y, sample_weight=sample_weight, incremental=True)

    def _predict(self, X, check_input=True):
        y_pred = self._forward_pass_fast(X, check_input=check_input)
        if self.n_outputs_ == 1:
            y_pred = y_pred.ravel()
        return self._label_binarizer.inverse_transform(y_pred)

    def predict(self, X: MatrixLike) -> np.ndarray:
        """Predicted classes, shape (n_samples,) or (n_samples, n_classes)."""
        check_is_fitted(self)
        return self._predict(X)

    def _score(self, X, y, sample_weight=None):
        return self._score_with_function(X, y, sample_weight, accuracy_score)

    def predict_proba(self, X: MatrixLike) -> np.ndarray:
        """Class probabilities, shape (n_samples, n_classes)."""
        check_is_fitted(self)
        y_pred = self._forward_pass_fast(X)
        if self.n_outputs_ == 1:
            y_pred = y_pred.ravel()
        if y_pred.ndim == 1:
            return np.vstack([1 - y_pred, y_pred]).T
        return y_pred

    def predict_log_proba(self, X: MatrixLike) -> np.ndarray:
        """Log of ``predict_proba``."""
        y_prob = self.predict_proba(X)
        return np.log(y_prob, out=y_prob)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multi-layer perceptron regressor: scikit-learn's, trained by fastbp.

    Parameters, attributes and methods are those of
    ``sklearn.neural_network.MLPRegressor`` (scikit-learn 1.9, including
    ``loss`` in {"squared_error", "poisson"}), with the same defaults and,
    given the same ``random_state``, the same numbers.  Extra parameters:
    ``activation`` also "leaky_relu", "elu", "softplus"; ``dropout``,
    ``dtype`` and ``n_threads`` as in :class:`MLPClassifier`;
    ``fit(..., X_val, y_val)`` likewise.
    """

    _parameter_constraints: dict = {
        **_BaseMLP._parameter_constraints,
        "loss": [StrOptions({"squared_error", "poisson"})],
    }

    def __init__(self, loss="squared_error", hidden_layer_sizes=(100,), activation="relu", *,
                 solver="adam", alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000,
                 dropout=0.0, dtype=None, n_threads=None):
        _store_params(self, locals())

    def _output_activation(self):
        return "exp" if self.loss == "poisson" else "identity"

    def _validate_input(self, X, y, incremental, reset):
        X, y = validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True,
                             y_numeric=True, dtype=(np.float64, np.float32), reset=reset)
        if scipy.sparse.issparse(X):
            X = X.toarray()
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if self.loss == "poisson" and np.any(np.asarray(y) < 0):
            raise ValueError("Some value(s) of y are negative which is not allowed for "
                             "Poisson regression.")
        return X, y

    def _encode_targets(self, y):
        y = np.asarray(y, dtype=np.float64)
        return y.reshape(len(y), -1)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: MatrixLike, y: ArrayLike, sample_weight: ArrayLike | None = None,
            X_val: MatrixLike | None = None, y_val: ArrayLike | None = None) -> MLPRegressor:
        """Fit the model to X, y (see ``sklearn.neural_network.MLPRegressor.fit``);
        ``X_val, y_val`` as in :meth:`MLPClassifier.fit`."""
        return self._fit(X, y, sample_weight=sample_weight, incremental=False,
                         X_val=X_val, y_val=y_val)

    # sklearn 1.9 guards the regressor's partial_fit with the (always truthy)
    # method itself rather than its result, so it exists for every solver.
    @available_if(lambda est: est._check_solver)
    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X: MatrixLike, y: ArrayLike,
                    sample_weight: ArrayLike | None = None) -> MLPRegressor:
        """One iteration over (X, y) (see sklearn's ``MLPRegressor.partial_fit``)."""
        return self._fit(X, y, sample_weight=sample_weight, incremental=True)

    def _predict(self, X, check_input=True):
        y_pred = self._forward_pass_fast(X, check_input=check_input)
        if y_pred.shape[1] == 1:
            return y_pred.ravel()
        return y_pred

    def predict(self, X: MatrixLike) -> np.ndarray:
        """Predicted values, shape (n_samples,) or (n_samples, n_outputs)."""
        check_is_fitted(self)
        return self._predict(X)

    def _score(self, X, y, sample_weight=None):
        return self._score_with_function(X, y, sample_weight, r2_score)
