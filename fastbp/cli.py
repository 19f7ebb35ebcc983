"""Command line: ``fastbp demo`` (also ``python -m fastbp demo``)."""
import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastbp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a network on scikit-learn's bundled digits data")
    demo.add_argument("--epochs", type=int, default=30)
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--hidden", type=int, default=64)
    demo.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        return run(epochs=args.epochs, batch_size=args.batch_size, hidden=args.hidden,
                   dtype=args.dtype, seed=args.seed)
    return 0
