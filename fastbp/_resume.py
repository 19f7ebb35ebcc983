"""The settings a model was last fitted with, so that the next ``fit`` (in
this process, or on the model loaded from a checkpoint) continues that run
exactly unless told otherwise.

``Sequential.fit``'s training settings default to ``LAST``: the value this
model was last fitted with, else the documented default (``DEFAULTS``).  A
value passed explicitly that differs from the recorded one is used, with a
``ResumeWarning`` naming it, since the run then no longer continues the
earlier one bit for bit.  The recorded settings are saved in model files
(``fastbp.io``).
"""
import warnings
from typing import Any

import numpy as np

from . import losses as _losses

#: fit's settings that decide the training result or history, with their
#: defaults for a model never fitted.  Not recorded: epochs, the optimizer
#: (the model keeps its own), the data and sample weights, validation_data,
#: verbose, checkpoint, checkpoint_every, callbacks and n_threads (a property
#: of the machine the fit runs on, and one that does not change the result
#: where fastbp's own kernels take every product: csrc/gemm.h).
DEFAULTS = {"loss": "mse", "batch_size": 32, "shuffle": True, "clip_value": None,
            "clip_norm": None, "on_divergence": "raise", "grad_norms": False}
#: the settings whose change is warned about: all but on_divergence, which
#: changes nothing unless the run diverges, and grad_norms, which only adds
#: or drops the history's grad_norm column (the weights are the same bits)
EXACT = tuple(name for name in DEFAULTS if name not in ("on_divergence", "grad_norms"))
#: recorded beside the settings: whether the fit was given sample weights
#: (the weights are data: they cannot be restored, only asked for)
WEIGHTED = "sample_weight"


class ResumeWarning(UserWarning):
    """A fit continues a model with a setting other than the one it was last
    trained with: the result differs from an uninterrupted run."""


class _Last:
    """Default of a fit setting: what the model was last fitted with."""

    def __repr__(self):
        return "<as last fitted>"


#: typed Any so that a hint such as ``loss: str = LAST`` type-checks
LAST: Any = _Last()


def _same(given, recorded):
    """Whether a passed value equals a recorded one (any type, never raises)."""
    if given is None or recorded is None:
        return given is recorded
    try:
        return np.ndim(given) == 0 and bool(given == recorded)
    except (TypeError, ValueError):
        return False


def resolve(recorded, given, weighted):
    """Settings for this fit, and what to warn about.

    Parameters
    ----------
    recorded : dict or None
        The model's recorded settings (``None``: never fitted).
    given : dict
        Each setting of ``DEFAULTS`` as passed to fit (``LAST`` if omitted).
    weighted : bool
        Whether this fit has sample weights.

    Returns
    -------
    settings : dict
        The value to use for every setting of ``DEFAULTS``.
    changes : list of str
        One sentence per setting that differs from the recorded one.
    """
    recorded = recorded or {}
    settings, changes = {}, []
    for name, default in DEFAULTS.items():
        value = given[name]
        if value is LAST:
            settings[name] = recorded.get(name, default)
            continue
        if name == "loss":
            value = _losses.resolve(value)
        settings[name] = value
        if name in EXACT and name in recorded and not _same(value, recorded[name]):
            changes.append(f"{name}={value!r} (it was trained with {name}={recorded[name]!r})")
    if WEIGHTED in recorded and recorded[WEIGHTED] != weighted:
        changes.append(("sample weights" if weighted else "no sample weights")
                       + f" (it was trained {'without' if weighted else 'with'} them)")
    return settings, changes


def warn(changes, stacklevel=3):
    """One ResumeWarning naming every changed setting, if any."""
    if changes:
        warnings.warn("this fit continues the model with " + "; ".join(changes)
                      + ": the result will differ from an uninterrupted run (omit a setting "
                      "to keep the one the model was trained with)", ResumeWarning,
                      stacklevel=stacklevel)


def record(settings, weighted):
    """What a fit stores on the model: its settings, as plain Python values."""
    out = {}
    for name in DEFAULTS:
        value = settings[name]
        if isinstance(value, (np.integer, np.floating, np.bool_)):
            value = value.item()
        if name in ("shuffle", "grad_norms"):
            value = bool(value)  # fit takes any truth value
        elif name in ("clip_value", "clip_norm") and value is not None:
            value = float(value)
        out[name] = value
    out[WEIGHTED] = bool(weighted)
    return out
