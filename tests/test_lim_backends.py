"""The fused LIM backend (CUDA extension, kernels/lim) against the fp64 PyTorch reference.

GPU tests run it through ``ops.lim``, which picks it for CUDA tensors once the
extension is built; they skip without a GPU or the extension.

A reset decision can legitimately differ between the fp32 kernels and the fp64
reference when a membrane lands within rounding of the threshold; since every
(b, j, r) column of LIM is independent, such columns are left out of the
comparison (and must stay rare). The "fires often" threshold 0.55 is not on the
coarse grid of bf16 inputs, so exact ties do not pile up there.
"""
import os
import random
import subprocess
import sys

import pytest
import torch

import memba_vision.ops as ops
from memba_vision.ops import lim_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = 'MEMBA_BACKEND'
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


# ----------------------------------------------------------------- helpers
def decision_margin(x, u_prev, T, leak, threshold):
    """min_i |pre_i - threshold| per column (B, l, R), integrated in fp64."""
    x = x.detach().double()
    B, L, R = x.shape
    l = L // T
    u = torch.zeros(B, l, R, dtype=torch.float64, device=x.device) if u_prev is None \
        else u_prev.detach().double()
    margin = torch.full_like(u, float('inf'))
    for i in range(T):
        pre = leak * u + x[:, i * l:(i + 1) * l]
        margin = torch.minimum(margin, (pre - threshold).abs())
        u = torch.where(pre > threshold, torch.zeros_like(pre), pre)
    return margin


def reference(x, u_prev, T, leak, threshold, grad_out, grad_u_mean):
    """fp64 outputs and grads of ``lim_reference`` on the same input values."""
    xr = x.detach().double().requires_grad_()
    ur = None if u_prev is None else u_prev.detach().double().requires_grad_()
    out, u_mean = lim_reference(xr, T, leak, threshold, ur)
    loss = out.sum() * 0
    if grad_out is not None:
        loss = loss + (out * grad_out.double()).sum()
    if grad_u_mean is not None:
        loss = loss + (u_mean * grad_u_mean.double()).sum()
    grads = torch.autograd.grad(loss, [xr] + ([ur] if ur is not None else []))
    return out, u_mean, grads[0], (grads[1] if ur is not None else None)


def run_lim(x, u_prev, T, leak, threshold, grad_out, grad_u_mean, fn=None):
    """Outputs and grads of ``fn`` (default ``ops.lim``, whatever backend the env selects)."""
    out, u_mean = (fn or ops.lim)(x, T, leak, threshold, u_prev)
    wrt = [t for t in (x, u_prev) if t is not None and t.requires_grad]
    outs = [o for o, g in ((out, grad_out), (u_mean, grad_u_mean)) if g is not None]
    grads = [g for g in (grad_out, grad_u_mean) if g is not None]
    got = dict(zip(wrt, torch.autograd.grad(outs, wrt, grads))) if outs else {}
    gx = got.get(x, torch.zeros_like(x))
    gu = None if u_prev is None else got.get(u_prev, torch.zeros_like(u_prev))
    return out, u_mean, gx, gu


def assert_matches(got, want, margin, T, eps, atol, rtol, what=''):
    """Compares (out, u_mean, grad_x, grad_u_prev) where decisions are unambiguous."""
    safe = margin >= eps                                    # (B, l, R)
    B, l, R = safe.shape
    ambiguous = int((~safe).sum())
    assert ambiguous <= max(2, 0.01 * safe.numel()), \
        f'{what}: {ambiguous} of {safe.numel()} columns within {eps} of the threshold'
    L = got[0].shape[1]
    safe_full = torch.ones(B, L, R, dtype=torch.bool, device=safe.device)
    safe_full[:, :l * T] = safe.repeat(1, T, 1)             # chunk-major like the output
    names = ('out', 'u_mean', 'grad_x', 'grad_u_prev')
    for name, g, w in zip(names, got, want):
        if w is None:
            assert g is None, f'{what} {name}: expected None'
            continue
        assert g.shape == w.shape, f'{what} {name}: shape {tuple(g.shape)} != {tuple(w.shape)}'
        g = g.detach().double()
        assert torch.isfinite(g).all(), f'{what} {name}: non-finite values (unwritten output?)'
        mask = safe_full if g.shape[1] == L else safe
        err = (g - w).abs()
        bad = (err > atol + rtol * w.abs()) & mask
        assert not bad.any(), (f'{what} {name}: {int(bad.sum())} mismatches, max err '
                               f'{err[mask].max().item():.3e}')
        if g.shape[1] == L and L > l * T:
            assert (g[:, l * T:] == 0).all(), f'{what} {name}: tail not zero'


