"""Command line: ``python -m ppl_score demo [options]`` (see ``--help``)."""

from __future__ import annotations

import argparse
import sys

from . import demo

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ppl_score",
        description="Score matching for Pyro and NumPyro over torch and JAX backends.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo_parser = commands.add_parser(
        "demo",
        help="fit a deep energy model by score matching and plot it",
        description="Fit an MLP energy model by a score-matching objective on a built-in 2-D mixture (known "
        "score), scikit-learn's 8x8 digits, or your own .npy/.npz array; print held-out metrics and write "
        "demo.png and metrics.json to --out.",
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=demo.run, check=demo.check_args, subparser=demo_parser)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.check(args.subparser, args)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
