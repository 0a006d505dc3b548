"""Test-set accuracy of VeloxSeg and MONAI's networks trained the same way, and VeloxSeg's SDKT ablation.

    python benchmarks/accuracy.py --minutes 2 --seed 0 1 2               # every setup, 2 CPU minutes each
    python benchmarks/accuracy.py --data DIR --models veloxseg_small_hr UNet --minutes 5 --seed 0
    python benchmarks/accuracy.py --search-lr --minutes 2 --seed 0 1 --models UNet  # record UNet's rate

Every setup trains with the trainer's own parts (:mod:`veloxseg.training`): from the same seed on the
same cases with the same preprocessing, crops, augmentation and batch order (``build_train_set``,
``build_train_loader``, ``batches``), AdamW with a linear warm-up and a cosine decay, and the trainer's
``train_step``. A setup is a network, a recipe (:mod:`veloxseg.training.recipe`: loss, deep supervision,
dropout) and a peak learning rate. Each whole test volume (imagesTs) is then segmented as ``veloxseg
predict`` segments it (the trainer's ``validate``, through ``veloxseg.predict.predict_probabilities``)
and scored against labelsTs on its own grid: Dice per class and its mean, HD95 in mm.

Budget: ``--minutes M`` gives every setup the same CPU time of the training thread (``time.thread_time``:
forward, backward, optimiser and, with no loader workers, the data augmentation; a busy neighbour does
not shorten it), and the schedule warms up and decays over that time; ``--steps N`` the same number of
steps instead. Run with one torch thread (the default on 2-CPU machines) for budgets that compare.

Learning rates: each setup's rate is recorded in ``results/learning_rates.json``, chosen by
``--search-lr`` from a small grid (``--lr-grid``) on a validation split of the training cases (never the
test set): a plain run reads it and does not search again. ``--seed 0 1`` averages over two splits and
runs. A search over rates or seeds not yet tried keeps the scores recorded at the same budget on the
same kind of CPU, so it extends the grid. The paper's recipe keeps the paper's 2.5e-4.

Results are written after every run, as ``OUT.json``, ``OUT.md`` and ``OUT.png``.
"""

import argparse
import dataclasses
import itertools
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from baselines import build as build_baseline
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from veloxseg.data.datasets import Case, DatasetSpec, read_dataset, split_cases, validate_dataset
from veloxseg.data.demo import GENERATOR_VERSION, make_demo_dataset
from veloxseg.io import atomic_file, atomic_folder
from veloxseg.losses import VeloxSegLoss
from veloxseg.metadata import ModelMetadata
from veloxseg.model import VeloxSegOutput
from veloxseg.training import (
    RECIPES,
    TrainConfig,
    batches,
    build_train_loader,
    build_train_set,
    build_model,
    build_optimizer,
    build_scheduler,
    class_names,
    modality_dropout_at,
    resolve,
    train_step,
    training_metadata,
    validate,
)
from veloxseg.training.allocator import keep_freed_memory
from veloxseg.training.config import DEMO_ROI
from veloxseg.training.metrics import save_figure

HERE = Path(__file__).resolve().parent
LEARNING_RATES = HERE / "results" / "learning_rates.json"
LR_GRID = (2e-3, 4e-3, 8e-3)
SDKT_LOSS = (1.0, 0.5, 2.0)  # the paper's L_seg + 0.5 L_rc + 2 L_sdkt


@dataclass(frozen=True)
class Setup:
    """One row of the table: a network, the trainer recipe it trains with (MONAI's networks: the default
    recipe's L_seg), and ``loss`` (seg, rc, sdkt) weights replacing the recipe's when given."""

    network: str
    recipe: str
    description: str
    loss: tuple[float, float, float] | None = None

    def loss_weights(self) -> tuple[float, float, float]:
        return self.loss or RECIPES[self.recipe].loss_weights["segment"]


