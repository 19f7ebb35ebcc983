"""What every callback shares: the ``Callback`` base class (every hook a
no-op) and the checks of their arguments and monitored metrics.  The
protocol itself is described in ``fastbp.callbacks``."""
import math

import numpy as np

# -- helpers ---------------------------------------------------------------------------
def _monitored(logs, monitor, who):
    """The value of ``monitor`` in ``logs`` as a float; ValueError naming the
    available metrics when it is missing."""
    if monitor not in logs:
        available = ", ".join(sorted(logs)) or "none"
        hint = (" (val_* metrics need fit(..., validation_data=(X_val, y_val)))"
                if monitor.startswith("val_") else "")
        raise ValueError(f"{who} monitors {monitor!r}, which is not among this epoch's "
                         f"metrics: {available}{hint}")
    value = logs[monitor]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{who} monitors {monitor!r}, which is not a number "
                         f"(got {value!r})") from None


def _resolve_mode(mode, monitor, who):
    """'min' or 'max'; 'auto' is 'max' for accuracy-like names (containing "acc")."""
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"{who}: mode must be 'auto', 'min' or 'max', got {mode!r}")
    if mode == "auto":
        return "max" if "acc" in monitor else "min"
    return mode


def _check_monitor(monitor, who):
    if not isinstance(monitor, str) or not monitor:
        raise ValueError(f"{who}: monitor must be a metric name, got {monitor!r}")
    return monitor


def _count(value, name, who, low=0):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{who}: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _number(value, name, who, low=None, low_open=False, high=None, high_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{who}: {name} must be a number, got {value!r}")
    value = float(value)
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'(' if low_open else '['}{low}, "
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        rng = f" in {lo or '(-inf, '}{hi or 'inf)'}" if (lo or hi) else ""
        raise ValueError(f"{who}: {name} must be a finite number{rng}, got {value!r}")
    return value


# -- base class ------------------------------------------------------------------------
class Callback:
    """Base class of fit callbacks: every hook is a no-op.

    Subclass it and override any of the hooks; ``fit`` calls them at the
    points described in the module docstring (:mod:`fastbp.callbacks`).
    Deriving from this class is optional: ``fit`` calls whichever of the four
    methods an object has.

    Examples
    --------
    >>> class PrintLR(Callback):
    ...     def on_epoch_end(self, net, epoch, logs):
    ...         print(epoch, net.optimizer.lr)
    """

    def on_train_begin(self, net):
        """Called once when ``fit`` starts, before the first epoch."""

    def on_epoch_begin(self, net, epoch):
        """Called before epoch ``epoch`` (1-based, cumulative over fits)."""

    def on_epoch_end(self, net, epoch, logs):
        """Called after epoch ``epoch`` with its metrics ``logs`` (a dict)."""

    def on_train_end(self, net):
        """Called once when ``fit`` ends, however it ends (all epochs, a
        stop, a divergence, Ctrl-C, an exception), if ``on_train_begin``
        returned."""
