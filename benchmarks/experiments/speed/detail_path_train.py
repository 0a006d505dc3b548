"""The detail path of veloxseg_small_hr while training: per-operator profile, and same-process A/Bs of its
channels-last training path against the path as it was (PyTorch ops around oneDNN convs, as at f7b4674).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/experiments/speed/detail_path_train.py profile
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/experiments/speed/detail_path_train.py profile-before
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/experiments/speed/detail_path_train.py profile-step
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/experiments/speed/detail_path_train.py ab 20
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/experiments/speed/detail_path_train.py step 10

The path alone: forward and backward of ``stem(x)`` and ``DetailPath.forward(stem, u1, coarse)`` at the
default recipe's shapes (batch 2 x 1 x 64^3: u_1 2 x 16 x 16^3, half-resolution logits 2 x 3 x 32^3), random
weights (the output conv too, which the network starts at zero), gradients into the weights, u_1 and the
coarse logits. ``profile``: torch.profiler's self time per operator and input shape per pass, 10 passes
after 3 warm-ups (``profile-before``: the path as it was; ``profile-step`` / ``profile-step-before``: the
whole default-recipe step of ``benchmarks/step_ratio.py``, where the detail path's ops are those at its
shapes, e.g. 2 x 8 x 32^3). ``ab``: process CPU time per pass, both paths
interleaved, ``rounds`` rounds of 5 passes. ``step``: ``benchmarks/step_ratio.py``'s default-recipe step of
veloxseg_small_hr with either path, and MONAI UNet, interleaved, ``rounds`` rounds of 2 steps. One thread,
the trainer's allocator settings.
"""

import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

import veloxseg.layers.norm as norm
from veloxseg.layers.conv import OneDNNConv3d
from veloxseg.layers.detail import DetailPath, DetailStem, detail_logits
from veloxseg.layers.norm import gelu_instance_norm
from veloxseg.training.allocator import keep_freed_memory

sys.path.insert(0, "benchmarks")
import step_ratio  # noqa: E402


def forward_before(self: DetailPath, stem: torch.Tensor, u1: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """``DetailPath.forward`` as at f7b4674 (its norms on the channels-first kernel; the stem on oneDNN)."""
    x = gelu_instance_norm(self.mix(torch.cat([stem, self.up(u1)], 1)))
    x = gelu_instance_norm(self.spatial(x))
    return detail_logits(x, self.out.weight, self.out.bias, coarse)


def before(run: Callable[[], None]) -> Callable[[], None]:
    """``run`` with the detail path as it was."""

    def switched() -> None:
        saved = DetailPath.forward, DetailStem.forward, norm._NormGeluChannelsLast
        DetailPath.forward, DetailStem.forward, norm._NormGeluChannelsLast = (
            forward_before, OneDNNConv3d.forward, norm._NormGelu
        )
        try:
            run()
        finally:
            DetailPath.forward, DetailStem.forward, norm._NormGeluChannelsLast = saved

    return switched


def path_pass(seed: int = 0) -> Callable[[], None]:
    """One forward + backward pass of the path alone on fixed random inputs."""
    torch.manual_seed(seed)
    path = DetailPath(1, 16, 8, 3).train()
    x = torch.randn(2, 1, 64, 64, 64)
    u1 = torch.randn(2, 16, 16, 16, 16, requires_grad=True)
    coarse = torch.randn(2, 3, 32, 32, 32, requires_grad=True)
    grad = torch.randn(2, 3, 64, 64, 64)

    def run() -> None:
        path.zero_grad(set_to_none=True)
        path(path.stem(x), u1, coarse).backward(grad)

    return run


def profile_table(run: Callable[[], None], passes: int = 10, rows_shown: int = 25) -> None:
    for _ in range(3):
        run()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(passes):
            run()
    rows = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows) / 1e3 / passes
    print(f"{total:.1f} ms of self time per pass\n")
    print("| operator | input shapes | calls / pass | self ms / pass |\n| --- | --- | ---: | ---: |")
    for e in rows[:rows_shown]:
        shapes = str([s for s in e.input_shapes if s])[:70]
        print(f"| `{e.key}` | {shapes} | {e.count / passes:g} | {e.self_cpu_time_total / 1e3 / passes:.2f} |")


def interleaved(runs: dict[str, Callable[[], None]], rounds: int, per_round: int, reference: str) -> None:
    times = step_ratio.interleaved_step_times(
        [step_ratio.StepSetup(name, run) for name, run in runs.items()], rounds, per_round
    )
    base = statistics.median(times[reference])
    print(f"| {sys.argv[1]} | median CPU ms | min | ratio to {reference} (medians) |\n| --- | ---: | ---: | ---: |")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {1e3 * median:.2f} | {1e3 * min(values):.2f} | {median / base:.3f} |")


def main() -> None:
    torch.set_num_threads(1)
    keep_freed_memory()
    mode = sys.argv[1]
    if mode == "profile":
        profile_table(path_pass())
    elif mode == "profile-before":
        profile_table(before(path_pass()))
    elif mode == "profile-step":
        profile_table(step_ratio.build_setup("veloxseg_small_hr").step, 5, 40)
    elif mode == "profile-step-before":
        profile_table(before(step_ratio.build_setup("veloxseg_small_hr").step), 5, 40)
    elif mode == "ab":
        interleaved({"channels-last path": path_pass(), "path before": before(path_pass())},
                    int(sys.argv[2]), 5, "path before")  # fmt: skip
    else:
        runs = {
            "veloxseg_small_hr": step_ratio.build_setup("veloxseg_small_hr").step,
            "veloxseg_small_hr, detail path before": before(step_ratio.build_setup("veloxseg_small_hr").step),
            "UNet": step_ratio.build_setup("UNet").step,
        }
        interleaved(runs, int(sys.argv[2]), 2, "UNet")


if __name__ == "__main__":
    main()
