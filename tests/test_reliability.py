"""Reliability: training in worker processes and threads, memory over many
calls, unusual input arrays, extreme logits, and determinism across
processes.

Every comparison is against a sequential, in-process run computed in the
test itself.  Training is deterministic given the seed and the BLAS thread
count, so results are compared bitwise (``assert_array_equal``), not with a
tolerance: any difference means state leaked between concurrent runs, a
buffer was shared, or a kernel read something it should not have.
"""
import gc
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest
from joblib import Parallel, delayed

import fastbp
from fastbp import reference

from helpers import adversarial

# -- workers that child processes import by name ------------------------------
# pytest imports this file as ``tests.test_reliability``, a name that a spawned
# or loky worker cannot always import (the repository root is on sys.path only
# under ``python -m pytest``).  tests/ itself is on sys.path (pytest's
# ``pythonpath`` setting, which spawned children inherit), so the workers are
# published under the top-level name ``test_reliability``: pickle then refers
# to them by a name every child can import.
_IMPORT_NAME = "test_reliability"
sys.modules.setdefault(_IMPORT_NAME, sys.modules[__name__])


def _importable(func):
    func.__module__ = _IMPORT_NAME
    return func


SEEDS = (11, 12, 13, 14)
TIMEOUT = 120  # seconds; a hang fails the test instead of blocking the run


def _data(n=256, d=10, k=3, dtype="float64"):
    rng = np.random.default_rng(2024)
    X = rng.normal(size=(n, d)).astype(dtype)
    y = rng.integers(0, k, n)
    return X, y


@_importable
def train_params(seed, dtype="float64"):
    """Train one seeded model on fixed data; its final parameters."""
    X, y = _data(dtype=dtype)
    net = fastbp.Sequential([fastbp.Dense(16, activation="relu"), fastbp.Dense(3)],
                            dtype=dtype, seed=seed)
    net.fit(X, y, loss="cross_entropy", optimizer=fastbp.optim.Adam(lr=1e-2), epochs=5,
            batch_size=16, verbose=0)
    return net.params.copy()


def _sequential(seeds=SEEDS):
    return [train_params(s) for s in seeds]


def _assert_all_equal(got, expected):
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == e.dtype and g.shape == e.shape
        np.testing.assert_array_equal(g, e, err_msg=f"model {i} (seed {SEEDS[i]})")


@pytest.fixture(scope="module")
def expected():
    """Sequential in-process results; computing them also means the compiled
    engine, the Numba cfuncs and OpenBLAS have all run in the parent before
    any worker starts (fork copies that state)."""
    return _sequential()


# -- 1. joblib -------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["loky", "threading"])
def test_joblib_workers_match_sequential(expected, backend):
    # loky caps BLAS in its workers at cpu_count // n_jobs threads (1 here,
    # the parent has 2).  The results still agree bitwise: GEMMs of these
    # sizes (<= 16 x 16 x 16) stay below OpenBLAS's multithreading threshold,
    # so they run on one thread either way.  A mismatch here with larger
    # layers would first need the thread counts aligned (fit's n_threads).
    # The parent trains once more right here, so the kernels certainly ran.
    np.testing.assert_array_equal(train_params(SEEDS[0]), expected[0])
    got = Parallel(n_jobs=2, backend=backend, timeout=TIMEOUT)(
        delayed(train_params)(s) for s in SEEDS)
    _assert_all_equal(got, expected)


# -- 2. multiprocessing ------------------------------------------------------
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing_pool_matches_sequential(expected, method):
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"start method {method} unavailable")
    np.testing.assert_array_equal(train_params(SEEDS[0]), expected[0])
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(2) as pool:  # __exit__ terminates the workers, even on timeout
        got = pool.map_async(train_params, SEEDS).get(timeout=TIMEOUT)
    _assert_all_equal(got, expected)


# -- 3. four Python threads at once ---------------------------------------------
_THREAD_MODELS = [
    # (dtype, hidden widths, activation, n_outputs, seed)
    ("float32", (16,), "relu", 3, 21),
    ("float64", (32, 16), "tanh", 4, 22),
    ("float32", (8, 8, 8), "sigmoid", 2, 23),
    ("float64", (24,), "elu", 5, 24),
]


def _thread_job(spec):
    dtype, widths, act, k, seed = spec
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(300, 7)).astype(dtype)
    y = rng.integers(0, k, 300)
    layers = [fastbp.Dense(w, activation=act) for w in widths] + [fastbp.Dense(k)]
    net = fastbp.Sequential(layers, dtype=dtype, seed=seed)
    return net, X, y


def _thread_fit(net, X, y):
    net.fit(X, y, loss="cross_entropy", optimizer=fastbp.optim.Adam(lr=1e-2), epochs=8,
            batch_size=8, verbose=0)


