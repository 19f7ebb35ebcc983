"""Sequential model: flat parameters, workspaces allocated once, one
compiled call per chunk of training steps.

How Python stays out of the step
--------------------------------
``build`` lays every layer's W and b out in one flat ``params`` vector (and
the gradient in ``grad``) and writes a *program*: an int64 table with one row
per layer (sizes, activation code, offsets).  ``fit`` hands the program, the
flat vectors, workspaces sized for one mini-batch, and the C addresses of the
Numba loss and optimizer kernels to ``fastbp._ext.engine.train_batches``,
which runs whole runs of mini-batches (gather, forward, loss, backward,
update) without returning to Python.  Python only shuffles the index order
once per epoch, times the calls, and records the history.
"""
import contextlib
import math
import time
import warnings

import numpy as np
from threadpoolctl import ThreadpoolController

from . import losses as _losses
from . import optim as _optim
from ._ext import engine as _engine
from ._numba.losses import KERNELS as _LOSS_KERNELS
from ._numba.losses import loss_cfunc
from ._numba.optim import step_cfunc
from ._validation import check_dtype, check_positive_int, check_targets, check_X
from .history import History
from .layers import Dense, program_row

#: target duration of one call into the engine during fit; between calls
#: Python handles Ctrl-C and nothing else, so this only bounds its latency.
_CALL_SECONDS = 0.05
#: elements of activation workspace used by predict / evaluate per chunk
_PREDICT_ELEMENTS = 1 << 22

STATUS_OK, STATUS_LOSS_NONFINITE, STATUS_PARAMS_NONFINITE = 0, 1, 2


class DivergenceError(FloatingPointError):
    """Training produced a non-finite loss or parameter.

    The model keeps the weights of the last finite step.  Attributes
    ``epoch`` and ``batch`` (both 1-based) say where it happened.
    """

    def __init__(self, message, epoch, batch):
        super().__init__(message)
        self.epoch, self.batch = epoch, batch


class _Workspace:
    """Buffers for ``rows`` samples: every layer's output, two delta buffers,
    and the gathered batch.  Allocated once and reused for any m <= rows."""

    def __init__(self, rows, widths, n_in, n_out, dtype):
        self.rows = rows
        self.acts = np.empty(rows * sum(widths), dtype=dtype)
        self.deltas = np.empty(2 * rows * max(widths + [n_in]), dtype=dtype)
        self.xb = np.empty(rows * n_in, dtype=dtype)
        self.yb = np.empty(rows * n_out, dtype=dtype)


