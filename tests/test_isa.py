"""FASTBP_ISA (fastbp/_isa.py, csrc/smallgemm.h fbp_isa_requested) and
fastbp.show_config / fastbp --info (fastbp/_info.py)."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest

import fastbp
from fastbp import _isa
from fastbp._ext import dense, losses

LEVELS = _isa.LEVELS[:dense.isa_hardware() + 1]   # the levels this CPU can run


def _run(code, env_isa, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FASTBP_ISA"}
    if env_isa is not None:
        env["FASTBP_ISA"] = env_isa
    return subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("level", LEVELS)
def test_fastbp_isa_caps_every_compiled_module(level, tmp_path):
    code = ("import fastbp; from fastbp._ext import dense, losses; "
            "print(fastbp._isa.level(), dense.small_gemm_isa(), losses.isa_level())")
    r = _run(code, level, tmp_path)
    assert r.returncode == 0, r.stderr
    i = str(LEVELS.index(level))
    assert r.stdout.split() == [level, i, i]
    assert "RuntimeWarning" not in r.stderr


def test_unset_or_empty_means_the_best_level(tmp_path):
    for value in (None, ""):
        r = _run("import fastbp; print(fastbp._isa.level())", value, tmp_path)
        assert r.returncode == 0 and r.stdout.strip() == LEVELS[-1], r.stderr
        assert "RuntimeWarning" not in r.stderr


def test_an_unknown_level_warns_and_uses_the_best(tmp_path):
    r = _run("import fastbp; print(fastbp._isa.level())", "sse9", tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == LEVELS[-1]
    assert "FASTBP_ISA='sse9' is not one of baseline, avx2, avx512" in r.stderr


def test_a_level_the_cpu_lacks_warns(monkeypatch):
    # The warning path for a CPU below the level asked for, whatever this
    # machine has: pretend the hardware stops at the baseline.
    monkeypatch.setenv("FASTBP_ISA", "avx2")
    monkeypatch.setattr(_isa._dense, "isa_hardware", lambda: 0)
    with pytest.warns(RuntimeWarning, match="asks for a level this CPU lacks"):
        _isa._check()


def test_levels_of_the_modules_must_agree(monkeypatch):
    monkeypatch.setattr(_isa._losses, "isa_level", lambda: (dense.small_gemm_isa() + 1) % 3)
    with pytest.raises(RuntimeError, match="different instruction-set levels"):
        _isa._check()


def test_capped_kernels_still_match_the_reference(tmp_path):
    # A small training run at every level ends at the same weights to
    # rounding (the levels differ only in vector width and FMA).
    code = """if 1:
        import numpy as np, fastbp
        rng = np.random.default_rng(0)
        X = rng.normal(size=(512, 40)); y = rng.integers(0, 3, 512)
        net = fastbp.Sequential([fastbp.Dense(300, activation="relu"), fastbp.Dense(3)],
                                dtype="float64", seed=0)
        net.fit(X, y, loss="cross_entropy", epochs=2, batch_size=128, verbose=0)
        np.save("w.npy", net.params)
    """
    finals = []
    for level in LEVELS:
        r = _run(code, level, tmp_path)
        assert r.returncode == 0, r.stderr
        finals.append(np.load(tmp_path / "w.npy"))
    for w in finals[1:]:
        np.testing.assert_allclose(w, finals[0], rtol=0, atol=1e-10)


def test_show_config_names_the_level_the_kernels_and_blas():
    out = io.StringIO()
    fastbp.show_config(file=out)
    text = out.getvalue()
    assert f"instruction set in use: {_isa.level()}" in text
    assert "L layer, x @ W (256 x 2048 x 2048)" in text
    kinds = {kind for _, kind in fastbp._info.config()["kernels"]}
    assert kinds <= {"small", "packed", "blas"}
    if _isa.level() != "baseline":
        assert "blas" not in kinds            # our kernels take every product
    assert "BLAS: " in text and "threads:" in text
    from fastbp._numba import optim
    assert fastbp._info.config()["numba_fma"] is optim.FUSED
    assert "Numba kernels (optimizers, losses): compiled for " in text
    assert ("fused multiply-add: yes" in text) == optim.FUSED


def test_fastbp_info_command(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastbp", "--info"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "instruction set in use:" in r.stdout and "kernels by product:" in r.stdout
