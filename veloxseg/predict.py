"""Whole-scan inference: :func:`predict` and the ``veloxseg predict`` command.

A case is one NIfTI image (channels along the 4th axis) or one 3-D file per channel named the
nnU-Net way, ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ... or by the metadata's channel names,
``<case>_PET.nii.gz``. A case may have only some of the model's modality groups (a CT without its PET):
its files' names say which (:func:`case_channels`), and the model runs without the missing groups'
streams (``VeloxSeg(x, present=...)``; best with a model trained with modality dropout). The scan
is preprocessed as in training, by :func:`veloxseg.data.transforms.preprocessing_transforms` of the
model's metadata (reoriented and resampled to its orientation and spacing, normalised per channel), and segmented
with gaussian-blended sliding windows of the model's ROI (volumes smaller than the ROI are padded).
The softmax probabilities are then mapped back onto the input's own voxel grid by MONAI's inverse of
those spatial transforms (trilinear) and the label map is their argmax (class index = label value, as the metadata's labels
are 0..n_classes-1), so it has exactly the input's shape and affine.
"""

import argparse
import dataclasses
import functools
import glob
import itertools
import os
import re
import sys
import types
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Compose
from tqdm import tqdm

from .cli import add_model_command, model_from_args
from .data.transforms import IMAGE, preprocessing_transforms
from .io import atomic_file, check_output
from .metadata import ModelMetadata, model_metadata
from .modalities import channel_of_file, groups_of_channels
from .model import VeloxSeg
from .nifti import NIFTI_SUFFIXES, READ_ERRORS, nifti_stem, nonfinite_problem, nonfinite_voxels
from .optimize import OptimizedVeloxSeg, optimize
from .variants import PUBLISHED

ImageInput = str | os.PathLike | nib.spatialimages.SpatialImage
CaseInput = ImageInput | Sequence[ImageInput] | dict[str | int, ImageInput]
SegModel = VeloxSeg | OptimizedVeloxSeg
AFFINE_TOL = 1e-3  # mm: channel files whose affines differ by more are not on one grid
LABEL_LIKE_VALUES = 8  # a channel of at most this many distinct integer values looks like a label map
LABEL_CHECK_VOXELS = 1_000_000  # voxels sampled per channel for that check


@dataclass
class Scan:
    """One case in memory.

    data: (C, X, Y, Z) float32 voxels, channels in input order.
    affine: (4, 4) voxel-to-world (mm) matrix shared by every channel.
    header: the first file's NIfTI header (its coordinate codes and units go to the outputs), or None.
    sources: the files read (empty for in-memory images).
    """

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None
    sources: tuple[Path, ...]


def load_scan(images: ImageInput | Sequence[ImageInput]) -> Scan:
    """Read one case: a 3-D or 4-D (channels last) image, or several such images stacked as channels.

    Raises FileNotFoundError for a missing file and ValueError naming the problem for an unreadable
    file, an image that is not 3-D/4-D, channels of different shapes or affines, or NaN/inf voxels.
    """
    items = [images] if isinstance(images, (str, os.PathLike, nib.spatialimages.SpatialImage)) else list(images)
    if not items:
        raise ValueError("no input image given")
    volumes, sources = [], []
    reference, reference_name = None, ""
    for index, item in enumerate(items):
        img, name = _open(item, index)
        if img.ndim not in (3, 4) or min(img.shape[:3]) < 2:
            raise ValueError(
                f"{name}: shape {img.shape} is not a 3-D volume (or 4-D with channels last); "
                f"VeloxSeg segments 3-D scans, not 2-D images"
            )
        if reference is None:
            reference, reference_name = img, name
        elif img.shape[:3] != reference.shape[:3]:
            raise ValueError(
                f"{name}: shape {img.shape[:3]} differs from {reference_name} shape {reference.shape[:3]}; "
                f"channel files must share one voxel grid"
            )
        elif not np.allclose(img.affine, reference.affine, atol=AFFINE_TOL):
            raise ValueError(
                f"{name}: affine differs from {reference_name}'s by more than {AFFINE_TOL} mm; "
                f"channel files must be co-registered on one voxel grid"
            )
        data = _read_data(img, name)
        bad = nonfinite_voxels(data)
        if bad:
            raise ValueError(f"{nonfinite_problem(name, bad)}; fix or mask them before segmenting")
        volumes.append(data.reshape(*data.shape[:3], -1))
        if not isinstance(item, nib.spatialimages.SpatialImage):
            sources.append(Path(item))
    header = reference.header if isinstance(reference.header, nib.Nifti1Header) else None
    data = np.ascontiguousarray(np.moveaxis(np.concatenate(volumes, axis=3), 3, 0))
    return Scan(data, np.asarray(reference.affine, dtype=np.float64), header, tuple(sources))


