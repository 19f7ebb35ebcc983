"""The optimizers' two protocols: a kernel declared once (``update_kernel`` in
fastbp/_numba/optim.py) is all an optimizer needs, its C entry point and the
packing of its hyperparameters following from the declaration; and the
public state protocol (``state_dict``, ``validate_state_dict``,
``load_state_dict``) that model files use.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from numba import njit

import fastbp
from fastbp import optim
from fastbp._numba import optim as kernels
from fastbp._numba.optim import SPECS, KernelSpec, update_kernel
from fastbp.optim import LevenbergMarquardt

from helpers import adversarial

# A new optimizer, written as the module docstring of fastbp/_numba/optim.py
# says: one declared kernel and a class naming its hyperparameters.  With
# beta = momentum it computes torch's SGD with momentum operation for
# operation (0 * buf + g and 1 * g are exact), so a fit with it must equal
# one with SGD bitwise.
TOY_MODULE = '''
import numpy as np
from numba import njit

from fastbp._config import NJIT
from fastbp._numba.optim import update_kernel
from fastbp._optimizer import Optimizer, _flag, _real


@update_kernel("toy", slots=("buf",), flags=("signed",))
@njit(**NJIT)
def toy_step(p, g, buf, t, lr, beta, signed):
    T = p.dtype.type
    lr, beta = T(lr), T(beta)
    finite = True
    for i in range(p.shape[0]):
        b = g[i] if t == 1 else beta * buf[i] + g[i]
        buf[i] = b
        d = (T(1) if b > 0 else (T(-1) if b < 0 else T(0))) if signed else b
        q = p[i] - lr * d
        p[i] = q
        finite &= np.isfinite(q)
    return finite


class Toy(Optimizer):
    kernel = "toy"

    def __init__(self, lr=0.1, beta=0.5, signed=False):
        super().__init__()
        self.lr, self.beta, self.signed = lr, beta, signed
        self._set_hyperparameters()

    def _validated(self):
        return dict(lr=_real(self.lr, "lr"), beta=_real(self.beta, "beta"),
                    signed=_flag(self.signed, "signed"))
'''

TOY_CHECK = '''
import ctypes
import numpy as np
import fastbp
from fastbp._numba.optim import SPECS, KernelSpec, step_cfunc
from toy_optimizer import Toy

assert SPECS["toy"] == KernelSpec(("buf",), True, ("lr", "beta", "signed"), ("signed",))
rng = np.random.default_rng(0)
X = rng.normal(size=(64, 3))
y = rng.normal(size=(64, 2))
nets = []
for opt in (Toy(lr=0.05, beta=0.9), fastbp.optim.SGD(lr=0.05, momentum=0.9)):
    net = fastbp.Sequential([fastbp.Dense(5, activation="tanh"), fastbp.Dense(2)],
                            dtype="float64", seed=3)
    net.fit(X, y, optimizer=opt, epochs=3, batch_size=16, shuffle=False, verbose=0)
    nets.append(net)
assert nets[0].params.tobytes() == nets[1].params.tobytes(), "engine: Toy != SGD"
assert nets[0].optimizer.state.tobytes() == nets[1].optimizer.state.tobytes()

# signed=True through the generated C entry point and through step()
for dtype in ("float32", "float64"):
    n = 13
    p = rng.normal(size=n).astype(dtype)
    p_c = p.copy()
    opt, opt_c = Toy(signed=True), Toy(signed=True)
    state = opt_c._bind(n, dtype)
    hyper = opt_c._hyper()
    fn = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                          ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64)(
        step_cfunc("toy", dtype))
    for t in range(1, 5):
        g = rng.normal(size=n).astype(dtype)
        assert opt.step(p, g) is True
        assert fn(p_c.ctypes.data, g.ctypes.data, state.ctypes.data, n, n,
                  hyper.ctypes.data, t) == 1
        assert p_c.tobytes() == p.tobytes() and state.tobytes() == opt.state.tobytes()
    assert not np.array_equal(p, p.astype(np.float64).round())  # moved by signed steps
from fastbp._numba import _CFUNCS
hits = sum(cf._cache_hits for (w, _), cf in _CFUNCS.items() if w.__name__ == "_toy_c")
print("TOY OK", "toy entry points loaded from the cache:", hits)
'''


def test_a_declared_kernel_is_all_a_new_optimizer_needs(tmp_path):
    """A kernel declared with update_kernel outside fastbp, and a class that
    names its hyperparameters, train through the engine (the generated C
    entry point) and step() alike; run in a child, twice, so that the second
    run loads the generated entry point from Numba's cache."""
    (tmp_path / "toy_optimizer.py").write_text(TOY_MODULE)
    (tmp_path / "check.py").write_text(TOY_CHECK)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache),
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.path.dirname(os.path.dirname(
                   os.path.abspath(fastbp.__file__)))]))
    for run in range(2):
        out = subprocess.run([sys.executable, "-P", str(tmp_path / "check.py")], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and "TOY OK" in out.stdout, out.stderr[-3000:]
        assert out.stdout.strip().endswith(f"from the cache: {2 * run}"), out.stdout
    assert any(name.startswith("toy_optimizer._toy_c-") for _, _, files in os.walk(cache)
               for name in files), "the generated entry point was not cached"


def _kernel(source):
    namespace = {}
    exec(textwrap.dedent(source), namespace)
    return njit(namespace["k"])


@pytest.mark.parametrize("name, slots, flags, source, what", [
    ("bad1", ("m",), (), "def k(g, p, m, lr): pass", "must start with p, g"),
    ("bad2", ("m", "v"), (), "def k(p, g, v, m, lr): pass", "must start with p, g"),
    ("bad3", ("m",), ("amsgrad",), "def k(p, g, m, t, lr): pass", "flags ['amsgrad']"),
    ("bad4", ("m",), ("m",), "def k(p, g, m, t, lr): pass", "flags ['m']"),
    ("adam", ("m",), (), "def k(p, g, m, lr): pass", "declared twice"),
])
def test_update_kernel_refuses_a_declaration_its_kernel_does_not_match(name, slots, flags,
                                                                         source, what):
    before = dict(SPECS)
    with pytest.raises(TypeError, match=what.replace("[", r"\[").replace("]", r"\]")):
        update_kernel(name, slots=slots, flags=flags)(_kernel(source))
    assert SPECS == before


def test_update_kernel_name_must_be_an_identifier():
    with pytest.raises(TypeError, match="identifier"):
        update_kernel("my-kernel", slots=())


def test_declarations_are_what_the_kernels_take():
    """The declarations fastbp ships (what files and the engine rely on)."""
    assert SPECS["adam"] == KernelSpec(("m", "v", "vmax"), True,
                                       ("lr", "beta1", "beta2", "eps", "weight_decay",
                                        "amsgrad", "decoupled"), ("amsgrad", "decoupled"))
    assert SPECS["sgd"].flags == ("nesterov",) and SPECS["rmsprop"].flags == ("centered",)
    for name in SPECS:
        source = kernels._wrapper_source(name)
        spec = SPECS[name]
        assert f"carray(state, ({len(spec.slots)}, stride))" in source
        assert f"carray(hyper, ({len(spec.hyper)},))" in source
        assert source.count("!= 0") == len(spec.flags)


def test_hyperparameters_are_packed_by_name_in_the_declared_order():
    opt = optim.Adam(lr=0.25, betas=(0.5, 0.75), eps=0.125, weight_decay=0.0625, amsgrad=True)
    np.testing.assert_array_equal(opt._hyper(), [0.25, 0.5, 0.75, 0.125, 0.0625, 1.0, 0.0])
    np.testing.assert_array_equal(optim.AdamW()._hyper()[-2:], [0.0, 1.0])


def test_a_class_that_misses_a_kernel_hyperparameter_is_a_type_error():
    class Broken(optim.Adam):
        def _kernel_values(self, hp):
            return dict(hp, beta1=hp["betas"][0], decoupled=False)  # no beta2

    with pytest.raises(TypeError, match=r"\['beta2'\]"):
        Broken()._hyper()


# -- state protocol -----------------------------------------------------------
def _trained(opt, dtype="float64", n=7, steps=4, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.normal(size=n).astype(dtype)
    for _ in range(steps):
        opt.step(p, rng.normal(size=n).astype(dtype))
    return p


@pytest.mark.parametrize("cls", [optim.SGD, optim.Adam, optim.AdamW, optim.RMSprop,
                                 optim.Rprop, optim.Adagrad])
def test_state_dict_round_trip_continues_bitwise(cls):
    kwargs = {"momentum": 0.9} if cls in (optim.SGD, optim.RMSprop) else {}
    a = cls(**kwargs)
    p = _trained(a)
    sd = a.state_dict()
    assert set(sd) == {"t", "extra", "state"} and sd["t"] == 4
    assert sd["state"].shape == (len(a.slot_names), 7) and sd["state"] is not a.state
    assert sd["extra"] == ({"momentum_start": 1} if cls is optim.SGD else {})
    b = cls(**kwargs)
    b.load_state_dict(sd)
    assert b.state is not sd["state"]  # copied: the dict stays the caller's
    sd["state"][...] = 7.0
    assert not np.any(b.state == 7.0) and not np.any(a.state == 7.0)
    q = p.copy()
    rng = np.random.default_rng(1)
    for _ in range(3):
        g = rng.normal(size=7)
        a.step(p, g)
        b.step(q, g)
    assert p.tobytes() == q.tobytes() and a.state.tobytes() == b.state.tobytes()
    assert a.t == b.t == 7


def test_state_dict_of_an_unused_optimizer_has_no_state():
    opt = optim.SGD()
    assert opt.state_dict() == {"t": 0, "extra": {"momentum_start": 0}, "state": None}
    opt.load_state_dict({"t": 3, "extra": {"momentum_start": 0}, "state": None})
    assert opt.t == 3 and opt.state is None


def _bad_state_dicts(opt):
    good = opt.state_dict()
    state = good["state"]
    yield "not a dict", [1, 2]
    yield "missing key", {"t": 1, "state": None}
    yield "unknown key", dict(good, lr=0.1)
    for t in (True, -1, 2 ** 53, 1.0, "3", None, np.float64(2)):
        yield f"t={t!r}", dict(good, t=t)
    yield "extra missing", dict(good, extra={})
    yield "extra unknown", dict(good, extra={"momentum_start": 1, "x": 1})
    for v in (-1, good["t"] + 2, True, 1.5, "1"):
        yield f"momentum_start={v!r}", dict(good, extra={"momentum_start": v})
    yield "state list", dict(good, state=state.tolist())
    yield "state int", dict(good, state=state.astype(np.int64))
    yield "state 1-D", dict(good, state=state.reshape(-1))
    yield "state rows", dict(good, state=np.zeros((2, 7)))
    yield "state NaN", dict(good, state=np.where(np.arange(7) == 3, np.nan, state))
    yield "state inf", dict(good, state=np.full_like(state, np.inf))


def test_load_state_dict_refuses_bad_values_before_changing_anything():
    opt = optim.SGD(momentum=0.9)
    _trained(opt)
    before = opt.state_dict()
    trials = 0
    for label, bad in _bad_state_dicts(opt):
        with pytest.raises(ValueError, match="SGD state"):
            opt.load_state_dict(bad)
        with pytest.raises(ValueError, match="SGD state"):
            opt.validate_state_dict(bad)
        after = opt.state_dict()
        assert after["t"] == before["t"] and after["extra"] == before["extra"], label
        assert after["state"].tobytes() == before["state"].tobytes(), label
        trials += 1
    assert trials > 20


@pytest.mark.parametrize("cls, slot", [(optim.Adam, "v"), (optim.Adam, "vmax"),
                                       (optim.RMSprop, "square_avg"),
                                       (optim.Adagrad, "state_sum"), (optim.Rprop, "step_size")])
def test_load_state_dict_refuses_negative_second_moments(cls, slot):
    opt = cls()
    _trained(opt)
    sd = opt.state_dict()
    sd["state"][opt.slot_names.index(slot), 2] = -1.0
    with pytest.raises(ValueError, match=f"'{slot}' holds negative"):
        opt.load_state_dict(sd)


def test_rprop_previous_gradient_may_hold_nan():
    """torch stores a NaN gradient in Rprop's prev as it is: a state may hold it."""
    opt = optim.Rprop()
    _trained(opt)
    sd = opt.state_dict()
    sd["state"][0, 1] = np.nan
    opt.load_state_dict(sd)
    assert np.isnan(opt.state[0, 1])


def test_state_dict_after_a_fit_and_save_load(tmp_path):
    X = np.random.default_rng(0).normal(size=(40, 3))
    y = X[:, :1] ** 2
    net = fastbp.Sequential([fastbp.Dense(4, activation="tanh"), fastbp.Dense(1)], seed=0)
    net.fit(X, y, optimizer=optim.SGD(lr=0.01, momentum=0.5), epochs=2, verbose=0)
    net.save(tmp_path / "m.fbp")
    loaded = fastbp.load(tmp_path / "m.fbp")
    a, b = net.optimizer.state_dict(), loaded.optimizer.state_dict()
    assert a["t"] == b["t"] and a["extra"] == b["extra"]
    assert a["state"].tobytes() == b["state"].tobytes()


def test_save_refuses_a_state_load_would_refuse(tmp_path):
    X = np.random.default_rng(0).normal(size=(40, 3))
    net = fastbp.Sequential([fastbp.Dense(4), fastbp.Dense(1)], seed=0)
    net.fit(X, X[:, :1], optimizer=optim.SGD(lr=0.01, momentum=0.5), epochs=1, verbose=0)
    net.optimizer._momentum_start = net.optimizer.t + 5
    with pytest.raises(ValueError, match="cannot save.*momentum_start"):
        net.save(tmp_path / "m.fbp")
    assert not (tmp_path / "m.fbp").exists()


def test_levenberg_marquardt_has_no_state_dict():
    # a full-batch Solver, not an Optimizer: it has no state dict at all
    # (it used to have these methods, each only raising TypeError)
    lm = LevenbergMarquardt()
    for name in ("state_dict", "load_state_dict", "validate_state_dict"):
        assert not hasattr(lm, name)


def test_optimizer_state_script_finds_no_failure():
    """A few trials of tests/adversarial/optimizer_state.py (the full run is its
    own command): hostile state dicts loaded, trained, saved and loaded, in
    child processes with glibc's heap checks on."""
    optimizer_state = adversarial("optimizer_state")
    counts, failures = optimizer_state.run(trials=120, seed=7)
    assert not failures, failures[:10]
    assert sum(counts.values()) == 120 and counts.get("ok", 0) >= 5
    assert counts.get("ValueError", 0) > 50
