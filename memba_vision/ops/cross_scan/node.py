"""VMamba v0's cross scan on memba_vision's token-major scan kernels, as one autograd node.

The four directions are one kernel launch (``scan_dirs_fwd``, a block per 64 channels, batch
item and direction, so even stage 1's 192 channels fill the GPU) that reads x where it is,
(B, H, W, D) channels-last: the row-major directions walk the tokens forwards and backwards,
the column-major ones walk the grid by columns (``rows=H``), so there are no stacked, flipped
or transposed copies, and the bf16 inputs are not copied to fp32 (the states, the four outputs
and their sum are fp32, as in the official v0 scan). x_proj of all four directions is one
matrix product, its rows ordered so that the four directions' dt inputs come first
(``_x_dbl_layout``), and dt_proj of all four is one more: those (B L, 4 R) columns times the
block-diagonal (4 R, 4 D) matrix of the four dt_proj weights gives delta (B, L, 4, D) in one
launch instead of four (and likewise the backward's dt gradient). x's gradient is kept per
direction in fp32 and summed. When a backward will run, the forward keeps the scans' states
every 16 steps (fp32) for it (``save_states``). The SSM parameters get gradients when they
require them (full fine-tuning): A's and D's from the backward kernel (per batch item, then
summed), x_proj's, dt_proj's and the delta bias's from ddelta, dB and dC with matrix products.

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


def _x_dbl_layout(x_proj_weight: Tensor, R: int) -> Tensor:
    """x_proj's (4, R + 2N, D) weight as the (4 R + 8 N, D) matrix whose product with x is
    x_dbl = [dt_0 .. dt_3 | B_0 C_0 .. B_3 C_3] (B L, 4 R + 8 N): the dt inputs of the four
    directions side by side, so that dt_proj is one product (``_block_diagonal``)."""
    K, _, D = x_proj_weight.shape
    return torch.cat([x_proj_weight[:, :R].reshape(K * R, D),
                      x_proj_weight[:, R:].reshape(-1, D)])


def _from_x_dbl_layout(w: Tensor, R: int) -> Tensor:
    """The inverse of ``_x_dbl_layout``: (4 R + 8 N, D) -> (4, R + 2N, D)."""
    D = w.shape[1]
    return torch.cat([w[:K_DIRECTIONS * R].view(K_DIRECTIONS, R, D),
                      w[K_DIRECTIONS * R:].view(K_DIRECTIONS, -1, D)], dim=1)


def _block_diagonal(w_dt: Tensor) -> Tensor:
    """dt_proj's weights (4, D, R) -> the (4 R, 4 D) block-diagonal matrix with W_k^T in
    block k: [dt_0 .. dt_3] (B L, 4 R) times it is [delta_0 .. delta_3] (B L, 4 D)."""
    K, D, R = w_dt.shape
    bd = w_dt.new_zeros(K, R, K, D)
    torch.diagonal(bd, dim1=0, dim2=2).copy_(w_dt.permute(2, 1, 0))  # bd[k, :, k] = W_k^T
    return bd.view(K * R, K * D)


def _bc(x_dbl: Tensor, B: int, L: int, R: int, N: int) -> Tuple[Tensor, Tensor]:
    """The scans' B and C, (B, L, 4, N) views of x_dbl's B_k C_k columns."""
    bc = x_dbl[:, K_DIRECTIONS * R:].view(B, L, K_DIRECTIONS, 2 * N)
    return bc[..., :N], bc[..., N:]


class _CrossScan(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: Tensor, H: int, x_proj_weight: Tensor, dt_projs_weight: Tensor,
                dt_projs_bias: Tensor, A: Tensor, Ds: Tensor, kernels,
                save_states: bool) -> Tensor:
        B, L, D = x.shape
        R, N = dt_projs_weight.shape[2], A.shape[-1]
        K = K_DIRECTIONS
        w_all = _x_dbl_layout(x_proj_weight.to(x.dtype), R)               # (4R + 8N, D)
        w_bd = _block_diagonal(dt_projs_weight.to(x.dtype))                # (4R, 4D)
        x_dbl = x.reshape(B * L, D) @ w_all.t()                              # (BL, 4R + 8N)
        delta = (x_dbl[:, :K * R] @ w_bd).view(B, L, K, D)
        Bm, Cm = _bc(x_dbl, B, L, R, N)
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32 (fp64 for fp64 tests)
        y4 = torch.empty(B, L, K_DIRECTIONS, D, device=x.device, dtype=acc)
        _, states = kernels.scan_dirs_fwd(x, delta, A, Bm, Cm, Ds, dt_projs_bias, True, REVERSE,
                                          _rows(H), out=y4, save_states=save_states)
        # the projections' weights are kept in x's dtype, as the products read them
        ctx.save_for_backward(x, x_dbl, delta, w_all, w_bd, dt_projs_bias, A, Ds, states)
        ctx.kernels, ctx.H = kernels, H
        ctx.weight_dtypes = x_proj_weight.dtype, dt_projs_weight.dtype
        return y4.sum(2)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, x_dbl, delta, w_all, w_bd, dt_projs_bias, A, Ds, states = ctx.saved_tensors
        B, L, D = x.shape
        K, N = K_DIRECTIONS, A.shape[-1]
        R = w_bd.shape[0] // K
        Bm, Cm = _bc(x_dbl, B, L, R, N)  # (delta was saved)
        acc = torch.promote_types(x.dtype, torch.float32)
        du = torch.empty(B, L, K, D, device=x.device, dtype=acc)
        d_dbl = torch.empty_like(x_dbl)                                 # (BL, 4R + 8N)
        needs = ctx.needs_input_grad  # x, H, x_proj, dt_projs, dt bias, A, Ds, ...
        dA = torch.empty_like(A) if needs[5] else None
        dDs = torch.empty_like(Ds) if needs[6] else None
        _, ddelta, _, _ = ctx.kernels.scan_dirs_bwd(
            x, delta, A, Bm, Cm, Ds, dt_projs_bias, dy.to(x.dtype).contiguous(), states, True,
            REVERSE, _rows(ctx.H), du_out=du, dBC_out=d_dbl[:, K * R:].view(B, L, K, 2 * N),
            dA_out=dA, dD_out=dDs)
        torch.mm(ddelta.view(B * L, K * D), w_bd.t(), out=d_dbl[:, :K * R])
        # x's gradient: the four directions' sum plus the x_proj product's, in one addmm
        dx = addmm_f32(du.sum(2).view(B * L, D), d_dbl, w_all).view(B, L, D)
        dw_x = dw_dt = d_bias = None
        if needs[2]:  # (4, R + 2N, D)
            dw_x = _from_x_dbl_layout(torch.mm(d_dbl.t(), x.reshape(B * L, D)), R)
            dw_x = dw_x.to(ctx.weight_dtypes[0])
        if needs[3]:  # (4, D, R)
            dts = x_dbl[:, :K * R].reshape(B, L, K, R)
            dw_dt = torch.einsum('blkd,blkr->kdr', ddelta, dts).to(ctx.weight_dtypes[1])
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
