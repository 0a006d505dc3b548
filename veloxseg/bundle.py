"""A VeloxSeg model as a MONAI bundle (``veloxseg export --format monai-bundle -o DIR``) that runs
with MONAI alone: no veloxseg installed.

    DIR/LICENSE                  the weights' license (the code that runs them, veloxseg: Apache-2.0)
    DIR/configs/metadata.json    MONAI's metadata: versions, task, labels, metrics, and the network's
                                 input and output (``network_data_format``)
    DIR/configs/inference.json   MONAI's infer workflow (the standard properties: network_def,
                                 preprocessing, dataset, inferer, postprocessing, evaluator, ...)
    DIR/configs/logging.conf     the runner's logging (Python's logging.config file format)
    DIR/models/model.ts          the network in TorchScript, traced in eval mode at the model's ROI
                                 (with ``present``: the network of those modality groups alone)
    DIR/models/                  also the veloxseg model (config.json, model.safetensors, README.md: the card)
    DIR/docs/README.md           how to run it
    DIR/docs/data_license.txt    the weights' license and the training data's terms (NOTICE, also
                                 models/NOTICE, where they have one)

MONAI's runner runs it, the folders overridden as the MONAI model zoo's bundles take them:

    python -m monai.bundle run --config_file DIR/configs/inference.json --bundle_root DIR \\
        --dataset_dir IN --output_dir OUT

IN holds cases in nnU-Net naming (``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ...: the bundle's
channels in the order of its ``channel_def``; or one 4-D file per case); OUT receives ``<case>.nii.gz``.
The workflow is ``veloxseg predict``'s, written with MONAI's transforms: reorientation, resampling and
per-channel normalisation from the model's metadata (:mod:`veloxseg.data.transforms`), Gaussian-blended
sliding windows of the ROI (overlap 0.5), softmax, MONAI's inverse of the spatial transforms and the
argmax, so the label maps lie on each input's own voxel grid. docs/bundle.md: the format, and a run
in a virtual environment without veloxseg.
"""

import json
import os
from importlib.metadata import version
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch

from . import __version__
from .data.transforms import FOREGROUND_PERCENTILE, FOREGROUND_SHARE, PERCENTILE_SAMPLE
from .export import export, model_sources
from .hub import save_pretrained
from .io import atomic_folder, check_output
from .metadata import ChannelInfo, ModelMetadata
from .model import VeloxSeg
from .predict import model_metadata, present_metadata
from .variants import PAPER_TITLE

SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
PAPER = f"{PAPER_TITLE} (ICLR 2026)"
# What running the bundle needs beyond MONAI and torch (metadata.json's required_packages_version): the
# NIfTI reader, the evaluator's engine and python -m monai.bundle's command line.
REQUIRED_PACKAGES = ("nibabel", "pytorch-ignite", "fire")
# The MONAI model zoo's bundles log the runner's progress to the console in this layout.
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=console

[formatters]
keys=full

[logger_root]
level=INFO
handlers=console

[handler_console]
class=StreamHandler
level=INFO
formatter=full
args=(sys.stdout,)

[formatter_full]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""

# veloxseg's ForegroundZScored as one expression of torch and numpy, for MONAI's Lambdad (MONAI's
# NormalizeIntensity takes its statistics over all or the nonzero voxels, not over a threshold's
# foreground): z-score over the voxels above FOREGROUND_SHARE of the FOREGROUND_PERCENTILE-th
# percentile (of a strided sample of large scans), unchanged without such voxels.
FOREGROUND_ZSCORE = (
    "$lambda x: (lambda f: (x - f.mean()) / (f.std() if f.std() > 0 else 1.0) if f.numel() > 1 else x)("
    "x[x > {share} * max(0.0, float(np.percentile(x.as_tensor().reshape(-1)"
    "[:: (x.numel() > {sample}) * (x.numel() // {sample}) + 1].float().cpu().numpy(), {percentile})))])"
).format(share=FOREGROUND_SHARE, sample=PERCENTILE_SAMPLE, percentile=FOREGROUND_PERCENTILE)


