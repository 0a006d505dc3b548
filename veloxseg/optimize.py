"""``veloxseg.optimize``: a compiled, inference-only copy of a VeloxSeg model.

The eager network spends most of its CPU time outside the convolutions, in many small memory-bound
ops (layer norms, window gathers, residual adds, GELUs). Inductor with weight freezing fuses those
into a few generated loops and runs every conv and linear on prepacked oneDNN/MKL weights with
biases and activations fused. Two parts that inductor compiles poorly run as hand-written CPU kernels
(``veloxseg/csrc``, built once with ``torch.utils.cpp_extension``): the window attention of every PWA
block, and the conv branch of the JLC blocks with 4-channel groups. On this project's 2-core EPYC,
1 thread, one 2 x 96^3 patch of veloxseg_small: about 0.75 of the eager time and 0.47 of a
straightforward implementation's, with the same outputs (relative error ~2e-6 to the authors'
vectors; ``benchmarks/speed.py`` and ``benchmarks/experiments/speed/speed_notes.md`` have the numbers). The
price is a one-time compilation (about a minute on 2 CPU cores) and a C++ compiler on the machine.
"""

import copy
import warnings

import torch
from torch import nn

from .layers import JLCBlock, PairedWindowAttention
from .layers.cpu_kernels import load_cpu_kernels
from .model import VeloxSeg

__all__ = ["INDUCTOR_SETTINGS", "OptimizedVeloxSeg", "optimize"]

# freezing: weights become constants, prepacked for oneDNN/MKL, with biases and activations fused;
# no layout optimisation: channels-last everywhere measured slower; cpp_wrapper: no Python between kernels.
INDUCTOR_SETTINGS = {"freezing": True, "layout_optimization": False, "cpp_wrapper": True}


def _inputs_and_global_state(guards: list) -> list[bool]:
    """Dynamo guard filter: keep the guards on the inputs and on global state (grad mode, thread count),
    drop the ~3,000 on the model (attributes, hooks, parameters), whose evaluation took 0.6 ms a call.
    The model is a private copy nothing changes, and freezing made its weights constants of the graph."""
    return [not guard.name.startswith("self") for guard in guards]


class OptimizedVeloxSeg(nn.Module):
    """Inference-only VeloxSeg compiled by ``torch.compile`` with frozen weights, for one batch size.

    (B, sum(group_channels), *roi_size) -> logits (B, n_classes, *roi_size), as ``VeloxSeg`` in eval mode, for
    any B: inputs are run ``batch_size`` at a time, the last chunk padded with zeros (samples are
    independent: the network has no batch statistics), so only one graph is ever compiled. It holds
    a private copy of the model: later changes to the original's weights do not reach it. On CPUs the
    generated code is fixed to a thread count: after ``torch.set_num_threads`` the next call compiles
    again (about a minute, once per thread count), with a warning. A float32 model on the CPU runs its
    window attention and narrow JLC conv branches on veloxseg's own kernels (built on first use).
    """

    def __init__(self, model: VeloxSeg, batch_size: int = 1) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        parameter = next(self.model.parameters())
        if parameter.device.type == "cpu" and parameter.dtype == torch.float32:  # what the kernels compute
            load_cpu_kernels()
            for module in self.model.modules():
                if isinstance(module, (JLCBlock, PairedWindowAttention)):
                    module.fused_kernel = True
        self.config = self.model.config
        self.pretrained_cfg = self.model.pretrained_cfg
        self.compiled_forward = torch.compile(
            self.model.forward_embedded, dynamic=False, options={"guard_filter_fn": _inputs_and_global_state}
        )
        self.compiled_threads: set[int] = set()
        self.train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.model.check_input(x)
        threads = torch.get_num_threads()
        if x.device.type == "cpu" and self.compiled_threads and threads not in self.compiled_threads:
            warnings.warn(
                f"this VeloxSeg was compiled for {sorted(self.compiled_threads)} CPU thread(s); torch now uses "
                f"{threads}: compiling again for them (about a minute, once)",
                stacklevel=2,
            )
        self.compiled_threads.add(threads)
        if x.shape[0] == self.batch_size:
            return self._forward_batch(x)
        outputs = []
        for chunk in x.split(self.batch_size):
            padding = self.batch_size - chunk.shape[0]
            padded = torch.cat([chunk, chunk.new_zeros(padding, *chunk.shape[1:])]) if padding else chunk
            outputs.append(self._forward_batch(padded)[: chunk.shape[0]])
        return torch.cat(outputs)

    def _forward_batch(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            # The input convs stay eager: inductor's prepacked convs want channels-last inputs, and
            # transposing the full-resolution input costs more (5 ms) than those convs themselves.
            embedded = self.model.embed(x)
            # The settings are read when the graph is compiled (on the first call).
            with torch._inductor.config.patch(**INDUCTOR_SETTINGS):
                return self.compiled_forward(*embedded)

    def train(self, mode: bool = True) -> "OptimizedVeloxSeg":
        if mode:
            raise RuntimeError("an optimized VeloxSeg is inference-only: train the original model instead")
        return super().train(False)


def optimize(model: VeloxSeg, batch_size: int = 1) -> OptimizedVeloxSeg:
    """Compile ``model`` for inference on batches of ``batch_size`` and return the compiled copy.

    Compilation happens here, on a zero input of ``batch_size`` x the model's ROI, not on the first
    real call. Raises ``RuntimeError`` naming the cause when torch.compile cannot run on this machine
    (on CPUs it needs a C++ compiler).
    """
    if not isinstance(model, VeloxSeg):
        raise TypeError(f"veloxseg.optimize expects a VeloxSeg model, got {type(model).__name__}")
    optimized = OptimizedVeloxSeg(model, batch_size)
    cfg = model.config
    parameter = next(model.parameters())
    example = torch.zeros(batch_size, cfg.in_channels, *cfg.roi_size, device=parameter.device, dtype=parameter.dtype)
    try:
        optimized(example)
    except Exception as error:  # inductor raises many types (no compiler, backend errors)
        raise RuntimeError(f"veloxseg.optimize: torch.compile failed on this machine: {error}") from error
    return optimized
