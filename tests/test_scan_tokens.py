"""Token-major selective scan and conv (``ops.selective_scan_tokens``, ``ops.causal_conv1d_tokens``).

Both are checked against per-token loops written here in fp64: the reversed direction
walks the tokens backwards directly (no flips), and the gate correction is added
literally. On a GPU with the extension built, memba_vision's scan and conv kernels
(``memba_vision._scan_cuda``, which ``ops.bidirectional_ssm`` runs) are checked the
same way, outputs and every gradient, through the small autograd wrappers below.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import requires_cuda
from memba_vision.ops import causal_conv1d_tokens, selective_scan_tokens
from memba_vision.ops.bidirectional_ssm import scan_extension


def grid_columns(rows, length):
    """Token indices of a row-major (rows, length // rows) grid, visited column by column."""
    cols = length // rows
    return [h * cols + w for w in range(cols) for h in range(rows)]


def loop_scan(u, delta, A, B, C, D, z, bias, softplus, reverse, gate, order=None,
              states=False):
    """Per-token loop of the selective scan on (b, l, d) tensors, in fp64; ``order``: the
    tokens in visit order (default: 0 .. l-1), walked backwards when ``reverse``. With
    ``states``: (y, the state before scan steps 0, 16, 32, ..., (b, ceil(l / 16), d, n))."""
    u, delta, B, C = (t.double() for t in (u, delta, B, C))
    A = A.double()
    dt = delta + bias.double() if bias is not None else delta
    if softplus:
        dt = F.softplus(dt)
    b, l, d = u.shape
    h = u.new_zeros(b, d, A.shape[1])
    ys, saved = [None] * l, []
    steps = list(range(l) if order is None else order)
    for s, t in enumerate(reversed(steps) if reverse else steps):
        if s % 16 == 0:
            saved.append(h)
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None]
        ys[t] = (h * C[:, t, None]).sum(-1)
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + u * D.double()
    if z is not None or gate is not None:
        zz = z.double() if z is not None else 0.
        if gate is not None:
            zz = zz + gate[0].double() @ gate[1].double().t()
        y = y * F.silu(zz)
    return (y, torch.stack(saved, dim=1)) if states else y


def loop_states(*args):
    """``loop_scan``'s states (same arguments)."""
    return loop_scan(*args, states=True)[1]


def loop_conv(x, w, bias, reverse):
    """out[t] = silu(bias + sum_k w[k] x[t - (W-1) + k]), or x[t + (W-1) - k] when reversed."""
    x, w = x.double(), w.double()
    b, l, d = x.shape
    W = w.shape[1]
    out = x.new_zeros(b, l, d) + (bias.double() if bias is not None else 0.)
    for t in range(l):
        for k in range(W):
            s = t + (W - 1) - k if reverse else t - (W - 1) + k
            if 0 <= s < l:
                out[:, t] = out[:, t] + w[:, k] * x[:, s]
    return F.silu(out)


def make_inputs(b, l, d, n=16, r=16, device='cpu', dtype=torch.float32, seed=0, bc_at=8):
    """u and z as views of one (b, l, 2d) tensor, B and C as views of one (b, l, bc_at + 2n)
    tensor from column bc_at (an odd d or bc_at puts pairs of elements off their alignment)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    xz = rnd(b, l, 2 * d)  # u and z as views of one wider tensor, as in the mixer
    x_dbl = rnd(b, l, bc_at + 2 * n)
    return dict(
        u=xz[..., :d].to(dtype), z=xz[..., d:].to(dtype),
        delta=rnd(b, l, d, scale=0.5).to(dtype) - 1.0,
        A=-torch.exp(rnd(d, n, scale=0.5)) * torch.linspace(1, 4, n).to(device),
        B=x_dbl[..., bc_at:bc_at + n].to(dtype), C=x_dbl[..., bc_at + n:].to(dtype),
        D=rnd(d), bias=rnd(d, scale=0.3),
        S=rnd(b, l, r, scale=0.5).to(dtype), W=rnd(d, r, scale=0.2))


def call(fn, inp, reverse, with_z=True, with_gate=True, with_D=True):
    gate = (inp['S'], inp['W']) if with_gate else None
    return fn(inp['u'], inp['delta'], inp['A'], inp['B'], inp['C'],
              inp['D'] if with_D else None, inp['z'] if with_z else None, inp['bias'], True,
              reverse, gate)


def api(u, delta, A, B, C, D, z, bias, softplus, reverse, gate):
    return selective_scan_tokens(u, delta, A, B, C, D, z=z, delta_bias=bias,
                                 delta_softplus=softplus, reverse=reverse, gate=gate)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def max_rel(a, b):
    """max |a - b| / max |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def states_error(got, want):
    """Saved states (..., ceil(l / 16), d, 16) against the loop's: fp32 and contiguous, the
    state before step 0 exactly zero; returns the others' ``max_rel`` (0 when l <= 16)."""
    assert got.shape == want.shape and got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got.select(-3, 0), torch.zeros_like(got.select(-3, 0)))
    q = got.shape[-3]
    return max_rel(got.narrow(-3, 1, q - 1), want.narrow(-3, 1, q - 1)) if q > 1 else 0.


