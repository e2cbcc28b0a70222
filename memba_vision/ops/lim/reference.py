"""LIM in eager PyTorch: the reference every backend matches (Algorithm 1; see ``ops.lim``)."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['lim_reference']


def lim_reference(x: Tensor, num_chunks: int = 4, leak: float = 0.5,
                  threshold: float = 1.0,
                  u_prev: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Eager PyTorch LIM; autograd gives the exact piecewise gradient.

    Half-precision inputs are integrated in fp32 and the results cast back, as
    the fused kernels do.
    """
    B, L, R = x.shape
    T = num_chunks
    l = L // T
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    chunks = x[:, :l * T].to(compute_dtype).unflatten(1, (T, l))  # (B, T, l, R)
    if u_prev is None:
        u = chunks.new_zeros(B, l, R)
    else:
        u = u_prev.to(compute_dtype)
    outs = []
    for i in range(T):
        u = leak * u + chunks[:, i]
        u = torch.where(u > threshold, torch.zeros_like(u), u)
        outs.append(u)
    out = torch.stack(outs, dim=1).flatten(1, 2)  # (B, l*T, R)
    if l * T < L:
        out = F.pad(out, (0, 0, 0, L - l * T))
    u_mean = torch.stack(outs, dim=0).mean(dim=0)
    return out.to(x.dtype), u_mean.to(x.dtype)
