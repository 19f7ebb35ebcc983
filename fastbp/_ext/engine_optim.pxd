# Declaration of the threaded optimizer step (implemented in
# csrc/engine_optim.pyx), cimported by engine.pyx: one call per training
# step, after the gradient is complete.
from libc.stdint cimport int64_t

from fastbp._ext.dense cimport floating

cdef int optimizer_step(size_t addr, floating* params, floating* grad, floating* state,
                        const int64_t[:, ::1] segments, int64_t stride, double* hyper,
                        int64_t t) noexcept nogil
