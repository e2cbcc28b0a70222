"""Depthwise causal 1-D convolution (Mamba's short conv) with optional SiLU.

x (b, d, l), weight (d, w), bias (d,) -> (b, d, l), where output t sees inputs
t-w+1 .. t. On CUDA the causal-conv1d kernel runs when installed
(``MEMBA_CONV_BACKEND=memba|cuda|torch`` forces a path); otherwise F.conv1d.

``causal_conv1d_tokens`` is the same conv on token-major x (b, l, d), optionally
anti-causal (``reverse``: the causal conv of the flipped sequence, flipped back).
On CUDA it runs memba_vision's own kernel (``ops.scan_cuda``, width 4, frozen
weight and bias); otherwise it transposes into the layout above.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import scan_cuda
from ._dispatch import causal_conv1d_cuda_fn, forced_backend, log_once

__all__ = ['causal_conv1d', 'causal_conv1d_reference', 'causal_conv1d_tokens']

_BACKEND_ENV = 'MEMBA_CONV_BACKEND'


def causal_conv1d_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                            activation: Optional[str] = 'silu') -> Tensor:
    """F.conv1d with left padding w-1, then SiLU when ``activation='silu'``."""
    d, w = weight.shape
    y = F.conv1d(x, weight.unsqueeze(1), bias, padding=w - 1, groups=d)[..., :x.shape[-1]]
    return F.silu(y) if activation in ('silu', 'swish') else y


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  activation: Optional[str] = 'silu') -> Tensor:
    if activation not in (None, 'silu', 'swish'):
        raise ValueError(f'causal_conv1d: activation must be None or silu, got {activation!r}')
    forced = _forced()
    if forced == 'memba':  # token-major kernel only; this layout falls through to the rest
        forced = ''
    if x.is_cuda and forced != 'torch':
        fn, reason = causal_conv1d_cuda_fn()
        if fn is not None:
            log_once('conv:cuda', 'memba_vision.ops: causal conv1d uses the causal-conv1d kernel')
            return fn(x, weight, bias.to(weight.dtype) if bias is not None else None,
                      activation=activation)
        if forced == 'cuda':
            raise RuntimeError(f'{_BACKEND_ENV}=cuda but {reason}')
        log_once('conv:torch', f'memba_vision.ops: causal conv1d uses F.conv1d ({reason})')
    elif forced == 'cuda':
        raise RuntimeError(f'{_BACKEND_ENV}=cuda needs CUDA tensors, got {x.device}')
    else:
        reason = f'{_BACKEND_ENV}=torch' if forced == 'torch' else 'tensors are on the CPU'
        log_once('conv:torch', f'memba_vision.ops: causal conv1d uses F.conv1d ({reason})')
    return causal_conv1d_reference(x, weight, bias, activation)


def _forced() -> str:
    return forced_backend(_BACKEND_ENV, ('memba', 'cuda', 'torch'))


def _tokens_kernel_reason(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> str:
    reason = scan_cuda.unavailable_for(x)
    if reason:
        return reason
    if weight.shape[1] != scan_cuda.CONV_WIDTH:
        return f'width {weight.shape[1]} != {scan_cuda.CONV_WIDTH}'
    if torch.is_grad_enabled() and (weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return 'the conv weight or bias requires a gradient'
    return ''


def causal_conv1d_tokens(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                         activation: Optional[str] = 'silu', reverse: bool = False) -> Tensor:
    """x (b, l, d), weight (d, w), bias (d,) -> (b, l, d); ``reverse`` convolves anti-causally."""
    if activation not in (None, 'silu', 'swish'):
        raise ValueError(f'causal_conv1d: activation must be None or silu, got {activation!r}')
    forced = _forced()
    reason = _tokens_kernel_reason(x, weight, bias) if forced in ('', 'memba') \
        else f'{_BACKEND_ENV}={forced}'
    if not reason:
        log_once('conv:memba', 'memba_vision.ops: token-major conv uses the memba_vision CUDA kernel')
        return scan_cuda.conv_tokens_cuda(x, weight, bias, reverse, activation is not None)
    if forced == 'memba':
        raise RuntimeError(f'{_BACKEND_ENV}=memba but the token-major kernel does not apply: {reason}')
    xt = x.transpose(1, 2)
    if reverse:
        return causal_conv1d(xt.flip(-1), weight, bias, activation).flip(-1).transpose(1, 2)
    return causal_conv1d(xt, weight, bias, activation).transpose(1, 2)
