"""Training-step and evaluation speed of the PEFT methods on generated inputs.

    python tools/benchmark.py                       # Vim-S and VMamba-S, LoRA and Memba, GPU
    python tools/benchmark.py --models vim_s --batch-sizes 32 --precisions bf16
    python tools/benchmark.py --models vim_s --methods all --batch-sizes 32 --precisions bf16
    python tools/benchmark.py --device cpu          # tiny smoke run
    python tools/benchmark.py --models vim_s --batch-sizes 32 --precisions bf16 \
        --modes graph eager --profile \
        --baseline "python third_party/baselines/official_vim_step.py third_party/vim"

For each backbone, method (any with a configs/_base_/models/<backbone>_<method>.py; ``all``:
every one; default lora and memba), batch size, precision and mode (``graph``:
the configs' setting, CUDA-graph replay of the backbone; ``eager``): the time of one training step
(forward, backward and the VTAB schedule's fused AdamW on the trainable tensors; CUDA events,
median after warm-up), images/s, peak GPU memory, and evaluation images/s. No dataset or
weights are needed. ``--profile`` adds, for every batch-32 bf16 row, the
GPU busy time per step, the kernel launches per step and the top kernels.
``--baseline CMD`` runs a baseline script in the same run (one that prints
``bs 32 amp True: train step X ms = Y img/s ...`` lines, like the official-code
timer) and reports every Vim-S method's speed-up against it. The last line compares Memba
(fused) with LoRA at batch 32, bf16 on a GPU (the run's own first setting on
the CPU).
"""
import argparse
import gc
import os
import os.path as osp
import re
import shlex
import statistics
import subprocess
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from typing import NamedTuple, Optional  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

METHODS = ('lora', 'memba')  # the default methods
MODELS_DIR = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'configs', '_base_',
                      'models')


def methods_of(backbone: str) -> list:
    """The methods with a _base_ model file for ``backbone``, in file-name order."""
    prefix = backbone + '_'
    return sorted(f[len(prefix):-3] for f in os.listdir(MODELS_DIR)
                  if f.startswith(prefix) and f.endswith('.py'))
TOP_KERNELS = 20  # kernels listed per profiled row
TINY = {'vim_s': dict(embed_dims=64, depth=2, d_state=8),
        'vmamba_s': dict(dims=16, depths=[1, 1, 1, 1], d_state=8)}


def build(backbone, method, device, tiny, cuda_graph=True):
    import memba_vision  # noqa: F401
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    root = osp.dirname(osp.dirname(osp.abspath(__file__)))
    cfg = Config.fromfile(osp.join(root, 'configs', '_base_', 'models', f'{backbone}_{method}.py'))
    model_cfg = cfg.model.copy()
    model_cfg.backbone = dict(model_cfg.backbone, init_cfg=None, cuda_graph=cuda_graph)
    model_cfg.head = dict(model_cfg.head, num_classes=100)
    if tiny:
        model_cfg.backbone = dict(model_cfg.backbone, arch=TINY[backbone], img_size=64)
        model_cfg.head.in_channels = 64 if backbone == 'vim_s' else 128
        peft = model_cfg.backbone.get('peft')
        if isinstance(peft, dict) and peft.get('lora'):  # ranks that fit the tiny widths
            cap = 16 if backbone == 'vim_s' else 8
            peft = dict(peft, lora={k: min(v, cap) if isinstance(v, int) else v
                                    for k, v in peft['lora'].items()})
            model_cfg.backbone.peft = peft
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


