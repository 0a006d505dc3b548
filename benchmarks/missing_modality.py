"""Missing modalities: test Dice on every non-empty subset of a task's modalities for three ways to get there.

    python benchmarks/missing_modality.py --minutes 2 --seed 0 1 2          # the PET/CT demo data
    python benchmarks/missing_modality.py --data DIR --minutes 2 --seed 0   # e.g. examples/prepare_brain_contrasts.py

For each seed, with the same training budget each (``--minutes`` of CPU time or ``--steps``):

* (a) ``dropout``: one model trained on every channel with ``--modality-dropout P``,
  ``--modality-dropout-mode``, ``--modality-dropout-warmup`` and ``--modality-consistency`` (the trainer's
  flags and defaults), scored on each subset with the other groups left out (``model(x, present=...)``);
* (b) ``zero-filled``: one model trained on every channel without it, scored on each subset with the
  missing channels set to 0 (the mean intensity after normalisation): what a normal model gets;
* (c) ``dedicated``: for each proper subset, a model trained on those channels alone; on the full set it
  is (b)'s model, not trained twice.

Everything else is ``accuracy.py``'s: the setup (network, recipe, recorded learning rate), the trainer's
data pipeline and ``train_step``, the CPU budget and its schedule, whole-volume scoring of the test
cases. The model trainer's datasets have one modality group per channel, so a subset of channels is a
subset of groups. Results: ``OUT.json`` and ``OUT.md`` after every training run. ``--methods`` runs some
of the three; with ``--add`` their rows join those of OUT.json (made with the same settings; the rows of
an arm run again are replaced), so that another modality dropout is measured without training (b) and (c)
again; with ``--fill`` only the trainings whose rows OUT.json lacks are run (a run cut short, completed):

    python benchmarks/missing_modality.py --data DIR --minutes 2 --seed 0 1 2 --methods dropout \
        --modality-dropout-mode per-group --add --out results/missing_modality-DIR
    python benchmarks/missing_modality.py --data DIR --minutes 2 --seed 0 1 2 --methods dedicated \
        --fill --out results/missing_modality-DIR
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accuracy import (
    HERE,
    SETUPS,
    Trained,
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
from veloxseg.modalities import MODALITY_DROPOUT_MODES
from veloxseg.training import TrainConfig

METHODS = ("dropout", "zero-filled", "dedicated")
DROPOUT_EXTRAS = {"modality_dropout_warmup": "warm-up", "modality_consistency": "consistency"}  # TrainConfig: name
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


class Results:
    """The rows of a benchmark run, written to ``out``.json and .md after each training; with ``add``, joined
    to the rows of the arms (:func:`arm`) this run does not make, read from ``out``.json; with ``fill``, to
    all its rows (this run makes only those it lacks: see :meth:`has`)."""

    def __init__(self, out: Path | None, run: dict[str, Any], made: dict[str, Any], add: bool, fill: bool) -> None:
        self.out, self.run, self.made, self.start = out, run, made, time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.earlier: dict[str, Any] = {"commands": [], "rows": []}
        if add or fill:
            if out is None:
                raise ValueError("add and fill join the rows of an earlier run: they need out")
            self.earlier = earlier_results(out, run, () if fill else made["arms"])
        self.fill = fill

    def has(self, column: str, seed: int, subset: list[str]) -> bool:
        """Whether, with ``fill``, the earlier results hold the row of arm ``column``, ``seed`` and ``subset``
        (its training is then skipped; without ``fill`` nothing is)."""
        return self.fill and any(
            (arm(r), r["seed"], r["subset"]) == (column, seed, subset) for r in self.earlier["rows"]
        )

    def record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.fill:
            self.made.setdefault("filled", []).append(f"{arm(row)} {'+'.join(row['subset'])} seed {row['seed']}")
        print(f"{arm(row)} seed {row['seed']} on {'+'.join(row['subset'])}: Dice {row['dice_mean']:.3f} "
              f"after {row['steps']} steps", flush=True)  # fmt: skip

    def write(self) -> None:
        if self.out is None:
            return
        self.made.update(wall_min=(time.perf_counter() - self.start) / 60, load_average_end=os.getloadavg()[0])
        commands, rows = self.earlier["commands"] + [self.made], self.earlier["rows"] + self.rows
        write_results({"run": self.run, "commands": commands, "rows": rows}, self.out)


def arm(row: dict[str, Any]) -> str:
    """A row's column: its method, for (a) with its modality dropout ("dropout uniform 0.5", and the warm-up
    and consistency weight when it has them: "dropout uniform 0.5 warm-up 0.3 consistency 1")."""
    if row["method"] != "dropout":
        return row["method"]
    extras = "".join(f" {name} {row[key]:g}" for key, name in DROPOUT_EXTRAS.items() if row.get(key))
    return f"dropout {row['modality_dropout_mode']} {row['modality_dropout']:g}{extras}"


def earlier_results(out: Path, run: dict[str, Any], arms: Sequence[str]) -> dict[str, Any]:
    """The commands and rows of ``out``.json but those of ``arms``; raises ValueError when it was made with
    other settings than ``run`` (data, budget, network, seeds...)."""
    saved = json.loads(out.with_name(out.name + ".json").read_text())
    differ = sorted(k for k in run.keys() | saved["run"].keys() if run.get(k) != saved["run"].get(k))
    if differ:
        raise ValueError(
            f"{out}.json was made with other settings ({', '.join(differ)}: {[saved['run'].get(k) for k in differ]}); "
            f"run with those or leave add out"
        )
    commands = [{**c, "arms": [a for a in c["arms"] if a not in arms]} for c in saved["commands"]]
    rows = [r for r in saved["rows"] if arm(r) not in arms]
    return {"commands": [c for c in commands if c["arms"]], "rows": rows}


def run_task(
    name: str, data: Path | None, dropout: float, seeds: list[int], minutes: float | None, steps: int | None,
    out: Path | None = None, command: str | None = None, roi: tuple[int, ...] | None = None,
    mode: str = "uniform", methods: Sequence[str] = METHODS, add: bool = False, fill: bool = False,
    **settings: Any,
) -> list[dict[str, Any]]:  # fmt: skip
    """Train and score ``methods`` of (a) (with modality dropout ``dropout`` drawn as ``mode``), (b) and (c)
    for each seed on the task ``data`` (None: the demo data); one row per method, subset and seed. ``roi``:
    the patch size (default 64^3); ``settings``: further ``TrainConfig`` fields. With ``out`` the results so
    far are written after every training; with ``add`` joined to the other arms' rows in ``out``.json; with
    ``fill`` to all its rows, training only for the rows it lacks."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"methods must be some of {', '.join(METHODS)}, got {list(methods)}")
    spec = load_benchmark_data(data)
    if len(spec.channel_names) < 2:
        raise ValueError(f"{spec.root}: one channel ({spec.channel_names[0]}); missing modalities need two or more")
    base = base_config(data, steps, roi, modality_dropout_mode=mode, **settings)
    run = {**run_info(spec, base, minutes, command, seeds), "network": name}
    made = {key: run.pop(key) for key in ("command", "load_average_start")}
    dropout_row = {"method": "dropout", "modality_dropout": dropout, "modality_dropout_mode": mode}
    dropout_row.update({key: getattr(base, key) for key in DROPOUT_EXTRAS if getattr(base, key)})
    made["arms"] = [arm(dropout_row) if m == "dropout" else m for m in METHODS if m in methods]
    results = Results(out, run, made, add, fill)
    for seed in seeds:
        task = Task(name, spec, dataclasses.replace(base, seed=seed), minutes, results)
        if "dropout" in methods:
            task.dropout(dropout_row)
        if "zero-filled" in methods or "dedicated" in methods:
            task.plain(zero_filled="zero-filled" in methods, dedicated="dedicated" in methods)
        for kept in task.subsets[1:] if "dedicated" in methods else []:
            task.dedicated(kept)
    return results.rows


