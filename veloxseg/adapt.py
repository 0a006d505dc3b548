"""Fit pretrained VeloxSeg weights to a model built for other inputs, classes or ROI size (fine-tuning).

The 3-D, per-modality-group counterpart of timm's ``adapt_input_conv`` and head re-initialisation:

* input channels: the per-group patch embeds and the stems ``encoder.downs.0`` and ``decoder.detail.stem``
  sum (one channel) or repeat and rescale (more channels) their input-channel axis, per group;
* modality groups: new group g takes the weights of pretrained group ``g % M_src`` (attention
  stream, merges, teachers, and the groups' channel blocks of the mixers and the stem, rescaled by
  ``M_src / M`` so the summed activation keeps its scale); groups beyond the model's are dropped;
* classes: the segmentation heads (``decoder.head``, ``decoder.aux_heads``, ``decoder.detail.out``) are
  re-initialised;
* ROI size: where it changes the number of window scales S of a level, the q/k/v channels
  (read as (scale, head, c)) keep the scales both networks have; new scales keep their fresh
  initialisation. Relative-position tables are kept when the token grid per window is unchanged
  and resampled (trilinear) otherwise.

Every other difference between the two configs is an error, never a silent partial load.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import VeloxSegConfig
from .model import VeloxSeg

_logger = logging.getLogger(__name__)

# Config fields that may differ between the pretrained weights and the model they are loaded into.
ADAPTABLE_FIELDS = (
    "group_channels", "n_classes", "roi_size", "big_windows", "small_windows",
    "attn_drop", "proj_drop", "conv_drop", "drop_path_rate", "deep_supervision", "teachers",
)  # fmt: skip

# A module of one modality group: (prefix).(group).(rest of the name).
_GROUPED = re.compile(
    r"(attention\.patch_embeds|attention\.merges\.\d+|teachers"
    r"|attention\.levels\.\d+\.\d+\.(?:attn\.)?(?:norms|qkv|projs|ffns))\.(\d+)\.(.+)"
)
_SCALED = re.compile(r"(attention\.levels\.\d+\.\d+\.attn)\.(qkv|projs)\.\d+\.(weight|bias)")


@dataclass
class AdaptationReport:
    """What :func:`adapt_state_dict` did, tensor by tensor.

    kept: model tensors loaded unchanged from the pretrained tensor of the same name.
    adapted: model tensor -> how it was made from a pretrained one (other group, resized axis, ...).
    reinitialised: model tensor -> why it keeps the model's fresh initialisation.
    dropped: pretrained tensor -> why nothing in the model uses it.
    """

    kept: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)
    reinitialised: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        """True when every tensor was loaded unchanged and every pretrained tensor was used."""
        return not (self.adapted or self.reinitialised or self.dropped)

    def __str__(self) -> str:
        lines = [
            f"kept {len(self.kept)} tensors unchanged, adapted {len(self.adapted)}, "
            f"re-initialised {len(self.reinitialised)}, dropped {len(self.dropped)}"
        ]
        sections = {"adapted": self.adapted, "re-initialised": self.reinitialised, "dropped": self.dropped}
        for title, entries in sections.items():
            lines += [f"  {title} {key}: {why}" for key, why in entries.items()]
        return "\n".join(lines)


def adapt_state_dict(
    state_dict: Mapping[str, torch.Tensor], source: VeloxSegConfig, model: VeloxSeg
) -> tuple[dict[str, torch.Tensor], AdaptationReport]:
    """Fit ``state_dict``, the weights of a VeloxSeg built with config ``source``, to ``model``.

    Returns a complete state dict for ``model`` (load it with ``strict=True``) and the report, which
    is also logged. Tensors that cannot come from the pretrained ones keep ``model``'s current values.
    Raises ``ValueError`` when the weights do not fit ``source`` or when the configs differ in a field
    outside :data:`ADAPTABLE_FIELDS` (widths, depths, heads, kernels, patch size, ...).
    """
    _check_structure(source, model.config)
    with torch.device("meta"):  # shapes and window layouts of the pretrained network, no memory
        source_model = type(model)(source)
    _check_weights(state_dict, source_model)
    adapted, report, used = {}, AdaptationReport(), set()
    for key, init in model.state_dict().items():
        source_key = _source_key(key, source.num_groups)
        if source_key not in state_dict:  # the pretrained network was built without these modules
            adapted[key] = init
            report.reinitialised[key] = _missing_reason(key)
            continue
        value, how = _adapt_tensor(key, state_dict[source_key], init, source_model, model)
        if value is None:
            adapted[key] = init
            report.reinitialised[key] = report.dropped[source_key] = how
            continue
        if value.shape != init.shape:
            raise ValueError(f"cannot adapt {key}: got {tuple(value.shape)} for the model's {tuple(init.shape)}")
        used.add(source_key)
        adapted[key] = value
        if source_key == key and how is None:
            report.kept.append(key)
        else:
            origin = f"from {source_key}" if source_key != key else ""
            report.adapted[key] = ": ".join(filter(None, [origin, how]))
    for key in state_dict:
        if key not in used and key not in report.dropped:
            report.dropped[key] = _dropped_reason(key, model.config)
    _logger.info("adapted pretrained weights (%s -> %s):\n%s", _summary(source), _summary(model.config), report)
    return adapted, report


def _summary(cfg: VeloxSegConfig) -> str:
    return f"group_channels={list(cfg.group_channels)}, n_classes={cfg.n_classes}, roi_size={list(cfg.roi_size)}"


def _check_structure(source: VeloxSegConfig, target: VeloxSegConfig) -> None:
    differences = [
        f"{f.name} {getattr(source, f.name)} -> {getattr(target, f.name)}"
        for f in dataclasses.fields(VeloxSegConfig)
        if f.name not in ADAPTABLE_FIELDS and getattr(source, f.name) != getattr(target, f.name)
    ]
    if differences:
        raise ValueError(
            f"the pretrained weights cannot be adapted to this model: {'; '.join(differences)} (only "
            f"{', '.join(ADAPTABLE_FIELDS)} may differ from the pretrained config)"
        )


def state_dict_problems(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """What stops ``model.load_state_dict(state_dict, strict=True)``: missing, unexpected and
    wrongly shaped tensors, one line each (empty when it loads)."""
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state_dict]
    problems += [f"unexpected {k}" for k in state_dict if k not in expected]
    problems += [
        f"{k} has shape {tuple(v.shape)}, the model needs {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    return problems


def _check_weights(state_dict: Mapping[str, torch.Tensor], source_model: VeloxSeg) -> None:
    problems = state_dict_problems(source_model, dict(state_dict))
    if problems:
        listed = "; ".join(problems[:10])
        raise ValueError(f"the weights do not match the config they came with ({len(problems)} problems): {listed}")


def _group(key: str) -> int | None:
    match = _GROUPED.fullmatch(key)
    return int(match.group(2)) if match else None


def _source_key(key: str, source_groups: int) -> str:
    """The pretrained tensor a model tensor comes from: group g reads group ``g % source_groups``."""
    match = _GROUPED.fullmatch(key)
    if match is None:
        return key
    prefix, group, rest = match.groups()
    return f"{prefix}.{int(group) % source_groups}.{rest}"


def _missing_reason(key: str) -> str:
    if key.startswith("teachers."):
        return "the pretrained network was built without teachers"
    return "the pretrained network was built without deep supervision"


def _dropped_reason(key: str, target: VeloxSegConfig) -> str:
    if key.startswith("teachers.") and not target.teachers:
        return "the model is built without teachers"
    if key.startswith("decoder.aux_heads.") and not target.deep_supervision:
        return "the model is built without deep supervision"
    return f"modality group {_group(key)} has no counterpart: the model has {target.num_groups} group(s)"


def _adapt_tensor(
    key: str, value: torch.Tensor, init: torch.Tensor, source_model: VeloxSeg, model: VeloxSeg
) -> tuple[torch.Tensor | None, str | None]:
    """(tensor for ``key`` made from pretrained ``value``, what changed: None when nothing did).
    A None tensor means: re-initialise, for the reason given."""
    src, dst = source_model.config, model.config
    group = _group(key)
    heads = ("decoder.head.", "decoder.aux_heads.", "decoder.detail.out.")
    if key.startswith(heads) and src.n_classes != dst.n_classes:
        return None, f"n_classes {src.n_classes} -> {dst.n_classes}: segmentation head re-initialised"
    if re.fullmatch(r"attention\.patch_embeds\.\d+\.weight", key):
        have, want = value.shape[1], dst.group_channels[group]
        return _resize_channels(value, want, 1), None if have == want else f"input channels {have} -> {want}"
    if key in ("encoder.downs.0.weight", "decoder.detail.stem.weight") and src.group_channels != dst.group_channels:
        blocks = value.split(list(src.group_channels), 1)
        parts = [_resize_channels(blocks[g % src.num_groups], c, 1) for g, c in enumerate(dst.group_channels)]
        how = f"input channels in groups {list(src.group_channels)} -> {list(dst.group_channels)}"
        return torch.cat(parts, 1) * (src.num_groups / dst.num_groups), how
    if re.fullmatch(r"encoder\.mixers\.\d+\.weight", key) and src.num_groups != dst.num_groups:
        blocks = value.chunk(src.num_groups, 1)
        parts = [blocks[g % src.num_groups] for g in range(dst.num_groups)]
        how = f"group channel blocks {src.num_groups} -> {dst.num_groups}"
        return torch.cat(parts, 1) * (src.num_groups / dst.num_groups), how
    if re.fullmatch(r"teachers\.\d+\.head\.(weight|bias)", key):
        have, want = src.group_channels[group % src.num_groups], dst.group_channels[group]
        if have == want:
            return value, None
        index = torch.arange(want, device=value.device) % have  # output c*p^3 + offset rebuilds channel c
        return value.unflatten(0, (have, -1))[index].flatten(0, 1), f"reconstructed channels {have} -> {want}"
    if key.endswith(".relative_position_bias_table"):
        prefix = key.rsplit(".", 1)[0]
        before, after = source_model.get_submodule(prefix).tokens, model.get_submodule(prefix).tokens
        if before == after:
            return value, None
        return _resample_table(value, before, after), f"tokens per window {list(before)} -> {list(after)}: resampled"
    scaled = _SCALED.fullmatch(key)
    if scaled and not (scaled.group(2) == "projs" and scaled.group(3) == "bias"):
        before, after = source_model.get_submodule(scaled.group(1)), model.get_submodule(scaled.group(1))
        if len(before.scales) != len(after.scales):
            return _remap_scales(value, init, scaled.group(2), before, after)
    return value, None


def _resize_channels(weight: torch.Tensor, count: int, axis: int) -> torch.Tensor:
    """Input-channel axis to ``count`` channels keeping the response to similar inputs: sum for one
    channel, else repeat the channels cyclically and scale by (old count / new count)."""
    have = weight.shape[axis]
    if count == have:
        return weight
    if count == 1:
        return weight.sum(axis, keepdim=True)
    return weight.index_select(axis, torch.arange(count, device=weight.device) % have) * (have / count)


def _resample_table(table: torch.Tensor, before: tuple[int, ...], after: tuple[int, ...]) -> torch.Tensor:
    """((2n-1)^3, heads) relative-position table for ``before`` tokens per window -> for ``after``."""
    heads = table.shape[1]
    grid = table.T.reshape(1, heads, *(2 * n - 1 for n in before))
    grid = F.interpolate(grid, size=[2 * n - 1 for n in after], mode="trilinear", align_corners=True)
    return grid.reshape(heads, -1).T.contiguous()


def _remap_scales(
    value: torch.Tensor, init: torch.Tensor, kind: str, before: torch.nn.Module, after: torch.nn.Module
) -> tuple[torch.Tensor, str]:
    """q/k/v conv (out axis [q | k | v]) or output projection (in axis [v]) of one group, for a
    level whose number of window scales S or value channels per head changed. Each part is read as
    (scale, head, c); the scales and channels both networks have are copied, the rest keeps ``init``."""
    heads = before.num_heads
    qk = [(len(before.scales), before.qk_head_dim), (len(after.scales), after.qk_head_dim)]
    v = [(len(before.scales), before.v_head_dim), (len(after.scales), after.v_head_dim)]
    parts, axis = ([qk, qk, v], 0) if kind == "qkv" else ([v], 1)
    out = init.clone()
    src_start = dst_start = 0
    for (s1, c1), (s2, c2) in parts:
        src = value.narrow(axis, src_start, s1 * heads * c1).unflatten(axis, (s1, heads, c1))
        dst = out.narrow(axis, dst_start, s2 * heads * c2).unflatten(axis, (s2, heads, c2))
        shared = (slice(None),) * axis + (slice(min(s1, s2)), slice(None), slice(min(c1, c2)))
        dst[shared] = src[shared]
        src_start, dst_start = src_start + s1 * heads * c1, dst_start + s2 * heads * c2
    (s1, c1), (s2, c2) = v
    how = f"window scales {s1} -> {s2}: kept the {min(s1, s2)} shared"
    if c1 != c2:
        how += f"; value channels per head {c1} -> {c2}: kept the first {min(c1, c2)}"
    return out, how
