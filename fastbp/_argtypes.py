"""Argument types of the command line (``fastbp demo``, ``bench``,
``mpi-demo``, ``mpi-bench``): a value out of range is a usage error that
names the argument, before anything runs, rather than a traceback from deep
in a run."""
import argparse


def at_least(low, high=None):
    """An argparse type: an integer from ``low`` (to ``high``), else a usage
    error that says which bound it broke."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{value} is more than {high}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def seconds(text):
    """An argparse type: a finite number of seconds, at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number of seconds >= 0")
    return value
