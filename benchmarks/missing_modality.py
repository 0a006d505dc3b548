"""Missing modalities: test Dice on every non-empty subset of a task's modalities for three ways to get there.

    python benchmarks/missing_modality.py --minutes 2 --seed 0 1 2          # the PET/CT demo data
    python benchmarks/missing_modality.py --data DIR --minutes 2 --seed 0   # e.g. examples/prepare_brain_contrasts.py

For each seed, with the same training budget each (``--minutes`` of CPU time or ``--steps``):

* (a) ``dropout``: one model trained on every channel with ``--modality-dropout P`` (the trainer's flag),
  scored on each subset with the other groups left out (``model(x, present=...)``);
* (b) ``zero-filled``: one model trained on every channel without it, scored on each subset with the
  missing channels set to 0 (the mean intensity after normalisation): what a normal model gets;
* (c) ``dedicated``: for each proper subset, a model trained on those channels alone; on the full set it
  is (b)'s model, not trained twice.

Everything else is ``accuracy.py``'s: the setup (network, recipe, recorded learning rate), the trainer's
data pipeline and ``train_step``, the CPU budget and its schedule, whole-volume scoring of the test
cases. The model trainer's datasets have one modality group per channel, so a subset of channels is a
subset of groups. Results: ``OUT.json`` and ``OUT.md`` after every training run.
"""

import argparse
import dataclasses
import itertools
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accuracy import (
    HERE,
    SETUPS,
    base_config,
    load_benchmark_data,
    run_info,
    scores,
    setup_config,
    table_lines,
    train_setup,
)
from torch import nn

from veloxseg.data.datasets import Case, DatasetSpec
from veloxseg.io import atomic_file

METHODS = ("dropout", "zero-filled", "dedicated")
SCORE_KEYS = ("dice", "dice_mean", "hd95_mm", "test_s")  # the keys of accuracy.scores


class OnSubset(nn.Module):
    """A model given only the channels ``kept`` (indices) of its input, for ``validate``: without the other
    groups' streams, or with ``zero_fill`` the way a normal model gets them: as zeros."""

    def __init__(self, model: nn.Module, kept: tuple[int, ...], zero_fill: bool) -> None:
        super().__init__()
        self.model, self.kept, self.zero_fill = model, kept, zero_fill
        self.config = model.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.zero_fill:
            return self.model(x, present=list(self.kept))
        missing = [c for c in range(x.shape[1]) if c not in self.kept]
        return self.model(x.index_fill(1, torch.tensor(missing, dtype=torch.long, device=x.device), 0.0))


def channel_subsets(count: int) -> list[tuple[int, ...]]:
    """Every non-empty subset of ``count`` channels: the full set first, then by size, largest first."""
    return [s for size in range(count, 0, -1) for s in itertools.combinations(range(count), size)]


def subset_spec(spec: DatasetSpec, kept: tuple[int, ...]) -> DatasetSpec:
    """``spec`` with the channels ``kept`` only (each case's files of those channels)."""

    def cases(items: list[Case]) -> list[Case]:
        return [dataclasses.replace(c, images=tuple(c.images[i] for i in kept)) for c in items]

    if any(len(c.images) != len(spec.channel_names) for c in spec.training + spec.test):
        raise ValueError(f"{spec.root}: the benchmark needs one file per channel (nnU-Net naming)")
    return dataclasses.replace(
        spec, channel_names=[spec.channel_names[i] for i in kept], training=cases(spec.training), test=cases(spec.test)
    )


def run_task(
    name: str, data: Path | None, dropout: float, seeds: list[int], minutes: float | None, steps: int | None,
    out: Path | None = None, command: str | None = None, roi: tuple[int, ...] | None = None, **settings: Any,
) -> list[dict[str, Any]]:  # fmt: skip
    """Train and score (a), (b) and (c) for each seed on the task ``data`` (None: the demo data); one row
    per method, subset and seed. ``roi``: the patch size (default 64^3); ``settings``: further
    ``TrainConfig`` fields. With ``out`` the results so far are written after every training."""
    spec = load_benchmark_data(data)
    if len(spec.channel_names) < 2:
        raise ValueError(f"{spec.root}: one channel ({spec.channel_names[0]}); missing modalities need two or more")
    base = base_config(data, steps, roi, **settings)
    info = {**run_info(spec, base, minutes, command, seeds), "network": name, "modality_dropout": dropout}
    subsets = channel_subsets(len(spec.channel_names))
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()

    def record(method: str, kept: tuple[int, ...], facts: dict[str, Any], result: dict[str, Any]) -> None:
        rows.append({"method": method, "subset": [spec.channel_names[i] for i in kept], **facts, **result})
        print(f"{method} seed {facts['seed']} on {'+'.join(rows[-1]['subset'])}: Dice {result['dice_mean']:.3f} "
              f"after {facts['steps']} steps", flush=True)  # fmt: skip

    def write() -> None:
        if out is not None:
            info.update(wall_min=(time.perf_counter() - start) / 60, load_average_end=os.getloadavg()[0])
            write_results(rows, info, out)

    for seed in seeds:
        for method, p in (("dropout", dropout), ("zero-filled", 0.0)):
            config = setup_config(name, dataclasses.replace(base, seed=seed, modality_dropout=p))
            trained = train_setup(name, spec, spec.training, spec.test, config, minutes)
            for kept in subsets:
                model = OnSubset(trained.model, kept, zero_fill=method == "zero-filled")
                record(method, kept, trained.facts, scores(trained, spec, config, model))
            if method == "zero-filled":  # the full set's dedicated model is this one
                record("dedicated", subsets[0], trained.facts, {k: rows[-len(subsets)][k] for k in SCORE_KEYS})
            write()
        for kept in subsets[1:]:
            sub = subset_spec(spec, kept)
            config = setup_config(name, dataclasses.replace(base, seed=seed))
            trained = train_setup(name, sub, sub.training, sub.test, config, minutes)
            record("dedicated", kept, trained.facts, scores(trained, sub, config))
            write()
    return rows