SETUPS: dict[str, Setup] = {
    "veloxseg_small_hr": Setup("veloxseg_small_hr", "default", "default recipe: L_seg, one head, no teachers"),
    "veloxseg_small": Setup("veloxseg_small", "default", "default recipe: L_seg, one head, no teachers"),
    "veloxseg_tiny": Setup("veloxseg_tiny", "default", "default recipe: L_seg, one head, no teachers"),
    "veloxseg_small_hr-sdkt": Setup(
        "veloxseg_small_hr", "default", "default recipe + teachers: L_seg + 0.5 L_rc + 2 L_sdkt", SDKT_LOSS
    ),
    "veloxseg_small-paper": Setup("veloxseg_small", "paper", "paper recipe: 4 heads, L_seg + 0.5 L_rc + 2 L_sdkt"),
    "veloxseg_small-no-teachers": Setup(
        "veloxseg_small", "paper", "paper recipe without teachers: 4 heads, L_seg only", (1.0, 0.0, 0.0)
    ),
    "UNet": Setup("UNet", "default", "MONAI, channels 16-256; L_seg"),
    "SegResNet": Setup("SegResNet", "default", "MONAI, init_filters 16; L_seg"),
    "SwinUNETR": Setup("SwinUNETR", "default", "MONAI, feature size 24; L_seg"),
    "DynUNet": Setup("DynUNet", "default", "MONAI, nnU-Net-like, no deep supervision; L_seg"),
}
ABLATION = ["veloxseg_small_hr", "veloxseg_small_hr-sdkt"]


class MonaiNet(nn.Module):
    """A MONAI network in VeloxSeg's interface, for ``VeloxSegLoss`` and ``validate``: ``config.roi_size``,
    ``config.n_classes``, ``config.group_channels`` (one modality group per channel, as the trainer's metadata has
    them), and a training-mode forward returning a :class:`VeloxSegOutput`."""

    def __init__(self, net: nn.Module, roi: tuple[int, int, int], n_channels: int, n_classes: int) -> None:
        super().__init__()
        self.net = net
        self.config = SimpleNamespace(roi_size=roi, n_classes=n_classes, group_channels=(1,) * n_channels)

    def forward(self, x: torch.Tensor) -> VeloxSegOutput | torch.Tensor:
        logits = self.net(x)
        return VeloxSegOutput([logits]) if self.training else logits


def build_network(name: str, spec: DatasetSpec, config: TrainConfig, train_cases: Sequence[Case]) -> nn.Module:
    """The network of setup ``name`` for the dataset's channels and classes, at patch size ``config.roi``
    (a VeloxSeg head's class prior counted in ``train_cases``)."""
    setup = SETUPS[name]
    if setup.network.startswith("veloxseg"):
        return build_model(config, spec, train_cases)  # the recipe's teachers, heads, dropout and head init
    net = build_baseline(setup.network, len(spec.channel_names), len(spec.labels), config.roi)
    return MonaiNet(net, config.roi, len(spec.channel_names), len(spec.labels))


def setup_config(name: str, base: TrainConfig, lr: float | None = None) -> TrainConfig:
    """``base`` with setup ``name``'s network, recipe, loss and learning rate (``lr``, else the recorded one)."""
    setup = SETUPS[name]
    seg, rc, sdkt = setup.loss_weights()
    network = setup.network if setup.network.startswith("veloxseg") else base.model
    changes = dict(model=network, recipe=setup.recipe, seg_weight=seg, rc_weight=rc, sdkt_weight=sdkt)
    return resolve(dataclasses.replace(base, **changes, lr=lr or recorded_lr(name)))


def recorded_lr(name: str) -> float:
    """Setup ``name``'s learning rate from ``results/learning_rates.json``; a default-recipe ablation
    (``veloxseg_small_hr-sdkt``) takes its network's; else the recipe's."""
    recorded = read_record(LEARNING_RATES)["setups"]
    setup = SETUPS[name]
    own = recorded.get(name) or (recorded.get(setup.network) if setup.recipe == "default" else None)
    return own["lr"] if own else RECIPES[setup.recipe].lr


def parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters used at inference, parameters trained): VeloxSeg's teachers and aux heads train only."""
    total = sum(p.numel() for p in model.parameters())
    return (model.inference_parameters() if hasattr(model, "inference_parameters") else total), total


def demo_dataset() -> Path:
    """The default demo dataset, generated once into the temporary folder."""
    root = Path(tempfile.gettempdir()) / f"veloxseg-accuracy-demo-{GENERATOR_VERSION}"
    if not (root / "dataset.json").is_file():
        with atomic_folder(root) as tmp:
            make_demo_dataset(tmp)
    return root


