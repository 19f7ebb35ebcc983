"""The model file format's bytes: a model state (``Sequential._state``) to a
file and back.  ``read`` checks the header (``fastbp._format_header``, which
checks every field before anything is allocated from it), then reads the
arrays with bounded reads; ``write`` encodes a state, checks the header it
made as a reader would, and replaces the file atomically.  The format is
described in ``fastbp.io``'s docstring; ``fastbp.io`` (load, save_model) and
``Sequential.save`` call ``read`` and ``write``.  It does not import the
model, so the model can save without an import cycle.  The optimizer's
state goes through its public ``state_dict``/``load_state_dict``.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import tempfile
import time

import numpy as np

from . import _files
from . import optim as _optim
from ._format_header import (ARRAY_DTYPES, FORMAT, MAGIC, MAX_HEADER_BYTES, PREFIX,
                             VERSION, ModelFormatError, check_header, fail, load_optimizer_state,
                             parse_header, short)


# -- reading ------------------------------------------------------------------
def _read_exact(f, n, what):
    data = f.read(n)
    if len(data) != n:
        fail(f"file ends inside the {what} ({len(data)} of {n} bytes)")
    return data


def _read_array(f, dtype, shape, what):
    arr = np.empty(shape, dtype=dtype)
    view = memoryview(arr.reshape(-1)).cast("B")
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            fail(f"file ends inside {what} ({got} of {len(view)} bytes)")
        got += n
    return arr


def _load(f, size):
    if size < PREFIX.size:
        if _read_exact(f, min(size, len(MAGIC)), "magic") != MAGIC[:min(size, len(MAGIC))]:
            fail("not a fastbp model file (bad magic bytes)")
        fail(f"file too short ({size} bytes) to be a fastbp model file")
    magic, header_len = PREFIX.unpack(_read_exact(f, PREFIX.size, "file prefix"))
    if magic != MAGIC:
        fail("not a fastbp model file (bad magic bytes)")
    if header_len > MAX_HEADER_BYTES:
        fail(f"header length {header_len} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if header_len > size - PREFIX.size:
        fail(f"header length {header_len} runs past the end of the file ({size} bytes)")
    spec = check_header(parse_header(_read_exact(f, header_len, "header")))

    remaining = size - PREFIX.size - header_len
    total = 0
    for name, dtype, shape in spec["arrays"]:
        nbytes = dtype.itemsize
        for d in shape:  # Python ints: no overflow, and bounded at every step
            nbytes *= d
            if nbytes > remaining:
                fail(f"array {name} of shape {short(list(shape))} needs more bytes than the file "
                      f"holds after the header ({remaining})")
        total += nbytes
    if total != remaining:
        fail(f"the arrays take {total} bytes but {remaining} bytes follow the header "
              + ("(truncated file?)" if total > remaining else "(trailing bytes)"))
    data = {name: _read_array(f, dtype, shape, f"array {name}")
            for name, dtype, shape in spec["arrays"]}
    native = np.dtype(spec["dtype"])
    data = {k: np.ascontiguousarray(v, dtype=native) for k, v in data.items()}
    return _state_of_file(spec, data)


def _state_of_file(spec, data):
    """The model state (``Sequential._state``'s form) that a checked header
    and its arrays hold; the model checks the arrays' values."""
    opt = spec["optimizer"]
    built = spec["n_features"] is not None
    if built and "optimizer_state" in data:
        state = opt.state_dict()
        state["state"] = _optimizer_state(opt, data["optimizer_state"])
        load_optimizer_state(opt, state, "optimizer_state")
    return {"dtype": spec["dtype"], "seed": spec["seed"], "layers": spec["layers"],
            "n_features": spec["n_features"], "optimizer": opt, "history": spec["history"],
            "position": spec["position"], "last_loss": spec["last_loss"],
            "fit_settings": spec["fit_settings"],
            "params": data.get("params") if built else None,
            "buffers": data.get("buffers") if built else None,
            "shuffle_rng_state": spec["rng_state"] if built else None,
            "dropout_state": spec["dropout_state"] if built else None}


def _optimizer_state(opt, saved):
    """The state in today's layout: a version 1 file may hold only the
    leading slots its settings used; the others start at zero, as allocated."""
    n_slots = len(opt.slot_names)
    if saved.shape[0] == n_slots:
        return saved
    state = np.zeros((n_slots, saved.shape[1]), dtype=saved.dtype)
    state[:saved.shape[0]] = saved
    return state


def read(path):
    """The model state (``Sequential._state``'s form) in the file at
    ``path``: ModelFormatError (naming the file) if it is not a valid model
    file, OSError if it cannot be opened (see ``fastbp.io.load``)."""
    path = os.fspath(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device could block or never end
            fail("not a regular file")
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                fail("not a regular file")
            return _load(f, st.st_size)
    except ModelFormatError as exc:
        raise ModelFormatError(f"{os.fsdecode(path)}: {exc}") from None


# -- writing ------------------------------------------------------------------
def _seed_for_json(seed):
    if seed is None:
        return None
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return int(seed)
    if isinstance(seed, (list, tuple, np.ndarray)):
        return [int(s) for s in seed]
    raise ValueError(f"cannot save a model whose seed is {type(seed).__name__} {short(seed)} "
                     "(use None, an int or a list of ints)")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} {short(value)} in a model file")


def _encode(state):
    """Header bytes and the arrays to write after them, for a model state
    (``Sequential._state``'s form)."""
    dtype = state["dtype"]
    built = state["n_features"] is not None
    arrays = []
    if built:
        params = state["params"]
        if not np.isfinite(params).all():
            raise ValueError("cannot save a model whose params contain NaN or infinity")
        arrays.append(("params", params))
        buffers = state["buffers"]
        if buffers is not None:
            if not np.isfinite(buffers).all():
                raise ValueError("cannot save a model whose BatchNorm statistics are not finite")
            arrays.append(("buffers", buffers))
    opt = state["optimizer"]
    opt_header = None
    if opt is not None:
        cls = _optim.OPTIMIZERS.get(type(opt).__name__.lower())
        if type(opt) is not cls:
            raise ValueError(f"cannot save optimizer {type(opt).__name__}: model files hold the "
                             f"optimizers of fastbp.optim.OPTIMIZERS only")
        held = opt.state_dict()
        try:
            opt.validate_state_dict(held)  # what a load of the file would refuse
        except ValueError as exc:
            raise ValueError(f"cannot save: the optimizer's {exc}") from None
        opt_header = {"class": type(opt).__name__, "config": opt.get_config(), "t": held["t"],
                      "extra": held["extra"]}
        slots = held["state"]
        if slots is not None:
            expect = (len(opt.slot_names), params.shape[0] if built else None)
            if not built or slots.shape != expect or slots.dtype != dtype:
                raise ValueError(
                    f"cannot save: the optimizer holds {slots.dtype} state of shape "
                    f"{slots.shape}, not {dtype} of shape {expect} for this model")
            arrays.append(("optimizer_state", slots))
    position = state["position"]
    header = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype,
        "n_features": state["n_features"],
        "seed": _seed_for_json(state["seed"]),
        "layers": [layer.get_config() for layer in state["layers"]],
        "optimizer": opt_header,
        "history": state["history"].to_dict(),
        "shuffle_rng_state": state["shuffle_rng_state"],
        "dropout_state": state["dropout_state"],
        "position": position,
        "last_loss": state["last_loss"],
        "fit_settings": state["fit_settings"],
        "arrays": [{"name": name, "dtype": ARRAY_DTYPES[dtype], "shape": list(a.shape)}
                   for name, a in arrays],
    }
    raw = json.dumps(header, separators=(",", ":"), default=_json_default).encode("utf-8")
    if len(raw) > MAX_HEADER_BYTES:
        raise ValueError(f"cannot save: the header would take {len(raw)} bytes, more than "
                         f"the {MAX_HEADER_BYTES} a reader accepts (a very long history?)")
    # Never write a file that load would refuse: check the header as load does.
    try:
        check_header(parse_header(raw))
    except ModelFormatError as exc:
        raise ValueError(f"cannot save this model: {exc}") from None
    le = np.dtype(ARRAY_DTYPES[dtype])
    return raw, [np.ascontiguousarray(a, dtype=le) for _, a in arrays]


