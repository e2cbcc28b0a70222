"""Projected (and, with data, measured) wall time of a full 19-task VTAB-1k sweep.

    python tools/benchmark_sweep.py                        # Vim-S Memba on this GPU
    python tools/benchmark_sweep.py --backbone-method vmamba_s_memba --gpus 8
    python tools/benchmark_sweep.py --data-root data/vtab-1k --task dsprites_loc

Costs measured here, with the VTAB settings (bf16 autocast for training and
testing, CUDA graphs, generated 224x224 inputs): the training step at batch 32
and at the last batch of an epoch
(1,000 = 31 x 32 + 8), evaluation images/s at the test batch size, the fixed
cost of one task (model build; graph capture) and a process start, which
tools/sweep.py pays once per GPU (a GPU trains and tests its tasks in one
``tools/train.py --serve`` process). The sweep is then laid out as tools/sweep.py
runs it (one task per GPU, longest test set first) over the real sizes: 1,000
training images x 100 epochs per task and the test sizes of the task table.

With ``--data-root`` the tool also trains one task for five epochs through the
real loop (``tools/train.py``'s Runner: data loading, hooks, logging, checkpoints)
and times the second one on the GPU's timeline, from its start to the third's (no
synchronisation of the tool's own in between); its excess over the bare steps is the
GPU idle time of the loop, and the projection uses it instead of the bare epoch, plus
one checkpoint save per checkpoint interval (``save_cost``: the third epoch, which
saves one, and the fourth, which trains while the file is written behind it, less
two plain epochs).
"""
import argparse
import math
import os
import os.path as osp
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402

TRAIN_IMAGES, EPOCHS, TRAIN_BATCH, TEST_BATCH = 1000, 100, 32, 64


def bare_costs(backbone, method, device, warmup, reps):
    """Seconds: step at batch 32, step at the last batch, eval per image, model build, and
    the first step (graph capture included)."""
    from benchmark import build, measure
    t0 = time.perf_counter()
    model = build(backbone, method, device, tiny=device == 'cpu', cuda_graph=True)
    size = 64 if device == 'cpu' else 224
    amp = device == 'cuda'
    last = TRAIN_IMAGES % TRAIN_BATCH or TRAIN_BATCH
    if device == 'cuda':
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    full = measure(model, TRAIN_BATCH, size, amp, device, warmup, reps)
    t_last = measure(model, last, size, amp, device, warmup, reps).step
    # tests run in the training precision (bf16 autocast on a GPU, see set_precision)
    te64 = measure(model, TEST_BATCH, size, amp, device, 1, 2).eval if device == 'cuda' \
        else full.eval
    return full.step, t_last, te64 / TEST_BATCH, build_s, full.first_step


def process_start_cost():
    """Seconds to start Python and import the stack, timed on the second of two starts:
    the first one in a fresh environment also compiles every module's bytecode, which a
    sweep pays once, not per task."""
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, '-c', 'import torch, mmpretrain, memba_vision'],
                       check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return times[-1]


def _epoch_timer():
    """An mmengine hook splitting each training epoch's wall time, without synchronising
    with the GPU inside the run.

    ``total``: the GPU's timeline from one epoch's start to the next one's (a CUDA event
    recorded as the host starts each epoch, the last one after training, then one
    synchronisation), so the GPU's idle time between two epochs counts as it does in a
    sweep, and the epoch's own synchronisations are the loop's. Host time inside it:
    ``iters`` from each before_train_iter hook to its after_train_iter hook (preprocessing,
    queueing the step, logging, and any wait the loop itself makes for the GPU); ``data``
    between iterations (the next batch); ``end``: the epoch-end hooks (checkpoint).
    """
    from mmengine.hooks import Hook
    cuda = torch.cuda.is_available()

    class EpochTimer(Hook):
        priority = 'LOWEST'

        def __init__(self):
            self.epochs, self._starts = [], []

        def _mark(self):
            if cuda:
                self._starts.append(torch.cuda.Event(enable_timing=True))
                self._starts[-1].record()
            else:
                self._starts.append(time.perf_counter())

        def before_train_epoch(self, runner):
            self._mark()
            self._last = time.perf_counter()
            self._iters = self._data = 0.0

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            t = time.perf_counter()
            self._data += t - self._last
            self._t = t

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            self._last = time.perf_counter()
            self._iters += self._last - self._t

        def after_train_epoch(self, runner):
            t = time.perf_counter()  # hooks before this one (checkpoint) have run
            self.epochs.append(dict(iters=self._iters, data=self._data, end=t - self._last))

        def after_train(self, runner):
            self._mark()
            if cuda:
                torch.cuda.synchronize()
            for epoch, a, b in zip(self.epochs, self._starts, self._starts[1:]):
                epoch['total'] = a.elapsed_time(b) / 1e3 if cuda else b - a

    return EpochTimer()


