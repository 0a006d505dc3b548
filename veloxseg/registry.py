"""Model zoo: VeloxSeg variants registered in timm's registry, with their pretrained configs.

After ``import veloxseg``, ``timm.create_model("veloxseg_small")`` and ``timm.list_models("veloxseg*")``
work as well as :func:`create_model` / :func:`list_models` here.
"""

import difflib
import fnmatch
from typing import Any

import timm
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

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


def _cfg(**kwargs: Any) -> dict[str, Any]:
    """A pretrained config. timm's fields are 2-D classification ones (a 3-long input_size, ImageNet
    mean/std, a classifier name): ours leave them unset and keep the 3-D metadata under ``veloxseg``.
    """
    return {
        "num_classes": -1,  # -1: timm does not pass num_classes to the model (ours is n_classes)
        "input_size": None,  # timm asserts a 3-long (C, H, W) input_size; ours lives in roi_size
        "mean": None,  # no ImageNet statistics: normalisation is per channel, in the 3-D metadata
        "std": None,
        "license": "apache-2.0",
        "first_conv": "attention.patch_embeds.0",
        "classifier": "decoder.head",
        **kwargs,
    }


# Pretrained tags. A tag without weights on the Hub yet has no hf_hub_id: pretrained=True says so.
default_cfgs = generate_default_cfgs(
    {
        "veloxseg_tiny.untrained": _cfg(),
        "veloxseg_small.untrained": _cfg(),
        "veloxseg_base.untrained": _cfg(),
    }
)


def _create_veloxseg(variant: str, pretrained: bool = False, **kwargs: Any) -> VeloxSeg:
    # timm fills in_chans / num_classes / global_pool from the 2-D pretrained config: drop them.
    model = build_model_with_cfg(
        VeloxSeg,
        variant,
        pretrained=False,  # timm's loader adapts 2-D stems and classifiers only; ours is in veloxseg.hub
        kwargs_filter=("num_classes", "in_chans", "global_pool"),
        **{**VARIANTS[variant], **kwargs},
    )
    if pretrained:
        from .hub import load_pretrained

        load_pretrained(model)
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


def create_model(name: str, pretrained: bool = False, **overrides: Any) -> VeloxSeg:
    """Build a VeloxSeg model by registry name (``veloxseg_small``, ``veloxseg_small.<tag>``),
    ``hf-hub:org/repo[@revision]`` or ``local-dir:/path``; ``overrides`` change config fields.
    """
    if name.startswith(("hf-hub:", "local-dir:")):
        from .hub import create_from_hub

        return create_from_hub(name, pretrained=pretrained, **overrides)
    arch = name.split(".", 1)[0]
    if arch not in VARIANTS:
        close = difflib.get_close_matches(arch, list(VARIANTS), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Available: {', '.join(list_models())}")
    if "." in name and name not in list_models(pretrained=True):
        tags = ", ".join(list_models(f"{arch}.*", pretrained=True))
        raise ValueError(f"unknown pretrained tag {name!r}; tags of {arch}: {tags}")
    return timm.create_model(name, pretrained=pretrained, **overrides)
