"""Adversarial: Ctrl-C (SIGINT) and SIGKILL at random moments of fit, of a
fit with a checkpoint, and of save.

Each trial runs a child interpreter that trains (or saves) and sends one
signal to it at a random moment, then checks what the README promises:

* SIGINT is never lost: the child's fit raises KeyboardInterrupt (the
  estimators warn "Training interrupted by user.", as scikit-learn does), or,
  when it arrives after the fit, it interrupts the child's wait for the
  parent's word that the signal was sent.  A child whose fit returned
  normally and whose wait ended undisturbed has lost it.
* The model is consistent when it stops: the optimizer's step count equals
  the steps of the finished epochs plus those of the unfinished one, the
  weights are finite; for the estimators n_iter_ == len(loss_curve_).
* A checkpoint (or a file being saved) left by SIGINT or SIGKILL loads, and
  the run resumed from it (the README's command, in a fresh process) ends
  bitwise equal to a run that was never interrupted.

Kinds: fit-sigint (one epoch), fit3-sigint (three epochs), sklearn-sigint,
lm-sigint, ckpt-sigint, ckpt-sigkill, save-sigint, save-sigkill.

Usage::

    python tests/adversarial/interrupts.py --trials 10      # each kind
    python tests/adversarial/interrupts.py --kinds fit-sigint --trials 40

Prints, per kind, the trials run, passed and failures by kind.
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _children  # noqa: E402

TIMEOUT = 120

_COMMON = r"""
import json, os, signal, sys, time, warnings
# Ctrl-C as a terminal delivers it: a child of a shell's background job
# starts with SIGINT ignored (POSIX), which would make every trial moot
signal.signal(signal.SIGINT, signal.default_int_handler)
import numpy as np
import fastbp

