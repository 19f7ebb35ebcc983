"""Plots of training histories (needs matplotlib: ``pip install "fastbp[plot]"``)."""
from __future__ import annotations

import io
import os
import textwrap
import warnings
from collections.abc import Iterable
from typing import Any

from . import _files
from ._typing import PathLike
from .history import History
from .model import Sequential

try:  # for the hint only: plot_history says how to install matplotlib
    from matplotlib.figure import Figure
except ImportError:
    Figure = Any

__all__ = ["plot_history"]

# metrics a default plot shows, when recorded
_DEFAULT_METRICS = ("loss", "val_loss", "accuracy", "val_accuracy")


def _panel(name):
    """Which panel a metric is drawn in: losses together, accuracies together,
    gradient norms together, anything else on its own."""
    if name == "grad_norm" or name.startswith("grad_norm"):
        return "gradient norm"
    if "acc" in name:
        return "accuracy"
    if "loss" in name:
        return "loss"
    return name


def plot_history(history: History | Sequential, path: PathLike | None = None,
                 metrics: str | Iterable[str] | None = None) -> Figure:
    """Plot per-epoch metrics of a training history with matplotlib.

    Draws one panel of losses (``loss`` and, when recorded, ``val_loss``)
    against the epoch number and, when an accuracy is recorded
    (``val_accuracy``), a second panel below it for accuracies.  Explicitly
    requested metrics are grouped the same way: names containing "loss" in
    the loss panel, names containing "acc" in the accuracy panel,
    ``grad_norm`` in a panel of its own (one line per Dense layer, log
    scale), and any other metric (``time``, ``samples_per_s``) in a panel of
    its own.  A dashed line in every panel, and a ring on each curve, mark
    the epoch whose weights the model holds: the best one when
    ``EarlyStopping(restore_best_weights=True)`` restored it
    (``history.weights_epoch``), else the last.  The title names that epoch
    and, when the history records one, why the fit stopped
    (``history.stop_reason``).  The figure is drawn with matplotlib's Agg
    canvas, without pyplot (no global backend change, no figure left open in
    pyplot).

    Parameters
    ----------
    history : History or Sequential
        A ``fastbp.History`` or a model (its ``history`` is used).
    path : str or path-like, optional
        File to write the figure to (that exact name).  The format follows
        the extension (``"history.png"``, ``".svg"``, ``".pdf"``); PNG when
        there is none.
    metrics : list of str, optional
        Metrics to draw.  Default: ``loss``, ``val_loss``, ``accuracy`` and
        ``val_accuracy``, those of them that are recorded.  A requested metric
        that is not recorded raises ValueError.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ImportError
        When matplotlib is not installed.
    ValueError
        When the history has no epochs or lacks a requested metric.

    Notes
    -----
    A metric recorded in fewer epochs than the history holds (``val_loss``
    when only a later fit had validation data) is drawn against the last
    epochs, with a warning: the history does not say which epochs it belongs
    to.

    Examples
    --------
    >>> fig = plot_history(net, "history.png")  # doctest: +SKIP
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ImportError('plot_history needs matplotlib: pip install "fastbp[plot]"') from None

    if not isinstance(history, History):
        inner = getattr(history, "history", None)
        if not isinstance(inner, History):
            raise ValueError("plot_history takes a fastbp History or a model with a history, "
                             f"got {type(history).__name__}")
        history = inner
    if history.n_epochs == 0:
        raise ValueError("nothing to plot: the history has no epochs (fit the model first)")
    recorded = history.history
    if metrics is None:
        metrics = [m for m in _DEFAULT_METRICS if m in recorded]
    else:
        if isinstance(metrics, str):
            metrics = [metrics]
        metrics = list(metrics)
        names = [m for m in metrics if not isinstance(m, str)]
        if names:   # (a list in the list failed as unhashable, a TypeError)
            raise ValueError(f"metrics must be names of recorded metrics (str), got "
                             f"{names[0]!r}")
        missing = [m for m in metrics if m not in recorded]
        if missing:
            raise ValueError(f"metrics {missing} are not in the history; recorded: "
                             f"{', '.join(recorded) or 'none'}")
    if not metrics:
        raise ValueError("no metric to plot")

    panels = {}
    for m in metrics:
        panels.setdefault(_panel(m), []).append(m)

    epochs = list(history.epoch)
    held, why = _held_epoch(history)
    fig = Figure(figsize=(6.4, 2.6 + 2.4 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, names) in zip(axes, panels.items()):
        for name in names:
            values = recorded[name]
            xs = epochs
            if len(values) != len(epochs):
                warnings.warn(f"{name} is recorded for {len(values)} of {len(epochs)} epochs; "
                              "drawn against the last ones", RuntimeWarning, stacklevel=2)
                xs = epochs[len(epochs) - len(values):]
            if values and isinstance(values[0], (list, tuple)):  # grad_norm: one per layer
                for k in range(len(values[0])):
                    column = [v[k] if k < len(v) else float("nan") for v in values]
                    line, = ax.plot(xs, column, marker="." if len(xs) <= 50 else None,
                                    label=f"{name} {k}")
                    _ring(ax, line, xs, column, held)
                ax.set_yscale("log")
            else:
                line, = ax.plot(xs, values, marker="." if len(xs) <= 50 else None, label=name)
                _ring(ax, line, xs, values, held)
        # not a Line2D (ax.get_lines() stays the metrics), not in the legend
        ax.vlines(held, 0, 1, transform=ax.get_xaxis_transform(), colors="0.35",
                  linestyles="dashed", linewidths=1, zorder=1)
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(_title(held, why, history.stop_reason), fontsize="medium")
    if path is not None:
        _save(fig, path)
    return fig


def _held_epoch(history):
    """(epoch, why) of the weights the model holds: the epoch EarlyStopping
    restored (``weights_epoch``, if recorded), else the last."""
    restored = getattr(history, "weights_epoch", None)  # absent in older pickles
    if restored is not None and restored in history.epoch:
        return restored, "the best, restored by EarlyStopping"
    return history.epoch[-1], "the last"


def _ring(ax, line, xs, values, epoch):
    """An open ring on ``line`` at ``epoch``, if it has a value there (a
    scatter: not one of ax.get_lines(), not in the legend)."""
    if epoch in xs:
        ax.scatter([epoch], [values[list(xs).index(epoch)]], s=70, facecolors="none",
                   edgecolors=line.get_color(), linewidths=1.5, zorder=3)


def _title(epoch, why, stop_reason):
    """The figure's title: the epoch whose weights the model holds (the
    dashed line) and, when recorded, why the fit stopped (wrapped)."""
    lines = [f"Weights held: epoch {epoch} ({why}), the dashed line"]
    if stop_reason:
        lines += textwrap.wrap(f"Stopped: {stop_reason}", 80)
    return "\n".join(lines)


def _figure_format(path, supported):
    """The format ``path``'s extension names (PNG without one), if it is
    among ``supported`` (a canvas's ``get_supported_filetypes()``); else
    ValueError."""
    fmt = os.path.splitext(os.fsdecode(os.fspath(path)))[1][1:].lower() or "png"
    if fmt not in supported:
        raise ValueError(f"cannot write a figure as {fmt!r}: supported formats are "
                         f"{', '.join(sorted(supported))}")
    return fmt


def _save(fig, path):
    """Write the figure to that exact name (a regular file only, see
    fastbp._files), in the format its extension names (PNG without one)."""
    fmt = _figure_format(path, fig.canvas.get_supported_filetypes())
    # drawn in memory first: a format that fails to render (pgf without a
    # LaTeX) left an existing file truncated
    image = io.BytesIO()
    fig.savefig(image, dpi=100, format=fmt)
    with _files.open_regular(path, "wb", "a figure") as f:
        f.write(image.getvalue())
