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

Notation: p parameters, g gradient, t step count (1 at the first update),
lr learning rate, lambda weight decay.
"""
import numpy as np

from ._numba import optim as _kernels

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "Rprop", "Adagrad",
           "LevenbergMarquardt"]


def _check(cond, message):
    if not cond:
        raise ValueError(message)


def _real(value, name):
    """A hyperparameter as a finite float (ValueError otherwise)."""
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"invalid {name}: {value!r} is not a real number") from None
    if isinstance(value, bool) or out != out or out in (float("inf"), float("-inf")):
        raise ValueError(f"invalid {name}: {value!r}")
    return out


class Optimizer:
    """Base class: state handling shared by every optimizer.

    Subclasses set ``kernel`` (name of the compiled update), ``uses_step``
    (whether the kernel takes t), implement ``_args`` (the hyperparameters in
    kernel order) and ``_n_slots`` (state vectors needed).
    """

    kernel = None
    uses_step = True

    def __init__(self):
        self.state = None  # (n_slots, n_params) array, allocated on first use
        self.t = 0

    # -- hyperparameters -------------------------------------------------
    def _args(self):
        raise NotImplementedError

    def _n_slots(self):
        raise NotImplementedError

    def _hyper(self):
        """Hyperparameters packed as float64, the order the C wrappers read."""
        return np.array([float(a) for a in self._args()], dtype=np.float64)

    def _init_state(self, state):
        """Fill a freshly allocated state (zeros) where torch starts elsewhere."""

    # -- state -----------------------------------------------------------
    def _bind(self, n_params, dtype):
        """Allocate the state for ``n_params`` parameters of ``dtype`` once."""
        dtype = np.dtype(dtype)
        if self.state is None:
            self.state = np.zeros((self._n_slots(), n_params), dtype=dtype)
            self._init_state(self.state)
            self.t = 0
        elif self.state.shape[1] != n_params or self.state.dtype != dtype:
            raise ValueError(
                f"this {type(self).__name__} holds state for {self.state.shape[1]} "
                f"{self.state.dtype} parameters, not {n_params} {dtype}; use a new "
                "optimizer (or call reset()) for another model")
        return self.state

    def reset(self):
        """Forget the state: the next update starts as the first one."""
        self.state = None
        self.t = 0

    def step(self, params, grad):
        """Apply one update in place: ``params`` and ``grad`` are 1-D arrays of
        the same length and dtype (float32 or float64).

        Returns True when every updated parameter is finite.
        """
        params = np.asarray(params)
        grad = np.asarray(grad)
        _check(params.ndim == 1 and grad.shape == params.shape,
               f"params and grad must be 1-D of equal length, got {params.shape} and {grad.shape}")
        _check(params.dtype in (np.float32, np.float64) and grad.dtype == params.dtype,
               f"params and grad must share a float32/float64 dtype, got {params.dtype} and {grad.dtype}")
        _check(params.flags.writeable and params.flags.c_contiguous, "params must be writeable and contiguous")
        state = self._bind(params.shape[0], params.dtype)
        self.t += 1
        slots = [state[j] for j in range(state.shape[0])]
        slots += [params[:0]] * (self._max_slots - len(slots))
        head = (params, np.ascontiguousarray(grad), *slots)
        if self.uses_step:
            head = head + (self.t,)
        return bool(getattr(_kernels, self.kernel + "_step")(*head, *self._args()))

    # -- persistence -----------------------------------------------------
    def get_config(self):
        """Hyperparameters as a dict (JSON-serialisable)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self).items()
                if k not in ("state", "t")}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class SGD(Optimizer):
    r"""Stochastic gradient descent, optionally with momentum (torch.optim.SGD).

    .. math::

        g &\leftarrow g + \lambda p \\
        b_t &= g \ (t = 1), \quad b_t = \mu b_{t-1} + (1 - \tau) g \ (t > 1) \\
        g &\leftarrow g + \mu b_t \ \text{(nesterov)}, \quad g \leftarrow b_t \ \text{(otherwise)} \\
        p &\leftarrow p - \mathrm{lr}\, g

    where the momentum lines apply only when momentum mu != 0, and tau is the
    dampening.

    Parameters
    ----------
    lr : float, default 1e-3
    momentum : float, default 0
    dampening : float, default 0
    nesterov : bool, default False
    weight_decay : float, default 0
    """

    kernel = "sgd"
    _max_slots = 1

    def __init__(self, lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
        super().__init__()
        lr, momentum = _real(lr, "learning rate"), _real(momentum, "momentum")
        dampening, weight_decay = _real(dampening, "dampening"), _real(weight_decay, "weight_decay")
        _check(lr >= 0, f"invalid learning rate: {lr}")
        _check(momentum >= 0, f"invalid momentum: {momentum}")
        _check(0 <= dampening <= 1, f"invalid dampening: {dampening}")
        _check(weight_decay >= 0, f"invalid weight_decay: {weight_decay}")
        _check(not nesterov or (momentum > 0 and dampening == 0),
               "nesterov momentum requires a momentum and zero dampening")
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.nesterov, self.weight_decay = bool(nesterov), weight_decay

    def _args(self):
        return (self.lr, self.momentum, self.dampening, self.nesterov, self.weight_decay)

    def _n_slots(self):
        return 1 if self.momentum != 0 else 0


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
    _max_slots = 3
    _decoupled = False

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False):
        super().__init__()
        lr, eps, weight_decay = _real(lr, "learning rate"), _real(eps, "epsilon"), _real(weight_decay, "weight_decay")
        _check(isinstance(betas, (tuple, list)) and len(betas) == 2, f"invalid betas: {betas}")
        betas = tuple(_real(b, "betas") for b in betas)
        _check(lr >= 0, f"invalid learning rate: {lr}")
        _check(eps >= 0, f"invalid epsilon: {eps}")
        _check(all(0 <= b < 1 for b in betas), f"invalid betas: {betas}")
        _check(weight_decay >= 0, f"invalid weight_decay: {weight_decay}")
        self.lr, self.betas, self.eps = lr, tuple(float(b) for b in betas), eps
        self.weight_decay, self.amsgrad = weight_decay, bool(amsgrad)

    def _args(self):
        return (self.lr, self.betas[0], self.betas[1], self.eps, self.weight_decay,
                self.amsgrad, self._decoupled)

    def _n_slots(self):
        return 3 if self.amsgrad else 2


