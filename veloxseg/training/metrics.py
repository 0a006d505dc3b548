"""Metrics and plots of a run: ``metrics.jsonl``, Accelerate's trackers, ``curves.png`` and ``validation.png``."""

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from ..io import atomic_file


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
            with atomic_file(path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def log(self, values: dict[str, float], step: int) -> None:
        record = {"step": step, **values}
        self.records.append(record)
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        self.accelerator.log(values, step=step)


class TrainingMeter:
    """The loss terms and the training throughput since the last read-out: :meth:`add` each batch,
    :meth:`count_step` each optimizer step, :meth:`read` the means. Time spent inside :meth:`paused`
    (validation, checkpoints) is not training time."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps, self.patches, self.start = 0, 0, time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor], patches: int, grad_accum: int) -> None:
        """The loss terms of one of the ``grad_accum`` batches of a step, and the patches it held."""
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.item() / grad_accum
        self.patches += patches

    def count_step(self) -> None:
        self.steps += 1

    def read(self) -> dict[str, float]:
        """``train/<term>``: each loss term's mean per optimizer step; ``train/patches_per_s``. Starts over."""
        values = {f"train/{name}": total / self.steps for name, total in self.sums.items()}
        values["train/patches_per_s"] = self.patches / (time.perf_counter() - self.start)
        self.__init__()
        return values

    @contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.start += time.perf_counter() - start


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
    """A matplotlib figure as a PNG, written atomically."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
