"""Which modality groups a scan has: naming a subset of a model's groups, and drawing random ones in training.

A VeloxSeg model has one attention stream per modality group (config ``in_ch``, one group per channel
for models the trainer builds) and runs on any non-empty subset of them: ``model(x, present=["PET"])``.
``present`` may be

* a list of channel names from the model's metadata (``model.pretrained_cfg["veloxseg"]["channels"]``;
  a multi-channel group is present when all its channels are named), of group indices, or a mix;
* a boolean tensor, (G,) for the whole batch or (N, G) for one subset per sample (training).

:func:`present_mask` turns any of these into the (N, G) mask the network reads (or None: every group of
every sample); :func:`random_modality_mask` draws the masks of ``--modality-dropout``.
"""

import difflib
from collections.abc import Sequence

import torch

Present = Sequence[str | int] | str | int | torch.Tensor | None


def present_mask(
    present: Present, group_channels: Sequence[Sequence[str]], batch: int, device: torch.device | None = None
) -> torch.Tensor | None:
    """``present`` (see the module) as an (N=batch, G) bool mask of the groups each sample has; None when
    every sample has every group (the network then runs exactly as without ``present``).

    group_channels: the channel names of each group, in group order. Raises ValueError naming the problem
    (an unknown name, a group index out of range, a partly named group, a sample with no group).
    """
    if present is None:
        return None
    groups = len(group_channels)
    if isinstance(present, torch.Tensor):
        if present.dtype != torch.bool or present.shape not in ((groups,), (batch, groups)):
            raise ValueError(
                f"present as a tensor must be bool of shape ({groups},) or (batch={batch}, {groups}) for the "
                f"model's {groups} modality groups, got {present.dtype} of shape {tuple(present.shape)}"
            )
        mask = present.to(device).expand(batch, groups)
    else:
        mask = torch.zeros(groups, dtype=torch.bool)
        mask[_named_groups(present, group_channels)] = True
        mask = mask.to(device).expand(batch, groups)
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"present leaves sample(s) {empty} with no modality group: at least one group is needed")
    return None if bool(mask.all()) else mask


def _named_groups(present: Sequence[str | int] | str | int, group_channels: Sequence[Sequence[str]]) -> list[int]:
    """The group indices a list of channel names and group indices names."""
    items = [present] if isinstance(present, (str, int)) else list(present)
    if not items:
        raise ValueError("present names no modality group: give at least one channel name or group index")
    names = [name for channels in group_channels for name in channels]
    groups, named = set(), set()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise ValueError(f"present takes channel names or group indices, got {item!r}")
        if isinstance(item, int):
            if not 0 <= item < len(group_channels):
                raise ValueError(f"present: group index {item} is out of range for {len(group_channels)} groups")
            groups.add(item)
        elif item in names:
            named.add(item)
        else:
            lowered = {name.lower(): name for name in names}
            close = difflib.get_close_matches(item.lower(), lowered, n=1)
            hint = f" (did you mean {lowered[close[0]]!r}?)" if close else ""
            raise ValueError(f"present: unknown channel {item!r}{hint}; the model's channels are {names}")
    for group, channels in enumerate(group_channels):
        if named & set(channels) and not set(channels) <= named:
            raise ValueError(
                f"present names only {sorted(named & set(channels))} of modality group {group}'s channels "
                f"{list(channels)}: a group is present with all its channels or not at all"
            )
        if set(channels) <= named:
            groups.add(group)
    return sorted(groups)


def random_modality_mask(
    batch: int, num_groups: int, probability: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(batch, num_groups) bool mask for modality dropout: each sample keeps every group with probability
    ``1 - probability``, else one of the 2^G - 2 non-empty proper subsets of its groups, all equally likely.

    Uniform over subsets rather than dropping each group on its own coin: inference asks for every
    subset alike (a CT without its PET, an MRI study without one sequence), and independent per-group
    drops make the small subsets rare as G grows (a single modality of four: 4 of the 14 proper subsets
    uniformly, but 4 q^3 (1 - q) of all draws per-group) and need the empty subset redrawn.
    """
    if num_groups < 2:
        raise ValueError(f"modality dropout needs a model with 2 or more modality groups, this one has {num_groups}")
    drop = torch.rand(batch, generator=generator) < probability
    codes = torch.randint(1, 2**num_groups - 1, (batch,), generator=generator)  # bit g: group g is kept
    kept = (codes[:, None] >> torch.arange(num_groups)) & 1 == 1
    return torch.where(drop[:, None], kept, torch.ones_like(kept))
