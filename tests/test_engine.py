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

from conftest import ROOT, TINY_VIM, toy_runner
from memba_vision.engine import PEFTCheckpointHook, complete_trainable_checkpoint
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


class LoopRunner(FakeRunner):
    """What the training hooks read from a runner: position, loader, hub, wrapper, hooks."""

    def __init__(self, iters_per_epoch=7, log_interval=3, optim_wrapper=None):
        from mmengine.hooks import LoggerHook
        from mmengine.logging import MessageHub
        super().__init__(None)
        self.train_dataloader = list(range(iters_per_epoch))
        self.message_hub = MessageHub.get_instance(f'test_hooks_{id(self)}')
        self.optim_wrapper = optim_wrapper
        self.hooks = [LoggerHook(interval=log_interval)]
        self.max_iters = 10 * iters_per_epoch


def test_non_finite_loss_stops_training_before_a_checkpoint():
    from memba_vision.engine import DeferredRuntimeInfoHook
    runner = LoopRunner(log_interval=3)
    hook = DeferredRuntimeInfoHook()
    hook._pending, hook._interval, hook._logs_epoch_end = [], 3, False  # (before_train)
    hook.after_train_iter(runner, 0, outputs={'loss': torch.tensor(1.0)})
    runner.iter = 1
    hook.after_train_iter(runner, 1, outputs={'loss': torch.tensor(float('nan'))})  # not read yet
    runner.iter = 2
    with pytest.raises(FloatingPointError, match='loss became nan at epoch 1, iteration 2;'):
        hook.after_train_iter(runner, 2, outputs={'loss': torch.tensor(3.0)})
    assert list(runner.message_hub.log_scalars['train/loss'].data[0]) == [1.0]
    # an inf waiting for its read-back still blocks the checkpoint that would keep it
    hook.after_train_iter(runner, 3, outputs={'loss_cls': torch.tensor(float('inf'))})
    with pytest.raises(FloatingPointError, match='loss_cls became inf'):
        hook.before_save_checkpoint(runner, {})
    hook.after_train_iter(runner, 4, outputs={'loss': torch.tensor(float('nan'))})
    with pytest.raises(FloatingPointError):
        hook.before_save_checkpoint(runner, {})
    hook.after_train_iter(runner, 4, outputs={'acc': torch.tensor(float('nan'))})
    hook.before_save_checkpoint(runner, {})  # only losses stop training


@pytest.mark.parametrize('ignore_last', [True, False])
def test_deferred_runtime_info_logs_the_same_values_in_batches(ignore_last):
    from memba_vision.engine import DeferredRuntimeInfoHook
    from memba_vision.engine.hooks import _logger_schedule

    class Wrapper:
        grad_norm = None

    wrapper = Wrapper()
    runner = LoopRunner(iters_per_epoch=7, log_interval=3, optim_wrapper=wrapper)
    runner.hooks[0].ignore_last = ignore_last
    runner.cfg, runner.seed, runner.experiment_name = None, 0, 'x'
    hook = DeferredRuntimeInfoHook()
    hook._pending = []  # what before_train sets up
    hook._interval, hook._logs_epoch_end = _logger_schedule(runner)
    losses = [0.5, 0.25, 2.0, 4.0, 1.5, 3.0, 0.75]
    for i, loss in enumerate(losses):
        wrapper.grad_norm = torch.tensor(10.0 + i)
        hook.after_train_iter(runner, i, outputs={'loss': torch.tensor(loss)})
        logged = runner.message_hub.log_scalars.get('train/loss')
        n = 0 if logged is None else len(logged.data[0])
        # read back only on the logger's iterations (3 and 6), and at the epoch's end (7)
        # only where the logger logs it: else the GPU keeps the epoch's last steps queued
        assert n == {0: 0, 1: 0, 2: 3, 3: 3, 4: 3, 5: 6, 6: 6 if ignore_last else 7}[i]
        assert wrapper.grad_norm is None
    hook.after_train_epoch(runner)
    assert len(runner.message_hub.log_scalars['train/loss'].data[0]) == (6 if ignore_last
                                                                          else 7)
    hook.before_save_checkpoint(runner, {})
    assert list(runner.message_hub.log_scalars['train/loss'].data[0]) == losses
    assert list(runner.message_hub.log_scalars['train/grad_norm'].data[0]) == \
        [10.0 + i for i in range(7)]