def channel_normalisation_config(key: str, info: ChannelInfo) -> list[dict[str, Any]]:
    """MONAI config of the transforms normalising the one-channel item ``key`` as
    :func:`veloxseg.data.transforms.channel_normalisation` does."""
    if info.normalisation == "ct" and info.clip is None:
        return [{"_target_": "NormalizeIntensityd", "keys": key, "subtrahend": info.mean, "divisor": info.std}]
    if info.normalisation == "ct":
        (a_min, a_max), (b_min, b_max) = info.clip, window_range(info)
        return [
            {
                "_target_": "ScaleIntensityRanged", "keys": key, "a_min": a_min, "a_max": a_max, "clip": True,
                "b_min": b_min, "b_max": b_max,
            }
        ]  # fmt: skip
    if info.normalisation == "zscore":
        return [{"_target_": "NormalizeIntensityd", "keys": key, "nonzero": True, "channel_wise": True}]
    if info.normalisation == "foreground_zscore":
        return [{"_target_": "Lambdad", "keys": key, "func": "@foreground_zscore"}]
    return []  # "none"


def inference_config(metadata: ModelMetadata, roi_size: tuple[int, int, int]) -> dict[str, Any]:
    """configs/inference.json: MONAI's infer workflow for a network whose input holds ``metadata``'s
    channels (those of an exported subset only). Expressions are MONAI config syntax: "$..." is
    Python, "@id" another entry of the config."""
    return {
        "imports": ["$import glob", "$import os", "$import re", "$import numpy as np", "$import torch"],
        "bundle_root": ".",
        "dataset_dir": "/workspace/data",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": "$torch.jit.load(os.path.join(@bundle_root, 'models', 'model.ts'), map_location='cpu')",
        "network": "$@network_def.to(@device).eval()",
        # A case: its files <case>_0000.nii.gz, <case>_0001.nii.gz, ... (channels in order), or <case>.nii.gz.
        "case_of": r"$lambda path: re.sub(r'(_\d{4})?\.nii(\.gz)?$', '', path)",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*')))",
        "cases": (
            "$[{'image': [f for f in @datalist if @case_of(f) == c]} for c in sorted(set(map(@case_of, @datalist)))]"
        ),
        "foreground_zscore": FOREGROUND_ZSCORE,
        "preprocessing": _preprocessing_config(metadata),
        "dataset": {"_target_": "Dataset", "data": "@cases", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},  # fmt: skip
        "inferer": {
            "_target_": "SlidingWindowInferer", "roi_size": list(roi_size), "sw_batch_size": 1, "overlap": 0.5,
            "mode": "gaussian", "sw_device": "@device", "device": "cpu",
        },  # fmt: skip
        "postprocessing": _postprocessing_config(metadata),
        "evaluator": {
            "_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
            "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
        },  # fmt: skip
        "run": ["$@evaluator.run()"],
    }


def _preprocessing_config(metadata: ModelMetadata) -> dict[str, Any]:
    """The infer workflow's preprocessing: load, reorient and resample as in training, split the channels
    to normalise each as its metadata says, then put them back together."""
    keys = [f"image_{c}" for c in range(len(metadata.channels))]
    spatial = [
        {"_target_": "Orientationd", "keys": "image", "axcodes": metadata.orientation, "labels": None},
        *(
            [{"_target_": "Spacingd", "keys": "image", "pixdim": list(metadata.spacing), "mode": "bilinear",
              "dtype": "$np.float32"}] if metadata.spacing is not None else []
        ),
    ]  # fmt: skip
    normalisation = [t for key, info in zip(keys, metadata.channels) for t in channel_normalisation_config(key, info)]
    return {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "image_only": True,
             "ensure_channel_first": True},
            *spatial,
            {"_target_": "SplitDimd", "keys": "image", "output_postfixes": [str(c) for c in range(len(keys))],
             "dim": 0, "keepdim": True},
            *normalisation,
            {"_target_": "ConcatItemsd", "keys": keys, "name": "image", "dim": 0},
            {"_target_": "DeleteItemsd", "keys": keys},
            {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
        ],
    }  # fmt: skip


def _postprocessing_config(metadata: ModelMetadata) -> dict[str, Any]:
    """The infer workflow's postprocessing: softmax, back to the scan's own grid, argmax, and one label file
    per case named after it, of ``veloxseg predict``'s integer type."""
    label_dtype = "$np.uint8" if len(metadata.labels) <= 256 else "$np.int16"  # veloxseg predict's
    return {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "",
             "output_ext": ".nii.gz", "output_dtype": label_dtype, "resample": False, "separate_folder": False,
             "print_log": False, "output_name_formatter": (
                 "$lambda meta, saver: {'subject': @case_of(str(meta['filename_or_obj'])), 'idx': None}"
             )},
        ],
    }  # fmt: skip


