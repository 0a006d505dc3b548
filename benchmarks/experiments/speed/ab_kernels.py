"""Same-process A/B of the training step with and without the training kernels of the layers.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/experiments/speed/ab_kernels.py 10

``veloxseg_small_hr``'s default-recipe step (``benchmarks/step_ratio.py``'s setup) three times: with every
kernel (the default), with the paired-window attention (``veloxseg.layers.pwa``) on its PyTorch ops, and with
the attention, ``veloxseg.layers.detail.detail_logits`` and ``veloxseg.layers.norm.gelu_instance_norm`` all on
theirs (the kernels reported missing to those modules; the fused loss keeps its kernel), and MONAI UNet;
interleaved (``rounds`` rounds of 2 steps each), process CPU time, one thread, the trainer's allocator settings.
"""

import statistics
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, "benchmarks")
import step_ratio  # noqa: E402
import veloxseg.layers.detail as detail  # noqa: E402
import veloxseg.layers.norm as norm  # noqa: E402
import veloxseg.layers.pwa as pwa  # noqa: E402
from veloxseg.training.allocator import keep_freed_memory  # noqa: E402


def without_kernels(step: Callable[[], None], modules: list) -> Callable[[], None]:
    """``step`` with ``cpu_kernels_available`` answering False in ``modules``."""

    def run() -> None:
        saved = [module.cpu_kernels_available for module in modules]
        for module in modules:
            module.cpu_kernels_available = lambda: False
        try:
            step()
        finally:
            for module, function in zip(modules, saved):
                module.cpu_kernels_available = function

    return run


torch.set_num_threads(1)
keep_freed_memory()
setups = [
    step_ratio.StepSetup("all kernels", step_ratio.build_setup("veloxseg_small_hr").step),
    step_ratio.StepSetup("pwa off", without_kernels(step_ratio.build_setup("veloxseg_small_hr").step, [pwa])),
    step_ratio.StepSetup(
        "all off", without_kernels(step_ratio.build_setup("veloxseg_small_hr").step, [pwa, detail, norm])
    ),
    step_ratio.StepSetup("UNet", step_ratio.build_setup("UNet").step),
]
times = step_ratio.interleaved_step_times(setups, int(sys.argv[1]), 2)
reference = statistics.median(times["UNet"])
print("| step | median CPU s / step | min | ratio to UNet (medians) |\n| --- | ---: | ---: | ---: |")
for name, values in times.items():
    median = statistics.median(values)
    print(f"| {name} | {median:.4f} | {min(values):.4f} | {median / reference:.3f} |")
