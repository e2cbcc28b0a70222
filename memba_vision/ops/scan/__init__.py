"""Selective scan: the PyTorch reference and, on the GPU, mamba-ssm's kernel.

``selective_scan`` takes mamba-ssm's layout (u, delta, z (b, d, l); see
``reference``); ``selective_scan_tokens`` the token-major one (b, l, d) of Vim's
per-op mixer, transposed into it. Vim's GPU path is the fused ``ops.bidirectional_ssm``
and VMamba's the fused ``ops.cross_scan`` (memba_vision's own scan kernels); this op
serves the rest: the per-op fallbacks and the CPU.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..dispatch import choose
from .mamba_ssm import selective_scan_mamba_ssm, unavailable_reason
from .reference import selective_scan_reference

__all__ = ['selective_scan', 'selective_scan_reference', 'selective_scan_tokens', 'scan_backend']


def scan_backend(u: Tensor) -> str:
    """'mamba-ssm' or 'reference': the backend ``selective_scan`` runs for tensors like ``u``."""
    return choose('selective scan', (('mamba-ssm', lambda: unavailable_reason(u)),
                                     ('reference', None)))


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                   delta_bias: Optional[Tensor] = None,
                   delta_softplus: bool = False) -> Tensor:
    """Selective scan (see ``reference``). Returns y (b, d, l) in u's dtype."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f'selective_scan: u and delta must both be (b, d, l), got '
                         f'{tuple(u.shape)} and {tuple(delta.shape)}')
    fn = selective_scan_mamba_ssm if scan_backend(u) == 'mamba-ssm' \
        else selective_scan_reference
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


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
