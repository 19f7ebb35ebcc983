"""Weight initializers by public name (the ``kernel_init=`` of a layer).

Each takes a NumPy ``Generator``, the layer's fan-in and fan-out, and returns
a float64 (fan_in, fan_out) matrix (cast to the model's dtype by the caller,
so float32 and float64 models start from the same numbers up to rounding).
Definitions follow torch.nn.init; biases always start at zero.

================ ==================================================
name             distribution
================ ==================================================
glorot_uniform   U(-a, a), a = sqrt(6 / (fan_in + fan_out))  (default)
glorot_normal    N(0, s^2), s = sqrt(2 / (fan_in + fan_out))
he_uniform       U(-a, a), a = sqrt(6 / fan_in)
he_normal        N(0, s^2), s = sqrt(2 / fan_in)
lecun_normal     N(0, s^2), s = sqrt(1 / fan_in)
uniform          U(-0.05, 0.05)
zeros            0
================ ==================================================
"""
import numpy as np

from ._validation import resolve_name


def glorot_uniform(rng, fan_in, fan_out):
    a = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-a, a, size=(fan_in, fan_out))


def glorot_normal(rng, fan_in, fan_out):
    return rng.normal(0.0, np.sqrt(2.0 / (fan_in + fan_out)), size=(fan_in, fan_out))


def he_uniform(rng, fan_in, fan_out):
    a = np.sqrt(6.0 / fan_in)
    return rng.uniform(-a, a, size=(fan_in, fan_out))


def he_normal(rng, fan_in, fan_out):
    return rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_in, fan_out))


def lecun_normal(rng, fan_in, fan_out):
    return rng.normal(0.0, np.sqrt(1.0 / fan_in), size=(fan_in, fan_out))


def uniform(rng, fan_in, fan_out):
    return rng.uniform(-0.05, 0.05, size=(fan_in, fan_out))


def zeros(rng, fan_in, fan_out):
    return np.zeros((fan_in, fan_out))


INITIALIZERS = {f.__name__: f for f in
                (glorot_uniform, glorot_normal, he_uniform, he_normal, lecun_normal, uniform, zeros)}
ALIASES = {"xavier_uniform": "glorot_uniform", "xavier_normal": "glorot_normal",
           "kaiming_uniform": "he_uniform", "kaiming_normal": "he_normal"}


def resolve(name):
    """Canonical initializer name."""
    return resolve_name(name, "initializer", INITIALIZERS, ALIASES)
