"""Depthwise causal 1-D convolution (Mamba's short conv) with optional SiLU, on F.conv1d.

x (b, d, l), weight (d, w), bias (d,) -> (b, d, l), where output t sees inputs
t-w+1 .. t. ``causal_conv1d_tokens`` is the same conv on token-major x (b, l, d),
optionally anti-causal. Vim's GPU path runs the conv inside the fused
``ops.bidirectional_ssm`` (memba_vision's own kernel; this op gives it the conv weight's
gradient when the conv trains); this op serves the rest (the CPU, other conv widths), on
cuDNN where x is on the GPU.
"""
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

__all__ = ['causal_conv1d_reference', 'causal_conv1d_tokens']


def causal_conv1d_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                            activation: Optional[str] = 'silu') -> Tensor:
    """F.conv1d with left padding w-1, then SiLU when ``activation='silu'``."""
    if activation not in (None, 'silu', 'swish'):
        raise ValueError(f'causal_conv1d: activation must be None or silu, got {activation!r}')
    d, w = weight.shape
    y = F.conv1d(x, weight.unsqueeze(1), bias, padding=w - 1, groups=d)[..., :x.shape[-1]]
    return F.silu(y) if activation in ('silu', 'swish') else y


def causal_conv1d_tokens(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                         activation: Optional[str] = 'silu', reverse: bool = False) -> Tensor:
    """x (b, l, d), weight (d, w), bias (d,) -> (b, l, d); ``reverse`` convolves anti-causally
    (the causal conv of the flipped sequence, flipped back)."""
    xt = x.transpose(1, 2)
    if reverse:
        return causal_conv1d_reference(xt.flip(-1), weight, bias, activation).flip(-1) \
            .transpose(1, 2)
    return causal_conv1d_reference(xt, weight, bias, activation).transpose(1, 2)
