"""Model zoo: the VeloxSeg variants (:mod:`veloxseg.variants`) registered in timm's registry.

After ``import veloxseg``, ``timm.create_model("veloxseg_small")`` and ``timm.list_models("veloxseg*")``
work as well as :func:`create_model` / :func:`list_models` here.
"""

import dataclasses
import difflib
import fnmatch
from typing import Any

import timm
from timm.models import build_model_with_cfg, register_model, resolve_pretrained_cfg
from torch import nn

from .config import NUM_LEVELS, renamed_fields
from .hub import VeloxSeg, create_from_hub, load_pretrained, published_config
from .metadata import model_metadata
from .variants import VARIANTS, default_cfgs, describe_3d, translate_timm_args, variant_cfg

# timm's register_model reads the pretrained configs from ``default_cfgs`` of the entrypoints' module.
__all__ = ["create_model", "default_cfgs", "list_models"]


def _create_veloxseg(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build ``variant`` through timm's builder. timm's argument names ``num_classes`` and ``in_chans``
    are translated (:func:`veloxseg.variants.translate_timm_args`); with ``features_only`` the model is
    timm's feature wrapper of the encoder (:meth:`VeloxSeg.forward_intermediates`), pruned after the
    deepest level in ``out_indices``, with the encoder's part of the pretrained weights."""
    cache_dir = kwargs.pop("cache_dir", None)
    features_only = kwargs.get("features_only", False)
    if isinstance(kwargs.get("pretrained_cfg"), dict):  # a config.json's (hf-hub:/local-dir: names)
        kwargs["pretrained_cfg"] = variant_cfg(**kwargs["pretrained_cfg"])
    tag_named = isinstance(kwargs.get("pretrained_cfg"), str)
    cfg = resolve_pretrained_cfg(variant, kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None))
    settings, published = VARIANTS[variant], None
    if pretrained or tag_named:  # weights asked for, or a tag named
        # A published tag's network is the one its config.json records (classes, channels, ROI), as for
        # hf-hub: names; ``kwargs`` change it (and the weights are adapted).
        published = published_config(cfg.to_dict(), cache_dir)
        if published is not None:
            settings = published.config.to_dict()
            cfg = dataclasses.replace(cfg, veloxseg=published.pretrained_cfg["veloxseg"])
    # timm's builder reads input_size as 2-D (C, H, W) to fill in_chans / img_size: it gets none (the 3-D one
    # is set below, from the network built), and in_chans / num_classes / global_pool / img_size are dropped.
    model = build_model_with_cfg(
        VeloxSeg,
        variant,
        pretrained=False,  # timm's loader adapts 2-D stems and classifiers only; ours is in veloxseg.hub
        pretrained_cfg=dataclasses.replace(cfg, input_size=None),
        feature_cfg=dict(feature_cls="getter", out_indices=tuple(range(NUM_LEVELS))),
        kwargs_filter=("num_classes", "in_chans", "global_pool", "img_size"),
        **{**settings, **translate_timm_args(_current_names(kwargs))},
    )
    network = model.model if features_only else model
    cfg, metadata = network.config, model_metadata(network).to_dict()
    network.pretrained_cfg.update(veloxseg=metadata, **describe_3d(cfg, metadata))
    if pretrained:
        load_pretrained(network, cache_dir=cache_dir, source=published)
    if features_only:
        model.pretrained_cfg.update({k: network.pretrained_cfg[k] for k in ("veloxseg", *describe_3d(cfg, metadata))})
    return model


def _current_names(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the old names of renamed config fields in the new ones (:func:`renamed_fields`): silently
    for the values timm's ``hf-hub:`` / ``local-dir:`` loader took from a config.json (and passes again as
    ``pretrained_model_args``), with a DeprecationWarning for the caller's, which override them."""
    stored = kwargs.get("pretrained_model_args") or {}
    from_file = {k: v for k, v in kwargs.items() if k in stored and stored[k] is v}
    given = {k: v for k, v in kwargs.items() if k not in from_file}
    return {**renamed_fields(from_file, warn=False), **renamed_fields(given, warn=True)}


@register_model
def veloxseg_tiny(pretrained: bool = False, **kwargs: Any) -> VeloxSeg:
    return _create_veloxseg("veloxseg_tiny", pretrained, **kwargs)


@register_model
def veloxseg_small(pretrained: bool = False, **kwargs: Any) -> VeloxSeg:
    return _create_veloxseg("veloxseg_small", pretrained, **kwargs)


@register_model
def veloxseg_base(pretrained: bool = False, **kwargs: Any) -> VeloxSeg:
    return _create_veloxseg("veloxseg_base", pretrained, **kwargs)


@register_model
def veloxseg_small_hr(pretrained: bool = False, **kwargs: Any) -> VeloxSeg:
    return _create_veloxseg("veloxseg_small_hr", pretrained, **kwargs)


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
