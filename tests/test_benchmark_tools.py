"""CPU smoke runs of the benchmark tools, with their printed arithmetic re-derived."""
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT, toy_runner

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
        r'per GPU, 1 process start \(tools/train.py --serve\) ([\d.]+) s', out).groups())
    projected = float(re.search(r'projected 19-task sweep on 1 GPU\(s\): ([\d.]+) min', out)[1])
    epoch = (31 * t32 + t8) / 1e3
    want = (start + sum(100 * epoch + t.num_test / ips + build + first
                        for t in VTAB1K_TASKS.values())) / 60
    assert abs(projected - want) <= 0.02 * want + 0.1, (projected, want)
    assert len(re.findall(r'^\w+\s+\d+\s', out, re.M)) == 19  # one row per task


def test_sweep_runs_one_task_per_gpu_at_a_time(tmp_path, monkeypatch):
    """Four tasks on 2 GPUs: two on each GPU, never two at once on one."""
    sys.path.insert(0, os.path.join(ROOT, 'tools'))
    import sweep
    items = [(f'task{i}', 'cfg.py', [], str(tmp_path / f'task{i}')) for i in range(4)]
    seen, busy = {}, set()

    def fake_run_in_worker(self, slot, tool, argv, env, log_file, task):
        assert tool == 'train.py'
        gpu = seen[task] = env['CUDA_VISIBLE_DEVICES']
        assert gpu not in busy
        busy.add(gpu)
        time.sleep(0.2)  # long enough that every GPU takes a task
        busy.remove(gpu)
        from memba_vision.engine.runner_utils import result_path
        open(result_path(os.path.dirname(log_file), task), 'w').write('{}')
        return 0

    monkeypatch.setattr(sweep.Sweep, 'run_in_worker', fake_run_in_worker)
    s = sweep.Sweep(items, slots=2, mode='train', train_args=[], python=sys.executable)
    s.run()
    assert sorted(s.done) == [f'task{i}' for i in range(4)]
    assert sorted(seen.values()) == ['0', '0', '1', '1']


def test_benchmark_reads_both_official_timers_lines(tmp_path):
    """The Vim-S timer's line and the VMamba-S one (which adds the peak memory) both parse."""
    from conftest import load_tool
    fake = tmp_path / 'timer.py'
    fake.write_text(
        "print('bs 32 amp True: train step 98.7 ms = 324 img/s, eval 856 img/s')\n"
        "print('official vmamba_s v0 bs 32 amp False: train step 221.8 ms = 144 img/s, "
        "eval 436 img/s, peak 12.25 GiB')\n")
    parsed = load_tool('benchmark').run_baseline(f'{sys.executable} {fake}')
    assert parsed.keys() == {(32, True), (32, False)}
    assert parsed[32, True] == pytest.approx((0.0987, 856.0, None))
    assert parsed[32, False] == pytest.approx((0.2218, 436.0, 12.25))


def test_benchmark_steps_with_the_optimizer_the_configs_train_with():
    """The timed step's optimizer is the VTAB configs' (fused AdamW, same settings)."""
    import torch
    from conftest import load_tool
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope
    cfg = Config.fromfile(os.path.join(ROOT, 'configs', 'vtab1k', 'vmamba_s_memba_eurosat.py'))
    model = torch.nn.Linear(4, 2)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        configs = build_optim_wrapper(model, cfg.optim_wrapper).optimizer
    timed = load_tool('benchmark').schedule_optimizer(list(model.parameters()))
    assert type(timed) is type(configs) and timed.defaults == configs.defaults


def test_sweep_save_cost_counts_the_epoch_after_a_save():
    """A save costs its own epoch's excess over a plain epoch and the next epoch's, which
    trains while the file is written behind it (hand-computed)."""
    sys.path.insert(0, os.path.join(ROOT, 'tools'))
    import benchmark_sweep
    epochs = [dict(total=t) for t in (5.0, 2.0, 2.5, 2.3, 2.4)]
    assert abs(benchmark_sweep.save_cost(epochs) - 0.8) < 1e-12
    # a faster epoch is noise, not a negative cost
    epochs = [dict(total=t) for t in (5.0, 2.0, 1.9, 2.1, 2.4)]
    assert abs(benchmark_sweep.save_cost(epochs) - 0.1) < 1e-12


def test_sweep_epoch_timer_counts_the_time_between_epochs(tmp_path):
    """The measured epochs run from one epoch's start to the next one's, so the host's work
    between two epochs (here a 0.3 s hook before each later epoch) is not lost."""
    from mmengine.hooks import Hook
    sys.path.insert(0, os.path.join(ROOT, 'tools'))
    import benchmark_sweep

    class SlowEpochStart(Hook):
        def before_train_epoch(self, runner):
            if runner.epoch > 0:
                time.sleep(0.3)

    timer = benchmark_sweep._epoch_timer()
    runner = toy_runner(tmp_path, hooks=[SlowEpochStart()])
    runner.register_hook(timer)
    runner.train()
    totals = [e['total'] for e in timer.epochs]
    assert len(totals) == 3 and all(t > 0 for t in totals)
    assert totals[0] >= 0.3 and totals[1] >= 0.3 and totals[2] < 0.3
