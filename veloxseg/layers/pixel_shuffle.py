"""3-D pixel shuffle (depth-to-space)."""

import torch


def pixel_shuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Rearrange (B, C * f^3, D, H, W) into (B, C, D * f, H * f, W * f).

    Output voxel (c, d*f + s1, h*f + s2, w*f + s3) is input channel c*f^3 + s1*f^2 + s2*f + s3
    at (d, h, w). ``torch.nn.PixelShuffle`` only handles 2-D images.
    """
    b, c, d, h, w = x.shape
    f = factor
    if c % (f**3):
        raise ValueError(f"pixel_shuffle_3d: {c} channels is not a multiple of factor^3 = {f**3}")
    x = x.view(b, c // f**3, f, f, f, d, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c // f**3, d * f, h * f, w * f)
