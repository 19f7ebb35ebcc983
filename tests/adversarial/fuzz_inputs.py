"""Fuzz fastbp's public entry points with hostile inputs (issue 13).

Thousands of generated trials against ``Sequential.fit``, ``predict``,
``predict_proba``, ``evaluate``, ``loss_and_grad``, ``set_params``,
``set_weights``, Levenberg-Marquardt and the scikit-learn estimators, with
inputs of every shape (empty, one row, 1-D, 3-D), dtype (object, complex,
bool, str, bytes, datetime, int, uint64, float16, longdouble), container
(lists, pandas with NA, sparse, read-only and strided arrays) and value (NaN,
inf, beyond float32's range, subnormal, huge/zero/negative sample weights,
labels out of range, probabilities that do not sum to 1), and with odd
hyperparameters (n_threads, batch_size, epochs, loss, clipping, optimizers).

A trial passes when the call returns a finite result of the right shape, or
raises ValueError (TypeError where Python's conventions want it, counted
apart) with a message.  Counted apart as passes too: DivergenceError (a
reported numeric failure, not a silent one); for the estimators, an
exception scikit-learn's own estimator raises on the same call (the drop-in
matches it), and a float32 estimator's non-finite prediction where
scikit-learn's float64 twin predicts beyond float32's range.  Failures: any other exception, a
NaN/inf result without an error, a wrong shape, an input mutated, a crash
(the worker process dies) or a hang (it times out).

Trials run in batches, each in a worker subprocess with a timeout; a worker
that dies or hangs is replaced and the trial it was running is charged with
it.  Every trial is generated from (seed, index), so any one can be rerun::

    python tests/adversarial/fuzz_inputs.py --trials 3000
    python tests/adversarial/fuzz_inputs.py --only 1234 --verbose
"""
import argparse
import collections
import json
import math
import os
import subprocess
import sys
import time
import traceback

#: trials per worker process, and the seconds a worker may take for them
BATCH = 150
BATCH_TIMEOUT = 300


# -- generated inputs -------------------------------------------------------------------

def _pick(rng, options):
    """One of ``options`` (of any types: rng.choice would make an array)."""
    return options[int(rng.integers(len(options)))]


def _values(rng, shape, np, p=1.0):
    """A float64 array of ``shape``; with probability ``p`` one of the
    hostile value kinds."""
    kind = "normal" if rng.random() >= p else rng.choice(
        ["normal", "nan", "inf", "beyond32", "big", "tiny", "negzero", "bigint", "const"])
    a = rng.normal(size=shape)
    size = a.size
    if size and kind != "normal":
        at = np.unravel_index(int(rng.integers(size)), shape)
        a[at] = {"nan": np.nan, "inf": rng.choice([np.inf, -np.inf]), "beyond32": 1e39,
                 "big": 1e30, "tiny": 1e-45, "negzero": -0.0, "bigint": 2.0 ** 62,
                 "const": a[at]}[kind]
        if kind == "const":  # every value the same: a constant column
            a[...] = 1.0
    return a, kind


