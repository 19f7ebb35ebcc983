"""Build the compiled core: csrc/*.pyx -> fastbp._ext.<name>.

BLAS comes from scipy.linalg.cython_blas, so no BLAS headers or libraries are
needed here.  Flags (compile_flags): with GCC and Clang, -O3 and
-fno-math-errno only; -ffast-math is avoided on purpose (with GCC it can
switch the whole process to flush-to-zero at import), and nothing targets
the build machine's CPU: the kernels pick their instruction set at run time
(csrc/smallgemm.h), so a wheel built anywhere runs on any CPU of its
architecture.  MSVC gets setuptools' own flags (/O2) and builds the portable
fallback (csrc/platform.h).  Set FASTBP_NATIVE=1 for a -march=native build
on your own machine (never for a wheel you ship).
"""
import os

#: Flags for GCC and Clang (Linux, macOS, MinGW).  MSVC would ignore each
#: with a warning (D9002).
GCC_FLAGS = ("-O3", "-fno-math-errno")

EXTENSIONS = ("dense", "engine", "engine_ops", "engine_rows", "engine_optim", "losses")
HEADERS = ("smallgemm.h", "smallgemm_pair.h", "smallgemm_impl.h", "packedgemm.h",
           "packedgemm_impl.h", "gemm.h", "pool.h", "peak.h", "losses.h", "losses_pair.h",
           "losses_impl.h", "epilogue.h", "epilogue_pair.h", "epilogue_impl.h", "interface.h",
           "platform.h", "comm.h")


def compile_flags(compiler_type, environ=os.environ):
    """Extra compiler flags for a compiler, by setuptools' name for its type
    ("unix" for GCC and Clang, "mingw32", "msvc"); FASTBP_NATIVE=1 in
    ``environ`` adds -march=native for GCC and Clang."""
    if compiler_type == "msvc":
        return []
    flags = list(GCC_FLAGS)
    if environ.get("FASTBP_NATIVE") == "1":
        flags.append("-march=native")
    return flags


def main():
    import numpy as np
    from Cython.Build import cythonize
    from setuptools import Extension, setup
    from setuptools.command.build_ext import build_ext

    class BuildExt(build_ext):
        """build_ext that picks the flags for the compiler it was given."""

        def build_extensions(self):
            flags = compile_flags(self.compiler.compiler_type)
            for ext in self.extensions:
                ext.extra_compile_args = flags
            super().build_extensions()

    ext_modules = [
        Extension(
            f"fastbp._ext.{name}",
            [f"csrc/{name}.pyx"],
            include_dirs=[np.get_include(), "csrc"],
            depends=[f"csrc/{h}" for h in HEADERS],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        )
        for name in EXTENSIONS
    ]
    setup(
        cmdclass={"build_ext": BuildExt},
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


# setuptools' build backend runs this file as __main__ too; tests import it
# for compile_flags without building anything.
if __name__ == "__main__":
    main()
