"""torch.hub entry points: the VeloxSeg variants, built as :func:`veloxseg.create_model` builds them.

    model = torch.hub.load("<owner>/veloxseg", "veloxseg_small", pretrained=True)  # its default tag
    model = torch.hub.load("<owner>/veloxseg", "create_model", "veloxseg_small.petct_lesions", pretrained=True)
    model = torch.hub.load("<owner>/veloxseg", "veloxseg_small", group_channels=[4], n_classes=4)  # config overrides
"""

# torch.hub.list() lists every public callable of this module: helpers are imported under private names.
from __future__ import annotations

import typing as _typing

import veloxseg as _veloxseg
from veloxseg import create_model

dependencies = ["torch", "timm", "huggingface_hub", "safetensors"]


def veloxseg_tiny(pretrained: bool = False, **overrides: _typing.Any) -> _veloxseg.VeloxSeg:
    """The paper's network at its smallest width; ``pretrained``: its default tag's weights."""
    return create_model("veloxseg_tiny", pretrained=pretrained, **overrides)


def veloxseg_small(pretrained: bool = False, **overrides: _typing.Any) -> _veloxseg.VeloxSeg:
    """The paper's network (AutoPET-II); ``pretrained``: its default tag's weights."""
    return create_model("veloxseg_small", pretrained=pretrained, **overrides)


def veloxseg_base(pretrained: bool = False, **overrides: _typing.Any) -> _veloxseg.VeloxSeg:
    """The paper's network at its largest width; ``pretrained``: its default tag's weights."""
    return create_model("veloxseg_base", pretrained=pretrained, **overrides)


def veloxseg_small_hr(pretrained: bool = False, **overrides: _typing.Any) -> _veloxseg.VeloxSeg:
    """veloxseg_small with a half-resolution detail path (the recommended model); ``pretrained``: its
    default tag's weights."""
    return create_model("veloxseg_small_hr", pretrained=pretrained, **overrides)
