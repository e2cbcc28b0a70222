"""VMamba's Memba gate input z' as one autograd node on the extension's LIM pair (``fused``).

Forward: v = z W_in^T for both directions in one product (B, L, 2, R); both LIMs in one
``lim_pair_fwd`` launch on that layout, the reversed direction walking from the last token
(nothing is flipped); z' = z + S (0.5 W_out)^T in one ``addmm``. Saved: z, v and the spikes.
Backward: dS = dz' (0.5 W_out), one ``lim_pair_bwd`` launch, dz = dz' + dv W_in in one
``addmm`` and one product per weight.

``kernels`` is the extension (``memba_vision._scan_cuda``) or a stand-in with the same
functions (the tests' CPU reference).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..bidirectional_ssm.node import (LIM_PAIR_MAX_CHUNKS, MembaGateParams, mm_f32,
                                      scan_extension, scan_kernels_reason)

__all__ = ['memba_gate_input_fused', 'memba_gate_input_fused_reason']


class _MembaGateInput(torch.autograd.Function):

    @staticmethod
    def forward(ctx, z, w_in, w_out, u_prev_f, u_prev_b, gate, kernels):
        ctx.set_materialize_grads(False)
        with torch.autocast(z.device.type, enabled=False):  # dtypes are chosen here
            B, L, D = z.shape
            R = w_in.shape[0] // 2
            zf = z.reshape(-1, D)
            w_in_lp, w_half = w_in.to(z.dtype), (0.5 * w_out).to(z.dtype)  # (2R, D), (D, 2R)
            v = torch.mm(zf, w_in_lp.t()).view(B, L, 2, R)
            S, u_mean = kernels.lim_pair_fwd(v, u_prev_f, u_prev_b, gate.num_chunks, gate.leak,
                                             gate.threshold)                  # (B, L, 2, R)
            Sf = S.view(-1, 2 * R)
            zp = torch.addmm(zf, Sf, w_half.t()) if gate.residual else torch.mm(Sf, w_half.t())
        ctx.save_for_backward(z, w_in_lp, w_half, v, S, u_prev_f, u_prev_b)
        ctx.gate, ctx.kernels, ctx.dtypes = gate, kernels, (w_in.dtype, w_out.dtype)
        return zp.view(B, L, D), u_mean[0], u_mean[1]

    @staticmethod
    def backward(ctx, dzp, du_mean_f, du_mean_b):
        z, w_in_lp, w_half, v, S, u_prev_f, u_prev_b = ctx.saved_tensors
        gate, needs = ctx.gate, ctx.needs_input_grad
        B, L, D = z.shape
        R2 = w_in_lp.shape[0]
        with torch.autocast(z.device.type, enabled=False):
            zf, Sf = z.reshape(-1, D), S.view(-1, R2)
            if dzp is None:  # only the membranes reach the loss
                dzp = torch.zeros_like(zf)
            dzp = dzp.reshape(-1, D).to(z.dtype)                              # (BL, D)
            dS = torch.mm(dzp, w_half).view(S.shape)
            dw_out = (0.5 * mm_f32(dzp.t(), Sf)).to(ctx.dtypes[1]) if needs[2] else None
            du_mean_f, du_mean_b = (None if g is None else g.contiguous()
                                    for g in (du_mean_f, du_mean_b))
            dv, du_prev_f, du_prev_b = ctx.kernels.lim_pair_bwd(
                v, u_prev_f, u_prev_b, dS, du_mean_f, du_mean_b, gate.num_chunks, gate.leak,
                gate.threshold)
            dvf = dv.view(-1, R2)
            dz = None
            if needs[0]:
                dz = torch.addmm(dzp, dvf, w_in_lp) if gate.residual else torch.mm(dvf, w_in_lp)
                dz = dz.view(B, L, D)
            dw_in = mm_f32(dvf.t(), zf).to(ctx.dtypes[0]) if needs[1] else None
        return dz, dw_in, dw_out, du_prev_f, du_prev_b, None, None


def memba_gate_input_fused_reason(z: Tensor, gate: MembaGateParams, kernels=None) -> str:
    """'' when ``memba_gate_input_fused`` can run on these inputs, else why not."""
    reason = scan_kernels_reason(z, kernels)
    if reason:
        return reason
    if not 1 <= gate.num_chunks <= LIM_PAIR_MAX_CHUNKS:
        return f'gate num_chunks {gate.num_chunks} > {LIM_PAIR_MAX_CHUNKS}'
    return ''


def memba_gate_input_fused(z: Tensor, w_in: Tensor, w_out: Tensor, gate: MembaGateParams,
                           membrane: Optional[Tuple[Optional[Tensor], Optional[Tensor]]] = None,
                           kernels=None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """See ``memba_gate_input``; the caller checks ``memba_gate_input_fused_reason`` first."""
    kernels = kernels if kernels is not None else scan_extension()[0]
    u_prev_f, u_prev_b = membrane if membrane is not None else (None, None)
    zp, m_f, m_b = _MembaGateInput.apply(z, w_in, w_out, u_prev_f, u_prev_b, gate, kernels)
    return zp, (m_f, m_b)