class CpuBudget:
    """A training budget in CPU seconds of the calling thread, and the share of it spent so far."""

    def __init__(self, minutes: float) -> None:
        self.seconds, self.start = 60.0 * minutes, time.thread_time()

    def spent(self) -> float:
        return min(1.0, (time.thread_time() - self.start) / self.seconds)


def budget_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, spent: Callable[[], float]) -> LambdaLR:
    """The trainer's schedule (linear warm-up over 5 %, cosine decay to ``min_lr``) over a budget's
    share ``spent()`` in [0, 1] instead of over steps: a faster network gets more steps, not a longer
    warm-up. Stepped once per optimizer step like ``build_scheduler``'s."""
    floor = config.min_lr / config.lr

    def factor(_: int) -> float:
        t = spent()
        if t < 0.05:
            return max(t / 0.05, 1e-3)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * (t - 0.05) / 0.95))

    return LambdaLR(optimizer, factor)


@dataclass
class Trained:
    """A setup after training (:func:`train_setup`): the network, what scoring needs, the training's facts."""

    model: nn.Module
    accelerator: Accelerator
    eval_cases: Sequence[Case]
    metadata: ModelMetadata  # the preprocessing it trained with
    facts: dict[str, Any]  # params, steps, step time, training time, final loss (a row without its scores)


