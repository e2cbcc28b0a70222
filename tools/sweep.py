"""Runs the 19 VTAB-1k tasks of one backbone/method on a node, one task per GPU at a time.

    python tools/sweep.py vim_s_memba --gpus 8                  # train, then test, every task
                                                                # (one process per GPU slot)
    python tools/sweep.py vim_s_memba --gpus 8 --mode test      # test the trained ones
    python tools/sweep.py vim_s --methods memba lora-in --gpus 8   # each method in turn,
                                                                # then one table of all
    python tools/sweep.py --config configs/demo/vim_tiny_memba_synthetic.py \
        --tasks dsprites_loc clevr_count --gpus 1 --work-root work_dirs/demo
    python tools/sweep.py vim_s_memba --only-task-index 3      # one task (tools/slurm_sweep.sh)

(``bash tools/dist_train.sh --sweep vim_s_memba 8`` calls this.) Tasks come from a
queue, longest first; each GPU slot takes the next task when its current one
ends. A slot trains and tests its tasks in one ``tools/train.py --serve`` process
(``--mode test``: one ``tools/test.py --serve`` process), started once (a failed
task ends it, and the slot's next task gets a new one), so the sweep pays the
start-up of Python, the stack and CUDA once per slot (GPU). Training skips a task
whose result file exists and resumes an interrupted one from its last checkpoint;
``--mode test`` tests every task whose training finished (its last epoch's checkpoint)
and replaces its result file.
``--cfg-options`` apply to training and testing; arguments after ``--`` go to
tools/train.py only. At the end the result table is written to the sweep's work
directory. ``--methods`` runs the sweep of each method of a backbone in turn, each
in its usual work root (``work_dirs/vtab1k/<backbone>_<method>``, under --work-root
if given), and writes one table of all of them to ``<backbone>_methods`` beside them.
"""
import argparse
import json
import os
import os.path as osp
import queue
import re
import subprocess
import sys
import threading
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

from memba_vision.datasets.vtab1k_tasks import VTAB1K_TASKS, get_task  # noqa: E402

# lines of the train/test logs worth echoing with --verbose: progress, results, errors
_PROGRESS = re.compile(r'Epoch\((train|test)\)|top-1|resumed epoch|Error|error:|Traceback')


def task_configs(args):
    """[(task, config path, extra train/test options, work dir)] for the sweep."""
    tasks = args.tasks or list(VTAB1K_TASKS)
    for t in tasks:
        if not (args.config and t not in VTAB1K_TASKS):  # --config: own tasks allowed
            get_task(t)
    out = []
    if args.config:
        stem = osp.splitext(osp.basename(args.config))[0]
        root = args.work_root or osp.join('work_dirs', stem)
        for t in tasks:
            wd = osp.join(root, t)
            opts = [f'train_dataloader.dataset.task={t}', f'test_dataloader.dataset.task={t}',
                    f'experiment.task={t}']
            if t in VTAB1K_TASKS:  # own data: the class count comes from the config or data
                opts.append(f'model.head.num_classes={get_task(t).num_classes}')
            out.append((t, args.config, opts, wd))
    else:
        root = args.work_root or osp.join('work_dirs', 'vtab1k', args.backbone_method)
        for t in tasks:
            cfg = osp.join(ROOT, 'configs', 'vtab1k', f'{args.backbone_method}_{t}.py')
            if not osp.isfile(cfg):
                raise SystemExit(f'error: no config {osp.relpath(cfg, ROOT)}; '
                                 f'BACKBONE_METHOD is e.g. vim_s_memba or vmamba_s_lora-in')
            out.append((t, cfg, [], osp.join(root, t)))
    # longest first: training is the same for every task, test sets differ a lot
    out.sort(key=lambda item: -(VTAB1K_TASKS[item[0]].num_test
                                if item[0] in VTAB1K_TASKS else 0))
    return out, root


def backbone_methods(backbone):
    """The methods with configs/vtab1k/<backbone>_<method>_<task>.py, sorted."""
    prefix = f'{backbone}_'
    methods = set()
    for name in os.listdir(osp.join(ROOT, 'configs', 'vtab1k')):
        if name.startswith(prefix) and name.endswith('.py'):
            method, _, task = name[len(prefix):-3].partition('_')
            if task in VTAB1K_TASKS:
                methods.add(method)
    return sorted(methods)


def method_plans(args):
    """[(method, items, work root)] of a --methods sweep, and the folder of its table."""
    valid = backbone_methods(args.backbone_method)
    unknown = [m for m in args.methods if m not in valid]
    if unknown:
        raise SystemExit(
            f'error: no configs/vtab1k/{args.backbone_method}_<method>_<task>.py for method(s) '
            f'{", ".join(unknown)}; valid methods of {args.backbone_method}: '
            f'{", ".join(valid) or "none (BACKBONE is e.g. vim_s or vmamba_s)"}')
    base = args.work_root or osp.join('work_dirs', 'vtab1k')
    plans = []
    for method in dict.fromkeys(args.methods):  # once each, in the order given
        name = f'{args.backbone_method}_{method}'
        items, root = task_configs(argparse.Namespace(
            **{**vars(args), 'backbone_method': name, 'work_root': osp.join(base, name)}))
        plans.append((method, items, root))
    return plans, osp.join(base, f'{args.backbone_method}_methods')


