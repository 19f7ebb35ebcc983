"""fastbp: compiled backpropagation for dense neural networks on the CPU.

>>> import fastbp
>>> net = fastbp.Sequential([fastbp.Dense(64, activation="relu"), fastbp.Dense(10)],
...                         dtype="float32", seed=0)

See ``Sequential`` for the model API, ``fastbp.optim`` for optimizers and
``fastbp.reference`` for the NumPy implementation of the same math,
``fastbp.callbacks`` for fit callbacks (early stopping, checkpoints,
learning-rate schedules), ``fastbp.plot_history`` to plot a history, and
``fastbp.MLPClassifier`` / ``MLPRegressor`` for the scikit-learn drop-ins.
"""
from . import _isa  # noqa: F401 (imported first: it fixes the kernels' level, FASTBP_ISA)
from . import activations, initializers, losses, optim, reference, regularizers
from ._info import show_config
from .gradcheck import gradcheck
from .history import History
from .io import ModelFormatError, load
from .layers import BatchNorm, Dense, Dropout, Residual
from ._resume import ResumeWarning
from .model import DivergenceError, NotBuiltError, Sequential

__version__ = "0.1.0"

# Loaded on first use: scikit-learn alone would add about 0.7 s to
# ``import fastbp`` (PEP 562 module __getattr__).
_LAZY = {"MLPClassifier": ("fastbp.sklearn", "MLPClassifier"),
         "MLPRegressor": ("fastbp.sklearn", "MLPRegressor"),
         "plot_history": ("fastbp.plotting", "plot_history"),
         "callbacks": ("fastbp.callbacks", None)}


def __getattr__(name):
    if name in _LAZY:
        import importlib  # here, not at the top: dir(fastbp) is the API

        module, attr = _LAZY[name]
        value = importlib.import_module(module)
        value = value if attr is None else getattr(value, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastbp' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["Sequential", "Dense", "Dropout", "BatchNorm", "Residual", "optim", "gradcheck",
           "History", "DivergenceError", "NotBuiltError", "ResumeWarning", "load",
           "ModelFormatError", "MLPClassifier", "MLPRegressor", "activations", "callbacks",
           "initializers", "losses", "plot_history", "reference", "regularizers", "show_config",
           "__version__"]
