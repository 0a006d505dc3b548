"""The ``veloxseg`` command: ``veloxseg demo-data``, ``predict``, ``train``, ``export`` and ``--version``.

Each subcommand lives in its own module, imported when the command line is built; a module whose extra
is not installed still gets its subcommand, which then says which extra to install.
"""

import argparse
import importlib
import sys
import warnings
from typing import NamedTuple

from .version import __version__
from .hub import VeloxSeg
from .registry import create_model


class Subcommand(NamedTuple):
    """A subcommand: its name, the module and function that add its parser, and the extra it needs."""

    name: str
    module: str
    add_parser: str
    extra: str


SUBCOMMANDS = [
    Subcommand("demo-data", "veloxseg.data.demo", "add_demo_data_parser", "predict"),
    Subcommand("predict", "veloxseg.predict", "add_predict_parser", "predict"),
    Subcommand("train", "veloxseg.train", "add_train_parser", "train"),
    Subcommand("export", "veloxseg.export_command", "add_export_parser", "export"),
]


def needs_extra(extra: str, error: ModuleNotFoundError) -> str:
    """The one-line error of a command run without its ``extra`` (``error``: the failed import)."""
    return f'needs {error.name}, which is not installed: pip install "veloxseg[{extra}]"'


def is_missing_dependency(error: ModuleNotFoundError) -> bool:
    """Whether ``error`` is a third-party package not installed (rather than a bug of veloxseg)."""
    return (error.name or "veloxseg").split(".")[0] != "veloxseg"


def add_unavailable_parser(subparsers: argparse._SubParsersAction, command: Subcommand, error: ModuleNotFoundError):
    """A stand-in subcommand: takes any flags (``--help`` too), then raises ``error`` (:func:`main` names
    the extra)."""

    def fail(args: argparse.Namespace) -> int:
        raise error

    parser = subparsers.add_parser(command.name, help=f'(needs pip install "veloxseg[{command.extra}]")', add_help=False)
    parser.set_defaults(func=fail, takes_any_flags=True)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model and --pretrained, shared by ``predict`` and ``export``."""
    parser.add_argument(
        "--model", required=True, help="registry name (veloxseg_small[.tag]), hf-hub:org/repo or local-dir:/path"
    )
    parser.add_argument(
        "--pretrained", action="store_true", help="load a registry name's pretrained weights (hub models always do)"
    )


def add_model_command(
    subparsers: argparse._SubParsersAction, name: str, help: str, description: str
) -> argparse.ArgumentParser:
    """A subcommand that reads a model: its parser, with ``--model`` and ``--pretrained`` added."""
    parser = subparsers.add_parser(name, help=help, description=description)
    add_model_arguments(parser)
    return parser


def model_from_args(args: argparse.Namespace) -> VeloxSeg:
    """The model named by --model, with weights for hf-hub:/local-dir: sources and with --pretrained."""
    from_hub = args.model.startswith(("hf-hub:", "local-dir:"))
    if not (from_hub or args.pretrained):
        print(f"veloxseg: warning: {args.model} has random weights (pass --pretrained to load them)", file=sys.stderr)
    return create_model(args.model, pretrained=from_hub or args.pretrained).eval()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veloxseg", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"veloxseg {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        try:
            module = importlib.import_module(command.module)
        except ModuleNotFoundError as err:
            if not is_missing_dependency(err):
                raise
            add_unavailable_parser(subparsers, command, err)
            continue
        getattr(module, command.add_parser)(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "takes_any_flags", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    prefix = f"veloxseg {args.command}"
    with warnings.catch_warnings():  # a warning is one line, like an error
        warnings.showwarning = lambda message, *_: print(f"{prefix}: warning: {message}", file=sys.stderr)
        try:
            return args.func(args) or 0
        except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as err:
            print(f"{prefix}: error: {err}", file=sys.stderr)
            return 2
        except ModuleNotFoundError as err:  # imported on use, e.g. onnx by veloxseg export --format onnx
            if not is_missing_dependency(err):
                raise
            extra = next(c.extra for c in SUBCOMMANDS if c.name == args.command)
            print(f"{prefix}: error: {needs_extra(extra, err)}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
