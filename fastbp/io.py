"""Model files: a documented binary format with no pickle, written atomically.

``Sequential.save(path)`` (or ``save_model(net, path)``) writes a model and
``fastbp.load(path)`` (``load_model``) reads it back.  Loading parses data
only: nothing in the file is executed, no pickle is involved, and every
field is validated before anything is allocated from it.  A file that is not
a valid model file raises :class:`ModelFormatError` (a ``ValueError``), never
another exception, a crash or a hang.  Errors opening the file (missing
file, permission denied) are raised as the usual ``OSError``.

File format (version 2)
-----------------------
A file is four parts, back to back, with no padding:

1. **Magic**: the 8 bytes ``b"FASTBP\\x00\\x01"``.
2. **Header length** ``H``: an unsigned 64-bit little-endian integer, the
   length in bytes of the header.  Readers refuse ``H`` above
   ``MAX_HEADER_BYTES`` (16 MiB) or beyond the end of the file.
3. **Header**: ``H`` bytes of UTF-8 JSON, one object with exactly these
   keys (writers emit ASCII only; numbers may be the non-standard tokens
   ``NaN``, ``Infinity`` and ``-Infinity`` that Python's ``json`` writes,
   which only ever occur in history values; object keys are unique):

   ``format`` : str
       Always ``"fastbp-model"``.
   ``version`` : int
       ``2``.  Readers also read version 1 files (see below) and refuse
       any other version.
   ``dtype`` : {"float32", "float64"}
       The model's dtype.
   ``n_features`` : int >= 1 or null
       Inputs of the built model; null for a model that was never built
       (then ``arrays`` is empty and ``shuffle_rng_state`` and ``position``
       are null).
   ``seed`` : null, int >= 0, or a non-empty list of at most 1024 ints >= 0
       The ``seed`` given to ``Sequential``.
   ``layers`` : list of objects, at least one and at most 10,000
       Each layer's ``get_config()``, with exactly these keys by type:
       ``{"type": "Dense", "units": int >= 1, "activation": str,
       "kernel_init": str, "trainable": bool, "kernel_regularizer": R,
       "activity_regularizer": R, "dropconnect": number in [0, 1)}``, R null
       or ``{"l1": number >= 0, "l2": number >= 0}``; ``{"type": "Dropout",
       "rate": number in [0, 1)}``; ``{"type": "BatchNorm", "momentum":
       number in (0, 1], "eps": number > 0, "trainable": bool}``;
       ``{"type": "ResidualBegin"}`` and ``{"type": "ResidualEnd"}``, which
       pair up around a residual block's layers as in ``Sequential.layers``.
   ``optimizer`` : null or object
       ``{"class": str, "config": object, "t": int, "extra": object}``: the
       class name (one of ``fastbp.optim.OPTIMIZERS``), its ``get_config()``
       (constructor keyword arguments; tuples as lists; every value valid,
       and within the range of ``dtype``), its step count in [0, 2**53),
       and the integers of its state besides ``t`` (``state_dict()["extra"]``):
       ``{"momentum_start": int}`` for SGD, the step that created its
       momentum buffer (0: none yet; at most t + 1), ``{}`` for the others.
   ``history`` : object
       ``History.to_dict()``: ``{"epoch": [int, ...], "history": {name:
       [entry, ...], ...}, "stop_reason": str or null}``, each list at most
       1,000,000 long; an entry is a number, or a list of at most 10,000
       numbers (``grad_norm``: one per layer).
   ``shuffle_rng_state`` : object or null
       ``bit_generator.state`` of the shuffling generator:
       ``{"bit_generator": "PCG64", "state": {"state": int, "inc": int},
       "has_uint32": 0 or 1, "uinteger": int}`` (state and inc in
       [0, 2**128), uinteger in [0, 2**32)).
   ``dropout_state`` : int in [0, 2**64) or null
       The counter of the engine's dropout mask stream (null exactly when
       ``n_features`` is null).
   ``position`` : object or null
       Where an unfinished epoch stands (a checkpoint saved mid-epoch):
       ``{"epoch": int >= 1, "batch": int >= 0, "rng_state": (as above),
       "loss_sum": finite number >= 0, "n_samples": int >= 1, "batch_size": int >= 1,
       "shuffle": bool}`` with ``batch_size <= n_samples`` and ``batch`` less
       than the number of batches ``ceil(n_samples / batch_size)``; with
       ``grad_norms`` on, also ``"grad_norm_sums": [finite number >= 0, ...]``
       (each layer's gradient norms summed over the epoch's updates so far)
       and ``"steps": int >= 0`` (those updates), both or neither.
   ``last_loss`` : str or null
       Canonical name of the loss of the last fit (see ``fastbp.losses``).
   ``fit_settings`` : object or null
       The settings of the last fit, which the next ``fit`` defaults to
       (``fastbp._resume``): ``{"loss": str (= last_loss), "batch_size": int
       >= 1 or null, "shuffle": bool, "clip_value": number > 0 or null,
       "clip_norm": number > 0 or null, "on_divergence": "raise" or "warn", "grad_norms": bool,
       "sample_weight": bool}`` (whether that fit had sample weights).
       Keys may be missing (a model read from a version 1 file knew only
       some); null for a model never fitted.
   ``arrays`` : list of objects
       The arrays that follow the header, in file order, each
       ``{"name": str, "dtype": "<f4" or "<f8", "shape": [int, ...]}``.
       For a built model: ``params`` of shape ``[n_params]``, then
       ``buffers`` of shape ``[n_buffers]`` when the model has BatchNorm
       layers (each: running mean, running variance, eps; n_buffers is the
       sum of 2 * width + 1 over them), then
       ``optimizer_state`` of shape ``[n_slots, n_params]`` when there is an
       optimizer whose state has been allocated.  ``n_params`` is what the
       layers imply for ``n_features``; ``n_slots`` is the number of state
       slots of the optimizer's kernel (``fastbp._numba.optim.SPECS``, in
       that order), whatever its settings; the dtype is that of ``dtype``
       (``<f4`` for float32, ``<f8`` for float64).
4. **Data**: each array's elements, little-endian, C order, in the order of
   ``arrays``.  The data must end exactly at the end of the file.

Version 1 differs in three places: the header has no ``fit_settings`` (the
loss comes from ``last_loss``, the batch size and shuffling of an unfinished
epoch from ``position``), the optimizer object has no ``extra`` (an SGD
buffer, if any, was created at step 1), and ``optimizer_state`` holds only
the leading slots its settings used (SGD: 1 with momentum, else 0; Adam: 3
with amsgrad, else 2; RMSprop: 3 with momentum, 2 if centered, else 1); the
others are loaded as zeros.

Validation on load
------------------
The header length is bounded before it is read; the JSON must parse (its
nesting depth, number of arrays and objects (at most 100,000), integer
literals (at most 40 digits: the largest integers are 128-bit RNG words)
and duplicate keys are checked, which bounds the memory and time parsing
can take) into the schema above, with the type and range of every field
checked; layer and optimizer configurations must be accepted by their
constructors; array sizes are computed with Python integers and checked
against the architecture and against the file's length before anything is
allocated, so a hostile header cannot request a huge allocation; the data
are read with bounded reads (no memory map); the parameters must be finite;
and the optimizer state must hold only values the optimizer can produce:
finite, and second moments and step sizes (Adam's v and its maximum,
RMSprop's square average, Adagrad's sum, Rprop's step sizes) >= 0 (Rprop's
previous gradient is free: torch stores a NaN gradient there as it is).
Every failure names the field.  A loaded model has the same parameters and
optimizer state (bitwise), step count, history, shuffling RNG state, position
and last loss: training it further gives the same result as training the
original.

Atomic writes
-------------
``save_model`` writes to a temporary file in the target's folder (named
``.<name>.<tag>.<pid>-<host>.<random>.tmp``), flushes and fsyncs it, then
``os.replace``s it over the target and fsyncs the folder (best effort).  A
process killed at any moment leaves either the previous file or the new one
at the target, and perhaps its temporary file: the next save to that
target (the first in its process) removes such leftovers on POSIX systems,
those the same user owns, written on this host by a process that no longer
exists, untouched for a minute.  An existing target's permission bits
are kept; a new file gets ``0o666`` less the umask.

What is replaced is always a regular file (``fastbp._files``): a path that
exists and is a FIFO, a device or a socket is refused (ValueError), a
symbolic link is written through (the temporary file is made in the folder
of the file the link points to, and that file is replaced, so the link stays
and points to the new model), and a missing folder is named in the
``FileNotFoundError``.  Like any atomic replace, a save gives the target a
new inode: other hard links to the old file keep the old model.
"""
from __future__ import annotations

