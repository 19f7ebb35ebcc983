"""One dense layer, forward and backward: the compiled kernels
(``fastbp._ext.dense``, BLAS GEMM + fused epilogue) against their NumPy twins
(``fastbp.reference``), same names and signatures, ReLU activation."""
import numpy as np

from fastbp import reference
from fastbp._ext import dense

from .common import BACKENDS

RELU = 3
#: (batch rows m, n_in, n_out): S's hidden layer, M's first layer, L's first layer
SHAPES = ["32x64x64", "64x784x256", "256x1024x2048"]
KERNELS = {"fastbp": dense, "reference": reference}


class DenseLayer:
    params = (BACKENDS, ["float32", "float64"], SHAPES)
    param_names = ["backend", "dtype", "shape"]

    def setup(self, backend, dtype, shape):
        m, n_in, n_out = (int(s) for s in shape.split("x"))
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((m, n_in)).astype(dtype)
        self.w = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(dtype)
        self.b = (0.1 * rng.standard_normal(n_out)).astype(dtype)
        self.g = rng.standard_normal((m, n_out)).astype(dtype)
        self.kernels = KERNELS[backend]
        # The layer's output (the backward pass takes it, not the pre-activation);
        # this call is also the warm-up.
        self.a = self.kernels.dense_forward(self.x, self.w, self.b, RELU)
        self.kernels.dense_backward(self.x, self.w, self.a, self.g, RELU)

    def time_forward(self, backend, dtype, shape):
        self.kernels.dense_forward(self.x, self.w, self.b, RELU)

    def time_backward(self, backend, dtype, shape):
        self.kernels.dense_backward(self.x, self.w, self.a, self.g, RELU)


#: (m, n, k, op): the products of an S step (batch 32), of digits at batch 200
#: in float64, M's first layer and L's second: op is NN (x @ w), TN (x.T @ g,
#: dW) or NT (g @ w.T, dX).  Small ones run in the engine's unpacked kernels
#: (csrc/smallgemm.h), larger ones in its packed kernels where the CPU has
#: AVX-512 (csrc/packedgemm.h), else in BLAS; the thread count is whatever
#: the benchmark process declared (1 unless set: see csrc/gemm.h).
GEMMS = ["32x64x64-NN", "64x64x32-TN", "32x64x64-NT", "32x2x64-NN",
         "200x100x64-NN", "64x100x200-TN", "64x256x784-NN", "256x2048x2048-NT"]
GEMM_KERNELS = {"fastbp": dense.gemm, "reference": reference.gemm}


class Gemm:
    params = (BACKENDS, ["float32", "float64"], GEMMS)
    param_names = ["backend", "dtype", "product"]

    def setup(self, backend, dtype, product):
        dims, op = product.split("-")
        m, n, k = (int(s) for s in dims.split("x"))
        self.ta, self.tb = op[0] == "T", op[1] == "T"
        rng = np.random.default_rng(0)
        self.a = rng.standard_normal((k, m) if self.ta else (m, k)).astype(dtype)
        self.b = rng.standard_normal((n, k) if self.tb else (k, n)).astype(dtype)
        self.gemm = GEMM_KERNELS[backend]
        self.gemm(self.a, self.b, self.ta, self.tb)

    def time_gemm(self, backend, dtype, product):
        self.gemm(self.a, self.b, self.ta, self.tb)
