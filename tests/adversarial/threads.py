"""Adversarial: Python threads x models.

Each trial runs one scenario in a child interpreter (a crash or a hang is
counted, not fatal) with random sizes, architectures, dtypes and thread
counts drawn from the trial's seed, and compares every result with a
single-threaded oracle computed in the same child before the threads start:

* shared-inference: N threads calling predict, predict_proba, evaluate and
  loss_and_grad on one model (with BatchNorm, Dropout, DropConnect,
  residual blocks), on inputs of 1 to 2,000 rows; bitwise equal.
* separate-fits: N threads each fitting its own model (float32/float64,
  n_threads 1 or 2); bitwise equal to the same fits one after another.
* fit-beside-inference: one thread fits a model while N others call
  predict and loss_and_grad on it; the fit bitwise equal to the fit alone.
* shared-fits: N threads fitting one model with the same arguments; equal
  to N fits in a row (they run one after the other).
* rebuild-beside-predict: one thread rebuilding a seeded model (the same
  weights each time) while N others predict: every prediction equal.
* estimator: N threads calling predict, predict_proba and score on one
  fitted MLPClassifier and predict on an MLPRegressor.
* blas-counts: under FASTBP_ISA=baseline (products go to OpenBLAS, whose
  thread count is one for the process) two to three threads fitting
  models with n_threads 1 and 2 at once; each equal to its fit alone.

Usage::

    python tests/adversarial/threads.py --trials 5          # each scenario
    python tests/adversarial/threads.py --scenarios shared-fits --trials 20

Prints, per scenario, trials run and passed, calls, wrong results,
exceptions, crashes and timeouts.
"""
import argparse
import json
import os
import subprocess
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _children  # noqa: E402

TIMEOUT = 300

