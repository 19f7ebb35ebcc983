"""Command line: ``fastbp demo`` and ``fastbp bench`` (also ``python -m fastbp ...``)."""
import argparse
import sys

from ._argtypes import at_least as _at_least
from ._validation import MAX_DIM


def _widths(text):
    """--hidden: "64" (two hidden layers of 64, the default network) or a
    comma-separated list of widths, one per hidden layer ("128,64")."""
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        widths = []
    if not widths or min(widths) < 1 or max(widths) > MAX_DIM:
        raise argparse.ArgumentTypeError(
            f"--hidden takes a width or comma-separated widths such as 128,64 (each from 1 to "
            f"2**31 - 1), got {text!r}")
    return widths * 2 if len(widths) == 1 else widths


def _aborting_on_error(run):
    """Run ``run()`` on an MPI rank; an exception aborts the whole job (as
    ``python -m mpi4py`` does) instead of leaving the other ranks waiting."""
    try:
        return run()
    except BaseException:
        import traceback

        from mpi4py import MPI

        traceback.print_exc()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastbp", description=__doc__)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"fastbp {__version__}")
    parser.add_argument("--info", action="store_true",
                        help="print the instruction-set level, kernels, BLAS and threads in use")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="train a network on scikit-learn's bundled digits data")
    demo.add_argument("--epochs", type=_at_least(1, MAX_DIM), default=30)
    demo.add_argument("--batch-size", type=_at_least(1, MAX_DIM), default=32)
    demo.add_argument("--hidden", type=_widths, default=[64, 64],
                      help="hidden widths: 64 (two layers of 64, the default) or e.g. 128,64")
    demo.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    demo.add_argument("--seed", type=_at_least(0, 2 ** 32 - 1), default=0)
    mpi_demo = sub.add_parser("mpi-demo", help="data-parallel training on digits over MPI "
                              "ranks: mpiexec -n 2 fastbp mpi-demo (needs fastbp[mpich] or "
                              "fastbp[mpi])")
    mpi_demo.add_argument("--sync-every", type=_at_least(1), default=1,
                          help="1: synchronous (default); H > 1: local SGD, weights averaged "
                          "every H steps")
    mpi_bench = sub.add_parser("mpi-bench", help="samples/s of N ranks against one process, "
                               "and the allreduce's share: mpiexec -n 2 fastbp mpi-bench")
    mpi_bench.add_argument("--workload", choices=["S", "M", "L"], default="M")
    mpi_bench.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    mpi_bench.add_argument("--rounds", type=_at_least(1), default=3)
    mpi_bench.add_argument("--epochs", type=_at_least(1), default=1)
    sub.add_parser("bench", help="training speed against the NumPy reference, scikit-learn "
                   "and PyTorch (see fastbp bench --help)", add_help=False)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return _reporting_errors(lambda: bench_main(argv[1:]))
    args = parser.parse_args(argv)
    if args.info:
        from ._info import show_config

        show_config()
        return 0
    if args.command is None:
        parser.error("a command is required (demo, bench) or --info")
    if args.command in ("mpi-demo", "mpi-bench"):
        from .examples import mpi_digits, mpi_scaling

        if args.command == "mpi-demo":
            return _aborting_on_error(lambda: mpi_digits.main(args.sync_every))
        return _aborting_on_error(lambda: mpi_scaling.main(
            ["--workload", args.workload, "--dtype", args.dtype, "--rounds", str(args.rounds),
             "--epochs", str(args.epochs)]))
    if args.command == "demo":
        from .demo import run

        return _reporting_errors(lambda: run(epochs=args.epochs, batch_size=args.batch_size,
                                             hidden=args.hidden, dtype=args.dtype,
                                             seed=args.seed))
    return 0


def _reporting_errors(run):
    """Run a command: Ctrl-C ends it with status 130 and one line, as a
    shell's commands do; a network too large for memory, or a setting the
    library refuses, with its message and status 1, not a traceback."""
    try:
        return run()
    except KeyboardInterrupt:
        print("fastbp: interrupted", file=sys.stderr)
        return 130
    except MemoryError as exc:
        print(f"fastbp: not enough memory for this network ({exc or 'MemoryError'}); try "
              "smaller --hidden widths or --batch-size", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"fastbp: error: {exc}", file=sys.stderr)
        return 1
