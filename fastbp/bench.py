"""``fastbp bench``: training speed of fastbp against its peers, same run.

Each workload trains one epoch (float32 by default, ReLU hidden layers,
softmax cross-entropy, Adam lr 1e-3, shuffled mini-batches) on seeded data
(``make_data``).  Implementations are timed in interleaved rounds and reported by their
median, so a slow spell of this shared machine hits all of them alike:

* ``fastbp``      compiled engine (this package)
* ``reference``   ``fastbp.reference``, plain NumPy
* ``sklearn``     scikit-learn's MLPClassifier (solver adam, alpha 0), when installed
* ``torch``       torch.nn + torch.optim.Adam, when installed

All run with the same BLAS/intra-op thread count (``--threads``), and each
timed run starts after a short pause (``--pause``): thread pools of the
library that ran before keep spinning for a while and would otherwise steal a
core from the next one (measured: an L epoch ran at 2,800 instead of 4,500
samples/s right after a numpy matmul).  GFLOP/s
counts the GEMM work of a training step (forward, dW, and dX below the first
layer: 2 flops per multiply-add), and is also given as a percentage of the
multiply-add peak of that many cores, measured in the same run by a compiled
probe at the instruction-set level fastbp runs at (csrc/peak.h): the
physical limit of a GEMM-bound step.  The level is printed with the table;
``FASTBP_ISA=avx2`` (or ``baseline``) runs fastbp at a lower one.  The peers
choose their own level; to hold them to AVX2 as well on an AVX-512 machine,
start the benchmark with ``OPENBLAS_CORETYPE=Haswell ATEN_CPU_CAPABILITY=avx2
MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2`` too (the records list
which of these were set).

``fastbp bench --digits`` instead fits ``fastbp.MLPClassifier`` and
scikit-learn's on scikit-learn's digits data (100 hidden units, adam,
float64, 200 epochs; ``--batch`` sizes), interleaved, and prints both
medians, their ratio and how far the two fits' weights differ.

``fastbp bench --phases`` instead prints where fastbp's step spends its
time, phase by phase from timers in the engine, and the step it would take
with its products at the FMA peak and everything else as measured (what
the rest of the step holds back); with ``--digits``, for the digits fit.

Size: about 630 lines: one command (``fastbp bench``): its workloads, the
peers' training loops, the interleaved timing and the table, which only
make sense together.
"""
import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

from ._argtypes import at_least as _at_least, seconds as _seconds
from ._validation import MAX_THREADS, available_cpus

#: name -> (layer sizes, batch size, samples); the asv suite (asv_bench/)
#: runs these too
WORKLOADS = {
    "S": ((20, 64, 64, 2), 32, 20_000),
    "M": ((784, 256, 128, 10), 64, 20_000),
    "L": ((1024, 2048, 2048, 10), 256, 4_096),
}
IMPLEMENTATIONS = ("fastbp", "reference", "sklearn", "torch")


def make_data(sizes, n, dtype="float32", seed=0):
    """Seeded data for a network of layer ``sizes``: standard-normal inputs
    X (n, sizes[0]) of ``dtype``, and integer labels y (n,) in
    [0, sizes[-1]) from a fixed random linear teacher T (the argmax of
    X @ T), so that a network has something to learn (the asv suite tracks
    the loss it reaches)."""
    rng = np.random.default_rng(seed)
    scalar = np.dtype(dtype).type
    X = rng.standard_normal((n, sizes[0]), dtype=scalar)
    teacher = rng.standard_normal((sizes[0], sizes[-1]), dtype=scalar)
    y = np.argmax(X @ teacher, axis=1).astype(np.int64)
    return X, y


def train_flops(sizes, n):
    """GEMM flops of one epoch over n samples."""
    macs = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
    return 2 * n * (2 * sum(macs) + sum(macs[1:]))


def make_fastbp(sizes, dtype="float32", seed=0):
    import fastbp

    layers = [fastbp.Dense(s, activation="relu") for s in sizes[1:-1]]
    return fastbp.Sequential(layers + [fastbp.Dense(sizes[-1])], dtype=dtype, seed=seed)


# Each runner factory returns (train_one_epoch, predict): callables with no
# arguments, already warmed up (compiled, allocated) on a few batches.

