"""Callbacks that write or show: ``ModelCheckpoint``, ``CSVLogger`` and
``ProgressBar`` (protocol: ``fastbp.callbacks``)."""
import csv
import math
import os
import sys

import numpy as np

from .. import _files
from ._base import Callback, _check_monitor, _count, _monitored, _resolve_mode

# -- files and output ---------------------------------------------------------------------
class ModelCheckpoint(Callback):
    """Save the model with ``net.save`` at the end of epochs.

    Without ``save_best_only`` the model is saved after every epoch.  With
    it, the model is saved only after epochs whose ``monitor`` value is
    strictly better than every earlier one of this fit (the first epoch
    always is; NaN never is).  Files are written atomically by ``net.save``
    and hold the weights, optimizer state and history up to that epoch; read
    them back with ``fastbp.load``.

    Parameters
    ----------
    path : str or path-like
        File to write.  A string containing ``{`` is formatted with
        ``epoch`` and the epoch's metrics, e.g. ``"model-{epoch:03d}.fbp"``
        or ``"best-{val_loss:.4f}.fbp"``, to keep one file per save.
    monitor : str, optional
        Metric deciding what is best; required with ``save_best_only`` and
        unused without it.  A ValueError listing the available metrics is
        raised when it is missing from the epoch logs.
    mode : {"auto", "min", "max"}, default "auto"
        "auto" is "max" when the name contains "acc", else "min".
    save_best_only : bool, default False
        Save only improvements of ``monitor``.

    Attributes
    ----------
    best : float or None
        Best monitored value of this fit (``save_best_only``).
    saved : list of (int, str)
        (epoch, path) of every file written during this fit.
    """

    def __init__(self, path, monitor=None, mode="auto", save_best_only=False):
        who = "ModelCheckpoint"
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise ValueError(f"{who}: path must be a non-empty str or path-like, got {path!r}")
        self.path = path
        if save_best_only and monitor is None:
            raise ValueError(f"{who}: save_best_only=True needs a monitor (e.g. "
                             "monitor='val_loss')")
        self.monitor = None if monitor is None else _check_monitor(monitor, who)
        self.mode = _resolve_mode(mode, monitor or "", who)
        self.save_best_only = bool(save_best_only)
        self.best = None
        self.saved = []

    def on_train_begin(self, net):
        self.best = None
        self.saved = []
        path = os.fspath(self.path)
        if not (isinstance(path, str) and "{" in path):
            # a folder, a FIFO or a missing folder fails now, not after an epoch
            _files.target(path, "a model file")

    def _filepath(self, epoch, logs):
        path = os.fspath(self.path)
        if isinstance(path, str) and "{" in path:
            try:
                return path.format(epoch=epoch, **logs)
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"ModelCheckpoint: cannot format the path {path!r} with epoch "
                                 f"and this epoch's metrics ({', '.join(sorted(logs))}): "
                                 f"{exc!r}") from None
        return path

    def on_epoch_end(self, net, epoch, logs):
        if self.save_best_only:
            current = _monitored(logs, self.monitor, "ModelCheckpoint")
            better = not math.isnan(current) and (
                self.best is None
                or (current < self.best if self.mode == "min" else current > self.best))
            if not better:
                return
            self.best = current
        path = self._filepath(epoch, logs)
        net.save(path)
        self.saved.append((epoch, os.fsdecode(path)))


