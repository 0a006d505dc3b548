"""3-D pixel shuffle (depth-to-space)."""

import torch

from .conv import eager

# Integer or complex dtypes as wide as ``factor`` elements of the input, keyed by byte width.
_CHUNK_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}


def pixel_shuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Rearrange (B, C * f^3, D, H, W) into (B, C, D * f, H * f, W * f).

    Output voxel (c, d*f + s1, h*f + s2, w*f + s3) is input channel c*f^3 + s1*f^2 + s2*f + s3
    at (d, h, w). ``torch.nn.PixelShuffle`` only handles 2-D images.

    A channels-last input (the segmentation head's output) is moved in chunks of f channels, one
    output run of f voxels each, reinterpreted as one wider element: the copy has a quarter as many
    elements for f = 4 (veloxseg_small's 2 x 96^3 output, one thread: 1.6 instead of 2.3 ms in the model).
    """
    b, c, d, h, w = x.shape
    f = factor
    if c % (f**3):
        raise ValueError(f"pixel_shuffle_3d: {c} channels is not a multiple of factor^3 = {f**3}")
    chunk = _CHUNK_DTYPES.get(f * x.element_size())
    if (
        chunk is not None
        and x.is_contiguous(memory_format=torch.channels_last_3d)
        and not (x.requires_grad and torch.is_grad_enabled())  # dtype views are not differentiable
        and eager()
    ):
        runs = x.permute(0, 2, 3, 4, 1).view(chunk).view(b, d, h, w, c // f**3, f, f)  # (.., C, s1, s2)
        out = torch.empty(b, c // f**3, d, f, h, f, w, dtype=chunk, device=x.device)
        out.copy_(runs.permute(0, 4, 1, 5, 2, 6, 3))
        return out.view(x.dtype).view(b, c // f**3, d * f, h * f, w * f)
    x = x.view(b, c // f**3, f, f, f, d, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c // f**3, d * f, h * f, w * f)
