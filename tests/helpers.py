"""Shared test helpers: dtypes, the tolerance of compiled-vs-reference
checks, and the adversarial scripts as modules."""
import importlib
import os
import sys

import numpy as np

DTYPES = ["float32", "float64"]
#: rtol of compiled vs reference comparisons, per dtype (float32: about 80 of
#: its ulp; the two add up a layer's products in different orders)
RTOL = {"float32": 1e-5, "float64": 1e-10}


def assert_close(actual, expected, dtype, scale=None):
    """Compare with the dtype's tolerance, relative to the array's scale
    (so entries near zero are held to the same absolute standard)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    scale = max(np.abs(expected).max(initial=0.0), 1.0) if scale is None else scale
    err = np.abs(actual - expected).max(initial=0.0) / scale
    assert err <= RTOL[np.dtype(dtype).name], f"max relative error {err:.3g} ({dtype})"




def adversarial(name):
    """The module of ``tests/adversarial/<name>.py``, whose ``run`` the tests
    call for a few trials (the full runs are the scripts' own commands).
    Its folder is on ``sys.path`` while it is imported."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "adversarial")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(folder)
