"""LoRALinear and MembraneGate against hand-written formulas."""
import pytest
import torch
import torch.nn as nn

from memba_vision.models.peft import LoRALinear, MembraneGate, parse_peft
from memba_vision.ops import lim_reference


def test_lora_starts_as_the_frozen_layer_and_follows_the_formula():
    base = nn.Linear(12, 20)
    layer = LoRALinear(base, rank=4, scale=0.1, dropout=0.1)
    x = torch.randn(3, 5, 12)
    assert torch.equal(layer(x), base(x))  # B is zero-initialised
    assert not base.weight.requires_grad and layer.lora_up.weight.requires_grad
    nn.init.normal_(layer.lora_up.weight)
    layer.eval()
    A, B = layer.lora_down.weight, layer.lora_up.weight
    expected = x @ base.weight.T + base.bias + 0.1 * (x @ A.T) @ B.T
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert torch.allclose(layer.merged()(x), expected, atol=1e-5)


@pytest.mark.parametrize('rows', [None, (5, 17)])
def test_lora_gradients_follow_the_formula(rows):
    """x's and both projections' gradients (the update is added to the base output in place)
    equal autograd's through the plain formula, fp64; on all outputs or on a row range."""
    base = nn.Linear(12, 20).double()
    layer = LoRALinear(base, rank=4, scale=0.1, dropout=0.1, rows=rows).double().eval()
    nn.init.normal_(layer.lora_up.weight)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    A, B = layer.lora_down.weight, layer.lora_up.weight
    start, stop = rows or (0, 20)
    update = torch.zeros(3, 5, 20, dtype=torch.float64)
    update[..., start:stop] = 0.1 * (x @ A.T) @ B.T
    expected = x @ base.weight.T + base.bias + update
    cot = torch.randn(3, 5, 20, dtype=torch.float64)
    got = torch.autograd.grad(layer(x), [x, A, B], cot)
    want = torch.autograd.grad(expected, [x, A, B], cot)
    for g, w in zip(got, want):
        assert w.abs().max() > 0 and torch.allclose(g, w, rtol=1e-12, atol=1e-12)


def test_lora_dropout_acts_on_the_rank_r_activations():
    layer = LoRALinear(nn.Linear(8, 6), rank=3, scale=0.5, dropout=0.5).train()
    nn.init.normal_(layer.lora_up.weight)
    x = torch.randn(4, 8)
    torch.manual_seed(11)
    got = layer(x)
    torch.manual_seed(11)
    a = torch.nn.functional.dropout(x @ layer.lora_down.weight.T, 0.5, training=True)
    expected = layer.original_layer(x) + 0.5 * a @ layer.lora_up.weight.T
    assert torch.allclose(got, expected, atol=1e-6)


def test_lora_loads_a_plain_linear_state_dict_and_rejects_bad_ranks():
    plain = nn.Linear(8, 6)
    layer = LoRALinear(nn.Linear(8, 6), rank=2)
    missing, unexpected = layer.load_state_dict(plain.state_dict(), strict=False)
    assert torch.equal(layer.weight, plain.weight) and not unexpected
    assert set(missing) == {'lora_down.weight', 'lora_up.weight'}
    # a rank above min(in, out) is allowed (MambaPEFT's r=64 on x_proj's 56 outputs)
    assert LoRALinear(nn.Linear(8, 6), rank=8).rank == 8
    with pytest.raises(ValueError, match=r'rank must be an integer in \[1, 8\]'):
        LoRALinear(nn.Linear(8, 6), rank=9)


def gate_with_random_out(**kw):
    gate = MembraneGate(10, rank=4, **kw)
    for p in gate.proj_out:
        nn.init.normal_(p.weight)
    return gate


def test_gate_is_identity_at_init_and_literal_form_is_zero():
    z = torch.randn(2, 9, 10)
    (zf, zb), mem = MembraneGate(10, rank=4)(z)
    assert torch.equal(zf, z) and torch.equal(zb, z)  # both in input token order
    (lf, lb), _ = MembraneGate(10, rank=4, residual=False)(z)
    assert torch.equal(lf, torch.zeros_like(z)) and torch.equal(lb, torch.zeros_like(z))
    assert mem[0].shape == (2, 9 // 4, 4)


@pytest.mark.parametrize('shared', [True, False])
def test_gate_backward_direction_sees_reversed_tokens(shared):
    gate = gate_with_random_out(shared_proj=shared, num_chunks=3, leak=0.5, threshold=0.7)
    z = torch.randn(2, 12, 10)
    u_prev = (torch.randn(2, 4, 4), torch.randn(2, 4, 4))
    (zf, zb), (uf, ub) = gate(z, u_prev)
    k = 0 if shared else 1
    zr = z.flip(1)
    spikes_b, ub_ref = lim_reference(gate.proj_in[k](zr), 3, 0.5, 0.7, u_prev[1])
    # z' of the reversed direction comes back in input token order
    assert torch.allclose(zb, (zr + gate.proj_out[k](spikes_b)).flip(1), atol=1e-6)
    assert torch.allclose(ub, ub_ref)
    spikes_f, uf_ref = lim_reference(gate.proj_in[0](z), 3, 0.5, 0.7, u_prev[0])
    assert torch.allclose(zf, z + gate.proj_out[0](spikes_f), atol=1e-6)
    # the reversed order matters: the forward-order answer differs
    spikes_wrong, _ = lim_reference(gate.proj_in[k](z), 3, 0.5, 0.7, u_prev[1])
    assert not torch.allclose(zb, z + gate.proj_out[k](spikes_wrong), atol=1e-3)
    # the low-rank form hands the same correction to a fused scan
    pairs, _ = gate.lim_spikes(z, u_prev)
    for (spikes, weight), gated in zip(pairs, (zf, zb)):
        assert weight.shape == (10, 4) and spikes.shape == (2, 12, 4)
        assert torch.allclose(z + spikes @ weight.t(), gated, atol=1e-6)


def test_gate_transfer_flag():
    z = torch.randn(1, 8, 10)
    mem = (torch.full((1, 2, 4), 0.9), torch.full((1, 2, 4), 0.9))
    on = gate_with_random_out(transfer=True)
    off = gate_with_random_out(transfer=False)
    off.load_state_dict(on.state_dict())
    out_on, new_mem = on(z, mem)
    out_off, none = off(z, mem)
    assert none is None and len(new_mem) == 2
    assert torch.equal(out_off[0], off(z, None)[0][0])     # membrane ignored
    assert not torch.allclose(out_on[0], on(z, None)[0][0])  # membrane used


def test_parse_peft_rejects_unknown_keys():
    with pytest.raises(KeyError, match="peft: unknown key 'loraa'"):
        parse_peft(dict(loraa=dict(in_proj=4)))
    with pytest.raises(KeyError, match="peft.gate: unknown key 'chunks'"):
        parse_peft(dict(gate=dict(chunks=4)))
    with pytest.raises(KeyError, match="peft.lora: unknown key 'xproj'"):
        parse_peft(dict(lora=dict(xproj=4)))
    cfg = parse_peft(dict(lora=dict(in_proj=8, out_proj=0)))
    assert cfg.lora_rank('in_proj') == 8 and cfg.lora_rank('out_proj') is None
