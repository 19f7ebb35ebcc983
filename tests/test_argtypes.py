"""fastbp/_argtypes.py: the command line's argument types."""
import argparse
import math

import pytest

from fastbp._argtypes import at_least, seconds


def test_at_least_takes_integers_in_range_and_names_the_problem_otherwise():
    parse = at_least(1, 10)
    assert parse("1") == 1 and parse("10") == 10
    for text, message in [("0", "0 is less than 1"), ("11", "11 is more than 10"),
                          ("1.5", "'1.5' is not an integer"), ("", "'' is not an integer")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)
    assert at_least(0)(str(10 ** 30)) == 10 ** 30   # no upper bound unless given


def test_seconds_are_finite_and_not_negative():
    assert seconds("0") == 0 and seconds("0.25") == 0.25
    for text in ("-1", "nan", "inf", "-inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            seconds(text)
    assert not math.isnan(seconds("1e-3"))