def make_inputs(B, L, R, T, dtype, device, with_prev, seed):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)

    x = randn(B, L, R).requires_grad_()
    u = randn(B, L // T, R).requires_grad_() if with_prev else None
    return x, u, randn(B, L, R), randn(B, L // T, R)


TOL = {  # eps (decision margin), atol, rtol
    torch.float32: (1e-5, 1e-5, 0.0),
    torch.float64: (1e-9, 1e-12, 0.0),
    torch.bfloat16: (1e-4, 1e-5, 2.0 ** -7),  # final rounding to bf16: <= 2^-8 relative
    torch.float16: (1e-4, 1e-5, 2.0 ** -10),
}


def check_case(B, L, R, T, dtype, device, with_prev, threshold, leak=0.5, seed=0, fn=None,
               what=''):
    x, u, go, gm = make_inputs(B, L, R, T, dtype, device, with_prev, seed)
    got = run_lim(x, u, T, leak, threshold, go, gm, fn)
    want = reference(x, u, T, leak, threshold, go, gm)
    eps, atol, rtol = TOL[dtype]
    assert_matches(got, want, decision_margin(x, u, T, leak, threshold), T, eps, atol, rtol,
                   what or f'B={B} L={L} R={R} T={T} {dtype} prev={with_prev} th={threshold}')


@pytest.fixture
def fused_backend(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip('needs a CUDA GPU')
    monkeypatch.delenv(ENV, raising=False)
    name = ops.lim_backend(torch.empty(1, device='cuda'))
    if name != 'cuda':
        pytest.skip(f'LIM backend cuda unavailable (lim runs on {name})')
    return name


# ------------------------------------------------------------------ CPU tests
def test_cpu_import_loads_no_extension():
    code = ('import sys, torch, memba_vision.ops as o; '
            'print(o.lim_backend(torch.zeros(1, 4, 2))); '
            'print("memba_vision._lim_cuda" in sys.modules, "mamba_ssm" in sys.modules)')
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    env.pop(ENV, None)
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    backends, loaded = res.stdout.strip().splitlines()[-2:]
    assert backends == 'reference'
    assert loaded == 'False False', 'importing memba_vision.ops loaded an extension or mamba_ssm'


@needs_gpu
def test_forcing_the_reference_on_gpu(monkeypatch):
    monkeypatch.setenv(ENV, 'reference')
    x, u, go, gm = make_inputs(2, 197, 16, 4, torch.float32, 'cuda', True, seed=5)
    assert ops.lim_backend(x) == 'reference'
    out, _ = ops.lim(x, 4, 0.5, 0.55, u)
    assert not _is_cpp_node(out.grad_fn)


def _error_cases(device):
    other = 'meta' if device == 'cpu' else 'cpu'
    x = torch.randn(2, 9, 4, device=device)
    return {
        'device_mix': lambda: ops.lim(x, 4, u_prev=torch.zeros(2, 2, 4, device=other)),
        'dtype_mix': lambda: ops.lim(x, 4, u_prev=torch.zeros(2, 2, 4, device=device,
                                                               dtype=torch.float64)),
        'u_prev_shape': lambda: ops.lim(x, 4, u_prev=torch.zeros(2, 3, 4, device=device)),
        'num_chunks_0': lambda: ops.lim(x, 0),
        'num_chunks_gt_L': lambda: ops.lim(x, 10),
        'int_dtype': lambda: ops.lim(torch.ones(2, 9, 4, device=device, dtype=torch.int64), 4),
    }


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=needs_gpu)])
def test_error_messages_identical_for_every_backend(monkeypatch, device):
    seen = {}
    for mode in ('', 'reference'):  # whatever the device runs, and the reference
        monkeypatch.setenv(ENV, mode)
        for name, call in _error_cases(device).items():
            with pytest.raises((ValueError, TypeError)) as info:
                call()
            seen.setdefault(name, set()).add((info.type, str(info.value)))
    for name, errors in seen.items():
        assert len(errors) == 1, f'{name}: different errors per backend: {errors}'


