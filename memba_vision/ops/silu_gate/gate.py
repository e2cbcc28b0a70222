"""``y * silu(z')`` with given spikes: z' = z + S W^T (or S W^T without the residual), as one
autograd node that saves y, z and the spikes and recomputes z' and silu(z') in the backward
(one (B, L, 2R) x (2R, D) product), instead of keeping z' and silu(z') (two (B, L, D) tensors
per layer) from the forward to the backward.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['silu_gate', 'silu_gate_reference', 'silu_gate_grads']


def _gate_input(z: Tensor, spikes: Optional[Tensor], weight: Optional[Tensor],
                residual: bool) -> Tensor:
    """z' in z's dtype: z, z + S W^T or S W^T."""
    if spikes is None:
        return z
    correction = torch.matmul(spikes.to(z.dtype), weight.to(z.dtype).t())
    return z + correction if residual else correction


def silu_gate_reference(y: Tensor, z: Tensor, spikes: Optional[Tensor] = None,
                        weight: Optional[Tensor] = None, residual: bool = True) -> Tensor:
    """y (B, L, D) * silu(z') with z (B, L, D), spikes (B, L, R), weight (D, R); autograd's
    own backward. The product has y's and z's promoted dtype."""
    return y * F.silu(_gate_input(z, spikes, weight, residual))


class _SiluGate(torch.autograd.Function):

    @staticmethod
    def forward(ctx, y, z, spikes, weight, residual):
        with torch.autocast(y.device.type, enabled=False):  # dtypes are chosen here
            out = y * F.silu(_gate_input(z, spikes, weight, residual))
        ctx.save_for_backward(y, z, spikes, weight)
        ctx.residual = residual
        return out

    @staticmethod
    def backward(ctx, grad):
        y, z, spikes, weight = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            zp = _gate_input(z, spikes, weight, ctx.residual)
            dy, dzp = silu_gate_grads(grad, y, zp, ctx.needs_input_grad[0])
            dzp = dzp.to(z.dtype)
            dz = dzp if ctx.residual and ctx.needs_input_grad[1] else None
            dspikes = dweight = None
            if spikes is not None:
                if ctx.needs_input_grad[2]:
                    dspikes = torch.matmul(dzp, weight.to(dzp.dtype)).to(spikes.dtype)
                if ctx.needs_input_grad[3]:
                    flat = dzp.reshape(-1, dzp.shape[-1])
                    dweight = torch.matmul(flat.t(), spikes.reshape(-1, spikes.shape[-1])
                                           .to(flat.dtype)).to(weight.dtype)
        return dy, dz, dspikes, dweight, None


def silu_gate_grads(grad: Tensor, y: Tensor, zp: Tensor, need_y: bool):
    """The gradients of y * silu(z') for the output gradient ``grad``: (dy in y's dtype or
    None, dz' in the promoted dtype)."""
    s = torch.sigmoid(zp)
    dy = (grad * (zp * s)).to(y.dtype) if need_y else None
    # d silu(z') / d z' = s (1 + z' (1 - s))
    return dy, grad * y * (s * (1 + zp * (1 - s)))


def silu_gate(y: Tensor, z: Tensor, spikes: Optional[Tensor] = None,
              weight: Optional[Tensor] = None, residual: bool = True) -> Tensor:
    """y (B, L, D) * silu(z'), z' = z + spikes @ weight^T (``residual``), spikes @ weight^T
    (not ``residual``) or z (no spikes); spikes (B, L, R), weight (D, R). Same values and
    gradients as ``silu_gate_reference``, with less kept for the backward."""
    if spikes is None and not residual:
        raise ValueError('silu_gate: residual=False needs spikes and a weight')
    return _SiluGate.apply(y, z, spikes, weight, residual)
