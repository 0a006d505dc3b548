"""Where a training step's CPU time goes: a per-operator profile of the default recipe's step.

    python benchmarks/step_profile.py                                   # veloxseg_small_hr and UNet
    python benchmarks/step_profile.py --models veloxseg_small --steps 5 --out results/step-profile-small.md

Each network takes the trainer's default-recipe step (``train_step``: forward, L_seg, backward, gradient
clipping, fused AdamW, schedule) on random 2 x 1 x 64^3 patches with 3 classes, on one thread, as
``benchmarks/accuracy.py`` trains it. After ``--warmup`` steps, ``--steps`` steps run under
``torch.profiler``; the table lists each operator's self time per step (time inside the op, not in the
ops it calls), summed over forward and backward, as a share of the profiled step. The profiler's "self
CPU" time is the wall clock of the op on its thread: on a machine shared with other jobs every op takes
longer by the same factor (the load average is printed), so read the shares, and compare step costs with
``benchmarks/step_ratio.py`` (process CPU time). Profiling also adds overhead per op (about 10 us), so a
network with many small ops looks a little slower here than it is. Like the trainer it keeps
glibc's freed memory (:func:`veloxseg.training.allocator.keep_freed_memory`; ``--default-allocator``: not),
and ``--reference`` turns the training fast paths off (MONAI's ``DiceCELoss``).
"""

import argparse
import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from step_ratio import SETUPS, StepSetup, build_setup
from veloxseg.training.allocator import keep_freed_memory

HERE = Path(__file__).resolve().parent


def profile_steps(setup: StepSetup, warmup: int, steps: int) -> list[tuple[str, int, float]]:
    """(operator, calls per step, self CPU ms per step), slowest first, over ``steps`` profiled steps."""
    for _ in range(warmup):
        setup.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            setup.step()
    rows = [(e.key, e.count // steps, e.self_cpu_time_total / 1e3 / steps) for e in prof.key_averages()]
    return sorted(rows, key=lambda row: -row[2])


def markdown(name: str, rows: list[tuple[str, int, float]], top: int) -> str:
    total = sum(ms for _, _, ms in rows)
    calls = sum(n for _, n, _ in rows)
    lines = [
        f"### {name}: {total:.0f} ms of self time per profiled step, {calls} op calls",
        "",
        "| operator | calls / step | self ms / step | share |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| `{op}` | {n} | {ms:.1f} | {100 * ms / total:.1f} % |" for op, n, ms in rows[:top]]
    rest = rows[top:]
    lines.append(f"| {len(rest)} other operators | {sum(n for _, n, _ in rest)} | {sum(ms for _, _, ms in rest):.1f} | "
                 f"{100 * sum(ms for _, _, ms in rest) / total:.1f} % |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["veloxseg_small_hr", "UNet"], choices=list(SETUPS))
    parser.add_argument("--warmup", type=int, default=3, help="unprofiled steps first (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (default: %(default)s)")
    parser.add_argument("--top", type=int, default=25, help="operators listed per network (default: %(default)s)")
    parser.add_argument("--reference", action="store_true", help="the training fast paths off")
    parser.add_argument("--default-allocator", action="store_true", help="leave glibc's allocator settings as they are")
    parser.add_argument("--out", type=Path, help="write the tables to this markdown file (default: print)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.default_allocator:
        keep_freed_memory()
    setups = [build_setup(name, fast=not args.reference) for name in args.models]
    tables = [markdown(setup.name, profile_steps(setup, args.warmup, args.steps), args.top) for setup in setups]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = f"Load average (1, 5, 15 min) at the end: {load} on {os.cpu_count()} CPUs.\n\n" + "\n\n".join(tables) + "\n"
    if args.out:
        args.out.write_text(f"`python {Path(sys.argv[0]).as_posix()} {' '.join(sys.argv[1:])}`\n\n{text}")
    print(text)


if __name__ == "__main__":
    main()