def _container(rng, a, np, p=1.0):
    """``a``, or with probability ``p`` ``a`` in a hostile container or dtype."""
    import pandas as pd
    import scipy.sparse as sparse

    if rng.random() >= p:
        return a, "c"
    kind = rng.choice(["c", "f", "strided", "readonly", "list", "tuple", "float32", "float16",
                       "longdouble", "int8", "int64", "uint64", "bool", "complex", "object",
                       "object_na", "object_bigint", "str", "bytes", "datetime", "frame",
                       "frame_na", "sparse", "scalar", "none", "string", "dict"])
    if kind == "f":
        return np.asfortranarray(a), kind
    if kind == "strided":
        big = np.repeat(a, 2, axis=-1) if a.ndim else a
        return (big[..., ::2] if a.ndim else big), kind
    if kind == "readonly":
        b = a.copy()
        b.setflags(write=False)
        return b, kind
    if kind == "list":
        return a.tolist(), kind
    if kind == "tuple":
        return tuple(a.tolist()) if a.ndim else a.tolist(), kind
    if kind in ("float32", "float16", "longdouble", "int8", "int64", "uint64", "bool",
                "complex"):
        with np.errstate(all="ignore"):
            return a.astype({"longdouble": np.longdouble, "complex": np.complex128}.get(
                kind, kind)), kind
    if kind == "object":
        return a.astype(object), kind
    if kind == "object_bigint":  # a Python int beyond float64
        b = a.astype(object)
        if b.size:
            b.reshape(-1)[int(rng.integers(b.size))] = 10 ** 400
        return b, kind
    if kind == "object_na":
        b = a.astype(object)
        if b.size:
            b.reshape(-1)[int(rng.integers(b.size))] = _pick(rng, [None, pd.NA])
        return b, kind
    if kind == "str":
        return a.astype(str), kind
    if kind == "bytes":
        return a.astype("S8"), kind
    if kind == "datetime":
        return np.zeros(a.shape, dtype="datetime64[s]"), kind
    if kind in ("frame", "frame_na") and a.ndim == 2:
        f = pd.DataFrame(a, columns=[f"c{j}" for j in range(a.shape[1])])
        if kind == "frame_na" and a.size:
            f = f.astype("Float64")
            f.iat[int(rng.integers(a.shape[0])), int(rng.integers(a.shape[1]))] = pd.NA
        return f, kind
    if kind in ("frame", "frame_na") and a.ndim == 1:
        s = pd.Series(a)
        if kind == "frame_na" and a.size:
            s = s.astype("Float64")
            s.iat[int(rng.integers(a.size))] = pd.NA
        return s, kind
    if kind == "sparse" and a.ndim == 2:
        return sparse.csr_matrix(a), kind
    if kind == "scalar":
        return float(a.reshape(-1)[0]) if a.size else 1.0, kind
    if kind == "none":
        return None, kind
    if kind == "string":
        return "not an array", kind
    if kind == "dict":
        return {"X": a}, kind
    return a, "c"


def _odd_int(rng, good, np, huge=True):
    """A hyperparameter that should be a positive int: good or hostile
    (``huge``: also counts too large to run, which must be refused or capped)."""
    return _pick(rng, [good, good, good, 0, -1, 2.5, "8", True, None, np.int64(good),
                       np.uint8(good), float("nan"), [good], 2 ** 64, -2 ** 64]
                 + ([2 ** 31, 2 ** 63] if huge else []))


def _model(rng, dtype, n_out, fastbp, np):
    layers = [fastbp.Dense(int(rng.integers(1, 6)),
                           activation=str(rng.choice(["relu", "tanh", "sigmoid", "identity",
                                                      "elu", "softplus", "leaky_relu"])))]
    if rng.random() < 0.15:
        layers.append(fastbp.Dropout(0.3))
    if rng.random() < 0.1:
        layers.append(fastbp.BatchNorm())
    layers.append(fastbp.Dense(n_out))
    return fastbp.Sequential(layers, dtype=dtype, seed=int(rng.integers(1000)))


def _targets(rng, loss, n, k, np, p=1.0):
    """Targets for loss: valid, or with probability ``p`` hostile ones."""
    choice = "valid" if rng.random() >= p else rng.choice(
        ["valid", "labels_out", "labels_neg", "labels_float", "probs_unnormalized",
         "probs_valid", "wrong_len", "values", "two_d_wrong"])
    if choice == "valid":
        if loss == "cross_entropy":
            return rng.integers(0, k, n), choice
        if loss == "binary_cross_entropy":
            return rng.integers(0, 2, (n, k)).astype(float), choice
        return rng.normal(size=(n, k)) if k > 1 else rng.normal(size=n), choice
    if choice == "labels_out":
        return rng.integers(k, k + 3, n), choice
    if choice == "labels_neg":
        return -rng.integers(1, 3, n), choice
    if choice == "labels_float":
        return rng.random(n) * k, choice
    if choice == "probs_unnormalized":
        return rng.random((n, k)) * 2, choice
    if choice == "probs_valid":
        p = rng.random((n, k)) + 1e-3
        return p / p.sum(axis=1, keepdims=True), choice
    if choice == "wrong_len":
        return rng.integers(0, k, n + 1), choice
    if choice == "two_d_wrong":
        return rng.normal(size=(n, k + 1)), choice
    values, kind = _values(rng, (n, k), np)
    return values, "values_" + kind


