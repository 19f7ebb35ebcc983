"""Learning-rate schedules stepped once per epoch, after torch.optim.lr_scheduler:
``StepLR``, ``ExponentialLR``, ``CosineAnnealingLR`` and
``ReduceLROnPlateau`` (protocol and definitions: ``fastbp.callbacks``)."""
import math

from ._base import Callback, _check_monitor, _count, _monitored, _number

# -- learning-rate schedules -----------------------------------------------------------
class _LRSchedule(Callback):
    """Shared part of the schedules: the optimizer check, base lr and step count."""

    def __init__(self, base_lr=None):
        self.fixed_base_lr = (None if base_lr is None
                              else _number(base_lr, "base_lr", type(self).__name__, low=0))
        self.base_lr = None
        self.last_epoch = 0
        self.lrs = []

    def _optimizer(self, net):
        opt = getattr(net, "optimizer", None)
        name = type(self).__name__
        if opt is None or not hasattr(opt, "lr"):
            raise ValueError(f"{name} needs an optimizer with an lr attribute, got {opt!r}")
        if type(opt).__name__ == "Rprop":
            raise ValueError(f"{name}: Rprop's lr is only its initial step size (each weight "
                             "then adapts its own), so a schedule would have no effect")
        return opt

    def on_train_begin(self, net):
        opt = self._optimizer(net)
        if self.fixed_base_lr is None:   # restart from the rate the optimizer has
            self.base_lr = float(opt.lr)
            self.last_epoch = 0
            self.lrs = [self.base_lr]
            return
        # the model's epoch count: a fit that continues the run (again, or
        # from a checkpoint) continues the schedule
        self.base_lr = self.fixed_base_lr
        self.last_epoch = net.history.n_epochs
        self.lrs = []
        self._set(net, self._closed_form(self.base_lr, self.last_epoch))

    def _set(self, net, lr):
        net.optimizer.lr = float(lr)
        self.lrs.append(float(lr))

    def on_epoch_end(self, net, epoch, logs):
        if self.base_lr is None:
            raise RuntimeError(f"{type(self).__name__}: on_epoch_end before on_train_begin")
        self.last_epoch += 1
        self._set(net, self._closed_form(self.base_lr, self.last_epoch))

    def _closed_form(self, base_lr, t):
        raise NotImplementedError


_SCHEDULE_NOTE = """
    base_lr : float, optional
        :math:`\\eta_0`, fixed: :math:`t` then counts the epochs the model
        has finished (``net.history.n_epochs``), so a fit that continues a
        run, again or from a checkpoint, continues the schedule with the
        same rates as one long fit.  By default :math:`\\eta_0` is the
        optimizer's lr when each fit begins, and :math:`t` counts that
        fit's epochs: every fit restarts the schedule.

    Attributes
    ----------
    base_lr : float
        :math:`\\eta_0`.
    last_epoch : int
        :math:`t`, epochs finished (in this fit, or by the model with a
        fixed ``base_lr``).
    lrs : list of float
        :math:`\\eta_0, \\eta_1, ...`: the rate of every epoch of this fit
        (the last one is set for the epoch after the fit).

    Notes
    -----
    Stepped once per epoch, at the epoch's end, following
    ``torch.optim.lr_scheduler.{name}``.  The rate is computed from the
    closed form above, written as the expression of torch's
    ``{name}._get_closed_form_lr`` in the same order, so it equals that
    bitwise.  Stepping torch's scheduler (its ``get_lr`` updates the current
    rate recursively) gives the same rates up to rounding: a few ulps (the
    tests hold them to a relative 1e-12 over 20 epochs).
    ``net.optimizer.lr`` is set, not multiplied, each epoch, so other changes
    to it during the fit are overwritten.  The base rate is re-read when
    every fit begins: a second fit restarts the schedule from the rate the
    first one left.
"""