def test_four_threads_mixed_dtypes_match_sequential():
    expected = []
    for spec in _THREAD_MODELS:
        net, X, y = _thread_job(spec)
        _thread_fit(net, X, y)
        expected.append((net.params.copy(), net.predict(X)))

    jobs = [_thread_job(spec) for spec in _THREAD_MODELS]
    results = [None] * len(jobs)
    errors = []
    start = threading.Barrier(len(jobs))

    def work(i):
        try:
            net, X, y = jobs[i]
            start.wait(timeout=TIMEOUT)
            _thread_fit(net, X, y)
            results[i] = (net.params.copy(), net.predict(X))
        except BaseException as exc:  # reported by the main thread
            errors.append((i, exc))

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a training thread hung"
    assert not errors, errors
    for (spec, (params, pred), (want_params, want_pred)) in zip(_THREAD_MODELS, results, expected):
        assert params.dtype == spec[0]
        np.testing.assert_array_equal(params, want_params, err_msg=str(spec))
        np.testing.assert_array_equal(pred, want_pred, err_msg=str(spec))


# -- 4. memory over many calls ----------------------------------------------------
# Bound on RSS growth over 200 calls after warm-up.  The data below are chosen
# so that every call allocates sizeable temporaries: X is float32 and the model
# float64, so each call converts X (n*d*8 = 1 MiB); labels are one-hot encoded
# per fit (n*k*8 = 96 KiB); each fit allocates its shuffle order and identity
# index (2*n*8 = 64 KiB), snapshots of params and optimizer state (~50 KiB) and
# predict allocates its output (96 KiB).  Leaking any one of these per call
# grows RSS by >= 200 * 50 KiB ~ 10 MiB, above the bound.  What may grow
# legitimately is small: the History gains 200 epoch records (~0.2 MiB), and
# malloc may keep a few freed pages (fragmentation, page granularity).
MEMORY_BOUND = 4 * 2**20
_N_MEM, _D_MEM, _K_MEM = 4096, 32, 3