def _shapes(rng, p):
    """(n, d, kind): rows, features, and 2-D or (with probability p/3) 1-D or 3-D."""
    n = int(rng.choice([0, 1, 2, 3, 7, 16, 40] if rng.random() < p else [1, 2, 3, 7, 16, 40]))
    d = int(rng.choice([0, 1, 3, 3, 3] if rng.random() < p else [1, 3, 3]))
    shape = rng.choice(["1d", "3d"]) if rng.random() < p / 3 else "2d"
    return n, d, shape


def _sample_weight(rng, n, np, p=1.0):
    choice = "none" if rng.random() >= p else rng.choice(
        ["ones", "zeros", "some_zero", "half_zero", "negative", "huge30", "huge38", "beyond32",
         "nan", "inf", "wrong_len", "two_d", "tiny", "int", "list"])
    w = {"none": None, "ones": np.ones(n), "zeros": np.zeros(n),
         "some_zero": np.where(rng.random(n) < 0.3, 0.0, 1.0),
         "half_zero": np.tile([1.0, 0.0], n)[:n], "negative": -np.ones(n),
         "huge30": np.full(n, 1e30), "huge38": np.full(n, 3e38), "beyond32": np.full(n, 1e39),
         "nan": np.full(n, np.nan), "inf": np.full(n, np.inf), "wrong_len": np.ones(n + 2),
         "two_d": np.ones((n, 1)), "tiny": np.full(n, 1e-45),
         "int": np.arange(n) % 3, "list": [1.0] * n}[choice]
    return w, choice