class CSVLogger(Callback):
    """Write the metrics of every epoch to a CSV file, one row per epoch.

    The columns are ``epoch`` followed by the keys of the first epoch's logs
    in their order.  Floats are written with ``repr`` (shortest text that
    reads back to the same float).  ``grad_norm`` (a list, one value per
    Dense layer) is spread over the columns ``grad_norm_0``, ``grad_norm_1``,
    ... (the k-th Dense layer).  Later epochs write an empty cell for a
    column they lack and ignore metrics that are not columns.  The file is
    opened, appended to and closed at every epoch, so each finished row is
    on disk even if the fit is interrupted.

    Parameters
    ----------
    path : str or path-like
        CSV file.
    append : bool, default False
        False truncates the file when the fit begins.  True appends to it;
        when it already has a header line its columns are used (and no new
        header is written), so the rows of successive fits line up.
    separator : str, default ","
        Field delimiter: one character, not a quote, a line break or a
        space that CSV readers strip.

    Raises
    ------
    ValueError
        At the start of the fit, when ``append`` finds a file whose first
        line is not a header starting with ``epoch`` (another file, or a
        log written with another separator): its rows would not line up.
    """

    def __init__(self, path, append=False, separator=","):
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"CSVLogger: path must be a str or path-like, got {path!r}")
        if not (isinstance(separator, str) and len(separator) == 1
                and separator not in "\"\r\n"):
            # (the csv module refused them only when the first row was
            # written, after an epoch had trained; "\n" wrote a value a line)
            raise ValueError(f"CSVLogger: separator must be one character other than a quote "
                             f"or a line break, got {separator!r}")
        self.path = path
        self.append = bool(append)
        self.separator = separator
        self.columns = None

    @staticmethod
    def _flatten(logs):
        row = {}
        for key, value in logs.items():
            if isinstance(value, (list, tuple, np.ndarray)):
                for i, v in enumerate(np.asarray(value, dtype=np.float64).ravel()):
                    row[f"{key}_{i}"] = float(v)
            else:
                row[key] = value
        return row

    @staticmethod
    def _text(value):
        if isinstance(value, (float, np.floating)):
            return repr(float(value))
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return str(int(value))
        return str(value)

    def on_train_begin(self, net):
        self.columns = None
        if not self.append:
            with self._open("w"):
                pass
            return
        # a bad path, or a folder where no file can be made, fails now, not
        # after an epoch (opening to append creates an empty file)
        with self._open("a"):
            pass
        if os.path.getsize(self.path) == 0:
            return
        # utf-8-sig: a header saved by a spreadsheet starts with a BOM
        with _files.open_regular(self.path, "r", "a CSV log", newline="",
                                 encoding="utf-8-sig") as f:
            header = next(csv.reader(f, delimiter=self.separator), None)
        if not header or header[0] != "epoch":
            raise ValueError(
                f"CSVLogger: {os.fsdecode(self.path)!r} does not start with a header of epoch "
                f"logs read with separator {self.separator!r} (its first line: "
                f"{self.separator.join(header or [])[:80]!r}); the appended rows would not "
                "line up: use another file, append=False, or the separator it was written "
                "with")
        self.columns = header
        with _files.open_regular(self.path, "rb", "a CSV log") as f:
            f.seek(-1, os.SEEK_END)
            ends_a_line = f.read(1) in (b"\n", b"\r")
        if not ends_a_line:   # the first new row was glued to the last old one
            with self._open("a") as f:
                f.write("\r\n")

    def _open(self, mode):
        # a regular file only: a FIFO would block the fit, a device be written
        return _files.open_regular(self.path, mode, "a CSV log", newline="", encoding="utf-8")

    def on_epoch_end(self, net, epoch, logs):
        row = {"epoch": epoch, **self._flatten(logs)}
        lines = []
        if self.columns is None:
            self.columns = list(row)
            lines.append(self.columns)
        lines.append(["" if row.get(c) is None else self._text(row[c]) for c in self.columns])
        with self._open("a") as f:
            csv.writer(f, delimiter=self.separator).writerows(lines)


