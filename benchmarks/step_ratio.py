"""CPU time of a training step, networks interleaved in one process: the fair way to compare step costs.

    python benchmarks/step_ratio.py                               # veloxseg_small_hr against UNet
    python benchmarks/step_ratio.py --models veloxseg_small_hr veloxseg_small UNet --rounds 15

Every network takes the trainer's default-recipe step (``train_step``: forward, L_seg, backward,
gradient clipping to norm 1, fused AdamW, schedule) on the same random 2 x 1 x 64^3 patches with 3
classes, one thread, as ``benchmarks/accuracy.py`` trains it. Steps alternate between the networks
(round-robin, ``--rounds`` rounds of ``--per-round`` steps each, after one warm-up round), timed by the
process's CPU time (``time.process_time``), so a busy neighbour moves every network's numbers alike;
the table gives each network's median step and its ratio to the last network named.

``--variants`` also times every network with the training fast paths off (``-reference``: the loss
from MONAI's ``DiceCELoss``, the reference autograd graphs), interleaved with the default: a same-process A/B.
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from accuracy import MonaiNet
from baselines import build as build_baseline
from veloxseg.losses import VeloxSegLoss
from veloxseg.registry import create_model
from veloxseg.training import TrainConfig, build_optimizer, build_scheduler, resolve, train_step
from veloxseg.training.allocator import keep_freed_memory
from veloxseg.training.build import roi_overrides
from veloxseg.training.recipe import RECIPES

ROI, BATCH, CLASSES = (64, 64, 64), 2, 3
SETUPS = ("veloxseg_small_hr", "veloxseg_small", "veloxseg_tiny", "UNet")


@dataclass
class StepSetup:
    """A network with the loss, optimiser and schedule of the default recipe, and one fixed batch."""

    name: str
    step: Callable[[], None]


def build_setup(name: str, fast: bool = True, seed: int = 0) -> StepSetup:
    """The default recipe's training step of network ``name`` on a fixed random batch; ``fast`` False:
    the training fast paths off (the reference loss)."""
    torch.manual_seed(seed)
    network = name if name.startswith("veloxseg") else "veloxseg_small_hr"
    config = resolve(TrainConfig(model=network, roi=ROI, batch_size=BATCH, max_steps=10**6))
    if name.startswith("veloxseg"):
        overrides = RECIPES["default"].model_overrides(teachers=False) | roi_overrides(config)
        model = create_model(name, group_channels=[1], n_classes=CLASSES, **overrides)
        model.decoder.init_head(config.head_init_scale, torch.full((CLASSES,), 1 / CLASSES))
    else:
        model = MonaiNet(build_baseline(name, 1, CLASSES, ROI), ROI, 1, CLASSES)
    model.train()
    loss_fn = VeloxSegLoss(*RECIPES["default"].loss_weights["segment"], fused=fast)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, config.max_steps)
    accelerator = Accelerator(cpu=True)
    batch = {"image": torch.randn(BATCH, 1, *ROI), "label": torch.randint(0, CLASSES, (BATCH, 1, *ROI))}

    def step() -> None:
        train_step(model, batch, loss_fn, optimizer, scheduler, accelerator, max_grad_norm=config.max_grad_norm)

    return StepSetup(name if fast else f"{name}-reference", step)


def interleaved_step_times(setups: list[StepSetup], rounds: int, per_round: int) -> dict[str, list[float]]:
    """CPU seconds of each step per setup, setups taking turns (``per_round`` steps each) for ``rounds`` rounds
    after one untimed round."""
    times: dict[str, list[float]] = {s.name: [] for s in setups}
    for r in range(rounds + 1):
        for setup in setups:
            for _ in range(per_round):
                start = time.process_time()
                setup.step()
                if r:
                    times[setup.name].append(time.process_time() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["veloxseg_small_hr", "UNet"], choices=SETUPS,
                        help="the last one is the reference of the ratio column")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (default: %(default)s)")
    parser.add_argument("--per-round", type=int, default=2, help="steps per network per round (default: %(default)s)")
    parser.add_argument("--variants", action="store_true", help="also every network with the fast paths off")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's allocator settings as they are (default: the trainer's)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.default_allocator:
        keep_freed_memory()
    setups = [build_setup(name) for name in args.models]
    if args.variants:
        setups += [build_setup(name, fast=False) for name in args.models]
    times = interleaved_step_times(setups, args.rounds, args.per_round)
    reference = statistics.median(times[args.models[-1]])
    print(f"`python benchmarks/step_ratio.py {' '.join(sys.argv[1:])}`\n")
    print(f"| network | median CPU s / step | min | ratio to {args.models[-1]} (medians) |")
    print("| --- | ---: | ---: | ---: |")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.4f} | {min(values):.4f} | {median / reference:.3f} |")


if __name__ == "__main__":
    main()
