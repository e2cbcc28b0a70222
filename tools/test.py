"""Evaluates a checkpoint on the test split and writes <work-dir>/result_<task>.json.

    python tools/test.py configs/vtab1k/vim_s_memba_caltech101.py \
        work_dirs/vtab1k/vim_s_memba/caltech101/epoch_100.pth
    python tools/test.py CONFIG CHECKPOINT --out preds.pkl     # also dump the predictions
    python tools/test.py CONFIG CHECKPOINT --out m.json --out-item metrics   # or the metrics
    python tools/test.py CONFIG CHECKPOINT --show-dir vis --interval 100  # draw every 100th
    python tools/test.py --serve    # one JSON argument list per stdin line, each run in turn

The result file holds task, top-1 (%), number of test images, config and
checkpoint; ``tools/vtab_table.py WORK_DIR`` collects them into the VTAB-1k table.
``--serve`` is how ``tools/sweep.py --mode test`` tests its tasks, one process per GPU
slot (``memba_vision.engine.serving``).
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import DictAction  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Test a memba_vision checkpoint')
    p.add_argument('config', nargs='?', help='config file')
    p.add_argument('checkpoint', nargs='?', help='checkpoint file (trainable-only PEFT '
                   'checkpoints are completed from the pretrained backbone)')
    p.add_argument('--serve', action='store_true',
                   help='read one JSON argument list per stdin line and run each in this '
                        'process (tools/sweep.py --mode test uses it)')
    p.add_argument('--work-dir', help='where the result file goes (default: the config\'s '
                   'work_dir or work_dirs/<config name>)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config keys')
    p.add_argument('--fp32', action='store_true',
                   help='test in fp32 even where the config trains under bf16 autocast')
    p.add_argument('--out', help='also write the predictions (a .pkl file, one dict per test '
                   'image) or, with --out-item metrics, the metrics (.json, .yaml or .pkl)')
    p.add_argument('--out-item', choices=['pred', 'metrics'], default='pred',
                   help='what --out holds (default: %(default)s)')
    p.add_argument('--show-dir', help='draw the test images with their predictions into '
                   'this folder (the config\'s VisualizationHook)')
    p.add_argument('--interval', type=int, default=1,
                   help='with --show-dir, draw every INTERVAL-th test image (default: 1)')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    p.add_argument('--local_rank', '--local-rank', type=int, default=0)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.serve and argv != ['--serve']:
        p.error('--serve takes no other arguments (they come on stdin, one run per line)')
    if not args.serve and not (args.config and args.checkpoint):
        p.error('the config and checkpoint files are required')
    if args.out and args.out_item == 'pred' and not args.out.endswith(('.pkl', '.pickle')):
        p.error('--out: predictions are written to a .pkl file')
    if args.out and args.out_item == 'metrics' and \
            not args.out.endswith(('.json', '.yaml', '.yml', '.pkl', '.pickle')):
        p.error('--out: metrics are written to a .json, .yaml or .pkl file')
    if args.interval < 1:
        p.error('--interval must be >= 1')
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def test(args, serving=False):
    from memba_vision.engine.runner_utils import (check_pretrained, check_task_data,
                                                  load_config, set_precision, test_and_record)
    try:
        cfg = load_config(args.config, args.cfg_options, args.work_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'error: {e}')
    cfg.launcher = args.launcher
    if serving:
        from memba_vision.engine.serving import served_experiment_name
        cfg.experiment_name = served_experiment_name(args.config, 'tools/test.py')
    set_precision(cfg, fp32=args.fp32)  # the precision the config trains in
    if args.show_dir:
        if 'visualization' not in cfg.get('default_hooks', {}):
            raise SystemExit("error: --show-dir needs default_hooks.visualization = "
                             "dict(type='VisualizationHook') in the config")
        cfg.default_hooks.visualization.update(enable=True, interval=args.interval,
                                               out_dir=osp.abspath(args.show_dir))
    if not osp.isfile(args.checkpoint):
        raise SystemExit(f'error: checkpoint file not found: {args.checkpoint}')
    cfg.load_from = args.checkpoint
    try:
        check_pretrained(cfg)
        check_task_data(cfg.test_dataloader.dataset)
    except (FileNotFoundError, KeyError) as e:
        raise SystemExit(f'error: {e.args[0] if e.args else e}')

    from memba_vision.engine import SafeLoadRunner
    from memba_vision.utils import CheckpointError
    try:  # a bad checkpoint or pretrained file: one line
        runner = SafeLoadRunner.from_cfg(cfg)
        if args.out and args.out_item == 'pred':
            from mmengine.evaluator import DumpResults
            runner.test_evaluator.metrics.append(DumpResults(out_file_path=args.out))
        result = test_and_record(runner, cfg, args.config, args.checkpoint)
    except CheckpointError as e:
        raise SystemExit(f'error: {e}')
    if args.out and args.out_item == 'metrics':
        from mmengine.dist import is_main_process
        from mmengine.fileio import dump
        if is_main_process():
            dump({'accuracy/top1': result['top1']}, args.out)


def main():
    args = parse_args()
    from memba_vision.engine.serving import run_tool
    run_tool(args, parse_args, test)


if __name__ == '__main__':
    main()