class ProgressBar(Callback):
    """A tqdm progress bar of the fit's epochs, showing loss and val_loss.

    The bar counts epochs.  It advances after every run of batches within
    an epoch (``on_batches_end``: about every 50 ms of training, so the bar
    of a long epoch moves during it, e.g. 36.41/200; tqdm redraws at most
    every ``mininterval``, 0.1 s by default), and to the whole number at
    the end of each epoch, when its postfix shows the epoch's ``loss`` and,
    when present, ``val_loss`` and ``val_accuracy``.  While it is among the
    callbacks, ``fit(verbose=1)`` prints no per-epoch lines (the bar's
    postfix carries them), but still prints its line saying why a fit
    stopped, after the bar is closed.  When the fit stops before its last
    epoch, the bar ends at the epochs actually run (its total becomes
    them) with ``stopped=<history.stopped_by>`` in its postfix.  It is
    created when the fit begins and closed when the fit ends, however it
    ends.  Needs tqdm (``pip install "fastbp[progress]"``), imported when
    the callback is created.

    Parameters
    ----------
    total : int, optional
        Epochs expected (the length of the bar); by default the ``epochs``
        of the fit (``net.fit_params``).
    **tqdm_kwargs
        Passed to ``tqdm.tqdm`` (e.g. ``file``, ``leave``, ``desc``,
        ``mininterval``, ``disable``).  With ``disable=True`` (or None
        where the output is not a terminal) there is no bar, and fit prints
        its per-epoch lines again.

    Attributes
    ----------
    bar : tqdm or None
        The bar of the fit under way.
    """

    def __init__(self, total=None, **tqdm_kwargs):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            raise ImportError('ProgressBar needs tqdm: pip install "fastbp[progress]"') from None
        self._tqdm = tqdm
        self.total = None if total is None else _count(total, "total", "ProgressBar")
        self.tqdm_kwargs = {"desc": "fit", "unit": "epoch", **tqdm_kwargs}
        self.bar = None
        self._epochs = 0  # epochs finished in this fit
        self._n_batches = 0
        self._postfix = {}

    @property
    def shows_progress(self):
        """True unless the bar is disabled: fit then prints no epoch lines.
        ``disable=None`` is tqdm's "no bar unless the output is a terminal"
        (it silenced a fit whose output went to a file: no bar, no lines)."""
        disable = self.tqdm_kwargs.get("disable", False)
        if disable is None:   # tqdm's own rule for None
            file = self.tqdm_kwargs.get("file") or sys.stderr
            isatty = getattr(file, "isatty", None)
            disable = callable(isatty) and not isatty()
        return not disable

    def on_train_begin(self, net):
        self._close()
        params = getattr(net, "fit_params", None) or {}
        total = self.total if self.total is not None else params.get("epochs")
        self._epochs, self._n_batches, self._postfix = 0, params.get("n_batches") or 0, {}
        self.bar = self._tqdm(total=total, **self.tqdm_kwargs)

    def on_batches_end(self, net, epoch, batch):
        if self.bar is not None and self._n_batches:
            # two decimals: tqdm prints the count as str(n)
            self._advance(round(self._epochs + min(batch / self._n_batches, 0.99), 2))

    def on_epoch_end(self, net, epoch, logs):
        if self.bar is None:
            return
        self._postfix = {k: f"{logs[k]:.4g}" for k in ("loss", "val_loss", "val_accuracy")
                         if k in logs}
        self.bar.set_postfix(self._postfix, refresh=False)
        self._epochs += 1
        self._advance(self._epochs)

    def _advance(self, n):
        """Move the bar to ``n`` epochs (exactly: not a sum of fractions),
        redrawn as tqdm's throttling allows."""
        if n > self.bar.n:
            self.bar.n = n
            self.bar.update(0)

    def on_train_end(self, net):
        history = getattr(net, "history", None)
        kind = getattr(history, "stopped_by", None)
        if self.bar is not None and kind is not None:
            # Stopped early: end at the epochs run, not frozen part way
            # (a bar stopped before any progress keeps its total: 0/E).
            if self.bar.n:
                self.bar.total = self.bar.n
            self.bar.set_postfix({**self._postfix, "stopped": kind}, refresh=False)
        self._close()

    def _close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
