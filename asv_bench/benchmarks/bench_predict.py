"""Inference: outputs for a whole data set (S, M: 20000 rows; L: 4096 rows).

``fastbp``: ``Sequential.predict`` (one compiled call, chunked workspace);
``reference``: ``fastbp.reference.forward`` on the same program and weights.
Rows per second = rows / reported time.
"""
from fastbp import reference

from .common import BACKENDS, dataset, make_net


class Predict:
    params = (["S", "M", "L"], BACKENDS)
    param_names = ["workload", "backend"]

    def setup(self, workload, backend):
        self.X = dataset(workload)[0]
        net = make_net(workload)
        if backend == "fastbp":
            self.predict = net.predict
        else:
            program, params = net._program, net.params
            self.predict = lambda X: reference.forward(X, program, params)
        self.predict(self.X[:64])  # warm-up

    def time_predict(self, workload, backend):
        self.predict(self.X)