@torch.inference_mode()
def predict_probabilities(
    model: SegModel,
    scan: Scan,
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    device: str | torch.device | None = None,
    metadata: ModelMetadata | None = None,
    present: Sequence[int] | None = None,
    mirror_axes: Sequence[int] = (),
) -> torch.Tensor:
    """Softmax class probabilities (n_classes, X, Y, Z) on the scan's own voxel grid.

    The one inference path of VeloxSeg: ``veloxseg predict``, validation during training, the tags'
    test scores and the benchmarks all segment through it. ``metadata``: the preprocessing to apply
    (default: the model's own, :func:`model_metadata`; the trainer passes the metadata it will save).
    Runs on ``device`` (default: where the model's parameters are); the whole-scan arrays stay on
    the CPU. The model is put in eval mode for the call and restored afterwards. ``present``: the
    modality groups the scan holds, its channels theirs in order (None: every group; see
    :func:`case_channels`). ``mirror_axes``: test-time mirroring along these spatial axes (0, 1, 2 of the
    model's grid), :func:`mirrored`; () segments each window once.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    _check_present(model, present)
    device = resolve_device(device)
    metadata = present_metadata(metadata or model_metadata(model), present)
    _check_channels(model, metadata, scan)
    _warn_label_like_channels(metadata, scan)
    preprocess = Compose(preprocessing_transforms(metadata))  # training's: orientation, spacing, normalisation
    image = preprocess({IMAGE: MetaTensor(torch.from_numpy(scan.data), affine=torch.from_numpy(scan.affine))})[IMAGE]
    x = image.as_tensor()[None]
    was_training = model.training
    model.eval()
    try:
        logits = sliding_window_inference(
            x,
            roi_size=model.config.roi_size,
            sw_batch_size=sw_batch_size,
            predictor=mirrored(model if present is None else functools.partial(model, present=present), mirror_axes),
            overlap=overlap,
            mode="gaussian",
            sw_device=device or next(model.parameters()).device,
            device="cpu",
        )
    finally:
        model.train(was_training)
    probs = MetaTensor(logits[0].softmax(0), affine=image.affine, applied_operations=image.applied_operations)
    return preprocess.inverse({IMAGE: probs})[IMAGE].as_tensor()


def mirrored(
    predictor: Callable[[torch.Tensor], torch.Tensor], axes: Sequence[int]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``predictor`` (windows (B, C, D, H, W) -> logits (B, K, D, H, W)) averaged over every combination of
    flips along the spatial ``axes`` (2 ** len(axes) passes), each output flipped back: nnU-Net's test-time
    mirroring, for models trained with random flips along those axes (the trainer flips along all three).
    Written here because MONAI's TestTimeAugmentation draws random transforms to estimate uncertainty."""
    if any(axis not in (0, 1, 2) for axis in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"mirror_axes must be distinct spatial axes among 0, 1, 2, got {tuple(axes)}")
    flips = [tuple(2 + a for a in combo) for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]
    if len(flips) == 1:
        return predictor

    def average(windows: torch.Tensor) -> torch.Tensor:
        total = predictor(windows)
        for dims in flips[1:]:
            total = total + predictor(windows.flip(dims)).flip(dims)
        return total / len(flips)

    return average


