"""fastbp.layers: each kind's parameter count, initial values, config round
trip and argument checks (their math: test_engine.py, test_dense.py and the
per-feature suites)."""
import pytest

import fastbp
from fastbp import layers
from fastbp._ext.engine import Kind


def _every_kind():
    return [fastbp.Dense(6, activation="tanh", kernel_regularizer=fastbp.regularizers.l2(0.1),
                         activity_regularizer={"l1": 0.01}, dropconnect=0.2),
            fastbp.Dropout(0.25), fastbp.BatchNorm(momentum=0.2, eps=1e-3, trainable=False),
            fastbp.Dense(3, kernel_init="he_normal", trainable=False)]


def test_kinds_and_parameter_counts():
    dense, dropout, bn, _ = _every_kind()
    assert (dense.kind, dropout.kind, bn.kind) == (Kind.DENSE, Kind.DROPOUT, Kind.BATCHNORM)
    assert dense.n_params(4) == 4 * 6 + 6
    assert dropout.n_params(4) == 0
    assert bn.n_params(4) == 8


def test_initial_values():
    net = fastbp.Sequential(_every_kind(), seed=0).build(4)
    dense, _, bn, _ = net.layers
    assert dense.W.shape == (4, 6) and not dense.b.any() and dense.W.any()
    assert (bn.gamma == 1).all() and not bn.beta.any()
    assert not bn.running_mean.any() and (bn.running_var == 1).all()


@pytest.mark.parametrize("index", range(4))
def test_config_round_trip(index):
    layer = _every_kind()[index]
    again = layers.from_config(layer.get_config())
    assert type(again) is type(layer) and again.get_config() == layer.get_config()


def test_residual_flattens_to_marker_rows_and_nests():
    inner = fastbp.Dense(5)
    block = fastbp.Residual([fastbp.Dense(5), fastbp.Residual([inner])])
    kinds = [row.kind for row in block.flatten()]
    assert kinds == [Kind.RES_BEGIN, Kind.DENSE, Kind.RES_BEGIN, Kind.DENSE, Kind.RES_END,
                     Kind.RES_END]
    assert block.flatten()[3] is inner


@pytest.mark.parametrize("make, message", [
    (lambda: fastbp.Dropout(1.0), "dropout rate"),
    (lambda: fastbp.Dropout(-0.1), "dropout rate"),
    (lambda: fastbp.Dropout("half"), "dropout rate"),
    (lambda: fastbp.Dense(3, dropconnect=1.0), "dropconnect"),
    (lambda: fastbp.Dense(3, activity_regularizer=fastbp.regularizers.l2(0.1)), "L1 penalty"),
    (lambda: fastbp.Dense(3, activation="swish"), "activation"),
    (lambda: fastbp.BatchNorm(momentum=0.0), "momentum"),
    (lambda: fastbp.BatchNorm(eps=0.0), "eps"),
    (lambda: fastbp.Residual([]), "at least one layer"),
    (lambda: layers.from_config({"type": "Conv2D"}), "unknown layer type"),
    (lambda: layers.from_config({"type": "Dense", "width": 3}), "invalid Dense"),
])
def test_bad_arguments_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()
