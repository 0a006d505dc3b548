"""Hand-written CPU kernels (``veloxseg/csrc``), built on first use.

For ``veloxseg.optimize``: ``torch.ops.veloxseg.window_attention`` and ``torch.ops.veloxseg.jlc_folded_branch``
(inference only, no backward). For training: the two halves of the fused Dice + CE loss
(``veloxseg.losses.dice_ce_loss``), the detail path's output step (``veloxseg.layers.detail.detail_logits``),
GELU after an instance norm, channels-first and channels-last (``veloxseg.layers.norm.gelu_instance_norm``),
the paired-window attention between its projections (``veloxseg.layers.pwa.PairedWindowAttention``) and the
detail path's 8-channel 3^3 conv and 4^3 stride-2 stem (``veloxseg.layers.conv.conv3x3_channels_last``,
``veloxseg.layers.detail.DetailStem``), with their backward; all fall back to PyTorch ops without them:
:func:`cpu_kernels_available`.
Building needs a C++ compiler and ninja (as inductor needs the compiler) and takes about a minute once (2
cores: 56 s wall, 96 s CPU); torch's extension cache (``TORCH_EXTENSIONS_DIR``) keeps the library after that.
"""

import contextlib
import functools
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

SOURCES = sorted((Path(__file__).resolve().parent.parent / "csrc").glob("*.cpp"))

# at::vec chooses its SIMD width from these macros; the flags let the compiler emit those instructions.
_ISA_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch's extension builder runs ``ninja`` from PATH; the pip-installed one sits beside this
    interpreter, which is not on PATH when its environment is not activated (``.venv/bin/python ...``)."""
    path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])
    try:
        yield
    finally:
        os.environ["PATH"] = path


@functools.cache
def load_cpu_kernels() -> None:
    """Build (or load from the cache) the kernels and register their ops. Raises RuntimeError when they
    cannot be built.

    - ``window_attention(q, k, v, bias, scale)``: q, k (N, h, T, c), v (N, h, T, cv), bias (h, T, T) ->
      ``softmax(scale * q k^T + bias) v``, (N, h, T, cv).
    - ``jlc_folded_branch(x, weights, biases, groups)``: a JLC block's conv branch on x (B, C, D, H, W), W
      even, with the conv weights re-laid out by ``jlc.fold_conv_weight`` (biases repeated twice).
    - ``dice_ce_sums(logits, labels)``: logits (B, C, N) float32, labels (B, N) int64 -> (B, blocks, 3C + 1)
      float64 partial sums per block of voxels: softmax probability at the label's class (C), of each class (C),
      label counts (C), cross-entropy.
    - ``dice_ce_backward(logits, labels, k, a, ce_scale)``: the gradient of ``dice_ce_loss`` in the logits
      (B, C, N), given its per-class coefficients k and a (B, C) and the cross-entropy's scale.
    - ``detail_logits(x, weight, bias, coarse)``: x (B, K, D, H, W), weight (8C, K), bias (8C,), coarse
      (B, C, D, H, W), float32 or float64 -> (B, C, 2D, 2H, 2W), a 1x1x1 conv plus the coarse logits,
      2x pixel-shuffled; ``detail_logits_backward(grad, x, weight)``: its gradients in x, weight, bias, coarse.
    - ``norm_gelu(x, eps)``: x (B, C, N) -> (GELU of each row normalised to mean 0 and variance 1, mean (B, C),
      rstd (B, C)); ``norm_gelu_backward(grad, x, mean, rstd)``: its gradient in x.
    - ``pwa_train(projected, table, index, resize, windows, pools, heads, qk_width, v_width, scale)``: a PWA
      layer's max-pooled windows, attention with the relative position bias, and trilinear scatter back, on the
      q/k/v projections (M, B, D, H, W, C) -> (M, B, D, H, W, S*h*c_v), plus what its backward needs;
      ``pwa_train_backward(...)``: the gradients in the projections and the bias table.
    """
    from torch.utils.cpp_extension import load

    capability = torch.backends.cpu.get_cpu_capability()
    try:
        with _ninja_on_path():
            load(
                name=f"veloxseg_cpu_kernels_{capability.lower()}",
                sources=[str(source) for source in SOURCES],
                extra_cflags=["-O3", *_ISA_FLAGS.get(capability, [])],
                is_python_module=False,
            )
    except Exception as error:  # no compiler, no ninja, a compiler error: all raise different types
        raise RuntimeError(
            f"could not build veloxseg's CPU kernels ({', '.join(s.name for s in SOURCES)}; they need a C++ "
            f"compiler and ninja): {error}"
        ) from error

    @torch.library.register_fake("veloxseg::window_attention")
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
        return v.new_empty(q.shape[:3] + v.shape[3:])

    @torch.library.register_fake("veloxseg::jlc_folded_branch")
    def _(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], groups: int) -> torch.Tensor:
        return torch.empty_like(x, memory_format=torch.contiguous_format)


@functools.cache
def cpu_kernels_available() -> bool:
    """Whether the kernels are built (building them on the first call); if they cannot be, warns once with
    the reason and returns False, for code that has a slower fallback (the training loss)."""
    try:
        load_cpu_kernels()
    except RuntimeError as error:
        warnings.warn(f"{error}; using the slower PyTorch fallback", stacklevel=2)
        return False
    return True
