"""A VeloxSeg model as ONNX or TorchScript, checked against PyTorch (the ``veloxseg export`` command:
:mod:`veloxseg.export_command`).

The exported graph is the eval-mode forward, (B, sum(group_channels), *roi_size) -> logits
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

A MONAI bundle (``--format monai-bundle``) is built on this module's TorchScript export: :mod:`veloxseg.bundle`.
"""

import copy
import json
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .hub import NOTICE_NAME
from .io import atomic_file, check_output
from .model import VeloxSeg
from .optimize import OptimizedVeloxSeg
from .predict import model_metadata, present_metadata

FORMATS = ("onnx", "torchscript")
EXPORT_KINDS = {"onnx": "an ONNX file", "torchscript": "a TorchScript file"}  # for messages
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
    model: VeloxSeg | OptimizedVeloxSeg, path: str | os.PathLike, format: str = "onnx", *, overwrite: bool = False,
    tolerance: float = TOLERANCE, present: Sequence[str | int] | None = None,
) -> float:  # fmt: skip
    """Export a copy of ``model`` (eval mode, CPU) to ``path``, check it against PyTorch on a random
    input and return the largest absolute difference of their logits. ``present``: the modality groups
    (channel names or group indices) of a subset-only export (None: all).

    Raises ValueError when the exported model differs from PyTorch by ``tolerance`` or more (nothing
    is written then), FileExistsError for an existing ``path`` without ``overwrite`` and ValueError for
    one that is not a VeloxSeg export of this format or is a file of the model's own folder.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    path = Path(path)
    check_export_output(path, format, overwrite, model_sources(model))
    model = plain_torch_copy(model)
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


def plain_torch_copy(model: VeloxSeg | OptimizedVeloxSeg) -> VeloxSeg:
    """An eval-mode CPU copy of ``model`` (of the network inside an optimized one) that runs PyTorch's own
    ops only: veloxseg's compiled CPU kernels (``veloxseg.optimize``) turned off, as an exported graph
    must not call them (they exist only where veloxseg built them)."""
    model = copy.deepcopy(model.model if isinstance(model, OptimizedVeloxSeg) else model).cpu().eval()
    for module in model.modules():
        if hasattr(module, "fused_kernel"):
            module.fused_kernel = False
    return model


def check_export_output(path: Path, format: str, overwrite: bool, sources: list[Path]) -> None:
    """The overwrite rule (:func:`veloxseg.io.check_output`) for an ONNX or TorchScript export: an existing
    ``path`` is replaced only by the same format's export, never one of the ``sources`` (the model's own
    folder). Bundles have theirs in :func:`veloxseg.bundle.check_bundle_output`."""
    kind, is_kind = f"{EXPORT_KINDS[format]} written by veloxseg export", EXPORT_RECOGNISERS[format]
    check_output(path, overwrite, kind=kind, is_kind=is_kind, inputs=sources)


def model_sources(model: VeloxSeg) -> list[Path]:
    """The local folder a model was loaded from (``local-dir:``), as a list: what an export must not replace."""
    folder = getattr(model, "pretrained_cfg", {}).get("file")
    return [Path(folder).expanduser()] if folder else []


def is_onnx_export(path: Path) -> bool:
    """Whether ``path`` is an ONNX file with VeloxSeg's metadata (written by :func:`export`)."""
    import onnx

    try:
        graph = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - onnx raises protobuf's DecodeError, OSError, ...: any means "not ONNX"
        return False
    return any(p.key == "veloxseg_config" for p in graph.metadata_props)


def is_torchscript_export(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive with VeloxSeg's extra file (written by :func:`export`)."""
    if not (path.is_file() and zipfile.is_zipfile(path)):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/extra/veloxseg.json") for name in archive.namelist())


EXPORT_RECOGNISERS = {"onnx": is_onnx_export, "torchscript": is_torchscript_export}


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