def _fastbp(sizes, batch, X, y, dtype):
    import fastbp

    net = make_fastbp(sizes, dtype)
    opt = fastbp.optim.Adam(lr=1e-3)
    net.fit(X[:4 * batch], y[:4 * batch], loss="cross_entropy", optimizer=opt, epochs=1,
            batch_size=batch, verbose=0)
    net.predict(X[:batch])

    def train():
        net.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=batch, verbose=0)
    return train, lambda: net.predict(X)


def _reference(sizes, batch, X, y, dtype):
    from . import reference

    net = make_fastbp(sizes, dtype).build(sizes[0])
    params, program = net.params.copy(), net._program
    Y = np.eye(sizes[-1], dtype=dtype)[y]
    m, v, t = np.zeros_like(params), np.zeros_like(params), [0]
    rng = np.random.default_rng(1)

    def adam(p, g):
        t[0] += 1
        reference.adam_step(p, g, m, v, None, t[0], 1e-3, 0.9, 0.999, 1e-8, 0.0, False, False)

    def train():
        reference.train_batches(X, Y, rng.permutation(len(X)), batch, program, params,
                                "cross_entropy", adam)
    return train, lambda: reference.forward(X, program, params)


def _sklearn(sizes, batch, X, y, dtype):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=sizes[1:-1], activation="relu", solver="adam",
                        alpha=0.0, batch_size=batch, learning_rate_init=1e-3, max_iter=1,
                        shuffle=True, random_state=0, tol=0, n_iter_no_change=10 ** 9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.partial_fit(X[:4 * batch], y[:4 * batch], classes=np.arange(sizes[-1]))

    def train():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.partial_fit(X, y)
    return train, lambda: clf.predict_proba(X)


def _torch(sizes, batch, X, y, dtype):
    import torch

    torch.manual_seed(0)
    layers = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(sizes[-2], sizes[-1]))
    model = model.to(getattr(torch, dtype))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

    def train():
        perm = torch.randperm(len(Xt))
        for s in range(0, len(Xt), batch):
            idx = perm[s:s + batch]
            opt.zero_grad()
            loss_fn(model(Xt[idx]), yt[idx]).backward()
            opt.step()

    def predict():
        with torch.no_grad():
            return model(Xt)
    for s in range(0, 4 * batch, batch):  # warm-up
        opt.zero_grad()
        loss_fn(model(Xt[s:s + batch]), yt[s:s + batch]).backward()
        opt.step()
    return train, predict


RUNNERS = {"fastbp": _fastbp, "reference": _reference, "sklearn": _sklearn, "torch": _torch}


def available(name):
    if name in ("fastbp", "reference"):
        return True
    module = {"sklearn": "sklearn", "torch": "torch"}[name]
    try:
        __import__(module)
        return True
    except ImportError:
        return False


#: environment variables that cap the peers' instruction sets (recorded)
PEER_ISA_VARIABLES = ("OPENBLAS_CORETYPE", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                      "ONEDNN_MAX_CPU_ISA")


def fma_peak_gflops(dtype="float32", threads=1):
    """The multiply-add peak of ``threads`` cores at fastbp's instruction-set
    level: one core's, measured now by csrc/peak.h, times the core count
    (at most the CPUs this process may run on, as fastbp's own threads
    are)."""
    from ._ext import dense

    return min(threads, available_cpus()) * dense.fma_peak_gflops(dtype)


def isa_note():
    """The instruction-set levels in use, for the table's footer."""
    from . import _isa

    peers = ", ".join(f"{v}={os.environ[v]}" for v in PEER_ISA_VARIABLES if os.environ.get(v))
    numba = _numba_level()
    numba = "" if numba is None else (
        f", its Numba kernels at {numba}"
        + (" (NUMBA_CPU_FEATURES)" if os.environ.get("NUMBA_CPU_FEATURES") else ""))
    return (f"fastbp ran at instruction-set level {_isa.level()} (this CPU has "
            f"{_isa.hardware()}{numba}); peers at their own" + (f" ({peers})" if peers else ""))


