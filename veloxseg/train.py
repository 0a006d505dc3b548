"""The VeloxSeg trainer: self-supervised pretraining, segmentation and fine-tuning with Accelerate.

``train(TrainConfig(...))`` runs one stage from start to end (or from its last checkpoint) and
returns the final validation metrics; ``examples/train.py`` is its command line. Stages:

* ``pretrain``: the teachers learn to reconstruct each modality group (L_rc), optionally from a
  masked input; encoder and teachers train, labels are not used.
* ``segment``: the paper's objective L = L_seg + 0.5 L_rc + 2.0 L_sdkt (:mod:`veloxseg.losses`).
* ``finetune``: the same objective from pretrained weights adapted to the dataset's channels and
  classes (``create_model(..., pretrained=True, in_ch=..., n_classes=...)``).

The output folder:

* ``config.json``, ``model.safetensors``, ``README.md``: the last model, Hub-ready
  (``create_model("local-dir:<output_dir>")``); ``best/``: the model of the best validation Dice.
* ``checkpoints/step_XXXXXXXX/``: training state (Accelerate ``save_state`` plus
  ``trainer_state.json``), written into a ``.tmp-`` folder and renamed when complete.
* ``metrics.jsonl`` (one JSON object per line), ``curves.png``, ``validation.png``,
  ``train_config.json``, ``logs/`` (tensorboard, when installed), ``data/`` (the demo dataset).
"""

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, is_tensorboard_available, set_seed
from monai.data import DataLoader, MetaTensor
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.transforms import Randomizable
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
from tqdm import tqdm

from .data.datasets import DatasetError, DatasetSpec, from_hf_dataset, read_dataset, validate_dataset
from .data.demo import make_demo_dataset
from .data.transforms import CT_WINDOW, is_ct, make_datasets
from .losses import VeloxSegLoss
from .metadata import ChannelInfo, ModelMetadata
from .model import VeloxSeg
from .registry import create_model

STAGES = ("pretrain", "segment", "finetune")
# (seg, rc, sdkt) loss weights of each stage; the paper's for segmentation.
STAGE_LOSS_WEIGHTS = {"pretrain": (0.0, 1.0, 0.0), "segment": (1.0, 0.5, 2.0), "finetune": (1.0, 0.5, 2.0)}
PAPER_LR = 2.5e-4
# The demo run's defaults: a 64^3 ROI and a higher learning rate, so that a few hundred steps on a CPU learn something.
DEMO_ROI, DEMO_MAX_STEPS, DEMO_LR = (64, 64, 64), 300, 4e-3
CHECKPOINT_PREFIX, TEMP_PREFIX = "step_", ".tmp-"
TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint: a folder without it is incomplete


