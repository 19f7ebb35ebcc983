"""Input checks.  Everything here runs before compiled code sees the data,
raises ValueError naming the problem, and never modifies what it was given
(conversions copy; already-valid arrays are passed through read-only use)."""
import numbers
import os
import sys

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


def _is_sparse(a):
    """Whether ``a`` is a scipy.sparse matrix or array (without importing
    scipy.sparse for the dense inputs that are the usual case)."""
    return hasattr(a, "tocsr") and hasattr(a, "nnz")


def _as_numeric(a, name, hint=""):
    """``a`` as a real-valued ndarray (not yet of the model's dtype).
    ``hint`` ends the message when ``a`` is not numeric (strings)."""
    if _is_sparse(a):
        raise ValueError(f"{name} is a scipy.sparse matrix; only X (fit's, predict's, "
                         f"evaluate's) may be sparse: pass {name}.toarray()")
    if hasattr(a, "__array__") or isinstance(a, (list, tuple)):
        try:
            arr = np.asarray(a)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{name} could not be converted to an array: {exc}") from None
    else:
        raise ValueError(f"{name} must be an array-like, got {type(a).__name__}")
    if arr.dtype.kind == "c":
        raise ValueError(f"{name} is complex ({arr.dtype}); only real numbers are accepted")
    if arr.dtype.kind == "O":
        return _object_as_float(arr, name, hint)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}{hint}")
    return arr


def _object_as_float(arr, name, hint=""):
    """An object array (pandas' nullable columns with pd.NA become one) as
    float64: missing values and non-numbers are named, numbers accepted as
    scikit-learn's check_array accepts them."""
    flat = arr.reshape(-1)
    missing = _missing(flat)
    if missing.any():
        at = np.unravel_index(int(np.argmax(missing)), arr.shape)
        raise ValueError(f"{name} contains missing values (None, NaN or pd.NA; first at index "
                         f"{tuple(int(i) for i in at)}): impute or drop them first")
    for i, v in enumerate(flat):
        if not _is_real(v):
            at = tuple(int(j) for j in np.unravel_index(i, arr.shape))
            raise ValueError(f"{name} must be numeric, got dtype object holding {v!r} "
                             f"({type(v).__name__}) at index {at}{hint}")
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            return arr.astype(np.float64)
    except OverflowError:  # a Python int beyond float64 (10**400)
        at = next(i for i, v in enumerate(flat) if abs(v) > sys.float_info.max)
        at = tuple(int(j) for j in np.unravel_index(at, arr.shape))
        raise ValueError(f"{name} holds an integer at index {at} beyond the range of float64 "
                         "(magnitude at most 1.79769e+308): scale it") from None


def _is_real(v):
    return (isinstance(v, (numbers.Real, np.bool_))
            or isinstance(v, np.number) and not isinstance(v, np.complexfloating))


def _missing(flat):
    """Mask of missing values (None, NaN, pd.NA, NaT) in a 1-D object array."""
    pd = sys.modules.get("pandas")  # only objects pandas made can be pd.NA
    if pd is not None:
        return np.asarray(pd.isna(flat), dtype=bool)
    return np.array([v is None or (isinstance(v, float) and v != v) for v in flat], dtype=bool)


#: elements per np.isfinite pass of _first_nonfinite: its temporary (a
#: byte an element) stays this small whatever the array's size
_FINITE_CHUNK = 1 << 18


