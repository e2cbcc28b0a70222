"""Selective scan (Mamba's S6 recurrence) in PyTorch: the reference every backend matches.

For each channel d and state n, with dt = softplus(delta + delta_bias) when
``delta_softplus``::

    h[t] = exp(dt[t] * A[d, n]) * h[t-1] + dt[t] * B[n, t] * u[t]
    y[t] = sum_n C[n, t] * h[t][n] + D[d] * u[t]
    y    = y * silu(z)                       (when a gate z is given)

Shapes (as in mamba-ssm): u, delta, z (b, d, l); A (d, n); B, C (b, n, l) or
(b, g, n, l) with d divisible by g (channel c uses group c // (d // g));
D, delta_bias (d,).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['selective_scan_reference']

# Steps integrated per vectorised block; bounds the memory of the (b, d, steps, n)
# intermediates.
_REF_BLOCK = 64


def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                             delta_bias: Optional[Tensor] = None,
                             delta_softplus: bool = False) -> Tensor:
    """Pure-PyTorch selective scan; integrates in fp32 (fp64 for fp64 inputs)."""
    dtype_in = u.dtype
    ct = torch.promote_types(u.dtype, torch.float32)
    b, d, l = u.shape
    n = A.shape[1]
    u_, A_ = u.to(ct), A.to(ct)
    dt = delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[None, :, None]
    if delta_softplus:
        dt = F.softplus(dt)
    B_ = _expand_groups(B.to(ct), d)  # (b, d, n, l)
    C_ = _expand_groups(C.to(ct), d)
    h = u_.new_zeros(b, d, n)
    ys = []
    # blocks of _REF_BLOCK steps, split (and steps unbound) once: one backward node per split
    # instead of a full-length zero-filled gradient per slice
    blocks = zip(*(t.split(_REF_BLOCK, dim=-1) for t in (dt, u_, B_, C_)))
    for dt_b, u_b, B_b, C_b in blocks:
        dt_blk = dt_b[..., None]                                       # (b, d, k, 1)
        dA = torch.exp(dt_blk * A_[None, :, None, :])                  # (b, d, k, n)
        dBu = dt_blk * u_b[..., None] * B_b.transpose(-1, -2)
        hs = []
        for dA_k, dBu_k in zip(dA.unbind(2), dBu.unbind(2)):
            h = dA_k * h + dBu_k
            hs.append(h)
        hs = torch.stack(hs, dim=2)                                    # (b, d, k, n)
        ys.append((hs * C_b.transpose(-1, -2)).sum(-1))                # (b, d, k)
    y = torch.cat(ys, dim=-1)
    if D is not None:
        y = y + u_ * D.to(ct)[None, :, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(dtype_in)


def _expand_groups(M: Tensor, d: int) -> Tensor:
    """(b, n, l) or (b, g, n, l) -> (b, d, n, l) (a broadcast view where possible)."""
    if M.dim() == 3:
        return M[:, None].expand(-1, d, -1, -1)
    b, g, n, l = M.shape
    if d % g:
        raise ValueError(f'selective_scan: {d} channels are not divisible into {g} groups')
    return M[:, :, None].expand(b, g, d // g, n, l).reshape(b, d, n, l)
