"""Vim's bidirectional SSM core with the Memba gate as one autograd node.

For the in_proj output xz = [x | z] (B, L, 2D) of one Vim layer::

    per direction d (0: tokens in order, 1: reversed):
        u_d      = silu(conv_d(x))                  causal (d=0) / anti-causal (d=1) conv
        dt, B, C = u_d @ x_proj_d^T                 (B, L, R_dt + 2N)
        delta_d  = dt @ dt_proj_d^T                 the bias is added in the scan
        y_d      = scan_d(u_d, delta_d, A_d, B, C, D_d, z'_d)
    y = (y_0 + y_1) / 2                             (B, L, D)

with the Memba gate z'_d = z + S_d W_out^T, S = LIM_pair(z W_in^T, u_prev): each
direction's LIM runs over that direction's token order and its spikes S_d
(B, L, R) come back in input order (see ``LimPairParams`` in kernels/scan). Both
directions' z' come from one kernel (``gate_z_fwd``), which the backward runs again
rather than keep them, and whose twin ``gate_z_bwd`` writes z's gradient
dz'_0 + dz'_1 + dv W_in into dxz. The gate is optional (LoRA), and with
``residual=False`` z'_d = S_d W_out^T.

The trainable inputs are xz, W_in, W_out and the previous layer's membranes, and
(full fine-tuning, partial tuning, LoRA on x_proj or dt_proj) any SSM parameter: A's
and D's gradients come from the scan kernel, x_proj's, dt_proj's and the delta
bias's from ddelta, dB and dC with matrix products, the conv's from a recomputed
conv (PyTorch's). A d_state other than the kernels' 16 (additional-scan states) is
scanned in groups of 16 states (``_state_groups``). One node per layer lets the backward write
the halves of dxz in place, accumulate the two directions inside the kernels,
batch the gate's small products over both directions and run both directions'
LIM in one kernel without flips. Against the per-op path (conv -> linear -> scan
per direction, then the gate's own nodes) a Vim-S Memba training step went from
3,485 to 2,861 kernels (README, Performance).

``kernels`` is the extension module (``memba_vision._scan_cuda``) or any object
with the same functions, which is how the tests run this code on the CPU.
"""
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...utils import persistent_stream
from ..conv import causal_conv1d_tokens
from ..dispatch import ENV, cuda_unavailable, extension, reference_forced

__all__ = ['SSMDirection', 'MembaGateParams', 'bidirectional_ssm', 'bidirectional_ssm_reason',
           'scan_extension', 'scan_kernels_reason', 'mm_f32', 'addmm_f32', 'grad_wanted', 'D_STATE',
           'GATE_RANK', 'CONV_WIDTH', 'LIM_PAIR_MAX_CHUNKS']

D_STATE = 16     # the kernels' state size (N)
GATE_RANK = 16   # rank of the gate correction the kernels take
LIM_PAIR_MAX_CHUNKS = 64  # the LIM pair keeps a walk's reset decisions in 64 bits
CONV_WIDTH = 4   # conv kernel width


def scan_extension():
    """(``memba_vision._scan_cuda``, '') or (None, why it cannot be imported)."""
    return extension('memba_vision._scan_cuda')


def scan_kernels_reason(t: Tensor, kernels=None) -> str:
    """'' when the extension's kernels can take tensors like ``t``, else why not:
    ``MEMBA_BACKEND=reference``, no usable extension for ``t``, or a dtype they lack. A
    stand-in ``kernels`` object (the tests' CPU reference) takes any tensor."""
    if reference_forced():
        return f'{ENV}=reference'
    if kernels is not None:
        return ''
    reason = cuda_unavailable(t, scan_extension)
    if reason:
        return reason
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f'dtype {t.dtype}'
    return ''


class SSMDirection(NamedTuple):
    """The SSM parameters of one scan direction (D channels, N states, R_dt dt rank)."""
    conv_weight: Tensor    # (D, 4) fp32
    conv_bias: Tensor      # (D,) fp32
    x_proj_weight: Tensor  # (R_dt + 2N, D)
    dt_proj_weight: Tensor  # (D, R_dt)
    dt_bias: Tensor        # (D,) fp32
    A: Tensor              # (D, N) fp32, negative (-exp(A_log))
    D: Tensor              # (D,) fp32


class MembaGateParams(NamedTuple):
    """LIM settings of the gate (see ``ops.lim``)."""
    num_chunks: int
    leak: float
    threshold: float
    residual: bool


