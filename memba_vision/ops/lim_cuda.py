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

from ._dispatch import extension_unavailable, require_loaded, try_import

__all__ = ['is_available', 'unavailable_reason', 'lim_cuda']

_op = None  # torch.ops.memba_vision.lim.default once the extension is loaded


@functools.lru_cache(maxsize=None)
def _load():
    """(torch.ops.memba_vision.lim.default, '') or (None, why it is unusable)."""
    # importing the extension registers torch.ops.memba_vision.lim
    ext, why = try_import('memba_vision._lim_cuda')
    if ext is None:
        return None, why
    try:
        return torch.ops.memba_vision.lim.default, ''
    except Exception as e:  # an extension built without the op
        return None, f'memba_vision._lim_cuda: no torch.ops.memba_vision.lim: {e}'.split('\n')[0]


@functools.lru_cache(maxsize=None)
def is_available() -> bool:
    """True when the extension imports and a CUDA device is visible."""
    return not extension_unavailable(_load())


def unavailable_reason() -> str:
    return extension_unavailable(_load())


def _get_op():
    global _op
    _op = require_loaded(_load())
    return _op


def lim_cuda(x: Tensor, num_chunks: int = 4, leak: float = 0.5, threshold: float = 1.0,
             u_prev: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Fused LIM; inputs are assumed validated by ``ops.lim`` (the op makes them
    contiguous itself)."""
    return (_op or _get_op())(x, u_prev, num_chunks, leak, threshold)
