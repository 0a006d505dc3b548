"""Model zoo: VeloxSeg variants registered in timm's registry, with their pretrained configs.

After ``import veloxseg``, ``timm.create_model("veloxseg_small")`` and ``timm.list_models("veloxseg*")``
work as well as :func:`create_model` / :func:`list_models` here.
"""

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Any

import timm
from timm.models import PretrainedCfg, build_model_with_cfg, generate_default_cfgs, register_model

from .metadata import ChannelInfo, ModelMetadata
from .model import VeloxSeg

# Width settings per variant; everything else is the paper's configuration (VeloxSegConfig defaults).
VARIANTS: dict[str, dict[str, Any]] = {
    "veloxseg_tiny": dict(
        base_ch=8, attn_base_ch=8, min_dim_group=(4, 4, 8, 8), num_heads=(1, 1, 2, 2), min_dim_head=(4, 4, 8, 8)
    ),
    "veloxseg_small": dict(),  # the paper's AutoPET-II network
    "veloxseg_base": dict(
        base_ch=32, attn_base_ch=32, min_dim_group=(8, 16, 16, 32), num_heads=(2, 4, 4, 8), min_dim_head=(8, 16, 16, 32)
    ),
}


@dataclass
class VeloxSegPretrainedCfg(PretrainedCfg):
    """timm's pretrained config plus the 3-D metadata (:class:`ModelMetadata` as a dict) under ``veloxseg``."""

    veloxseg: dict[str, Any] | None = None


def _cfg(**kwargs: Any) -> VeloxSegPretrainedCfg:
    """A pretrained config. timm's fields are 2-D classification ones (a 3-long input_size, ImageNet
    mean/std, a classifier name): ours leave them unset and keep the 3-D metadata under ``veloxseg``.
    Weights come from ``hf_hub_id`` ("org/name" or "org/name@revision"), file ``hf_hub_filename``
    (default model.safetensors; safetensors only), or from a local folder in ``file``.
    """
    return VeloxSegPretrainedCfg(
        **{
            "num_classes": -1,  # -1: timm does not pass num_classes to the model (ours is n_classes)
            "input_size": None,  # timm asserts a 3-long (C, H, W) input_size; ours lives in roi_size
            "mean": None,  # no ImageNet statistics: normalisation is per channel, in the 3-D metadata
            "std": None,
            "license": "apache-2.0",
            "first_conv": "attention.patch_embeds.0",
            "classifier": "decoder.head",
            "paper_name": "VeloxSeg: Johnson-Lindenstrauss Lemma Guided Network for Efficient 3D Medical Segmentation",
            **kwargs,
        }
    )


# The paper's AutoPET-II task (the variants' default config: PET and CT as two single-channel groups,
# 96^3 ROI). The trainer's config.json replaces spacing and normalisation when weights are published.
AUTOPET2 = ModelMetadata(
    channels=[ChannelInfo("PET", group=0), ChannelInfo("CT", group=1)],
    labels={"background": 0, "lesion": 1},
    training_data="AutoPET-II (MICCAI 2023 autoPET challenge): whole-body FDG-PET/CT with lesion masks",
)

# Pretrained tags. A tag gets an hf_hub_id only once the trainer's weights for it are on the Hub
# (hub/publish.py); until then pretrained=True says that none are published. The first tag with
# weights becomes the variant's default; while none has any, the default is ``untrained``.
default_cfgs = generate_default_cfgs(
    {
        "veloxseg_tiny.untrained": _cfg(),
        "veloxseg_small.untrained": _cfg(),
        "veloxseg_base.untrained": _cfg(),
        "veloxseg_small.autopet2": _cfg(veloxseg=AUTOPET2.to_dict()),
    }
)


def _create_veloxseg(variant: str, pretrained: bool = False, **kwargs: Any) -> VeloxSeg:
    cache_dir = kwargs.pop("cache_dir", None)
    if isinstance(kwargs.get("pretrained_cfg"), dict):  # a config.json's (hf-hub:/local-dir: names)
        kwargs["pretrained_cfg"] = _cfg(**kwargs["pretrained_cfg"])
    # timm fills in_chans / num_classes / global_pool from the 2-D pretrained config: drop them.
    model = build_model_with_cfg(
        VeloxSeg,
        variant,
        pretrained=False,  # timm's loader adapts 2-D stems and classifiers only; ours is in veloxseg.hub
        kwargs_filter=("num_classes", "in_chans", "global_pool"),
        **{**VARIANTS[variant], **kwargs},
    )
    cfg, metadata = model.config, model.pretrained_cfg.get("veloxseg")
    model.pretrained_cfg["veloxseg"] = ModelMetadata.fitting(metadata, cfg.in_ch, cfg.n_classes).to_dict()
    if pretrained:
        from .hub import load_pretrained

        load_pretrained(model, cache_dir=cache_dir)
    return model


@register_model
def veloxseg_tiny(pretrained: bool = False, **kwargs: Any) -> VeloxSeg:
    return _create_veloxseg("veloxseg_tiny", pretrained, **kwargs)


@register_model
def veloxseg_small(pretrained: bool = False, **kwargs: Any) -> VeloxSeg:
    return _create_veloxseg("veloxseg_small", pretrained, **kwargs)


@register_model
def veloxseg_base(pretrained: bool = False, **kwargs: Any) -> VeloxSeg:
    return _create_veloxseg("veloxseg_base", pretrained, **kwargs)


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Registered VeloxSeg names matching a wildcard pattern (with tags when ``pretrained``)."""
    names = timm.list_models("veloxseg*", pretrained=pretrained)
    return [n for n in names if fnmatch.fnmatch(n, pattern)]


def create_model(name: str, pretrained: bool | None = None, **overrides: Any) -> VeloxSeg:
    """Build a VeloxSeg model by registry name (``veloxseg_small``, ``veloxseg_small.<tag>``),
    ``hf-hub:org/repo[@revision]`` or ``local-dir:/path``; ``overrides`` change config fields.

    ``pretrained`` defaults to False for registry names (as in timm) and to True for Hub repos and
    local folders, whose weights are the reason to name them; pass False for the architecture only.
    """
    if name.startswith(("hf-hub:", "local-dir:")):
        from .hub import create_from_hub

        return create_from_hub(name, pretrained=pretrained is not False, **overrides)
    pretrained = bool(pretrained)
    arch = name.split(".", 1)[0]
    if arch not in VARIANTS:
        close = difflib.get_close_matches(arch, list(VARIANTS), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Available: {', '.join(list_models())}")
    tagged = timm.list_models(f"{arch}.*", include_tags=True)
    if "." in name and name not in tagged:
        tags = ", ".join(tagged)
        raise ValueError(f"unknown pretrained tag {name!r}; tags of {arch}: {tags}")
    return timm.create_model(name, pretrained=pretrained, **overrides)
