"""The --serve loop of tools/train.py and tools/test.py (memba_vision.engine.serving)."""
import argparse
import io

import pytest

from memba_vision.engine import runner_utils
from memba_vision.engine.serving import run_tool, serve, served_experiment_name


def parse(argv):
    return argparse.Namespace(argv=argv, serve='--serve' in argv)


def test_runs_each_line_in_turn_and_stops_at_the_first_failure(capsys):
    ran = []

    def run(args):
        ran.append(args.argv)
        if args.argv == ['bad']:
            raise SystemExit('error: bad input')

    lines = ['["a"]\n', '\n', '["b", "--x"]\n', '["bad"]\n', '["never"]\n']
    assert serve(parse, run, lines) == 1
    assert ran == [['a'], ['b', '--x'], ['bad']]
    out, err = capsys.readouterr()
    assert out.splitlines() == ['SERVE_DONE 0', 'SERVE_DONE 0', 'SERVE_DONE 1']
    assert 'error: bad input' in err


def test_exit_codes_and_crashes_end_the_process(capsys):
    def exit_2(args):
        raise SystemExit(2)

    def crash(args):
        raise RuntimeError('boom')

    assert serve(parse, exit_2, ['["a"]\n', '["b"]\n']) == 2
    assert serve(parse, crash, ['["a"]\n']) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == ['SERVE_DONE 2', 'SERVE_DONE 1']
    assert 'RuntimeError: boom' in err


def test_refuses_nested_serving_and_lines_that_are_not_argument_lists(capsys):
    def run(args):
        raise AssertionError('must not run')

    assert serve(parse, run, ['["--serve"]\n']) == 1
    assert serve(parse, run, ['{"config": "a.py"}\n']) == 1
    assert serve(parse, run, ['["a.py", 3]\n']) == 1
    err = capsys.readouterr().err
    assert 'error: --serve inside --serve' in err
    assert err.count('must be a JSON list of strings') == 2


@pytest.mark.parametrize('served', [False, True])
@pytest.mark.parametrize('fails', [False, True])
def test_the_tools_end_the_process_group_after_success_only(served, fails, monkeypatch, capsys):
    """tools/train.py's and tools/test.py's main (``run_tool``): the process group is destroyed
    after a successful run or served batch, never after a failure (a failed rank may have left
    its peers mid-collective); --serve exits with the first failure's code."""
    ended, ran = [], []
    monkeypatch.setattr(runner_utils, 'end_distributed', lambda: ended.append(1))
    monkeypatch.setattr('sys.stdin', io.StringIO('["a"]\n["b"]\n'))

    def run(args, serving=False):
        ran.append((args.argv, serving))
        if fails and args.argv == ['b']:
            raise SystemExit(3)

    if not served:
        args = parse(['b'])
        if fails:
            with pytest.raises(SystemExit):
                run_tool(args, parse, run)
        else:
            run_tool(args, parse, run)
        assert ran == [(['b'], False)]
    else:
        with pytest.raises(SystemExit) as e:
            run_tool(parse(['--serve']), parse, run)
        assert e.value.code == (3 if fails else 0)
        assert ran == [(['a'], True), (['b'], True)]
    assert ended == ([] if fails else [1])


def test_served_runs_get_distinct_experiment_names(capsys):
    names = {served_experiment_name('configs/x/a_task.py', 'tools/test.py') for _ in range(3)}
    assert len(names) == 3 and all(n.startswith('a_task_') for n in names)
    assert 'tools/test.py --serve: process' in capsys.readouterr().out


def test_each_served_run_logs_its_backends(tmp_path):
    """The ops' once-only backend lines (scan, conv, LIM) appear in every run's log, not only
    in the first run of a served process."""
    import torch
    from mmengine.logging import MMLogger
    from mmpretrain.registry import MODELS

    from conftest import TINY_VIM
    model = MODELS.build(dict(type='Vim', arch=TINY_VIM, img_size=32, patch_size=8,
                              peft=dict(lora=dict(in_proj=4), gate=dict(rank=4))))
    lines = ('memba_vision.ops: selective scan runs on reference',
             'memba_vision.ops: LIM runs on reference')

    def run(args):  # what a served train.py/test.py run does: a runner with its own logger
        name = served_experiment_name(args.argv[0], 'tools/train.py')
        MMLogger.get_instance(name, log_file=str(tmp_path / f'{args.argv[0]}.log'))
        with torch.no_grad():
            for _ in range(2):
                model(torch.randn(1, 3, 32, 32))

    assert serve(parse, run, ['["first"]\n', '["second"]\n']) == 0
    for run_name in ('first', 'second'):
        log = (tmp_path / f'{run_name}.log').read_text()
        assert all(log.count(line) == 1 for line in lines), (run_name, log)
