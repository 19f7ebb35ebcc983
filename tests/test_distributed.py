"""fit(comm=...): data-parallel training over MPI ranks (fastbp.distributed).

Each test launches ``mpiexec -n N`` (the mpich wheel's, from the test
extras) on tests/mpi/ranks.py in a subprocess with a timeout, so a hang or
a crash fails the test instead of the suite; the ranks write what they
ended with, and the test compares the ranks with each other (bitwise) and
with one process's fit of the same model and settings.
"""
import importlib.util
import pathlib
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

import fastbp

HERE = pathlib.Path(__file__).parent


def _module(name):
    spec = importlib.util.spec_from_file_location(f"mpi_{name}", HERE / "mpi" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ranks = _module("ranks")
launcher = _module("launch")
SCRIPT, MPIEXEC = launcher.SCRIPT, launcher.MPIEXEC

pytestmark = pytest.mark.mpi

TOL = {"float64": 1e-10, "float32": 2e-5}


def launch(n, scenario, args, tmp_path, timeout=240):
    """Run the scenario on n ranks; returns (returncode, seconds, output, results)."""
    out = tmp_path / f"{scenario}-{n}-{time.monotonic_ns()}"
    out.mkdir()
    cmd = launcher.command(n, scenario, out, args)
    env = launcher.env(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpiexec -n {n} {scenario} hung for {timeout} s: {exc.stdout} {exc.stderr}")
    seconds = time.monotonic() - start
    results = [dict(np.load(out / f"rank{r}.npz")) for r in range(n)
               if (out / f"rank{r}.npz").exists()]
    # a rank's error as it wrote it (MPI_Abort can end the job before
    # mpiexec forwards that rank's stderr)
    errors = "".join(p.read_text() for p in sorted(out.glob("rank*.error")))
    return proc.returncode, seconds, proc.stdout + proc.stderr + errors, results


def run_ok(n, scenario, args, tmp_path):
    code, _, output, results = launch(n, scenario, args, tmp_path)
    assert code == 0, output
    assert len(results) == n, output
    return results


def assert_ranks_identical(results, keys=("params", "buffers", "opt_state", "t", "loss",
                                           "val_loss")):
    for r, res in enumerate(results[1:], 1):
        for key in keys:
            assert np.array_equal(res[key], results[0][key]), (key, r)


def rel_err(a, b):
    """Largest difference relative to the array's scale (as helpers.
    assert_close judges compiled against reference results): an entry near
    zero was judged against 1e-3, so a few float32 ulps of the layer's
    scale (2e-8 on weights of 0.3, after the small kernels' one-row fallback
    changed its order of additions) failed a float32 check."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-3))


def single(args, X, y, sample_weight=None, **extra):
    """The one-process fit the ranks must equal."""
    dtype = np.dtype(args["dtype"])
    net = ranks.build(args["model"], dtype)
    net.fit(X, y, optimizer=ranks.optimizer(args["opt"]), sample_weight=sample_weight,
            **ranks.fit_args(args), **extra)
    return net


@pytest.mark.parametrize("n_ranks", [2, 3])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("opt,model", [("sgd", "dense"), ("adam", "dense"),
                                       ("adam", "dropout_residual")])
def test_replicated_data_equals_one_process(tmp_path, n_ranks, dtype, opt, model):
    args = dict(dtype=dtype, opt=opt, model=model, n=203, batch=20, epochs=3, weights=True)
    results = run_ok(n_ranks, "replicated", args, tmp_path)
    assert_ranks_identical(results)
    X, y, w = ranks.data(args["n"], 8, 3, dtype=np.dtype(dtype))
    net = single(args, X, y, sample_weight=w, validation_data=(X[:40], y[:40]))
    assert results[0]["params"].dtype == np.dtype(dtype)
    assert rel_err(results[0]["params"], net._params) < TOL[dtype]
    assert rel_err(results[0]["loss"], np.array(net.history["loss"])) < TOL[dtype]
    assert rel_err(results[0]["val_loss"], np.array(net.history["val_loss"])) < TOL[dtype]


@pytest.mark.parametrize("n_ranks,n,batch", [
    (2, 23, 5),     # a global batch of 5 on 2 ranks, and a last short batch of 3
    (3, 22, 2),     # global batches smaller than the number of ranks: a rank has no rows
    (3, 7, 10),     # one global batch, smaller than batch_size
])
def test_uneven_batches_equal_one_process(tmp_path, n_ranks, n, batch):
    args = dict(dtype="float64", opt="adam", model="dropout_residual", n=n, batch=batch,
                epochs=4, weights=True)
    results = run_ok(n_ranks, "replicated", args, tmp_path)
    assert_ranks_identical(results)
    X, y, w = ranks.data(n, 8, 3)
    net = single(args, X, y, sample_weight=w, validation_data=(X[:40], y[:40]))
    assert rel_err(results[0]["params"], net._params) < 1e-10


def test_batchnorm_uses_each_ranks_statistics(tmp_path):
    """BatchNorm normalises with each rank's own batch statistics (as torch
    DDP without SyncBatchNorm): the ranks agree bitwise, rank 0's running
    statistics are every rank's, and the training differs from one
    process's (whose statistics are the whole batch's)."""
    args = dict(dtype="float64", opt="adam", model="batchnorm", n=200, batch=20, epochs=2)
    results = run_ok(2, "replicated", args, tmp_path)
    assert_ranks_identical(results)
    X, y, _ = ranks.data(200, 8, 3)
    net = single(args, X, y, validation_data=(X[:40], y[:40]))
    assert rel_err(results[0]["params"], net._params) > 1e-6


@pytest.mark.parametrize("n_ranks", [2, 3])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_sync_batchnorm_equals_one_process(tmp_path, n_ranks, dtype):
    """With sync_batchnorm the statistics are the global batch's (torch's
    SyncBatchNorm): a model with Dropout, BatchNorm and a residual block,
    sample weights and uneven slices (batch 20 on 3 ranks, a last batch of
    3) trains as one process, running statistics included."""
    args = dict(dtype=dtype, opt="adam", model="everything", n=203, batch=20, epochs=3,
                weights=True, sync_batchnorm=True)
    results = run_ok(n_ranks, "replicated", args, tmp_path)
    assert_ranks_identical(results)
    X, y, w = ranks.data(args["n"], 8, 3, dtype=np.dtype(dtype))
    net = single(args, X, y, sample_weight=w, validation_data=(X[:40], y[:40]))
    if dtype == "float64":
        assert rel_err(results[0]["params"], net._params) < TOL[dtype]
        assert rel_err(results[0]["buffers"], net._buffers) < TOL[dtype]
        assert rel_err(results[0]["val_loss"], np.array(net.history["val_loss"])) < 1e-10
        return
    # float32: BatchNorm's 1/std amplifies rounding, and one process in
    # float32 is itself 2.6e-5 from float64 here (the 2e-5 of the other
    # models is below that): the ranks must be as close to the float64
    # training as one float32 process is (measured: 2.5e-5 and 4.0e-5 from
    # the float32 process on 2 and 3 ranks).
    X64 = X.astype(np.float64)
    exact = single(dict(args, dtype="float64"), X64, y, sample_weight=w,
                   validation_data=(X64[:40], y[:40]))
    one_process = rel_err(net._params.astype(np.float64), exact._params)
    assert rel_err(results[0]["params"].astype(np.float64), exact._params) < 2 * one_process
    assert rel_err(results[0]["params"], net._params) < 1e-4


def test_sync_batchnorm_refuses_a_rank_without_rows(tmp_path):
    args = dict(dtype="float64", opt="adam", model="batchnorm", n=200, batch=2, epochs=1,
                sync_batchnorm=True)
    results = run_ok(3, "refused", args, tmp_path)
    for res in results:
        assert "sync_batchnorm needs at least 2 rows in every batch and 1 in every " \
               "rank's part" in str(res["message"])


def test_batchnorm_refuses_a_rank_slice_of_one_row(tmp_path):
    args = dict(dtype="float64", opt="adam", model="batchnorm", n=200, batch=3, epochs=1)
    results = run_ok(2, "refused", args, tmp_path)
    for res in results:
        assert "BatchNorm needs at least 2 rows in every batch on every rank" in \
            str(res["message"])


@pytest.mark.parametrize("n_ranks", [2, 3])
def test_sharded_data_equals_one_process_over_the_contributed_rows(tmp_path, n_ranks):
    """Equal shards, no shuffling: global batch b is rank 0's local batch b,
    then rank 1's, ...; one process on the rows in that order, with the
    global batch size, trains the same."""
    per_rank, local = 24, 5
    n = per_rank * n_ranks
    args = dict(dtype="float64", opt="adam", model="dense", n=n, batch=local * n_ranks,
                epochs=3, shuffle=False, weights=True, sizes=[per_rank] * n_ranks)
    results = run_ok(n_ranks, "sharded", args, tmp_path)
    assert_ranks_identical(results)
    X, y, w = ranks.data(n, 8, 3)
    order = []
    for b in range(-(-per_rank // local)):
        for r in range(n_ranks):
            order.extend(range(r * per_rank + b * local,
                               r * per_rank + min((b + 1) * local, per_rank)))
    order = np.array(order)
    net = single(args, X[order], y[order], sample_weight=w[order])
    assert rel_err(results[0]["params"], net._params) < 1e-10
    assert rel_err(results[0]["loss"], np.array(net.history["loss"])) < 1e-10


def test_sharded_uneven_shards_keep_the_ranks_identical(tmp_path):
    """Shards of 30, 7 and 1 rows, shuffled: an epoch lasts the largest
    shard's batches, the others contribute nothing once done."""
    args = dict(dtype="float32", opt="sgd", model="dropout_residual", n=38, batch=6,
                epochs=3, sizes=[30, 7, 1])
    results = run_ok(3, "sharded", args, tmp_path)
    assert_ranks_identical(results)
    assert np.isfinite(results[0]["params"]).all()
    assert results[0]["t"] == 3 * 15   # 30 rows in local batches of 2