def make_trial(seed, index):
    """(description, function to call, arguments to watch, result check)."""
    import numpy as np

    import fastbp
    from fastbp.optim import LevenbergMarquardt

    rng = np.random.default_rng([seed, index])
    target = rng.choice(["fit"] * 6 + ["predict"] * 3 + ["predict_proba", "evaluate",
                                                         "evaluate", "loss_and_grad",
                                                         "loss_and_grad", "set_params",
                                                         "set_weights", "lm", "classifier",
                                                         "classifier", "regressor",
                                                         "regressor"])
    # How hostile this trial is: each input is hostile with probability p,
    # so that valid calls reach deep into training as well.
    p = float(rng.choice([0.1, 0.3, 0.6]))
    n, d, shape = _shapes(rng, p)
    X_shape = (n, d) if shape == "2d" else (n,) if shape == "1d" else (n, d, 2)
    X_values, X_kind = _values(rng, X_shape, np, p)
    X, X_box = _container(rng, X_values, np, p)
    dtype = str(rng.choice(["float32", "float64"]))
    desc = {"target": str(target), "p": p, "n": n, "d": d, "X": f"{shape}/{X_kind}/{X_box}",
            "dtype": dtype}

    if target in ("classifier", "regressor"):
        return _estimator_trial(rng, target, X, X_values, n, desc, np, fastbp, p)

    loss = str(rng.choice(["mse"] * 3 + ["cross_entropy"] * 3 + ["binary_cross_entropy",
                                                                   "hinge", "MSE"]))
    if target == "lm":
        loss = "mse"
    k = int(rng.integers(1, 4))
    if loss == "cross_entropy":
        k = max(k, 2)
    y, y_kind = _targets(rng, loss, n, k, np, p)
    if rng.random() < p / 2:
        y, box = _container(rng, np.asarray(y, dtype=float), np)
        y_kind += "/" + box
    w, w_kind = _sample_weight(rng, n, np, p)
    desc.update(loss=loss, k=k, y=y_kind, w=w_kind)
    net = _model(rng, dtype, k, fastbp, np)
    prebuilt = d > 0 and rng.random() < 0.8
    if prebuilt:
        net.build(d)
    desc["built"] = bool(prebuilt)

    if target == "fit" or target == "lm":
        kwargs = {"loss": loss, "verbose": 0, "sample_weight": w,
                  "epochs": _odd_int(rng, int(rng.integers(1, 3)), np, huge=False),
                  "batch_size": _odd_int(rng, int(rng.choice([1, 2, 4, 32])), np)}
        if rng.random() < 0.3:
            kwargs["n_threads"] = _pick(rng, [None, 1, 2, 1000, 0, 2 ** 31, 2 ** 64, 1.0, "2",
                                              True, np.int64(2)])
        if rng.random() < 0.2:
            kwargs["clip_norm"] = _pick(rng, [1.0, 0.0, -1.0, float("nan"), float("inf"), "1"])
        if rng.random() < 0.2:
            kwargs["shuffle"] = bool(rng.random() < 0.5)
        if rng.random() < 0.15:
            vX, _ = _values(rng, (int(rng.integers(1, 5)), max(d, 1)), np)
            kwargs["validation_data"] = _pick(rng, [(vX, rng.integers(0, k, vX.shape[0])),
                                                    (vX,), None, "data"])
        if target == "lm":
            kwargs["optimizer"] = LevenbergMarquardt()
            kwargs.pop("batch_size")
        else:
            kwargs["optimizer"] = _pick(rng, [None, "adam", "sgd", fastbp.optim.SGD(
                lr=float(rng.choice([1e-2, 10.0, 1e30]))), fastbp.optim.Adam(lr=1e-2)])
        desc.update({key: repr(v)[:40] for key, v in kwargs.items()
                     if key in ("epochs", "batch_size", "n_threads", "clip_norm", "optimizer")})

        def call():
            return net.fit(X, y, **kwargs)

        def check(result):
            _require(result is net.history, "fit did not return the history")
            _require(np.isfinite(net.params).all(), "non-finite parameters")
            for key, values in net.history.history.items():
                if key in ("loss", "val_loss", "grad_norm"):
                    _require(np.isfinite(np.asarray(values, dtype=float)).all(),
                             f"non-finite {key} in the history")
        return desc, call, [X, y, w], check

    if target in ("predict", "predict_proba"):
        if not prebuilt:
            net.build(max(d, 1))
        proba_loss = str(rng.choice(["cross_entropy", "binary_cross_entropy", "mse"]))

        def call():
            if target == "predict":
                return net.predict(X)
            return net.predict_proba(X, loss=proba_loss)

        def check(result):
            _require(isinstance(result, np.ndarray), "not an ndarray")
            _require(result.shape == (np.shape(X_values)[0], k), f"shape {result.shape}")
            _require(result.dtype == net.dtype, f"dtype {result.dtype}")
            _require(np.isfinite(result).all(), "non-finite output")
        return desc, call, [X], check

    if target in ("evaluate", "loss_and_grad"):
        if not prebuilt:
            net.build(max(d, 1))

        def call():
            if target == "evaluate":
                return net.evaluate(X, y, loss=loss, sample_weight=w)
            return net.loss_and_grad(X, y, loss=loss, sample_weight=w)

        def check(result):
            value = result if target == "evaluate" else result[0]
            _require(isinstance(value, float) and math.isfinite(value), f"loss {value!r}")
            if target == "loss_and_grad":
                _require(result[1].shape == (net.n_params,), "gradient shape")
                _require(np.isfinite(result[1]).all(), "non-finite gradient")
        return desc, call, [X, y, w], check

    net.build(max(d, 1))
    before = net.params.copy()
    if target == "set_params":
        values, kind = _values(rng, (net.n_params + int(rng.choice([0, 0, 0, 1])),), np)
        arg, box = _container(rng, values, np)
        desc["params"] = f"{kind}/{box}"

        def call():
            return net.set_params(arg)
    else:
        weights = net.get_weights()
        i = int(rng.integers(len(weights)))
        values, kind = _values(rng, weights[i][0].shape, np)
        arg_W, box = _container(rng, values, np)
        weights[i] = (arg_W, weights[i][1])
        if rng.random() < 0.1:
            weights = weights[:-1]
        if rng.random() < 0.05:
            weights[0] = 3
        arg = weights
        desc["weights"] = f"{kind}/{box}"

        def call():
            return net.set_weights(arg)

    def check(result):
        _require(np.isfinite(net.params).all(), "non-finite parameters accepted")

    def failed_cleanly():
        return np.array_equal(net.params, before)
    check.on_error = failed_cleanly
    return desc, call, [arg], check