def trained_checkpoint(config, cfg_options, work_dir):
    """(the checkpoint of the last training epoch, '') or (None, why there is none)."""
    from mmengine.config import Config, DictAction

    from memba_vision.engine.runner_utils import final_checkpoint
    ckpt = final_checkpoint(work_dir)
    if ckpt is None:
        return None, f'no checkpoint in {work_dir}'
    cfg = Config.fromfile(config)
    if cfg_options:
        parser = argparse.ArgumentParser()
        parser.add_argument('--o', nargs='+', action=DictAction)
        cfg.merge_from_dict(parser.parse_args(['--o', *cfg_options]).o)
    last = f'epoch_{cfg.train_cfg.max_epochs}.pth'
    if osp.basename(ckpt) != last:
        return None, f'training stopped at {osp.basename(ckpt)}, before {last}'
    return ckpt, ''


class Sweep:
    def __init__(self, items, slots, mode, train_args, python, verbose=False, cfg_options=()):
        self.items, self.slots, self.mode, self.verbose = items, slots, mode, verbose  # slot = GPU
        self.cfg_options = list(cfg_options)
        self.train_args, self.python = train_args, python
        self.lock = threading.Lock()
        self.done, self.failed, self.skipped, self.durations = [], [], [], []
        self.running = {}
        self.workers = {}  # (slot, tool) -> the slot's tools/<tool> --serve process
        self.start = time.time()

    def log(self, msg):
        with self.lock:
            print(f'[sweep {time.strftime("%H:%M:%S")}] {msg}', flush=True)

    def progress(self):
        n = len(self.items)
        finished = len(self.done) + len(self.failed) + len(self.skipped)
        eta = ''
        if self.durations:
            per_task = sum(self.durations) / len(self.durations)
            remaining = n - finished
            eta = f', ETA {time.strftime("%H:%M:%S", time.gmtime(per_task * remaining / self.slots))}'
        return f'{finished}/{n} finished, {len(self.running)} running{eta}'

    def _echo(self, f, line, task):
        f.write(line)
        if self.verbose and _PROGRESS.search(line):
            print(f'  [{task}] {line.split(" - mmengine - INFO - ")[-1]}', end='', flush=True)

    def run_in_worker(self, slot, tool, argv, env, log_file, task):
        """Runs ``tools/TOOL ARGV`` (train.py or test.py) in the slot's --serve process of
        that tool (started when the slot has none); returns the run's exit code. A failed
        run ends the process."""
        proc = self.workers.get((slot, tool))
        if proc is None or proc.poll() is not None:
            proc = self.workers[slot, tool] = subprocess.Popen(
                [self.python, f'tools/{tool}', '--serve'], env=env, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, text=True)
        from memba_vision.engine.serving import SERVE_DONE
        with open(log_file, 'a') as f:
            f.write(f'\n$ tools/{tool} {" ".join(argv)}   (in process {proc.pid})\n')
            f.flush()
            try:
                proc.stdin.write(json.dumps(argv) + '\n')
                proc.stdin.flush()
            except BrokenPipeError:
                pass  # it died before reading: its output and exit code follow
            for line in proc.stdout:
                if line.startswith(SERVE_DONE):
                    code = int(line.split()[1])
                    if code:
                        proc.wait()
                    return code
                self._echo(f, line, task)
            return proc.wait() or 1  # the process ended without finishing the run

    def close_workers(self):
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.stdin.close()
                proc.wait()
        self.workers.clear()

    def run_task(self, slot, item):
        task, cfg, opts, wd = item
        from memba_vision.engine.runner_utils import result_path
        if self.mode == 'train' and osp.isfile(result_path(wd, task)):
            self.skipped.append(task)
            self.log(f'{task}: result exists, skipped ({self.progress()})')
            return
        os.makedirs(wd, exist_ok=True)
        gpu = slot
        # GPU `gpu` of those this process may use (e.g. the one Slurm gave an array job)
        visible = os.environ.get('CUDA_VISIBLE_DEVICES', '').split(',')
        device = visible[gpu] if len(visible) > gpu and visible[gpu] else str(gpu)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=device)
        log_file = osp.join(wd, 'sweep.log')
        t0 = time.time()
        self.running[task] = slot
        self.log(f'{task}: started on GPU {gpu} (log: {log_file})')
        opts = [*opts, *self.cfg_options]
        cfg_opts = ['--cfg-options', *opts] if opts else []
        ok = True
        if self.mode == 'train':  # train, then test, in the slot's train.py process
            argv = [cfg, '--work-dir', wd, '--resume', '--test', *self.train_args, *cfg_opts]
            ok = self.run_in_worker(slot, 'train.py', argv, env, log_file, task) == 0
            if ok and not osp.isfile(result_path(wd, task)):
                ok = False
                self.log(f'{task}: training ended without a result file in {wd}')
        else:  # test the final checkpoint in the slot's test.py process; the result file
            ckpt, why = trained_checkpoint(cfg, [*opts], wd)  # is replaced atomically
            if ckpt is None:
                ok = False
                self.log(f'{task}: {why}; train it first')
            else:
                argv = [cfg, ckpt, '--work-dir', wd, *cfg_opts]
                ok = self.run_in_worker(slot, 'test.py', argv, env, log_file, task) == 0
        del self.running[task]
        if ok:
            self.durations.append(time.time() - t0)
            self.done.append(task)
            self.log(f'{task}: done in {time.time() - t0:.0f}s ({self.progress()})')
        else:
            self.failed.append(task)
            self.log(f'{task}: FAILED, see {log_file} ({self.progress()})')

    def run(self):
        q = queue.Queue()
        for item in self.items:
            q.put(item)

        def worker(slot):
            while True:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    return
                self.run_task(slot, item)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(self.slots)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            self.close_workers()