def test_deferred_runtime_info_does_not_keep_the_steps_autograd_graph():
    """A kept loss with its graph holds the step's activations (and, on a GPU, breaks
    the next CUDA-graph capture with a stream mismatch)."""
    import gc
    import weakref

    from memba_vision.engine import DeferredRuntimeInfoHook
    runner = LoopRunner(iters_per_epoch=7, log_interval=3, optim_wrapper=object())
    hook = DeferredRuntimeInfoHook()
    hook._pending, hook._interval, hook._logs_epoch_end = [], 3, False
    w = torch.ones(3, requires_grad=True)
    activation = w * 2
    alive = weakref.ref(activation)
    loss = (activation * activation).sum()  # its graph saves the activation
    hook.after_train_iter(runner, 0, outputs={'loss': loss})
    del activation, loss
    gc.collect()
    assert len(hook._pending) == 1  # still waiting for the logger's iteration
    assert alive() is None


@pytest.mark.parametrize('gpu_visible', [False, True])
def test_bf16_wrapper_steps_like_autocast_clip_and_adamw_without_a_scaler(gpu_visible,
                                                                          monkeypatch):
    """A CPU model is autocast on the CPU, also where a GPU is visible."""
    from memba_vision.engine import BF16OptimWrapper

    def model_and_opt():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
        return m, torch.optim.AdamW(m.parameters(), lr=1e-2)

    x, y = torch.randn(4, 8), torch.tensor([0, 2, 1, 0])
    m1, o1 = model_and_opt()
    wrapper = BF16OptimWrapper(optimizer=o1, clip_grad=dict(max_norm=0.05))
    m2, o2 = model_and_opt()

    def logged_norms():
        buf = wrapper.message_hub.log_scalars.get('train/grad_norm')
        return 0 if buf is None else buf.data[0].size

    logged_before = logged_norms()
    for _ in range(3):
        with monkeypatch.context() as patch:
            if gpu_visible:  # (only here: the optimiser's step would then look for a GPU)
                patch.setattr(torch.cuda, 'is_available', lambda: True)
            with wrapper.optim_context(m1):
                loss1 = torch.nn.functional.cross_entropy(m1(x), y)
        wrapper.update_params(loss1)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss2 = torch.nn.functional.cross_entropy(m2(x), y)
        loss2.backward()
        norm = torch.nn.utils.clip_grad_norm_(m2.parameters(), 0.05)
        o2.step()
        o2.zero_grad()
        assert loss1.dtype == torch.float32 and torch.equal(loss1, loss2)
        assert isinstance(wrapper.grad_norm, torch.Tensor) and torch.equal(wrapper.grad_norm, norm)
    assert norm > 0.05  # clipping acted
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert logged_norms() == logged_before  # left to DeferredRuntimeInfoHook, as a tensor
    state = wrapper.state_dict()
    wrapper.load_state_dict(dict(state, loss_scaler={'scale': 65536.0}))  # an AmpOptimWrapper's
    with pytest.raises(ValueError, match='bfloat16'):
        BF16OptimWrapper(optimizer=o2, dtype='float16')


def test_write_result_is_atomic_json(tmp_path):
    path = write_result(str(tmp_path), dict(task='dtd', top1=71.5, num_images=1880))
    assert path == result_path(str(tmp_path), 'dtd')
    assert json.load(open(path))['top1'] == 71.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ['result_dtd.json']


def test_atomic_text_files_replace_whole_with_the_usual_permissions(tmp_path):
    from memba_vision.utils import write_text_atomically
    path = tmp_path / 'last_checkpoint'
    old_umask = os.umask(0o022)
    try:
        write_text_atomically(str(path), 'first')
        write_text_atomically(str(path), 'époque 2\n')
    finally:
        os.umask(old_umask)
    assert path.read_text(encoding='utf-8') == 'époque 2\n'
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)  # not a temp file's 0600
    assert [p.name for p in tmp_path.iterdir()] == ['last_checkpoint']


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
    assert cfg.optim_wrapper.type == 'BF16OptimWrapper'
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


def test_vtab_optim_wrapper_builds_from_the_config():
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope
    from memba_vision.engine import BF16OptimWrapper
    cfg = _vtab_cfg()
    model = torch.nn.Linear(4, 2)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    assert isinstance(wrapper, BF16OptimWrapper) and wrapper.cast_dtype == torch.bfloat16
    assert wrapper.clip_grad_kwargs == dict(max_norm=5.0)
    # PyTorch's fused AdamW: one kernel per group instead of a chain of multi-tensor kernels
    assert isinstance(wrapper.optimizer, torch.optim.AdamW)
    assert wrapper.optimizer.defaults['fused'] is True