def _first_nonfinite(arr):
    """Index (tuple) of the first NaN or infinity in a float array, or None."""
    if arr.flags.c_contiguous:
        # np.isfinite a chunk at a time into one small buffer: half the time
        # of a sum over float32 (numpy's pairwise sum is not vectorized
        # there), and no temporary the size of the array.
        flat = arr.reshape(-1)
        buf = np.empty(min(flat.size, _FINITE_CHUNK), dtype=bool)
        for start in range(0, flat.size, _FINITE_CHUNK):
            part = flat[start:start + _FINITE_CHUNK]
            finite = np.isfinite(part, out=buf[:part.size])
            if not finite.all():
                at = start + int(np.argmin(finite))
                return tuple(int(i) for i in np.unravel_index(at, arr.shape))
        return None
    # Strided: a sum is one pass with no temporary, and NaN and inf propagate
    # into it.  Only when it is not finite (which huge finite values can also
    # cause, more often in float32, where it is summed without a cast) is the
    # exact elementwise test run.
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.add.reduce(arr, axis=None)
    if np.isfinite(total):
        return None
    bad = ~np.isfinite(arr)
    if not bad.any():
        return None
    return tuple(int(i) for i in np.argwhere(bad)[0])


def _check_finite(arr, name):
    """ValueError if a float array holds NaN or infinity."""
    if arr.dtype.kind != "f":
        return
    at = _first_nonfinite(arr)
    if at is not None:
        raise ValueError(f"{name} contains NaN or infinity (first at index {at})")


def to_dtype(arr, dtype, name):
    """``arr`` (a real ndarray) as a C-contiguous array of ``dtype``, refusing
    NaN, infinity, and finite values that overflow ``dtype`` (a float64 1e39
    becomes inf in float32): checked after the conversion, with a message
    naming the array and the dtype's range."""
    dtype = np.dtype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(arr, dtype=dtype)
    at = _first_nonfinite(out)
    if at is None:
        return out
    value = arr[at]
    if np.isfinite(value):
        hint = "use dtype='float64' or scale it" if dtype == np.float32 else "scale it"
        raise ValueError(f"{name} holds {float(value):.6g} at index {at}, beyond the range of "
                         f"the model's {dtype.name} (magnitude at most "
                         f"{float(np.finfo(dtype).max):.6g}): {hint}")
    raise ValueError(f"{name} contains NaN or infinity (first at index {at})")


def check_values(a, shape, dtype, name):
    """``a`` (numeric, of ``shape``) as a C-contiguous array of ``dtype``,
    finite in that dtype (see ``to_dtype``)."""
    arr = _as_numeric(a, name)
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {arr.shape}")
    return to_dtype(arr, dtype, name)


def check_X(X, dtype, n_features=None, name="X", accept_sparse=False):
    """Return X as a C-contiguous (n, d) array of ``dtype``; with
    ``accept_sparse``, a scipy.sparse X as a CSR matrix (``check_sparse_X``)."""
    if accept_sparse and _is_sparse(X):
        return check_sparse_X(X, dtype, n_features, name)
    arr = _as_numeric(X, name)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_features), got shape {arr.shape}"
                         f"{_reshape_hint(arr, n_features, name)}")
    _check_matrix_shape(arr.shape, n_features, name)
    return to_dtype(arr, dtype, name)


def _reshape_hint(arr, n_features, name):
    """How a 1-D X becomes 2-D: one sample (a row) when the model takes as
    many features as it has values, one feature (a column) when it takes
    one; both ways while the model's width is not known yet (unbuilt)."""
    if arr.ndim != 1:
        return ""
    one_sample = f"{name}.reshape(1, -1)"
    one_feature = f"{name}.reshape(-1, 1)"
    if n_features is None:
        return f" (use {one_feature} if it holds one feature, {one_sample} if it is one sample)"
    if n_features == 1:
        return f" (use {one_feature}: the model takes one feature)"
    if arr.shape[0] == n_features:
        return f" (use {one_sample} for one sample of the model's {n_features} features)"
    return f" (the model takes {n_features} features a sample)"


def _check_matrix_shape(shape, n_features, name):
    if shape[0] == 0:
        raise ValueError(f"{name} is empty: it has 0 samples")
    if shape[1] == 0:
        raise ValueError(f"{name} has 0 features")
    if n_features is not None and shape[1] != n_features:
        raise ValueError(f"{name} has {shape[1]} features, but the model expects {n_features}")


