"""One training step: forward, loss, backward, optimiser and schedule step.

Every training loop of the project calls :func:`train_step` once per batch: ``train()`` until its
step count, and ``benchmarks/accuracy.py`` for each network it compares. A loop with another stopping
rule (a time budget, say) is a loop around it::

    for batch in batches(train_loader, train_set, accelerator):
        terms = train_step(model, batch, loss_fn, optimizer, scheduler, accelerator)
        if accelerator.sync_gradients and out_of_budget():
            break
"""

import math
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from ..losses import VeloxSegLoss
from ..modalities import random_modality_mask
from .data import plain


def train_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    loss_fn: VeloxSegLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    accelerator: Accelerator,
    mask_ratio: float = 0.0,
    mask_patch: int = 8,
    max_grad_norm: float | None = None,
    modality_dropout: float = 0.0,
    modality_dropout_mode: str = "uniform",
) -> dict[str, torch.Tensor]:
    """Train ``model`` (prepared by ``accelerator``) on one batch and return the loss terms ("loss",
    and "seg", "rc", "sdkt" as the loss uses them; detached scalars), plus "grad_norm" (the global
    gradient norm before clipping) on the batches where the optimiser steps.

    batch: ``image`` (B, C, *roi) and ``label`` (B, 1, *roi); the label is not used when the loss has
    no L_seg (pretraining). With ``mask_ratio`` the model sees the image with that share of its
    ``mask_patch``^3 cubes zeroed and reconstructs the whole. With ``max_grad_norm`` the gradients are
    clipped to that global norm before the optimiser step. With ``modality_dropout`` samples run without
    some of their modality groups (never all), drawn with that probability the way ``modality_dropout_mode``
    says (:func:`veloxseg.modalities.random_modality_mask`); the losses still see the whole image, so the
    teachers of a dropped group (paper recipe) reconstruct it from the groups that remain. Under
    gradient accumulation the optimiser and the schedule step only when ``accelerator.sync_gradients``
    (the last batch of an accumulation). A step whose gradient norm is NaN or infinite (a NaN loss
    included) leaves the weights as they were, as AMP's gradient scaler does; the caller decides how
    many such steps it tolerates.
    """
    image, label = plain(batch["image"]), plain(batch["label"])
    grad_norm = None
    with accelerator.accumulate(model):
        inputs = mask_random_patches(image, mask_ratio, mask_patch) if mask_ratio else image
        kwargs = {}  # only models trained with modality dropout are asked to take a mask (benchmark baselines don't)
        if modality_dropout:
            groups = accelerator.unwrap_model(model).config.num_groups
            mask = random_modality_mask(image.shape[0], groups, modality_dropout, mode=modality_dropout_mode)
            kwargs["present"] = mask.to(image.device)
        terms = loss_fn(model(inputs, **kwargs), image, label if loss_fn.seg_weight else None)
        accelerator.backward(terms["loss"])
        if accelerator.sync_gradients:  # an infinite max_norm measures without clipping
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
            if not torch.isfinite(grad_norm):
                optimizer.zero_grad()  # nothing to step with: AdamW would turn the NaN into every weight
        optimizer.step()
        optimizer.zero_grad()
    if accelerator.sync_gradients:
        scheduler.step()
    terms = {name: value.detach() for name, value in terms.items()}
    return terms if grad_norm is None else {**terms, "grad_norm": grad_norm.detach()}


def mask_random_patches(x: torch.Tensor, ratio: float, patch: int) -> torch.Tensor:
    """(B, C, D, H, W) -> the same with a random ``ratio`` of its ``patch``^3 cubes set to 0 (all
    channels; 0 is the mean after normalisation), for masked-volume pretraining."""
    if any(s % patch for s in x.shape[2:]):
        raise ValueError(f"mask_patch {patch} must divide the ROI {list(x.shape[2:])}")
    b, _, *size = x.shape
    keep = torch.rand(b, 1, *(s // patch for s in size), device=x.device) >= ratio
    return x * F.interpolate(keep.to(x.dtype), scale_factor=patch, mode="nearest")