def _rss():
    """Current resident set size in bytes (not the peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_setup():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(_N_MEM, _D_MEM)).astype(np.float32)
    y = rng.integers(0, _K_MEM, _N_MEM)
    net = fastbp.Sequential([fastbp.Dense(64, activation="relu"), fastbp.Dense(_K_MEM)],
                            dtype="float64", seed=3)
    return net, X, y


def _growth(call, n_calls):
    gc.collect()
    before = _rss()
    for _ in range(n_calls):
        call()
    gc.collect()
    return _rss() - before


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_rss_does_not_grow_over_200_single_epoch_fits():
    net, X, y = _memory_setup()
    opt = fastbp.optim.Adam(lr=1e-3)

    def one_epoch():
        net.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=256, verbose=0)

    _growth(one_epoch, 20)  # warm-up: workspaces, cfuncs, allocator steady state
    growth = _growth(one_epoch, 200)
    assert net.history.n_epochs == 220
    assert np.isfinite(net.params).all()
    assert growth < MEMORY_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB over 200 fits"


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
@pytest.mark.parametrize("method", ["predict", "evaluate", "loss_and_grad"])
def test_rss_does_not_grow_over_200_inference_calls(method):
    net, X, y = _memory_setup()
    net.fit(X, y, loss="cross_entropy", epochs=1, batch_size=256, verbose=0)
    calls = {
        "predict": lambda: net.predict(X),
        "evaluate": lambda: net.evaluate(X, y, loss="cross_entropy"),
        "loss_and_grad": lambda: net.loss_and_grad(X, y, loss="cross_entropy"),
    }
    _growth(calls[method], 20)
    growth = _growth(calls[method], 200)
    assert growth < MEMORY_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB over 200 {method} calls"


# -- 5. unusual input arrays -----------------------------------------------------------
def _fit_result(X, y, loss="cross_entropy", dtype="float64", seed=0, k=3):
    net = fastbp.Sequential([fastbp.Dense(12, activation="tanh"), fastbp.Dense(k)],
                            dtype=dtype, seed=seed)
    net.fit(X, y, loss=loss, optimizer=fastbp.optim.Adam(lr=1e-2), epochs=3, batch_size=16,
            verbose=0)
    return net, (net.params.copy(), net.predict(X), net.evaluate(X, y, loss=loss),
                 *net.loss_and_grad(X, y, loss=loss))


def _assert_same_results(a, b):
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_memmap_inputs_match_in_memory(tmp_path):
    X, y = _data(n=200)
    fx, fy = tmp_path / "X.dat", tmp_path / "y.dat"
    mx = np.memmap(fx, dtype=X.dtype, mode="w+", shape=X.shape)
    mx[...] = X
    my = np.memmap(fy, dtype=y.dtype, mode="w+", shape=y.shape)
    my[...] = y
    mx.flush()
    my.flush()
    del mx, my
    Xm = np.memmap(fx, dtype=X.dtype, mode="r", shape=X.shape)
    ym = np.memmap(fy, dtype=y.dtype, mode="r", shape=y.shape)
    assert not Xm.flags.writeable and not ym.flags.writeable
    _, got = _fit_result(Xm, ym)
    _, want = _fit_result(X, y)
    _assert_same_results(got, want)
    np.testing.assert_array_equal(Xm, X)
    np.testing.assert_array_equal(ym, y)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_read_only_inputs_match_writable(dtype):
    X, y = _data(n=200, dtype=dtype)
    Xr, yr = X.copy(), y.copy()
    Xr.setflags(write=False)
    yr.setflags(write=False)
    _, got = _fit_result(Xr, yr, dtype=dtype)
    _, want = _fit_result(X, y, dtype=dtype)
    _assert_same_results(got, want)
    # mse with 2-D float targets of the model's dtype: y reaches the engine as is
    Y = np.random.default_rng(1).normal(size=(200, 3)).astype(dtype)
    Yr = Y.copy()
    Yr.setflags(write=False)
    _, got = _fit_result(Xr, Yr, loss="mse", dtype=dtype)
    _, want = _fit_result(X, Y, loss="mse", dtype=dtype)
    _assert_same_results(got, want)


@pytest.mark.parametrize("layout", ["fortran", "strided", "negative_stride"])
def test_non_c_contiguous_inputs_match_contiguous_copy(layout):
    rng = np.random.default_rng(9)
    big = rng.normal(size=(400, 30))
    Ybig = rng.normal(size=(400, 9))
    if layout == "fortran":
        X, Y = np.asfortranarray(big[:200, :10]), np.asfortranarray(Ybig[:200, :3])
    elif layout == "strided":
        X, Y = big[::2, ::3], Ybig[::2, ::3]
    else:
        X, Y = big[::-2, ::-3], Ybig[::-2, ::3]
    assert not X.flags.c_contiguous and not Y.flags.c_contiguous
    assert X.shape == (200, 10) and Y.shape == (200, 3)
    Xc, Yc = np.ascontiguousarray(X), np.ascontiguousarray(Y)
    labels = np.argmax(Yc, axis=1)
    labels_strided = np.repeat(labels, 2)[::2]  # a non-contiguous 1-D label view
    for loss, yv, yc in [("mse", Y, Yc), ("cross_entropy", labels_strided, labels)]:
        _, got = _fit_result(X, yv, loss=loss)
        _, want = _fit_result(Xc, yc, loss=loss)
        _assert_same_results(got, want)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("loss", ["mse", "binary_cross_entropy", "cross_entropy"])
def test_user_arrays_are_not_modified(dtype, loss):
    """Inputs already of the model's dtype and C order reach the compiled
    code without a copy: none of fit, predict, evaluate, loss_and_grad (nor
    validation data) may write to them."""
    rng = np.random.default_rng(17)
    X = rng.normal(size=(120, 6)).astype(dtype)
    Xv = rng.normal(size=(40, 6)).astype(dtype)
    if loss == "cross_entropy":
        y = rng.random(size=(120, 3)).astype(dtype)
        y /= y.sum(axis=1, keepdims=True)  # 2-D class probabilities: passed through
        yv = rng.integers(0, 3, 40)
    elif loss == "binary_cross_entropy":
        y = rng.integers(0, 2, size=(120, 3)).astype(dtype)
        yv = rng.random(size=(40, 3)).astype(dtype)
    else:
        y = rng.normal(size=(120, 3)).astype(dtype)
        yv = rng.normal(size=(40, 3)).astype(dtype)
    arrays = [X, y, Xv, yv]
    copies = [a.copy() for a in arrays]
    net = fastbp.Sequential([fastbp.Dense(8, activation="relu"), fastbp.Dense(3)],
                            dtype=dtype, seed=0)
    net.fit(X, y, loss=loss, epochs=2, batch_size=16, verbose=0, validation_data=(Xv, yv))
    with pytest.warns(fastbp.ResumeWarning, match="batch_size=None"):   # other settings
        net.fit(X, y, loss=loss, epochs=1, batch_size=None, shuffle=False, verbose=0)
    net.predict(X)
    net.evaluate(X, y, loss=loss)
    net.loss_and_grad(X, y, loss=loss)
    net.loss_and_grad(Xv, yv, loss=loss)
    for a, c in zip(arrays, copies):
        np.testing.assert_array_equal(a, c)
        assert a.dtype == c.dtype


# -- 6. extreme logits through the model API ------------------------------------------
def _lse(Z):
    zmax = Z.max(axis=1, keepdims=True)
    return (zmax + np.log(np.exp(Z - zmax).sum(axis=1, keepdims=True)))[:, 0]


@pytest.mark.parametrize("dtype,target", [("float32", 100.0), ("float64", 1000.0)])
@pytest.mark.parametrize("loss", ["cross_entropy", "binary_cross_entropy"])
def test_extreme_logits_give_finite_loss_and_gradient(dtype, target, loss):
    rng = np.random.default_rng(31)
    n, d, k = 64, 5, 4
    X = rng.normal(size=(n, d)).astype(dtype)
    net = fastbp.Sequential([fastbp.Dense(16, activation="tanh"), fastbp.Dense(k)],
                            dtype=dtype, seed=1).build(d)
    last = net.layers[-1]
    scale = target / np.abs(net.predict(X)).max()
    last.W[...] *= scale
    last.b[...] *= scale
    Z = net.predict(X).astype(np.float64)
    assert Z.max() > 0.5 * target and Z.min() < -0.5 * target
    assert np.abs(Z).max() == pytest.approx(target, rel=1e-3)

    if loss == "cross_entropy":
        # Half the rows labelled with their smallest logit (loss ~ 2 * target,
        # softmax saturated the wrong way), half with their largest (loss ~ 0).
        y = np.where(np.arange(n) % 2 == 0, Z.argmin(axis=1), Z.argmax(axis=1))
        Y = np.eye(k, dtype=dtype)[y]
        want = np.mean(_lse(Z) - Z[np.arange(n), y])
    else:
        # targets exactly 0 and 1, with saturated logits of both signs
        y = Y = rng.integers(0, 2, size=(n, k)).astype(dtype)
        Yd = Y.astype(np.float64)
        want = np.mean(np.maximum(Z, 0) - Z * Yd + np.log1p(np.exp(-np.abs(Z))))
    params_before = net.params.copy()

    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        value, grad = net.loss_and_grad(X, y, loss=loss)
        evaluated = net.evaluate(X, y, loss=loss)

    assert np.isfinite(value) and np.isfinite(grad).all()
    assert np.abs(grad).max() > 0
    assert value == pytest.approx(want, rel=1e-5)
    assert evaluated == pytest.approx(want, rel=1e-5)
    np.testing.assert_array_equal(net.params, params_before)
    # the gradient itself, against the NumPy reference in float64
    with np.errstate(all="ignore"):
        _, grad_ref = reference.loss_grad(X.astype(np.float64), Y.astype(np.float64),
                                          net._program, params_before.astype(np.float64), loss)
    err = np.abs(grad - grad_ref).max() / max(np.abs(grad_ref).max(), 1.0)
    assert err <= (1e-5 if dtype == "float32" else 1e-10), err

    # and one epoch of training from there stays finite, with no warning
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        net.fit(X, y, loss=loss, optimizer=fastbp.optim.SGD(lr=1e-3), epochs=1, batch_size=16,
                verbose=0)
    assert np.isfinite(net.params).all() and np.isfinite(net.history["loss"][-1])


# -- 7. determinism across processes ---------------------------------------------------------
_HASH_SCRIPT = textwrap.dedent("""
    import hashlib
    import numpy as np
    import fastbp

    rng = np.random.default_rng(77)
    X = rng.normal(size=(500, 12))
    y = rng.integers(0, 4, 500)
    digests = []
    for dtype in ("float32", "float64"):
        net = fastbp.Sequential([fastbp.Dense(32, activation="relu"),
                                 fastbp.Dense(16, activation="tanh"), fastbp.Dense(4)],
                                dtype=dtype, seed=123)
        net.fit(X, y, loss="cross_entropy", optimizer=fastbp.optim.Adam(lr=1e-2), epochs=4,
                batch_size=32, verbose=0)
        digests.append(hashlib.sha256(net.params.tobytes()).hexdigest())
