"""Token-major selective scan and conv through the CUDA extension ``memba_vision._scan_cuda``.

The kernels (kernels/scan) read (B, L, D) tensors with the channel axis
contiguous, walk a direction forwards or backwards in token order without
flipping, and fuse Memba's low-rank gate correction ``z' = z + S W^T`` into the
scan. They serve frozen SSM parameters: A, D, delta_bias and the conv weights
get no gradient (the dispatchers in ``ops.selective_scan`` and
``ops.causal_conv1d`` send anything else to the other backends). The gate's S
and W do get gradients, from the scan's dz' through two small matrix products.

The backward pass recomputes the states from per-chunk checkpoints instead of
saving them, and sums dB/dC over channels without atomics, so it is
deterministic. The extension is imported on first use.
"""
import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._dispatch import extension_unavailable, require_loaded, try_import

__all__ = ['is_available', 'unavailable_reason', 'extension', 'scan_tokens_cuda',
           'conv_tokens_cuda',
           'D_STATE', 'GATE_RANK', 'CONV_WIDTH']

D_STATE = 16     # the kernels' state size (N)
GATE_RANK = 16   # rank of the fused gate correction
CONV_WIDTH = 4   # conv kernel width


@functools.lru_cache(maxsize=None)
def _load():
    """(the extension module, '') or (None, why it is unusable)."""
    return try_import('memba_vision._scan_cuda')


@functools.lru_cache(maxsize=None)
def is_available() -> bool:
    """True when the extension imports and a CUDA device is visible."""
    return not extension_unavailable(_load())


def unavailable_reason() -> str:
    return extension_unavailable(_load())


def extension():
    """The loaded ``memba_vision._scan_cuda`` module (raises with the reason when unusable)."""
    return require_loaded(_load())


def unavailable_for(t: Tensor) -> str:
    """'' when the kernels can run on tensors like ``t``, else why not."""
    if not t.is_cuda:
        return 'tensors are on the CPU'
    return '' if is_available() else unavailable_reason()


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach().float().contiguous()


def _like(t: Optional[Tensor], ref: Tensor) -> Optional[Tensor]:
    """``t`` in ref's dtype with a contiguous last axis (no copy when it already is)."""
    if t is None:
        return None
    t = t.to(ref.dtype)
    return t if t.stride(-1) == 1 else t.contiguous()


class _ScanTokens(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, bias, S, W, softplus, reverse):
        ext = _load()[0]
        y = ext.scan_fwd(u, delta, A, B, C, D, z, bias, S, W, softplus, reverse)
        ctx.save_for_backward(u, delta, A, B, C, D, z, bias, S, W)
        ctx.flags = (softplus, reverse)
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, D, z, bias, S, W = ctx.saved_tensors
        softplus, reverse = ctx.flags
        dy = _like(dy, u)
        du, ddelta, dz, dB, dC = _load()[0].scan_bwd(
            u, delta, A, B, C, D, z, bias, S, W, dy, softplus, reverse)
        dS = dW = None
        if S is not None:
            if ctx.needs_input_grad[8]:
                dS = torch.matmul(dz, W.to(dz.dtype))                          # (b, l, r)
            if ctx.needs_input_grad[9]:
                dW = torch.matmul(dz.flatten(0, 1).t(), S.flatten(0, 1)).float()  # (d, r)
        return (du, ddelta, None, dB.to(B.dtype), dC.to(C.dtype), None,
                dz if z is not None else None, None, dS, dW, None, None)


def scan_tokens_cuda(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                     D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                     delta_softplus: bool, reverse: bool,
                     gate: Optional[Tuple[Tensor, Tensor]]) -> Tensor:
    """See ``ops.selective_scan_tokens``; the caller checked that this kernel applies."""
    u = _like(u, u)
    S, W = gate if gate is not None else (None, None)
    if W is not None:
        W = W.float()
        W = W if W.is_contiguous() else W.contiguous()
    return _ScanTokens.apply(u, _like(delta, u), _f32(A), _like(B, u), _like(C, u), _f32(D),
                             _like(z, u), _f32(delta_bias), _like(S, u), W,
                             bool(delta_softplus), bool(reverse))


class _ConvTokens(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, reverse, silu):
        y = _load()[0].conv_fwd(x, weight, bias, reverse, silu)
        ctx.save_for_backward(x, weight, bias)
        ctx.flags = (reverse, silu)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        dx = _load()[0].conv_bwd(x, weight, bias, _like(dy, x), *ctx.flags)
        return dx, None, None, None, None


def conv_tokens_cuda(x: Tensor, weight: Tensor, bias: Optional[Tensor], reverse: bool,
                     silu: bool) -> Tensor:
    """See ``ops.causal_conv1d_tokens``; the caller checked that this kernel applies."""
    return _ConvTokens.apply(_like(x, x), _f32(weight), _f32(bias), bool(reverse), bool(silu))
