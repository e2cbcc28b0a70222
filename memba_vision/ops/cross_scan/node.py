"""VMamba v0's cross scan on memba_vision's token-major scan kernels, as one autograd node.

The four directions are one kernel launch (``scan_dirs_fwd``, a block per 64 channels, batch
item and direction, so even stage 1's 192 channels fill the GPU) that reads x where it is,
(B, H, W, D) channels-last: the row-major directions walk the tokens forwards and backwards,
the column-major ones walk the grid by columns (``rows=H``), so there are no stacked, flipped
or transposed copies, and the bf16 inputs are not copied to fp32 (the states, the four outputs
and their sum are fp32, as in the official v0 scan). x_proj of all four directions is one
matrix product, dt_proj one product per direction on the strided slices (no permuted copies).
x's gradient is kept per direction in fp32 and summed. When a backward will run, the forward
keeps the scans' states every 16 steps (fp32) for it (``save_states``). The SSM parameters get
gradients when they require them (full fine-tuning): A's and D's from the backward kernel (per
batch item, then summed), x_proj's, dt_proj's and the delta bias's from ddelta, dB and dC with
matrix products.

``kernels`` is the extension (``memba_vision._scan_cuda``) or a stand-in with the same
functions (the tests' CPU reference).
"""
from typing import Tuple

import torch
from torch import Tensor

from ..bidirectional_ssm.node import (D_STATE, addmm_f32, grad_wanted, scan_extension,
                                      scan_kernels_reason)

__all__ = ['cross_scan_fused', 'cross_scan_fused_reason']

K_DIRECTIONS = 4


# direction k: 0 row-major, 1 column-major (the grid walked by columns), 2 and 3 their reverses
REVERSE = [False, False, True, True]


def _rows(H: int):
    return [0, H, 0, H]


def _per_direction_mm(a: Tensor, w: Tensor, out: Tensor) -> Tensor:
    """out[:, :, k] = a[:, :, k] @ w[k] for each direction k: a (B, L, K, m), w (K, m, n), out
    (B, L, K, n). One product per direction reading and writing the strided slices in place,
    with no permuted copies."""
    B, L, K, m = a.shape
    for k in range(K):
        torch.mm(a[:, :, k].reshape(B * L, m), w[k], out=out[:, :, k].view(B * L, -1))
    return out


class _CrossScan(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: Tensor, H: int, x_proj_weight: Tensor, dt_projs_weight: Tensor,
                dt_projs_bias: Tensor, A: Tensor, Ds: Tensor, kernels,
                save_states: bool) -> Tensor:
        B, L, D = x.shape
        R, N = dt_projs_weight.shape[2], A.shape[-1]
        w_all = x_proj_weight.to(x.dtype).reshape(-1, D)                # (4 (R + 2N), D)
        w_dt = dt_projs_weight.to(x.dtype)                                 # (4, D, R)
        x_dbl = (x @ w_all.t()).view(B, L, K_DIRECTIONS, R + 2 * N)
        delta = _per_direction_mm(x_dbl[..., :R], w_dt.transpose(1, 2),
                                  x.new_empty(B, L, K_DIRECTIONS, D))          # (B, L, 4, D)
        Bm, Cm = x_dbl[..., R:R + N], x_dbl[..., R + N:]
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32 (fp64 for fp64 tests)
        y4 = torch.empty(B, L, K_DIRECTIONS, D, device=x.device, dtype=acc)
        _, states = kernels.scan_dirs_fwd(x, delta, A, Bm, Cm, Ds, dt_projs_bias, True, REVERSE,
                                          _rows(H), out=y4, save_states=save_states)
        # the projections' weights are kept in x's dtype, as the products read them
        ctx.save_for_backward(x, x_dbl, delta, w_all, w_dt, dt_projs_bias, A, Ds, states)
        ctx.kernels, ctx.H = kernels, H
        ctx.weight_dtypes = x_proj_weight.dtype, dt_projs_weight.dtype
        return y4.sum(2)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, x_dbl, delta, w_all, w_dt, dt_projs_bias, A, Ds, states = ctx.saved_tensors
        B, L, D = x.shape
        R, N = w_dt.shape[2], A.shape[-1]
        Bm, Cm = x_dbl[..., R:R + N], x_dbl[..., R + N:]  # (delta was saved)
        acc = torch.promote_types(x.dtype, torch.float32)
        du = torch.empty(B, L, K_DIRECTIONS, D, device=x.device, dtype=acc)
        d_dbl = torch.empty_like(x_dbl)                                 # (B, L, 4, R + 2N)
        needs = ctx.needs_input_grad  # x, H, x_proj, dt_projs, dt bias, A, Ds, ...
        dA = torch.empty_like(A) if needs[5] else None
        dDs = torch.empty_like(Ds) if needs[6] else None
        _, ddelta, _, _ = ctx.kernels.scan_dirs_bwd(
            x, delta, A, Bm, Cm, Ds, dt_projs_bias, dy.to(x.dtype).contiguous(), states, True,
            REVERSE, _rows(ctx.H), du_out=du, dBC_out=d_dbl[..., R:], dA_out=dA, dD_out=dDs)
        _per_direction_mm(ddelta, w_dt, d_dbl[..., :R])
        # x's gradient: the four directions' sum plus the x_proj product's, in one addmm
        dx = addmm_f32(du.sum(2).view(B * L, D), d_dbl.view(B * L, -1), w_all).view(B, L, D)
        dw_x = dw_dt = d_bias = None
        if needs[2]:  # (4, R + 2N, D)
            dw_x = torch.einsum('blkc,bld->kcd', d_dbl, x).to(ctx.weight_dtypes[0])
        if needs[3]:  # (4, D, R)
            dw_dt = torch.einsum('blkd,blkr->kdr', ddelta, x_dbl[..., :R])
            dw_dt = dw_dt.to(ctx.weight_dtypes[1])
        if needs[4]:  # (4, D): the bias is added to delta inside the kernel
            d_bias = ddelta.to(acc).sum((0, 1)).to(dt_projs_bias.dtype)
        return dx.to(x.dtype), None, dw_x, dw_dt, d_bias, dA, dDs, None, None


def cross_scan_fused_reason(x: Tensor, params: Tuple[Tensor, ...], kernels=None) -> str:
    """'' when ``cross_scan_fused`` can run on these inputs, else why not."""
    reason = scan_kernels_reason(x, kernels)
    if reason:
        return reason
    A = params[3]
    if A.shape[1] != D_STATE:
        return f'd_state {A.shape[1]} != {D_STATE}'
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
    K = K_DIRECTIONS
    save_states = grad_wanted(tokens, x_proj_weight, dt_projs_weight, dt_projs_bias, A, Ds)
    return _CrossScan.apply(tokens, H, x_proj_weight, dt_projs_weight,
                            dt_projs_bias.to(acc).contiguous(), A.to(acc).reshape(K, D, -1),
                            Ds.to(acc).reshape(K, D), kernels, save_states)
