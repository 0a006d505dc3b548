"""Paired-window attention (PWA): multi-scale pooled windows, attention across modality groups."""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from .conv import PointwiseConv3d, eager
from .cpu_kernels import cpu_kernels_available

Size3 = tuple[int, int, int]

# The training kernel (csrc/pwa_train.cpp) only for windows of at most this many tokens: forward + backward of
# veloxseg_small_hr's layers at 2 x 64^3, one thread, kernel against PyTorch ops: 8 tokens 6.4 vs 11.2 ms
# (level 1), 0.8 vs 1.6 (level 3), 0.7 vs 1.3 (level 4); 64 tokens 4.4 vs 3.6 ms (level 2: there the batched
# GEMMs beat the kernel's loops). benchmarks/experiments/speed/pwa_micro.py
TRAIN_KERNEL_MAX_TOKENS = 8


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


def linear_resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) weights of 1-D linear interpolation with align_corners=True."""
    if size_in == 1:
        return torch.ones(size_out, 1, dtype=torch.float64)
    pos = torch.arange(size_out, dtype=torch.float64) * (size_in - 1) / max(size_out - 1, 1)
    low = pos.floor().long().clamp(max=size_in - 2)
    frac = pos - low
    weights = torch.zeros(size_out, size_in, dtype=torch.float64)
    weights[torch.arange(size_out), low] = 1 - frac
    weights[torch.arange(size_out), low + 1] += frac
    return weights


def trilinear_resize_matrix(tokens: Size3, window: Size3) -> torch.Tensor:
    """(w1*w2*w3, n1*n2*n3) matrix resizing a flattened n-grid to a w-grid like
    ``F.interpolate(mode="trilinear", align_corners=True)``: trilinear weights are the product of
    the per-axis linear ones, so the resize of every window is a single small matrix product."""
    m1, m2, m3 = (linear_resize_matrix(n, w) for n, w in zip(tokens, window))
    return torch.kron(m1, torch.kron(m2, m3)).float()


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


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, drop: float = 0.0
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(c) + bias) v`` in every window: q, k (N, h, T, c), v (N, h, T, c_v), bias
    (h, T, T) -> (N, h, T, c_v), with dropout ``drop`` on the attention weights.

    On GPUs this is PyTorch's fused attention. On CPUs its kernels are slow for these shapes (head widths
    of 4-16, thousands of windows; with q/k and v of different widths only the math fallback, which checks
    every score for -inf): the products are written out with v on the left, ``(v^T s^T)^T``, whose wide
    output suits the BLAS kernels (level 1 of veloxseg_small: 3.0 ms vs 5.3 ms for the fused kernel).
    Long windows (T >= 256) go one (window, head) at a time so each score matrix stays in cache.
    """
    scale = q.shape[-1] ** -0.5
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)
    num, heads, length, width = v.shape
    if length >= 256:
        out = []
        for window in range(num):
            for head in range(heads):
                scores = torch.addmm(bias[head], q[window, head], k[window, head].t(), alpha=scale)
                weights = F.dropout(scores.softmax(-1), drop, training=drop > 0)
                out.append(torch.mm(v[window, head].t(), weights.t()))
        return torch.stack(out).view(num, heads, width, length).transpose(-2, -1)
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    scores += bias
    weights = F.dropout(scores.softmax(-1), drop, training=drop > 0)
    return torch.matmul(v.transpose(-2, -1), weights.transpose(-2, -1)).transpose(-2, -1)


