"""LayerNorm in the storage dtype as one autograd node on the scan extension's
``layer_norm_fwd`` / ``layer_norm_bwd`` (``fused``): the norm gate's kernels without the gate,
a warp per row.

Forward: reads x (..., D) in its dtype and writes the normalised row in that dtype (statistics
and affine in fp32, one rounding), with the rows' mean and 1 / std (fp32). Saved: x and those
two numbers per row. Backward: x's gradient in x's dtype; the weight and bias are frozen (a
trainable norm runs per op).

``kernels`` is the extension (``memba_vision._scan_cuda``) or a stand-in with the same
functions (the tests' CPU reference).
"""
from typing import Optional

import torch
from torch import Tensor

from ..bidirectional_ssm.node import scan_extension
from ..silu_gate.norm_node import norm_kernels_reason

__all__ = ['layer_norm_fused', 'layer_norm_fused_reason']


class _LayerNorm(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, eps, kernels):
        out, mean, rstd = kernels.layer_norm_fwd(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.kernels = kernels
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx = ctx.kernels.layer_norm_bwd(x, weight, bias, mean, rstd, grad.contiguous())
        return dx, None, None, None, None


def layer_norm_fused_reason(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                            kernels=None) -> str:
    """'' when ``layer_norm_fused`` can run on these inputs, else why not."""
    return norm_kernels_reason(x, weight, bias, kernels)


def layer_norm_fused(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                     kernels=None) -> Tensor:
    """See ``layer_norm_in_dtype``; the caller checks the fused reason first."""
    kernels = kernels if kernels is not None else scan_extension()[0]
    acc = torch.promote_types(x.dtype, torch.float32)
    return _LayerNorm.apply(x.contiguous(), weight.to(acc).contiguous(),
                            bias.to(acc).contiguous(), eps, kernels)
