"""The wheels: build flags that suit every CPU of an architecture, the
cibuildwheel configuration and workflow that build and test them on each
platform, and the portable fallback that MSVC compiles (csrc/platform.h).

.ci/run does the rest: it builds the manylinux wheel, checks it with
auditwheel and runs this suite on it, and builds and tests the fallback."""
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import sysconfig

import pytest

from fastbp._ext import dense

from helpers import adversarial

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
#: (runner, what it builds): .github/workflows/wheels.yml's matrix
PLATFORMS = {"ubuntu-latest": "Linux x86_64", "ubuntu-24.04-arm": "Linux aarch64",
             "macos-15-intel": "macOS x86_64", "macos-14": "macOS arm64",
             "windows-latest": "Windows AMD64"}


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _setup_module():
    """setup.py as a module, without building anything (its build runs only
    as __main__)."""
    spec = importlib.util.spec_from_file_location("fastbp_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compile_flags_never_target_the_build_machine():
    # A wheel built with -march=native on an AVX-512 machine dies with
    # SIGILL on an older CPU; the kernels pick their level at run time.
    flags = _setup_module().compile_flags
    for compiler in ("unix", "mingw32"):
        built = flags(compiler, {})
        assert not [f for f in built if f.startswith(("-march", "-mcpu", "-mtune", "-mavx"))]
        assert "-ffast-math" not in built  # it would set flush-to-zero for the whole process
        assert "-march=native" in flags(compiler, {"FASTBP_NATIVE": "1"})
    # MSVC takes none of GCC's spellings (it warns about each, D9002).
    assert flags("msvc", {}) == flags("msvc", {"FASTBP_NATIVE": "1"}) == []


def test_every_compiled_module_is_built_checked_and_says_what_it_owns():
    # One list per place that names the compiled modules: a module missing
    # from setup.py is not built, one missing from .ci/check_wheel.py is not
    # required in the wheel.
    sources = sorted(f[:-len(".pyx")] for f in os.listdir(CSRC) if f.endswith(".pyx"))
    assert sorted(_setup_module().EXTENSIONS) == sources
    spec = importlib.util.spec_from_file_location(
        "check_wheel", os.path.join(ROOT, ".ci", "check_wheel.py"))
    check_wheel = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_wheel)
    assert sorted(check_wheel.MODULES) == sources
    for name in sources:
        doc = importlib.import_module(f"fastbp._ext.{name}").__doc__
        assert doc and len(doc.split()) >= 30, f"fastbp._ext.{name} has no design docstring"


