"""Deep supervision with the labels downsampled to each head (nnU-Net's way) instead of the logits
upsampled to the ROI; accuracy.py otherwise. Heads full / u_2 / u_3 / e_4 weighted DS_WEIGHTS
(default 1, 1/2, 1/4, 0, normalised), labels nearest-downsampled.

    python acc_ds.py --data /tmp/brain --models veloxseg_small_hr --steps 1600 --seed 0
"""

import dataclasses
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
from veloxseg import losses, model  # noqa: E402
from veloxseg.training import recipe  # noqa: E402

recipe.RECIPES["default"] = dataclasses.replace(recipe.RECIPES["default"], deep_supervision=True)
weights = torch.tensor([float(w) for w in os.environ.get("DS_WEIGHTS", "1,0.5,0.25,0").split(",")])
weights = (weights / weights.sum()).tolist()


def forward_embedded(self, tokens, stem, detail_stem=None):
    """VeloxSeg's forward, with the aux heads' logits left at their own scale."""
    attn, conv = self.encode(tokens, stem)
    logits, u1 = self.decoder(conv, detail_stem)
    if not self.training:
        return logits[0]
    return model.VeloxSegOutput(logits=logits, gram=model.gram_matrix(u1))


def seg_loss(self, output, image, label=None):
    """Weighted Dice + CE of each head against the label at the head's resolution."""
    terms = []
    for weight, logits in zip(weights, output.logits):
        if weight:
            target = label if logits.shape[2:] == label.shape[2:] else F.interpolate(
                label.float(), size=logits.shape[2:], mode="nearest"
            )
            terms.append(weight * self.dice_ce(logits.float(), target))
    seg = torch.stack(terms).sum()
    return {"seg": seg, "loss": seg}


model.VeloxSeg.forward_embedded = forward_embedded
losses.VeloxSegLoss.forward = seg_loss
import accuracy  # noqa: E402

sys.argv[0] = str(Path(accuracy.__file__))
accuracy.main()
