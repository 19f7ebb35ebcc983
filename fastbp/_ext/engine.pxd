# The engine's interface: the one declaration of every number that crosses
# the Python / Cython / C boundary.  Each enum is a Cython 3 ``cpdef enum``:
# engine.pyx uses the names as its own, the other compiled modules (dense,
# losses, engine_ops, engine_rows) cimport them (constants only, so
# cimporting them imports nothing at run time), and
# Python reads them as attributes of the compiled module,
# ``fastbp._ext.engine.N_IN`` or ``fastbp._ext.engine.Kind.DENSE``
# (fastbp/program.py, layers.py, activations.py, model.py, reference.py,
# io.py, lm.py, sklearn.py).  To add a code, add it here;
# tests/test_interface.py holds the compiled modules and the C headers to it.
#
# The C headers cannot read a .pxd, so those that branch on a code keep a
# #define of their own (epilogue.h: FBP_ACT_*, losses.h: FBP_LOSS_*); the
# module that includes each header checks at compile time that the two agree
# (csrc/interface.h, FBP_SAME), so a mismatch is a build error.

# Columns of the program, an int64 table (n_layers, N_COLS), one row per
# layer, written by fastbp.program.compile_program (their meaning: engine.pyx's
# docstring).
# Column names are unnamed enums (Cython indexes memoryviews and pointers
# only with those), so Python sees them as ints of the module:
# ``engine.N_IN``.
cpdef enum:
    KIND = 0        # Kind of the row
    N_IN = 1        # input width
    N_OUT = 2       # output width
    ACT = 3         # Act of a dense row (IDENTITY for the others)
    W_OFF = 4       # dense: W's offset in params; BatchNorm: gamma's;
                    # a residual row: the row index of its partner
    B_OFF = 5       # dense: b's offset in params; BatchNorm: beta's
    ACT_OFF = 6     # offset of the row's output in the activation workspace,
                    # per batch row (the widths of the rows before it)
    TRAINABLE = 7   # 1 if the optimizer updates the row's parameters
    AUX_OFF = 8     # offset of its scratch in aux (DropConnect, BatchNorm)
    BUF_OFF = 9     # BatchNorm: offset of its running mean, then variance, in
                    # buffers
    N_COLS = 10     # the number of columns

# Columns of floats, the float64 table (n_layers, N_FLOATS) of each row's
# real-valued settings (0 where its kind has none).
cpdef enum:
    RATE = 0         # the fraction dropped in training: of a DROPOUT row's
                     # inputs, of a DENSE row's weights (DropConnect)
    MOMENTUM = 1     # BATCHNORM: a batch's weight in the running statistics
    EPS = 2          # BATCHNORM: added to the variance
    N_FLOATS = 3

# Columns of reg, the float64 table (n_layers, N_REG) of each row's penalties.
cpdef enum:
    L2 = 0           # weight penalty l2/2 ||W||^2
    L1 = 1           # weight penalty l1 |W|_1
    ACTIVITY_L1 = 2  # activity penalty c/m sum |a| on the row's output
    N_REG = 3

# The codes are named enums: Python sees IntEnums, ``engine.Kind.DENSE``.

# Layer kinds (column KIND).
cpdef enum Kind:
    DENSE = 0
    DROPOUT = 1
    BATCHNORM = 2
    RES_BEGIN = 3
    RES_END = 4

# Activation codes (column ACT; fastbp.activations names them).
cpdef enum Act:
    IDENTITY = 0
    SIGMOID = 1
    TANH = 2
    RELU = 3
    LEAKY_RELU = 4
    ELU = 5
    SOFTPLUS = 6

# The softmax losses computed in C (csrc/losses.h): which one a call means.
cpdef enum Loss:
    SK_LOG_LOSS = 0      # sk_log_loss: scikit-learn's log loss on softmax
    CROSS_ENTROPY = 1    # cross_entropy: torch.nn.CrossEntropyLoss

# The status train_batches returns.
cpdef enum Status:
    OK = 0                 # every batch done
    LOSS_NONFINITE = 1     # a batch's loss was not finite (nothing updated for it)
    PARAMS_NONFINITE = 2   # an update produced a non-finite parameter
    COMM_FAILED = 3        # an MPI call failed (EngineState.comm_error has its code)


# What persists across train_batches calls for one fit (engine.pyx documents
# each field IN / OUT / INOUT).  Declared here because a module with a .pxd
# declares its extension types in it.
from libc.stdint cimport int64_t, uint64_t, intptr_t

cdef extern from "comm.h":
    ctypedef struct fbp_comm:
        void* allreduce
        int ptr_handles
        intptr_t comm, op_sum, type_float, type_double, in_place
        int success, error
    int fbp_allreduce_sum(fbp_comm* c, void* buf, int64_t count, int is_double) nogil

cdef class EngineState:
    cdef readonly int64_t n_layers, n_params, n_features, n_outputs, batch_size
    cdef readonly bint is_double, reg_per_weight
    cdef readonly double clip_value, clip_norm
    cdef size_t loss_addr, step_addr
    cdef int loss_which
    cdef const int64_t[:, ::1] program
    cdef const double[:, ::1] floats
    cdef const double[:, ::1] reg
    cdef const int64_t[:, ::1] segments
    cdef const double[::1] hyper
    cdef uint64_t[::1] rng
    cdef double[::1] grad_norms
    cdef object params, grad, acts, deltas, xb, yb, wb, aux, buffers, opt_state
    cdef double* terms
    # Data-parallel training (set_comm): the allreduce, this rank, the ranks,
    # and whether each rank holds its own shard of the rows.
    cdef fbp_comm comm
    cdef readonly int rank, n_ranks
    cdef readonly bint sharded, sync_bn
    cdef readonly int64_t sync_every   # 1: synchronous; H > 1: local SGD
    cdef double* bn_scratch   # BatchNorm's column sums (sync_bn)
