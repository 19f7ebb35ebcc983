"""FASTBP_ISA (fastbp/_isa.py, csrc/smallgemm.h fbp_isa_requested) and
fastbp.show_config / fastbp --info (fastbp/_info.py)."""
import io
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import fastbp
from fastbp import _isa
from fastbp._ext import dense
from fastbp._numba import _X86

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


X86 = platform.machine().lower() in _X86


def _features_on(value):
    return {f[1:] for f in value.split(",") if f.startswith("+")}


@pytest.mark.parametrize("level", _isa.LEVELS)
def test_numba_features_drop_what_is_above_the_level(level):
    from llvmlite import binding
    if not X86:
        with pytest.raises(ValueError, match="x86-64's"):
            _isa.numba_features(level)
        return
    host = {name for name, on in binding.get_host_cpu_features().items() if on}
    on = _features_on(_isa.numba_features(level))
    assert on <= host
    if level == "avx512":
        assert on == host
    if level in ("avx2", "baseline"):
        assert not {f for f in on if f.startswith(("avx512", "amx", "avx10", "evex512"))}
        assert host - on >= {f for f in host if f.startswith("avx512")}
    if level == "baseline":
        assert not {f for f in on if f.startswith(("avx", "fma", "f16c"))}
    if level == "avx2" and dense.isa_hardware() >= 1:
        assert {"avx2", "fma"} <= on


def test_numba_features_refuse_an_unknown_level_or_cpu(monkeypatch):
    with pytest.raises(ValueError, match="level must be one of"):
        _isa.numba_features("sse4")
    monkeypatch.setattr(_isa.platform, "machine", lambda: "aarch64")
    with pytest.raises(ValueError, match="x86-64's"):
        _isa.numba_features("avx2")


# Compiles fastbp's Adam under each level's features in a child (its own
# Numba cache): the code must use no register wider than the level's, Adam
# must still give the reference's bits, and show_config must say so.
_COMPILED_AT = """
import numpy as np, fastbp
from fastbp import reference
from fastbp._numba import optim
rng = np.random.default_rng(0)
p = rng.standard_normal(1000).astype(np.float32); g = rng.standard_normal(1000).astype(np.float32)
m, v, vm = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
ours = [a.copy() for a in (p, m, v, vm)]
for t in range(1, 4):
    optim.adam_step(ours[0], g, ours[1], ours[2], ours[3], t, 1e-3, 0.9, 0.999, 1e-8, 0.0,
                    False, False)
    reference.adam_step(p, g, m, v, vm, t, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, False)
assert all(np.array_equal(a.view(np.uint32), b.view(np.uint32)) for a, b in zip(ours, (p, m, v)))
asm = "".join(optim.adam_step.inspect_asm().values())
c = fastbp._info.config()
print(c["numba_level"], c["numba_features"], optim.FUSED, "zmm" in asm, "ymm" in asm)
"""


@pytest.mark.parametrize("level", LEVELS if X86 else [])
def test_numba_features_compile_the_kernels_for_the_level(level, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU")}
    env.update(NUMBA_CPU_FEATURES=_isa.numba_features(level), NUMBA_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", _COMPILED_AT], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got_level, source, fused, zmm, ymm = r.stdout.split()
    assert (got_level, source) == (level, "NUMBA_CPU_FEATURES")
    assert fused == str(level != "baseline")
    if level != "avx512":      # (at AVX-512 LLVM may still prefer 32-byte vectors)
        assert zmm == "False"
    if level == "baseline":
        assert ymm == "False"
