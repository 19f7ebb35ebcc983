"""The recorded torch results (tests/fixtures/) and the script that makes them:
the suite needs no torch, the files are written deterministically and read
without pickle, and the staleness check of .ci/run reports what differs."""
import importlib.util
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import torch_cases as tc

TESTS = Path(__file__).resolve().parent
NAMES = ["torch_optim", "torch_lr_schedulers", "torch_batchnorm", "torch_residual",
         "torch_clip_grad_norm"]


@pytest.fixture(scope="module")
def maker():
    """tests/fixtures/make_torch_fixtures.py as a module (it imports torch only when run)."""
    spec = importlib.util.spec_from_file_location("make_torch_fixtures",
                                                  tc.FIXTURES / "make_torch_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Collect the suite in a process where importing torch fails as if it were not
# installed (a finder that refuses it: sys.modules["torch"] = None would not do,
# as libraries that look for "torch" in sys.modules then trip over the None).
NO_TORCH_COLLECT = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError("No module named " + repr(name), name=name)
sys.meta_path.insert(0, NoTorch())
import pytest
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", {tests!r}]))
"""


def test_the_suite_collects_with_torch_unimportable():
    """The README's test command installs no torch: no test module may import it."""
    proc = subprocess.run([sys.executable, "-P", "-c", NO_TORCH_COLLECT.format(tests=str(TESTS))],
                          capture_output=True, text=True, timeout=300, cwd=TESTS.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ tests collected in [\d.]+s", last), last


def test_the_maker_writes_every_committed_file(maker):
    assert sorted(maker.FIXTURES) == sorted(NAMES)
    assert sorted(p.stem for p in tc.FIXTURES.glob("*.npz")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_committed_files_are_rewritten_to_the_same_bytes(maker, name, tmp_path):
    """Written again now (another time stamp), without pickle: byte for byte the
    committed file, so a regeneration that changes nothing leaves git clean."""
    arrays = tc.load(name)
    assert all(a.dtype != object for a in arrays.values())
    maker.write_npz(tmp_path / "again.npz", arrays)
    assert (tmp_path / "again.npz").read_bytes() == (tc.FIXTURES / f"{name}.npz").read_bytes()


def test_check_reports_what_differs(maker):
    old = {"a/spec": np.array('{"lr": 0.1}'), "a/params": np.linspace(-2.0, 3.0, 7),
           "b/params": np.linspace(-1.0, 1.0, 5).astype(np.float32),
           "b/y": np.arange(4), "c/g": np.array([1.0, np.nan])}

    def changed(key, value):
        new = {k: v.copy() for k, v in old.items()}
        new[key] = value
        return maker._differences(new, old)

    assert maker._differences(old, old) == []
    # rounding of another CPU's kernels passes; a change of a case does not
    assert changed("a/params", old["a/params"] * (1 + 1e-15)) == []
    assert changed("b/params", old["b/params"] * np.float32(1 + 1e-7)) == []
    assert "a/params" in changed("a/params", old["a/params"] + 1e-9)[0]
    assert "b/params" in changed("b/params", old["b/params"] + np.float32(1e-4))[0]
    assert "a/spec" in changed("a/spec", np.array('{"lr": 0.2}'))[0]
    assert "b/y" in changed("b/y", np.arange(1, 5))[0]
    assert "c/g" in changed("c/g", np.array([np.nan, 1.0]))[0]
    assert "float32" in changed("a/params", old["a/params"].astype(np.float32))[0]
    new = dict(old, extra=np.zeros(1))
    del new["c/g"]
    assert sorted(maker._differences(new, old)) == ["c/g: no longer made",
                                                    "extra: missing from the committed file"]


def test_the_maker_needs_the_recorded_torch_version(maker, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(SystemExit, match=r"pip install torch==2\.13\.0"):
        maker.main(["--out", str(tmp_path)])
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(__version__="2.12.1+cpu"))
    with pytest.raises(SystemExit, match=r"recorded with torch 2\.13\.0, this is 2\.12\.1"):
        maker.main(["--check"])
    assert list(tmp_path.iterdir()) == []
