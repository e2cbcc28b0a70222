"""One rank of the data-parallel tests (tests/test_data_parallel.py), started once per rank
with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set:

    python tests/dist_worker.py CASE BACKEND OUT_DIR

It trains the CASE model for a few steps through ``PostBackwardDataParallel`` on this rank's
half of each global batch and saves the trainable parameters after every step to
OUT_DIR/rank<r>.pt. ``reference(CASE, device)`` runs the same steps in one process on the
whole batches.
"""
import os
import os.path as osp
import sys

import torch
from torch import nn

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.model import BaseModel  # noqa: E402
from mmengine.optim import OptimWrapper  # noqa: E402

STEPS = 4
HALF = 3  # samples per rank and step


class ToyModel(BaseModel):
    """y = x W + c (+ b for the samples whose flag is set); ``unused`` never takes part."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(4, 3, generator=g))
        self.b = nn.Parameter(torch.randn(3, generator=g))
        self.unused = nn.Parameter(torch.randn(2, generator=g))
        self.c = nn.Parameter(torch.randn(3, generator=g), requires_grad=False)

    def forward(self, inputs, flags, targets, mode='loss'):
        y = inputs @ self.w + self.c
        if bool(flags.any()):  # data-dependent: a rank whose batch has no flag skips b
            y = y + flags[:, None] * self.b
        return dict(loss=((y - targets) ** 2).mean())


def toy_batches(device):
    """STEPS global batches of 2 * HALF samples; only rank 0's half ever sets a flag."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        flags = torch.zeros(2 * HALF)
        flags[:HALF] = (torch.rand(HALF, generator=g) > 0.3).float()
        flags[0] = 1.0
        batches.append(dict(inputs=torch.randn(2 * HALF, 4, generator=g).to(device),
                            flags=flags.to(device),
                            targets=torch.randn(2 * HALF, 3, generator=g).to(device)))
    return batches


def vim_model(cuda_graph=False):
    from mmpretrain.registry import MODELS
    import memba_vision  # noqa: F401
    torch.manual_seed(0)
    model = MODELS.build(dict(
        type='ImageClassifier',
        data_preprocessor=dict(type='ClsDataPreprocessor', mean=[127.5] * 3, std=[64.0] * 3),
        backbone=dict(type='Vim', arch=dict(embed_dims=32, depth=2, d_state=16), img_size=16,
                      patch_size=8, drop_path_rate=0.0, cuda_graph=cuda_graph,
                      peft=dict(lora=dict(in_proj=4, out_proj=4, dropout=0.0),
                                gate=dict(rank=16, num_chunks=2, leak=0.5, threshold=1.0))),
        neck=None,
        head=dict(type='LinearClsHead', num_classes=5, in_channels=32,
                  loss=dict(type='CrossEntropyLoss', loss_weight=1.0))))
    with torch.no_grad():  # LoRA's up-projections start at zero: make every term count
        for name, p in model.named_parameters():
            if 'lora_up' in name:
                p.normal_(0, 0.05)
    return model


def vim_batches(device):
    from mmpretrain.structures import DataSample
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        images = torch.randint(0, 256, (2 * HALF, 3, 16, 16), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 5, (2 * HALF,), generator=g)
        batches.append(dict(inputs=images.to(device),
                            data_samples=[DataSample().set_gt_label(int(v)) for v in labels]))
    return batches


def build(case, device):
    """(model, batches, optim wrapper) of a case, on ``device``."""
    if case.startswith('toy'):
        model, batches = ToyModel(), toy_batches(device)
    else:
        model, batches = vim_model(cuda_graph='graph' in case), vim_batches(device)
    model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.05)
    kwargs = {}
    if case != 'toy':  # small enough to clip, which must happen after the average ('toy'
        kwargs['clip_grad'] = dict(max_norm=0.5)  # has none: a wrong scale would not show)
    if 'accum' in case:
        kwargs['accumulative_counts'] = 2
    if 'bf16' in case:
        from memba_vision.engine import BF16OptimWrapper
        wrapper = BF16OptimWrapper(optimizer, **kwargs)
    else:
        wrapper = OptimWrapper(optimizer, **kwargs)
    return model, batches, wrapper


def half(batch, rank):
    part = slice(rank * HALF, (rank + 1) * HALF)
    return {k: v[part] for k, v in batch.items()}


def trainable(model):
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def reference(case, device):
    """The trainable parameters after every step of one process on the whole batches."""
    model, batches, wrapper = build(case, device)
    model.train()
    states = []
    for batch in batches:
        model.train_step(batch, wrapper)
        states.append(trainable(model))
    return states


def main():
    case, backend, out_dir = sys.argv[1:4]
    import torch.distributed as dist
    from memba_vision.engine import PostBackwardDataParallel
    rank = int(os.environ['RANK'])
    device = torch.device(f'cuda:{rank}' if backend == 'nccl' else 'cpu')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    model, batches, wrapper = build(case, device)
    if rank == 1:  # a different start on rank 1: the first step must broadcast rank 0's
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    ddp = PostBackwardDataParallel(model)
    ddp.train()
    states = []
    for batch in batches:
        ddp.train_step(half(batch, rank), wrapper)
        states.append(trainable(model))
    torch.save(dict(states=states,
                    frozen={n: p.detach().cpu() for n, p in model.named_parameters()
                            if not p.requires_grad}),
               osp.join(out_dir, f'rank{rank}.pt'))
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
