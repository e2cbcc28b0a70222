"""Memba on whole backbones: identity at init, membrane transfer, freezing, bad settings."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.optim import build_optim_wrapper
from mmpretrain.registry import MODELS

from conftest import TINY_VIM, TINY_VMAMBA
from memba_vision.models.peft import MembraneGate
from official_layouts import random_checkpoint, vim_layout, vmamba_v0_layout

MEMBA_VIM = dict(lora=dict(in_proj=8, out_proj=8), gate=dict(rank=4))
MEMBA_VMAMBA = dict(lora=dict(in_proj=4, out_proj=8), gate=dict(rank=4))


def tiny(kind, peft=None, **kw):
    if kind == 'vim':
        return MODELS.build(dict(type='Vim', arch=TINY_VIM, img_size=32, patch_size=8,
                                 drop_path_rate=0.0, peft=peft, **kw))
    return MODELS.build(dict(type='VanillaVMamba', arch=TINY_VMAMBA, img_size=32,
                             drop_path_rate=0.0, peft=peft, **kw))


@pytest.fixture(scope='module')
def tiny_checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp('tiny')
    random_checkpoint(vim_layout(embed=32, depth=3, d_state=4, patch=8, img=32), d / 'vim.pth', 1)
    random_checkpoint(vmamba_v0_layout(dims=16, depths=(1, 2, 1), d_state=4), d / 'vm.pth', 2)
    return {'vim': str(d / 'vim.pth'), 'vmamba': str(d / 'vm.pth')}


@pytest.mark.parametrize('kind', ['vim', 'vmamba'])
def test_memba_at_init_equals_the_pretrained_model(kind, tiny_checkpoints):
    init = dict(type='Pretrained', checkpoint=tiny_checkpoints[kind])
    peft = MEMBA_VIM if kind == 'vim' else MEMBA_VMAMBA
    plain, memba = tiny(kind, init_cfg=init), tiny(kind, peft, init_cfg=init)
    plain.init_weights(), memba.init_weights()
    plain.eval(), memba.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain(x)[0], memba(x)[0])


def capture_gates(model):
    """Records each Vim gate's ``lim_spikes`` call as (name, gate, (z, membrane), (pairs,
    membrane)) (the scan applies the correction)."""
    calls = []
    for name, m in model.named_modules():
        if isinstance(m, MembraneGate):
            def record(*args, inner=m.lim_spikes, name=name, m=m):
                out = inner(*args)
                calls.append((name, m, args, out))
                return out
            m.lim_spikes = record
    return calls


def randomise_gates(model):
    for m in model.modules():
        if isinstance(m, MembraneGate):
            for p in m.proj_out:
                nn.init.normal_(p.weight, std=0.5)


def test_vim_membrane_flows_layer_to_layer_and_changes_the_next_gate():
    model = tiny('vim', MEMBA_VIM).eval()
    randomise_gates(model)
    calls = capture_gates(model)
    model(torch.randn(2, 3, 32, 32) * 3)
    assert len(calls) == 3 and calls[0][2][1] is None
    for (_, _, _, out_k), (_, _, args_next, _) in zip(calls, calls[1:]):
        assert args_next[1] is out_k[1]  # layer k+1 receives layer k's u_mean, per direction
    # change layer 0's gate input: layer 1's gate output changes through the membrane alone
    _, g0, (z0, _), _ = calls[0]
    _, g1, (z1, _), (out1, _) = calls[1]
    _, mem0_changed = g0.lim_spikes(z0 + 2.0, None)
    out1_changed, _ = g1.lim_spikes(z1, mem0_changed)  # ((spikes, W_out) per direction)
    assert not torch.allclose(out1_changed[0][0], out1[0][0])
    assert not torch.allclose(out1_changed[1][0], out1[1][0])


def test_no_transfer_means_every_layer_starts_from_zero():
    peft = dict(lora=dict(in_proj=8), gate=dict(rank=4, transfer=False))
    model = tiny('vim', peft).eval()
    randomise_gates(model)
    calls = capture_gates(model)
    model(torch.randn(2, 3, 32, 32) * 3)
    assert all(args[1] is None and out[1] is None for _, _, args, out in calls)
    _, g1, (z1, _), (out1, _) = calls[1]
    handed_in = tuple(torch.full((2, 17 // 4, 4), 0.9) for _ in range(2))
    out_with, _ = g1.lim_spikes(z1, handed_in)
    assert torch.equal(out_with[0][0], out1[0][0]) and torch.equal(out_with[1][0], out1[1][0])


def test_vmamba_membrane_flows_within_a_stage_and_restarts_per_stage(monkeypatch):
    import memba_vision.models.backbones.vmamba as vmamba
    model = tiny('vmamba', MEMBA_VMAMBA).eval()
    randomise_gates(model)
    calls = []  # (membrane in, membrane out) of each block's gate

    def record(*args, inner=vmamba.memba_norm_silu_gate):
        out = inner(*args)
        calls.append((args[8], out[1]))
        return out
    monkeypatch.setattr(vmamba, 'memba_norm_silu_gate', record)
    model(torch.randn(2, 3, 32, 32))
    assert len(calls) == 4                                # blocks (1, 2, 1)
    assert calls[0][0] is None and calls[1][0] is None and calls[3][0] is None  # stage starts
    assert calls[2][0] is calls[1][1]                     # within stage 2: handed on
    assert calls[1][1][0].shape == (2, 16 // 4, 4)        # stage 2: 4x4 tokens, 4 chunks


@pytest.mark.parametrize('kind', ['vim', 'vmamba'])
def test_optimizer_steps_change_only_trainable_tensors(kind):
    clf = MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='Vim', arch=TINY_VIM, img_size=32, patch_size=8, peft=MEMBA_VIM)
        if kind == 'vim' else dict(type='VanillaVMamba', arch=TINY_VMAMBA, img_size=32,
                                   peft=MEMBA_VMAMBA),
        head=dict(type='LinearClsHead', num_classes=5, in_channels=32 if kind == 'vim' else 64)))
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert trainable and all(('lora_' in n or '.gate.' in n or n.startswith('head.'))
                             for n in trainable)
    optim = build_optim_wrapper(clf, dict(optimizer=dict(type='AdamW', lr=1e-2, weight_decay=0.1)))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    clf.train()
    for _ in range(3):
        loss = nn.functional.cross_entropy(clf(x, mode='tensor'), y)
        optim.update_params(loss)
    after = clf.state_dict()
    for k, v in after.items():
        if k in trainable:
            continue
        assert torch.equal(v, before[k]), f'frozen tensor {k} changed'
    changed = [k for k in trainable if not torch.equal(after[k], before[k])]
    assert any('lora_up' in k for k in changed) and any('gate.proj_out' in k for k in changed)


def test_bad_peft_settings_fail_at_build():
    with pytest.raises(KeyError, match="unknown key 'lorra'"):
        tiny('vim', dict(lorra=dict(in_proj=4)))
    with pytest.raises(ValueError, match=r'LoRA rank must be an integer in \[1, 64\]'):
        tiny('vim', dict(lora=dict(out_proj=65)))
    with pytest.raises(ValueError, match=r'gate rank must be an integer in \[1, 64\]'):
        tiny('vim', dict(gate=dict(rank=65)))
    with pytest.raises(ValueError, match='num_chunks=32 exceeds the sequence length 17'):
        tiny('vim', dict(gate=dict(num_chunks=32)))
    with pytest.raises(ValueError, match='exceeds the 4 tokens of stage 3'):
        tiny('vmamba', dict(gate=dict(num_chunks=8)))


def literal_vim_mixer(mixer, hidden, membrane):
    """The official bimamba-v2 mixer written out channels-first with flips, and Memba's gate
    applied to z literally (z' = z + W_out LIM(W_in z) in each direction's token order).

    Independent of the mixer's token-major path (reversed conv and scan, low-rank gate
    handed to the scan), which must give the same result.
    """
    from memba_vision.ops import lim_reference, selective_scan_reference
    x, z = mixer.in_proj(hidden).chunk(2, dim=-1)                     # (B, L, D)
    L, D = x.shape[1], x.shape[2]
    g = mixer.gate
    if g is None:
        z_f, z_b, new_membrane = z, z.flip(1), membrane
    else:
        prev = membrane if membrane is not None and g.transfer else (None, None)
        v_f, v_b = g.proj_in[0](z), g.proj_in[0](z.flip(1))
        s_f, m_f = lim_reference(v_f, g.num_chunks, g.leak, g.threshold, prev[0])
        s_b, m_b = lim_reference(v_b, g.num_chunks, g.leak, g.threshold, prev[1])
        base_f, base_b = (z, z.flip(1)) if g.residual else (0., 0.)
        z_f, z_b = base_f + g.proj_out[0](s_f), base_b + g.proj_out[0](s_b)
        new_membrane = (m_f, m_b) if g.transfer else None

    def ssm(x_dir, z_dir, sfx):  # one direction, inputs in its own token order
        conv = getattr(mixer, 'conv1d' + sfx)
        xc = F.silu(F.conv1d(x_dir.transpose(1, 2), conv.weight, conv.bias,
                             padding=conv.weight.shape[-1] - 1, groups=D)[..., :L])
        dt, B, C = getattr(mixer, 'x_proj' + sfx)(xc.transpose(1, 2)).split(
            [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
        dt_proj = getattr(mixer, 'dt_proj' + sfx)
        A_log, Dp = (mixer.A_b_log, mixer.D_b) if sfx else (mixer.A_log, mixer.D)
        y = selective_scan_reference(xc, (dt @ dt_proj.weight.t()).transpose(1, 2),
                                     -torch.exp(A_log), B.transpose(1, 2), C.transpose(1, 2),
                                     Dp, z_dir.transpose(1, 2), dt_proj.bias, True)
        return y.transpose(1, 2)

    y = (ssm(x, z_f, '') + ssm(x.flip(1), z_b, '_b').flip(1)) / 2
    return mixer.out_proj(y), new_membrane


@pytest.mark.parametrize('gate', [dict(rank=3, num_chunks=3),
                                  dict(rank=3, num_chunks=3, residual=False),
                                  dict(rank=3, num_chunks=3, transfer=False), None])
def test_vim_mixer_equals_the_literal_flip_formulation(gate):
    from memba_vision.models.backbones.vim import VimMixer
    from memba_vision.models.peft import parse_peft
    peft = parse_peft(dict(lora=dict(in_proj=4, out_proj=4, dropout=0.0),
                           **({'gate': gate} if gate else {})))
    mixer = VimMixer(16, d_state=4, num_layers=2, peft=peft).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights everywhere, LoRA and gates included
        for p in mixer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        mixer.A_log.copy_(torch.randn(mixer.A_log.shape, generator=g) * 0.5)
        mixer.A_b_log.copy_(torch.randn(mixer.A_b_log.shape, generator=g) * 0.5)
    hidden = torch.randn(2, 13, 16, generator=g)
    membrane = (torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g))
    out, mem = mixer(hidden, membrane if gate else None)
    ref, mem_ref = literal_vim_mixer(mixer, hidden, membrane if gate else None)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    if gate and gate.get('transfer', True):
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(mem, mem_ref))
    else:
        assert mem is None


@pytest.mark.parametrize('residual', [True, False])
def test_vmamba_gate_is_the_mean_of_the_two_directions_gated_z(residual):
    """SS2D applies z' = (z'_fwd + z'_bwd) / 2 of the two LIM directions as one product."""
    from memba_vision.models.backbones.vmamba import SS2D
    from memba_vision.models.peft import parse_peft
    mixer = SS2D(16, d_state=4, peft=parse_peft(dict(gate=dict(rank=3, num_chunks=2,
                                                                residual=residual)))).eval()
    for p in mixer.gate.proj_out:
        nn.init.normal_(p.weight)
    x = torch.randn(2, 4, 6, 16)
    seen = {}
    mixer.out_proj.register_forward_pre_hook(lambda m, a: seen.update(y=a[0]))
    with torch.no_grad():
        mixer(x)
        xs, z = mixer.in_proj(x).chunk(2, dim=-1)
        xs = F.silu(mixer.conv2d(xs.permute(0, 3, 1, 2)))
        y = mixer.out_norm(mixer.cross_scan(xs.permute(0, 2, 3, 1)))
        (z_f, z_b), _ = mixer.gate(z.reshape(2, 24, -1), None)
        expected = y * F.silu((z_f + z_b) / 2)
    assert torch.allclose(seen['y'], expected, atol=1e-5)
