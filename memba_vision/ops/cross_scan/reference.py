"""VMamba v0's cross scan as the official code writes it: stacked, flipped and transposed copies
of x, one (B, 4D, L) selective scan (``ops.selective_scan``: mamba-ssm or the PyTorch
reference), fp32, merged back to row-major order."""
import torch
from torch import Tensor

from ..scan import selective_scan

__all__ = ['cross_scan_stacked']


def cross_scan_stacked(x: Tensor, x_proj_weight: Tensor, dt_projs_weight: Tensor,
                       dt_projs_bias: Tensor, A: Tensor, Ds: Tensor) -> Tensor:
    """x (B, H, W, D) -> the four scans summed, (B, H*W, D) fp32 in row-major token order.

    x_proj_weight (4, R + 2N, D), dt_projs_weight (4, D, R), dt_projs_bias (4, D),
    A (4D, N) (negative), Ds (4D,). Direction k: 0 row-major, 1 column-major, 2 and 3
    their reverses.
    """
    B, H, W, D = x.shape
    L, K = H * W, x_proj_weight.shape[0]
    R, N = dt_projs_weight.shape[2], A.shape[1]
    x = x.permute(0, 3, 1, 2)                                           # (B, D, H, W)
    x_hw = x.flatten(2)                                                 # row-major (B, D, L)
    x_wh = x.transpose(2, 3).flatten(2)                                 # column-major
    xs = torch.stack([x_hw, x_wh, x_hw.flip(-1), x_wh.flip(-1)], dim=1)  # (B, 4, D, L)
    x_dbl = torch.einsum('bkdl,kcd->bkcl', xs, x_proj_weight)
    dts, Bs, Cs = x_dbl.split([R, N, N], dim=2)
    dts = torch.einsum('bkrl,kdr->bkdl', dts, dt_projs_weight)
    # the official v0 scan runs in fp32 whatever the autocast dtype (fp64 stays fp64)
    acc = torch.promote_types(x.dtype, torch.float32)
    y = selective_scan(xs.reshape(B, -1, L).to(acc), dts.reshape(B, -1, L).to(acc), A.to(acc),
                       Bs.to(acc), Cs.to(acc), Ds.to(acc), z=None,
                       delta_bias=dt_projs_bias.reshape(-1).to(acc),
                       delta_softplus=True).view(B, K, D, L)
    inv = y[:, 2:4].flip(-1)
    col_to_row = lambda t: t.view(B, D, W, H).transpose(2, 3).reshape(B, D, L)  # noqa: E731
    y = y[:, 0] + inv[:, 0] + col_to_row(y[:, 1]) + col_to_row(inv[:, 1])
    return y.transpose(1, 2)                                            # (B, L, D)
