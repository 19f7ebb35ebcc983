"""The instruction-set level of fastbp's compiled kernels, and FASTBP_ISA.

fastbp's C kernels (GEMMs, epilogues, softmax losses) are compiled for three
levels on x86-64 and the best the CPU has is used: ``avx512`` (64-byte
vectors, AVX-512F + FMA), ``avx2`` (32-byte vectors, AVX2 + FMA) and
``baseline`` (the instruction set the wheel targets; the only level on other
CPUs).  The environment variable ``FASTBP_ISA`` caps the level, as
``NPY_DISABLE_CPU_FEATURES`` or ``OPENBLAS_CORETYPE`` do for numpy and
OpenBLAS: it lets a machine with AVX-512 run, test and time the AVX2 path,
and lets a user rule out a kernel bug.  It is read once, when fastbp is
imported; a level the CPU lacks falls back to the best it has, with a
warning.  The C side parses it in ``fbp_isa_requested`` (csrc/smallgemm.h);
this module checks that every compiled module agreed.
"""
import os
import platform
import warnings

from ._ext import dense as _dense
from ._ext import losses as _losses

#: level names, by level number (csrc/smallgemm.h FBP_ISA_*)
LEVELS = ("baseline", "avx2", "avx512")
ENV = "FASTBP_ISA"


def requested():
    """The level FASTBP_ISA asks for (a name), or None when unset."""
    value = os.environ.get(ENV)
    return value if value else None


def hardware():
    """The best level this CPU supports (a name), whatever FASTBP_ISA says."""
    return LEVELS[_dense.isa_hardware()]


def level():
    """The level fastbp's kernels run at in this process (a name)."""
    return LEVELS[_dense.small_gemm_isa()]


#: LLVM CPU features (by name prefix) a CPU of each level lacks: the
#: AVX-512 family and what came with or after it for "avx2", everything from
#: AVX on for "baseline" (AMD's FMA4 and XOP too)
_ABOVE = {"avx512": (),
          "avx2": ("avx512", "avx10", "evex512", "amx"),
          "baseline": ("avx", "fma", "f16c", "vaes", "vpclmulqdq", "xop", "evex512", "amx")}


def numba_features(level):
    """A NUMBA_CPU_FEATURES value under which Numba compiles fastbp's
    optimizers and losses as it would on a CPU of ``level`` ("avx512",
    "avx2" or "baseline"): this CPU's features without those above it.

    FASTBP_ISA caps the C kernels only; Numba takes its target from the
    environment when it is imported, for every Numba function in the
    process, so fastbp does not change it.  To run all of fastbp as on an
    AVX2 machine (tests, benchmarks)::

        export FASTBP_ISA=avx2
        export NUMBA_CPU_FEATURES=$(python -c "import fastbp._isa as i; print(i.numba_features('avx2'))")

    Numba caches the kernels per feature set, so each level compiles them
    once.  ValueError for another level, or on a CPU that is not x86-64.
    """
    from llvmlite import binding

    from ._numba import _X86
    if level not in _ABOVE:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
    if platform.machine().lower() not in _X86:
        raise ValueError(f"instruction-set levels are x86-64's; this CPU is "
                         f"{platform.machine()}")
    drop = _ABOVE[level]
    return ",".join(("+" if on and not name.startswith(drop) else "-") + name
                    for name, on in sorted(binding.get_host_cpu_features().items()))


def _check():
    """Fix the level of every compiled module now, and warn about a
    FASTBP_ISA value that was not taken as asked."""
    levels = {_dense.small_gemm_isa(), _losses.isa_level()}
    if len(levels) != 1:  # cannot happen unless the environment changed mid-import
        raise RuntimeError(f"fastbp's compiled modules run at different instruction-set "
                           f"levels {sorted(levels)}: was {ENV} changed during import?")
    asked = requested()
    if asked is None:
        return
    if asked not in LEVELS:
        warnings.warn(f"{ENV}={asked!r} is not one of {', '.join(LEVELS)}; ignoring it and "
                      f"using {level()}, the best this CPU has", RuntimeWarning, stacklevel=3)
    elif LEVELS.index(asked) > _dense.isa_hardware():
        warnings.warn(f"{ENV}={asked!r} asks for a level this CPU lacks; using {level()}, the "
                      "best it has", RuntimeWarning, stacklevel=3)


_check()
