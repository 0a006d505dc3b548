"""VeloxSeg's training objective: L = w_seg L_seg + w_rc L_rc + w_sdkt L_sdkt.

* L_seg: Dice + cross-entropy over the foreground classes, averaged over the deep-supervision heads.
* L_rc: mean squared error between the teachers' reconstruction and the (unmasked) input.
* L_sdkt: self-supervised knowledge transfer, the mean over modality groups of the squared error
  between the student's Gram matrix and each teacher's.
"""

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

from .model import VeloxSegOutput


class VeloxSegLoss(nn.Module):
    """The weighted sum of the three terms; a term with weight 0 is skipped (and may lack its inputs).

    ``one_way_sdkt`` detaches the teachers' Gram matrices, so L_sdkt moves the student towards the
    teachers and never the teachers towards the student.
    """

    def __init__(
        self, seg_weight: float = 1.0, rc_weight: float = 0.5, sdkt_weight: float = 2.0, one_way_sdkt: bool = False
    ) -> None:
        super().__init__()
        if min(seg_weight, rc_weight, sdkt_weight) < 0 or seg_weight + rc_weight + sdkt_weight == 0:
            raise ValueError(
                f"loss weights must be >= 0 and not all 0, got seg={seg_weight}, rc={rc_weight}, sdkt={sdkt_weight}"
            )
        self.seg_weight, self.rc_weight, self.sdkt_weight = seg_weight, rc_weight, sdkt_weight
        self.one_way_sdkt = one_way_sdkt
        self.dice_ce = DiceCELoss(include_background=False, softmax=True, to_onehot_y=True)

    def forward(
        self, output: VeloxSegOutput, image: torch.Tensor, label: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Losses of one batch.

        output: a training-mode forward of VeloxSeg.
        image: (B, sum(in_ch), D, H, W) the reconstruction target (the input before any masking).
        label: (B, 1, D, H, W) integer class map; needed when seg_weight > 0.
        Returns {"loss": total, "seg", "rc", "sdkt": the unweighted terms in use}, all scalars.
        """
        terms: dict[str, torch.Tensor] = {}
        if self.seg_weight:
            if label is None:
                raise ValueError("the segmentation loss needs labels: use seg_weight=0 (pretraining) without them")
            terms["seg"] = torch.stack([self.dice_ce(logits.float(), label) for logits in output.logits]).mean()
        if self.rc_weight:
            if output.reconstruction is None:
                raise ValueError("the reconstruction loss needs the model's teachers (config teachers=True)")
            terms["rc"] = F.mse_loss(output.reconstruction.float(), image.float())
        if self.sdkt_weight:
            if not output.teacher_grams:
                raise ValueError("the SDKT loss needs the model's teachers (config teachers=True)")
            teachers = [g.detach() if self.one_way_sdkt else g for g in output.teacher_grams]
            terms["sdkt"] = torch.stack([F.mse_loss(output.gram.float(), g.float()) for g in teachers]).mean()
        weights = {"seg": self.seg_weight, "rc": self.rc_weight, "sdkt": self.sdkt_weight}
        terms["loss"] = sum(weights[name] * value for name, value in terms.items())
        return terms
