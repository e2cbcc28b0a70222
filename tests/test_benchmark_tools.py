"""CPU smoke runs of the benchmark tools, with their printed arithmetic re-derived."""
import re
import subprocess
import sys

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
    start, build, first = map(float, re.search(
        r'\(train.py --test\) ([\d.]+) s, model build ([\d.]+) s, first step with graph '
        r'capture ([\d.]+) s', out).groups())
    projected = float(re.search(r'projected 19-task sweep on 1 GPU\(s\): ([\d.]+) min', out)[1])
    epoch = (31 * t32 + t8) / 1e3
    want = sum(100 * epoch + t.num_test / ips + start + build + first
               for t in VTAB1K_TASKS.values()) / 60
    assert abs(projected - want) <= 0.02 * want + 0.1, (projected, want)
    assert len(re.findall(r'^\w+\s+\d+\s', out, re.M)) == 19  # one row per task
