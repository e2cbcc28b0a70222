"""LIM in Triton, for installs without the compiled CUDA extension.

``lim_triton(x, num_chunks, leak, threshold, u_prev)`` matches
``lim_reference``: x (B, L, R), u_prev (B, L // T, R) or None -> out (B, L, R),
u_mean (B, L // T, R). Same layout as kernels/lim: a program owns BLOCK
consecutive elements q of one batch item's chunk (l*R contiguous elements) and
walks the T chunks; forward and backward are one launch each, and the backward
recomputes the reset decisions (as bits of an int32 per element, 32 chunks at a
time) from the saved x and u_prev. Arithmetic is fp32 (fp64 for fp64 inputs)
without FMA contraction, like the reference. Importing this module imports
triton; ``memba_vision.ops.lim_backends`` only does so on first use.
"""
import functools
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ['is_available', 'lim_triton']

_SEGMENT = 32  # reset decisions kept per int32


@triton.jit
def _scalar(hi, mid, lo, F64: tl.constexpr):
    # Triton passes Python floats as fp32: a double is sent as hi + mid + lo.
    if F64:
        return tl.cast(hi, tl.float64) + tl.cast(mid, tl.float64) + tl.cast(lo, tl.float64)
    else:
        return hi


@triton.jit
def _acc(v, F64: tl.constexpr):
    # The accumulation dtype: fp64 for fp64 inputs, fp32 otherwise.
    if F64:
        return v.to(tl.float64)
    else:
        return v.to(tl.float32)


@triton.jit
def _mean(s, t_float, F64: tl.constexpr):
    if F64:
        return s / tl.cast(t_float, tl.float64)
    else:
        return tl.math.div_rn(s, t_float)


@triton.jit
def _lim_fwd_kernel(x_ptr, u_prev_ptr, out_ptr, u_mean_ptr,
                    chunk, seq, T, tail, n_tail, blocks_per_batch, t_float,
                    leak_hi, leak_mid, leak_lo, th_hi, th_mid, th_lo,
                    HAS_U: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // blocks_per_batch
    q = (pid - b * blocks_per_batch) * BLOCK + tl.arange(0, BLOCK)
    valid = q < chunk
    b64 = b.to(tl.int64)
    leak = _scalar(leak_hi, leak_mid, leak_lo, F64)
    th = _scalar(th_hi, th_mid, th_lo, F64)

    if HAS_U:
        u = _acc(tl.load(u_prev_ptr + b64 * chunk + q, mask=valid, other=0.0), F64)
    else:
        u = _acc(tl.zeros([BLOCK], dtype=tl.float32), F64)
    s = _acc(tl.zeros([BLOCK], dtype=tl.float32), F64)
    xp = x_ptr + b64 * seq + q
    op = out_ptr + b64 * seq + q
    for _ in range(T):
        xv = _acc(tl.load(xp, mask=valid, other=0.0), F64)
        pre = leak * u + xv
        u = _acc(tl.where(pre > th, 0.0, pre), F64)
        s += u
        tl.store(op, u.to(out_ptr.dtype.element_ty), mask=valid)
        xp += chunk
        op += chunk
    tl.store(u_mean_ptr + b64 * chunk + q,
             _mean(s, t_float, F64).to(u_mean_ptr.dtype.element_ty), mask=valid)
    # Zero tail rows l*T .. L-1: op now points at offset T*chunk + q.
    rem = b64 * 0 + tail  # a tensor even when tail is specialised to a constant
    for _ in range(n_tail):
        tl.store(op, tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty), mask=valid & (q < rem))
        op += chunk
        rem -= chunk


