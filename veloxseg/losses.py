"""VeloxSeg's training objective: L = w_seg L_seg + w_rc L_rc + w_sdkt L_sdkt.

* L_seg: Dice over the foreground classes + cross-entropy, averaged over the deep-supervision heads
  (MONAI's ``DiceCELoss(include_background=False, softmax=True, to_onehot_y=True)``; by default computed
  by :func:`dice_ce_loss`, the same function with a hand-written backward).
* L_rc: mean squared error between the teachers' reconstruction and the (unmasked) input.
* L_sdkt: self-supervised knowledge transfer, the mean over modality groups of the squared error
  between the student's Gram matrix and each teacher's.
"""

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

from .layers.conv import eager
from .layers.cpu_kernels import cpu_kernels_available
from .model import VeloxSegOutput

DICE_SMOOTH = 1e-5  # DiceCELoss's smooth_nr and smooth_dr


def dice_ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Soft Dice over the foreground classes plus cross-entropy over all, a scalar: the value of MONAI's
    ``DiceCELoss(include_background=False, softmax=True, to_onehot_y=True)(logits, labels)``.

    logits: (B, C, *spatial) floating, C >= 2; labels: (B, 1, *spatial) class indices in [0, C) (any dtype).
    Dice is per (sample, class) with smoothing 1e-5 and averaged; cross-entropy is averaged over voxels.

    Why by hand: MONAI's loss builds a float one-hot target and runs softmax, Dice and log-softmax + NLL
    as separate autograd graphs, about twenty passes over (B, C, *spatial) tensors forward and backward.
    Here the gradient has a closed form (:class:`_DiceCE`), and float32 CPU tensors take one pass each way
    on veloxseg's CPU kernel (``csrc/dice_ce.cpp``, built on first use; PyTorch ops when it cannot be built,
    or on other devices and dtypes): ``benchmarks/experiments/speed/step-speed.md`` has the timings.
    """
    if logits.shape[1] < 2:
        raise ValueError(f"dice_ce_loss needs >= 2 classes (background first), got logits {list(logits.shape)}")
    if labels.shape != (logits.shape[0], 1, *logits.shape[2:]):
        raise ValueError(
            f"labels must be (B, 1, *spatial) = {[logits.shape[0], 1, *logits.shape[2:]]} for logits of shape "
            f"{list(logits.shape)}, got {list(labels.shape)}"
        )
    labels = labels.long()
    low, high = torch.aminmax(labels)
    if low < 0 or high >= logits.shape[1]:
        raise ValueError(f"labels must be class indices in [0, {logits.shape[1] - 1}], got values in [{low}, {high}]")
    use_kernel = logits.device.type == "cpu" and logits.dtype == torch.float32 and eager() and cpu_kernels_available()
    return _DiceCE.apply(logits, labels, use_kernel)


class _DiceCE(torch.autograd.Function):
    """:func:`dice_ce_loss` on checked int64 labels, with the closed-form gradient; ``use_kernel``: the
    sums and the gradient by ``torch.ops.veloxseg.dice_ce_sums`` / ``dice_ce_backward``.

    With p = softmax(z), per (sample b, class c): I = sum p [y = c], P = sum p, G = sum [y = c],
    Dice loss = mean over b and c >= 1 of 1 - (2I + s) / (G + P + s). Its gradient in p is
    k_bc + a_bc [y = c] with a = -2 / (K D), k = (2I + s) / (K D^2), D = G + P + s, K = B (C - 1)
    (a = k = 0 for the background); cross-entropy's gradient in z is (p - [y = c]) / N over the N voxels.
    Through the softmax: dz = p (h - sum_j p_j h_j) + (p - [y = c]) / N, h = k + a [y = c].
    """

    @staticmethod
    def forward(ctx, logits, labels, use_kernel):  # type: ignore[override]
        b, c = logits.shape[:2]
        ctx.use_kernel, ctx.shape = use_kernel, logits.shape
        if use_kernel:
            logits, labels = logits.reshape(b, c, -1).contiguous(), labels.reshape(b, -1).contiguous()
            sums = torch.ops.veloxseg.dice_ce_sums(logits, labels).sum(1)  # (B, 3C + 1), float64
            intersection, predicted, ground = sums[:, :-1].view(b, 3, c).unbind(1)
            cross_entropy = sums[:, -1].sum() / labels.numel()
            saved = (logits, labels)
        else:
            log_p = F.log_softmax(logits, 1)
            p = log_p.exp()
            picked_log_p = log_p.gather(1, labels)  # (B, 1, *spatial): log p of each voxel's class
            flat_labels = labels.view(b, -1)
            by_class = logits.new_zeros(b, c)
            intersection = by_class.scatter_add(1, flat_labels, picked_log_p.exp().view(b, -1))
            ground = by_class.scatter_add(1, flat_labels, logits.new_ones(1).expand(flat_labels.shape))
            predicted = p.view(b, c, -1).sum(-1)
            cross_entropy = -picked_log_p.mean()
            saved = (p, labels)
        numerator, denominator = 2 * intersection + DICE_SMOOTH, ground + predicted + DICE_SMOOTH
        dice = (1 - numerator / denominator)[:, 1:].mean()
        ctx.save_for_backward(*saved, numerator, denominator)
        return (dice + cross_entropy).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        tensor, labels, numerator, denominator = ctx.saved_tensors  # tensor: the logits (kernel) or p
        b, c = tensor.shape[:2]
        ce_scale = 1.0 / labels.numel()  # the cross-entropy's mean
        a = -2 / (b * (c - 1) * denominator)
        k = numerator / (b * (c - 1) * denominator**2)
        a[:, 0] = k[:, 0] = 0  # no Dice term for the background
        if ctx.use_kernel:
            scaled = (k * grad, a * grad, ce_scale * grad.item())
            return torch.ops.veloxseg.dice_ce_backward(tensor, labels, *scaled).view(ctx.shape), None, None
        p = tensor
        broadcast = (b, c) + (1,) * (p.dim() - 2)
        a, k = a.to(p.dtype).view(broadcast), k.to(p.dtype).view(broadcast)
        picked_p = p.gather(1, labels)  # (B, 1, *spatial)
        a_picked = a.expand_as(p).gather(1, labels) * picked_p  # a_y p_y
        weighted = (p * k).sum(1, keepdim=True) + a_picked  # sum_j p_j h_j
        grad_logits = p * (k + ce_scale - weighted)
        grad_logits.scatter_add_(1, labels, a_picked - ce_scale)  # the [y = c] terms: p_y a_y - 1 / N
        return grad_logits * grad, None, None


class VeloxSegLoss(nn.Module):
    """The weighted sum of the three terms; a term with weight 0 is skipped (and may lack its inputs).

    ``one_way_sdkt`` detaches the teachers' Gram matrices, so L_sdkt moves the student towards the
    teachers and never the teachers towards the student. ``fused`` computes L_seg by :func:`dice_ce_loss`
    (the same value, a faster backward); False: by MONAI's ``DiceCELoss``, the reference.
    """

    def __init__(
        self,
        seg_weight: float = 1.0,
        rc_weight: float = 0.5,
        sdkt_weight: float = 2.0,
        one_way_sdkt: bool = False,
        fused: bool = True,
    ) -> None:
        super().__init__()
        if min(seg_weight, rc_weight, sdkt_weight) < 0 or seg_weight + rc_weight + sdkt_weight == 0:
            raise ValueError(
                f"loss weights must be >= 0 and not all 0, got seg={seg_weight}, rc={rc_weight}, sdkt={sdkt_weight}"
            )
        self.seg_weight, self.rc_weight, self.sdkt_weight = seg_weight, rc_weight, sdkt_weight
        self.one_way_sdkt = one_way_sdkt
        self.dice_ce = dice_ce_loss if fused else DiceCELoss(include_background=False, softmax=True, to_onehot_y=True)

    def forward(
        self, output: VeloxSegOutput, image: torch.Tensor, label: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Losses of one batch.

        output: a training-mode forward of VeloxSeg.
        image: (B, sum(group_channels), D, H, W) the reconstruction target (the input before any masking).
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
