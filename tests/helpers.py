"""Shared test helpers: dtypes, the tolerance of compiled-vs-reference
checks, and the adversarial scripts as modules."""
import importlib
import importlib.util
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

    Imported as ``adversarial_<name>``, with its folder on ``sys.path`` only
    while it is imported (the scripts put it there for their own imports):
    under its bare name, or with the folder left on the path, a script
    shadowed a real package of the same name for the rest of the session
    (``distributed.py`` hid dask's ``distributed``)."""
    qualified = f"adversarial_{name.lstrip('_')}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "adversarial")
    saved = list(sys.path)
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(qualified,
                                                      os.path.join(folder, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[qualified]
            raise
        return module
    finally:
        sys.path[:] = saved
