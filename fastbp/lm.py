"""Levenberg-Marquardt: a full-batch second-order solver for the mse loss.

``LevenbergMarquardt`` is a ``Solver`` (``fastbp._loop``), not an optimizer:
it does not update the parameters from mini-batch gradients.
``net.fit(X, y, loss="mse", optimizer=LevenbergMarquardt(), epochs=30)``
hands it the whole training set; it checks that it can train the model and
makes a run (``_LMRun``) whose every epoch is one Levenberg-Marquardt
iteration over all of it, and the shared epoch loop (``fastbp._loop.train``)
drives that run with the same callbacks, history, stop records and Ctrl-C
handling as a mini-batch fit.

The Jacobian is computed here in NumPy, in float64, from the same layer math
as ``fastbp.reference`` (the compiled engine computes summed gradients only,
not the per-row ones LM needs).
"""
from __future__ import annotations

import numpy as np

from ._ext.engine import ACT, B_OFF, KIND, N_IN, N_OUT, RATE, TRAINABLE, W_OFF, Kind
from ._loop import Divergence, Epoch, Solver, Stop
from ._optimizer import _check, _real
from .reference import activation_derivative, forward_all

__all__ = ["LevenbergMarquardt"]

#: bytes of one block of Jacobian rows (block_rows=None picks the rows to fit)
_BLOCK_BYTES = 4 << 20
#: elements of layer outputs held at once when evaluating the error
_EVAL_ELEMENTS = 1 << 21
#: lower bound of mu after a decrease, as trainlm's
_MU_FLOOR = 1e-20