@pytest.mark.parametrize("resume_ranks", [2, 1])
def test_checkpoint_on_two_ranks_resumes_on_any_number(tmp_path, resume_ranks):
    path = str(tmp_path / "ckpt.fbp")
    args = dict(dtype="float64", opt="adam", model="dropout_residual", n=150, batch=16,
                epochs=2, path=path)
    run_ok(2, "checkpoint", args, tmp_path)
    results = run_ok(resume_ranks, "checkpoint", dict(args, resume=True, epochs=1), tmp_path)
    assert_ranks_identical(results)
    X, y, _ = ranks.data(150, 8, 3)
    net = single(dict(args, epochs=3), X, y)
    assert rel_err(results[0]["params"], net._params) < 1e-10
    assert rel_err(results[0]["loss"], np.array(net.history["loss"])) < 1e-10


@pytest.mark.parametrize("how", ["exit", "raise"])
def test_a_rank_that_dies_ends_the_job(tmp_path, how):
    code, seconds, output, _ = launch(2, "dies", dict(how=how, dtype="float64"), tmp_path,
                                      timeout=120)
    assert code != 0, output
    assert seconds < 60, (seconds, output)
    if how == "raise":
        assert "rank 1 failed on purpose" in output


def test_ranks_with_different_data_all_get_the_error(tmp_path):
    results = run_ok(2, "mismatch", dict(dtype="float64"), tmp_path)
    for res in results:
        assert "the ranks passed different data" in str(res["message"])


