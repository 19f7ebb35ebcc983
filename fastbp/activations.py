"""Activation functions by public name.

The compiled kernels (csrc/dense.pyx) and ``fastbp.reference`` identify an
activation by an integer code (``Act``, declared in fastbp/_ext/engine.pxd);
this module maps names to codes.  Every
derivative is computed from the activation's *output* a = f(x):

=========== ================================ ===========================
name        f(x)                             f'(x) in terms of a
=========== ================================ ===========================
identity    x                                1
sigmoid     1 / (1 + e^-x)                   a (1 - a)
tanh        tanh(x)                          1 - a^2
relu        max(x, 0)                        1 if a > 0 else 0
leaky_relu  x if x > 0 else 0.01 x           1 if a > 0 else 0.01
elu         x if x > 0 else e^x - 1          1 if a > 0 else a + 1
softplus    log(1 + e^x) (x if x > 20)       1 - e^-a (1 if a > 20)
=========== ================================ ===========================

The constants are torch.nn's defaults (LeakyReLU slope 0.01, ELU alpha 1,
Softplus beta 1 and threshold 20).
"""
import numbers

from ._ext.engine import Act
from ._validation import resolve_name

#: name -> code, in code order; a name is its ``Act`` member's, in lower case
ACTIVATION_CODES = {member.name.lower(): int(member) for member in Act}
ALIASES = {"logistic": "sigmoid", "linear": "identity"}
NAMES = {code: name for name, code in ACTIVATION_CODES.items()}


def resolve(activation):
    """Canonical activation name for ``activation`` (a name, alias or None)."""
    if activation is None:
        return "identity"
    return resolve_name(activation, "activation", ACTIVATION_CODES, ALIASES)


def code(activation):
    """Integer code of an activation given by name, alias, None or code."""
    if isinstance(activation, numbers.Integral) and not isinstance(activation, bool):
        if int(activation) in NAMES:
            return int(activation)
        raise ValueError(f"unknown activation code {activation!r}")
    return ACTIVATION_CODES[resolve(activation)]