rng = np.random.default_rng(0)
X = rng.normal(size=(6000, 20))
y = rng.integers(0, 3, 6000)
EPOCHS, BATCH, EVERY = 3, 32, 50
N_BATCHES = -(-len(X) // BATCH)


def model():
    return fastbp.Sequential([fastbp.Dense(64, activation="relu"),
                              fastbp.Dense(64, activation="tanh"), fastbp.Dense(3)], seed=0)


def fit(net, epochs, **kwargs):
    net.fit(X, y, loss="cross_entropy", epochs=epochs, batch_size=BATCH, verbose=0, **kwargs)


def consistent(net):
    done = net.history.n_epochs * N_BATCHES
    if net._position is not None:
        done += net._position["batch"]
    return net.optimizer is None or (net.optimizer.t == done and np.isfinite(net.params).all())
"""

# The child: argv = mode, path.  Prints READY, runs, then waits for the
# parent's line saying the signal was sent: a SIGINT that arrives after the
# fit shows up as KeyboardInterrupt there, and one the fit dropped does not.
_CHILD = _COMMON + r"""
mode, path = sys.argv[1], sys.argv[2]
result = {}


def run():
    if mode in ("fit", "fit3"):
        net = model()
        try:
            fit(net, 1 if mode == "fit" else 3)
        finally:
            result["consistent"] = bool(consistent(net))
    elif mode == "ckpt":
        fit(model(), EPOCHS, checkpoint=path, checkpoint_every=EVERY)
    elif mode == "sklearn":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            est = fastbp.MLPClassifier(hidden_layer_sizes=(64, 64), batch_size=BATCH, max_iter=2,
                                       random_state=0).fit(X, y)
        result["consistent"] = est.n_iter_ == len(est.loss_curve_)
        if any("interrupted by user" in str(w.message) for w in caught):
            raise KeyboardInterrupt
    elif mode == "lm":
        from fastbp.optim import LevenbergMarquardt
        net = fastbp.Sequential([fastbp.Dense(12, activation="tanh"), fastbp.Dense(1)],
                                dtype="float64", seed=0)
        opt = LevenbergMarquardt()
        try:
            net.fit(X[:3000], X[:3000, :1] ** 2, optimizer=opt, epochs=4, verbose=0)
        finally:
            result["consistent"] = bool(opt.t <= net.history.n_epochs
                                        and np.isfinite(net.params).all())
    elif mode == "save":
        net = model()
        fit(net, 1)
        net.save(path)
        print("READY", flush=True)
        for i in range(1, 10 ** 9):
            net.params[...] = i   # version i of the file holds i everywhere
            net.save(path)


# warm up (Numba's cached kernels load on first use), so that the signal's
# random moment falls in the training itself
net = model()
net.fit(X[:64], y[:64], loss="cross_entropy", epochs=1, verbose=0)
net.predict(X[:2])
if mode == "sklearn":
    fastbp.MLPClassifier(hidden_layer_sizes=(4,), max_iter=1).fit(X[:64], y[:64])
if mode != "save":
    print("READY", flush=True)
start = time.perf_counter()
try:
    run()
    result["outcome"] = "returned"
except KeyboardInterrupt:
    result["outcome"] = "interrupted"
result["seconds"] = time.perf_counter() - start
try:
    sys.stdin.readline()
except KeyboardInterrupt:
    result["outcome"] += "+after"
print(json.dumps(result), flush=True)
"""

# Finishes the run from the checkpoint (or from scratch if there is none)
# with the README's command, or reads a saved file back.  argv = mode, path.
_RESUME = _COMMON + r"""
mode, path = sys.argv[1], sys.argv[2]
if mode == "save":
    params = fastbp.load(path).params
    first = model()
    fit(first, 1)
    print(json.dumps({"ok": bool(np.array_equal(params, first.params)
                                 or np.all(params == np.round(params[0])))}))
    sys.exit()
if mode == "oracle":
    net = model()
    fit(net, EPOCHS)
else:
    net = fastbp.load(path) if os.path.exists(path) else model()
    if net.history.n_epochs < EPOCHS or net._position is not None:
        fit(net, EPOCHS - net.history.n_epochs, checkpoint=path, checkpoint_every=EVERY)
np.save(path + ".final.npy", net.params)
print(json.dumps({"ok": True}))
"""


def _python(script, *args, workdir):
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=workdir,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=TIMEOUT):
    try:
        out, err = proc.communicate("SENT\n", timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None, "timeout"
    return out, err


def _last_json(out):
    for line in reversed((out or "").strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def _calibrate(mode, workdir):
    """Seconds the child's work takes with no signal."""
    path = os.path.join(workdir, f"calibrate-{mode}.fbp")
    if mode == "save":
        return 0.5
    out, err = _finish(_python(_CHILD, mode, path, workdir=workdir))
    result = _last_json(out)
    if result is None:
        raise RuntimeError(f"calibration of {mode} failed: {err[-2000:]}")
    return result["seconds"]


def _oracle(workdir):
    path = os.path.join(workdir, "oracle.fbp")
    out, err = _finish(_python(_RESUME, "oracle", path, workdir=workdir))
    if _last_json(out) is None:
        raise RuntimeError(f"the oracle run failed: {err[-2000:]}")
    import numpy as np

    return np.load(path + ".final.npy")


def _trial(kind, delay, workdir, index, oracle):
    """One trial; returns None when it passed, else the failure's name."""
    import numpy as np

    mode, sig = kind.split("-")
    folder = os.path.join(workdir, f"{kind}-{index}")
    os.makedirs(folder)
    path = os.path.join(folder, "model.fbp")
    proc = _python(_CHILD, mode, path, workdir=workdir)
    if proc.stdout.readline().strip() != "READY":
        _finish(proc)
        return "child failed to start"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL if sig == "sigkill" else signal.SIGINT)
    out, err = _finish(proc)  # tells the child the signal was sent
    if err == "timeout":
        return "timeout"
    if sig == "sigkill":
        if proc.returncode != -signal.SIGKILL:
            return f"exit code {proc.returncode}"
    else:
        result = _last_json(out)
        if result is None:
            # the signal landed between the fit and the child's check
            return None if "KeyboardInterrupt" in err else f"crash: {err[-300:]}"
        if result["outcome"] == "returned" and mode != "save":
            # what a rare lost signal looked like: when it was sent, what
            # the child saw, and its last words
            return "lost", (f"signal after {delay:.4f} s; child: {json.dumps(result)}; "
                            f"stderr: {err[-600:]}")
        if not result.get("consistent", True):
            return "inconsistent"
    if mode in ("ckpt", "save"):
        out, err = _finish(_python(_RESUME, mode, path, workdir=workdir))
        if _last_json(out) is None:
            return "load failed" if "ModelFormatError" in (err or "") else "resume crashed"
        if mode == "save":
            if sig == "sigint" and any(n.endswith(".tmp") for n in os.listdir(folder)):
                return "temporary file left behind"
            return None if _last_json(out)["ok"] else "saved file is a mix"
        if not np.array_equal(np.load(path + ".final.npy"), oracle):
            return "resumed run differs"
    return None


KINDS = ("fit-sigint", "fit3-sigint", "sklearn-sigint", "lm-sigint", "ckpt-sigint",
         "ckpt-sigkill", "save-sigint", "save-sigkill")


def run(kind, trials, seed=0, workdir=None):
    """Run ``trials`` trials of one kind; counts of trials, passed, failures."""
    rnd = random.Random(f"{seed}-{kind}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = workdir or tmp
        mode = kind.split("-")[0]
        seconds = _calibrate(mode, workdir)
        oracle = _oracle(workdir) if mode == "ckpt" else None
        failures, details = Counter(), []
        for i in range(trials):
            failure = _trial(kind, rnd.uniform(0, 1.1 * seconds), workdir, i, oracle)
            if isinstance(failure, tuple):
                failure, detail = failure
                if detail.strip():
                    details.append(detail)
            if failure:
                failures[failure] += 1
    counts = {"kind": kind, "trials": trials, "passed": trials - sum(failures.values()),
              "failures": dict(failures), "work_seconds": round(seconds, 3)}
    if details:
        counts["stderr_of_failures"] = details[:2]
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="trials of each kind")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return _children.report_all(args.kinds, run, args.trials, args.seed)


if __name__ == "__main__":
    sys.exit(main())