def profile_steps(step, steps=5):
    """(GPU busy ms per step, kernel launches per step, top kernels) of ``step``."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1e3 / steps
    by_name = {}  # name -> [ms per step, launches per step]
    for e in kernels:
        acc = by_name.setdefault(e.name, [0.0, 0.0])
        acc[0] += e.device_time / 1e3 / steps
        acc[1] += 1 / steps
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:TOP_KERNELS]
    return busy, len(kernels) / steps, top


class Measured(NamedTuple):
    step: float             # median training-step seconds after warm-up
    peak: float             # peak GiB allocated (nan on the CPU)
    eval: float             # median evaluation seconds per batch
    profile: Optional[tuple]  # profile_steps(), when asked for
    first_step: float       # wall seconds of the first step (CUDA-graph capture included)


def schedule_optimizer(params):
    """The optimizer of the VTAB schedule (configs/_base_/schedules/vtab1k_100e.py) on
    ``params``, in one parameter group: the update the configs train with."""
    from mmengine.config import Config
    root = osp.dirname(osp.dirname(osp.abspath(__file__)))
    kwargs = dict(Config.fromfile(osp.join(root, 'configs', '_base_', 'schedules',
                                           'vtab1k_100e.py')).optim_wrapper.optimizer)
    return getattr(torch.optim, kwargs.pop('type'))(params, **kwargs)


def measure(model, batch, size, amp, device, warmup, reps, profile=False) -> Measured:
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    opt = schedule_optimizer([p for p in model.parameters() if p.requires_grad])
    ctx = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if amp else \
        (lambda: torch.autocast(device, enabled=False))
    model.train()
    if device == 'cuda':  # graphs of earlier settings would count towards this peak
        model.backbone.reset_cuda_graphs()
        gc.collect()
        torch.cuda.empty_cache()

    def step():
        with ctx():
            loss = F.cross_entropy(model(x, mode='tensor'), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()  # the first step captures the graphs; it counts as one warm-up step
    if device == 'cuda':
        torch.cuda.synchronize()
    t_first = time.perf_counter() - t0
    t_train = timed(step, device, max(0, warmup - 1), reps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == 'cuda' else float('nan')
    prof = profile_steps(step) if profile and device == 'cuda' else None
    model.eval()

    def evaluate():
        with torch.no_grad(), ctx():
            model(x, mode='tensor')

    t_eval = timed(evaluate, device, max(1, warmup // 2), max(2, reps // 2))
    return Measured(t_train, peak, t_eval, prof, t_first)


def run_baseline(cmd):
    """{(batch, bf16): (step seconds, eval img/s, peak GiB or None)} parsed from a baseline
    script's output (the official Vim-S and Vanilla-VMamba-S timers' lines)."""
    res = subprocess.run(shlex.split(cmd), capture_output=True, text=True)
    if res.returncode:
        print(f'baseline failed (exit {res.returncode}):\n{res.stderr[-2000:]}')
        return {}
    out = {}
    for m in re.finditer(r'bs (\d+) amp (True|False): train step ([\d.]+) ms = \d+ img/s, '
                         r'eval (\d+) img/s(?:, peak ([\d.]+) GiB)?', res.stdout):
        out[(int(m[1]), m[2] == 'True')] = (float(m[3]) / 1e3, float(m[4]),
                                            float(m[5]) if m[5] else None)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--models', nargs='+', default=['vim_s', 'vmamba_s'], choices=['vim_s', 'vmamba_s'])
    p.add_argument('--methods', nargs='+', default=list(METHODS),
                   help='methods with a configs/_base_/models/<model>_<method>.py, or all')
    p.add_argument('--batch-sizes', nargs='+', type=int)
    p.add_argument('--precisions', nargs='+', choices=['fp32', 'bf16'])
    p.add_argument('--modes', nargs='+', choices=['graph', 'eager'],
                   help='graph: CUDA-graph replay (the configs\' setting); eager (default: graph)')
    p.add_argument('--profile', action='store_true',
                   help='GPU busy time and kernel launches per step of the b32 bf16 rows')
    p.add_argument('--baseline', metavar='CMD',
                   help='baseline timer to run in the same process tree, e.g. '
                        '"python third_party/baselines/official_vim_step.py third_party/vim"')
    p.add_argument('--warmup', type=int)
    p.add_argument('--reps', type=int)
    args = p.parse_args()
    for backbone in args.models:
        known = methods_of(backbone)
        unknown = [m for m in args.methods if m != 'all' and m not in known]
        if unknown:
            p.error(f'{backbone} has no method {unknown[0]!r} (configs/_base_/models/'
                    f'{backbone}_*.py: {", ".join(known)})')
    cpu = args.device == 'cpu'
    batches = args.batch_sizes or ([4] if cpu else [32, 128])
    precisions = args.precisions or (['fp32'] if cpu else ['fp32', 'bf16'])
    warmup = args.warmup if args.warmup is not None else (1 if cpu else 5)
    reps = args.reps or (2 if cpu else 20)
    size = 64 if cpu else 224
    modes = args.modes or ['graph']
    if not cpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(f'device: {torch.cuda.get_device_name()}, torch {torch.__version__}')
    else:
        print(f'device: cpu (tiny architectures, {size}x{size} inputs: a smoke run only)')
    baseline = {}
    if args.baseline and not cpu:
        baseline = run_baseline(args.baseline)
        for (bs, amp), (t, ev, peak) in sorted(baseline.items()):
            print(f'baseline bs {bs} {"bf16" if amp else "fp32"}: step {t * 1e3:.1f} ms, '
                  f'{bs / t:.0f} img/s, eval {ev:.0f} img/s'
                  + (f', peak {peak:.2f} GiB' if peak else ''))
    by_key, profiles = {}, []
    header = (f'{"model":<9} {"method":<16} {"mode":<5} {"batch":>5} {"prec":>5} '
              f'{"step ms":>9} {"train img/s":>11} {"peak GiB":>9} {"eval img/s":>10}')
    print(header)
    print('-' * len(header))
    for backbone in args.models:
        methods = methods_of(backbone) if 'all' in args.methods else args.methods
        for method in methods:
            for mode in modes:
                torch.manual_seed(0)
                model = build(backbone, method, args.device, cpu, cuda_graph=mode == 'graph')
                for batch in batches:
                    for prec in precisions:
                        want_prof = args.profile and batch == 32 and prec == 'bf16'
                        t, peak, te, prof, _ = measure(model, batch, size, prec == 'bf16',
                                                       args.device, warmup, reps, want_prof)
                        by_key[(backbone, method, mode, batch, prec)] = (t, peak, batch / te)
                        line = (f'{backbone:<9} {method:<16} {mode:<5} {batch:>5} {prec:>5} '
                                f'{t * 1e3:>9.1f} {batch / t:>11.0f} {peak:>9.2f} '
                                f'{batch / te:>10.0f}')
                        print(line, flush=True)
                        if prof:
                            profiles.append((f'{backbone} {method} {mode} b{batch} {prec}', t,
                                             prof))
                del model
                gc.collect()
                if not cpu:
                    torch.cuda.empty_cache()
    for name, t, (busy, launches, top) in profiles:
        print(f'\nprofile {name}: step {t * 1e3:.1f} ms, GPU busy {busy:.1f} ms '
              f'({100 * busy / (t * 1e3):.0f}%), {launches:.0f} kernel launches per step')
        for kname, (ms, calls) in top:
            print(f'  {ms:7.2f} ms {calls:5.0f}x  {kname[:100]}')
    base = baseline.get((32, True))
    if base and not cpu:  # the baseline times the first model's official code
        for (backbone, label, mode, batch, prec), mine in by_key.items():
            if (backbone, mode, batch, prec) == (args.models[0], modes[0], 32, 'bf16'):
                t, peak, eval_ips = mine
                print(f'speed-up vs baseline, {backbone} {label} b32 bf16 ({modes[0]}): train '
                      f'{base[0] / t:.2f}x ({32 / t:.0f} vs {32 / base[0]:.0f} img/s), eval '
                      f'{eval_ips / base[1]:.2f}x' + (f', peak memory {peak / base[2]:.2f}x'
                                                      if base[2] else ''))
    ref = (modes[0], batches[0] if cpu else 32, precisions[0] if cpu else 'bf16')
    for backbone in args.models:
        lora = by_key.get((backbone, 'lora', *ref))
        memba = by_key.get((backbone, 'memba', *ref))
        if lora and memba:
            print(f'{backbone} ratio memba/lora: step time {memba[0] / lora[0]:.3f}, '
                  f'peak memory {memba[1] / lora[1]:.3f} (batch {ref[1]}, {ref[2]}, {ref[0]})')
    backbone = args.models[0]
    lora, memba = by_key.get((backbone, 'lora', *ref)), by_key.get((backbone, 'memba', *ref))
    if lora and memba:
        print(f'ratio memba/lora: step time {memba[0] / lora[0]:.3f}, '
              f'peak memory {memba[1] / lora[1]:.3f}')


if __name__ == '__main__':
    main()