def _estimator_trial(rng, target, X, X_values, n, desc, np, fastbp, p):
    cls = fastbp.MLPClassifier if target == "classifier" else fastbp.MLPRegressor
    params = {"hidden_layer_sizes": (int(rng.integers(1, 5)),), "max_iter": 3,
              "random_state": 0, "solver": str(rng.choice(["adam", "sgd", "lbfgs"])),
              "dtype": _pick(rng, [None, "float32", "float64"]),
              "batch_size": _odd_int(rng, int(rng.choice([1, 4, 200])), np)}
    if params["batch_size"] is None:
        params["batch_size"] = "auto"
    if rng.random() < 0.3:
        params["n_threads"] = _pick(rng, [None, 1, 1000, 0, 2 ** 31, 2 ** 64, "2", 1.5])
    if rng.random() < 0.2:
        params["learning_rate_init"] = float(rng.choice([1e-3, 1e3, 1e30]))
    if target == "classifier":
        y_choice = "labels" if rng.random() >= p else rng.choice(
            ["labels", "strings", "one_class", "floats", "nan"])
        y = {"labels": rng.integers(0, 3, n), "strings": rng.choice(["a", "b"], n),
             "one_class": np.zeros(n, dtype=int), "floats": rng.random(n),
             "nan": np.where(rng.random(n) < 0.5, np.nan, 1.0)}[y_choice]
    else:
        values, kind = _values(rng, (n,), np, p)
        y, y_choice = values, "values_" + kind
    w, w_kind = _sample_weight(rng, n, np, p)
    est = cls(**params)
    desc.update({"y": str(y_choice), "w": w_kind,
                 **{key: repr(v)[:30] for key, v in params.items()}})

    def call():
        with _quiet():
            est.fit(X, y, sample_weight=w)
            return est.predict(X)

    def check(result):
        for a in est.coefs_ + est.intercepts_:
            _require(np.isfinite(a).all(), "non-finite coefficients")
        _require(np.shape(result)[0] == np.shape(X_values)[0], f"shape {np.shape(result)}")
        if target == "regressor":
            _require(np.isfinite(result).all(), "non-finite prediction")

    def sklearn_twin():
        """scikit-learn's own estimator on the same call: its predictions,
        or the exception it raises (the drop-in must match it)."""
        from sklearn import neural_network

        twin = getattr(neural_network, cls.__name__)(**{
            key: v for key, v in params.items() if key not in ("dtype", "n_threads")})
        with _quiet():
            twin.fit(X, y, sample_weight=w)
            return twin.predict(X)
    check.sklearn_twin = sklearn_twin
    return desc, call, [X, y, w], check


class _quiet:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


class _Bad(Exception):
    """A result that breaks the contract."""