class _Threads:
    """Set BLAS (numpy/scipy/OpenBLAS) and torch intra-op threads, then restore."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        from threadpoolctl import threadpool_limits

        self._limits = threadpool_limits(self.n)
        self._torch = None
        if "torch" in sys.modules:
            import torch

            self._torch = torch.get_num_threads()
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        self._limits.restore_original_limits()
        if self._torch is not None:
            import torch

            torch.set_num_threads(self._torch)
        return False


def _median_time(fn, times, pause):
    # Another library's BLAS/OpenMP threads spin for a while after their last
    # call and would steal a core from whoever runs next: let them settle.
    time.sleep(pause)
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)


def run_workload(name, impls, threads, rounds=5, dtype="float32", predict=True, pause=0.25):
    """Time one workload; returns a list of result records (dicts)."""
    sizes, batch, n = WORKLOADS[name]
    X, y = make_data(sizes, n, dtype)
    with _Threads(threads):
        peak = fma_peak_gflops(dtype, threads)
        runners = {impl: RUNNERS[impl](sizes, batch, X, y, dtype) for impl in impls}
        train_t = {impl: [] for impl in impls}
        pred_t = {impl: [] for impl in impls}
        for _ in range(rounds):  # interleaved: every implementation once per round
            for impl in impls:
                _median_time(runners[impl][0], train_t[impl], pause)
            if predict:
                for impl in impls:
                    _median_time(runners[impl][1], pred_t[impl], pause)
    flops = train_flops(sizes, n)
    records = []
    for impl in impls:
        t = float(np.median(train_t[impl]))
        rec = {"workload": name, "layers": "-".join(map(str, sizes)), "batch": batch, "n": n,
               "dtype": dtype, "threads": threads, "implementation": impl,
               "train_seconds": t, "samples_per_s": n / t, "gflops": flops / t / 1e9,
               "fma_peak_gflops": peak, "percent_of_peak": 100 * flops / t / 1e9 / peak,
               "isa": _isa_level(), "numba_isa": _numba_level(), "rounds": rounds,
               "peer_isa": {v: os.environ[v] for v in PEER_ISA_VARIABLES if os.environ.get(v)}}
        if predict:
            rec["predict_samples_per_s"] = n / float(np.median(pred_t[impl]))
        records.append(rec)
    base = {r["implementation"]: r for r in records}.get("fastbp")
    for rec in records:
        if base is not None:
            rec["fastbp_speedup"] = rec["train_seconds"] / base["train_seconds"]
            if predict:
                rec["fastbp_predict_speedup"] = (base["predict_samples_per_s"]
                                                 / rec["predict_samples_per_s"])
    return records


def run_phases(name, threads, dtype="float32"):
    """Where one epoch of fastbp's training step spends its time: the
    engine's phase timers (gather, forward, loss, backward, penalty, clip,
    optimizer, and the row-parallel forward), with the products computed
    through the layer-by-layer path's GEMM entry point counted apart
    ("gemm", a part of forward and backward), and the step's bound (see
    ``_phase_record``).  Returns a record."""
    sizes, batch, n = WORKLOADS[name]
    X, y = make_data(sizes, n, dtype)
    with _Threads(threads):
        train, _ = _fastbp(sizes, batch, X, y, dtype)
        wall, phases = _profiled(train)
        peak = fma_peak_gflops(dtype, threads)
    return _phase_record(name, sizes, batch, dtype, threads, wall, phases,
                         train_flops(sizes, batch) * phases["steps"], peak)


def run_digits_phases(batch=200, threads=None, epochs=20):
    """``run_phases`` for the digits drop-in (``run_digits``' fit of
    ``fastbp.MLPClassifier``, float64, ``epochs`` epochs in full): its steps
    include the estimator's own work between epochs."""
    from sklearn.exceptions import ConvergenceWarning

    import fastbp

    X, y = _digits()
    threads = threads or available_cpus()
    kw = _digits_settings(batch, epochs)
    with warnings.catch_warnings(), _Threads(threads):
        warnings.simplefilter("ignore", ConvergenceWarning)
        fastbp.MLPClassifier(**{**kw, "max_iter": 1}).fit(X, y)   # first-use compiles
        wall, phases = _profiled(lambda: fastbp.MLPClassifier(**kw).fit(X, y))
        peak = fma_peak_gflops("float64", threads)
    sizes = (X.shape[1], 100, 10)
    return _phase_record("digits", sizes, batch, "float64", threads, wall, phases,
                         train_flops(sizes, len(X)) * epochs, peak)


