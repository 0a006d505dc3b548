"""Where a default-recipe step's CPU time goes, by phase and by how it scales with the patch.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/experiments/speed/step_anatomy.py

For ``veloxseg_small_hr`` and MONAI UNet (``benchmarks/step_ratio.py``'s setup, one thread, the trainer's
allocator settings, process CPU time, median of 8 steps after 2): (1) the step's phases as
``train_step`` runs them (forward, loss, backward, clipping to norm 1, AdamW, zero_grad) at 2 x 64^3;
(2) the whole step at 2 x 64 x 32 x 32 and 2 x 64^3, and the fixed and per-voxel parts of a line
through the two (t = fixed + voxels * per_voxel).
"""

import statistics
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
import step_ratio  # noqa: E402
from accuracy import MonaiNet  # noqa: E402
from baselines import build as build_baseline  # noqa: E402
from veloxseg.losses import VeloxSegLoss  # noqa: E402
from veloxseg.registry import create_model  # noqa: E402
from veloxseg.training import TrainConfig, build_optimizer, resolve  # noqa: E402
from veloxseg.training.allocator import keep_freed_memory  # noqa: E402
from veloxseg.training.build import roi_overrides  # noqa: E402
from veloxseg.training.recipe import RECIPES  # noqa: E402

PHASES = ("forward", "loss", "backward", "clip", "adamw", "zero_grad")


def median_ms(values: list[float]) -> float:
    return round(1e3 * statistics.median(values), 1)


def phases(name: str, roi: tuple[int, int, int]) -> dict[str, float]:
    """Median CPU ms of each phase of the default-recipe step of ``name`` on 2 x 1 x ``roi`` patches."""
    torch.manual_seed(0)
    config = resolve(TrainConfig(model="veloxseg_small_hr", roi=roi, batch_size=2, max_steps=10**6))
    if name.startswith("veloxseg"):
        overrides = RECIPES["default"].model_overrides(teachers=False) | roi_overrides(config)
        model = create_model(name, in_ch=[1], n_classes=3, **overrides)
    else:
        model = MonaiNet(build_baseline(name, 1, 3, roi), roi, 1, 3)
    model.train()
    loss_fn, optimizer = VeloxSegLoss(*RECIPES["default"].loss_weights["segment"]), build_optimizer(model, config)
    image, label = torch.randn(2, 1, *roi), torch.randint(0, 3, (2, 1, *roi))
    times: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for i in range(10):
        marks = [time.process_time()]
        out = model(image)
        marks.append(time.process_time())
        loss = loss_fn(out, image, label)["loss"]
        marks.append(time.process_time())
        loss.backward()
        marks.append(time.process_time())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        marks.append(time.process_time())
        optimizer.step()
        marks.append(time.process_time())
        optimizer.zero_grad()
        marks.append(time.process_time())
        if i >= 2:
            for phase, start, end in zip(PHASES, marks, marks[1:]):
                times[phase].append(end - start)
    return {phase: median_ms(values) for phase, values in times.items()}


def main() -> None:
    torch.set_num_threads(1)
    keep_freed_memory()
    print("| network | patch | " + " | ".join(PHASES) + " | step |\n|" + " --- |" * (len(PHASES) + 3))
    for name in ("veloxseg_small_hr", "UNet"):
        steps = {}
        for roi in ((64, 32, 32), (64, 64, 64)):
            ms = phases(name, roi)
            steps[roi] = sum(ms.values())
            row = " | ".join(str(ms[phase]) for phase in PHASES)
            print(f"| {name} | {'x'.join(map(str, roi))} | {row} | {steps[roi]:.1f} |")
        per_quarter = (steps[(64, 64, 64)] - steps[(64, 32, 32)]) / 3  # 64^3 holds four 64x32x32 volumes
        print(f"| {name} | fixed part {steps[(64, 32, 32)] - per_quarter:.1f} ms, per 64^3 {4 * per_quarter:.1f} ms |")


if __name__ == "__main__":
    main()
