"""``veloxseg export``: a model as ONNX, TorchScript (:mod:`veloxseg.export`) or a MONAI bundle
(:mod:`veloxseg.bundle`)."""

import argparse
from pathlib import Path

from .bundle import check_bundle_output, export_bundle
from .cli import add_model_command, model_from_args
from .export import FORMATS, TOLERANCE, check_export_output, export


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = add_model_command(
        subparsers,
        "export",
        help="export a VeloxSeg model to ONNX, TorchScript or a MONAI bundle",
        description="Export the eval-mode model (free batch axis, the model's ROI) and check it against PyTorch.",
    )
    parser.add_argument("--format", choices=(*FORMATS, "monai-bundle"), default="onnx", help="default: onnx")
    parser.add_argument(
        "-o", "--output", required=True, type=Path, help="file to write (.onnx or .pt), or the monai-bundle folder"
    )
    parser.add_argument(
        "--present", nargs="+", metavar="CHANNEL",
        help="export the network of these channels' modality groups alone (names from the model's metadata, "
        "e.g. --present CT): its input holds their channels only; default all",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.set_defaults(func=run_export)
    return parser


def run_export(args: argparse.Namespace) -> int:
    source = [Path(args.model.removeprefix("local-dir:")).expanduser()] if args.model.startswith("local-dir:") else []
    if args.format == "monai-bundle":  # the overwrite rules before building or downloading the model
        check_bundle_output(args.output, args.overwrite, source)
    else:
        check_export_output(args.output, args.format, args.overwrite, source)
    if args.format == "monai-bundle":
        export_bundle(model_from_args(args), args.output, overwrite=args.overwrite, present=args.present)
        print(f"wrote the MONAI bundle {args.output}; how to run it: {args.output / 'docs' / 'README.md'}")
        return 0
    diff = export(model_from_args(args), args.output, args.format, overwrite=args.overwrite, present=args.present)
    print(
        f"wrote {args.output} ({args.format}); max abs difference from PyTorch on random input: {diff:.2e} "
        f"(tolerance {TOLERANCE:g})"
    )
    return 0