# ------------------------------------------------------------------ GPU tests
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('with_prev', [False, True])
@pytest.mark.parametrize('L', [1, 3, 196, 197, 3136])
def test_fused_matches_reference_grid(fused_backend, L, with_prev, dtype):
    assert ops.lim_backend(torch.empty(1, L, 1, device='cuda')) == fused_backend
    for T in (1, 2, 4, 8):
        if T > L:
            continue
        for threshold in (0.55, 1e9):  # fires often / never
            check_case(2, L, 16, T, dtype, 'cuda', with_prev, threshold, seed=L * 31 + T)


@pytest.mark.parametrize('dtype', [torch.float16, torch.float64])
def test_fused_other_dtypes(fused_backend, dtype):
    for L, T in ((197, 4), (50, 7)):
        check_case(2, L, 16, T, dtype, 'cuda', True, 0.55, seed=L)


def test_fused_random_sizes(fused_backend):
    rng = random.Random(0)
    for k in range(12):
        B, R, L = rng.randint(1, 5), rng.randint(1, 40), rng.randint(1, 300)
        T = rng.choice([1, 2, 3, 4, 8, 33, 70])
        if T > L:
            T = L
        check_case(B, L, R, T, torch.float32, 'cuda', rng.random() < 0.5,
                   rng.choice([0.3, 1.0, 1e9]), leak=rng.choice([0.5, 0.9]), seed=k)


