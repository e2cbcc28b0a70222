"""VMamba v0's cross scan on memba_vision's token-major scan kernels, as one autograd node.

The four directions read x where it is, (B, H, W, D) channels-last: the row-major ones walk
the tokens forwards and backwards, the column-major ones walk the grid by columns
(``rows=H``), so there are no stacked, flipped or transposed copies, and the bf16 inputs are
not copied to fp32 (the states and the sum of the four outputs are fp32, as in the official
v0 scan). x_proj of all four directions is one matrix product; each direction's dt_proj one
small product. The SSM parameters are frozen (PEFT): only x gets a gradient, the four
directions' input gradients summed in fp32 inside the kernels.

``kernels`` is the extension (``memba_vision._scan_cuda``) or a stand-in with the same
functions (the tests' CPU reference).
"""
from typing import Tuple

import torch
from torch import Tensor

from ..bidirectional_ssm.node import D_STATE, scan_extension
from ..dispatch import ENV, cuda_unavailable, reference_forced

__all__ = ['cross_scan_fused', 'cross_scan_fused_reason']

K_DIRECTIONS = 4


def _directions(x_dbl: Tensor, dt_projs_weight: Tensor, R: int, N: int):
    """x_dbl (B, L, 4, R + 2N) -> delta (B, L, 4, D) and the B, C views (B, L, 4, N)."""
    delta = torch.einsum('blkr,kdr->blkd', x_dbl[..., :R], dt_projs_weight.to(x_dbl.dtype))
    return delta.contiguous(), x_dbl[..., R:R + N], x_dbl[..., R + N:]


def _scan_args(k: int, H: int, A: Tensor, Ds: Tensor, bias: Tensor):
    D = Ds.shape[0] // K_DIRECTIONS
    return dict(A=A[k * D:(k + 1) * D].contiguous(), D=Ds[k * D:(k + 1) * D].contiguous(),
                delta_bias=bias[k].contiguous(), reverse=k >= 2, rows=H if k % 2 else 0)


class _CrossScan(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: Tensor, H: int, x_proj_weight: Tensor, dt_projs_weight: Tensor,
                dt_projs_bias: Tensor, A: Tensor, Ds: Tensor, kernels) -> Tensor:
        B, L, D = x.shape
        R, N = dt_projs_weight.shape[2], A.shape[1]
        w_all = x_proj_weight.to(x.dtype).reshape(-1, D)                # (4 (R + 2N), D)
        x_dbl = (x @ w_all.t()).view(B, L, K_DIRECTIONS, R + 2 * N)
        delta, Bm, Cm = _directions(x_dbl, dt_projs_weight, R, N)
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32 (fp64 for fp64 tests)
        y = torch.empty(B, L, D, device=x.device, dtype=acc)
        for k in range(K_DIRECTIONS):
            a = _scan_args(k, H, A, Ds, dt_projs_bias)
            kernels.scan_fwd(x, delta[:, :, k], a['A'], Bm[:, :, k], Cm[:, :, k], a['D'], None,
                             a['delta_bias'], None, None, True, a['reverse'], out=y,
                             accumulate=k > 0, rows=a['rows'])
        ctx.save_for_backward(x, x_dbl, delta, x_proj_weight, dt_projs_weight, dt_projs_bias,
                              A, Ds)
        ctx.kernels, ctx.H = kernels, H
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, x_dbl, delta, x_proj_weight, dt_projs_weight, dt_projs_bias, A, Ds = ctx.saved_tensors
        kernels, H = ctx.kernels, ctx.H
        B, L, D = x.shape
        R, N = dt_projs_weight.shape[2], A.shape[1]
        _, Bm, Cm = _directions(x_dbl, dt_projs_weight, R, N)
        dy = dy.to(x.dtype).contiguous()
        dx = torch.empty(B, L, D, device=x.device,
                         dtype=torch.promote_types(x.dtype, torch.float32))
        d_dbl = torch.empty(B, L, K_DIRECTIONS, R + 2 * N, device=x.device, dtype=x.dtype)
        for k in range(K_DIRECTIONS):
            a = _scan_args(k, H, A, Ds, dt_projs_bias)
            _, ddelta, _, _, _ = kernels.scan_bwd(
                x, delta[:, :, k], a['A'], Bm[:, :, k], Cm[:, :, k], a['D'], None,
                a['delta_bias'], None, None, dy, True, a['reverse'],
                dBC_out=d_dbl[:, :, k, R:], rows=a['rows'], du_out=dx, du_accumulate=k > 0)
            d_dbl[:, :, k, :R] = ddelta @ dt_projs_weight[k].to(ddelta.dtype)
        w_all = x_proj_weight.to(x.dtype).reshape(-1, D)
        dx = dx + (d_dbl.view(B, L, -1) @ w_all).to(dx.dtype)
        return dx.to(x.dtype), None, None, None, None, None, None, None


def cross_scan_fused_reason(x: Tensor, params: Tuple[Tensor, ...], kernels=None) -> str:
    """'' when ``cross_scan_fused`` can run on these inputs, else why not."""
    if reference_forced():
        return f'{ENV}=reference'
    if kernels is None:
        reason = cuda_unavailable(x, scan_extension)
        if reason:
            return reason
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f'dtype {x.dtype}'
    A = params[3]
    if A.shape[1] != D_STATE:
        return f'd_state {A.shape[1]} != {D_STATE}'
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return 'an SSM parameter requires a gradient'
    return ''


def cross_scan_fused(x: Tensor, x_proj_weight: Tensor, dt_projs_weight: Tensor,
                     dt_projs_bias: Tensor, A: Tensor, Ds: Tensor, kernels=None) -> Tensor:
    """x (B, H, W, D) -> the four scans summed, (B, H*W, D) fp32, row-major (see the module)."""
    B, H, W, D = x.shape
    kernels = kernels if kernels is not None else scan_extension()[0]
    tokens = x.reshape(B, H * W, D)
    if tokens.stride(-1) != 1:
        tokens = tokens.contiguous()
    acc = torch.promote_types(x.dtype, torch.float32)  # the kernels' fp32 parameters
    return _CrossScan.apply(tokens, H, x_proj_weight, dt_projs_weight, dt_projs_bias.to(acc),
                            A.to(acc), Ds.to(acc), kernels)
