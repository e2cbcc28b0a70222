"""ops.silu_gate, VMamba's output gate: ``silu_gate`` against the plain expression (same values
and gradients, less kept for the backward); ``norm_silu_gate``'s and ``memba_norm_silu_gate``'s
fused nodes against their per-op paths (on the CPU with the extension's PyTorch stand-in, on a
GPU with the kernels against an fp64 run)."""
import pytest
import torch

from conftest import requires_cuda
from memba_vision.ops import MembaGateParams, silu_gate, silu_gate_reference
from memba_vision.ops.silu_gate import (memba_norm_silu_gate_backend,
                                        memba_norm_silu_gate_fused, memba_norm_silu_gate_per_op,
                                        norm_silu_gate, norm_silu_gate_backend,
                                        norm_silu_gate_fused, norm_silu_gate_per_op)
from scan_ext_reference import ReferenceScanKernels


def rnd(g, *shape, scale=1.0, dtype=torch.float64, device='cpu'):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)


def gate_grads(fn, y, z, cot_seed=1):
    y, z = (t.detach().clone().requires_grad_() for t in (y, z))
    out = fn(y, z)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(cot_seed),
                      dtype=torch.float64).to(out)
    return (out.detach(), *torch.autograd.grad(out, [y, z], cot))


def test_silu_gate_equals_the_plain_expression():
    g = torch.Generator().manual_seed(0)
    y, z = rnd(g, 2, 9, 12), rnd(g, 2, 9, 12)
    got, want = gate_grads(silu_gate, y, z), gate_grads(silu_gate_reference, y, z)
    assert torch.allclose(got[0], want[0], rtol=0, atol=1e-14)
    for a, b in zip(got[1:], want[1:]):
        assert a.abs().max() > 0 and torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_silu_gate_on_an_fp32_norm_output_and_a_bf16_gate():
    """As in VMamba under autocast: y fp32 (the LayerNorm), z bf16; the product and y's
    gradient fp32, z's gradient bf16."""
    g = torch.Generator().manual_seed(0)
    y, z = rnd(g, 2, 9, 12, dtype=torch.float32), rnd(g, 2, 9, 12, dtype=torch.bfloat16)
    (out, dy, dz), (out_ref, dy_ref, dz_ref) = (gate_grads(f, y, z) for f in
                                                (silu_gate, silu_gate_reference))
    assert out.dtype == dy.dtype == torch.float32 and dz.dtype == torch.bfloat16
    assert torch.equal(out, out_ref)
    for a, b in ((dy, dy_ref), (dz, dz_ref)):
        assert ((a.double() - b.double()).norm() / b.double().norm()).item() < 1e-2


