"""fastbp.program: the one compile step from layers to what the engine runs."""
import numpy as np
import pytest

import fastbp
from fastbp import program as fp
from fastbp._ext.engine import N_COLS, N_FLOATS, Kind
from fastbp.model import NotBuiltError

from helpers import adversarial


def _layers():
    return [fastbp.Dense(6, activation="relu", dropconnect=0.25), fastbp.Dropout(0.5),
            fastbp.BatchNorm(momentum=0.2, eps=1e-3),
            fastbp.Residual([fastbp.Dense(6, trainable=False)]), fastbp.Dense(2)]


def test_named_columns_are_every_column_once():
    assert sorted(fp.COLUMNS.values()) == list(range(N_COLS))
    assert sorted(fp.FLOAT_COLUMNS.values()) == list(range(N_FLOATS))
    assert not set(fp.COLUMNS) & set(fp.FLOAT_COLUMNS)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_net_program_is_the_compiled_program(dtype):
    net = fastbp.Sequential(_layers(), dtype=dtype, seed=0)
    with pytest.raises(NotBuiltError):
        net.program
    net.build(4)
    program = net.program
    assert len(program) == 7 and program.n_features == 4
    assert list(program["kind"]) == [Kind.DENSE, Kind.DROPOUT, Kind.BATCHNORM, Kind.RES_BEGIN,
                                     Kind.DENSE, Kind.RES_END, Kind.DENSE]
    assert list(program["n_in"]) == [4, 6, 6, 6, 6, 6, 6]
    assert list(program["n_out"]) == [6, 6, 6, 6, 6, 6, 2]
    assert list(program["rate"]) == [0.25, 0.5, 0, 0, 0, 0, 0]
    assert list(program["momentum"]) == [0, 0, 0.2, 0, 0, 0, 0]
    # eps as the model's dtype holds it (what the engine normalizes with)
    assert list(program["eps"]) == [0, 0, float(np.dtype(dtype).type(1e-3)), 0, 0, 0, 0]
    # sizes of the flat arrays: W, b of 4-6, 6-6, 6-2; gamma, beta of 6
    assert program.n_params == net.n_params == 30 + 12 + 42 + 14
    assert program.n_buffers == net._buffers.size == 2 * 6
    assert program.n_aux == net._aux.size == 2 * 4 * 6 + 6  # DropConnect's W_eff, mask; 1/std
    assert program.act_width == 6 + 2 * 6 + 2 * 6 + 6 + 6 + 6 + 2
    assert program.delta_width == 12
    # the engine's tables are the program's
    assert net._program is program.rows and net._floats is program.floats


def test_program_is_read_only():
    program = fastbp.Sequential(_layers(), seed=0).build(4).program
    for table in (program.rows, program.floats, program["n_in"], program["eps"]):
        with pytest.raises(ValueError, match="read-only"):
            table[0] = 1
    with pytest.raises(KeyError, match="columns are"):
        program["width"]


def test_compile_needs_paired_markers_and_blocks_that_keep_their_width():
    begin, end = fastbp.layers.ResidualBegin(), fastbp.layers.ResidualEnd()
    with pytest.raises(ValueError, match="ResidualEnd without its ResidualBegin"):
        fp.compile_program([end, fastbp.Dense(2)], 3)
    with pytest.raises(ValueError, match="ResidualBegin without its ResidualEnd"):
        fp.compile_program([begin, fastbp.Dense(2)], 3)
    with pytest.raises(ValueError, match="keep its width"):
        fp.compile_program([begin, fastbp.Dense(4), end, fastbp.Dense(2)], 3)


def test_plan_is_compile_in_python_integers():
    """fastbp.io sizes a file's arrays with plan before allocating anything:
    it must agree with compile, and take sizes no int64 holds."""
    layers = fastbp.Sequential(_layers()).layers  # flat: a Residual's rows in line
    rows, floats, sizes = fp.plan(layers, 4)
    program = fp.compile_program(layers, 4)
    assert np.array_equal(program.rows, rows) and np.array_equal(program.floats, floats)
    assert sizes == {"n_params": program.n_params, "n_buffers": program.n_buffers,
                     "n_aux": program.n_aux, "act_width": program.act_width,
                     "delta_width": program.delta_width}
    # the widest layers the kernels take: n_params is past int64 (3 * 2**62)
    w = 2 ** 31 - 1
    _, _, huge = fp.plan([fastbp.Dense(w), fastbp.Dense(w), fastbp.Dense(w)], w)
    assert huge["n_params"] == 3 * (w * w + w) > 2 ** 63
    # and no wider: the kernels index widths with C ints
    with pytest.raises(ValueError, match="width of layer 1"):
        fp.plan([fastbp.Dense(w), fastbp.Dense(w + 1)], 4)


def test_architectures_script_finds_no_failure():
    """A few trials of tests/adversarial/architectures.py (the full run is its
    own command): random networks of every layer kind, checked by name
    against their program, the reference, save/load and pickle."""
    architectures = adversarial("architectures")
    counts, failures = architectures.run(trials=60, seed=1)
    assert not failures, failures[:10]
    ok = sum(v for key, v in counts.items() if key.startswith("ok"))
    assert ok + counts.get("ValueError", 0) == 60 and ok > 40
    assert counts["ok, fit checked"] > 10
