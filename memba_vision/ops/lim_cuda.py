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

__all__ = ['is_available', 'unavailable_reason', 'lim_cuda']

_op = None  # torch.ops.memba_vision.lim.default once the extension is loaded


@functools.lru_cache(maxsize=None)
def _load():
    """(torch.ops.memba_vision.lim.default, '') or (None, why it is unusable)."""
    try:
        from .. import _lim_cuda  # noqa: F401  registers torch.ops.memba_vision.lim
        op = torch.ops.memba_vision.lim.default
    except Exception as e:  # not built, or built against another torch/CUDA
        return None, f'memba_vision._lim_cuda unavailable: {type(e).__name__}: {e}'.split('\n')[0]
    return op, ''


@functools.lru_cache(maxsize=None)
def is_available() -> bool:
    """True when the extension imports and a CUDA device is visible."""
    return torch.cuda.is_available() and _load()[0] is not None


def unavailable_reason() -> str:
    if not torch.cuda.is_available():
        return 'no CUDA device'
    return _load()[1]


def _get_op():
    global _op
    op, why = _load()
    if op is None:
        raise RuntimeError(why)
    _op = op
    return op


def lim_cuda(x: Tensor, num_chunks: int = 4, leak: float = 0.5, threshold: float = 1.0,
             u_prev: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Fused LIM; inputs are assumed validated by ``ops.lim`` (the op makes them
    contiguous itself)."""
    return (_op or _get_op())(x, u_prev, num_chunks, leak, threshold)
