"""Selective scan (Mamba's S6 recurrence) with a CUDA path and a PyTorch reference.

For each channel d and state n, with dt = softplus(delta + delta_bias) when
``delta_softplus``::

    h[t] = exp(dt[t] * A[d, n]) * h[t-1] + dt[t] * B[n, t] * u[t]
    y[t] = sum_n C[n, t] * h[t][n] + D[d] * u[t]
    y    = y * silu(z)                       (when a gate z is given)

Shapes (as in mamba-ssm): u, delta, z (b, d, l); A (d, n); B, C (b, n, l) or
(b, g, n, l) with d divisible by g (channel c uses group c // (d // g));
D, delta_bias (d,).

On CUDA tensors mamba-ssm's ``selective_scan_fn`` runs (the gate z fused into
the kernel). Without mamba-ssm, when A, D and delta_bias need no gradient (every
PEFT method: the backbone is frozen), the Triton kernel of
``selective_scan_triton`` runs; otherwise the reference below.
``MEMBA_SCAN_BACKEND=cuda|triton|torch`` forces a path. mamba_ssm and triton are
imported lazily, never at module import.
"""
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import log_once, mamba_ssm_scan_fn, triton_scan_fn

__all__ = ['selective_scan', 'selective_scan_reference', 'scan_backend']

_BACKEND_ENV = 'MEMBA_SCAN_BACKEND'
# Steps integrated per vectorised block of the reference; bounds the memory of
# the (b, d, steps, n) intermediates.
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
    for s in range(0, l, _REF_BLOCK):
        e = min(s + _REF_BLOCK, l)
        dt_blk = dt[:, :, s:e, None]                                   # (b, d, k, 1)
        dA = torch.exp(dt_blk * A_[None, :, None, :])                  # (b, d, k, n)
        dBu = dt_blk * u_[:, :, s:e, None] * B_[..., s:e].transpose(-1, -2)
        hs = []
        for k in range(e - s):
            h = dA[:, :, k] * h + dBu[:, :, k]
            hs.append(h)
        hs = torch.stack(hs, dim=2)                                    # (b, d, k, n)
        ys.append((hs * C_[..., s:e].transpose(-1, -2)).sum(-1))       # (b, d, k)
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


def scan_backend(u: Tensor, frozen: bool = True) -> str:
    """'triton', 'cuda' (mamba-ssm) or 'torch' (reference) for a tensor like ``u``.

    ``frozen``: A, D and delta_bias need no gradient.
    """
    return _resolve(u, frozen)[0]


def _resolve(u: Tensor, frozen: bool):
    """(backend, reason the reference runs or '')."""
    forced = os.environ.get(_BACKEND_ENV, '').strip().lower()
    if forced not in ('', 'triton', 'cuda', 'torch'):
        raise ValueError(f'{_BACKEND_ENV} must be triton, cuda or torch, got {forced!r}')
    if forced == 'torch':
        return 'torch', f'{_BACKEND_ENV}=torch'
    if not u.is_cuda:
        if forced:
            raise RuntimeError(f'{_BACKEND_ENV}={forced} needs CUDA tensors, got {u.device}')
        return 'torch', 'tensors are on the CPU'
    if forced == 'triton' and not frozen:
        raise RuntimeError(f'{_BACKEND_ENV}=triton: A, D or delta_bias requires a gradient, '
                           f'which the Triton kernel does not compute')
    if forced in ('', 'cuda'):
        fn, reason = mamba_ssm_scan_fn()
        if fn is not None:
            return 'cuda', ''
        if forced == 'cuda':
            raise RuntimeError(f'{_BACKEND_ENV}=cuda but {reason}')
        if not frozen:
            return 'torch', reason
    fn, triton_reason = triton_scan_fn()
    if fn is not None:
        return 'triton', ''
    if forced == 'triton':
        raise RuntimeError(f'{_BACKEND_ENV}=triton but {triton_reason}')
    return 'torch', f'{reason}; {triton_reason}'


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                   delta_bias: Optional[Tensor] = None,
                   delta_softplus: bool = False) -> Tensor:
    """Selective scan, dispatched to mamba-ssm or Triton on CUDA. Returns y (b, d, l) in u's dtype."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f'selective_scan: u and delta must both be (b, d, l), got '
                         f'{tuple(u.shape)} and {tuple(delta.shape)}')
    backend, reason = _resolve(u, frozen=not _needs_grad(A, D, delta_bias))
    if backend == 'triton':
        log_once('scan:triton', 'memba_vision.ops: selective scan uses the Triton kernels '
                                '(frozen A, D and delta_bias)')
        fn, _ = triton_scan_fn()
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if backend == 'cuda':
        log_once('scan:cuda', 'memba_vision.ops: selective scan uses the mamba-ssm CUDA kernels')
        fn, _ = mamba_ssm_scan_fn()
        dt = u.dtype
        # The kernel wants u, delta, B, C and z in one dtype and A, D, bias in fp32.
        return fn(u, delta.to(dt), A.float(), B.to(dt), C.to(dt),
                  None if D is None else D.float(), None if z is None else z.to(dt),
                  None if delta_bias is None else delta_bias.float(), delta_softplus)
    log_once('scan:torch', f'memba_vision.ops: selective scan uses the PyTorch reference ({reason})')
    return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
