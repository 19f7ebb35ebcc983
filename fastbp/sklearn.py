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

Where it is written: the two estimators are here; their shared base
(parameter checks, the network, lbfgs, prediction) is
``fastbp._sklearn_base``, and the stochastic solvers (sklearn's SGD and Adam,
early stopping, partial_fit) ``fastbp._sklearn_stochastic``, which trains
through the epoch loop every fit shares (``fastbp._loop``).  Each mirrors
scikit-learn's ``_multilayer_perceptron.py`` step for step.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse
from sklearn.base import ClassifierMixin, RegressorMixin, _fit_context
from sklearn.metrics import accuracy_score, r2_score
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils import column_or_1d
from sklearn.utils._param_validation import StrOptions
from sklearn.utils.class_weight import compute_sample_weight
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import _check_partial_fit_first_call, type_of_target, unique_labels
from sklearn.utils.validation import check_is_fitted, validate_data

from ._sklearn_base import _store_params, _BaseMLP
from ._sklearn_stochastic import _SklearnAdam, _SklearnSGD  # noqa: F401  (importable from here)
from ._typing import ArrayLike, MatrixLike

__all__ = ["MLPClassifier", "MLPRegressor"]


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

    def _check_validation_targets(self, y_val):
        """y_val in the encoding of y: labels the model knows (a label
        binarizer maps any other to a row of zeros, or to the first class)."""
        n_classes = len(self.classes_)
        if self._label_binarizer.y_type_.startswith("multilabel"):
            if (y_val.ndim != 2 or y_val.shape[1] != n_classes
                    or not np.isin(y_val, (0, 1)).all()):
                raise ValueError(f"y_val must be a label indicator matrix with {n_classes} "
                                 f"columns of 0 and 1, as y was; got shape {y_val.shape}")
            return
        if y_val.ndim == 2 and y_val.shape[1] == 1:
            y_val = y_val[:, 0]
        if y_val.ndim != 1:
            raise ValueError(f"y_val must be 1-D (one label per sample), as y was; got shape "
                             f"{y_val.shape}")
        known = set(self.classes_.tolist())
        unknown = [v for v in dict.fromkeys(y_val.tolist()) if v not in known]
        if unknown:
            raise ValueError(f"y_val has labels the model was not trained on: {unknown[:5]}"
                             f"{' ...' if len(unknown) > 5 else ''}; its classes are "
                             f"{self.classes_.tolist()}")

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

    def _check_validation_targets(self, y_val):
        outputs = 1 if y_val.ndim == 1 else y_val.shape[1] if y_val.ndim == 2 else None
        if outputs != self.n_outputs_:
            raise ValueError(f"y_val must have {self.n_outputs_} output(s) per sample, as y "
                             f"had; got shape {y_val.shape}")

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
