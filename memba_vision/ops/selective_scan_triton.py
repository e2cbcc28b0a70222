"""Selective scan in Triton for frozen SSM parameters (the PEFT case).

``selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus)`` computes
what ``selective_scan_reference`` computes (see ``ops.selective_scan``) and returns
gradients for u, delta, B, C and z only: A, D and delta_bias must not need a
gradient, which is the case for every PEFT method here (the backbone is frozen).
Dropping their gradients removes the per-channel reductions and atomics that a
full backward spends on them.

Layout: a program owns one batch item and ``CH_BLOCK`` channels of one B/C group
and walks its channels one after another; each channel is a (N, BLOCK_L) tile
(states x time) scanned with ``tl.associative_scan`` on the pairs
(decay, input) of ``h[t] = a[t] * h[t-1] + x[t]``. Sequences longer than
BLOCK_L are cut into chunks with the state carried between them.

Backward recomputes the forward scan (nothing but the inputs is saved), then
runs the adjoint recurrence ``dh[t] = C[t] dy[t] + a[t+1] dh[t+1]`` as a reverse
scan. With ``a[t] h[t-1] = h[t] - x[t]`` the decay gradient needs no shifted
state. dB and dC are summed over the program's channels in registers and added
to the (b, g, N, L) result once per program. For more than one chunk, a first
pass stores the state at every chunk start.

Arithmetic is fp32 whatever the input dtype; outputs and gradients come back in
the inputs' dtypes. Importing this module imports triton.

``ops.selective_scan`` uses it where mamba-ssm is not installed: at the Vim-S
shape (32, 768, 197), bf16, on an H100 it takes 1.45 ms forward+backward against
mamba-ssm's 0.90 ms, and the PyTorch reference is far slower than either.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ['selective_scan_triton', 'is_available']

_MAX_BLOCK_L = 256


def is_available() -> bool:
    return torch.cuda.is_available()


@triton.jit
def _combine(a1, x1, a2, x2):
    # (a1, x1) then (a2, x2): h -> a2 * (a1 * h + x1) + x2
    return a1 * a2, x1 * a2 + x2


@triton.jit
def _softplus(v):
    # mamba-ssm's softplus: log1p(exp(v)) below 20, identity above
    return tl.where(v <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))), v)


@triton.jit
def _column(tile, idx, col):
    # tile (N, BLOCK_L) -> its column ``col`` (N,)
    return tl.sum(tl.where(idx[None, :] == col, tile, 0.0), axis=1)


@triton.jit
def _scan_fwd_kernel(
        u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, st_ptr,
        L, DIM, ch_per_group, n_chunks,
        s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl,
        s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
        SOFTPLUS: tl.constexpr, WRITE_OUT: tl.constexpr, STORE_STATES: tl.constexpr,
        N: tl.constexpr, BLOCK_L: tl.constexpr, CH_BLOCK: tl.constexpr):
    b = tl.program_id(0)
    c0 = tl.program_id(1) * CH_BLOCK
    g = c0 // ch_per_group
    idx = tl.arange(0, BLOCK_L)
    offs_n = tl.arange(0, N)
    for i in range(CH_BLOCK):
        c = c0 + i
        A = tl.load(A_ptr + c * N + offs_n)
        h0 = tl.zeros((N,), dtype=tl.float32)
        for k in range(n_chunks):
            t = k * BLOCK_L + idx
            m = t < L
            if STORE_STATES:
                tl.store(st_ptr + ((b * DIM + c) * n_chunks + k) * N + offs_n, h0)
            u = tl.load(u_ptr + b * s_ub + c * s_ud + t * s_ul, mask=m, other=0.).to(tl.float32)
            dt = tl.load(dl_ptr + b * s_db + c * s_dd + t * s_dl, mask=m, other=0.).to(tl.float32)
            if HAS_BIAS:
                dt += tl.load(bias_ptr + c)
            if SOFTPLUS:
                dt = _softplus(dt)
            dt = tl.where(m, dt, 0.)
            Bt = tl.load(B_ptr + b * s_Bb + g * s_Bg + offs_n[:, None] * s_Bn + t[None, :] * s_Bl,
                         mask=m[None, :], other=0.).to(tl.float32)
            a = tl.exp(dt[None, :] * A[:, None])
            x = (dt * u)[None, :] * Bt
            P, h = tl.associative_scan((a, x), axis=1, combine_fn=_combine)
            h += P * h0[:, None]
            if WRITE_OUT:
                Ct = tl.load(C_ptr + b * s_Cb + g * s_Cg + offs_n[:, None] * s_Cn
                             + t[None, :] * s_Cl, mask=m[None, :], other=0.).to(tl.float32)
                y = tl.sum(h * Ct, axis=0)
                if HAS_D:
                    y += tl.load(D_ptr + c) * u
                if HAS_Z:
                    zz = tl.load(z_ptr + b * s_zb + c * s_zd + t * s_zl, mask=m,
                                 other=0.).to(tl.float32)
                    y = y * zz * tl.sigmoid(zz)
                tl.store(out_ptr + (b * DIM + c) * L + t, y.to(out_ptr.dtype.element_ty), mask=m)
            h0 = _column(h, idx, BLOCK_L - 1)


@triton.jit
def _scan_bwd_kernel(
        u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, st_ptr, carry_ptr,
        du_ptr, ddl_ptr, dz_ptr, dB_ptr, dC_ptr,
        L, DIM, G, B_SZ, ch_per_group, n_chunks,
        s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
        s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
        SOFTPLUS: tl.constexpr, MULTI_CHUNK: tl.constexpr,
        N: tl.constexpr, BLOCK_L: tl.constexpr, CH_BLOCK: tl.constexpr):
    b = tl.program_id(0)
    c0 = tl.program_id(1) * CH_BLOCK
    g = c0 // ch_per_group
    idx = tl.arange(0, BLOCK_L)
    offs_n = tl.arange(0, N)
    for kk in range(n_chunks):
        k = n_chunks - 1 - kk
        t = k * BLOCK_L + idx
        m = t < L
        mn = (t + 1) < L
        Bt = tl.load(B_ptr + b * s_Bb + g * s_Bg + offs_n[:, None] * s_Bn + t[None, :] * s_Bl,
                     mask=m[None, :], other=0.).to(tl.float32)
        Ct = tl.load(C_ptr + b * s_Cb + g * s_Cg + offs_n[:, None] * s_Cn + t[None, :] * s_Cl,
                     mask=m[None, :], other=0.).to(tl.float32)
        dB_acc = tl.zeros((N, BLOCK_L), dtype=tl.float32)
        dC_acc = tl.zeros((N, BLOCK_L), dtype=tl.float32)
        for i in range(CH_BLOCK):
            c = c0 + i
            A = tl.load(A_ptr + c * N + offs_n)
            u = tl.load(u_ptr + b * s_ub + c * s_ud + t * s_ul, mask=m, other=0.).to(tl.float32)
            raw = tl.load(dl_ptr + b * s_db + c * s_dd + t * s_dl, mask=m, other=0.).to(tl.float32)
            raw_n = tl.load(dl_ptr + b * s_db + c * s_dd + (t + 1) * s_dl, mask=mn,
                            other=0.).to(tl.float32)
            if HAS_BIAS:
                bias = tl.load(bias_ptr + c)
                raw += bias
                raw_n += bias
            if SOFTPLUS:
                dt = _softplus(raw)
                dt_n = _softplus(raw_n)
            else:
                dt = raw
                dt_n = raw_n
            dt = tl.where(m, dt, 0.)
            # forward recomputation
            a = tl.exp(dt[None, :] * A[:, None])
            x = (dt * u)[None, :] * Bt
            P, h = tl.associative_scan((a, x), axis=1, combine_fn=_combine)
            if MULTI_CHUNK:
                h0 = tl.load(st_ptr + ((b * DIM + c) * n_chunks + k) * N + offs_n)
                h += P * h0[:, None]
            y = tl.sum(h * Ct, axis=0)
            Dc = 0.
            if HAS_D:
                Dc = tl.load(D_ptr + c)
                y += Dc * u
            dout = tl.load(dout_ptr + b * s_ob + c * s_od + t * s_ol, mask=m,
                           other=0.).to(tl.float32)
            if HAS_Z:
                zz = tl.load(z_ptr + b * s_zb + c * s_zd + t * s_zl, mask=m, other=0.).to(tl.float32)
                sz = tl.sigmoid(zz)
                dz = dout * y * sz * (1. + zz * (1. - sz))
                tl.store(dz_ptr + (b * DIM + c) * L + t, dz.to(dz_ptr.dtype.element_ty), mask=m)
                dy = dout * zz * sz
            else:
                dy = dout
            # adjoint: dh[t] = C[t] dy[t] + a[t+1] dh[t+1]; the chunk's last step takes the carry
            a_n = tl.where(mn[None, :], tl.exp(dt_n[None, :] * A[:, None]), 0.)
            a_n = tl.where(idx[None, :] == BLOCK_L - 1, 1., a_n)
            Pr, dh = tl.associative_scan((a_n, Ct * dy[None, :]), axis=1, combine_fn=_combine,
                                         reverse=True)
            if MULTI_CHUNK:  # written by chunk k + 1 into buffer (k + 1) % 2
                carry = tl.load(carry_ptr + (((k + 1) % 2 * B_SZ + b) * DIM + c) * N + offs_n)
                dh += Pr * carry[:, None]
            ddt = tl.sum(dh * (u[None, :] * Bt + (h - x) * A[:, None]), axis=0)
            du = tl.sum(dh * Bt, axis=0) * dt + Dc * dy
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(raw)
            tl.store(du_ptr + (b * DIM + c) * L + t, du.to(du_ptr.dtype.element_ty), mask=m)
            tl.store(ddl_ptr + (b * DIM + c) * L + t, ddt.to(ddl_ptr.dtype.element_ty), mask=m)
            if MULTI_CHUNK:
                tl.store(carry_ptr + ((k % 2 * B_SZ + b) * DIM + c) * N + offs_n,
                         _column(a * dh, idx, 0))
            dB_acc += dh * (dt * u)[None, :]
            dC_acc += h * dy[None, :]
        base = (b * G + g) * N * L + offs_n[:, None] * L + t[None, :]
        tl.atomic_add(dB_ptr + base, dB_acc, mask=m[None, :], sem='relaxed')
        tl.atomic_add(dC_ptr + base, dC_acc, mask=m[None, :], sem='relaxed')
        if MULTI_CHUNK:
            tl.debug_barrier()


def _launch_config(n: int, block_l: int, ch_per_group: int) -> Tuple[int, int]:
    """(channels per program, warps per program)."""
    ch_block = next(cb for cb in (16, 8, 4, 2, 1) if ch_per_group % cb == 0)
    return ch_block, (8 if n * block_l >= 4096 else 4)


def _as_groups(M: Tensor) -> Tensor:
    """(b, n, l) -> (b, 1, n, l) view; (b, g, n, l) unchanged."""
    return M[:, None] if M.dim() == 3 else M


class _Geometry:
    def __init__(self, u: Tensor, A: Tensor, B4: Tensor):
        self.b, self.d, self.l = u.shape
        self.n = A.shape[1]
        self.g = B4.shape[1]
        if self.d % self.g:
            raise ValueError(f'selective_scan: {self.d} channels are not divisible into '
                             f'{self.g} groups')
        if self.n & (self.n - 1):
            raise ValueError(f'selective_scan (triton): d_state must be a power of 2, '
                             f'got {self.n}')
        self.ch_per_group = self.d // self.g
        self.block_l = min(triton.next_power_of_2(self.l), _MAX_BLOCK_L)
        self.n_chunks = triton.cdiv(self.l, self.block_l)
        self.ch_block, self.num_warps = _launch_config(self.n, self.block_l, self.ch_per_group)
        self.grid = (self.b, self.d // self.ch_block)


def _strides3(t: Optional[Tensor], like: Tensor):
    return t.stride() if t is not None else like.stride()


def _run_forward(u, delta, A, B4, C4, D, z, bias, softplus, geo, out=None, states=None):
    _scan_fwd_kernel[geo.grid](
        u, delta, A, B4, C4, D if D is not None else A, z if z is not None else u,
        bias if bias is not None else A, out if out is not None else u,
        states if states is not None else A,
        geo.l, geo.d, geo.ch_per_group, geo.n_chunks,
        *u.stride(), *delta.stride(), *_strides3(z, u), *B4.stride(), *C4.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None,
        SOFTPLUS=softplus, WRITE_OUT=out is not None, STORE_STATES=states is not None,
        N=geo.n, BLOCK_L=geo.block_l, CH_BLOCK=geo.ch_block, num_warps=geo.num_warps)


class _SelectiveScanTriton(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus):
        A = A.float().contiguous()
        D = D.float().contiguous() if D is not None else None
        bias = delta_bias.float().contiguous() if delta_bias is not None else None
        B4, C4 = _as_groups(B), _as_groups(C)
        geo = _Geometry(u, A, B4)
        out = torch.empty(u.shape, dtype=u.dtype, device=u.device)
        _run_forward(u, delta, A, B4, C4, D, z, bias, softplus, geo, out=out)
        ctx.save_for_backward(u, delta, A, B, C, D, z, bias)
        ctx.softplus, ctx.geo = softplus, geo
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, bias = ctx.saved_tensors
        geo = ctx.geo
        B4, C4 = _as_groups(B), _as_groups(C)
        multi = geo.n_chunks > 1
        dev = u.device
        states = carry = A  # placeholders when there is one chunk
        if multi:
            states = torch.empty(geo.b, geo.d, geo.n_chunks, geo.n, device=dev)
            carry = torch.zeros(2, geo.b, geo.d, geo.n, device=dev)  # double-buffered
            _run_forward(u, delta, A, B4, C4, D, z, bias, ctx.softplus, geo, states=states)
        du = torch.empty(u.shape, dtype=u.dtype, device=dev)
        ddelta = torch.empty(delta.shape, dtype=delta.dtype, device=dev)
        dz = torch.empty(z.shape, dtype=z.dtype, device=dev) if z is not None else None
        dB = torch.zeros(geo.b, geo.g, geo.n, geo.l, device=dev)
        dC = torch.zeros(geo.b, geo.g, geo.n, geo.l, device=dev)
        _scan_bwd_kernel[geo.grid](
            u, delta, A, B4, C4, D if D is not None else A, z if z is not None else u,
            bias if bias is not None else A, dout, states, carry,
            du, ddelta, dz if dz is not None else du, dB, dC,
            geo.l, geo.d, geo.g, geo.b, geo.ch_per_group, geo.n_chunks,
            *u.stride(), *delta.stride(), *_strides3(z, u), *dout.stride(),
            *B4.stride(), *C4.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None,
            SOFTPLUS=ctx.softplus, MULTI_CHUNK=multi,
            N=geo.n, BLOCK_L=geo.block_l, CH_BLOCK=geo.ch_block, num_warps=geo.num_warps)
        dB = dB.to(B.dtype).reshape(B.shape)
        dC = dC.to(C.dtype).reshape(C.shape)
        return du, ddelta, None, dB, dC, None, dz, None, None


def selective_scan_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                          D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                          delta_bias: Optional[Tensor] = None,
                          delta_softplus: bool = False) -> Tensor:
    """Selective scan with frozen A, D and delta_bias; y (b, d, l) in u's dtype."""
    if torch.is_grad_enabled():
        for name, p in (('A', A), ('D', D), ('delta_bias', delta_bias)):
            if p is not None and p.requires_grad:
                raise ValueError(f'selective_scan (triton): {name} requires a gradient; this '
                                 f'kernel serves frozen SSM parameters only')
    return _SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
