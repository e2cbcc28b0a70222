import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import memba_vision  # noqa: E402,F401  registers modules

# Tiny architectures shared by the tests (fast on a 2-core CPU).
TINY_VIM = dict(embed_dims=32, depth=3, d_state=4)
TINY_VMAMBA = dict(dims=16, depths=[1, 2, 1], d_state=4)



def output_and_input_grad(fn, x, *args, seed=1):
    """fn(x, *args)'s output and x's gradient for a fixed random cotangent."""
    x = x.detach().clone().requires_grad_()
    out = fn(x, *args)
    g = torch.Generator().manual_seed(seed)
    cot = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    dx, = torch.autograd.grad(out, [x], cot)
    return out.detach(), dx


def load_tool(name):
    """The module of ``tools/<name>.py``, imported from its file (tools/ is no package)."""
    spec = importlib.util.spec_from_file_location(f'tool_{name}',
                                                  os.path.join(ROOT, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def snapshot(root):
    """{path relative to ``root``: (bytes, mtime in ns)} of every file below ``root``."""
    files = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, 'rb') as f:
                files[os.path.relpath(p, root)] = (f.read(), os.stat(p).st_mtime_ns)
    return files


def write_tiny_config(root, tasks, num_train, num_val, num_test, size=32, embed_dims=32,
                      depth=2, lora=8, gate=None, batch_size=None, extra=''):
    """Writes synthetic tasks to ``root/data`` and, to ``root/tiny.py``, the demo config shrunk
    to a tiny Memba Vim on them (no loader workers); ``extra``: config lines appended.
    Returns (config path, data root)."""
    data = root / 'data'
    subprocess.run([sys.executable, 'tools/prepare_vtab1k.py', '--synthetic', '--out', str(data),
                    '--tasks', *tasks, '--num-train', str(num_train), '--num-val', str(num_val),
                    '--num-test', str(num_test), '--size', str(size)], cwd=ROOT, check=True,
                   capture_output=True)
    batch = '' if batch_size is None else f'batch_size={batch_size}, '
    cfg = root / 'tiny.py'
    cfg.write_text(f"""
_base_ = ['{ROOT}/configs/demo/vim_tiny_memba_synthetic.py']
data_root = '{data}'
pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
model = dict(backbone=dict(arch=dict(embed_dims={embed_dims}, depth={depth}, d_state=4),
                           img_size={size}, peft=dict(lora=dict(in_proj={lora}, out_proj={lora}),
                                                      gate={gate or dict(rank=4)!r})),
             head=dict(in_channels={embed_dims}))
train_dataloader = dict({batch}num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=pipeline))
test_dataloader = dict({batch}num_workers=0, dataset=dict(data_root=data_root, pipeline=pipeline))
""" + extra)
    return str(cfg), data


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def toy_runner(work_dir, hooks=(), resume=False, frozen_backbone=False):
    """A 3-epoch, 2-iteration-per-epoch CPU run saving every epoch, keeping one checkpoint.
    ``frozen_backbone``: a frozen layer marked as loaded from a pretrained file before the
    trained one, as a PEFT model's."""
    from mmengine.model import BaseModel
    from memba_vision.engine import SafeLoadRunner as Runner  # what the tools run

    class Toy(BaseModel):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(2, 1)
            self.backbone = torch.nn.Linear(2, 2) if frozen_backbone else torch.nn.Identity()
            if frozen_backbone:
                self.backbone.requires_grad_(False)
                self.backbone.init_cfg = dict(type='Pretrained', checkpoint='backbone.pth')

        def forward(self, inputs, mode='loss'):
            return dict(loss=self.fc(self.backbone(inputs)).pow(2).mean())

    data = [dict(inputs=torch.randn(2)) for _ in range(4)]
    return Runner(model=Toy(), work_dir=str(work_dir), default_scope='mmpretrain',
                  train_dataloader=dict(dataset=data, batch_size=2,
                                        collate_fn=dict(type='default_collate'),
                                        sampler=dict(type='DefaultSampler', shuffle=False)),
                  optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
                  train_cfg=dict(by_epoch=True, max_epochs=3),
                  default_hooks=dict(checkpoint=dict(type='AtomicCheckpointHook', interval=1,
                                                     max_keep_ckpts=1)),
                  custom_hooks=list(hooks), resume=resume,
                  experiment_name='resumed' if resume else 'first')