""")


def test_training_is_bitwise_identical_across_processes(tmp_path):
    script = _HASH_SCRIPT + "print(fastbp.__file__)\nprint(*digests)\n"
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            assert p.returncode == 0, err
            outs.append(out.split("\n"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    ns = {}
    exec(_HASH_SCRIPT, ns)
    in_process = " ".join(ns["digests"])
    for lines in outs:
        # the child imported the same installed package as this process
        assert os.path.realpath(lines[0]) == os.path.realpath(fastbp.__file__)
        assert lines[1] == in_process


# -- mini-batches whose sample weights sum to zero (issue 13, item 5) ----------------

def _zero_batch_fit(X, y, w, keep, make_net, **fit):
    """Fit with weights w (some batches all zero) and, on the rows ``keep``
    alone, an identical model: the rule is that a zero-weight batch changes
    nothing, so the two must agree bitwise (weights, step count, history)."""
    results = []
    for Xi, yi, wi in ((X, y, w), (X[keep], y[keep], None)):
        net = make_net()
        opt = fastbp.optim.Adam(lr=1e-2)
        net.fit(Xi, yi, optimizer=opt, sample_weight=wi, verbose=0, **fit)
        results.append((net.params.copy(), opt.t, net.history["loss"], net._dropout_rng.copy()))
    return results


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_zero_weight_batch_contributes_nothing(dtype):
    """A batch whose weights are all zero used to end training with a
    DivergenceError (0/0 loss).  Now it is skipped: no forward pass (the
    dropout stream does not move, BatchNorm statistics do not change), no
    update, no optimizer step, loss term 0 with weight 0 in the epoch mean."""
    X, y = _data(n=40, dtype=dtype)
    w = np.ones(40)
    w[8:16] = 0  # batch 2 of 5
    keep = w > 0

    def make_net():
        return fastbp.Sequential([fastbp.Dense(8, activation="relu"), fastbp.BatchNorm(),
                                  fastbp.Dropout(0.3), fastbp.Dense(3)], dtype=dtype, seed=3)
    got, want = _zero_batch_fit(X, y, w, keep, make_net, loss="cross_entropy", epochs=3,
                                batch_size=8, shuffle=False)
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1] == want[1] == 3 * 4  # four updates an epoch
    assert got[2] == want[2]
    np.testing.assert_array_equal(got[3], want[3])


class _EngineSpy:
    """fastbp.model's engine, recording each train_batches call's order,
    first batch, batch count and result."""

    def __init__(self, module):
        self._module, self.calls = module, []

    def train_batches(self, *args):
        out = self._module.train_batches(*args)
        self.calls.append((args[4].copy(), args[5], args[6], out))
        return out

    def __getattr__(self, name):
        return getattr(self._module, name)


def test_zero_weight_batches_in_shuffled_epochs_are_skipped(monkeypatch):
    """Half the weights zero at batch size 2: whether a batch is all zero
    depends on the shuffle.  Training completes, and the step count is the
    number of batches with weight."""
    from fastbp import _runner as model

    spy = _EngineSpy(model._engine)
    monkeypatch.setattr(model, "_engine", spy)
    X, y = _data(n=60)
    w = np.tile([1.0, 0.0], 30)
    net = fastbp.Sequential([fastbp.Dense(4, activation="tanh"), fastbp.Dense(3)], seed=0)
    opt = fastbp.optim.SGD(lr=0.1)
    net.fit(X, y, loss="cross_entropy", optimizer=opt, sample_weight=w, epochs=4,
            batch_size=2, verbose=0)
    applied = sum(w[order[2 * b:2 * b + 2]].sum() > 0
                  for order, first, count, _ in spy.calls for b in range(first, first + count))
    assert 0 < applied < 4 * 30  # some batches were all zero, some not
    assert opt.t == applied == sum(out[1] for *_, out in spy.calls)
    assert np.isfinite(net.params).all() and np.isfinite(net.history["loss"]).all()


@pytest.mark.vector_kernels
@pytest.mark.parametrize("shuffle", [False, True])
def test_zero_weight_batch_on_the_row_parallel_path(shuffle):
    """The row-parallel step sums the batch's weights itself: a zero batch
    must be skipped before it, on both paths, with the same bits."""
    from fastbp._ext import engine_rows

    rng = np.random.default_rng(7)
    X = rng.normal(size=(203, 60)).astype(np.float32)
    y = rng.integers(0, 5, 203)
    w = np.ones(203)
    w[64:128] = 0  # the second batch of 64 when not shuffled
    if shuffle:  # the same zero batch, found where the shuffle puts it
        order = np.arange(203)
        fastbp.Sequential([fastbp.Dense(5)], seed=1).build(60)._shuffle_rng.shuffle(order)
        w = np.ones(203)
        w[order[64:128]] = 0
    keep = w > 0

    def make_net():
        return fastbp.Sequential([fastbp.Dense(120, activation="relu"),
                                  fastbp.Dense(32, activation="elu"), fastbp.Dense(5)],
                                 dtype="float32", seed=1)
    results = []
    for rows in (False, True):
        previous = engine_rows._set_rows_parallel(rows)
        before = engine_rows._rows_steps()
        try:
            net = make_net()
            opt = fastbp.optim.Adam(lr=1e-2)
            net.fit(X, y, loss="cross_entropy", optimizer=opt, sample_weight=w, epochs=1,
                    batch_size=64, shuffle=shuffle, verbose=0, n_threads=2)
        finally:
            engine_rows._set_rows_parallel(previous)
        steps = engine_rows._rows_steps() - before
        assert steps == (2 if rows else 0)  # batches 1 and 3 of 64; not the zero one
        assert opt.t == 3
        results.append(net.params.copy())
    np.testing.assert_array_equal(results[0], results[1])
    if not shuffle:
        net = make_net()
        net.fit(X[keep], y[keep], loss="cross_entropy", optimizer=fastbp.optim.Adam(lr=1e-2),
                epochs=1, batch_size=64, shuffle=False, verbose=0, n_threads=2)
        np.testing.assert_array_equal(results[0], net.params)


def test_divergence_after_a_zero_weight_batch_rolls_back_exactly():
    """Rollback replays the epoch from its snapshot: the zero batch is
    skipped again, and the step count agrees with the updates applied."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(40, 5))
    y = rng.integers(0, 3, 40)
    X[:30] *= 1e-12   # harmless updates,
    X[30:] *= 1e300   # then finite logits whose update overflows
    w = np.ones(40)
    w[10:20] = 0
    net = fastbp.Sequential([fastbp.Dense(3)], dtype="float64", seed=5).build(5)
    opt = fastbp.optim.SGD(lr=1e10)
    with pytest.warns(RuntimeWarning, match="batch 4"):
        net.fit(X, y, loss="cross_entropy", optimizer=opt, sample_weight=w, epochs=1,
                batch_size=10, shuffle=False, verbose=0, on_divergence="warn")
    twin = fastbp.Sequential([fastbp.Dense(3)], dtype="float64", seed=5).build(5)
    keep = np.r_[0:10, 20:30]
    twin.fit(X[keep], y[keep], loss="cross_entropy", optimizer=fastbp.optim.SGD(lr=1e10),
             epochs=1, batch_size=10, shuffle=False, verbose=0)
    np.testing.assert_array_equal(net.params, twin.params)
    assert opt.t == 2