@pytest.mark.parametrize('reverse', [False, True])
@pytest.mark.parametrize('with_z,with_gate', [(True, True), (True, False), (False, True),
                                              (False, False)])
def test_scan_tokens_matches_loop_on_cpu(reverse, with_z, with_gate):
    inp = make_inputs(2, 37, 12, n=4, r=3)
    y = call(api, inp, reverse, with_z, with_gate)
    ref = call(loop_scan, inp, reverse, with_z, with_gate)
    assert y.shape == (2, 37, 12) and rel(y, ref) < 1e-5
    # the reversed scan is the scan of the flipped sequence, flipped back, and differs
    other = call(loop_scan, inp, not reverse, with_z, with_gate)
    assert rel(other, ref) > 1e-2


@pytest.mark.parametrize('reverse', [False, True])
def test_conv_tokens_matches_loop_on_cpu(reverse):
    xz = torch.randn(2, 11, 10)
    x, w, bias = xz[..., :5], torch.randn(5, 4), torch.randn(5)
    out = causal_conv1d_tokens(x, w, bias, activation='silu', reverse=reverse)
    assert rel(out, loop_conv(x, w, bias, reverse)) < 1e-6
    assert rel(out, loop_conv(x, w, bias, not reverse)) > 1e-2


# ----------------------------------------------------------------- CUDA kernels
requires_kernels = pytest.mark.skipif(
    scan_extension()[0] is None, reason=f'needs the scan extension: {scan_extension()[1]}')


def _f32(t):
    return None if t is None else t.detach().float().contiguous()


def _like(t, ref):
    """``t`` in ref's dtype with a contiguous last axis."""
    if t is None:
        return None
    t = t.to(ref.dtype)
    return t if t.stride(-1) == 1 else t.contiguous()


def _gated_z(z, u, S=None, W=None):
    """What the scan kernels take as the gate: z, or z' = z + S W^T (S W^T without z) in u's
    dtype, computed here in fp32 (the gate kernels that compute it on the GPU,
    ``gate_z_fwd`` / ``gate_z_bwd``, are tested in test_bidirectional_ssm)."""
    if S is None:
        return _like(z, u)
    zp = torch.matmul(S.float(), W.float().t())
    return (zp if z is None else zp + z.float()).to(u.dtype)


class _KernelScan(torch.autograd.Function):
    """The extension's scan_fwd / scan_bwd as one autograd node (frozen A, D, bias), on
    z' = z + S W^T when a gate is given; z's, S's and W's gradients from the kernel's dz'."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, bias, S, W, softplus, reverse):
        zg = _gated_z(z, u, S, W)
        y, states = scan_extension()[0].scan_fwd(u, delta, A, B, C, D, zg, bias, softplus,
                                                 reverse, save_states=True)
        ctx.save_for_backward(u, delta, A, B, C, D, zg, bias, S, W, states)
        ctx.flags = (softplus, reverse, z is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, D, zg, bias, S, W, states = ctx.saved_tensors
        softplus, reverse, has_z = ctx.flags
        du, ddelta, dzg, dB, dC = scan_extension()[0].scan_bwd(
            u, delta, A, B, C, D, zg, bias, _like(dy, u), states, softplus, reverse)
        dS = dW = None
        if S is not None:
            dS = torch.matmul(dzg.float(), W.float()).to(S.dtype)
            dW = torch.matmul(dzg.flatten(0, 1).t().float(), S.flatten(0, 1).float())
        return (du, ddelta, None, dB.to(B.dtype), dC.to(C.dtype), None,
                dzg if has_z else None, None, dS, dW, None, None)


def _kernel_inputs(u, delta, A, B, C, D, z, bias, gate):
    """scan_fwd's tensor arguments (u .. delta_bias) as the kernels take them."""
    S, W = gate if gate is not None else (None, None)
    return (_like(u, u), _like(delta, u), _f32(A), _like(B, u), _like(C, u), _f32(D),
            _gated_z(z, u, S, W), _f32(bias))


