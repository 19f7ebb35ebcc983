"""fastbp: compiled backpropagation for dense neural networks on the CPU.

>>> import fastbp
>>> net = fastbp.Sequential([fastbp.Dense(64, activation="relu"), fastbp.Dense(10)],
...                         dtype="float32", seed=0)

See ``Sequential`` for the model API, ``fastbp.optim`` for optimizers and
``fastbp.reference`` for the NumPy implementation of the same math,
``fastbp.callbacks`` for fit callbacks (early stopping, checkpoints,
learning-rate schedules) and ``fastbp.plot_history`` to plot a history.
"""
from . import activations, callbacks, initializers, losses, optim, reference, regularizers
from .gradcheck import gradcheck
from .history import History
from .layers import BatchNorm, Dense, Dropout, Residual
from .model import DivergenceError, Sequential
from .plotting import plot_history
from .io import ModelFormatError, load
from .sklearn import MLPClassifier, MLPRegressor

__version__ = "0.1.0"

__all__ = ["Sequential", "Dense", "Dropout", "BatchNorm", "Residual", "optim", "gradcheck", "History", "DivergenceError",
           "load", "ModelFormatError", "MLPClassifier", "MLPRegressor",
           "activations", "callbacks", "initializers", "losses", "plot_history", "reference",
           "regularizers", "__version__"]
