"""Depthwise causal 1-D convolution (Mamba's short conv) with optional SiLU.

x (b, d, l), weight (d, w), bias (d,) -> (b, d, l), where output t sees inputs
t-w+1 .. t. On CUDA the causal-conv1d kernel runs when installed
(``MEMBA_CONV_BACKEND=cuda|torch`` forces a path); otherwise F.conv1d.
"""
import os
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from ._dispatch import causal_conv1d_cuda_fn, log_once

__all__ = ['causal_conv1d', 'causal_conv1d_reference']

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
    forced = os.environ.get(_BACKEND_ENV, '').strip().lower()
    if forced not in ('', 'cuda', 'torch'):
        raise ValueError(f'{_BACKEND_ENV} must be cuda or torch, got {forced!r}')
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
    return causal_conv1d_reference(x, weight, bias, activation)