class Task:
    """One seed's trainings of a benchmark run (``base`` holds the seed), each recorded in ``results``."""

    def __init__(
        self, name: str, spec: DatasetSpec, base: TrainConfig, minutes: float | None, results: Results
    ) -> None:  # fmt: skip
        self.name, self.spec, self.base, self.minutes, self.results = name, spec, base, minutes, results
        self.subsets = channel_subsets(len(spec.channel_names))

    def dropout(self, row: dict[str, Any]) -> None:
        """(a): trained with ``row``'s modality dropout, scored on every subset."""
        if all(self._has(arm(row), kept) for kept in self.subsets):
            return
        trained, config = self._train(self.spec, row["modality_dropout"])
        for kept in self.subsets:
            self.results.record({**row, **self._score(trained, config, kept, OnSubset(trained.model, kept, False))})
        self.results.write()

    def plain(self, zero_filled: bool, dedicated: bool) -> None:
        """The model trained without modality dropout: with ``zero_filled`` (b) on every subset, with
        ``dedicated`` (c) on every channel (the same model, scored once). Rows the results have are skipped."""
        wanted = [("zero-filled", kept) for kept in self.subsets if zero_filled]
        wanted += [("dedicated", self.subsets[0])] if dedicated else []
        wanted = [(column, kept) for column, kept in wanted if not self._has(column, kept)]
        if not wanted:
            return
        trained, config = self._train(self.spec, 0.0)
        scored = {kept: self._score(trained, config, kept, OnSubset(trained.model, kept, True)) for _, kept in wanted}
        for column, kept in wanted:
            self.results.record({"method": column, **scored[kept]})
        self.results.write()

    def dedicated(self, kept: tuple[int, ...]) -> None:
        """(c): trained and scored on the channels ``kept`` alone."""
        if self._has("dedicated", kept):
            return
        trained, config = self._train(subset_spec(self.spec, kept), 0.0)
        self.results.record({"method": "dedicated", **self._score(trained, config, kept)})
        self.results.write()

    def _has(self, column: str, kept: tuple[int, ...]) -> bool:
        return self.results.has(column, self.base.seed, [self.spec.channel_names[i] for i in kept])

    def _train(self, spec: DatasetSpec, dropout: float) -> tuple[Trained, TrainConfig]:
        config = setup_config(self.name, dataclasses.replace(self.base, modality_dropout=dropout))
        return train_setup(self.name, spec, spec.training, spec.test, config, self.minutes), config

    def _score(
        self, trained: Trained, config: TrainConfig, kept: tuple[int, ...], model: nn.Module | None = None
    ) -> dict[str, Any]:  # fmt: skip
        """A row but its method: the scores on the channels ``kept`` of ``model`` (a wrapper of the trained
        network, given every channel), else of the network trained on those channels alone."""
        spec = self.spec if model is not None else subset_spec(self.spec, kept)
        subset = [self.spec.channel_names[i] for i in kept]
        return {"subset": subset, **trained.facts, **scores(trained, spec, config, model)}


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per subset, each arm's test Dice: mean over seeds and min - max."""
    present = list(dict.fromkeys(arm(r) for r in rows))
    arms = [a for a in present if a.startswith("dropout")] + [m for m in METHODS[1:] if m in present]

    def cell(column: str, subset: list[str]) -> str:
        dice = [r["dice_mean"] for r in rows if arm(r) == column and r["subset"] == subset]
        return f"{statistics.mean(dice):.3f} ({min(dice):.3f} - {max(dice):.3f})" if dice else "-"

    subsets = list(dict.fromkeys(tuple(r["subset"]) for r in rows))
    body = [[" + ".join(s), *(cell(a, list(s)) for a in arms)] for s in subsets]
    letters = dict(zip(METHODS, ("(a)", "(b)", "(c)")))
    return table_lines(["channels given", *(f"{letters[a.split()[0]]} {a}" for a in arms)], body)