def bundle_metadata(model: VeloxSeg, present: list[str] | None = None) -> dict[str, Any]:
    """configs/metadata.json: MONAI's bundle metadata, from the model's config and 3-D metadata.
    ``network_data_format`` describes the network itself (models/model.ts): one preprocessed ROI-sized
    patch in (all channels, or those of ``present``, normalised as the metadata says), one logit per
    class out (the label is the channel of the largest: MONAI's "labels" format)."""
    cfg, meta = model.config, present_metadata(model_metadata(model), model.present_groups(present))
    channels = {str(i): c.name for i, c in enumerate(meta.channels)}
    labels = {str(value): name for name, value in sorted(meta.labels.items(), key=lambda kv: kv[1])}
    targets = ", ".join(name for value, name in labels.items() if value != "0")
    patch = {"spatial_shape": list(cfg.roi_size), "dtype": "float32", "is_patch_data": True}
    return {
        "schema": SCHEMA,
        "version": __version__,
        "changelog": {__version__: f"exported by veloxseg {__version__}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {name: version(name) for name in REQUIRED_PACKAGES},
        "task": f"3-D segmentation of {targets} from {', '.join(channels.values())}",
        "description": (
            f"VeloxSeg ({PAPER}) with modality groups {list(cfg.group_channels)}: whole scans are resampled and "
            f"normalised as in training, segmented with Gaussian-weighted sliding windows of {list(cfg.roi_size)} "
            f"voxels, and the label maps written on each input's own voxel grid (as veloxseg predict does)."
        ),
        "authors": "veloxseg contributors",
        "copyright": "Copyright (c) veloxseg contributors",
        "data_source": meta.training_data,
        "data_type": "nibabel",
        "image_classes": f"{len(channels)} channels: "
        + ", ".join(f"{c.name} ({_normalisation_text(c)})" for c in meta.channels),
        "label_classes": ", ".join(f"{value}: {name}" for value, name in labels.items()),
        "pred_classes": f"{cfg.n_classes} channels of logits, one per label value",
        "eval_metrics": meta.metrics,
        "intended_use": "Research use only: not a medical device and not validated for clinical decisions.",
        "references": [PAPER],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image", "format": "magnitude", "modality": ", ".join(channels.values()),
                    "num_channels": len(channels), "channel_def": channels, "value_range": input_range(meta.channels),
                    **patch, "orientation": meta.orientation,  # the voxel grid the scans are resampled to
                    **({"spacing": list(meta.spacing)} if meta.spacing is not None else {}),  # mm; none: native
                }
            },
            "outputs": {
                "pred": {
                    "type": "image", "format": "labels", "num_channels": cfg.n_classes, "channel_def": labels,
                    "value_range": [], **patch,
                }
            },
        },  # fmt: skip
    }


def window_range(info: ChannelInfo) -> tuple[float, float]:
    """The values a "ct" channel with a ``clip`` window takes once normalised: the window's ends mapped."""
    lo, hi = info.clip
    return (lo - info.mean) / info.std, (hi - info.mean) / info.std


def input_range(channels: list[ChannelInfo]) -> list[float]:
    """[min, max] of the normalised input, or [] (MONAI's "not known") when a channel has no bound:
    a "ct" channel with a clip window maps it onto a fixed range; the z-scores have none."""
    if not all(c.normalisation == "ct" and c.clip for c in channels):
        return []
    bounds = [window_range(c) for c in channels]
    return [min(lo for lo, _ in bounds), max(hi for _, hi in bounds)]


def _normalisation_text(info: ChannelInfo) -> str:
    if info.normalisation == "ct" and info.clip:
        return f"clipped to [{info.clip[0]:g}, {info.clip[1]:g}], minus {info.mean:g}, divided by {info.std:g}"
    if info.normalisation == "ct":
        return f"minus {info.mean:g}, divided by {info.std:g}"
    return {
        "zscore": "z-scored over its nonzero voxels",
        "foreground_zscore": "z-scored over its foreground",
        "none": "as it is",
    }[info.normalisation]


BUNDLE_ENTRIES = ("configs", "docs", "models", "LICENSE")


