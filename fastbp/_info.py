"""``fastbp.show_config()`` / ``fastbp --info``: what this process runs on.

The instruction-set level in use (and why: the CPU's best, capped by
FASTBP_ISA), which kernels take each product of the benchmark workloads, the
BLAS that takes the rest, the default thread count, the CPU Numba compiles
the optimizers and losses for (FASTBP_ISA does not cap it) and where Numba
caches.
Paste its output into a bug report.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import IO

#: products printed by show_config: (what, dtype, trans_a, trans_b, m, n, k)
_PRODUCTS = (
    ("S layer, x @ W (32 x 64 x 64)", "float32", False, False, 32, 64, 64),
    ("digits layer, x @ W (200 x 100 x 64)", "float64", False, False, 200, 100, 64),
    ("M first layer, x @ W (64 x 256 x 784)", "float32", False, False, 64, 256, 784),
    ("M first layer, x.T @ g (784 x 256 x 64)", "float32", True, False, 784, 256, 64),
    ("L layer, x @ W (256 x 2048 x 2048)", "float32", False, False, 256, 2048, 2048),
    ("L layer, g @ W.T (256 x 2048 x 2048)", "float32", False, True, 256, 2048, 2048),
    ("L layer, x.T @ g (2048 x 2048 x 256)", "float64", True, False, 2048, 2048, 256),
    ("L last layer, x.T @ g (2048 x 10 x 256)", "float32", True, False, 2048, 10, 256),
)


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def config():
    """What ``show_config`` prints, as a dict (for scripts and bench records)."""
    import numba
    import numpy as np
    import scipy
    from threadpoolctl import threadpool_info

    from . import __version__, _isa
    from ._config import ROOT
    from ._ext import dense
    from ._numba import optim, target_level
    from ._threads import default_threads

    blas = [{k: lib.get(k) for k in ("internal_api", "version", "architecture",
                                     "num_threads", "filepath")}
            for lib in threadpool_info() if lib.get("user_api") == "blas"]
    return {
        "fastbp": __version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__, "scipy": scipy.__version__, "numba": numba.__version__,
        "machine": platform.machine(), "cpu": _cpu_name(), "cores": os.cpu_count(),
        "isa": _isa.level(), "isa_hardware": _isa.hardware(), "isa_requested": _isa.requested(),
        "vector_kernels": dense.vector_kernels(),
        "kernels": [(what, dense.gemm_kernel(m, n, k, ta, tb, dtype))
                    for what, dtype, ta, tb, m, n, k in _PRODUCTS],
        "blas": blas,
        "threads": default_threads(),
        "numba_target": numba.config.CPU_NAME or "host",
        "numba_features": ("NUMBA_CPU_FEATURES" if os.environ.get("NUMBA_CPU_FEATURES")
                           else "host's" if numba.config.CPU_FEATURES is None
                           else f"{numba.config.CPU_NAME}'s"),
        "numba_level": target_level(),
        "numba_fma": optim.FUSED,
        "numba_cache": ROOT or "off",
    }


def _isa_reason(c):
    """Why fastbp runs at the level it does, for show_config."""
    if not c["vector_kernels"]:
        return ("this build has no vector kernels (MSVC, or -DFBP_NO_VECTORS): every product "
                "goes to BLAS")
    if c["isa_requested"]:
        return f"FASTBP_ISA={c['isa_requested']}; the CPU has {c['isa_hardware']}"
    if c["machine"].lower() not in ("x86_64", "amd64"):
        return f"the one level built for {c['machine']}: AVX2 and AVX-512 are x86-64's"
    return "the best this CPU has; set FASTBP_ISA=avx2 or baseline to cap it"


def show_config(file: IO[str] | None = None) -> None:
    """Print the instruction-set level, kernels, BLAS and threads in use.

    Parameters
    ----------
    file : file-like, optional
        Where to print (default ``sys.stdout``).
    """
    c = config()
    why = _isa_reason(c)
    lines = [
        f"fastbp {c['fastbp']}  (Python {c['python']}, numpy {c['numpy']}, scipy {c['scipy']}, "
        f"numba {c['numba']})",
        f"CPU: {c['cpu']} ({c['machine']}, {c['cores']} logical cores)",
        f"instruction set in use: {c['isa']} ({why})",
        "kernels by product:",
    ]
    lines += [f"  {what:<42} {kind}" for what, kind in c["kernels"]]
    lines.append("  (small: register-blocked, read in place; packed: fastbp's BLIS-style "
                 "kernels; blas: the BLAS below)")
    for lib in c["blas"]:
        lines.append(f"BLAS: {lib['internal_api']} {lib['version']} ({lib['architecture']} "
                     f"kernels, {lib['num_threads']} threads) {lib['filepath']}")
    lines.append(f"threads: {c['threads']} by default (fit/predict n_threads=None)")
    level = f", {c['numba_level']} vectors" if c["numba_level"] else ""
    lines.append(f"Numba kernels (optimizers, losses): compiled for {c['numba_target']} "
                 f"(features: {c['numba_features']}{level}), not capped by FASTBP_ISA "
                 f"(NUMBA_CPU_FEATURES is: fastbp._isa.numba_features); fused multiply-add: "
                 f"{'yes' if c['numba_fma'] else 'no (Adam divides; the same bits)'}")
    lines.append(f"Numba cache: {c['numba_cache']}")
    print("\n".join(lines), file=file or sys.stdout)
