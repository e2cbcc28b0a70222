"""Memba on whole backbones: identity at init, membrane transfer, freezing, bad settings."""
import pytest
import torch
import torch.nn as nn
from mmengine.optim import build_optim_wrapper
from mmpretrain.registry import MODELS

from conftest import TINY_VIM, TINY_VMAMBA
from memba_vision.models.peft import MembraneGate
from official_layouts import random_checkpoint, vim_layout, vmamba_v0_layout

MEMBA_VIM = dict(lora=dict(in_proj=8, out_proj=8), gate=dict(rank=4))
MEMBA_VMAMBA = dict(lora=dict(in_proj=8, out_proj=8), gate=dict(rank=4))


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
    plain, memba = tiny(kind, init_cfg=init), tiny(kind, MEMBA_VIM, init_cfg=init)
    plain.init_weights(), memba.init_weights()
    plain.eval(), memba.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain(x)[0], memba(x)[0])


def capture_gates(model):
    calls = []
    for name, m in model.named_modules():
        if isinstance(m, MembraneGate):
            m.register_forward_hook(
                lambda mod, args, out, name=name: calls.append((name, mod, args, out)))
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
    _, mem0_changed = g0(z0 + 2.0, None)
    out1_changed, _ = g1(z1, mem0_changed)
    assert not torch.allclose(out1_changed[0], out1[0]) and not torch.allclose(out1_changed[1], out1[1])


def test_no_transfer_means_every_layer_starts_from_zero():
    peft = dict(lora=dict(in_proj=8), gate=dict(rank=4, transfer=False))
    model = tiny('vim', peft).eval()
    randomise_gates(model)
    calls = capture_gates(model)
    model(torch.randn(2, 3, 32, 32) * 3)
    assert all(args[1] is None and out[1] is None for _, _, args, out in calls)
    _, g1, (z1, _), (out1, _) = calls[1]
    handed_in = tuple(torch.full((2, 17 // 4, 4), 0.9) for _ in range(2))
    out_with, _ = g1(z1, handed_in)
    assert torch.equal(out_with[0], out1[0]) and torch.equal(out_with[1], out1[1])


def test_vmamba_membrane_flows_within_a_stage_and_restarts_per_stage():
    model = tiny('vmamba', MEMBA_VMAMBA).eval()
    randomise_gates(model)
    calls = capture_gates(model)
    model(torch.randn(2, 3, 32, 32))
    names = [c[0] for c in calls]
    assert names == ['layers.0.blocks.0.op.gate', 'layers.1.blocks.0.op.gate',
                     'layers.1.blocks.1.op.gate', 'layers.2.blocks.0.op.gate']
    firsts = [c for c in calls if '.blocks.0.' in c[0]]
    assert all(c[2][1] is None for c in firsts)           # each stage starts from zeros
    assert calls[2][2][1] is calls[1][3][1]                # within stage 2: handed on
    assert calls[1][3][1][0].shape == (2, 16 // 4, 4)      # stage 2: 4x4 tokens, 4 chunks


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
    with pytest.raises(ValueError, match=r'LoRA rank must be an integer in \[1, 32\]'):
        tiny('vim', dict(lora=dict(out_proj=64)))
    with pytest.raises(ValueError, match=r'gate rank must be an integer in \[1, 64\]'):
        tiny('vim', dict(gate=dict(rank=65)))
    with pytest.raises(ValueError, match='num_chunks=32 exceeds the sequence length 17'):
        tiny('vim', dict(gate=dict(num_chunks=32)))
    with pytest.raises(ValueError, match='exceeds the 4 tokens of stage 3'):
        tiny('vmamba', dict(gate=dict(num_chunks=8)))
