"""Where a model's weights come from, kept with every copy of them: the base model a run started
from, the license, the NOTICE its data asks to keep, and which split each metric was measured on.

The facts live in the 3-D metadata (:class:`veloxseg.metadata.ModelMetadata`: ``license``,
``notice``, ``base_model``, ``metrics``, ``evaluation_cases``); ``save_pretrained`` writes the notice
as NOTICE, the exports embed it, the model card reads the rest.
"""

import dataclasses
from typing import Any

from .metadata import ModelMetadata

# A metric's split from its name's prefix (the trainer's val_*, make_tag's test_*).
SPLITS = {"val_": "validation", "test_": "test"}
USER_LICENSE = "other"  # a trained model's license unless its trainer names one: its data's terms are unknown


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
