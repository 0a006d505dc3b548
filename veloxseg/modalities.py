"""Which modality groups a scan has: naming a subset of a model's groups, and drawing random ones in training.

A VeloxSeg model has one attention stream per modality group (config ``group_channels``, one group per channel
for models the trainer builds) and runs on any non-empty subset of them: ``model(x, present=["PET"])``.
``present`` may be

* a list of channel names from the model's metadata (``model.pretrained_cfg["veloxseg"]["channels"]``;
  a multi-channel group is present when all its channels are named), of group indices, or a mix;
* a boolean tensor, (G,) for the whole batch or (N, G) for one subset per sample (training).

:func:`resolve_present` turns any of these into what the network reads (None: every group of every
sample; a tuple of groups shared by the batch; or the (N, G) mask); :func:`random_modality_mask`
draws the masks of ``--modality-dropout``. For whole scans, :func:`channel_of_file` reads which channel
a file holds from its name, and :func:`groups_of_channels` which groups a case's channels make up.
"""

import difflib
import re
from collections.abc import Sequence

import torch

from .config import MODALITY_DROPOUT_MODES

Present = Sequence[str | int] | str | int | torch.Tensor | None


def channel_file_pattern(file_ending: str | None = None) -> re.Pattern[str]:
    """nnU-Net's name of a channel file, ``<case>_XXXX<file_ending>`` (groups ``case`` and ``channel``);
    ``file_ending`` None: .nii or .nii.gz."""
    ending = r"\.nii(\.gz)?" if file_ending is None else re.escape(file_ending)
    return re.compile(rf"^(?P<case>.+)_(?P<channel>\d{{4}}){ending}$")


def channel_file_name(case_id: str, channel: int, file_ending: str = ".nii.gz") -> str:
    """nnU-Net's name of channel ``channel``'s file of a case: ``<case>_0000.nii.gz`` for the first."""
    return f"{case_id}_{channel:04d}{file_ending}"


CHANNEL_NUMBER = channel_file_pattern()  # <case>_0000.nii.gz


def resolve_present(
    present: Present, group_channel_names: Sequence[Sequence[str]], batch: int, device: torch.device | None = None
) -> tuple[int, ...] | torch.Tensor | None:
    """``present`` (see the module) as the network reads it: None when every sample has every group (the
    network then runs exactly as without ``present``), a tuple of group indices when all samples have the
    same groups (plain Python: no data-dependent ops, so it compiles and exports), else an (N=batch, G)
    bool mask of the groups each sample has.

    group_channel_names: the channel names of each group, in group order. Raises ValueError naming the problem
    (an unknown name, a group index out of range, a partly named group, a sample with no group).
    """
    if present is None:
        return None
    groups = len(group_channel_names)
    if not isinstance(present, torch.Tensor):
        named = tuple(_named_groups(present, group_channel_names))
        return None if len(named) == groups else named
    if present.dtype != torch.bool or present.shape not in ((groups,), (batch, groups)):
        raise ValueError(
            f"present as a tensor must be bool of shape ({groups},) or (batch={batch}, {groups}) for the "
            f"model's {groups} modality groups, got {present.dtype} of shape {tuple(present.shape)}"
        )
    mask = present.to(device).expand(batch, groups)
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"present leaves sample(s) {empty} with no modality group: at least one group is needed")
    if bool(mask.all()):
        return None
    if bool((mask == mask[0]).all()):
        return tuple(mask[0].nonzero().flatten().tolist())
    return mask


def _named_groups(present: Sequence[str | int] | str | int, group_channel_names: Sequence[Sequence[str]]) -> list[int]:
    """The group indices a list of channel names and group indices names."""
    items = [present] if isinstance(present, (str, int)) else list(present)
    if not items:
        raise ValueError("present names no modality group: give at least one channel name or group index")
    names = [name for channels in group_channel_names for name in channels]
    groups, named = set(), set()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise ValueError(f"present takes channel names or group indices, got {item!r}")
        if isinstance(item, int):
            if not 0 <= item < len(group_channel_names):
                raise ValueError(f"present: group index {item} is out of range for {len(group_channel_names)} groups")
            groups.add(item)
        elif item in names:
            named.add(item)
        else:
            lowered = {name.lower(): name for name in names}
            close = difflib.get_close_matches(item.lower(), lowered, n=1)
            hint = f" (did you mean {lowered[close[0]]!r}?)" if close else ""
            raise ValueError(f"present: unknown channel {item!r}{hint}; the model's channels are {names}")
    for group, channels in enumerate(group_channel_names):
        if named & set(channels) and not set(channels) <= named:
            raise ValueError(
                f"present names only {sorted(named & set(channels))} of modality group {group}'s channels "
                f"{list(channels)}: a group is present with all its channels or not at all"
            )
        if set(channels) <= named:
            groups.add(group)
    return sorted(groups)