@pytest.mark.parametrize("what", ["epochs", "model"])
def test_ranks_with_different_settings_all_get_the_error(tmp_path, what):
    results = run_ok(2, "mismatch_settings", dict(dtype="float64", what=what), tmp_path)
    for res in results:
        assert "the ranks fit different models, settings or optimizers" in str(res["message"])


def test_a_callback_that_stops_one_rank_stops_every_rank_with_its_reason(tmp_path):
    results = run_ok(3, "one_rank_stops", dict(dtype="float64"), tmp_path)
    assert_ranks_identical(results)
    assert len(results[0]["loss"]) == 2
    for res in results:
        assert list(res["stop"]) == ["callback", "rank 1 had seen enough"], res["stop"]


def test_a_callback_that_changes_one_rank_stops_every_rank(tmp_path):
    results = run_ok(2, "one_rank_callback", dict(dtype="float64"), tmp_path)
    for res in results:
        assert "a callback changed them on some ranks only" in str(res["message"])


def test_a_failing_allreduce_stops_every_rank_with_mpis_message(tmp_path):
    """An MPI error code from the engine's allreduce (here: the null
    communicator) is Status.COMM_FAILED: every rank raises a RuntimeError that
    carries MPI's own message."""
    results = run_ok(2, "bad_handle", dict(dtype="float64"), tmp_path)
    for res in results:
        message = str(res["message"])
        assert message.startswith("MPI_Allreduce failed on rank"), message
        assert "training stopped" in message


