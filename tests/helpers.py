"""Shared test helpers: dtypes and the tolerance of compiled-vs-reference checks."""
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


