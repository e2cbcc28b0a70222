"""LIM through the fused CUDA extension ``memba_vision._lim_cuda`` (kernels/lim).

``lim_cuda(x, num_chunks, leak, threshold, u_prev)`` has the signature and
numerics of ``lim_reference``: x (B, L, R), u_prev (B, L // T, R) or None ->
out (B, L, R), u_mean (B, L // T, R). Forward and backward are one kernel
launch each; the backward recomputes the reset decisions from the saved x and
u_prev, so nothing else is kept for it. The extension is imported on first use.
"""
import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ['is_available', 'unavailable_reason', 'lim_cuda']


@functools.lru_cache(maxsize=None)
def _load():
    """(extension module, '') or (None, why it is unusable)."""
    try:
        from .. import _lim_cuda
    except Exception as e:  # not built, or built against another torch/CUDA
        return None, f'memba_vision._lim_cuda unavailable: {type(e).__name__}: {e}'.split('\n')[0]
    return _lim_cuda, ''


@functools.lru_cache(maxsize=None)
def is_available() -> bool:
    """True when the extension imports and a CUDA device is visible."""
    return torch.cuda.is_available() and _load()[0] is not None


def unavailable_reason() -> str:
    if not torch.cuda.is_available():
        return 'no CUDA device'
    return _load()[1]


def _ext():
    ext, why = _load()
    if ext is None:
        raise RuntimeError(why)
    return ext


class _LimCudaFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, u_prev, num_chunks, leak, threshold):
        out, u_mean = _ext().forward(x, u_prev, num_chunks, leak, threshold)
        ctx.save_for_backward(x, u_prev)
        ctx.params = (num_chunks, leak, threshold)
        ctx.set_materialize_grads(False)  # a missing grad is skipped, not zero-filled
        return out, u_mean

    @staticmethod
    def backward(ctx, grad_out, grad_u_mean):
        x, u_prev = ctx.saved_tensors
        need_x, need_u = ctx.needs_input_grad[:2]
        if grad_out is None and grad_u_mean is None:
            return None, None, None, None, None
        grad_x, grad_u = _ext().backward(x, u_prev, grad_out, grad_u_mean, *ctx.params,
                                         need_x, need_u)
        return grad_x, grad_u, None, None, None


def lim_cuda(x: Tensor, num_chunks: int = 4, leak: float = 0.5, threshold: float = 1.0,
             u_prev: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Fused LIM; inputs are assumed validated by ``ops.lim``."""
    if not x.is_contiguous():
        x = x.contiguous()
    if u_prev is not None and not u_prev.is_contiguous():
        u_prev = u_prev.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or
                                    (u_prev is not None and u_prev.requires_grad)):
        return _LimCudaFunction.apply(x, u_prev, num_chunks, leak, threshold)
    return _ext().forward(x, u_prev, num_chunks, leak, threshold)
