"""Hooks and tools around training: trainable-only checkpoints, NaN stop, results,
LoRA merging and checkpoint conversion."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
from mmpretrain.registry import MODELS

from conftest import ROOT, TINY_VIM
from memba_vision.engine import NonFiniteLossHook, PEFTCheckpointHook, complete_trainable_checkpoint
from memba_vision.engine.runner_utils import result_path, write_result
from memba_vision.utils import load_checkpoint_file
from official_layouts import random_checkpoint, vim_layout, vmamba_v0_layout

sys.path.insert(0, osp.join(ROOT, 'tools'))
import merge_lora  # noqa: E402

PEFT = dict(lora=dict(in_proj=8, out_proj=8), gate=dict(rank=4))


class FakeRunner:
    def __init__(self, model):
        self.model, self.epoch, self.iter, self.work_dir = model, 0, 0, '/tmp/run'


def classifier(pretrained=None, peft=PEFT):
    init = dict(type='Pretrained', checkpoint=pretrained) if pretrained else None
    return MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='Vim', arch=TINY_VIM, img_size=32, patch_size=8, peft=peft,
                      init_cfg=init),
        head=dict(type='LinearClsHead', num_classes=5, in_channels=32)))


@pytest.fixture(scope='module')
def tiny_vim_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('ck') / 'vim_tiny.pth'
    random_checkpoint(vim_layout(embed=32, depth=3, d_state=4, patch=8, img=32), path, seed=9)
    return str(path)


def finetuned(tiny_vim_file):
    model = classifier(tiny_vim_file)
    model.init_weights()
    with torch.no_grad():  # stand-in for training: every trainable tensor moves
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_trainable_only_checkpoint_reproduces_the_finetuned_model(tiny_vim_file, tmp_path):
    model = finetuned(tiny_vim_file)
    ckpt = {'state_dict': model.state_dict(), 'meta': {}}
    PEFTCheckpointHook().before_save_checkpoint(FakeRunner(model), ckpt)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(ckpt['state_dict']) == trainable and len(trainable) < len(model.state_dict())
    torch.save(ckpt, tmp_path / 'ft.pth')

    fresh = classifier(tiny_vim_file).eval()  # not initialised: the hook loads pretrained first
    loaded = complete_trainable_checkpoint(fresh, load_checkpoint_file(str(tmp_path / 'ft.pth')))
    fresh.load_state_dict(loaded['state_dict'], strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x, mode='tensor'), model(x, mode='tensor'))


def test_random_frozen_backbones_are_saved_whole():
    model = classifier(None)
    ckpt = {'state_dict': model.state_dict(), 'meta': {}}
    PEFTCheckpointHook().before_save_checkpoint(FakeRunner(model), ckpt)
    assert len(ckpt['state_dict']) == len(model.state_dict())


def test_trainable_only_checkpoint_of_another_model_is_an_error(tiny_vim_file):
    model = classifier(tiny_vim_file)
    ckpt = {'state_dict': {'head.fc.weight': torch.zeros(5, 32)},
            'meta': {'memba_vision': {'trainable_only': True}}}
    with pytest.raises(KeyError, match='missing'):
        complete_trainable_checkpoint(model, ckpt)


def test_non_finite_loss_stops_training():
    hook = NonFiniteLossHook()
    hook.after_train_iter(FakeRunner(None), 0, outputs={'loss': torch.tensor(1.0)})
    with pytest.raises(FloatingPointError, match='loss became nan at epoch 1'):
        hook.after_train_iter(FakeRunner(None), 0, outputs={'loss': torch.tensor(float('nan'))})
    with pytest.raises(FloatingPointError, match='loss_cls became inf'):
        hook.after_train_iter(FakeRunner(None), 0, outputs={'loss_cls': torch.tensor(float('inf'))})


def test_write_result_is_atomic_json(tmp_path):
    path = write_result(str(tmp_path), dict(task='dtd', top1=71.5, num_images=1880))
    assert path == result_path(str(tmp_path), 'dtd')
    assert json.load(open(path))['top1'] == 71.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ['result_dtd.json']


def test_merge_lora_keeps_the_outputs(tiny_vim_file):
    model = finetuned(tiny_vim_file)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x, mode='tensor')
        assert merge_lora.merge_lora_layers(model) == 2 * TINY_VIM['depth']
        after = model(x, mode='tensor')
    assert not any('lora_' in k for k in model.state_dict())
    assert torch.allclose(before, after, atol=1e-5)


def test_convert_checkpoint_cli(tmp_path):
    random_checkpoint(vmamba_v0_layout(dims=16, depths=(1, 1, 1, 1)), tmp_path / 'v.pth', seed=1,
                      extra={'optimizer': {'state': {}}, 'epoch': 3})
    out = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'convert_checkpoint.py'),
                          str(tmp_path / 'v.pth'), str(tmp_path / 'c.pth')],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith('vmamba: wrote')
    sd = load_checkpoint_file(str(tmp_path / 'c.pth'))['state_dict']
    assert 'layers.0.blocks.0.op.in_proj.weight' in sd and not any('head' in k for k in sd)
    model = MODELS.build(dict(type='VanillaVMamba', arch=dict(dims=16, depths=[1, 1, 1, 1]),
                              img_size=64, init_cfg=dict(type='Pretrained',
                                                         checkpoint=str(tmp_path / 'c.pth'))))
    model.init_weights()  # strict: zero missing, zero unexpected


def _vtab_cfg():
    from mmengine.config import Config
    return Config.fromfile(os.path.join(ROOT, 'configs', 'vtab1k', 'vim_s_memba_caltech101.py'))


def test_bf16_training_also_tests_in_bf16(monkeypatch):
    from memba_vision.engine.runner_utils import set_precision
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    cfg = _vtab_cfg()
    set_precision(cfg)
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.test_cfg == dict(type='AutocastTestLoop', dtype='bfloat16')
    cfg = _vtab_cfg()
    set_precision(cfg, fp32=True)  # the fp32 reference trains and tests in fp32
    assert cfg.optim_wrapper.type == 'OptimWrapper' and 'type' not in cfg.test_cfg
    cfg = _vtab_cfg()
    cfg.test_cfg = dict(type='TestLoop')
    set_precision(cfg)  # a loop the config names is kept
    assert cfg.test_cfg == dict(type='TestLoop')


def test_cpu_runs_fall_back_to_fp32_for_training_and_testing(monkeypatch):
    from memba_vision.engine.runner_utils import set_precision
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    cfg = _vtab_cfg()
    set_precision(cfg)
    assert cfg.optim_wrapper.type == 'OptimWrapper' and 'type' not in (cfg.test_cfg or {})


def test_autocast_test_loop_restores_the_autocast_dtype(monkeypatch):
    from mmengine.runner import TestLoop
    from memba_vision.engine import AutocastTestLoop
    seen = []
    monkeypatch.setattr(TestLoop, '__init__', lambda self, *a, **k: None)
    monkeypatch.setattr(TestLoop, 'run', lambda self: seen.append(torch.get_autocast_dtype('cuda')))
    before = torch.get_autocast_dtype('cuda')
    loop = AutocastTestLoop(None, None, None, dtype='bfloat16')
    loop.run()
    assert seen == [torch.bfloat16] and torch.get_autocast_dtype('cuda') == before
    with pytest.raises(ValueError, match='dtype must name'):
        AutocastTestLoop(None, None, None, dtype='int8')