def train_setup(
    name: str, spec: DatasetSpec, train_cases: Sequence[Case], eval_cases: Sequence[Case], config: TrainConfig,
    minutes: float | None = None,
) -> Trained:  # fmt: skip
    """Train setup ``name`` (``config`` from :func:`setup_config`; its ``modality_dropout`` and mode too) on
    ``train_cases`` for ``config.max_steps`` steps or ``minutes`` of CPU time; ``eval_cases`` are kept
    for scoring."""
    set_seed(config.seed)
    keep_freed_memory()  # the trainer's allocator settings, for every network alike
    accelerator = Accelerator(
        cpu=config.cpu, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed)
    )
    metadata = training_metadata(config, spec, len(train_cases), len(eval_cases))  # the trainer's preprocessing
    train_set = build_train_set(train_cases, metadata, config, config.roi)
    model = build_network(name, spec, config, train_cases)
    inference_params, trained_params = parameters(model)
    loss_fn = VeloxSegLoss(*SETUPS[name].loss_weights())
    optimizer = build_optimizer(model, config)
    train_loader = build_train_loader(train_set, config)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    budget = CpuBudget(minutes) if minutes else None
    if budget is None:
        scheduler = build_scheduler(optimizer, config, config.max_steps)
    else:
        scheduler = budget_scheduler(optimizer, config, budget.spent)

    model.train()
    step_times, losses, start, cpu_start = [], [], time.perf_counter(), time.thread_time()
    for batch in batches(train_loader, train_set, accelerator):
        synchronize(accelerator.device)
        step_start = time.thread_time()
        progress = budget.spent() if budget else len(losses) / config.max_steps
        terms = train_step(
            model, batch, loss_fn, optimizer, scheduler, accelerator, max_grad_norm=config.max_grad_norm,
            modality_dropout=modality_dropout_at(config.modality_dropout, config.modality_dropout_warmup, progress),
            modality_dropout_mode=config.modality_dropout_mode, modality_consistency=config.modality_consistency,
        )  # fmt: skip
        synchronize(accelerator.device)
        step_times.append(time.thread_time() - step_start)
        losses.append(terms["loss"].item())
        if (budget.spent() >= 1.0) if budget else len(losses) == config.max_steps:
            break
    train_s, train_cpu_s = time.perf_counter() - start, time.thread_time() - cpu_start
    tail = losses[-max(1, len(losses) // 10) :]
    facts = {
        "model": name,
        "loss": SETUPS[name].description,
        "seed": config.seed,
        "lr": config.lr,
        "params_m": inference_params / 1e6,
        "trained_params_m": trained_params / 1e6,
        "steps": len(losses),
        "step_s": statistics.median(step_times[1:] or step_times),  # CPU time; the first step warms up
        "train_min": train_s / 60,
        "train_cpu_min": train_cpu_s / 60,
        "final_train_loss": statistics.mean(tail),
    }
    return Trained(accelerator.unwrap_model(model), accelerator, eval_cases, metadata, facts)


def scores(trained: Trained, spec: DatasetSpec, config: TrainConfig, model: nn.Module | None = None) -> dict[str, Any]:
    """Whole-volume test scores of the trained network (or of ``model``, a wrapper of it): Dice per class,
    their mean, HD95 (mm) and the time it took."""
    start = time.perf_counter()
    classes = class_names(spec)
    metrics, _ = validate(
        model or trained.model, trained.eval_cases, trained.accelerator, trained.metadata, classes, config.sw_batch_size
    )
    return {
        "dice": {c: metrics[f"val/dice_{c}"] for c in classes},
        "dice_mean": metrics["val/dice"],
        "hd95_mm": metrics["val/hd95"] if math.isfinite(metrics["val/hd95"]) else None,  # None: no case had one
        "test_s": time.perf_counter() - start,
    }


def run(
    name: str, spec: DatasetSpec, train_cases: Sequence[Case], eval_cases: Sequence[Case], config: TrainConfig,
    minutes: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train setup ``name`` (``config`` from :func:`setup_config`) on ``train_cases`` for ``config.max_steps``
    steps or ``minutes`` of CPU time, then score it on whole ``eval_cases``; one table row."""
    trained = train_setup(name, spec, train_cases, eval_cases, config, minutes)
    row = {**trained.facts, **scores(trained, spec, config)}
    trained.accelerator.free_memory()
    return row


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (for step timings); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_benchmark_data(data: Path | None, test: bool = True) -> DatasetSpec:
    """The nnU-Net folder ``data`` (None: the demo dataset), checked; with ``test``, labelled test cases too."""
    data = demo_dataset() if data is None else data
    spec = read_dataset(data)
    validate_dataset(spec)
    if test and (not spec.test or any(case.label is None for case in spec.test)):
        raise ValueError(f"{data}: the benchmark needs test cases with labels (imagesTs and labelsTs)")
    return spec


def base_config(data: Path | None, steps: int | None, roi: Sequence[int] | None, **settings: Any) -> TrainConfig:
    """The settings every setup shares: the trainer's defaults, and by default its demo run's ROI (64^3, on
    any data: one patch size for every network, small enough for CPU budgets)."""
    roi = roi or DEMO_ROI
    config = resolve(TrainConfig(data=None if data is None else str(data), roi=roi, max_steps=steps or 100, **settings))
    if config.threads:
        torch.set_num_threads(config.threads)
    return config


def run_info(
    spec: DatasetSpec, config: TrainConfig, minutes: float | None, command: str | None, seeds: Sequence[int]
) -> dict[str, Any]:
    """How a benchmark run was made, for its results."""
    on_gpu = torch.cuda.is_available() and not config.cpu
    return {
        "data": str(spec.root),
        "train_cases": len(spec.training),
        "test_cases": len(spec.test),
        "budget": f"{minutes:g} CPU minutes" if minutes else f"{config.max_steps} steps",
        "minutes": minutes,
        "steps": None if minutes else config.max_steps,
        "roi": list(config.roi),
        "batch_size": config.batch_size,
        "optimizer": f"AdamW (weight decay {config.weight_decay}), linear warm-up over 5 % of the budget, cosine "
        f"decay to {config.min_lr}; peak lr per setup (column lr)",
        "seeds": list(seeds),
        "device": torch.cuda.get_device_name() if on_gpu else f"CPU, {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg()[0],
        "command": command,
    }


def run_benchmark(
    models: list[str],
    data: Path | None,
    steps: int | None = None,
    roi: Sequence[int] | None = None,
    out: Path | None = None,
    command: str | None = None,
    minutes: float | None = None,
    seeds: Sequence[int] = (0,),
    lr: float | None = None,
    **settings: Any,
) -> list[dict[str, Any]]:
    """Train every setup in ``models`` for each seed on the training cases of the nnU-Net folder
    ``data`` and score it on its test cases; returns the rows (one per setup and seed).

    ``data`` None: the demo dataset. The budget is ``minutes`` of CPU time, else ``steps`` (default
    100). ``lr`` None: each setup's recorded rate. ``roi`` and ``settings`` (further ``TrainConfig``
    fields: batch_size, num_workers, cpu, ...) left out take the trainer's defaults. With ``out``,
    the results so far are written after every run (see :func:`write_results`).
    """
    unknown = [m for m in models if m not in SETUPS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {', '.join(SETUPS)}")
    base = base_config(data, steps, roi, **settings)
    spec = load_benchmark_data(data)
    info = run_info(spec, base, minutes, command, seeds)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for seed in seeds:
        for name in models:
            config = setup_config(name, dataclasses.replace(base, seed=seed), lr)
            rows.append(run(name, spec, spec.training, spec.test, config, minutes))
            row = rows[-1]
            print(f"{name} seed {seed}: Dice {row['dice_mean']:.3f} after {row['steps']} steps "
                  f"({row['step_s']:.3f} CPU s/step)", flush=True)  # fmt: skip
            if out is not None:
                info.update(wall_min=(time.perf_counter() - start) / 60, load_average_end=os.getloadavg()[0])
                write_results(rows, info, out)
    return rows


def read_record(path: Path) -> dict[str, Any]:
    """The recorded learning rates at ``path``: ``{"setups": {name: {"lr": ..., ...}}}``, empty if none."""
    return json.loads(path.read_text()) if path.is_file() else {"setups": {}}


def search_learning_rates(
    models: list[str], datasets: Sequence[Path | None], minutes: float | None, steps: int | None,
    roi: Sequence[int] | None = None, grid: Sequence[float] = LR_GRID, record_path: Path = LEARNING_RATES,
    seeds: Sequence[int] = (0,), **settings: Any,
) -> dict[str, Any]:  # fmt: skip
    """For each setup, train at every rate of ``grid`` on the training part of a validation split of each
    dataset and score on its validation part; record the rate of the best mean validation Dice in
    ``record_path`` (setups of the paper's recipe keep the paper's rate). Each seed draws its own split
    and its own training run, so more seeds average out small validation splits; a score is recorded
    per dataset and seed (``"brain"`` for seed 0, ``"brain, seed 1"`` for seed 1). Scores recorded
    earlier for the setup at the same budget on the same kind of CPU are kept, so a search over new
    rates or seeds extends the record instead of replacing it. Returns the record."""
    if not grid or any(not lr > 0 for lr in grid):
        raise ValueError(f"the learning-rate grid needs rates > 0, got {list(grid)}")
    budget = f"{minutes:g} CPU minutes" if minutes else f"{steps or 100} steps"
    cpu = torch.backends.cpu.get_cpu_capability()  # a CPU budget buys ~3x the steps on AVX512 as on AVX2
    for name in models:
        if SETUPS[name].recipe == "paper":
            continue
        earlier = read_record(record_path)["setups"].get(name, {})
        same_budget = (earlier.get("budget"), earlier.get("cpu")) == (budget, cpu)
        scores: dict[str, dict[str, float]] = earlier["validation_dice"] if same_budget else {}
        for data, seed in itertools.product(datasets, seeds):
            base = base_config(data, steps, roi, seed=seed, **settings)
            spec = load_benchmark_data(data, test=False)
            train_cases, val_cases = split_cases(spec, base.val_fraction, base.seed, base.fold)
            split = spec.root.name if seed == 0 else f"{spec.root.name}, seed {seed}"
            for lr in grid:
                row = run(name, spec, train_cases, val_cases, setup_config(name, base, lr), minutes)
                scores.setdefault(f"{lr:g}", {})[split] = row["dice_mean"]
                print(f"{name} lr {lr:g} on {split}: validation Dice {row['dice_mean']:.3f}", flush=True)
        names = set(scores[f"{grid[0]:g}"])
        scores = {lr: by_data for lr, by_data in scores.items() if set(by_data) == names}  # earlier, other data: drop
        best = max(scores, key=lambda lr: statistics.mean(scores[lr].values()))
        # read again: a search of another setup running beside this one may have recorded its rate meanwhile
        record = read_record(record_path)
        record["setups"][name] = {"lr": float(best), "validation_dice": scores, "budget": budget, "cpu": cpu}
        with atomic_file(record_path) as tmp:  # every setup's rate lives in this file: never half-written
            tmp.write_text(json.dumps(record, indent=2) + "\n")
    return read_record(record_path)


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per setup, in first-run order: mean, min and max of test Dice over its seeds."""
    result = []
    for name in dict.fromkeys(r["model"] for r in rows):
        runs = [r for r in rows if r["model"] == name]
        dice = [r["dice_mean"] for r in runs]
        result.append({
            "model": name, "loss": runs[0]["loss"], "lr": runs[0]["lr"], "seeds": len(runs),
            "dice_mean": statistics.mean(dice), "dice_min": min(dice), "dice_max": max(dice),
            "steps": statistics.mean(r["steps"] for r in runs), "step_s": statistics.median(r["step_s"] for r in runs),
            "params_m": runs[0]["params_m"],
        })  # fmt: skip
    return result


def table_lines(header: list[str], body: list[list[Any]]) -> list[str]:
    """A markdown table's lines."""

    def line(cells: list[Any]) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    return [line(header), line(["---"] * len(header)), *(line(cells) for cells in body)]


def markdown_table(rows: list[dict[str, Any]]) -> list[str]:
    """The per-seed rows as the lines of a markdown table."""
    classes = list(rows[0]["dice"])
    header = ["model", "recipe / loss", "seed", "lr", *(f"Dice {c}" for c in classes), "Dice mean", "HD95 (mm)",
              "steps", "CPU s / step", "params (M)", "trained params (M)"]  # fmt: skip
    body = [
        [r["model"], r["loss"], r["seed"], f"{r['lr']:g}", *(f"{r['dice'][c]:.3f}" for c in classes),
         f"{r['dice_mean']:.3f}", "n/a" if r["hd95_mm"] is None else f"{r['hd95_mm']:.1f}", r["steps"],
         f"{r['step_s']:.3f}", f"{r['params_m']:.2f}", f"{r['trained_params_m']:.2f}"]
        for r in rows
    ]  # fmt: skip
    return table_lines(header, body)


def summary_table(rows: list[dict[str, Any]]) -> list[str]:
    """The per-setup summary (mean and min-max over seeds) as markdown lines."""
    header = ["model", "recipe / loss", "lr", "seeds", "test Dice mean", "min - max", "steps (mean)",
              "CPU s / step", "params (M)"]  # fmt: skip
    body = [
        [r["model"], r["loss"], f"{r['lr']:g}", r["seeds"], f"**{r['dice_mean']:.3f}**",
         f"{r['dice_min']:.3f} - {r['dice_max']:.3f}", f"{r['steps']:.0f}", f"{r['step_s']:.3f}",
         f"{r['params_m']:.2f}"]
        for r in summary(rows)
    ]  # fmt: skip
    return table_lines(header, body)


def markdown(rows: list[dict[str, Any]], run_info: dict[str, Any]) -> str:
    """The results as a markdown page: how they were made, the summary and per-seed tables, caveats."""
    info = run_info
    lines = [
        f"# Accuracy: {Path(info['data']).name}",
        "",
        "```",
        info["command"] or "(not run from the command line)",
        "```",
        "",
        (f"Data: `{Path(info['data']).name}`, {info['train_cases']} training cases, {info['test_cases']} test cases "
        f"(whole volumes, sliding-window inference). Every setup: {info['budget']} of batch {info['batch_size']} "
        f"patches of {'x'.join(map(str, info['roi']))}, {info['optimizer']}; seeds {info['seeds']}. "
        f"Device: {info['device']} (torch threads: {info['torch_threads']}), load average "
        f"{info['load_average_start']:.1f} at the start and {info['load_average_end']:.1f} at the end; "
        f"wall time {info['wall_min']:.0f} min."),
        "",
        "## Mean over seeds",
        "",
        *summary_table(rows),
        "",
        "## Every run",
        "",
        *markdown_table(rows),
        "",
        "* HD95 is the mean over test cases where prediction and label are both non-empty.",
        ("* CPU s / step: median CPU time of the training thread per step (forward, backward, optimiser; data "
         "loading runs in the same thread unless there are loader workers); see `speed.py` for speed."),
        "",
    ]
    return "\n".join(lines)


def plot(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Bar charts of mean test Dice per setup with min-max error bars over seeds, one panel per run
    (``{title: rows}``)."""
    from matplotlib.figure import Figure

    width_models = max(len(summary(rows)) for rows in runs.values())
    fig = Figure(figsize=(1.2 * width_models + 2, 4.5 * len(runs)), layout="constrained")
    for ax, (title, rows) in zip(fig.subplots(len(runs), 1, squeeze=False)[:, 0], runs.items()):
        table = summary(rows)
        means = [r["dice_mean"] for r in table]
        errors = [[m - r["dice_min"] for m, r in zip(means, table)], [r["dice_max"] - m for m, r in zip(means, table)]]
        bars = ax.bar(range(len(table)), means, 0.7, yerr=errors, capsize=3)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_xticks(range(len(table)), [r["model"].replace("-", "\n", 1) for r in table], fontsize=8)
        ax.set(ylabel="test Dice (mean of classes)", ylim=(0, 1), title=title)
    save_figure(fig, path)


def run_title(run_info: dict[str, Any]) -> str:
    """A chart title naming the data, the budget and the device."""
    return f"{Path(run_info['data']).name}: test Dice after {run_info['budget']} ({run_info['device']})"


def result_file(out: Path, extension: str) -> Path:
    """``out`` with ``extension`` appended, not substituted: a name such as ``hr-lr0.004`` keeps its
    ``.004`` (``with_suffix`` would drop it, and runs at 0.004 and 0.008 would overwrite each other)."""
    return out.with_name(out.name + extension)


def write_results(rows: list[dict[str, Any]], run_info: dict[str, Any], out: Path) -> None:
    """``out``.json (run settings and rows), ``out``.md (tables) and ``out``.png (Dice bar chart)."""
    # rewritten after every run of a long benchmark: an interruption leaves the previous complete files
    with atomic_file(result_file(out, ".json")) as tmp:
        tmp.write_text(json.dumps({"run": run_info, "rows": rows}, indent=2) + "\n")
    with atomic_file(result_file(out, ".md")) as tmp:
        tmp.write_text(markdown(rows, run_info))
    plot({run_title(run_info): rows}, result_file(out, ".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS), metavar="MODEL",
                        help=f"setups to run (default: all of {', '.join(SETUPS)})")  # fmt: skip
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="CPU minutes of training per setup (thread time)")
    budget.add_argument("--steps", type=int, help="training steps per setup (default 100 without --minutes)")
    parser.add_argument("--roi", type=int, nargs="+", help="patch size, 1 or 3 ints (default: 64)")
    parser.add_argument("--data", type=Path, nargs="+", default=[None], metavar="DIR",
                        help="nnU-Net v2 raw folder(s) with labelled imagesTs (default: the demo data)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="output path without suffix (default: results/accuracy[-DATA])")
    parser.add_argument("--batch-size", type=int, default=2, help="patches per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, help="peak learning rate of every setup (default: each setup's recorded)")
    parser.add_argument("--search-lr", action="store_true",
                        help="choose each setup's rate from --lr-grid on validation splits and record it")
    parser.add_argument("--lr-grid", type=float, nargs="+", default=list(LR_GRID), metavar="LR",
                        help="rates --search-lr tries (default: %(default)s); scores of earlier rates at the same "
                        "budget and CPU kind are kept")
    parser.add_argument("--workers", type=int, help="data loading processes (default: the trainer's)")
    parser.add_argument("--seed", type=int, nargs="+", default=[0], dest="seeds",
                        help="seeds (default: 0); with --search-lr, each seed also draws its own validation split")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    args = parser.parse_args()
    command = shlex.join(["python", "benchmarks/accuracy.py", *sys.argv[1:]])
    settings = {"batch_size": args.batch_size, "num_workers": args.workers, "cpu": args.cpu}
    if args.search_lr:
        search_learning_rates(
            args.models, args.data, args.minutes, args.steps, args.roi, args.lr_grid, seeds=args.seeds, **settings
        )  # fmt: skip
        return
    for data in args.data:
        out = args.out or HERE / "results" / ("accuracy" if data is None else f"accuracy-{data.name}")
        run_benchmark(
            args.models, data, args.steps, args.roi, out=out, command=command, minutes=args.minutes,
            seeds=args.seeds, lr=args.lr, **settings,
        )  # fmt: skip


if __name__ == "__main__":
    main()
