"""The kernels' worker pool (csrc/pool.h) and how products and optimizer
updates are split across it (csrc/gemm.h, engine_optim.optimizer_step): results
must not depend on the thread count, and the pool must survive concurrent
callers and fork()."""
import multiprocessing
import sys
import threading

import numpy as np
import pytest

import fastbp
from fastbp._ext import dense, engine_rows

from helpers import DTYPES, assert_close


@pytest.fixture
def declared():
    """Restores the calling thread's declared thread count after a test."""
    previous = dense.set_threads(1)
    yield
    dense.set_threads(previous)


def _product(rng, m, n, k, trans_a, trans_b, dtype):
    a = rng.normal(size=(k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.normal(size=(n, k) if trans_b else (k, n)).astype(dtype)
    ref = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
    return a, b, ref


# Products above the split cutoff (2**17 multiply-adds) on every path of the
# small kernels: column ranges (broadcast form, A @ B.T dot products and
# copied B.T), row ranges (outputs narrower than a vector, or too narrow for
# a column range per thread), uneven last ranges; of the packed kernels
# (above 2**24 multiply-adds, 2**22 with a transposed operand, or with B over
# 896 KiB), in column and row ranges; and of packed products cut into
# ranges small enough for the small kernels' broadcast forms (256 x 256 x 300
# A @ B, 512 x 256 x 48 A.T @ B, 2048 x 256 x 10 A @ B.T with B.T copied).
SPLIT_SHAPES = [(64, 256, 784), (200, 100, 64), (784, 256, 64), (100, 10, 3000),
                (3000, 10, 100), (64, 256, 128), (300, 97, 40), (97, 300, 40),
                (50, 500, 33), (1000, 12, 64), (128, 128, 128), (600, 600, 600),
                (200, 10, 100), (200, 20, 100), (300, 40, 30), (1030, 67, 520),
                (256, 256, 300), (512, 256, 48), (2048, 256, 10),
                # thin products: a range of them ran the small kernels' row
                # fallback, which split k into two chains (the whole product,
                # packed, is one chain an entry), so 1 and 2 threads differed
                # (a 1-3 output layer's weight gradient over a large batch)
                (256, 3, 1000), (256, 1, 1000), (256, 3, 300), (3, 256, 1000),
                (1000, 2, 256), (511, 3, 300)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("m,n,k", SPLIT_SHAPES)
def test_products_are_bitwise_the_same_on_any_thread_count(rng, declared, dtype, trans, m, n, k):
    a, b, ref = _product(rng, m, n, k, *trans, dtype)
    dense.set_threads(1)
    one = dense.gemm(a, b, *trans)
    assert_close(one, ref, dtype)
    for threads in (2, 3, 5):
        dense.set_threads(threads)
        np.testing.assert_array_equal(dense.gemm(a, b, *trans), one)


def test_set_threads_is_per_python_thread(declared):
    dense.set_threads(1)
    seen = []
    worker = threading.Thread(target=lambda: seen.append(dense.set_threads(3)))
    worker.start()
    worker.join()
    assert seen == [0]                  # a new thread starts undeclared
    assert dense.set_threads(1) == 1    # ... and did not change this one's


@pytest.mark.vector_kernels
def test_split_products_start_workers(rng, declared):
    a, b, ref = _product(rng, 64, 256, 784, False, False, np.float32)
    dense.set_threads(2)
    assert_close(dense.gemm(a, b), ref, np.float32)
    if sys.platform != "win32":
        assert dense.pool_workers() >= 1


def test_concurrent_callers_get_correct_products(rng):
    """Two Python threads using the pool at once (GIL released): one owns
    it, the other runs its ranges alone; both must be right."""
    a, b, ref = _product(rng, 96, 320, 500, False, False, np.float64)
    errors = []

    def work():
        dense.set_threads(2)
        for _ in range(30):
            out = dense.gemm(a, b)
            if not np.allclose(out, ref, rtol=1e-12, atol=1e-9):
                errors.append(np.abs(out - ref).max())

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _child_product(queue):
    rng = np.random.default_rng(5)
    a, b, ref = _product(rng, 64, 256, 784, False, False, np.float64)
    dense.set_threads(2)
    queue.put(float(np.abs(dense.gemm(a, b) - ref).max()))


@pytest.mark.skipif(sys.platform == "win32", reason="fork() does not exist on Windows")
def test_pool_works_in_a_forked_child(rng, declared):
    # Start the parent's workers first: the child inherits none of them.
    a, b, ref = _product(rng, 64, 256, 784, False, False, np.float64)
    dense.set_threads(2)
    dense.gemm(a, b)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_product, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0, "the forked child hung or crashed"
    assert queue.get(timeout=5) < 1e-9
    assert_close(dense.gemm(a, b), ref, np.float64)   # and the parent's pool still runs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_training_is_bitwise_the_same_on_one_and_two_threads(rng, dtype, optimizer):
    # 150-160-64-10 at batch 32 has 35k parameters (140 KB in float32), above
    # the cutoff for splitting the optimizer's update (32 KB), and its first
    # layer's products are
    # above the one for splitting GEMMs; every product stays in our own
    # kernels (BLAS itself may round differently on another thread count).
    X = rng.normal(size=(300, 150)).astype(dtype)
    y = rng.integers(0, 10, 300)
    params = []
    for threads in (1, 2):
        net = fastbp.Sequential([fastbp.Dense(160, activation="relu"),
                                 fastbp.Dense(64, activation="tanh"), fastbp.Dense(10)],
                                dtype=dtype, seed=3)
        opt = (fastbp.optim.Adam(lr=1e-3) if optimizer == "adam"
               else fastbp.optim.SGD(lr=1e-2, momentum=0.9))
        net.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=2, batch_size=32,
                verbose=0, n_threads=threads)
        params.append(net.params.copy())
    assert params[0].nbytes > 2 ** 15
    np.testing.assert_array_equal(params[0], params[1])


def _on_both_paths(fit, row_steps):
    """fit() with row-parallel steps forbidden, then allowed; checks that
    the second ran row_steps steps in row ranges (and the first none), and
    returns both results."""
    results = []
    for rows in (False, True):
        previous = engine_rows._set_rows_parallel(rows)
        before = engine_rows._rows_steps()
        try:
            results.append(fit())
        finally:
            engine_rows._set_rows_parallel(previous)
        assert engine_rows._rows_steps() - before == (row_steps if rows else 0)
    return results


@pytest.mark.vector_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shuffle", [True, False])
def test_row_parallel_steps_match_the_layer_by_layer_path(rng, dtype, shuffle):
    # On two threads a stack of plain dense layers runs each step in row
    # ranges (engine_rows.rows_parallel), with its rows gathered inside the ranges
    # when shuffled; the layer-by-layer path must give the same bits.  203
    # rows at batch 64 end with an 11-row batch, too short to split; the
    # frozen layer still passes its gradient down.
    X = rng.normal(size=(203, 60)).astype(dtype)
    y = rng.integers(0, 5, 203)

    def fit():
        net = fastbp.Sequential([fastbp.Dense(120, activation="relu"),
                                 fastbp.Dense(64, activation="tanh", trainable=False),
                                 fastbp.Dense(32, activation="elu"),
                                 fastbp.Dense(5, activation="leaky_relu")],
                                dtype=dtype, seed=1)
        net.fit(X, y, loss="cross_entropy", optimizer=fastbp.optim.Adam(lr=1e-2), epochs=2,
                batch_size=64, shuffle=shuffle, verbose=0, n_threads=2)
        return net.params.copy()

    layers, rows = _on_both_paths(fit, row_steps=6)   # 3 full batches x 2 epochs
    np.testing.assert_array_equal(layers, rows)


def test_small_steps_stay_on_the_layer_by_layer_path(rng):
    # S (20-64-64-2 at batch 32: 176k multiply-adds forward) is below the
    # cutoff, where splitting rows costs more than it saves.
    X = rng.normal(size=(256, 20)).astype(np.float32)
    y = rng.integers(0, 2, 256)
    net = fastbp.Sequential([fastbp.Dense(64, activation="relu"),
                             fastbp.Dense(64, activation="relu"), fastbp.Dense(2)], seed=0)
    before = engine_rows._rows_steps()
    net.fit(X, y, loss="cross_entropy", epochs=1, batch_size=32, verbose=0, n_threads=2)
    assert engine_rows._rows_steps() == before


@pytest.mark.vector_kernels
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_row_parallel_steps_match_for_the_sklearn_classifier(rng):
    # scikit-learn's log loss is computed by the row ranges too (each range
    # its rows' gradient and loss terms, added up in row order afterwards):
    # the weights and every epoch's loss must not move by a bit.
    X = rng.normal(size=(300, 20))
    y = rng.integers(0, 4, 300)

    def fit():
        return fastbp.MLPClassifier(hidden_layer_sizes=(100, 50), max_iter=3, batch_size=64,
                                    random_state=0, n_threads=2).fit(X, y)

    layers, rows = _on_both_paths(fit, row_steps=15)   # 5 batches x 3 epochs
    for a, b in zip(layers.coefs_ + layers.intercepts_, rows.coefs_ + rows.intercepts_):
        np.testing.assert_array_equal(a, b)
    assert layers.loss_curve_ == rows.loss_curve_


def test_fit_declares_its_thread_count_and_restores_it():
    net = fastbp.Sequential([fastbp.Dense(4, activation="relu"), fastbp.Dense(1)], seed=0)
    X = np.ones((8, 3)); y = np.zeros(8)
    seen = []

    class Peek:
        def on_epoch_end(self, net, epoch, logs):
            seen.append(dense.set_threads(0))
            dense.set_threads(seen[-1])

    before = dense.set_threads(7)
    try:
        net.fit(X, y, epochs=1, verbose=0, n_threads=1, callbacks=[Peek()])
        assert seen == [1]                  # declared during the fit
        assert dense.set_threads(7) == 7    # restored after it
    finally:
        dense.set_threads(before)


@pytest.mark.vector_kernels
def test_predict_uses_as_many_threads_as_blas(tmp_path):
    """predict declares BLAS's thread count to the kernels: in a fresh
    process whose only work is one large predict, the pool starts a worker
    under a 2-thread BLAS limit and none under 1 (and the outputs agree)."""
    import subprocess
    import textwrap

    script = textwrap.dedent("""
        import sys
        import numpy as np
        from threadpoolctl import threadpool_limits
        import fastbp
        from fastbp._ext import dense
        # 200 x 64 x 64: our kernels take it at every instruction-set
        # level (BLAS would at the baseline level if it were larger), and
        # split it (above 2**17 multiply-adds)
        net = fastbp.Sequential([fastbp.Dense(64, activation="relu"), fastbp.Dense(10)],
                                seed=0)
        net.build(64)
        X = np.random.default_rng(0).normal(size=(200, 64))
        with threadpool_limits(int(sys.argv[1]), user_api="blas"):
            out = net.predict(X)
        print(dense.pool_workers(), float(out.sum()).hex())
    """)
    # cwd away from the source tree, which would shadow the installed package
    runs = [subprocess.run([sys.executable, "-c", script, str(n)], capture_output=True,
                           text=True, timeout=120, cwd=tmp_path) for n in (1, 2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    (w1, s1), (w2, s2) = (r.stdout.split() for r in runs)
    assert int(w1) == 0 and int(w2) >= 1
    assert s1 == s2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_packing_buffers_of_exiting_threads_are_freed():
    """Each thread that runs a packed product keeps a packing buffer (2.4 MB
    for this one); a thread that exits must free it, or 50 short-lived
    threads would leave about 120 MB behind."""
    a = np.ones((256, 2048), np.float32)
    b = np.ones((2048, 2048), np.float32)

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    dense.gemm(a, b)
    before = rss_mib()
    for _ in range(50):
        t = threading.Thread(target=dense.gemm, args=(a, b))
        t.start()
        t.join()
    assert rss_mib() - before < 40


# -- one model used from several Python threads (issue 13, items 2 and 7) -----------
# Each scenario runs in a fresh interpreter: before these were fixed, two fits
# of one model crashed the process.  The script prints one JSON line.
def _run_script(script, tmp_path, env=None, timeout=240):
    import json
    import os
    import subprocess
    import textwrap

    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=timeout, cwd=tmp_path,  # away from the sources
                          env=None if env is None else {**os.environ, **env})
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


_SHARED_MODEL = """
    import json, threading
    import numpy as np
    import fastbp

    def run_threads(n, work):
        errors = []
        def guarded(i):
            try:
                work(i)
            except BaseException as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
        threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return errors

    def same(a, b):
        if isinstance(a, tuple):
            return all(same(x, y) for x, y in zip(a, b))
        return np.array_equal(a, b, equal_nan=True)

    rng = np.random.default_rng(0)
    X = rng.normal(size=(1200, 10))
    y = rng.integers(0, 3, 1200)
"""


def test_inference_calls_from_many_threads_on_one_model_match_one_thread(tmp_path):
    # predict, predict_proba, evaluate and loss_and_grad wrote into the
    # model's one workspace (and BatchNorm's 1/std into its aux, and
    # loss_and_grad into its gradient) without the GIL: 8 threads calling
    # them on one model got wrong results.  Every result must now be
    # bitwise the one-thread result, on inputs of different sizes.
    out = _run_script(_SHARED_MODEL + """
    net = fastbp.Sequential([fastbp.Dense(48, activation="relu"), fastbp.BatchNorm(),
                             fastbp.Dropout(0.2),
                             fastbp.Residual([fastbp.Dense(48, activation="tanh")]),
                             fastbp.Dense(3)], seed=0)
    net.fit(X, y, loss="cross_entropy", epochs=2, verbose=0)
    calls = {"predict": lambda X, y: net.predict(X),
             "predict_proba": lambda X, y: net.predict_proba(X),
             "evaluate": lambda X, y: net.evaluate(X, y, loss="cross_entropy"),
             "loss_and_grad": lambda X, y: net.loss_and_grad(X, y, loss="cross_entropy")}
    pieces = [(X[s:s + m], y[s:s + m]) for s, m in ((0, 1), (1, 7), (8, 300), (308, 892))]
    jobs = [(name, piece) for name in calls for piece in range(len(pieces))]
    oracle = {job: calls[job[0]](*pieces[job[1]]) for job in jobs}
    counts = {"calls": 0, "wrong": 0}

    def work(i):
        order = np.random.default_rng(i).permutation(len(jobs))
        for _ in range(12):
            for j in order:
                name, piece = jobs[j]
                counts["calls"] += 1
                counts["wrong"] += not same(calls[name](*pieces[piece]), oracle[jobs[j]])

    counts["errors"] = run_threads(8, work)
    print(json.dumps(counts))
    """, tmp_path)
    assert out == {"calls": 8 * 12 * 16, "wrong": 0, "errors": []}


def test_inference_beside_a_fit_of_the_same_model_leaves_the_fit_unchanged(tmp_path):
    # predict and loss_and_grad in one thread while another trains the same
    # model overwrote the fit's activations and gradient (results changed;
    # sometimes a spurious DivergenceError).  The fit must end bitwise as
    # it does alone.
    out = _run_script(_SHARED_MODEL + """
    def model():
        return fastbp.Sequential([fastbp.Dense(64, activation="relu"), fastbp.BatchNorm(),
                                  fastbp.Dense(64, activation="relu"), fastbp.Dense(3)], seed=1)

    X, y = np.tile(X, (4, 1)), np.tile(y, 4)   # a fit of about 0.3 s
    alone = model()
    alone.fit(X, y, loss="cross_entropy", epochs=3, verbose=0)
    results = {}
    for what in ("predict", "loss_and_grad"):
        net = model().build(10)
        done = threading.Event()
        calls = [0]

        def work(i):
            if i == 0:
                try:
                    net.fit(X, y, loss="cross_entropy", epochs=3, verbose=0)
                finally:
                    done.set()
                return
            while not done.is_set():
                if what == "predict":
                    net.predict(X[:32])
                else:
                    net.loss_and_grad(X[:32], y[:32], loss="cross_entropy")
                calls[0] += 1

        errors = run_threads(2, work)
        results[what] = {"equal": bool(np.array_equal(net.params, alone.params)),
                         "errors": errors, "some_calls": calls[0] > 0}
    print(json.dumps(results))
    """, tmp_path)
    expected = {"equal": True, "errors": [], "some_calls": True}
    assert out == {"predict": expected, "loss_and_grad": expected}


def test_fits_of_one_model_from_two_threads_run_one_after_the_other(tmp_path):
    # Two threads fitting one model crashed (SIGSEGV, abort) or raised a
    # spurious DivergenceError.  They now run one after the other: with the
    # same arguments the model ends as after two fits in a row.
    out = _run_script(_SHARED_MODEL + """
    def model():
        return fastbp.Sequential([fastbp.Dense(64, activation="relu"),
                                  fastbp.Dense(64, activation="tanh"), fastbp.Dense(3)], seed=2)

    def fit(net):
        net.fit(X, y, loss="cross_entropy", epochs=2, batch_size=16, verbose=0)

    twice = model()
    fit(twice)
    fit(twice)
    results = []
    for trial in range(3):
        net = model()
        errors = run_threads(2, lambda i: fit(net))
        results.append([bool(np.array_equal(net.params, twice.params)), net.history.n_epochs,
                        errors])
    print(json.dumps(results))
    """, tmp_path)
    assert out == [[True, 4, []]] * 3


def test_fit_from_a_callback_of_a_fit_of_the_same_model_is_refused():
    # It would change the model under the running fit (and waiting for the
    # fit would deadlock): a clear error instead.
    X = np.ones((16, 3))
    y = np.zeros(16)
    net = fastbp.Sequential([fastbp.Dense(4, activation="relu"), fastbp.Dense(1)], seed=0)

    class Refit:
        def on_epoch_end(self, net, epoch, logs):
            with pytest.raises(RuntimeError, match="inside its own fit"):
                net.fit(X, y, epochs=1, verbose=0)
            with pytest.raises(RuntimeError, match="inside its own fit"):
                net.build(3)
            net.predict(X)  # inference is fine

    net.fit(X, y, epochs=2, verbose=0, callbacks=[Refit()])
    assert net.history.n_epochs == 2
    net.fit(X, y, epochs=1, verbose=0)  # and the model is free again afterwards
    assert net.history.n_epochs == 3


def test_warnings_of_fit_still_point_at_the_caller():
    # fit runs inside the wrapper that holds the model: one frame more
    X = np.ones((16, 3))
    net = fastbp.Sequential([fastbp.Dense(4, activation="relu"), fastbp.Dense(1)], seed=0)
    net.fit(X, np.zeros(16), epochs=1, batch_size=8, verbose=0)
    with pytest.warns(fastbp.ResumeWarning) as record:
        net.fit(X, np.zeros(16), epochs=1, batch_size=4, verbose=0)
    assert record[0].filename == __file__


def test_a_model_with_its_locks_pickles_and_copies():
    import copy
    import pickle

    net = fastbp.Sequential([fastbp.Dense(4, activation="relu"), fastbp.Dense(2)], seed=0)
    X = np.random.default_rng(0).normal(size=(20, 3))
    net.fit(X, np.arange(20) % 2, loss="cross_entropy", epochs=1, verbose=0)
    for twin in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        np.testing.assert_array_equal(twin.predict(X), net.predict(X))
        twin.fit(X, np.arange(20) % 2, loss="cross_entropy", epochs=1, verbose=0)


def test_estimator_predicts_from_many_threads_match_one_thread(tmp_path):
    # The estimators predict through a fastbp model: the same shared
    # workspace, and they also copied coefs_ into it on every call.
    out = _run_script(_SHARED_MODEL + """
    import warnings
    warnings.simplefilter("ignore")
    clf = fastbp.MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=5,
                               random_state=0).fit(X, y)
    reg = fastbp.MLPRegressor(hidden_layer_sizes=(32,), max_iter=5, random_state=0).fit(X, X[:, 0])
    calls = {"predict": lambda Xp: clf.predict(Xp), "proba": lambda Xp: clf.predict_proba(Xp),
             "score": lambda Xp: clf.score(Xp, y[:len(Xp)]),
             "reg": lambda Xp: reg.predict(Xp), "r2": lambda Xp: reg.score(Xp, Xp[:, 0])}
    pieces = [X[:1], X[:40], X[:700]]
    oracle = {(name, i): calls[name](p) for name in calls for i, p in enumerate(pieces)}
    counts = {"calls": 0, "wrong": 0}

    def work(t):
        for _ in range(10):
            for (name, i), want in oracle.items():
                counts["calls"] += 1
                counts["wrong"] += not same(calls[name](pieces[i]), want)

    counts["errors"] = run_threads(6, work)
    print(json.dumps(counts))
    """, tmp_path)
    assert out == {"calls": 6 * 10 * 15, "wrong": 0, "errors": []}


def test_estimator_fits_from_two_threads_do_not_collide(tmp_path):
    # Both fits train the estimator's one network: they now run one after
    # the other, and each (not warm-started) ends as a fit alone does.
    out = _run_script(_SHARED_MODEL + """
    import warnings
    warnings.simplefilter("ignore")

    def make():
        return fastbp.MLPClassifier(hidden_layer_sizes=(64,), max_iter=4, batch_size=16,
                                    random_state=0)

    alone = make().fit(X, y)
    results = []
    for solver in ("adam", "lbfgs"):
        alone = make().set_params(solver=solver).fit(X, y)
        est = make().set_params(solver=solver)
        errors = run_threads(2, lambda i: est.fit(X, y))
        results.append([all(np.array_equal(a, b) for a, b in zip(est.coefs_, alone.coefs_)),
                        errors])
    print(json.dumps(results))
    """, tmp_path)
    assert out == [[True, []], [True, []]]


def test_n_threads_pins_each_fit_whatever_another_thread_runs(tmp_path):
    # FASTBP_ISA=baseline sends these products to OpenBLAS (checked below),
    # whose thread count is one for the whole process, and whose results
    # here differ between 1 and 2 threads.  threadpoolctl's limit set by one
    # fit changed the other's (and, from a thread other than the first to
    # set one, was silently ignored): each fit must end bitwise as alone.
    out = _run_script(_SHARED_MODEL + """
    from threadpoolctl import threadpool_info
    from fastbp._ext import dense

    X = rng.normal(size=(1024, 784)).astype(np.float32)
    y = rng.integers(0, 10, 1024)

    def fit(n):
        net = fastbp.Sequential([fastbp.Dense(256, activation="relu"),
                                 fastbp.Dense(256, activation="tanh"), fastbp.Dense(10)], seed=1)
        net.fit(X, y, loss="cross_entropy", epochs=2, batch_size=64, verbose=0, n_threads=n)
        return net.params.copy()

    def blas():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before = blas()
    kernels = sorted({dense.gemm_kernel(64, 256, 784, False, False, "float32"),
                      dense.gemm_kernel(784, 256, 64, True, False, "float32")})
    alone = {n: fit(n) for n in (1, 2)}
    wrong, errors = 0, []
    for trial in range(3):
        got = {}
        errors += run_threads(2, lambda i: got.__setitem__(i + 1, fit(i + 1)))
        wrong += sum(not np.array_equal(got.get(n), alone[n]) for n in (1, 2))
    print(json.dumps({"kernels": kernels, "wrong": wrong, "errors": errors,
                      "blas_restored": blas() == before}))
    """, tmp_path, env={"FASTBP_ISA": "baseline"})
    assert out == {"kernels": ["blas"], "wrong": 0, "errors": [], "blas_restored": True}


def test_blas_thread_counts_take_turns_in_arrival_order():
    """Calls that want the same BLAS count run together; one that wants
    another waits for them, and later calls wait behind it (no starving)."""
    from fastbp import _threads as model

    own = model._BLAS._read()
    log = []
    a_inside, release_a = threading.Event(), threading.Event()

    def call(n, name, inside=None, release=None):
        with model._blas_threads(n), model._BLAS:
            log.append((name, model._BLAS._read()))
            if inside is not None:
                inside.set()
                release.wait(30)

    def queued(k):
        for _ in range(3000):
            if len(model._BLAS._queue) == k:
                return True
            threading.Event().wait(0.01)
        return False

    threads = [threading.Thread(target=call, args=(1, "A", a_inside, release_a))]
    threads[0].start()
    assert a_inside.wait(30)
    for name, n in (("B", 2), ("C", 1)):   # C wants A's count, but arrives after B
        threads.append(threading.Thread(target=call, args=(n, name)))
        threads[-1].start()
        assert queued(len(threads) - 1)
    release_a.set()
    for t in threads:
        t.join(30)
    n_libs = len(own)
    assert log == [("A", [1] * n_libs), ("B", [2] * n_libs), ("C", [1] * n_libs)]
    assert model._BLAS._read() == own   # BLAS's own setting is back


def _predict_in_child(queue):
    from fastbp import _threads as model

    net = fastbp.Sequential([fastbp.Dense(8, activation="relu"), fastbp.Dense(2)], seed=0)
    out = net.build(3).predict(np.ones((4, 3)))
    queue.put((float(out.sum()), model._BLAS._read()))


@pytest.mark.skipif(sys.platform == "win32", reason="fork() does not exist on Windows")
def test_a_child_forked_while_a_thread_holds_blas_predicts():
    """The fork copies the BLAS lock held by a thread that is not in the
    child: the child starts afresh, with BLAS's own thread count."""
    from fastbp import _threads as model

    own = model._BLAS._read()
    inside, release = threading.Event(), threading.Event()

    def hold():
        with model._blas_threads(1), model._BLAS:
            inside.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(30)
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_predict_in_child, args=(queue,))
        child.start()
        child.join(timeout=60)
        assert child.exitcode == 0, "the forked child hung or crashed"
        total, blas = queue.get(timeout=5)
    finally:
        release.set()
        holder.join(30)
    net = fastbp.Sequential([fastbp.Dense(8, activation="relu"), fastbp.Dense(2)], seed=0)
    assert total == float(net.build(3).predict(np.ones((4, 3))).sum())
    assert blas == own
