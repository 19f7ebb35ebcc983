# Declarations of the engine's per-layer ops other than the products
# (implemented in csrc/engine_ops.pyx), shared with engine.pyx (the program
# interpreter) and engine_rows.pyx through cimport.  The ops that are one
# short loop are defined here, ``cdef inline``, so every module that calls
# them compiles them in place as it did when they were its own; the others
# are one indirect call per layer.  ``floating`` is float or double.
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memset

from fastbp._ext.dense cimport floating
from fastbp._ext.engine cimport B_OFF, N_IN, N_OUT, TRAINABLE, W_OFF, fbp_comm


cdef struct BNSync:
    # BatchNorm with the statistics of the global batch (data-parallel
    # training, sync_batchnorm): the ranks' column sums are added by MPI.
    fbp_comm* comm
    double* scratch     # 2 * (the widest BatchNorm) doubles
    int64_t rows        # the global batch's rows


# splitmix64's counter step: draw i of a stream is the one after counter +
# i * GOLDEN (the engine skips a rank's draws with it in data-parallel
# training).  A C constant, so that every module that cimports it has the
# same one.
cdef extern from *:
    """
    #define FBP_SPLITMIX64_GOLDEN ((uint64_t)0x9E3779B97F4A7C15ULL)
    """
    const uint64_t GOLDEN "FBP_SPLITMIX64_GOLDEN"


cdef inline floating* ptr_or_null(floating[::1] a) noexcept nogil:
    """The first element's address; NULL for an empty array (whose [0] does
    not exist)."""
    return &a[0] if a.shape[0] > 0 else NULL


cdef inline double weight_sum(const floating* w, int64_t m) noexcept nogil:
    """w[0] + ... + w[m-1] in double, left to right (as the loss kernels add them)."""
    cdef double total = 0.0
    cdef int64_t i
    for i in range(m):
        total += w[i]
    return total


cdef inline void dropout_backward_op(const floating* g, const floating* mask, floating* out,
                                     int64_t size) noexcept nogil:
    """out = g * mask (out may be g): the gradient through a dropout mask,
    and DropConnect's dW scaled by its mask on W."""
    cdef int64_t i
    for i in range(size):
        out[i] = g[i] * mask[i]


cdef inline void residual_add_op(const floating* x, const floating* skip, floating* out,
                                 int64_t size) noexcept nogil:
    """out = x + skip (out may be x): a residual block's output, and in the
    backward pass the skip path's gradient joining the block's."""
    cdef int64_t i
    for i in range(size):
        out[i] = x[i] + skip[i]


cdef inline double activity_penalty_op(const floating* a, floating* g, int64_t m,
                                       int64_t size, double c) noexcept nogil:
    """Adds c/m sign(a) to g (size values, m rows); returns c/m sum |a|
    (summed in double, left to right)."""
    cdef int64_t i
    cdef double total = 0.0
    cdef floating step = <floating>(c / m)
    for i in range(size):
        total += a[i] if a[i] >= 0 else -a[i]
        g[i] += step if a[i] > 0 else (-step if a[i] < 0 else 0)
    return c / m * total


cdef inline void zero_if_frozen(const int64_t[:, ::1] prog, int64_t l,
                                floating* grad) noexcept nogil:
    """Zero dense row l's dW and db unless it is TRAINABLE."""
    # A frozen dense layer still passes the gradient down; its own is zero.
    if not prog[l, TRAINABLE]:
        memset(grad + prog[l, W_OFF], 0, prog[l, N_IN] * prog[l, N_OUT] * sizeof(floating))
        memset(grad + prog[l, B_OFF], 0, prog[l, N_OUT] * sizeof(floating))


cdef void dropout_forward_op(const floating* x, floating* out, floating* mask, int64_t size,
                             double rate, uint64_t* counter) noexcept nogil

cdef void batchnorm_forward_op(const floating* x, floating* out, floating* xhat,
                               floating* inv_std, const floating* gamma, const floating* beta,
                               floating* buf, int64_t m, int64_t w, double momentum,
                               double eps, bint training, BNSync* sync=*) noexcept nogil

cdef void batchnorm_backward_op(floating* g, const floating* xhat, const floating* inv_std,
                                const floating* gamma, floating* dgamma, floating* dbeta,
                                floating* dx, int64_t m, int64_t w, bint training,
                                BNSync* sync=*) noexcept nogil

cdef double penalize_op(const int64_t[:, ::1] prog, const double[:, ::1] reg,
                        bint per_weight, double wsum, floating* params,
                        floating* grad) noexcept nogil

cdef void clip_and_measure_op(const int64_t[:, ::1] prog, floating* grad, double clip_value,
                              double clip_norm, double* norms) noexcept nogil
