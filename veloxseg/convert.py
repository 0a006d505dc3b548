"""Load checkpoints trained with the authors' original VeloxSeg code."""

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .adapt import state_dict_problems
from .config import VeloxSegConfig
from .hub import VeloxSeg

_logger = logging.getLogger(__name__)

# The authors' constructor argument -> ours.
REFERENCE_CONFIG_NAMES = {
    "input_size": "roi_size",
    "patch_size": "patch_size",
    "in_ch": "group_channels",
    "n_classes": "n_classes",
    "base_ch": "base_ch",
    "attn_base_ch": "attn_base_ch",
    "conv_depths": "conv_depths",
    "depths": "depths",
    "kernel_sizes": "kernel_sizes",
    "min_dim_group": "min_dim_group",
    "conv_expansion_factor": "conv_expansion",
    "ffn_expansion_ratio": "ffn_expansion",
    "min_big_window_sizes": "big_windows",
    "min_small_window_sizes": "small_windows",
    "num_heads": "num_heads",
    "min_dim_head": "min_dim_head",
    "attn_drop": "attn_drop",
    "proj_drop": "proj_drop",
    "conv_drop": "conv_drop",
}

# (authors' key pattern, our key) in the order tried; q/k/v are handled separately.
_ATTN = r"encoder\.encoder_attn\.layers\.(\d+)"
_RULES = [
    (r"encoder\.encoder_attn\.patch_embeds\.(\d+)\.proj\.", r"attention.patch_embeds.\1."),
    (_ATTN + r"\.blocks\.(\d+)\.attn\.input_norms\.(\d+)\.", r"attention.levels.\1.\2.attn.norms.\3."),
    (_ATTN + r"\.blocks\.(\d+)\.attn\.mix_channels\.(\d+)\.", r"attention.levels.\1.\2.attn.projs.\3."),
    (_ATTN + r"\.blocks\.(\d+)\.attn\.position_embedding\.", r"attention.levels.\1.\2.attn."),
    (_ATTN + r"\.blocks\.(\d+)\.norms\.(\d+)\.", r"attention.levels.\1.\2.norms.\3."),
    (_ATTN + r"\.blocks\.(\d+)\.ffns\.(\d+)\.linear1\.", r"attention.levels.\1.\2.ffns.\3.0."),
    (_ATTN + r"\.blocks\.(\d+)\.ffns\.(\d+)\.linear2\.", r"attention.levels.\1.\2.ffns.\3.3."),
    (_ATTN + r"\.downs\.(\d+)\.", r"attention.merges.\1.\2."),
    (r"encoder\.attn2conv_(\d)\.0\.", r"encoder.mixers.{\1-1}."),
    (r"encoder\.encoder_conv\.down(\d)\.down\.", r"encoder.downs.{\1-1}."),
    (r"encoder\.encoder_conv\.layer(\d)\.", r"encoder.stages.{\1-1}."),
    (r"decoder\.out_conv1\.0\.", r"decoder.head."),
    (r"decoder\.out_conv(\d)\.", r"decoder.aux_heads.{\1-2}."),
    (r"decoder\.layer_up(\d)\.up\.", r"decoder.ladder.ups.{\1-1}.up."),
    (r"decoder\.layer(\d)\.", r"decoder.ladder.stages.{\1-1}."),
    (r"rc_decoders\.(\d+)\.enc2rc_(\d)\.0\.", r"teachers.\1.fuse.{\2-1}."),
    (r"rc_decoders\.(\d+)\.out_conv\.0\.", r"teachers.\1.head."),
    (r"rc_decoders\.(\d+)\.layer_up(\d)\.up\.", r"teachers.\1.ladder.ups.{\2-1}.up."),
    (r"rc_decoders\.(\d+)\.layer(\d)\.", r"teachers.\1.ladder.stages.{\2-1}."),
]
# Inside a JLC block (encoder or decoder stage): the authors' Sequential indices -> our names.
_JLC_RULES = [
    (r"\.(\d+)\.spatial_convs\.(\d+)\.0\.", r".\1.spatial_convs.\2."),
    (r"\.(\d+)\.channel_conv\.1\.", r".\1.expand."),
    (r"\.(\d+)\.channel_conv\.3\.", r".\1.project."),
]
_QKV = re.compile(_ATTN + r"\.blocks\.(\d+)\.attn\.qkv_proj\.(\d+)\.([012])\.(weight|bias)$")
_MINUS = re.compile(r"\{(\d+)-(\d)\}")


