"""CPU smoke runs of the benchmark tools, with their printed arithmetic re-derived."""
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT

from memba_vision.datasets.vtab1k_tasks import VTAB1K_TASKS


def _run(*args):
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


def test_benchmark_cpu_rows_and_ratio_line():
    out = _run('tools/benchmark.py', '--device', 'cpu', '--models', 'vim_s', '--methods', 'lora',
               'memba', '--modes', 'eager')
    rows = {}
    for m in re.finditer(r'^vim_s\s+(lora|memba)\s+eager\s+4\s+fp32\s+([\d.]+)', out, re.M):
        rows[m[1]] = float(m[2])
    assert set(rows) == {'lora', 'memba'}
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(r'ratio memba/lora: step time ([\d.]+), peak memory nan', last)
    assert m, last
    assert abs(float(m[1]) - rows['memba'] / rows['lora']) < 0.01


def test_benchmark_sweep_projection_adds_up():
    out = _run('tools/benchmark_sweep.py', '--device', 'cpu', '--warmup', '0', '--reps', '1')
    t32, t8 = map(float, re.search(r'training step: ([\d.]+) ms at batch 32 .*?, ([\d.]+) ms at '
                                   r'the last batch of 8', out).groups())
    ips = float(re.search(r'evaluation: (\d+) img/s', out)[1])
    build, first, start = map(float, re.search(
        r'per task, model build ([\d.]+) s and first step with graph capture ([\d.]+) s; '
        r'per slot, 1 process start \(tools/train.py --serve\) ([\d.]+) s', out).groups())
    projected = float(re.search(r'projected 19-task sweep on 1 GPU\(s\): ([\d.]+) min', out)[1])
    epoch = (31 * t32 + t8) / 1e3
    want = (start + sum(100 * epoch + t.num_test / ips + build + first
                        for t in VTAB1K_TASKS.values())) / 60
    assert abs(projected - want) <= 0.02 * want + 0.1, (projected, want)
    assert len(re.findall(r'^\w+\s+\d+\s', out, re.M)) == 19  # one row per task


def test_benchmark_sweep_refuses_an_unmeasured_sharing_factor():
    proc = subprocess.run([sys.executable, 'tools/benchmark_sweep.py', '--device', 'cpu',
                           '--jobs-per-gpu', '2'], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and '--jobs-per-gpu > 1 needs --data-root' in proc.stderr


def test_sweep_slots_share_gpus_round_robin(tmp_path, monkeypatch):
    """--jobs-per-gpu 2 on 2 GPUs: four slots, two on each GPU."""
    sys.path.insert(0, os.path.join(ROOT, 'tools'))
    import sweep
    items = [(f'task{i}', 'cfg.py', [], str(tmp_path / f'task{i}')) for i in range(4)]
    seen = {}

    def fake_run_in_worker(self, slot, tool, argv, env, log_file, task):
        assert tool == 'train.py'
        seen[task] = env['CUDA_VISIBLE_DEVICES']
        time.sleep(0.2)  # long enough that every slot takes one task
        from memba_vision.engine.runner_utils import result_path
        open(result_path(os.path.dirname(log_file), task), 'w').write('{}')
        return 0

    monkeypatch.setattr(sweep.Sweep, 'run_in_worker', fake_run_in_worker)
    s = sweep.Sweep(items, slots=4, mode='train', train_args=[], python=sys.executable, gpus=2)
    s.run()
    assert sorted(s.done) == [f'task{i}' for i in range(4)]
    assert sorted(seen.values()) == ['0', '0', '1', '1']


FAKE_WORKER = r'''
import json, sys, time
sys.path.insert(0, sys.argv[1])
from benchmark_sweep import _epoch_timer
folder, n = sys.argv[2].split('=', 1)[1].rsplit(':', 1)
print('x' * 200_000, flush=True)  # more than a pipe holds: must not stall the worker
hook = _epoch_timer((folder, int(n)))
runner = type('R', (), {'epoch': 1})()
hook.before_train_epoch(runner)  # the barrier: returns once every worker got here
arrived = time.time()
print('EPOCHS ' + json.dumps([{'total': 9.0}] + [{'total': arrived}] * 3), flush=True)
'''


def test_concurrent_epoch_workers_meet_at_the_barrier(tmp_path):
    """The plumbing of benchmark_sweep --jobs-per-gpu: workers that print a lot and wait
    for each other, started together, all finish; the mean of their epochs 2-4 comes back."""
    sys.path.insert(0, os.path.join(ROOT, 'tools'))
    import benchmark_sweep
    script = tmp_path / 'worker.py'
    script.write_text(FAKE_WORKER)
    t0 = time.time()
    mean = benchmark_sweep.concurrent_epochs(
        [sys.executable, str(script), os.path.join(ROOT, 'tools')], 3)
    assert t0 < mean < time.time()  # the workers' arrival times, averaged


def test_concurrent_epochs_reports_a_failed_worker(tmp_path):
    """The last of three workers to start fails at once, the others would wait for it
    forever: the tool stops them all, whichever process the failed one is."""
    sys.path.insert(0, os.path.join(ROOT, 'tools'))
    import benchmark_sweep
    script = tmp_path / 'worker.py'
    script.write_text(
        'import os, sys, time\n'
        'folder = sys.argv[-1].split("=", 1)[1].rsplit(":", 1)[0]\n'
        'for k in range(3):  # take the first free ticket\n'
        '    try:\n'
        '        os.close(os.open(os.path.join(folder, f"ticket{k}"), os.O_CREAT | os.O_EXCL))\n'
        '        break\n'
        '    except FileExistsError:\n'
        '        pass\n'
        'if k == 2:\n'
        '    print("boom"); sys.exit(3)\n'
        'time.sleep(300)\n')
    t0 = time.time()
    with pytest.raises(SystemExit, match='concurrent training worker failed'):
        benchmark_sweep.concurrent_epochs([sys.executable, str(script)], 3)
    assert time.time() - t0 < 60
