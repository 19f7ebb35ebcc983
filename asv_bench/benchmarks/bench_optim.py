"""One Adam update over a flat parameter vector.

Backends:

* ``fastbp``: ``fastbp.optim.Adam().step(params, grad)``, the public call
  (validation + the Numba kernel ``fastbp._numba.optim.adam_step``).
* ``fastbp-engine``: the same update through the C entry point that the
  training engine calls once per mini-batch (``step_cfunc("adam", dtype)``,
  called here through ctypes with the state laid out exactly as ``fit``
  lays it out).  This is the path every ``fit`` pays for; it can differ
  from the Python-called kernel because Numba compiles it separately.
* ``reference``: ``fastbp.reference.adam_step`` (NumPy, several passes).
"""
import ctypes

import numpy as np

import fastbp
from fastbp import reference
from fastbp._numba.optim import step_cfunc

from .common import BETA1, BETA2, EPS, LR

_STEP_PROTO = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64)


class AdamStep:
    params = (["fastbp", "fastbp-engine", "reference"], ["float32", "float64"],
              [10_000, 1_000_000])
    param_names = ["backend", "dtype", "n_params"]

    def setup(self, backend, dtype, n_params):
        rng = np.random.default_rng(0)
        self.p = rng.standard_normal(n_params).astype(dtype)
        self.g = (1e-2 * rng.standard_normal(n_params)).astype(dtype)
        self.step = getattr(self, "_setup_" + backend.replace("-", "_"))(n_params, dtype)
        self.step()  # warm-up: compiles (or loads from cache) the kernel

    def _setup_fastbp(self, n, dtype):
        opt = fastbp.optim.Adam(lr=LR, betas=(BETA1, BETA2), eps=EPS)
        return lambda: opt.step(self.p, self.g)

    def _setup_fastbp_engine(self, n, dtype):
        opt = fastbp.optim.Adam(lr=LR, betas=(BETA1, BETA2), eps=EPS)
        state = opt._bind(n, dtype).reshape(-1)  # what fit hands the engine
        hyper = opt._hyper()
        fn = _STEP_PROTO(step_cfunc(opt.kernel, dtype))
        args = (self.p.ctypes.data, self.g.ctypes.data, state.ctypes.data, n, n,
                hyper.ctypes.data)
        self._keep = (state, hyper, fn)
        counter = [0]

        def step():
            counter[0] += 1
            return fn(*args, counter[0])
        return step

    def _setup_reference(self, n, dtype):
        m, v = np.zeros(n, dtype=dtype), np.zeros(n, dtype=dtype)
        counter = [0]

        def step():
            counter[0] += 1
            return reference.adam_step(self.p, self.g, m, v, m[:0], counter[0], LR, BETA1,
                                       BETA2, EPS, 0.0, False, False)
        return step

    def time_adam_step(self, backend, dtype, n_params):
        self.step()
