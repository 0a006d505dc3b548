"""Where a default-recipe step's op calls and autograd nodes come from, by layer kind.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/experiments/speed/op_sources.py [--pwa-off]

One ``veloxseg_small_hr`` step (``benchmarks/step_ratio.py``'s setup) after one warm-up: ATen ops as a
``TorchDispatchMode`` sees them (after autograd and composite ops decompose: fewer than the profiler's
nested calls), forward and backward, and the autograd nodes of the loss's graph, each attributed to the
paired-window attention (``pwa.attn``), the PWA blocks' feed-forward (``pwa.ffn``), the JLC blocks (``jlc``)
or the rest (``other``: stems, decoder, head, detail path, loss, clipping, AdamW). A backward node belongs to
the layer whose forward created it (autograd sequence numbers); its ops to that layer. ``--pwa-off``: the PWA
training kernel reported missing.
"""

import collections
import gc
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, "benchmarks")
import step_ratio  # noqa: E402
import veloxseg.layers.pwa as pwa  # noqa: E402
from veloxseg.layers.jlc import JLCBlock  # noqa: E402
from veloxseg.model import VeloxSeg  # noqa: E402

KINDS = {pwa.PairedWindowAttention: "pwa.attn", pwa.FeedForward: "pwa.ffn", JLCBlock: "jlc"}
current, phase = ["other"], ["forward"]
ops = {"forward": collections.Counter(), "backward": collections.Counter()}
spans: list[tuple[int, int, str]] = []  # (first, last) autograd sequence numbers of a layer's forward


class CountOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ops[phase[0]][current[-1]] += 1
        return func(*args, **(kwargs or {}))


def sequence_number() -> int:
    return (torch.zeros(1, requires_grad=True) * 1).grad_fn._sequence_nr()


def tag_layers(model: torch.nn.Module) -> None:
    """Hooks that set the current layer kind and record each layer's span of sequence numbers."""

    def enter(module, inputs, kind):
        current.append(kind)
        module.first_node = sequence_number()

    def leave(module, inputs, output, kind):
        current.pop()
        spans.append((module.first_node, sequence_number(), kind))

    for module in model.modules():
        kind = KINDS.get(type(module))
        if kind:
            module.register_forward_pre_hook(lambda m, i, kind=kind: enter(m, i, kind))
            module.register_forward_hook(lambda m, i, o, kind=kind: leave(m, i, o, kind))


def counting_backward(backward):
    """``Tensor.backward`` that first tags every node of the graph with its layer kind and counts them."""

    def run(self, *args, **kwargs):
        seen, stack, nodes = set(), [self.grad_fn], collections.Counter()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            kind = next((k for first, last, k in spans if first < node._sequence_nr() < last), "other")
            nodes[kind] += 1
            node.register_prehook(lambda grad, kind=kind: current.append(kind))  # returns None: grads unchanged
            node.register_hook(lambda grad_in, grad_out: current.pop() and None)
            stack.extend(parent for parent, _ in node.next_functions)
        print("autograd nodes", dict(nodes), sum(nodes.values()))
        phase[0] = "backward"
        try:
            return backward(self, *args, **kwargs)
        finally:
            phase[0] = "forward"

    return run


def main() -> None:
    torch.set_num_threads(1)
    if "--pwa-off" in sys.argv:
        pwa.cpu_kernels_available = lambda: False
    setup = step_ratio.build_setup("veloxseg_small_hr")
    (model,) = [o for o in gc.get_objects() if isinstance(o, VeloxSeg)]
    tag_layers(model)
    setup.step()
    spans.clear()
    torch.Tensor.backward = counting_backward(torch.Tensor.backward)
    with CountOps():
        setup.step()
    for name, counts in ops.items():
        print(f"{name} ops", dict(counts), sum(counts.values()))


if __name__ == "__main__":
    main()
