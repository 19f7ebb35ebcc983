"""Sequential model: flat parameters, workspaces allocated once, one
compiled call per chunk of training steps.

How Python stays out of the step
--------------------------------
``build`` compiles the layers (``fastbp.program``) into a *program*: an
int64 table with one row per layer (sizes, activation code, offsets), a
table of per-row floats (rates, momentum, eps) and the sizes of the flat
arrays, then lays every layer's W and b out in one flat ``params`` vector
(and the gradient in ``grad``) where the program says.  ``fit`` hands the
program, the flat vectors, workspaces sized for one mini-batch, and the C
addresses of the Numba loss and optimizer kernels to
``fastbp._ext.engine.train_batches``, which runs whole runs of mini-batches
(gather, forward, loss, backward, update) without returning to Python.  Python only shuffles the index order
once per epoch, times the calls, and records the history.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Callable, TypeVar, cast

import numpy as np
from threadpoolctl import ThreadpoolController

from . import _reporting, _resume
from . import losses as _losses
from . import optim as _optim
from ._ext import dense as _dense
from ._ext import engine as _engine
from ._ext.engine import (ACTIVITY_L1, B_OFF, BUF_OFF, L1, L2, N_IN, N_OUT, N_REG, TRAINABLE,
                          W_OFF, Status)
from ._numba.losses import KERNELS as _LOSS_KERNELS
from ._numba.losses import loss_cfunc
from ._numba.optim import step_cfunc
from ._validation import (check_dtype, check_n_threads, check_positive_int, check_sample_weight,
                          check_targets, check_values, check_X)
from .history import History
from ._typing import ArrayLike, DTypeLike, MatrixLike, PathLike
from .layers import BatchNorm, Dense, Dropout, Layer, Residual, ResidualBegin, ResidualEnd
from .program import Program, compile_program

_Method = TypeVar("_Method", bound=Callable[..., Any])

#: target duration of one call into the engine during fit; between calls
#: Python handles Ctrl-C and nothing else, so this only bounds its latency.
_CALL_SECONDS = 0.05
#: elements of activation workspace used by predict / evaluate per chunk
_PREDICT_ELEMENTS = 1 << 22
#: values of a sparse X made dense at a time by fit (at least one batch)
_SPARSE_ELEMENTS = 1 << 22

STATUS_OK, STATUS_LOSS_NONFINITE, STATUS_PARAMS_NONFINITE = (
    Status.OK, Status.LOSS_NONFINITE, Status.PARAMS_NONFINITE)


class DivergenceError(FloatingPointError):
    """Training produced a non-finite loss or parameter.

    The model keeps the weights of the last finite step.  Attributes
    ``epoch`` and ``batch`` (both 1-based) say where it happened.
    """

    def __init__(self, message, epoch, batch):
        super().__init__(message)
        self.epoch, self.batch = epoch, batch


class NotBuiltError(ValueError, AttributeError):
    """The model has no parameters yet (call ``build`` or ``fit`` first).

    A ValueError, and an AttributeError so that ``hasattr(net, "params")``
    and ``hasattr(net, "n_params")`` are False on an unbuilt model rather
    than raising (scikit-learn's ``NotFittedError`` is both for the same
    reason).
    """


class _Workspace:
    """Buffers for ``rows`` samples: every layer's output, two delta buffers,
    and the gathered batch.  Allocated once and reused for any m <= rows."""

    def __init__(self, rows, program, n_out, dtype):
        self.rows = rows
        self.acts = np.empty(rows * program.act_width, dtype=dtype)
        self.deltas = np.empty(2 * rows * program.delta_width, dtype=dtype)
        self.xb = np.empty(rows * program.n_features, dtype=dtype)
        self.yb = np.empty(rows * n_out, dtype=dtype)
        self.wb = np.empty(rows, dtype=dtype)


class _Scratch:
    """Buffers of one inference call (predict, loss_and_grad) for up to
    ``rows`` rows: every layer's output, the two delta buffers if the call
    goes backward, and the aux values an inference pass writes."""

    def __init__(self, rows, pool, deltas):
        self.rows = rows
        self.acts = np.empty(rows * pool.width, dtype=pool.dtype)
        self.deltas = np.empty(2 * rows * pool.delta_width, dtype=pool.dtype) if deltas else None
        # Without the GIL, an inference pass writes only its acts, deltas and
        # BatchNorm's 1/std in aux (DropConnect's aux is training's alone):
        # a model without BatchNorm lends its own aux, which no call writes.
        self.aux = np.empty(pool.aux_size, dtype=pool.dtype) if pool.private_aux else pool.aux


class _ScratchPool:
    """The scratch of a built model's inference calls, which may run at the
    same time in several Python threads: each call takes a ``_Scratch`` for
    itself and gives it back, so no two calls write the same buffer and
    back-to-back calls (a web server's one-row predicts) allocate nothing.
    There are never more of them than calls that ran at once: a call that
    finds none large enough replaces the largest free one.  Sizes are
    rounded up to a power of two of rows (at most a predict chunk), so
    growing calls reallocate a few times, not every time."""

    def __init__(self, net):
        self.width = net._compiled.act_width
        self.delta_width = net._compiled.delta_width
        self.dtype = net.dtype
        self.aux = net._aux
        self.aux_size = net._compiled.n_aux
        self.private_aux = any(isinstance(layer, BatchNorm) for layer in net.layers)
        #: rows of one predict chunk (its activations take _PREDICT_ELEMENTS)
        self.chunk_rows = max(1, _PREDICT_ELEMENTS // self.width)
        self._free = []
        self._lock = threading.Lock()

    def take(self, rows, deltas=False):
        """A scratch for ``rows`` rows (with delta buffers if ``deltas``),
        the calling thread's own until ``give``."""
        with self._lock:
            last = self._free[-1] if self._free else None
            if last is not None and last.rows >= rows and (last.deltas is not None or not deltas):
                return self._free.pop()  # the usual case: calls of one size
            fits = [s for s in self._free
                    if s.rows >= rows and (s.deltas is not None or not deltas)]
            if fits:
                scratch = min(fits, key=lambda s: s.rows)
                self._free.remove(scratch)
                return scratch
            if self._free:
                self._free.remove(max(self._free, key=lambda s: s.rows))
        if rows < self.chunk_rows:
            rows = min(self.chunk_rows, 1 << (rows - 1).bit_length())
        return _Scratch(rows, self, deltas)

    def give(self, scratch):
        with self._lock:
            self._free.append(scratch)


def _holding_the_model(method: _Method) -> _Method:
    """Run the method holding its model (``Sequential._hold``); its
    signature and hints stay the method's."""
    @functools.wraps(method)
    def held(self, *args, **kwargs):
        with self._hold(method.__name__):
            return method(self, *args, **kwargs)
    return cast(_Method, held)


class Sequential:
    """A stack of layers trained by backpropagation.

    Parameters
    ----------
    layers : list of Dense, Dropout, BatchNorm and Residual
        A Residual block's layers are listed flat in ``self.layers``,
        between a ``ResidualBegin`` and a ``ResidualEnd``.
    dtype : {"float32", "float64"}, default "float32"
        Dtype of parameters, workspaces and outputs; inputs are converted.
    seed : int >= 0, list of such ints, or None
        Seeds initialization and shuffling: the same seed (and thread count)
        gives bitwise identical training.

    Attributes
    ----------
    params : ndarray of shape (n_params,)
        All trained parameters: a Dense layer's ``W`` (n_in, n_out) and
        ``b`` (n_out,), and a BatchNorm's ``gamma`` and ``beta`` (n_in,), are
        views into it.
    history : History
        Metrics of every epoch trained so far.

    Notes
    -----
    One model may be used from any number of Python threads at once:
    ``predict``, ``predict_proba``, ``evaluate`` and ``loss_and_grad`` each
    work in scratch buffers of their own and change nothing on the model;
    ``fit`` (and ``build``) calls run one at a time, each waiting for the
    one before.  A predict beside a fit sees the weights of some moment of
    that fit.

    Examples
    --------
    >>> import numpy as np, fastbp
    >>> X = np.random.default_rng(0).normal(size=(256, 4))
    >>> y = (X[:, 0] > 0).astype(int)
    >>> net = fastbp.Sequential([fastbp.Dense(8, activation="relu"), fastbp.Dense(2)], seed=0)
    >>> hist = net.fit(X, y, loss="cross_entropy", epochs=3, verbose=0)
    >>> net.predict(X).shape
    (256, 2)
    """

    def __init__(self, layers: Iterable[Layer], dtype: DTypeLike = "float32",
                 seed: int | Sequence[int] | None = None) -> None:
        flat = []
        for layer in layers:
            flat.extend(layer.flatten() if isinstance(layer, Residual) else [layer])
        layers = flat
        if not layers:
            raise ValueError("Sequential needs at least one layer")
        depth = 0
        for layer in layers:
            if not isinstance(layer, (Dense, Dropout, BatchNorm, ResidualBegin, ResidualEnd)):
                raise ValueError(f"unsupported layer {layer!r}")
            depth += isinstance(layer, ResidualBegin) - isinstance(layer, ResidualEnd)
            if depth < 0:
                raise ValueError("a ResidualEnd without its ResidualBegin")
        if depth:
            raise ValueError("a ResidualBegin without its ResidualEnd")
        if isinstance(layers[-1], ResidualEnd):
            raise ValueError("the last layer cannot be a Residual block: add a Dense output layer")
        if isinstance(layers[-1], (Dropout, ResidualBegin)):
            raise ValueError("the last layer cannot be Dropout: it has to produce the outputs")
        self.layers = layers
        self.dtype = check_dtype(dtype)
        self.seed = _check_seed(seed)
        self.history = History()
        self.optimizer = None
        self.stop_training = False  # set by a callback to end fit after the epoch
        self._position = None  # an unfinished epoch (see fit's checkpoint)
        self.n_features = None
        self._params = self._grad = None
        self._fit_workspace = None  # fit's _Workspace, grown by _workspace
        self._last_loss = None
        self._fit_settings = None  # what the last fit trained with (fastbp._resume)
        self._init_locks()

    def _init_locks(self):
        # _train_lock: one fit or build at a time (_hold); _state_lock: a
        # build publishes, and an inference call reads, the built state
        # (program, params, ...) all at once (_inference_state).
        self._train_lock = threading.Lock()
        self._holder = None  # ident of the thread inside fit or build
        self._state_lock = threading.Lock()
        self._scratch = None  # _ScratchPool of the current build

    def __getstate__(self):
        state = self.__dict__.copy()
        for name in ("_train_lock", "_holder", "_state_lock", "_scratch", "_fit_workspace"):
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fit_workspace = None
        self._init_locks()
        if self.built:  # pickle copies views apart: make them views again
            self._bind_layers()

    # -- structure ---------------------------------------------------------
    @property
    def built(self) -> bool:
        return self._params is not None

    @property
    def params(self) -> np.ndarray:
        """Flat 1-D parameter vector (see class docstring)."""
        self._require_built()
        return self._params

    @property
    def n_params(self) -> int:
        """Length of ``params`` (an AttributeError before the model is built)."""
        return self.params.shape[0]

    @property
    def program(self) -> Program:
        """What the compiled engine runs (read-only): the program's rows and
        per-row floats, with columns by name (``net.program["n_in"]``), and
        the sizes of the model's flat arrays; see ``fastbp.program``.  An
        AttributeError (NotBuiltError) before the model is built."""
        self._require_built()
        return self._compiled

    @property
    def n_outputs(self) -> int:
        return self.layers[-1].units

    def build(self, n_features: int) -> Sequential:
        """Allocate and initialize the parameters for ``n_features`` inputs.

        All or nothing: if it fails (MemoryError, an initializer's error,
        Ctrl-C), the model and its layers are as they were before the call.
        It waits for a fit of this model running in another thread.
        """
        n_features = check_positive_int(n_features, "n_features")
        with self._hold("build"):
            self._build(n_features)
        return self

    @contextlib.contextmanager
    def _hold(self, what):
        """Hold the model for a fit or a build: one at a time, so a second
        thread's waits for the first (a fit's steps and the model they train
        must not change under it).  The same thread asking again, i.e. a
        callback of a running fit, would change the model under that fit
        and gets a RuntimeError."""
        me = threading.get_ident()
        if self._holder == me:
            raise RuntimeError(f"{what} was called on this model from inside its own fit (from "
                               "a callback?): it would change the model under the running fit; "
                               "train a copy (fastbp.load of a saved file) instead")
        with self._train_lock:
            self._holder = me
            try:
                yield
            finally:
                self._holder = None

    def _build_once(self, n_features):
        """Build for n_features unless built already (maybe by another
        thread, or by the fit this thread is in)."""
        if self._holder == threading.get_ident():
            if not self.built:
                self._build(n_features)
            return
        with self._hold("build"):
            if not self.built:
                self._build(n_features)

    def _build(self, n_features):
        """build's work (the caller holds the model): under the state lock, so
        inference calls see the old build or the new one, never a mix; on
        any error the model's and its layers' attributes are put back."""
        saved = [(obj, dict(vars(obj))) for obj in [self, *self.layers]]
        with self._state_lock:
            try:
                self._lay_out(n_features)
            except BaseException:
                for obj, attrs in saved:
                    _restore_attributes(obj, attrs)
                raise

    def _lay_out(self, n_features):
        program = compile_program(self.layers, n_features, self.dtype)
        self._compiled = program
        # the engine's tables, under the names its callers pass them by
        self._program, self._floats = program.rows, program.floats
        self._params = np.zeros(program.n_params, dtype=self.dtype)
        self._grad = np.zeros(program.n_params, dtype=self.dtype)
        # Running statistics (BatchNorm): state that is not trained.
        self._buffers = np.zeros(program.n_buffers, dtype=self.dtype)
        self._aux = np.zeros(program.n_aux, dtype=self.dtype)
        self._bind_layers()
        # Per-layer penalties (columns L2, L1, ACTIVITY_L1; see csrc/engine.pyx);
        # the weight penalties are scaled by 1 / (sum of the batch's sample
        # weights) when _reg_per_weight (scikit-learn's alpha).
        self._reg = np.array([_penalties(layer) for layer in self.layers],
                             dtype=np.float64).reshape(-1, N_REG)
        self._reg_per_weight = False
        self.n_features = n_features
        self._fit_workspace = None
        self._scratch = None
        # Independent streams for initialization and shuffling, from one seed.
        init_seq, shuffle_seq, dropout_seq = np.random.SeedSequence(self.seed).spawn(3)
        rng = np.random.default_rng(init_seq)
        for layer in self.layers:
            layer._initialize(rng)
        self._shuffle_rng = np.random.default_rng(shuffle_seq)
        # The counter of the engine's dropout mask stream (csrc/engine.pyx).
        self._dropout_rng = dropout_seq.generate_state(1, np.uint64)

    def _bind_layers(self):
        """Make every layer's parameters (and gradients, and BatchNorm's
        running statistics) views into the model's flat arrays, where the
        program puts them."""
        for layer, row in zip(self.layers, self._program):
            layer._bind(int(row[N_IN]), self._params, self._grad, int(row[W_OFF]))
            if isinstance(layer, BatchNorm):
                layer._bind_buffers(self._buffers, int(row[BUF_OFF]))

    def set_params(self, params: ArrayLike) -> None:
        """Copy a flat parameter vector (same length) into the model."""
        self._params[...] = check_values(params, self.params.shape, self.dtype, "params")

    def get_weights(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Copies of every dense layer's (W, b), in order."""
        self._require_built()
        return [(layer.W.copy(), layer.b.copy()) for layer in self.layers
                if isinstance(layer, Dense)]

    def set_weights(self, weights: Iterable[tuple[ArrayLike, ArrayLike]]) -> None:
        """Set every dense layer's (W, b) from a list like ``get_weights``'s."""
        self._require_built()
        dense = [layer for layer in self.layers if isinstance(layer, Dense)]
        weights = list(weights)
        if len(weights) != len(dense):
            raise ValueError(f"expected weights for {len(dense)} dense layers, got {len(weights)}")
        checked = []
        for i, (layer, pair) in enumerate(zip(dense, weights)):
            try:
                W, b = pair
            except (TypeError, ValueError):
                raise ValueError(f"dense layer {i}: expected a (W, b) pair, got "
                                 f"{type(pair).__name__}") from None
            if np.shape(W) != layer.W.shape or np.shape(b) != layer.b.shape:
                raise ValueError(f"dense layer {i}: expected W {layer.W.shape} and b "
                                 f"{layer.b.shape}, got {np.shape(W)} and {np.shape(b)}")
            checked.append((check_values(W, layer.W.shape, self.dtype, f"dense layer {i}'s W"),
                            check_values(b, layer.b.shape, self.dtype, f"dense layer {i}'s b")))
        for layer, (W, b) in zip(dense, checked):
            layer.W[...] = W
            layer.b[...] = b

    def copy_weights_from(self, other: Sequential,
                          layers: Sequence[int] | None = None) -> list[int]:
        """Transfer learning: copy dense layers' weights from another model.

        Parameters
        ----------
        other : Sequential
            A built model.
        layers : list of int, optional
            Indices (among dense layers) to copy; default: as many leading
            dense layers as both models have with matching shapes.  Combine
            with ``trainable=False`` to freeze what was copied.
        """
        mine, theirs = self.get_weights(), other.get_weights()
        if layers is None:
            layers = []
            for i, ((W, _), (W2, _)) in enumerate(zip(mine, theirs)):
                if W.shape != W2.shape:
                    break
                layers.append(i)
        for i in layers:
            if not (0 <= i < min(len(mine), len(theirs))) or mine[i][0].shape != theirs[i][0].shape:
                raise ValueError(f"dense layer {i} does not match between the two models")
            mine[i] = theirs[i]
        self.set_weights(mine)
        return list(layers)

    def _require_built(self):
        if self._params is None:
            raise NotBuiltError("the model is not built yet: call build(n_features) or "
                                "fit(X, y)")

    def _segments(self):
        """(start, length) of each run of trainable parameters."""
        segs = []
        for row in self._program:
            if not row[TRAINABLE]:
                continue
            start, end = row[W_OFF], row[B_OFF] + row[N_OUT]
            if segs and segs[-1][0] + segs[-1][1] == start:
                segs[-1][1] += end - start
            else:
                segs.append([start, end - start])
        return np.array(segs, dtype=np.int64).reshape(-1, 2)

    def _workspace(self, rows):
        ws = self._fit_workspace
        if ws is None or ws.rows < rows:
            ws = _Workspace(rows, self._compiled, self.n_outputs, self.dtype)
            self._fit_workspace = ws
        return ws

    def _prepare(self, X, y, loss, name_x="X", name_y="y", sample_weight=None):
        """Checked X (a dense array, or a CSR matrix for a scipy.sparse X),
        targets (n, n_outputs) and sample weights (n,), building the model
        for X's width if it is not built yet."""
        X = check_X(X, self.dtype, self.n_features if self.built else None, name=name_x,
                    accept_sparse=True)
        if not self.built:
            self._build_once(X.shape[1])
            if self.n_features != X.shape[1]:  # another thread built it for other data first
                X = check_X(X, self.dtype, self.n_features, name=name_x, accept_sparse=True)
        Y = check_targets(y, loss, X.shape[0], self.n_outputs, self.dtype, name=name_y)
        return X, Y, check_sample_weight(sample_weight, X.shape[0], self.dtype)

    # -- computation -------------------------------------------------------
    def predict(self, X: MatrixLike) -> np.ndarray:
        """Network outputs for X.

        Parameters
        ----------
        X : array-like or scipy.sparse matrix of shape (n, n_features)
            A sparse X (CSR, CSC, COO, ...) is made dense a chunk of rows
            at a time, never as a whole.

        Returns
        -------
        ndarray of shape (n, n_outputs), the model's dtype
            Raw outputs of the last layer (logits when trained with a
            cross-entropy loss; see ``predict_proba``).
        """
        program, params, buffers, _, _, n_features, pool = self._inference_state()
        X = check_X(X, self.dtype, n_features, accept_sparse=True)
        chunk = max(1, min(X.shape[0], pool.chunk_rows))
        out = np.empty((X.shape[0], self.n_outputs), dtype=self.dtype)
        ws = pool.take(chunk)
        try:
            with _blas_threads(None), _BLAS:   # the kernels may use as many threads as BLAS
                if isinstance(X, np.ndarray):
                    _engine.forward(X, program.rows, program.floats, params, ws.acts, out, chunk,
                                    ws.aux, buffers)
                else:
                    _forward_sparse(X, program, params, ws, out, chunk, buffers)
        finally:
            pool.give(ws)
        return out

    def _inference_state(self):
        """What an inference call reads of the built model, taken together
        (a concurrent build publishes all of it at once): the Program, params,
        buffers, reg, reg_per_weight, n_features and the scratch pool."""
        with self._state_lock:
            self._require_built()
            if self._scratch is None:
                self._scratch = _ScratchPool(self)
            return (self._compiled, self._params, self._buffers, self._reg, self._reg_per_weight,
                    self.n_features, self._scratch)

    def predict_proba(self, X: MatrixLike, loss: str | None = None) -> np.ndarray:
        """Class probabilities: softmax of the outputs for ``cross_entropy``,
        sigmoid for ``binary_cross_entropy`` (default: the loss of the last fit)."""
        if loss is None:
            loss = self._last_loss
            if loss is None:
                raise NotBuiltError(
                    "predict_proba: this model has not been fitted yet, so it has no loss to "
                    "turn outputs into probabilities: fit it first (e.g. fit(X, y, "
                    "loss='cross_entropy')), or pass loss='cross_entropy' or "
                    "'binary_cross_entropy'")
        loss = _losses.resolve(loss)
        z = self.predict(X)
        if loss == "cross_entropy":
            z = z - z.max(axis=1, keepdims=True)
            np.exp(z, out=z)
            return z / z.sum(axis=1, keepdims=True)
        if loss == "binary_cross_entropy":
            return 0.5 * (1 + np.tanh(0.5 * z))
        raise ValueError(f"predict_proba needs a classification loss, not {loss!r}")

    def evaluate(self, X: MatrixLike, y: ArrayLike, loss: str = "mse",
                 sample_weight: ArrayLike | None = None) -> float:
        """Mean loss on (X, y) (torch.nn definitions, see ``fastbp.losses``);
        a weighted mean with ``sample_weight`` (n,).  Weight penalties are
        not included (``loss_and_grad`` includes them)."""
        loss = _losses.resolve(loss)
        self._require_built()
        X, Y, w = self._prepare(X, y, loss, sample_weight=sample_weight)
        value = data_loss(loss, self.predict(X), Y, w)
        _check_result(value, None, self.dtype)
        return value

    def loss_and_grad(self, X: MatrixLike, y: ArrayLike, loss: str = "mse",
                      sample_weight: ArrayLike | None = None) -> tuple[float, np.ndarray]:
        """Mean loss over all of (X, y) and its gradient.

        With ``sample_weight`` (n,) the loss is the weighted mean
        sum_i w_i l_i / sum_i w_i.  Weight penalties, if any, are included.
        A scipy.sparse X is made dense: the call runs on all rows at once
        and holds every row's activations anyway.

        Returns
        -------
        loss : float
        grad : ndarray of shape (n_params,)
            Same layout as ``params`` (a new array).  The model itself is
            not changed, so this is safe beside other calls (even a fit).

        Raises
        ------
        ValueError
            Also when the loss or the gradient is NaN or infinite: finite
            inputs whose outputs or gradient overflow the model's dtype.
        """
        loss = _losses.resolve(loss)
        X, Y, w = self._prepare(X, y, loss, sample_weight=sample_weight)
        # One call over all rows: its scratch holds every row's activations
        # (n x the layers' widths), so a dense X adds no more than that.
        X = _dense_rows(X)
        program, params, buffers, reg, per_weight, n_features, pool = self._inference_state()
        if X.shape[1] != n_features:
            raise ValueError(f"X has {X.shape[1]} features but the model was rebuilt for "
                             f"{n_features} by another thread during this call")
        grad = np.zeros_like(params)
        ws = pool.take(X.shape[0], deltas=True)
        try:
            with _BLAS:
                value = _engine.loss_grad(X, Y, w, program.rows, program.floats, params, grad,
                                          ws.acts, ws.deltas, loss_cfunc(loss, self.dtype), reg,
                                          per_weight, ws.aux, buffers)
        finally:
            pool.give(ws)
        _check_result(float(value), grad, self.dtype)
        return float(value), grad

    # -- training ----------------------------------------------------------
    @_holding_the_model
    def fit(self, X: MatrixLike, y: ArrayLike, loss: str = _resume.LAST,
            optimizer: _optim.Optimizer | str | type[_optim.Optimizer] | None = None,
            epochs: int = 1,
            batch_size: int | None = _resume.LAST, shuffle: bool = _resume.LAST,
            validation_data: tuple[MatrixLike, ArrayLike] | None = None, verbose: int = 1,
            n_threads: int | None = None, on_divergence: str = _resume.LAST,
            checkpoint: PathLike | None = None, checkpoint_every: int | None = None,
            sample_weight: ArrayLike | None = None, clip_norm: float | None = _resume.LAST,
            clip_value: float | None = _resume.LAST, grad_norms: bool = _resume.LAST,
            callbacks: Iterable[object] | None = None) -> History:
        """Train by mini-batch backpropagation.

        The training settings (loss, batch_size, shuffle, on_divergence,
        clip_value, clip_norm, grad_norms) default to what
        this model was last fitted with, in this process or before it was
        saved, else to the defaults below: fitting again, or fitting a
        loaded checkpoint, with only the data and ``epochs`` continues the
        earlier run exactly.  Passing a setting that differs from the one
        recorded uses it and issues a ``fastbp.ResumeWarning`` naming it (as
        does fitting with sample weights after a fit without, or the reverse).

        Parameters
        ----------
        X : array-like or scipy.sparse matrix of shape (n, n_features)
            A sparse X (CSR, CSC, COO, ...) is never made dense as a whole:
            each call into the engine densifies the rows of its run of
            batches (at most about 4M values, or one batch), so memory is
            bounded by that, not by n.  Training is the same, bit for bit,
            as on ``X.toarray()``.
        y : array-like of shape (n,) or (n, n_outputs)
            Integer class labels 0 .. n_outputs - 1 (cross_entropy; encode
            other labels with sklearn's ``LabelEncoder``) or targets.
        loss : {"mse", "binary_cross_entropy", "cross_entropy"}, default "mse"
        optimizer : Optimizer, name, or None
            None continues with the model's optimizer (``self.optimizer``,
            from an earlier fit or a loaded checkpoint), else Adam(lr=1e-3).
            Its state is kept: fitting again with the same object continues.
        epochs : int
            Epochs to train.  An epoch left unfinished by an interrupted run
            (Ctrl-C, or a checkpoint saved mid-epoch) is finished first and
            counts as one: to complete a run of E epochs after loading a
            checkpoint, pass ``epochs=E - net.history.n_epochs``.
        batch_size : int or None, default 32
            None is full-batch gradient descent; 1 is per-example SGD.
        shuffle : bool, default True
            Reshuffle the sample order every epoch (seeded by ``seed``).
        validation_data : (X_val, y_val) or None
            Evaluated after every epoch (``val_loss``, and ``val_accuracy``
            for classification losses).
        verbose : int, default 1
            1 prints one line per epoch (none when a callback shows the
            progress itself, as ``ProgressBar`` does) and, when the fit stops
            before its last epoch (a callback, divergence, Ctrl-C) or ends
            holding another epoch's weights, one line saying where and why
            it stopped and which weights the model holds; 0 is silent.
        n_threads : int or None, default None
            Threads for this fit: fastbp's kernels and BLAS (None: as many
            as BLAS has, all cores unless limited), from 1 to 2**31 - 1;
            more than the CPUs this process may run on counts as that many.
            Not recorded: on the AVX2 and AVX-512 levels the result is the
            same on any count.  A fit or predict in another Python thread
            at another count does not change it (their BLAS calls take
            turns).
        on_divergence : {"raise", "warn"}, default "raise"
            What happens when a loss or weight becomes non-finite: training
            stops, the weights of the last finite step are kept, and a
            ``DivergenceError`` is raised (or a RuntimeWarning issued).
        checkpoint : str or path, optional
            File that ``save`` writes (atomically) after every epoch, every
            ``checkpoint_every`` batches, and when Ctrl-C stops the fit.  It
            holds weights, optimizer state, RNG state and the position in
            the epoch: ``fastbp.load(checkpoint).fit(X, y, ...)`` with the
            same data continues bitwise identically to an uninterrupted run.
        checkpoint_every : int, optional
            Also checkpoint every this many mini-batches within an epoch.
        sample_weight : array-like of shape (n,), optional
            Non-negative weights: each batch's loss is the weighted mean
            sum_i w_i l_i / sum_i w_i (default: all ones, the plain mean).
        clip_value : float or None, default None
            Clip every gradient element to [-clip_value, clip_value].
        clip_norm : float or None, default None
            Then scale the whole gradient (trainable layers) down to global
            L2 norm clip_norm when it is larger, as
            ``torch.nn.utils.clip_grad_norm_`` (factor clip_norm / (norm + 1e-6)).
        grad_norms : bool, default False
            Record in ``history["grad_norm"]`` each epoch's mean gradient
            norm of every dense layer (before norm clipping), to see
            gradients vanish or explode.
        callbacks : list, optional
            Objects with any of the methods ``on_train_begin(net)``,
            ``on_epoch_begin(net, epoch)``, ``on_epoch_end(net, epoch, logs)``
            (logs: this epoch's metrics, as recorded in the history) and
            ``on_train_end(net)`` (called even when the fit stops on a
            divergence or Ctrl-C); ``net.fit_params`` holds this fit's epochs,
            batch size and sample count.  Between epochs a callback may change the
            optimizer's hyperparameters (e.g. ``net.optimizer.lr``: learning
            rate schedules; they are checked again), reset it, or set
            ``net.stop_training = True`` to end the fit after this epoch
            (``history.stop_reason`` then says why).
            ``on_batches_end(net, epoch, batch)``, if defined, is called after
            each run of batches within an epoch (a progress bar's steps).
            See ``fastbp.callbacks``.

        Returns
        -------
        History
            ``self.history``, extended by this fit's epochs; its
            ``stop_reason`` and ``stopped_by`` say why this fit stopped
            before its last epoch (None when it ran them all).

        Notes
        -----
        Ctrl-C (SIGINT) is deferred to the next step boundary: the fit stops
        with the model consistent, records where it stopped, saves the
        checkpoint if one is set, and raises KeyboardInterrupt (also when
        it arrives during the last step: the fit is then complete).

        Fits of one model called from several threads run one after the
        other, each waiting for the one before; ``predict``, ``evaluate``
        and ``loss_and_grad`` may run beside them.
        """
        given = dict(loss=loss, batch_size=batch_size, shuffle=shuffle, clip_value=clip_value,
                     clip_norm=clip_norm, on_divergence=on_divergence, grad_norms=grad_norms)
        settings, changes = _resume.resolve(self._fit_settings, given, sample_weight is not None)
        (loss, batch_size, shuffle, clip_value, clip_norm, on_divergence,
         grad_norms) = (settings[name] for name in given)
        epochs = check_positive_int(epochs, "epochs")
        if on_divergence not in ("raise", "warn"):
            raise ValueError(f"on_divergence must be 'raise' or 'warn', got {on_divergence!r}")
        checkpoint_every = check_positive_int(checkpoint_every, "checkpoint_every", allow_none=True)
        if checkpoint_every and checkpoint is None:
            raise ValueError("checkpoint_every needs a checkpoint path")
        X, Y, W = self._prepare(X, y, loss, sample_weight=sample_weight)
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ValueError("validation_data must be a pair (X_val, y_val)")
            Xv, Yv, _ = self._prepare(*validation_data, loss, name_x="X_val", name_y="y_val")
        n = X.shape[0]
        batch = n if batch_size is None else min(check_positive_int(batch_size, "batch_size"), n)
        if any(isinstance(l, BatchNorm) for l in self.layers) and (batch == 1 or n % batch == 1):
            raise ValueError(f"BatchNorm needs at least 2 rows in every batch: {n} samples in "
                             f"batches of {batch} leave a batch of 1 (as torch, which refuses "
                             "one-row batches in training); change batch_size")
        n_threads = check_n_threads(n_threads)
        clip = []
        for name, value in (("clip_value", clip_value), ("clip_norm", clip_norm)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not value > 0 or not np.isfinite(value)):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")
            clip.append(0.0 if value is None else float(value))
        pending = self._position
        if pending is not None and (pending["n_samples"], pending["batch_size"],
                                    pending["shuffle"]) != (n, batch, bool(shuffle)):
            raise ValueError(
                f"the model holds an unfinished epoch of {pending['n_samples']} samples in "
                f"batches of {pending['batch_size']} (shuffle={pending['shuffle']}); resume it "
                "with the same data and settings, or call discard_partial_epoch()")
        _resume.warn(changes, stacklevel=4)  # past _holding_the_model's wrapper: the caller
        fitted = _resume.record(dict(settings, batch_size=batch_size,
                                     clip_value=clip_value, clip_norm=clip_norm),
                                sample_weight is not None)
        if optimizer is None and self.optimizer is not None:
            opt = self.optimizer
        else:
            opt = _optim.get(optimizer)
        if getattr(opt, "full_batch_solver", False):
            # A solver that needs the whole data at once (Levenberg-Marquardt):
            # it runs its own iterations, one per epoch, and records the history.
            # Settings recorded by an earlier fit (not passed now) do not apply.
            ignored = [name for name, value in (
                ("checkpoint", checkpoint), ("clip_norm", clip_norm), ("clip_value", clip_value),
                ("grad_norms", grad_norms), ("n_threads", n_threads))
                if value and given.get(name, None) is not _resume.LAST]
            if ignored:
                raise ValueError(f"{type(opt).__name__} trains on the whole data at once and "
                                 f"does not support {', '.join(ignored)}")
            self.optimizer = opt
            self._last_loss, self._fit_settings = loss, fitted
            X = _dense_rows(X)  # its Jacobian holds all rows anyway
            return opt._fit(self, X, Y, W, loss=loss, epochs=epochs, verbose=verbose,
                            validation=(_dense_rows(Xv), Yv) if validation_data is not None
                            else None,
                            callbacks=list(callbacks or []), on_divergence=on_divergence)
        state = opt._bind(self.n_params, self.dtype)
        self.optimizer = opt
        self._last_loss, self._fit_settings = loss, fitted

        run = _EpochRunner(self, X, Y, W, batch, shuffle, loss, opt, state)
        run.clip_value, run.clip_norm = clip
        if grad_norms:
            run.grad_norms = np.zeros(len(self.layers))
        first_epoch = self.history.n_epochs + 1
        last_epoch = first_epoch + epochs - 1
        self.stop_training = False
        # What callbacks may want to know about this fit.
        self.fit_params = {"epochs": epochs, "first_epoch": first_epoch, "last_epoch": last_epoch,
                           "n_samples": n, "batch_size": batch, "n_batches": run.n_batches}
        report = _reporting.FitReport(self, callbacks or [], last_epoch, verbose)
        run.after_batches = report.batches_hook()
        report.begin()
        # on_train_end also after a divergence or Ctrl-C, so callbacks can
        # clean up (EarlyStopping restores its best weights, ProgressBar
        # closes), then the line saying why the fit stopped
        with report.ending():
            validation = (Xv, Yv) if validation_data is not None else None
            return self._train_epochs(run, report, first_epoch, last_epoch, n_threads,
                                      checkpoint, checkpoint_every, validation, loss,
                                      grad_norms, on_divergence, pending)

    def _train_epochs(self, run, report, first_epoch, last_epoch, n_threads, checkpoint,
                      checkpoint_every, validation, loss, grad_norms, on_divergence, pending):
        with _blas_threads(n_threads), _DeferredInterrupt() as interrupt:
            for e in range(first_epoch, last_epoch + 1):
                report.epoch_begin(e)
                run.refresh_optimizer()  # a callback may have changed it
                start = time.perf_counter()
                self._position = None
                b = run.start_epoch(pending)
                pending = None
                while b < run.n_batches:
                    stop = run.n_batches
                    if checkpoint_every:
                        stop = min(stop, (b // checkpoint_every + 1) * checkpoint_every)
                    status, b = run.run(b, stop, interrupt)
                    if status != STATUS_OK:
                        self._diverged(report, status, e, b, on_divergence)
                        return self.history
                    if b < run.n_batches and (interrupt.requested or b == stop):
                        self._position = run.position(e, b)
                        if checkpoint is not None:
                            self.save(checkpoint)
                        if interrupt.requested:
                            return self._interrupted(report, e, b, run.n_batches)
                        self._position = None
                seconds = time.perf_counter() - start
                # a resumed epoch ran only its batches from the saved position on
                metrics = {"loss": run.epoch_loss(), "time": seconds,
                           "samples_per_s": run.rows_run() / max(seconds, 1e-9)}
                if grad_norms:
                    dense = [i for i, l in enumerate(self.layers) if isinstance(l, Dense)]
                    metrics["grad_norm"] = [float(run.grad_norms[i]) / max(run.steps, 1)
                                            for i in dense]
                if validation:
                    metrics.update(self._validation_metrics(*validation, loss))
                self.history.append(e, **metrics)
                stopping = report.epoch_end(e, metrics)
                if checkpoint is not None:  # after the callbacks: holds e.g. a scheduled lr
                    self.save(checkpoint)
                if interrupt.requested and e < last_epoch:
                    return self._interrupted(report, e, run.n_batches, run.n_batches)
                if stopping:
                    break
            if interrupt.requested:  # during the last epoch's last call, or after it
                self._interrupted_at_end(report, e)
        return self.history

    @staticmethod
    def _interrupted(report, epoch, batch, n_batches):
        """Ctrl-C stopped the fit after ``batch`` batches of ``epoch`` (all of
        them: at the epoch's end): record it and raise KeyboardInterrupt."""
        if batch == n_batches:
            reason = (f"interrupted by Ctrl-C before batch 1 of epoch {epoch + 1}; fit again "
                      "to continue")
            report.stop("interrupt", reason, epoch)
        else:
            reason = (f"interrupted by Ctrl-C before batch {batch + 1} of epoch {epoch}; fit "
                      "again to continue")
            held = (f"the weights after batch {batch} of {n_batches} of epoch {epoch}" if batch
                    else f"the weights epoch {epoch} started with")
            report.stop("interrupt", reason, epoch, ended=False, weights=held)
        raise KeyboardInterrupt(reason)

    @staticmethod
    def _interrupted_at_end(report, epoch):
        reason = (f"interrupted by Ctrl-C as epoch {epoch} ended, the last this fit had to "
                  "train: the fit is complete")
        report.stop("interrupt", reason, epoch)
        raise KeyboardInterrupt(reason)

    def discard_partial_epoch(self) -> None:
        """Forget an unfinished epoch, so the next fit starts a new one."""
        self._position = None

    def _validation_metrics(self, Xv, Yv, loss):
        Z = self.predict(Xv)
        out = {"val_loss": data_loss(loss, Z, Yv)}
        if loss == "cross_entropy":
            out["val_accuracy"] = float(np.mean(Z.argmax(1) == Yv.argmax(1)))
        elif loss == "binary_cross_entropy":
            out["val_accuracy"] = float(np.mean((Z > 0) == (Yv > 0.5)))
        return out

    @staticmethod
    def _diverged(report, status, epoch, failed, on_divergence):
        """Batch ``failed`` (0-based) of ``epoch`` made the loss or a weight
        non-finite; the model holds the weights from before it."""
        what = "the loss" if status == STATUS_LOSS_NONFINITE else "an updated weight"
        batch = failed + 1
        message = (f"training diverged at epoch {epoch}, batch {batch}: {what} became NaN or "
                   "infinite; training stopped and the weights of the last finite step were kept "
                   "(try a smaller learning rate)")
        held = (f"the weights of the last finite step, after batch {failed} of epoch {epoch}"
                if failed else f"the weights epoch {epoch} started with")
        report.stop("divergence", f"training diverged in batch {batch} of epoch {epoch}: {what} "
                    "became NaN or infinite (try a smaller learning rate)", epoch, ended=False,
                    weights=held)
        if on_divergence == "raise":
            raise DivergenceError(message, epoch, batch)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    # -- files -------------------------------------------------------------------
    def save(self, path: PathLike) -> None:
        """Write the model to ``path`` (atomically; no pickle): architecture,
        dtype, weights, optimizer and its state, RNG state, history, and the
        position in an unfinished epoch.  Read it back with ``fastbp.load``.
        The format is described in ``fastbp.io``."""
        from .io import save_model

        save_model(self, path)

    # -- conveniences ----------------------------------------------------------
    def summary(self) -> str:
        """A table of the layers: each one's trained arrays (a Dense layer's
        W, a BatchNorm's gamma and beta), output width and parameter count
        (the layers of a residual block indented between its
        ``ResidualBegin`` and ``ResidualEnd`` rows), and the totals.

        Returns the table as a string, which ``print(net)`` also prints
        (``str`` of a built model); NotBuiltError before the model is built.
        """
        self._require_built()
        rows, depth = [], 0
        for i, (layer, n_in) in enumerate(zip(self.layers, self._compiled["n_in"])):
            depth -= isinstance(layer, ResidualEnd)
            rows.append((str(i), "  " * depth + repr(layer), _weights(layer), str(layer.units),
                         str(layer.n_params(n_in))))
            depth += isinstance(layer, ResidualBegin)
        head = ("#", "layer", "weights", "outputs", "params")
        w_num, w_name, w_arrays, w_out, w_size = (max(map(len, column))
                                                  for column in zip(head, *rows))
        lines = [f"Sequential ({self.dtype.name}), {self.n_features} inputs"]
        for num, name, arrays, outputs, size in [head, *rows]:
            lines.append(f"  {num:>{w_num}}  {name:<{w_name}}  {arrays:<{w_arrays}}  "
                         f"{outputs:>{w_out}}  {size:>{w_size}}")
        trainable = sum(size for _, size in self._segments())
        lines.append(f"  total parameters: {self.n_params} ({trainable} trainable)")
        return "\n".join(lines)

    def __str__(self):
        return self.summary() if self.built else repr(self)

    def __repr__(self):
        return f"Sequential({self.layers!r}, dtype={self.dtype.name!r})"


def _weights(layer):
    """The trained arrays of a built layer, for summary: "W (n_in, n_out)",
    "gamma, beta (n,)" or "-"."""
    if isinstance(layer, Dense):
        return f"W {layer.W.shape}"
    if isinstance(layer, BatchNorm):
        return f"gamma, beta {layer.gamma.shape}"
    return "-"


def _dense_rows(X):
    """X as a dense array: a checked CSR matrix made dense, an array as is."""
    return X if isinstance(X, np.ndarray) else X.toarray()


def _forward_sparse(X, program, params, ws, out, chunk, buffers):
    """``engine.forward`` of a CSR matrix through ``program`` (a Program),
    made dense in pieces of at most ``chunk`` rows (the workspace's) and
    _SPARSE_ELEMENTS values (a wide X) in one buffer; the caller holds BLAS,
    as for a dense X."""
    rows_at_once = max(1, min(chunk, _SPARSE_ELEMENTS // X.shape[1]))
    block = np.empty((rows_at_once, X.shape[1]), dtype=out.dtype)
    for start in range(0, X.shape[0], rows_at_once):
        stop = min(start + rows_at_once, X.shape[0])
        rows = block[:stop - start]
        X[start:stop].toarray(out=rows)
        _engine.forward(rows, program.rows, program.floats, params, ws.acts, out[start:stop],
                        chunk, ws.aux, buffers)


def _penalties(layer):
    """A layer's row of the engine's ``reg`` table (columns L2, L1,
    ACTIVITY_L1)."""
    kernel = getattr(layer, "kernel_regularizer", None)
    activity = getattr(layer, "activity_regularizer", None)
    row = [0.0] * N_REG
    if kernel is not None:
        row[L2], row[L1] = kernel.engine_coefficients()
    if activity is not None:
        row[ACTIVITY_L1] = activity.l1
    return row


class _OverflowError(ValueError):
    """``evaluate`` / ``loss_and_grad`` of finite inputs gave a NaN or
    infinite loss or gradient: the network's outputs or gradient exceed the
    model's dtype (float32 inputs of 1e30, say).  ``value`` and ``grad``
    hold what was computed (scikit-learn's L-BFGS hands such values to
    scipy, as scikit-learn does)."""

    def __init__(self, message, value, grad):
        super().__init__(message)
        self.value, self.grad = value, grad


def _check_result(value, grad, dtype):
    """_OverflowError unless the loss and the gradient (if any) are finite."""
    if np.isfinite(value) and (grad is None or np.isfinite(grad).all()):
        return
    what = (f"the loss is {value}" if not np.isfinite(value) else
            f"the gradient has {int((~np.isfinite(grad)).sum())} NaN or infinite entries")
    raise _OverflowError(f"{what}: the network's outputs or gradient overflow {dtype.name} for "
                         "these inputs and weights; scale the inputs (and targets)"
                         + (" or use dtype='float64'" if dtype == np.float32 else ""),
                         value, grad)


def _checked_hyper(opt):
    """The optimizer's packed hyperparameters, refused if a callback made
    them non-finite or the learning rate negative."""
    hyper = opt._hyper()
    if not np.isfinite(hyper).all() or getattr(opt, "lr", 0.0) < 0:
        raise ValueError(f"invalid hyperparameters for {type(opt).__name__} (set between "
                         f"epochs?): {opt!r}")
    return hyper


def data_loss(loss, Z, Y, w=None):
    """Weighted mean loss of outputs Z (n, k) against targets Y (n, k), no
    penalties (w: sample weights, default ones)."""
    w = np.ones(Z.shape[0], dtype=Z.dtype) if w is None else w
    return float(_LOSS_KERNELS[loss](Z, Y, w, np.empty_like(Z)))


def _restore_attributes(obj, attrs):
    """Put an object's attributes back to ``attrs`` (a copy of its vars)."""
    for name in set(vars(obj)) - set(attrs):
        delattr(obj, name)
    vars(obj).update(attrs)


def _check_seed(seed):
    """None, an int >= 0, or a list of them (numpy's SeedSequence entropy)."""
    def is_count(s):
        return isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0
    if seed is None or is_count(seed):
        return None if seed is None else int(seed)
    if isinstance(seed, (list, tuple)) and seed and all(is_count(s) for s in seed):
        return [int(s) for s in seed]
    raise ValueError(f"seed must be None, a non-negative integer or a list of them, got {seed!r}")


def _batch_weight_sums(w, batch):
    """Each batch's sum of the weights ``w`` (in batch order), added left to
    right in float64 exactly as the engine adds them (np.add.reduceat may
    add pairwise: with negative weights, its zero is not the engine's)."""
    w = w.astype(np.float64)
    n_full = len(w) // batch
    sums = np.empty(math.ceil(len(w) / batch))
    if n_full:
        sums[:n_full] = np.add.accumulate(w[:n_full * batch].reshape(n_full, batch), axis=1)[:, -1]
    if len(w) % batch:
        sums[-1] = np.add.accumulate(w[n_full * batch:])[-1]
    return sums


class _EpochRunner:
    """Drives the engine through epochs: everything allocated here is
    allocated once per fit, none of it per step."""

    def __init__(self, net, X, Y, W, batch, shuffle, loss, opt, state):
        self.net, self.X, self.Y, self.W = net, X, Y, W
        self.batch, self.shuffle = batch, bool(shuffle)
        self.opt = opt
        self.state = state.reshape(-1)
        self.n_batches = math.ceil(X.shape[0] / batch)
        self.identity = np.arange(X.shape[0], dtype=np.int64)
        self.order = self.identity.copy()
        self.batch_loss = np.zeros(self.n_batches)
        # Weight of each batch in the epoch's mean loss: its sample count, or
        # its sum of sample weights (recomputed per epoch when shuffled).
        self.sizes = np.full(self.n_batches, batch, dtype=np.float64)
        self.sizes[-1] = X.shape[0] - batch * (self.n_batches - 1)
        self.counts = self.sizes.copy()
        self.uniform = bool(np.all(W == 1))
        self.total = float(X.shape[0]) if self.uniform else float(W.sum(dtype=np.float64))
        # scikit-learn weighs each batch's loss by its sample count even with
        # sample weights (fastbp.sklearn sets this).
        self.count_by_samples = False
        self.clip_value = self.clip_norm = 0.0
        self.grad_norms = np.zeros(0)  # per-layer sums of batch gradient norms, if recorded
        self.ws = net._workspace(batch)
        # A sparse X is densified a piece at a time (_train_sparse_batches):
        # whole batches, about _SPARSE_ELEMENTS values or one batch.
        self.sparse_rows = 0
        if not isinstance(X, np.ndarray):
            self.sparse_rows = batch * max(1, _SPARSE_ELEMENTS // (X.shape[1] * batch))
            self.sparse_block = np.empty((min(self.sparse_rows, X.shape[0]), X.shape[1]),
                                         dtype=net.dtype)
        self.segments = net._segments()
        self.loss_addr = loss_cfunc(loss, net.dtype)
        self.step_addr = step_cfunc(opt.kernel, net.dtype)
        self.hyper = opt._hyper()
        # Snapshot at the start of each epoch (or resume point): lets a
        # divergence be rolled back to the last finite step by replaying.
        self.snap_params = np.empty_like(net._params)
        self.snap_state = np.empty_like(self.state)
        self.chunk = 1
        self.steps = 0
        self.first = 0
        # Called with the epoch's batch count after each run of batches (a
        # progress bar's within-epoch steps), or None: once per call into the
        # engine, not per batch.
        self.after_batches = None

    def refresh_optimizer(self):
        """Take up what changed on the optimizer since the last epoch: its
        hyperparameters (checked), and its state if it was reset or replaced."""
        state = self.opt._state_for(self.net.n_params, self.net.dtype).reshape(-1)
        if state.ctypes.data != self.state.ctypes.data:
            self.state = state
            self.snap_state = np.empty_like(state)
        self.hyper[...] = _checked_hyper(self.opt)  # checked against the state's dtype

    def start_epoch(self, resume=None, order=None):
        """Shuffle for a new epoch (or use ``order``), or rebuild the order of
        an unfinished one from its saved RNG state; returns the first batch."""
        rng = self.net._shuffle_rng
        if resume is not None:
            rng.bit_generator.state = resume["rng_state"]
        self.rng_state = rng.bit_generator.state  # before this epoch's shuffle
        self.gather = self.shuffle or order is not None
        if order is not None:
            self.order[...] = order
        elif self.shuffle:
            # Each epoch's order depends only on the RNG, not on earlier
            # epochs' orders, so fit(2 epochs) twice == fit(4 epochs).
            self.order[...] = self.identity
            rng.shuffle(self.order)
        if not self.uniform:
            w = self.W[self.order] if (self.shuffle or order is not None) else self.W
            if self.count_by_samples:
                # A batch whose weights sum to zero is skipped by the engine:
                # it has no weight in the mean either.
                self.sizes[...] = self.counts
                self.sizes[_batch_weight_sums(w, self.batch) == 0] = 0
            else:
                self.sizes[...] = np.add.reduceat(w.astype(np.float64),
                                                  np.arange(0, len(w), self.batch))
        self.steps = 0  # updates applied in this epoch (this run of it)
        self.first = 0 if resume is None else resume["batch"]
        self.grad_norms[...] = 0
        self.loss_before = 0.0 if resume is None else resume["loss_sum"]
        self.snap_params[...] = self.net._params
        self.snap_state[...] = self.state
        self.snap_t = self.opt.t
        self.snap_dropout = self.net._dropout_rng.copy()
        self.snap_buffers = self.net._buffers.copy()
        return self.first

    def rows_run(self):
        """Rows of this epoch trained by this run of it: all, or a resumed
        epoch's from its first batch on."""
        return self.X.shape[0] - self.first * self.batch

    def position(self, epoch, batch):
        """Where an unfinished epoch stands (saved in checkpoints)."""
        return {"epoch": epoch, "batch": batch, "rng_state": self.rng_state,
                "loss_sum": self._loss_sum(batch), "n_samples": self.X.shape[0],
                "batch_size": self.batch, "shuffle": self.shuffle}

    def _loss_sum(self, upto):
        # Summed strictly left to right (add.accumulate, not dot's blocked
        # sum), so an epoch resumed from a checkpoint at batch j gives the
        # same last bit as one run straight through.
        done = slice(self.first, upto)
        terms = np.empty(upto - self.first + 1)
        terms[0] = self.loss_before
        np.multiply(self.batch_loss[done], self.sizes[done], out=terms[1:])
        return float(np.add.accumulate(terms)[-1])

    def epoch_loss(self):
        """Mean training loss over the epoch's samples (weighted)."""
        total = self.total
        if self.count_by_samples:
            total = float(self.X.shape[0]) if self.uniform else float(self.sizes.sum())
        return self._loss_sum(self.n_batches) / total

    def _call(self, first, count):
        with _BLAS:  # BLAS at this fit's thread count (whatever other threads run)
            return self._train_batches(first, count)

    def _train_batches(self, first, count):
        if self.sparse_rows:
            return self._train_sparse_batches(first, count)
        ws, net = self.ws, self.net
        done, steps, status = _engine.train_batches(
            self.X, self.Y, self.W, self.order, self.gather, self.batch, first, count,
            net._program, net._params, net._grad, ws.acts, ws.deltas, ws.xb, ws.yb, ws.wb,
            self.loss_addr, self.step_addr, self.state, self.hyper, self.segments,
            self.opt.t, net._reg, net._reg_per_weight, net._floats, net._dropout_rng, net._aux,
            net._buffers, self.clip_value, self.clip_norm, self.grad_norms, self.batch_loss)
        # Batches whose weights sum to zero were skipped: t counts updates.
        self.opt.t += steps
        self.steps += steps
        return done, status

    def _train_sparse_batches(self, first, count):
        """``_train_batches`` on a sparse X: each piece of at most
        ``sparse_rows`` rows (whole batches) is made dense in ``sparse_block``
        in batch order (so the engine takes its rows in place, as it would
        have gathered them) and run as batches 0, 1, ... of that piece."""
        ws, net, batch = self.ws, self.net, self.batch
        per_call = self.sparse_rows // batch
        done, b, end = 0, first, first + count
        while b < end:
            k = min(per_call, end - b)
            lo, hi = b * batch, min((b + k) * batch, self.X.shape[0])
            rows = self.order[lo:hi] if self.gather else slice(lo, hi)
            block = self.sparse_block[:hi - lo]
            self.X[rows].toarray(out=block)
            got, steps, status = _engine.train_batches(
                block, self.Y[rows], self.W[rows], self.order[:0], False, batch, 0, k,
                net._program, net._params, net._grad, ws.acts, ws.deltas, ws.xb, ws.yb, ws.wb,
                self.loss_addr, self.step_addr, self.state, self.hyper, self.segments,
                self.opt.t, net._reg, net._reg_per_weight, net._floats, net._dropout_rng,
                net._aux, net._buffers, self.clip_value, self.clip_norm, self.grad_norms,
                self.batch_loss[b:b + k])
            self.opt.t += steps
            self.steps += steps
            done += got
            if status != STATUS_OK:
                break
            b += k
        return done, status

    def run(self, b, stop, interrupt):
        """Run batches b .. stop-1 in calls of about _CALL_SECONDS, stopping
        early at a call boundary if Ctrl-C was pressed.  Returns (status, b)
        with b the next batch to run (on divergence: the failing batch, with
        the model rolled back to the step before it)."""
        while b < stop and not interrupt.requested:
            count = min(self.chunk, stop - b)
            start = time.perf_counter()
            done, status = self._call(b, count)
            elapsed = time.perf_counter() - start
            if status != STATUS_OK:
                if status == STATUS_PARAMS_NONFINITE:
                    # Roll back to the snapshot and replay the finite steps.
                    self.net._params[...] = self.snap_params
                    self.state[...] = self.snap_state
                    self.opt.t = self.snap_t
                    self.net._dropout_rng[...] = self.snap_dropout
                    self.net._buffers[...] = self.snap_buffers
                    self.steps = 0
                    self._call(self.first, b + done - self.first)
                return status, b + done
            b += done
            # Grow the run of batches per call towards _CALL_SECONDS.
            per_batch = elapsed / max(done, 1)
            self.chunk = max(1, min(self.n_batches, int(_CALL_SECONDS / max(per_batch, 1e-7))))
            if self.after_batches is not None:
                self.after_batches(b)
        return STATUS_OK, b


class _DeferredInterrupt:
    """Hold Ctrl-C (SIGINT) until the next call boundary, so that the model,
    the optimizer's step count and the history always agree.  Only the main
    thread receives signals; in other threads this does nothing.  A second
    Ctrl-C interrupts at once.  None is lost: one that the block did not act
    on (it arrived during the last call, or the block ends with another
    exception) raises KeyboardInterrupt when the block ends."""

    def __enter__(self):
        self.requested = False
        self._armed = True
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested and self._armed:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, exc_type, exc, tb):
        self._armed = False  # from here a Ctrl-C is only recorded
        if self._previous is not None:
            # signal.signal first runs the handler of a signal still pending
            signal.signal(signal.SIGINT, self._previous)
        if self.requested and not (exc_type is not None
                                   and issubclass(exc_type, KeyboardInterrupt)):
            raise KeyboardInterrupt("interrupted by Ctrl-C")
        return False


_CONTROLLER = []


def _controller():
    if not _CONTROLLER:
        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0]


_ACCESSORS = []


def _blas_accessors():
    """(get, set) functions of each BLAS library's thread count.

    threadpoolctl's setter for OpenBLAS without OpenMP obeys only the first
    Python thread that used it (the others' calls are silently dropped), so
    a fit in another thread would run at that thread's count: OpenBLAS's own
    (process-wide) functions are called directly instead, which also makes
    a read cost about 0.2 us instead of 2.
    """
    if not _ACCESSORS:
        _ACCESSORS.append([_accessors(lib) for lib in _controller().lib_controllers
                           if lib.user_api == "blas"])
    return _ACCESSORS[0]


def _accessors(lib):
    if lib.internal_api == "openblas" and getattr(lib, "threading_layer", None) != "openmp":
        for prefix in ("", "scipy_"):
            for suffix in ("", "64_", "_64"):
                get = getattr(lib.dynlib, f"{prefix}openblas_get_num_threads{suffix}", None)
                set_ = getattr(lib.dynlib, f"{prefix}openblas_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    return get, set_
    return lib.get_num_threads, lib.set_num_threads


def default_threads():
    """Threads a fit or predict uses with ``n_threads=None``: as many as BLAS
    has (all cores unless OPENBLAS_NUM_THREADS or threadpoolctl says
    otherwise); 0 if no BLAS is found (the kernels then use one)."""
    return _BLAS.own_count()


class _BlasThreads:
    """BLAS's thread count, shared by the Python threads that run compiled
    calls.

    OpenBLAS has one thread count for the whole process, and its results can
    change with it; ``openblas_set_num_threads_local`` does not help: in the
    pthreads builds that numpy and scipy ship it sets the same global count
    (a worker thread's call changes the main thread's).  So every compiled
    call that may reach BLAS runs holding this (``with _BLAS:``) for the
    count its Python thread declared (``_blas_threads``).  Calls that want
    the same count run together; a call that wants another waits until they
    have all ended, and while it waits no new call joins them, so groups
    take turns in arrival order.  BLAS is set to a group's count when it
    starts, and back to its own setting (BLAS's as the user left it) when
    the last call ends.  Between Python threads of one count, and in a
    single thread, nothing waits and BLAS is not touched.
    """

    def __init__(self):
        # the Condition's lock taken directly: its own __enter__ is a Python
        # call, and predict passes here twice per call
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._count = None  # the running group's count
        self._holders = 0  # calls in the running group
        self._queue = collections.deque()  # waiting calls: [count, admitted]
        self._own = None  # BLAS's own counts, per library, while changed

    def own_count(self):
        """BLAS's own thread count: its setting when no call changed it."""
        with self._lock:
            counts = self._own if self._own is not None else self._read()
        return max(counts, default=0)

    def __enter__(self):
        want = getattr(_DECLARED, "n", None)
        own = want is None or _DECLARED.own
        with self._lock:
            if want is None:
                want = max(self._own if self._own is not None else self._read(), default=0)
            if not self._queue and (self._holders == 0 or want == self._count):
                if self._holders == 0:
                    self._start(want, own)
                self._holders += 1
                return self
            ticket = [want, False]
            self._queue.append(ticket)
            try:
                while not ticket[1]:
                    self._cond.wait()
            except BaseException:  # Ctrl-C while waiting
                if ticket[1]:
                    self._release()
                else:
                    self._queue.remove(ticket)
                raise
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._release()
        return False

    def _release(self):
        self._holders -= 1
        if self._holders:
            return
        if not self._queue:
            self._set(self._own)
            self._own = self._count = None
            return
        want = self._queue[0][0]
        group = [ticket for ticket in self._queue if ticket[0] == want]
        self._queue = collections.deque(t for t in self._queue if t[0] != want)
        self._start(want, False)
        self._holders = len(group)
        for ticket in group:
            ticket[1] = True
        self._cond.notify_all()

    def _start(self, want, own):
        """Set BLAS to ``want`` threads for a new group (0: leave it).  With
        ``own`` (want is BLAS's own count, read by the caller) and nothing
        changed, BLAS is already there: no need to read it again."""
        self._count = want
        if want <= 0 or (own and self._own is None):
            return
        if self._own is None:
            current = self._read()
            if all(c == want for c in current):
                return
            self._own = current
        if all(c == want for c in self._own):
            self._set(self._own)
            self._own = None
        else:
            self._set([want] * len(self._own))

    def _after_fork(self):
        """In a forked child none of the parent's calls runs: start afresh
        (the lock may have been held by a thread that is not here), with
        BLAS's own setting back if a call had changed it."""
        own = self._own
        self.__init__()
        self._set(own)

    @staticmethod
    def _read():
        return [get() or 0 for get, _ in _blas_accessors()]

    @staticmethod
    def _set(counts):
        if counts is not None:
            for (_, set_), n in zip(_blas_accessors(), counts):
                set_(n)


_BLAS = _BlasThreads()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_BLAS._after_fork)
#: this Python thread's declared thread count (``_blas_threads``), as ``n``,
#: and ``own``: whether it is BLAS's own count (n_threads=None)
_DECLARED = threading.local()


class _blas_threads:
    """Context declaring, for this Python thread, how many threads its
    compiled calls use: n_threads, or with None the count of an enclosing
    declaration, else BLAS's own count.  fastbp's kernels take it per thread
    (``dense.set_threads``); BLAS is set to it only while a compiled call
    holds ``_BLAS``, so a fit beside another with a different count still
    runs at its own.  (A class, not a generator: predict enters it on every
    call.)"""

    def __init__(self, n_threads):
        self.n_threads = n_threads

    def __enter__(self):
        self.outer = getattr(_DECLARED, "n", None)
        self.outer_own = getattr(_DECLARED, "own", False)
        n, own = self.n_threads, False
        if n is None:
            n, own = ((self.outer, self.outer_own) if self.outer is not None
                      else (_BLAS.own_count(), True))
        _DECLARED.n, _DECLARED.own = n, own
        self.previous = _dense.set_threads(n)
        return self

    def __exit__(self, *exc):
        _dense.set_threads(self.previous)
        _DECLARED.n, _DECLARED.own = self.outer, self.outer_own
        return False
