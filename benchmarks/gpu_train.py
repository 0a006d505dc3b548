"""GPU training throughput: the trainer on the synthetic demo data, in bf16, and what it reaches.

Runs ``veloxseg.training.train`` (segment stage: deep supervision, teachers, SDKT) on one CUDA GPU
for a few hundred steps, then writes steps per second (training only: validation and checkpoints
excluded), peak GPU memory and the final validation Dice to a markdown file. Needs nothing but a
CUDA GPU and this package; the demo dataset is generated into the output folder (about 10 s).

    python benchmarks/gpu_train.py                          # veloxseg_small, 300 steps, 96^3, bf16
    python benchmarks/gpu_train.py --results $OUT/train_speed.gpu.md
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from veloxseg.training import TrainConfig, train

RESULTS = Path(__file__).parent / "results" / "train_speed.gpu.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="veloxseg_small")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--roi", type=int, default=96, help="cubic patch edge (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="bf16")
    parser.add_argument("--num-workers", type=int, default=8)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/gpu_train"))
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file written (default %(default)s)")
    parser.add_argument("--cpu", action="store_true", help="smoke-test the script on the CPU (numbers meaningless)")
    args = parser.parse_args()
    if not (args.cpu or torch.cuda.is_available()):
        sys.exit("no CUDA GPU found (use --cpu for a smoke test)")

    start = time.perf_counter()
    result = train(
        TrainConfig(
            output_dir=str(args.output_dir), model=args.model, roi=args.roi, max_steps=args.max_steps,
            batch_size=args.batch_size, mixed_precision=args.mixed_precision, num_workers=args.num_workers,
            cpu=args.cpu, val_every=100, checkpoint_every=args.max_steps, log_every=10, progress=False,
        )
    )  # fmt: skip
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (args.output_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/patches_per_s"] for r in records if "train/patches_per_s" in r][1:]  # first: warm-up
    steps_per_s = sum(rates) / len(rates) / args.batch_size
    device = "CPU" if args.cpu else torch.cuda.get_device_name()
    peak = torch.cuda.max_memory_allocated() / 2**30 if not args.cpu else float("nan")

    lines = [
        "# VeloxSeg training speed on GPU",
        "",
        f"`{shlex.join(['python', 'benchmarks/gpu_train.py', *sys.argv[1:]])}` on {device}, torch {torch.__version__}.",
        "",
        f"{args.model}, segment stage (deep supervision, teachers, SDKT), batch {args.batch_size} x {args.roi}^3, "
        f"{args.mixed_precision}, {args.max_steps} steps on the synthetic demo data, {args.num_workers} data workers.",
        "",
        "| steps / s (training) | patches / s | peak GPU memory (GiB) | wall time (s) | final val Dice |",
        "| ---: | ---: | ---: | ---: | ---: |",
        f"| {steps_per_s:.2f} | {steps_per_s * args.batch_size:.1f} | {peak:.2f} | {wall:.0f} "
        f"| {result.metrics.get('val/dice', float('nan')):.3f} |",
    ]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