class Sequential:
    """A stack of layers trained by backpropagation.

    Parameters
    ----------
    layers : list of Dense
    dtype : {"float32", "float64"}, default "float32"
        Dtype of parameters, workspaces and outputs; inputs are converted.
    seed : int or None
        Seeds initialization and shuffling: the same seed (and thread count)
        gives bitwise identical training.

    Attributes
    ----------
    params : ndarray of shape (n_params,)
        All weights and biases; ``layers[i].W`` (n_in, n_out) and
        ``layers[i].b`` (n_out,) are views into it.
    history : History
        Metrics of every epoch trained so far.

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

    def __init__(self, layers, dtype="float32", seed=None):
        layers = list(layers)
        if not layers:
            raise ValueError("Sequential needs at least one layer")
        for layer in layers:
            if not isinstance(layer, Dense):
                raise ValueError(f"unsupported layer {layer!r}")
        self.layers = layers
        self.dtype = check_dtype(dtype)
        self.seed = seed
        self.history = History()
        self.n_features = None
        self._params = self._grad = None
        self._workspaces = {}
        self._last_loss = None

    # -- structure ---------------------------------------------------------
    @property
    def built(self):
        return self._params is not None

    @property
    def params(self):
        """Flat 1-D parameter vector (see class docstring)."""
        self._require_built()
        return self._params

    @property
    def n_params(self):
        return self.params.shape[0]

    @property
    def n_outputs(self):
        return self.layers[-1].units

    def build(self, n_features):
        """Allocate and initialize the parameters for ``n_features`` inputs."""
        n_features = check_positive_int(n_features, "n_features")
        sizes = [n_features] + [layer.units for layer in self.layers]
        total = sum(layer.n_params(n_in) for layer, n_in in zip(self.layers, sizes))
        self._params = np.zeros(total, dtype=self.dtype)
        self._grad = np.zeros(total, dtype=self.dtype)
        offset, rows, act_off = 0, [], 0
        for layer, n_in in zip(self.layers, sizes):
            start = offset
            offset = layer._bind(n_in, self._params, self._grad, start)
            rows.append(program_row(layer, start, act_off))
            act_off += layer.units
        self._program = np.array(rows, dtype=np.int64)
        self.n_features = n_features
        self._workspaces = {}
        # Independent streams for initialization and shuffling, from one seed.
        init_seq, shuffle_seq = np.random.SeedSequence(self.seed).spawn(2)
        rng = np.random.default_rng(init_seq)
        for layer in self.layers:
            layer._initialize(rng)
        self._shuffle_rng = np.random.default_rng(shuffle_seq)
        return self

    def set_params(self, params):
        """Copy a flat parameter vector (same length) into the model."""
        params = np.asarray(params)
        if params.shape != self.params.shape:
            raise ValueError(f"params must have shape {self.params.shape}, got {params.shape}")
        if not np.isfinite(params).all():
            raise ValueError("params contain NaN or infinity")
        self._params[...] = params

    def _require_built(self):
        if self._params is None:
            raise ValueError("the model is not built yet: call build(n_features) or fit(X, y)")

    def _segments(self):
        """(start, length) of each run of trainable parameters."""
        segs = []
        for row in self._program:
            if not row[7]:
                continue
            start, end = row[4], row[5] + row[2]
            if segs and segs[-1][0] + segs[-1][1] == start:
                segs[-1][1] += end - start
            else:
                segs.append([start, end - start])
        return np.array(segs, dtype=np.int64).reshape(-1, 2)

    def _workspace(self, rows):
        ws = self._workspaces.get("main")
        if ws is None or ws.rows < rows:
            widths = [layer.units for layer in self.layers]
            ws = _Workspace(rows, widths, self.n_features, self.n_outputs, self.dtype)
            self._workspaces["main"] = ws
        return ws

    def _prepare(self, X, y, loss, name_x="X", name_y="y"):
        X = check_X(X, self.dtype, self.n_features if self.built else None, name=name_x)
        if not self.built:
            self.build(X.shape[1])
        Y = check_targets(y, loss, X.shape[0], self.n_outputs, self.dtype, name=name_y)
        return X, Y

    # -- computation -------------------------------------------------------
    def predict(self, X):
        """Network outputs for X.

        Parameters
        ----------
        X : array-like of shape (n, n_features)

        Returns
        -------
        ndarray of shape (n, n_outputs), the model's dtype
            Raw outputs of the last layer (logits when trained with a
            cross-entropy loss; see ``predict_proba``).
        """
        self._require_built()
        X = check_X(X, self.dtype, self.n_features)
        chunk = max(1, min(X.shape[0], _PREDICT_ELEMENTS // sum(l.units for l in self.layers)))
        ws = self._workspace(chunk)
        out = np.empty((X.shape[0], self.n_outputs), dtype=self.dtype)
        _engine.forward(X, self._program, self._params, ws.acts, out, chunk)
        return out

    def predict_proba(self, X, loss=None):
        """Class probabilities: softmax of the outputs for ``cross_entropy``,
        sigmoid for ``binary_cross_entropy`` (default: the loss of the last fit)."""
        loss = _losses.resolve(loss or self._last_loss or "")
        z = self.predict(X)
        if loss == "cross_entropy":
            z = z - z.max(axis=1, keepdims=True)
            np.exp(z, out=z)
            return z / z.sum(axis=1, keepdims=True)
        if loss == "binary_cross_entropy":
            return 0.5 * (1 + np.tanh(0.5 * z))
        raise ValueError(f"predict_proba needs a classification loss, not {loss!r}")

    def evaluate(self, X, y, loss="mse"):
        """Mean loss on (X, y) (torch.nn definitions, see ``fastbp.losses``)."""
        loss = _losses.resolve(loss)
        self._require_built()
        X, Y = self._prepare(X, y, loss)
        Z = self.predict(X)
        return float(_LOSS_KERNELS[loss](Z, Y, np.empty_like(Z)))

    def loss_and_grad(self, X, y, loss="mse"):
        """Mean loss over all of (X, y) and its gradient.

        Returns
        -------
        loss : float
        grad : ndarray of shape (n_params,)
            Same layout as ``params`` (a new array).
        """
        loss = _losses.resolve(loss)
        X, Y = self._prepare(X, y, loss)
        ws = self._workspace(X.shape[0])
        value = _engine.loss_grad(X, Y, self._program, self._params, self._grad, ws.acts,
                                  ws.deltas, loss_cfunc(loss, self.dtype))
        return float(value), self._grad.copy()

    # -- training ----------------------------------------------------------
    def fit(self, X, y, loss="mse", optimizer=None, epochs=1, batch_size=32, shuffle=True,
            validation_data=None, verbose=1, n_threads=None, on_divergence="raise"):
        """Train by mini-batch backpropagation.

        Parameters
        ----------
        X : array-like of shape (n, n_features)
        y : array-like of shape (n,) or (n, n_outputs)
            Class labels (cross_entropy) or targets.
        loss : {"mse", "binary_cross_entropy", "cross_entropy"}, default "mse"
        optimizer : Optimizer, name, or None (Adam(lr=1e-3))
            Its state is kept: fitting again with the same object continues.
        epochs : int
        batch_size : int or None, default 32
            None is full-batch gradient descent; 1 is per-example SGD.
        shuffle : bool, default True
            Reshuffle the sample order every epoch (seeded by ``seed``).
        validation_data : (X_val, y_val) or None
            Evaluated after every epoch (``val_loss``, and ``val_accuracy``
            for classification losses).
        verbose : int, default 1
            1 prints one line per epoch; 0 is silent.
        n_threads : int or None
            BLAS threads for this fit (None: BLAS's default).
        on_divergence : {"raise", "warn"}
            What happens when a loss or weight becomes non-finite: training
            stops, the weights of the last finite step are kept, and a
            ``DivergenceError`` is raised (or a RuntimeWarning issued).

        Returns
        -------
        History
            ``self.history``, extended by this fit's epochs.
        """
        loss = _losses.resolve(loss)
        epochs = check_positive_int(epochs, "epochs")
        if on_divergence not in ("raise", "warn"):
            raise ValueError(f"on_divergence must be 'raise' or 'warn', got {on_divergence!r}")
        X, Y = self._prepare(X, y, loss)
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ValueError("validation_data must be a pair (X_val, y_val)")
            Xv, Yv = self._prepare(*validation_data, loss, name_x="X_val", name_y="y_val")
        n = X.shape[0]
        batch = n if batch_size is None else min(check_positive_int(batch_size, "batch_size"), n)
        opt = _optim.get(optimizer)
        state = opt._bind(self.n_params, self.dtype)
        n_threads = check_positive_int(n_threads, "n_threads", allow_none=True)
        self._last_loss = loss

        run = _EpochRunner(self, X, Y, batch, shuffle, loss, opt, state)
        first_epoch = len(self.history) + 1
        with _blas_threads(n_threads):
            for e in range(first_epoch, first_epoch + epochs):
                start = time.perf_counter()
                status, done, train_loss = run.epoch()
                seconds = time.perf_counter() - start
                if status != STATUS_OK:
                    self._diverged(status, e, done + 1, run, on_divergence)
                    break
                metrics = {"loss": train_loss, "time": seconds, "samples_per_s": n / seconds}
                if validation_data is not None:
                    metrics.update(self._validation_metrics(Xv, Yv, loss))
                self.history.append(e, **metrics)
                if verbose:
                    self._print_epoch(e, first_epoch + epochs - 1, metrics)
        return self.history

    def _validation_metrics(self, Xv, Yv, loss):
        Z = self.predict(Xv)
        out = {"val_loss": float(_LOSS_KERNELS[loss](Z, Yv, np.empty_like(Z)))}
        if loss == "cross_entropy":
            out["val_accuracy"] = float(np.mean(Z.argmax(1) == Yv.argmax(1)))
        elif loss == "binary_cross_entropy":
            out["val_accuracy"] = float(np.mean((Z > 0) == (Yv > 0.5)))
        return out

    def _diverged(self, status, epoch, batch, run, on_divergence):
        what = "the loss" if status == STATUS_LOSS_NONFINITE else "an updated weight"
        message = (f"training diverged at epoch {epoch}, batch {batch}: {what} became NaN or "
                   "infinite; training stopped and the weights of the last finite step were kept "
                   "(try a smaller learning rate)")
        self.history.stop_reason = message
        if on_divergence == "raise":
            raise DivergenceError(message, epoch, batch)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    @staticmethod
    def _print_epoch(e, last, metrics):
        parts = [f"epoch {e}/{last}", f"loss {metrics['loss']:.4f}"]
        if "val_loss" in metrics:
            parts.append(f"val_loss {metrics['val_loss']:.4f}")
        if "val_accuracy" in metrics:
            parts.append(f"val_accuracy {metrics['val_accuracy']:.4f}")
        parts.append(f"{metrics['time']:.3f} s")
        parts.append(f"{metrics['samples_per_s']:,.0f} samples/s")
        print(" - ".join(parts), flush=True)

    # -- conveniences ----------------------------------------------------------
    def summary(self):
        """A table of layers, shapes and parameter counts, as a string."""
        self._require_built()
        lines = [f"Sequential ({self.dtype.name}), {self.n_features} inputs"]
        for i, layer in enumerate(self.layers):
            lines.append(f"  {i}: {layer!r:<40} W {layer.W.shape}  params {layer.W.size + layer.b.size}")
        lines.append(f"  total parameters: {self.n_params}")
        return "\n".join(lines)

    def __repr__(self):
        return f"Sequential({self.layers!r}, dtype={self.dtype.name!r})"


class _EpochRunner:
    """Drives the engine through epochs: everything allocated here is
    allocated once per fit, none of it per step."""

    def __init__(self, net, X, Y, batch, shuffle, loss, opt, state):
        self.net, self.X, self.Y, self.batch, self.shuffle = net, X, Y, batch, shuffle
        self.opt = opt
        self.state = state.reshape(-1)
        self.n_batches = math.ceil(X.shape[0] / batch)
        self.identity = np.arange(X.shape[0], dtype=np.int64)
        self.order = self.identity.copy()
        self.batch_loss = np.zeros(self.n_batches)
        self.sizes = np.full(self.n_batches, batch, dtype=np.float64)
        self.sizes[-1] = X.shape[0] - batch * (self.n_batches - 1)
        self.ws = net._workspace(batch)
        self.segments = net._segments()
        self.loss_addr = loss_cfunc(loss, net.dtype)
        self.step_addr = step_cfunc(opt.kernel, net.dtype)
        self.hyper = opt._hyper()
        # Snapshot at the start of each epoch: lets a divergence be rolled
        # back to the last finite step by replaying the epoch up to it.
        self.snap_params = np.empty_like(net._params)
        self.snap_state = np.empty_like(self.state)
        self.chunk = 1

    def _run(self, first, count):
        ws, net = self.ws, self.net
        done, status = _engine.train_batches(
            self.X, self.Y, self.order, self.shuffle, self.batch, first, count,
            net._program, net._params, net._grad, ws.acts, ws.deltas, ws.xb, ws.yb,
            self.loss_addr, self.step_addr, self.state, self.hyper, self.segments,
            self.opt.t, self.batch_loss)
        self.opt.t += done
        return done, status

    def epoch(self):
        """Run one epoch; returns (status, batches done, mean training loss)."""
        if self.shuffle:
            # Each epoch's order depends only on the RNG, not on earlier
            # epochs' orders, so fit(2 epochs) twice == fit(4 epochs).
            self.order[...] = self.identity
            self.net._shuffle_rng.shuffle(self.order)
        self.snap_params[...] = self.net._params
        self.snap_state[...] = self.state
        snap_t = self.opt.t
        b = 0
        while b < self.n_batches:
            count = min(self.chunk, self.n_batches - b)
            start = time.perf_counter()
            done, status = self._run(b, count)
            elapsed = time.perf_counter() - start
            if status != STATUS_OK:
                if status == STATUS_PARAMS_NONFINITE:
                    # Roll back to the epoch's start and replay the finite steps.
                    self.net._params[...] = self.snap_params
                    self.state[...] = self.snap_state
                    self.opt.t = snap_t
                    self._run(0, b + done)
                return status, b + done, float("nan")
            b += done
            # Grow the run of batches per call towards _CALL_SECONDS.
            per_batch = elapsed / max(done, 1)
            self.chunk = max(1, min(self.n_batches, int(_CALL_SECONDS / max(per_batch, 1e-7))))
        mean = float(np.dot(self.batch_loss, self.sizes) / self.X.shape[0])
        return STATUS_OK, b, mean


_CONTROLLER = []


def _blas_threads(n_threads):
    """Context limiting BLAS to n_threads (None: leave it alone).  The
    controller that finds the BLAS libraries is built once: a limit then
    costs about 0.03 ms instead of 1.5 ms."""
    if n_threads is None:
        return contextlib.nullcontext()
    if not _CONTROLLER:
        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0].limit(limits=n_threads, user_api="blas")
