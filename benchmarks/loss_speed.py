"""CPU time of the segmentation loss, forward and backward: veloxseg's fused Dice + CE against MONAI's.

    python benchmarks/loss_speed.py                    # 2 x 3 x 64^3 logits, 20 interleaved rounds

Times ``dice_ce_loss`` (on veloxseg's CPU kernel when it builds, else its PyTorch-ops path; ``--ops``:
that path always) and MONAI's ``DiceCELoss(include_background=False, softmax=True, to_onehot_y=True)``
on the same logits and labels, alternating, one thread, process CPU time, with the trainer's allocator
settings. Prints the median and minimum milliseconds of each and the loss values (which must agree).
"""

import argparse
import statistics
import time

import torch
from monai.losses import DiceCELoss

from veloxseg.losses import _DiceCE, dice_ce_loss
from veloxseg.training.allocator import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=5, default=[2, 3, 64, 64, 64], metavar=("B", "C", "D", "H", "W"))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--ops", action="store_true", help="the fused loss's PyTorch-ops path, not the kernel")
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()
    torch.manual_seed(0)
    b, c, *spatial = args.shape
    logits = (3 * torch.randn(args.shape)).requires_grad_()
    labels = torch.randint(0, c, (b, 1, *spatial)).float()
    monai = DiceCELoss(include_background=False, softmax=True, to_onehot_y=True)
    fused = (lambda z, y: _DiceCE.apply(z, y.long(), False)) if args.ops else dice_ce_loss
    losses = {"veloxseg dice_ce_loss" + (" (PyTorch ops)" if args.ops else ""): fused, "MONAI DiceCELoss": monai}
    times: dict[str, list[float]] = {name: [] for name in losses}
    values = {}
    for r in range(args.rounds + 1):
        for name, loss in losses.items():
            start = time.process_time()
            value = loss(logits, labels)
            torch.autograd.grad(value, logits)
            if r:
                times[name].append(time.process_time() - start)
            values[name] = value.item()
    for name, t in times.items():
        print(f"{name}: median {1e3 * statistics.median(t):.1f} ms, min {1e3 * min(t):.1f} ms, loss {values[name]:.6f}")


if __name__ == "__main__":
    main()
