"""A sequence of blocks whose activations can be recomputed in the backward pass instead of stored."""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class CheckpointedSequential(nn.Sequential):
    """``nn.Sequential`` (same parameters and state-dict keys) with timm's activation checkpointing:
    with ``grad_checkpointing`` set, a forward that records gradients keeps each block's input only
    and runs the block again in the backward pass (less memory, about one more forward of time).
    The input may be a tensor or, for the attention stream's blocks, a list of tensors; ``args`` are
    passed to every block (the attention blocks' modality groups).

    Written here rather than with ``timm.models.checkpoint_seq``, which passes the blocks' input to
    ``torch.utils.checkpoint`` as one tensor argument; a list of tensors needs the non-reentrant form.
    """

    grad_checkpointing: bool = False

    def forward(self, x, *args):  # noqa: ANN001, ANN201 -- a tensor or a list of tensors, like the blocks
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self:
            x = checkpoint(block, x, *args, use_reentrant=False) if checkpointing else block(x, *args)
        return x
