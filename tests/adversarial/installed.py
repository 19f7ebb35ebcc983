"""Attack an installed fastbp (a wheel) from outside, as the machines it
lands on would.

Each trial runs a child Python that imports fastbp and trains a small
float64 network for a few epochs, under one hostile condition:

- ``decoy_cwd``: the current folder holds a ``fastbp/`` package of its own
  (``python -P``: the installed one must be imported);
- ``source_cwd``: the current folder is the repository, whose ``fastbp/``
  has no compiled modules;
- ``console_script``: the ``fastbp`` command, from the decoy folder;
- ``no_home``, ``missing_home``, ``relative_xdg``, ``no_tmp``: no usable
  folder for Numba's cache (fastbp/_config.py), or only odd ones;
- ``isa``: ``FASTBP_ISA`` at a random level, or a value it does not know;
- ``blas_threads``: ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` from 1 to 4;
- ``old_cpu`` (``--qemu``, x86-64 only): the child runs in ``qemu-x86_64``
  emulating a CPU without AVX (Nehalem, Westmere): a module built for a
  newer CPU (``-march=native``) dies there with SIGILL; fastbp must run at
  its baseline level.  (Nothing older: numpy's wheels need x86-64-v2,
  SSE4.2 and POPCNT, and ``import numpy`` itself dies on a Core 2.)
- ``haswell`` (``--qemu``): an emulated AVX2 + FMA CPU without AVX-512.

A trial passes when the child exits 0, imported the fastbp that a clean
child imports (not the decoy nor the source folder), ran at the level
expected, and ended with the clean child's loss (to 1e-9: levels differ only
in rounding).  Failures are counted by kind: crash (a signal), timeout,
error (exit status), shadowed (the wrong package), level, result.

    python -P tests/adversarial/installed.py --trials 40
    python -P tests/adversarial/installed.py --trials 6 --qemu --python /path/to/venv/bin/python
"""
import argparse
import collections
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LEVELS = ("baseline", "avx2", "avx512")
KINDS = ("decoy_cwd", "source_cwd", "console_script", "no_home", "missing_home",
         "relative_xdg", "no_tmp", "isa", "blas_threads")
QEMU_KINDS = ("old_cpu", "haswell")
OLD_CPUS = ("Nehalem", "Westmere")   # x86-64-v2, numpy's floor; no AVX
TIMEOUT = {"qemu": 600, "native": 180}

CHILD = r"""
import json, os
import numpy as np
import fastbp
from fastbp import _isa
from fastbp._ext import dense
X = np.random.default_rng(0).normal(size=(96, 4))
y = (X[:, 0] + X[:, 1] > 0).astype(int)
net = fastbp.Sequential([fastbp.Dense(8, activation="relu"), fastbp.Dense(2)],
                        dtype="float64", seed=0)
net.fit(X, y, loss="cross_entropy", epochs=3, batch_size=16, verbose=0)
print(json.dumps({"file": os.path.realpath(fastbp.__file__), "level": _isa.level(),
                  "hardware": _isa.hardware(), "vectors": dense.vector_kernels(),
                  "loss": net.history["loss"][-1]}))
"""

DECOY = "raise ImportError('the decoy fastbp in the current folder was imported')\n"


def _child(python, argv, env, cwd, timeout):
    """Run one child; returns (returncode, stdout, stderr), returncode None on
    a timeout."""
    try:
        r = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "", ""
    return r.returncode, r.stdout, r.stderr


