"""Paired-window attention (PWA): multi-scale pooled windows, attention across modality groups."""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .norm import LayerNorm3d

Size3 = tuple[int, int, int]


@dataclass(frozen=True)
class WindowScale:
    """One attention scale: big windows of ``window`` voxels, max-pooled by ``pool`` inside."""

    window: Size3
    pool: Size3


def window_scales(grid: Size3, min_window: Size3, min_pool: Size3, factor: int = 2) -> list[WindowScale]:
    """The scales of one level: double window and pool together while any window axis fits the grid.

    Every scale pools its windows to the same ``min_window / min_pool`` tokens per axis. Raises
    ``ValueError`` when a scale's window does not tile the token grid on every axis.
    """
    if any(w % s for w, s in zip(min_window, min_pool)):
        raise ValueError(f"big window {list(min_window)} is not a multiple of small window {list(min_pool)}")
    scales = []
    window, pool = tuple(min_window), tuple(min_pool)
    while any(w <= g for w, g in zip(window, grid)):
        scales.append(WindowScale(window, pool))
        window = tuple(w * factor for w in window)
        pool = tuple(p * factor for p in pool)
    if not scales:
        raise ValueError(f"window {list(min_window)} is larger than the token grid {list(grid)} on every axis")
    for scale in scales:
        if any(w > g for w, g in zip(scale.window, grid)):
            raise ValueError(
                f"window {list(scale.window)} is larger than the token grid {list(grid)} on some axis (windows "
                f"double from {list(min_window)} while any axis fits): make the big windows proportional to the ROI"
            )
        if any(g % w for g, w in zip(grid, scale.window)):
            raise ValueError(
                f"window {list(scale.window)} does not tile the token grid {list(grid)}: each grid axis must "
                f"be a multiple of the window"
            )
    return scales


