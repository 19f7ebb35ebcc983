"""Losses by public name.  Definitions follow torch.nn with mean reduction.

Z are the network outputs (m, k) and Y the targets (m, k) (class labels are
turned into one-hot rows before training).

``mse``
    L = 1/(m k) sum_ij (Z_ij - Y_ij)^2, as torch.nn.MSELoss.  The textbook
    form 1/2 sum (z - y)^2 (whose gradient is z - y) differs by the factor
    2/(m k): the gradient here is 2 (Z - Y) / (m k).  Minima are the same; a
    learning rate tuned for the textbook form is m k / 2 times too large here.
``binary_cross_entropy``
    Z are logits, the sigmoid is inside (torch.nn.BCEWithLogitsLoss):
    L = 1/(m k) sum max(z, 0) - z y + log(1 + e^-|z|); dL/dz = (sigmoid(z) - y)/(m k).
``cross_entropy``
    Z are logits, softmax is inside (torch.nn.CrossEntropyLoss): for each row,
    -sum_j y_j log softmax(z)_j, averaged over rows; dL/dz = (softmax(z) sum_j y_j - y)/m.
    Targets are integer labels (n,) or rows of class probabilities (n, k).
"""
import numpy as np

from ._numba.losses import KERNELS as _KERNELS
from ._validation import resolve_name

LOSSES = ("mse", "binary_cross_entropy", "cross_entropy")
ALIASES = {
    "mean_squared_error": "mse",
    "squared_error": "mse",
    "bce": "binary_cross_entropy",
    "binary_crossentropy": "binary_cross_entropy",
    "categorical_cross_entropy": "cross_entropy",
    "categorical_crossentropy": "cross_entropy",
}
#: losses whose targets are classes (accuracy is reported for them)
CLASSIFICATION = ("binary_cross_entropy", "cross_entropy")


#: scikit-learn's MLP losses, used by fastbp.MLPClassifier / MLPRegressor
#: (see fastbp/_numba/losses.py); accepted by name but not advertised.
SKLEARN = ("sk_squared_error", "sk_log_loss", "sk_binary_log_loss", "sk_poisson")


def resolve(loss):
    """Canonical loss name for ``loss``."""
    if loss in SKLEARN:
        return loss
    return resolve_name(loss, "loss", LOSSES, ALIASES)


def data_loss(loss, Z, Y, w=None):
    """Weighted mean loss of outputs Z (n, k) against targets Y (n, k), no
    penalties (w: sample weights (n,), default ones)."""
    w = np.ones(Z.shape[0], dtype=Z.dtype) if w is None else w
    return float(_KERNELS[loss](Z, Y, w, np.empty_like(Z)))
