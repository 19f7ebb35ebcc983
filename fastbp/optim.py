"""Optimizers over the flat parameter vector, with torch.optim's equations.

Each class validates its hyperparameters and holds its state; the update is
one fused compiled pass (fastbp/_numba/optim.py) over all parameters, called
from the training engine once per mini-batch, or from Python by ``step``.
Defaults, state initialisation and the update equations are those of
``torch.optim`` (single-tensor form): given the same initial weights and
batches, a float64 run matches torch step for step to rounding.

An optimizer object keeps its state (moments, step count ``t``) between
calls, so fitting again with the same object continues where it stopped.
It is bound to the size and dtype of the first parameter vector it updates.
``state_dict()`` gives that state as plain values (copies) and
``load_state_dict()`` restores it, refusing with ValueError a state the
optimizer could not have produced; model files hold exactly that.

Adding an optimizer: declare its update kernel in fastbp/_numba/optim.py
with ``@update_kernel(name, slots=..., flags=...)`` (its arguments name its
state slots and hyperparameters), then subclass ``Optimizer`` with
``kernel = name`` and a ``_validated`` that checks the hyperparameters and
returns them by the kernel's names; the engine's entry point and the
packing of its hyperparameters follow from the declaration.

Notation: p parameters, g gradient, t step count (1 at the first update),
lr learning rate, lambda weight decay.

Hyperparameters may be changed on the object at any time (a callback's
learning rate schedule, momentum turned on after some epochs); they are
checked again before every run of updates.  Every optimizer's state holds
all the vectors its update can use, whatever the settings: a vector that a
setting turns on later starts as torch.optim starts it (see each class).
"""
from __future__ import annotations

from ._optimizer import MAX_STEPS, Optimizer, _check, _flag, _pair, _real  # noqa: F401
from .lm import LevenbergMarquardt

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "Rprop", "Adagrad",
           "LevenbergMarquardt"]


class SGD(Optimizer):
    r"""Stochastic gradient descent, optionally with momentum (torch.optim.SGD).

    .. math::

        g &\leftarrow g + \lambda p \\
        b_t &= g \ (t = 1), \quad b_t = \mu b_{t-1} + (1 - \tau) g \ (t > 1) \\
        g &\leftarrow g + \mu b_t \ \text{(nesterov)}, \quad g \leftarrow b_t \ \text{(otherwise)} \\
        p &\leftarrow p - \mathrm{lr}\, g

    where the momentum lines apply only when momentum mu != 0, and tau is the
    dampening.  As in torch, the buffer b is created (a copy of that step's
    gradient) at the first step with momentum, also when momentum is turned
    on after some steps without; turned off, it is kept for when momentum
    is turned on again.

    Parameters
    ----------
    lr : float, default 1e-3
    momentum : float, default 0
    dampening : float, default 0
    nesterov : bool, default False
    weight_decay : float, default 0
    """

    kernel = "sgd"
    _step_marks = ("momentum_start",)

    def __init__(self, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.nesterov, self.weight_decay = nesterov, weight_decay
        self._momentum_start = 0  # the step that created the buffer (0: none yet)
        self._set_hyperparameters()

    def _validated(self):
        lr, momentum = _real(self.lr, "learning rate"), _real(self.momentum, "momentum")
        dampening = _real(self.dampening, "dampening")
        weight_decay = _real(self.weight_decay, "weight_decay")
        nesterov = _flag(self.nesterov, "nesterov")
        _check(lr >= 0, f"invalid learning rate: {lr}")
        _check(momentum >= 0, f"invalid momentum: {momentum}")
        _check(0 <= dampening <= 1, f"invalid dampening: {dampening}")
        _check(weight_decay >= 0, f"invalid weight_decay: {weight_decay}")
        _check(not nesterov or (momentum > 0 and dampening == 0),
               "nesterov momentum requires a momentum and zero dampening")
        return dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                    weight_decay=weight_decay)

    def _kernel_values(self, hp):
        if not 1 <= self._momentum_start <= self.t:
            # No buffer yet: the next step creates it if it has momentum.
            self._momentum_start = self.t + 1 if hp["momentum"] != 0 else 0
        return dict(hp, momentum_start=self._momentum_start)

    def reset(self):
        super().reset()
        self._momentum_start = 0



