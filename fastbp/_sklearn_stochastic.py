"""The estimators' stochastic solvers, sgd and adam, as scikit-learn runs
them: its two optimizers (compiled kernels ``sk_sgd`` and ``sk_adam``), its
per-iteration sample order, and its bookkeeping (``loss_curve_``,
``n_iter_no_change``, ``tol``, early stopping on the validation score,
learning-rate schedules, ``partial_fit``, ``warm_start``), run by the epoch
loop every fit shares (``fastbp._loop.train``) through ``_StochasticFront``.
``_StochasticSolvers`` is mixed into ``fastbp._sklearn_base._BaseMLP``.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import is_classifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split

from . import _loop
from ._loop import MiniBatch
from ._optimizer import Optimizer, _flag, _real
from ._runner import _EpochRunner
from ._validation import check_kernel_dim
from .losses import data_loss


class _SklearnSGD(Optimizer):
    r"""scikit-learn's SGD (``sklearn.neural_network._stochastic_optimizers``).

    .. math::

        v \leftarrow \mu v - \eta g, \qquad
        p \leftarrow p + (\mu v - \eta g \ \text{(nesterov)}, \ v \ \text{(otherwise)})

    with learning rate eta and momentum mu (velocity v starts at 0).  The
    ``learning_rate`` schedules act between epochs (``lr`` is updated).
    """

    kernel = "sk_sgd"

    def __init__(self, lr=0.1, momentum=0.9, nesterov=True, schedule="constant", power_t=0.5):
        super().__init__()
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        # scikit-learn's SGDOptimizer keeps the schedule it was made with
        # (and its initial rate and power_t) until fit makes a new one, so a
        # set_params between partial_fit calls leaves them as they were.
        self.schedule, self.lr_init, self.power_t = schedule, float(lr), power_t
        self._set_hyperparameters()

    def iteration_ends(self, time_step):
        """scikit-learn's ``iteration_ends``: the ``invscaling`` rate after
        ``time_step`` samples."""
        if self.schedule == "invscaling":
            self.lr = self.lr_init / (time_step + 1) ** self.power_t

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


class _StochasticSolvers:
    """sgd and adam for ``_BaseMLP``: ``_fit_stochastic`` and the steps of
    scikit-learn's ``_fit_stochastic`` it is made of."""

    def _make_optimizer(self):
        if self.solver == "sgd":
            return _SklearnSGD(self.learning_rate_init, self.momentum, self.nesterovs_momentum,
                               self.learning_rate, self.power_t)
        return _SklearnAdam(self.learning_rate_init, self.beta_1, self.beta_2, self.epsilon)

    def _fit_stochastic(self, X, Y, sample_weight, incremental, X_val, y_val):
        net = self._network(X.shape[1], X.dtype)
        if not incremental or not hasattr(self, "_optimizer"):
            self._optimizer = self._make_optimizer()
        opt = self._optimizer
        state = getattr(opt, "state", None)
        if isinstance(state, np.ndarray) and state.dtype != X.dtype:
            # dtype= changed between partial_fit calls: the moments go on in
            # the new dtype with the weights (it failed inside, naming the
            # optimizer's state)
            opt.state = state.astype(X.dtype)
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
        check_kernel_dim(batch_size, "batch_size", "pass a smaller batch_size")
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
        if isinstance(opt, _SklearnSGD):  # taken up by the runner before the next iteration
            opt.iteration_ends(self.t_)
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
            if isinstance(self._optimizer, _SklearnSGD):
                self._optimizer.iteration_ends(self.t_)
            if incremental:
                return
        warnings.warn("Stochastic Optimizer: Maximum iterations (%d) reached and the "
                      "optimization hasn't converged yet." % self.max_iter, ConvergenceWarning)

    def _trigger_stopping(self, opt, msg):
        """sklearn's trigger_stopping: adaptive SGD divides the rate by 5."""
        if not isinstance(opt, _SklearnSGD) or opt.schedule != "adaptive":
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
