"""The ``veloxseg`` command: ``veloxseg demo-data``, ``veloxseg predict``, ``veloxseg export``."""

import argparse
import importlib
import sys
import warnings

# (module, function adding its subcommand to the subparsers). Imported lazily: each pulls in
# its own heavy dependencies only when the command line is built.
SUBCOMMANDS = [
    ("veloxseg.data.demo", "add_demo_data_parser"),
    ("veloxseg.predict", "add_predict_parser"),
    ("veloxseg.export", "add_export_parser"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veloxseg", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module, function in SUBCOMMANDS:
        getattr(importlib.import_module(module), function)(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prefix = f"veloxseg {args.command}"
    with warnings.catch_warnings():  # a warning is one line, like an error
        warnings.showwarning = lambda message, *_: print(f"{prefix}: warning: {message}", file=sys.stderr)
        try:
            return args.func(args) or 0
        except (ValueError, FileNotFoundError, FileExistsError) as err:
            print(f"{prefix}: error: {err}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
