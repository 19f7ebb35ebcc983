"""``fastbp bench``: the records it reports are consistent and complete.
(Speed itself is measured by benchmarks, never asserted in a test.)"""
import json
import subprocess
import sys

import numpy as np
import pytest

import fastbp
from fastbp import bench


def test_train_flops_counts_forward_dw_and_dx_below_the_first_layer():
    # 3-4-2: MACs 12 and 8; forward 2*(20), dW 2*(20), dX only for layer 2: 2*8
    assert bench.train_flops((3, 4, 2), 1) == 2 * (2 * 20 + 8)
    assert bench.train_flops((3, 4, 2), 10) == 10 * bench.train_flops((3, 4, 2), 1)


def test_run_workload_records(monkeypatch):
    monkeypatch.setitem(bench.WORKLOADS, "tiny", ((5, 8, 3), 16, 256))
    records = bench.run_workload("tiny", ["fastbp", "reference"], threads=1, rounds=2)
    assert [r["implementation"] for r in records] == ["fastbp", "reference"]
    for r in records:
        assert r["samples_per_s"] == pytest.approx(256 / r["train_seconds"])
        assert r["gflops"] == pytest.approx(bench.train_flops((5, 8, 3), 256) / r["train_seconds"] / 1e9)
        assert r["percent_of_peak"] == pytest.approx(100 * r["gflops"] / r["fma_peak_gflops"])
        assert r["isa"] == fastbp._isa.level()
        from fastbp._numba import target_level
        assert r["numba_isa"] == target_level()
        assert r["predict_samples_per_s"] > 0
    fast, ref = records
    assert fast["fastbp_speedup"] == 1.0
    assert ref["fastbp_speedup"] == pytest.approx(ref["train_seconds"] / fast["train_seconds"])
    table = bench.format_table(records)
    assert "tiny" in table and "reference" in table
    assert f"instruction-set level {fastbp._isa.level()}" in table
    if target_level() is not None:
        assert f"its Numba kernels at {target_level()}" in table
    assert "float32" in table and " 16 " in table         # dtype and batch, by name


def test_fma_peak_is_the_probe_times_the_threads(monkeypatch):
    from fastbp._ext import dense

    monkeypatch.setattr(dense, "fma_peak_gflops", lambda dtype="float32", *a, **k:
                        {"float32": 100.0, "float64": 50.0}[dtype])
    assert bench.fma_peak_gflops("float32", 2) == 200.0
    assert bench.fma_peak_gflops("float64", 1) == 50.0


def test_the_reference_runner_trains(monkeypatch):
    """The baseline must do real work: its loss falls over a few epochs."""
    sizes, batch = (5, 8, 3), 16
    X, y = bench.make_data(sizes, 256)
    X[:, 0] += 3 * y  # learnable signal
    train, predict = bench._reference(sizes, batch, X, y, "float32")
    import fastbp._numba.losses as L

    def loss():
        Z = predict()
        return L.cross_entropy_loss_grad(Z, np.eye(3, dtype="float32")[y], np.ones(len(Z), "float32"),
                                         np.empty_like(Z))
    before = loss()
    for _ in range(30):
        train()
    assert loss() < 0.8 * before


