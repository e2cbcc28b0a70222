"""Training-step and evaluation speed of LoRA vs Memba on generated inputs.

    python tools/benchmark.py                       # Vim-S and VMamba-S on the GPU
    python tools/benchmark.py --models vim_s --batch-sizes 32 --precisions bf16
    python tools/benchmark.py --device cpu          # tiny smoke run

For each backbone, method (lora; memba with the reference LIM; memba with the
fused LIM), batch size and precision: the time of one training step (forward,
backward and AdamW on the trainable tensors; CUDA events, median after
warm-up), images/s, peak GPU memory, and evaluation images/s. No dataset or
weights are needed. The last line compares Memba (fused) with LoRA at batch 32,
bf16 on a GPU (the run's own first setting on the CPU).
"""
import argparse
import os
import os.path as osp
import statistics
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

METHODS = {  # label -> (config method, LIM backend or None for the default)
    'lora': ('lora', None),
    'memba (ref LIM)': ('memba', 'torch'),
    'memba': ('memba', None),
}
TINY = {'vim_s': dict(embed_dims=64, depth=2, d_state=8),
        'vmamba_s': dict(dims=16, depths=[1, 1, 1, 1], d_state=8)}


def build(backbone, method, device, tiny):
    import memba_vision  # noqa: F401
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    root = osp.dirname(osp.dirname(osp.abspath(__file__)))
    cfg = Config.fromfile(osp.join(root, 'configs', '_base_', 'models', f'{backbone}_{method}.py'))
    model_cfg = cfg.model.copy()
    model_cfg.backbone = dict(model_cfg.backbone, init_cfg=None)
    model_cfg.head = dict(model_cfg.head, num_classes=100)
    if tiny:
        model_cfg.backbone = dict(model_cfg.backbone, arch=TINY[backbone], img_size=64)
        model_cfg.head.in_channels = 64 if backbone == 'vim_s' else 128
        if backbone == 'vim_s':
            model_cfg.backbone.peft = dict(model_cfg.backbone.peft)
            model_cfg.backbone.peft['lora'] = dict(in_proj=16, out_proj=16)
        else:
            model_cfg.backbone.peft = dict(model_cfg.backbone.peft)
            model_cfg.backbone.peft['lora'] = dict(in_proj=8, out_proj=8)
    return MODELS.build(model_cfg).to(device)


def timed(fn, device, warmup, reps):
    """Median seconds of ``fn()`` (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == 'cuda':
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(model, batch, size, amp, device, warmup, reps):
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ctx = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if amp else \
        (lambda: torch.autocast(device, enabled=False))
    model.train()

    def step():
        with ctx():
            loss = F.cross_entropy(model(x, mode='tensor'), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t_train = timed(step, device, warmup, reps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == 'cuda' else float('nan')
    model.eval()

    def evaluate():
        with torch.no_grad(), ctx():
            model(x, mode='tensor')

    t_eval = timed(evaluate, device, max(1, warmup // 2), max(2, reps // 2))
    return t_train, peak, t_eval


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--models', nargs='+', default=['vim_s', 'vmamba_s'], choices=['vim_s', 'vmamba_s'])
    p.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS))
    p.add_argument('--batch-sizes', nargs='+', type=int)
    p.add_argument('--precisions', nargs='+', choices=['fp32', 'bf16'])
    p.add_argument('--warmup', type=int)
    p.add_argument('--reps', type=int)
    args = p.parse_args()
    cpu = args.device == 'cpu'
    batches = args.batch_sizes or ([4] if cpu else [32, 128])
    precisions = args.precisions or (['fp32'] if cpu else ['fp32', 'bf16'])
    warmup = args.warmup if args.warmup is not None else (1 if cpu else 5)
    reps = args.reps or (2 if cpu else 20)
    size = 64 if cpu else 224
    if not cpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(f'device: {torch.cuda.get_device_name()}, torch {torch.__version__}')
    else:
        print(f'device: cpu (tiny architectures, {size}x{size} inputs: a smoke run only)')
    rows, by_key = [], {}
    header = (f'{"model":<9} {"method":<16} {"batch":>5} {"prec":>5} {"step ms":>9} '
              f'{"train img/s":>11} {"peak GiB":>9} {"eval img/s":>10}')
    print(header)
    print('-' * len(header))
    for backbone in args.models:
        for label in args.methods:
            method, lim_backend = METHODS[label]
            torch.manual_seed(0)
            model = build(backbone, method, args.device, cpu)
            if lim_backend:
                os.environ['MEMBA_LIM_BACKEND'] = lim_backend
            else:
                os.environ.pop('MEMBA_LIM_BACKEND', None)
            for batch in batches:
                for prec in precisions:
                    t, peak, te = measure(model, batch, size, prec == 'bf16', args.device,
                                          warmup, reps)
                    by_key[(backbone, label, batch, prec)] = (t, peak)
                    line = (f'{backbone:<9} {label:<16} {batch:>5} {prec:>5} {t * 1e3:>9.1f} '
                            f'{batch / t:>11.0f} {peak:>9.2f} {batch / te:>10.0f}')
                    rows.append(line)
                    print(line, flush=True)
            os.environ.pop('MEMBA_LIM_BACKEND', None)
            del model
            if not cpu:
                torch.cuda.empty_cache()
    ref = (batches[0] if cpu else 32, precisions[0] if cpu else 'bf16')
    for backbone in args.models:
        lora = by_key.get((backbone, 'lora', *ref))
        memba = by_key.get((backbone, 'memba', *ref))
        if lora and memba:
            print(f'{backbone} ratio memba/lora: step time {memba[0] / lora[0]:.3f}, '
                  f'peak memory {memba[1] / lora[1]:.3f} (batch {ref[0]}, {ref[1]})')
    backbone = args.models[0]
    lora, memba = by_key.get((backbone, 'lora', *ref)), by_key.get((backbone, 'memba', *ref))
    if lora and memba:
        print(f'ratio memba/lora: step time {memba[0] / lora[0]:.3f}, '
              f'peak memory {memba[1] / lora[1]:.3f}')


if __name__ == '__main__':
    main()
