"""Gradient saliency on the token grid: input-gradient x input and Grad-CAM."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['input_x_gradient', 'pool_to_grid', 'grad_cam', 'upsample', 'tokens_to_grid']


def input_x_gradient(inputs: Tensor, grad: Tensor, baseline: str = 'mean') -> Tensor:
    """|sum_c grad * (input - baseline)| per pixel: (B, 3, H, W) twice -> (B, H, W).

    ``baseline``: 'mean', each image's mean colour (the first-order term of
    integrated gradients from a flat image of that colour); 'zero', the literal
    gradient x input of the normalised input, whose zero is the normalisation's
    mean colour (ImageNet's), so that a background far from it weighs as much
    as the object.
    """
    if baseline == 'mean':
        inputs = inputs - inputs.mean((2, 3), keepdim=True)
    elif baseline != 'zero':
        raise ValueError(f"baseline must be 'mean' or 'zero', got {baseline!r}")
    return (grad * inputs).sum(1).abs()


def pool_to_grid(pixels: Tensor, grid: Tuple[int, int]) -> Tensor:
    """(B, H, W) -> (B, h, w): the mean over each token's patch (H, W divisible by h, w)."""
    return F.adaptive_avg_pool2d(pixels[:, None], grid)[:, 0]


def grad_cam(acts: Tensor, grads: Tensor, keep: Optional[Tensor] = None) -> Tensor:
    """Grad-CAM on tokens: ReLU(sum_c mean_t(grad[t, c]) * act[:, c]), (B, L, C) twice -> (B, L).

    ``keep`` (L,) bool selects the tokens that count (e.g. all but a cls token)
    for the channel weights and the result.
    """
    if keep is not None:
        acts, grads = acts[:, keep], grads[:, keep]
    weights = grads.mean(1, keepdim=True)                      # (B, 1, C)
    return F.relu((weights * acts).sum(-1))


def tokens_to_grid(values: Tensor, grid: Tuple[int, int], cls_index: Optional[int] = None
                   ) -> Tensor:
    """(B, L) values in token order -> (B, h, w), the cls token (if any) taken out."""
    if cls_index is not None:
        values = torch.cat([values[:, :cls_index], values[:, cls_index + 1:]], 1)
    return values.reshape(values.shape[0], *grid)


def upsample(grid_map: Tensor, size: Tuple[int, int], mode: str = 'bilinear') -> Tensor:
    """(B, h, w) -> (B, H, W); 'nearest' keeps NaN (trimmed tokens) in their own patch."""
    kw = {} if mode == 'nearest' else dict(align_corners=False)
    return F.interpolate(grid_map[:, None], size=size, mode=mode, **kw)[:, 0]