def check_sparse_X(X, dtype, n_features=None, name="X"):
    """A scipy.sparse X (CSR, CSC, COO or any other format) as a CSR matrix
    of ``dtype`` in canonical form (sorted indices, no duplicate entries),
    every value finite in ``dtype``.

    Never a dense copy: the result takes the memory of the non-zeros.  A
    canonical CSR matrix of ``dtype`` is returned as it is; otherwise the
    values (and, to make it canonical, the indices) are new arrays: the
    user's matrix is never changed.
    """
    import scipy.sparse

    shape = tuple(X.shape)
    if len(shape) != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_features), got a sparse array of "
                         f"shape {shape}")
    _check_matrix_shape(shape, n_features, name)
    kind = np.dtype(X.dtype).kind
    if kind == "c":
        raise ValueError(f"{name} is complex ({X.dtype}); only real numbers are accepted")
    if kind not in "biuf":
        raise ValueError(f"{name} must be numeric, got a sparse matrix of dtype {X.dtype}")
    triplets = _stored_triplets(X)
    if triplets is not None:
        csr = _canonical_as_toarray(*triplets, shape)
    else:
        csr = X.tocsr()  # a CSR input itself (no copy)
    with np.errstate(over="ignore", invalid="ignore"):
        data = csr.data.astype(dtype, copy=False)
    _check_sparse_values(csr, data, dtype, name)
    if data is csr.data:
        return csr
    # new values; the index arrays are only read (by fit and predict)
    return scipy.sparse.csr_matrix((data, csr.indices, csr.indptr), shape=shape)


def _stored_triplets(X):
    """(rows, cols, values) of X's stored entries in the order ``toarray``
    adds them (CSR: row by row, CSC: column by column, COO: as stored), for
    a matrix that may hold duplicate entries or unsorted indices; None for
    one in canonical form (or a format that holds neither)."""
    fmt = getattr(X, "format", None)
    if fmt not in ("csr", "csc", "coo") or X.has_canonical_format:
        return None
    if fmt == "coo":
        return np.asarray(X.row), np.asarray(X.col), np.asarray(X.data)
    major = np.repeat(np.arange(len(X.indptr) - 1), np.diff(X.indptr))
    minor = np.asarray(X.indices)
    values = np.asarray(X.data)[:X.indptr[-1]]
    return (major, minor, values) if fmt == "csr" else (minor, major, values)