def test_all_zero_or_negative_weights_are_refused_before_training():
    X, y = _data(n=20)
    net = fastbp.Sequential([fastbp.Dense(3)], seed=0).build(10)
    before = net.params.copy()
    for w, message in ((np.zeros(20), "all zero"), (np.r_[-1.0, np.ones(19)], "non-negative")):
        with pytest.raises(ValueError, match=message):
            net.fit(X, y, loss="cross_entropy", sample_weight=w, verbose=0)
    np.testing.assert_array_equal(net.params, before)


# -- thread counts (issue 13, item 13) -------------------------------------------------

@pytest.mark.parametrize("n_threads", [0, -1, 2 ** 31, 2 ** 64, 2.0, True, "2",
                                       np.uint64(2 ** 63)])
def test_n_threads_out_of_range_is_a_value_error_naming_the_range(n_threads):
    """2**31 raised OverflowError (a C int) and 2**64 ctypes.ArgumentError
    (threadpoolctl), after other checks had passed."""
    X, y = _data(n=20)
    net = fastbp.Sequential([fastbp.Dense(3)], seed=0)
    with pytest.raises(ValueError, match=r"n_threads must be None or an integer from 1 to "
                                         r"2147483647"):
        net.fit(X, y, loss="cross_entropy", n_threads=n_threads, verbose=0)
    assert not net.history