import os

from . import _format
from ._format import MAGIC, MAX_HEADER_BYTES, VERSION, ModelFormatError
from ._typing import PathLike
from .model import Sequential

__all__ = ["save_model", "load_model", "load", "ModelFormatError", "MAGIC", "VERSION",
           "MAX_HEADER_BYTES"]


def load(path: PathLike) -> Sequential:
    """Read a model written by ``Sequential.save`` (or ``save_model``).
    Also importable as ``load_model``.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    Sequential
        The model with its parameters, optimizer (state and step count),
        history, RNG state and position in an unfinished epoch: training it
        further continues the saved run exactly.

    Raises
    ------
    ModelFormatError
        The file is not a valid model file (see the module docstring).
    OSError
        The file cannot be opened.
    """
    state = _format.read(path)
    try:
        return Sequential._from_state(state)
    except ValueError as exc:  # values the header's checks cannot see (params, statistics)
        raise ModelFormatError(f"{os.fsdecode(os.fspath(path))}: {exc}") from None


#: the same function, under the name beside ``save_model``
load_model = load


def save_model(net: Sequential, path: PathLike) -> None:
    """Write ``net`` to ``path`` atomically (see the module docstring);
    ``net.save(path)`` does the same.

    Parameters
    ----------
    net : Sequential
    path : str or os.PathLike
        Replaced atomically: readers see the old file or the new one.  A
        symbolic link is written through: the file it points to is replaced.

    Raises
    ------
    ValueError
        The model cannot be stored (non-finite parameters or optimizer
        state, an optimizer that is not one of ``fastbp.optim``'s, a seed
        that is not an int...), or ``path`` exists and is not a regular file
        (a FIFO, a device, a socket).
    IsADirectoryError
        ``path`` is a folder.
    FileNotFoundError
        The folder does not exist (the error names it).
    OSError
        Writing failed; the target is then unchanged.
    """
    if not isinstance(net, Sequential):
        raise TypeError(f"save_model needs a fastbp Sequential, got {type(net).__name__}")
    _format.write(net._state(), path)
