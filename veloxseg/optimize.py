"""``veloxseg.optimize``: a compiled, inference-only copy of a VeloxSeg model.

The eager network spends most of its CPU time outside the convolutions, in many small memory-bound
ops (layer norms, window gathers, residual adds, GELUs). Inductor with weight freezing fuses those
into a few generated loops and runs every conv and linear on prepacked oneDNN/MKL weights with its
bias and activation fused: on this project's 2-core EPYC, 1 thread, one 2 x 96^3 patch of
veloxseg_small, about 0.8 of the eager time with the same outputs (relative error < 1e-6;
``benchmarks/speed.py`` has the numbers). The price is a one-time compilation (about a minute on
2 CPU cores, again for every new batch size) and a C++ compiler on the machine.
"""

import copy

import torch
from torch import nn

from .model import VeloxSeg

__all__ = ["OptimizedVeloxSeg", "optimize"]


class OptimizedVeloxSeg(nn.Module):
    """Inference-only VeloxSeg compiled by ``torch.compile`` with frozen weights.

    (B, sum(in_ch), *roi_size) -> logits (B, n_classes, *roi_size), as ``VeloxSeg`` in eval mode. It
    holds a private copy of the model: later changes to the original's weights do not reach it.
    """

    def __init__(self, model: VeloxSeg) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.config = self.model.config
        self.pretrained_cfg = self.model.pretrained_cfg
        self.compiled_forward = torch.compile(self.model.forward, dynamic=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.model.check_input(x)  # a clear error before dynamo sees the tensor
        # Freezing is read when a graph is compiled: a new batch size compiles under the same settings.
        with torch.inference_mode(), torch._inductor.config.patch(freezing=True):
            return self.compiled_forward(x)

    def train(self, mode: bool = True) -> "OptimizedVeloxSeg":
        if mode:
            raise RuntimeError("an optimized VeloxSeg is inference-only: train the original model instead")
        return super().train(False)


def optimize(model: VeloxSeg, batch_size: int = 1) -> OptimizedVeloxSeg:
    """Compile ``model`` for inference and return the compiled copy, warmed up for ``batch_size``.

    The compilation happens here (on an input of ``batch_size`` x the model's ROI), not on the first
    real call. Raises ``RuntimeError`` naming the cause when torch.compile cannot run on this machine
    (on CPU it needs a C++ compiler).
    """
    if not isinstance(model, VeloxSeg):
        raise TypeError(f"veloxseg.optimize expects a VeloxSeg model, got {type(model).__name__}")
    optimized = OptimizedVeloxSeg(model)
    cfg = model.config
    parameter = next(model.parameters())
    example = torch.zeros(batch_size, sum(cfg.in_ch), *cfg.roi_size, device=parameter.device, dtype=parameter.dtype)
    try:
        optimized(example)
    except Exception as error:  # inductor raises many types (compiler missing, backend errors)
        raise RuntimeError(f"veloxseg.optimize: torch.compile failed on this machine ({error})") from error
    return optimized