def markdown(results: dict[str, Any]) -> str:
    info, rows = results["run"], results["rows"]
    classes = list(rows[0]["dice"])
    commands = table_lines(
        ["arms", "command", "load average start - end", "wall time"],
        [[", ".join(c["arms"]) + (f" (refilled: {', '.join(c['filled'])})" if c.get("filled") else ""),
          f"`{c['command'] or '(not run from the command line)'}`",
          f"{c['load_average_start']:.1f} - {c['load_average_end']:.1f}", f"{c['wall_min']:.0f} min"]
         for c in results["commands"]],
    )  # fmt: skip
    every = table_lines(
        ["arm", "channels", "seed", *(f"Dice {c}" for c in classes), "Dice mean", "steps"],
        [[arm(r), " + ".join(r["subset"]), r["seed"], *(f"{r['dice'][c]:.3f}" for c in classes),
          f"{r['dice_mean']:.3f}", r["steps"]] for r in rows],
    )  # fmt: skip
    return "\n".join([
        f"# Missing modalities: {Path(info['data']).name}",
        "",
        *commands,
        "",
        f"Network `{info['network']}`; (a) trained with modality dropout, the column naming how its groups were "
        f"dropped and P (uniform: a share P of the patches lost one of the non-empty proper subsets, each equally "
        f"likely; per-group: each group was lost on its own coin of probability P, a patch left with none kept one; "
        f"warm-up W: the first share W of the budget on every group; consistency C: C times the KL divergence from "
        f"the model's prediction on every group to that on the patch's subset added to the loss), "
        f"(b) without, scored with the missing channels zero-filled, (c) trained on the channels given alone (on "
        f"all channels: (b)'s model). Data: `{Path(info['data']).name}`, {info['train_cases']} training cases, "
        f"{info['test_cases']} test cases (whole volumes). Every training run: {info['budget']} of batch "
        f"{info['batch_size']} patches of {'x'.join(map(str, info['roi']))}; seeds {info['seeds']}. Device: "
        f"{info['device']} (torch threads: {info['torch_threads']}).",
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


def write_results(results: dict[str, Any], out: Path) -> None:
    """``out``.json (``results``: the shared settings, the commands that made the arms, the rows) and
    ``out``.md (tables), each replaced whole."""
    with atomic_file(out.with_name(out.name + ".json")) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    with atomic_file(out.with_name(out.name + ".md")) as tmp:
        tmp.write_text(markdown(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    networks = [s for s in SETUPS if s.startswith("veloxseg")]
    parser.add_argument("--model", default="veloxseg_small_hr", choices=networks, help="setup (default %(default)s)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="CPU minutes of training per model (thread time)")
    budget.add_argument("--steps", type=int, help="training steps per model (default 100 without --minutes)")
    parser.add_argument("--data", type=Path, nargs="+", default=[None], metavar="DIR",
                        help="nnU-Net v2 raw folder(s) with labelled imagesTs (default: the PET/CT demo data)")  # fmt: skip
    parser.add_argument("--modality-dropout", type=float, default=0.5, help="(a)'s P (default %(default)s)")
    parser.add_argument("--modality-dropout-mode", default="uniform", choices=MODALITY_DROPOUT_MODES,
                        help="how (a)'s groups are dropped, the trainer's flag (default %(default)s)")  # fmt: skip
    parser.add_argument("--modality-dropout-warmup", type=float, default=TrainConfig.modality_dropout_warmup,
                        help="(a)'s share of the budget on every group first, the trainer's flag (default %(default)s)")
    parser.add_argument("--modality-consistency", type=float, default=TrainConfig.modality_consistency,
                        help="(a)'s self-distillation weight, the trainer's flag (default %(default)s)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="arms run (default: all)")
    parser.add_argument("--add", action="store_true", help="join the rows of OUT.json (other arms, same settings)")
    parser.add_argument("--fill", action="store_true", help="join all rows of OUT.json, train only those it lacks")
    parser.add_argument("--seed", type=int, nargs="+", default=[0], dest="seeds", help="seeds (default: 0)")
    parser.add_argument("--out", type=Path, help="output path without suffix (default: results/missing_modality-DATA)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    args = parser.parse_args()
    command = shlex.join(["python", "benchmarks/missing_modality.py", *sys.argv[1:]])
    for data in args.data:
        out = args.out or HERE / "results" / f"missing_modality-{'demo' if data is None else data.name}"
        run_task(
            args.model, data, args.modality_dropout, args.seeds, args.minutes, args.steps, out, command,
            mode=args.modality_dropout_mode, methods=args.methods, add=args.add, fill=args.fill, cpu=args.cpu,
            modality_dropout_warmup=args.modality_dropout_warmup, modality_consistency=args.modality_consistency,
        )  # fmt: skip


if __name__ == "__main__":
    main()
