"""LIM through the fused CUDA extension ``memba_vision._lim_cuda`` (kernels/lim).

Importing the extension registers ``torch.ops.memba_vision.lim(x, u_prev,
num_chunks, leak, threshold) -> (out, u_mean)``: x (B, L, R), u_prev
(B, L // T, R) or None -> out (B, L, R), u_mean (B, L // T, R). Its autograd
is a C++ ``torch::autograd::Function``: forward and backward are one kernel
launch each, the backward recomputes the reset decisions from the saved x and
u_prev and never runs Python. The extension is imported on first use.
"""
import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..dispatch import cuda_unavailable, extension

__all__ = ['unavailable_reason', 'lim_cuda']


@functools.lru_cache(maxsize=None)
def _load():
    """(torch.ops.memba_vision.lim.default, '') or (None, why it is unusable)."""
    ext, why = extension('memba_vision._lim_cuda')  # importing it registers the op
    if ext is None:
        return None, why
    try:
        return torch.ops.memba_vision.lim.default, ''
    except Exception as e:  # an extension built without the op
        return None, f'memba_vision._lim_cuda: no torch.ops.memba_vision.lim: {e}'.split('\n')[0]


def unavailable_reason(x: Tensor) -> str:
    """'' when the op can run on tensors like ``x``, else why not."""
    return cuda_unavailable(x, _load)


def lim_cuda(x: Tensor, num_chunks: int = 4, leak: float = 0.5, threshold: float = 1.0,
             u_prev: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Fused LIM; inputs are assumed validated by ``ops.lim`` (the op makes them
    contiguous itself)."""
    return _load()[0](x, u_prev, num_chunks, leak, threshold)
