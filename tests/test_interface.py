"""The engine's interface (fastbp/_ext/engine.pxd): what Python reads of it
agrees with what the compiled modules do with it, and the C headers' own
copies of its codes are tied to it by a compile-time check."""
import pathlib
import re

import numpy as np
import pytest

import fastbp
from helpers import assert_close
from fastbp import activations, reference, regularizers
from fastbp._ext import dense
from fastbp._ext import losses as c_losses
from fastbp._ext.engine import (ACT, ACT_OFF, ACTIVITY_L1, AUX_OFF, B_OFF, BUF_OFF, EPS, KIND,
                                L1, L2, MOMENTUM, N_COLS, N_FLOATS, N_IN, N_OUT, N_REG, RATE,
                                TRAINABLE, W_OFF, Act, Kind, Loss, Status)

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _offset(view, base):
    """Position of a view's first element in the flat array it views."""
    step = base.itemsize
    return (view.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // step


def _every_kind(dtype="float64"):
    net = fastbp.Sequential([
        fastbp.Dense(6, activation="tanh",
                     kernel_regularizer=regularizers.L1L2(l1=0.25, l2=0.5)),
        fastbp.Dropout(0.2),
        fastbp.BatchNorm(momentum=0.3, eps=1e-3),
        fastbp.Residual([fastbp.Dense(6, activation="relu", dropconnect=0.1,
                                      activity_regularizer=regularizers.L1L2(l1=0.125)),
                         fastbp.Dense(6, trainable=False)]),
        fastbp.Dense(3, activation="softplus")], dtype=dtype, seed=0)
    return net.build(4)


def test_column_names_cover_the_program():
    program = _every_kind()._program
    assert program.shape[1] == N_COLS
    assert sorted([KIND, N_IN, N_OUT, ACT, W_OFF, B_OFF, ACT_OFF, TRAINABLE, AUX_OFF,
                   BUF_OFF]) == list(range(N_COLS))
    assert sorted([L2, L1, ACTIVITY_L1]) == list(range(N_REG))
    assert sorted([RATE, MOMENTUM, EPS]) == list(range(N_FLOATS))


def test_program_columns_by_name():
    net = _every_kind()
    program, layers = net._program, net.layers
    assert list(program[:, KIND]) == [Kind.DENSE, Kind.DROPOUT, Kind.BATCHNORM, Kind.RES_BEGIN,
                                      Kind.DENSE, Kind.DENSE, Kind.RES_END, Kind.DENSE]
    assert [type(layer).kind for layer in layers] == list(program[:, KIND])
    assert list(program[:, N_IN]) == [4, 6, 6, 6, 6, 6, 6, 6]
    assert list(program[:, N_OUT]) == [6, 6, 6, 6, 6, 6, 6, 3]
    assert list(program[:, ACT]) == [Act.TANH, Act.IDENTITY, Act.IDENTITY, Act.IDENTITY,
                                     Act.RELU, Act.IDENTITY, Act.IDENTITY, Act.SOFTPLUS]
    assert list(program[:, TRAINABLE]) == [1, 0, 1, 0, 1, 0, 0, 1]
    # a residual row holds its partner's row index in W_OFF
    assert program[3, W_OFF] == 6 and program[6, W_OFF] == 3
    params = net.params
    for row, layer in zip(program, layers):
        if row[KIND] == Kind.DENSE:
            assert _offset(layer.W, params) == row[W_OFF]
            assert _offset(layer.b, params) == row[B_OFF]
        elif row[KIND] == Kind.BATCHNORM:
            assert _offset(layer.gamma, params) == row[W_OFF]
            assert _offset(layer.beta, params) == row[B_OFF]
            assert _offset(layer.running_mean, net._buffers) == row[BUF_OFF]
            assert _offset(layer.running_var, net._buffers) == row[BUF_OFF] + row[N_OUT]
    # outputs (and dropout's and BatchNorm's second slot) packed in order
    widths = [2 * w if k in (Kind.DROPOUT, Kind.BATCHNORM) else w
              for k, w in zip(program[:, KIND], program[:, N_OUT])]
    assert list(program[:, ACT_OFF]) == list(np.cumsum([0] + widths[:-1]))
    # BatchNorm's 1/std (6), then the DropConnect row's W_eff and mask (2 * 36)
    assert program[2, AUX_OFF] == 0 and program[4, AUX_OFF] == 6
    assert net._aux.size == 6 + 2 * 36
    floats = net._floats
    assert floats.shape == (8, N_FLOATS)
    assert list(floats[:, RATE]) == [0, 0.2, 0, 0, 0.1, 0, 0, 0]
    assert list(floats[:, MOMENTUM]) == [0, 0, 0.3, 0, 0, 0, 0, 0]
    assert list(floats[:, EPS]) == [0, 0, 1e-3, 0, 0, 0, 0, 0]


def test_penalty_columns_by_name():
    net = _every_kind()
    reg = net._reg
    assert reg.shape == (8, N_REG)
    l2, l1 = regularizers.L1L2(l1=0.25, l2=0.5).engine_coefficients()
    assert (reg[0, L2], reg[0, L1], reg[0, ACTIVITY_L1]) == (l2, l1, 0.0)
    assert (reg[4, L2], reg[4, L1], reg[4, ACTIVITY_L1]) == (0.0, 0.0, 0.125)
    assert not reg[[1, 2, 3, 5, 6, 7]].any()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compiled_engine_reads_the_program_as_the_reference_does(dtype):
    # The reference reads every column by name; the engine by the same
    # names, cimported: they agree on a program with every row kind.
    net = _every_kind(dtype)
    X = np.random.default_rng(1).normal(size=(16, 4)).astype(dtype)
    Y = np.eye(3, dtype=dtype)[np.arange(16) % 3]
    value, grad = net.loss_and_grad(X, Y, loss="cross_entropy")
    value_ref, grad_ref = reference.loss_grad(X, Y, net._program, net.params, "cross_entropy",
                                              reg=net._reg, floats=net._floats,
                                              buffers=net._buffers)
    assert_close(value, value_ref, dtype)
    assert_close(grad, grad_ref, dtype)
    assert_close(net.predict(X), reference.forward_all(net._program, X, net.params, net._floats,
                                                       buffers=net._buffers)[0][-1], dtype)


# Each activation code as dense.pyx's kernels compute it, by name.
_FORMULAS = {
    "IDENTITY": lambda x: x,
    "SIGMOID": lambda x: 1 / (1 + np.exp(-x)),
    "TANH": np.tanh,
    "RELU": lambda x: np.maximum(x, 0),
    "LEAKY_RELU": lambda x: np.where(x > 0, x, 0.01 * x),
    "ELU": lambda x: np.where(x > 0, x, np.expm1(x)),
    "SOFTPLUS": lambda x: np.log1p(np.exp(x)),
}


@pytest.mark.parametrize("act", list(Act), ids=lambda a: a.name)
def test_activation_codes_mean_what_their_names_say(act):
    assert set(_FORMULAS) == {a.name for a in Act}
    assert activations.ACTIVATION_CODES[act.name.lower()] == act
    z = np.linspace(-3, 3, 24).reshape(4, 6)
    b = np.zeros(6)
    expected = _FORMULAS[act.name](z)
    for isa in range(dense.small_gemm_isa() + 1):  # the C epilogues and the loops
        got = dense.bias_activation_kernel(z, b, int(act), isa=isa)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


def test_loss_ids_name_the_c_softmax_losses():
    assert [member.name.lower() for member in Loss] == list(c_losses.NAMES)


def test_status_codes_reach_the_divergence_message():
    X = np.random.default_rng(0).normal(size=(32, 3))
    net = fastbp.Sequential([fastbp.Dense(4), fastbp.Dense(2)], dtype="float64", seed=0)
    net.build(3)
    # finite weights whose outputs' squares overflow: the first batch's loss
    # is infinite, Status.LOSS_NONFINITE (NaN weights are refused before)
    net.params[...] = 1e200
    with pytest.raises(fastbp.DivergenceError, match="the loss became NaN"):
        net.fit(X, np.zeros((32, 2)), loss="mse", epochs=1, batch_size=8, verbose=0)
    net = fastbp.Sequential([fastbp.Dense(4), fastbp.Dense(2)], dtype="float64", seed=0)
    # a finite loss, then gradients of ~1e6 times lr 1e308: Status.PARAMS_NONFINITE
    with pytest.raises(fastbp.DivergenceError, match="an updated weight became NaN"):
        net.fit(X, np.full((32, 2), 1e6), loss="mse", optimizer=fastbp.optim.SGD(lr=1e308),
                epochs=1, batch_size=8, verbose=0)
    # COMM_FAILED reaches its RuntimeError in tests/test_distributed.py
    # (test_a_failing_allreduce_stops_every_rank_with_mpis_message)
    assert [s.name for s in Status] == ["OK", "LOSS_NONFINITE", "PARAMS_NONFINITE",
                                        "COMM_FAILED"]


def test_every_c_copy_of_a_code_is_checked_against_the_pxd():
    """A C header's #define of an interface code (FBP_ACT_*, FBP_LOSS_*) has
    an FBP_SAME(header name, pxd name) in a .pyx, which makes a mismatch a
    build error; and the values agree today."""
    enums = {"FBP_ACT_": Act, "FBP_LOSS_": Loss}
    checks = {}
    for pyx in (ROOT / "csrc").glob("*.pyx"):
        for c_name, pxd_name in re.findall(r"^FBP_SAME\((\w+), (\w+)\)", pyx.read_text(),
                                           re.M):
            checks[c_name] = pxd_name
    defines = {}
    for header in (ROOT / "csrc").glob("*.h"):
        for name, value in re.findall(r"^#define (FBP_(?:ACT|LOSS)_\w+) (\d+)\b",
                                      header.read_text(), re.M):
            defines[name] = int(value)
    assert {"FBP_ACT_RELU", "FBP_LOSS_CROSS_ENTROPY"} <= set(defines)
    for name, value in defines.items():
        assert name in checks, f"{name} has no FBP_SAME check in csrc/*.pyx"
        enum = next(e for prefix, e in enums.items() if name.startswith(prefix))
        assert enum[checks[name]] == value, name


_TABLE = r"\b(?:row|r|prog|program|_program|reg|_reg|penalties)"
_MAGIC = re.compile(_TABLE + r"\[(?:[^\]\[]*,\s*)?\d+\s*[\]:]"   # row[3], program[:, 2]
                    + "|" + _TABLE + r"\[[^\]\[]*\]\[\d"            # program[l][3]
                    + "|" + _TABLE + r"\[:\d")                         # row[:8]


def test_no_magic_program_indices_in_the_package():
    hits = []
    for path in (ROOT / "fastbp").rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if _MAGIC.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "program/reg columns by number:\n" + "\n".join(hits)