def write_standin_pretrained(cfg, path):
    """Writes the weights of a randomly built backbone of ``cfg`` as a pretrained file."""
    import memba_vision  # noqa: F401  (registers the backbones)
    from mmpretrain.registry import MODELS
    backbone = MODELS.build(dict(cfg.model.backbone, init_cfg=None))
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    torch.save({'model': backbone.state_dict()}, path)
    return path


def save_cost(epochs):
    """Seconds a checkpoint save adds to training, from the measured epochs (``total``): the
    third epoch saves one, the fourth trains while it is written in the background; each
    is compared with the second, a plain epoch (the first captures the graphs)."""
    plain = epochs[1]['total']
    return sum(max(0.0, e['total'] - plain) for e in epochs[2:4])


def measured_epoch(backbone_method, data_root, task, work_dir, epochs=5):
    """The epochs of a short run of ``task`` through the Runner tools/train.py uses, each
    split by ``_epoch_timer`` (the first one captures the graphs; the third and the last
    save a checkpoint, the fourth follows a save); and the config's checkpoint interval."""
    from memba_vision.datasets.vtab1k_tasks import get_task
    from memba_vision.engine import SafeLoadRunner
    from memba_vision.engine.runner_utils import load_config, set_precision
    root = osp.dirname(osp.dirname(osp.abspath(__file__)))
    cfg = load_config(osp.join(root, 'configs', 'vtab1k', f'{backbone_method}_{task}.py'),
                      work_dir=work_dir)
    # A sweep starts from a pretrained file, so its checkpoints hold only the trainable
    # tensors (PEFTCheckpointHook); a randomly built backbone stands in for that file.
    pretrained = write_standin_pretrained(cfg, osp.join(work_dir, 'pretrained.pth'))
    cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint=pretrained)
    cfg.train_dataloader.dataset.data_root = data_root
    cfg.test_dataloader.dataset.data_root = data_root
    cfg.model.head.num_classes = get_task(task).num_classes
    cfg.train_cfg.max_epochs = epochs
    interval = cfg.default_hooks.checkpoint.interval
    cfg.default_hooks.checkpoint.interval = 3  # epoch 3 saves; epoch 4 trains during its write
    set_precision(cfg)  # the config's bf16 autocast (fp32 on a CPU machine)
    runner = SafeLoadRunner.from_cfg(cfg)
    timer = _epoch_timer()
    runner.register_hook(timer)
    runner.train()
    n = len(runner.train_dataloader.dataset)
    return timer.epochs, interval, n


def schedule(durations, gpus):
    """Longest first onto the least-loaded GPU; returns the makespan."""
    loads = [0.0] * gpus
    for d in sorted(durations, reverse=True):
        i = loads.index(min(loads))
        loads[i] += d
    return max(loads)


