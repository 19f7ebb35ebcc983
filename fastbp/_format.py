"""The model file format's code: a model state (``Sequential._state``) to
bytes and back, every field of a file checked before anything is allocated
from it, and the atomic write.  The format itself is described in
``fastbp.io``'s docstring; ``fastbp.io`` (load, save_model) and
``Sequential.save`` call ``read`` and ``write``.  It does not import the
model, so the model can save without an import cycle.

Size: about 800 lines: a reader of hostile files checks every field of the
header, its type, range and consistency with the others, each with a
message naming it (tests/adversarial/hostile_files.py attacks it); split
up, the checks would lose the one place that lists them against the
format.
"""
from __future__ import annotations

import json
import math
import os
import stat
import struct
import tempfile

import numpy as np

from . import _files, _resume
from . import layers as _layers
from . import losses as _losses
from . import optim as _optim
from ._ext.engine import Kind
from .history import History
from .program import plan

MAGIC = b"FASTBP\x00\x01"
FORMAT = "fastbp-model"
VERSION = 2
#: versions this reader accepts (version 1: no fit settings, and the
#: optimizer state held only the slots its settings used)
READS = (1, 2)
#: largest header a reader accepts (and a writer writes)
MAX_HEADER_BYTES = 16 * 1024 * 1024
#: longest integer literal accepted in a header: the largest integers a
#: header holds are the 128-bit PCG64 state words (39 digits).  Seeds are
#: bounded alike (numpy's own SeedSequence entropy is 128 bits), which keeps
#: both parsing and seeding from a hostile header fast.
_MAX_INT_DIGITS = 40
#: most layers, and most entries of a history column
_MAX_LAYERS = 10_000
_MAX_HISTORY = 1_000_000
#: most JSON arrays and objects in a header (a real one has a few per layer
#: and per metric): bounds the memory that parsing a hostile header can take
_MAX_CONTAINERS = 100_000
#: bound on counts and sizes that end up in C integers
_INT64_BOUND = 2 ** 63
_PREFIX = struct.Struct("<8sQ")
_ARRAY_DTYPES = {"float32": "<f4", "float64": "<f8"}
_HEADER_KEYS = ("format", "version", "dtype", "n_features", "seed", "layers", "optimizer",
                "history", "shuffle_rng_state", "dropout_state", "position", "last_loss",
                "fit_settings", "arrays")
_HEADER_KEYS_V1 = tuple(k for k in _HEADER_KEYS if k != "fit_settings")
_POSITION_KEYS = ("epoch", "batch", "rng_state", "loss_sum", "n_samples", "batch_size",
                  "shuffle")


class ModelFormatError(ValueError):
    """A file is not a valid fastbp model file (bad magic, truncated,
    malformed or inconsistent header, wrong array sizes, non-finite
    parameters, unsupported version...)."""


# -- small checks -------------------------------------------------------------
def _fail(message):
    raise ModelFormatError(message)


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _int_in(x, lo, hi, where):
    """x must be an int (not a bool) with lo <= x < hi (hi None: no bound)."""
    if not _is_int(x):
        _fail(f"{where} must be an integer, got {_describe(x)}")
    if x < lo or (hi is not None and x >= hi):
        bound = f">= {lo}" if hi is None else f"in [{_short(lo)}, {_short(hi)})"
        _fail(f"{where} must be {bound}, got {_short(x)}")
    return x


def _describe(x):
    if isinstance(x, _LongInteger):
        return repr(x)
    return f"{type(x).__name__} {_short(x)}"


def _short(x):
    if _is_int(x) and x.bit_length() > 200:
        return f"<integer of {x.bit_length()} bits>"
    try:
        text = repr(x)
    except (ValueError, RecursionError):  # huge integers inside, deep nesting
        return f"<{type(x).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _object(obj, keys, where):
    """obj must be a dict with exactly ``keys``."""
    if not isinstance(obj, dict):
        _fail(f"{where} must be a JSON object, got {_describe(obj)}")
    missing = [k for k in keys if k not in obj]
    if missing:
        _fail(f"{where} lacks {', '.join(map(repr, missing))}")
    extra = [k for k in obj if k not in keys]
    if extra:
        _fail(f"{where} has unknown key(s) {_short(extra)}")
    return obj


