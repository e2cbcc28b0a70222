"""Bad checkpoint files give one line naming the file and what is wrong, wherever a file
is loaded (pretrained backbones with a str or dict arch, tools/test.py, train.py --resume,
convert_checkpoint.py, merge_lora.py); the safe-load allow-list is scoped to our loads."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_VIM, load_tool, write_tiny_config
from memba_vision.utils import CheckpointError, load_checkpoint_file

PY = sys.executable
CASES = ('garbage', 'truncated', 'system', 'missing')
WHAT = {'garbage': 'is not a PyTorch checkpoint', 'truncated': 'is truncated',
        'system': 'refused: it references posix.system, which a checkpoint never needs',
        'missing': 'not found'}


class _RunsSystem:
    """Unpickling this calls os.system(command): what a checkpoint must never do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope='module')
def bad(tmp_path_factory):
    """case -> path, and the file the 'system' case would create if it ran."""
    root = tmp_path_factory.mktemp('bad_ckpt')
    paths = {c: str(root / f'{c}.pth') for c in CASES}
    with open(paths['garbage'], 'wb') as f:
        f.write(bytes(range(7, 250)) * 8)
    real = root / 'real.pth'
    torch.save({'state_dict': {'w': torch.randn(64, 64)}, 'meta': {}}, real)
    data = real.read_bytes()
    with open(paths['truncated'], 'wb') as f:
        f.write(data[:len(data) // 2])
    created = root / 'created_by_checkpoint'
    torch.save({'state_dict': {'w': torch.ones(1)}, 'x': _RunsSystem(f'touch {created}')},
               paths['system'])
    yield paths, created
    assert not created.exists(), 'a checkpoint ran os.system'


def _check_line(message, path, case):
    assert isinstance(message, str), f'not a one-line exit: {message!r}'
    message = message.strip()
    assert '\n' not in message and path in message and WHAT[case] in message, message
    assert 'weights_only' not in message and 'Traceback' not in message, message


@pytest.mark.parametrize('case', CASES)
def test_load_checkpoint_file(bad, case):
    paths, created = bad
    with pytest.raises(CheckpointError) as e:
        load_checkpoint_file(paths[case])
    _check_line(str(e.value), paths[case], case)
    assert not created.exists()


@pytest.mark.parametrize('arch', ['tiny', TINY_VIM], ids=['str_arch', 'dict_arch'])
@pytest.mark.parametrize('case', CASES)
def test_pretrained_init(bad, case, arch):
    from mmpretrain.registry import MODELS
    paths, created = bad
    m = MODELS.build(dict(type='Vim', arch=arch, img_size=32, patch_size=8,
                          init_cfg=dict(type='Pretrained', checkpoint=paths[case])))
    with pytest.raises(CheckpointError) as e:
        m.init_weights()
    _check_line(str(e.value), paths[case], case)
    assert not created.exists()


@pytest.fixture(scope='module')
def tiny_config(tmp_path_factory):
    root = tmp_path_factory.mktemp('bad_ckpt_cfg')
    cfg, _ = write_tiny_config(root, ['dsprites_loc'], 32, 8, 16)
    return str(cfg), root


def _exit_message(fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert e.value.code not in (0, None)
    return e.value.code


def _pretrained(path, arch=None):
    opts = ['model.backbone.init_cfg.type=Pretrained', f'model.backbone.init_cfg.checkpoint={path}']
    return opts + ([f'model.backbone.arch={arch}'] if arch else [])


@pytest.mark.parametrize('case', CASES)
def test_tools_one_line(bad, tiny_config, case, tmp_path, monkeypatch):
    """Each tool, in this process: it exits with one line naming the file."""
    paths, created = bad
    cfg, _ = tiny_config
    path, work = paths[case], str(tmp_path / 'work')
    train, test = load_tool('train'), load_tool('test')
    runs = {
        'test.py': lambda: test.test(test.parse_args([cfg, path, '--work-dir', work])),
        'train.py --resume': lambda: train.train(train.parse_args(
            [cfg, '--resume', path, '--work-dir', work])),
        'init_cfg, dict arch': lambda: train.train(train.parse_args(
            [cfg, '--work-dir', work, '--cfg-options', *_pretrained(path)])),
        'init_cfg, str arch': lambda: train.train(train.parse_args(
            [cfg, '--work-dir', work, '--cfg-options', *_pretrained(path, 'tiny'),
             'model.head.in_channels=192'])),
    }
    for tool, argv in (('convert_checkpoint', [path, str(tmp_path / 'out.pth')]),
                       ('merge_lora', [cfg, path, str(tmp_path / 'merged.pth')])):
        def run(module=load_tool(tool), argv=[tool, *argv]):
            monkeypatch.setattr(sys, 'argv', argv)
            module.main()
        runs[tool] = run
    for name, run in runs.items():
        message = _exit_message(run)
        if case == 'missing' and name.startswith('init_cfg'):  # check_pretrained's line
            where = ('no download location is known for a custom arch' if 'dict' in name
                     else 'download it from https://huggingface.co/hustvl/Vim-tiny-midclstok')
            assert where in message and message.count('\n') == 0, (name, message)
        _check_line(message, path, case)
    assert not created.exists()
    assert not (tmp_path / 'out.pth').exists() and not (tmp_path / 'merged.pth').exists()


def test_one_line_in_a_real_process(bad, tiny_config):
    """As a user sees it: exit code 1, the line on stderr once, no traceback."""
    paths, created = bad
    cfg, root = tiny_config
    for argv, case in ((['tools/test.py', cfg, paths['system'], '--work-dir', str(root / 'w')],
                        'system'),):
        proc = subprocess.run([PY, *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert 'Traceback' not in proc.stderr + proc.stdout, proc.stderr[-2000:]
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith('error:')]
        assert len(errors) == 1, proc.stderr[-2000:]
        _check_line(errors[0], paths[case], case)
    assert not created.exists()


def test_check_pretrained_dict_arch(tmp_path):
    """A missing pretrained file with a dict arch (the demo config) is the intended line."""
    from mmengine.config import Config

    from memba_vision.engine.runner_utils import check_pretrained
    cfg = Config.fromfile(f'{ROOT}/configs/demo/vim_tiny_memba_synthetic.py')
    path = str(tmp_path / 'absent.pth')
    cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint=path)
    with pytest.raises(FileNotFoundError, match='no download location is known for a custom '
                       'arch') as e:
        check_pretrained(cfg)
    assert path in str(e.value)
    cfg.model.backbone.arch = 'small'
    with pytest.raises(FileNotFoundError, match='download it from https://huggingface.co/hustvl/'
                       'Vim-small-midclstok'):
        check_pretrained(cfg)


def _history_buffer_checkpoint(path):
    from mmengine.logging import HistoryBuffer
    buffer = HistoryBuffer()
    buffer.update(0.5)
    torch.save({'state_dict': {'w': torch.ones(2)}, 'message_hub': {'loss': buffer}}, path)


def test_allow_list_is_scoped(tmp_path):
    """Importing memba_vision changes neither torch.load nor the warning filters; the
    allow-list (e.g. getattr for mmengine's HistoryBuffer) holds only inside our loads."""
    path = tmp_path / 'hub.pth'
    _history_buffer_checkpoint(path)
    script = f"""
import warnings, pickle, torch
filters = list(warnings.filters)
import memba_vision
from memba_vision.utils import load_checkpoint_file
assert warnings.filters == filters, 'importing memba_vision changed the warning filters'
def ours():
    return [g for g in torch.serialization.get_safe_globals()
            if any(n in repr(g) for n in ('memba_vision', 'history_buffer', 'Namespace'))]
assert not ours(), f'allow-list changed process-wide: {{ours()}}'
ckpt = load_checkpoint_file({str(path)!r})
assert float(ckpt['message_hub']['loss'].current()) == 0.5
assert not ours(), f'allow-list left behind: {{ours()}}'
try:
    torch.load({str(path)!r}, weights_only=True)
except pickle.UnpicklingError as e:
    print('plain torch.load refused:', 'getattr' in str(e) or 'HistoryBuffer' in str(e))
else:
    print('plain torch.load accepted it')
"""
    proc = subprocess.run([PY, '-c', script], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == 'plain torch.load refused: True', proc.stdout


def test_getattr_stand_in_refuses_other_uses(tmp_path):
    """Inside our loads, getattr is the stand-in: anything but HistoryBuffer's statistics
    methods is refused."""
    path = str(tmp_path / 'getattr.pth')

    from mmengine.logging import HistoryBuffer

    class _GetAttr:
        def __reduce__(self):
            return getattr, (HistoryBuffer, '__init__')
    torch.save({'state_dict': {}, 'x': _GetAttr()}, path)
    with pytest.raises(CheckpointError, match="refused: it asks for getattr\\(type, '__init__'\\)"):
        load_checkpoint_file(path)