def fmt(s):
    return f'{s / 60:6.1f} min' if s >= 60 else f'{s:6.1f} s  '


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--backbone-method', default='vim_s_memba',
                   help='config family, e.g. vim_s_memba or vmamba_s_lora (default: %(default)s)')
    p.add_argument('--gpus', type=int, default=1)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--data-root', help='VTAB-1k root: also time one real training epoch')
    p.add_argument('--task', default='dsprites_loc', help='task for the measured epoch')
    p.add_argument('--write-pretrained', metavar='PATH',
                   help='only write a stand-in pretrained file (a random backbone of '
                        '--backbone-method) to PATH, e.g. for tools/gpu_check.sh')
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--reps', type=int, default=20)
    args = p.parse_args()
    if args.write_pretrained:
        from memba_vision.engine.runner_utils import load_config
        root = osp.dirname(osp.dirname(osp.abspath(__file__)))
        cfg = load_config(osp.join(root, 'configs', 'vtab1k',
                                   f'{args.backbone_method}_{args.task}.py'))
        print(f'stand-in pretrained backbone: '
              f'{write_standin_pretrained(cfg, args.write_pretrained)}')
        return
    from memba_vision.datasets.vtab1k_tasks import VTAB1K_TASKS
    backbone, method = None, None
    for b in ('vim_s', 'vmamba_s'):
        if args.backbone_method.startswith(b + '_'):
            backbone, method = b, args.backbone_method[len(b) + 1:]
    if backbone is None:
        raise SystemExit(f'error: --backbone-method must start with vim_s_ or vmamba_s_, '
                         f'got {args.backbone_method!r}')
    if args.data_root and args.device != 'cuda':
        raise SystemExit('error: --data-root times a real Vim-S/VMamba-S epoch, which needs a GPU')
    if args.device == 'cpu':
        print('device: cpu (tiny architectures: a smoke run of the tool, not a projection)')
    else:
        print(f'device: {torch.cuda.get_device_name()}, torch {torch.__version__}')

    t32, t_last, t_eval_img, build_s, first_s = bare_costs(backbone, method, args.device,
                                                           args.warmup, args.reps)
    start_s = process_start_cost()
    iters = math.ceil(TRAIN_IMAGES / TRAIN_BATCH)
    epoch_bare = (iters - 1) * t32 + t_last
    epoch = epoch_bare
    print(f'training step: {t32 * 1e3:.1f} ms at batch {TRAIN_BATCH} '
          f'({TRAIN_BATCH / t32:.0f} img/s), {t_last * 1e3:.1f} ms at the last batch of '
          f'{TRAIN_IMAGES % TRAIN_BATCH}; bare epoch {epoch_bare:.2f} s')
    print(f'evaluation: {1 / t_eval_img:.0f} img/s at batch {TEST_BATCH}')
    fixed = build_s + first_s
    print(f'fixed: per task, model build {build_s:.1f} s and first step with graph capture '
          f'{first_s:.1f} s; per GPU, 1 process start (tools/train.py --serve) {start_s:.1f} s')
    if args.data_root:
        with tempfile.TemporaryDirectory() as wd:
            epochs, interval, n = measured_epoch(args.backbone_method, args.data_root,
                                                 args.task, wd)
        real = epochs[1]
        idle = 1 - epoch_bare / real['total']
        print(f'measured epoch ({args.task}, {n} images, real loop): {real["total"]:.2f} s vs '
              f'bare {epoch_bare:.2f} s, so the GPU idles {100 * idle:.0f}% of the loop; host '
              f'time in iterations {real["iters"]:.2f} s, between them (data) '
              f'{real["data"]:.2f} s, epoch-end hooks (checkpoint) {real["end"]:.2f} s')
        save = save_cost(epochs)
        print(f'checkpoint save: {save:.2f} s (trainable tensors; the saving epoch and the next '
              f'one against a plain one), every {interval} epochs')
        epoch = real['total'] * TRAIN_IMAGES / n + save / interval
    else:
        print('loop overhead not measured (no --data-root): bare steps only')
    print(f'\n{"task":<22} {"test":>6} {"train":>10} {"test":>10} {"total":>10}')
    durations, tot_train, tot_test = [], 0.0, 0.0
    for name, task in VTAB1K_TASKS.items():
        train_s = EPOCHS * epoch
        test_s = task.num_test * t_eval_img
        total = train_s + test_s + fixed
        tot_train, tot_test = tot_train + train_s, tot_test + test_s
        durations.append(total)
        print(f'{name:<22} {task.num_test:>6} {fmt(train_s):>10} {fmt(test_s):>10} '
              f'{fmt(total):>10}')
    serial = sum(durations) + start_s
    wall = schedule(durations, args.gpus) + start_s  # the GPUs start together
    fixed_all = fixed * len(durations) + start_s
    print(f'\nwhere the time goes (all tasks, one GPU): training {fmt(tot_train)} '
          f'({100 * tot_train / serial:.0f}%), testing {fmt(tot_test)} '
          f'({100 * tot_test / serial:.0f}%), fixed costs {fmt(fixed_all)} '
          f'({100 * fixed_all / serial:.0f}%)')
    print(f'{args.backbone_method}: projected 19-task sweep on {args.gpus} GPU(s): '
          f'{wall / 60:.1f} min')


if __name__ == '__main__':
    sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
    main()