def main():
    argv = sys.argv[1:]
    train_args = []
    if '--' in argv:
        i = argv.index('--')
        argv, train_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('backbone_method', nargs='?', metavar='BACKBONE_METHOD',
                   help='e.g. vim_s_memba (configs/vtab1k/<this>_<task>.py); '
                        'with --methods the backbone alone, e.g. vim_s')
    p.add_argument('--methods', nargs='+', metavar='M',
                   help='sweep these methods of the backbone in turn (configs/vtab1k/'
                        '<backbone>_<M>_<task>.py), then write one table of all of them')
    p.add_argument('--config', help='one config for every task instead (the task is set per run)')
    p.add_argument('--gpus', type=int, default=1, help='GPUs to use (0 .. N-1)')
    p.add_argument('--mode', choices=['train', 'test'], default='train',
                   help='train then test (default), or only test trained tasks')
    p.add_argument('--tasks', nargs='+', help='a subset of the 19 tasks')
    p.add_argument('--work-root', help='default: work_dirs/vtab1k/<backbone_method>; with '
                                       '--methods the folder of the methods\' work roots '
                                       '(default: work_dirs/vtab1k)')
    p.add_argument('--verbose', action='store_true', help='also print the training/test logs')
    p.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                   help='config overrides for both training and testing')
    p.add_argument('--only-task-index', type=int, metavar='I',
                   help='run only the I-th task of the queue (0-based; tools/slurm_sweep.sh '
                        'runs one per array job) and write no table')
    p.add_argument('--plan', action='store_true',
                   help='print the number of runs and the work root (with --methods: the '
                        'table\'s folder, then one "method task work_dir" line per run), '
                        'then exit')
    args = p.parse_args(argv)
    if bool(args.backbone_method) == bool(args.config):
        p.error('give either BACKBONE_METHOD or --config')
    if args.methods and args.config:
        p.error('--methods takes a BACKBONE (e.g. vim_s), not --config')
    if args.methods and args.only_task_index is not None:
        p.error('--only-task-index takes one BACKBONE_METHOD, not --methods')
    if args.gpus < 1:
        p.error('--gpus must be >= 1')
    try:
        if args.methods:
            plans, table_dir = method_plans(args)
        else:
            items, table_dir = task_configs(args)
            plans = [(None, items, table_dir)]
    except KeyError as e:
        raise SystemExit(f'error: {e.args[0]}')
    if args.plan:
        print(sum(len(runs) for _, runs, _ in plans), table_dir)
        if args.methods:
            for method, runs, _ in plans:
                for task, _, _, wd in runs:
                    print(method, task, wd)
        return
    if args.only_task_index is not None:
        if not 0 <= args.only_task_index < len(items):
            p.error(f'--only-task-index must be in [0, {len(items) - 1}]')
        plans = [(None, [items[args.only_task_index]], table_dir)]
    start, done, skipped, failed, tabled = time.time(), 0, 0, [], []
    for method, items, root in plans:
        sweep = Sweep(items, args.gpus, args.mode, train_args, sys.executable, args.verbose,
                      args.cfg_options)
        prefix = f'{method}: ' if method else ''
        sweep.log(f'{prefix}{len(items)} tasks on {args.gpus} GPU(s), '
                  f'mode {args.mode}, results under {root}')
        sweep.run()
        sweep.log(f'{prefix}finished in {time.time() - sweep.start:.0f}s: {len(sweep.done)} '
                  f'done, {len(sweep.skipped)} skipped, {len(sweep.failed)} failed'
                  + (f' ({", ".join(sweep.failed)})' if sweep.failed else ''))
        done, skipped = done + len(sweep.done), skipped + len(sweep.skipped)
        failed += [f'{method}/{t}' if method else t for t in sweep.failed]
        if sweep.done or sweep.skipped:
            tabled.append(root)
    if args.methods:
        sweep.log(f'{len(plans)} methods finished in {time.time() - start:.0f}s: {done} done, '
                  f'{skipped} skipped, {len(failed)} failed'
                  + (f' ({", ".join(failed)})' if failed else ''))
    if tabled and args.only_task_index is None:
        out = ['--out', table_dir] if args.methods else []
        subprocess.call([sys.executable, 'tools/vtab_table.py', *tabled, *out], cwd=ROOT)
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
