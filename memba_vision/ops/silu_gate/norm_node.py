"""VMamba's output gate LayerNorm(y) * silu(z) as one autograd node on the extension's
``norm_gate_fwd`` / ``norm_gate_bwd`` (``fused``): one kernel each way, a warp per token.

Forward: reads the merged scan y (fp32) and z where they are (z may be the strided half of
in_proj's output) and writes the product in z's dtype, the matrix product's input under
autocast. Saved: y, z and the rows' mean and 1 / std. Backward: y's gradient (fp32) and z's
(z's dtype), with LayerNorm's weight and bias frozen (a trainable norm runs per op).

``kernels`` is the extension (``memba_vision._scan_cuda``) or a stand-in with the same
functions (the tests' CPU reference).
"""
from typing import Optional

import torch
from torch import Tensor

from ..bidirectional_ssm.node import scan_extension, scan_kernels_reason

__all__ = ['norm_silu_gate_fused', 'norm_silu_gate_fused_reason', 'norm_reason',
           'norm_kernels_reason', 'kernel_norm_inputs', 'NORM_GATE_MAX_DIM']

NORM_GATE_MAX_DIM = 2048  # kNormGateMaxDim of kernels/scan/scan_kernel.h


class _NormSiluGate(torch.autograd.Function):

    @staticmethod
    def forward(ctx, y, z, weight, bias, eps, kernels):
        out, mean, rstd = kernels.norm_gate_fwd(y, weight, bias, eps, z)
        ctx.save_for_backward(y, z, weight, bias, mean, rstd)
        ctx.kernels = kernels
        return out

    @staticmethod
    def backward(ctx, grad):
        y, z, weight, bias, mean, rstd = ctx.saved_tensors
        dy, dz = ctx.kernels.norm_gate_bwd(y, weight, bias, z, mean, rstd, grad.contiguous())
        return dy, dz, None, None, None, None


def norm_kernels_reason(t: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        kernels=None) -> str:
    """'' when the norm kernels can normalise rows like ``t``'s (..., D) with this norm (frozen,
    with weight and bias), else why not."""
    reason = scan_kernels_reason(t, kernels)
    if reason:
        return reason
    D = t.shape[-1]
    if D % 4 or D > NORM_GATE_MAX_DIM:
        return f'{D} channels (needs a multiple of 4, at most {NORM_GATE_MAX_DIM})'
    if weight is None or bias is None:
        return 'a LayerNorm without weight and bias'
    if weight.requires_grad or bias.requires_grad:
        return 'the LayerNorm trains'
    return ''


def norm_reason(y: Tensor, z: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                kernels=None) -> str:
    """'' when the norm gate kernels can take y, the norm and a z' like ``z`` (contiguous or
    not), else why not."""
    reason = norm_kernels_reason(z, weight, bias, kernels)
    if reason:
        return reason
    if y.dtype != torch.promote_types(z.dtype, torch.float32):
        return f'y is {y.dtype}, z {z.dtype}'
    return ''


def kernel_norm_inputs(y: Tensor, weight: Tensor, bias: Tensor):
    """(y, weight, bias) as the norm gate kernels read them: contiguous, the LayerNorm's
    weight and bias in y's dtype (fp32)."""
    return y.contiguous(), weight.to(y.dtype).contiguous(), bias.to(y.dtype).contiguous()


def norm_silu_gate_fused_reason(y: Tensor, z: Tensor, weight: Optional[Tensor],
                                bias: Optional[Tensor], kernels=None) -> str:
    """'' when ``norm_silu_gate_fused`` can run on these inputs, else why not."""
    reason = norm_reason(y, z, weight, bias, kernels)
    if reason:
        return reason
    rows_ok = z.shape[0] == 1 or z.stride(0) == z.shape[1] * z.stride(1)
    if z.stride(-1) != 1 or z.stride(1) % 4 or not rows_ok \
            or z.data_ptr() % (4 * z.element_size()):
        return f'z strides {tuple(z.stride())} (rows equally spaced, 4-element aligned)'
    return ''


def norm_silu_gate_fused(y: Tensor, z: Tensor, weight: Tensor, bias: Tensor, eps: float,
                         kernels=None) -> Tensor:
    """See ``norm_silu_gate``; the caller checks ``norm_silu_gate_fused_reason`` first."""
    kernels = kernels if kernels is not None else scan_extension()[0]
    y, weight, bias = kernel_norm_inputs(y, weight, bias)
    return _NormSiluGate.apply(y, z, weight, bias, eps, kernels)
