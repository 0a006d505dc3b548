"""The VeloxSeg network: attention stream + JLC conv stream, student decoder, reconstruction teachers."""

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from timm.models._features import feature_take_indices
from torch import nn

from .config import NUM_LEVELS, VeloxSegConfig
from .layers import (
    CheckpointedSequential, DetailPath, JLCBlock, OneDNNConv3d, PatchConv3d, PatchMerging3d, PWABlock, instance_norm,
    pixel_shuffle_3d,
)  # fmt: skip
from .metadata import ModelMetadata, model_metadata
from .modalities import Present, resolve_present

# The modules only training reads: published weights are saved without them (configs teachers / deep_supervision).
TRAINING_ONLY = ("teachers.", "decoder.aux_heads.")
# what the network reads of ``present`` (veloxseg.modalities.resolve_present): None, shared groups, per-sample mask
Groups = tuple[int, ...] | torch.Tensor | None


@dataclass
class VeloxSegOutput:
    """What a training-mode forward returns.

    logits: [full, u_2, u_3, e_4] heads, each (B, n_classes, D, H, W) at input size (only the
        full-resolution one without deep supervision).
    reconstruction: (B, sum(group_channels), D, H, W) teachers' output, groups concatenated; None without teachers.
    gram: (B, C_1, C_1) Gram matrix of the student's last decoder feature u_1.
    teacher_grams: one (B, C_1, C_1) Gram matrix per modality group (empty without teachers).
    """

    logits: list[torch.Tensor]
    reconstruction: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    teacher_grams: list[torch.Tensor] = field(default_factory=list)


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, C, C) channel correlations F F^T / (C * D * H * W)."""
    flat = features.flatten(2)
    return flat @ flat.transpose(1, 2) / flat.shape[1] / flat.shape[2]


def channels_first(x: torch.Tensor) -> torch.Tensor:
    """Channels-last (B, D, H, W, C) attention features -> contiguous (B, C, D, H, W) for the convs."""
    return x.permute(0, 4, 1, 2, 3).contiguous()


class Up(nn.Module):
    """(B, C_in, D, H, W) -> (B, C_out, 2D, 2H, 2W): transposed conv then instance norm."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(in_ch, out_ch, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return instance_norm(self.up(x))


def jlc_stage(cfg: VeloxSegConfig, level: int, drop_paths: list[float] | None = None) -> CheckpointedSequential:
    """``conv_depths[level]`` JLC blocks at conv width C_level, with the stochastic depth rates ``drop_paths``
    (one per block; default none)."""
    depth = cfg.conv_depths[level - 1]
    return CheckpointedSequential(
        *(
            JLCBlock(
                cfg.conv_width(level),
                cfg.conv_groups(level),
                cfg.kernel_sizes,
                cfg.conv_expansion[level - 1],
                cfg.conv_drop,
                rate,
            )
            for rate in drop_paths or [0.0] * depth
        )
    )


def drop_path_rates(rate: float, depths: tuple[int, ...]) -> list[list[float]]:
    """timm's stochastic depth schedule: per level, the rates of its blocks, linear from 0 at the first
    block of the stream to ``rate`` at its last (plain Python: models are also built on the meta device)."""
    total = sum(depths)
    rates = [rate * i / max(total - 1, 1) for i in range(total)]
    return [rates[sum(depths[:level]) : sum(depths[: level + 1])] for level in range(len(depths))]