class PairedWindowAttention(nn.Module):
    """Window attention over all modality groups at once, at several window scales.

    Input and output: a list of M channels-last tensors (B, D, H, W, A), one per modality group present.
    Each group has its own norm and q/k/v/output projections; the relative position bias is shared.
    A group's q (and k) has ``qk_channels`` = S * h * ``qk_head_dim`` channels, read as (scale, head,
    ``qk_head_dim``), and its v ``v_channels`` = S * h * ``v_head_dim``, read as (scale, head, ``v_head_dim``):
    ``*_channels`` are totals over the S scales and h heads, ``*_head_dim`` per scale and head. The
    returned tensors include the residual: ``x_m + proj(attn(x)_m)``.
    """

    def __init__(
        self,
        dim: int,
        num_groups: int,
        scales: Sequence[WindowScale],
        num_heads: int,
        qk_head_dim: int,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.scales = list(scales)
        self.num_heads = num_heads
        self.tokens: Size3 = tuple(w // p for w, p in zip(self.scales[0].window, self.scales[0].pool))
        num_scales = len(self.scales)
        self.qk_channels = num_scales * num_heads * qk_head_dim
        self.v_channels = math.ceil(dim / self.qk_channels) * self.qk_channels
        self.qk_head_dim = qk_head_dim
        self.v_head_dim = self.v_channels // (num_scales * num_heads)
        self.attn_drop = attn_drop

        self.norms = nn.ModuleList(nn.LayerNorm(dim, eps=1e-6) for _ in range(num_groups))
        # q, k and v of a group in one 1x1x1 conv: channels [q | k | v] (the authors' layout).
        width = 2 * self.qk_channels + self.v_channels
        self.qkv = nn.ModuleList(PointwiseConv3d(dim, width) for _ in range(num_groups))
        # The same rows scale-major, [q_1 k_1 v_1 | q_2 k_2 v_2 | ...]: one projection, one pool and one
        # window copy per scale serve q, k and v together.
        qk_width, v_width = num_heads * qk_head_dim, num_heads * self.v_head_dim
        self.scale_width = 2 * qk_width + v_width
        # (first row, rows per scale) of q, k and v
        parts = [(0, qk_width), (self.qk_channels, qk_width), (2 * self.qk_channels, v_width)]
        order = [first + j * rows + i for j in range(num_scales) for first, rows in parts for i in range(rows)]
        self.register_buffer("scale_major_rows", torch.tensor(order), persistent=False)
        self.projs = nn.ModuleList(PointwiseConv3d(self.v_channels, dim) for _ in range(num_groups))
        self.proj_drop = nn.Dropout(proj_drop)
        table_size = math.prod(2 * n - 1 for n in self.tokens)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_size, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.tokens), persistent=False)
        self.resize_matrices = [trilinear_resize_matrix(self.tokens, s.window) for s in self.scales]
        # Set by veloxseg.optimize once torch.ops.veloxseg.window_attention is built (CPU, inference only).
        self.fused_kernel = False

    def _apply(self, fn, recurse=True):  # keep the resize matrices on the module's device and dtype
        super()._apply(fn, recurse)
        self.resize_matrices = [fn(m) for m in self.resize_matrices]
        return self

    def _gather(
        self, xs: list[torch.Tensor], groups: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """M groups (B, D, H, W, A) -> q, k (B*N, h, M*L, qk_head_dim) and v (B*N, h, M*L, v_head_dim): every
        group's tokens of every max-pooled window (windows scale by scale, groups in order per window);
        ``groups``: the modality group of each tensor (whose norm and projection it takes)."""
        b, length = xs[0].shape[0], math.prod(self.tokens)
        grid = xs[0].shape[1:4]
        counts = [[g // w for g, w in zip(grid, scale.window)] for scale in self.scales]
        width = self.scale_width
        windows = xs[0].new_empty(b, sum(math.prod(c) for c in counts), len(xs), length, width)
        for group, x in enumerate(xs):
            norm, qkv = self.norms[groups[group]], self.qkv[groups[group]]
            tokens = norm(x)
            # One GEMM for all scales (4 narrow ones took 2.5x as long at level 1), sliced scale by scale.
            projected = F.linear(tokens, qkv.weight.flatten(1)[self.scale_major_rows], qkv.bias[self.scale_major_rows])
            # split, not slices: the backward of S slices writes S zero-filled gradients of the whole projection
            start = 0
            for scale, count, part in zip(self.scales, counts, projected.split(width, dim=-1)):
                if scale.pool != (1, 1, 1):
                    part = F.max_pool3d(part.permute(0, 4, 1, 2, 3), scale.pool, scale.pool).permute(0, 2, 3, 4, 1)
                part = part.view(b, count[0], self.tokens[0], count[1], self.tokens[1], count[2], self.tokens[2], width)
                target = windows[:, start : start + math.prod(count), group]
                target.view(b, *count, *self.tokens, width).copy_(part.permute(0, 1, 3, 5, 2, 4, 6, 7))
                start += math.prod(count)
        windows = windows.view(-1, len(xs) * length, width)
        qk, v = self.num_heads * self.qk_head_dim, self.num_heads * self.v_head_dim
        q, k, v = windows.split([qk, qk, v], dim=-1)
        return (
            q.unflatten(-1, (self.num_heads, self.qk_head_dim)).transpose(1, 2),
            k.unflatten(-1, (self.num_heads, self.qk_head_dim)).transpose(1, 2),
            v.unflatten(-1, (self.num_heads, self.v_head_dim)).transpose(1, 2),
        )

    def _scatter(self, tokens: torch.Tensor, grid: Size3) -> torch.Tensor:
        """(B, N, h, M*L, c) -> (M, B, D, H, W, S*h*c): each window's tokens resized back in place, per group."""
        b, _, heads, _, c = tokens.shape
        groups = tokens.shape[3] // math.prod(self.tokens)
        tokens = tokens.unflatten(3, (groups, -1))  # (B, N, h, M, L, c)
        out = tokens.new_empty(groups, b, *grid, len(self.scales), heads, c)
        counts = [[g // w for g, w in zip(grid, scale.window)] for scale in self.scales]
        parts = tokens.split([math.prod(count) for count in counts], dim=1)  # (split's backward: no zero-filling)
        for j, (scale, resize, count, part) in enumerate(zip(self.scales, self.resize_matrices, counts, parts)):
            if scale.pool != (1, 1, 1):
                # (L, B*N_j*h*M*c) layout: one plain GEMM resizes every window of the scale at once.
                part = resize @ part.permute(4, 0, 1, 2, 3, 5).reshape(part.shape[4], -1)
                part = part.view(*scale.window, b, *count, heads, groups, c).permute(8, 3, 4, 0, 5, 1, 6, 2, 7, 9)
            else:
                part = part.reshape(b, *count, heads, groups, *scale.window, c).permute(5, 0, 1, 6, 2, 7, 3, 8, 4, 9)
            target = out[..., j, :, :].view(groups, b, count[0], scale.window[0], count[1], scale.window[1],
                                            count[2], scale.window[2], heads, c)  # fmt: skip
            target.copy_(part)
        return out.flatten(-3)

    def forward(self, xs: list[torch.Tensor], groups: Sequence[int] | None = None) -> list[torch.Tensor]:
        """``groups``: which modality groups ``xs`` hold (default all, in order); a missing group takes
        no part, its tokens are neither keys nor queries.

        While training on the CPU (float32 or float64, eager, no attention dropout, windows of at most
        ``TRAIN_KERNEL_MAX_TOKENS`` tokens) with the CPU kernels built, everything between the q/k/v and the
        output projections is :class:`_PairedWindows` (one op forward, one backward); otherwise (eval and
        inference included) the PyTorch ops of :meth:`_attend`."""
        groups = range(len(xs)) if groups is None else groups
        if self._train_kernel(xs[0]):
            projected = [self.qkv[group](self.norms[group](x)) for x, group in zip(xs, groups)]
            stacked = projected[0].unsqueeze(0) if len(xs) == 1 else torch.stack(projected)
            scattered = _PairedWindows.apply(stacked, self.relative_position_bias_table, self).unbind(0)
        else:
            scattered = self._attend(xs, groups)
        return [x + self.proj_drop(self.projs[group](out)) for x, group, out in zip(xs, groups, scattered)]

    def _train_kernel(self, x: torch.Tensor) -> bool:
        """Whether this forward runs on ``torch.ops.veloxseg.pwa_train`` (see :meth:`forward`)."""
        return (
            self.training
            and math.prod(self.tokens) <= TRAIN_KERNEL_MAX_TOKENS
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and torch.is_grad_enabled()
            and self.attn_drop == 0
            and not torch.is_autocast_enabled("cpu")
            and eager()
            and cpu_kernels_available()
        )

    def kernel_geometry(self) -> tuple:
        """The arguments of ``pwa_train`` after the table: position index, resize matrices, windows and pools
        (3 sizes per scale), heads, head widths, score scale."""
        windows = [size for scale in self.scales for size in scale.window]
        pools = [size for scale in self.scales for size in scale.pool]
        return (self.relative_position_index, self.resize_matrices, windows, pools, self.num_heads,
                self.qk_head_dim, self.v_head_dim, self.qk_head_dim**-0.5)  # fmt: skip

    def _attend(self, xs: list[torch.Tensor], groups: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """The attention as PyTorch ops (or the inference kernel set by ``veloxseg.optimize``): M groups
        (B, D, H, W, A) -> M tensors (B, D, H, W, S*h*c_v), before the output projection."""
        grid: Size3 = tuple(xs[0].shape[1:4])
        # Modal interaction: the groups' tokens of a window attend to each other.
        q, k, v = self._gather(xs, groups)
        num_groups = len(xs)
        length = math.prod(self.tokens)
        fused = self.fused_kernel and q.device.type == "cpu" and not self.training
        # The fused kernel reads the bias keys-major: built that way, its transposed view costs nothing.
        index = self.relative_position_index.t() if fused else self.relative_position_index
        bias = self.relative_position_bias_table[index.reshape(-1)]
        bias = bias.view(length, length, -1).permute(2, 0, 1).repeat(1, num_groups, num_groups)
        if fused:
            out = torch.ops.veloxseg.window_attention(q, k, v, bias.transpose(1, 2), self.qk_head_dim**-0.5)
        else:
            out = window_attention(q, k, v, bias, self.attn_drop if self.training else 0.0)
        out = out.unflatten(0, (xs[0].shape[0], -1))  # (B, N, h, M*L, c)
        return self._scatter(out, grid).unbind(0)


class _PairedWindows(torch.autograd.Function):
    """A :class:`PairedWindowAttention` layer's windows, attention and scatter on the CPU kernels ``pwa_train`` /
    ``pwa_train_backward``: projected (M, B, D, H, W, C) q/k/v of every group, table (R, h) -> (M, B, D, H, W,
    S*h*c_v), as ``_scatter`` returns it. Saved for the backward: the pooled windows, their max-pool voxels and
    the attention weights."""

    @staticmethod
    def forward(ctx, projected, table, layer):  # type: ignore[override]
        geometry = layer.kernel_geometry()
        out, tokens, argmax, probs = torch.ops.veloxseg.pwa_train(projected.contiguous(), table, *geometry)
        ctx.save_for_backward(tokens, argmax, probs, table)
        ctx.geometry, ctx.shape = geometry, list(projected.shape)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        tokens, argmax, probs, table = ctx.saved_tensors
        grad_projected, grad_table = torch.ops.veloxseg.pwa_train_backward(
            grad.contiguous(), tokens, argmax, probs, table, *ctx.geometry, ctx.shape
        )
        return grad_projected, grad_table, None


class FeedForward(nn.Sequential):
    """Channels-last MLP: (..., A) -> (..., rA) -> GELU -> (..., A), dropout after each."""

    def __init__(self, dim: int, ratio: int, drop: float = 0.0) -> None:
        super().__init__(
            PointwiseConv3d(dim, dim * ratio),
            nn.GELU(),
            nn.Dropout(drop),
            PointwiseConv3d(dim * ratio, dim),
            nn.Dropout(drop),
        )


class PWABlock(nn.Module):
    """Paired-window attention then a per-group feed-forward, on M channels-last (B, D, H, W, A) tensors.

    As in the authors' network the attention residual is added twice: ``y = x + (x + attn(x))``; then
    ``z = y + DropPath(ffn(norm(y)))``. Stochastic depth drops the feed-forward branch only: the
    attention's residual is inside the authors' layer, whose output is not a branch to drop.
    """

    def __init__(
        self,
        dim: int,
        num_groups: int,
        scales: Sequence[WindowScale],
        num_heads: int,
        qk_head_dim: int,
        ffn_ratio: int,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn = PairedWindowAttention(dim, num_groups, scales, num_heads, qk_head_dim, attn_drop, proj_drop)
        self.norms = nn.ModuleList(nn.LayerNorm(dim, eps=1e-6) for _ in range(num_groups))
        self.ffns = nn.ModuleList(FeedForward(dim, ffn_ratio, proj_drop) for _ in range(num_groups))
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def forward(self, xs: list[torch.Tensor], groups: Sequence[int] | None = None) -> list[torch.Tensor]:
        """``groups``: which modality groups ``xs`` hold (default all, in order)."""
        groups = range(len(xs)) if groups is None else groups
        ys = [x + o for x, o in zip(xs, self.attn(xs, groups))]
        return [y + self.drop_path(self.ffns[group](self.norms[group](y))) for y, group in zip(ys, groups)]