def _clean_env():
    """The environment of a trial before its condition: no FASTBP_ISA, no
    thread caps (PYTHONPATH kept, so a development checkout can be attacked)."""
    env = dict(os.environ)
    for var in ("FASTBP_ISA", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.pop(var, None)
    return env


def _condition(kind, rng, python, decoy, scratch):
    """(argv, env, cwd, expected level or None, what) of a trial of ``kind``."""
    env, cwd = _clean_env(), scratch
    argv = [python, "-P", "-c", CHILD]
    level, what = None, kind
    if kind == "decoy_cwd":
        cwd = decoy
    elif kind == "source_cwd":
        cwd = REPO
    elif kind == "console_script":
        cwd = decoy
        argv = [os.path.join(os.path.dirname(python), "fastbp"), "--version"]
    elif kind == "no_home":
        for var in ("HOME", "XDG_CACHE_HOME", "NUMBA_CACHE_DIR"):
            env.pop(var, None)
    elif kind == "missing_home":
        env["HOME"] = os.path.join(scratch, "no", "such", "home")
        env.pop("XDG_CACHE_HOME", None)
    elif kind == "relative_xdg":
        env["XDG_CACHE_HOME"] = "relative/cache"
    elif kind == "no_tmp":
        env["HOME"] = env["TMPDIR"] = os.path.join(scratch, "missing")
        env.pop("XDG_CACHE_HOME", None)
        env.pop("NUMBA_CACHE_DIR", None)
    elif kind == "isa":
        asked = rng.choice(LEVELS + ("sse9", ""))
        env["FASTBP_ISA"] = asked
        what = f"isa={asked!r}"
        level = asked if asked in LEVELS else "hardware"
    elif kind == "blas_threads":
        n = str(rng.randint(1, 4))
        env[rng.choice(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"))] = n
        what = f"blas_threads={n}"
    elif kind == "old_cpu":
        cpu = rng.choice(OLD_CPUS)
        argv = ["qemu-x86_64", "-cpu", cpu] + argv
        level, what = "baseline", f"old_cpu={cpu}"
    elif kind == "haswell":
        argv = ["qemu-x86_64", "-cpu", "Haswell"] + argv
        level = "avx2"
    return argv, env, cwd, level, what


def _judge(kind, rc, out, err, expected_level, clean):
    """The failure kind of a trial, or None if it passed."""
    if rc is None:
        return "timeout"
    if rc < 0 or rc in (132, 134, 139):  # a signal, or a shell's report of one
        return "crash"
    if rc != 0:
        return "error"
    if kind == "console_script":
        return None if out.strip().endswith(clean["version"]) else "result"
    try:
        got = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return "error"
    if got["file"] != clean["file"]:
        return "shadowed"
    if expected_level is not None:
        want = expected_level
        if want == "hardware" or not got["vectors"]:
            want = got["hardware"]
        elif LEVELS.index(want) > LEVELS.index(got["hardware"]):
            want = got["hardware"]  # a level the CPU lacks falls back to its best
        if got["level"] != want:
            return "level"
    if not math.isclose(got["loss"], clean["loss"], rel_tol=1e-9):
        return "result"
    return None


def _clean_run(python, scratch):
    """What a plain child imports and computes: the yardstick of every trial."""
    rc, out, err = _child(python, [python, "-P", "-c", CHILD], _clean_env(), scratch,
                          TIMEOUT["native"])
    if rc != 0:
        raise RuntimeError(f"a plain import and fit failed (exit {rc}):\n{err[-2000:]}")
    clean = json.loads(out.strip().splitlines()[-1])
    rc, out, err = _child(python, [python, "-P", "-c", "import fastbp; print(fastbp.__version__)"],
                          _clean_env(), scratch, TIMEOUT["native"])
    clean["version"] = out.strip()
    return clean


def run(trials=40, seed=0, python=sys.executable, qemu=False, verbose=True):
    """Run ``trials`` trials; returns (counts by kind, failures as text)."""
    rng = random.Random(seed)
    kinds = list(KINDS)
    if qemu:
        if not shutil.which("qemu-x86_64"):
            raise RuntimeError("--qemu needs qemu-x86_64 (Debian: apt-get install qemu-user)")
        kinds += QEMU_KINDS
    counts, failures = collections.Counter(), []
    with tempfile.TemporaryDirectory(prefix="fastbp-installed-") as scratch:
        decoy = os.path.join(scratch, "decoy")
        os.makedirs(os.path.join(decoy, "fastbp"))
        with open(os.path.join(decoy, "fastbp", "__init__.py"), "w") as f:
            f.write(DECOY)
        clean = _clean_run(python, scratch)
        if verbose:
            print(f"fastbp {clean['version']} from {clean['file']}, level {clean['level']}, "
                  f"loss {clean['loss']!r}", flush=True)
        for i in range(trials):
            kind = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)
            argv, env, cwd, level, what = _condition(kind, rng, python, decoy, scratch)
            timeout = TIMEOUT["qemu" if argv[0] == "qemu-x86_64" else "native"]
            rc, out, err = _child(python, argv, env, cwd, timeout)
            failure = _judge(kind, rc, out, err, level, clean)
            counts["trials"] += 1
            counts["passed" if failure is None else f"failed: {failure}"] += 1
            if failure is not None:
                failures.append(f"{what}: {failure} (exit {rc}) {err.strip()[-400:]!r}")
            if verbose:
                print(f"{i:4d} {what:<24} {'ok' if failure is None else failure}", flush=True)
    return counts, failures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--python", default=sys.executable,
                   help="the interpreter whose installed fastbp is attacked (default: this one)")
    p.add_argument("--qemu", action="store_true",
                   help="also run trials in qemu-x86_64 as CPUs without AVX2/AVX-512")
    args = p.parse_args(argv)
    counts, failures = run(args.trials, args.seed, args.python, args.qemu)
    print(f"trials run: {counts['trials']}, passed: {counts['passed']}, failures by kind: "
          + json.dumps({k[len('failed: '):]: v for k, v in sorted(counts.items())
                        if k.startswith("failed: ")}))
    for line in failures:
        print("FAILURE", line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
