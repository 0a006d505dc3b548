"""Training recipes: what a segmentation run optimises and which training-only parts the model keeps.

* ``default``: what measured best at short CPU budgets (``benchmarks/experiments/recipe/``): L_seg on
  the full-resolution head only (no deep supervision), no teachers (SDKT did not pay at the budgets
  measured), no dropout, a peak learning rate chosen on validation splits, and a new model's head
  started small (a tenth of its Kaiming weights) with the training labels' class shares as its prior
  (bias), chosen on the same validation splits.
* ``paper``: the authors' objective: L_seg averaged over the four upsampled heads + 0.5 L_rc + 2 L_sdkt
  with two-way joint teachers, the model's dropout, AdamW at 2.5e-4, the spec's init.

Both use AdamW (weight decay 0.01) with a linear warm-up and a cosine decay. Pretraining is the same in
both: L_rc alone. Any single setting can still be overridden by its own flag (``--sdkt-weight`` ...).
"""

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Recipe:
    """Loss weights per stage (seg, rc, sdkt), the model's training-only parts and the peak learning rate."""

    loss_weights: dict[str, tuple[float, float, float]]
    deep_supervision: bool
    dropout: float | None  # attention, projection and conv dropout; None keeps the model's own
    lr: float
    max_grad_norm: float | None  # gradient clipping; None: none
    head_init_scale: float  # a new model's segmentation head weights times this
    head_class_prior: bool  # a new model's head bias: the log share of each class in the training labels

    def model_overrides(self, teachers: bool) -> dict[str, Any]:
        """Config fields the recipe sets on the model (``teachers``: whether a loss term needs them)."""
        overrides: dict[str, Any] = {"teachers": teachers, "deep_supervision": self.deep_supervision}
        if self.dropout is not None:
            overrides.update(attn_drop=self.dropout, proj_drop=self.dropout, conv_drop=self.dropout)
        return overrides


PAPER_LR = 2.5e-4
RECIPES: dict[str, Recipe] = {
    "default": Recipe(
        loss_weights={"pretrain": (0.0, 1.0, 0.0), "segment": (1.0, 0.0, 0.0), "finetune": (1.0, 0.0, 0.0)},
        deep_supervision=False,
        dropout=0.0,
        lr=8e-3,  # veloxseg_small_hr's, chosen on validation splits: benchmarks/results/learning_rates.json
        max_grad_norm=1.0,
        # chosen on validation splits, 4 seeds: benchmarks/experiments/head-init/head-prior-validation-0.1.json
        head_init_scale=0.1,
        head_class_prior=True,
    ),
    "paper": Recipe(
        loss_weights={"pretrain": (0.0, 1.0, 0.0), "segment": (1.0, 0.5, 2.0), "finetune": (1.0, 0.5, 2.0)},
        deep_supervision=True,
        dropout=None,
        lr=PAPER_LR,
        max_grad_norm=None,
        head_init_scale=1.0,
        head_class_prior=False,
    ),
}