class _SideStream:
    """Work issued inside ``with`` runs on a second CUDA stream, after everything
    already issued on the current one; ``join()`` makes the current stream wait
    for it. The gate's LIM runs there, beside direction 0's conv and projections,
    and under CUDA-graph capture the two become parallel branches. (Matrix
    products stay on the current stream: cuBLAS keeps a workspace per stream.)

    Every side section starts by waiting for the current stream, so memory the
    caching allocator hands between the streams is never in use by both. On the
    CPU (the reference kernels) both are no-ops.
    """

    def __init__(self, ref: Tensor):
        self.main = self.side = self._ctx = None
        if ref.is_cuda:
            self.main = torch.cuda.current_stream(ref.device)
            self.side = persistent_stream('memba_gate', ref.device)
            self.side.wait_stream(self.main)

    def __enter__(self):
        if self.side is not None:
            self._ctx = torch.cuda.stream(self.side)
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
        return False

    def join(self) -> None:
        if self.side is not None:
            self.main.wait_stream(self.side)


def grad_wanted(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd will run the backward of a node with these inputs: the scan's forward
    then stores its states for it (``save_states``); inference stores none."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with an fp32 (or fp64) result: one kernel on CUDA for half-precision inputs."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).to(torch.promote_types(a.dtype, torch.float32))


