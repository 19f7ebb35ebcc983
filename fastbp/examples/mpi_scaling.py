"""How data-parallel training scales: N ranks at one thread each against one
process at one thread, on the same global batch (fastbp.bench's workloads).

Run::

    mpiexec -n 2 fastbp mpi-bench --workload L
    mpiexec -n 2 python -m mpi4py -m fastbp.examples.mpi_scaling --workload L   # the same

Rank 0 first trains alone (the other ranks wait), then every rank trains
together; each fit is timed ``--rounds`` times after a warm-up and the
medians of the epochs' times (the history's: the slowest rank's, without
the fit's setup) are compared.  Printed: samples/s of both, the ratio and the
scaling efficiency (ratio / N), the allreduce's share of a step (the
engine's phase timers), and, from the measured compute per sample, a ring
allreduce cost model for more machines: a step on N machines takes
B t / N + u + 2 (N - 1) / N * P * bytes / bandwidth (t: forward and backward
per sample, u: the optimizer's update, which every rank runs in full, P:
parameters), and communication outweighs the computation below a global
batch of N * (allreduce time) / t.
"""
import argparse
import statistics

import numpy as np


def _fit_seconds(net, X, y, batch, comm, epochs):
    """Seconds the epochs of one fit took (the history's, the slowest
    rank's with comm): the steady state, without the fit's setup."""
    history = net.fit(X, y, loss="cross_entropy", optimizer="adam", epochs=epochs,
                      batch_size=batch, shuffle=True, verbose=0, n_threads=1, comm=comm)
    return float(sum(history["time"][-epochs:]))


def main(argv=None):
    from mpi4py import MPI

    from fastbp._ext import dense, engine
    from fastbp.bench import WORKLOADS, make_data, make_fastbp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="M")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    sizes, batch, n = WORKLOADS[args.workload]
    X, y = make_data(sizes, n, args.dtype)
    net = make_fastbp(sizes, args.dtype)
    alone, together = [], []
    if comm.rank == 0:
        _fit_seconds(net, X, y, batch, None, 1)   # warm-up: compile, page in
        alone = [_fit_seconds(net, X, y, batch, None, args.epochs) for _ in range(args.rounds)]
    comm.Barrier()
    _fit_seconds(net, X, y, batch, comm, 1)
    engine._phase_seconds()
    for _ in range(args.rounds):
        together.append(_fit_seconds(net, X, y, batch, comm, args.epochs))
    previous = dense._set_profiling(True)
    _fit_seconds(net, X, y, batch, comm, args.epochs)
    dense._set_profiling(previous)
    phases = engine._phase_seconds()
    if comm.rank != 0:
        return
    rows = n * args.epochs
    one = rows / statistics.median(alone)
    many = rows / statistics.median(together)
    steps = max(phases.pop("steps"), 1)
    phases.pop("gemm")
    step_ms = {k: 1e3 * v / steps for k, v in phases.items() if v}
    total = sum(step_ms.values())
    reduce_ms = step_ms.get("allreduce", 0.0)
    n_params = net.n_params
    width = np.dtype(args.dtype).itemsize
    print(f"{args.workload} {'-'.join(map(str, sizes))}, global batch {batch}, {args.dtype}, "
          f"{n_params:,} parameters, 1 thread per rank, {MPI.Get_library_version().split()[0]}"
          f" {MPI.Get_library_version().split()[2] if len(MPI.Get_library_version().split()) > 2 else ''}")
    print(f"  one process:  {one:10.0f} samples/s")
    print(f"  {comm.size} ranks:     {many:10.0f} samples/s   ratio {many / one:.2f}, "
          f"scaling efficiency {100 * many / one / comm.size:.0f}%")
    print(f"  allreduce: {reduce_ms:.3f} ms of a {total:.3f} ms step "
          f"({100 * reduce_ms / max(total, 1e-12):.1f}%); rank 0's step: "
          + ", ".join(f"{k} {v:.2f}" for k, v in step_ms.items() if v > 0.005 * total) + " ms")
    # the optimizer's update runs on every rank over every parameter: it
    # does not shrink with N (each rank keeps the whole state, as DDP)
    t_opt = step_ms.get("optimizer", 0.0) / 1e3
    t_sample = max(batch / one - t_opt, 1e-12) / batch   # forward + backward per sample
    print(f"  model: a step on N machines = B t / N + (update {1e3 * t_opt:.2f} ms) + ring "
          f"allreduce of {n_params * width / 1e6:.1f} MB (2 (N-1)/N P bytes / bandwidth); "
          f"t = {1e3 * t_sample:.3f} ms per sample")
    print(f"  {'N':>4} {'Gbit/s':>7} {'step ms':>9} {'comm ms':>9} {'samples/s':>10} "
          f"{'comm-bound below batch':>24}")
    for gbit in (10, 100):
        for machines in (2, 8, 64):
            comm_s = 2 * (machines - 1) / machines * n_params * width * 8 / (gbit * 1e9)
            step = batch * t_sample / machines + t_opt + comm_s
            print(f"  {machines:>4} {gbit:>7} {1e3 * step:>9.2f} {1e3 * comm_s:>9.2f} "
                  f"{batch / step:>10.0f} {machines * comm_s / t_sample:>24.0f}")

if __name__ == "__main__":
    main()