def _list(obj, where, max_len=None):
    if not isinstance(obj, list):
        _fail(f"{where} must be a JSON array, got {_describe(obj)}")
    if max_len is not None and len(obj) > max_len:
        _fail(f"{where} has {len(obj)} entries, at most {max_len} allowed")
    return obj


# -- JSON ---------------------------------------------------------------------
def _unique_keys(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {_short(key)}")
        out[key] = value
    return out


class _LongInteger:
    """What the parser makes of an integer literal of more than
    ``_MAX_INT_DIGITS`` digits: not an int, so the check of the field that
    holds it fails and names the field."""

    def __init__(self, digits):
        self.digits = digits

    def __repr__(self):
        return f"<integer literal of {self.digits} digits, at most {_MAX_INT_DIGITS} allowed>"


def _parse_int(text):
    # Bounded before conversion: int() of a huge literal is quadratic, and
    # SeedSequence of a huge seed slow.
    digits = len(text) - text.startswith("-")
    return _LongInteger(digits) if digits > _MAX_INT_DIGITS else int(text)


def _parse_header(raw):
    # Counted on the bytes (brackets inside strings too): cheap, and a bound.
    if raw.count(b"[") + raw.count(b"{") > _MAX_CONTAINERS:
        _fail(f"header has more than {_MAX_CONTAINERS} JSON arrays and objects")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        _fail(f"header is not UTF-8: {exc}")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_int=_parse_int)
    except RecursionError:
        _fail("header JSON is nested too deeply")
    except ValueError as exc:  # JSONDecodeError, duplicate keys, huge integers
        _fail(f"header is not valid JSON: {exc}")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} {_short(value)} in a model file")


# -- header validation --------------------------------------------------------
def _check_rng_state(obj, where):
    obj = _object(obj, ("bit_generator", "state", "has_uint32", "uinteger"), where)
    if obj["bit_generator"] != "PCG64":
        _fail(f"{where}.bit_generator must be 'PCG64', got {_describe(obj['bit_generator'])}")
    inner = _object(obj["state"], ("state", "inc"), f"{where}.state")
    _int_in(inner["state"], 0, 2 ** 128, f"{where}.state.state")
    _int_in(inner["inc"], 0, 2 ** 128, f"{where}.state.inc")
    _int_in(obj["has_uint32"], 0, 2, f"{where}.has_uint32")
    _int_in(obj["uinteger"], 0, 2 ** 32, f"{where}.uinteger")
    state = {"bit_generator": "PCG64", "state": {"state": inner["state"], "inc": inner["inc"]},
             "has_uint32": obj["has_uint32"], "uinteger": obj["uinteger"]}
    try:
        np.random.PCG64(0).state = state  # numpy's own checks, on a scratch generator
    except (ValueError, TypeError, OverflowError) as exc:
        _fail(f"{where} is not a valid PCG64 state: {exc}")
    return state


def _check_seed(seed):
    if seed is None:
        return None
    if _is_int(seed):
        return _int_in(seed, 0, None, "seed")
    if isinstance(seed, list):
        _list(seed, "seed", max_len=1024)
        if not seed:
            _fail("seed must not be an empty list")
        return [_int_in(s, 0, None, f"seed[{i}]") for i, s in enumerate(seed)]
    _fail(f"seed must be null, a non-negative integer or a list of them, got {_describe(seed)}")


def _check_layer(config, i):
    where = f"layers[{i}]"
    if not isinstance(config, dict):
        _fail(f"{where} must be a JSON object, got {_describe(config)}")
    kind = config.get("type")
    if not isinstance(kind, str) or kind not in _layers.LAYERS:
        _fail(f"{where}.type must be one of {sorted(_layers.LAYERS)}, got {_short(kind)}")
    if kind == "Dropout":
        _object(config, ("type", "rate"), where)
        rate = config["rate"]
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            _fail(f"{where}.rate must be a number in [0, 1), got {_describe(rate)}")
    if kind == "BatchNorm":
        _object(config, ("type", "momentum", "eps", "trainable"), where)
    if kind in ("ResidualBegin", "ResidualEnd"):
        _object(config, ("type",), where)
    if kind == "Dense":
        _object(config, ("type", "units", "activation", "kernel_init", "trainable",
                         "kernel_regularizer", "activity_regularizer", "dropconnect"), where)
        for field in ("kernel_regularizer", "activity_regularizer"):
            reg = config[field]
            if reg is None:
                continue
            reg = _object(reg, ("l1", "l2"), f"{where}.{field}")
            for key in ("l1", "l2"):
                v = reg[key]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
                    _fail(f"{where}.{field}.{key} must be a number >= 0, got {_describe(v)}")
        _int_in(config["units"], 1, _INT64_BOUND, f"{where}.units")
        if config["activation"] is not None and not isinstance(config["activation"], str):
            _fail(f"{where}.activation must be a string, got {_describe(config['activation'])}")
        if not isinstance(config["kernel_init"], str):
            _fail(f"{where}.kernel_init must be a string, got {_describe(config['kernel_init'])}")
        if not isinstance(config["trainable"], bool):
            _fail(f"{where}.trainable must be true or false, got {_describe(config['trainable'])}")
    for key, value in config.items():
        if key in ("kernel_regularizer", "activity_regularizer"):
            continue  # checked above
        if not (value is None or isinstance(value, (str, bool, int, float))):
            _fail(f"{where}.{key} must be a JSON scalar, got {_describe(value)}")
    try:
        return _layers.from_config(config)
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        _fail(f"{where} is not a valid layer configuration: {exc}")


