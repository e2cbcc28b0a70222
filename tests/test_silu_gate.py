"""ops.silu_gate (VMamba's output gate with Memba's correction) against the plain expression:
the same values and gradients, with less kept for the backward; and ``silu_gate_lim``'s fused
node (both directions' LIMs inside) against its per-op path."""
import pytest
import torch

from conftest import requires_cuda
from memba_vision.ops import MembaGateParams, silu_gate, silu_gate_reference
from memba_vision.ops.silu_gate import (silu_gate_lim_backend, silu_gate_lim_fused,
                                        silu_gate_lim_per_op)
from scan_ext_reference import ReferenceScanKernels


def inputs(dtype=torch.float64, z_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    return dict(y=rnd(2, 9, 12).to(dtype), z=rnd(2, 9, 12).to(z_dtype or dtype),
                spikes=(rnd(2, 9, 6) > 0.3).to(z_dtype or dtype), weight=rnd(12, 6))


def grads(fn, inp, keys, residual):
    leaves = {k: v.detach().clone().requires_grad_(k in keys) for k, v in inp.items()}
    spikes = leaves['spikes'] if 'spikes' in keys or 'weight' in keys else None
    out = fn(leaves['y'], leaves['z'], spikes, leaves['weight'] if spikes is not None else None,
             residual)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                      dtype=torch.float64).to(out.dtype)
    got = torch.autograd.grad(out, [leaves[k] for k in keys], cot)
    return out.detach(), dict(zip(keys, got))


@pytest.mark.parametrize('keys,residual', [
    (('y', 'z', 'spikes', 'weight'), True), (('y', 'spikes', 'weight'), False),
    (('y', 'z'), True), (('y', 'weight'), True)])
def test_node_equals_the_plain_expression(keys, residual):
    inp = inputs()
    out, g = grads(silu_gate, inp, keys, residual)
    out_ref, g_ref = grads(silu_gate_reference, inp, keys, residual)
    assert torch.allclose(out, out_ref, rtol=0, atol=1e-14)
    for k in keys:
        assert g[k] is not None and g[k].abs().max() > 0, k
        assert torch.allclose(g[k], g_ref[k], rtol=1e-12, atol=1e-12), k


def test_half_precision_gate_on_an_fp32_norm_output():
    """As in VMamba under autocast: y fp32 (the LayerNorm), z and the spikes bf16; z' and
    silu(z') in bf16, the product and y's gradient fp32, z's gradient bf16."""
    inp = inputs(torch.float32, torch.bfloat16)
    keys = ('y', 'z', 'spikes', 'weight')
    out, g = grads(silu_gate, inp, keys, True)
    out_ref, g_ref = grads(silu_gate_reference, inp, keys, True)
    assert out.dtype == torch.float32 and torch.equal(out, out_ref)
    assert g['y'].dtype == torch.float32 and g['z'].dtype == torch.bfloat16
    assert g['weight'].dtype == torch.float64
    for k in keys:
        err = ((g[k].double() - g_ref[k].double()).norm() / g_ref[k].double().norm()).item()
        assert err < 1e-2, (k, err)


