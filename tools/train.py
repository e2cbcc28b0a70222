"""Fine-tunes a model with mmengine's Runner.

    python tools/train.py configs/vtab1k/vim_s_memba_caltech101.py
    python tools/train.py CONFIG --resume            # continue from the work dir's last checkpoint
    python tools/train.py CONFIG --fp32              # the fp32 reference instead of bf16 autocast
    python tools/train.py CONFIG --test              # then test the final model in this process
    python tools/train.py CONFIG --auto-scale-lr     # lr x (GPUs x batch size) / base_batch_size
    python tools/train.py CONFIG --cfg-options model.backbone.cuda_graph=False   # eager backbone
    python tools/train.py --serve    # one JSON argument list per stdin line, each run in turn

The VTAB-1k configs train with bf16 autocast and CUDA-graph replay of the backbone
on a GPU; on a machine without CUDA both fall back to eager fp32.

``--serve`` is how tools/sweep.py runs its tasks: one process per GPU slot reads the
argument list of one run per line (e.g. ``["CONFIG", "--work-dir", "W", "--test"]``),
runs it, and prints ``SERVE_DONE <exit code>`` (``memba_vision.engine.serving``).
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import DictAction  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Fine-tune a memba_vision model')
    p.add_argument('config', nargs='?', help='config file')
    p.add_argument('--serve', action='store_true',
                   help='read one JSON argument list per stdin line and run each in this '
                        'process (tools/sweep.py uses it)')
    p.add_argument('--work-dir', help='where logs and checkpoints go '
                   '(default: the config\'s work_dir or work_dirs/<config name>)')
    p.add_argument('--resume', nargs='?', const='auto', default=None, metavar='CHECKPOINT',
                   help='resume from CHECKPOINT, or without a value from the latest '
                        'checkpoint in the work dir (starts fresh if there is none)')
    precision = p.add_mutually_exclusive_group()
    precision.add_argument('--amp', action='store_true',
                           help='bf16 automatic mixed precision (GPU; on in the VTAB configs)')
    precision.add_argument('--fp32', action='store_true',
                           help='train in fp32 even where the config asks for bf16 autocast')
    p.add_argument('--test', action='store_true',
                   help='after training, test the final model in this process and write '
                        'result_<task>.json, as tools/test.py does (saves a process start)')
    p.add_argument('--auto-scale-lr', action='store_true',
                   help='scale the learning rate by the total batch size (GPUs x batch size) '
                        'over the config\'s auto_scale_lr.base_batch_size')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config keys')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    p.add_argument('--local_rank', '--local-rank', type=int, default=0)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.serve and argv != ['--serve']:
        p.error('--serve takes no other arguments (they come on stdin, one run per line)')
    if not args.serve and not args.config:
        p.error('the config file is required')
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def train(args, serving=False):
    from memba_vision.engine.runner_utils import (check_pretrained, check_resumable,
                                                  check_task_data, final_checkpoint, load_config,
                                                  set_precision, test_and_record)
    try:
        cfg = load_config(args.config, args.cfg_options, args.work_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'error: {e}')
    cfg.launcher = args.launcher
    if serving:
        from memba_vision.engine.serving import served_experiment_name
        cfg.experiment_name = served_experiment_name(args.config, 'tools/train.py')
    set_precision(cfg, amp=args.amp, fp32=args.fp32)
    if args.auto_scale_lr:  # mmengine's Runner scales the lr when this is enabled
        if 'base_batch_size' not in (cfg.get('auto_scale_lr') or {}):
            raise SystemExit('error: --auto-scale-lr needs auto_scale_lr = '
                             'dict(base_batch_size=N) in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume:
        if not osp.isfile(args.resume):
            raise SystemExit(f'error: --resume: checkpoint file not found: {args.resume}')
        cfg.resume, cfg.load_from = True, args.resume
    try:
        if args.resume == 'auto':
            check_resumable(cfg.work_dir)
        check_pretrained(cfg)
        check_task_data(cfg.train_dataloader.dataset)
        if args.test:
            check_task_data(cfg.test_dataloader.dataset)
    except (FileNotFoundError, KeyError) as e:
        raise SystemExit(f'error: {e.args[0] if e.args else e}')

    from memba_vision.engine import SafeLoadRunner
    from memba_vision.utils import CheckpointError
    try:  # a bad pretrained, resumed or (with --test) final checkpoint: one line
        runner = SafeLoadRunner.from_cfg(cfg)
        runner.train()
        runner.logger.info(f'training finished; checkpoints in {runner.work_dir}')
        if args.test:
            test_and_record(runner, cfg, args.config, final_checkpoint(runner.work_dir))
    except CheckpointError as e:
        raise SystemExit(f'error: {e}')


def main():
    args = parse_args()
    from memba_vision.engine.serving import run_tool
    run_tool(args, parse_args, train)


if __name__ == '__main__':
    main()
