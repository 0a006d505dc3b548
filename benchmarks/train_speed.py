"""CPU training speed: seconds per optimizer step and peak memory of VeloxSeg variants.

One training step is a forward pass in training mode (teachers on), the paper's loss
(L_seg + 0.5 L_rc + 2 L_sdkt), backward and an AdamW update, on a batch of random patches;
data loading is not included. Each (model, threads) pair runs in a fresh process so that its
peak resident memory (``ru_maxrss``) is its own.

    python benchmarks/train_speed.py                       # tiny, small, base; 1 and 2 threads; 96^3
    python benchmarks/train_speed.py --models veloxseg_tiny --threads 1 --steps 2
"""

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

import veloxseg
from veloxseg.losses import VeloxSegLoss
from veloxseg.training import scaled_windows
from veloxseg.training.allocator import keep_freed_memory

RESULTS = Path(__file__).parent / "results" / "train_speed.md"


def measure(model_name: str, threads: int, batch_size: int, roi: int, steps: int) -> dict:
    """Time ``steps`` training steps after one warm-up step in this process."""
    torch.set_num_threads(threads)
    keep_freed_memory()  # as the trainer does
    torch.manual_seed(0)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux: torch, MONAI, ...
    default = veloxseg.VeloxSegConfig()  # every variant's windows tile its 96^3 ROI: scale them with the ROI
    windows = scaled_windows(default.big_windows, default.roi_size, (roi,) * 3)
    model = veloxseg.create_model(model_name, roi_size=(roi,) * 3, big_windows=windows).train()
    loss_fn, optimizer = VeloxSegLoss(), torch.optim.AdamW(model.parameters(), lr=2.5e-4, weight_decay=0.01)
    image = torch.randn(batch_size, model.config.in_channels, roi, roi, roi)
    label = (torch.rand(batch_size, 1, roi, roi, roi) > 0.95).float()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = loss_fn(model(image), image, label)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return {
        "model": model_name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": threads,
        "seconds_per_step": sum(times[1:]) / steps,
        "fastest_step": min(times[1:]),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "imports_rss_gib": baseline / 2**20,
    }


def cpu_name() -> str:
    """The CPU's model name (Linux), else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["veloxseg_tiny", "veloxseg_small", "veloxseg_base"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--roi", type=int, default=96, help="cubic patch edge (default %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (default %(default)s)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file written (default %(default)s)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # one measurement, printed as JSON for the parent
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.batch_size, args.roi, args.steps)))
        return

    rows = []
    for model_name in args.models:
        for threads in args.threads:
            command = [sys.executable, __file__, "--child", model_name, str(threads), "--batch-size",
                       str(args.batch_size), "--roi", str(args.roi), "--steps", str(args.steps)]  # fmt: skip
            load = os.getloadavg()[0]
            row = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
            row["load"] = (load + os.getloadavg()[0]) / 2
            print(row, flush=True)
            rows.append(row)

    lines = [
        "# VeloxSeg training speed on CPU",
        "",
        f"`{shlex.join(['python', 'benchmarks/train_speed.py', *sys.argv[1:]])}`",
        "",
        f"Batch {args.batch_size} x {veloxseg.VeloxSegConfig().in_channels} channels x {args.roi}^3, teachers on, "
        f"fp32; forward + loss + backward + AdamW step, no data loading; mean of {args.steps} steps after one "
        "warm-up step. Peak memory: the process's peak resident set; before the model is built (imports only) "
        "it is the last column.",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}. "
        "Other jobs may share the CPUs: the load column is the 1-minute load average around the measurement, and "
        "with more runnable threads than CPUs the 2-thread numbers collapse (spin-waiting OpenMP threads).",
        "",
        "| model | parameters | threads | s / step (mean) | s / step (fastest) | peak memory (GiB) "
        "| imports only (GiB) | load |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['model']} | {r['parameters'] / 1e6:.2f} M | {r['threads']} | {r['seconds_per_step']:.2f} "
        f"| {r['fastest_step']:.2f} | {r['peak_rss_gib']:.2f} | {r['imports_rss_gib']:.2f} | {r['load']:.1f} |"
        for r in rows
    ]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
