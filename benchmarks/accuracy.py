"""Test-set accuracy of VeloxSeg and MONAI's networks trained the same way, and VeloxSeg's SDKT ablation.

    python benchmarks/accuracy.py                         # every setup, 100 steps, on the demo data
    python benchmarks/accuracy.py --models veloxseg_tiny UNet --steps 20 --out /tmp/accuracy

Every setup trains with the trainer's own parts (:mod:`veloxseg.training`): from the same seed on the
same cases with the same preprocessing, crops, augmentation and batch order (``build_datasets``,
``build_loaders``, ``batches``), the same AdamW settings and warm-up + cosine schedule (the trainer's
``resolve``d defaults, so its demo-run learning rate on the demo data), its ``train_step`` and the same
number of steps. Only the network and the loss differ: MONAI's networks train with L_seg (Dice + CE,
as in ``VeloxSegLoss``), VeloxSeg with the loss of its row. Each whole test volume (imagesTs) is then
segmented by sliding-window inference and scored against labelsTs by the trainer's ``validate``: Dice
per class and its mean, HD95 in mm.

"Time per step" is the median compute time of one training step (forward, backward, optimiser; data
loading excluded) on this run's device and load; ``benchmarks/speed.py`` measures speed properly.
Results are written after every setup, as ``OUT.json``, ``OUT.md`` and ``OUT.png``.
"""

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from baselines import build as build_baseline
from monai.data import Dataset
from torch import nn

from veloxseg.data.datasets import DatasetSpec, read_dataset, validate_dataset
from veloxseg.data.demo import GENERATOR_VERSION, make_demo_dataset
from veloxseg.io import atomic_folder
from veloxseg.losses import VeloxSegLoss
from veloxseg.model import VeloxSegOutput
from veloxseg.training import (
    STAGE_LOSS_WEIGHTS,
    PerSampleSeeds,
    TrainConfig,
    batches,
    build_datasets,
    build_loaders,
    build_model,
    build_optimizer,
    build_scheduler,
    class_names,
    resolve,
    train_step,
    training_metadata,
    validate,
)
from veloxseg.training.metrics import save_figure

HERE = Path(__file__).resolve().parent
PAPER_LOSS = STAGE_LOSS_WEIGHTS["segment"]  # (seg, rc, sdkt) = (1, 0.5, 2)


@dataclass(frozen=True)
class Setup:
    """One row of the table: a network and the weights (seg, rc, sdkt) of the loss it trains with."""

    network: str
    loss: tuple[float, float, float]
    description: str


SETUPS: dict[str, Setup] = {
    "veloxseg_tiny": Setup("veloxseg_tiny", PAPER_LOSS, "paper loss L_seg + 0.5 L_rc + 2 L_sdkt"),
    "veloxseg_small": Setup("veloxseg_small", PAPER_LOSS, "paper loss L_seg + 0.5 L_rc + 2 L_sdkt"),
    "veloxseg_small-no-gram": Setup("veloxseg_small", (1.0, 0.5, 0.0), "no Gram loss: L_seg + 0.5 L_rc"),
    "veloxseg_small-no-teachers": Setup("veloxseg_small", (1.0, 0.0, 0.0), "no teachers: L_seg only"),
    "SegResNet": Setup("SegResNet", (1.0, 0.0, 0.0), "MONAI, init_filters 16; L_seg"),
    "UNet": Setup("UNet", (1.0, 0.0, 0.0), "MONAI, channels 16-256; L_seg"),
    "SwinUNETR": Setup("SwinUNETR", (1.0, 0.0, 0.0), "MONAI, feature size 24; L_seg"),
    "DynUNet": Setup("DynUNet", (1.0, 0.0, 0.0), "MONAI, nnU-Net-like, no deep supervision; L_seg"),
}
ABLATION = ["veloxseg_small", "veloxseg_small-no-gram", "veloxseg_small-no-teachers"]


