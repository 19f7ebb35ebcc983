"""What a model file's header may hold, checked: the format's constants, the
bounded JSON parser and a check of every field of the header (its type,
range, and consistency with the others, each failure a ``ModelFormatError``
naming the field), giving the layers, optimizer and sizes the arrays after
it must have.  ``fastbp._format`` reads and writes the bytes around it;
the format itself is described in ``fastbp.io``'s docstring.  Files may be
hostile: tests/adversarial/hostile_files.py attacks this module.  It is
the one place that lists every check against the format's fields.

Size: about 510 lines: a check for every field of the header, kept in one
module so that what a file may hold is read (and attacked) in one place.
"""
from __future__ import annotations

import json
import math
import struct

import numpy as np

from . import _resume
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
PREFIX = struct.Struct("<8sQ")
ARRAY_DTYPES = {"float32": "<f4", "float64": "<f8"}
_HEADER_KEYS = ("format", "version", "dtype", "n_features", "seed", "layers", "optimizer",
                "history", "shuffle_rng_state", "dropout_state", "position", "last_loss",
                "fit_settings", "arrays")
_HEADER_KEYS_V1 = tuple(k for k in _HEADER_KEYS if k != "fit_settings")
_POSITION_KEYS = ("epoch", "batch", "rng_state", "loss_sum", "n_samples", "batch_size",
                  "shuffle")
_POSITION_GRAD_NORM_KEYS = ("grad_norm_sums", "steps")


class ModelFormatError(ValueError):
    """A file is not a valid fastbp model file (bad magic, truncated,
    malformed or inconsistent header, wrong array sizes, non-finite
    parameters, unsupported version...)."""


# -- small checks -------------------------------------------------------------
def fail(message):
    raise ModelFormatError(message)


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _int_in(x, lo, hi, where):
    """x must be an int (not a bool) with lo <= x < hi (hi None: no bound)."""
    if not _is_int(x):
        fail(f"{where} must be an integer, got {_describe(x)}")
    if x < lo or (hi is not None and x >= hi):
        bound = f">= {lo}" if hi is None else f"in [{short(lo)}, {short(hi)})"
        fail(f"{where} must be {bound}, got {short(x)}")
    return x


def _describe(x):
    if isinstance(x, _LongInteger):
        return repr(x)
    return f"{type(x).__name__} {short(x)}"


def short(x):
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
        fail(f"{where} must be a JSON object, got {_describe(obj)}")
    missing = [k for k in keys if k not in obj]
    if missing:
        fail(f"{where} lacks {', '.join(map(repr, missing))}")
    extra = [k for k in obj if k not in keys]
    if extra:
        fail(f"{where} has unknown key(s) {short(extra)}")
    return obj


def _list(obj, where, max_len=None):
    if not isinstance(obj, list):
        fail(f"{where} must be a JSON array, got {_describe(obj)}")
    if max_len is not None and len(obj) > max_len:
        fail(f"{where} has {len(obj)} entries, at most {max_len} allowed")
    return obj


# -- JSON ---------------------------------------------------------------------
def _unique_keys(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {short(key)}")
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


def parse_header(raw):
    # Counted on the bytes (brackets inside strings too): cheap, and a bound.
    if raw.count(b"[") + raw.count(b"{") > _MAX_CONTAINERS:
        fail(f"header has more than {_MAX_CONTAINERS} JSON arrays and objects")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        fail(f"header is not UTF-8: {exc}")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_int=_parse_int)
    except RecursionError:
        fail("header JSON is nested too deeply")
    except ValueError as exc:  # JSONDecodeError, duplicate keys, huge integers
        fail(f"header is not valid JSON: {exc}")


# -- header validation --------------------------------------------------------
def _check_rng_state(obj, where):
    obj = _object(obj, ("bit_generator", "state", "has_uint32", "uinteger"), where)
    if obj["bit_generator"] != "PCG64":
        fail(f"{where}.bit_generator must be 'PCG64', got {_describe(obj['bit_generator'])}")
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
        fail(f"{where} is not a valid PCG64 state: {exc}")
    return state


