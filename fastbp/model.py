"""Sequential model: its structure, flat parameters, inference and files.

How Python stays out of the step
--------------------------------
``build`` compiles the layers (``fastbp.program``) into a *program*: an
int64 table with one row per layer (sizes, activation code, offsets), a
table of per-row floats (rates, momentum, eps) and the sizes of the flat
arrays, then lays every layer's W and b out in one flat ``params`` vector
(and the gradient in ``grad``) where the program says.  ``fit`` gathers the
program, the flat vectors, workspaces sized for one mini-batch, and the C
addresses of the Numba loss and optimizer kernels into one checked
``fastbp._ext.engine.EngineState`` and hands it to
``fastbp._ext.engine.train_batches``, which runs whole runs of mini-batches
(gather, forward, loss, backward, update) without returning to Python.
Python only shuffles the index order once per epoch, times the calls, and
records the history.

Who does what
-------------
This module holds the model: layers, build, parameters, predict, evaluate,
loss_and_grad, save and summary.  ``fit`` is a thin method over the fit
driver ``fastbp._fit`` (argument checks, callbacks, checkpoints, divergence
and Ctrl-C) and the epoch loop every fit shares (``fastbp._loop``), which
drives the engine through
``fastbp._runner`` (workspaces, scratch, the only caller of
``train_batches``, rollback); ``fastbp._threads`` holds the BLAS thread
count and the deferred Ctrl-C.

Size: about 850 lines for one public class: its docstrings (``fit``'s
alone is 130 lines) are 330 of them.  Its code is already only the model's
own: argument checks and the epoch loop are ``fastbp._fit`` and
``fastbp._loop``, engine buffers ``fastbp._runner``, bytes ``fastbp._format``;
what remains (structure, parameters, inference, state) shares one built
model's tables and locks, which mixins in several files would scatter.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import threading
from collections.abc import Iterable, Sequence
from typing import Any, Callable, TypeVar, cast

import numpy as np

from . import _fit, _format, _layout, _resume
from . import losses as _losses
from . import optim as _optim
from ._ext import engine as _engine
from ._loop import Solver
from ._ext.engine import B_OFF, BUF_OFF, N_IN, N_OUT, TRAINABLE, W_OFF
from ._numba.losses import loss_cfunc
from ._reporting import DivergenceError  # noqa: F401  (fastbp.model.DivergenceError)
from ._runner import _SPARSE_ELEMENTS, _dense_rows, _forward_sparse, _ScratchPool, _Workspace
from ._threads import _BLAS, _blas_threads
from ._typing import ArrayLike, DTypeLike, MatrixLike, PathLike
from ._validation import (check_dtype, check_positive_int, check_sample_weight, check_targets,
                          check_values, check_X)
from .history import History
from .layers import (BatchNorm, Dense, Dropout, Layer, Residual, ResidualBegin, ResidualEnd,
                     from_config)
from .losses import data_loss
from .program import Program, compile_program

_Method = TypeVar("_Method", bound=Callable[..., Any])

class NotBuiltError(ValueError, AttributeError):
    """The model has no parameters yet (call ``build`` or ``fit`` first).

    A ValueError, and an AttributeError so that ``hasattr(net, "params")``
    and ``hasattr(net, "n_params")`` are False on an unbuilt model rather
    than raising (scikit-learn's ``NotFittedError`` is both for the same
    reason).
    """


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

    def __copy__(self):
        """A copy of its own (as ``copy.deepcopy``): a model and its layers
        own their weights, so a shallow copy sharing them would leave two
        models writing the same arrays (and took the layers from this one)."""
        return copy.deepcopy(self)

    def __getstate__(self):
        state = self.__dict__.copy()
        for name in ("_train_lock", "_holder", "_state_lock", "_scratch", "_fit_workspace",
                     "_network"):
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fit_workspace = None
        self._init_locks()
        if self.built:  # pickle copies views apart: make them views again
            self._bind_layers()
            self._network = self._checked_network()

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
        if self._params is not None:  # what the engine writes, whatever the layers say now
            return int(self._program[-1][N_OUT])
        return self.layers[-1].units

    def build(self, n_features: int) -> Sequential:
        """Allocate and initialize the parameters for ``n_features`` inputs.

        All or nothing: if it fails (MemoryError, an initializer's error,
        Ctrl-C), the model and its layers are as they were before the call.
        It waits for a fit of this model running in another thread.  On a
        built model it starts afresh: new weights, and no optimizer (its
        state was for the old ones), history or unfinished epoch.
        """
        n_features = check_positive_int(n_features, "n_features")
        with self._hold("build"):
            rebuilt = self.built
            self._build(n_features)
            if rebuilt:
                # The old weights are gone: so is what trained them (a fit
                # without an optimizer went on with the old Adam's moments
                # and step count, or refused for another size).
                self.optimizer = None
                self.history = History()
                self._position = None
                self._last_loss = None
                self._fit_settings = None
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
        with self._state_lock:
            # the layers become this model's before any of them changes: a
            # build of another model that shares one is refused first, and
            # does not put back attributes this build is setting
            undo = _layout.claim(self)
            saved = [(obj, dict(vars(obj))) for obj in [self, *self.layers]]
            try:
                self._lay_out(n_features)
            except BaseException:
                for obj, attrs in saved:
                    _restore_attributes(obj, attrs)
                _layout.release(undo)
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
        self._reg = _layout.penalties(self.layers)
        self._reg_per_weight = False
        self._network = self._checked_network()
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
        _layout.record(self)

    def _checked_network(self):
        """The engine's checked view of the built program and the arrays it
        indexes, for predict and loss_and_grad (engine.Network)."""
        return _engine.Network(program=self._program, floats=self._floats, params=self._params,
                               buffers=self._buffers, n_aux=int(self._compiled.n_aux))

    def _sync_layout(self):
        """fastbp._layout.sync: take up the layers' settings changed since the
        build (the caller holds the state lock); whether anything changed."""
        return _layout.sync(self)

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

    def _prepare(self, X, y, loss, name_x="X", name_y="y", sample_weight=None, sync=True):
        """Checked X (a dense array, or a CSR matrix for a scipy.sparse X),
        targets (n, n_outputs) and sample weights (n,), building the model
        for X's width if it is not built yet.  ``sync``: take up the layers'
        changed settings now (fit: refused before anything runs); evaluate
        and loss_and_grad pass False, as their inference state does it."""
        X = check_X(X, self.dtype, self.n_features if self.built else None, name=name_x,
                    accept_sparse=True)
        if not self.built:
            self._build_once(X.shape[1])
            if self.n_features != X.shape[1]:  # another thread built it for other data first
                X = check_X(X, self.dtype, self.n_features, name=name_x, accept_sparse=True)
        if sync:
            with self._state_lock:
                self._sync_layout()
        Y = check_targets(y, loss, X.shape[0], self.n_outputs, self.dtype, name=name_y,
                          name_x=name_x)
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
        network, _, _, n_features, pool = self._inference_state()
        X = check_X(X, self.dtype, n_features, accept_sparse=True)
        # Rows per call of the kernels, the same for a dense X and a sparse
        # one (made dense that many rows at a time, at most _SPARSE_ELEMENTS
        # values): a row's outputs may differ in the last bit with the rows
        # beside it in a call (the kernels pick their blocking by the count).
        chunk = max(1, min(X.shape[0], pool.chunk_rows, _SPARSE_ELEMENTS // X.shape[1]))
        out = np.empty((X.shape[0], network.n_outputs), dtype=self.dtype)
        ws = pool.take(chunk)
        try:
            with _blas_threads(None), _BLAS:   # the kernels may use as many threads as BLAS
                if isinstance(X, np.ndarray):
                    _engine.forward(network, X, ws.acts, out, chunk, ws.aux)
                else:
                    _forward_sparse(X, network, ws, out, chunk)
        finally:
            pool.give(ws)
        return out

    def _inference_state(self):
        """What an inference call reads of the built model, taken together
        (a concurrent build publishes all of it at once): the checked
        network (engine.Network: the program, params and buffers), reg,
        reg_per_weight, n_features and the scratch pool."""
        with self._state_lock:
            self._require_built()
            self._sync_layout()
            if self._scratch is None:
                self._scratch = _ScratchPool(self)
            return (self._network, self._reg, self._reg_per_weight, self.n_features,
                    self._scratch)

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
        X, Y, w = self._prepare(X, y, loss, sample_weight=sample_weight, sync=False)
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
        X, Y, w = self._prepare(X, y, loss, sample_weight=sample_weight, sync=False)
        # One call over all rows: its scratch holds every row's activations
        # (n x the layers' widths), so a dense X adds no more than that.
        X = _dense_rows(X)
        network, reg, per_weight, n_features, pool = self._inference_state()
        if X.shape[1] != n_features:
            raise ValueError(f"X has {X.shape[1]} features but the model was rebuilt for "
                             f"{n_features} by another thread during this call")
        grad = np.zeros_like(network.params)
        ws = pool.take(X.shape[0], deltas=True)
        try:
            with _BLAS:
                value = _engine.loss_grad(network, X, Y, w, grad, ws.acts, ws.deltas,
                                          loss_cfunc(loss, self.dtype), reg, per_weight, ws.aux)
        finally:
            pool.give(ws)
        _check_result(float(value), grad, self.dtype)
        return float(value), grad

    # -- training ----------------------------------------------------------
    @_holding_the_model
    def fit(self, X: MatrixLike, y: ArrayLike, loss: str = _resume.LAST,
            optimizer: (_optim.Optimizer | Solver | str | type[_optim.Optimizer] | type[Solver]
                        | None) = None,
            epochs: int = 1,
            batch_size: int | None = _resume.LAST, shuffle: bool = _resume.LAST,
            validation_data: tuple[MatrixLike, ArrayLike] | None = None, verbose: int = 1,
            n_threads: int | None = None, on_divergence: str = _resume.LAST,
            checkpoint: PathLike | None = None, checkpoint_every: int | None = None,
            sample_weight: ArrayLike | None = None, clip_norm: float | None = _resume.LAST,
            clip_value: float | None = _resume.LAST, grad_norms: bool = _resume.LAST,
            callbacks: Iterable[object] | None = None, comm: object | None = None,
            shard: bool = False, sync_batchnorm: bool = False, sync_every: int = 1) -> History:
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
        optimizer : Optimizer, name, Solver, or None
            None continues with the model's optimizer (``self.optimizer``,
            from an earlier fit or a loaded checkpoint), else Adam(lr=1e-3).
            Its state is kept: fitting again with the same object continues.
            A full-batch solver (``fastbp.optim.LevenbergMarquardt()``, or
            the class) trains on the whole data, one iteration per epoch,
            through the same epoch loop, callbacks and history; the
            mini-batch options (batch_size, shuffle, clipping, grad_norms,
            checkpoint, n_threads) do not apply to it (ValueError if given).
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
            0 prints nothing; 1 (or 2, as in Keras) prints one line per epoch (none when a callback shows the
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
            ``on_train_end(net)`` (called once however the fit ends: a
            divergence, Ctrl-C or an exception included); ``net.fit_params`` holds this fit's epochs,
            batch size and sample count.  A callback may change the
            optimizer's hyperparameters (e.g. ``net.optimizer.lr``: learning
            rate schedules; they are checked again), reset it, replace it
            (``net.optimizer = SGD(...)``: the new one starts from its own
            state, as a second fit would), taken up at the next call into
            the engine (so a checkpoint written then resumes bitwise), or set
            ``net.stop_training = True`` to end the fit after this epoch
            (``history.stop_reason`` then says why).
            ``on_batches_end(net, epoch, batch)``, if defined, is called after
            each run of batches within an epoch (a progress bar's steps).
            See ``fastbp.callbacks``.
        comm : mpi4py.MPI.Intracomm or None, default None
            Train data-parallel over these MPI ranks (launched as ``mpiexec
            -n 4 python -m mpi4py train.py``): ``batch_size`` is the global
            batch, each rank computes its share of each step's gradient, and
            one MPI_Allreduce per step inside the compiled step adds them;
            every rank applies the same update and ends with bitwise the same
            weights.  Every rank must call fit with the same model and
            settings; rank 0's weights, optimizer state and generators are
            sent to the others at the start.  Only rank 0 prints and writes
            (checkpoint, ModelCheckpoint, CSVLogger, ProgressBar).  None
            trains in this process and imports nothing from MPI.  See
            ``fastbp.distributed`` for what each mode equals.
        shard : bool, default False
            With ``comm``: False, every rank passes the same X and y (one
            process's training, split); True, each rank passes its own rows,
            and a global batch is each rank's next ``batch_size // size``.
        sync_batchnorm : bool, default False
            With ``comm`` and replicated data: BatchNorm normalises with the
            global batch's statistics (as torch's SyncBatchNorm; the same
            training as one process) instead of each rank's own (as torch's
            DistributedDataParallel; cheaper, no extra collectives).
        sync_every : int, default 1
            With ``comm``: 1 steps on the global batch's gradient (one
            allreduce per step). H > 1 is local SGD for slow networks: each
            rank steps on its own rows, and the ranks average their weights
            every H steps (convergence only: not one process's training;
            see ``fastbp.distributed``).

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
        return _fit.fit(self, X, y, loss, optimizer, epochs, batch_size, shuffle,
                        validation_data, verbose, n_threads, on_divergence, checkpoint,
                        checkpoint_every, sample_weight, clip_norm, clip_value,
                        grad_norms, callbacks, comm, shard, sync_batchnorm, sync_every)

    def discard_partial_epoch(self) -> None:
        """Forget an unfinished epoch, so the next fit starts a new one."""
        self._position = None

    # -- files -------------------------------------------------------------------
    def save(self, path: PathLike) -> None:
        """Write the model to ``path`` (atomically; no pickle): architecture,
        dtype, weights, optimizer and its state, RNG state, history, and the
        position in an unfinished epoch.  Read it back with ``fastbp.load``.
        The format is described in ``fastbp.io``."""
        _format.write(self._state(), path)

    def _state(self):
        """Everything the model holds, as plain values, like torch's
        ``state_dict``: ``fastbp.io`` turns it into a file and
        ``_from_state`` back into a model.

        Keys: ``dtype`` (str), ``seed``, ``layers`` (the model's Layer
        objects), ``n_features`` (None while not built), ``optimizer`` (the
        Optimizer, holding its own state, or None), ``history`` (History),
        ``position`` (a copy of an unfinished epoch's position, or None),
        ``last_loss``, ``fit_settings``; and, None while not built,
        ``params`` (n_params,), ``buffers`` (for each BatchNorm layer in
        order its running mean (n,), running variance (n,) and eps (1,);
        None without BatchNorm), ``shuffle_rng_state`` (dict) and
        ``dropout_state`` (int).  Arrays are read-only views or new arrays.
        """
        built = self.built
        params = None
        if built:
            with self._state_lock:
                self._sync_layout()  # the file holds the settings the weights were trained with
            params = self._params.view()
            params.flags.writeable = False
        return {"dtype": self.dtype.name, "seed": self.seed, "layers": self.layers,
                "n_features": self.n_features, "optimizer": self.optimizer,
                "history": self.history,
                "position": None if self._position is None else dict(self._position),
                "last_loss": self._last_loss, "fit_settings": self._fit_settings,
                "params": params, "buffers": self._running_stats() if built else None,
                "shuffle_rng_state": self._shuffle_rng.bit_generator.state if built else None,
                "dropout_state": int(self._dropout_rng[0]) if built else None}

    @classmethod
    def _from_state(cls, state):
        """The model that ``state`` (``_state``'s form) describes.  Its values
        are checked here as far as the model needs (architecture, finite
        parameters, running statistics): ValueError naming the problem."""
        # a state taken from a live model names its layer objects, which
        # belong to that model: the new one gets copies
        layers = [from_config(layer.get_config()) if _layout.owned(layer) else layer
                  for layer in state["layers"]]
        try:
            net = cls(layers, dtype=state["dtype"], seed=state["seed"])
        except ValueError as exc:  # e.g. residual markers that do not pair up
            raise ValueError(f"invalid architecture: {exc}") from None
        if state["n_features"] is not None:
            params = state["params"]
            if not np.isfinite(params).all():
                raise ValueError("params contain NaN or infinity")
            try:
                net.build(state["n_features"])
            except (ValueError, TypeError, OverflowError) as exc:  # e.g. a seed numpy refuses
                raise ValueError(f"cannot build the model: {exc}") from None
            net._params[...] = params
            if state["buffers"] is not None:
                net._set_running_stats(state["buffers"])
            net._shuffle_rng.bit_generator.state = state["shuffle_rng_state"]
            net._dropout_rng[0] = state["dropout_state"]
            net._position = state["position"]
        net.history = state["history"]
        net.optimizer = state["optimizer"]
        net._last_loss = state["last_loss"]
        net._fit_settings = state["fit_settings"]
        return net

    def _running_stats(self):
        """The BatchNorm layers' running statistics in ``_state``'s layout
        (mean, variance, eps of each, in order), or None without BatchNorm."""
        parts = [np.concatenate([layer.running_mean, layer.running_var,
                                 np.array([eps], self.dtype)])
                 for layer, eps in zip(self.layers, self._compiled["eps"])
                 if isinstance(layer, BatchNorm)]
        return np.concatenate(parts) if parts else None

    def _set_running_stats(self, saved):
        """Running statistics from ``_running_stats``' layout into the
        layers; the eps entries are not read: eps comes from the layers'
        configs."""
        start = 0
        for layer in self.layers:
            if isinstance(layer, BatchNorm):
                width = layer.running_mean.shape[0]
                layer.running_mean[...] = saved[start:start + width]
                layer.running_var[...] = saved[start + width:start + 2 * width]
                start += 2 * width + 1
                if not (np.isfinite(layer.running_mean).all()
                        and np.isfinite(layer.running_var).all()
                        and (layer.running_var >= 0).all()):
                    raise ValueError("BatchNorm running statistics must be finite, the variance "
                                     ">= 0")

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
        with self._state_lock:
            self._sync_layout()
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


