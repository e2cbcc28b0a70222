"""VMamba v0's cross scan: four selective scans (row-major, column-major, both reversed) of a
(B, H, W, D) feature map, each with its own x_proj / dt_proj / A / D, summed in row-major
token order.

Backends: ``fused`` (memba_vision's token-major kernels, one autograd node, d_state 16, SSM
parameters frozen or trainable) and ``stacked`` (the official formulation on
``ops.selective_scan``: mamba-ssm on the GPU, the PyTorch reference on the CPU).
"""
from torch import Tensor

from ..dispatch import choose
from .node import cross_scan_fused, cross_scan_fused_reason
from .reference import cross_scan_stacked

__all__ = ['cross_scan', 'cross_scan_fused', 'cross_scan_stacked', 'cross_scan_backend']


def cross_scan_backend(x: Tensor, params, kernels=None) -> str:
    """'fused' or 'stacked' for these inputs (logged once per run)."""
    return choose('cross scan', (('fused', lambda: cross_scan_fused_reason(x, params, kernels)),
                                 ('stacked', None)))


def cross_scan(x: Tensor, x_proj_weight: Tensor, dt_projs_weight: Tensor,
               dt_projs_bias: Tensor, A: Tensor, Ds: Tensor, kernels=None) -> Tensor:
    """x (B, H, W, D) -> (B, H*W, D) fp32; see ``reference.cross_scan_stacked`` for the shapes.

    ``kernels``: a stand-in for the CUDA extension (the tests' CPU reference).
    """
    params = (x_proj_weight, dt_projs_weight, dt_projs_bias, A, Ds)
    if cross_scan_backend(x, params, kernels) == 'fused':
        return cross_scan_fused(x, *params, kernels=kernels)
    return cross_scan_stacked(x, *params)