def test_fused_non_contiguous_inputs(fused_backend):
    B, L, R, T = 2, 197, 16, 4
    x = torch.randn(B, R, L, device='cuda').transpose(1, 2).requires_grad_()
    u = torch.randn(B, R, L // T, device='cuda').transpose(1, 2).requires_grad_()
    assert not x.is_contiguous() and not u.is_contiguous()
    go, gm = torch.randn(B, L, R, device='cuda'), torch.randn(B, L // T, R, device='cuda')
    got = run_lim(x, u, T, 0.5, 0.5, go.transpose(0, 1).contiguous().transpose(0, 1), gm)
    want = reference(x, u, T, 0.5, 0.5, go, gm)
    assert_matches(got, want, decision_margin(x, u, T, 0.5, 0.5), T, *TOL[torch.float32])


@pytest.mark.parametrize('used', ['out', 'u_mean'])
def test_fused_one_output_used(fused_backend, used):
    B, L, R, T = 2, 197, 16, 4
    x, u, go, gm = make_inputs(B, L, R, T, torch.float32, 'cuda', True, seed=5)
    go, gm = (go, None) if used == 'out' else (None, gm)
    got = run_lim(x, u, T, 0.5, 0.5, go, gm)
    want = reference(x, u, T, 0.5, 0.5, go, gm)
    assert_matches(got, want, decision_margin(x, u, T, 0.5, 0.5), T, *TOL[torch.float32])


def test_fused_u_prev_without_grad_and_no_grad_mode(fused_backend):
    B, L, R, T = 2, 197, 16, 4
    x, u, go, gm = make_inputs(B, L, R, T, torch.float32, 'cuda', True, seed=6)
    u = u.detach()
    out, u_mean, gx, _ = run_lim(x, u, T, 0.5, 0.5, go, gm)
    want = reference(x, u, T, 0.5, 0.5, go, gm)[:3] + (None,)
    assert_matches((out, u_mean, gx, None), want, decision_margin(x, u, T, 0.5, 0.5), T,
                   *TOL[torch.float32])
    with torch.no_grad():
        out2, u_mean2 = ops.lim(x, T, 0.5, 0.5, u)
    assert not out2.requires_grad
    assert torch.equal(out2, out.detach()) and torch.equal(u_mean2, u_mean.detach())


def test_fused_writes_every_output_element(fused_backend):
    """Outputs land in freshly freed NaN-filled blocks; none may survive."""
    B, L, R, T = 3, 199, 24, 4
    x, u, go, gm = make_inputs(B, L, R, T, torch.float32, 'cuda', True, seed=7)
    big, small = x.numel(), u.numel()
    torch.cuda.synchronize()
    poison = [torch.full((n,), float('nan'), device='cuda') for n in (big, small, big, small)]
    ptrs = {p.data_ptr() for p in poison}
    del poison
    out, u_mean = ops.lim(x, T, 0.5, 0.5, u)
    gx, gu = torch.autograd.grad((out, u_mean), (x, u), (go, gm))
    reused = sum(t.data_ptr() in ptrs for t in (out, u_mean, gx, gu))
    for name, t in (('out', out), ('u_mean', u_mean), ('grad_x', gx), ('grad_u_prev', gu)):
        assert not torch.isnan(t).any(), f'{name} has unwritten (NaN) elements'
    assert (out[:, (L // T) * T:] == 0).all() and (gx[:, (L // T) * T:] == 0).all()
    if reused == 0:
        pytest.skip('the caching allocator did not hand the poisoned blocks back')


# ------------------------------------------- the CUDA extension's operator
def _load_ext():
    """torch.ops.memba_vision (after importing the extension), or skip."""
    try:
        import memba_vision._lim_cuda  # noqa: F401  registers the ops
    except ImportError as e:
        pytest.skip(f'memba_vision._lim_cuda not built: {e}'.split('\n')[0])
    return torch.ops.memba_vision


@pytest.fixture
def ext_ops():
    """The registered ops; the extension imports without a GPU (Meta kernels run)."""
    return _load_ext()


@pytest.fixture
def cuda_ops():
    if not torch.cuda.is_available():
        pytest.skip('needs a CUDA GPU')
    return _load_ext()


def _call_op(op):
    """``op`` with the argument order of ``ops.lim`` (for run_lim / check_case)."""
    return lambda x, T, leak, threshold, u_prev=None: op(x, u_prev, T, leak, threshold)


def _is_cpp_node(node):
    return (not isinstance(node, torch.autograd.function.BackwardCFunction)
            and 'CppNode<memba_lim::LimFunction>' in node.name())


def test_op_schema(ext_ops):
    assert str(ext_ops.lim.default._schema) == (
        'memba_vision::lim(Tensor x, Tensor? u_prev, int num_chunks, float leak, '
        'float threshold) -> (Tensor, Tensor)')
    assert 'need_grad_u_prev' in str(ext_ops.lim_backward.default._schema)


def test_op_meta_shapes_and_cpp_autograd(ext_ops):
    """Meta tensors run the Meta kernels under the C++ autograd Function."""
    B, L, R, T = 2, 9, 4, 4
    x = torch.empty(B, L, R, device='meta', requires_grad=True)
    u = torch.empty(B, L // T, R, device='meta', requires_grad=True)
    out, u_mean = ext_ops.lim(x, u, T, 0.5, 1.0)
    assert out.shape == (B, L, R) and u_mean.shape == (B, L // T, R)
    assert out.grad_fn is u_mean.grad_fn and _is_cpp_node(out.grad_fn)
    gx, gu = torch.autograd.grad((out, u_mean), (x, u),
                                 (torch.empty_like(out), torch.empty_like(u_mean)))
    assert gx.shape == x.shape and gu.shape == u.shape
    out, _ = ext_ops.lim(x, u.detach(), T, 0.5, 1.0)       # only x needs a grad
    assert [f is not None for f, _ in out.grad_fn.next_functions] == [True, False]
    out, _ = ext_ops.lim(x, None, T, 0.5, 1.0)
    assert len(out.grad_fn.next_functions) == 1
    with torch.no_grad():
        assert ext_ops.lim(x, u, T, 0.5, 1.0)[0].grad_fn is None
    gx, gu = ext_ops.lim_backward(x.detach(), None, None, None, T, 0.5, 1.0, True, False)
    assert gx.shape == x.shape and gu is None


def test_op_traces_to_forward_and_backward_ops(ext_ops):
    """Fake-tensor tracing of forward + backward sees the two ops (torch.compile path)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def fwd_bwd(x, u):
        out, u_mean = ext_ops.lim(x, u, 4, 0.5, 1.0)
        return torch.autograd.grad((out, u_mean), (x, u),
                                   (torch.ones_like(out), torch.ones_like(u_mean)))

    gm = make_fx(fwd_bwd, tracing_mode='fake')(torch.randn(2, 9, 4, requires_grad=True),
                                                torch.randn(2, 2, 4, requires_grad=True))
    targets = [str(n.target) for n in gm.graph.nodes if n.op == 'call_function']
    assert 'memba_vision.lim.default' in targets
    assert 'memba_vision.lim_backward.default' in targets


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16,
                                   torch.float16])
def test_op_matches_reference(cuda_ops, dtype):
    """torch.ops.memba_vision.lim directly: vectorised (R=16) and scalar (R=3) layouts,
    one batch (T<=4), several, and several 32-chunk segments (T=33, 70)."""
    fn = _call_op(cuda_ops.lim)
    for k, (L, R, T) in enumerate(((197, 16, 4), (197, 3, 4), (64, 16, 1), (50, 16, 5),
                                   (200, 16, 8), (140, 16, 70), (99, 3, 33))):
        for with_prev in (False, True):
            check_case(2, L, R, T, dtype, 'cuda', with_prev, 0.55, seed=k, fn=fn,
                       what=f'op L={L} R={R} T={T} {dtype} prev={with_prev}')


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('used', ['out', 'u_mean'])
@pytest.mark.parametrize('T', [4, 70])
def test_op_one_output_used(cuda_ops, dtype, used, T):
    L, R = 2 * T + 1, 16
    x, u, go, gm = make_inputs(2, L, R, T, dtype, 'cuda', True, seed=T)
    go, gm = (go, None) if used == 'out' else (None, gm)
    got = run_lim(x, u, T, 0.5, 0.55, go, gm, _call_op(cuda_ops.lim))
    want = reference(x, u, T, 0.5, 0.55, go, gm)
    assert_matches(got, want, decision_margin(x, u, T, 0.5, 0.55), T, *TOL[dtype])


def test_op_grads_for_the_inputs_that_need_them(cuda_ops):
    B, L, R, T = 2, 197, 16, 4
    x, u, go, gm = make_inputs(B, L, R, T, torch.float64, 'cuda', True, seed=11)
    want = reference(x, u, T, 0.5, 0.55, go, gm)
    out, u_mean = cuda_ops.lim(x.detach(), u, T, 0.5, 0.55)   # only u_prev needs a grad
    gu, = torch.autograd.grad((out, u_mean), (u,), (go, gm))
    assert torch.allclose(gu, want[3], rtol=0, atol=1e-12)
    gx, gu = cuda_ops.lim_backward(x.detach(), u.detach(), go, gm, T, 0.5, 0.55, True, False)
    assert gu is None and torch.allclose(gx, want[2], rtol=0, atol=1e-12)
    gx, gu = cuda_ops.lim_backward(x.detach(), u.detach(), None, None, T, 0.5, 0.55, True,
                                   True)
    assert (gx == 0).all() and (gu == 0).all()                # missing grads count as zeros


def away_from_threshold(x, u_prev, T, leak, threshold, gap=0.1):
    """x (fp64) nudged so every pre-reset membrane is >= gap from the threshold."""
    x = x.detach().clone()
    B, L, R = x.shape
    l = L // T
    u = torch.zeros(B, l, R, dtype=x.dtype, device=x.device) if u_prev is None \
        else u_prev.detach()
    for i in range(T):
        xi = x[:, i * l:(i + 1) * l]
        xi += torch.where(((leak * u + xi) - threshold).abs() < gap, 2.5 * gap, 0.0)
        pre = leak * u + xi
        u = torch.where(pre > threshold, torch.zeros_like(pre), pre)
    return x


@pytest.mark.parametrize('with_prev', [False, True])
def test_op_gradcheck_fp64(cuda_ops, with_prev):
    B, L, R, T, leak, threshold = 2, 27, 8, 4, 0.5, 0.5     # l*R = 48: the vectorised path
    g = torch.Generator().manual_seed(5)
    u = torch.randn(B, L // T, R, generator=g, dtype=torch.float64).cuda() if with_prev \
        else None
    x = away_from_threshold(torch.randn(B, L, R, generator=g, dtype=torch.float64).cuda(),
                            u, T, leak, threshold)
    assert decision_margin(x, u, T, leak, threshold).min() >= 0.1
    inputs = (x.requires_grad_(),) + ((u.requires_grad_(),) if with_prev else ())

    def through_op(x, u=None):
        return cuda_ops.lim(x, u, T, leak, threshold)

    assert torch.autograd.gradcheck(through_op, inputs)
    fired = (through_op(*inputs)[0][:, :T * (L // T)] == 0).float().mean().item()
    assert 0.05 < fired < 0.95, 'the check should cover resets and pass-throughs'


def test_cuda_backend_backward_runs_no_python(cuda_ops, monkeypatch):
    """ops.lim on the cuda backend builds the C++ autograd node, not a Python Function."""
    monkeypatch.delenv(ENV, raising=False)
    if ops.lim_backend(torch.empty(1, device='cuda')) != 'cuda':
        pytest.skip('LIM backend cuda unavailable')
    x, u, go, gm = make_inputs(2, 197, 16, 4, torch.float32, 'cuda', True, seed=12)
    out, u_mean = ops.lim(x, 4, 0.5, 0.55, u)
    assert out.grad_fn is u_mean.grad_fn and _is_cpp_node(out.grad_fn)
    out, u_mean = ops.lim(x, 4, 0.5, 0.55, None)
    assert _is_cpp_node(out.grad_fn)
    x64 = away_from_threshold(x.double(), None, 4, 0.5, 0.55)[:, :, :4].contiguous()
    assert torch.autograd.gradcheck(lambda a: ops.lim(a, 4, 0.5, 0.55),
                                    (x64.requires_grad_(),))


def test_op_opcheck(cuda_ops):
    """Schema, autograd registration, fake tensors and AOT dispatch (torch.compile)."""
    x = torch.randn(2, 9, 4, device='cuda', dtype=torch.float64, requires_grad=True)
    u = torch.randn(2, 2, 4, device='cuda', dtype=torch.float64, requires_grad=True)
    for args in ((x, u, 4, 0.5, 0.55), (x, None, 4, 0.5, 0.55)):
        torch.library.opcheck(cuda_ops.lim.default, args)
    torch.library.opcheck(cuda_ops.lim_backward.default,
                          (x.detach(), u.detach(), torch.randn_like(x), None, 4, 0.5, 0.55,
                           True, True))