@pytest.mark.parametrize("n_threads", [2 ** 31, 2 ** 64])
def test_estimator_n_threads_out_of_range_is_a_value_error(n_threads):
    X, y = _data(n=20)
    for est in (fastbp.MLPRegressor(n_threads=n_threads, max_iter=1),
                fastbp.MLPClassifier(n_threads=n_threads, max_iter=1)):
        with pytest.raises(ValueError, match="n_threads"):
            est.fit(X, y)


_POOL_SCRIPT = textwrap.dedent("""
    import os, sys
    cpus = sorted(os.sched_getaffinity(0))[:int(sys.argv[1])]
    os.sched_setaffinity(0, cpus)   # before the pool reads it
    import numpy as np
    import fastbp
    from fastbp._ext import dense
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 150)).astype(np.float32)
    y = rng.integers(0, 10, 200)
    out = []
    for n in (1, 1000, len(cpus)):
        # 35k parameters: the optimizer's update is split across the pool
        net = fastbp.Sequential([fastbp.Dense(160, activation="relu"),
                                 fastbp.Dense(64, activation="tanh"), fastbp.Dense(10)],
                                seed=3)
        net.fit(X, y, loss="cross_entropy", epochs=1, batch_size=32, verbose=0, n_threads=n)
        out.append(net.params.tobytes())
    a = rng.normal(size=(64, 64))   # our own kernels, split by the declared count
    dense.set_threads(1000)
    wide = dense.gemm(a, a)
    dense.set_threads(1)
    one = dense.gemm(a, a)
    print(len(cpus), dense.pool_workers(), len(set(out)), np.array_equal(wide, one))
""")


@pytest.mark.parametrize("cpus", [1, 2])
def test_pool_is_capped_at_the_cpus_this_process_may_use(tmp_path, cpus):
    """n_threads=1000 on two cores started 63 pool threads that stayed.
    Now the pool has at most CPUs - 1 workers (the caller is the other
    thread), for fit's n_threads and for a kernel told to use 1000, and
    the results are the same bits on any count."""
    done = subprocess.run([sys.executable, "-c", _POOL_SCRIPT, str(cpus)], capture_output=True,
                          text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    have, workers, distinct, same = done.stdout.split()
    assert int(workers) <= int(have) - 1
    assert distinct == "1" and same == "True"


# -- 8. Ctrl-C is never lost (issue 13, item 6) ------------------------------------------
# SIGINT is raised from inside the compiled call's wrapper, i.e. exactly
# "during" that call as far as Python can tell; each scenario runs in a
# fresh interpreter (its main thread receives the signal).
def _run_script(script, tmp_path, timeout=TIMEOUT):
    import json

    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=timeout, cwd=tmp_path)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


_SIGINT_IN_LAST_CALL = """
    import json, signal, warnings
    import numpy as np
    import fastbp
    from fastbp import _runner as model

    rng = np.random.default_rng(0)
    X = rng.normal(size=(256, 6))
    y = rng.integers(0, 3, 256)
    real = model._engine.train_batches
    hits = []

    def interrupting(last_batch, times=1):
        def train_batches(*args):
            done = real(*args)
            first, count = args[5], args[6]
            if first + count == last_batch and len(hits) < times:
                hits.append(1)
                signal.raise_signal(signal.SIGINT)   # handled after the call returns
            return done
        model._engine.train_batches = train_batches
"""


