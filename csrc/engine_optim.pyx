# cython: language_level=3
"""The optimizer's update of a training step, spread over the kernels'
threads.

Design
------
The update rules are Numba ``cfunc``s (fastbp/_numba/optim.py), one per
optimizer and dtype, called here through their C address: ``step(p, g,
state, n, stride, hyper, t)`` updates n parameters elementwise, so any
split of the flat parameter vector gives the same values.
``optimizer_step`` (cimported by engine.pyx through
fastbp/_ext/engine_optim.pxd; ``_train_batches`` calls it once per step)
runs it over the trainable segments of ``params``: on the calling thread
for small models, else cut into ranges of whole cache lines, one per
thread of the kernels' pool (csrc/pool.h).  It assumes what
``EngineState`` checked: the segments lie inside params, and ``state``
holds ``stride``-spaced slots for each parameter.
"""
from libc.stdint cimport int64_t

from fastbp._ext.dense cimport floating, kernel_threads, pool_run

# step(p, g, state, n, stride, hyper, t) -> 1 if every updated p is finite.
# (fastbp/_numba/optim.py)
ctypedef int (*step_f32)(float*, float*, float*, int64_t, int64_t, double*, int64_t) noexcept nogil
ctypedef int (*step_f64)(double*, double*, double*, int64_t, int64_t, double*, int64_t) noexcept nogil


cdef inline int call_step(size_t addr, floating* p, floating* g, floating* state,
                          int64_t n, int64_t stride, double* hyper,
                          int64_t t) noexcept nogil:
    if floating is float:
        return (<step_f32>addr)(p, g, state, n, stride, hyper, t)
    else:
        return (<step_f64>addr)(p, g, state, n, stride, hyper, t)


# Below this many bytes of parameters an update takes a couple of
# microseconds and runs on the calling thread alone (digits' 7,510 float64
# Adam parameters, 60 KB, took 3.7-4.9 us: split on two threads the fit
# ran 3% faster).
cdef int64_t PARALLEL_STEP_BYTES = 1 << 15
cdef enum:
    MAX_STEP_TASKS = 64


cdef struct StepJob:
    size_t addr
    void* params
    void* grad
    void* state
    const int64_t* segments   # (n_segments, 2): start, length
    int64_t n_segments, total, stride, t
    double* hyper
    int n_tasks
    int is_double
    int ok[MAX_STEP_TASKS]   # each task's result


cdef int _step_range(const StepJob* job, int64_t lo, int64_t hi) noexcept nogil:
    """Update parameters lo .. hi - 1 of the concatenated segments; 1 if
    every updated parameter is finite."""
    cdef int64_t j, start, length, seg_lo = 0, a, b
    cdef int ok = 1
    for j in range(job.n_segments):
        start = job.segments[2 * j]
        length = job.segments[2 * j + 1]
        a = lo - seg_lo if lo > seg_lo else 0
        b = hi - seg_lo if hi - seg_lo < length else length
        seg_lo += length
        if a >= b:
            continue
        if job.is_double:
            ok &= call_step(job.addr, <double*>job.params + start + a,
                            <double*>job.grad + start + a,
                            <double*>job.state + start + a if job.state != NULL else NULL,
                            b - a, job.stride, job.hyper, job.t)
        else:
            ok &= call_step(job.addr, <float*>job.params + start + a,
                            <float*>job.grad + start + a,
                            <float*>job.state + start + a if job.state != NULL else NULL,
                            b - a, job.stride, job.hyper, job.t)
    return ok


cdef void _step_task(void* ctx, int task) noexcept nogil:
    cdef StepJob* job = <StepJob*>ctx
    # Ranges cut at multiples of 64 parameters (whole cache lines).
    cdef int64_t units = (job.total + 63) // 64
    cdef int64_t lo = units * task // job.n_tasks * 64
    cdef int64_t hi = units * (task + 1) // job.n_tasks * 64
    job.ok[task] = _step_range(job, lo, hi if hi < job.total else job.total)


cdef int optimizer_step(size_t addr, floating* params, floating* grad, floating* state,
                        const int64_t[:, ::1] segments, int64_t stride, double* hyper,
                        int64_t t) noexcept nogil:
    """The optimizer's update of every trainable segment (elementwise, so
    any split gives the same values); 1 if every updated parameter is
    finite.  Large models split it across the kernels' threads."""
    cdef StepJob job
    cdef int64_t j
    cdef int i, ok = 1
    job.addr = addr
    job.params = params
    job.grad = grad
    job.state = state
    job.segments = &segments[0, 0] if segments.shape[0] > 0 else NULL
    job.n_segments = segments.shape[0]
    job.stride = stride
    job.hyper = hyper
    job.t = t
    job.is_double = floating is double
    job.total = 0
    for j in range(job.n_segments):
        job.total += segments[j, 1]
    job.n_tasks = kernel_threads()
    if job.n_tasks > MAX_STEP_TASKS:
        job.n_tasks = MAX_STEP_TASKS
    if job.n_tasks < 2 or job.total * <int64_t>sizeof(floating) < PARALLEL_STEP_BYTES:
        return _step_range(&job, 0, job.total)
    pool_run(_step_task, &job, job.n_tasks)
    for i in range(job.n_tasks):
        ok &= job.ok[i]
    return ok