def kernel_api(u, delta, A, B, C, D, z, bias, softplus, reverse, gate):
    """``api`` on memba_vision's scan kernel."""
    S, W = gate if gate is not None else (None, None)
    return _KernelScan.apply(_like(u, u), _like(delta, u), _f32(A), _like(B, u), _like(C, u),
                             _f32(D), _like(z, u), _f32(bias), _like(S, u),
                             None if W is None else W.float().contiguous(), bool(softplus),
                             bool(reverse))


def kernel_states(u, delta, A, B, C, D, z, bias, softplus, reverse, gate):
    """The states scan_fwd saves for the backward (``api``'s arguments)."""
    return scan_extension()[0].scan_fwd(*_kernel_inputs(u, delta, A, B, C, D, z, bias, gate),
                                        bool(softplus), bool(reverse), save_states=True)[1]


class _KernelConv(torch.autograd.Function):
    """The extension's conv_fwd / conv_bwd (frozen weight and bias)."""

    @staticmethod
    def forward(ctx, x, weight, bias, reverse):
        ctx.save_for_backward(x, weight, bias)
        ctx.reverse = reverse
        return scan_extension()[0].conv_fwd(x, weight, bias, reverse, True)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        dx = scan_extension()[0].conv_bwd(x, weight, bias, _like(dy, x), ctx.reverse, True)
        return dx, None, None, None


def kernel_conv(x, weight, bias, reverse):
    """SiLU(causal conv) of token-major x on memba_vision's conv kernel."""
    return _KernelConv.apply(_like(x, x), _f32(weight), _f32(bias), bool(reverse))


def grads_of(fn, inp, reverse, with_z, with_gate, dy):
    leaves = {k: v.detach().clone().requires_grad_(k not in ('A', 'D', 'bias'))
              for k, v in inp.items()}
    y = call(fn, leaves, reverse, with_z, with_gate)
    y.backward(dy.to(y.dtype))
    names = ['u', 'delta', 'B', 'C'] + (['z'] if with_z else []) + \
        (['S', 'W'] if with_gate else [])
    return y.detach(), {k: leaves[k].grad for k in names}


@requires_cuda
@requires_kernels
@pytest.mark.parametrize('b,l,d,bc_at', [(2, 197, 768, 8), (3, 17, 100, 8), (1, 1, 64, 8),
                                         (2, 300, 130, 8), (2, 16, 64, 8), (2, 45, 37, 7)])
