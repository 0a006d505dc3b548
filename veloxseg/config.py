"""VeloxSeg configuration: every constructor argument, validated, JSON-serialisable."""

import dataclasses
import difflib
import functools
import json
import math
import sys
import types
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin

from .layers.pwa import WindowScale, window_scales

NUM_LEVELS = 4
# how --modality-dropout draws the groups a sample loses (veloxseg.modalities.random_modality_mask); here, beside
# the config, so that the metadata can check a recorded mode without importing the modalities module
MODALITY_DROPOUT_MODES = ("uniform", "per-group")


def _tuple(value: Any) -> Any:
    """Lists (from JSON) to tuples, recursively, so configs compare and hash the same."""
    return tuple(_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# The expected form of a field, where its default is not the clearest example.
_EXAMPLES = {"group_channels": "[1, 1] (two single-channel modality groups) or [4] (one 4-channel group)"}

# Renamed config fields, old name -> new.
RENAMED_FIELDS = {"in_ch": "group_channels"}


def renamed_fields(values: Mapping[str, Any], *, warn: bool) -> dict[str, Any]:
    """``values`` (config fields by name) with the old names of renamed fields (``RENAMED_FIELDS``) replaced
    by the new ones. ``warn``: a DeprecationWarning for each old name, for a caller's keywords; a stored file
    that holds one (a config.json's ``model_args``, written before the rename) is read silently. Raises
    TypeError when a field is given under both names."""
    values = dict(values)
    for old, new in RENAMED_FIELDS.items():
        if old not in values:
            continue
        if new in values:
            raise TypeError(f"{old} and {new} name the same config field: give {new} only ({old} is deprecated)")
        if warn:
            warnings.warn(f"{old} is deprecated: use {new}", DeprecationWarning, stacklevel=_caller_level())
        values[new] = values.pop(old)
    return values


def _caller_level() -> int:
    """The ``stacklevel`` for a warning raised in the caller of this that names the first line outside
    veloxseg and timm: the user's call, whichever entry point it went through."""
    level, frame = 2, sys._getframe(2)  # 2: the caller's caller, for warnings.warn in the caller
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("veloxseg", "timm"):
        level, frame = level + 1, frame.f_back
    return level


def _taking_renamed_fields(cls: type) -> type:
    """``cls`` (a config dataclass) whose constructor also takes the old names of renamed fields, with a
    DeprecationWarning (:func:`renamed_fields`)."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **renamed_fields(kwargs, warn=True))

    cls.__init__ = __init__
    return cls


def _matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` (lists already tuples) has the type ``annotation`` (a config field's type hint)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation in (int, float):  # bool is an int to Python, never to a config; an int is a fine float
        return isinstance(value, (int, annotation)) and not isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(map(_matches, value, args))
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    return isinstance(value, annotation) if isinstance(annotation, type) else True


def _describe(annotation: Any, plural: bool = False) -> str:
    """``annotation`` in words: "an int", "a list of 3 ints", "a list of lists of 3 ints"."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is tuple:
        count = "" if len(args) == 2 and args[1] is Ellipsis else f"{len(args)} "
        return ("lists" if plural else "a list") + f" of {count}{_describe(args[0], plural=True)}"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a, plural) for a in args)
    names = {
        int: ("an int", "ints"),
        float: ("a number", "numbers"),
        bool: ("a bool", "bools"),
        str: ("a string", "strings"),
    }
    return names[annotation][plural] if annotation in names else str(annotation)