@triton.jit
def _lim_bwd_kernel(x_ptr, u_prev_ptr, gout_ptr, gmean_ptr, gx_ptr, gu_ptr,
                    chunk, seq, T, tail, n_tail, blocks_per_batch, t_float,
                    leak_hi, leak_mid, leak_lo, th_hi, th_mid, th_lo,
                    HAS_U: tl.constexpr, HAS_GOUT: tl.constexpr, HAS_GMEAN: tl.constexpr,
                    WRITE_GX: tl.constexpr, WRITE_GU: tl.constexpr, F64: tl.constexpr,
                    SEGMENT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // blocks_per_batch
    q = (pid - b * blocks_per_batch) * BLOCK + tl.arange(0, BLOCK)
    valid = q < chunk
    b64 = b.to(tl.int64)
    base = b64 * seq + q  # int64 offset of chunk 0 in (B, L, R)
    leak = _scalar(leak_hi, leak_mid, leak_lo, F64)
    th = _scalar(th_hi, th_mid, th_lo, F64)

    if HAS_U:
        u0 = _acc(tl.load(u_prev_ptr + b64 * chunk + q, mask=valid, other=0.0), F64)
    else:
        u0 = _acc(tl.zeros([BLOCK], dtype=tl.float32), F64)
    if HAS_GMEAN:
        gm = _mean(_acc(tl.load(gmean_ptr + b64 * chunk + q, mask=valid, other=0.0), F64),
                   t_float, F64)
    else:
        gm = _acc(tl.zeros([BLOCK], dtype=tl.float32), F64)
    g = _acc(tl.zeros([BLOCK], dtype=tl.float32), F64)  # grad of chunk i+1's pre-reset membrane

    n_seg = (T + SEGMENT - 1) // SEGMENT
    for seg_rev in range(n_seg):
        start = (n_seg - 1 - seg_rev) * SEGMENT
        end = tl.minimum(start + SEGMENT, T)
        # Re-integrate from u_prev to recover this segment's reset decisions.
        u = u0
        xp = x_ptr + base
        for _ in range(start):
            pre = leak * u + _acc(tl.load(xp, mask=valid, other=0.0), F64)
            u = _acc(tl.where(pre > th, 0.0, pre), F64)
            xp += chunk
        keep = tl.zeros([BLOCK], dtype=tl.int32)
        for k in range(end - start):
            pre = leak * u + _acc(tl.load(xp, mask=valid, other=0.0), F64)
            fire = pre > th
            u = _acc(tl.where(fire, 0.0, pre), F64)
            keep = keep | (tl.where(fire, 0, 1) << k).to(tl.int32)
            xp += chunk
        # gpre_i = keep_i * (grad_out_i + grad_u_mean / T + leak * gpre_{i+1}), i descending.
        off = base + (end - 1).to(tl.int64) * chunk
        for k in range(end - start):
            if HAS_GOUT:
                d = _acc(tl.load(gout_ptr + off, mask=valid, other=0.0), F64) + gm
            else:
                d = gm
            bit = (keep >> (end - 1 - start - k)) & 1
            g = _acc(tl.where(bit != 0, d + leak * g, 0.0), F64)
            if WRITE_GX:
                tl.store(gx_ptr + off, g.to(gx_ptr.dtype.element_ty), mask=valid)
            off -= chunk

    if WRITE_GU:
        tl.store(gu_ptr + b64 * chunk + q, (leak * g).to(gu_ptr.dtype.element_ty), mask=valid)
    if WRITE_GX:
        off = base + (seq - tail)
        rem = b64 * 0 + tail
        for _ in range(n_tail):
            tl.store(gx_ptr + off, tl.zeros([BLOCK], dtype=gx_ptr.dtype.element_ty),
                     mask=valid & (q < rem))
            off += chunk
            rem -= chunk


def _split(value: float) -> Tuple[float, float, float]:
    """A Python float as three fp32-representable parts whose fp64 sum is exact."""
    hi = float(torch.tensor(value, dtype=torch.float32))
    if not math.isfinite(hi):  # beyond the fp32 range (or inf / nan)
        return hi, 0.0, 0.0
    r = value - hi
    mid = float(torch.tensor(r, dtype=torch.float32))
    lo = float(torch.tensor(r - mid, dtype=torch.float32))
    return hi, mid, lo


@functools.lru_cache(maxsize=64)
def _scalars(leak: float, threshold: float) -> Tuple[float, ...]:
    return _split(leak) + _split(threshold)


@functools.lru_cache(maxsize=256)
def _launch_config(B: int, L: int, R: int, T: int) -> Tuple[tuple, tuple, dict]:
    """(grid, positional size arguments, launch options) for one problem size."""
    l = L // T
    chunk, seq = l * R, L * R
    block = 1024 if B * chunk >= (1 << 20) else 256
    block = min(block, max(16, triton.next_power_of_2(chunk)))
    blocks_per_batch = triton.cdiv(chunk, block)
    tail = seq - T * chunk
    n_tail = triton.cdiv(tail, chunk)
    sizes = (chunk, seq, T, tail, n_tail, blocks_per_batch, float(T))
    opts = dict(BLOCK=block, num_warps=max(1, min(4, block // 128)),
                enable_fp_fusion=False)
    return (B * blocks_per_batch,), sizes, opts


def _forward(x: Tensor, u_prev: Optional[Tensor], T: int, leak: float,
             threshold: float) -> Tuple[Tensor, Tensor]:
    B, L, R = x.shape
    out = torch.empty_like(x)
    u_mean = torch.empty((B, L // T, R), dtype=x.dtype, device=x.device)
    if u_mean.numel() == 0:  # B == 0 or R == 0 (l >= 1), so out is empty too
        return out, u_mean
    grid, sizes, opts = _launch_config(B, L, R, T)
    _lim_fwd_kernel[grid](x, x if u_prev is None else u_prev, out, u_mean, *sizes,
                          *_scalars(leak, threshold), HAS_U=u_prev is not None,
                          F64=x.dtype == torch.float64, **opts)
    return out, u_mean


def _backward(x, u_prev, grad_out, grad_u_mean, T, leak, threshold, need_x, need_u):
    B, L, R = x.shape
    grad_x = torch.empty_like(x) if need_x else None
    grad_u = torch.empty_like(u_prev) if need_u else None
    if B * R == 0:
        return grad_x, grad_u
    if grad_out is not None and not grad_out.is_contiguous():
        grad_out = grad_out.contiguous()
    if grad_u_mean is not None and not grad_u_mean.is_contiguous():
        grad_u_mean = grad_u_mean.contiguous()
    grid, sizes, opts = _launch_config(B, L, R, T)
    _lim_bwd_kernel[grid](
        x, x if u_prev is None else u_prev, x if grad_out is None else grad_out,
        x if grad_u_mean is None else grad_u_mean, x if grad_x is None else grad_x,
        x if grad_u is None else grad_u, *sizes, *_scalars(leak, threshold),
        HAS_U=u_prev is not None, HAS_GOUT=grad_out is not None,
        HAS_GMEAN=grad_u_mean is not None, WRITE_GX=need_x, WRITE_GU=need_u,
        F64=x.dtype == torch.float64, SEGMENT=_SEGMENT, **opts)
    return grad_x, grad_u


class _LimTritonFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, u_prev, num_chunks, leak, threshold):
        out, u_mean = _forward(x, u_prev, num_chunks, leak, threshold)
        ctx.save_for_backward(x, u_prev)
        ctx.params = (num_chunks, leak, threshold)
        ctx.set_materialize_grads(False)
        return out, u_mean

    @staticmethod
    def backward(ctx, grad_out, grad_u_mean):
        x, u_prev = ctx.saved_tensors
        need_x, need_u = ctx.needs_input_grad[:2]
        if grad_out is None and grad_u_mean is None:
            return None, None, None, None, None
        grad_x, grad_u = _backward(x, u_prev, grad_out, grad_u_mean, *ctx.params,
                                   need_x, need_u and u_prev is not None)
        return grad_x, grad_u, None, None, None


@functools.lru_cache(maxsize=None)
def is_available() -> bool:
    """True when a CUDA device is visible (triton imported with this module)."""
    return torch.cuda.is_available()


def lim_triton(x: Tensor, num_chunks: int = 4, leak: float = 0.5, threshold: float = 1.0,
               u_prev: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Triton LIM; inputs are assumed validated by ``ops.lim``."""
    if not x.is_contiguous():
        x = x.contiguous()
    if u_prev is not None and not u_prev.is_contiguous():
        u_prev = u_prev.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or
                                    (u_prev is not None and u_prev.requires_grad)):
        return _LimTritonFunction.apply(x, u_prev, num_chunks, float(leak), float(threshold))
    return _forward(x, u_prev, num_chunks, float(leak), float(threshold))
