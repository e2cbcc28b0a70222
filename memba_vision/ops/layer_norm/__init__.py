"""LayerNorm in the storage dtype: VMamba's block norms under half-precision autocast.

``layer_norm_in_dtype(x, weight, bias, eps)`` is LayerNorm over x's last axis with the
statistics and the affine in fp32 and the result rounded once to x's dtype: what autocast's
fp32 LayerNorm hands the next matrix product, which reads it in half precision. Backends:
``fused`` (the scan extension's ``layer_norm_fwd`` / ``layer_norm_bwd``, ``node.py``: a frozen
norm, D a multiple of 4 and at most 2048) and ``per-op`` (``F.layer_norm`` in fp32, then a
cast).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dispatch import choose
from .node import layer_norm_fused, layer_norm_fused_reason

__all__ = ['layer_norm_in_dtype', 'layer_norm_per_op', 'layer_norm_fused',
           'layer_norm_backend']


def layer_norm_per_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      eps: float) -> Tensor:
    """``layer_norm_in_dtype`` with ``F.layer_norm`` in fp32 (fp64 stays fp64), then a cast."""
    acc = torch.promote_types(x.dtype, torch.float32)

    def wide(t):
        return None if t is None else t.to(acc)
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x.to(acc), x.shape[-1:], wide(weight), wide(bias), eps).to(x.dtype)


def layer_norm_backend(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       kernels=None) -> str:
    """'fused' or 'per-op' for these inputs (logged once per run)."""
    return choose('block LayerNorm', (
        ('fused', lambda: layer_norm_fused_reason(x, weight, bias, kernels)),
        ('per-op', None)))


def layer_norm_in_dtype(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        eps: float, kernels=None) -> Tensor:
    """LayerNorm of x (..., D) over D, in x's dtype (see the module). ``kernels``: a stand-in
    for the CUDA extension (the tests' CPU reference)."""
    if layer_norm_backend(x, weight, bias, kernels) == 'fused':
        return layer_norm_fused(x, weight, bias, eps, kernels)
    return layer_norm_per_op(x, weight, bias, eps)