def _new_file_mode():
    """0o666 less the process umask (read without changing it where possible)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary_stem(target):
    """The start of the names of ``target``'s temporary files, whichever
    process writes them: the target's name, cut to 64 bytes (file names are
    limited in bytes, 255 on most file systems, and a character may take
    four; cut by characters, a legal name of 252 bytes made the temporary
    name too long), so a leftover is easy to place, and a tag of the whole
    name (two targets whose names agree in their first 64 bytes do not take
    each other's leftovers for their own).  The writer's process id and
    host follow (``write``), so a leftover of a killed writer can be told
    from a save in progress (``_remove_leftovers``)."""
    full = os.path.basename(target).encode("utf-8", "surrogateescape")
    tag = hashlib.sha256(full).hexdigest()[:8]
    return "." + full[:64].decode("utf-8", "ignore") + f".{tag}."


#: a short tag of this machine's name, in temporary files' names
_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
#: a leftover this many seconds old, at least, may be removed: a live save
#: writes its file and renames it at once, and the age also covers a
#: process of another PID namespace (a container) with this host name
_LEFTOVER_SECONDS = 60.0
#: folders and names whose leftovers this process has already removed
_SWEPT = set()


def _remove_leftovers(directory, base):
    """Remove the temporary files that saves of the same target left when
    their process was killed (SIGKILL, power loss) between creating and
    renaming them: each a full model file (``base``: the target's
    ``_temporary_stem``).  Only files this user owns,
    written on this host by a process that no longer exists, and untouched
    for a minute; once per target and process (a checkpoint is saved every
    epoch).  Best effort: a file that cannot be removed stays."""
    if os.name == "nt" or not hasattr(os, "getuid"):
        return   # (os.kill(pid, 0) sends Ctrl-C on Windows; an open file stays there)
    key = (directory, base)
    if key in _SWEPT:
        return
    _SWEPT.add(key)
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        name = entry.name
        if not (name.startswith(base) and name.endswith(".tmp")):
            continue
        writer = name[len(base):].split(".", 1)[0]   # "<pid>-<host>"
        pid, _, host = writer.partition("-")
        # (isdigit alone takes "²", which int() refuses: a stray name made
        # the save fail)
        if host != _HOST or not (pid.isascii() and pid.isdigit()) or int(pid) == os.getpid():
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid()
                    or now - st.st_mtime < _LEFTOVER_SECONDS or _alive(int(pid))):
                continue
            os.unlink(entry.path)
        except OSError:
            continue


def _alive(pid):
    """Whether a process ``pid`` exists (of any user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, OSError):
        return True   # another user's, or not a pid this OS can check: keep its files
    return True


def write(state, path):
    """Write a model state (``Sequential._state``'s form) to ``path``
    atomically; the errors are ``fastbp.io.save_model``'s."""
    raw, arrays = _encode(state)
    target, st = _files.target(path, "a model file")
    directory = os.path.dirname(target)
    mode = _new_file_mode() if st is None else stat.S_IMODE(st.st_mode)
    stem = _temporary_stem(target)
    _remove_leftovers(directory, stem)
    try:
        tmp = tempfile.NamedTemporaryFile(mode="wb", dir=directory, delete=False,
                                          prefix=f"{stem}{os.getpid()}-{_HOST}.",
                                          suffix=".tmp")
    except OSError as exc:
        raise _files.folder_error(exc, directory, "a model file") from None
    try:
        with tmp:
            if hasattr(os, "fchmod"):
                os.fchmod(tmp.fileno(), mode)
            tmp.write(PREFIX.pack(MAGIC, len(raw)))
            tmp.write(raw)
            for a in arrays:
                tmp.write(memoryview(a.reshape(-1)).cast("B"))
            tmp.flush()
            os.fsync(tmp.fileno())
        _files.target(target, "a model file")  # still a regular file (or none)
        os.replace(tmp.name, target)
    except BaseException:
        try:
            os.unlink(tmp.name)
        except OSError:
            pass
        raise
    _fsync_dir(directory)
