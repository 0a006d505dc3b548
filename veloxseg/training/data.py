"""The training data: find and check the dataset, describe it as model metadata, build the datasets
and loaders.

The preprocessing comes from the metadata (:mod:`veloxseg.data.transforms`), the same that is saved
with the model and that ``veloxseg predict`` applies. :class:`PerSampleSeeds` makes each item's
random crops and augmentation depend on (seed, epoch, index) only, so a resumed run, any number of
worker processes and every network of ``benchmarks/accuracy.py`` see the same patches.
"""

import json
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from monai.data import DataLoader, Dataset, MetaTensor
from monai.transforms import Randomizable

from ..data.datasets import Case, DatasetError, DatasetSpec, from_hf_dataset, read_dataset, validate_dataset
from ..data.demo import make_demo_dataset
from ..data.transforms import channel_infos, make_dataset, train_transforms
from ..io import atomic_folder
from ..metadata import ModelMetadata
from .config import TrainConfig

ANISOTROPY = 3.0  # an axis this many times coarser than the finest is planned as nnU-Net does (see spacing_fingerprint)


def prepare_dataset(config: TrainConfig, accelerator: Accelerator) -> DatasetSpec:
    """Find the dataset (making the demo one or converting a Hugging Face one when asked), read and
    validate it. Raises :class:`DatasetError` naming every problem, before anything is trained."""
    cache_dir = Path(config.cache_dir or Path(config.output_dir) / "data")
    with accelerator.main_process_first():  # the main process writes, the others then find it
        if config.hf_dataset is not None:
            root = convert_hf_dataset(config, cache_dir)
        elif config.data is not None:
            root = Path(config.data)
        else:
            root = cache_dir / "demo"
            if not (root / "dataset.json").is_file():
                with atomic_folder(_new_cache_folder(root)) as tmp:
                    make_demo_dataset(tmp)
    spec = read_dataset(root)
    # Reading every voxel is slow on big datasets: the main process checks, the others get its verdict.
    problems: list[list[str]] = [[]]
    if accelerator.is_main_process:
        try:
            validate_dataset(spec, require_foreground=config.stage != "pretrain")  # segmentation learns classes
        except DatasetError as err:
            problems = [err.problems]
    broadcast_object_list(problems)
    if problems[0]:
        raise DatasetError(spec.root, problems[0])
    if sorted(spec.labels.values()) != list(range(len(spec.labels))):
        raise DatasetError(spec.root, [f"labels must be the values 0..N-1 (one per class), got {spec.labels}"])
    if len(spec.labels) < 2:  # the model's n_classes counts the background
        problem = f"labels must name a foreground class besides the background, got {spec.labels}"
        raise DatasetError(spec.root, [problem])
    return spec


def convert_hf_dataset(config: TrainConfig, cache_dir: Path) -> Path:
    """Write a Hugging Face dataset of NIfTI columns as an nnU-Net folder under ``cache_dir`` (once)."""
    import datasets  # only needed here

    if not config.hf_image_columns or not config.hf_labels:
        raise ValueError(
            "a Hugging Face dataset needs hf_image_columns (one per channel) and hf_labels (name -> value)"
        )
    root = cache_dir / "hf" / re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{config.hf_dataset}-{config.hf_split}")
    if not (root / "dataset.json").is_file():
        try:
            if Path(config.hf_dataset).is_dir():
                ds = datasets.load_from_disk(config.hf_dataset)
                ds = ds[config.hf_split] if isinstance(ds, datasets.DatasetDict) else ds
            else:
                ds = datasets.load_dataset(config.hf_dataset, split=config.hf_split)
        except (OSError, KeyError) as err:  # offline (ConnectionError), no such dataset or split
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ValueError(
                f"hf_dataset {config.hf_dataset} (split {config.hf_split}) cannot be loaded: {type(err).__name__}: "
                f"{first_line}"
            ) from None
        with atomic_folder(_new_cache_folder(root)) as tmp:
            from_hf_dataset(ds, tmp, config.hf_image_columns, config.hf_label_column, config.hf_labels)
    return root


def _new_cache_folder(root: Path) -> Path:
    """``root``, where data is about to be written: refused (ValueError) when something else is there."""
    if root.exists():
        raise ValueError(
            f"{root} exists but holds no dataset.json: it is not data this trainer wrote, and it is left as it is; "
            f"move it or choose another cache_dir"
        )
    return root


def class_names(spec: DatasetSpec) -> list[str]:
    """The foreground classes' names in label order (the validation metrics' names)."""
    return [name for name, value in sorted(spec.labels.items(), key=lambda kv: kv[1]) if value > 0]