class LevenbergMarquardt(Solver):
    r"""Levenberg-Marquardt for the mse loss (the schedule of MATLAB's trainlm).

    With the residuals :math:`e = Z - Y` of all :math:`n k` outputs of the
    training set (n rows, k outputs), sample weights :math:`w_i` and the
    trainable parameters :math:`\theta` (P of them), LM minimises the sum of
    squared errors

    .. math::

        E(\theta) = \sum_{i=1}^{n} w_i \sum_{j=1}^{k} e_{ij}(\theta)^2,
        \qquad \mathrm{mse} = E / (k \sum_i w_i).

    Let :math:`J` be the Jacobian of the residuals, the :math:`n k \times P`
    matrix :math:`J_{(ij),p} = \sqrt{w_i}\, \partial e_{ij} / \partial\theta_p`
    (and :math:`\tilde e_{ij} = \sqrt{w_i}\, e_{ij}`).  Each iteration (epoch)
    forms

    .. math::

        A = J^\top J \ (P \times P), \qquad g = J^\top \tilde e \ (P),

    then, starting from the current damping :math:`\mu`, repeats:

    .. math::

        (A + \mu I)\, \Delta = -g \quad \text{(Cholesky solve)};

    if :math:`E(\theta + \Delta) < E(\theta)` the step is accepted,
    :math:`\theta \leftarrow \theta + \Delta`,
    :math:`\mu \leftarrow \max(\mu \cdot \mathrm{mu\_dec}, 10^{-20})`, and the
    iteration ends; otherwise (also when :math:`A + \mu I` is not numerically
    positive definite or :math:`E(\theta + \Delta)` is not finite)
    :math:`\mu \leftarrow \mu \cdot \mathrm{mu\_inc}` and the solve is
    repeated, for as long as :math:`\mu \le \mathrm{mu\_max}`.  When
    :math:`\mu` exceeds mu_max no step decreased the error: training stops
    (``history.stop_reason`` says so) with the parameters unchanged.  The
    default constants and the schedule are those of MATLAB's ``trainlm``
    (Deep Learning Toolbox; Hagan & Menhaj, "Training feedforward networks
    with the Marquardt algorithm", IEEE Trans. Neural Networks 5(6), 1994):
    small :math:`\mu` is a Gauss-Newton step, large :math:`\mu` a short
    gradient-descent step :math:`-g / \mu`.

    :math:`A` and :math:`g` are accumulated over blocks of rows, so memory is
    :math:`O(P^2)` plus one block of :math:`J`, not :math:`O(n k P)`.  Row
    :math:`(i, j)` of :math:`J` is the gradient of :math:`e_{ij}` alone: a
    unit delta on output unit j backpropagated through the network without
    summing over rows; a dense layer's block is the outer product of its
    input row and that delta (its bias block is the delta).  Every iteration
    costs one such pass, a Cholesky factorisation (:math:`P^3/3` flops) and
    one forward pass per trial step: LM suits small networks (up to a few
    thousand parameters).

    Computation is in float64 whatever the model's dtype; a trial step is
    rounded to the model's dtype before its error is evaluated, so an
    accepted step decreases the error of the parameters actually stored.
    The recorded ``loss`` is that float64 mse (``net.evaluate`` of a float32
    model may differ in the last digits).

    Parameters
    ----------
    mu : float > 0, default 1e-3
        Initial damping.
    mu_dec : float in (0, 1), default 0.1
        Factor of mu after an accepted step.
    mu_inc : float in (1, 1e8], default 10
        Factor of mu after a rejected step.
    mu_max : float in (0, 1e300], default 1e10
        Training stops when mu exceeds it.
    block_rows : int or None, default None
        Rows of the training set per block of the Jacobian; None chooses
        them so that a block of J takes about 4 MiB.

    Attributes
    ----------
    mu : float
        The current damping.  It is kept between fits, so fitting again
        with the same object continues the schedule (once mu has exceeded
        mu_max, further fits stop at once; ``reset()`` starts over).
        Callbacks may change it between epochs.
    t : int
        Accepted steps so far.

    Notes
    -----
    Only ``loss="mse"`` is supported, without weight or activity penalties
    (``kernel_regularizer``, ``activity_regularizer``), Dropout layers or
    DropConnect (ValueError).  Sample weights are supported.  Frozen layers
    (``trainable=False``) are excluded from the solve: their columns of J
    are dropped and their parameters do not change.  ``fit``'s mini-batch
    options (batch_size, shuffle, clipping, grad_norms, checkpoint, ...)
    do not apply to this solver.

    It is a full-batch ``Solver`` (``fastbp._loop``), not an
    ``fastbp.optim.Optimizer``: it has no ``step(params, grad)`` (LM needs
    the Jacobian, not a gradient).  ``fit(optimizer=LevenbergMarquardt())``
    (or the class) runs it through the epoch loop every fit shares, so
    callbacks, the history, stop records, divergence and Ctrl-C behave as
    in a mini-batch fit; ``on_batches_end`` is not called (an epoch is one
    iteration, not batches).

    A model whose optimizer is a LevenbergMarquardt cannot be saved:
    ``net.save`` raises ValueError (model files hold the optimizers of
    ``fastbp.optim.OPTIMIZERS`` only, and ``fastbp.load`` does not know this
    class); set ``net.optimizer = None`` first to save the trained model.

    Examples
    --------
    >>> import numpy as np, fastbp
    >>> from fastbp.optim import LevenbergMarquardt
    >>> X = np.linspace(-3, 3, 200)[:, None]
    >>> net = fastbp.Sequential([fastbp.Dense(10, activation="tanh"), fastbp.Dense(1)],
    ...                         dtype="float64", seed=0)
    >>> hist = net.fit(X, np.sin(X), optimizer=LevenbergMarquardt(), epochs=30, verbose=0)
    >>> bool(hist["loss"][-1] < 1e-2)
    True
    """

    def __init__(self, mu: float = 1e-3, mu_dec: float = 0.1, mu_inc: float = 10.0,
                 mu_max: float = 1e10, block_rows: int | None = None) -> None:
        self.mu, self.mu_dec, self.mu_inc, self.mu_max = mu, mu_dec, mu_inc, mu_max
        self.block_rows = block_rows
        self.t = 0
        vars(self).update(self._validated())
        self.mu_initial = self.mu

    def _validated(self):
        # Checked again before every iteration: mu_inc <= 1 or mu == 0 set
        # after construction would make the damping loop run forever.
        mu, mu_dec = _real(self.mu, "mu"), _real(self.mu_dec, "mu_dec")
        mu_inc, mu_max = _real(self.mu_inc, "mu_inc"), _real(self.mu_max, "mu_max")
        _check(mu > 0, f"invalid mu: {mu} (must be > 0)")
        _check(0 < mu_dec < 1, f"invalid mu_dec: {mu_dec} (must be in (0, 1))")
        # (bounded so that mu * mu_inc, which ends the damping loop above
        # mu_max, stays finite: at mu_max = 1.8e308 mu became inf, and every
        # later fit failed with "invalid mu: inf")
        _check(1 < mu_inc <= 1e8, f"invalid mu_inc: {mu_inc} (must be in (1, 1e8])")
        _check(0 < mu_max <= 1e300, f"invalid mu_max: {mu_max} (must be in (0, 1e300])")
        block_rows = self.block_rows
        if block_rows is not None:
            _check(not isinstance(block_rows, bool) and isinstance(block_rows, (int, np.integer))
                   and block_rows >= 1, f"invalid block_rows: {block_rows!r} "
                   "(a positive integer or None)")
            block_rows = int(block_rows)
        return dict(mu=mu, mu_dec=mu_dec, mu_inc=mu_inc, mu_max=mu_max, block_rows=block_rows)

    def _checked(self):
        """Check the hyperparameters (a callback may have changed them) and
        store them normalised."""
        try:
            vars(self).update(self._validated())
        except ValueError as exc:
            raise ValueError(f"invalid hyperparameters for LevenbergMarquardt: {exc}") from None

    def reset(self):
        """Start over: mu back to its initial value, step count 0."""
        self.mu = self.mu_initial
        self.t = 0

    def get_config(self):
        """Constructor arguments as a dict (mu is the initial damping)."""
        return {"mu": self.mu_initial, "mu_dec": self.mu_dec, "mu_inc": self.mu_inc,
                "mu_max": self.mu_max, "block_rows": self.block_rows}

    # -- training ------------------------------------------------------------
    def _start(self, net, X, Y, W, loss):
        """The run of one ``Sequential.fit`` on dense X (n, n_features),
        targets Y (n, k) and sample weights W (n,), after checking that LM
        can train ``net`` (ValueError before anything changes)."""
        if loss != "mse":
            raise ValueError(f"LevenbergMarquardt minimises the mse loss only, not {loss!r}")
        self._checked()
        if getattr(net, "_position", None) is not None:
            raise ValueError("the model holds an unfinished mini-batch epoch; call "
                             "discard_partial_epoch() before fitting with LevenbergMarquardt")
        reg = getattr(net, "_reg", None)
        if reg is not None and np.any(np.asarray(reg) != 0):
            raise ValueError("LevenbergMarquardt does not support weight or activity penalties "
                             "(kernel_regularizer / activity_regularizer)")
        program = np.asarray(net._program)
        cols, index = trainable_columns(program)
        if np.any(net._floats[:, RATE] > 0):  # trainable_columns allows Dense rows only
            raise ValueError("LevenbergMarquardt does not support DropConnect (Dense(..., "
                             "dropconnect=...)): it needs a deterministic network")
        return _LMRun(self, net, program, X, Y, W, cols, index)