def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per subset, each method's test Dice: mean over seeds and min - max."""

    def cell(method: str, subset: list[str]) -> str:
        dice = [r["dice_mean"] for r in rows if r["method"] == method and r["subset"] == subset]
        return f"{statistics.mean(dice):.3f} ({min(dice):.3f} - {max(dice):.3f})" if dice else "-"

    subsets = list(dict.fromkeys(tuple(r["subset"]) for r in rows))
    body = [[" + ".join(s), *(cell(m, list(s)) for m in METHODS)] for s in subsets]
    return table_lines(["channels given", "(a) dropout", "(b) zero-filled", "(c) dedicated"], body)


def markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    classes = list(rows[0]["dice"])
    every = table_lines(
        ["method", "channels", "seed", *(f"Dice {c}" for c in classes), "Dice mean", "steps"],
        [[r["method"], " + ".join(r["subset"]), r["seed"], *(f"{r['dice'][c]:.3f}" for c in classes),
          f"{r['dice_mean']:.3f}", r["steps"]] for r in rows],
    )  # fmt: skip
    return "\n".join([
        f"# Missing modalities: {Path(info['data']).name}",
        "",
        "```",
        info["command"] or "(not run from the command line)",
        "```",
        "",
        f"Network `{info['network']}`; (a) trained with modality dropout {info['modality_dropout']:g}, (b) without, "
        f"scored with the missing channels zero-filled, (c) trained on the channels given alone (on all channels: "
        f"(b)'s model). Data: `{Path(info['data']).name}`, {info['train_cases']} training cases, "
        f"{info['test_cases']} test cases (whole volumes). Every training run: {info['budget']} of batch "
        f"{info['batch_size']} patches of {'x'.join(map(str, info['roi']))}; seeds {info['seeds']}. Device: "
        f"{info['device']} (torch threads: {info['torch_threads']}), load average {info['load_average_start']:.1f} "
        f"at the start and {info['load_average_end']:.1f} at the end; wall time {info['wall_min']:.0f} min.",
        "",
        "## Test Dice (mean of classes): mean over seeds (min - max)",
        "",
        *summary_lines(rows),
        "",
        "## Every run",
        "",
        *every,
        "",
    ])  # fmt: skip


def write_results(rows: list[dict[str, Any]], info: dict[str, Any], out: Path) -> None:
    """``out``.json (settings and rows) and ``out``.md (tables), each replaced whole."""
    with atomic_file(out.with_name(out.name + ".json")) as tmp:
        tmp.write_text(json.dumps({"run": info, "rows": rows}, indent=2) + "\n")
    with atomic_file(out.with_name(out.name + ".md")) as tmp:
        tmp.write_text(markdown(rows, info))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    networks = [s for s in SETUPS if s.startswith("veloxseg")]
    parser.add_argument("--model", default="veloxseg_small_hr", choices=networks, help="setup (default %(default)s)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="CPU minutes of training per model (thread time)")
    budget.add_argument("--steps", type=int, help="training steps per model (default 100 without --minutes)")
    parser.add_argument("--data", type=Path, nargs="+", default=[None], metavar="DIR",
                        help="nnU-Net v2 raw folder(s) with labelled imagesTs (default: the PET/CT demo data)")  # fmt: skip
    parser.add_argument("--modality-dropout", type=float, default=0.5, help="(a)'s share (default %(default)s)")
    parser.add_argument("--seed", type=int, nargs="+", default=[0], dest="seeds", help="seeds (default: 0)")
    parser.add_argument("--out", type=Path, help="output path without suffix (default: results/missing_modality-DATA)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    args = parser.parse_args()
    command = shlex.join(["python", "benchmarks/missing_modality.py", *sys.argv[1:]])
    for data in args.data:
        out = args.out or HERE / "results" / f"missing_modality-{'demo' if data is None else data.name}"
        run_task(
            args.model, data, args.modality_dropout, args.seeds, args.minutes, args.steps, out, command, cpu=args.cpu
        )


if __name__ == "__main__":
    main()