class AttentionStream(nn.Module):
    """Per-group patch embedding, then PWA levels with patch merging in between.

    ``embed`` then ``forward``: (B, sum(group_channels), D, H, W) -> per level i, a list of M channels-last
    tensors (B, D/(p 2^(i-1)), H/(p 2^(i-1)), W/(p 2^(i-1)), A_i). Each group has its own stream (the
    groups meet only inside the paired-window attention), so a sample without a group runs without
    its stream: see ``forward``'s ``present``.
    """

    def __init__(self, cfg: VeloxSegConfig) -> None:
        super().__init__()
        p, groups = cfg.patch_size, cfg.num_groups
        self.group_channels = cfg.group_channels
        self.patch_embeds = nn.ModuleList(PatchConv3d(c, cfg.attn_width(1), p) for c in cfg.group_channels)
        self.embed_drop = nn.Dropout(cfg.proj_drop)
        self.levels = nn.ModuleList()
        self.merges = nn.ModuleList()
        drop_paths = drop_path_rates(cfg.drop_path_rate, cfg.depths)
        for level in range(1, NUM_LEVELS + 1):
            dim, scales = cfg.attn_width(level), cfg.level_scales(level)
            blocks = [
                PWABlock(
                    dim, groups, scales, cfg.num_heads[level - 1], cfg.min_dim_head[level - 1],
                    cfg.ffn_expansion[level - 1], cfg.attn_drop, cfg.proj_drop, rate,
                )  # fmt: skip
                for rate in drop_paths[level - 1]
            ]
            self.levels.append(CheckpointedSequential(*blocks))
            if level < NUM_LEVELS:
                self.merges.append(nn.ModuleList(PatchMerging3d(dim) for _ in range(groups)))

    def embed(self, x: torch.Tensor, present: Groups = None) -> list[torch.Tensor | None]:
        """(B, sum(group_channels), D, H, W) -> per group, channels-last tokens (B, D/p, H/p, W/p, A_1); None for a
        group that no sample has (``present``: the groups of the batch or the (B, M) mask, None: all)."""
        parts = x.split(list(self.group_channels), 1)
        return [
            self.embed_drop(embed(part).permute(0, 2, 3, 4, 1).contiguous()) if has_group(present, group) else None
            for group, (embed, part) in enumerate(zip(self.patch_embeds, parts))
        ]

    def forward(self, tokens: list[torch.Tensor | None], present: Groups = None) -> list[list[torch.Tensor]]:
        """Embedded tokens (see ``embed``) -> per level, per group features.

        present: the groups of every sample (a tuple), or the (B, M) bool mask of each sample's; None: all.
        Only the streams of the groups present run (samples that share a subset run together); a missing
        group's features are zeros, so the conv stream's mixers and the teachers (1x1 convs) get nothing
        from it, exactly as if its weight columns were left out."""
        if present is None:
            return self.run(tokens, range(len(tokens)))
        if isinstance(present, tuple):
            features = self.run([tokens[g] for g in present], present)
            return [[level[present.index(g)] if g in present else level[0].new_zeros(()).expand_as(level[0])
                     for g in range(len(tokens))] for level in features]  # fmt: skip
        features = []
        for subset in present.unique(dim=0):
            rows = (present == subset).all(1).nonzero().flatten()
            groups = tuple(subset.nonzero().flatten().tolist())
            subset_features = self([None if t is None else t[rows] for t in tokens], groups)
            if not features:
                features = [[f.new_zeros(len(present), *f.shape[1:]) for f in level] for level in subset_features]
            for level, level_features in zip(features, subset_features):
                for group in groups:
                    level[group] = level[group].index_copy(0, rows, level_features[group])
        return features

    def run(self, xs: list[torch.Tensor], groups: Sequence[int]) -> list[list[torch.Tensor]]:
        """The streams of ``groups`` (the group of each of ``xs``) -> per level, their features."""
        features = []
        for level, blocks in enumerate(self.levels):
            xs = blocks(xs, groups)
            features.append(xs)
            if level < len(self.merges):
                xs = [self.merges[level][group](t) for group, t in zip(groups, xs)]
        return features