class Adam(Optimizer):
    r"""Adam (torch.optim.Adam), with optional AMSGrad.

    .. math::

        g &\leftarrow g + \lambda p \\
        m_t &= m_{t-1} + (1 - \beta_1)(g - m_{t-1}) \quad\text{(torch's lerp)} \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g^2 \\
        \hat v_t &= \max(\hat v_{t-1}, v_t) \ \text{(amsgrad)}, \quad \hat v_t = v_t \ \text{(otherwise)} \\
        p &\leftarrow p - \frac{\mathrm{lr}}{1 - \beta_1^t}\,
             \frac{m_t}{\sqrt{\hat v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

    Note that eps is added after the bias correction of v, as in torch (the
    paper adds it to the corrected square root as well, but writes the bias
    correction on m and v separately).

    The state always holds the maximum of v: zeros until amsgrad is on.
    Turning amsgrad on after some steps starts it from zeros, as torch's
    state starts it (torch itself refuses that change, with a KeyError);
    turned off, it is kept unchanged.

    Parameters
    ----------
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    weight_decay : float, default 0
        L2 penalty added to the gradient (coupled; see AdamW for decoupled).
    amsgrad : bool, default False
    """

    kernel = "adam"
    _decoupled = False
    _nonnegative_slots = ("v", "vmax")

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False) -> None:
        super().__init__()
        self.lr, self.betas, self.eps = lr, betas, eps
        self.weight_decay, self.amsgrad = weight_decay, amsgrad
        self._set_hyperparameters()

    def _validated(self):
        lr, eps = _real(self.lr, "learning rate"), _real(self.eps, "epsilon")
        weight_decay = _real(self.weight_decay, "weight_decay")
        betas = _pair(self.betas, "betas")
        amsgrad = _flag(self.amsgrad, "amsgrad")
        _check(lr >= 0, f"invalid learning rate: {lr}")
        _check(eps >= 0, f"invalid epsilon: {eps}")
        _check(all(0 <= b < 1 for b in betas), f"invalid betas: {betas}")
        _check(weight_decay >= 0, f"invalid weight_decay: {weight_decay}")
        return dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)

    def _kernel_values(self, hp):
        return dict(hp, beta1=hp["betas"][0], beta2=hp["betas"][1], decoupled=self._decoupled)


class AdamW(Adam):
    r"""Adam with decoupled weight decay (torch.optim.AdamW).

    Identical to :class:`Adam` except that the weight decay shrinks the
    parameters instead of entering the gradient:

    .. math::

        p \leftarrow p (1 - \mathrm{lr}\,\lambda)

    before the Adam update.  Default ``weight_decay=0.01`` as in torch.
    """

    _decoupled = True

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False) -> None:
        super().__init__(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


class RMSprop(Optimizer):
    r"""RMSprop (torch.optim.RMSprop).

    .. math::

        g &\leftarrow g + \lambda p \\
        v_t &= \alpha v_{t-1} + (1 - \alpha) g^2 \\
        \bar g_t &= \bar g_{t-1} + (1 - \alpha)(g - \bar g_{t-1}) \ \text{(centered)} \\
        d &= \sqrt{v_t - \bar g_t^2} + \epsilon \ \text{(centered)}, \quad d = \sqrt{v_t} + \epsilon \ \text{(otherwise)} \\
        b_t &= \mu b_{t-1} + g / d, \quad p \leftarrow p - \mathrm{lr}\, b_t \ \text{(momentum } \mu > 0) \\
        p &\leftarrow p - \mathrm{lr}\, g / d \ \text{(otherwise)}

    The gradient average and the momentum buffer are always in the state:
    zeros until centered or momentum is on.  Turning either on after some
    steps starts it from zeros, as torch's state starts it (torch itself
    refuses that change, with a KeyError); turned off, it is kept unchanged.

    Parameters
    ----------
    lr : float, default 1e-2
    alpha : float, default 0.99
    eps : float, default 1e-8
    weight_decay : float, default 0
    momentum : float, default 0
    centered : bool, default False
    """

    kernel = "rmsprop"
    _nonnegative_slots = ("square_avg",)

    def __init__(self, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0,
                 centered: bool = False) -> None:
        super().__init__()
        self.lr, self.alpha, self.eps = lr, alpha, eps
        self.weight_decay, self.momentum, self.centered = weight_decay, momentum, centered
        self._set_hyperparameters()

    def _validated(self):
        lr, alpha, eps = _real(self.lr, "learning rate"), _real(self.alpha, "alpha"), _real(self.eps, "epsilon")
        weight_decay, momentum = _real(self.weight_decay, "weight_decay"), _real(self.momentum, "momentum")
        centered = _flag(self.centered, "centered")
        _check(lr >= 0, f"invalid learning rate: {lr}")
        _check(0 <= alpha, f"invalid alpha: {alpha}")
        _check(eps >= 0, f"invalid epsilon: {eps}")
        _check(momentum >= 0, f"invalid momentum: {momentum}")
        _check(weight_decay >= 0, f"invalid weight_decay: {weight_decay}")
        return dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                    centered=centered)


