"""The compiled program: a model's layers as the engine reads them.

``compile_program(layers, n_features)`` is the one step from layers (flat, as
``Sequential.layers``: a residual block is a ``ResidualBegin`` row, the
block's rows and a ``ResidualEnd`` row) to what the compiled engine
(csrc/engine.pyx) is given:

* ``rows``: the program, an int64 table (n_layers, N_COLS), one row per
  layer: its kind, widths, activation, and where its parameters, outputs,
  scratch and running statistics sit in the model's flat arrays;
* ``floats``: a float64 table (n_layers, N_FLOATS) of the real-valued
  settings: a Dropout's or DropConnect's rate, a BatchNorm's momentum and eps;
* the sizes of the flat arrays the model allocates once: ``n_params``
  (params and grad), ``n_buffers`` (running statistics), ``n_aux`` (per-step
  scratch) and, per batch row, ``act_width`` (every row's output and masks)
  and ``delta_width`` (each of the two gradient buffers).

Column and kind names are declared once, in fastbp/_ext/engine.pxd; what a
column means for each kind is here, in ``_row``, ``_floats`` and the size
functions below it, and nowhere else in Python.  ``Sequential.program``
exposes a built model's program read-only, with columns by name
(``net.program["n_in"]``).
"""
from __future__ import annotations

import numpy as np

from . import activations
from ._ext.engine import (ACT, ACT_OFF, AUX_OFF, B_OFF, BUF_OFF, EPS, KIND, MOMENTUM, N_COLS,
                          N_FLOATS, N_IN, N_OUT, RATE, TRAINABLE, W_OFF, Act, Kind)
from ._validation import check_kernel_dim

#: name -> column of ``Program.rows``
COLUMNS = {"kind": KIND, "n_in": N_IN, "n_out": N_OUT, "act": ACT, "w_off": W_OFF,
           "b_off": B_OFF, "act_off": ACT_OFF, "trainable": TRAINABLE, "aux_off": AUX_OFF,
           "buf_off": BUF_OFF}
#: name -> column of ``Program.floats``
FLOAT_COLUMNS = {"rate": RATE, "momentum": MOMENTUM, "eps": EPS}


class Program:
    """A model's layers compiled for the engine (read-only; see the module
    docstring).

    Attributes
    ----------
    rows : ndarray of int64, shape (n_layers, N_COLS)
    floats : ndarray of float64, shape (n_layers, N_FLOATS)
    n_features, n_params, n_buffers, n_aux, act_width, delta_width : int

    Examples
    --------
    >>> import fastbp
    >>> net = fastbp.Sequential([fastbp.Dense(8), fastbp.Dropout(0.5), fastbp.Dense(2)])
    >>> program = net.build(4).program
    >>> program["n_out"], program["rate"]
    (array([8, 8, 2]), array([0. , 0.5, 0. ]))
    """

    def __init__(self, rows, floats, n_features, n_params, n_buffers, n_aux, act_width,
                 delta_width):
        self.rows = np.array(rows, dtype=np.int64).reshape(-1, N_COLS)
        self.floats = np.array(floats, dtype=np.float64).reshape(-1, N_FLOATS)
        self.rows.flags.writeable = self.floats.flags.writeable = False
        self.n_features, self.n_params, self.n_buffers = n_features, n_params, n_buffers
        self.n_aux, self.act_width, self.delta_width = n_aux, act_width, delta_width

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.rows.flags.writeable = self.floats.flags.writeable = False  # pickle drops it

    def __len__(self):
        return self.rows.shape[0]

    def __getitem__(self, name: str) -> np.ndarray:
        """Column ``name`` (of ``COLUMNS`` or ``FLOAT_COLUMNS``), one entry
        per layer (a read-only view)."""
        if name in COLUMNS:
            return self.rows[:, COLUMNS[name]]
        if name in FLOAT_COLUMNS:
            return self.floats[:, FLOAT_COLUMNS[name]]
        raise KeyError(f"no program column {name!r}: columns are "
                       f"{list(COLUMNS) + list(FLOAT_COLUMNS)}")

    def __repr__(self):
        return (f"Program({len(self)} rows, {self.n_features} inputs, {self.n_params} "
                f"parameters, {self.n_buffers} buffer values)")


def compile_program(layers, n_features: int, dtype="float64") -> Program:
    """The program of ``layers`` (flat) for ``n_features`` inputs, in a model
    of ``dtype`` (BatchNorm's eps is the value that dtype holds: what the
    engine has always normalized with).

    ValueError if residual markers do not pair up or a block changes its
    width.  Reads only the layers' settings (units, activation, rates, ...):
    nothing is allocated but the two tables.
    """
    rows, floats, sizes = plan(layers, n_features, dtype)
    return Program(rows, floats, n_features, **sizes)