def _rename(key: str) -> str | None:
    """Our name for one of the authors' keys, or None when no rule matches."""
    for pattern, target in _RULES:
        match = re.match(pattern, key)
        if match:
            new = match.expand(target) + key[match.end() :]
            new = _MINUS.sub(lambda m: str(int(m.group(1)) - int(m.group(2))), new)
            for jlc_pattern, jlc_target in _JLC_RULES:
                new = re.sub(jlc_pattern, jlc_target, new)
            return new
    return None


def convert_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a state dict saved by the authors' code to this package's names.

    The separate q, k and v projections of each group become one fused ``qkv`` conv. Raises
    ``KeyError`` listing every key no rule knows.
    """
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    qkv_parts: dict[str, dict[int, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        qkv = _QKV.match(key)
        if qkv:
            level, block, group, which, kind = qkv.groups()
            target = f"attention.levels.{level}.{block}.attn.qkv.{group}.{kind}"
            qkv_parts.setdefault(target, {})[int(which)] = value
            continue
        new = _rename(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise KeyError(f"{len(unknown)} keys are not VeloxSeg parameters of the authors' code: {unknown[:10]}")
    for target, parts in qkv_parts.items():
        if sorted(parts) != [0, 1, 2]:
            raise KeyError(f"{target}: the authors' checkpoint lacks q, k or v (has {sorted(parts)})")
        out[target] = torch.cat([parts[0], parts[1], parts[2]], 0)
    return out


def config_from_reference(config: Mapping[str, Any] | str, **overrides: Any) -> VeloxSegConfig:
    """Our config from the authors' model config (a dict, a JSON string or a JSON file's path; their
    argument names). Raises ValueError naming the config when it is none of these."""
    if isinstance(config, str):
        text = Path(config).read_text() if config.strip().endswith(".json") and Path(config).is_file() else config
        try:
            config = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"config {config[:80]!r} is neither a JSON object nor the path of a JSON file holding one ({err})"
            ) from None
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a JSON object of the authors' model arguments, got {type(config).__name__}")
    values = {}
    for name, value in config.items():
        if name in REFERENCE_CONFIG_NAMES:
            values[REFERENCE_CONFIG_NAMES[name]] = value
        elif name == "spatial_dim" and value != 3:
            raise ValueError(f"VeloxSeg is 3-D only; the config has spatial_dim={value}")
        elif name != "spatial_dim":
            _logger.warning("load_reference: ignoring the authors' config argument %r=%r", name, value)
    return VeloxSegConfig.from_dict({**values, **overrides})


def load_reference(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | str) -> VeloxSeg:
    """Build VeloxSeg from the authors' config and load their state dict, strictly.

    Teachers and deep-supervision heads are built when the checkpoint has them. Every tensor must
    be used and every parameter filled; the authors' relative position index buffers are checked
    against ours. Raises ``ValueError`` on any mismatch.
    """
    converted = convert_reference_state_dict(state_dict)
    cfg = config_from_reference(
        config,
        teachers=any(k.startswith("teachers.") for k in converted),
        deep_supervision=any(k.startswith("decoder.aux_heads.") for k in converted),
    )
    model = VeloxSeg(cfg)
    for key in [k for k in converted if k.endswith("relative_position_index")]:
        ours = model.get_buffer(key)
        if ours.shape != converted[key].shape or not torch.equal(ours, converted.pop(key).to(ours.dtype)):
            raise ValueError(f"{key}: the checkpoint's relative position index differs from this config's windows")
    problems = state_dict_problems(model, converted)
    if problems:
        raise ValueError(f"checkpoint does not fit the config ({len(problems)} problems): " + "; ".join(problems[:12]))
    model.load_state_dict(converted, strict=True)
    return model
