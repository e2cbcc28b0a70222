"""VMamba's Memba gate, out_norm(y) * silu(z') with Memba's z', as one autograd node on the
extension's LIM pair and norm gate (``fused``).

Forward: v = z W_in^T for both directions in one product (B, L, 2, R); both LIMs in one
``lim_pair_fwd`` launch on that layout, the reversed direction walking from the last token
(nothing is flipped); the correction c = S (0.5 W_out)^T in one product; ``norm_gate_fwd`` on
y, z and c, which adds z' = z + c as it reads them (z' is never written). Saved: y, z, v, the
spikes and the norm's two numbers per token; c is recomputed in the backward (one product)
rather than kept. Backward: ``norm_gate_bwd`` (y's and z''s gradients), dS = dz' (0.5 W_out),
one ``lim_pair_bwd`` launch, dz = dz' + dv W_in added in place, and one product per weight.

``kernels`` is the extension (``memba_vision._scan_cuda``) or a stand-in with the same
functions (the tests' CPU reference).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..bidirectional_ssm.node import (LIM_PAIR_MAX_CHUNKS, MembaGateParams, mm_f32,
                                      scan_extension)
from .norm_node import kernel_norm_inputs, norm_reason

__all__ = ['memba_norm_silu_gate_fused', 'memba_norm_silu_gate_fused_reason']


def _gate_input(z: Tensor, spikes: Tensor, w_half: Tensor, residual: bool):
    """(z, c) for the norm gate kernels, z' = z + c with c = S (0.5 W_out)^T (B, L, D), or
    (c, None) for z' = c (no residual); spikes (B, L, 2, R)."""
    c = torch.mm(spikes.view(-1, w_half.shape[1]), w_half.t()).view(z.shape)
    return (z, c) if residual else (c, None)


class _MembaNormGate(torch.autograd.Function):

    @staticmethod
    def forward(ctx, y, z, w_in, w_out, u_prev_f, u_prev_b, norm_w, norm_b, eps, gate,
                kernels):
        ctx.set_materialize_grads(False)
        with torch.autocast(z.device.type, enabled=False):  # dtypes are chosen here
            B, L, D = z.shape
            R = w_in.shape[0] // 2
            zf = z.reshape(-1, D)
            w_in_lp = w_in.to(z.dtype)                                            # (2R, D)
            w_half = torch.mul(w_out, 0.5, out=w_out.new_empty(w_out.shape, dtype=z.dtype))
            v = torch.mm(zf, w_in_lp.t()).view(B, L, 2, R)
            S, u_mean = kernels.lim_pair_fwd(v, u_prev_f, u_prev_b, gate.num_chunks, gate.leak,
                                             gate.threshold)                  # (B, L, 2, R)
            out, mean, rstd = kernels.norm_gate_fwd(y, norm_w, norm_b, eps,
                                                    *_gate_input(z, S, w_half, gate.residual))
        ctx.save_for_backward(y, z, w_in_lp, w_half, v, S, u_prev_f, u_prev_b, norm_w, norm_b,
                              mean, rstd)
        ctx.gate, ctx.kernels, ctx.dtypes = gate, kernels, (w_in.dtype, w_out.dtype)
        return out, u_mean[0], u_mean[1]

    @staticmethod
    def backward(ctx, grad, du_mean_f, du_mean_b):
        (y, z, w_in_lp, w_half, v, S, u_prev_f, u_prev_b, norm_w, norm_b, mean,
         rstd) = ctx.saved_tensors
        gate, needs = ctx.gate, ctx.needs_input_grad
        B, L, D = z.shape
        R2 = w_in_lp.shape[0]
        with torch.autocast(z.device.type, enabled=False):
            zf, Sf = z.reshape(-1, D), S.view(-1, R2)
            dy = None
            if grad is None:  # only the membranes reach the loss
                dzp = torch.zeros_like(zf)
            else:
                zc, c = _gate_input(z, S, w_half, gate.residual)
                dy, dzp = ctx.kernels.norm_gate_bwd(y, norm_w, norm_b, zc, mean, rstd,
                                                    grad.contiguous(), c)
                dzp = dzp.view(-1, D)                                         # (BL, D)
            dS = torch.mm(dzp, w_half).view(S.shape)
            dw_out = (0.5 * mm_f32(dzp.t(), Sf)).to(ctx.dtypes[1]) if needs[3] else None
            du_mean_f, du_mean_b = (None if g is None else g.contiguous()
                                    for g in (du_mean_f, du_mean_b))
            dv, du_prev_f, du_prev_b = ctx.kernels.lim_pair_bwd(
                v, u_prev_f, u_prev_b, dS, du_mean_f, du_mean_b, gate.num_chunks, gate.leak,
                gate.threshold)
            dvf = dv.view(-1, R2)
            dz = None
            if needs[1]:
                # in place: dzp is this node's own buffer, and dS and dW_out are taken
                dz = dzp.addmm_(dvf, w_in_lp) if gate.residual else torch.mm(dvf, w_in_lp)
                dz = dz.view(B, L, D)
            dw_in = mm_f32(dvf.t(), zf).to(ctx.dtypes[0]) if needs[2] else None
        return (dy, dz, dw_in, dw_out, du_prev_f, du_prev_b, None, None, None, None, None)


def memba_norm_silu_gate_fused_reason(y: Tensor, z: Tensor, weight: Optional[Tensor],
                                      bias: Optional[Tensor], gate: MembaGateParams,
                                      kernels=None) -> str:
    """'' when ``memba_norm_silu_gate_fused`` can run on these inputs, else why not."""
    reason = norm_reason(y, z, weight, bias, kernels)
    if reason:
        return reason
    if not 1 <= gate.num_chunks <= LIM_PAIR_MAX_CHUNKS:
        return f'gate num_chunks {gate.num_chunks} > {LIM_PAIR_MAX_CHUNKS}'
    return ''


def memba_norm_silu_gate_fused(
        y: Tensor, z: Tensor, weight: Tensor, bias: Tensor, eps: float, w_in: Tensor,
        w_out: Tensor, gate: MembaGateParams,
        membrane: Optional[Tuple[Optional[Tensor], Optional[Tensor]]] = None,
        kernels=None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """See ``memba_norm_silu_gate``; the caller checks the fused reason first."""
    kernels = kernels if kernels is not None else scan_extension()[0]
    u_prev_f, u_prev_b = membrane if membrane is not None else (None, None)
    y, weight, bias = kernel_norm_inputs(y, weight, bias)
    out, m_f, m_b = _MembaNormGate.apply(y, z, w_in, w_out, u_prev_f, u_prev_b, weight, bias,
                                         eps, gate, kernels)
    return out, (m_f, m_b)
