"""Memory that activation checkpointing (``model.set_grad_checkpointing()``) saves on a training step.

    python benchmarks/grad_checkpointing.py --out benchmarks/results/grad_checkpointing
    python benchmarks/grad_checkpointing.py --models veloxseg_small --roi 96 --batch-size 2

One default-recipe training step (the model as the trainer builds it for that recipe: no teachers, the
full-resolution head only; forward, a Dice + cross-entropy loss on random labels, backward) on a
(batch, 2, roi, roi, roi) patch, with and without checkpointing. Every cell runs in a fresh subprocess
(speed.py's worker pattern), so the peak RSS (VmHWM, counted from just before the first step) is
that step's own. Also the step's CPU time, since checkpointing recomputes each block's forward.
"""

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from speed import answered_job, current_rss_mb, peak_rss_mb, reset_peak_rss, run_job

from veloxseg.io import atomic_file

HERE = Path(__file__).resolve().parent


def worker(job: dict) -> dict:
    """Runs in the subprocess: the first step's peak memory, the second step's CPU time."""
    import veloxseg
    from veloxseg.losses import dice_ce_loss
    from veloxseg.training import TrainConfig
    from veloxseg.training.build import roi_overrides
    from veloxseg.training.recipe import RECIPES

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    roi = job["roi"]
    overrides = {**RECIPES["default"].model_overrides(teachers=False), **roi_overrides(TrainConfig(model=job["model"], roi=[roi] * 3))}
    model = veloxseg.create_model(job["model"], group_channels=(1, 1), n_classes=2, **overrides)
    model.set_grad_checkpointing(job["checkpointing"])
    model.train()
    x = torch.randn(job["batch_size"], 2, roi, roi, roi)
    labels = torch.randint(0, 2, (job["batch_size"], 1, roi, roi, roi))

    def step() -> None:
        loss = dice_ce_loss(model(x).logits[0], labels)
        loss.backward()
        model.zero_grad(set_to_none=True)

    rss_before = current_rss_mb()  # the first step: memory the allocator has not held before
    reset_peak_rss()
    step()
    peak_mb = peak_rss_mb() - rss_before
    cpu_start = time.process_time()  # the second: CPU time once one-off buffers exist
    step()
    return {"peak_mb": peak_mb, "cpu_s": time.process_time() - cpu_start}


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        "# Activation checkpointing: memory of one training step",
        "",
        f"```\n{command}\n```",
        "",
        f"Default-recipe step (no teachers, full-resolution head, Dice + CE), one torch thread, CPU "
        f"({platform.processor() or platform.machine()}). Peak RSS over the step, from just before it.",
        "",
        "| model | patch | checkpointing | peak MB | CPU s | memory vs off | CPU vs off |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        off = next(r for r in rows if r["model"] == row["model"] and not r["checkpointing"])
        patch = f"{row['batch_size']} x 2 x {row['roi']}^3"
        lines.append(
            f"| `{row['model']}` | {patch} | {'on' if row['checkpointing'] else 'off'} | {row['peak_mb']:.0f} | "
            f"{row['cpu_s']:.1f} | {row['peak_mb'] / off['peak_mb']:.2f}x | {row['cpu_s'] / off['cpu_s']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["veloxseg_small", "veloxseg_small_hr"])
    parser.add_argument("--roi", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if answered_job(args, worker):
        return
    rows = []
    for model in args.models:
        for checkpointing in (False, True):
            job = {"model": model, "roi": args.roi, "batch_size": args.batch_size, "checkpointing": checkpointing}
            job["threads"] = 1
            rows.append({**job, **run_job(job, script=__file__)})
            print(json.dumps(rows[-1]), flush=True)
    text = markdown(rows, shlex.join(["python", "benchmarks/grad_checkpointing.py", *sys.argv[1:]]))
    print(text)
    if args.out:
        with atomic_file(args.out.with_name(args.out.name + ".md")) as tmp:
            tmp.write_text(text)
        with atomic_file(args.out.with_name(args.out.name + ".json")) as tmp:
            tmp.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