@_taking_renamed_fields
@dataclass(frozen=True)
class VeloxSegConfig:
    """Everything that defines a VeloxSeg network. Per-level fields have one entry per level (4).

    The defaults are the paper's AutoPET-II configuration (``veloxseg_small``): PET/CT as two
    single-channel modality groups, 2 classes, 96^3 ROI. ``group_channels`` was ``in_ch`` (still taken, with
    a DeprecationWarning).
    """

    roi_size: tuple[int, int, int] = (96, 96, 96)
    group_channels: tuple[int, ...] = (1, 1)  # channels per modality group
    n_classes: int = 2
    patch_size: int = 4
    base_ch: int = 16  # conv width C_1; C_i = base_ch * 2^(i-1)
    attn_base_ch: int = 16  # attention width A_1
    conv_depths: tuple[int, ...] = (1, 1, 1, 1)
    depths: tuple[int, ...] = (1, 1, 1, 1)  # PWA blocks per level
    kernel_sizes: tuple[int, ...] = (1, 3, 5)
    min_dim_group: tuple[int, ...] = (4, 8, 8, 16)  # channels per JLC conv group
    conv_expansion: tuple[int, ...] = (3, 3, 2, 2)
    ffn_expansion: tuple[int, ...] = (3, 3, 2, 2)
    big_windows: tuple[tuple[int, int, int], ...] = ((3, 3, 3), (6, 6, 6), (3, 3, 3), (3, 3, 3))
    small_windows: tuple[tuple[int, int, int], ...] = ((1, 1, 1),) * 4
    window_scale_factor: int = 2
    num_heads: tuple[int, ...] = (1, 2, 2, 4)
    min_dim_head: tuple[int, ...] = (4, 8, 8, 16)
    attn_drop: float = 0.1
    proj_drop: float = 0.1
    conv_drop: float = 0.1
    # Stochastic depth (timm's drop_path_rate): the deepest encoder block's rate, from 0 at the first, linear
    # over each stream's blocks; it drops the feed-forward branch of PWA and JLC blocks (see PWABlock, JLCBlock).
    drop_path_rate: float = 0.0
    deep_supervision: bool = True
    teachers: bool = True  # build the reconstruction teachers (training only; SDKT)
    detail_ch: int = 0  # width of the half-resolution detail path (layers/detail.py); 0: none, as in the paper

    def __post_init__(self) -> None:
        if isinstance(self.roi_size, int) and not isinstance(self.roi_size, bool):  # a cube, as MONAI takes it
            object.__setattr__(self, "roi_size", (self.roi_size,) * 3)
        for field in dataclasses.fields(self):
            value = _tuple(getattr(self, field.name))
            object.__setattr__(self, field.name, value)
            if not _matches(value, field.type):
                example = _EXAMPLES.get(field.name) or json.dumps(json_ready(field.default))
                raise TypeError(
                    f"config field {field.name} must be {_describe(field.type)}, e.g. {example}; "
                    f"got {json_ready(value)!r}"
                )
        self._validate()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "VeloxSegConfig":
        """Build from a dict of fields (e.g. a caller's keywords); unknown keys are an error, an old name of a
        renamed field a DeprecationWarning. Stored fields (a config.json's ``model_args``): map them with
        ``renamed_fields(values, warn=False)`` first."""
        values = renamed_fields(values, warn=True)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            hints = {k: difflib.get_close_matches(k, [*names, *RENAMED_FIELDS], n=1) for k in unknown}
            hints = {k: RENAMED_FIELDS.get(h[0], h[0]) if h else None for k, h in hints.items()}  # never an old name
            listed = ", ".join(f"{k!r}" + (f" (did you mean {h!r}?)" if h else "") for k, h in hints.items())
            raise TypeError(f"unknown VeloxSeg config argument(s): {listed}; accepted: {sorted(names)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return json_ready(dataclasses.asdict(self))

    def replace(self, **changes: Any) -> "VeloxSegConfig":
        return VeloxSegConfig.from_dict({**dataclasses.asdict(self), **renamed_fields(changes, warn=True)})

    @property
    def num_groups(self) -> int:
        return len(self.group_channels)

    @property
    def in_channels(self) -> int:
        """All input channels, of every modality group (timm's ``in_chans``, MONAI's ``in_channels``)."""
        return sum(self.group_channels)

    @property
    def in_ch(self) -> tuple[int, ...]:
        """Deprecated: ``group_channels``."""
        warnings.warn("in_ch is deprecated: use group_channels", DeprecationWarning, stacklevel=2)
        return self.group_channels

    def conv_width(self, level: int) -> int:
        """C_i for level i = 1..4."""
        return self.base_ch * 2 ** (level - 1)

    def attn_width(self, level: int) -> int:
        """A_i for level i = 1..4."""
        return self.attn_base_ch * 2 ** (level - 1)

    def conv_groups(self, level: int) -> int:
        """Number of JLC conv groups at level i = 1..4."""
        return self.conv_width(level) // self.min_dim_group[level - 1]

    def token_grid(self, level: int) -> tuple[int, int, int]:
        """Attention token grid at level i = 1..4 for the configured ROI."""
        step = self.patch_size * 2 ** (level - 1)
        return tuple(s // step for s in self.roi_size)

    def level_scales(self, level: int) -> list[WindowScale]:
        return window_scales(
            self.token_grid(level),
            self.big_windows[level - 1],
            self.small_windows[level - 1],
            self.window_scale_factor,
        )

    def _validate(self) -> None:
        """Raise ValueError naming the first bad setting: of the model as a whole, then of its levels."""
        self._check_settings()
        self._check_levels()

    def _check_settings(self) -> None:
        """Raise ValueError for a setting out of its range: per-level lists of the wrong length, the ROI, channel
        groups, classes, drop path, detail path or kernel sizes."""
        per_level = (
            "conv_depths", "depths", "min_dim_group", "conv_expansion", "ffn_expansion",
            "big_windows", "small_windows", "num_heads", "min_dim_head",
        )  # fmt: skip
        for name in per_level:
            if len(getattr(self, name)) != NUM_LEVELS:
                raise ValueError(f"{name} needs {NUM_LEVELS} entries (one per level), got {list(getattr(self, name))}")
        if len(self.roi_size) != 3 or any(not isinstance(s, int) or s <= 0 for s in self.roi_size):
            raise ValueError(f"roi_size must be three positive ints (D, H, W), got {self.roi_size}")
        if not self.group_channels or any(not isinstance(c, int) or c <= 0 for c in self.group_channels):
            raise ValueError(
                f"group_channels must list the channels of each modality group, e.g. [1, 1] or [4]; "
                f"got {self.group_channels}"
            )
        if self.n_classes < 2:
            raise ValueError(
                f"n_classes must be >= 2, got {self.n_classes}: "
                "n_classes counts the background: use 2 for one structure"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if not isinstance(self.detail_ch, int) or self.detail_ch < 0:
            raise ValueError(f"detail_ch must be an int >= 0 (0: no detail path), got {self.detail_ch!r}")
        if self.detail_ch and self.patch_size != 4:
            raise ValueError(
                f"detail_ch needs patch_size 4 (the detail path brings 1/4-resolution features to 1/2), "
                f"got patch_size {self.patch_size}"
            )
        if not self.kernel_sizes or any(k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError(f"kernel_sizes must be odd (same-size padding), got {list(self.kernel_sizes)}")

    def _check_levels(self) -> None:
        """Raise ValueError when a level cannot be built: conv groups that do not split its width, an ROI that
        does not downsample evenly or to more than one voxel, heads or windows that do not fit its tokens."""
        for level in range(1, NUM_LEVELS + 1):
            width, min_group = self.conv_width(level), self.min_dim_group[level - 1]
            if not 1 <= min_group <= width or width % (width // min_group):
                raise ValueError(
                    f"level {level}: min_dim_group {min_group} does not split the {width} conv channels into "
                    f"equal groups; use a divisor of {width}"
                )
        downsampling = self.patch_size * 2 ** (NUM_LEVELS - 1)
        if any(s % downsampling for s in self.roi_size):
            raise ValueError(
                f"roi_size {list(self.roi_size)}: each axis must be a multiple of {downsampling} "
                f"(patch {self.patch_size} x 2^{NUM_LEVELS - 1} downsamplings)"
            )
        if math.prod(self.token_grid(NUM_LEVELS)) < 2:
            raise ValueError(
                f"roi_size {list(self.roi_size)} leaves a single voxel at level {NUM_LEVELS} (instance norm needs "
                f"more): use at least {2 * downsampling} on some axis"
            )
        for level in range(1, NUM_LEVELS + 1):
            if self.num_heads[level - 1] < 1 or self.min_dim_head[level - 1] < 1:
                raise ValueError(f"level {level}: num_heads and min_dim_head must be >= 1")
            try:
                self.level_scales(level)
            except ValueError as err:
                step = self.patch_size * 2 ** (level - 1)
                raise ValueError(
                    f"roi_size {list(self.roi_size)} does not work with big_windows {list(self.big_windows[level - 1])} "
                    f"at level {level} (1 token = {step} voxels): {err}"
                ) from None


def json_ready(value: Any) -> Any:
    """Tuples to lists, recursively (for json.dumps)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value