def _require(condition, what):
    if not condition:
        raise _Bad(what)


# -- mutation -------------------------------------------------------------------------

def _snapshot(obj):
    import copy

    import numpy as np
    if isinstance(obj, np.ndarray):
        return ("ndarray", obj.dtype, obj.shape, obj.flags.writeable, obj.copy())
    try:
        return ("other", copy.deepcopy(obj))
    except Exception:  # an object that cannot be copied: not checked
        return ("skip", None)


def _unchanged(obj, snap):
    if snap[0] == "skip":
        return True
    if snap[0] == "ndarray":
        _, dtype, shape, writeable, copy = snap
        if obj.dtype != dtype or obj.shape != shape or obj.flags.writeable != writeable:
            return False
        if obj.dtype == object:
            return repr(obj.tolist()) == repr(copy.tolist())
        return obj.tobytes() == copy.tobytes()
    before = snap[1]
    if hasattr(obj, "equals"):  # pandas: values, and the dtypes of the columns
        return bool(obj.equals(before)) and str(obj.dtypes) == str(before.dtypes)
    if hasattr(obj, "nnz"):  # scipy.sparse (NaN != NaN: compare the bytes)
        return obj.dtype == before.dtype and obj.shape == before.shape and \
            obj.toarray().tobytes() == before.toarray().tobytes()
    return repr(obj) == repr(before)


# -- one trial, in the worker ---------------------------------------------------------

def run_trial(seed, index):
    """Outcome of one trial: (kind, detail, description)."""
    import numpy as np

    import fastbp
    try:
        desc, call, watched, check = make_trial(seed, index)
    except Exception as exc:  # the generator itself: a bug here, reported as such
        return "generator_error", f"{type(exc).__name__}: {exc}", {}
    snaps = [_snapshot(a) for a in watched]
    kind, detail = "ok", ""
    try:
        with np.errstate(all="ignore"):
            result = call()
        check(result)
    except _Bad as exc:
        kind, detail = "bad_result", str(exc)
        if "non-finite prediction" in detail and _twin_overflows_float32(check, desc):
            kind = "float32_overflow"
    except fastbp.DivergenceError as exc:
        kind, detail = "divergence", str(exc)[:200]
    except ValueError as exc:
        kind, detail = ("value_error", str(exc)[:200]) if str(exc).strip() else \
            ("empty_message", type(exc).__name__)
        if not getattr(check, "on_error", lambda: True)():
            kind, detail = "changed_on_error", str(exc)[:200]
    except TypeError as exc:
        kind, detail = ("type_error", str(exc)[:200]) if str(exc).strip() else \
            ("empty_message", "TypeError")
    except Exception as exc:
        kind = "exception:" + type(exc).__name__
        detail = (str(exc)[:200] + " | " +
                  traceback.format_exc().strip().splitlines()[-3].strip())[:400]
        if _twin_raises(check, type(exc)):
            kind = "sklearn_same"
    try:
        mutated = [i for i, (a, s) in enumerate(zip(watched, snaps)) if not _unchanged(a, s)]
    except Exception as exc:  # the checker itself
        return "checker_error", f"{type(exc).__name__}: {exc}", desc
    if mutated:
        kind, detail = "mutated_input", f"arguments {mutated} changed ({detail})"
    return kind, detail, desc


def _twin_raises(check, kind):
    """True if scikit-learn's own estimator raises ``kind`` on the call."""
    twin = getattr(check, "sklearn_twin", None)
    if twin is None:
        return False
    try:
        twin()
    except kind:
        return True
    except Exception:
        return False
    return False