def _profiled(train):
    """Runs ``train()`` with the engine's phase timers on (and off again
    after); returns its wall time and the timers' counts."""
    from ._ext import dense, engine

    engine._phase_seconds()
    previous = dense._set_profiling(True)
    try:
        t0 = time.perf_counter()
        train()
        wall = time.perf_counter() - t0
    finally:
        dense._set_profiling(previous)
    return wall, engine._phase_seconds()


def _phase_record(name, sizes, batch, dtype, threads, wall, phases, flops, peak):
    """run_phases' record from the timers (``phases``), the wall time and
    the GEMM flops of the steps timed.

    ``bound_step_ms`` is the step with its products at the FMA peak and
    every other phase as measured: how fast the step could be with perfect
    GEMMs, so what the rest of the step holds back.  None on the
    row-parallel path, whose products are not timed apart."""
    phases = dict(phases)
    steps = phases.pop("steps")
    per = max(steps, 1)
    gemm = phases.pop("gemm")
    at_peak = flops / per / (peak * 1e9)
    step = wall / per
    bound = None if phases.get("row-parallel forward") else step - gemm / per + at_peak
    return {"workload": name, "layers": "-".join(map(str, sizes)), "batch": batch,
            "dtype": dtype, "threads": threads, "isa": _isa_level(),
            "numba_isa": _numba_level(), "steps": steps,
            "step_ms": 1e3 * step,
            "phase_ms": {k: 1e3 * v / per for k, v in phases.items() if v},
            "gemm_ms": 1e3 * gemm / per,
            "gemm_percent_of_peak": 100 * flops / max(gemm, 1e-12) / 1e9 / peak,
            "step_percent_of_peak": 100 * flops / wall / 1e9 / peak,
            "gemm_at_peak_ms": 1e3 * at_peak,
            "bound_step_ms": None if bound is None else 1e3 * bound,
            "fma_peak_gflops": peak}


def format_phases(records):
    lines = []
    for r in records:
        total = sum(r["phase_ms"].values())
        lines.append(f"{r['workload']} ({r['layers']}, batch {r['batch']}, {r['dtype']}), "
                     f"{r['threads']} thread{'s' * (r['threads'] > 1)}, {r['isa']}: "
                     f"{r['step_ms']:.3f} ms a step, {r['step_percent_of_peak']:.0f}% of the "
                     f"FMA peak ({r['fma_peak_gflops']:.0f} GFLOP/s)")
        for k, v in r["phase_ms"].items():
            lines.append(f"  {k:<22}{v:>10.3f} ms{100 * v / total:>7.1f}%")
        if r["gemm_ms"]:
            lines.append(f"  {'of which GEMMs':<22}{r['gemm_ms']:>10.3f} ms"
                         f"{100 * r['gemm_ms'] / total:>7.1f}%  "
                         f"({r['gemm_percent_of_peak']:.0f}% of the FMA peak)")
        if r["bound_step_ms"] is not None:
            lines.append(f"  with its products at the FMA peak ({r['gemm_at_peak_ms']:.3f} ms) "
                         f"and the rest as measured: {r['bound_step_ms']:.3f} ms a step, "
                         f"{r['step_ms'] / r['bound_step_ms']:.2f}x this one's speed")
    return "\n".join(lines)


def _isa_level():
    from . import _isa

    return _isa.level()


def _numba_level():
    """The level of the code Numba compiles fastbp's optimizers and losses
    to (FASTBP_ISA does not cap it: fastbp._isa.numba_features)."""
    from ._numba import target_level

    return target_level()