class AdamW(Adam):
    r"""Adam with decoupled weight decay (torch.optim.AdamW).

    Identical to :class:`Adam` except that the weight decay shrinks the
    parameters instead of entering the gradient:

    .. math::

        p \leftarrow p (1 - \mathrm{lr}\,\lambda)

    before the Adam update.  Default ``weight_decay=0.01`` as in torch.
    """

    _decoupled = True

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
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
    uses_step = False
    _max_slots = 3

    def __init__(self, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False):
        super().__init__()
        lr, alpha, eps = _real(lr, "learning rate"), _real(alpha, "alpha"), _real(eps, "epsilon")
        weight_decay, momentum = _real(weight_decay, "weight_decay"), _real(momentum, "momentum")
        _check(lr >= 0, f"invalid learning rate: {lr}")
        _check(0 <= alpha, f"invalid alpha: {alpha}")
        _check(eps >= 0, f"invalid epsilon: {eps}")
        _check(momentum >= 0, f"invalid momentum: {momentum}")
        _check(weight_decay >= 0, f"invalid weight_decay: {weight_decay}")
        self.lr, self.alpha, self.eps = lr, alpha, eps
        self.weight_decay, self.momentum, self.centered = weight_decay, momentum, bool(centered)

    def _args(self):
        return (self.lr, self.alpha, self.eps, self.weight_decay, self.momentum, self.centered)

    def _n_slots(self):
        # slots: 0 square average, 1 gradient average, 2 momentum buffer
        return 3 if self.momentum > 0 else (2 if self.centered else 1)


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
    uses_step = False
    _max_slots = 2

    def __init__(self, lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50)):
        super().__init__()
        lr = _real(lr, "learning rate")
        _check(isinstance(etas, (tuple, list)) and len(etas) == 2, f"invalid etas: {etas}")
        _check(isinstance(step_sizes, (tuple, list)) and len(step_sizes) == 2,
               f"invalid step_sizes: {step_sizes}")
        etas = tuple(_real(e, "etas") for e in etas)
        step_sizes = tuple(_real(s, "step_sizes") for s in step_sizes)
        _check(lr >= 0, f"invalid learning rate: {lr}")
        _check(0 < etas[0] < 1 < etas[1], f"invalid etas: {etas}")
        _check(0 <= step_sizes[0] <= step_sizes[1], f"invalid step_sizes: {step_sizes}")
        self.lr = lr
        self.etas = tuple(float(e) for e in etas)
        self.step_sizes = tuple(float(s) for s in step_sizes)

    def _args(self):
        return (self.etas[0], self.etas[1], self.step_sizes[0], self.step_sizes[1])

    def _n_slots(self):
        return 2  # previous gradient, step sizes

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
    _max_slots = 1

    def __init__(self, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                 eps=1e-10):
        super().__init__()
        lr, lr_decay, eps = _real(lr, "learning rate"), _real(lr_decay, "lr_decay"), _real(eps, "epsilon")
        weight_decay = _real(weight_decay, "weight_decay")
        initial_accumulator_value = _real(initial_accumulator_value, "initial_accumulator_value")
        _check(lr >= 0, f"invalid learning rate: {lr}")
        _check(lr_decay >= 0, f"invalid lr_decay: {lr_decay}")
        _check(weight_decay >= 0, f"invalid weight_decay: {weight_decay}")
        _check(initial_accumulator_value >= 0,
               f"invalid initial_accumulator_value: {initial_accumulator_value}")
        _check(eps >= 0, f"invalid epsilon: {eps}")
        self.lr, self.lr_decay, self.weight_decay = lr, lr_decay, weight_decay
        self.initial_accumulator_value, self.eps = initial_accumulator_value, eps

    def _args(self):
        return (self.lr, self.lr_decay, self.weight_decay, self.eps)

    def _n_slots(self):
        return 1

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


# At the end: fastbp.lm subclasses Optimizer (defined above).
from .lm import LevenbergMarquardt  # noqa: E402
