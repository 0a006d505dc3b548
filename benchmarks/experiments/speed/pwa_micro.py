"""Forward + backward of one paired-window attention layer per level of ``veloxseg_small_hr`` at 2 x 64^3, on
the training kernel (``csrc/pwa_train.cpp``) and on the PyTorch ops, interleaved, process CPU time.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/experiments/speed/pwa_micro.py
"""

import statistics
import time

import torch

import veloxseg.layers.pwa as pwa
from veloxseg.layers import PairedWindowAttention, window_scales

# (channels, token grid, smallest window, heads, q/k head width) of the four levels
LEVELS = [(16, (16, 16, 16), (2, 2, 2), 1, 4), (32, (8, 8, 8), (4, 4, 4), 2, 8), (64, (4, 4, 4), (2, 2, 2), 2, 8),
          (128, (2, 2, 2), (2, 2, 2), 4, 16)]  # fmt: skip


def step_us(layer: PairedWindowAttention, x: torch.Tensor, grad: torch.Tensor, kernel: bool) -> float:
    """CPU microseconds of one forward + backward."""
    pwa.cpu_kernels_available = (lambda: True) if kernel else (lambda: False)
    start = time.process_time()
    (out,) = layer([x])
    out.backward(grad)
    return 1e6 * (time.process_time() - start)


def main() -> None:
    torch.set_num_threads(1)
    available = pwa.cpu_kernels_available
    available()
    print("| level | channels x grid | PyTorch ops (us) | kernel (us) |\n| --- | --- | ---: | ---: |")
    for level, (dim, grid, window, heads, qk) in enumerate(LEVELS, 1):
        torch.manual_seed(0)
        layer = PairedWindowAttention(dim, 1, window_scales(grid, window, (1, 1, 1)), heads, qk).train()
        x, grad = torch.randn(2, *grid, dim, requires_grad=True), torch.randn(2, *grid, dim)
        times = {False: [], True: []}
        for i in range(40):
            for kernel in (False, True):
                value = step_us(layer, x, grad, kernel)
                if i >= 5:
                    times[kernel].append(value)
        print(f"| {level} | {dim} x {'x'.join(map(str, grid))} | {statistics.median(times[False]):.0f} | "
              f"{statistics.median(times[True]):.0f} |")  # fmt: skip
    pwa.cpu_kernels_available = available


if __name__ == "__main__":
    main()