def _check_seed(seed):
    if seed is None:
        return None
    if _is_int(seed):
        return _int_in(seed, 0, None, "seed")
    if isinstance(seed, list):
        _list(seed, "seed", max_len=1024)
        if not seed:
            fail("seed must not be an empty list")
        return [_int_in(s, 0, None, f"seed[{i}]") for i, s in enumerate(seed)]
    fail(f"seed must be null, a non-negative integer or a list of them, got {_describe(seed)}")


def _check_layer(config, i):
    where = f"layers[{i}]"
    if not isinstance(config, dict):
        fail(f"{where} must be a JSON object, got {_describe(config)}")
    kind = config.get("type")
    if not isinstance(kind, str) or kind not in _layers.LAYERS:
        fail(f"{where}.type must be one of {sorted(_layers.LAYERS)}, got {short(kind)}")
    if kind == "Dropout":
        _object(config, ("type", "rate"), where)
        rate = config["rate"]
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            fail(f"{where}.rate must be a number in [0, 1), got {_describe(rate)}")
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
                    fail(f"{where}.{field}.{key} must be a number >= 0, got {_describe(v)}")
        _int_in(config["units"], 1, _INT64_BOUND, f"{where}.units")
        if config["activation"] is not None and not isinstance(config["activation"], str):
            fail(f"{where}.activation must be a string, got {_describe(config['activation'])}")
        if not isinstance(config["kernel_init"], str):
            fail(f"{where}.kernel_init must be a string, got {_describe(config['kernel_init'])}")
        if not isinstance(config["trainable"], bool):
            fail(f"{where}.trainable must be true or false, got {_describe(config['trainable'])}")
    for key, value in config.items():
        if key in ("kernel_regularizer", "activity_regularizer"):
            continue  # checked above
        if not (value is None or isinstance(value, (str, bool, int, float))):
            fail(f"{where}.{key} must be a JSON scalar, got {_describe(value)}")
    try:
        return _layers.from_config(config)
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        fail(f"{where} is not a valid layer configuration: {exc}")


def _check_optimizer(obj, version, dtype):
    keys = ("class", "config", "t") + (("extra",) if version >= 2 else ())
    obj = _object(obj, keys, "optimizer")
    name = obj["class"]
    if not isinstance(name, str):
        fail(f"optimizer.class must be a string, got {_describe(name)}")
    cls = _optim.OPTIMIZERS.get(name.lower())
    if cls is None or cls.__name__ != name:
        known = ", ".join(c.__name__ for c in _optim.OPTIMIZERS.values())
        fail(f"unknown optimizer class {short(name)}; known: {known}")
    config = obj["config"]
    if not isinstance(config, dict):
        fail(f"optimizer.config must be a JSON object, got {_describe(config)}")
    for key, value in config.items():
        ok = isinstance(value, (bool, int, float)) or (
            isinstance(value, list) and len(value) <= 16 and all(_is_number(v) for v in value))
        if not ok:
            fail(f"optimizer.config.{key} must be a number, a boolean or a short list of "
                  f"numbers, got {_describe(value)}")
    try:
        opt = cls(**config)
        opt.check_hyperparameters(dtype)  # as fit checks them: valid, and within dtype's range
    except (ValueError, TypeError, OverflowError) as exc:
        fail(f"optimizer.config is not valid for {name}: {exc}")
    state = opt.state_dict()  # a new optimizer's: the keys of its extra integers
    state["t"] = _int_in(obj["t"], 0, _optim.MAX_STEPS, "optimizer.t")
    if version >= 2:
        extra = _object(obj["extra"], tuple(state["extra"]), "optimizer.extra")
        # each is the step count at which a state vector was created: at most t + 1
        state["extra"] = {key: _int_in(value, 0, state["t"] + 2, f"optimizer.extra.{key}")
                          for key, value in extra.items()}
    load_optimizer_state(opt, state, "optimizer")
    return opt


def load_optimizer_state(opt, state, where):
    """``opt.load_state_dict(state)``, its refusal a ModelFormatError."""
    try:
        opt.load_state_dict(state)
    except ValueError as exc:
        fail(f"{where}: {exc}")


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
        fail(f"{where} must be null or a finite number > 0, got {_describe(value)}")
    return number


