"""tools/sweep.py --methods: the plan, bad method names, the methods run in turn with one
table of all of them (training and testing faked), and dist_*.sh passing --methods on."""
import csv
import os
import os.path as osp
import subprocess
import sys

import pytest

from conftest import ROOT, load_tool
from memba_vision.engine.runner_utils import write_result


@pytest.fixture
def sweep():
    return load_tool('sweep')


def run_sweep(sweep, monkeypatch, *argv):
    """``sweep.main()`` with ARGV; returns its exit code (None: it returned)."""
    monkeypatch.setattr(sys, 'argv', ['tools/sweep.py', *argv])
    try:
        sweep.main()
    except SystemExit as exc:
        return exc.code
    return None


def test_plan_lists_every_method_task_run(sweep, tmp_path, monkeypatch, capsys):
    assert run_sweep(sweep, monkeypatch, 'vim_s', '--methods', 'memba', 'lora-in',
                     '--tasks', 'kitti', 'dtd', '--work-root', str(tmp_path), '--plan') is None
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f'4 {tmp_path}/vim_s_methods'
    # each method in turn, its tasks longest test set first (dtd 1880, kitti 711 images)
    assert lines[1:] == [f'memba dtd {tmp_path}/vim_s_memba/dtd',
                         f'memba kitti {tmp_path}/vim_s_memba/kitti',
                         f'lora-in dtd {tmp_path}/vim_s_lora-in/dtd',
                         f'lora-in kitti {tmp_path}/vim_s_lora-in/kitti']
    # one method: the first line only, as tools/slurm_sweep.sh reads it
    assert run_sweep(sweep, monkeypatch, 'vim_s_memba', '--plan') is None
    assert capsys.readouterr().out == '19 work_dirs/vtab1k/vim_s_memba\n'


def test_bad_methods_fail_in_one_line(sweep, monkeypatch, capsys):
    code = run_sweep(sweep, monkeypatch, 'vim_s', '--methods', 'memba', 'nope', '--plan')
    assert isinstance(code, str) and '\n' not in code
    assert code.startswith('error: no configs/vtab1k/vim_s_<method>_<task>.py for method(s) '
                           'nope; valid methods of vim_s: ')
    assert {'memba', 'lora-in', 'lora-out'} <= set(code.split(': ')[-1].split(', '))
    code = run_sweep(sweep, monkeypatch, 'vim_s_memba', '--methods', 'lora-in', '--plan')
    assert 'valid methods of vim_s_memba: none (BACKBONE is e.g. vim_s' in code
    assert run_sweep(sweep, monkeypatch, 'vim_s', '--methods', 'memba',
                     '--only-task-index', '0') == 2
    assert '--only-task-index takes one BACKBONE_METHOD, not --methods' in capsys.readouterr().err
    assert run_sweep(sweep, monkeypatch, '--config', 'x.py', '--methods', 'memba') == 2
    assert '--methods takes a BACKBONE' in capsys.readouterr().err


def fake_runs(sweep, monkeypatch, top1, fail=()):
    """Replaces the train.py/test.py --serve runs: each writes a result file with
    ``top1[method]`` (training also a last-epoch checkpoint); (method, task) in ``fail``
    fail. Returns the list of (tool, method, task) in the order run."""
    runs = []

    def run_in_worker(self, slot, tool, argv, env, log_file, task):
        work_dir = argv[argv.index('--work-dir') + 1]
        method = osp.basename(osp.dirname(work_dir))[len('vim_s_'):]
        runs.append((tool, method, task))
        if (method, task) in fail:
            return 1
        if tool == 'train.py':
            ckpt = osp.join(work_dir, 'epoch_100.pth')
            open(ckpt, 'w').close()
            with open(osp.join(work_dir, 'last_checkpoint'), 'w') as f:
                f.write(ckpt)
        write_result(work_dir, dict(task=task, top1=top1[method], num_images=None,
                                    backbone='vim_s', method=method, config=argv[0],
                                    checkpoint=''))
        return 0

    monkeypatch.setattr(sweep.Sweep, 'run_in_worker', run_in_worker)
    return runs


def read_table(path):
    with open(path, newline='') as f:
        return [(r['method'], r['source'], r['dtd'], r['kitti']) for r in csv.DictReader(f)]


