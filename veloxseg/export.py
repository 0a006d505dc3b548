"""``veloxseg export``: a VeloxSeg model as ONNX or TorchScript, checked against PyTorch.

The exported graph is the eval-mode forward, (B, sum(in_ch), *roi_size) -> logits
(B, n_classes, *roi_size), with a free batch axis so sliding-window batches run through it. The
model's config and data metadata travel inside the file (ONNX metadata properties
``veloxseg_config``/``veloxseg_metadata``; TorchScript extra file ``veloxseg.json``) so a deployment
can reproduce the preprocessing, and so do the weights' ``license`` and, where they have one, their
``NOTICE`` (ONNX properties of those names; TorchScript: in ``veloxseg.json`` and as the extra file
``NOTICE``). Before the file is moved into place it is run (ONNX with
onnxruntime on the CPU) on a fresh random input and compared with PyTorch.

With ``present`` (``--present CT``) the export is the network of those modality groups alone (their
channels in, the other groups' streams left out): (B, channels of those groups, *roi_size) -> logits,
for a deployment that never has the others; its metadata lists those channels only.

``--format monai-bundle`` writes a folder instead: the model as a MONAI bundle (:mod:`veloxseg.bundle`).
"""

import argparse
import copy
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .bundle import export_bundle
from .hub import NOTICE_NAME
from .io import atomic_file
from .model import VeloxSeg
from .predict import add_model_arguments, model_from_args, model_metadata, present_metadata

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-4
CHECK_BATCH = 2  # batch size of the example and check inputs (> 1: the batch axis stays free)


class PresentGroups(nn.Module):
    """``model`` on a fixed subset of its modality groups: (B, channels of ``groups``, D, H, W) -> logits."""

    def __init__(self, model: VeloxSeg, groups: tuple[int, ...]) -> None:
        super().__init__()
        self.model, self.groups = model, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, present=list(self.groups))


def export(
    model: VeloxSeg, path: str | os.PathLike, format: str = "onnx", *, overwrite: bool = False,
    tolerance: float = TOLERANCE, present: Sequence[str | int] | None = None,
) -> float:  # fmt: skip
    """Export a copy of ``model`` (eval mode, CPU) to ``path``, check it against PyTorch on a random
    input and return the largest absolute difference of their logits. ``present``: the modality groups
    (channel names or group indices) of a subset-only export (None: all).

    Raises ValueError when the exported model differs from PyTorch by ``tolerance`` or more (nothing
    is written then) and FileExistsError for an existing ``path`` without ``overwrite``.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"output {path} exists; pass --overwrite (overwrite=True) to replace it")
    model = copy.deepcopy(model).cpu().eval()
    cfg = model.config
    groups = model.present_groups(present)
    metadata = present_metadata(model_metadata(model), groups)
    info = {
        "veloxseg_config": json.dumps(cfg.to_dict()),
        "veloxseg_metadata": json.dumps(metadata.to_dict()),
        "license": metadata.license,
        **({NOTICE_NAME: metadata.notice} if metadata.notice else {}),
    }
    if groups is not None:
        model = PresentGroups(model, groups).eval()
        info["veloxseg_present"] = json.dumps([c.name for c in metadata.channels])
    example = torch.randn(CHECK_BATCH, len(metadata.channels), *cfg.roi_size)
    with atomic_file(path) as temporary:  # moved into place only when it passes the check
        if format == "onnx":
            _export_onnx(model, example, temporary, info)
            run = _onnx_runner(temporary)
        else:
            _export_torchscript(model, example, temporary, info)
            run = torch.jit.load(temporary, map_location="cpu")
        check = torch.randn_like(example)
        with torch.no_grad():
            diff = (run(check) - model(check)).abs().max().item()
        if not diff < tolerance:
            raise ValueError(
                f"the {format} export differs from PyTorch by {diff:.3g} (tolerance {tolerance}); not written"
            )
    return diff


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path, info: dict[str, str]) -> None:
    """Write ONNX with PyTorch's dynamo exporter (one file, weights inside), ``info`` as metadata."""
    torch.onnx.export(
        model, (example,), path, dynamo=True, external_data=False, verbose=False,
        input_names=["image"], output_names=["logits"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )  # fmt: skip
    import onnx

    graph = onnx.load(path)
    onnx.helper.set_model_props(graph, info)
    onnx.save(graph, path)


def _onnx_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, info: dict[str, str]) -> None:
    """Write a traced TorchScript module, ``info`` as the extra file ``veloxseg.json``."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the input-shape checks, fixed by the trace
        traced = torch.jit.trace(model, example, check_trace=False)
    notice = {NOTICE_NAME: info[NOTICE_NAME]} if NOTICE_NAME in info else {}
    torch.jit.save(traced, path, _extra_files={"veloxseg.json": json.dumps(info), **notice})


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        help="export a VeloxSeg model to ONNX, TorchScript or a MONAI bundle",
        description="Export the eval-mode model (free batch axis, the model's ROI) and check it against PyTorch.",
    )
    add_model_arguments(parser)
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
    if args.output.exists() and not args.overwrite:  # before building or downloading the model
        raise FileExistsError(f"output {args.output} exists; pass --overwrite to replace it")
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