class Rprop(Optimizer):
    r"""Resilient backpropagation (torch.optim.Rprop).

    Each parameter has its own step size s (initially lr).  With the previous
    gradient g' (initially 0):

    .. math::

        s &\leftarrow \mathrm{clip}(s \cdot \eta, s_{min}, s_{max}),\quad
        \eta = \eta_+ \ (g g' > 0),\ \eta_- \ (g g' < 0),\ 1 \ (g g' = 0) \\
        g &\leftarrow 0 \ \text{where } g g' < 0 \\
        p &\leftarrow p - \mathrm{sign}(g)\, s, \quad g' \leftarrow g

    Rprop uses only the sign of the gradient: it is meant for full-batch
    training (``batch_size=None``).

    Parameters
    ----------
    lr : float, default 1e-2
        Initial step size.
    etas : (float, float), default (0.5, 1.2)
        (eta_minus, eta_plus).
    step_sizes : (float, float), default (1e-6, 50)
        (s_min, s_max).
    """

    kernel = "rprop"
    _nonnegative_slots = ("step_size",)
    _unchecked_slots = ("prev",)

    def __init__(self, lr: float = 1e-2, etas: tuple[float, float] = (0.5, 1.2),
                 step_sizes: tuple[float, float] = (1e-6, 50)) -> None:
        super().__init__()
        self.lr, self.etas, self.step_sizes = lr, etas, step_sizes
        self._set_hyperparameters()

    def _validated(self):
        lr = _real(self.lr, "learning rate")
        etas, step_sizes = _pair(self.etas, "etas"), _pair(self.step_sizes, "step_sizes")
        _check(lr >= 0, f"invalid learning rate: {lr}")
        _check(0 < etas[0] < 1 < etas[1], f"invalid etas: {etas}")
        _check(0 <= step_sizes[0] <= step_sizes[1], f"invalid step_sizes: {step_sizes}")
        return dict(lr=lr, etas=etas, step_sizes=step_sizes)

    def _kernel_values(self, hp):
        # lr only sets the initial step sizes (as in torch, changing it later does nothing)
        (etaminus, etaplus), (step_min, step_max) = hp["etas"], hp["step_sizes"]
        return dict(etaminus=etaminus, etaplus=etaplus, step_min=step_min, step_max=step_max)

    def _init_state(self, state):
        state[1] = self.lr


class Adagrad(Optimizer):
    r"""Adagrad (torch.optim.Adagrad).

    .. math::

        g &\leftarrow g + \lambda p \\
        \tilde{\mathrm{lr}} &= \mathrm{lr} / (1 + (t - 1)\,\mathrm{lr\_decay}) \\
        S_t &= S_{t-1} + g^2 \quad (S_0 = \text{initial\_accumulator\_value}) \\
        p &\leftarrow p - \tilde{\mathrm{lr}}\, g / (\sqrt{S_t} + \epsilon)

    Parameters
    ----------
    lr : float, default 1e-2
    lr_decay : float, default 0
    weight_decay : float, default 0
    initial_accumulator_value : float, default 0
    eps : float, default 1e-10
    """

    kernel = "adagrad"
    _nonnegative_slots = ("state_sum",)

    def __init__(self, lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10) -> None:
        super().__init__()
        self.lr, self.lr_decay, self.weight_decay = lr, lr_decay, weight_decay
        self.initial_accumulator_value, self.eps = initial_accumulator_value, eps
        self._set_hyperparameters()

    def _validated(self):
        lr, lr_decay = _real(self.lr, "learning rate"), _real(self.lr_decay, "lr_decay")
        eps, weight_decay = _real(self.eps, "epsilon"), _real(self.weight_decay, "weight_decay")
        initial = _real(self.initial_accumulator_value, "initial_accumulator_value")
        _check(lr >= 0, f"invalid learning rate: {lr}")
        _check(lr_decay >= 0, f"invalid lr_decay: {lr_decay}")
        _check(weight_decay >= 0, f"invalid weight_decay: {weight_decay}")
        _check(initial >= 0, f"invalid initial_accumulator_value: {initial}")
        _check(eps >= 0, f"invalid epsilon: {eps}")
        # initial_accumulator_value only fills the state when it is allocated (as in torch)
        return dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                    initial_accumulator_value=initial, eps=eps)

    def _init_state(self, state):
        state[0] = self.initial_accumulator_value


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop,
              "rprop": Rprop, "adagrad": Adagrad}


def get(optimizer):
    """An optimizer instance from an instance, a class, or a name."""
    if optimizer is None:
        return Adam()
    if isinstance(optimizer, Optimizer):
        return optimizer
    if isinstance(optimizer, type) and issubclass(optimizer, Optimizer):
        return optimizer()
    if isinstance(optimizer, str) and optimizer.lower() in OPTIMIZERS:
        return OPTIMIZERS[optimizer.lower()]()
    raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
