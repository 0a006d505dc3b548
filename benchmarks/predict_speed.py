"""Seconds per whole scan on CPU: veloxseg_small vs MONAI SegResNet and DynUNet (nnU-Net-like).

    python benchmarks/predict_speed.py                 # a 2 x 400 x 400 x 300 scan, 1 and 2 threads
    python benchmarks/predict_speed.py --quick         # a 2 x 192 x 192 x 144 scan
    python benchmarks/predict_speed.py --size 2 256 256 200 --threads 2

Every network segments the same random scan (already at the model's spacing) with the same
sliding-window settings: the model's 96^3 ROI, gaussian blending, ``--overlap``, ``--sw-batch-size``;
a row's time is MONAI's sliding-window inference plus the argmax. The ``veloxseg_small (predict)``
row is the whole ``veloxseg.predict`` pipeline on the scan as a NIfTI image (normalisation,
inference, softmax, mapping back); ``veloxseg_small (optimized)`` is ``veloxseg.optimize`` of the same
model, compiled for each thread count before its rows (compilation not timed). Each network first
runs one window to warm up; ``--repeats`` keeps the fastest of several runs. Absolute numbers depend
on the machine and its load; the table and JSON go to benchmarks/results/predict_speed.*.
"""

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from baselines import build
from monai.inferers import sliding_window_inference

import veloxseg
from veloxseg.predict import predict

HERE = Path(__file__).resolve().parent
FULL_SIZE = (2, 400, 400, 300)
QUICK_SIZE = (2, 192, 192, 144)
ROI = (96, 96, 96)  # veloxseg_small's; every network uses it
BASELINES = ("SegResNet", "DynUNet")


def windows(size: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """How many ROI windows MONAI's sliding window places over a (X, Y, Z) volume."""
    step = [max(int(r * (1 - overlap)), 1) for r in roi]
    return math.prod(1 if s <= r else math.ceil((s - r) / t) + 1 for s, r, t in zip(size, roi, step))


def timed(run: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process over all threads) of the fastest of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=4, metavar=("C", "X", "Y", "Z"), help=f"default {FULL_SIZE}")
    parser.add_argument("--quick", action="store_true", help=f"a {QUICK_SIZE} scan")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw-batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="time each row this often, keep the fastest")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "predict_speed")
    args = parser.parse_args()
    size = tuple(args.size or (QUICK_SIZE if args.quick else FULL_SIZE))
    channels, spatial = size[0], size[1:]

    torch.manual_seed(0)
    veloxseg_small = veloxseg.create_model("veloxseg_small", group_channels=[1] * channels).eval()
    networks = {"veloxseg_small": veloxseg_small, **{n: build(n, channels, 2, ROI).eval() for n in BASELINES}}
    scan = torch.randn(1, *size)
    image = nib.Nifti1Image(scan[0].permute(1, 2, 3, 0).numpy(), np.eye(4))  # RAS, 1 mm: no resampling
    window = torch.randn(1, channels, *ROI)
    sw = {"roi_size": ROI, "sw_batch_size": args.sw_batch_size, "overlap": args.overlap, "mode": "gaussian"}
    runs = {
        name: lambda net=net: sliding_window_inference(scan, predictor=net, **sw).argmax(1)
        for name, net in networks.items()
    }
    runs["veloxseg_small (predict)"] = lambda: predict(
        veloxseg_small, image, overlap=args.overlap, sw_batch_size=args.sw_batch_size
    )
    rows, load_before = [], os.getloadavg()[0]
    with torch.inference_mode():
        for threads in args.threads:
            torch.set_num_threads(threads)
            optimized = veloxseg.optimize(veloxseg_small, batch_size=args.sw_batch_size)
            runs["veloxseg_small (optimized)"] = lambda net=optimized: sliding_window_inference(
                scan, predictor=net, **sw
            ).argmax(1)
            for network in networks.values():  # warm-up
                network(window)
            for name, run in runs.items():
                wall, cpu = timed(run, args.repeats)
                rows.append({"network": name, "threads": threads, "seconds": wall, "cpu_seconds": cpu})
                print(rows[-1], flush=True)

    params = {name: sum(p.numel() for p in n.parameters()) / 1e6 for name, n in networks.items()}
    for name in ("veloxseg_small", "veloxseg_small (predict)", "veloxseg_small (optimized)"):
        params[name] = veloxseg_small.inference_parameters() / 1e6
    count, full_count = windows(spatial, ROI, args.overlap), windows(FULL_SIZE[1:], ROI, args.overlap)
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}"
    )
    settings = (
        f"scan {' x '.join(map(str, size))} (C x X x Y x Z), ROI {' x '.join(map(str, ROI))}, overlap {args.overlap}, "
        f"gaussian blending, sw_batch_size {args.sw_batch_size}: {count} windows; fastest of {args.repeats} run(s)"
    )
    load_after = os.getloadavg()[0]
    load = f"load average {load_before:.1f} before, {load_after:.1f} after"
    lines = [
        "# Whole-scan inference speed (CPU)",
        "",
        f"Command: `{shlex.join(['python', 'benchmarks/predict_speed.py', *sys.argv[1:]])}`",
        "",
        f"{settings}; {machine}; {load}.",
        "",
        "Wall: MONAI sliding-window inference + argmax (the (predict) rows: the whole `veloxseg.predict` call).",
        "CPU: this process's CPU time, all threads (with 1 thread less affected by other load than wall time;",
        "with 2 it includes OpenMP spin-waiting, which grows when other processes hold the cores).",
        f"Last column: wall time per window x the {full_count} windows of a {' x '.join(map(str, FULL_SIZE))} scan.",
        "",
    ]
    if max(load_before, load_after) > 0.5 * os.cpu_count():
        lines += [
            f"**The machine was shared** ({load} on {os.cpu_count()} CPUs): wall times are inflated, the more so",
            "the more threads a row uses; compare rows of the same thread count.",
            "",
        ]
    lines += [
        "| network | params (M) | threads | wall s | CPU s | s / window | est. s, full scan |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        per_window = r["seconds"] / count
        lines.append(
            f"| {r['network']} | {params[r['network']]:.2f} | {r['threads']} | {r['seconds']:.1f} | "
            f"{r['cpu_seconds']:.1f} | {per_window:.2f} | {per_window * full_count:.0f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    record = {"settings": settings, "machine": machine, "load": load, "windows": count, "params_millions": params}
    args.out.with_suffix(".json").write_text(json.dumps({**record, "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