def plan(layers, n_features, dtype="float64"):
    """``compile_program``'s work in Python integers: (rows, floats, sizes),
    rows and floats lists of per-layer lists, sizes the keyword arguments of
    ``Program`` besides the tables and ``n_features``.  For callers that
    check sizes before allocating anything (fastbp.io)."""
    partners = _partners(layers)
    rows, floats = [], []
    w_off = act_off = aux_off = buf_off = 0
    n_in, widths = n_features, [n_features]
    check_kernel_dim(n_features, "the number of features",
                     "select or project fewer features first")
    for i, layer in enumerate(layers):
        n_out = layer.units if layer.kind == Kind.DENSE else n_in
        check_kernel_dim(n_out, f"the width of layer {i} ({type(layer).__name__})",
                         "use fewer units")
        if layer.kind == Kind.RES_END and rows[partners[i]][N_IN] != n_in:
            raise ValueError(f"a Residual block must keep its width: it takes "
                             f"{rows[partners[i]][N_IN]} features and gives {n_in}")
        rows.append(_row(layer, n_in, n_out, w_off, act_off, aux_off, buf_off,
                         partners.get(i, 0)))
        floats.append(_floats(layer, np.dtype(dtype).type))
        w_off += layer.n_params(n_in)
        act_off += _act_width(layer, n_out)
        aux_off += _aux_size(layer, n_in, n_out)
        buf_off += _buffer_size(layer, n_out)
        widths.append(_act_width(layer, n_out))
        n_in = n_out
    sizes = {"n_params": w_off, "n_buffers": buf_off, "n_aux": aux_off, "act_width": act_off,
             "delta_width": max(widths)}
    return rows, floats, sizes


def _partners(layers):
    """Row index of each residual marker's other end."""
    partners, opened = {}, []
    for i, layer in enumerate(layers):
        if layer.kind == Kind.RES_BEGIN:
            opened.append(i)
        elif layer.kind == Kind.RES_END:
            if not opened:
                raise ValueError("a ResidualEnd without its ResidualBegin")
            begin = opened.pop()
            partners[i], partners[begin] = begin, i
    if opened:
        raise ValueError("a ResidualBegin without its ResidualEnd")
    return partners


def _row(layer, n_in, n_out, w_off, act_off, aux_off, buf_off, partner):
    """One row of the program: ``w_off`` is where the layer's parameters
    start in the flat vector, ``act_off``, ``aux_off`` and ``buf_off`` where
    its slots start in the activation workspace, aux and buffers; a residual
    marker keeps its ``partner``'s row index in W_OFF."""
    row = [0] * N_COLS
    row[KIND], row[N_IN], row[N_OUT] = layer.kind, n_in, n_out
    row[ACT], row[ACT_OFF] = Act.IDENTITY, act_off
    if layer.kind in (Kind.RES_BEGIN, Kind.RES_END):
        row[W_OFF] = partner
    elif layer.kind == Kind.DROPOUT:
        row[W_OFF] = row[B_OFF] = w_off
    elif layer.kind == Kind.BATCHNORM:  # gamma, then beta
        row[W_OFF], row[B_OFF] = w_off, w_off + n_out
        row[TRAINABLE], row[AUX_OFF], row[BUF_OFF] = int(layer.trainable), aux_off, buf_off
    else:  # W (n_in, n_out), then b
        row[ACT] = activations.code(layer.activation)
        row[W_OFF], row[B_OFF] = w_off, w_off + n_in * n_out
        row[TRAINABLE], row[AUX_OFF] = int(layer.trainable), aux_off
    return row


def _floats(layer, scalar):
    """One row of the floats table; ``scalar`` the model's dtype's type."""
    values = [0.0] * N_FLOATS
    if layer.kind == Kind.DROPOUT:
        values[RATE] = layer.rate
    elif layer.kind == Kind.DENSE:
        values[RATE] = layer.dropconnect
    elif layer.kind == Kind.BATCHNORM:
        with np.errstate(over="ignore"):
            eps = float(scalar(layer.eps))
        if not np.isfinite(eps):
            # it became inf in float32, and the layer's output a constant
            raise ValueError(f"BatchNorm's eps {layer.eps!r} is beyond the model's dtype's "
                             f"range ({np.dtype(scalar).name}): use a smaller eps")
        if eps == 0 and layer.eps > 0:
            # it became 0 in float32: a constant feature divided by zero
            raise ValueError(f"BatchNorm's eps {layer.eps!r} is 0 in the model's dtype "
                             f"({np.dtype(scalar).name}), below its smallest value: use a "
                             "larger eps")
        values[MOMENTUM], values[EPS] = layer.momentum, eps
    return values


def _act_width(layer, n_out):
    """Columns of the activation workspace a row uses per batch row: its
    output, and after it dropout's mask or BatchNorm's x_hat."""
    return 2 * n_out if layer.kind in (Kind.DROPOUT, Kind.BATCHNORM) else n_out


def _aux_size(layer, n_in, n_out):
    """Scratch values a row needs per step: W_eff and its mask for
    DropConnect, 1/std per feature for BatchNorm."""
    if layer.kind == Kind.BATCHNORM:
        return n_out
    if layer.kind == Kind.DENSE and layer.dropconnect > 0:
        return 2 * n_in * n_out
    return 0


def _buffer_size(layer, n_out):
    """State that is not trained: BatchNorm's running mean and variance."""
    return 2 * n_out if layer.kind == Kind.BATCHNORM else 0
