"""The --serve loop of tools/train.py and tools/test.py (memba_vision.engine.serving)."""
import argparse

from memba_vision.engine.serving import serve, served_experiment_name


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


def test_served_runs_get_distinct_experiment_names(capsys):
    names = {served_experiment_name('configs/x/a_task.py', 'tools/test.py') for _ in range(3)}
    assert len(names) == 3 and all(n.startswith('a_task_') for n in names)
    assert 'tools/test.py --serve: process' in capsys.readouterr().out


def test_each_served_run_logs_its_backends(monkeypatch):
    import mmengine.logging
    import torch

    from memba_vision.ops import lim
    logged = []
    monkeypatch.setattr(mmengine.logging, 'print_log', lambda msg, logger=None: logged.append(msg))
    monkeypatch.delenv('MEMBA_BACKEND', raising=False)

    def run(args):
        for _ in range(2):
            lim(torch.randn(1, 8, 2), 4)

    assert serve(parse, run, ['["a"]\n', '["b"]\n']) == 0
    assert logged == ['memba_vision.ops: LIM runs on reference (cuda: tensors are on the CPU)'] * 2
