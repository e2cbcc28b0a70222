"""Registers the fused LIM backends (CUDA extension, Triton) behind ``ops.lim``.

Importing this module is cheap and never fails: the extension is imported the
first time its availability is asked for, and triton only when a CUDA device
is visible and the Triton backend is first asked for. A backend whose import
fails reports itself unavailable, and ``lim`` falls back (cuda > triton > torch).
"""
import functools

import torch

from . import lim_cuda
from .lim import register_lim_backend

__all__ = ['triton_unavailable_reason']


@functools.lru_cache(maxsize=None)
def _triton_module():
    """(memba_vision.ops.lim_triton, '') or (None, why it is unusable)."""
    if not torch.cuda.is_available():
        return None, 'no CUDA device'
    try:
        from . import lim_triton
    except Exception as e:  # triton missing or broken
        return None, f'triton unavailable: {type(e).__name__}: {e}'.split('\n')[0]
    return lim_triton, ''


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    module = _triton_module()[0]
    return module is not None and module.is_available()


def triton_unavailable_reason() -> str:
    return _triton_module()[1]


def _lim_triton(x, num_chunks, leak, threshold, u_prev):
    module, why = _triton_module()
    if module is None:
        raise RuntimeError(why)
    return module.lim_triton(x, num_chunks, leak, threshold, u_prev)


register_lim_backend('cuda', lim_cuda.is_available, lim_cuda.lim_cuda)
register_lim_backend('triton', _triton_available, _lim_triton)
