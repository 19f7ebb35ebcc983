"""Build the compiled core: csrc/*.pyx -> fastbp._ext.<name>.

BLAS comes from scipy.linalg.cython_blas, so no BLAS headers or libraries are
needed here.  Flags: -O3 and -fno-math-errno only; -ffast-math is avoided on
purpose (with GCC it can switch the whole process to flush-to-zero at import).
Set FASTBP_NATIVE=1 for a -march=native build on your own machine (never for a
wheel you ship).
"""
import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

extra = ["-O3", "-fno-math-errno"]
if os.environ.get("FASTBP_NATIVE") == "1":
    extra.append("-march=native")

ext_modules = [
    Extension(
        f"fastbp._ext.{name}",
        [f"csrc/{name}.pyx"],
        include_dirs=[np.get_include(), "csrc"],
        depends=[f"csrc/{h}" for h in ("smallgemm.h", "smallgemm_pair.h", "smallgemm_impl.h",
                                           "packedgemm.h", "packedgemm_impl.h", "gemm.h",
                                           "pool.h", "peak.h", "losses.h", "losses_pair.h",
                                           "losses_impl.h", "epilogue.h", "epilogue_pair.h",
                                           "epilogue_impl.h")],
        extra_compile_args=extra,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for name in ("dense", "engine", "losses")
]

setup(
    ext_modules=cythonize(
        ext_modules,
        build_dir="build/cython",
        include_path=["."],
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
