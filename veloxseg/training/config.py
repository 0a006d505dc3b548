"""The training run's settings: :class:`TrainConfig`, its command-line flags and :func:`resolve`.

Each field of :class:`TrainConfig` is one flag of ``veloxseg train`` (:func:`add_train_arguments`
turns a field declared with :func:`option` into ``--field-name``); a new setting is one more field.
``None`` means "the default for the stage, model or data", filled in by :func:`resolve`, which also
rejects bad combinations with a ValueError naming them.
"""

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..metadata import check_spacing
from ..modalities import MODALITY_DROPOUT_MODES
from .recipe import RECIPES, Recipe

STAGES = ("pretrain", "segment", "finetune")
# The demo run's defaults: a 64^3 ROI, so that a few hundred steps on a CPU learn something.
DEMO_ROI, DEMO_MAX_STEPS = (64, 64, 64), 300


def option(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A :class:`TrainConfig` field with its command-line help (and argparse options: type, nargs, choices)."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainConfig:
    """One training run. Each field is a flag of ``veloxseg train`` (``--max-steps`` for
    ``max_steps``); ``None`` means the default for the stage, model or data, filled in by :func:`resolve`."""

    # Model and stage
    model: str = option(
        "veloxseg_small_hr",
        "registry name (veloxseg_tiny/small/base/small_hr[.tag]), hf-hub:ORG/NAME or local-dir:PATH",
    )
    pretrained: bool = option(False, "start from the model's weights, adapted to the dataset's channels and classes")
    stage: str = option(
        "segment",
        "pretrain: teachers reconstruct the input, labels unused; segment: train to segment, with the recipe's "
        "loss; finetune: segment from pretrained weights (implies --pretrained)",
        choices=STAGES,
    )
    recipe: str = option(
        "default",
        "default: L_seg on the full-resolution head, no teachers, no dropout, lr 8e-3 (what measured best at "
        "short CPU budgets); paper: L_seg over the four heads + 0.5 L_rc + 2 L_sdkt, lr 2.5e-4 (the authors')",
        choices=tuple(RECIPES),
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
        None,
        "resample every scan to this spacing in mm (RAS axes); default: the training cases' spacing fingerprint "
        "(the median per axis; the 10th percentile along an axis over 3x coarser than the finest)",
        type=float,
        nargs=3,
        metavar=("X", "Y", "Z"),
    )
    native_spacing: bool = option(
        False, "train on each scan's own voxel grid, no resampling (the model's metadata then says spacing null)"
    )
    domain_randomisation: bool = option(
        False,
        "SynthSeg-style intensity randomisation of MR-like channels (per-tissue contrast, gamma, bias field, "
        "resolution, blur, noise) for models meant to work on scans from other sources",
    )
    cache: bool = option(True, "keep the preprocessed volumes in memory (--no-cache: preprocess them each epoch)")
    num_workers: int | None = option(None, "data loading processes; default a quarter of the CPUs, at most 4", type=int)
    # Optimisation: the authors' AdamW, linear warm-up, cosine decay
    max_steps: int | None = option(None, f"optimizer steps; default {DEMO_MAX_STEPS} unless --epochs", type=int)
    epochs: int | None = option(None, "passes over the training volumes, instead of --max-steps", type=int)
    batch_size: int = option(2, "patches per step and process (before gradient accumulation), >= 1")
    crops_per_volume: int | None = option(
        None,
        "random patches per volume, centred on foreground or background 1:1; a batch holds batch_size / "
        "crops_per_volume volumes, so it must divide batch_size; default 2 when batch_size is even, else 1",
        type=int,
    )
    grad_accum: int = option(1, "gradient accumulation steps")
    lr: float | None = option(
        None, "peak learning rate; default the recipe's", type=float
    )
    min_lr: float = option(6e-6, "learning rate at the end of the cosine decay")
    weight_decay: float = option(0.01, "AdamW weight decay")
    max_grad_norm: float | None = option(
        None, "clip the gradients to this global norm; default the recipe's (1 or none), 0: no clipping", type=float
    )
    warmup_steps: int | None = option(None, "linear warm-up steps; default 5%% of the steps", type=int)
    max_nonfinite_steps: int = option(
        10, "steps with a NaN/inf loss or gradient skipped (no update, as AMP's scaler does) before the run stops"
    )
    # Objective
    seg_weight: float | None = option(
        None, "weight of L_seg (Dice + CE); default 1, 0 to pretrain", type=float
    )
    rc_weight: float | None = option(
        None, "weight of L_rc (reconstruction MSE); default the recipe's (0 or 0.5), 1 to pretrain", type=float
    )
    sdkt_weight: float | None = option(
        None, "weight of L_sdkt (Gram distillation); default the recipe's (0 or 2), 0 to pretrain", type=float
    )
    one_way_sdkt: bool = option(False, "no L_sdkt gradient into the teachers (detached teacher Gram matrices)")
    head_init_scale: float | None = option(
        None,
        "multiply a new model's segmentation head weights by this; default the recipe's (0.1: near-uniform "
        "first predictions; paper: 1, the spec's Kaiming init)",
        type=float,
    )
    head_class_prior: bool | None = option(
        None,
        "start a new model's head bias at the log share of each class in the training labels (read once); "
        "default the recipe's (on; paper: off)",
        action=argparse.BooleanOptionalAction,
    )
    mask_ratio: float = option(
        0.0, "share of input cubes zeroed before reconstruction (masked-volume pretraining, e.g. 0.5)"
    )
    mask_patch: int = option(8, "edge of the masked cubes in voxels")
    modality_dropout: float = option(
        0.0,
        "share of training patches that lose a random non-empty proper subset of their modality groups (each "
        "subset equally likely; see --modality-dropout-mode), so that one model segments from any subset; needs 2+ "
        "channels (e.g. 0.5)",
    )
    modality_dropout_mode: str = option(
        "uniform",
        "how --modality-dropout draws the groups lost: uniform: a share P of the patches lose one of the non-empty "
        "proper subsets, each equally likely; per-group: each group is lost on its own coin of probability P (a patch "
        "left with none keeps one at random)",
        choices=MODALITY_DROPOUT_MODES,
    )
    modality_dropout_warmup: float = option(
        0.0,
        "share of the training (of its steps, or of a CPU budget) run on every modality group before "
        "--modality-dropout starts; 0 (the default): from the first step (0.3 measured better on MR contrasts, "
        "mixed on PET/CT: docs/model-contract.md)",
    )
    modality_consistency: float = option(
        0.0,
        "with --modality-dropout, weight of a self-distillation term: the KL divergence from the model's own "
        "prediction on every group (a teacher without gradient) to its prediction on the patch's subset (e.g. 1.0)",
    )
    license: str | None = option(
        None,
        "the trained model's license, a Hub license id (e.g. apache-2.0, cc-by-4.0); default: other (the terms of "
        "your data are yours to state)",
    )
    # Validation, checkpoints, logging
    output_dir: str = option("runs/demo", "the run's folder, in the end a Hub-ready model folder")
    resume: bool = option(False, "continue from the newest complete checkpoint in OUTPUT_DIR/checkpoints")
    val_every: int = option(50, "validate every N steps and at the end")
    checkpoint_every: int = option(50, "save the training state every N steps and at the end")
    keep_checkpoints: int = option(2, "newest checkpoints kept")
    log_every: int = option(10, "log the training losses every N steps")
    sw_batch_size: int = option(2, "sliding windows per forward in validation")
    sw_overlap: float = option(0.5, "sliding-window overlap in validation (veloxseg predict's default)")
    progress: bool = option(True, "show a progress bar (--no-progress: do not)")
    # Hardware
    mixed_precision: str | None = option(
        None,
        "no, bf16 (CPU or GPU) or fp16 (GPU); default: what accelerate launch --mixed_precision or accelerate config "
        "set, else no",
        choices=("no", "bf16", "fp16"),
    )
    cpu: bool = option(False, "train on the CPU even when a GPU is present")
    threads: int | None = option(
        None,
        "CPU threads per process; default torch's (OMP_NUM_THREADS), but 1 on machines with 2 CPUs or fewer",
        type=int,
    )
    seed: int = option(0, "seed of initialisation, data order and augmentation")
    command: str = ""  # the command line, for the model card


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
        if "action" not in options:  # an action (--x/--no-x) brings its own parsing
            options.setdefault("type", str if f.default is None or isinstance(f.default, tuple) else type(f.default))
        if f.default is not None and f.default != ():
            options["help"] += " (default: %(default)s)"
        parser.add_argument(f"--{name}", dest=f.name, default=f.default, **options)


def config_from_args(args: argparse.Namespace, command: str = "") -> TrainConfig:
    """A :class:`TrainConfig` from the flags of :func:`add_train_arguments` (other attributes of ``args``,
    such as the ``veloxseg`` command's own, are left out)."""
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if "help" in f.metadata}
    return TrainConfig(**flags, command=command)


