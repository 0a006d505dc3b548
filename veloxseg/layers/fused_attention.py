"""A compiled CPU kernel for window attention (``csrc/window_attention.cpp``), built on first use.

Only ``veloxseg.optimize`` loads it: building needs a C++ compiler (as inductor does) and takes about
half a minute once, after which torch's extension cache (``TORCH_EXTENSIONS_DIR``) keeps the library.
"""

import functools
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "window_attention.cpp"

# at::vec chooses its SIMD width from these macros; the flags let the compiler emit those instructions.
_ISA_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}


@functools.cache
def load_window_attention() -> None:
    """Build (or load from the cache) the kernel and register ``torch.ops.veloxseg.window_attention``:
    q, k (N, h, T, c), v (N, h, T, cv), bias (h, T, T), scale -> (N, h, T, cv), float32 CPU tensors,
    inference only (no backward). Raises RuntimeError when it cannot be built."""
    from torch.utils.cpp_extension import load

    capability = torch.backends.cpu.get_cpu_capability()
    try:
        load(
            name=f"veloxseg_window_attention_{capability.lower()}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", *_ISA_FLAGS.get(capability, [])],
            is_python_module=False,
        )
    except Exception as error:  # no compiler, no ninja, a compiler error: all raise different types
        raise RuntimeError(
            f"could not build veloxseg's CPU window-attention kernel ({SOURCE.name}; needs a C++ compiler and "
            f"ninja): {error}"
        ) from error

    @torch.library.register_fake("veloxseg::window_attention")
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
        return v.new_empty(q.shape[:3] + v.shape[3:])
