"""``train()``: one training stage from start to end, or from its last checkpoint."""

import dataclasses
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, is_tensorboard_available, set_seed
from tqdm import tqdm

from ..data.datasets import split_cases
from ..losses import VeloxSegLoss
from .build import build_model, build_optimizer, build_scheduler, roi_overrides
from .checkpoints import CHECKPOINT_PREFIX, latest_checkpoint, load_checkpoint, new_state, save_checkpoint, save_model
from .config import TrainConfig, resolve
from .data import batches, build_datasets, build_loaders, prepare_dataset, steps_per_epoch, training_metadata
from .metrics import MetricsLog, plot_curves, plot_validation_slice
from .step import train_step
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
    roi_overrides(config)  # a roi the model cannot take is refused before any data is read or written

    accelerator = Accelerator(
        cpu=config.cpu,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        log_with="tensorboard" if is_tensorboard_available() else None,
        project_dir=str(output_dir / "logs"),
        # Seeded samplers: the order of epoch e depends on (seed, e) only, so a resumed run sees the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step, by train_step
    )
    set_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)

    # Data (validated before anything is built), its metadata (the preprocessing saved with the model), model.
    # Only the demo or converted data may be written before all this succeeds; a new output folder goes again if not.
    with removed_on_failure(output_dir, accelerator.is_main_process):
        spec = prepare_dataset(config, accelerator)
        class_names = [name for name, value in sorted(spec.labels.items(), key=lambda kv: kv[1]) if value > 0]
        train_cases, val_cases = split_cases(spec, config.val_fraction, config.seed, config.fold)
        metadata = training_metadata(config, spec, len(train_cases), len(val_cases))
        model = build_model(config, spec)
        train_set, val_set = build_datasets(train_cases, val_cases, metadata, config, model.config.roi_size)
        train_loader, val_loader = build_loaders(train_set, val_set, config)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")

    loss_fn = VeloxSegLoss(config.seg_weight, config.rc_weight, config.sdkt_weight, config.one_way_sdkt)
    optimizer = build_optimizer(model, config)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    total_steps = config.max_steps or config.epochs * steps_per_epoch(train_loader, config.grad_accum)
    scheduler = accelerator.prepare(build_scheduler(optimizer, config, total_steps))

    state = new_state(total_steps)
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, total_steps)
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
    finished = state["step"] >= total_steps  # a finished run resumed: nothing left to train
    for batch in () if finished else batches(train_loader, train_set, accelerator, state["step"], config.grad_accum):
        terms = train_step(
            model, batch, loss_fn, optimizer, scheduler, accelerator, config.mask_ratio, config.mask_patch
        )
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.item() / config.grad_accum
        patches += batch["image"].shape[0] * accelerator.num_processes
        if not accelerator.sync_gradients:
            continue
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


@contextmanager
def removed_on_failure(folder: Path, main_process: bool) -> Iterator[None]:
    """Delete ``folder`` when the block fails and ``folder`` did not exist before it (a refused run
    leaves no half-made output folder behind); the main process deletes."""
    created = not folder.exists()
    try:
        yield
    except BaseException:
        if created and main_process:
            shutil.rmtree(folder, ignore_errors=True)
        raise