class MonaiNet(nn.Module):
    """A MONAI network in VeloxSeg's interface, for ``VeloxSegLoss`` and ``validate``: ``config.roi_size``,
    ``config.n_classes``, and a training-mode forward returning a :class:`VeloxSegOutput`."""

    def __init__(self, net: nn.Module, roi: tuple[int, int, int], n_classes: int) -> None:
        super().__init__()
        self.net = net
        self.config = SimpleNamespace(roi_size=roi, n_classes=n_classes)

    def forward(self, x: torch.Tensor) -> VeloxSegOutput | torch.Tensor:
        logits = self.net(x)
        return VeloxSegOutput([logits]) if self.training else logits


def build_network(name: str, spec: DatasetSpec, roi: tuple[int, int, int]) -> nn.Module:
    """The network of setup ``name`` for the dataset's channels and classes, at patch size ``roi``."""
    setup = SETUPS[name]
    if setup.network.startswith("veloxseg"):
        seg, rc, sdkt = setup.loss  # build_model adds teachers only when rc or sdkt is used
        config = TrainConfig(model=setup.network, roi=roi, seg_weight=seg, rc_weight=rc, sdkt_weight=sdkt)
        return build_model(config, spec)
    net = build_baseline(setup.network, len(spec.channel_names), len(spec.labels), roi)
    return MonaiNet(net, roi, len(spec.labels))


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


