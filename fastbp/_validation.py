"""Input checks.  Everything here runs before compiled code sees the data,
raises ValueError naming the problem, and never modifies what it was given
(conversions copy; already-valid arrays are passed through read-only use)."""
import numpy as np

DTYPES = ("float32", "float64")


def check_dtype(dtype):
    try:
        name = np.dtype(dtype).name
    except TypeError:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if name not in DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {name}")
    return np.dtype(name)


def _as_numeric(a, name):
    if hasattr(a, "__array__") or isinstance(a, (list, tuple)):
        try:
            arr = np.asarray(a)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{name} could not be converted to an array: {exc}") from None
    else:
        raise ValueError(f"{name} must be an array-like, got {type(a).__name__}")
    if arr.dtype.kind == "c":
        raise ValueError(f"{name} is complex ({arr.dtype}); only real numbers are accepted")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    return arr


def _check_finite(arr, name):
    if arr.dtype.kind != "f":
        return
    # A sum is one pass with no temporary: NaN and inf propagate into it.
    # Only when it is not finite (which huge finite values can also cause,
    # more often in float32, where it is summed without a cast) is the exact
    # elementwise test run.
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.add.reduce(arr, axis=None)
    if np.isfinite(total):
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"{name} contains NaN or infinity (first at index "
                         f"{tuple(int(i) for i in np.argwhere(bad)[0])})")


def check_X(X, dtype, n_features=None, name="X"):
    """Return X as a C-contiguous (n, d) array of ``dtype``."""
    arr = _as_numeric(X, name)
    if arr.ndim != 2:
        hint = " (use X.reshape(-1, 1) for a single feature)" if arr.ndim == 1 else ""
        raise ValueError(f"{name} must be 2-D (n_samples, n_features), got shape {arr.shape}{hint}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty: it has 0 samples")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has 0 features")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(f"{name} has {arr.shape[1]} features, but the model expects {n_features}")
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(arr, dtype=dtype)
    # Checking the converted array catches NaN/inf in X and float64 values
    # that overflow float32 alike.
    _check_finite(out, name)
    return out


def check_targets(y, loss, n_samples, n_outputs, dtype, name="y"):
    """Return targets as a C-contiguous (n, n_outputs) array of ``dtype``.

    For ``cross_entropy`` a 1-D ``y`` holds integer class labels in
    [0, n_outputs) and is one-hot encoded; a 2-D ``y`` holds class
    probabilities.  For the other losses a 1-D ``y`` is one output column.
    """
    arr = _as_numeric(y, name)
    if arr.shape[:1] != (n_samples,):
        raise ValueError(f"{name} has {arr.shape[0] if arr.ndim else 0} samples, X has {n_samples}")
    _check_finite(arr, name)
    if loss == "cross_entropy" and arr.ndim == 1:
        labels = arr
        if labels.dtype.kind == "f" and not np.all(labels == np.round(labels)):
            raise ValueError(f"{name}: cross_entropy labels must be integers, got non-integer values")
        labels = labels.astype(np.int64)
        lo, hi = labels.min(), labels.max()
        if lo < 0 or hi >= n_outputs:
            raise ValueError(
                f"{name}: class labels must be in [0, {n_outputs - 1}] for a model with "
                f"{n_outputs} outputs, got labels from {lo} to {hi}")
        out = np.zeros((n_samples, n_outputs), dtype=dtype)
        out[np.arange(n_samples), labels] = 1
        return out
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2 or arr.shape[1] != n_outputs:
        raise ValueError(f"{name} must have shape ({n_samples}, {n_outputs}) to match the model's "
                         f"{n_outputs} outputs, got {np.shape(y)}")
    if loss == "binary_cross_entropy" and (arr.min() < 0 or arr.max() > 1):
        raise ValueError(f"{name}: binary_cross_entropy targets must lie in [0, 1]")
    if loss == "cross_entropy" and arr.min() < 0:
        raise ValueError(f"{name}: cross_entropy target probabilities must be non-negative")
    return np.ascontiguousarray(arr, dtype=dtype)


def check_sample_weight(sample_weight, n_samples, dtype):
    """Sample weights as a C-contiguous (n,) array of ``dtype`` (ones if None)."""
    if sample_weight is None:
        return np.ones(n_samples, dtype=dtype)
    w = _as_numeric(sample_weight, "sample_weight")
    if w.shape != (n_samples,):
        raise ValueError(f"sample_weight must have shape ({n_samples},), got {w.shape}")
    _check_finite(w.astype(np.float64), "sample_weight")
    if (w < 0).any():
        raise ValueError("sample_weight must be non-negative")
    if not w.sum() > 0:
        raise ValueError("sample_weight must not be all zero")
    return np.ascontiguousarray(w, dtype=dtype)


def check_positive_int(value, name, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def resolve_name(value, what, names, aliases):
    """Canonical registry name for ``value`` (case-insensitive, aliases
    allowed); ValueError listing the known names otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {value!r}")
    name = aliases.get(value.lower(), value.lower())
    if name not in names:
        known = ", ".join(sorted(names) + sorted(aliases))
        raise ValueError(f"unknown {what} {value!r}; known: {known}")
    return name