def addmm_f32(c: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """c + a @ b, c fp32 (or fp64), in c's dtype: one kernel on CUDA for half-precision a, b
    (c added in the product's fp32 epilogue)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.addmm(c, a, b, out_dtype=torch.float32)
    return c + torch.mm(a, b).to(c.dtype)


class _BidirectionalSSM(torch.autograd.Function):

    @staticmethod
    def forward(ctx, xz, w_in, w_out, u_prev_f, u_prev_b, gate, kernels, save_states,
                *dir_params):
        # dir_params: both directions' SSMDirection fields, flat, so that each gets a gradient
        dirs = (SSMDirection(*dir_params[:_FIELDS]), SSMDirection(*dir_params[_FIELDS:]))
        ctx.set_materialize_grads(False)
        with torch.autocast(xz.device.type, enabled=False):  # dtypes are chosen here
            return _BidirectionalSSM._forward(ctx, xz, w_in, w_out, u_prev_f, u_prev_b, dirs,
                                              gate, kernels, save_states)

    @staticmethod
    def _forward(ctx, xz, w_in, w_out, u_prev_f, u_prev_b, dirs, gate, kernels, save_states):
        Bsz, L, D2 = xz.shape
        D = D2 // 2
        dt = xz.dtype
        x, z = xz[..., :D], xz[..., D:]
        S = u_mean = v = side = None
        z_dirs = (z, z)  # the gate each direction's scan reads: z, or Memba's z'_d
        if gate is not None:
            v = torch.matmul(z, w_in.to(dt).t())                            # (B, L, R)
            with _SideStream(xz) as side:
                S, u_mean = kernels.lim_pair_fwd(v, u_prev_f, u_prev_b, gate.num_chunks,
                                                 gate.leak, gate.threshold)  # (2, B, L, R)
        y = torch.empty(Bsz, L, D, dtype=dt, device=xz.device)
        saved = []
        for d, p in enumerate(dirs):
            rank = p.dt_proj_weight.shape[1]
            wx, wdt = p.x_proj_weight.to(dt), p.dt_proj_weight.to(dt)
            u = kernels.conv_fwd(x, p.conv_weight, p.conv_bias, bool(d), True)  # (B, L, D)
            xdbl = torch.matmul(u, wx.t())                                 # (B, L, R_dt + 2N)
            delta = torch.matmul(xdbl[..., :rank], wdt.t())                # (B, L, D)
            Bm, Cm = xdbl[..., rank:].chunk(2, dim=-1)
            if d == 0 and side is not None:
                side.join()
                z_dirs = _gate_z(kernels, z, S, w_out, gate)                 # (2, B, L, D)
            states = []  # per group of 16 states, for the backward
            for i, (A, Bp, Cp, _) in enumerate(_state_groups(p.A, Bm, Cm)):
                # the gate multiplies the sum over states: it applies to each group's part
                states.append(kernels.scan_fwd(
                    u, delta, A, Bp, Cp, p.D if i == 0 else None, z_dirs[d], p.dt_bias,
                    True, bool(d), out=y, out_scale=0.5, accumulate=bool(d) or i > 0,
                    save_states=save_states)[1])
            saved += [u, xdbl, delta, wx, wdt, *states]
        ctx.per_dir = len(saved) // 2
        ctx.save_for_backward(xz, w_in, w_out, v, S, u_prev_f, u_prev_b, *saved)
        ctx.dirs, ctx.gate, ctx.kernels = dirs, gate, kernels
        ctx.param_needs = ctx.needs_input_grad[_PARAMS_AT:]
        if gate is None:
            return y, None, None
        return y, u_mean[0], u_mean[1]

    @staticmethod
    def backward(ctx, dy, du_mean_f, du_mean_b):
        with torch.autocast(dy.device.type if dy is not None else 'cpu', enabled=False):
            return _BidirectionalSSM._backward(ctx, dy, du_mean_f, du_mean_b)

    @staticmethod
    def _backward(ctx, dy, du_mean_f, du_mean_b):
        xz, w_in, w_out, v, S, u_prev_f, u_prev_b, *saved = ctx.saved_tensors
        dirs, gate, kernels = ctx.dirs, ctx.gate, ctx.kernels
        Bsz, L, D2 = xz.shape
        D = D2 // 2
        x, z = xz[..., :D], xz[..., D:]
        dy = xz.new_zeros(Bsz, L, D) if dy is None else dy.to(xz.dtype).contiguous()
        dxz = torch.empty_like(xz)
        dx, dz = dxz[..., :D], dxz[..., D:]
        z_dirs = (z, z) if gate is None else _gate_z(kernels, z, S, w_out, gate)
        # LoRA: both directions' dz accumulate straight into dxz. Memba: each
        # direction keeps its dz', which the gate's products need.
        dz_dirs = None if gate is None else xz.new_empty(2, Bsz, L, D)
        dparams = [None] * (2 * _FIELDS)
        for d, p in enumerate(dirs):
            u, xdbl, delta, wx, wdt, *states = saved[ctx.per_dir * d:ctx.per_dir * (d + 1)]
            needs = SSMDirection(*ctx.param_needs[_FIELDS * d:_FIELDS * (d + 1)])
            rank = p.dt_proj_weight.shape[1]
            Bm, Cm = xdbl[..., rank:].chunk(2, dim=-1)
            dxdbl = torch.empty_like(xdbl)                                 # (B, L, R_dt + 2N)
            dA = torch.empty_like(p.A) if needs.A else None
            dD = torch.empty_like(p.D) if needs.D else None
            scan_bwd = dict(dout_scale=0.5, dz_out=dz if dz_dirs is None else dz_dirs[d],
                            dz_accumulate=dz_dirs is None and d == 1)
            if p.A.shape[1] == D_STATE:  # dB | dC straight into their slice of dxdbl
                du, ddelta, _, _, _ = kernels.scan_bwd(
                    u, delta, p.A, Bm, Cm, p.D, z_dirs[d], p.dt_bias, dy, states[0], True,
                    bool(d), **scan_bwd, dBC_out=dxdbl[..., rank:], dA_out=dA, dD_out=dD)
            else:
                du, ddelta = _grouped_scan_bwd(kernels, p, u, delta, Bm, Cm, z_dirs[d], dy,
                                               states, bool(d), dxdbl[..., rank:], dA, dD,
                                               scan_bwd)
            torch.mm(ddelta.view(-1, D), wdt, out=dxdbl.view(-1, dxdbl.shape[-1])[:, :rank])
            grads = _param_grads(p, needs, u, xdbl, ddelta, dxdbl, dA, dD)
            du.view(-1, D).addmm_(dxdbl.view(-1, dxdbl.shape[-1]), wx)     # du += dxdbl @ Wx
            if needs.conv_weight or needs.conv_bias:
                grads = grads._replace(**_conv_grads(p, needs, x, du, bool(d)))
            kernels.conv_bwd(x, p.conv_weight, p.conv_bias, du, bool(d), True,
                             out=dx, accumulate=d == 1)
            dparams[_FIELDS * d:_FIELDS * (d + 1)] = grads
        if gate is None:
            return (dxz, None, None, None, None, None, None, None, *dparams)
        R = S.shape[-1]
        dz_flat = dz_dirs.view(-1, D)                                      # (2BL, D)
        dS = torch.mm(dz_flat, w_out.to(dz_flat.dtype)).view(2, Bsz, L, R)
        dw_out = mm_f32(dz_flat.t(), S.view(-1, R)) if ctx.needs_input_grad[2] else None
        dv_dirs, du_prev_f, du_prev_b = kernels.lim_pair_bwd(
            v, u_prev_f, u_prev_b, dS, du_mean_f, du_mean_b,
            gate.num_chunks, gate.leak, gate.threshold)
        # dz = dz'_0 + dz'_1 + dv W_in (without the residual, z reaches z' only through v)
        dv = kernels.gate_z_bwd(dz_dirs if gate.residual else None, dv_dirs, w_in, dz)
        dw_in = (mm_f32(dv.view(-1, R).t(), z.reshape(-1, D)) if ctx.needs_input_grad[1]
                 else None)
        return (dxz, dw_in, dw_out, du_prev_f, du_prev_b, None, None, None, *dparams)


def _gate_z(kernels, z: Tensor, S: Tensor, w_out: Tensor, gate: MembaGateParams) -> Tensor:
    """Both directions' gates z'_d = z + S_d W_out^T (S_d W_out^T without the residual),
    (2, B, L, D) in z's dtype."""
    return kernels.gate_z_fwd(S, w_out, z if gate.residual else None)


def _state_groups(A: Tensor, Bm: Tensor, Cm: Tensor):
    """The scan's N states in groups of the kernels' D_STATE: [(A (D, 16), B, C (B, L, 16),
    the group's real state count)]. States are independent, so the scan is the sum of the
    groups' scans; a last, short group is padded with states that stay zero (B = C = 0)."""
    N = A.shape[1]
    if N == D_STATE:
        return [(A, Bm, Cm, N)]
    groups = []
    for s in range(0, N, D_STATE):
        n = min(D_STATE, N - s)
        a, b, c = A[:, s:s + n], Bm[..., s:s + n], Cm[..., s:s + n]
        if n < D_STATE:
            pad = D_STATE - n
            a = torch.cat([a, a.new_full((a.shape[0], pad), -1.0)], dim=1)
            b, c = F.pad(b, (0, pad)), F.pad(c, (0, pad))
        groups.append((a.contiguous(), b, c, n))
    return groups


def _grouped_scan_bwd(kernels, p: SSMDirection, u, delta, Bm, Cm, z, dy, states,
                      reverse: bool, dBC: Tensor, dA, dD, scan_bwd: dict):
    """scan_bwd of a scan with N != 16 states, group by group (``_state_groups``; ``states``:
    the forward's, one per group): du and ddelta summed in fp32 (fp64 for fp64), dB | dC into
    ``dBC`` (B, L, 2N), A's and D's gradients into dA (D, N) and dD (D,) when given. Returns
    (du, ddelta) in u's dtype."""
    N = p.A.shape[1]
    du = ddelta = None
    for i, (A, Bp, Cp, n) in enumerate(_state_groups(p.A, Bm, Cm)):
        dA_g = torch.empty_like(A) if dA is not None else None
        gdu, gdd, _, dB, dC = kernels.scan_bwd(
            u, delta, A, Bp, Cp, p.D if i == 0 else None, z, p.dt_bias, dy,
            states[i], True, reverse,
            **dict(scan_bwd, dz_accumulate=scan_bwd['dz_accumulate'] or i > 0),
            dA_out=dA_g, dD_out=dD if i == 0 else None)
        s = i * D_STATE
        dBC[..., s:s + n] = dB[..., :n]
        dBC[..., N + s:N + s + n] = dC[..., :n]
        if dA is not None:
            dA[:, s:s + n] = dA_g[:, :n]
        acc = torch.promote_types(gdu.dtype, torch.float32)
        du = gdu.to(acc) if du is None else du + gdu
        ddelta = gdd.to(acc) if ddelta is None else ddelta + gdd
    return du.to(u.dtype), ddelta.to(u.dtype)


_FIELDS = len(SSMDirection._fields)
_PARAMS_AT = 8  # the position of the first SSM parameter among forward's inputs


def _param_grads(p: SSMDirection, needs: SSMDirection, u, xdbl, ddelta, dxdbl, dA,
                 dD) -> SSMDirection:
    """One direction's gradients of x_proj, dt_proj, the delta bias, A and D (None where
    not needed), each in its parameter's dtype."""
    D, rank = u.shape[-1], p.dt_proj_weight.shape[1]
    g = dict.fromkeys(SSMDirection._fields)
    if needs.x_proj_weight:  # (R_dt + 2N, D)
        g['x_proj_weight'] = mm_f32(dxdbl.view(-1, dxdbl.shape[-1]).t(), u.view(-1, D))
    if needs.dt_proj_weight:  # (D, R_dt)
        g['dt_proj_weight'] = mm_f32(ddelta.view(-1, D).t(),
                                     xdbl[..., :rank].reshape(-1, rank))
    if needs.dt_bias:  # added to delta inside the scan
        g['dt_bias'] = ddelta.view(-1, D).sum(0, dtype=torch.promote_types(ddelta.dtype,
                                                                           torch.float32))
    g['A'], g['D'] = dA, dD
    return SSMDirection(**{k: None if v is None else v.to(getattr(p, k).dtype)
                           for k, v in g.items()})


def _conv_grads(p: SSMDirection, needs: SSMDirection, x, du, reverse: bool) -> dict:
    """The conv weight's and bias's gradients for du (the gradient of silu(conv(x))), by
    autograd through PyTorch's conv."""
    w = p.conv_weight.detach().requires_grad_(needs.conv_weight)
    b = p.conv_bias.detach().requires_grad_(needs.conv_bias)
    leaves = [t for t in (w, b) if t.requires_grad]
    with torch.enable_grad():
        y = causal_conv1d_tokens(x, w.to(x.dtype), b.to(x.dtype), 'silu', reverse)
        grads = iter(torch.autograd.grad(y, leaves, du.to(y.dtype)))
    return {name: next(grads) for name, t in (('conv_weight', w), ('conv_bias', b))
            if t.requires_grad}


def bidirectional_ssm_reason(xz: Tensor, dirs: Tuple[SSMDirection, ...],
                             gate_weights: Optional[Tuple[Tensor, Tensor]],
                             gate: Optional[MembaGateParams], kernels=None) -> str:
    """'' when ``bidirectional_ssm`` can run on these inputs with the CUDA kernels, else why not
    (see ``scan_kernels_reason``)."""
    reason = scan_kernels_reason(xz, kernels)
    if reason:
        return reason
    if len(dirs) != 2:
        return f'{len(dirs)} directions'
    for p in dirs:
        if p.conv_weight.shape[1] != CONV_WIDTH:
            return f'conv width {p.conv_weight.shape[1]} != {CONV_WIDTH}'
    if gate is not None:
        w_in, w_out = gate_weights
        if w_out.shape[1] != GATE_RANK:
            return f'gate rank {w_out.shape[1]} != {GATE_RANK}'
        if not 1 <= gate.num_chunks <= LIM_PAIR_MAX_CHUNKS:
            return f'gate num_chunks {gate.num_chunks} > {LIM_PAIR_MAX_CHUNKS}'
        if xz.shape[-1] % 8 or not xz.is_contiguous():  # gate_z reads z a channel quad at a time
            return f'gate on {xz.shape[-1] // 2} channels (not a multiple of 4) or a strided xz'
    return ''


def bidirectional_ssm(xz: Tensor, dirs: Tuple[SSMDirection, SSMDirection],
                      gate_weights: Optional[Tuple[Tensor, Tensor]] = None,
                      gate: Optional[MembaGateParams] = None,
                      membrane: Optional[Tuple[Optional[Tensor], Optional[Tensor]]] = None,
                      kernels=None) -> Tuple[Tensor, Optional[Tuple[Tensor, Tensor]]]:
    """xz (B, L, 2D) -> (y (B, L, D), the new membranes (two (B, L // T, R)) or None).

    ``gate_weights`` = (W_in (R, D), W_out (D, R)) with ``gate`` its settings, or
    None for the plain (LoRA) mixer. ``membrane``: the previous layer's pair, or
    None for zero membranes. The caller checks ``bidirectional_ssm_reason`` first.
    """
    if kernels is None:
        kernels, why = scan_extension()
        if kernels is None:
            raise RuntimeError(why)
    f32 = torch.promote_types(xz.dtype, torch.float32)  # fp64 stays fp64 for the references

    def wide(t):  # what the kernels read in fp32: conv weights and biases, A, D
        return None if t is None else t.to(f32).contiguous()

    dirs = tuple(p._replace(conv_weight=wide(p.conv_weight), conv_bias=wide(p.conv_bias),
                            dt_bias=wide(p.dt_bias), A=wide(p.A), D=wide(p.D)) for p in dirs)
    w_in, w_out = gate_weights if gate is not None else (None, None)
    u_prev_f, u_prev_b = membrane if membrane is not None else (None, None)
    if gate is not None:
        w_in, w_out = wide(w_in), wide(w_out)
    save_states = grad_wanted(xz, w_in, w_out, u_prev_f, u_prev_b, *dirs[0], *dirs[1])
    y, m_f, m_b = _BidirectionalSSM.apply(xz, w_in, w_out, u_prev_f, u_prev_b, gate, kernels,
                                          save_states, *dirs[0], *dirs[1])
    return y, (None if gate is None else (m_f, m_b))