def _check_present(model: SegModel, present: Sequence[int] | None) -> None:
    """Refuse a subset of groups for a compiled model; warn when the model never trained on subsets (its
    metadata records no modality dropout: :meth:`ModelMetadata.subset_training`)."""
    if present is None:
        return
    if isinstance(model, OptimizedVeloxSeg):
        raise ValueError(
            "an optimized (compiled) model runs every modality group: segment a case with only some of them "
            "with the model itself (without --optimize)"
        )
    if not model_metadata(model).subset_training():
        warnings.warn(
            "this model was trained without modality dropout: on a subset of its modality groups expect lower "
            f"accuracy than on all ({_subset_model_advice(model)})"
        )


def _subset_model_advice(model: SegModel) -> str:
    """Where a model for missing modality groups is: a published tag's ``_anymod`` twin, else the trainer."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    twin = f"{cfg.get('architecture')}.{cfg.get('tag')}_anymod"
    if twin in PUBLISHED:
        return f"the tag {twin} was trained for them: create_model({twin!r}, pretrained=True)"
    return "train with --modality-dropout for a model that expects missing groups"


def _subset_note(metadata: ModelMetadata, groups: Sequence[int]) -> str:
    """What ``veloxseg predict`` says of a case with only the modality ``groups``: the channels it segments
    from, and whether the model was trained for that (with modality dropout)."""
    used = ", ".join(c.name for c in present_metadata(metadata, groups).channels)
    trained = metadata.subset_training()
    how = f"trained with {trained}" if trained else "not trained on subsets: expect lower accuracy than on all"
    return f"segmented from {used} only (the other modality groups are missing; the model was {how})"


def present_metadata(metadata: ModelMetadata, present: Sequence[int] | None) -> ModelMetadata:
    """``metadata`` with the channels of the groups ``present`` only (all: None), for a scan that has them."""
    if present is None:
        return metadata
    return dataclasses.replace(metadata, channels=[c for c in metadata.channels if c.group in present])


def case_channels(
    model: SegModel, image: CaseInput, present: Sequence[str | int] | None = None
) -> tuple[list[ImageInput], list[int] | None]:
    """A case's images in the model's channel order and the modality groups they hold (None: all).

    image: one image, a list of them, or a dict {channel name or index: image}. A list of fewer images
    than the model has channels names its channels by the files' names, ``<case>_0001.nii.gz`` (nnU-Net's
    channel number) or ``<case>_PET.nii.gz`` (a channel name from the metadata), unless ``present`` names
    them, one per image in order. Raises ValueError naming the problem (a file that names no channel, a
    channel given twice or beyond the model's, a group given in part, no image).
    """
    metadata = model_metadata(model)
    names = [c.name for c in metadata.channels]
    if isinstance(image, dict):
        image, present = list(image.values()), list(image)
    images = list(image) if isinstance(image, (list, tuple)) else [image]  # anything else: one image (checked on reading)
    for index, item in enumerate(images):
        _check_input_type(item, index)
    found = [_channel_of_image(item, names) for item in images]
    if present is not None:
        if len(present) != len(images):
            raise ValueError(f"present names {len(present)} channel(s) for {len(images)} image(s): one per image")
        channels = [_channel_index(item, names) for item in present]
    elif all(channel is not None for channel in found):
        channels = found
    elif len(images) >= len(names) or len(images) == 1:
        return images, None  # every channel (or a 4-D image with all of them): in the order given
    else:
        unnamed = next(item for item, channel in zip(images, found) if channel is None)
        raise ValueError(
            f"{unnamed if not isinstance(unnamed, nib.spatialimages.SpatialImage) else 'an in-memory image'}: "
            f"the model reads {len(names)} channels ({', '.join(names)}) and this case has fewer; name each file "
            f"<case>_0000.nii.gz ... (nnU-Net) or <case>_<channel>.nii.gz, or say which channels they are (present=)"
        )
    names_by_group = [[c.name for c in metadata.channels if c.group == g] for g in range(model.config.num_groups)]
    groups = groups_of_channels(channels, names_by_group)
    return [image for _, image in sorted(zip(channels, images), key=lambda pair: pair[0])], groups


def _channel_index(item: str | int, names: list[str]) -> int:
    """A channel named by its index or its metadata name."""
    if isinstance(item, int) and not isinstance(item, bool):
        return item
    if isinstance(item, str) and item in names:
        return names.index(item)
    raise ValueError(f"unknown channel {item!r}: the model's channels are {', '.join(names)} (or their indices)")


def _channel_of_image(image: ImageInput, names: list[str]) -> int | None:
    """The channel a file's name gives (None: it gives none, or it is no file name)."""
    found = channel_of_file(Path(image).name, names) if isinstance(image, (str, os.PathLike)) else None
    return None if found is None else found[1]


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a torch.device ("auto": CUDA when available, else the CPU; None stays None).
    Raises ValueError when it is not a device name or this machine does not have it."""
    if device is None:
        return None
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device ({err}); use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this machine has no usable CUDA GPU; use cpu (or auto)")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"device {device!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: this machine has no usable Apple GPU (MPS); use cpu (or auto)")
    return resolved


def predict(
    model: SegModel,
    image: ImageInput | Sequence[ImageInput],
    output: str | os.PathLike | None = None,
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    device: str | torch.device | None = None,
    save_probabilities: bool = False,
    overwrite: bool = False,
    present: Sequence[str | int] | None = None,
    mirror_axes: Sequence[int] = (),
) -> nib.Nifti1Image:
    """Segment one case and return its label map (X, Y, Z) with the input's shape and affine.

    image: a NIfTI path or nibabel image (3-D, or 4-D with channels last), or one per channel, or a dict
        {channel name or index: image}. A case with only some of the model's channels is matched to them
        by its file names or ``present`` (channel names or indices, one per image): :func:`case_channels`.
    output: where to write the label map (a .nii/.nii.gz file); nothing is written without it.
    save_probabilities: also write the (X, Y, Z, n_classes) float32 probabilities beside it, as
        ``<name>_probabilities.nii.gz``.
    mirror_axes: test-time mirroring (:func:`mirrored`), e.g. (0, 1, 2): 2 ** 3 passes per window.
    Every check (input, channels, output paths) runs before anything is computed or written; the
    files are written atomically and an existing one is only replaced with ``overwrite``.
    """
    images, groups = case_channels(model, image, present)
    scan = load_scan(images)
    targets = []
    if output is not None:
        targets = output_paths(Path(output), save_probabilities)
        _check_outputs(targets, scan.sources, overwrite)
    elif save_probabilities:
        raise ValueError("save_probabilities needs an output path")
    probs = predict_probabilities(
        model, scan, overlap=overlap, sw_batch_size=sw_batch_size, device=device, present=groups,
        mirror_axes=mirror_axes,
    )  # fmt: skip
    _check_finite(probs, scan)
    label_dtype = np.uint8 if probs.shape[0] <= 256 else np.int16
    labels = _nifti(probs.argmax(0).numpy().astype(label_dtype), scan)
    if targets:
        images = [labels, _nifti(probs.permute(1, 2, 3, 0).numpy(), scan)] if save_probabilities else [labels]
        with ExitStack() as files:  # every file written before any is renamed into place
            for target, img in zip(targets, images):
                nib.save(img, files.enter_context(atomic_file(target)))
    return labels


def output_paths(output: Path, save_probabilities: bool) -> list[Path]:
    """[label map] or [label map, probabilities] paths for a label-map path ending in .nii/.nii.gz."""
    if not output.name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"output {output} must be a .nii or .nii.gz file")
    if not save_probabilities:
        return [output]
    suffix = next(s for s in NIFTI_SUFFIXES if output.name.endswith(s))
    return [output, output.with_name(output.name[: -len(suffix)] + "_probabilities" + suffix)]


def find_cases(folder: Path, channel_names: Sequence[str] = ()) -> dict[str, list[Path]]:
    """Cases of a folder: ``<case>_<XXXX>.nii[.gz]`` and ``<case>_<channel name>.nii[.gz]`` files grouped
    by case (channels in order), any other NIfTI file a case of its own named after it."""
    files = sorted(p for p in folder.iterdir() if p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"no .nii/.nii.gz files in {folder}")
    return group_cases(files, channel_names)


def group_cases(files: Sequence[Path], channel_names: Sequence[str] = ()) -> dict[str, list[Path]]:
    """Group NIfTI files into cases by their channel names (:func:`veloxseg.modalities.channel_of_file`),
    channels in order; a case may lack some (which, :func:`case_channels` checks against the model)."""
    channels: dict[str, dict[int, Path]] = {}
    for path in files:
        case, channel = channel_of_file(path.name, channel_names) or (nifti_stem(path), 0)
        if channel in channels.setdefault(case, {}):
            raise ValueError(
                f"case {case!r}: {path.name} and {channels[case][channel].name} both give channel {channel}"
            )
        channels[case][channel] = path
    return {case: [found[c] for c in sorted(found)] for case, found in sorted(channels.items())}


def add_predict_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = add_model_command(
        subparsers,
        "predict",
        help="segment NIfTI scans with a VeloxSeg model",
        description="Segment whole NIfTI scans; label maps keep each input's shape, affine and orientation.",
    )
    parser.add_argument(
        "-i", "--input", nargs="+", required=True, type=Path,
        help="a NIfTI file (channels in the 4th dimension), per-channel files <case>_0000.nii.gz ... or their "
        "case prefix <case>, or a folder of cases",
    )  # fmt: skip
    parser.add_argument(
        "-o", "--output", required=True, type=Path,
        help="label map file (.nii.gz or .nii) for one case, or a folder (an existing one, or a name without "
        "a file extension)",
    )  # fmt: skip
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1) (default 0.5)")
    parser.add_argument("--sw-batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    parser.add_argument(
        "--tta", action="store_true",
        help="test-time mirroring along all three axes, as nnU-Net's default (8 passes per window: 8x the time)",
    )  # fmt: skip
    parser.add_argument("--device", default="auto", help="torch device: auto (cuda when available), cpu, cuda:0, ...")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument(
        "--optimize", action="store_true",
        help="compile the model first (veloxseg.optimize: about a minute once, faster windows after)",
    )  # fmt: skip
    parser.add_argument(
        "--save-probabilities", action="store_true", help="also write <name>_probabilities.nii.gz (float32)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument(
        "--allow-untrained-head", action="store_true",
        help="segment even with a head that was never trained to segment (self-supervised weights, or a "
        "registry name without --pretrained: random weights); the label maps are then meaningless",
    )  # fmt: skip
    parser.set_defaults(func=run_predict)
    return parser


def run_predict(args: argparse.Namespace) -> int:
    """The ``veloxseg predict`` command: check every case and output first, then segment them."""
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    device = resolve_device(args.device)
    _check_head_trained(args)
    model = model_from_args(args).to(device)  # its channel names name the case files
    _check_head_trained(args, model)
    names = [c.name for c in model_metadata(model).channels]
    cases, output_dir = _cases_from_args(args.input, args.output, names)
    targets = {case: args.output if output_dir is None else output_dir / f"{case}.nii.gz" for case in cases}
    for case, files in cases.items():
        _check_outputs(output_paths(targets[case], args.save_probabilities), files, args.overwrite)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    present = {case: case_channels(model, files) for case, files in cases.items()}
    if len(cases) > 1 or args.optimize:  # no earlier case written, no compilation, before a bad case fails
        for files, groups in present.values():
            _check_channels(model, present_metadata(model_metadata(model), groups), load_scan(files))
    if args.optimize:
        if any(groups is not None for _, groups in present.values()):
            raise ValueError("--optimize compiles the network of every modality group; some cases lack one")
        model = optimize(model, batch_size=args.sw_batch_size)
    for case, (files, groups) in tqdm(present.items(), desc="predict", unit="case", disable=len(cases) == 1):
        if groups is not None:
            print(f"{case}: {_subset_note(model_metadata(model), groups)}", file=sys.stderr)
        predict(
            model, files, targets[case], overlap=args.overlap, sw_batch_size=args.sw_batch_size, device=device,
            save_probabilities=args.save_probabilities, overwrite=args.overwrite,
            mirror_axes=(0, 1, 2) if args.tta else (),
        )  # fmt: skip
    print(f"wrote {len(cases)} label map(s) to {args.output}")
    return 0


def _check_head_trained(args: argparse.Namespace, model: SegModel | None = None) -> None:
    """Refuse (ValueError) to segment with a head that never learnt to segment: a registry name without
    --pretrained (random weights; checked before building, ``model`` None) or self-supervised weights
    (their metadata's training command ran ``--stage pretrain``), unless --allow-untrained-head; then warn."""
    if model is None:
        if args.model.startswith(("hf-hub:", "local-dir:")) or args.pretrained:
            return
        why = f"{args.model} without --pretrained has random weights"
    elif re.search(r"--stage[= ]pretrain\b", model_metadata(model).training_command):
        why = f"{args.model} holds self-supervised weights: its segmentation head was never trained (fine-tune it)"
    else:
        return
    if not args.allow_untrained_head:
        raise ValueError(f"{why}; its label maps would be meaningless. Pass --allow-untrained-head to segment anyway")
    warnings.warn(f"{why}: the label maps are meaningless (--allow-untrained-head)")


def _cases_from_args(
    inputs: list[Path], output: Path, channel_names: Sequence[str] = ()
) -> tuple[dict[str, list[Path]], Path | None]:
    """(cases, output folder or None when ``output`` is the one case's label-map file); files are named
    by nnU-Net's channel numbers or ``channel_names``."""
    # A name with a file extension is a file (refused by output_paths unless .nii/.nii.gz), as in the API.
    names_a_file = output.name.endswith(NIFTI_SUFFIXES) or (bool(output.suffix) and not output.is_dir())
    if len(inputs) == 1 and inputs[0].is_dir():
        if names_a_file:
            raise ValueError(
                f"the input {inputs[0]} is a folder of cases, so the output must be a folder, got {output}"
            )
        if output.resolve() == inputs[0].resolve():
            raise ValueError(f"the output folder {output} is the input folder; write the label maps elsewhere")
        return find_cases(inputs[0], channel_names), output
    if len(inputs) == 1 and not inputs[0].exists():
        prefix = inputs[0]
        files = sorted(
            p for p in prefix.parent.glob(f"{glob.escape(prefix.name)}_*")
            if (channel_of_file(p.name, channel_names) or ("",))[0] == prefix.name
        )  # fmt: skip
        if not files:
            raise FileNotFoundError(f"{prefix}: no such file or folder, and no channel files {prefix}_0000.nii.gz ...")
        cases = group_cases(files, channel_names)
    else:
        missing = [str(p) for p in inputs if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"input file(s) not found: {', '.join(missing)}")
        other = [str(p) for p in inputs if not p.name.endswith(NIFTI_SUFFIXES)]
        if other:
            raise ValueError(f"input file(s) {', '.join(other)}: not NIfTI (.nii or .nii.gz)")
        found = channel_of_file(inputs[0].name, channel_names)
        cases = {found[0] if found else nifti_stem(inputs[0]): list(inputs)}
    return cases, None if names_a_file else output


def _check_input_type(item: object, index: int) -> None:
    """Refuse (ValueError) an input that is neither a path nor a nibabel image (an array, a tensor)."""
    if not isinstance(item, (str, os.PathLike, nib.spatialimages.SpatialImage)):
        raise ValueError(
            f"input {index} is a {type(item).__module__}.{type(item).__name__}: give a NIfTI path or a nibabel image "
            f"(an array needs its affine: nib.Nifti1Image(array, affine))"
        )


def _open(item: ImageInput, index: int) -> tuple[nib.spatialimages.SpatialImage, str]:
    """(image, name for messages); reads the header only."""
    if isinstance(item, nib.spatialimages.SpatialImage):
        return item, f"input image {index}"
    _check_input_type(item, index)
    path = Path(item)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} not found")
    try:
        return nib.load(path), str(path)
    except READ_ERRORS as err:
        raise ValueError(f"cannot read {path} as a NIfTI image: {err}") from None


def _read_data(img: nib.spatialimages.SpatialImage, name: str) -> np.ndarray:
    """The voxels as float32, or ValueError naming the file (e.g. a truncated download)."""
    try:
        return np.asarray(img.dataobj, dtype=np.float32)
    except READ_ERRORS as err:
        raise ValueError(f"cannot read the voxels of {name}: {type(err).__name__}: {err}") from None


def _check_channels(model: SegModel, metadata: ModelMetadata, scan: Scan) -> None:
    expected = len(metadata.channels)  # the channels of the groups the scan has
    if scan.data.shape[0] != expected:
        names = ", ".join(c.name for c in metadata.channels)
        source = f" from {', '.join(map(str, scan.sources))}" if scan.sources else ""
        hint = (
            f"; for a case with only some of them, name its files <case>_0000.nii.gz ... or <case>_<channel>.nii.gz"
            if scan.data.shape[0] < expected else ""
        )  # fmt: skip
        raise ValueError(
            f"the model expects {expected} input channel(s) ({names}), got {scan.data.shape[0]}{source}{hint}"
        )


def _check_finite(probs: torch.Tensor, scan: Scan) -> None:
    """Refuse (ValueError) probabilities with NaN/inf: their argmax would be a silent all-background map."""
    bad = probs.numel() - int(torch.isfinite(probs).sum())
    if bad:
        source = f" of {', '.join(map(str, scan.sources))}" if scan.sources else ""
        raise ValueError(
            f"the model's output{source} holds {bad} NaN or infinite value(s): nothing written (are its weights "
            f"finite? was the input in a range it was trained on?)"
        )


def _warn_label_like_channels(metadata: ModelMetadata, scan: Scan) -> None:
    """Warn about each channel that holds a few integer values only (a label map given as an image?)."""
    for index, (channel, info) in enumerate(zip(scan.data, metadata.channels)):
        values = np.unique(channel.ravel()[:: max(1, channel.size // LABEL_CHECK_VOXELS)])
        if len(values) <= LABEL_LIKE_VALUES and np.array_equal(values, np.round(values)):
            source = f" ({scan.sources[index]})" if len(scan.sources) == len(scan.data) else ""
            warnings.warn(
                f"input channel {index} ({info.name}){source} holds only the values {values.astype(int).tolist()}: "
                f"it looks like a label map, but the model reads it as the {info.name} image; check the input files"
            )


def _check_outputs(targets: Sequence[Path], sources: Sequence[Path], overwrite: bool) -> None:
    """The overwrite rule (:func:`veloxseg.io.check_output`): an existing file is replaced with ``overwrite``
    (never a folder named like one, nor an input)."""
    for target in targets:
        check_output(target, overwrite, kind="a file", is_kind=Path.is_file, inputs=sources)


def _nifti(array: np.ndarray, scan: Scan) -> nib.Nifti1Image:
    """A NIfTI image of ``array`` on the scan's grid, keeping its coordinate codes and units."""
    img = nib.Nifti1Image(array, scan.affine)
    if scan.header is not None:
        img.header.set_xyzt_units(*scan.header.get_xyzt_units())
        img.set_sform(scan.affine, int(scan.header["sform_code"]))
        img.set_qform(scan.affine, int(scan.header["qform_code"]))
    return img


class _CallableModule(types.ModuleType):
    """This module, callable as :func:`predict`. Importing ``veloxseg.predict`` makes the module the
    package attribute of that name, which would hide the function that ``veloxseg.predict(...)``
    documents; calling the module calls the function instead."""

    def __call__(self, *args: Any, **kwargs: Any) -> nib.Nifti1Image:
        return predict(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