def test_methods_run_in_turn_then_one_table(sweep, tmp_path, monkeypatch, capfd):
    args = ['vim_s', '--methods', 'memba', 'lora-in', '--tasks', 'dtd', 'kitti',
            '--work-root', str(tmp_path), '--gpus', '2']
    runs = fake_runs(sweep, monkeypatch, {'memba': 70.0, 'lora-in': 60.0},
                     fail={('lora-in', 'kitti')})
    assert run_sweep(sweep, monkeypatch, *args) == 1
    out = capfd.readouterr().out
    assert [r[1] for r in runs] == ['memba', 'memba', 'lora-in', 'lora-in']  # in turn
    assert {r[0] for r in runs} == {'train.py'}
    assert 'memba: finished in' in out and '2 done, 0 skipped, 0 failed' in out
    assert '1 done, 0 skipped, 1 failed (kitti)' in out
    assert '2 methods finished in' in out and \
        '3 done, 0 skipped, 1 failed (lora-in/kitti)' in out
    table = tmp_path / 'vim_s_methods' / 'vtab_table.csv'
    assert f'wrote {tmp_path}/vim_s_methods/vtab_table.md and {table}' in out
    assert read_table(table) == [
        ('lora-in', 'ours', '60.00', ''), ('lora-in', 'paper', '68.20', '80.00'),
        ('memba', 'ours', '70.00', '70.00'), ('memba', 'paper', '68.60', '83.30')]
    assert not (tmp_path / 'vim_s_memba' / 'vtab_table.md').exists()  # one table only

    # again: finished tasks are skipped, the failed one runs and now succeeds
    runs = fake_runs(sweep, monkeypatch, {'memba': 70.0, 'lora-in': 60.0})
    assert run_sweep(sweep, monkeypatch, *args) == 0
    out = capfd.readouterr().out
    assert runs == [('train.py', 'lora-in', 'kitti')]
    assert '2 methods finished in' in out and '1 done, 3 skipped, 0 failed' in out
    assert read_table(table)[0] == ('lora-in', 'ours', '60.00', '60.00')

    # --mode test: every trained task of every method, tested again
    runs = fake_runs(sweep, monkeypatch, {'memba': 71.0, 'lora-in': 61.0})
    assert run_sweep(sweep, monkeypatch, *args, '--mode', 'test') == 0
    out = capfd.readouterr().out
    assert sorted(runs) == [('test.py', m, t) for m in ('lora-in', 'memba')
                            for t in ('dtd', 'kitti')]
    assert '4 done, 0 skipped, 0 failed' in out
    assert [row[2:] for row in read_table(table)[::2]] == [('61.00', '61.00'),
                                                           ('71.00', '71.00')]


@pytest.mark.parametrize('script,extra,mode,tail', [
    ('dist_train.sh', ['--methods', 'memba', 'lora-in', '--', '--amp'], 'train',
     ['--methods', 'memba', 'lora-in', '--', '--amp']),
    ('dist_train.sh', ['--methods', 'memba'], 'train', ['--methods', 'memba', '--']),
    ('dist_train.sh', ['--amp'], 'train', ['--', '--amp']),
    ('dist_test.sh', ['--methods', 'memba', 'lora-in'], 'test', ['--methods', 'memba', 'lora-in']),
    ('dist_test.sh', [], 'test', []),
])
def test_dist_scripts_pass_methods_to_the_sweep(tmp_path, script, extra, mode, tail):
    fake_python = tmp_path / 'python'  # prints the arguments it gets, one a line
    fake_python.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake_python.chmod(0o755)
    proc = subprocess.run(['bash', f'tools/{script}', '--sweep', 'vim_s', '2', *extra],
                          cwd=ROOT, capture_output=True, text=True, check=True,
                          env=dict(os.environ, PYTHON=str(fake_python)))
    assert proc.stdout.splitlines() == ['tools/sweep.py', 'vim_s', '--gpus', '2', '--mode',
                                        mode, *tail]



def test_slurm_sweep_refuses_methods():
    proc = subprocess.run(['bash', 'tools/slurm_sweep.sh', 'cpu', 'vim_s', '--methods', 'memba'],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ''
    assert proc.stderr.count('\n') == 1 and 'one BACKBONE_METHOD per call' in proc.stderr
