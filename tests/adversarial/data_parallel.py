"""Hostile trials of data-parallel training (fit(comm=...)) under mpiexec.

Each trial launches ``mpiexec -n 2`` (or 3) on tests/mpi/ranks.py with a
random hostile scenario and checks that the job ends (never hangs) the way
it must:

* ``ctrl_c``: SIGINT to mpiexec after a random delay (0-2 s after the ranks
  start): the job ends within 60 s; with MPICH every rank stops at the same
  step with the same weights as rank 0's checkpoint;
* ``dies``: a rank exits (os._exit) or raises in a callback: mpiexec ends
  non-zero within 60 s;
* ``mismatch``: ranks pass different data, epochs or models: every rank
  gets the same ValueError, and no rank trains;
* ``one_rank_callback``: a callback changes one rank's learning rate: every
  rank stops with the RuntimeError.

Run: ``python -P tests/adversarial/data_parallel.py --trials 40`` (prints the
counts of trials run, passed, and failures by kind).
"""
import argparse
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "mpi"))
import launch  # noqa: E402  (tests/mpi/launch.py: mpiexec and its environment)


def _start(n, scenario, args, out):
    return subprocess.Popen(launch.command(n, scenario, out, args), cwd=out,
                            env=launch.env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=60):
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out + err
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None, "hang"


def _results(out, n):
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(n)
            if (out / f"rank{r}.npz").exists()]


def trial_ctrl_c(rng, out):
    path = out / "ckpt.fbp"
    proc = _start(2, "long_fit", dict(dtype="float64", path=str(path)), out)
    deadline = time.monotonic() + 120
    while not all((out / f"started{r}").exists() for r in range(2)):
        if proc.poll() is not None or time.monotonic() > deadline:
            return "did not start"
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 2.0))
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    code, output = _finish(proc)
    if code is None or time.monotonic() - start > 60:
        return "hang after Ctrl-C"
    if "--oversubscribe" in launch.MPIEXEC:
        return None  # Open MPI ends the job on Ctrl-C: only a hang is a failure
    results = _results(out, 2)
    if code != 0 or len(results) != 2:
        return f"ranks did not both stop cleanly (code {code})"
    if not np.array_equal(results[0]["params"], results[1]["params"]):
        return "ranks stopped with different weights"
    if path.exists():
        import fastbp
        if not np.array_equal(fastbp.load(path)._params, results[0]["params"]):
            return "the checkpoint is not the weights the ranks hold"
    return None


def trial_dies(rng, out):
    start = time.monotonic()
    code, output = _finish(_start(2, "dies", dict(how=rng.choice(["exit", "raise"])), out))
    if code is None or time.monotonic() - start > 60:
        return "hang after a rank died"
    return None if code != 0 else "mpiexec ended 0 after a rank died"


def trial_mismatch(rng, out):
    scenario, args = rng.choice([("mismatch", {}),
                                 ("mismatch_settings", {"what": "epochs"}),
                                 ("mismatch_settings", {"what": "model"})])
    code, output = _finish(_start(2, scenario, dict(args, dtype="float64"), out))
    if code is None:
        return "hang on mismatched ranks"
    results = _results(out, 2)
    if code != 0 or len(results) != 2:
        return f"a rank failed otherwise (code {code})"
    if not all("the ranks" in str(r["message"]) for r in results):
        return "a rank trained on mismatched settings"
    return None


def trial_one_rank_callback(rng, out):
    code, output = _finish(_start(rng.choice([2, 3]), "one_rank_callback",
                                  dict(dtype="float64"), out))
    if code is None:
        return "hang when one rank's settings changed"
    results = _results(out, 2)
    if code != 0 or not all("some ranks only" in str(r["message"]) for r in results):
        return "ranks did not all stop on diverged settings"
    return None


TRIALS = [trial_ctrl_c, trial_dies, trial_mismatch, trial_one_rank_callback]


def run(trials, seed=0):
    rng = random.Random(seed)
    counts = {"run": 0, "passed": 0}
    failures = {}
    for i in range(trials):
        trial = TRIALS[i % len(TRIALS)]
        with tempfile.TemporaryDirectory() as tmp:
            problem = trial(rng, pathlib.Path(tmp))
        counts["run"] += 1
        if problem is None:
            counts["passed"] += 1
        else:
            key = f"{trial.__name__}: {problem}"
            failures[key] = failures.get(key, 0) + 1
    return counts, failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts, failures = run(args.trials, args.seed)
    print(counts)
    for kind, n in sorted(failures.items()):
        print(f"  {n} x {kind}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
