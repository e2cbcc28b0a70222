"""ops.silu_gate (VMamba's output gate with Memba's correction) against the plain expression:
the same values and gradients, with less kept for the backward."""
import pytest
import torch

from memba_vision.ops import silu_gate, silu_gate_reference


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