class StepLR(_LRSchedule):
    __doc__ = r"""Decay the learning rate by ``gamma`` every ``step_size`` epochs.

    .. math::

        \eta_t = \eta_0 \, \gamma^{\lfloor t / \mathrm{step\_size} \rfloor}

    Parameters
    ----------
    step_size : int
        Epochs between decays (>= 1).
    gamma : float, default 0.1
        Multiplicative factor (>= 0).
""" + _SCHEDULE_NOTE.format(name="StepLR")

    def __init__(self, step_size, gamma=0.1, base_lr=None):
        super().__init__(base_lr)
        self.step_size = _count(step_size, "step_size", "StepLR", low=1)
        self.gamma = _number(gamma, "gamma", "StepLR", low=0)

    def _closed_form(self, base_lr, t):
        return base_lr * self.gamma ** (t // self.step_size)


class ExponentialLR(_LRSchedule):
    __doc__ = r"""Decay the learning rate by ``gamma`` every epoch.

    .. math::

        \eta_t = \eta_0 \, \gamma^{t}

    Parameters
    ----------
    gamma : float
        Multiplicative factor per epoch (>= 0).
""" + _SCHEDULE_NOTE.format(name="ExponentialLR")

    def __init__(self, gamma, base_lr=None):
        super().__init__(base_lr)
        self.gamma = _number(gamma, "gamma", "ExponentialLR", low=0)

    def _closed_form(self, base_lr, t):
        return base_lr * self.gamma ** t


class CosineAnnealingLR(_LRSchedule):
    __doc__ = r"""Anneal the learning rate from its base value to ``eta_min``
    along half a cosine over ``T_max`` epochs (SGDR without restarts).

    .. math::

        \eta_t = \eta_{min} + \tfrac12 (\eta_0 - \eta_{min})
                 \left(1 + \cos\left(\pi \, t / T_{max}\right)\right)

    Past ``T_max`` the formula continues (the rate rises again, with period
    :math:`2 T_{max}`), as torch's does.

    Parameters
    ----------
    T_max : int
        Epochs of the half period (>= 1).
    eta_min : float, default 0
        Minimum learning rate (>= 0).
""" + _SCHEDULE_NOTE.format(name="CosineAnnealingLR")

    def __init__(self, T_max, eta_min=0, base_lr=None):
        super().__init__(base_lr)
        self.T_max = _count(T_max, "T_max", "CosineAnnealingLR", low=1)
        self.eta_min = _number(eta_min, "eta_min", "CosineAnnealingLR", low=0)

    def _closed_form(self, base_lr, t):
        # the expression of torch's CosineAnnealingLR._get_closed_form_lr, same order
        return (self.eta_min + (base_lr - self.eta_min)
                * (1 + math.cos(math.pi * t / self.T_max)) / 2)


class ReduceLROnPlateau(_LRSchedule):
    r"""Reduce the learning rate when a monitored metric stops improving.

    Follows ``torch.optim.lr_scheduler.ReduceLROnPlateau`` step for step,
    with ``scheduler.step(logs[monitor])`` at the end of every epoch:

    - the value :math:`a` is better than the best so far :math:`b` when
      :math:`a < b (1 - \mathrm{threshold})` (mode "min", threshold_mode
      "rel"), :math:`a < b - \mathrm{threshold}` ("min", "abs"),
      :math:`a > b (1 + \mathrm{threshold})` ("max", "rel") or
      :math:`a > b + \mathrm{threshold}` ("max", "abs"); :math:`b` starts
      at :math:`+\infty` ("min") or :math:`-\infty` ("max");
    - a better value becomes the best and resets the count of bad epochs;
      any other value increments it;
    - during a cooldown (``cooldown`` epochs after a reduction) the cooldown
      counter decreases by one and the bad-epoch count is reset to 0;
    - when the bad-epoch count exceeds ``patience``, the rate becomes
      :math:`\eta \leftarrow \max(\eta \cdot \mathrm{factor}, \mathrm{min\_lr})`
      (only if that lowers it by more than ``eps``), the cooldown starts and
      the count is reset.

    The rate is read from and written to ``net.optimizer.lr``, as torch reads
    and writes the param group's lr, so the rates equal torch's bitwise for
    the same metric values.  Counters and the best value are reset when a fit
    begins.

    Parameters
    ----------
    monitor : str, default "val_loss"
        Metric to watch; a ValueError listing the available metrics is
        raised when it is missing from the epoch logs.
    mode : {"min", "max"}, default "min"
    factor : float, default 0.1
        Multiplier of the rate at a reduction (0 <= factor < 1).
    patience : int, default 10
        Bad epochs tolerated before a reduction.
    threshold : float, default 1e-4
    threshold_mode : {"rel", "abs"}, default "rel"
    cooldown : int, default 0
    min_lr : float, default 0
        Lower bound of the rate.
    eps : float, default 1e-8
        Reductions smaller than this are skipped (torch's ``eps``).

    Attributes
    ----------
    best : float
    num_bad_epochs : int
    cooldown_counter : int
    lrs : list of float
        The rate of every epoch of this fit (the last one is set for the
        epoch after the fit).
    """

    def __init__(self, monitor="val_loss", mode="min", factor=0.1, patience=10, threshold=1e-4,
                 threshold_mode="rel", cooldown=0, min_lr=0, eps=1e-8):
        super().__init__()
        who = "ReduceLROnPlateau"
        self.monitor = _check_monitor(monitor, who)
        if mode not in ("min", "max"):
            raise ValueError(f"{who}: mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"{who}: threshold_mode must be 'rel' or 'abs', "
                             f"got {threshold_mode!r}")
        self.mode, self.threshold_mode = mode, threshold_mode
        self.factor = _number(factor, "factor", who, low=0, high=1, high_open=True)
        self.patience = _count(patience, "patience", who)
        self.threshold = _number(threshold, "threshold", who)
        self.cooldown = _count(cooldown, "cooldown", who)
        self.min_lr = _number(min_lr, "min_lr", who, low=0)
        self.eps = _number(eps, "eps", who, low=0)
        self._reset()

    def _reset(self):
        self.best = math.inf if self.mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0

    def _is_better(self, a, best):
        if self.mode == "min" and self.threshold_mode == "rel":
            return a < best * (1.0 - self.threshold)
        if self.mode == "min":
            return a < best - self.threshold
        if self.threshold_mode == "rel":
            return a > best * (self.threshold + 1.0)
        return a > best + self.threshold

    def on_train_begin(self, net):
        super().on_train_begin(net)
        self._reset()

    def on_epoch_end(self, net, epoch, logs):
        current = _monitored(logs, self.monitor, "ReduceLROnPlateau")
        self.last_epoch += 1
        if self._is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # bad epochs in a cooldown do not count
        lr = float(net.optimizer.lr)
        if self.num_bad_epochs > self.patience:
            new_lr = max(lr * self.factor, self.min_lr)
            if lr - new_lr > self.eps:
                lr = new_lr
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._set(net, lr)