def _bench_json(tmp_path, *args):
    """``fastbp bench *args --json`` in a child interpreter: its records."""
    proc = subprocess.run([sys.executable, "-m", "fastbp", "bench", *args, "--json"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_cli_json(tmp_path):
    records = _bench_json(tmp_path, "--workload", "S", "--impl", "fastbp", "--threads", "1",
                          "--rounds", "1", "--no-predict")
    assert len(records) == 1 and records[0]["workload"] == "S"
    assert records[0]["layers"] == "20-64-64-2" and records[0]["threads"] == 1


def test_cli_digits_compares_with_sklearn(tmp_path):
    # The drop-in comparison (README, issue 4): both estimators fit the same
    # digits problem; their weights must agree, and each round is timed.
    records = _bench_json(tmp_path, "--digits", "--batch", "200", "64", "--epochs", "2",
                          "--rounds", "2")
    assert [r["batch"] for r in records] == [200, 64]
    for r in records:
        assert r["epochs"] == 2 and len(r["round_speedups"]) == 2
        assert r["max_coef_diff"] < 1e-12
        assert r["sklearn_seconds"] > 0 and r["fastbp_seconds"] > 0
        assert r["speedup"] == r["sklearn_seconds"] / r["fastbp_seconds"]


def test_phases_account_for_the_step(monkeypatch):
    monkeypatch.setitem(bench.WORKLOADS, "tiny", ((5, 64, 3), 16, 512))
    r = bench.run_phases("tiny", threads=1)
    assert r["steps"] == 512 // 16
    assert {"forward", "loss", "backward", "optimizer"} <= set(r["phase_ms"])
    # the phases are parts of the step, and the GEMMs parts of the phases
    assert sum(r["phase_ms"].values()) <= r["step_ms"]
    assert 0 < r["gemm_ms"] <= r["phase_ms"]["forward"] + r["phase_ms"]["backward"]
    # the bound: the step with its products at the FMA peak, the rest as
    # measured
    at_peak = bench.train_flops((5, 64, 3), 16) / (r["fma_peak_gflops"] * 1e9) * 1e3
    assert r["gemm_at_peak_ms"] == pytest.approx(at_peak)
    assert r["bound_step_ms"] == pytest.approx(r["step_ms"] - r["gemm_ms"] + at_peak)
    text = bench.format_phases([r])
    assert "of which GEMMs" in text and "optimizer" in text
    assert "with its products at the FMA peak" in text
    from fastbp._ext import dense
    assert dense._set_profiling(False) is False      # left off


@pytest.mark.parametrize("args,message", [
    (["--rounds", "0"], "--rounds: 0 is less than 1"),
    (["--threads", "1", "0"], "--threads: 0 is less than 1"),
    (["--digits", "--epochs", "0"], "--epochs: 0 is less than 1"),
    (["--digits", "--batch", "-5"], "--batch: -5 is less than 1"),
    (["--phases", "--threads", "x"], "--threads: 'x' is not an integer"),
    (["--pause", "nan"], "--pause: nan is not a finite number of seconds"),
    (["--pause", "-1"], "--pause: -1 is not a finite number of seconds"),
])
def test_bench_refuses_counts_it_cannot_run_before_running(capsys, args, message):
    # a usage error naming the argument, not a traceback from deep in a run
    with pytest.raises(SystemExit) as exit_:
        bench.main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_peak_counts_no_more_cores_than_the_process_may_run_on(monkeypatch):
    from fastbp._ext import dense
    from fastbp._validation import available_cpus

    monkeypatch.setattr(dense, "fma_peak_gflops", lambda dtype: 10.0)
    assert bench.fma_peak_gflops("float32", 1) == 10.0
    assert bench.fma_peak_gflops("float32", 10 ** 6) == 10.0 * available_cpus()


def test_phases_of_the_row_parallel_step_give_no_bound():
    # its products are not timed apart, so the bound cannot be computed
    r = bench._phase_record("x", (4, 3), 8, "float64", 2, 1.0,
                            {"steps": 10, "gemm": 0.0, "row-parallel forward": 0.5,
                             "backward": 0.3}, 1e6, 50.0)
    assert r["bound_step_ms"] is None
    assert "at the FMA peak" not in bench.format_phases([r])


def test_phases_of_the_digits_fit(tmp_path):
    (r,) = _bench_json(tmp_path, "--phases", "--digits", "--batch", "200", "--epochs", "2",
                       "--threads", "1")
    # 1797 rows in batches of 200: 9 steps an epoch
    assert r["workload"] == "digits" and r["dtype"] == "float64" and r["steps"] == 18
    assert {"forward", "backward", "optimizer"} <= set(r["phase_ms"])
    assert r["bound_step_ms"] is not None and 0 < r["gemm_ms"] < r["step_ms"]


# -- the --plot chart ----------------------------------------------------------------

def _records(order="SML", threads=(2,), ratios=None):
    """run_workload-like records (no timing) with the given speedups."""
    ratios = ratios or {"S": {"reference": 3.1, "sklearn": 12.4, "torch": 4.2},
                        "M": {"reference": 2.2, "sklearn": 6.5, "torch": 1.3},
                        "L": {"reference": 1.1, "sklearn": 2.8, "torch": 0.85}}
    records = []
    for t in threads:
        for w in order:
            for impl in ("fastbp", "reference", "sklearn", "torch"):
                records.append({"workload": w, "threads": t, "implementation": impl,
                                "dtype": "float32", "isa": "avx2", "peer_isa": {},
                                "fastbp_speedup": 1.0 if impl == "fastbp" else ratios[w][impl]})
    return records


def _bars(ax):
    """Bars by legend label: [(x, top)] in drawing order."""
    return {c.get_label(): [(p.get_x() + p.get_width() / 2, p.get_y() + p.get_height())
                            for p in c.patches] for c in ax.containers}


def test_chart_shows_speedups_in_the_tables_order_with_values_and_a_title():
    """The chart drew samples/s on a log scale, workloads sorted L, M, S,
    no values, no dtype/threads/level, and the legend on the bars."""
    fig = bench.figure(_records())
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["S", "M", "L"]
    title = fig.get_suptitle()
    assert "How many times faster fastbp trains than each peer" in title
    assert "float32" in title and "2 threads" in title and "instruction-set level avx2" in title
    bars = _bars(ax)
    assert list(bars) == ["reference", "sklearn", "torch"]
    for peer, expected in (("reference", [3.1, 2.2, 1.1]), ("sklearn", [12.4, 6.5, 2.8]),
                           ("torch", [4.2, 1.3, 0.85])):
        assert [top for _, top in bars[peer]] == pytest.approx(expected)  # from the line at 1
        xs = [x for x, _ in bars[peer]]
        assert xs == sorted(xs) and [round(x) for x in xs] == [0, 1, 2]  # S, M, L groups
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["3.1x", "2.2x", "1.1x", "12x", "6.5x", "2.8x", "4.2x", "1.3x", "0.85x"]
    assert ax.get_yscale() == "log" and "fastbp's" in ax.get_ylabel()
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["reference", "sklearn", "torch"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    assert not box.overlaps(ax.get_window_extent(renderer))  # clear of the bars
    assert not box.overlaps(fig._suptitle.get_window_extent(renderer))


def test_chart_groups_thread_counts_in_run_order_and_labels_them():
    fig = bench.figure(_records(order="LS", threads=(1, 2)))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "L (1 thr)", "S (1 thr)", "L (2 thr)", "S (2 thr)"]
    assert "1, 2 threads" in fig.get_suptitle()


def test_chart_with_one_peer_and_a_peer_missing_from_a_workload():
    records = [r for r in _records() if r["implementation"] in ("fastbp", "reference")
               and not (r["workload"] == "M" and r["implementation"] == "reference")]
    ax = bench.figure(records).axes[0]
    assert [top for _, top in _bars(ax)["reference"]] == pytest.approx([3.1, 1.1])
    assert [t.get_text() for t in ax.texts] == ["3.1x", "1.1x"]


@pytest.mark.parametrize("impls, message", [
    (("reference", "sklearn"), "run fastbp too"),
    (("fastbp",), "none ran"),
])
def test_chart_needs_fastbp_and_a_peer(tmp_path, impls, message):
    records = [r for r in _records() if r["implementation"] in impls]
    with pytest.raises(ValueError, match=message):
        bench.figure(records)
    with pytest.raises(SystemExit, match=message):
        bench.plot(records, tmp_path / "chart.png")
    assert not (tmp_path / "chart.png").exists()


def test_cli_plot_writes_the_chart_of_a_real_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.WORKLOADS, "tiny", ((5, 8, 3), 16, 256))
    path = tmp_path / "chart.png"
    assert bench.main(["--workload", "tiny", "--impl", "fastbp", "reference", "--threads", "1",
                       "--rounds", "1", "--no-predict", "--pause", "0", "--plot",
                       str(path)]) == 0
    assert f"plot written to {path}" in capsys.readouterr().out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_asv_suite_runs_the_bench_workloads_on_the_bench_data():
    """The asv suite had a WORKLOADS of its own (same sizes, other data):
    now S, M and L are fastbp.bench's objects and its data make_data's.  In
    a subprocess, because importing the suite pins BLAS to one thread."""
    import pathlib
    script = (
        "import numpy as np\n"
        "from benchmarks import common\n"
        "from fastbp import bench\n"
        "assert all(common.WORKLOADS[k] is bench.WORKLOADS[k] for k in bench.WORKLOADS)\n"
        "assert set(common.WORKLOADS) == set(bench.WORKLOADS) | {'D'}\n"
        "X, y, Y = common.dataset('S', n=64)\n"
        "X2, y2 = bench.make_data(bench.WORKLOADS['S'][0], 64)\n"
        "assert np.array_equal(X, X2) and np.array_equal(y, y2)\n"
        "assert np.array_equal(Y.argmax(1), y)\n")
    root = pathlib.Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", script], cwd=root / "asv_bench",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_make_data_labels_follow_a_linear_teacher():
    X, y = bench.make_data((6, 4, 3), 500, "float64", seed=3)
    assert X.shape == (500, 6) and X.dtype == np.float64 and y.shape == (500,)
    assert set(np.unique(y)) == {0, 1, 2}
    # labels are the argmax of a linear map: least squares on one-hot targets
    # recovers most of them (of random labels, about a third)
    W = np.linalg.lstsq(X, np.eye(3)[y], rcond=None)[0]
    assert np.mean((X @ W).argmax(1) == y) > 0.8
