"""Selective scan (Mamba's S6 recurrence) with a CUDA path and a PyTorch reference.

For each channel d and state n, with dt = softplus(delta + delta_bias) when
``delta_softplus``::

    h[t] = exp(dt[t] * A[d, n]) * h[t-1] + dt[t] * B[n, t] * u[t]
    y[t] = sum_n C[n, t] * h[t][n] + D[d] * u[t]
    y    = y * silu(z)                       (when a gate z is given)

Shapes (as in mamba-ssm): u, delta, z (b, d, l); A (d, n); B, C (b, n, l) or
(b, g, n, l) with d divisible by g (channel c uses group c // (d // g));
D, delta_bias (d,).

``selective_scan_tokens`` is the same scan on token-major tensors (b, l, d),
optionally walked from the last token to the first and with a low-rank gate
correction; on CUDA it runs memba_vision's own kernels (``ops.scan_cuda``) when
they apply, and otherwise transposes into this layout.

On CUDA tensors mamba-ssm's ``selective_scan_fn`` runs (the gate z fused into
the kernel). Without mamba-ssm, when A, D and delta_bias need no gradient (every
PEFT method: the backbone is frozen), the Triton kernel of
``selective_scan_triton`` runs; otherwise the reference below.
``MEMBA_SCAN_BACKEND=memba|cuda|triton|torch`` forces a path (``memba``: the
token-major kernels of this package; ``cuda``: mamba-ssm). mamba_ssm and triton are
imported lazily, never at module import.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import scan_cuda
from ._dispatch import forced_backend, log_once, mamba_ssm_scan_fn, triton_scan_fn

__all__ = ['selective_scan', 'selective_scan_reference', 'selective_scan_tokens', 'scan_backend']

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
    forced = _forced()
    if forced == 'memba':  # token-major kernels only; this layout falls through to the rest
        forced = ''
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


def _forced() -> str:
    return forced_backend(_BACKEND_ENV, ('memba', 'triton', 'cuda', 'torch'))


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


def _tokens_kernel_reason(u: Tensor, A: Tensor, B: Tensor, D, delta_bias, gate) -> str:
    """'' when the token-major CUDA kernels apply to these inputs, else why not."""
    reason = scan_cuda.unavailable_for(u)
    if reason:
        return reason
    if A.shape[1] != scan_cuda.D_STATE:
        return f'd_state {A.shape[1]} != {scan_cuda.D_STATE}'
    if B.dim() != 3:
        return 'grouped B/C'
    if gate is not None and gate[1].shape[1] != scan_cuda.GATE_RANK:
        return f'gate rank {gate[1].shape[1]} != {scan_cuda.GATE_RANK}'
    if _needs_grad(A, D, delta_bias):
        return 'A, D or delta_bias requires a gradient'
    return ''


def selective_scan_tokens(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                          D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                          delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                          reverse: bool = False,
                          gate: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """Selective scan on token-major tensors.

    u, delta, z: (b, l, d); B, C: (b, l, n); A (d, n); D, delta_bias (d,).
    ``reverse`` scans from the last token to the first (the result stays in input
    token order), which is the scan of the flipped sequence, flipped back.
    ``gate = (S, W)`` with S (b, l, r) and W (d, r) gates with z' = z + S W^T
    (z' = S W^T when z is None) in place of z. Returns y (b, l, d) in u's dtype.
    """
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f'selective_scan_tokens: u and delta must both be (b, l, d), got '
                         f'{tuple(u.shape)} and {tuple(delta.shape)}')
    forced = _forced()
    reason = _tokens_kernel_reason(u, A, B, D, delta_bias, gate) if forced in ('', 'memba') \
        else f'{_BACKEND_ENV}={forced}'
    if not reason:
        log_once('scan:memba', 'memba_vision.ops: token-major selective scan uses the '
                               'memba_vision CUDA kernels')
        return scan_cuda.scan_tokens_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                          reverse, gate)
    if forced == 'memba':
        raise RuntimeError(f'{_BACKEND_ENV}=memba but the token-major kernels do not apply: {reason}')
    if gate is not None:
        S, W = gate
        correction = torch.matmul(S, W.to(S.dtype).t())
        z = correction if z is None else z + correction.to(z.dtype)

    def to_scan(t):  # (b, l, k) -> (b, k, l) in scan order
        t = t.transpose(1, 2)
        return t.flip(-1) if reverse else t

    y = selective_scan(to_scan(u), to_scan(delta), A, to_scan(B), to_scan(C), D,
                       None if z is None else to_scan(z), delta_bias, delta_softplus)
    return (y.flip(-1) if reverse else y).transpose(1, 2)