def run(
    name: str,
    spec: DatasetSpec,
    train_set: PerSampleSeeds,
    test_set: Dataset,
    config: TrainConfig,
    accelerator: Accelerator,
) -> dict[str, Any]:
    """Train setup ``name`` for ``config.max_steps`` steps, then score it on the test set; one table row."""
    setup = SETUPS[name]
    set_seed(config.seed)
    model = build_network(name, spec, config.roi)
    inference_params, trained_params = parameters(model)
    loss_fn = VeloxSegLoss(*setup.loss)
    optimizer = build_optimizer(model, config)
    train_loader, test_loader = build_loaders(train_set, test_set, config)
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    scheduler = build_scheduler(optimizer, config, config.max_steps)

    model.train()
    step_times, losses, start = [], [], time.perf_counter()
    for batch in batches(train_loader, train_set, accelerator):
        synchronize(accelerator.device)
        step_start = time.perf_counter()
        terms = train_step(model, batch, loss_fn, optimizer, scheduler, accelerator)
        synchronize(accelerator.device)
        step_times.append(time.perf_counter() - step_start)
        losses.append(terms["loss"].item())
        if len(losses) == config.max_steps:
            break
    train_s = time.perf_counter() - start

    start = time.perf_counter()
    classes = class_names(spec)
    metrics, _ = validate(accelerator.unwrap_model(model), test_loader, accelerator, config, classes)
    test_s = time.perf_counter() - start
    accelerator.free_memory()
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "model": name,
        "loss": setup.description,
        "dice": {c: metrics[f"val/dice_{c}"] for c in classes},
        "dice_mean": metrics["val/dice"],
        "hd95_mm": metrics["val/hd95"] if math.isfinite(metrics["val/hd95"]) else None,  # None: no case had one
        "params_m": inference_params / 1e6,
        "trained_params_m": trained_params / 1e6,
        "step_s": statistics.median(step_times[1:] or step_times),  # the first step warms up
        "train_min": train_s / 60,
        "test_s": test_s,
        "final_train_loss": statistics.mean(tail),
    }


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (for step timings); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_benchmark(
    models: list[str],
    data: Path | None,
    steps: int,
    roi: Sequence[int] | None = None,
    out: Path | None = None,
    command: str | None = None,
    **settings: Any,
) -> list[dict[str, Any]]:
    """Train and test each setup in ``models`` on the nnU-Net folder ``data``; returns the table rows.

    ``data`` None: the demo dataset. ``roi`` and ``settings`` (further ``TrainConfig`` fields: seed,
    lr, batch_size, num_workers, cpu, ...) left out take the trainer's defaults, its demo-run ones
    (ROI 64, learning rate) on the demo dataset. With ``out``, the results so far are written after
    every setup (see :func:`write_results`), with ``command`` as the command that made them.
    """
    unknown = [m for m in models if m not in SETUPS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {', '.join(SETUPS)}")
    config = resolve(TrainConfig(data=None if data is None else str(data), roi=roi, max_steps=steps, **settings))
    if config.roi is None:
        raise ValueError("give the ROI (patch size) for a dataset other than the demo one")
    if config.threads:
        torch.set_num_threads(config.threads)
    data = demo_dataset() if data is None else data
    spec = read_dataset(data)
    validate_dataset(spec)
    if not spec.test or any(case.label is None for case in spec.test):
        raise ValueError(f"{data}: the benchmark needs test cases with labels (imagesTs and labelsTs)")
    accelerator = Accelerator(
        cpu=config.cpu, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed)
    )
    # Every training case (no validation split: nothing is selected on validation), test cases whole.
    metadata = training_metadata(config, spec, len(spec.training), 0)  # the trainer's preprocessing
    train_set, test_set = build_datasets(spec.training, spec.test, metadata, config, config.roi)
    run_info = {
        "data": str(data),
        "train_cases": len(spec.training),
        "test_cases": len(spec.test),
        "steps": steps,
        "roi": list(config.roi),
        "batch_size": config.batch_size,
        "optimizer": f"AdamW (peak lr {config.lr}, weight decay {config.weight_decay}), linear warm-up over "
        f"{'5 % of the' if config.warmup_steps is None else config.warmup_steps} steps, "
        f"cosine decay to {config.min_lr}",
        "seed": config.seed,
        "device": torch.cuda.get_device_name(accelerator.device)
        if accelerator.device.type == "cuda"
        else f"CPU, {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg()[0],
        "command": command,
    }
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for name in models:
        rows.append(run(name, spec, train_set, test_set, config, accelerator))
        row = rows[-1]
        print(f"{name}: Dice {row['dice_mean']:.3f}, HD95 {row['hd95_mm']} mm, {row['step_s']:.2f} s/step", flush=True)
        if out is not None:
            run_info.update(wall_min=(time.perf_counter() - start) / 60, load_average_end=os.getloadavg()[0])
            write_results(rows, run_info, out)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> list[str]:
    """The rows as the lines of a markdown table."""
    classes = list(rows[0]["dice"])
    header = ["model", "loss", *(f"Dice {c}" for c in classes), "Dice mean", "HD95 (mm)", "params (M)",
              "trained params (M)", "s / step", "train (min)"]  # fmt: skip

    def line(cells: list[Any]) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    body = [
        line([r["model"], r["loss"], *(f"{r['dice'][c]:.3f}" for c in classes), f"{r['dice_mean']:.3f}",
              "n/a" if r["hd95_mm"] is None else f"{r['hd95_mm']:.1f}", f"{r['params_m']:.2f}",
              f"{r['trained_params_m']:.2f}", f"{r['step_s']:.2f}", f"{r['train_min']:.1f}"])  # fmt: skip
        for r in rows
    ]
    return [line(header), line(["---"] * len(header)), *body]


