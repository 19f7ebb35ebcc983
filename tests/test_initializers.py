"""fastbp.initializers: each draws from the distribution its docstring's
table names (mean, variance, bounds), seeded, with tolerances of several
standard errors of the sample statistics; names and aliases resolve."""
import numpy as np
import pytest

import fastbp
from fastbp import initializers

FAN_IN, FAN_OUT = 300, 200   # 60,000 draws
N = FAN_IN * FAN_OUT
#: standard errors allowed: a correct initializer fails one check with
#: probability about 6e-7 (two-sided normal tail at 5 sigma)
Z = 5.0

# name -> (kind, scale): "uniform" U(-a, a) with a = scale, "normal" N(0, s^2) with s = scale
SPEC = {
    "glorot_uniform": ("uniform", np.sqrt(6 / (FAN_IN + FAN_OUT))),
    "glorot_normal": ("normal", np.sqrt(2 / (FAN_IN + FAN_OUT))),
    "he_uniform": ("uniform", np.sqrt(6 / FAN_IN)),
    "he_normal": ("normal", np.sqrt(2 / FAN_IN)),
    "lecun_normal": ("normal", np.sqrt(1 / FAN_IN)),
    "uniform": ("uniform", 0.05),
}


def test_every_initializer_has_a_spec():
    assert set(initializers.INITIALIZERS) == set(SPEC) | {"zeros"}


@pytest.mark.parametrize("name", sorted(SPEC))
def test_distribution_matches_the_formula(name):
    kind, scale = SPEC[name]
    W = initializers.INITIALIZERS[name](np.random.default_rng(12345), FAN_IN, FAN_OUT)
    assert W.shape == (FAN_IN, FAN_OUT) and W.dtype == np.float64
    if kind == "uniform":
        var, mu4 = scale ** 2 / 3, scale ** 4 / 5
    else:
        var, mu4 = scale ** 2, 3 * scale ** 4
    # the mean: sd sqrt(var / N); the variance (mean known, 0): sd sqrt((mu4 - var^2) / N)
    assert abs(W.mean()) <= Z * np.sqrt(var / N)
    assert abs(np.mean(W ** 2) - var) <= Z * np.sqrt((mu4 - var ** 2) / N)
    if kind == "uniform":
        # inside (-a, a), and reaching near both ends: P(max < a (1 - 1e-3)) = e^-30
        assert np.abs(W).max() <= scale
        assert W.max() > scale * (1 - 1e-3) and W.min() < -scale * (1 - 1e-3)
    else:
        # the fourth moment tells a normal from a uniform of the same variance
        # (3 s^4 against 1.8 s^4); its sd is about sqrt(96 / N) s^4
        assert abs(np.mean(W ** 4) - mu4) <= Z * np.sqrt(96 / N) * scale ** 4


def test_zeros_is_zero():
    assert not initializers.zeros(np.random.default_rng(0), 4, 3).any()


def test_same_seed_same_draws():
    a = initializers.he_normal(np.random.default_rng(7), 5, 4)
    np.testing.assert_array_equal(a, initializers.he_normal(np.random.default_rng(7), 5, 4))


@pytest.mark.parametrize("alias, name", sorted(initializers.ALIASES.items()))
def test_aliases_resolve(alias, name):
    assert initializers.resolve(alias) == name


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="initializer"):
        initializers.resolve("glorot")


@pytest.mark.parametrize("name", ["he_uniform", "zeros"])
def test_dense_draws_its_kernel_with_the_initializer_and_zero_bias(name):
    net = fastbp.Sequential([fastbp.Dense(6, kernel_init=name)], seed=3).build(4)
    layer = net.layers[0]
    assert not layer.b.any()
    a = np.sqrt(6 / 4)
    assert np.abs(layer.W).max() <= (a if name == "he_uniform" else 0)