def test_ctrl_c_in_the_last_call_of_a_fit_raises_keyboard_interrupt(tmp_path):
    # It was dropped: the deferred-interrupt check ran only between calls
    # that still had work after them, so fit returned normally.
    out = _run_script(_SIGINT_IN_LAST_CALL + """
    results = {}
    for epochs, checkpoint in ((1, None), (2, "run.fbp")):
        net = fastbp.Sequential([fastbp.Dense(8, activation="relu"), fastbp.Dense(3)], seed=0)
        hits.clear()
        interrupting(last_batch=8, times=epochs)   # 256 / 32: every epoch's last call
        try:
            net.fit(X, y, loss="cross_entropy", epochs=epochs, verbose=0, checkpoint=checkpoint)
            outcome = "returned"
        except KeyboardInterrupt as exc:
            outcome = "KeyboardInterrupt"
        saved = None if checkpoint is None else fastbp.load(checkpoint).history.n_epochs
        results[epochs] = [outcome, net.history.n_epochs, net._position, net.optimizer.t,
                           "the fit is complete" in (net.history.stop_reason or ""), saved]
        model._engine.train_batches = real
    print(json.dumps(results))
    """, tmp_path)
    # epochs=2: the first SIGINT stops the fit after epoch 1 (as before); the
    # one-epoch fit and the last epoch are complete, and so is the checkpoint
    assert out == {"1": ["KeyboardInterrupt", 1, None, 8, True, None],
                   "2": ["KeyboardInterrupt", 1, None, 8, False, 1]}


def test_ctrl_c_in_the_last_call_of_an_estimator_epoch_counts_that_epoch(tmp_path):
    # The estimators stop on Ctrl-C with scikit-learn's warning, as
    # scikit-learn does.  A SIGINT in the last call of an epoch used to stop
    # it after that call, before its bookkeeping: the weights had trained
    # one epoch more than n_iter_ and loss_curve_ said.
    out = _run_script(_SIGINT_IN_LAST_CALL + """
    def make(max_iter):
        return fastbp.MLPClassifier(hidden_layer_sizes=(8,), batch_size=32, max_iter=max_iter,
                                    random_state=0)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        one = make(1).fit(X, y)
        interrupting(last_batch=8)
        stopped = make(3).fit(X, y)
    print(json.dumps({"n_iter": stopped.n_iter_, "curve": len(stopped.loss_curve_),
                      "t": stopped.t_,
                      "same": all(np.array_equal(a, b) for a, b in zip(one.coefs_, stopped.coefs_)),
                      "warned": any("interrupted by user" in str(w.message) for w in caught)}))
    """, tmp_path)
    assert out == {"n_iter": 1, "curve": 1, "t": 256, "same": True, "warned": True}


def test_ctrl_c_in_a_levenberg_marquardt_iteration_ends_it_consistently(tmp_path):
    # LM had no deferral: KeyboardInterrupt landed anywhere, e.g. after a
    # step was taken but before the history recorded it, and on_train_end
    # was skipped.  Now the iteration finishes and the fit stops.
    out = _run_script("""
    import json, signal
    import numpy as np
    import fastbp
    from fastbp import lm

    X = np.linspace(-3, 3, 200)[:, None]
    real = lm.normal_equations

    def normal_equations(*args):
        signal.raise_signal(signal.SIGINT)
        return real(*args)

    lm.normal_equations = normal_equations
    ended = []

    class End:
        def on_train_end(self, net):
            ended.append(net.history.n_epochs)

    net = fastbp.Sequential([fastbp.Dense(10, activation="tanh"), fastbp.Dense(1)],
                            dtype="float64", seed=0)
    opt = lm.LevenbergMarquardt()
    try:
        net.fit(X, np.sin(X), optimizer=opt, epochs=5, verbose=0, callbacks=[End()])
        outcome = "returned"
    except KeyboardInterrupt:
        outcome = "KeyboardInterrupt"
    print(json.dumps([outcome, net.history.n_epochs, opt.t, ended,
                      "interrupted by Ctrl-C after epoch 1" in (net.history.stop_reason or "")]))
    """, tmp_path)
    assert out == ["KeyboardInterrupt", 1, 1, [1], True]


def test_ctrl_c_at_random_moments_of_a_fit_is_never_lost(tmp_path):
    # A few trials of the adversarial script (tests/adversarial/interrupts.py):
    # SIGINT from outside at random moments of a one-epoch fit.
    interrupts = adversarial("interrupts")
    counts = interrupts.run("fit-sigint", trials=4, seed=1, workdir=str(tmp_path))
    # the whole record as the message (pytest shortens a dict's repr)
    assert counts["trials"] == 4 and counts["passed"] == 4, json.dumps(counts)


# -- 9. a failed build leaves the model unbuilt (issue 13, item 8) ----------------------
def _small(seed=0):
    return fastbp.Sequential([fastbp.Dense(8, activation="relu"), fastbp.BatchNorm(),
                              fastbp.Dense(3)], seed=seed)


def _assert_unbuilt(net):
    assert not net.built and net.n_features is None
    assert all(layer.n_in is None for layer in net.layers)
    with pytest.raises(ValueError, match="not built"):
        net.predict(np.ones((2, 5)))