def _digits():
    """scikit-learn's digits data, X scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return X / 16.0, y


def _digits_settings(batch, epochs):
    """The drop-in comparison's estimator settings: 100 hidden units, adam,
    ``epochs`` epochs run in full, a fixed ``random_state``."""
    return dict(hidden_layer_sizes=(100,), solver="adam", max_iter=epochs, random_state=0,
                batch_size=batch, tol=0, n_iter_no_change=10 ** 9)


def run_digits(batch_sizes=(200,), rounds=7, epochs=200, threads=None, pause=0.25):
    """fastbp.MLPClassifier against scikit-learn's on its bundled digits data.

    The issue's drop-in comparison: 100 hidden units, adam, float64 (the
    scikit-learn default), ``epochs`` epochs run in full (``tol=0``), the
    same ``random_state``; fits interleaved, each after a pause.  Returns one
    record per batch size with both medians, their ratio, every round's
    ratio, and the largest difference between the two fits' ``coefs_``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier as SKMLPClassifier

    import fastbp

    X, y = _digits()
    records = []
    with warnings.catch_warnings(), _Threads(threads or available_cpus()):
        warnings.simplefilter("ignore", ConvergenceWarning)
        for batch in batch_sizes:
            kw = _digits_settings(batch, epochs)
            fastbp.MLPClassifier(**{**kw, "max_iter": 1}).fit(X, y)   # first-use compiles
            t_sk, t_fb, fits = [], [], {}

            def fit_sklearn():
                fits["sklearn"] = _fit_or_interrupt(SKMLPClassifier(**kw), X, y)

            def fit_fastbp():
                fits["fastbp"] = _fit_or_interrupt(fastbp.MLPClassifier(**kw), X, y)

            for _ in range(rounds):
                _median_time(fit_sklearn, t_sk, pause)
                _median_time(fit_fastbp, t_fb, pause)
            diff = max(float(np.abs(a - b).max())
                       for a, b in zip(fits["sklearn"].coefs_, fits["fastbp"].coefs_))
            records.append({
                "batch": batch, "epochs": epochs, "rounds": rounds,
                "threads": threads or available_cpus(),
                "sklearn_seconds": float(np.median(t_sk)),
                "fastbp_seconds": float(np.median(t_fb)),
                "speedup": float(np.median(t_sk) / np.median(t_fb)),
                "round_speedups": [a / b for a, b in zip(t_sk, t_fb)],
                "max_coef_diff": diff, "isa": _isa_level()})
    return records