def random_modality_mask(
    batch: int,
    num_groups: int,
    probability: float,
    generator: torch.Generator | None = None,
    mode: str = "uniform",
) -> torch.Tensor:
    """(batch, num_groups) bool mask of the groups each sample keeps, for modality dropout.

    * ``uniform``: each sample keeps every group with probability ``1 - probability``, else one of the
      2^G - 2 non-empty proper subsets of its groups, all equally likely;
    * ``per-group``: each group of each sample is dropped on its own coin with probability ``probability``;
      a sample that lost every group keeps one of them, drawn uniformly.

    Uniform is the trainer's default: inference asks for every subset alike (a CT without its PET, an MRI
    study without one sequence), while per-group drops make the small subsets rare as G grows (one
    modality of four: 4 of the 14 proper subsets uniformly, 4 p^3 (1 - p) of all draws per-group) and, at
    the same ``probability``, train on the full set less often ((1 - p)^G of the draws). The measured
    comparison is in docs/model-contract.md (Missing modalities).
    """
    if mode not in MODALITY_DROPOUT_MODES:
        raise ValueError(f"modality dropout mode must be one of {MODALITY_DROPOUT_MODES}, got {mode!r}")
    if num_groups < 2:
        raise ValueError(f"modality dropout needs a model with 2 or more modality groups, this one has {num_groups}")
    if mode == "per-group":
        kept = torch.rand(batch, num_groups, generator=generator) >= probability
        rescued = torch.randint(num_groups, (batch,), generator=generator)  # the group a sample left empty keeps
        one = torch.arange(num_groups) == rescued[:, None]
        return torch.where(kept.any(1, keepdim=True), kept, one)
    drop = torch.rand(batch, generator=generator) < probability
    codes = torch.randint(1, 2**num_groups - 1, (batch,), generator=generator)  # bit g: group g is kept
    kept = (codes[:, None] >> torch.arange(num_groups)) & 1 == 1
    return torch.where(drop[:, None], kept, torch.ones_like(kept))


def channel_of_file(name: str, channel_names: Sequence[str] = ()) -> tuple[str, int] | None:
    """(case, channel index) of a file named ``<case>_XXXX.nii[.gz]`` (nnU-Net's channel number) or
    ``<case>_<channel name>.nii[.gz]`` (a name of ``channel_names``, any case: ``case7_PET.nii.gz``);
    None when the name says neither."""
    match = CHANNEL_NUMBER.match(name)
    if match:
        return match["case"], int(match["channel"])
    lowered = name.lower()
    for index, channel in enumerate(channel_names):
        for ending in (f"_{channel}.nii.gz".lower(), f"_{channel}.nii".lower()):
            if lowered.endswith(ending) and len(name) > len(ending):
                return name[: -len(ending)], index
    return None


def groups_of_channels(channels: Sequence[int], group_channel_names: Sequence[Sequence[str]]) -> list[int] | None:
    """The modality groups whose channels (indices into the model's input channels) are all in
    ``channels``; None when that is every group. Raises ValueError for an index beyond the model's
    channels, a channel given twice, a group given in part, or no channel."""
    names = [name for group in group_channel_names for name in group]
    bad = sorted({c for c in channels if not 0 <= c < len(names)})
    if bad:
        raise ValueError(f"channel(s) {bad} do not exist: the model has {len(names)} ({', '.join(names)})")
    if len(set(channels)) != len(channels):
        raise ValueError(f"channel(s) {sorted({c for c in channels if list(channels).count(c) > 1})} given twice")
    if not channels:
        raise ValueError(f"no input channel given: the model reads {', '.join(names)} (at least one of its groups)")
    groups, first = [], 0
    for group, members in enumerate(group_channel_names):
        indices = set(range(first, first + len(members)))
        first += len(members)
        if indices & set(channels) and not indices <= set(channels):
            raise ValueError(
                f"modality group {group} needs all its channels {list(members)}, got only "
                f"{[names[c] for c in sorted(indices & set(channels))]}"
            )
        if indices <= set(channels):
            groups.append(group)
    return None if len(groups) == len(group_channel_names) else groups