class _LMRun:
    """One fit's Levenberg-Marquardt iterations, one per epoch (a run of
    ``fastbp._loop.train``): the data in float64, J's columns, and the
    block size, prepared once."""

    def __init__(self, solver, net, program, X, Y, W, cols, index):
        self.solver, self.net, self.program = solver, net, program
        self.cols, self.index = cols, index
        k = Y.shape[1]
        self.sqrt_w = np.sqrt(np.asarray(W, dtype=np.float64))
        self.denominator = float(np.sum(W, dtype=np.float64)) * k
        self.X = np.asarray(X, dtype=np.float64)
        self.Y = np.asarray(Y, dtype=np.float64)
        self.rows = solver.block_rows or max(1, _BLOCK_BYTES // (8 * k * max(index.size, 1)))

    def refresh(self):
        if self.net.optimizer is not self.solver:
            # (it was ignored: the fit went on with Levenberg-Marquardt and
            # ended with net.optimizer naming what it had not trained with)
            raise ValueError(f"net.optimizer was set to {self.net.optimizer!r} during a "
                             "Levenberg-Marquardt fit, which cannot change solvers; stop the "
                             "fit and call fit(optimizer=...)")
        self.solver._checked()  # a callback may have changed them

    def run_epoch(self, epoch, interrupt):
        """One iteration; a Ctrl-C waits for its end, so the parameters, mu,
        t and the history agree (past _LONG_SEARCH rejected steps it drops
        the iteration instead: the model and mu as it began)."""
        opt, net = self.solver, self.net
        dtype = net.params.dtype
        theta = net.params.astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            A, g, error = normal_equations(self.program, theta, self.X, self.Y, self.sqrt_w,
                                           self.cols, self.index.size, self.rows)
        if not np.isfinite(error):
            return Epoch(divergence=_divergence(epoch))
        accepted = False
        mu_before, trials = opt.mu, 0
        while opt.mu <= opt.mu_max:
            trials += 1
            if interrupt.requested and trials > _LONG_SEARCH:
                # Ctrl-C during a long search for a step (with mu_inc near 1
                # it can take hours): the iteration is dropped, mu put back,
                # so that fitting again redoes it as an uninterrupted run
                # would (a usual search, a dozen trials, ends first)
                opt.mu = mu_before
                return Epoch(interrupted=Stop(
                    "interrupt", f"interrupted by Ctrl-C during epoch {epoch}'s search for a "
                    "step; fit again to continue",
                    f"the weights epoch {epoch} started with"))
            step = _damped_step(A, g, opt.mu)
            if step is not None:
                trial = theta.copy()
                trial[self.index] += step
                trial = trial.astype(dtype)
                if np.isfinite(trial).all():
                    with np.errstate(over="ignore", invalid="ignore"):
                        trial_error = sum_squared_error(self.program, trial.astype(np.float64),
                                                        self.X, self.Y, self.sqrt_w)
                    if trial_error < error:  # False for NaN
                        net.params[...] = trial
                        error = trial_error
                        opt.mu = max(opt.mu * opt.mu_dec, _MU_FLOOR)
                        opt.t += 1
                        accepted = True
                        break
            opt.mu *= opt.mu_inc
        stop = None
        if not accepted:
            stop = Stop("no_progress", (
                f"Levenberg-Marquardt stopped at epoch {epoch}: no step decreased the error "
                f"before mu exceeded mu_max={opt.mu_max:g} (a minimum, or a flat region); "
                "call reset() on the optimizer to start over"),
                f"epoch {epoch}'s weights (no step was accepted in it: the same as before it)")
        return Epoch(loss=error / self.denominator, rows=self.X.shape[0], steps=int(accepted),
                     stop=stop)

    def interrupt_reason(self, epoch, result):
        """A Ctrl-C during an iteration that took a step stops the fit after
        it; after one that took none, its no-progress stop stands."""
        if result.stop is not None:
            return None
        return f"interrupted by Ctrl-C after epoch {epoch}; fit again to continue"


#: rejected steps in one iteration after which Ctrl-C drops it: mu from
#: 1e-3 to mu_max=1e10 by mu_inc=10 takes 13
_LONG_SEARCH = 100


def _divergence(epoch):
    """The error at the current parameters is NaN or infinite (e.g. the
    squared residuals overflow float64): no step can be judged, so the fit
    stops as ``Sequential.fit`` does on a non-finite loss."""
    message = (f"Levenberg-Marquardt diverged at epoch {epoch}: the sum of squared errors "
               "at the current parameters is NaN or infinite (do the targets or outputs "
               "overflow float64 when squared? scale them); training stopped with the "
               "parameters unchanged")
    reason = (f"Levenberg-Marquardt diverged at epoch {epoch}: the sum of squared errors at "
              "the current parameters is NaN or infinite")
    return Divergence(message, reason, f"the weights epoch {epoch} started with", 1)


def _damped_step(A, g, mu):
    """Solution of (A + mu I) step = -g by Cholesky, or None when A + mu I is
    not numerically positive definite (or the solve is not finite)."""
    from scipy.linalg import LinAlgError, cho_factor, cho_solve

    M = A.copy()
    M[np.diag_indices_from(M)] += mu
    try:
        factor = cho_factor(M, lower=True, overwrite_a=True, check_finite=False)
    except LinAlgError:
        return None
    step = cho_solve(factor, -g, check_finite=False)
    return step if np.isfinite(step).all() else None


# -- the Jacobian ------------------------------------------------------------------

def trainable_columns(program):
    """Columns of J for each layer of ``program``.

    Returns ``cols`` (per row of the program: the column of J where that
    layer's W starts, its b following; -1 for a frozen layer) and ``index``
    (the positions in ``params`` of J's columns, in order).  ValueError for
    Dropout layers or a network without trainable parameters.
    """
    cols, index, c = [], [], 0
    for row in program:
        n_in, n_out, w_off, b_off = (int(row[col]) for col in (N_IN, N_OUT, W_OFF, B_OFF))
        if row[KIND] != Kind.DENSE:
            raise ValueError("LevenbergMarquardt supports Dense layers only (no Dropout or "
                             "BatchNorm): it needs a deterministic network")
        if row[TRAINABLE]:
            cols.append(c)
            index.append(np.arange(w_off, b_off + n_out))
            c += n_in * n_out + n_out
        else:
            cols.append(-1)
    if not index:
        raise ValueError("the model has no trainable parameters")
    return cols, np.concatenate(index).astype(np.int64)


def jacobian(program, params, X, Y, cols, n_cols, sqrt_w=None):
    """Jacobian of the residuals of one block of rows, and the residuals.

    Returns ``J`` (m k, n_cols), row i k + j holding d e_ij / d theta for the
    columns of ``trainable_columns``, and ``e`` (m k,) = (Z - Y) raveled,
    both scaled by ``sqrt_w`` (m,) per row when given.  float64 inputs.
    """
    outs, _ = forward_all(program, X, params)
    m, k = Y.shape
    L = len(program)
    J = np.zeros((m, k, n_cols))
    # D[i, j, :] = d Z_ij / d (pre-activation of the current layer), row i.
    D = np.zeros((m, k, k))
    D[:, np.arange(k), np.arange(k)] = activation_derivative(outs[L], int(program[L - 1][ACT]))
    if sqrt_w is not None:
        D *= sqrt_w[:, None, None]
    lowest = min(l for l in range(L) if cols[l] >= 0)
    for l in range(L - 1, lowest - 1, -1):
        n_in, n_out, w_off = (int(program[l][col]) for col in (N_IN, N_OUT, W_OFF))
        if cols[l] >= 0:
            c, n_w = cols[l], n_in * n_out
            J[:, :, c:c + n_w] = np.einsum("ia,ijb->ijab", outs[l], D).reshape(m, k, n_w)
            J[:, :, c + n_w:c + n_w + n_out] = D
        if l > lowest:
            Wl = params[w_off:w_off + n_in * n_out].reshape(n_in, n_out)
            D = (D @ Wl.T) * activation_derivative(outs[l], int(program[l - 1][ACT]))[:, None, :]
    e = outs[L] - Y
    if sqrt_w is not None:
        e = e * sqrt_w[:, None]
    return J.reshape(m * k, n_cols), e.ravel()


def normal_equations(program, params, X, Y, sqrt_w, cols, n_cols, block_rows):
    """J^T J, J^T e and the weighted sum of squared errors, accumulated over
    blocks of ``block_rows`` rows (float64)."""
    A = np.zeros((n_cols, n_cols))
    g = np.zeros(n_cols)
    error = 0.0
    for s in range(0, X.shape[0], block_rows):
        sl = slice(s, s + block_rows)
        J, e = jacobian(program, params, X[sl], Y[sl], cols, n_cols, sqrt_w[sl])
        A += J.T @ J
        g += J.T @ e
        error += float(e @ e)
    return A, g, error


def sum_squared_error(program, params, X, Y, sqrt_w):
    """sum_i w_i sum_j (Z_ij - Y_ij)^2 in float64, by blocks of rows."""
    width = X.shape[1] + int(np.sum(program[:, N_OUT]))
    rows = max(1, _EVAL_ELEMENTS // width)
    total = 0.0
    for s in range(0, X.shape[0], rows):
        sl = slice(s, s + rows)
        outs, _ = forward_all(program, X[sl], params)
        r = (outs[-1] - Y[sl]) * sqrt_w[sl, None]
        total += float(np.sum(r * r))
    return total