@pytest.mark.parametrize('reverse', [False, True])
@pytest.mark.parametrize('with_z,with_gate', [(True, True), (True, False), (False, True)])
def test_scan_kernel_matches_loop_fp32(b, l, d, bc_at, reverse, with_z, with_gate):
    """(2, 45, 37, 7): z, B and C start at odd columns and d is odd, so the kernels read them
    element by element instead of in pairs. The states the forward saves for the backward
    (before every 16th step in scan order) against the loop's too."""
    inp = make_inputs(b, l, d, device='cuda', seed=b * 1000 + l + d, bc_at=bc_at)
    dy = torch.randn(b, l, d, device='cuda')
    y, g = grads_of(kernel_api, inp, reverse, with_z, with_gate, dy)
    y_ref, g_ref = grads_of(loop_scan, inp, reverse, with_z, with_gate, dy)
    states = call(kernel_states, inp, reverse, with_z, with_gate)
    assert states.shape == (b, (l + 15) // 16, d, 16)
    errs = {'y': rel(y, y_ref), **{k: rel(g[k], g_ref[k]) for k in g},
            'states': states_error(states, call(loop_states, inp, reverse, with_z, with_gate))}
    print(f'SCAN fp32 b={b} l={l} d={d} reverse={reverse} z={with_z} gate={with_gate}: ' +
          ' '.join(f'{k} {v:.1e}' for k, v in errs.items()))
    assert all(v < 1e-4 for v in errs.values()), errs


@requires_cuda
@requires_kernels
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('reverse', [False, True])
def test_scan_kernel_half_precision(dtype, reverse):
    inp = make_inputs(4, 197, 768, device='cuda', dtype=dtype)
    dy = torch.randn(4, 197, 768, device='cuda')
    y, g = grads_of(kernel_api, inp, reverse, True, True, dy)
    y_ref, g_ref = grads_of(loop_scan, inp, reverse, True, True, dy.to(dtype))
    assert y.dtype == dtype and g['u'].dtype == dtype
    errs = {'y': rel(y, y_ref), **{k: rel(g[k], g_ref[k]) for k in g}}
    print(f'SCAN {dtype} reverse={reverse}: ' + ' '.join(f'{k} {v:.1e}' for k, v in errs.items()))
    assert all(v < 2e-2 for v in errs.values()), errs


@requires_cuda
@requires_kernels
@pytest.mark.parametrize('b,l,d,dtype,tol', [(2, 197, 192, torch.float32, 1e-5),
                                             (3, 17, 100, torch.float32, 1e-5),
                                             (2, 197, 192, torch.bfloat16, 1e-2)])
@pytest.mark.parametrize('reverse', [False, True])
def test_scan_kernel_gradients_of_a_and_d(b, l, d, dtype, tol, reverse):
    """scan_bwd's dA_out / dD_out (trainable A and D, the gate on) against the fp64 loop; the
    input gradients are those of the frozen-parameter backward."""
    ext = scan_extension()[0]
    inp = make_inputs(b, l, d, device='cuda', dtype=dtype, seed=l + d)
    dy = torch.randn(b, l, d, device='cuda').to(dtype)
    leaves = {k: inp[k].detach().double().requires_grad_() for k in ('A', 'D')}
    y_ref = loop_scan(inp['u'], inp['delta'], leaves['A'], inp['B'], inp['C'], leaves['D'],
                      inp['z'], inp['bias'], True, reverse, (inp['S'], inp['W']))
    y_ref.backward(dy.double())
    args = _kernel_inputs(*(inp[k] for k in ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'bias')),
                          (inp['S'], inp['W']))
    dA, dD = torch.full((d, 16), float('nan'), device='cuda'), torch.zeros(d, device='cuda')
    _, states = ext.scan_fwd(*args, True, reverse, save_states=True)
    frozen = ext.scan_bwd(*args, dy, states, True, reverse)
    trained = ext.scan_bwd(*args, dy, states, True, reverse, dA_out=dA, dD_out=dD)
    errs = {'A': rel(dA, leaves['A'].grad), 'D': rel(dD, leaves['D'].grad)}
    print(f'SCAN params {dtype} b={b} l={l} d={d} reverse={reverse}: ' +
          ' '.join(f'{k} {v:.1e}' for k, v in errs.items()))
    assert all(v < tol for v in errs.values()), errs
    for got, want in zip(trained, frozen):  # du, ddelta, dz, dB, dC
        assert rel(got, want) < 1e-6