def _check_optimizer(obj, version, dtype):
    keys = ("class", "config", "t") + (("extra",) if version >= 2 else ())
    obj = _object(obj, keys, "optimizer")
    name = obj["class"]
    if not isinstance(name, str):
        _fail(f"optimizer.class must be a string, got {_describe(name)}")
    cls = _optim.OPTIMIZERS.get(name.lower())
    if cls is None or cls.__name__ != name:
        known = ", ".join(c.__name__ for c in _optim.OPTIMIZERS.values())
        _fail(f"unknown optimizer class {_short(name)}; known: {known}")
    config = obj["config"]
    if not isinstance(config, dict):
        _fail(f"optimizer.config must be a JSON object, got {_describe(config)}")
    for key, value in config.items():
        ok = isinstance(value, (bool, int, float)) or (
            isinstance(value, list) and len(value) <= 16 and all(_is_number(v) for v in value))
        if not ok:
            _fail(f"optimizer.config.{key} must be a number, a boolean or a short list of "
                  f"numbers, got {_describe(value)}")
    try:
        opt = cls(**config)
        opt.check_hyperparameters(dtype)  # as fit checks them: valid, and within dtype's range
    except (ValueError, TypeError, OverflowError) as exc:
        _fail(f"optimizer.config is not valid for {name}: {exc}")
    state = opt.state_dict()  # a new optimizer's: the keys of its extra integers
    state["t"] = _int_in(obj["t"], 0, _optim.MAX_STEPS, "optimizer.t")
    if version >= 2:
        extra = _object(obj["extra"], tuple(state["extra"]), "optimizer.extra")
        # each is the step count at which a state vector was created: at most t + 1
        state["extra"] = {key: _int_in(value, 0, state["t"] + 2, f"optimizer.extra.{key}")
                          for key, value in extra.items()}
    _load_optimizer_state(opt, state, "optimizer")
    return opt


def _load_optimizer_state(opt, state, where):
    """``opt.load_state_dict(state)``, its refusal a ModelFormatError."""
    try:
        opt.load_state_dict(state)
    except ValueError as exc:
        _fail(f"{where}: {exc}")


def _v1_slots(opt):
    """State slots a version 1 file holds: only those the settings used, in
    the order of today's slots (which start with them)."""
    if isinstance(opt, _optim.SGD):
        return 1 if opt.momentum != 0 else 0
    if isinstance(opt, _optim.Adam):
        return 3 if opt.amsgrad else 2
    if isinstance(opt, _optim.RMSprop):
        return 3 if opt.momentum > 0 else (2 if opt.centered else 1)
    return len(opt.slot_names)


def _v1_extra(opt, has_state):
    """What version 1 files left implicit: SGD's buffer was created at step 1."""
    if isinstance(opt, _optim.SGD):
        return {"momentum_start": 1 if has_state and opt.momentum != 0 and opt.t >= 1 else 0}
    return {}


_FIT_SETTINGS = tuple(_resume.DEFAULTS) + (_resume.WEIGHTED,)


def _positive_or_null(value, where):
    """None, or a finite number > 0 as a float (as fit records it)."""
    if value is None:
        return None
    try:
        number = float(value) if _is_number(value) else math.nan
    except OverflowError:
        number = math.nan
    if not 0 < number < math.inf:
        _fail(f"{where} must be null or a finite number > 0, got {_describe(value)}")
    return number