def spacing_fingerprint(cases: Sequence[Case], orientation: str = "RAS") -> tuple[float, float, float]:
    """The target spacing (mm along the axes of ``orientation``) of training on ``cases``, as nnU-Net
    plans it: the median of the cases' spacings per axis, except that along an axis whose median is
    over ``ANISOTROPY`` times the finest axis's the 10th percentile is taken (a few coarse scans do not
    make every scan coarse). Reads the first image header of each case only."""
    spacings = []
    for case in cases:
        image = nib.load(case.images[0])
        zooms = np.asarray(image.header.get_zooms()[:3], dtype=np.float64)
        axes = nib.orientations.io_orientation(image.affine)[:, 0].astype(int)  # voxel axis -> world axis (RAS)
        in_world = np.empty(3)
        in_world[axes] = zooms
        target = nib.orientations.axcodes2ornt(orientation)[:, 0].astype(int)  # RAS axis of each target axis
        spacings.append(in_world[target])
    spacings = np.asarray(spacings)
    fingerprint = np.median(spacings, axis=0)
    coarse = int(np.argmax(fingerprint))
    if fingerprint[coarse] > ANISOTROPY * fingerprint.min():
        fingerprint[coarse] = np.percentile(spacings[:, coarse], 10)
    return tuple(round(float(s), 4) for s in fingerprint)


def training_metadata(config: TrainConfig, spec: DatasetSpec, num_train: int, num_val: int) -> ModelMetadata:
    """The metadata saved with the model: the preprocessing of every channel (:func:`channel_infos`),
    the labels, the spacing (``config.spacing``, else the fingerprint of the training cases, else with
    ``config.native_spacing`` None), and for the model card what it was trained on (metrics are added
    when saving)."""
    described = json.loads((spec.root / "dataset.json").read_text())  # read_dataset keeps no name or description
    name = config.hf_dataset or described.get("name") or spec.root.name
    about = f" ({described['description']})" if described.get("description") else ""
    return ModelMetadata(
        channels=channel_infos(spec.channel_names),
        labels=dict(spec.labels),
        spacing=None if config.native_spacing else config.spacing or spacing_fingerprint(spec.training),
        training_data=f"{name}{about}: {num_train} training and {num_val} validation cases, fold {config.fold}",
        datasets=[name],
        training_command=config.command,
        modality_dropout=config.modality_dropout,
        modality_dropout_mode=config.modality_dropout_mode if config.modality_dropout else "",
    )


class PerSampleSeeds(torch.utils.data.Dataset):
    """Seeds a MONAI dataset's random transforms from (seed, epoch, index) before each item.

    MONAI seeds transforms once per worker and ``save_state`` does not hold transform states, so
    a restarted run could not redraw the same crops; with per-sample seeds an item is the same
    whichever process, worker or restart draws it. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        transform = self.dataset.transform
        if isinstance(transform, Randomizable):
            seed = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
            transform.set_random_state(seed=int(seed))
        return self.dataset[index]


def build_train_set(
    train_cases: Sequence[Case], metadata: ModelMetadata, config: TrainConfig, roi_size: Sequence[int]
) -> PerSampleSeeds:
    """Training items: ``config.crops_per_volume`` random ``roi_size`` patches of a case, ``image``
    (C, *roi_size) and ``label`` (1, *roi_size). (Validation segments whole scans as ``veloxseg
    predict`` does: :func:`veloxseg.training.validate.validate`.)"""
    transform = train_transforms(
        metadata, roi_size, num_samples=config.crops_per_volume, domain_randomisation=config.domain_randomisation
    )
    return PerSampleSeeds(make_dataset(train_cases, transform, config.cache), config.seed)


def build_train_loader(train_set: PerSampleSeeds, config: TrainConfig) -> DataLoader:
    """Shuffled training batches of ``config.batch_size`` patches (``batch_size / crops_per_volume`` cases)."""
    volumes = config.batch_size // config.crops_per_volume
    generator = torch.Generator().manual_seed(config.seed)
    return DataLoader(train_set, batch_size=volumes, shuffle=True, num_workers=config.num_workers, generator=generator)


def steps_per_epoch(loader: DataLoader, grad_accum: int) -> int:
    """Optimizer steps in one pass over ``loader`` (per process, after sharding); a last, short
    accumulation of batches steps too."""
    return math.ceil(len(loader) / grad_accum)


def batches(
    loader: DataLoader, train_set: PerSampleSeeds, accelerator: Accelerator, step: int = 0, grad_accum: int = 1
) -> Iterator[dict[str, torch.Tensor]]:
    """The (prepared) training loader's batches, epoch after epoch without end, starting at optimizer
    step ``step``: a resumed run skips the batches its interrupted run already trained on."""
    epoch, step_in_epoch = divmod(step, steps_per_epoch(loader, grad_accum))
    while True:
        train_set.set_epoch(epoch)
        loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, step_in_epoch * grad_accum) if step_in_epoch else loader
        epoch, step_in_epoch = epoch + 1, 0


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor (its metadata slows every operation down)."""
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor
