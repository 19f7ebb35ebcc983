"""fastbp: compiled backpropagation for dense neural networks on the CPU.

>>> import fastbp
>>> net = fastbp.Sequential([fastbp.Dense(64, activation="relu"), fastbp.Dense(10)],
...                         dtype="float32", seed=0)

See ``Sequential`` for the model API, ``fastbp.optim`` for optimizers and
``fastbp.reference`` for the NumPy implementation of the same math.
"""
from . import activations, initializers, losses, optim, reference, regularizers
from .gradcheck import gradcheck
from .history import History
from .layers import Dense, Dropout
from .model import DivergenceError, Sequential
from .io import ModelFormatError, load
from .sklearn import MLPClassifier, MLPRegressor

__version__ = "0.1.0"

__all__ = ["Sequential", "Dense", "Dropout", "optim", "gradcheck", "History", "DivergenceError",
           "load", "ModelFormatError", "MLPClassifier", "MLPRegressor",
           "activations", "initializers", "losses", "reference", "regularizers", "__version__"]
