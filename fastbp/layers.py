"""Layers.  A layer describes itself; the model owns its parameters.

After ``Sequential.build``, a layer's ``W`` and ``b`` are views into the
model's flat parameter vector (and ``dW``/``db`` into its flat gradient), so
writing ``layer.W[...] = ...`` changes the model and the optimizer sees it.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Union

from . import activations, initializers, regularizers
from ._ext.engine import Kind
from ._validation import check_positive_int


class Dense:
    """Fully connected layer: ``out = activation(x @ W + b)``.

    Parameters
    ----------
    units : int
        Number of outputs n_out.
    activation : str or None, default None
        One of ``fastbp.activations.ACTIVATION_CODES`` (or alias
        ``logistic``); None is the identity.
    kernel_init : str, default "glorot_uniform"
        Initializer of W (see ``fastbp.initializers``); b starts at zero.
    trainable : bool, default True
        A frozen layer (False) keeps its parameters: its gradient is zero and
        the optimizer leaves its parameters and state untouched.
    kernel_regularizer : L1L2, dict or None
        Penalty on W added to the loss (see ``fastbp.regularizers``).
    dropconnect : float in [0, 1), default 0
        DropConnect: in training each mini-batch zeroes a random fraction
        ``dropconnect`` of W's entries and scales the rest by
        1 / (1 - dropconnect) (the inverted form, as for Dropout); predict
        uses W itself.  Masks come from the model's seeded stream.
    activity_regularizer : L1L2, dict or None
        L1 penalty on the layer's output (e.g. for sparse autoencoders):
        ``l1 * sum|a| / batch_size`` is added to the loss (Keras's activity
        regularizer); only its ``l1`` may be non-zero.

    Attributes
    ----------
    W : ndarray of shape (n_in, n_out)
    b : ndarray of shape (n_out,)
    """

    kind = Kind.DENSE

    def __init__(self, units: int, activation: str | None = None,
                 kernel_init: str = "glorot_uniform", trainable: bool = True,
                 kernel_regularizer: regularizers.L1L2 | dict | None = None,
                 activity_regularizer: regularizers.L1L2 | dict | None = None,
                 dropconnect: float = 0.0) -> None:
        self.units = check_positive_int(units, "units")
        self.activation = activations.resolve(activation)
        self.kernel_init = initializers.resolve(kernel_init)
        self.trainable = bool(trainable)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.activity_regularizer = regularizers.get(activity_regularizer)
        try:
            self.dropconnect = float(dropconnect)
        except (TypeError, ValueError):
            raise ValueError(f"dropconnect must be a number in [0, 1), got {dropconnect!r}") from None
        if not 0 <= self.dropconnect < 1:
            raise ValueError(f"dropconnect must be in [0, 1), got {dropconnect!r}")
        if self.activity_regularizer is not None and self.activity_regularizer.l2 != 0:
            raise ValueError("activity_regularizer supports an L1 penalty only (l2 must be 0)")
        self.n_in = None
        self.W = self.b = self.dW = self.db = None

    def n_params(self, n_in):
        return n_in * self.units + self.units

    def _bind(self, n_in, params, grad, offset):
        """Make W, b (and dW, db) views at ``offset``; return the next offset."""
        self.n_in = n_in
        n_w = n_in * self.units
        self.W = params[offset:offset + n_w].reshape(n_in, self.units)
        self.b = params[offset + n_w:offset + n_w + self.units]
        self.dW = grad[offset:offset + n_w].reshape(n_in, self.units)
        self.db = grad[offset + n_w:offset + n_w + self.units]
        return offset + n_w + self.units

    def _initialize(self, rng):
        init = initializers.INITIALIZERS[self.kernel_init]
        self.W[...] = init(rng, self.n_in, self.units)
        self.b[...] = 0

    def get_config(self):
        reg = self.kernel_regularizer
        return {"type": "Dense", "units": self.units, "activation": self.activation,
                "kernel_init": self.kernel_init, "trainable": self.trainable,
                "kernel_regularizer": None if reg is None else reg.get_config(),
                "activity_regularizer": (None if self.activity_regularizer is None
                                         else self.activity_regularizer.get_config()),
                "dropconnect": self.dropconnect}

    def __repr__(self):
        return (f"Dense({self.units}, activation={self.activation!r}"
                + ("" if self.trainable else ", trainable=False") + ")")


class _Marker:
    """A parameter-free row of the program that keeps the width."""

    trainable = False

    def __init__(self):
        self.units = self.n_in = None

    def n_params(self, n_in):
        return 0

    def _bind(self, n_in, params, grad, offset):
        self.n_in = self.units = n_in
        return offset

    def _initialize(self, rng):
        pass

    def get_config(self):
        return {"type": type(self).__name__}

    def __repr__(self):
        return f"{type(self).__name__}()"


class Dropout(_Marker):
    """Inverted dropout: in training each input is zeroed with probability
    ``rate`` and the others are scaled by 1 / (1 - rate); in predict (and
    ``loss_and_grad``) the layer passes its input through unchanged.

    The masks are drawn in the compiled engine from a counter-based stream
    seeded by the model's ``seed``, so training with dropout is reproducible
    and resumes exactly from a checkpoint.

    Parameters
    ----------
    rate : float in [0, 1)
        Fraction of the inputs dropped.
    """

    kind = Kind.DROPOUT

    def __init__(self, rate: float) -> None:
        try:
            rate = float(rate)
        except (TypeError, ValueError):
            raise ValueError(f"dropout rate must be a number in [0, 1), got {rate!r}") from None
        if not 0 <= rate < 1:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
        super().__init__()
        self.rate = rate

    def get_config(self):
        return {"type": "Dropout", "rate": self.rate}

    def __repr__(self):
        return f"Dropout({self.rate})"


class BatchNorm:
    """Batch normalization, with torch.nn.BatchNorm1d's definitions.

    In training each feature j of a mini-batch x (m, n) is normalized with
    the batch mean and the *biased* batch variance,

        y = gamma_j (x - mean_j) / sqrt(var_j + eps) + beta_j,

    and the running statistics are updated with the *unbiased* variance:
    running <- (1 - momentum) running + momentum * batch.  ``predict`` and
    ``loss_and_grad`` normalize with the running statistics instead.
    gamma starts at 1 and beta at 0 (trained like weights); the running
    mean starts at 0 and the running variance at 1 (``running_mean``,
    ``running_var``: views into the model's buffers).

    Parameters
    ----------
    momentum : float in (0, 1], default 0.1
    eps : float > 0, default 1e-5
    trainable : bool, default True
    """

    kind = Kind.BATCHNORM

    def __init__(self, momentum: float = 0.1, eps: float = 1e-5, trainable: bool = True) -> None:
        try:
            momentum, eps = float(momentum), float(eps)
        except (TypeError, ValueError):
            raise ValueError(f"BatchNorm momentum and eps must be numbers, got {momentum!r}, "
                             f"{eps!r}") from None
        if not 0 < momentum <= 1:
            raise ValueError(f"BatchNorm momentum must be in (0, 1], got {momentum}")
        if not 0 < eps < float("inf"):
            raise ValueError(f"BatchNorm eps must be positive, got {eps}")
        self.momentum, self.eps, self.trainable = momentum, eps, bool(trainable)
        self.units = self.n_in = None
        self.gamma = self.beta = self.running_mean = self.running_var = None

    def n_params(self, n_in):
        return 2 * n_in

    def _bind(self, n_in, params, grad, offset):
        self.n_in = self.units = n_in
        self.gamma = params[offset:offset + n_in]
        self.beta = params[offset + n_in:offset + 2 * n_in]
        return offset + 2 * n_in

    def _initialize(self, rng):
        self.gamma[...] = 1
        self.beta[...] = 0
        self.running_mean[...] = 0
        self.running_var[...] = 1

    def _bind_buffers(self, buffers, offset):
        """Make running_mean and running_var views at ``offset`` (the
        program's BUF_OFF)."""
        w = self.units
        self.running_mean = buffers[offset:offset + w]
        self.running_var = buffers[offset + w:offset + 2 * w]

    def get_config(self):
        return {"type": "BatchNorm", "momentum": self.momentum, "eps": self.eps,
                "trainable": self.trainable}

    def __repr__(self):
        return f"BatchNorm(momentum={self.momentum}, eps={self.eps})"


class ResidualBegin(_Marker):
    """Start of a residual block (created by ``Residual``): remembers x."""

    kind = Kind.RES_BEGIN


class ResidualEnd(_Marker):
    """End of a residual block (created by ``Residual``): outputs block(x) + x."""

    kind = Kind.RES_END


class Residual:
    """A residual block: ``y = x + block(x)`` for the layers it holds.

    The block's output must have the width of its input.  Blocks nest, and
    sit in ``Sequential`` like any layer: there they become a
    ``ResidualBegin`` row, the block's rows and a ``ResidualEnd`` row of the
    compiled program (so ``net.layers`` lists them flat).

    Parameters
    ----------
    layers : list of layers (Dense, Dropout, BatchNorm, Residual)

    Examples
    --------
    >>> import fastbp
    >>> net = fastbp.Sequential([
    ...     fastbp.Dense(32, activation="relu"),
    ...     fastbp.Residual([fastbp.Dense(32, activation="relu"), fastbp.Dense(32)]),
    ...     fastbp.Dense(10)])
    """

    def __init__(self, layers: Iterable[Layer]) -> None:
        layers = list(layers)
        if not layers:
            raise ValueError("Residual needs at least one layer")
        self.layers = layers

    def flatten(self):
        rows = [ResidualBegin()]
        for layer in self.layers:
            rows.extend(layer.flatten() if isinstance(layer, Residual) else [layer])
        return rows + [ResidualEnd()]

    def __repr__(self):
        return f"Residual({self.layers!r})"


LAYERS = {"Dense": Dense, "Dropout": Dropout, "BatchNorm": BatchNorm,
          "ResidualBegin": ResidualBegin, "ResidualEnd": ResidualEnd}


def from_config(config):
    config = dict(config)
    kind = config.pop("type", None)
    if kind not in LAYERS:
        raise ValueError(f"unknown layer type {kind!r}")
    try:
        return LAYERS[kind](**config)
    except TypeError as exc:
        raise ValueError(f"invalid {kind} configuration: {exc}") from None


#: what a Sequential (or a Residual block) is made of
Layer = Union[Dense, Dropout, BatchNorm, Residual, ResidualBegin, ResidualEnd]