@pytest.mark.parametrize("sync_every", [3, 1000])
def test_local_sgd_keeps_the_ranks_identical_and_trains(tmp_path, sync_every):
    """sync_every=H: each rank steps on its own slice, and the ranks average
    their weights every H steps and at each run's end (1000: only there).
    Not one process's training (no equivalence is claimed): the ranks end
    identical, the loss falls, and the result differs from synchronous
    training."""
    args = dict(dtype="float64", opt="adam", model="dropout_residual", n=203, batch=20,
                epochs=6, weights=True, sync_every=sync_every)
    results = run_ok(3, "replicated", args, tmp_path)
    # each rank keeps its own optimizer state (averaged: the weights only)
    assert_ranks_identical(results, keys=("params", "buffers", "t", "loss", "val_loss"))
    assert not np.array_equal(results[0]["opt_state"], results[1]["opt_state"])
    loss = results[0]["loss"]
    assert np.isfinite(results[0]["params"]).all()
    assert loss[-1] < 0.9 * loss[0], loss
    X, y, w = ranks.data(args["n"], 8, 3)
    synchronous = single(args, X, y, sample_weight=w, validation_data=(X[:40], y[:40]))
    assert rel_err(results[0]["params"], synchronous._params) > 1e-6


def test_local_sgd_on_digits_reaches_synchronous_accuracy(tmp_path):
    """The README's comparison: 2 ranks, local SGD every 16 steps, within 3
    points of the synchronous fit's test accuracy."""
    env = launcher.env()
    accuracy = {}
    for h in (1, 16):
        cmd = [*MPIEXEC, "-n", "2", sys.executable, "-P", "-c",
               f"import sys; from fastbp.cli import main; "
               f"sys.exit(main(['mpi-demo', '--sync-every', '{h}']))"]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "all ranks hold the same weights: True" in proc.stdout
        line = next(l for l in proc.stdout.splitlines() if l.startswith("rank 0 of 2"))
        accuracy[h] = float(line.split("test accuracy ")[1].split(",")[0])
    assert accuracy[16] > accuracy[1] - 0.03, accuracy


def test_without_comm_nothing_from_mpi_is_imported():
    code = ("import sys, numpy as np, fastbp\n"
            "net = fastbp.Sequential([fastbp.Dense(2)])\n"
            "net.fit(np.ones((8, 3)), np.ones((8, 2)), epochs=1, verbose=0)\n"
            "print(sorted(m for m in sys.modules\n"
            "             if m.startswith(('mpi4py', 'fastbp.distributed'))))")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_bad_comm_and_shard_arguments_are_refused():
    net = fastbp.Sequential([fastbp.Dense(2)])
    X, y = np.ones((8, 3)), np.ones((8, 2))
    with pytest.raises(TypeError, match="mpi4py intracommunicator"):
        net.fit(X, y, comm="world", verbose=0)
    for kwargs in (dict(shard=True), dict(sync_batchnorm=True), dict(sync_every=4)):
        with pytest.raises(ValueError, match="shard, sync_batchnorm and sync_every need comm"):
            net.fit(X, y, verbose=0, **kwargs)