def test_checkpoint_marker_names_a_complete_file_when_killed_mid_save(tmp_path):
    from mmengine.hooks import Hook

    class KilledWhileSaving(Hook):  # stands in for a kill during epoch 2's save
        def before_save_checkpoint(self, runner, checkpoint):
            if runner.epoch + 1 == 2:
                raise KeyboardInterrupt

    class CountIters(Hook):
        count = 0

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            CountIters.count += 1

    with pytest.raises(KeyboardInterrupt):
        toy_runner(tmp_path, hooks=[KilledWhileSaving()]).train()
    # (the stock CheckpointHook deletes epoch_1.pth before it writes epoch_2.pth)
    marker = open(tmp_path / 'last_checkpoint').read().strip()
    assert marker == str(tmp_path / 'epoch_1.pth') and osp.isfile(marker)
    assert [f for f in os.listdir(tmp_path) if f.endswith('.pth')] == ['epoch_1.pth']

    toy_runner(tmp_path, hooks=[CountIters()], resume=True).train()
    assert CountIters.count == 4  # epochs 2 and 3 only
    assert open(tmp_path / 'last_checkpoint').read().strip() == str(tmp_path / 'epoch_3.pth')
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith('.pth')) == ['epoch_3.pth']


def test_checkpoints_format_the_config_once(tmp_path, monkeypatch):
    """mmengine writes the config's yapf-formatted text into every checkpoint; the runner
    formats it once (about 0.3 s a save on a VTAB config), and again when it changed."""
    import mmengine.config.config as config_module
    from mmengine.config import Config
    from memba_vision.utils import load_checkpoint_file
    formats = []
    real = config_module.FormatCode
    monkeypatch.setattr(config_module, 'FormatCode',
                        lambda *a, **k: formats.append(1) or real(*a, **k))
    runner = toy_runner(tmp_path)
    runner.cfg.merge_from_dict(dict(note='first'))
    before = len(formats)
    runner.train()  # three saves
    assert len(formats) - before == 1
    runner.cfg.merge_from_dict(dict(note='changed'))
    assert "'changed'" in runner.cfg.pretty_text and len(formats) - before == 2
    meta = load_checkpoint_file(str(tmp_path / 'epoch_3.pth'))['meta']
    assert meta['cfg'] == Config(dict(note='first')).pretty_text


def test_peft_saves_copy_only_the_tensors_they_write(tmp_path):
    """mmengine copies the model's state dict to the host before PEFTCheckpointHook keeps
    the trainable tensors; the runner leaves the frozen ones out before that copy, and the
    file is the same. Without a PEFTCheckpointHook, the whole model is saved."""
    from mmengine.hooks import Hook
    from memba_vision.utils import load_checkpoint_file

    class SeesTheCopy(Hook):  # runs before PEFTCheckpointHook (VERY_LOW)
        priority = 'VERY_HIGH'
        keys = []

        def before_save_checkpoint(self, runner, checkpoint):
            self.keys.append(sorted(checkpoint['state_dict']))

    spy = SeesTheCopy()
    runner = toy_runner(tmp_path / 'peft', hooks=[PEFTCheckpointHook(), spy],
                        frozen_backbone=True)
    runner.train()
    assert spy.keys == [['fc.bias', 'fc.weight']] * 3
    assert len(runner.model.state_dict()) == 4  # only while saving
    saved = load_checkpoint_file(str(tmp_path / 'peft' / 'epoch_3.pth'))
    assert sorted(saved['state_dict']) == ['fc.bias', 'fc.weight']
    assert saved['meta']['memba_vision'] == dict(trainable_only=True)
    spy.keys.clear()
    runner = toy_runner(tmp_path / 'whole', hooks=[spy], frozen_backbone=True)
    runner.train()
    assert spy.keys == [sorted(runner.model.state_dict())] * 3 and len(spy.keys[0]) == 4