@pytest.mark.parametrize("call", [2, 3])
def test_memory_error_in_build_leaves_the_model_unbuilt(monkeypatch, call):
    # The 2nd np.zeros (the gradient) or the 3rd (BatchNorm's buffers)
    # failing left built=True with zero weights: predict returned zeros and
    # fit raised AttributeError.
    from fastbp import model

    real, calls = np.zeros, []

    def zeros(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise MemoryError("no memory for the test")
        return real(*args, **kwargs)

    net = _small()
    monkeypatch.setattr(model.np, "zeros", zeros)
    with pytest.raises(MemoryError):
        net.build(5)
    monkeypatch.setattr(model.np, "zeros", real)
    _assert_unbuilt(net)
    X, y = _data(n=64, d=5)
    net.fit(X, y, loss="cross_entropy", epochs=2, verbose=0)   # and it builds and trains
    fresh = _small()
    fresh.fit(X, y, loss="cross_entropy", epochs=2, verbose=0)
    np.testing.assert_array_equal(net.params, fresh.params)


def test_an_initializer_error_in_build_leaves_the_model_unbuilt(monkeypatch):
    from fastbp import initializers

    def broken(rng, fan_in, fan_out):
        raise RuntimeError("broken initializer")

    net = _small()
    monkeypatch.setitem(initializers.INITIALIZERS, "glorot_uniform", broken)
    with pytest.raises(RuntimeError, match="broken initializer"):
        net.fit(*_data(n=64, d=5), loss="cross_entropy", epochs=1, verbose=0)
    _assert_unbuilt(net)


def test_a_failed_rebuild_keeps_the_model_as_it_was(monkeypatch):
    from fastbp import initializers

    X, y = _data(n=64, d=5)
    net = _small()
    net.fit(X, y, loss="cross_entropy", epochs=1, verbose=0)
    params, out, W = net.params.copy(), net.predict(X), net.layers[0].W

    def broken(rng, fan_in, fan_out):
        raise MemoryError("no memory for the test")

    monkeypatch.setitem(initializers.INITIALIZERS, "glorot_uniform", broken)
    with pytest.raises(MemoryError):
        net.build(9)
    assert net.n_features == 5 and net.layers[0].W is W
    np.testing.assert_array_equal(net.params, params)
    np.testing.assert_array_equal(net.predict(X), out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc")
def test_a_build_that_runs_out_of_memory_leaves_the_model_unbuilt(tmp_path):
    # A real MemoryError under an address-space cap: room for the float32
    # parameters and gradient (2 x 1.2 GB, allocated lazily), not for the
    # float64 draw of the initializer on top of them.
    out = _run_script("""
    import json, resource
    import numpy as np
    import fastbp

    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + 3 * 2**30, resource.RLIM_INFINITY))
    net = fastbp.Sequential([fastbp.Dense(20000), fastbp.Dense(1)], seed=0)
    try:
        net.build(15000)
        error = None
    except MemoryError as exc:
        error = "MemoryError"
    try:
        net.predict(np.ones((1, 15000)))
        predict = "returned"
    except ValueError as exc:
        predict = "not built" if "not built" in str(exc) else str(exc)
    print(json.dumps([error, net.built, predict]))
    """, tmp_path)
    assert out == ["MemoryError", False, "not built"]


def test_a_process_that_ignores_sigint_keeps_ignoring_it_during_fit(tmp_path):
    # A background job of a shell (and nohup) starts with SIGINT ignored:
    # fit must not turn a Ctrl-C the process asked to ignore into a
    # KeyboardInterrupt, and must leave SIGINT ignored afterwards.
    script = textwrap.dedent("""
        import os, signal, threading, time
        import numpy as np
        import fastbp
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        rng = np.random.default_rng(0)
        X, y = rng.normal(size=(20000, 20)), rng.integers(0, 3, 20000)
        net = fastbp.Sequential([fastbp.Dense(64, activation="relu"), fastbp.Dense(3)], seed=0)
        net.fit(X[:64], y[:64], loss="cross_entropy", epochs=1, verbose=0)
        def send():
            for _ in range(50):
                time.sleep(0.002)
                os.kill(os.getpid(), signal.SIGINT)
        threading.Thread(target=send).start()
        net.fit(X, y, loss="cross_entropy", epochs=8, verbose=0)  # ~0.1 s: signals land in it
        time.sleep(0.2)
        print(net.history.n_epochs, signal.getsignal(signal.SIGINT) is signal.SIG_IGN)
    """)
    proc = subprocess.run([sys.executable, "-P", "-c", script], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["9", "True"], proc.stdout  # 1 warm-up epoch + 8


def test_turning_grad_norms_on_in_a_later_fit_does_not_warn_and_changes_no_weight():
    """grad_norms only records a diagnostic column: a fit that turns it on
    gives the uninterrupted run's weights, so no ResumeWarning (one said the
    result would differ)."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 3)), rng.normal(size=40)

    def net():
        return fastbp.Sequential([fastbp.Dense(5, activation="tanh"), fastbp.Dense(1)],
                                 dtype="float64", seed=0)
    a, b = net(), net()
    a.fit(X, y, epochs=2, batch_size=8, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastbp.ResumeWarning)
        a.fit(X, y, epochs=1, batch_size=8, verbose=0, grad_norms=True)
    b.fit(X, y, epochs=3, batch_size=8, verbose=0)
    assert a.params.tobytes() == b.params.tobytes()
    assert len(a.history["grad_norm"]) >= 1