def _twin_overflows_float32(check, desc):
    """True for a float32 estimator whose scikit-learn twin (float64)
    predicts values beyond float32's range: the overflow is the dtype's."""
    import numpy as np
    twin = getattr(check, "sklearn_twin", None)
    if twin is None or "float32" not in desc.get("dtype", "") + desc.get("X", ""):
        return False
    try:
        pred = np.asarray(twin(), dtype=np.float64)
    except Exception:
        return False
    return bool((~np.isfinite(pred) | (np.abs(pred) > np.finfo(np.float32).max)).any())


def _worker(seed, start, count):
    for i in range(start, start + count):
        print(f"START {i}", flush=True)
        kind, detail, desc = run_trial(seed, i)
        print("RESULT " + json.dumps({"i": i, "kind": kind, "detail": detail,
                                      "desc": {k: str(v) for k, v in desc.items()}}),
              flush=True)


# -- the parent -----------------------------------------------------------------------

#: outcomes that pass: a finite result, a ValueError (or TypeError) with a
#: message, a reported divergence, an exception scikit-learn's own
#: estimator raises too, and a float32 estimator's prediction that
#: overflows where scikit-learn's float64 one exceeds float32's range
PASS = ("ok", "value_error", "type_error", "divergence", "sklearn_same", "float32_overflow")


def _run_batch(seed, start, count, timeout, python):
    """Run trials start .. start+count-1 in workers; returns their results,
    restarting after a trial that crashes or hangs (charged to it)."""
    results = []
    while count > 0:
        cmd = [python, os.path.abspath(__file__), "--worker", "--seed", str(seed),
               "--start", str(start), "--count", str(count)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            out, rc = done.stdout, done.returncode
            err = done.stderr
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            rc, err = None, "timeout"
        started = None
        for line in out.splitlines():
            if line.startswith("START "):
                started = int(line.split()[1])
            elif line.startswith("RESULT "):
                results.append(json.loads(line[7:]))
                started = None
        finished = results[-1]["i"] + 1 if results and results[-1]["i"] >= start else start
        if rc == 0 and finished == start + count:
            break
        culprit = started if started is not None else finished
        kind = "hang" if rc is None else f"crash (exit {rc})"
        results.append({"i": culprit, "kind": kind, "detail": err[-300:], "desc": {}})
        count -= culprit + 1 - start
        start = culprit + 1
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--timeout", type=float, default=BATCH_TIMEOUT)
    parser.add_argument("--only", type=int, help="run one trial in this process and print it")
    parser.add_argument("--verbose", action="store_true", help="print every failure")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.seed, args.start, args.count)
        return 0
    if args.only is not None:
        print(json.dumps(run_trial(args.seed, args.only), indent=1, default=str))
        return 0
    began = time.perf_counter()
    results = []
    for start in range(0, args.trials, args.batch):
        results += _run_batch(args.seed, start, min(args.batch, args.trials - start),
                              args.timeout, sys.executable)
    return report(results, time.perf_counter() - began, args.verbose)


def report(results, seconds, verbose=False):
    """Print the counts; returns 0 if every trial passed, else 1."""
    kinds = collections.Counter(r["kind"] for r in results)
    failures = [r for r in results if r["kind"] not in PASS]
    print(f"trials run: {len(results)} in {seconds:.0f} s")
    print(f"passed: {len(results) - len(failures)}  (" + ", ".join(
        f"{k} {kinds[k]}" for k in PASS) + ")")
    print(f"failures: {len(failures)}")
    for kind, count in sorted(collections.Counter(r["kind"] for r in failures).items()):
        print(f"  {kind}: {count}")
    targets = collections.Counter(r["desc"].get("target", "?") for r in results)
    print("by target: " + ", ".join(f"{t} {c}" for t, c in sorted(targets.items())))
    shown = failures if verbose else failures[:15]
    for r in shown:
        print(f"  trial {r['i']}: {r['kind']}: {r['detail'][:160]}  {r['desc']}")
    divergences = [r for r in results if r["kind"] == "divergence"]
    for r in divergences[:5 if not verbose else None]:
        print(f"  (divergence) trial {r['i']}: {r['desc']}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
