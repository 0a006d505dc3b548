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
    modality_consistency: float = 0.0,
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
    teachers of a dropped group (paper recipe) reconstruct it from the groups that remain; with
    ``modality_consistency`` the loss adds that times :func:`modality_consistency_term` (as "consistency").
    Under gradient accumulation the optimiser and the schedule step only when ``accelerator.sync_gradients``
    (the last batch of an accumulation). A step whose gradient norm is NaN or infinite (a NaN loss included)
    leaves the weights as they were, as AMP's gradient scaler does; the caller decides how many it tolerates.
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
        output = model(inputs, **kwargs)
        terms = loss_fn(output, image, label if loss_fn.seg_weight else None)
        if modality_dropout and modality_consistency:
            terms["consistency"] = modality_consistency_term(model, inputs, output.logits[0], kwargs["present"])
            terms["loss"] = terms["loss"] + modality_consistency * terms["consistency"]
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


def modality_consistency_term(
    model: nn.Module, inputs: torch.Tensor, logits: torch.Tensor, present: torch.Tensor
) -> torch.Tensor:
    """Self-distillation of the dropped views: KL(p_all || p_subset) per voxel, mean over the voxels of the
    samples that lost a modality group; p_all is the model's own softmax on every group (run again on those
    samples, without gradient: a teacher), p_subset that of ``logits``. 0 when no sample lost one.

    inputs: (B, C, D, H, W) what the model was given; logits: (B, K, D, H, W) its full-resolution head on
    ``inputs`` with the groups ``present`` ((B, G) bool) only.
    """
    dropped = ~present.all(1)
    student = F.log_softmax(logits[dropped].float(), 1)
    if not len(student):
        return student.sum()
    with torch.no_grad():
        teacher = F.log_softmax(model(inputs[dropped]).logits[0].float(), 1)
    return F.kl_div(student, teacher, reduction="none", log_target=True).sum(1).mean()


def modality_dropout_at(probability: float, warmup: float, progress: float) -> float:
    """The modality dropout of a step ``progress`` (the share of the training done, 0 to 1) into a run whose
    first ``warmup`` share trains on every group: 0 before, ``probability`` from there on."""
    return probability if progress >= warmup else 0.0


def mask_random_patches(x: torch.Tensor, ratio: float, patch: int) -> torch.Tensor:
    """(B, C, D, H, W) -> the same with a random ``ratio`` of its ``patch``^3 cubes set to 0 (all
    channels; 0 is the mean after normalisation), for masked-volume pretraining."""
    if any(s % patch for s in x.shape[2:]):
        raise ValueError(f"mask_patch {patch} must divide the ROI {list(x.shape[2:])}")
    b, _, *size = x.shape
    keep = torch.rand(b, 1, *(s // patch for s in size), device=x.device) >= ratio
    return x * F.interpolate(keep.to(x.dtype), scale_factor=patch, mode="nearest")
