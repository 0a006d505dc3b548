"""Accelerator, model, optimiser and learning-rate schedule of a training run."""

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, is_tensorboard_available
from timm.optim import param_groups_weight_decay
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from ..config import VeloxSegConfig
from ..data.datasets import Case, DatasetSpec, class_frequencies
from ..model import VeloxSeg
from ..registry import create_model
from .config import TrainConfig
from .recipe import RECIPES


def build_accelerator(config: TrainConfig) -> Accelerator:
    """Accelerate for the run: devices and processes, mixed precision, gradient accumulation, trackers
    (tensorboard in OUTPUT_DIR/logs, when installed) and seeded data order. An unset ``mixed_precision``
    is Accelerate's: ``accelerate launch --mixed_precision`` or ``accelerate config``'s, else no."""
    return Accelerator(
        cpu=config.cpu,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        log_with="tensorboard" if is_tensorboard_available() else None,
        project_dir=str(Path(config.output_dir) / "logs"),
        # Seeded samplers: the order of epoch e depends on (seed, e) only, so a resumed run sees the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step, by train_step
    )


def build_model(config: TrainConfig, spec: DatasetSpec, train_cases: Sequence[Case] | None = None) -> VeloxSeg:
    """The model for the dataset: one modality group per channel, one class per label, teachers only
    when a loss uses them, and the recipe's deep supervision, dropout and head init (the class prior
    counted in ``train_cases``' labels, default every training case). A ``roi`` other than the model's
    scales its attention windows. Pretraining (no L_seg) freezes the student decoder, which learns from
    L_seg only. Refuses ``modality_dropout`` for a one-channel dataset (nothing could be dropped)."""
    overrides: dict[str, Any] = {
        "group_channels": [1] * len(spec.channel_names),
        "n_classes": len(spec.labels),
        **RECIPES[config.recipe].model_overrides(teachers=bool(config.rc_weight or config.sdkt_weight)),
        **roi_overrides(config),
    }
    model = create_model(config.model, pretrained=config.pretrained, **overrides)
    if config.head_init_scale is not None or config.head_class_prior:  # resolve(): a new model only
        shares = None
        if config.head_class_prior:
            cases = spec.training if train_cases is None else train_cases
            shares = torch.from_numpy(class_frequencies(cases, len(spec.labels)))
        model.decoder.init_head(config.head_init_scale or 1.0, shares)
    if not config.seg_weight:
        model.decoder.requires_grad_(False)
    if config.modality_dropout and model.config.num_groups < 2:
        raise ValueError(
            f"modality_dropout needs 2 or more modality groups to drop from; this dataset has one channel "
            f"({spec.channel_names[0]!r}): leave --modality-dropout out"
        )
    return model


def roi_overrides(config: TrainConfig) -> dict[str, Any]:
    """The config fields that fit ``config.model`` to ``config.roi`` (its attention windows scaled with it;
    none when the roi is the model's). Raises ValueError stating the rule and the sizes that work when it
    does not fit; :func:`veloxseg.training.train` calls it before any data is read or written."""
    base = create_model(config.model, pretrained=False).config  # the ROI it was built for; no weights loaded
    if config.roi is None or tuple(config.roi) == base.roi_size:
        return {}
    try:
        overrides = {"roi_size": tuple(config.roi)}
        overrides["big_windows"] = scaled_windows(base.big_windows, base.roi_size, overrides["roi_size"])
        base.replace(**overrides)  # the window scheme's own rules (e.g. more than one voxel at the last level)
    except ValueError as err:
        sizes = ", ".join(map(str, working_rois(base)))
        raise ValueError(f"{err}; roi sizes that work for {config.model} include the cubes {sizes}") from None
    return overrides


def working_rois(base: VeloxSegConfig, count: int = 4) -> list[int]:
    """The first ``count`` cube edges to which ``base``'s attention windows scale and that build."""
    found = []
    for edge in range(8, 8 * max(base.roi_size) + 1, 8):
        try:
            base.replace(roi_size=(edge,) * 3, big_windows=scaled_windows(base.big_windows, base.roi_size, (edge,) * 3))
        except ValueError:
            continue
        found.append(edge)
        if len(found) == count:
            break
    return found


def scaled_windows(windows: Any, roi: tuple[int, ...], new_roi: tuple[int, ...]) -> list[list[int]]:
    """Attention windows covering the same fraction of ``new_roi`` as ``windows`` do of ``roi``."""
    scaled = [[w * n / r for w, r, n in zip(level, roi, new_roi)] for level in windows]
    if any(not w.is_integer() or w < 1 for level in scaled for w in level):
        multiple = [r // math.gcd(r, *(level[axis] for level in windows)) for axis, r in enumerate(roi)]
        raise ValueError(
            f"roi {list(new_roi)} does not scale the model's attention windows {[list(w) for w in windows]} "
            f"(built for roi {list(roi)}) to whole windows: each axis must be a multiple of {multiple}"
        )
    return [[int(w) for w in level] for level in scaled]


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The authors' AdamW over the trainable parameters, as PyTorch's fused kernel on CPUs and CUDA GPUs.
    As in timm's optimizer factory, norms, biases (every 1-D parameter) and the model's
    ``no_weight_decay()`` names (the attention's position bias tables) get no weight decay.

    Fused: one kernel per tensor instead of about ten ops; VeloxSeg has many small tensors (veloxseg_small_hr
    167, UNet 26), so its update took 20 instead of 5 ms per step on one CPU thread (an AVX2 AMD EPYC)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, config.weight_decay, no_weight_decay_list=skip)
    fused = all(p.device.type in ("cpu", "cuda") for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int) -> Any:
    """Linear warm-up from lr / warmup to lr, then cosine decay to ``min_lr`` at ``total_steps``."""
    warmup = min(config.warmup_steps if config.warmup_steps is not None else total_steps // 20, total_steps - 1)
    cosine = CosineAnnealingLR(optimizer, T_max=total_steps - warmup, eta_min=config.min_lr)
    if warmup <= 0:
        return cosine
    linear = LinearLR(optimizer, start_factor=1.0 / warmup, total_iters=warmup)
    return SequentialLR(optimizer, [linear, cosine], milestones=[warmup])