def markdown(rows: list[dict[str, Any]], run_info: dict[str, Any]) -> str:
    """The results as a markdown page: how they were made, the table, the ablation, caveats."""
    info = run_info
    lines = [
        "# Accuracy benchmark: VeloxSeg vs MONAI networks, and the SDKT ablation",
        "",
        "```",
        info["command"] or "(not run from the command line)",
        "```",
        "",
        f"Data: `{Path(info['data']).name}`, {info['train_cases']} training cases, {info['test_cases']} test cases "
        f"(whole volumes, sliding-window inference). Every model: {info['steps']} steps of batch {info['batch_size']} "
        f"patches of {'x'.join(map(str, info['roi']))}, {info['optimizer']}, seed {info['seed']}. "
        f"Device: {info['device']} (torch threads: {info['torch_threads']}), load average "
        f"{info['load_average_start']:.1f} at the start and {info['load_average_end']:.1f} at the end; "
        f"wall time {info['wall_min']:.0f} min.",
        "",
        *markdown_table(rows),
        "",
    ]
    ablation = [r for r in rows if r["model"] in ABLATION]
    if len(ablation) > 1:
        lines += ["## SDKT ablation (VeloxSeg small)", "", *markdown_table(ablation), ""]
    lines += [
        "## How to read this",
        "",
        "* This is a small training budget on synthetic data, one seed and few test cases: the networks are "
        "far from converged, and the ranking says which one learns fastest per step under this budget, not "
        "which one is best when trained to convergence on real PET/CT. Differences of a few Dice points are "
        "within what another seed would change.",
        "* Every network uses the trainer's optimiser settings (VeloxSeg's); they were not tuned per network.",
        "* HD95 is the mean over test cases where prediction and label are both non-empty (a case with an "
        "empty prediction is left out of it, and lowers Dice instead).",
        "* Params: used at inference (VeloxSeg's teachers and deep-supervision heads only train); trained params "
        "include them. s / step: median compute time of one training step (no data loading) on this device "
        "and load, with VeloxSeg's teachers where its loss uses them; see `speed.py` for speed.",
        "",
    ]
    return "\n".join(lines)


def plot(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Bar charts of test Dice per class (and mean, when there are several classes) per model, one
    panel per run (``{title: rows}``)."""
    from matplotlib.figure import Figure

    width_models = max(len(rows) for rows in runs.values())
    fig = Figure(figsize=(1.2 * width_models + 2, 4.5 * len(runs)), layout="constrained")
    for ax, (title, rows) in zip(fig.subplots(len(runs), 1, squeeze=False)[:, 0], runs.items()):
        classes = list(rows[0]["dice"])
        series = {c: [r["dice"][c] for r in rows] for c in classes}
        if len(classes) > 1:
            series["mean"] = [r["dice_mean"] for r in rows]
        width = 0.8 / len(series)
        for i, (label, values) in enumerate(series.items()):
            positions = [x + (i - (len(series) - 1) / 2) * width for x in range(len(rows))]
            bars = ax.bar(positions, values, width, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_xticks(range(len(rows)), [r["model"].replace("-", "\n", 1) for r in rows], fontsize=8)
        ax.set(ylabel="test Dice", ylim=(0, 1), title=title)
        ax.legend()
    save_figure(fig, path)


def run_title(run_info: dict[str, Any]) -> str:
    """A chart title naming the run's steps and device."""
    return f"Test Dice after {run_info['steps']} steps ({run_info['device']})"


def write_results(rows: list[dict[str, Any]], run_info: dict[str, Any], out: Path) -> None:
    """``out``.json (run settings and rows), ``out``.md (tables) and ``out``.png (Dice bar chart)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"run": run_info, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, run_info))
    plot({run_title(run_info): rows}, out.with_suffix(".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS), metavar="MODEL",
                        help=f"setups to run (default: all of {', '.join(SETUPS)})")  # fmt: skip
    parser.add_argument("--steps", type=int, default=100, help="training steps of every model (default: %(default)s)")
    parser.add_argument("--roi", type=int, nargs="+", help="patch size, 1 or 3 ints (default: 64 on the demo data)")
    parser.add_argument("--data", type=Path, help="nnU-Net v2 raw folder with labelled imagesTs (default: demo data)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "accuracy", help="output path without suffix")
    parser.add_argument("--batch-size", type=int, default=2, help="patches per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the trainer's, for the data)")
    parser.add_argument("--workers", type=int, help="data loading processes (default: the trainer's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    args = parser.parse_args()
    command = shlex.join(["python", "benchmarks/accuracy.py", *sys.argv[1:]])
    run_benchmark(
        args.models, args.data, args.steps, args.roi, out=args.out, command=command, seed=args.seed, lr=args.lr,
        batch_size=args.batch_size, num_workers=args.workers, cpu=args.cpu,
    )  # fmt: skip


if __name__ == "__main__":
    main()
