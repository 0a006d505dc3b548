"""Fine-tuning from each published tag of a variant against training from scratch, on tasks the tag was not trained on.

    python benchmarks/finetune.py --data DIR [DIR ...] [--variant veloxseg_small] [--steps 150] [--seed 0 1]

For every task (an nnU-Net folder with imagesTs/labelsTs) and start, the trainer itself runs, the same
command apart from the start (``examples/train.py`` with these settings):

* scratch: ``--model VARIANT --max-steps N`` (the default recipe, the stage ``segment``);
* each tag: ``--model VARIANT.TAG --stage finetune --max-steps N`` (its weights, adapted to the task's
  channels and classes: :mod:`veloxseg.adapt`).

Everything else is the trainer's default (the ROI is the start's own, as for a user), except that
validation and checkpoints wait for the end. The saved model then segments each whole test volume
(sliding window) and is scored by the trainer's ``validate``: Dice per class and its mean. A tag on a
task it was trained on (recorded in :data:`TRAINED_ON`) is skipped: the table is about transfer.
Results: ``OUT.json`` and ``OUT.md`` (default ``benchmarks/results/finetune``), written after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import veloxseg
from veloxseg.data.datasets import read_dataset, validate_dataset
from veloxseg.io import atomic_file
from veloxseg.training import TrainConfig, train
from veloxseg.training.validate import score_test_cases

# The dataset.json name of the task each tag was trained on; those pairs are not transfer and are skipped.
TRAINED_ON = {
    "petct_lesions": "VeloxSegSyntheticPETCT",
    "petct_lesions_anymod": "VeloxSegSyntheticPETCT",
    "mni152_tissue": "MNI152BrainTissue",
}


def task_name(data: Path) -> str:
    """The task's ``name`` in its dataset.json (else the folder's name)."""
    return json.loads((data / "dataset.json").read_text()).get("name") or data.name


def starts(variant: str) -> list[str]:
    """"scratch" and the variant's published tags (default first)."""
    return ["scratch", *(name.split(".", 1)[1] for name in veloxseg.list_models(f"{variant}.*", pretrained=True))]


def trainer_config(variant: str, start: str, data: Path, steps: int, seed: int, output_dir: Path) -> TrainConfig:
    """The training run of ``start`` ("scratch" or a tag of ``variant``) on ``data``."""
    tagged = start != "scratch"
    return TrainConfig(
        model=f"{variant}.{start}" if tagged else variant,
        stage="finetune" if tagged else "segment",
        data=str(data),
        max_steps=steps,
        seed=seed,
        output_dir=str(output_dir),
        val_every=steps,
        checkpoint_every=steps,
        progress=False,
    )


def command_of(config: TrainConfig) -> str:
    """The examples/train.py command line of a :func:`trainer_config` run (its output folder left out)."""
    flags = ["--model", config.model, "--data", config.data, "--max-steps", str(config.max_steps)]
    flags += ["--seed", str(config.seed)] + (["--stage", "finetune"] if config.stage == "finetune" else [])
    return "accelerate launch examples/train.py " + shlex.join(flags)


def test_dice(folder: Path, data: Path) -> dict[str, Any]:
    """Dice (per class and mean) of the model saved in ``folder`` on the whole test volumes of ``data``."""
    metrics = score_test_cases(veloxseg.create_model(f"local-dir:{folder}").eval(), read_dataset(data))
    dice = {name.removeprefix("test/dice_"): v for name, v in metrics.items() if name.startswith("test/dice_")}
    return {"dice_mean": metrics["test/dice"], "dice": dice}


def run(variant: str, start: str, data: Path, steps: int, seed: int) -> dict[str, Any]:
    """Train ``start`` on ``data`` for ``steps`` steps and score it on the test cases; one table row."""
    with tempfile.TemporaryDirectory() as tmp:
        config = trainer_config(variant, start, data, steps, seed, Path(tmp) / "run")
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        train(config)
        train_cpu_s, train_s = time.process_time() - cpu_start, time.perf_counter() - wall_start
        scores = test_dice(Path(config.output_dir), data)
    return {
        "task": task_name(data), "start": start, "seed": seed, "steps": steps, **scores,
        "train_cpu_min": train_cpu_s / 60, "train_min": train_s / 60, "command": command_of(config),
    }  # fmt: skip


def markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """The results as a markdown table: mean test Dice per task and start (min-max over seeds), and the
    gain over scratch."""
    lines = [
        f"# Fine-tuning {info['variant']}'s tags against training from scratch ({info['steps']} steps)",
        "",
        (
            f"Command: `{info['command']}`. Device: {info['device']}, {info['torch_threads']} torch thread(s). "
            f"Test Dice on whole imagesTs volumes, mean over seeds {info['seeds']} (min-max)."
        ),
        "",
        "| task | start | test Dice | vs scratch | train CPU min |",
        "| --- | --- | --- | --- | --- |",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        scratch = [r["dice_mean"] for r in rows if r["task"] == task and r["start"] == "scratch"]
        for start in dict.fromkeys(r["start"] for r in rows if r["task"] == task):
            runs = [r for r in rows if r["task"] == task and r["start"] == start]
            dice = [r["dice_mean"] for r in runs]
            gain = f"{statistics.mean(dice) - statistics.mean(scratch):+.3f}" if scratch and start != "scratch" else ""
            cpu = statistics.mean(r["train_cpu_min"] for r in runs)
            spread = f" ({min(dice):.3f}-{max(dice):.3f})" if len(dice) > 1 else ""
            lines.append(f"| {task} | {start} | {statistics.mean(dice):.3f}{spread} | {gain} | {cpu:.1f} |")
    lines += ["", "Runs (each command also took `--output-dir`):", ""]
    lines += [f"- {r['task']}, {r['start']}, seed {r['seed']}: `{r['command']}`" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict[str, Any]], info: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({"run": info, "rows": rows}, indent=2) + "\n")
    with atomic_file(out.with_suffix(".md")) as tmp:
        tmp.write_text(markdown(rows, info))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="nnU-Net folders with imagesTs/labelsTs")
    parser.add_argument("--variant", default="veloxseg_small")
    parser.add_argument("--starts", nargs="+", help="scratch and/or tags (default: scratch and every published tag)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "finetune")
    args = parser.parse_args(argv)
    for data in args.data:
        spec = read_dataset(data)
        validate_dataset(spec)
        if not spec.test or any(case.label is None for case in spec.test):
            parser.error(f"{data}: needs test cases with labels (imagesTs and labelsTs)")
    names = args.starts or starts(args.variant)
    info = {
        "variant": args.variant, "steps": args.steps, "seeds": args.seed, "starts": names,
        "data": [str(d) for d in args.data], "device": f"CPU, {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(), "command": shlex.join(["python", *sys.argv]),
    }  # fmt: skip
    rows: list[dict[str, Any]] = []
    for data in args.data:
        task = task_name(data)
        for seed in args.seed:
            for start in names:
                if TRAINED_ON.get(start) == task:
                    continue
                rows.append(run(args.variant, start, data, args.steps, seed))
                print(f"{task} {start} seed {seed}: test Dice {rows[-1]['dice_mean']:.3f}", flush=True)
                write_results(rows, info, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