def _canonical_as_toarray(rows, cols, values, shape):
    """A canonical CSR matrix (sorted indices, no duplicates) whose entries
    are bitwise those of ``toarray``: duplicates added in toarray's order,
    from 0, in the matrix's own dtype (so a float32 sum may overflow and an
    int8 one wrap around, as there), then converted once.  scipy's own
    sum_duplicates sorts them first (its order differs), and summing in
    float64 differed from toarray in the last bit, in overflow and in
    double rounding."""
    import scipy.sparse

    n_rows, n_cols = shape
    key = rows.astype(np.int64) * n_cols + cols.astype(np.int64)
    order = np.argsort(key, kind="stable")   # duplicates stay in toarray's order
    unique, inverse = np.unique(key[order], return_inverse=True)
    sums = np.zeros(unique.size, dtype=values.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        np.add.at(sums, inverse, values[order])   # in order, one at a time
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(unique // n_cols, minlength=n_rows), out=indptr[1:])
    csr = scipy.sparse.csr_matrix((sums, unique % n_cols, indptr), shape=shape)
    csr.has_canonical_format = True
    return csr


def _check_sparse_values(csr, data, dtype, name):
    """ValueError naming (row, column) of the first stored value of ``csr``
    that is NaN or infinite, or finite but beyond ``dtype`` (``data``:
    csr.data converted to ``dtype``)."""
    at = _first_nonfinite(data)
    if at is None:
        return
    k = at[0]
    row = int(np.searchsorted(csr.indptr, k, side="right")) - 1
    where = (row, int(csr.indices[k]))
    value = csr.data[k]
    if np.isfinite(value):
        hint = "use dtype='float64' or scale it" if dtype == np.float32 else "scale it"
        raise ValueError(f"{name} holds {float(value):.6g} at index {where}, beyond the range of "
                         f"the model's {np.dtype(dtype).name} (magnitude at most "
                         f"{float(np.finfo(dtype).max):.6g}): {hint}")
    raise ValueError(f"{name} contains NaN or infinity (first at index {where})")


def _probability_tolerance(source, dtype):
    """How far a row of class probabilities may sum from 1: the square root
    of the larger machine epsilon of the targets' and the model's dtype
    (scikit-learn's log_loss check), so rows rounded to either dtype pass
    and unnormalized scores do not."""
    eps = np.finfo(dtype).eps
    if source.kind == "f":
        eps = max(eps, np.finfo(source).eps)
    return float(np.sqrt(eps))


def check_targets(y, loss, n_samples, n_outputs, dtype, name="y", name_x="X"):
    """Return targets as a C-contiguous (n, n_outputs) array of ``dtype``.

    For ``cross_entropy`` a 1-D ``y`` holds integer class labels in
    [0, n_outputs) and is one-hot encoded; a 2-D ``y`` holds class
    probabilities: non-negative, each row summing to 1 (see
    ``_probability_tolerance``).  For the other losses a 1-D ``y`` is one
    output column.
    """
    arr = _as_numeric(y, name, hint=_LABELS_HINT)
    if arr.shape[:1] != (n_samples,):
        raise ValueError(f"{name} has {arr.shape[0] if arr.ndim else 0} samples, {name_x} has "
                         f"{n_samples}")
    if loss == "cross_entropy" and arr.ndim == 1:
        return _one_hot(arr, n_outputs, dtype, name)
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2 or arr.shape[1] != n_outputs:
        raise ValueError(f"{name} must have shape ({n_samples}, {n_outputs}) to match the model's "
                         f"{n_outputs} outputs, got {np.shape(y)}"
                         + _labels_with_a_regression_loss(arr, loss, n_outputs, name))
    out = to_dtype(arr, dtype, name)
    if loss == "binary_cross_entropy" and (out.min() < 0 or out.max() > 1):
        raise ValueError(f"{name}: binary_cross_entropy targets must lie in [0, 1]")
    if loss == "cross_entropy":
        _check_probabilities(out, _probability_tolerance(arr.dtype, dtype), name)
    return out


#: the end of the message for targets that are not numbers (strings)
_LABELS_HINT = (": class labels must be integers 0 .. n_classes - 1 for loss='cross_entropy'; "
                "encode them with sklearn.preprocessing.LabelEncoder, or use "
                "fastbp.MLPClassifier, which takes labels of any type")


def _labels_with_a_regression_loss(arr, loss, n_outputs, name):
    """The end of the shape error when one column of non-negative integers
    (class labels, by the look of them) met a loss that wants one target
    column per output, as with fit's default loss="mse"."""
    if loss == "cross_entropy" or arr.ndim != 2 or arr.shape[1] != 1 or n_outputs < 2:
        return ""
    labels = arr[:, 0]
    if labels.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            if not (np.isfinite(labels).all() and np.all(labels == np.round(labels))):
                return ""
    if labels.dtype.kind not in "biuf" or labels.min() < 0:
        return ""
    return (f"; {name} looks like class labels (integers from {float(labels.min()):g} to "
            f"{float(labels.max()):g}), which loss={loss!r} does not take: pass loss='cross_entropy' "
            f"to train a classifier over the model's {n_outputs} outputs, or use "
            "fastbp.MLPClassifier (MLPRegressor for regression)")


def _one_hot(labels, n_outputs, dtype, name):
    _check_finite(labels, name)
    if labels.dtype.kind == "f" and not np.all(labels == np.round(labels)):
        raise ValueError(f"{name}: cross_entropy labels must be integers, got non-integer values")
    lo, hi = labels.min(), labels.max()  # before the cast: 1e30 must not wrap around
    if lo < 0 or hi >= n_outputs:
        raise ValueError(
            f"{name}: class labels must be in [0, {n_outputs - 1}] for a model with "
            f"{n_outputs} outputs, got labels from {lo} to {hi}")
    # Rows of the identity, taken by label: one pass (5x faster than
    # assigning ones through a fancy index, which a small fit paid per call).
    return np.eye(n_outputs, dtype=dtype).take(labels.astype(np.int64), axis=0)


def _check_probabilities(Y, tol, name):
    if Y.min() < 0:
        raise ValueError(f"{name}: cross_entropy target probabilities must be non-negative")
    sums = Y.sum(axis=1, dtype=np.float64)
    off = np.abs(sums - 1) > tol
    if off.any():
        row = int(np.argmax(off))
        raise ValueError(
            f"{name}: each row of cross_entropy target probabilities must sum to 1 (within "
            f"{tol:.2g}), but row {row} sums to {sums[row]:.8g}; normalize the rows "
            f"({name} / {name}.sum(axis=1, keepdims=True)) or pass integer class labels")


def check_sample_weight(sample_weight, n_samples, dtype):
    """Sample weights as a C-contiguous (n,) array of ``dtype`` (ones if None):
    finite in ``dtype``, non-negative, not all zero, with a finite sum."""
    if sample_weight is None:
        return np.ones(n_samples, dtype=dtype)
    w = _as_numeric(sample_weight, "sample_weight")
    if w.shape != (n_samples,):
        raise ValueError(f"sample_weight must have shape ({n_samples},), got {w.shape}")
    out = to_dtype(w, dtype, "sample_weight")
    if (out < 0).any():
        raise ValueError("sample_weight must be non-negative")
    with np.errstate(over="ignore"):
        total = out.sum(dtype=np.float64)
    if not total > 0:
        raise ValueError("sample_weight must not be all zero")
    if not np.isfinite(total):
        raise ValueError("sample_weight sums to more than float64 can hold: scale the weights "
                         "down (only their ratios matter)")
    return out


#: the most rows, columns or depth a product of the compiled kernels takes:
#: they index them with C ints, as BLAS does (a batch's rows, a layer's
#: width, the number of features).
MAX_DIM = 2 ** 31 - 1


def check_kernel_dim(value, what, fix):
    """ValueError naming ``what`` and ``fix`` when ``value`` is more than
    the kernels take (``MAX_DIM``, read at call time); else ``value``."""
    if value > MAX_DIM:
        raise ValueError(f"{what} is {value}, more than fastbp's kernels take (2**31 - 1); "
                         f"{fix}")
    return value


#: the largest ``n_threads`` accepted (the kernels take a C int); larger
#: counts than the CPUs this process may run on are treated as that many.
MAX_THREADS = 2 ** 31 - 1


def available_cpus():
    """CPUs this process may run on (its affinity mask where the platform
    has one, else all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_n_threads(n_threads):
    """None, or ``n_threads`` (an integer in [1, MAX_THREADS]) capped at
    ``available_cpus()``: more threads than CPUs only add hand-offs and
    threads that stay, and the results are the same on any count."""
    if n_threads is None:
        return None
    if isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer)) \
            or not 1 <= n_threads <= MAX_THREADS:
        raise ValueError(f"n_threads must be None or an integer from 1 to {MAX_THREADS}, "
                         f"got {n_threads!r}")
    return min(int(n_threads), available_cpus())


#: the largest count accepted (epochs, sizes): the program table and the
#: step counters are int64
MAX_COUNT = 2 ** 63 - 1


def check_positive_int(value, name, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value > MAX_COUNT:
        raise ValueError(f"{name} must be a positive integer up to 2**63 - 1, got {value!r}")
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
