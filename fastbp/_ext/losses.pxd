# Declarations of the C softmax losses (implemented in losses.pyx), shared
# through cimport: which softmax loss a loss address is (engine.pyx), and the
# row-range form of a loss, for steps whose rows are split across threads
# (engine_rows.pyx).
from libc.stdint cimport int64_t

from fastbp._ext.dense cimport floating

cdef int softmax_which(size_t loss_addr, bint dbl) noexcept nogil

cdef void softmax_rows_op(int which, floating* z, floating* y, floating* w, floating* g,
                       int64_t lo, int64_t hi, int64_t k, double scale,
                       double* terms) noexcept nogil