def new_saved_bytes(fn, *inputs):
    """Bytes of the tensors autograd keeps for fn's backward that are not fn's inputs (the
    inputs are kept alive by the rest of the model anyway)."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*leaves)
    for t in leaves:
        kept.pop(t.untyped_storage().data_ptr(), None)
    return sum(kept.values())


def test_silu_gate_keeps_no_activation_for_the_backward():
    g = torch.Generator().manual_seed(0)
    y, z = rnd(g, 2, 9, 12, dtype=torch.float32), rnd(g, 2, 9, 12, dtype=torch.bfloat16)
    assert new_saved_bytes(silu_gate_reference, y, z) >= z.nbytes  # silu(z)
    assert new_saved_bytes(silu_gate, y, z) == 0


def norm_inputs(B=2, L=9, D=12, dtype=torch.float64, z_dtype=None, device='cpu', seed=0):
    """y (B, L, D) with an offset and a scale per token (as the merged scans have), z the
    z half of a (B, L, 2D) tensor (as in_proj's output is), the norm's weight and bias."""
    g = torch.Generator().manual_seed(seed)
    y = rnd(g, B, L, D) * rnd(g, B, L, 1).exp() + rnd(g, B, L, 1, scale=3.0)
    z = rnd(g, B, L, 2 * D, scale=2.0)[..., D:]
    kw = dict(device=device)
    return (y.to(dtype=dtype, **kw), z.to(dtype=z_dtype or dtype, **kw),
            (1 + rnd(g, D, scale=0.3)).to(dtype=dtype, **kw), rnd(g, D).to(dtype=dtype, **kw))


def norm_fn(fn, weight, bias, **kw):
    return lambda y, z: fn(y, z, weight, bias, 1e-5, **kw)


def test_fused_norm_gate_equals_the_per_op_path():
    """fp64 on the CPU, the extension's kernels replaced by their PyTorch stand-in; z is the
    strided half of a wider tensor."""
    y, z, w, b = norm_inputs()
    assert not z.is_contiguous()
    got = gate_grads(norm_fn(norm_silu_gate_fused, w, b, kernels=ReferenceScanKernels), y, z)
    want = gate_grads(norm_fn(norm_silu_gate_per_op, w, b), y, z)
    assert torch.allclose(got[0], want[0], rtol=1e-12, atol=1e-12)
    for a, b_ in zip(got[1:], want[1:]):
        assert b_.abs().max() > 0 and torch.allclose(a, b_, rtol=1e-10, atol=1e-12)


def test_norm_gate_runs_per_op_where_the_kernels_cannot():
    y, z, w, b = norm_inputs(D=12)
    ref = ReferenceScanKernels
    assert norm_silu_gate_backend(y, z, w, b, ref) == 'fused'
    assert norm_silu_gate_backend(y, z, w, b) == 'per-op'  # CPU
    y6, z6, w6, b6 = norm_inputs(D=6)
    assert norm_silu_gate_backend(y6, z6, w6, b6, ref) == 'per-op'  # 6 % 4
    y_big, z_big, w_big, b_big = norm_inputs(B=1, L=1, D=2052)
    assert norm_silu_gate_backend(y_big, z_big, w_big, b_big, ref) == 'per-op'
    assert norm_silu_gate_backend(y, z[:, :, 1:-3], w[1:-3], b[1:-3], ref) == 'per-op'
    assert norm_silu_gate_backend(y, z, w.clone().requires_grad_(), b, ref) == 'per-op'


def test_fused_norm_gate_keeps_two_numbers_per_token_for_the_backward():
    """Beyond its inputs (y is the merged scan, z a half of in_proj's output: both live on
    anyway) and the norm's weight and bias: the mean and 1 / std of each token."""
    y, z, w, b = norm_inputs(B=2, L=9, D=12)
    kept = new_saved_bytes(lambda y, z: norm_silu_gate_fused(y, z, w, b, 1e-5,
                                                             kernels=ReferenceScanKernels), y, z)
    assert kept == 8 * (2 * 2 * 9) + 8 * 2 * 12


@requires_cuda
@pytest.mark.parametrize('D', [12, 192, 768, 1536, 2048])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_fused_norm_gate_on_gpu(D, dtype):
    """The CUDA kernels against an fp64 CPU run of the per-op path, each result within 1e-5
    (fp32) relative to its norm; bf16 no further than 2x the per-op path in bf16 on the GPU
    (z and the product in bf16, y fp32 as under autocast)."""
    y, z, w, b = norm_inputs(B=3, L=37, D=D)
    want = gate_grads(norm_fn(norm_silu_gate_per_op, w, b), y, z)
    inp = norm_inputs(B=3, L=37, D=D, dtype=torch.float32, z_dtype=dtype, device='cuda')
    got = gate_grads(norm_fn(norm_silu_gate, inp[2], inp[3]), inp[0], inp[1])
    per_op = gate_grads(norm_fn(norm_silu_gate_per_op, inp[2], inp[3]), inp[0], inp[1])
    assert got[0].dtype == dtype and got[1].dtype == torch.float32 and got[2].dtype == dtype

    def rel(a, b):
        return ((a.double().cpu() - b).norm() / b.norm()).item()
    for name, a, p, c in zip(('out', 'dy', 'dz'), got, per_op, want):
        print(f'NORMGATE {dtype} D {D} {name}: fused {rel(a, c):.2e}, per-op {rel(p, c):.2e}')
        assert rel(a, c) < (1e-5 if dtype == torch.float32 else 2 * rel(p, c) + 1e-6), name


def lim_inputs(B=2, L=11, D=12, R=3, T=3, membrane=True, dtype=torch.float64, device='cpu',
               seed=0):
    """y, z (the strided half of a wider tensor), the norm, W_in (2R, D), W_out (D, 2R) and
    the membranes (L = 11, T = 3: a trimmed tail); scaled so that some membranes fire and
    some do not. y is fp32 when the rest is half precision (as under autocast)."""
    y, z, w, b = norm_inputs(B, L, D, torch.promote_types(dtype, torch.float32), dtype, device,
                             seed)
    g = torch.Generator().manual_seed(seed + 1)

    def r(*shape, scale=1.0):
        return rnd(g, *shape, scale=scale, dtype=dtype, device=device)
    prev = (r(B, L // T, R), r(B, L // T, R)) if membrane else None
    return dict(y=y, z=z, w_in=r(2 * R, D, scale=0.6), w_out=r(D, 2 * R), norm=(w, b),
                membrane=prev)


def lim_grads(fn, inp, gate, only_membranes=False, **kw):
    """fn's output, membranes and the gradients of every input but the (frozen) norm (the
    membranes reach the loss; with ``only_membranes`` the output does not)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items()
              if k not in ('membrane', 'norm')}
    prev = None if inp['membrane'] is None else \
        tuple(m.detach().clone().requires_grad_() for m in inp['membrane'])
    out, mem = fn(leaves['y'], leaves['z'], *inp['norm'], 1e-5, leaves['w_in'], leaves['w_out'],
                  gate, prev, **kw)
    g = torch.Generator().manual_seed(1)
    cot = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t) for t in (out, *mem)]
    loss = sum((t * c).sum() for t, c in zip((out, *mem), cot) if t is not out or
               not only_membranes)
    keys = list(leaves) + ([] if prev is None else ['u_prev_f', 'u_prev_b'])
    grads = torch.autograd.grad(loss, list(leaves.values()) + list(prev or ()),
                                allow_unused=True, materialize_grads=True)
    return [out.detach(), *(m.detach() for m in mem)], dict(zip(keys, grads))


@pytest.mark.parametrize('residual', [True, False])
@pytest.mark.parametrize('membrane', [True, False])
def test_fused_memba_gate_equals_the_per_op_path(residual, membrane):
    """fp64 on the CPU, the extension's LIM pair and norm gate replaced by their PyTorch
    stand-in."""
    gate = MembaGateParams(3, 0.5, 1.0, residual)
    inp = lim_inputs(membrane=membrane)
    got, g_got = lim_grads(memba_norm_silu_gate_fused, inp, gate, kernels=ReferenceScanKernels)
    want, g_want = lim_grads(memba_norm_silu_gate_per_op, inp, gate)
    fired = (torch.stack(want[1:]) == 0).float().mean()  # u_mean: zero where every chunk fired
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert set(g_got) == set(g_want)
    for k in g_want:
        assert g_want[k].abs().max() > 0, k
        assert torch.allclose(g_got[k], g_want[k], rtol=1e-10, atol=1e-12), k
    assert fired < 1


def test_fused_memba_gate_when_only_the_membranes_reach_the_loss():
    gate = MembaGateParams(3, 0.5, 1.0, True)
    inp = lim_inputs()
    _, g_got = lim_grads(memba_norm_silu_gate_fused, inp, gate, True,
                         kernels=ReferenceScanKernels)
    _, g_want = lim_grads(memba_norm_silu_gate_per_op, inp, gate, True)
    assert g_want['z'].abs().max() > 0 and g_want['y'].abs().max() == 0
    for k in g_want:
        assert torch.allclose(g_got[k], g_want[k], rtol=1e-10, atol=1e-12), k


def test_memba_gate_runs_per_op_where_the_kernels_cannot():
    y, z, w, b = norm_inputs(B=2, L=80, D=4)
    ref = ReferenceScanKernels

    def backend(chunks, kernels=ref, **kw):
        args = dict(dict(y=y, z=z, weight=w, bias=b), **kw)
        return memba_norm_silu_gate_backend(gate=MembaGateParams(chunks, 0.5, 1.0, True),
                                            kernels=kernels, **args)
    assert backend(64) == 'fused'
    assert backend(65) == 'per-op'
    assert backend(3, kernels=None) == 'per-op'  # CPU
    assert backend(3, weight=w.clone().requires_grad_()) == 'per-op'


def test_fused_memba_gate_keeps_no_gate_input_for_the_backward():
    """z' (the size of z) is recomputed in the backward, not kept: what the node keeps
    beyond its inputs is the LIM input, the spikes, the weights in z's dtype and the norm's
    two numbers per token."""
    inp = lim_inputs(B=2, L=12, D=64, R=3, T=3)
    gate = MembaGateParams(3, 0.5, 1.0, True)
    B, L, D, R2 = 2, 12, 64, 6
    kept = new_saved_bytes(
        lambda y, z, w_in, w_out: memba_norm_silu_gate_fused(
            y, z, *inp['norm'], 1e-5, w_in, w_out, gate, kernels=ReferenceScanKernels)[0],
        inp['y'], inp['z'], inp['w_in'], inp['w_out'])
    small = 8 * (2 * B * L * R2 + 2 * R2 * D + 2 * B * L) + 8 * 2 * D  # v, S, weights, stats
    assert kept <= small < B * L * D * 8
    assert kept >= 8 * 2 * B * L * R2  # v and S at least: the count sees what is kept


@requires_cuda
@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize('residual', [True, False])
def test_fused_memba_gate_on_gpu(dtype, tol, residual):
    """The CUDA node against an fp64 CPU run of the per-op path; each result within ``tol``
    relative to its norm, and bf16 no further than the per-op path in bf16 on the GPU is.
    z' = z + c is added in the kernels (residual) or is c alone."""
    gate = MembaGateParams(3, 0.5, 1.0, residual)
    ref, g_ref = lim_grads(memba_norm_silu_gate_per_op, lim_inputs(B=4, L=50, D=64, R=16), gate)
    inp = lim_inputs(B=4, L=50, D=64, R=16, dtype=dtype, device='cuda')
    got, g_got = lim_grads(memba_norm_silu_gate_fused, inp, gate)
    per_op, g_per_op = lim_grads(memba_norm_silu_gate_per_op, inp, gate)

    def rel(a, b):
        return ((a.double().cpu() - b).norm() / b.norm()).item()
    for k, (a, b, c) in enumerate(zip(got, per_op, ref)):
        print(f'GATE {dtype} output {k}: fused {rel(a, c):.2e}, per-op {rel(b, c):.2e}')
        assert rel(a, c) < max(tol, 2 * rel(b, c)), k
    for k in g_ref:
        print(f'GATE {dtype} d{k}: fused {rel(g_got[k], g_ref[k]):.2e}, '
              f'per-op {rel(g_per_op[k], g_ref[k]):.2e}')
        assert rel(g_got[k], g_ref[k]) < max(tol, 2 * rel(g_per_op[k], g_ref[k])), k
