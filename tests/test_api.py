"""The public API as tools see it: type hints (PEP 561, ``py.typed``),
``help()`` names, and ``dir(fastbp)``."""
import importlib.resources
import inspect
import pydoc
import typing

import pytest

import fastbp
from fastbp import callbacks, optim

#: the public callables whose every parameter and return value is hinted
TYPED = [
    fastbp.Sequential.__init__, fastbp.Sequential.build, fastbp.Sequential.fit,
    fastbp.Sequential.predict, fastbp.Sequential.predict_proba, fastbp.Sequential.evaluate,
    fastbp.Sequential.loss_and_grad, fastbp.Sequential.set_params,
    fastbp.Sequential.get_weights, fastbp.Sequential.set_weights,
    fastbp.Sequential.copy_weights_from, fastbp.Sequential.discard_partial_epoch,
    fastbp.Sequential.save, fastbp.Sequential.summary,
    fastbp.Sequential.params.fget, fastbp.Sequential.n_params.fget,
    fastbp.Sequential.n_outputs.fget, fastbp.Sequential.built.fget,
    fastbp.Dense.__init__, fastbp.Dropout.__init__, fastbp.BatchNorm.__init__,
    fastbp.Residual.__init__,
    optim.SGD.__init__, optim.Adam.__init__, optim.AdamW.__init__, optim.RMSprop.__init__,
    optim.Rprop.__init__, optim.Adagrad.__init__, optim.LevenbergMarquardt.__init__,
    fastbp.load, fastbp.gradcheck, fastbp.plot_history, fastbp.show_config,
    fastbp.MLPClassifier.fit, fastbp.MLPClassifier.partial_fit, fastbp.MLPClassifier.predict,
    fastbp.MLPClassifier.predict_proba, fastbp.MLPClassifier.predict_log_proba,
    fastbp.MLPRegressor.fit, fastbp.MLPRegressor.partial_fit, fastbp.MLPRegressor.predict,
]


@pytest.mark.parametrize("function", TYPED, ids=lambda f: f.__qualname__)
def test_public_api_is_fully_hinted_and_the_hints_resolve(function):
    hints = typing.get_type_hints(function)  # raises if a hint names something undefined
    params = [p for p in inspect.signature(function).parameters.values()
              if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    assert [p.name for p in params if p.name not in hints] == []
    assert "return" in hints


def test_the_hints_say_what_fit_returns_and_takes():
    hints = typing.get_type_hints(fastbp.Sequential.fit)
    assert hints["return"] is fastbp.History
    assert hints["epochs"] is int
    assert typing.get_type_hints(fastbp.load)["return"] is fastbp.Sequential
    assert typing.get_type_hints(fastbp.MLPClassifier.fit)["return"] is fastbp.MLPClassifier


def test_the_package_is_marked_typed():
    """PEP 561: without py.typed in the installed package, type checkers
    ignore the hints (the wheel ships it: pyproject's package-data)."""
    assert importlib.resources.files("fastbp").joinpath("py.typed").is_file()


def test_help_of_load_names_load():
    """help(fastbp.load) showed load_model (load was an alias)."""
    assert fastbp.load.__name__ == "load"
    text = pydoc.render_doc(fastbp.load, renderer=pydoc.plaintext)
    assert "load(path" in text and "load_model(" not in text
    assert fastbp.io.load_model is fastbp.load  # the old name still works


def test_dir_lists_the_api_not_importlib():
    names = dir(fastbp)
    assert "importlib" not in names
    assert {"Sequential", "load", "MLPClassifier", "plot_history", "callbacks"} <= set(names)
    assert fastbp.callbacks is callbacks