def test_cibuildwheel_builds_every_supported_python_and_runs_the_suite():
    config = _pyproject()
    cibw = config["tool"]["cibuildwheel"]
    lowest = int(re.fullmatch(r">=3\.(\d+)", config["project"]["requires-python"]).group(1))
    assert cibw["build"] == [f"cp3{minor}-*" for minor in range(lowest, 15)]
    assert cibw["archs"] == ["native"]  # each runner builds, and tests, its own CPU's wheels
    assert cibw["test-extras"] == ["test"]
    # the README's test command, on the installed wheel
    assert cibw["test-command"][0] == "pytest {project}/tests"
    windows = cibw["windows"]["test-command"]
    # Windows: the portable build (no vector kernels) and no MPI wheel
    assert windows[0] == 'pytest {project}/tests -m "not vector_kernels and not mpi"'
    assert windows[1:] == cibw["test-command"][1:]
    markers = config["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("vector_kernels:") for m in markers)
    assert any(m.startswith("mpi:") for m in markers)


def test_the_workflow_builds_the_wheels_of_every_platform():
    with open(os.path.join(ROOT, ".github", "workflows", "wheels.yml")) as f:
        workflow = f.read()
    runners = re.search(r"^\s+os: \[([^\]]*)\]$", workflow, re.M)
    assert runners, "no runner matrix in wheels.yml"
    assert [r.strip() for r in runners.group(1).split(",")] == list(PLATFORMS)
    assert re.search(r"uses: pypa/cibuildwheel@v\d", workflow)
    assert "path: wheelhouse/*.whl" in workflow


@pytest.mark.vector_kernels
def test_gcc_and_clang_builds_have_the_vector_kernels():
    # A Linux or macOS wheel without them would run, only slowly: every
    # product in BLAS (csrc/platform.h decides).
    assert dense.vector_kernels()


# What a compiler without GCC's extensions (MSVC) must not meet in the
# fallback.  They are poisoned after the system headers, so only fastbp's
# own code can trip on them.
GNU_ONLY = ("__attribute__ __thread __atomic_load_n __atomic_store_n __atomic_compare_exchange_n "
            "__atomic_add_fetch __atomic_sub_fetch __builtin_cpu_init __builtin_cpu_supports "
            "__builtin_prefetch __builtin_ia32_pause __builtin_shufflevector")
FALLBACK_TU = f"""
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#define FBP_NO_VECTORS 1
#include "platform.h"
#pragma GCC poison {GNU_ONLY}
#include "gemm.h"
#include "epilogue.h"
#include "losses.h"
#include "peak.h"
"""


def test_the_portable_fallback_uses_no_gcc_extensions(tmp_path):
    """The code MSVC compiles (no vector kernels) builds with none of GCC's
    and Clang's extensions; the compiler Python was built with checks it."""
    cc = sysconfig.get_config_var("CC")
    if not cc:  # Windows: MSVC itself compiles this code when the wheel is built
        pytest.skip("no C compiler in sysconfig: MSVC builds the fallback with the wheel")
    source = tmp_path / "fallback.c"
    source.write_text(FALLBACK_TU)
    cmd = shlex.split(cc) + ["-fsyntax-only", "-Werror=implicit-function-declaration",
                             "-I", CSRC, str(source)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_the_x86_64_macos_build_needs_no_libgcc_cpu_model(tmp_path):
    """On an Intel Mac, __builtin_cpu_supports compiles to references to
    ___cpu_model, which no Apple library provides: the module would fail to
    import.  The level is read from sysctl there (csrc/smallgemm.h); compiled
    here as for macOS, the kernels' CPU check must not reference it."""
    cc = sysconfig.get_config_var("CC")
    if not cc:
        pytest.skip("no C compiler in sysconfig (Windows)")
    stub = tmp_path / "stub" / "sys"
    stub.mkdir(parents=True)  # the SDK's declaration, where there is no SDK (Linux)
    (stub / "sysctl.h").write_text("#include <stddef.h>\n"
                                   "int sysctlbyname(const char *, void *, size_t *, void *, size_t);\n")
    source = tmp_path / "detect.c"
    source.write_text('#include "smallgemm.h"\nint level(void) { return fbp_isa_best(); }\n')
    obj = tmp_path / "detect.o"
    cmd = shlex.split(cc) + ["-c", "-O2", "-D__APPLE__", "-idirafter", str(tmp_path / "stub"),
                             "-I", CSRC, str(source), "-o", str(obj)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    symbols = obj.read_bytes()
    assert b"__cpu_model" not in symbols and b"__cpu_indicator_init" not in symbols
    if sysconfig.get_platform().endswith(("x86_64", "amd64")):  # the x86-64 dispatch is compiled
        assert b"sysctlbyname" in symbols


def test_installed_script_finds_no_failure():
    """A few trials of tests/adversarial/installed.py (the full run, with its
    emulated old CPUs, is its own command): a decoy package in the current
    folder, the source folder and the console script all leave the
    installed fastbp in charge."""
    installed = adversarial("installed")
    counts, failures = installed.run(trials=3, verbose=False)
    assert not failures, failures
    assert counts["trials"] == counts["passed"] == 3


def test_no_cython_release_that_crashes_the_engine_can_build_it():
    """Cython 3.3.0 compiles a chained assignment of untyped names
    (``a = b = 0``) leaving the last name NULL: EngineState's checks
    segfaulted at the first fit of a build made with it (seen on a Python
    3.12 machine with Cython 3.3.0 preinstalled).  The sources have no such
    assignment, and the build requirements exclude that release."""
    chained = re.compile(r"^\s*[A-Za-z_]\w*\s*=\s*[A-Za-z_]\w*\s*=(?!=)")
    found = []
    for name in sorted(os.listdir(CSRC)):
        if name.endswith((".pyx", ".pxd", ".pxi")):
            with open(os.path.join(CSRC, name)) as f:
                found += [f"{name}:{i}: {line.strip()}" for i, line in enumerate(f, 1)
                          if chained.match(line)]
    assert not found, found
    cython = [r for r in _pyproject()["build-system"]["requires"] if r.startswith("Cython")]
    assert cython and "!=3.3.0" in cython[0].replace(" ", "")