def resolve(config: TrainConfig) -> TrainConfig:
    """``config`` with its ``None`` defaults filled in; raises ValueError naming a bad setting."""
    _check_choices(config)
    recipe = RECIPES[config.recipe]
    roi = _resolve_roi(config)
    seg, rc, sdkt = _loss_weights(config, recipe)
    _check_counts(config)
    crops = _crops_per_volume(config)
    spacing = None if config.spacing is None else check_spacing(config.spacing, "spacing")
    if spacing is not None and config.native_spacing:
        raise ValueError("give spacing or native_spacing, not both")
    _check_ranges(config, recipe.lr if config.lr is None else config.lr)
    new_model = not (config.pretrained or config.stage == "finetune")
    _check_head(config, new_model, seg)
    _check_regularisation_and_precision(config)
    cpus = os.cpu_count() or 1
    return dataclasses.replace(
        config,
        num_workers=min(4, cpus // 4) if config.num_workers is None else config.num_workers,
        # On 2 CPUs shared with anything else, two spin-waiting OpenMP threads ran 10-50x slower than one.
        threads=config.threads or (1 if cpus <= 2 and "OMP_NUM_THREADS" not in os.environ else None),
        pretrained=config.pretrained or config.stage == "finetune",
        roi=roi,
        crops_per_volume=crops,
        spacing=spacing,
        lr=recipe.lr if config.lr is None else config.lr,
        max_grad_norm=recipe.max_grad_norm if config.max_grad_norm is None else config.max_grad_norm,
        # a new model's head: the recipe's start unless set; pretrained weights keep theirs
        head_init_scale=config.head_init_scale or (recipe.head_init_scale if new_model else None),
        head_class_prior=(
            recipe.head_class_prior and new_model and bool(seg)
            if config.head_class_prior is None else config.head_class_prior
        ),
        seg_weight=seg,
        rc_weight=rc,
        sdkt_weight=sdkt,
        max_steps=DEMO_MAX_STEPS if config.max_steps is None and config.epochs is None else config.max_steps,
    )


def _check_choices(config: TrainConfig) -> None:
    """Raise ValueError for an unknown stage or recipe, or for both a data folder and a Hugging Face dataset."""
    if config.stage not in STAGES:
        raise ValueError(f"unknown stage {config.stage!r}; use one of {', '.join(STAGES)}")
    if config.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {config.recipe!r}; use one of {', '.join(RECIPES)}")
    if config.data is not None and config.hf_dataset is not None:
        raise ValueError("give data or hf_dataset, not both")


def _resolve_roi(config: TrainConfig) -> tuple[int, ...] | None:
    """The ROI as three sizes (one size stands for all three); the demo's when training on the demo data
    with none given; else None (the model's own)."""
    if config.roi is None:
        demo = config.data is None and config.hf_dataset is None
        return DEMO_ROI if demo else None
    roi = (config.roi,) if isinstance(config.roi, int) else tuple(config.roi)
    roi = roi * 3 if len(roi) == 1 else roi
    if len(roi) != 3:
        raise ValueError(f"roi takes 1 or 3 sizes, got {list(config.roi)}")
    return roi


def _loss_weights(config: TrainConfig, recipe: Recipe) -> tuple[float, float, float]:
    """The loss weights (seg, rc, sdkt): those set, else the recipe's for the stage; pretrain has no seg term."""
    seg, rc, sdkt = (
        default if value is None else value
        for value, default in zip(
            (config.seg_weight, config.rc_weight, config.sdkt_weight), recipe.loss_weights[config.stage]
        )
    )
    if config.stage == "pretrain" and seg:
        raise ValueError("pretrain is self-supervised: its seg_weight must be 0")
    return seg, rc, sdkt


def _check_counts(config: TrainConfig) -> None:
    """Raise ValueError for both max_steps and epochs, or for a count (steps, sizes, intervals) below 1."""
    if config.max_steps is not None and config.epochs is not None:
        raise ValueError("give max_steps or epochs, not both")
    for name in (
        "max_steps", "epochs", "val_every", "checkpoint_every", "log_every", "keep_checkpoints", "grad_accum",
        "batch_size", "crops_per_volume", "sw_batch_size", "mask_patch",
    ):  # fmt: skip
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")


def _crops_per_volume(config: TrainConfig) -> int:
    """Patches cropped from each volume: as set, else 2 when batch_size is even and 1 when odd; it must
    divide batch_size."""
    crops = config.crops_per_volume or (2 if config.batch_size % 2 == 0 else 1)
    if config.batch_size % crops:
        raise ValueError(
            f"crops_per_volume ({crops}) must divide batch_size ({config.batch_size} patches): a batch holds "
            f"batch_size / crops_per_volume volumes; leave crops_per_volume unset for 2 when batch_size is even, "
            f"else 1"
        )
    return crops


def _check_head(config: TrainConfig, new_model: bool, seg: float) -> None:
    """Raise ValueError for head settings that do not apply: a scale not > 0, either setting with pretrained
    weights, a class prior without a segmentation loss."""
    if config.head_init_scale is not None and not config.head_init_scale > 0:
        raise ValueError(f"head_init_scale must be > 0, got {config.head_init_scale}")
    for name in ("head_init_scale", "head_class_prior"):
        if getattr(config, name) not in (None, False) and not new_model:
            raise ValueError(f"{name} sets a new model's head: it does not go with pretrained weights")
    if config.head_class_prior and not seg:
        raise ValueError("head_class_prior needs the labels of a segmentation stage (seg_weight > 0)")


def _check_regularisation_and_precision(config: TrainConfig) -> None:
    """Raise ValueError for a modality dropout, its warm-up or consistency weight or a mask ratio out of range,
    an unknown modality dropout mode, or an unusable mixed precision."""
    if not 0.0 <= config.modality_dropout <= 1.0:
        raise ValueError(f"modality_dropout must be in [0, 1], got {config.modality_dropout}")
    if config.modality_dropout_mode not in MODALITY_DROPOUT_MODES:
        raise ValueError(
            f"unknown modality_dropout_mode {config.modality_dropout_mode!r}; "
            f"use one of {', '.join(MODALITY_DROPOUT_MODES)}"
        )
    if not 0.0 <= config.modality_dropout_warmup < 1.0:
        raise ValueError(f"modality_dropout_warmup must be in [0, 1), got {config.modality_dropout_warmup}")
    if config.modality_consistency < 0.0:
        raise ValueError(f"modality_consistency must be >= 0, got {config.modality_consistency}")
    if not 0.0 <= config.mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {config.mask_ratio}")
    if config.mixed_precision not in (None, "no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {config.mixed_precision!r}")
    if config.mixed_precision == "fp16" and (config.cpu or not torch.cuda.is_available()):
        raise ValueError("fp16 needs a CUDA GPU; use mixed_precision='bf16' on CPU")


def _check_ranges(config: TrainConfig, lr: float) -> None:
    """Raise ValueError naming the first number out of its range (NaN is out of every range)."""
    checks = [
        ("lr", lr, lr > 0, "> 0"),
        ("min_lr", config.min_lr, 0 <= config.min_lr <= lr, f"in [0, lr = {lr:g}] (the schedule decays to it)"),
        ("weight_decay", config.weight_decay, config.weight_decay >= 0, ">= 0"),
        ("max_grad_norm", config.max_grad_norm, config.max_grad_norm is None or config.max_grad_norm >= 0,
         "> 0 (or 0: no clipping)"),
        ("warmup_steps", config.warmup_steps, config.warmup_steps is None or config.warmup_steps >= 0, ">= 0"),
        ("val_fraction", config.val_fraction, 0 < config.val_fraction < 1, "in (0, 1)"),
        ("fold", config.fold, config.fold >= 0, ">= 0"),
        ("sw_overlap", config.sw_overlap, 0 <= config.sw_overlap < 1, "in [0, 1)"),
        ("num_workers", config.num_workers, config.num_workers is None or config.num_workers >= 0, ">= 0"),
        ("threads", config.threads, config.threads is None or config.threads >= 1, ">= 1"),
        ("max_nonfinite_steps", config.max_nonfinite_steps, config.max_nonfinite_steps >= 0, ">= 0"),
        *((name, getattr(config, name), getattr(config, name) is None or getattr(config, name) >= 0, ">= 0")
          for name in ("seg_weight", "rc_weight", "sdkt_weight")),
    ]  # fmt: skip
    for name, value, ok, wanted in checks:
        if not ok:
            raise ValueError(f"{name} must be {wanted}, got {value}")
