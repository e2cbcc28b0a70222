"""tools/slurm_sweep.sh, slurm_train.sh and slurm_test.sh against a real one-node Slurm
(slurmctld + slurmd on localhost, started here with a temporary slurm.conf, CPU only).
Skips when Slurm is not installed or its daemons cannot start (they need root)."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, write_tiny_config

PY = sys.executable
TASKS = ('dsprites_loc', 'clevr_count')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _slurm_conf(d):
    return f"""ClusterName=memba_test
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=localhost CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


@pytest.fixture(scope='module')
def slurm(tmp_path_factory):
    """The environment (SLURM_CONF) of a running one-node Slurm; stops it afterwards."""
    missing = [t for t in ('slurmctld', 'slurmd', 'sbatch', 'srun', 'squeue')
               if shutil.which(t) is None]
    if missing:
        pytest.skip(f'Slurm not installed (no {", ".join(missing)}; Debian: apt-get install '
                    f'slurm-wlm)')
    if os.geteuid() != 0:
        pytest.skip('starting slurmd needs root')
    d = tmp_path_factory.mktemp('slurm')
    for sub in ('state', 'spool'):
        (d / sub).mkdir()
    conf = d / 'slurm.conf'
    conf.write_text(_slurm_conf(d))
    env = dict(os.environ, SLURM_CONF=str(conf), PYTHON=PY,
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
    daemons = [subprocess.Popen(['slurmctld', '-D', '-c', '-f', str(conf)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)]
    time.sleep(1)
    daemons.append(subprocess.Popen(['slurmd', '-D', '-N', 'localhost', '-f', str(conf)],
                                    env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.STDOUT))
    try:
        deadline = time.time() + 30
        state = ''
        while time.time() < deadline and state != 'idle':
            if any(p.poll() is not None for p in daemons):
                break
            state = subprocess.run(['sinfo', '-h', '-o', '%T'], env=env, capture_output=True,
                                   text=True).stdout.strip()
            time.sleep(0.5)
        if state != 'idle':
            logs = ''.join((d / f).read_text()[-600:] for f in ('slurmctld.log', 'slurmd.log')
                           if (d / f).exists())
            pytest.skip(f'Slurm daemons did not start (node state {state!r}): {logs}')
        yield env
    finally:
        for p in reversed(daemons):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def _wait_for_jobs(env, job_ids, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(['squeue', '-h', '-j', ','.join(job_ids), '-o', '%i %T'], env=env,
                             capture_output=True, text=True).stdout.strip()
        if not out:
            return
        time.sleep(1)
    subprocess.run(['scancel', *job_ids], env=env)
    raise AssertionError(f'Slurm jobs {job_ids} still running after {timeout}s: {out}')


def _job_ids(stdout):
    found = re.search(rf'submitted {len(TASKS)} tasks as array job (\d+) and the table as job '
                      r'(\d+)', stdout)
    assert found, stdout
    return found.group(1), found.group(2)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """Two synthetic tasks and a one-epoch tiny Memba Vim config."""
    root = tmp_path_factory.mktemp('slurm_data')
    cfg, _ = write_tiny_config(root, TASKS, 32, 8, 16, embed_dims=16, depth=1, lora=4, extra="""
max_epochs = 1
param_scheduler = []
train_cfg = dict(max_epochs=max_epochs)
""")
    return root, str(cfg)


def test_slurm_sweep_array_and_table(slurm, tiny, tmp_path):
    """slurm_sweep.sh: one array job per task (train + test), then the table job after them."""
    root, cfg = tiny
    work = tmp_path / 'sweep'
    env = dict(slurm, GPUS_PER_TASK='0', CPUS_PER_TASK='1')
    argv = ['bash', 'tools/slurm_sweep.sh', 'cpu', '--config', cfg, '--tasks', *TASKS,
            '--work-root', str(work)]
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    array, table = _job_ids(out.stdout)
    _wait_for_jobs(slurm, [array, table], timeout=240)
    logs = {f.name: f.read_text() for f in (work / 'slurm').iterdir()}
    assert sorted(logs) == sorted([f'{array}_0.out', f'{array}_1.out', f'{table}_table.out'])
    for task in TASKS:
        result = json.load(open(work / task / f'result_{task}.json'))
        assert result['task'] == task and result['num_images'] == 16
        assert (work / task / 'epoch_1.pth').exists()
    # each array job ran one task, in the sweep's order (longest test set first)
    for i, task in enumerate(TASKS):
        log = logs[f'{array}_{i}.out']
        assert f'{task}: done' in log and '1 done, 0 skipped, 0 failed' in log, log
    table_md = (work / 'vtab_table.md').read_text()
    assert all(f"{json.load(open(work / t / f'result_{t}.json'))['top1']:.1f}" in table_md
               for t in TASKS), table_md


def test_slurm_train_and_test(slurm, tiny, tmp_path):
    """slurm_train.sh then slurm_test.sh through srun (GPUS=0: one CPU task)."""
    root, cfg = tiny
    work = tmp_path / 'one'
    env = dict(slurm, GPUS='0', CPUS_PER_TASK='1')
    train = subprocess.run(['bash', 'tools/slurm_train.sh', 'cpu', 'memba_train', cfg,
                            str(work)], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=180)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    ckpt = work / 'epoch_1.pth'
    assert ckpt.exists()
    test = subprocess.run(['bash', 'tools/slurm_test.sh', 'cpu', 'memba_test', cfg, str(ckpt),
                           '--work-dir', str(work)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert test.returncode == 0, test.stdout[-2000:] + test.stderr[-2000:]
    assert json.load(open(work / 'result_dsprites_loc.json'))['num_images'] == 16
