"""fastbp.regularizers: the L1L2 object, its factories and checks, and the
coefficients it hands the engine (the penalty's values are tested against
the reference in test_regularization.py and test_engine.py)."""
import pytest

from fastbp import regularizers


def test_factories_and_defaults():
    assert regularizers.l1() == regularizers.L1L2(l1=0.01)
    assert regularizers.l2(0.5) == regularizers.L1L2(l2=0.5)
    assert regularizers.l1_l2(0.1, 0.2) == regularizers.L1L2(l1=0.1, l2=0.2)
    assert regularizers.L1L2() == regularizers.L1L2(0, 0)


def test_engine_coefficients_turn_keras_l2_into_half_square_form():
    # Keras adds l2 sum W^2; the engine adds l2'/2 ||W||^2: l2' = 2 l2
    assert regularizers.L1L2(l1=0.25, l2=0.5).engine_coefficients() == (1.0, 0.25)


def test_config_round_trip_and_repr():
    reg = regularizers.L1L2(l1=0.125, l2=2)
    assert regularizers.get(reg.get_config()) == reg
    assert repr(reg) == "L1L2(l1=0.125, l2=2.0)"
    assert reg != (0.125, 2.0)


def test_get_accepts_none_an_object_or_a_dict():
    reg = regularizers.l2()
    assert regularizers.get(None) is None
    assert regularizers.get(reg) is reg
    assert regularizers.get({"l1": 0.5}) == regularizers.L1L2(l1=0.5)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.1", None])
def test_bad_coefficients_are_refused(bad):
    with pytest.raises(ValueError, match="regularizer l1"):
        regularizers.L1L2(l1=bad)


@pytest.mark.parametrize("bad", ["l2", {"l3": 1.0}, 0.1])
def test_get_refuses_what_is_not_a_regularizer(bad):
    with pytest.raises(ValueError, match="kernel_regularizer"):
        regularizers.get(bad)
