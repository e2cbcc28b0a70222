"""The Triton selective scan (frozen A, D, delta_bias) against the fp64 PyTorch reference.

Outputs and the gradients of u, delta, B, C and z are compared with autograd
through ``selective_scan_reference`` on the same values in fp64. On CPU the
kernels run through Triton's interpreter in a subprocess (TRITON_INTERPRET=1
must be set before triton is imported); on a GPU they run compiled, at the
shapes of Vim-S and of VMamba's first stage (several chunks, 4 groups).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from memba_vision.ops import scan_backend, selective_scan, selective_scan_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
TOL = {torch.float32: 2e-4, torch.bfloat16: 2e-2}


def make_inputs(b, d, n, l, groups, with_z, with_bias, dtype, device, seed=0,
                transposed=False):
    """Scan inputs; ``transposed`` gives delta and z as (b, l, d) memory, B/C as (b, l, n)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dtype)

    u = rnd(b, d, l)
    if transposed:
        delta = rnd(b, l, d, scale=0.5, shift=-1.0).transpose(1, 2)
        z = rnd(b, l, d).transpose(1, 2) if with_z else None
        B, C = rnd(b, l, n).transpose(1, 2), rnd(b, l, n).transpose(1, 2)
    else:
        delta = rnd(b, d, l, scale=0.5, shift=-1.0)
        z = rnd(b, d, l) if with_z else None
        shape = (b, n, l) if groups == 0 else (b, groups, n, l)
        B, C = rnd(*shape), rnd(*shape)
    A = -torch.rand(d, n, generator=g).to(device) * 3 - 0.05
    D = torch.randn(d, generator=g).to(device)
    bias = (torch.randn(d, generator=g) * 0.3).to(device) if with_bias else None
    return u, delta, A, B, C, D, z, bias


def run(fn, inputs, grad_out, double=False):
    u, delta, A, B, C, D, z, bias = inputs
    conv = (lambda t: None if t is None else t.detach().double().requires_grad_()) if double \
        else (lambda t: None if t is None else t.detach().requires_grad_())
    leaves = [conv(t) for t in (u, delta, B, C, z)]
    u_, delta_, B_, C_, z_ = leaves
    frozen = [None if t is None else (t.double() if double else t) for t in (A, D, bias)]
    y = fn(u_, delta_, frozen[0], B_, C_, frozen[1], z_, frozen[2], True)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, wanted, grad_out.to(y.dtype))
    return y, grads


def check(fn, b, d, n, l, groups, with_z, with_bias, dtype, device, seed=0, transposed=False):
    inputs = make_inputs(b, d, n, l, groups, with_z, with_bias, dtype, device, seed, transposed)
    grad_out = torch.randn(b, d, l, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    y, grads = run(fn, inputs, grad_out.to(dtype))
    y_ref, grads_ref = run(selective_scan_reference, inputs, grad_out.to(dtype), double=True)
    names = ['out', 'du', 'ddelta', 'dB', 'dC', 'dz'][:len(grads) + 1]
    for name, got, want in zip(names, (y, *grads), (y_ref, *grads_ref)):
        assert got.dtype == dtype, name
        assert got.shape == want.shape, name
        err = (got.double() - want).abs().max().item() / want.abs().max().item()
        assert err < TOL[dtype], f'{name}: relative error {err:.2e} at {(b, d, n, l, groups)}'


_INTERPRETER_SCRIPT = textwrap.dedent('''
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    import test_selective_scan_triton as t
    from memba_vision.ops.selective_scan_triton import selective_scan_triton as fn
    cases = [
        (2, 8, 4, 7, 0, True, True),      # one short chunk, gate and bias
        (2, 8, 4, 37, 2, False, True),    # 2 groups, no gate
        (1, 4, 8, 300, 0, True, False),   # two chunks: carried state and adjoint
        (1, 2, 4, 520, 1, True, True),    # three chunks, a ragged last one
    ]
    for i, c in enumerate(cases):
        t.check(fn, *c, torch.float32, 'cpu', seed=i)
    t.check(fn, 2, 4, 4, 9, 0, True, True, torch.float32, 'cpu', seed=7, transposed=True)
    print(json.dumps({{"cases": len(cases) + 1}}))
''')


def _interpreter_blocker():
    from test_lim_backends import _interpreter_blocker as blocker
    return blocker()


@pytest.mark.skipif(bool(_interpreter_blocker()), reason=_interpreter_blocker() or 'n/a')
def test_triton_scan_in_interpreter():
    pytest.importorskip('triton')
    env = dict(os.environ, TRITON_INTERPRET='1',
               PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    env.pop('MEMBA_SCAN_BACKEND', None)
    script = _INTERPRETER_SCRIPT.format(tests=os.path.join(ROOT, 'tests'))
    res = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])['cases'] == 5


def test_scan_backend_choice_on_cpu(monkeypatch):
    u = torch.zeros(1, 2, 3)
    monkeypatch.delenv('MEMBA_SCAN_BACKEND', raising=False)
    assert scan_backend(u) == 'torch'
    monkeypatch.setenv('MEMBA_SCAN_BACKEND', 'triton')
    with pytest.raises(RuntimeError, match='needs CUDA tensors'):
        scan_backend(u)
    monkeypatch.setenv('MEMBA_SCAN_BACKEND', 'fast')
    with pytest.raises(ValueError, match='triton, cuda or torch'):
        scan_backend(u)


# ------------------------------------------------------------------ GPU tests
def _triton_fn():
    from memba_vision.ops.selective_scan_triton import selective_scan_triton
    return selective_scan_triton


@needs_gpu
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_vim_s_shape(dtype):
    check(_triton_fn(), 4, 768, 16, 197, 0, True, True, dtype, 'cuda', transposed=True)


@needs_gpu
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_vmamba_first_stage_shape(dtype):
    # SS2D: 4 directions x 192 channels, B/C per direction, 56 x 56 tokens (13 chunks)
    check(_triton_fn(), 2, 768, 16, 3136, 4, True, True, dtype, 'cuda')


@needs_gpu
@pytest.mark.parametrize('case', [(3, 10, 8, 1, 0, False, False), (2, 6, 4, 256, 3, True, False),
                                  (2, 6, 2, 257, 0, True, True), (1, 12, 16, 1000, 2, False, True)])
def test_odd_sizes(case):
    check(_triton_fn(), *case, torch.float32, 'cuda')


@needs_gpu
def test_dispatch_serves_trainable_parameters_elsewhere(monkeypatch):
    monkeypatch.delenv('MEMBA_SCAN_BACKEND', raising=False)
    u, delta, A, B, C, D, z, bias = make_inputs(2, 8, 4, 9, 0, True, True, torch.float32, 'cuda')
    assert scan_backend(u, frozen=True) in ('cuda', 'triton')  # mamba-ssm first where installed
    assert scan_backend(u, frozen=False) in ('cuda', 'torch')
    A_trainable = A.clone().requires_grad_()
    y = selective_scan(u, delta, A_trainable, B, C, D, z, bias, True)  # mamba-ssm or reference
    y.sum().backward()
    assert A_trainable.grad is not None
    monkeypatch.setenv('MEMBA_SCAN_BACKEND', 'triton')
    with pytest.raises(RuntimeError, match='requires a gradient'):
        selective_scan(u, delta, A_trainable, B, C, D, z, bias, True)
    with torch.no_grad():  # no gradient wanted: the Triton kernel serves it
        y_fast = selective_scan(u, delta, A_trainable, B, C, D, z, bias, True)
    torch.testing.assert_close(y_fast, y.detach(), rtol=1e-4, atol=1e-4)
