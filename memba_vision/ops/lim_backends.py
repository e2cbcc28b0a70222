"""Registers the fused LIM backends (CUDA extension, Triton) behind ``ops.lim``.

Importing this module is cheap and never fails: the extension is imported the
first time its availability is asked for, and triton only when a CUDA device
is visible and the Triton backend is first asked for. A backend whose import
fails reports itself unavailable, and ``lim`` falls back (cuda > triton > torch).
"""
import functools

import torch

from . import lim_cuda
from ._dispatch import try_import
from .lim import register_lim_backend

__all__ = []


@functools.lru_cache(maxsize=None)
def _triton_module():
    """(memba_vision.ops.lim_triton, '') or (None, why it is unusable)."""
    if not torch.cuda.is_available():
        return None, 'no CUDA device'
    return try_import('.lim_triton', label='triton')  # triton missing or broken


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    module = _triton_module()[0]
    return module is not None and module.is_available()


def _lim_triton(x, num_chunks, leak, threshold, u_prev):
    module, why = _triton_module()
    if module is None:
        raise RuntimeError(why)
    return module.lim_triton(x, num_chunks, leak, threshold, u_prev)


register_lim_backend('cuda', lim_cuda.is_available, lim_cuda.lim_cuda)
register_lim_backend('triton', _triton_available, _lim_triton)
