"""Forward + backward of the two training kernels alone against the PyTorch ops they replace.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/experiments/speed/kernel_micro.py

``detail_logits`` at veloxseg_small_hr's 2 x 64^3 shapes (x 2 x 8 x 32^3, 3 classes) and ``gelu_instance_norm``
at the shapes the network applies it to; one thread, process CPU time, the median of the repeats of the
third of three alternating rounds (seed 0).
"""

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from veloxseg.layers.cpu_kernels import load_cpu_kernels
from veloxseg.layers.detail import detail_logits
from veloxseg.layers.norm import gelu_instance_norm, instance_norm
from veloxseg.layers.pixel_shuffle import pixel_shuffle_3d


def cpu_us(run: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return 1e6 * statistics.median(times)


def compare(label: str, reference: Callable, kernel: Callable, inputs: list[torch.Tensor], repeats: int) -> None:
    """Print the median CPU microseconds of forward + backward of both functions on ``inputs``."""
    out = reference(*inputs)
    grad = torch.randn_like(out)
    results = {}
    for _ in range(3):
        for name, function in (("PyTorch ops", reference), ("kernel", kernel)):
            results[name] = cpu_us(lambda f=function: torch.autograd.grad(f(*inputs), inputs, grad), repeats)
    print(f"| {label} | {results['PyTorch ops']:.0f} | {results['kernel']:.0f} |")


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    load_cpu_kernels()
    print("| forward + backward | PyTorch ops (us) | kernel (us) |\n| --- | ---: | ---: |")
    x, coarse = torch.randn(2, 8, 32, 32, 32), torch.randn(2, 3, 32, 32, 32)
    weight, bias = torch.randn(24, 8, 1, 1, 1), torch.randn(24)
    inputs = [t.requires_grad_() for t in (x, weight, bias, coarse)]

    def shuffle(x, weight, bias, coarse):
        return pixel_shuffle_3d(F.conv3d(x, weight, bias) + coarse.repeat_interleave(8, 1), 2)

    compare("detail_logits, 2 x 8 x 32^3 -> 2 x 3 x 64^3", shuffle, detail_logits, inputs, 15)
    for shape in [(2, 8, 32, 32, 32), (2, 16, 16, 16, 16), (2, 32, 8, 8, 8), (2, 64, 4, 4, 4), (2, 128, 2, 2, 2)]:
        x = torch.randn(shape, requires_grad=True)
        repeats = 30 if shape[2] >= 16 else 200
        compare(f"gelu_instance_norm, {' x '.join(map(str, shape))}", lambda t: F.gelu(instance_norm(t)),
                gelu_instance_norm, [x], repeats)  # fmt: skip


if __name__ == "__main__":
    main()
