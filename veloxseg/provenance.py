"""Where a model's weights come from, kept with every copy of them: the base model a run started
from, the license, the NOTICE its data asks to keep, and which split each metric was measured on.

The facts live in the 3-D metadata (:class:`veloxseg.metadata.ModelMetadata`: ``license``,
``notice``, ``base_model``, ``metrics``, ``evaluation_cases``, and for a published tag
``publication``, a :class:`Publication`); ``save_pretrained`` writes the notice as NOTICE, the
exports embed it, the model card reads the rest. A published tag's card, its config.json
description, ``benchmarks/results/tags.md`` and MODEL_CARD.md's tags table are all made from them
(``hub/tags_table.py --write``).
"""

import dataclasses
from dataclasses import dataclass
from typing import Any

from .metadata import ModelMetadata

# A metric's split from its name's prefix (the trainer's val_*, make_tag's test_*).
SPLITS = {"val_": "validation", "test_": "test"}
USER_LICENSE = "other"  # a trained model's license unless its trainer names one: its data's terms are unknown


@dataclass
class Publication:
    """How a published tag was made, for its card and the tags table (``hub/make_tag.py`` records it).

    about: what the weights are for, a paragraph of the card.
    stage, recipe, seed, lr: the training run's (``train_config.json``).
    budget: e.g. "1500 steps of 2 patches of 64x64x64".
    cpu_hours: user + system CPU hours of the run (GNU time), None when not measured.
    machine: the hardware, e.g. "AMD EPYC 7B13 (1 torch thread(s), no GPU)".
    data_command: the command that made the training data.
    """

    about: str
    stage: str
    recipe: str
    seed: int
    lr: float
    budget: str
    cpu_hours: float | None
    machine: str
    data_command: str = ""


def held_out(metrics: dict[str, float]) -> str:
    """A tag's held-out numbers in words: test Dice (with each modality subset's, for a model trained
    with modality dropout, and HD95) for segmentation, the reconstruction error beside the masked
    input's own for self-supervised tags."""
    if "test_masked_rc_mse" in metrics:
        return f"masked MSE {metrics['test_masked_rc_mse']:.3f} (masked input: {metrics['test_masked_input_mse']:.3f})"
    if "test_dice" not in metrics:
        return "no test metrics"
    dice = f"Dice {metrics['test_dice']:.3f}"
    subsets = [f"{name.removeprefix('test_dice@')} alone {value:.3f}" for name, value in metrics.items()
               if name.startswith("test_dice@")]  # fmt: skip
    dice += f" ({', '.join(subsets)})" if subsets else ""
    dice = f"{dice}, HD95 {metrics['test_hd95']:.1f} mm" if "test_hd95" in metrics else dice
    return "; ".join([dice, *unseen_source(metrics)])


def unseen_source(metrics: dict[str, float]) -> list[str]:
    """The tissue tags' numbers on Colin27, a T1 brain of another source that no tag trains on: Dice
    without fine-tuning at each resolution (``colin27_dice_<mm>mm``, benchmarks/brain_generalisation.py;
    ``colin27_tta_dice_<mm>mm`` with its ``--tta``, as ``veloxseg predict --tta``) and after fine-tuning
    against scratch (``colin27_finetune_dice`` / ``colin27_scratch_dice``, benchmarks/finetune.py)."""
    by_mm, tta_by_mm = _by_resolution(metrics, "colin27_dice_"), _by_resolution(metrics, "colin27_tta_dice_")
    words = []
    if by_mm:
        resolutions = "/".join(f"{mm:g}" for mm in sorted(by_mm))
        tta = f" (with --tta {min(tta_by_mm.values()):.3f}-{max(tta_by_mm.values()):.3f})" if tta_by_mm else ""
        words.append(f"unseen Colin27 T1 {min(by_mm.values()):.3f}-{max(by_mm.values()):.3f} at {resolutions} mm{tta}")
    if "colin27_finetune_dice" in metrics and "colin27_scratch_dice" in metrics:
        words.append(
            f"fine-tuned on it {metrics['colin27_finetune_dice']:.3f} against scratch {metrics['colin27_scratch_dice']:.3f}"
        )
    return words


def _by_resolution(metrics: dict[str, float], prefix: str) -> dict[float, float]:
    """{resolution in mm: value} of the metrics named ``<prefix><mm>mm`` (a point in mm written as _)."""
    return {float(name[len(prefix) : -2].replace("_", ".")): value for name, value in metrics.items()
            if name.startswith(prefix) and name.endswith("mm")}  # fmt: skip


def description(metadata: ModelMetadata) -> str:
    """A published tag's one-line description (its config.json's ``description``), from its metadata."""
    made = Publication(**metadata.publication)
    cost = f"{made.cpu_hours:.2f} CPU h" if made.cpu_hours is not None else "CPU time not recorded"
    cases = metadata.evaluation_cases.get("test")
    test = f"test ({cases} cases): {held_out(metadata.metrics)}" if cases else held_out(metadata.metrics)
    return f"{made.about.split('. ')[0].rstrip('.')}. {made.budget}, stage {made.stage} ({cost}); {test}."


def base_model_of(pretrained_cfg: dict[str, Any]) -> str:
    """The name of the weights ``pretrained_cfg`` loads: the Hub repo ("veloxseg/<tag>" for a registry
    tag, "org/name[@revision]") or "local-dir:PATH"."""
    if pretrained_cfg.get("file"):
        return f"local-dir:{pretrained_cfg['file']}"
    return pretrained_cfg.get("hf_hub_id") or ""


def hub_base_model(base_model: str) -> str | None:
    """The Hub repo id of ``base_model`` for a card's ``base_model`` field (None for a local folder)."""
    if not base_model or base_model.startswith("local-dir:"):
        return None
    return base_model.partition("@")[0]


def split_of(metric: str) -> tuple[str, str]:
    """(split, metric name without the split prefix); split "held-out" for a name without one."""
    for prefix, split in SPLITS.items():
        if metric.startswith(prefix):
            return split, metric.removeprefix(prefix)
    return "held-out", metric


def inherited(metadata: ModelMetadata, source: ModelMetadata) -> ModelMetadata:
    """``metadata`` of weights adapted from ``source``'s: still derived from its data, they keep its
    license and notice (and its base model) when the rest of its metadata no longer describes them."""
    return dataclasses.replace(
        metadata, license=source.license, notice=source.notice, base_model=source.base_model or metadata.base_model
    )


def trained(
    metadata: ModelMetadata, base: dict[str, Any] | None, license: str | None, validation_cases: int
) -> ModelMetadata:
    """The metadata of a training run's model: ``license`` (else "other"), the base model and its
    notice when it started from pretrained weights (``base``: their pretrained config), and the
    number of validation cases."""
    notice = ModelMetadata.from_dict(base["veloxseg"]).notice if base else ""
    return dataclasses.replace(
        metadata,
        license=license or USER_LICENSE,
        base_model=base_model_of(base) if base else "",
        notice=notice,
        evaluation_cases={"validation": validation_cases},
    )