def relative_position_index(tokens: Size3) -> torch.Tensor:
    """(L, L) Swin-style index into a ((2n1-1)(2n2-1)(2n3-1), heads) bias table, L = n1*n2*n3."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in tokens], indexing="ij")).flatten(1)
    offsets = coords[:, :, None] - coords[:, None, :]  # (3, L, L): query minus key
    n1, n2, n3 = tokens
    return (
        (offsets[0] + n1 - 1) * (2 * n2 - 1) * (2 * n3 - 1)
        + (offsets[1] + n2 - 1) * (2 * n3 - 1)
        + (offsets[2] + n3 - 1)
    )


class PairedWindowAttention(nn.Module):
    """Window attention over all modality groups at once, at several window scales.

    Input and output: a list of M tensors (B, A, D, H, W), one per modality group. Each group has its
    own norm and q/k/v/output projections; the relative position bias is shared. The qk channels
    are read as (scale, head, ``head_dim``) and the value channels as (scale, head, ``value_dim``).
    The returned tensors include the residual: ``x_m + proj(attention(x)_m)``.
    """

    def __init__(
        self,
        dim: int,
        num_groups: int,
        scales: Sequence[WindowScale],
        num_heads: int,
        head_dim: int,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.scales = list(scales)
        self.num_heads = num_heads
        self.tokens: Size3 = tuple(w // p for w, p in zip(self.scales[0].window, self.scales[0].pool))
        num_scales = len(self.scales)
        self.qk_dim = num_scales * num_heads * head_dim
        self.v_dim = math.ceil(dim / self.qk_dim) * self.qk_dim
        self.head_dim = head_dim
        self.value_dim = self.v_dim // (num_scales * num_heads)
        self.attn_drop = attn_drop

        self.norms = nn.ModuleList(LayerNorm3d(dim) for _ in range(num_groups))
        # q, k and v of a group in one 1x1x1 conv: channels [q | k | v].
        self.qkv = nn.ModuleList(
            nn.Conv3d(dim, 2 * self.qk_dim + self.v_dim, kernel_size=1) for _ in range(num_groups)
        )
        self.projs = nn.ModuleList(nn.Conv3d(self.v_dim, dim, kernel_size=1) for _ in range(num_groups))
        self.proj_drop = nn.Dropout(proj_drop)
        table_size = math.prod(2 * n - 1 for n in self.tokens)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_size, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.tokens), persistent=False)

    def _gather(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """(B, S*h*width, D, H, W) -> (B, h, N, L, width): pooled windows of every scale."""
        b = x.shape[0]
        n1, n2, n3 = self.tokens
        windows = []
        for part, scale in zip(x.chunk(len(self.scales), dim=1), self.scales):
            if scale.pool != (1, 1, 1):
                part = F.max_pool3d(part, scale.pool, scale.pool)
            d, h, w = part.shape[2:]
            part = part.reshape(b, self.num_heads, width, d // n1, n1, h // n2, n2, w // n3, n3)
            part = part.permute(0, 1, 3, 5, 7, 4, 6, 8, 2)
            windows.append(part.reshape(b, self.num_heads, -1, n1 * n2 * n3, width))
        return torch.cat(windows, dim=2)

    def _scatter(self, tokens: torch.Tensor, grid: Size3) -> torch.Tensor:
        """(B, h, N, L, c) -> (B, S*h*c, D, H, W): each window's tokens resized back in place."""
        b, heads, _, _, c = tokens.shape
        n1, n2, n3 = self.tokens
        out, start = [], 0
        for scale in self.scales:
            w1, w2, w3 = scale.window
            counts = (grid[0] // w1, grid[1] // w2, grid[2] // w3)
            num = math.prod(counts)
            part = tokens[:, :, start : start + num]
            start += num
            part = part.reshape(b * heads * num, n1, n2, n3, c).permute(0, 4, 1, 2, 3)
            if scale.pool != (1, 1, 1):
                part = F.interpolate(part, size=scale.window, mode="trilinear", align_corners=True)
            part = part.reshape(b, heads, *counts, c, w1, w2, w3)
            part = part.permute(0, 1, 5, 2, 6, 3, 7, 4, 8)
            out.append(part.reshape(b, heads * c, *grid))
        return torch.cat(out, dim=1)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        grid: Size3 = tuple(xs[0].shape[2:])
        queries, keys, values = [], [], []
        for x, norm, qkv in zip(xs, self.norms, self.qkv):
            q, k, v = qkv(norm(x)).split([self.qk_dim, self.qk_dim, self.v_dim], dim=1)
            queries.append(self._gather(q, self.head_dim))
            keys.append(self._gather(k, self.head_dim))
            values.append(self._gather(v, self.value_dim))
        # Modal interaction: the groups' tokens of a window attend to each other.
        q, k, v = (torch.cat(t, dim=3) for t in (queries, keys, values))  # (B, h, N, M*L, c)
        num_groups = len(xs)
        length = math.prod(self.tokens)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(length, length, -1).permute(2, 0, 1).repeat(1, num_groups, num_groups)
        # Written out rather than F.scaled_dot_product_attention: with a float mask on CPU that
        # runs its math path plus -inf checks over the whole score tensor (about 10% of the forward).
        attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1) + bias.unsqueeze(1)
        attn = F.dropout(attn.softmax(dim=-1), self.attn_drop, self.training)
        out = attn @ v
        return [
            x + self.proj_drop(proj(self._scatter(group_out, grid)))
            for x, proj, group_out in zip(xs, self.projs, out.split(length, dim=3))
        ]


class FeedForward(nn.Sequential):
    """1x1x1 conv MLP: (B, A, ...) -> (B, rA, ...) -> GELU -> (B, A, ...), dropout after each."""

    def __init__(self, dim: int, ratio: int, drop: float = 0.0) -> None:
        super().__init__(
            nn.Conv3d(dim, dim * ratio, kernel_size=1),
            nn.GELU(),
            nn.Dropout(drop),
            nn.Conv3d(dim * ratio, dim, kernel_size=1),
            nn.Dropout(drop),
        )


class PWABlock(nn.Module):
    """Paired-window attention then a per-group feed-forward, on a list of M (B, A, D, H, W) tensors.

    As in the authors' network the attention residual is added twice: ``y = x + (x + attn(x))``.
    """

    def __init__(
        self,
        dim: int,
        num_groups: int,
        scales: Sequence[WindowScale],
        num_heads: int,
        head_dim: int,
        ffn_ratio: int,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn = PairedWindowAttention(dim, num_groups, scales, num_heads, head_dim, attn_drop, proj_drop)
        self.norms = nn.ModuleList(LayerNorm3d(dim) for _ in range(num_groups))
        self.ffns = nn.ModuleList(FeedForward(dim, ffn_ratio, proj_drop) for _ in range(num_groups))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        ys = [x + o for x, o in zip(xs, self.attn(xs))]
        return [y + ffn(norm(y)) for y, norm, ffn in zip(ys, self.norms, self.ffns)]