def test_grid_search_on_a_dask_cluster_equals_the_default_backend():
    """Hyperparameter search scales out through joblib: the same search on
    a dask.distributed LocalCluster of 2 worker processes finds the same
    best parameters and the same scores."""
    import joblib
    from distributed import Client, LocalCluster
    from sklearn.datasets import load_digits
    from sklearn.model_selection import GridSearchCV

    X, y = load_digits(return_X_y=True)
    X, y = X[:500] / 16.0, y[:500]

    def search():
        grid = GridSearchCV(fastbp.MLPClassifier(hidden_layer_sizes=(32,), max_iter=15,
                                                 random_state=0),
                            {"alpha": [1e-4, 1e-1], "learning_rate_init": [1e-3, 1e-2]},
                            cv=3, n_jobs=2)
        with warnings.catch_warnings():
            # 15 iterations do not converge: not the point here
            warnings.simplefilter("ignore")
            grid.fit(X, y)
        return grid

    default = search()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster):
        with joblib.parallel_backend("dask"):
            on_dask = search()
    assert on_dask.best_params_ == default.best_params_
    for key in ("mean_test_score", "split0_test_score", "split1_test_score",
                "split2_test_score"):
        assert np.array_equal(on_dask.cv_results_[key], default.cv_results_[key]), key



@pytest.mark.parametrize("delay", [0.3, 1.5])
def test_ctrl_c_to_mpiexec_stops_every_rank_at_the_same_step(tmp_path, delay):
    """MPICH's mpiexec forwards SIGINT to each rank at slightly different moments;
    the ranks agree at their next call boundary, all stop there with
    KeyboardInterrupt (caught by the scenario), and rank 0's checkpoint
    holds the weights every rank ends with."""
    import signal

    out = tmp_path / "out"
    out.mkdir()
    path = tmp_path / "ckpt.fbp"
    cmd = launcher.command(2, "long_fit", out, dict(dtype="float64", path=str(path)))
    env = launcher.env(OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not all((out / f"started{r}").exists() for r in range(2)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            pytest.fail("mpiexec did not end within 60 s of Ctrl-C")
    if "--oversubscribe" in MPIEXEC:
        # Open MPI's mpirun ends the job on Ctrl-C instead of forwarding it:
        # what is left to check is that nothing hangs
        return
    assert proc.returncode == 0, stdout + stderr
    results = [dict(np.load(out / f"rank{r}.npz")) for r in range(2)]
    assert_ranks_identical(results)
    saved = fastbp.load(path)
    assert np.array_equal(saved._params, results[0]["params"])


def test_the_readme_mpi_demo_prints_that_the_ranks_agree(tmp_path):
    cmd = [*MPIEXEC, "-n", "2", sys.executable, "-P", "-c",
           "import sys; from fastbp.cli import main; sys.exit(main(['mpi-demo']))"]
    env = launcher.env()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all ranks hold the same weights: True" in proc.stdout
    assert proc.stdout.count("test accuracy") == 3   # two ranks and the one-process fit


def test_one_rank_trains_bitwise_as_one_process(tmp_path):
    """comm=MPI.COMM_SELF (a singleton MPI process, no mpiexec): the
    data-parallel step with one rank is the one-process step, bit for bit."""
    code = """if True:
        import sys, numpy as np
        sys.path.insert(0, sys.argv[1])
        from mpi4py import MPI
        import ranks
        X, y, w = ranks.data(157, 8, 3)
        out = []
        for comm in (None, MPI.COMM_SELF):
            net = ranks.build("dropout_residual", np.float64)
            net.fit(X, y, optimizer=ranks.optimizer("adam"), sample_weight=w, comm=comm,
                    **ranks.fit_args(dict(epochs=2, batch=16)))
            out.append(net._params.copy())
        print(np.array_equal(out[0], out[1]))
    """
    env = launcher.env()
    proc = subprocess.run([sys.executable, "-P", "-c", code, str(SCRIPT.parent)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "True"


def test_ranks_with_two_threads_each_equal_one_process(tmp_path):
    """Each rank may run several threads (its GEMMs split across them):
    still one process's training."""
    args = dict(dtype="float64", opt="adam", model="dense", n=203, batch=40, epochs=2,
                weights=True, n_threads=2)
    results = run_ok(2, "replicated", args, tmp_path)
    assert_ranks_identical(results)
    X, y, w = ranks.data(args["n"], 8, 3)
    net = single(args, X, y, sample_weight=w, validation_data=(X[:40], y[:40]))
    assert rel_err(results[0]["params"], net._params) < 1e-10