class ConvStream(nn.Module):
    """JLC encoder fed by the attention features: s_i = IN(down_i(.)) + mix_i(a_i), e_i = JLC_i(s_i).

    ``stem`` (down_1 on the input) then ``forward``: returns [e_1, e_2, e_3, e_4], e_i of shape
    (B, C_i, D/(p 2^(i-1)), ...).
    """

    def __init__(self, cfg: VeloxSegConfig) -> None:
        super().__init__()
        p = cfg.patch_size
        widths = [cfg.conv_width(level) for level in range(1, NUM_LEVELS + 1)]
        self.downs = nn.ModuleList([OneDNNConv3d(cfg.in_channels, widths[0], 2 * p - 1, stride=p, padding=p - 1)])
        self.downs.extend(OneDNNConv3d(a, b, 3, stride=2, padding=1) for a, b in zip(widths, widths[1:]))
        self.mixers = nn.ModuleList(
            nn.Conv3d(cfg.num_groups * cfg.attn_width(level), widths[level - 1], 1)
            for level in range(1, NUM_LEVELS + 1)
        )
        drop_paths = drop_path_rates(cfg.drop_path_rate, cfg.conv_depths)
        self.stages = nn.ModuleList(
            jlc_stage(cfg, level, drop_paths[level - 1]) for level in range(1, NUM_LEVELS + 1)
        )

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, sum(group_channels), D, H, W) -> (B, C_1, D/p, H/p, W/p), before its instance norm."""
        return self.downs[0](x)

    def forward(self, stem: torch.Tensor, attn_features: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        features = []
        for level, (mixer, stage, attn) in enumerate(zip(self.mixers, self.stages, attn_features)):
            x = stem if level == 0 else self.downs[level](x)
            x = instance_norm(x) + instance_norm(mixer(channels_first(torch.cat(attn, -1))))
            x = stage(x)
            features.append(x)
        return features


class DecoderLadder(nn.Module):
    """Upsampling path shared by the student and the teachers: u_i = JLC(f_i + Up(u_{i+1})), i = 3, 2, 1.

    Takes [f_1, f_2, f_3, f_4] (level widths C_i) and returns [u_1, u_2, u_3].
    """

    def __init__(self, cfg: VeloxSegConfig) -> None:
        super().__init__()
        self.ups = nn.ModuleList(Up(cfg.conv_width(level + 1), cfg.conv_width(level)) for level in range(1, NUM_LEVELS))
        self.stages = nn.ModuleList(jlc_stage(cfg, level) for level in range(1, NUM_LEVELS))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        x, outputs = features[-1], []
        for level in reversed(range(NUM_LEVELS - 1)):
            x = self.stages[level](features[level] + self.ups[level](x))
            outputs.insert(0, x)
        return outputs


class SegmentationDecoder(nn.Module):
    """Student decoder: ladder, full-resolution head via 3-D pixel shuffle, deep-supervision heads.
    With ``detail_ch`` the head stops at half resolution (2x shuffle) and a :class:`DetailPath` takes
    its logits to full resolution."""

    def __init__(self, cfg: VeloxSegConfig) -> None:
        super().__init__()
        self.head_upscale = 2 if cfg.detail_ch else cfg.patch_size
        self.ladder = DecoderLadder(cfg)
        self.head = OneDNNConv3d(
            cfg.conv_width(1), self.head_upscale**3 * cfg.n_classes, 3, padding=1, channels_last_input=True
        )
        self.aux_heads = nn.ModuleList(
            nn.Conv3d(cfg.conv_width(level), cfg.n_classes, 1) for level in range(2, NUM_LEVELS + 1)
        ) if cfg.deep_supervision else None  # fmt: skip
        self.detail = (
            DetailPath(cfg.in_channels, cfg.conv_width(1), cfg.detail_ch, cfg.n_classes) if cfg.detail_ch else None
        )

    def forward(
        self, features: list[torch.Tensor], detail_stem: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """[e_1..e_4] (and the detail path's stem output) -> (logits list [full, u_2, u_3, e_4 heads at
        their own scale], u_1)."""
        u = self.ladder(features)
        logits = [self.segment(u[0], detail_stem)]
        if self.training and self.aux_heads is not None:
            logits += [head(f) for head, f in zip(self.aux_heads, [u[1], u[2], features[3]])]
        return logits, u[0]

    def segment(self, u1: torch.Tensor, detail_stem: torch.Tensor | None = None) -> torch.Tensor:
        """u_1 (B, C_1, D/p, H/p, W/p) -> full-resolution logits (B, n_classes, D, H, W): the head, pixel
        shuffle and, with a detail path, its correction from ``detail_stem`` (the path's stem on the input)."""
        logits = pixel_shuffle_3d(self.head(u1), self.head_upscale)
        if self.detail is None:
            return logits
        if detail_stem is None:
            raise ValueError(
                "this model's detail path (detail_ch) also reads the input: pass detail_stem="
                "model.decoder.detail.stem(x), or call model(x)"
            )
        return self.detail(detail_stem, u1, logits)

    @torch.no_grad()
    def init_head(self, scale: float = 1.0, class_frequencies: torch.Tensor | None = None) -> None:
        """Start the segmentation head at ``scale`` times its weights and, given the share of each class
        in the training labels (n_classes,), with that share's logarithm as its bias: with small weights an
        untrained model then predicts every class at about its share (RetinaNet's prior init). Shares are floored at 1e-4,
        so a class absent from the training labels keeps a finite logit. For a new model only."""
        self.head.weight.mul_(scale)
        if class_frequencies is not None:
            if class_frequencies.shape != (self.head.out_channels // self.head_upscale**3,):
                raise ValueError(
                    f"class_frequencies needs one share per class "
                    f"({self.head.out_channels // self.head_upscale**3}), got shape {tuple(class_frequencies.shape)}"
                )
            log_prior = class_frequencies.double().clamp_min(1e-4).log().to(self.head.bias)
            self.head.bias.copy_(log_prior.repeat_interleave(self.head_upscale**3))  # f^3 sub-voxels per class


class ReconstructionTeacher(nn.Module):
    """Teacher of one modality group: fuses its attention features with the conv features and
    reconstructs that group's input channels. Training only.

    r_i = IN(fuse_i(cat(a_i[m], e_i))); ladder -> v_1; head + pixel shuffle -> (B, c_m, D, H, W).
    """

    def __init__(self, cfg: VeloxSegConfig, out_ch: int) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.fuse = nn.ModuleList(
            nn.Conv3d(cfg.attn_width(level) + cfg.conv_width(level), cfg.conv_width(level), 1)
            for level in range(1, NUM_LEVELS + 1)
        )
        self.ladder = DecoderLadder(cfg)
        self.head = OneDNNConv3d(cfg.conv_width(1), cfg.patch_size**3 * out_ch, 3, padding=1, channels_last_input=True)

    def forward(self, attn: list[torch.Tensor], conv: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (reconstruction (B, c_m, D, H, W), v_1 (B, C_1, ...))."""
        r = [instance_norm(fuse(torch.cat([channels_first(a), e], 1))) for fuse, a, e in zip(self.fuse, attn, conv)]
        v1 = self.ladder(r)[0]
        return pixel_shuffle_3d(self.head(v1), self.patch_size), v1


class VeloxSeg(nn.Module):
    """VeloxSeg: (B, sum(group_channels), D, H, W) -> logits (B, n_classes, D, H, W) in eval mode.

    In training mode returns a :class:`VeloxSegOutput` with deep-supervision logits, the teachers'
    reconstruction and the Gram matrices for self-supervised distillation (SDKT). Build with
    ``VeloxSeg(config)`` or ``VeloxSeg(**config_fields)`` (both: the fields override the config).

    The network alone: ``veloxseg.VeloxSeg`` (what ``create_model`` builds) adds the Hub I/O methods
    ``from_pretrained``, ``save_pretrained`` and ``push_to_hub`` (:class:`veloxseg.hub.HubMixin`).
    """

    def __init__(self, config: VeloxSegConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = (config or VeloxSegConfig()).replace(**overrides) if overrides else (config or VeloxSegConfig())
        self.config = cfg
        self.pretrained_cfg: dict[str, Any] = {}
        # What loading pretrained weights did to them (veloxseg.adapt.AdaptationReport); None: none loaded.
        self.adaptation_report = None
        # timm's description of the encoder levels that forward_intermediates returns
        self.feature_info = [
            dict(num_chs=cfg.conv_width(i), reduction=cfg.patch_size * 2 ** (i - 1), module=f"encoder.stages.{i - 1}")
            for i in range(1, NUM_LEVELS + 1)
        ]
        self.attention = AttentionStream(cfg)
        self.encoder = ConvStream(cfg)
        self.decoder = SegmentationDecoder(cfg)
        self.teachers = (
            nn.ModuleList(ReconstructionTeacher(cfg, c) for c in cfg.group_channels) if cfg.teachers else None
        )
        self.apply(init_weights)
        if self.decoder.detail is not None:
            self.decoder.detail.reset_output()

    def check_input(self, x: torch.Tensor, present: Present = None) -> Groups:
        """Raise ValueError naming the problem when ``x`` (with the groups ``present``) cannot go through
        the network; return ``present`` as the network reads it (:func:`veloxseg.modalities.resolve_present`)."""
        cfg, dtype = self.config, next(self.parameters()).dtype
        if not isinstance(x, torch.Tensor) or x.dtype != dtype:
            got = f"a {type(x).__module__}.{type(x).__name__}" if not isinstance(x, torch.Tensor) else str(x.dtype)
            raise ValueError(
                f"VeloxSeg takes a torch.Tensor of its weights' dtype {dtype}, got {got}; "
                f"convert it first, e.g. torch.as_tensor(x).to({dtype})"
            )
        if x.ndim != 5:
            raise ValueError(f"VeloxSeg expects a (B, C, D, H, W) tensor, got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"VeloxSeg got an empty batch, shape {tuple(x.shape)}")
        names = self.group_channel_names() if present is not None else []
        groups = resolve_present(present, names, x.shape[0], x.device)
        compact = isinstance(groups, tuple) and x.shape[1] == sum(cfg.group_channels[g] for g in groups)
        if x.shape[1] != cfg.in_channels and not compact:
            only = "" if present is None else " or, when every sample has the same groups, only theirs"
            raise ValueError(
                f"VeloxSeg expects {cfg.in_channels} input channels (group_channels={list(cfg.group_channels)}){only}, "
                f"got {x.shape[1]}"
            )
        if tuple(x.shape[2:]) != cfg.roi_size:
            raise ValueError(
                f"VeloxSeg was built for spatial size {list(cfg.roi_size)} (its attention windows are fixed by "
                f"roi_size), got {list(x.shape[2:])}; use sliding-window inference for larger volumes or "
                f"create the model with roi_size=..."
            )
        if not _traced():
            self.check_finite(x, groups)
        return groups

    def check_finite(self, x: torch.Tensor, groups: Groups = None) -> None:
        """Raise ValueError naming the channels when ``x`` (B, C, D, H, W) holds a NaN or an infinity in a
        channel of a group it has (``groups`` as ``check_input`` returns it; a missing group's channels are
        never read): one NaN voxel would make every logit NaN. Costs one sum when all is finite."""
        # A sum is finite only if every term is (NaN or inf terms make it NaN or inf); a finite but overflowing
        # sum falls through to the exact check. ``isfinite(x).all()`` took 3.7 ms for 2 x 96^3 at one thread,
        # the sum 0.09 ms.
        if bool(torch.isfinite(x.sum())):
            return
        if groups is not None:  # (B, sum(group_channels), D, H, W), a missing group's channels 0
            x = with_missing_channels_zeroed(x, groups, self.config.group_channels)
        counts = (~torch.isfinite(x)).transpose(0, 1).flatten(1).sum(1).tolist()  # per channel
        names = [name for group in self.group_channel_names() for name in group]
        named = [f"{names[c]} ({n})" for c, n in enumerate(counts) if n]
        if named:
            raise ValueError(
                f"input holds {sum(counts)} non-finite voxels (NaN/inf) in channel(s) {', '.join(named)}: a single "
                f"one makes every logit NaN; fix or mask them first (e.g. torch.nan_to_num)"
            )

    def present_groups(self, present: Present) -> tuple[int, ...] | None:
        """The groups ``present`` names for every sample alike (channel names, group indices or a (M,) bool
        tensor) as group indices; None: all. Raises ValueError as ``forward`` does."""
        # one sample: a tuple
        return None if present is None else resolve_present(present, self.group_channel_names(), 1)

    def group_channel_names(self) -> list[list[str]]:
        """The channel names of each modality group, from the metadata (``pretrained_cfg["veloxseg"]``; an
        untrained model's are ``group{g}_channel{c}``)."""
        channels = model_metadata(self).channels
        return [[c.name for c in channels if c.group == group] for group in range(self.config.num_groups)]

    def embed(self, x: torch.Tensor, present: Groups = None) -> tuple[Any, ...]:
        """The convs that read the input: (per-group attention tokens, the conv stream's stem output),
        plus the detail path's stem output when the model has one; ``forward_embedded`` takes them.

        present: the groups of the batch or each sample's (``check_input``'s; None: all). The stems read
        every channel at once, so a missing group's channels reach them as zeros: their weights then add
        nothing, exactly as if the stems had no such input; the same whether a batch mixes subsets
        (training) or not (inference).
        """
        if present is not None:
            x = with_missing_channels_zeroed(x, present, self.config.group_channels)
        embedded = self.attention.embed(x, present), self.encoder.stem(x)
        detail = None if self.decoder is None else self.decoder.detail  # None: pruned to a feature backbone
        return embedded if detail is None else (*embedded, detail.stem(x))

    @property
    def num_classes(self) -> int:
        """timm's name for ``config.n_classes``."""
        return self.config.n_classes

    @property
    def num_features(self) -> int:
        """timm's width of the features the head reads: C_1, of the last decoder feature u_1."""
        return self.config.conv_width(1)

    def encode(
        self, tokens: list[torch.Tensor | None], stem: torch.Tensor, present: Groups = None
    ) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
        """Embedded input (see ``embed``) -> attention features (per level, per group, channels-last; zeros
        for a group a sample lacks) and conv features [e_1..e_4], e_i (B, C_i, D/(p 2^(i-1)), H/(p 2^(i-1)),
        W/(p 2^(i-1)))."""
        attn = self.attention(tokens, present)
        return attn, self.encoder(stem, attn)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCDHW",
        intermediates_only: bool = False,
        present: Present = None,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's feature API (``features_only=True``): (B, sum(group_channels), D, H, W) -> the encoder features
        e_i (B, C_i, D/r_i, H/r_i, W/r_i), r_i = p 2^(i-1), of the levels ``indices`` (timm's meaning: None
        all four, n the last n, or a list of levels 0..3), channels first; with ``intermediates_only=False``
        also the deepest computed level first, as (e_last, [e_i, ...]).

        e_i is the conv stream's output at level i, which already holds the attention stream's level-i
        features of every modality group (added through the level's 1x1 mixer before the JLC blocks);
        the per-group attention features themselves are not returned. The encoder has no final norm
        (``norm`` changes nothing) and runs the levels it has: ``prune_intermediate_layers`` stops it
        early (``stop_early`` changes nothing); ``output_fmt`` is always channels first. ``present``: the
        modality groups the input has, as for ``forward``.
        """
        take, _ = feature_take_indices(len(self.feature_info), indices)
        groups = self.check_input(x, present)
        _, conv = self.encode(*self.embed(x, groups)[:2], groups)
        intermediates = [conv[i] for i in take]
        return intermediates if intermediates_only else (conv[-1], intermediates)

    def prune_intermediate_layers(
        self, indices: int | list[int] = NUM_LEVELS, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Keep the encoder up to the deepest level of ``indices`` (and with ``prune_head`` drop the
        decoder and the teachers): the model then serves ``forward_intermediates`` only. Returns the
        level indices to take (timm's feature API)."""
        levels = len(self.feature_info)
        if isinstance(indices, int):  # timm: the last ``indices`` levels
            bad = not 1 <= indices <= levels
        else:
            bad = not indices or any(not -levels <= i < levels for i in indices)
        if bad:
            raise ValueError(
                f"out_indices must name encoder levels among 0..{levels - 1} (or count 1..{levels} of the last), "
                f"got {indices!r}"
            )
        take, max_index = feature_take_indices(levels, indices)
        levels = max_index + 1
        self.attention.levels, self.attention.merges = self.attention.levels[:levels], self.attention.merges[:max_index]
        self.encoder.mixers, self.encoder.stages = self.encoder.mixers[:levels], self.encoder.stages[:levels]
        self.encoder.downs = self.encoder.downs[:levels]
        self.feature_info = self.feature_info[:levels]
        if prune_head:
            self.decoder = self.teachers = None
        return take

    def forward(self, x: torch.Tensor, present: Present = None) -> torch.Tensor | VeloxSegOutput:
        """present: the modality groups the input has (:mod:`veloxseg.modalities`): channel names
        (``["PET"]``), group indices (``[1]``), or a bool tensor (M,) or, one subset per sample, (B, M);
        None: all. ``x`` holds every group's channels (a missing group's are ignored) or, when every
        sample has the same groups, only theirs, in group order. A missing group's attention stream does
        not run; with every group present the network is exactly the one without ``present``."""
        groups = self.check_input(x, present)
        return self.forward_embedded(*self.embed(x, groups), present=groups)

    def forward_embedded(
        self,
        tokens: list[torch.Tensor | None],
        stem: torch.Tensor,
        detail_stem: torch.Tensor | None = None,
        present: Groups = None,
    ) -> torch.Tensor | VeloxSegOutput:
        """``forward`` after ``embed``: the split lets ``veloxseg.optimize`` compile all but the input convs."""
        attn, conv = self.encode(tokens, stem, present)
        logits, u1 = self.decoder(conv, detail_stem)
        if not self.training:
            return logits[0]
        size = self.config.roi_size
        logits[1:] = [F.interpolate(t, size=size, mode="trilinear", align_corners=True) for t in logits[1:]]
        out = VeloxSegOutput(logits=logits, gram=gram_matrix(u1))
        if self.teachers is not None:
            recons = []
            for group, teacher in enumerate(self.teachers):
                recon, v1 = teacher([a[group] for a in attn], conv)
                recons.append(recon)
                out.teacher_grams.append(gram_matrix(v1))
            out.reconstruction = torch.cat(recons, 1)
        return out

    # --- timm's model API -------------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor, present: Present = None) -> torch.Tensor:
        """(B, sum(group_channels), D, H, W) -> u_1 (B, C_1, D/p, H/p, W/p), the last decoder feature, which the
        segmentation head reads (``num_features`` = C_1 channels); :meth:`forward_head` takes it.
        ``present``: the modality groups the input has, as for ``forward``."""
        mask = self.check_input(x, present)
        _, conv = self.encode(*self.embed(x, mask)[:2], mask)
        return self.decoder.ladder(conv)[0]

    def forward_head(
        self, x: torch.Tensor, pre_logits: bool = False, detail_stem: torch.Tensor | None = None
    ) -> torch.Tensor:
        """u_1 from :meth:`forward_features` -> logits (B, n_classes, D, H, W) (u_1 itself with
        ``pre_logits``). A model with a detail path (``*_hr`` variants) needs ``detail_stem``, its stem on
        the input: ``model.decoder.detail.stem(input)``."""
        return x if pre_logits else self.decoder.segment(x, detail_stem)

    def get_classifier(self) -> nn.Module:
        """The segmentation head: a 3^3 conv C_1 -> f^3 n_classes, pixel-shuffled by f to full resolution."""
        return self.decoder.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace every class-dependent layer (segmentation head, deep-supervision heads, the detail path's
        output conv) with a newly initialised one for ``num_classes`` (>= 2, background included); the rest
        keeps its weights. A segmentation model pools nothing: ``global_pool`` must stay None."""
        if global_pool is not None:
            raise ValueError(f"VeloxSeg is a segmentation model with no global pooling; got global_pool={global_pool!r}")
        cfg = self.config.replace(n_classes=num_classes)
        old, new = self.decoder, SegmentationDecoder(cfg)
        new.apply(init_weights)
        new.ladder = old.ladder
        if new.detail is not None:
            new.detail.reset_output()
            for name in ("stem", "up", "mix", "spatial"):
                setattr(new.detail, name, getattr(old.detail, name))
        parameter = next(old.head.parameters())
        self.decoder, self.config = new.to(parameter.device, parameter.dtype).train(old.training), cfg
        metadata = ModelMetadata.fitting(self.pretrained_cfg.get("veloxseg"), cfg.group_channels, num_classes)
        self.pretrained_cfg["veloxseg"] = metadata.to_dict()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (timm's
        activation checkpointing; every PWA and JLC stage, teachers included): less memory for one more
        forward pass of compute."""
        for module in self.modules():
            if isinstance(module, CheckpointedSequential):
                module.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameters that get no weight decay beside norms and biases (timm's optimizer factory and the
        trainer leave out every 1-D parameter): the attention's relative position bias tables."""
        return {name for name, _ in self.named_parameters() if name.endswith("relative_position_bias_table")}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups, input to output (layer-wise learning-rate decay): the input convs, then
        encoder level i (its attention blocks and merge, conv downsampling, mixer and JLC blocks); the
        decoder and teachers, unmatched, come last. ``coarse`` changes nothing (one group per level)."""
        return dict(
            stem=r"^attention\.patch_embeds|^encoder\.downs\.0\.|^decoder\.detail\.stem",
            blocks=r"^(?:attention\.(?:levels|merges)|encoder\.(?:downs|mixers|stages))\.(\d+)",
        )

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """torch's load (timm's ``checkpoint_path=`` loads through it), but with ``strict`` the training-only
        modules (:data:`TRAINING_ONLY`: teachers, deep-supervision heads) may be absent on either side, as in
        the published tags: absent from the weights, they keep their initialisation (a warning says so);
        absent from the model, their weights are left out. Any other mismatch is one ValueError line that
        counts the missing, unexpected and reshaped tensors (weights of another config)."""
        if not strict:
            return super().load_state_dict(state_dict, strict=False, assign=assign)
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        reshaped = [k for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
        problems = [
            f"{len(keys)} {what} (e.g. {keys[0]})"
            for what, keys in (
                ("missing", [k for k in missing if not k.startswith(TRAINING_ONLY)]),
                ("unexpected", [k for k in unexpected if not k.startswith(TRAINING_ONLY)]),
            )
            if keys
        ]
        if reshaped:
            k = reshaped[0]
            problems.append(
                f"{len(reshaped)} of another shape (e.g. {k}: {tuple(state_dict[k].shape)} in the weights, "
                f"{tuple(own[k].shape)} here)"
            )
        if problems:
            raise ValueError(
                f"the weights do not fit this VeloxSeg ({'; '.join(problems)}): they come from a model of another "
                f"config; build it with theirs, or load their folder with VeloxSeg.from_pretrained(folder) (or "
                f"create_model('local-dir:folder')), which reads its config.json and adapts them"
            )
        if missing:
            warnings.warn(
                f"{len(missing)} training-only tensors (teachers, deep-supervision heads) are not in the weights and "
                f"keep their initialisation; for inference build the model with teachers=False, deep_supervision=False",
                stacklevel=2,
            )
        return super().load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False, assign=assign)

    def inference_parameters(self) -> int:
        """Parameters used by an eval-mode forward (no teachers, no deep-supervision heads)."""
        training_only = [self.teachers, self.decoder.aux_heads]
        skip = {id(p) for m in training_only if m is not None for p in m.parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)


def _traced() -> bool:
    """Whether the forward runs under TorchScript, tracing, torch.compile / torch.export or ONNX export:
    data-dependent checks are left out of the graph."""
    return (
        torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()
        or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
    )  # fmt: skip


def has_group(present: Groups, group: int) -> bool:
    """Whether any sample has ``group`` (``present`` as :func:`veloxseg.modalities.resolve_present` gives it)."""
    if present is None:
        return True
    return group in present if isinstance(present, tuple) else bool(present[:, group].any())


def with_missing_channels_zeroed(x: torch.Tensor, present: Groups, group_channels: Sequence[int]) -> torch.Tensor:
    """(B, C, D, H, W) with every channel, or with only the groups ``present``'s when it is a tuple, ->
    (B, sum(group_channels), D, H, W) where the channels of the groups a sample lacks are 0, whatever they held
    (NaN included)."""
    if isinstance(present, torch.Tensor):
        counts = torch.tensor(group_channels, device=present.device)
        channel_present = present.repeat_interleave(counts, dim=1)  # (B, C)
        return x.masked_fill(~channel_present[:, :, None, None, None], 0)
    # the groups x holds
    given = [g for g in range(len(group_channels)) if x.shape[1] == sum(group_channels) or g in present]
    parts = dict(zip(given, x.split([group_channels[g] for g in given], 1)))
    zeros = [x.new_zeros(x.shape[0], c, *x.shape[2:]) for c in group_channels]
    return torch.cat([parts[g] if g in present else zeros[g] for g in range(len(group_channels))], 1)


def init_weights(module: nn.Module) -> None:
    """Kaiming normal (negative slope 0.01) conv weights, zero biases; truncated-normal bias tables."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=0.01)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif hasattr(module, "relative_position_bias_table"):
        nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)