def is_bundle(folder: Path) -> bool:
    """Whether ``folder`` is a bundle of :func:`export_bundle` and nothing else: only its three folders and LICENSE,
    with its inference config and model (a bundle whose ``eval/`` holds results is not replaced)."""
    return (
        folder.is_dir()
        and {p.name for p in folder.iterdir()} <= set(BUNDLE_ENTRIES)
        and (folder / "configs" / "inference.json").is_file()
        and (folder / "models" / "config.json").is_file()
    )


def check_bundle_output(folder: Path, overwrite: bool, sources: list[Path]) -> None:
    """The overwrite rule (:func:`veloxseg.io.check_output`) for a bundle: an existing ``folder`` is
    replaced only by a bundle, never one of the ``sources`` (the model's own folder)."""
    check_output(folder, overwrite, kind="a MONAI bundle written by veloxseg export", is_kind=is_bundle, inputs=sources)


def export_bundle(
    model: VeloxSeg, folder: str | os.PathLike, *, overwrite: bool = False, present: list[str] | None = None
) -> Path:
    """Write ``model`` as a MONAI bundle into ``folder`` (the layout above), all at once: the bundle
    is assembled beside it and renamed into place. With ``present`` (channel names) its network is that
    of those channels' modality groups alone and it segments cases that hold those channels only, in
    that order. Raises FileExistsError for an existing ``folder`` without ``overwrite``, ValueError when
    ``folder`` is not a bundle (only a bundle replaces a bundle) or is the model's own folder, or when
    the TorchScript network differs from PyTorch (:func:`veloxseg.export.export`). Returns the folder."""
    folder = Path(folder)
    check_bundle_output(folder, overwrite, model_sources(model))
    meta = present_metadata(model_metadata(model), model.present_groups(present))
    with atomic_folder(folder) as tmp:
        save_pretrained(model, tmp / "models")
        export(model, tmp / "models" / "model.ts", "torchscript", present=present)
        (tmp / "configs").mkdir()
        (tmp / "docs").mkdir()
        configs = {
            "metadata.json": bundle_metadata(model, present),
            "inference.json": inference_config(meta, model.config.roi_size),
        }
        for name, content in configs.items():
            (tmp / "configs" / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        (tmp / "configs" / "logging.conf").write_text(LOGGING_CONF, encoding="utf-8")
        (tmp / "docs" / "README.md").write_text(_readme(folder.name, meta), encoding="utf-8")
        (tmp / "LICENSE").write_text(
            f"The weights in models/ (model.ts and model.safetensors) are licensed under {meta.license} (the model "
            f"card, models/README.md, says what that license is for them); the training data's terms: "
            f"docs/data_license.txt.\nThe network's code, veloxseg (traced into models/model.ts), is licensed under "
            f"Apache-2.0.\n",
            encoding="utf-8",
        )
        terms = meta.notice or "The training data's sources: models/README.md (the model card)."
        (tmp / "docs" / "data_license.txt").write_text(f"License: {meta.license}\n\n{terms}", encoding="utf-8")
    return folder


def _readme(name: str, meta: ModelMetadata) -> str:
    files = " ".join(f"`<case>_{c:04d}.nii.gz` ({info.name})" for c, info in enumerate(meta.channels))
    return f"""# {name}: a VeloxSeg model as a MONAI bundle

Segment a folder of NIfTI cases, each one file per channel, {files}, or one 4-D file
`<case>.nii.gz` with the channels in that order, into `<case>.nii.gz` label maps, with MONAI and
torch alone (the network is `models/model.ts`, TorchScript):

```bash
pip install monai nibabel pytorch-ignite fire
python -m monai.bundle run --config_file {name}/configs/inference.json --bundle_root {name} \\
    --dataset_dir IN --output_dir OUT
```

Other overrides: `--device cpu`, `--inferer#overlap 0.25`, `--inferer#sw_batch_size 4`. The label maps
are those of `veloxseg predict --model local-dir:{name}/models -i IN -o OUT`: the scans are reoriented,
resampled and normalised as the model's metadata says, segmented with sliding windows of the model's
ROI and written on each input's own voxel grid. Existing label maps in OUT are replaced.

The network, its preprocessing, labels, training data and metrics: `models/README.md` (the model card).
The network's input and output: `configs/metadata.json`, `network_data_format`.
"""