def _check_fit_settings(obj, last_loss):
    """The settings of the last fit (see fastbp._resume): those known (all,
    unless the model came from a version 1 file), or null."""
    if obj is None:
        return None
    if not isinstance(obj, dict):
        fail(f"fit_settings must be a JSON object or null, got {_describe(obj)}")
    extra = [k for k in obj if k not in _FIT_SETTINGS]
    if extra:
        fail(f"fit_settings has unknown key(s) {short(extra)}")
    if "loss" in obj and (obj["loss"] not in _losses.LOSSES or obj["loss"] != last_loss):
        fail(f"fit_settings.loss must be last_loss ({short(last_loss)}), got "
              f"{_describe(obj['loss'])}")
    if obj.get("batch_size") is not None:
        _int_in(obj["batch_size"], 1, _INT64_BOUND, "fit_settings.batch_size")
    for key in ("shuffle", "grad_norms", _resume.WEIGHTED):
        if key in obj and not isinstance(obj[key], bool):
            fail(f"fit_settings.{key} must be true or false, got {_describe(obj[key])}")
    obj = dict(obj)
    for key in ("clip_value", "clip_norm"):
        if key in obj:
            obj[key] = _positive_or_null(obj[key], f"fit_settings.{key}")
    if "on_divergence" in obj and obj["on_divergence"] not in ("raise", "warn"):
        fail(f"fit_settings.on_divergence must be 'raise' or 'warn', got "
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
        fail(f"history.history must be a JSON object, got {_describe(metrics)}")
    for key, values in metrics.items():
        _list(values, f"history.history[{short(key)}]", max_len=_MAX_HISTORY)
        column = []
        for i, v in enumerate(values):
            where = f"history.history[{short(key)}][{i}]"
            if isinstance(v, list):
                # a number per layer (fit's grad_norm): one list an epoch
                _list(v, where, max_len=_MAX_LAYERS)
                if not all(_is_number(x) for x in v):
                    fail(f"{where} must be a list of numbers, got {_describe(v)}")
                column.append(list(v))
            elif _is_number(v):
                column.append(v)
            else:
                fail(f"{where} must be a number or a list of numbers, got {_describe(v)}")
        hist.history[key] = column
    reason = obj["stop_reason"]
    if reason is not None and not isinstance(reason, str):
        fail(f"history.stop_reason must be a string or null, got {_describe(reason)}")
    hist.stop_reason = reason
    return hist


def _check_position(obj):
    # with grad_norms on, also the per-layer sums and the updates so far
    optional = _POSITION_GRAD_NORM_KEYS if isinstance(obj, dict) and "steps" in obj else ()
    obj = _object(obj, _POSITION_KEYS + optional, "position")
    n = _int_in(obj["n_samples"], 1, _INT64_BOUND, "position.n_samples")
    batch_size = _int_in(obj["batch_size"], 1, n + 1, "position.batch_size")
    n_batches = -(-n // batch_size)
    loss_sum = obj["loss_sum"]
    # a sum of batch losses times batch sizes: every loss and penalty is >= 0
    if not _is_number(loss_sum) or not 0 <= loss_sum < float("inf"):
        fail(f"position.loss_sum must be a finite number >= 0, got {_describe(loss_sum)}")
    if not isinstance(obj["shuffle"], bool):
        fail(f"position.shuffle must be true or false, got {_describe(obj['shuffle'])}")
    return {"epoch": _int_in(obj["epoch"], 1, _INT64_BOUND, "position.epoch"),
            "batch": _int_in(obj["batch"], 0, n_batches, "position.batch"),
            "rng_state": _check_rng_state(obj["rng_state"], "position.rng_state"),
            "loss_sum": float(loss_sum), "n_samples": n, "batch_size": batch_size,
            "shuffle": obj["shuffle"], **_check_grad_norm_sums(obj, n_batches)}


def _check_grad_norm_sums(obj, n_batches):
    if "steps" not in obj:
        return {}
    sums = _list(obj["grad_norm_sums"], "position.grad_norm_sums", max_len=_MAX_LAYERS)
    for i, v in enumerate(sums):
        if not _is_number(v) or not 0 <= v < float("inf"):
            fail(f"position.grad_norm_sums[{i}] must be a finite number >= 0, got "
                 f"{_describe(v)}")
    return {"grad_norm_sums": [float(v) for v in sums],
            "steps": _int_in(obj["steps"], 0, n_batches + 1, "position.steps")}


def check_header(header):
    """Validate a parsed header; return what load needs (no array data)."""
    if not isinstance(header, dict):
        fail(f"header must be a JSON object, got {type(header).__name__}")
    if header.get("format") != FORMAT:
        fail(f"header.format must be {FORMAT!r}, got {short(header.get('format'))}")
    version = header.get("version")
    if not _is_int(version):
        fail(f"header.version must be an integer, got {_describe(version)}")
    if version not in READS:
        fail(f"unsupported model file version {short(version)} (this fastbp reads "
              f"versions {', '.join(map(str, READS))}; a newer fastbp may read it)")
    _object(header, _HEADER_KEYS if version >= 2 else _HEADER_KEYS_V1, "header")

    dtype = header["dtype"]
    if not isinstance(dtype, str) or dtype not in ARRAY_DTYPES:
        fail(f"dtype must be 'float32' or 'float64', got {_describe(dtype)}")
    n_features = header["n_features"]
    if n_features is not None:
        _int_in(n_features, 1, _INT64_BOUND, "n_features")
    seed = _check_seed(header["seed"])
    layer_configs = _list(header["layers"], "layers", max_len=_MAX_LAYERS)
    if not layer_configs:
        fail("layers is empty: a model has at least one layer")
    layers = [_check_layer(c, i) for i, c in enumerate(layer_configs)]
    opt = None
    if header["optimizer"] is not None:
        opt = _check_optimizer(header["optimizer"], version, dtype)
    history = _check_history(header["history"])
    last_loss = header["last_loss"]
    if last_loss is not None and last_loss not in _losses.LOSSES:
        fail(f"last_loss must be null or one of {_losses.LOSSES}, got {_describe(last_loss)}")
    if version >= 2:
        fit_settings = _check_fit_settings(header["fit_settings"], last_loss)

    # Arrays: names, dtypes and shapes, all fixed by the rest of the header.
    expected = []
    rng_state = position = None
    if n_features is not None:
        try:
            _, _, sizes = plan(layers, n_features, dtype)
        except ValueError as exc:  # residual markers that do not pair up or change the
            # width, or a width or feature count beyond the kernels
            fail(f"invalid architecture: {exc}")
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
                fail(f"{key} must be null for a model that was never built (n_features null)")
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
        load_optimizer_state(opt, state, "optimizer")
    names = [e.get("name") if isinstance(e, dict) else None for e in entries]
    if names != [name for name, _ in expected]:
        fail(f"arrays must be {[name for name, _ in expected]} for this header, got "
              f"{short(names)}")
    arrays = []
    for i, (entry, (name, shape)) in enumerate(zip(entries, expected)):
        where = f"arrays[{i}] ({name})"
        _object(entry, ("name", "dtype", "shape"), where)
        if entry["dtype"] != ARRAY_DTYPES[dtype]:
            fail(f"{where}.dtype must be {ARRAY_DTYPES[dtype]!r} for a {dtype} model, "
                  f"got {_describe(entry['dtype'])}")
        got = _list(entry["shape"], f"{where}.shape", max_len=len(shape))
        if len(got) != len(shape):
            fail(f"{where}.shape must have {len(shape)} dimension(s), got {len(got)}")
        for j, d in enumerate(got):
            if not _is_int(d) or d < 0:
                fail(f"{where}.shape[{j}] must be a non-negative integer, got {_describe(d)}")
        if tuple(got) != shape:
            fail(f"{where}.shape is {short(got)}, but the header implies "
                  f"{short(list(shape))}")
        arrays.append((name, np.dtype(entry["dtype"]), shape))

    return {"dtype": dtype, "n_features": n_features, "seed": seed, "layers": layers,
            "optimizer": opt, "history": history, "rng_state": rng_state,
            "dropout_state": dropout_state,
            "position": position, "last_loss": last_loss, "fit_settings": fit_settings,
            "arrays": arrays}
