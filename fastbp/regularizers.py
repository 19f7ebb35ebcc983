"""Weight penalties of a layer (``Dense(..., kernel_regularizer=...)``).

Definitions follow Keras: a layer with ``L1L2(l1, l2)`` adds

    l1 * sum |W| + l2 * sum W^2

to the (mean) training loss, whatever the batch size; its gradient
l1 sign(W) + 2 l2 W is added to dW in the compiled engine.  Biases are not
penalized.  (scikit-learn's ``alpha`` differs: alpha/2 ||W||^2 divided by
the batch's sample count; ``fastbp.MLPClassifier`` uses that convention.)
Decoupled weight decay is the optimizer's job: ``fastbp.optim.AdamW``.
"""
import math


class L1L2:
    """Penalty ``l1 * sum|W| + l2 * sum W^2`` on a layer's weights.

    Parameters
    ----------
    l1, l2 : float >= 0
    """

    def __init__(self, l1=0.0, l2=0.0):
        for name, value in (("l1", l1), ("l2", l2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value) or value < 0:
                raise ValueError(f"regularizer {name} must be a finite number >= 0, got {value!r}")
        self.l1, self.l2 = float(l1), float(l2)

    def engine_coefficients(self):
        """(l2, l1) as the engine applies them: s (l2/2 ||W||^2 + l1 |W|_1)."""
        return 2.0 * self.l2, self.l1

    def get_config(self):
        return {"l1": self.l1, "l2": self.l2}

    def __eq__(self, other):
        return isinstance(other, L1L2) and (self.l1, self.l2) == (other.l1, other.l2)

    def __repr__(self):
        return f"L1L2(l1={self.l1}, l2={self.l2})"


def l1(l1=0.01):
    """``L1L2(l1=l1)``."""
    return L1L2(l1=l1)


def l2(l2=0.01):
    """``L1L2(l2=l2)``."""
    return L1L2(l2=l2)


def l1_l2(l1=0.01, l2=0.01):
    """``L1L2(l1, l2)``."""
    return L1L2(l1=l1, l2=l2)


def get(value):
    """A regularizer from None, an L1L2, or a dict {"l1": ..., "l2": ...}."""
    if value is None or isinstance(value, L1L2):
        return value
    if isinstance(value, dict) and set(value) <= {"l1", "l2"}:
        return L1L2(**value)
    raise ValueError(f"kernel_regularizer must be None, an L1L2 (e.g. fastbp.regularizers.l2(1e-4)) "
                     f"or a dict with l1/l2, got {value!r}")
