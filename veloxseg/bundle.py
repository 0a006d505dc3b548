"""A VeloxSeg model as a MONAI bundle (``veloxseg export --format monai-bundle -o DIR``).

    DIR/LICENSE                  the weights' license (the code that runs them, veloxseg: Apache-2.0)
    DIR/configs/metadata.json    MONAI's metadata: versions, task, labels, metrics, and the network's
                                 input and output (``network_data_format``)
    DIR/configs/inference.json   the inference workflow
    DIR/configs/logging.conf     the runner's logging (Python's logging.config file format)
    DIR/models/                  the model folder (config.json, model.safetensors, README.md: the card)
    DIR/docs/README.md           how to run it
    DIR/docs/data_license.txt    the weights' license and the training data's terms (NOTICE, also
                                 models/NOTICE, where they have one)

MONAI's runner runs it, the folders overridden as the MONAI model zoo's bundles take them:

    python -m monai.bundle run --config_file DIR/configs/inference.json --bundle_root DIR \\
        --dataset_dir IN --output_dir OUT

IN holds cases in nnU-Net naming (``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ...; or one NIfTI
file per case); OUT receives ``<case>.nii.gz``. The workflow builds the network from ``models/``
(``network_def``) and segments each case with :func:`veloxseg.predict.predict`: the preprocessing
from the model's metadata, the sliding window and the output geometry of ``veloxseg predict``.
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
from .hub import save_pretrained
from .io import atomic_folder
from .model import VeloxSeg
from .predict import find_cases, model_metadata, predict, present_metadata

SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
PAPER = "VeloxSeg: Johnson-Lindenstrauss Lemma Guided Network for Efficient 3D Medical Segmentation (ICLR 2026)"
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

# Expressions are MONAI config syntax: "$..." is Python, "@id" another entry of the config.
INFERENCE = {
    "imports": ["$from veloxseg.bundle import segment_cases", "$from veloxseg.predict import resolve_device"],
    "bundle_root": ".",
    "dataset_dir": "/workspace/data",
    "output_dir": "$@bundle_root + '/eval'",
    "device": "$resolve_device('auto')",
    "overlap": 0.5,
    "sw_batch_size": 1,
    "overwrite": False,
    "present": None,
    "network_def": {"_target_": "veloxseg.create_model", "name": "$'local-dir:' + @bundle_root + '/models'"},
    "network": "$@network_def.to(@device).eval()",
    "run": (
        "$segment_cases(@network, @dataset_dir, @output_dir, overlap=@overlap, "
        "sw_batch_size=@sw_batch_size, device=@device, overwrite=@overwrite, present=@present)"
    ),
}


def segment_cases(
    model: VeloxSeg,
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    present: list[str] | None = None,
) -> list[Path]:
    """The bundle's run: each case of ``dataset_dir`` (:func:`veloxseg.predict.find_cases`) segmented
    by :func:`veloxseg.predict.predict` into ``output_dir/<case>.nii.gz``. Returns the label maps.
    ``present``: the channels every case holds, in order (a bundle exported for a subset); None: as
    the file names say."""
    written = []
    names = [c.name for c in model_metadata(model).channels]
    for case, files in find_cases(Path(dataset_dir), names).items():
        written.append(Path(output_dir) / f"{case}.nii.gz")
        predict(
            model, files, written[-1], overlap=overlap, sw_batch_size=sw_batch_size, device=device,
            overwrite=overwrite, present=present,
        )  # fmt: skip
    return written


def bundle_metadata(model: VeloxSeg, present: list[str] | None = None) -> dict[str, Any]:
    """configs/metadata.json: MONAI's bundle metadata, from the model's config and 3-D metadata.
    ``network_data_format`` describes the network itself: one preprocessed ROI-sized patch in
    (all channels, or those of ``present``, normalised as the metadata says), one logit per class out."""
    cfg, meta = model.config, present_metadata(model_metadata(model), model.present_groups(present))
    channels = {str(i): c.name for i, c in enumerate(meta.channels)}
    labels = {str(value): name for name, value in sorted(meta.labels.items(), key=lambda kv: kv[1])}
    targets = ", ".join(name for value, name in labels.items() if value != "0")
    patch = {"spatial_shape": list(cfg.roi_size), "dtype": "float32", "value_range": [], "is_patch_data": True}
    return {
        "schema": SCHEMA,
        "version": __version__,
        "changelog": {__version__: f"exported by veloxseg {__version__}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"veloxseg": __version__, "nibabel": version("nibabel")},
        "task": f"3-D segmentation of {targets} from {', '.join(channels.values())}",
        "description": (
            f"VeloxSeg ({PAPER}) with modality groups {list(cfg.in_ch)}: whole scans are resampled and normalised "
            f"as in training, segmented with Gaussian-weighted sliding windows of {list(cfg.roi_size)} voxels, and "
            f"the label maps written on each input's own voxel grid (veloxseg predict)."
        ),
        "authors": "veloxseg contributors",
        "copyright": "Copyright (c) the veloxseg contributors; licenses: LICENSE and docs/data_license.txt",
        "data_source": meta.training_data,
        "data_type": "nibabel",
        "image_classes": f"{len(channels)} channels: {', '.join(channels.values())}",
        "label_classes": ", ".join(f"{value}: {name}" for value, name in labels.items()),
        "pred_classes": f"{cfg.n_classes} channels of logits, one per label value",
        "eval_metrics": meta.metrics,
        "intended_use": "Research use only: not a medical device and not validated for clinical decisions.",
        "references": [PAPER],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image", "format": "magnitude", "modality": ", ".join(channels.values()),
                    "num_channels": len(channels), "channel_def": channels, **patch,
                }
            },
            "outputs": {
                "pred": {
                    "type": "image", "format": "segmentation", "num_channels": cfg.n_classes, "channel_def": labels,
                    **patch,
                }
            },
        },  # fmt: skip
    }


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


def export_bundle(
    model: VeloxSeg, folder: str | os.PathLike, *, overwrite: bool = False, present: list[str] | None = None
) -> Path:
    """Write ``model`` as a MONAI bundle into ``folder`` (the layout above), all at once: the bundle
    is assembled beside it and renamed into place. With ``present`` (channel names) it segments cases
    that hold those channels only, in that order. Raises FileExistsError for an existing ``folder``
    without ``overwrite``, ValueError when ``folder`` is not a bundle (only a bundle replaces a bundle)
    or is the model's own folder. Returns the folder."""
    from .export import check_export_output, model_sources  # export imports this module

    folder = Path(folder)
    check_export_output(folder, "monai-bundle", overwrite, model_sources(model))
    with atomic_folder(folder) as tmp:
        save_pretrained(model, tmp / "models")
        (tmp / "configs").mkdir()
        (tmp / "docs").mkdir()
        inference = {**INFERENCE, "present": present}
        for name, content in (("metadata.json", bundle_metadata(model, present)), ("inference.json", inference)):
            (tmp / "configs" / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        (tmp / "configs" / "logging.conf").write_text(LOGGING_CONF, encoding="utf-8")
        (tmp / "docs" / "README.md").write_text(_readme(folder.name), encoding="utf-8")
        meta = model_metadata(model)
        (tmp / "LICENSE").write_text(
            f"The weights in models/ are licensed under {meta.license} (the model card, models/README.md, says "
            f"what that license is for them); the training data's terms: docs/data_license.txt.\n"
            f"The code that runs them, veloxseg, is licensed under Apache-2.0.\n",
            encoding="utf-8",
        )
        terms = meta.notice or "The training data's sources: models/README.md (the model card)."
        (tmp / "docs" / "data_license.txt").write_text(f"License: {meta.license}\n\n{terms}", encoding="utf-8")
    return folder


def _readme(name: str) -> str:
    return f"""# {name}: a VeloxSeg model as a MONAI bundle

Segment a folder of NIfTI cases (nnU-Net naming: `<case>_0000.nii.gz`, `<case>_0001.nii.gz`, ... one
file per channel, or one file per case) into `<case>.nii.gz` label maps:

```bash
pip install veloxseg
python -m monai.bundle run --config_file {name}/configs/inference.json --bundle_root {name} \\
    --dataset_dir IN --output_dir OUT
```

Other overrides: `--device cpu`, `--overlap 0.25`, `--sw_batch_size 4`, `--overwrite True`. The label
maps are those of `veloxseg predict --model local-dir:{name}/models -i IN -o OUT`: the scans are
reoriented, resampled and normalised as the model's metadata says, segmented with sliding windows of
the model's ROI and written on each input's own voxel grid.

The network, its preprocessing, labels, training data and metrics: `models/README.md` (the model card).
The network's input and output: `configs/metadata.json`, `network_data_format`.
"""
