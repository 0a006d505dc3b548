"""``train()``: one training stage from start to end, or from its last checkpoint."""

import dataclasses
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from ..data.datasets import Case, DatasetSpec, split_cases
from ..losses import VeloxSegLoss
from ..metadata import ModelMetadata
from ..model import VeloxSeg
from ..provenance import trained
from .allocator import keep_freed_memory
from .build import build_accelerator, build_model, build_optimizer, build_scheduler, roi_overrides
from .checkpoints import latest_checkpoint, load_checkpoint, new_state, save_checkpoint, save_model
from .config import TrainConfig, resolve
from .data import (
    PerSampleSeeds,
    batches,
    build_train_loader,
    build_train_set,
    class_names,
    prepare_dataset,
    steps_per_epoch,
    training_metadata,
)
from .metrics import MetricsLog, TrainingMeter, plot_curves, plot_validation_slice
from .run_folder import TRAIN_CONFIG, check_resume, check_run_paths, run_lock
from .step import modality_dropout_at, train_step
from .validate import validate


@dataclass
class TrainResult:
    """What :func:`train` returns: the step reached, the last and the best validation metrics."""

    step: int
    metrics: dict[str, float]
    best_metrics: dict[str, float]
    output_dir: Path


def train(config: TrainConfig) -> TrainResult:
    """Run one training stage; see :mod:`veloxseg.training` for what lands in ``config.output_dir``."""
    # Flags, paths, the run to resume and the roi are checked before any data is read or written.
    config = resolve(config)
    output_dir = Path(config.output_dir)
    check_run_paths(config)
    roi_overrides(config)

    accelerator = build_accelerator(config)
    config = dataclasses.replace(config, mixed_precision=accelerator.mixed_precision)  # Accelerate's when unset
    if config.resume:
        check_resume(config, output_dir)
    hardware = {"world_size": accelerator.num_processes, "device": str(accelerator.device)}
    accelerator.print(
        f"{config.stage}: world size {hardware['world_size']}, device {hardware['device']}, "
        f"mixed precision {config.mixed_precision}"
    )
    with removed_on_failure(output_dir, accelerator.is_main_process), run_lock(output_dir, accelerator.is_main_process):
        return _train(config, output_dir, accelerator, hardware)


@dataclass
class _Run:
    """One training run's parts once built, shared by the steps of :func:`_train`."""

    config: TrainConfig
    output_dir: Path
    accelerator: Accelerator
    spec: DatasetSpec
    val_cases: list[Case]
    metadata: ModelMetadata
    train_set: PerSampleSeeds
    train_loader: torch.utils.data.DataLoader  # as prepared by Accelerate
    model: torch.nn.Module  # as prepared by Accelerate (wrapped when distributed)
    unwrapped: VeloxSeg  # the model itself: validated and saved
    loss_fn: VeloxSegLoss
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    state: dict[str, Any]  # step, metrics and best metrics: what a checkpoint keeps
    log: MetricsLog


def _train(config: TrainConfig, output_dir: Path, accelerator: Accelerator, hardware: dict[str, Any]) -> TrainResult:
    """:func:`train` once the run is checked and its folder locked."""
    checkpoint = _start(config, output_dir, accelerator)
    run = _build_run(config, output_dir, accelerator, hardware, checkpoint)
    _training_loop(run)
    save_model(accelerator, run.unwrapped, output_dir, run.metadata, run.state["metrics"])
    accelerator.end_training()
    return TrainResult(run.state["step"], run.state["metrics"], run.state["best_metrics"], output_dir)


def _start(config: TrainConfig, output_dir: Path, accelerator: Accelerator) -> Path | None:
    """Seed, threads and allocator set; the checkpoint to resume from (None: start from step 0)."""
    set_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    checkpoint = latest_checkpoint(output_dir / "checkpoints") if config.resume else None
    if config.resume and checkpoint is None:
        accelerator.print(f"resume: {output_dir} has no complete checkpoint yet; starting from step 0")
    keep_freed_memory()  # no page faults on each step's fresh activations (glibc only)
    return checkpoint


def _build_run(
    config: TrainConfig, output_dir: Path, accelerator: Accelerator, hardware: dict[str, Any], checkpoint: Path | None
) -> _Run:
    """Data (validated before anything is built), its metadata (the preprocessing saved with the model), the
    model, the run's config file, then the loss, optimiser, schedule, state (from ``checkpoint`` if any) and log."""
    spec = prepare_dataset(config, accelerator)
    train_cases, val_cases = split_cases(spec, config.val_fraction, config.seed, config.fold)
    metadata = training_metadata(config, spec, len(train_cases), len(val_cases))
    model = build_model(config, spec, train_cases)
    base = model.pretrained_cfg if config.pretrained else None  # the weights it starts from
    metadata = trained(metadata, base, config.license, len(val_cases))
    train_set = build_train_set(train_cases, metadata, config, model.config.roi_size)
    train_loader = build_train_loader(train_set, config)
    if accelerator.is_main_process:
        settings = {**dataclasses.asdict(config), **hardware, "base_model": metadata.base_model}
        (output_dir / TRAIN_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")

    loss_fn = VeloxSegLoss(config.seg_weight, config.rc_weight, config.sdkt_weight, config.one_way_sdkt)
    optimizer = build_optimizer(model, config)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    total_steps = config.max_steps or config.epochs * steps_per_epoch(train_loader, config.grad_accum)
    scheduler = accelerator.prepare(build_scheduler(optimizer, config, total_steps))

    state = new_state(total_steps)
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, total_steps)
    accelerator.init_trackers("veloxseg", config={k: str(v) for k, v in dataclasses.asdict(config).items()})
    log = MetricsLog(output_dir / "metrics.jsonl", accelerator, state["step"] if checkpoint else None)
    return _Run(
        config, output_dir, accelerator, spec, val_cases, metadata, train_set, train_loader, model,
        accelerator.unwrap_model(model), loss_fn, optimizer, scheduler, total_steps, state, log,
    )  # fmt: skip


