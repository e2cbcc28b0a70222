"""VMamba's depthwise 3 x 3 conv + bias + SiLU as one autograd node on the scan extension's
``dwconv_fwd`` / ``dwconv_bwd`` (``fused``).

Forward: one kernel reads x (B, H, W, D) where it lies (the x half of in_proj's output: no
channels-last copy) and writes u = silu(conv(x) + bias) in x's dtype, in fp32 arithmetic with
the fp32 filters (no separate bias add, no SiLU pass). Saved: x only. Backward: one kernel
recomputes the conv on each tile and its border and writes x's gradient; the filters are
frozen (a conv that trains runs per op).

``kernels`` is the extension (``memba_vision._scan_cuda``) or a stand-in with the same
functions (the tests' CPU reference).
"""
from typing import Optional

import torch
from torch import Tensor

from ..bidirectional_ssm.node import scan_extension, scan_kernels_reason

__all__ = ['depthwise_conv2d_silu_fused', 'depthwise_conv2d_silu_fused_reason']


class _DepthwiseConv2dSilu(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, kernels):
        ctx.save_for_backward(x, weight, bias)
        ctx.kernels = kernels
        return kernels.dwconv_fwd(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        return ctx.kernels.dwconv_bwd(x, weight, bias, grad.contiguous()), None, None, None


def depthwise_conv2d_silu_fused_reason(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                                       kernels=None) -> str:
    """'' when ``depthwise_conv2d_silu_fused`` can run on these inputs, else why not."""
    reason = scan_kernels_reason(x, kernels)
    if reason:
        return reason
    if tuple(weight.shape[1:]) != (1, 3, 3):
        return f'filters {tuple(weight.shape[1:])} (the kernels do (1, 3, 3))'
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return 'the conv trains'
    if x.shape[-1] % 4 or x.stride(-1) != 1 or any(s % 4 for s in x.stride()[:3]) \
            or x.data_ptr() % (4 * x.element_size()):
        return (f'x of shape {tuple(x.shape)} and strides {tuple(x.stride())} (channels, pixel '
                'strides and address must be multiples of 4 elements)')
    return ''


def depthwise_conv2d_silu_fused(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                                kernels=None) -> Tensor:
    """See ``depthwise_conv2d_silu``; the caller checks the fused reason first."""
    kernels = kernels if kernels is not None else scan_extension()[0]
    acc = torch.promote_types(x.dtype, torch.float32)  # the kernels' fp32 filters
    weight = weight.detach().to(acc).contiguous()
    bias = None if bias is None else bias.detach().to(acc).contiguous()
    return _DepthwiseConv2dSilu.apply(x, weight, bias, kernels)