def _check_fit_settings(obj, last_loss):
    """The settings of the last fit (see fastbp._resume): those known (all,
    unless the model came from a version 1 file), or null."""
    if obj is None:
        return None
    if not isinstance(obj, dict):
        _fail(f"fit_settings must be a JSON object or null, got {_describe(obj)}")
    extra = [k for k in obj if k not in _FIT_SETTINGS]
    if extra:
        _fail(f"fit_settings has unknown key(s) {_short(extra)}")
    if "loss" in obj and (obj["loss"] not in _losses.LOSSES or obj["loss"] != last_loss):
        _fail(f"fit_settings.loss must be last_loss ({_short(last_loss)}), got "
              f"{_describe(obj['loss'])}")
    if obj.get("batch_size") is not None:
        _int_in(obj["batch_size"], 1, _INT64_BOUND, "fit_settings.batch_size")
    for key in ("shuffle", "grad_norms", _resume.WEIGHTED):
        if key in obj and not isinstance(obj[key], bool):
            _fail(f"fit_settings.{key} must be true or false, got {_describe(obj[key])}")
    obj = dict(obj)
    for key in ("clip_value", "clip_norm"):
        if key in obj:
            obj[key] = _positive_or_null(obj[key], f"fit_settings.{key}")
    if "on_divergence" in obj and obj["on_divergence"] not in ("raise", "warn"):
        _fail(f"fit_settings.on_divergence must be 'raise' or 'warn', got "
              f"{_describe(obj['on_divergence'])}")
    return dict(obj)


def _v1_fit_settings(last_loss, position):
    """What a version 1 file tells of its last fit: the loss, and the batch
    size and shuffling of an unfinished epoch."""
    settings = {} if last_loss is None else {"loss": last_loss}
    if position is not None:
        settings.update(batch_size=position["batch_size"], shuffle=position["shuffle"])
    return settings or None


def _check_history(obj):
    obj = _object(obj, ("epoch", "history", "stop_reason"), "history")
    hist = History()
    for i, e in enumerate(_list(obj["epoch"], "history.epoch", max_len=_MAX_HISTORY)):
        hist.epoch.append(_int_in(e, -_INT64_BOUND, _INT64_BOUND, f"history.epoch[{i}]"))
    metrics = obj["history"]
    if not isinstance(metrics, dict):
        _fail(f"history.history must be a JSON object, got {_describe(metrics)}")
    for key, values in metrics.items():
        _list(values, f"history.history[{_short(key)}]", max_len=_MAX_HISTORY)
        for i, v in enumerate(values):
            if not _is_number(v):
                _fail(f"history.history[{_short(key)}][{i}] must be a number, got {_describe(v)}")
        hist.history[key] = list(values)
    reason = obj["stop_reason"]
    if reason is not None and not isinstance(reason, str):
        _fail(f"history.stop_reason must be a string or null, got {_describe(reason)}")
    hist.stop_reason = reason
    return hist