def _fit_or_interrupt(estimator, X, y):
    """``estimator.fit(X, y)``, re-raising the Ctrl-C that the estimators
    turn into a warning ("Training interrupted by user."), as scikit-learn
    does: the benchmark went on, and timed the cut-short fit as a round."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        estimator.fit(X, y)
    if any("interrupted by user" in str(w.message) for w in caught):
        raise KeyboardInterrupt
    return estimator


def format_digits(records):
    lines = []
    for r in records:
        rounds = " ".join(f"{x:.1f}" for x in r["round_speedups"])
        lines.append(f"digits, batch {r['batch']}, {r['epochs']} epochs, {r['threads']} threads, "
                     f"fastbp at {r['isa']}: "
                     f"scikit-learn {r['sklearn_seconds']:.3f} s, fastbp "
                     f"{r['fastbp_seconds']:.3f} s (medians of {r['rounds']}): "
                     f"{r['speedup']:.1f}x; rounds {rounds}; coefs_ differ by at most "
                     f"{r['max_coef_diff']:.1e}")
    return "\n".join(lines)


def format_table(records):
    head = (f"{'workload':<9}{'batch':>6}{'dtype':>9}{'impl':>11}{'thr':>4}{'samples/s':>13}"
            f"{'GFLOP/s':>9}{'% FMA peak':>11}{'fastbp x':>10}{'predict/s':>13}{'pred x':>8}")
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(
            f"{r['workload']:<9}{r['batch']:>6}{r['dtype']:>9}{r['implementation']:>11}"
            f"{r['threads']:>4}{r['samples_per_s']:>13,.0f}{r['gflops']:>9.1f}"
            f"{r['percent_of_peak']:>10.0f}%{r.get('fastbp_speedup', float('nan')):>9.2f}x"
            + (f"{r['predict_samples_per_s']:>13,.0f}{r['fastbp_predict_speedup']:>7.2f}x"
               if "fastbp_predict_speedup" in r else f"{'-':>13}{'-':>8}"))
    peaks = sorted({(r["threads"], r["dtype"], round(r["fma_peak_gflops"], 1)) for r in records})
    lines.append("multiply-add peak (csrc/peak.h, same run): "
                 + ", ".join(f"{t} thread{'s' * (t > 1)} {d} {p} GFLOP/s" for t, d, p in peaks))
    lines.append(isa_note())
    lines.append("'fastbp x' = that implementation's epoch time / fastbp's (medians); "
                 "'pred x' likewise for predict.")
    return "\n".join(lines)


def _speedups(records):
    """The chart's numbers, in the table's order: ``groups``, the
    (workload, threads) pairs in the order first run; ``peers``, the
    implementations other than fastbp, in IMPLEMENTATIONS' order; and
    ``ratios[peer]``, for each group, that peer's epoch time / fastbp's
    (how many times faster fastbp trains), None where it did not run."""
    groups = list(dict.fromkeys((r["workload"], r["threads"]) for r in records))
    ran = {r["implementation"] for r in records}
    if "fastbp" not in ran:
        raise ValueError("the chart shows how many times faster fastbp is than each peer: "
                         "run fastbp too (--impl fastbp ...)")
    peers = [i for i in IMPLEMENTATIONS if i in ran and i != "fastbp"]
    if not peers:
        raise ValueError("the chart compares fastbp with its peers: none ran (install "
                         "scikit-learn or torch, or add --impl reference)")
    ratios = {peer: [None] * len(groups) for peer in peers}
    for r in records:
        if r["implementation"] in ratios and "fastbp_speedup" in r:
            ratios[r["implementation"]][groups.index((r["workload"], r["threads"]))] = \
                r["fastbp_speedup"]
    return groups, peers, ratios


def _chart_title(records):
    """What the numbers depend on: dtype, thread counts and fastbp's
    instruction-set level (and the peers' caps, when set)."""
    def listed(key):
        return ", ".join(str(v) for v in dict.fromkeys(r[key] for r in records))
    threads = list(dict.fromkeys(r["threads"] for r in records))
    peer_isa = {k: v for r in records for k, v in r.get("peer_isa", {}).items()}
    caps = "" if not peer_isa else " (" + ", ".join(f"{k}={v}" for k, v in peer_isa.items()) + ")"
    return (f"How many times faster fastbp trains than each peer (epoch time, median)\n"
            f"{listed('dtype')}, {listed('threads')} thread{'s' * (threads != [1])}, fastbp at "
            f"instruction-set level {listed('isa')}, peers at their own levels{caps}")


def _times(ratio):
    """A ratio as the chart prints it: two significant digits ("0.85x",
    "3.1x", "12x"), whole numbers from 100."""
    return f"{ratio:.0f}x" if ratio >= 100 else f"{ratio:.2g}x"


def figure(records):
    """The ``--plot`` chart of ``run_workload`` records, as a matplotlib
    Figure (Agg canvas, no pyplot state).

    One group of bars per workload (and thread count), in the table's
    order; one bar per peer, of its epoch time / fastbp's (log scale, from
    the line at 1: a bar that rises is a peer fastbp beats, one that falls
    a peer faster than fastbp), with the ratio printed on it.  The title
    gives the dtype, the thread counts and the instruction-set level; the
    legend sits below the axes, clear of the bars.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'fastbp[plot]'") from None
    groups, peers, ratios = _speedups(records)
    several = len({t for _, t in groups}) > 1
    # wide enough for the title, and about 0.5 inch a bar
    fig = Figure(figsize=(max(8.0, 1.5 + 0.55 * len(groups) * (len(peers) + 0.6)), 5.0),
                 layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(peers)
    for j, peer in enumerate(peers):
        xs = [i - 0.4 + (j + 0.5) * width for i, v in enumerate(ratios[peer]) if v is not None]
        vs = [v for v in ratios[peer] if v is not None]
        bars = ax.bar(xs, [v - 1 for v in vs], width * 0.92, bottom=1, label=peer,
                      color=f"C{IMPLEMENTATIONS.index(peer)}")
        ax.bar_label(bars, labels=[_times(v) for v in vs], padding=2, fontsize="small")
    values = [v for peer in peers for v in ratios[peer] if v is not None]
    ax.set_yscale("log")
    # room for the labels above the tallest bar and below the lowest one
    ax.set_ylim(min(min(values), 1) / 1.6, max(max(values), 1) * 1.8)
    ax.axhline(1, color="0.3", linewidth=0.8)
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _times(v)))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{w} ({t} thr)" if several else w for w, t in groups])
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_xlabel("workload (fastbp bench's table)")
    ax.set_ylabel("peer's time / fastbp's (x faster)")
    ax.grid(True, axis="y", which="major", alpha=0.3)
    fig.suptitle(_chart_title(records), fontsize="medium")
    fig.legend(loc="outside lower center", ncols=len(peers), title="fastbp compared with")
    return fig


def _check_plot_path(path):
    """ImportError, OSError or ValueError unless ``plot`` could write
    ``path``: matplotlib installed, a format it writes, a folder that
    exists, and a regular file (or none) there (``fastbp._files``)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("needs matplotlib: pip install 'fastbp[plot]'") from None
    from . import _files
    from .plotting import _figure_format

    _figure_format(path, FigureCanvasAgg(Figure()).get_supported_filetypes())
    _files.target(path, "a figure")   # (a missing folder: FileNotFoundError)


def plot(records, path):
    """Write ``figure(records)`` to ``path`` (format from the extension,
    PNG without one); returns ``path``."""
    from .plotting import _save

    try:
        fig = figure(records)
    except (ImportError, ValueError) as exc:
        raise SystemExit(f"--plot: {exc}") from None
    _save(fig, path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastbp bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--impl", nargs="+", default=None, choices=IMPLEMENTATIONS,
                        help="implementations to run (default: all that are installed)")
    parser.add_argument("--threads", nargs="+", type=_at_least(1, MAX_THREADS),
                        default=[available_cpus()],
                        help="thread counts to run at (default: all cores)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--rounds", type=_at_least(1), default=5)
    parser.add_argument("--no-predict", action="store_true", help="skip predict timings")
    parser.add_argument("--pause", type=_seconds, default=0.25,
                        help="seconds of idle before each timed run, so that thread pools of "
                             "the previous implementation stop spinning (default 0.25)")
    parser.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw a bar chart (needs matplotlib)")
    parser.add_argument("--digits", action="store_true",
                        help="instead: fastbp.MLPClassifier against scikit-learn's on the digits "
                             "data (100 hidden units, adam, float64), at --batch")
    parser.add_argument("--batch", nargs="+", type=_at_least(1), default=[200],
                        help="batch sizes for --digits (default 200, scikit-learn's 'auto')")
    parser.add_argument("--epochs", type=_at_least(1), default=200,
                        help="epochs for --digits (default 200)")
    parser.add_argument("--phases", action="store_true",
                        help="instead: where fastbp's training step spends its time, phase by "
                             "phase, for each --workload and --threads (with --digits: for the "
                             "digits fit, at each --batch, for --epochs)")
    args = parser.parse_args(argv)
    if args.plot:   # checked now, not after the whole benchmark has run
        try:
            _check_plot_path(args.plot)
        except (ImportError, OSError, ValueError) as exc:
            parser.error(f"--plot: {exc}")
    if args.phases and args.digits:
        records = [run_digits_phases(batch, threads, args.epochs)
                   for threads in args.threads for batch in args.batch]
        print(json.dumps(records, indent=1) if args.json else format_phases(records))
        return 0
    if args.phases:
        records = [run_phases(name, threads, args.dtype)
                   for threads in args.threads for name in args.workload]
        print(json.dumps(records, indent=1) if args.json else format_phases(records))
        return 0
    if args.digits:
        records = run_digits(args.batch, args.rounds, args.epochs, args.threads[0], args.pause)
        print(json.dumps(records, indent=1) if args.json else format_digits(records))
        return 0
    impls = [i for i in (args.impl or IMPLEMENTATIONS) if available(i)]
    records = []
    for threads in args.threads:
        for name in args.workload:
            records += run_workload(name, impls, threads, args.rounds, args.dtype,
                                    predict=not args.no_predict, pause=args.pause)
            if not args.json:
                print(f"done: {name} at {threads} threads", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        print(format_table(records))
    if args.plot:
        print(f"plot written to {plot(records, args.plot)}")
    return 0