@requires_cuda
@requires_kernels
def test_scan_kernel_is_deterministic_and_writes_everything():
    """Output, gradients and saved states bit-identical over two runs and finite (the states
    allocated where a NaN-filled tensor of their size was just freed)."""
    inp = make_inputs(2, 197, 768, device='cuda')
    dy = torch.randn(2, 197, 768, device='cuda')
    runs = [grads_of(kernel_api, inp, True, True, True, dy) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for k in runs[0][1]:
        assert torch.equal(runs[0][1][k], runs[1][1][k]), k
        assert torch.isfinite(runs[0][1][k]).all(), k
    states = []
    for _ in range(2):
        torch.full((2, 13, 768, 16), float('nan'), device='cuda')  # freed at once
        states.append(call(kernel_states, inp, True))
    assert torch.equal(states[0], states[1]) and torch.isfinite(states[0]).all()


@requires_cuda
@requires_kernels
@pytest.mark.parametrize('reverse', [False, True])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('l', [1, 5, 197])
def test_conv_kernel_matches_loop(reverse, dtype, l):
    xz = torch.randn(3, l, 2 * 200, device='cuda', dtype=dtype)
    x = xz[..., 200:]  # a strided view, as the mixer passes it
    w, bias = torch.randn(200, 4, device='cuda'), torch.randn(200, device='cuda')
    xg = x.detach().clone().requires_grad_()
    out = kernel_conv(xg, w, bias, reverse)
    g = torch.randn_like(out)
    out.backward(g)
    xr = x.detach().double().requires_grad_()
    ref = loop_conv(xr, w, bias, reverse)
    ref.backward(g.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and rel(out, ref) < tol and rel(xg.grad, xr.grad) < tol


# VMamba's cross scan: row-major, column-major (rows=h) and both reversed
CROSS = dict(reverse=[False, False, True, True], rows=lambda h: [0, h, 0, h])


def make_directions(b, h, w, d, k=4, device='cpu', dtype=torch.float32, seed=0):
    """u (b, l, d) and, per direction, delta / B / C (b, l, k, *) as the cross-scan node lays
    them out (B and C slices of one x_proj output), A (k, d, 16), D and bias (k, d)."""
    g = torch.Generator().manual_seed(seed)
    l, n = h * w, 16

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)
    x_dbl = rnd(b, l, k, 6 + 2 * n)
    return dict(u=rnd(b, l, d).to(dtype), delta=(rnd(b, l, k, d, scale=0.5) - 1).to(dtype),
                A=-torch.exp(rnd(k, d, n, scale=0.5)), B=x_dbl[..., 6:6 + n].to(dtype),
                C=x_dbl[..., 6 + n:].to(dtype), D=rnd(k, d), bias=rnd(k, d, scale=0.3))


def loop_directions(inp, reverse, rows, dy, states=False):
    """Each direction's output and the gradients of u (per direction), delta, B, C, A and D,
    by the per-token fp64 loop visiting the tokens in that direction's order; with
    ``states``, then each direction's loop states, (k, b, ceil(l / 16), d, 16)."""
    l, k = inp['u'].shape[1], inp['delta'].shape[2]
    leaves = {n: inp[n].detach().double().requires_grad_()
              for n in ('delta', 'B', 'C', 'A', 'D')}
    us = [inp['u'].detach().double().requires_grad_() for _ in range(k)]
    runs = [loop_scan(us[i], leaves['delta'][:, :, i], leaves['A'][i], leaves['B'][:, :, i],
                      leaves['C'][:, :, i], leaves['D'][i], None, inp['bias'][i], True,
                      reverse[i], None, order=grid_columns(rows[i], l) if rows[i] else None,
                      states=True) for i in range(k)]
    ys = [y for y, _ in runs]
    sum(ys).backward(dy.double())
    out = (torch.stack(ys, dim=2), torch.stack([u.grad for u in us], dim=2),
           *(leaves[n].grad for n in ('delta', 'B', 'C', 'A', 'D')))
    return (out + (torch.stack([h.detach() for _, h in runs]),)) if states else out


DIRS_OUTPUTS = ('y', 'u', 'delta', 'B', 'C', 'A', 'D')


@requires_cuda
@requires_kernels
@pytest.mark.parametrize('h,w,dtype,tol', [
    (3, 5, torch.float32, 1e-5), (7, 4, torch.float32, 1e-5), (14, 14, torch.float32, 1e-5),
    (1, 9, torch.float32, 1e-5), (56, 56, torch.float32, 1e-5), (7, 4, torch.bfloat16, 3e-3),
    (28, 28, torch.bfloat16, 3e-3)])
def test_scan_dirs_kernel_matches_the_loop_in_four_orders(h, w, dtype, tol):
    """scan_dirs_fwd / scan_dirs_bwd: VMamba's four directions in one launch, each with its own
    delta, B, C, A, D and bias, the column-major ones walking the row-major grid by columns, in
    place; every output and gradient against the per-token loop in that order: the input
    gradients of the frozen-parameter backward, then those and A's and D's of the trainable
    one. The states the forward saves (before every 16th step of each direction's order)
    against the loop's too."""
    ext = scan_extension()[0]
    inp = make_directions(2, h, w, 96, device='cuda', dtype=dtype, seed=h * 100 + w)
    dy = torch.randn(2, h * w, 96, device='cuda').to(dtype)
    rev, rows = CROSS['reverse'], CROSS['rows'](h)
    args = [inp[n] for n in ('u', 'delta', 'A', 'B', 'C', 'D', 'bias')]
    y, states = ext.scan_dirs_fwd(*args, True, rev, rows, out=torch.empty(
        2, h * w, 4, 96, device='cuda'), save_states=True)     # fp32 outputs of bf16 inputs
    *ref, states_ref = loop_directions(inp, rev, rows, dy, states=True)
    assert states.shape == (4, 2, (h * w + 15) // 16, 96, 16)
    states_err = states_error(states, states_ref)
    for trainable in (False, True):
        du = torch.empty(2, h * w, 4, 96, device='cuda')
        dbc = torch.empty(2, h * w, 4, 6 + 32, device='cuda', dtype=dtype)[..., 6:]
        dA = torch.full_like(inp['A'], float('nan')) if trainable else None
        dD = torch.full_like(inp['D'], float('nan')) if trainable else None
        _, ddelta, dB, dC = ext.scan_dirs_bwd(*args, dy, states, True, rev, rows, du_out=du,
                                              dBC_out=dbc, dA_out=dA, dD_out=dD)
        got = (y, du, ddelta, dB, dC) + ((dA, dD) if trainable else ())
        errs = {name: rel(g, want) for name, g, want in zip(DIRS_OUTPUTS, got, ref)}
        errs['states'] = states_err
        print(f'SCAN dirs {h}x{w} {dtype} trainable={trainable}: ' +
              ' '.join(f'{k} {v:.1e}' for k, v in errs.items()))
        assert y.dtype == du.dtype == torch.float32 and ddelta.dtype == dtype
        assert all(v < tol for v in errs.values()), errs
    if h > 1 and w > 1:  # the column walk differs from the row-major one
        row_major = loop_directions(inp, rev, [0] * 4, dy)[0]
        assert rel(row_major, ref[0]) > 1e-2


@pytest.mark.parametrize('h,w', [(3, 5), (1, 4), (5, 7)])
def test_grid_columns_order_and_the_cpu_stand_in(h, w):
    """The tests' stand-in of the extension walks the grid like the per-token loop (outputs,
    gradients and saved states)."""
    from scan_ext_reference import ReferenceScanKernels as ext
    assert grid_columns(2, 6) == [0, 3, 1, 4, 2, 5]
    inp = make_directions(2, h, w, 12)
    dy = torch.randn(2, h * w, 12)
    rev, rows = CROSS['reverse'], CROSS['rows'](h)
    args = [inp[n] for n in ('u', 'delta', 'A', 'B', 'C', 'D', 'bias')]
    y, states = ext.scan_dirs_fwd(*args, True, rev, rows, save_states=True)
    assert ext.scan_dirs_fwd(*args, True, rev, rows)[1] is None
    dA, dD = torch.empty_like(inp['A']), torch.empty_like(inp['D'])
    du, ddelta, dB, dC = ext.scan_dirs_bwd(*args, dy, states, True, rev, rows, dA_out=dA,
                                           dD_out=dD)
    *ref, states_ref = loop_directions(inp, rev, rows, dy, states=True)
    for name, got, want in zip(DIRS_OUTPUTS, (y, du, ddelta, dB, dC, dA, dD), ref):
        assert rel(got, want) < 1e-5, name
    assert states.shape == (4, 2, (h * w + 15) // 16, 12, 16)
    assert states_error(states, states_ref) < 1e-5


@pytest.mark.parametrize('reverse', [False, True])
def test_cpu_stand_in_saves_the_loops_states(reverse):
    """The stand-in's scan_fwd: the states before every 16th step in scan order, only when
    asked for."""
    from scan_ext_reference import ReferenceScanKernels as ext
    inp = make_inputs(2, 37, 12)
    args = _kernel_inputs(*(inp[k] for k in ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'bias')),
                          (inp['S'], inp['W']))
    y, states = ext.scan_fwd(*args, True, reverse, save_states=True)
    assert ext.scan_fwd(*args, True, reverse)[1] is None
    assert rel(y, call(loop_scan, inp, reverse)) < 1e-5
    assert states.shape == (2, 3, 12, 16)
    assert states_error(states, call(loop_states, inp, reverse)) < 1e-5
