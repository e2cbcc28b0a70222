"""Backbones: official checkpoint layouts load strictly, weights land, bad input is caught."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from mmengine.logging import MMLogger
from mmpretrain.registry import MODELS

from conftest import TINY_VIM, TINY_VMAMBA
from official_layouts import random_checkpoint, vim_layout, vmamba_v0_layout


def numel(layout, skip=('head.', 'classifier.head.')):
    return sum(math.prod(s) for k, s in layout.items() if not k.startswith(skip))


def build(cfg):
    return MODELS.build(cfg)


@pytest.fixture(scope='module')
def vim_s_files(tmp_path_factory):
    d = tmp_path_factory.mktemp('vim')
    layout = vim_layout()
    a = random_checkpoint(layout, d / 'a.pth', seed=1,
                          extra={'args': argparse.Namespace(model='vim_small'), 'epoch': 299})
    random_checkpoint(layout, d / 'b.pth', seed=2)
    return layout, a, str(d / 'a.pth'), str(d / 'b.pth')


def init_and_read_log(model, tmp_path, name):
    """Runs init_weights with a fresh current logger writing to a file; returns the log."""
    log_file = tmp_path / f'{name}.log'
    MMLogger.get_instance(f'memba_test_{name}', log_file=str(log_file), log_level='INFO')
    model.init_weights()
    return log_file.read_text()


def test_vim_s_official_layout_loads_with_zero_missing_and_unexpected(vim_s_files, tmp_path):
    layout, state, path, _ = vim_s_files
    model = build(dict(type='Vim', arch='small', init_cfg=dict(type='Pretrained', checkpoint=path)))
    # backbone parameter count equals the official one (head excluded): 25.4M
    assert sum(p.numel() for p in model.parameters()) == numel(layout) == 25_411_584
    out = init_and_read_log(model, tmp_path, 'vim_s')
    assert 'loaded 413 tensors' in out and '0 missing, 0 unexpected' in out
    ours = model.state_dict()
    for k, v in state.items():
        if not k.startswith('head.'):
            assert torch.equal(ours[k], v), k


def test_vim_weights_really_land(vim_s_files):
    _, _, path_a, path_b = vim_s_files
    x = torch.randn(2, 3, 32, 32)

    def run(path):
        m = build(dict(type='Vim', arch='small', img_size=32,
                       init_cfg=dict(type='Pretrained', checkpoint=path)))
        m.init_weights()
        m.eval()
        return m(x)[0]

    a1, a2, b = run(path_a), run(path_a), run(path_b)
    assert torch.equal(a1, a2)
    assert (a1 - b).abs().max() > 1e-2


def test_vim_pos_embed_is_interpolated_for_another_input_size(vim_s_files):
    _, state, path, _ = vim_s_files
    m = build(dict(type='Vim', arch='small', img_size=112,
                   init_cfg=dict(type='Pretrained', checkpoint=path)))
    m.init_weights()
    pos = state['pos_embed']                      # (1, 197, C), cls at index 98
    patches = torch.cat([pos[:, :98], pos[:, 99:]], 1).reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(7, 7), mode='bicubic', align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, 49, -1)
    expected = torch.cat([patches[:, :24], pos[:, 98:99], patches[:, 24:]], 1)
    assert m.pos_embed.shape == (1, 50, 384)
    assert torch.allclose(m.pos_embed, expected, atol=1e-6)


@pytest.mark.parametrize('legacy', [True, False])
def test_vmamba_s_official_layouts_load(tmp_path, legacy):
    layout = vmamba_v0_layout(legacy=legacy)
    state = random_checkpoint(layout, tmp_path / 'v.pth', seed=3,
                              extra={'config': {'MODEL': {'NAME': 'vssm_small'}}})
    model = build(dict(type='VanillaVMamba', arch='small',
                       init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'v.pth'))))
    assert sum(p.numel() for p in model.parameters()) == numel(layout) == 43_648_416
    out = init_and_read_log(model, tmp_path, f'vmamba_{legacy}')
    assert f'loaded {len(layout) - 2} tensors' in out and '0 missing, 0 unexpected' in out
    ours = model.state_dict()
    converted = model.convert_official(state)
    assert len(converted) == len(layout) - 2
    for k, v in converted.items():
        assert torch.equal(ours[k], v), k


def test_vmamba_weights_really_land(tmp_path):
    arch = dict(dims=32, depths=[1, 1, 2, 1])
    layout = vmamba_v0_layout(dims=32, depths=(1, 1, 2, 1))
    random_checkpoint(layout, tmp_path / 'a.pth', seed=4)
    random_checkpoint(layout, tmp_path / 'b.pth', seed=5)
    x = torch.randn(2, 3, 64, 64)

    def run(name):
        m = build(dict(type='VanillaVMamba', arch=arch, img_size=64,
                       init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / name))))
        m.init_weights()
        m.eval()
        return m(x)[0]

    a1, a2, b = run('a.pth'), run('a.pth'), run('b.pth')
    assert a1.shape == (2, 256)
    assert torch.equal(a1, a2)
    assert (a1 - b).abs().max() > 1e-2


def test_peft_backbone_loads_official_weights_into_lora_layers(vim_s_files):
    _, state, path, _ = vim_s_files
    m = build(dict(type='Vim', arch='small', img_size=32,
                   peft=dict(lora=dict(in_proj=32, out_proj=96), gate=dict()),
                   init_cfg=dict(type='Pretrained', checkpoint=path)))
    m.init_weights()
    assert torch.equal(m.layers[5].mixer.in_proj.original_layer.weight,
                       state['layers.5.mixer.in_proj.weight'])
    assert torch.equal(m.layers[5].mixer.out_proj.weight, state['layers.5.mixer.out_proj.weight'])


def test_wrong_checkpoint_names_the_first_missing_keys(tmp_path, vim_s_files):
    random_checkpoint(vmamba_v0_layout(dims=16, depths=(1, 1, 1, 1)), tmp_path / 'vm.pth', seed=6)
    m = build(dict(type='Vim', arch='small',
                   init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'vm.pth'))))
    with pytest.raises(KeyError, match=r'backbone keys missing from the file \(first: cls_token'):
        m.init_weights()


def test_shape_mismatch_and_missing_file(tmp_path):
    random_checkpoint(vim_layout(embed=192), tmp_path / 't.pth', seed=7)
    m = build(dict(type='Vim', arch='small',
                   init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 't.pth'))))
    with pytest.raises(ValueError, match='shape mismatch'):
        m.init_weights()
    m = build(dict(type='Vim', arch='small',
                   init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'none.pth'))))
    with pytest.raises(FileNotFoundError, match='huggingface.co/hustvl/Vim-small-midclstok'):
        m.init_weights()


def test_unsafe_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ('pwned',))
    torch.save({'model': {'w': torch.ones(1)}, 'payload': Evil()}, tmp_path / 'evil.pth')
    m = build(dict(type='Vim', arch=TINY_VIM,
                   init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'evil.pth'))))
    with pytest.raises(RuntimeError, match='refused: it references (builtins\.)?print,'):
        m.init_weights()


def test_bad_input_errors():
    with pytest.raises(KeyError, match='valid: tiny, small'):
        build(dict(type='Vim', arch='huge'))
    with pytest.raises(KeyError, match='valid: tiny, small, base'):
        build(dict(type='VanillaVMamba', arch='huge'))
    with pytest.raises(KeyError, match='needs embed_dims and depth'):
        build(dict(type='Vim', arch=dict(embed_dims=32)))
    vim = build(dict(type='Vim', arch=TINY_VIM, img_size=32, patch_size=8))
    with pytest.raises(ValueError, match='divisible by the patch size 8'):
        vim(torch.randn(1, 3, 30, 32))
    vmamba = build(dict(type='VanillaVMamba', arch=TINY_VMAMBA, img_size=32))
    with pytest.raises(ValueError, match='divisible by the patch size 4'):
        vmamba(torch.randn(1, 3, 32, 34))


def test_tiny_forward_shapes():
    vim = build(dict(type='Vim', arch=TINY_VIM, img_size=32, patch_size=8))
    assert vim(torch.randn(2, 3, 32, 32))[0].shape == (2, 32)
    assert vim(torch.randn(2, 3, 48, 32))[0].shape == (2, 32)  # other size: pos resized
    vmamba = build(dict(type='VanillaVMamba', arch=TINY_VMAMBA, img_size=32))
    assert vmamba(torch.randn(2, 3, 32, 32))[0].shape == (2, 64)