def _check_position(obj):
    obj = _object(obj, _POSITION_KEYS, "position")
    n = _int_in(obj["n_samples"], 1, _INT64_BOUND, "position.n_samples")
    batch_size = _int_in(obj["batch_size"], 1, n + 1, "position.batch_size")
    n_batches = -(-n // batch_size)
    loss_sum = obj["loss_sum"]
    # a sum of batch losses times batch sizes: every loss and penalty is >= 0
    if not _is_number(loss_sum) or not 0 <= loss_sum < float("inf"):
        _fail(f"position.loss_sum must be a finite number >= 0, got {_describe(loss_sum)}")
    if not isinstance(obj["shuffle"], bool):
        _fail(f"position.shuffle must be true or false, got {_describe(obj['shuffle'])}")
    return {"epoch": _int_in(obj["epoch"], 1, _INT64_BOUND, "position.epoch"),
            "batch": _int_in(obj["batch"], 0, n_batches, "position.batch"),
            "rng_state": _check_rng_state(obj["rng_state"], "position.rng_state"),
            "loss_sum": float(loss_sum), "n_samples": n, "batch_size": batch_size,
            "shuffle": obj["shuffle"]}


def _check_header(header):
    """Validate a parsed header; return what load needs (no array data)."""
    if not isinstance(header, dict):
        _fail(f"header must be a JSON object, got {type(header).__name__}")
    if header.get("format") != FORMAT:
        _fail(f"header.format must be {FORMAT!r}, got {_short(header.get('format'))}")
    version = header.get("version")
    if not _is_int(version):
        _fail(f"header.version must be an integer, got {_describe(version)}")
    if version not in READS:
        _fail(f"unsupported model file version {_short(version)} (this fastbp reads "
              f"versions {', '.join(map(str, READS))}; a newer fastbp may read it)")
    _object(header, _HEADER_KEYS if version >= 2 else _HEADER_KEYS_V1, "header")

    dtype = header["dtype"]
    if not isinstance(dtype, str) or dtype not in _ARRAY_DTYPES:
        _fail(f"dtype must be 'float32' or 'float64', got {_describe(dtype)}")
    n_features = header["n_features"]
    if n_features is not None:
        _int_in(n_features, 1, _INT64_BOUND, "n_features")
    seed = _check_seed(header["seed"])
    layer_configs = _list(header["layers"], "layers", max_len=_MAX_LAYERS)
    if not layer_configs:
        _fail("layers is empty: a model has at least one layer")
    layers = [_check_layer(c, i) for i, c in enumerate(layer_configs)]
    opt = None
    if header["optimizer"] is not None:
        opt = _check_optimizer(header["optimizer"], version, dtype)
    history = _check_history(header["history"])
    last_loss = header["last_loss"]
    if last_loss is not None and last_loss not in _losses.LOSSES:
        _fail(f"last_loss must be null or one of {_losses.LOSSES}, got {_describe(last_loss)}")
    if version >= 2:
        fit_settings = _check_fit_settings(header["fit_settings"], last_loss)

    # Arrays: names, dtypes and shapes, all fixed by the rest of the header.
    expected = []
    rng_state = position = None
    if n_features is not None:
        try:
            _, _, sizes = plan(layers, n_features, dtype)
        except ValueError as exc:  # residual markers that do not pair up, or change the width
            _fail(f"invalid architecture: {exc}")
        n_params = sizes["n_params"]
        # the file keeps each BatchNorm's eps after its running statistics
        n_buffers = sizes["n_buffers"] + sum(l.kind == Kind.BATCHNORM for l in layers)
        expected.append(("params", (n_params,)))
        if n_buffers:
            expected.append(("buffers", (n_buffers,)))
        rng_state = _check_rng_state(header["shuffle_rng_state"], "shuffle_rng_state")
        dropout_state = _int_in(header["dropout_state"], 0, 2 ** 64, "dropout_state")
        if header["position"] is not None:
            position = _check_position(header["position"])
    else:
        dropout_state = None
        for key in ("shuffle_rng_state", "dropout_state", "position"):
            if header[key] is not None:
                _fail(f"{key} must be null for a model that was never built (n_features null)")
    if version < 2:
        fit_settings = _v1_fit_settings(last_loss, position)
    entries = _list(header["arrays"], "arrays", max_len=len(expected) + 1)
    has_state = n_features is not None and opt is not None and len(entries) == len(expected) + 1
    if has_state:
        n_slots = len(opt.slot_names) if version >= 2 else _v1_slots(opt)
        expected.append(("optimizer_state", (n_slots, n_params)))
    if opt is not None and version < 2:
        state = opt.state_dict()
        state["extra"] = _v1_extra(opt, has_state)
        _load_optimizer_state(opt, state, "optimizer")
    names = [e.get("name") if isinstance(e, dict) else None for e in entries]
    if names != [name for name, _ in expected]:
        _fail(f"arrays must be {[name for name, _ in expected]} for this header, got "
              f"{_short(names)}")
    arrays = []
    for i, (entry, (name, shape)) in enumerate(zip(entries, expected)):
        where = f"arrays[{i}] ({name})"
        _object(entry, ("name", "dtype", "shape"), where)
        if entry["dtype"] != _ARRAY_DTYPES[dtype]:
            _fail(f"{where}.dtype must be {_ARRAY_DTYPES[dtype]!r} for a {dtype} model, "
                  f"got {_describe(entry['dtype'])}")
        got = _list(entry["shape"], f"{where}.shape", max_len=len(shape))
        if len(got) != len(shape):
            _fail(f"{where}.shape must have {len(shape)} dimension(s), got {len(got)}")
        for j, d in enumerate(got):
            if not _is_int(d) or d < 0:
                _fail(f"{where}.shape[{j}] must be a non-negative integer, got {_describe(d)}")
        if tuple(got) != shape:
            _fail(f"{where}.shape is {_short(got)}, but the header implies "
                  f"{_short(list(shape))}")
        arrays.append((name, np.dtype(entry["dtype"]), shape))

    return {"dtype": dtype, "n_features": n_features, "seed": seed, "layers": layers,
            "optimizer": opt, "history": history, "rng_state": rng_state,
            "dropout_state": dropout_state,
            "position": position, "last_loss": last_loss, "fit_settings": fit_settings,
            "arrays": arrays}


# -- reading ------------------------------------------------------------------
def _read_exact(f, n, what):
    data = f.read(n)
    if len(data) != n:
        _fail(f"file ends inside the {what} ({len(data)} of {n} bytes)")
    return data


def _read_array(f, dtype, shape, what):
    arr = np.empty(shape, dtype=dtype)
    view = memoryview(arr.reshape(-1)).cast("B")
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            _fail(f"file ends inside {what} ({got} of {len(view)} bytes)")
        got += n
    return arr


def _load(f, size):
    if size < _PREFIX.size:
        if _read_exact(f, min(size, len(MAGIC)), "magic") != MAGIC[:min(size, len(MAGIC))]:
            _fail("not a fastbp model file (bad magic bytes)")
        _fail(f"file too short ({size} bytes) to be a fastbp model file")
    magic, header_len = _PREFIX.unpack(_read_exact(f, _PREFIX.size, "file prefix"))
    if magic != MAGIC:
        _fail("not a fastbp model file (bad magic bytes)")
    if header_len > MAX_HEADER_BYTES:
        _fail(f"header length {header_len} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if header_len > size - _PREFIX.size:
        _fail(f"header length {header_len} runs past the end of the file ({size} bytes)")
    spec = _check_header(_parse_header(_read_exact(f, header_len, "header")))

    remaining = size - _PREFIX.size - header_len
    total = 0
    for name, dtype, shape in spec["arrays"]:
        nbytes = dtype.itemsize
        for d in shape:  # Python ints: no overflow, and bounded at every step
            nbytes *= d
            if nbytes > remaining:
                _fail(f"array {name} of shape {_short(list(shape))} needs more bytes than the file "
                      f"holds after the header ({remaining})")
        total += nbytes
    if total != remaining:
        _fail(f"the arrays take {total} bytes but {remaining} bytes follow the header "
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
        _load_optimizer_state(opt, state, "optimizer_state")
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
            _fail("not a regular file")
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                _fail("not a regular file")
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
    raise ValueError(f"cannot save a model whose seed is {type(seed).__name__} {_short(seed)} "
                     "(use None, an int or a list of ints)")


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
        "arrays": [{"name": name, "dtype": _ARRAY_DTYPES[dtype], "shape": list(a.shape)}
                   for name, a in arrays],
    }
    raw = json.dumps(header, separators=(",", ":"), default=_json_default).encode("utf-8")
    if len(raw) > MAX_HEADER_BYTES:
        raise ValueError(f"cannot save: the header would take {len(raw)} bytes, more than "
                         f"the {MAX_HEADER_BYTES} a reader accepts (a very long history?)")
    # Never write a file that load would refuse: check the header as load does.
    try:
        _check_header(_parse_header(raw))
    except ModelFormatError as exc:
        raise ValueError(f"cannot save this model: {exc}") from None
    le = np.dtype(_ARRAY_DTYPES[dtype])
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


def write(state, path):
    """Write a model state (``Sequential._state``'s form) to ``path``
    atomically; the errors are ``fastbp.io.save_model``'s."""
    raw, arrays = _encode(state)
    target, st = _files.target(path, "a model file")
    directory = os.path.dirname(target)
    mode = _new_file_mode() if st is None else stat.S_IMODE(st.st_mode)
    try:
        tmp = tempfile.NamedTemporaryFile(mode="wb", dir=directory, delete=False,
                                          prefix="." + os.path.basename(target)[:100] + ".",
                                          suffix=".tmp")
    except OSError as exc:
        raise _files.folder_error(exc, directory, "a model file") from None
    try:
        with tmp:
            if hasattr(os, "fchmod"):
                os.fchmod(tmp.fileno(), mode)
            tmp.write(_PREFIX.pack(MAGIC, len(raw)))
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