def _training_loop(run: _Run) -> None:
    """Train from ``run.state``'s step to the last, validating and checkpointing on their schedules."""
    config, accelerator = run.config, run.accelerator
    progress = tqdm(
        total=run.total_steps,
        initial=run.state["step"],
        desc=config.stage,
        disable=not (config.progress and accelerator.is_local_main_process),
    )
    run.model.train()
    meter = TrainingMeter()
    finished = run.state["step"] >= run.total_steps  # a finished run resumed: nothing left to train
    remaining = () if finished else batches(
        run.train_loader, run.train_set, accelerator, run.state["step"], config.grad_accum
    )
    for batch in remaining:
        dropout = modality_dropout_at(
            config.modality_dropout, config.modality_dropout_warmup, run.state["step"] / run.total_steps
        )
        terms = train_step(
            run.model, batch, run.loss_fn, run.optimizer, run.scheduler, accelerator, config.mask_ratio,
            config.mask_patch, config.max_grad_norm, dropout, config.modality_dropout_mode, config.modality_consistency,
        )  # fmt: skip
        grad_norm = terms.pop("grad_norm", None)
        meter.add(terms, batch["image"].shape[0] * accelerator.num_processes, config.grad_accum)
        if not accelerator.sync_gradients:
            continue
        step = _count_step(run, terms, grad_norm, meter, progress)
        with meter.paused():  # validation and checkpoints are not training time
            if config.stage != "pretrain" and (step % config.val_every == 0 or step == run.total_steps):
                _validate(run, step)
            if step % config.checkpoint_every == 0 or step == run.total_steps:
                save_checkpoint(accelerator, run.output_dir / "checkpoints", run.state, config.keep_checkpoints)
                if accelerator.is_main_process:
                    plot_curves(run.log.records, run.output_dir / "curves.png")
        if step >= run.total_steps:
            break
    progress.close()


def _count_step(
    run: _Run, terms: dict[str, torch.Tensor], grad_norm: torch.Tensor | None, meter: TrainingMeter, progress: tqdm
) -> int:
    """One optimiser step done: count it (and a non-finite gradient norm), log on schedule; the new step."""
    run.state["step"] += 1
    step = run.state["step"]
    if not torch.isfinite(grad_norm):
        count_nonfinite_step(run.state, run.config.max_nonfinite_steps, terms["loss"].item(), run.accelerator)
    meter.count_step()
    progress.update(1)
    if step % run.config.log_every == 0 or step == run.total_steps:
        values = {**meter.read(), "train/lr": run.scheduler.get_last_lr()[0]}
        run.log.log(values, step)
        progress.set_postfix(loss=f"{values['train/loss']:.4f}", patches_s=f"{values['train/patches_per_s']:.1f}")
    return step


def _validate(run: _Run, step: int) -> None:
    """Score the validation cases at ``step``: log the metrics, save the model when it is the best so far,
    plot an example slice."""
    config, accelerator = run.config, run.accelerator
    metrics, example = validate(
        run.unwrapped, run.val_cases, accelerator, run.metadata, class_names(run.spec), config.sw_batch_size,
        config.sw_overlap,
    )  # fmt: skip
    run.log.log(metrics, step)
    run.state["metrics"] = metrics
    if metrics["val/dice"] > run.state["best_dice"]:
        run.state.update(best_dice=metrics["val/dice"], best_step=step, best_metrics=metrics)
        save_model(accelerator, run.unwrapped, run.output_dir / "best", run.metadata, metrics)
    if accelerator.is_main_process:
        title = f"step {step}, Dice {metrics['val/dice']:.3f}"
        plot_validation_slice(example, run.spec.channel_names, run.output_dir / "validation.png", title)
    accelerator.print(f"step {step}: " + ", ".join(f"{k[4:]} {v:.4f}" for k, v in metrics.items()))


def count_nonfinite_step(state: dict, limit: int, loss: float, accelerator: Accelerator) -> None:
    """Count the step ``state["step"]`` whose loss or gradients were NaN/inf (its update was skipped);
    raise FloatingPointError naming it once more than ``limit`` such steps were skipped."""
    state["nonfinite_steps"] = state.get("nonfinite_steps", 0) + 1
    step, count = state["step"], state["nonfinite_steps"]
    if count > limit:
        raise FloatingPointError(
            f"step {step}: NaN or infinite loss or gradients in {count} steps, more than max_nonfinite_steps "
            f"({limit}): the run stopped (the checkpoints and best/ hold finite weights only). Lower the learning "
            f"rate, clip the gradients (max_grad_norm) or check the data for extreme values"
        )
    accelerator.print(f"step {step}: loss {loss:.4g}, NaN or infinite gradients: update skipped ({count} of {limit})")


@contextmanager
def removed_on_failure(folder: Path, main_process: bool) -> Iterator[None]:
    """Delete ``folder`` when the block fails before the run started (no train_config.json yet) and
    ``folder`` did not exist before it: a refused run leaves no half-made output folder behind. The
    main process deletes."""
    created = not folder.exists()
    try:
        yield
    except BaseException:
        if created and main_process and not (folder / TRAIN_CONFIG).exists():
            shutil.rmtree(folder, ignore_errors=True)
        raise