def option(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A :class:`TrainConfig` field with its command-line help (and argparse options: type, nargs, choices)."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainConfig:
    """One training run. Each field is a flag of ``examples/train.py`` (``--max-steps`` for
    ``max_steps``); ``None`` means the default for the stage, model or data, filled in by :func:`resolve`."""

    # Model and stage
    model: str = option(
        "veloxseg_small", "registry name (veloxseg_tiny/small/base[.tag]), hf-hub:ORG/NAME or local-dir:PATH"
    )
    pretrained: bool = option(False, "start from the model's weights, adapted to the dataset's channels and classes")
    stage: str = option(
        "segment",
        "pretrain: teachers reconstruct the input, labels unused; segment: L_seg + 0.5 L_rc + 2 L_sdkt; "
        "finetune: segment from pretrained weights (implies --pretrained)",
        choices=STAGES,
    )
    roi: int | tuple[int, ...] | None = option(
        None,
        "patch size, 1 or 3 ints; default: the model's roi_size, 64 for the demo data (windows scale with it)",
        type=int,
        nargs="+",
        metavar="N",
    )
    # Data
    data: str | None = option(
        None, "nnU-Net v2 raw or Decathlon (MSD) folder; default: generate the synthetic demo data", metavar="DIR"
    )
    hf_dataset: str | None = option(
        None, "instead of --data: a Hugging Face dataset of NIfTI columns (Hub id or save_to_disk folder)"
    )
    hf_split: str = option("train", "its split")
    hf_image_columns: tuple[str, ...] = option((), "its image columns, one per channel", nargs="+")
    hf_label_column: str = option("label", "its label column")
    hf_labels: dict[str, int] | None = option(
        None, 'its classes as JSON, e.g. \'{"background": 0, "tumour": 1}\'', type=json.loads, metavar="JSON"
    )
    cache_dir: str | None = option(None, "where demo or converted data is written; default OUTPUT_DIR/data")
    fold: int = option(0, "validation fold of splits_final.json")
    val_fraction: float = option(0.2, "validation share when there is no splits_final.json")
    spacing: tuple[float, float, float] | None = option(
        None, "resample to this spacing in mm; default: keep each scan's", type=float, nargs=3, metavar=("X", "Y", "Z")
    )
    cache: bool = option(True, "keep the preprocessed volumes in memory (--no-cache: preprocess them each epoch)")
    num_workers: int | None = option(None, "data loading processes; default a quarter of the CPUs, at most 4", type=int)
    # Optimisation: the authors' AdamW, linear warm-up, cosine decay
    max_steps: int | None = option(None, f"optimizer steps; default {DEMO_MAX_STEPS} unless --epochs", type=int)
    epochs: int | None = option(None, "passes over the training volumes, instead of --max-steps", type=int)
    batch_size: int = option(2, "patches per step and process (before gradient accumulation)")
    crops_per_volume: int = option(2, "random patches per volume, centred on foreground or background 1:1")
    grad_accum: int = option(1, "gradient accumulation steps")
    lr: float | None = option(
        None, f"peak learning rate; default {PAPER_LR} (the authors'), {DEMO_LR} for the short demo run", type=float
    )
    min_lr: float = option(6e-6, "learning rate at the end of the cosine decay")
    weight_decay: float = option(0.01, "AdamW weight decay")
    warmup_steps: int | None = option(None, "linear warm-up steps; default 5%% of the steps", type=int)
    # Objective
    seg_weight: float | None = option(
        None, "weight of L_seg (Dice + CE, deep supervision); default 1, 0 to pretrain", type=float
    )
    rc_weight: float | None = option(
        None, "weight of L_rc (reconstruction MSE); default 0.5, 1 to pretrain", type=float
    )
    sdkt_weight: float | None = option(
        None, "weight of L_sdkt (Gram distillation); default 2, 0 to pretrain", type=float
    )
    one_way_sdkt: bool = option(False, "no L_sdkt gradient into the teachers (detached teacher Gram matrices)")
    mask_ratio: float = option(
        0.0, "share of input cubes zeroed before reconstruction (masked-volume pretraining, e.g. 0.5)"
    )
    mask_patch: int = option(8, "edge of the masked cubes in voxels")
    # Validation, checkpoints, logging
    output_dir: str = option("runs/demo", "the run's folder, in the end a Hub-ready model folder")
    resume: bool = option(False, "continue from the newest complete checkpoint in OUTPUT_DIR/checkpoints")
    val_every: int = option(50, "validate every N steps and at the end")
    checkpoint_every: int = option(50, "save the training state every N steps and at the end")
    keep_checkpoints: int = option(2, "newest checkpoints kept")
    log_every: int = option(10, "log the training losses every N steps")
    sw_batch_size: int = option(2, "sliding windows per forward in validation")
    sw_overlap: float = option(0.25, "sliding-window overlap in validation")
    progress: bool = option(True, "show a progress bar (--no-progress: do not)")
    # Hardware
    mixed_precision: str = option("no", "bf16 (CPU or GPU) or fp16 (GPU)", choices=("no", "bf16", "fp16"))
    cpu: bool = option(False, "train on the CPU even when a GPU is present")
    threads: int | None = option(
        None,
        "CPU threads per process; default torch's (OMP_NUM_THREADS), but 1 on machines with 2 CPUs or fewer",
        type=int,
    )
    seed: int = option(0, "seed of initialisation, data order and augmentation")
    command: str = ""  # the command line, for the model card


@dataclass
class TrainResult:
    """What :func:`train` returns: the step reached, the last and the best validation metrics."""

    step: int
    metrics: dict[str, float]
    best_metrics: dict[str, float]
    output_dir: Path


class PerSampleSeeds(torch.utils.data.Dataset):
    """Seeds a MONAI dataset's random transforms from (seed, epoch, index) before each item.

    MONAI seeds transforms once per worker and ``save_state`` does not hold transform states, so
    a restarted run could not redraw the same crops; with per-sample seeds an item is the same
    whichever process, worker or restart draws it. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int) -> None:
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


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field: ``--max-steps N``, ``--pretrained``, ``--no-cache``."""
    for f in dataclasses.fields(TrainConfig):
        if "help" not in f.metadata:
            continue
        name, options = f.name.replace("_", "-"), dict(f.metadata)
        if f.type is bool:  # a switch away from the default
            action = "store_false" if f.default else "store_true"
            parser.add_argument(f"--{'no-' if f.default else ''}{name}", dest=f.name, action=action, **options)
            continue
        options.setdefault("type", str if f.default is None or isinstance(f.default, tuple) else type(f.default))
        if f.default is not None and f.default != ():
            options["help"] += " (default: %(default)s)"
        parser.add_argument(f"--{name}", dest=f.name, default=f.default, **options)


def config_from_args(args: argparse.Namespace, command: str = "") -> TrainConfig:
    """A :class:`TrainConfig` from the flags of :func:`add_train_arguments`."""
    return TrainConfig(**vars(args), command=command)


def resolve(config: TrainConfig) -> TrainConfig:
    """``config`` with its ``None`` defaults filled in; raises ValueError naming a bad setting."""
    if config.stage not in STAGES:
        raise ValueError(f"unknown stage {config.stage!r}; use one of {', '.join(STAGES)}")
    demo = config.data is None and config.hf_dataset is None
    if config.data is not None and config.hf_dataset is not None:
        raise ValueError("give data or hf_dataset, not both")
    roi = config.roi
    if roi is not None:
        roi = (roi,) if isinstance(roi, int) else tuple(roi)
        roi = roi * 3 if len(roi) == 1 else roi
        if len(roi) != 3:
            raise ValueError(f"roi takes 1 or 3 sizes, got {list(config.roi)}")
    elif demo:
        roi = DEMO_ROI
    seg, rc, sdkt = (
        default if value is None else value
        for value, default in zip(
            (config.seg_weight, config.rc_weight, config.sdkt_weight), STAGE_LOSS_WEIGHTS[config.stage]
        )
    )
    if config.stage == "pretrain" and seg:
        raise ValueError("pretrain is self-supervised: its seg_weight must be 0")
    if config.max_steps is not None and config.epochs is not None:
        raise ValueError("give max_steps or epochs, not both")
    if config.batch_size % config.crops_per_volume:
        raise ValueError(
            f"batch_size ({config.batch_size} patches) must be a multiple of crops_per_volume "
            f"({config.crops_per_volume})"
        )
    if not 0.0 <= config.mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {config.mask_ratio}")
    if config.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {config.mixed_precision!r}")
    if config.mixed_precision == "fp16" and (config.cpu or not torch.cuda.is_available()):
        raise ValueError("fp16 needs a CUDA GPU; use mixed_precision='bf16' on CPU")
    for name in ("max_steps", "epochs", "val_every", "checkpoint_every", "log_every", "keep_checkpoints", "grad_accum"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    cpus = os.cpu_count() or 1
    return dataclasses.replace(
        config,
        num_workers=min(4, cpus // 4) if config.num_workers is None else config.num_workers,
        # On 2 CPUs shared with anything else, two spin-waiting OpenMP threads ran 10-50x slower than one.
        threads=config.threads or (1 if cpus <= 2 and "OMP_NUM_THREADS" not in os.environ else None),
        pretrained=config.pretrained or config.stage == "finetune",
        roi=roi,
        lr=config.lr or (DEMO_LR if demo else PAPER_LR),
        seg_weight=seg,
        rc_weight=rc,
        sdkt_weight=sdkt,
        max_steps=DEMO_MAX_STEPS if config.max_steps is None and config.epochs is None else config.max_steps,
    )


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
                write_atomically(root, make_demo_dataset)
    spec = read_dataset(root)
    # Reading every voxel is slow on big datasets: the main process checks, the others get its verdict.
    problems: list[list[str]] = [[]]
    if accelerator.is_main_process:
        try:
            validate_dataset(spec)
        except DatasetError as err:
            problems = [err.problems]
    broadcast_object_list(problems)
    if problems[0]:
        raise DatasetError(spec.root, problems[0])
    if sorted(spec.labels.values()) != list(range(len(spec.labels))):
        raise DatasetError(spec.root, [f"labels must be the values 0..N-1 (one per class), got {spec.labels}"])
    if config.stage != "pretrain" and len(spec.labels) < 2:
        raise DatasetError(spec.root, [f"segmentation needs a foreground class, labels are {spec.labels}"])
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
        if Path(config.hf_dataset).is_dir():
            ds = datasets.load_from_disk(config.hf_dataset)
            ds = ds[config.hf_split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(config.hf_dataset, split=config.hf_split)
        write_atomically(
            root,
            lambda tmp: from_hf_dataset(ds, tmp, config.hf_image_columns, config.hf_label_column, config.hf_labels),
        )
    return root


def write_atomically(folder: Path, write: Callable[[Path], Any]) -> None:
    """Run ``write(tmp)`` on a fresh temporary folder beside ``folder``, then rename it to ``folder``."""
    tmp = folder.with_name(TEMP_PREFIX + folder.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    write(tmp)
    os.replace(tmp, folder)


def channel_metadata(channel_names: list[str]) -> list[ChannelInfo]:
    """How :mod:`veloxseg.data.transforms` normalises each channel, in the metadata's terms; one
    modality group per channel. CT's window [lo, hi] -> [-1, 1] is ``(clip(x) - mean) / std``."""
    lo, hi = CT_WINDOW
    return [
        ChannelInfo(name, group, "ct", CT_WINDOW, (lo + hi) / 2, (hi - lo) / 2)
        if is_ct(name)
        else ChannelInfo(name, group)
        for group, name in enumerate(channel_names)
    ]


def training_metadata(config: TrainConfig, spec: DatasetSpec, num_train: int, num_val: int) -> ModelMetadata:
    """What inference and the model card need to know about the data (metrics are added when saving)."""
    described = json.loads((spec.root / "dataset.json").read_text())  # read_dataset keeps no name or description
    name = config.hf_dataset or described.get("name") or spec.root.name
    about = f" ({described['description']})" if described.get("description") else ""
    return ModelMetadata(
        channels=channel_metadata(spec.channel_names),
        labels=dict(spec.labels),
        spacing=config.spacing,
        training_data=f"{name}{about}: {num_train} training and {num_val} validation cases, fold {config.fold}",
        datasets=[name],
        training_command=config.command,
    )


def build_model(config: TrainConfig, spec: DatasetSpec) -> VeloxSeg:
    """The model for the dataset: one modality group per channel, one class per label, and teachers
    only when a loss uses them. A ``roi`` other than the model's scales its attention windows."""
    overrides: dict[str, Any] = {
        "in_ch": [1] * len(spec.channel_names),
        "n_classes": len(spec.labels),
        "teachers": bool(config.rc_weight or config.sdkt_weight),
    }
    base = create_model(config.model).config  # architecture only, to see the ROI it was built for
    if config.roi is not None and tuple(config.roi) != base.roi_size:
        overrides.update(
            roi_size=tuple(config.roi), big_windows=scaled_windows(base.big_windows, base.roi_size, config.roi)
        )
    return create_model(config.model, pretrained=config.pretrained, **overrides)


def scaled_windows(windows: Any, roi: tuple[int, ...], new_roi: tuple[int, ...]) -> list[list[int]]:
    """Attention windows covering the same fraction of ``new_roi`` as ``windows`` do of ``roi``."""
    scaled = [[w * n / r for w, r, n in zip(level, roi, new_roi)] for level in windows]
    if any(not w.is_integer() or w < 1 for level in scaled for w in level):
        multiple = [r // math.gcd(r, *(level[axis] for level in windows)) for axis, r in enumerate(roi)]
        raise ValueError(
            f"roi {list(new_roi)} does not scale the model's attention windows {[list(w) for w in windows]} "
            f"(built for roi {list(roi)}) to whole windows; use multiples of {multiple}"
        )
    return [[int(w) for w in level] for level in scaled]


def mask_random_patches(x: torch.Tensor, ratio: float, patch: int) -> torch.Tensor:
    """(B, C, D, H, W) -> the same with a random ``ratio`` of its ``patch``^3 cubes set to 0 (all
    channels; 0 is the mean after normalisation), for masked-volume pretraining."""
    if any(s % patch for s in x.shape[2:]):
        raise ValueError(f"mask_patch {patch} must divide the ROI {list(x.shape[2:])}")
    b, _, *size = x.shape
    keep = torch.rand(b, 1, *(s // patch for s in size), device=x.device) >= ratio
    return x * F.interpolate(keep.to(x.dtype), scale_factor=patch, mode="nearest")


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor (its metadata slows every operation down)."""
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


@torch.no_grad()
def validate(
    model: VeloxSeg, loader: DataLoader, accelerator: Accelerator, config: TrainConfig, class_names: list[str]
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Sliding-window inference on whole validation volumes; Dice per foreground class and their mean,
    and HD95 (mm; the mean over cases where both prediction and label are non-empty).

    Returns (metrics, example): example holds the first case's ``image`` (C, D, H, W), ``label`` and
    ``prediction`` (D, H, W) for the validation plot.
    """
    model.eval()
    n_classes = model.config.n_classes
    dice_metric = DiceMetric(include_background=False, reduction="none")
    hd95_metric = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    dices, hd95s, example = [], [], {}
    for batch in loader:
        image, label = plain(batch["image"]), plain(batch["label"])
        affine = torch.as_tensor(batch["image"].affine, dtype=torch.float64).cpu().reshape(-1, 4, 4)
        spacing = torch.linalg.vector_norm(affine[:, :3, :3], dim=1).tolist()  # voxel size (mm) per axis
        with accelerator.autocast():
            logits = sliding_window_inference(
                image, model.config.roi_size, config.sw_batch_size, model, overlap=config.sw_overlap
            )
        prediction = logits.argmax(1, keepdim=True)
        pred_onehot, label_onehot = (F.one_hot(t[:, 0].long(), n_classes).movedim(-1, 1) for t in (prediction, label))
        with warnings.catch_warnings():  # empty predictions early in training: counted as NaN/inf below
            warnings.simplefilter("ignore")
            hd95 = hd95_metric(pred_onehot, label_onehot, spacing=spacing)
        dices.append(dice_metric(pred_onehot, label_onehot))
        hd95s.append(hd95)
        if not example:
            example = {"image": image[0].float().cpu().numpy(), "label": label[0, 0].cpu().numpy(),
                       "prediction": prediction[0, 0].cpu().numpy()}  # fmt: skip
    dice, hd95 = (accelerator.gather_for_metrics(torch.cat(values)).float().cpu() for values in (dices, hd95s))
    per_class = torch.nanmean(dice, 0)
    metrics = {"val/dice": float(torch.nanmean(per_class))}
    metrics.update({f"val/dice_{name}": float(value) for name, value in zip(class_names, per_class)})
    finite = hd95[torch.isfinite(hd95)]
    metrics["val/hd95"] = float(finite.mean()) if finite.numel() else float("nan")
    model.train()
    return metrics, example


class MetricsLog:
    """``metrics.jsonl`` (one ``{"step": ..., name: value}`` object per line) and Accelerate's trackers.

    Resuming from step N drops the records after N, which the interrupted run logged past its last checkpoint.
    """

    def __init__(self, path: Path, accelerator: Accelerator, resume_step: int | None) -> None:
        self.path, self.accelerator = path, accelerator
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and path.is_file():
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.records = [r for r in records if r["step"] <= resume_step]
        if accelerator.is_main_process:
            tmp = path.with_name(TEMP_PREFIX + path.name)
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            os.replace(tmp, path)

    def log(self, values: dict[str, float], step: int) -> None:
        record = {"step": step, **values}
        self.records.append(record)
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        self.accelerator.log(values, step=step)


def plot_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Training loss and validation Dice against step, as a PNG."""
    from matplotlib.figure import Figure  # Figure renders with Agg and leaves pyplot's global state alone

    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, dice_ax = fig.subplots(1, 2)
    for key in ("train/loss", "train/seg", "train/rc", "train/sdkt"):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            loss_ax.plot(*zip(*points), label=key.split("/")[1])
    loss_ax.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    if loss_ax.lines:
        loss_ax.legend()
    for key in sorted({k for r in records for k in r if k.startswith("val/dice")}):
        dice_ax.plot(*zip(*[(r["step"], r[key]) for r in records if key in r]), marker="o", label=key[4:])
    dice_ax.set(xlabel="step", ylabel="Dice", ylim=(0, 1), title="validation Dice")
    if dice_ax.lines:
        dice_ax.legend()
    save_figure(fig, path)


def plot_validation_slice(example: dict[str, np.ndarray], channel_names: list[str], path: Path, title: str) -> None:
    """Each channel of the validation case's slice with the most label, with label (green) and
    prediction (red) outlines, as a PNG."""
    from matplotlib.figure import Figure

    image, label, prediction = example["image"], example["label"], example["prediction"]
    z = int(np.argmax((label > 0).sum((0, 1)))) if label.any() else label.shape[2] // 2
    fig = Figure(figsize=(4 * len(image), 4.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(image)))
    for c, ax in enumerate(axes):
        ax.imshow(image[c, :, :, z].T, cmap="gray", origin="lower")
        for mask, colour in ((label, "lime"), (prediction, "red")):
            if (mask[:, :, z] > 0).any():
                ax.contour((mask[:, :, z] > 0).T, levels=[0.5], colors=colour, linewidths=1)
        ax.set(title=f"{channel_names[c]}, axial slice {z}", xticks=[], yticks=[])
    fig.suptitle(f"{title} (green: label, red: prediction)")
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    tmp = path.with_name(TEMP_PREFIX + path.name)
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, path)


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint under ``folder`` (temporary and incomplete folders are skipped)."""
    complete = [
        p
        for p in folder.glob(f"{CHECKPOINT_PREFIX}*")
        if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name) and (p / TRAINER_STATE).is_file()
    ]
    return max(complete, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]), default=None)


def save_checkpoint(accelerator: Accelerator, folder: Path, state: dict[str, Any], keep: int) -> Path:
    """Save the training state of ``state["step"]`` into a temporary folder, rename it to
    ``step_XXXXXXXX`` and delete all but the ``keep`` newest checkpoints. All processes call this."""
    final = folder / f"{CHECKPOINT_PREFIX}{state['step']:08d}"
    tmp = folder / f"{TEMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)  # the same step saved again after a resume
        os.replace(tmp, final)
        checkpoints = sorted(folder.glob(f"{CHECKPOINT_PREFIX}*"), key=lambda p: p.name)
        for old in [p for p in checkpoints if p != final][: max(0, len(checkpoints) - keep)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int) -> Any:
    """Linear warm-up from lr / warmup to lr, then cosine decay to ``min_lr`` at ``total_steps``."""
    warmup = min(config.warmup_steps if config.warmup_steps is not None else total_steps // 20, total_steps - 1)
    cosine = CosineAnnealingLR(optimizer, T_max=total_steps - warmup, eta_min=config.min_lr)
    if warmup <= 0:
        return cosine
    linear = LinearLR(optimizer, start_factor=1.0 / warmup, total_iters=warmup)
    return SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


def train(config: TrainConfig) -> TrainResult:
    """Run one training stage; see the module docstring for what lands in ``config.output_dir``."""
    config = resolve(config)
    output_dir = Path(config.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    checkpoint = latest_checkpoint(checkpoint_dir) if config.resume else None
    if not config.resume and (
        any(checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*")) or (output_dir / "config.json").exists()
    ):
        raise FileExistsError(
            f"{output_dir} holds an earlier run: pass resume to continue it, or use another output_dir"
        )

    accelerator = Accelerator(
        cpu=config.cpu,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        log_with="tensorboard" if is_tensorboard_available() else None,
        project_dir=str(output_dir / "logs"),
        # Seeded samplers: the order of epoch e depends on (seed, e) only, so a resumed run sees the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step, below
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    set_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)

    # Data: validated before anything is built.
    spec = prepare_dataset(config, accelerator)
    class_names = [name for name, value in sorted(spec.labels.items(), key=lambda kv: kv[1]) if value > 0]
    model = build_model(config, spec)
    train_set, val_set = make_datasets(
        spec, model.config.roi_size, config.spacing, cache=config.cache, val_fraction=config.val_fraction,
        seed=config.seed, fold=config.fold, num_samples=config.crops_per_volume,
    )  # fmt: skip
    train_set = PerSampleSeeds(train_set, config.seed)
    loader_kwargs = {"num_workers": config.num_workers, "generator": torch.Generator().manual_seed(config.seed)}
    train_loader = DataLoader(
        train_set, batch_size=config.batch_size // config.crops_per_volume, shuffle=True, **loader_kwargs
    )
    val_loader = DataLoader(val_set, batch_size=1, **loader_kwargs)

    metadata = training_metadata(config, spec, len(train_set), len(val_set))
    model.pretrained_cfg["veloxseg"] = metadata.to_dict()

    # Model, loss, optimiser: the student decoder only learns from L_seg, so pretraining freezes it.
    if not config.seg_weight:
        model.decoder.requires_grad_(False)
    loss_fn = VeloxSegLoss(config.seg_weight, config.rc_weight, config.sdkt_weight, config.one_way_sdkt)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps_per_epoch = math.ceil(len(train_loader) / config.grad_accum)  # per process, after sharding
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    scheduler = accelerator.prepare(build_scheduler(optimizer, config, total_steps))

    state = {
        "step": 0,
        "total_steps": total_steps,
        "best_dice": -1.0,
        "best_step": None,
        "metrics": {},
        "best_metrics": {},
    }
    if checkpoint is not None:
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
        if state["total_steps"] != total_steps:  # the schedule's state in the checkpoint is for its own length
            raise ValueError(
                f"{checkpoint} belongs to a run of {state['total_steps']} steps, not {total_steps}: resume with the "
                "same max_steps / epochs, batch size and data"
            )
        accelerator.load_state(str(checkpoint))
        accelerator.print(f"resumed from {checkpoint} (step {state['step']})")
    accelerator.init_trackers("veloxseg", config={k: str(v) for k, v in dataclasses.asdict(config).items()})
    log = MetricsLog(output_dir / "metrics.jsonl", accelerator, state["step"] if checkpoint else None)
    unwrapped = accelerator.unwrap_model(model)

    progress = tqdm(
        total=total_steps,
        initial=state["step"],
        desc=config.stage,
        disable=not (config.progress and accelerator.is_local_main_process),
    )
    model.train()
    # Loss sums, steps and patches since the last log, and the training time they took.
    sums: dict[str, float] = {}
    steps_summed, patches, clock = 0, 0, time.perf_counter()
    while state["step"] < total_steps:
        epoch, step_in_epoch = divmod(state["step"], steps_per_epoch)
        train_set.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        # Resuming mid-epoch: skip the batches the interrupted run already trained on.
        batches = (
            accelerator.skip_first_batches(train_loader, step_in_epoch * config.grad_accum)
            if step_in_epoch
            else train_loader
        )
        for batch in batches:
            image, label = plain(batch["image"]), plain(batch["label"])
            with accelerator.accumulate(model):
                inputs = (
                    mask_random_patches(image, config.mask_ratio, config.mask_patch) if config.mask_ratio else image
                )
                terms = loss_fn(model(inputs), image, label if config.seg_weight else None)
                accelerator.backward(terms["loss"])
                optimizer.step()
                optimizer.zero_grad()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.item() / config.grad_accum
            patches += image.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state["step"] += 1
            step = state["step"]
            steps_summed += 1
            progress.update(1)
            if step % config.log_every == 0 or step == total_steps:
                rate = patches / (time.perf_counter() - clock)
                values = {f"train/{k}": v / steps_summed for k, v in sums.items()}
                values.update({"train/lr": scheduler.get_last_lr()[0], "train/patches_per_s": rate})
                log.log(values, step)
                progress.set_postfix(loss=f"{values['train/loss']:.4f}", patches_s=f"{rate:.1f}")
                sums, steps_summed, patches, clock = {}, 0, 0, time.perf_counter()
            paused = time.perf_counter()
            if config.stage != "pretrain" and (step % config.val_every == 0 or step == total_steps):
                metrics, example = validate(unwrapped, val_loader, accelerator, config, class_names)
                log.log(metrics, step)
                state["metrics"] = metrics
                if metrics["val/dice"] > state["best_dice"]:
                    state.update(best_dice=metrics["val/dice"], best_step=step, best_metrics=metrics)
                    save_model(accelerator, unwrapped, output_dir / "best", metadata, metrics)
                if accelerator.is_main_process:
                    title = f"step {step}, Dice {metrics['val/dice']:.3f}"
                    plot_validation_slice(example, spec.channel_names, output_dir / "validation.png", title)
                accelerator.print(f"step {step}: " + ", ".join(f"{k[4:]} {v:.4f}" for k, v in metrics.items()))
            if step % config.checkpoint_every == 0 or step == total_steps:
                save_checkpoint(accelerator, checkpoint_dir, state, config.keep_checkpoints)
                if accelerator.is_main_process:
                    plot_curves(log.records, output_dir / "curves.png")
            clock += time.perf_counter() - paused  # validation and checkpoints are not training throughput
            if step >= total_steps:
                break
    progress.close()

    save_model(accelerator, unwrapped, output_dir, metadata, state["metrics"])
    accelerator.end_training()
    return TrainResult(state["step"], state["metrics"], state["best_metrics"], output_dir)


def save_model(
    accelerator: Accelerator, model: VeloxSeg, folder: Path, metadata: ModelMetadata, metrics: dict[str, float]
) -> None:
    """Write ``model`` as a Hub-ready folder (each file renamed into place when complete)."""
    if accelerator.is_main_process:
        metadata = dataclasses.replace(metadata, metrics={k.replace("/", "_"): v for k, v in metrics.items()})
        model.pretrained_cfg["veloxseg"] = metadata.to_dict()
        model.save_pretrained(folder, metadata=metadata)
    accelerator.wait_for_everyone()
