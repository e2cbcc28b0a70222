"""VMamba's depthwise conv2d + bias + SiLU on a channels-last (B, H, W, D) feature map.

u = silu(conv2d(x) + bias), one k x k filter per channel with padding (k - 1) // 2, x and u
(B, H, W, D). Backends: ``fused`` (the scan extension's ``dwconv_fwd`` / ``dwconv_bwd``, one
kernel each way, ``node.py``: 3 x 3, frozen filters, x read where it lies, e.g. the strided x
half of in_proj's output) and ``per-op`` (``F.conv2d`` on channels-last memory, then
``F.silu``: the CPU, other filter sizes, a conv that trains).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dispatch import choose
from .node import depthwise_conv2d_silu_fused, depthwise_conv2d_silu_fused_reason

__all__ = ['depthwise_conv2d_silu', 'depthwise_conv2d_silu_per_op',
           'depthwise_conv2d_silu_fused', 'depthwise_conv2d_silu_backend']


def depthwise_conv2d_silu_per_op(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``depthwise_conv2d_silu`` with ``F.conv2d`` (cuDNN on the GPU) on channels-last memory."""
    k = weight.shape[-1]
    xc = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    return F.silu(F.conv2d(xc, weight, bias, padding=(k - 1) // 2,
                           groups=x.shape[-1])).permute(0, 2, 3, 1)


def depthwise_conv2d_silu_backend(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                                  kernels=None) -> str:
    """'fused' or 'per-op' for these inputs (logged once per run)."""
    return choose('VMamba conv', (
        ('fused', lambda: depthwise_conv2d_silu_fused_reason(x, weight, bias, kernels)),
        ('per-op', None)))


def depthwise_conv2d_silu(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                          kernels=None) -> Tensor:
    """x (B, H, W, D), weight (D, 1, k, k), bias (D,) or None -> silu(conv2d(x) + bias)
    (B, H, W, D) in x's dtype (under autocast, the conv's). ``kernels``: a stand-in for the
    CUDA extension (the tests' CPU reference)."""
    if depthwise_conv2d_silu_backend(x, weight, bias, kernels) == 'fused':
        return depthwise_conv2d_silu_fused(x, weight, bias, kernels)
    return depthwise_conv2d_silu_per_op(x, weight, bias)