def test_checkpoints_hold_what_mmengine_writes(tmp_path):
    """The runner builds its checkpoints itself (host copies in one batch, written behind the
    loop); the file holds what mmengine's own save writes, tensor for tensor."""
    from mmengine.runner import Runner
    runner = toy_runner(tmp_path / 'run')
    runner.train()
    runner.save_checkpoint(str(tmp_path), 'ours.pth')
    Runner.save_checkpoint(runner, str(tmp_path), 'stock.pth')
    ours, stock = (load_checkpoint_file(str(tmp_path / f)) for f in ('ours.pth', 'stock.pth'))
    assert ours.keys() == stock.keys()
    assert {k: v for k, v in ours['meta'].items() if k != 'time'} == \
        {k: v for k, v in stock['meta'].items() if k != 'time'}
    assert {'state_dict', 'optimizer', 'message_hub'} <= ours.keys()
    for part in ours.keys() - {'meta'}:
        assert _same(ours[part], stock[part]), part


def _same(a, b) -> bool:
    """Equal values, type for type: tensors element for element, mmengine's history buffers
    by their data."""
    from mmengine.logging import HistoryBuffer
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, HistoryBuffer):
        return all((x == y).all() for x, y in zip(a.data, b.data))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _blocking_save(monkeypatch, saved):
    """torch.save whose first call waits until the returned event is set (5 s at most) and
    whose files are read back into ``saved`` as written."""
    import threading
    gate, real = threading.Event(), torch.save

    def save(obj, path, *args, **kwargs):
        if not saved and not gate.wait(5):
            raise TimeoutError('the first write was not released: the loop waited for it')
        real(obj, path, *args, **kwargs)
        saved.append(load_checkpoint_file(str(path)))

    monkeypatch.setattr(torch, 'save', save)
    return gate


def test_checkpoints_are_written_behind_the_training_loop(tmp_path, monkeypatch):
    """Epoch 1's file is written while epoch 2 trains (its write waits for epoch 2's first
    step here), and it holds the weights of epoch 1's end; the marker names it only once it is
    complete, and training returns with every file published."""
    from mmengine.hooks import Hook
    saved, seen = [], []
    gate = _blocking_save(monkeypatch, saved)

    class Watch(Hook):
        priority = 'LOWEST'  # after the checkpoint hook

        def after_train_epoch(self, runner):
            seen.append(runner.model.fc.weight.detach().to('cpu', copy=True))  # a GPU's too

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if runner.epoch == 1 and batch_idx == 0:  # epoch 2 has stepped; epoch 1's write waits
                seen.append(osp.exists(tmp_path / 'last_checkpoint'))
                gate.set()

    toy_runner(tmp_path, hooks=[Watch()]).train()
    assert seen[1] is False  # epoch 1's file was not published while it was being written
    assert len(saved) == 3
    for state, weight in zip(saved, (seen[0], seen[2], seen[3])):
        assert torch.equal(state['state_dict']['fc.weight'], weight)
    assert not torch.equal(seen[0], seen[2])  # training went on meanwhile
    assert open(tmp_path / 'last_checkpoint').read().strip() == str(tmp_path / 'epoch_3.pth')
    assert sorted(f for f in os.listdir(tmp_path) if 'pth' in f) == ['epoch_3.pth']


def test_a_failed_background_write_stops_training(tmp_path, monkeypatch):
    def save(*args, **kwargs):
        raise OSError('disk full')

    monkeypatch.setattr(torch, 'save', save)
    with pytest.raises(OSError, match='disk full'):
        toy_runner(tmp_path).train()
    assert not osp.exists(tmp_path / 'last_checkpoint')


def test_host_snapshots_keep_the_values_of_their_moment():
    """An optimizer's state_dict hands out its live tensors and per-parameter dicts; the
    snapshot keeps the values of the moment it was taken, and its own dicts."""
    from memba_vision.engine.checkpoint_writer import host_snapshot
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    snapshot, wait = host_snapshot(opt.state_dict())
    wait()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    opt.step()
    for key, value in snapshot['state'][0].items():
        assert torch.equal(value, before[key]) and not torch.equal(value, opt.state[p][key])
    assert snapshot['state'][0] is not opt.state_dict()['state'][0]


def test_resume_names_the_problem_when_the_marked_checkpoint_is_gone(tmp_path):
    from memba_vision.engine.runner_utils import check_resumable
    check_resumable(str(tmp_path))  # no marker: a fresh run
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'epoch_5.pth'))
    (tmp_path / 'epoch_3.pth').write_bytes(b'')
    with pytest.raises(FileNotFoundError, match=r"epoch_5.pth', which does not exist: resume "
                                                r"from one of \['epoch_3.pth'\]"):
        check_resumable(str(tmp_path))