def new_saved_bytes(fn, inp):
    """Bytes of the tensors autograd keeps for fn's backward that are not fn's inputs (the
    inputs are kept alive by the rest of the model anyway)."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    leaves = {k: v.detach().clone().requires_grad_(k != 'spikes') for k, v in inp.items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(leaves['y'], leaves['z'], leaves['spikes'], leaves['weight'], True)
    for t in leaves.values():
        kept.pop(t.untyped_storage().data_ptr(), None)
    return sum(kept.values())


def test_node_keeps_no_gate_input_or_activation_for_the_backward():
    inp = inputs(torch.float32, torch.bfloat16)
    inp['weight'] = inp['weight'].float()
    # the plain graph keeps z' and silu(z') (each of z's size) and a cast of the weight
    assert new_saved_bytes(silu_gate_reference, inp) >= 2 * inp['z'].nbytes
    assert new_saved_bytes(silu_gate, inp) == 0


def test_residual_false_needs_spikes():
    inp = inputs()
    with pytest.raises(ValueError, match='residual=False needs spikes'):
        silu_gate(inp['y'], inp['z'], residual=False)


def lim_inputs(B=2, L=11, D=12, R=3, T=3, membrane=True, dtype=torch.float64, device='cpu',
               seed=0):
    """y, z, W_in (2R, D), W_out (D, 2R) and the membranes (L = 11, T = 3: a trimmed tail);
    scaled so that some membranes fire and some do not."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)
    prev = (rnd(B, L // T, R), rnd(B, L // T, R)) if membrane else None
    return dict(y=rnd(B, L, D), z=rnd(B, L, D), w_in=rnd(2 * R, D, scale=0.6),
                w_out=rnd(D, 2 * R), membrane=prev)


def lim_grads(fn, inp, gate, only_membranes=False, **kw):
    """fn's output, membranes and the gradients of every input (the membranes reach the loss;
    with ``only_membranes`` the product does not)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items() if k != 'membrane'}
    prev = None if inp['membrane'] is None else \
        tuple(m.detach().clone().requires_grad_() for m in inp['membrane'])
    out, mem = fn(leaves['y'], leaves['z'], leaves['w_in'], leaves['w_out'], gate, prev, **kw)
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
    """fp64 on the CPU, the extension's LIM pair replaced by its PyTorch stand-in."""
    gate = MembaGateParams(3, 0.5, 1.0, residual)
    inp = lim_inputs(membrane=membrane)
    got, g_got = lim_grads(silu_gate_lim_fused, inp, gate, kernels=ReferenceScanKernels)
    want, g_want = lim_grads(silu_gate_lim_per_op, inp, gate)
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
    _, g_got = lim_grads(silu_gate_lim_fused, inp, gate, True, kernels=ReferenceScanKernels)
    _, g_want = lim_grads(silu_gate_lim_per_op, inp, gate, True)
    assert g_want['z'].abs().max() > 0 and g_want['y'].abs().max() == 0
    for k in g_want:
        assert torch.allclose(g_got[k], g_want[k], rtol=1e-10, atol=1e-12), k


def test_memba_gate_runs_per_op_where_the_lim_pair_cannot():
    z = torch.zeros(2, 80, 4)
    assert silu_gate_lim_backend(z, MembaGateParams(64, 0.5, 1.0, True),
                                 ReferenceScanKernels) == 'fused'
    assert silu_gate_lim_backend(z, MembaGateParams(65, 0.5, 1.0, True),
                                 ReferenceScanKernels) == 'per-op'
    assert silu_gate_lim_backend(z, MembaGateParams(3, 0.5, 1.0, True)) == 'per-op'  # CPU


@requires_cuda
@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_memba_gate_on_gpu(dtype, tol):
    """The CUDA node against an fp64 CPU run of the per-op path; each result within ``tol``
    relative to its norm, and bf16 no further than the per-op path in bf16 on the GPU is."""
    gate = MembaGateParams(3, 0.5, 1.0, True)
    ref, g_ref = lim_grads(silu_gate_lim_per_op, lim_inputs(B=4, L=50, D=64, R=16), gate)
    inp = lim_inputs(B=4, L=50, D=64, R=16, dtype=dtype, device='cuda')
    got, g_got = lim_grads(silu_gate_lim_fused, inp, gate)
    per_op, g_per_op = lim_grads(silu_gate_lim_per_op, inp, gate)

    def rel(a, b):
        return ((a.double().cpu() - b).norm() / b.norm()).item()
    for k, (a, b, c) in enumerate(zip(got, per_op, ref)):
        print(f'GATE {dtype} output {k}: fused {rel(a, c):.2e}, per-op {rel(b, c):.2e}')
        assert rel(a, c) < max(tol, 2 * rel(b, c)), k
    for k in g_ref:
        print(f'GATE {dtype} d{k}: fused {rel(g_got[k], g_ref[k]):.2e}, '
              f'per-op {rel(g_per_op[k], g_ref[k]):.2e}')
        assert rel(g_got[k], g_ref[k]) < max(tol, 2 * rel(g_per_op[k], g_ref[k])), k