_CHILD = r"""
import json, sys, threading, warnings
import numpy as np
import fastbp

scenario, seed = sys.argv[1], int(sys.argv[2])
rnd = np.random.default_rng(seed)
counts = {"calls": 0, "wrong": 0, "exceptions": []}


def run_threads(n, work):
    def guarded(i):
        try:
            work(i)
        except BaseException as exc:
            counts["exceptions"].append(f"{type(exc).__name__}: {exc}"[:200])
    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def same(a, b):
    if isinstance(a, tuple):
        return all(same(x, y) for x, y in zip(a, b))
    return np.array_equal(a, b, equal_nan=True)


def check(got, want):
    counts["calls"] += 1
    counts["wrong"] += not same(got, want)


def data(n, d, k, dtype="float64"):
    return rnd.normal(size=(n, d)).astype(dtype), rnd.integers(0, k, n)


def architecture(rs, width, k):
    kind = int(rs.integers(4))
    if kind == 0:
        return [fastbp.Dense(width, activation="relu"), fastbp.Dense(k)]
    if kind == 1:
        return [fastbp.Dense(width, activation="tanh"), fastbp.BatchNorm(),
                fastbp.Dropout(0.3), fastbp.Dense(width, activation="relu"), fastbp.Dense(k)]
    if kind == 2:
        return [fastbp.Dense(width, activation="relu", dropconnect=0.2),
                fastbp.Residual([fastbp.Dense(width, activation="elu"), fastbp.BatchNorm()]),
                fastbp.Dense(k)]
    return [fastbp.Dense(width, activation="sigmoid"),
            fastbp.Residual([fastbp.Dense(width, activation="relu"), fastbp.Dropout(0.1)]),
            fastbp.Dense(width // 2, activation="tanh"), fastbp.Dense(k)]


def model(width, k, dtype, seed):
    layers = architecture(np.random.default_rng(seed), width, k)
    return fastbp.Sequential(layers, dtype=dtype, seed=seed)


def fit(net, X, y, **kwargs):
    net.fit(X, y, loss="cross_entropy", verbose=0, **{"epochs": 2, "batch_size": 32, **kwargs})


n_threads = int(rnd.integers(2, 9))
d, k, width = int(rnd.integers(3, 40)), int(rnd.integers(2, 6)), int(rnd.integers(8, 96))
dtype = str(rnd.choice(["float32", "float64"]))

if scenario == "shared-inference":
    X, y = data(2000, d, k)
    net = model(width, k, dtype, seed)
    fit(net, X, y)
    calls = {"predict": lambda X, y: net.predict(X),
             "predict_proba": lambda X, y: net.predict_proba(X),
             "evaluate": lambda X, y: net.evaluate(X, y, loss="cross_entropy"),
             "loss_and_grad": lambda X, y: net.loss_and_grad(X, y, loss="cross_entropy")}
    pieces = [(X[:m], y[:m]) for m in sorted({1, 2, int(rnd.integers(3, 64)),
                                              int(rnd.integers(64, 2001))})]
    jobs = [(name, i) for name in calls for i in range(len(pieces))]
    oracle = {job: calls[job[0]](*pieces[job[1]]) for job in jobs}

    def work(t):
        order = np.random.default_rng(t).permutation(len(jobs))
        for _ in range(15):
            for j in order:
                name, i = jobs[j]
                check(calls[name](*pieces[i]), oracle[jobs[j]])
    run_threads(n_threads, work)

elif scenario == "separate-fits":
    specs = [(int(rnd.integers(8, 64)), str(rnd.choice(["float32", "float64"])),
              int(rnd.integers(1, 3)), seed * 100 + i) for i in range(n_threads)]
    X, y = data(600, d, k)

    def train(spec):
        w, dt, nt, s = spec
        net = model(w, k, dt, s)
        fit(net, X, y, n_threads=nt)
        return net.params.copy()
    oracle = [train(spec) for spec in specs]
    run_threads(n_threads, lambda i: check(train(specs[i]), oracle[i]))

elif scenario == "fit-beside-inference":
    X, y = data(3000, d, k)
    alone = model(width, k, dtype, seed)
    fit(alone, X, y)
    net = model(width, k, dtype, seed).build(d)
    done = threading.Event()

    def work(t):
        if t == 0:
            try:
                fit(net, X, y)
            finally:
                done.set()
            return
        while not done.is_set():
            if t % 2:
                net.predict(X[:int(rnd.integers(1, 64))])
            else:
                net.loss_and_grad(X[:32], y[:32], loss="cross_entropy")
            counts["calls"] += 1
    run_threads(n_threads, work)
    check(net.params, alone.params)

elif scenario == "shared-fits":
    X, y = data(800, d, k)
    row = model(width, k, dtype, seed)
    for _ in range(n_threads):
        fit(row, X, y, epochs=1)
    net = model(width, k, dtype, seed)
    run_threads(n_threads, lambda i: fit(net, X, y, epochs=1))
    check(net.params, row.params)
    check(net.history.n_epochs, n_threads)

elif scenario == "rebuild-beside-predict":
    X, y = data(500, d, k)
    net = model(width, k, dtype, seed).build(d)
    pieces = [X[:1], X[:17], X]
    oracle = [net.predict(p) for p in pieces]
    done = threading.Event()

    def work(t):
        if t == 0:
            for _ in range(200):
                net.build(d)
            done.set()
            return
        while not done.is_set():
            i = int(np.random.default_rng().integers(3))
            check(net.predict(pieces[i]), oracle[i])
    run_threads(n_threads, work)

elif scenario == "estimator":
    warnings.simplefilter("ignore")
    X, y = data(1000, d, k)
    clf = fastbp.MLPClassifier(hidden_layer_sizes=(width, width // 2 + 1), max_iter=3,
                               random_state=seed).fit(X, y)
    reg = fastbp.MLPRegressor(hidden_layer_sizes=(width,), max_iter=3,
                              random_state=seed).fit(X, X[:, 0])
    calls = {"predict": lambda p: clf.predict(p), "proba": lambda p: clf.predict_proba(p),
             "score": lambda p: clf.score(p, y[:len(p)]), "reg": lambda p: reg.predict(p)}
    pieces = [X[:1], X[:int(rnd.integers(2, 100))], X]
    oracle = {(name, i): calls[name](p) for name in calls for i, p in enumerate(pieces)}

    def work(t):
        for _ in range(10):
            for (name, i), want in oracle.items():
                check(calls[name](pieces[i]), want)
    run_threads(n_threads, work)

elif scenario == "blas-counts":
    from fastbp._ext import dense
    X, y = data(768, 784, 10, "float32")
    wide = int(rnd.choice([256, 320]))
    assert dense.gemm_kernel(64, wide, 784, False, False, "float32") == "blas"

    def train(nt):
        net = fastbp.Sequential([fastbp.Dense(wide, activation="relu"),
                                 fastbp.Dense(wide, activation="tanh"), fastbp.Dense(10)],
                                seed=seed)
        net.fit(X, y, loss="cross_entropy", epochs=1, batch_size=64, verbose=0, n_threads=nt)
        return net.params.copy()
    alone = {nt: train(nt) for nt in (1, 2)}
    plan = [1 + i % 2 for i in range(int(rnd.integers(2, 4)))]
    run_threads(len(plan), lambda i: check(train(plan[i]), alone[plan[i]]))

print(json.dumps(counts))
"""

SCENARIOS = ("shared-inference", "separate-fits", "fit-beside-inference", "shared-fits",
             "rebuild-beside-predict", "estimator", "blas-counts")


def _trial(scenario, seed):
    env = dict(os.environ)
    if scenario == "blas-counts":
        env["FASTBP_ISA"] = "baseline"
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, scenario, str(seed)], env=env,
                              capture_output=True, text=True, timeout=TIMEOUT,
                              cwd=os.path.dirname(os.path.abspath(__file__)))
    except subprocess.TimeoutExpired:
        return {"timeout": 1}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"crash": 1, "detail": f"exit code {proc.returncode}: {proc.stderr[-500:]}"}
    return json.loads(lines[-1])


def run(scenario, trials, seed=0):
    """Run ``trials`` trials of one scenario; their counts added up."""
    total = Counter()
    details = []
    for i in range(trials):
        result = _trial(scenario, seed * 1000 + i)
        exceptions = result.pop("exceptions", [])
        if "detail" in result:
            details.append(result.pop("detail"))
        details += exceptions
        total.update(result)
        total["exceptions"] += len(exceptions)
        total["passed"] += not (result.get("wrong") or exceptions or result.get("crash")
                                or result.get("timeout"))
    counts = {"scenario": scenario, "trials": trials, "passed": total["passed"],
              "calls": total["calls"], "wrong": total["wrong"],
              "exceptions": total["exceptions"], "crashes": total["crash"],
              "timeouts": total["timeout"]}
    if details:
        counts["first_failures"] = details[:3]
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5, help="trials of each scenario")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return _children.report_all(args.scenarios, run, args.trials, args.seed)


if __name__ == "__main__":
    sys.exit(main())
