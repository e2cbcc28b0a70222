"""Many runs of a tool in one process: ``tools/train.py --serve`` and ``tools/test.py --serve``.

A served process reads one JSON argument list per stdin line (the arguments the
tool takes on its command line), runs it, and prints ``SERVE_DONE <exit code>``.
tools/sweep.py keeps one such process per GPU slot, so that a sweep pays the
start-up (importing the stack, CUDA initialisation) once per slot, not per task.
After a failed run the process exits: the next run starts in a fresh one.
``run_tool`` is both tools' ``main()``, served or not.
"""
import gc
import itertools
import json
import os
import os.path as osp
import sys
import time
import traceback
from typing import Callable, Iterable, Optional

__all__ = ['SERVE_DONE', 'serve', 'served_experiment_name', 'run_tool']

SERVE_DONE = 'SERVE_DONE'  # the line ending each run's output
_runs = itertools.count()


def served_experiment_name(config: str, tool: str) -> str:
    """A name no other run of this process has, for ``cfg.experiment_name``.

    mmengine keys its logger and message hub by the experiment name, which by
    default is the config's name and the current second: two runs of one config
    within a second would share them. Also prints which process runs the config.
    """
    print(f'{tool} --serve: process {os.getpid()} runs {config}', flush=True)
    stem = osp.splitext(osp.basename(config))[0]
    return f'{stem}_{time.strftime("%Y%m%d_%H%M%S")}_{next(_runs)}'


def serve(parse_args: Callable, run: Callable, lines: Optional[Iterable[str]] = None) -> int:
    """Runs ``run(parse_args(argv))`` for the JSON list ``argv`` of each line in turn.

    Returns 0, or the exit code of the first failed run (after which it stops).
    Argument and input errors (``SystemExit``) are reported as a single run would
    report them; other exceptions with their traceback.
    """
    import torch

    from ..ops.dispatch import reset_backend_log
    for line in sys.stdin if lines is None else lines:
        if not line.strip():
            continue
        code = 0
        try:
            argv = json.loads(line)
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                raise SystemExit('error: a --serve line must be a JSON list of strings, got '
                                 f'{line.strip()[:80]}')
            args = parse_args(argv)
            if getattr(args, 'serve', False):
                raise SystemExit('error: --serve inside --serve')
            reset_backend_log()  # each run logs the backends it runs on
            run(args)
        except SystemExit as e:
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr, flush=True)
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        except Exception:  # noqa: BLE001  (reported, then this process ends)
            traceback.print_exc()
            code = 1
        gc.collect()  # the finished run's model, CUDA graphs and loaders
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        sys.stderr.flush()
        print(f'{SERVE_DONE} {code}', flush=True)
        if code:
            return code
    return 0


def run_tool(args, parse_args: Callable, run: Callable) -> None:
    """The ``main()`` of tools/train.py and tools/test.py: ``run(args)``, or with ``--serve``
    each stdin line's run in turn (``serve``), exiting with the first failure's code.

    The process group, if one was started, is destroyed after success only
    (``end_distributed``): a failed rank may have left its peers mid-collective.
    """
    from .runner_utils import end_distributed
    if not args.serve:
        run(args)
        end_distributed()
        return
    code = serve(parse_args, lambda a: run(a, serving=True))
    if code == 0:
        end_distributed()
    sys.exit(code)
