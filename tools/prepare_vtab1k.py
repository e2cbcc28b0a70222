"""Prepares VTAB-1k task folders (<out>/<task>/{train800,val200,train800val200,test}.txt + images).

Real data, with VTAB-1k's own splits and labels, from tensorflow-datasets
(``pip install 'memba_vision[data]'``; datasets already prepared in the tfds dir,
or --download)::

    python tools/prepare_vtab1k.py --tfds-dir ~/tensorflow_datasets \\
        [--out data/vtab-1k] [--tasks ...]

Small learnable synthetic stand-ins (dsprites_loc, dsprites_ori, clevr_count),
written to their own folder, marked synthetic::

    python tools/prepare_vtab1k.py --synthetic [--out data/vtab-1k-synthetic] \\
        --num-train 160 --num-val 40 --num-test 200 --size 64

Nothing this tool did not write is deleted or overwritten: a complete task folder
(this tool's or the common release's) is skipped, --force rebuilds only folders
this tool wrote (their manifest.json says so), and a folder holding other data is
refused (exit status 2). Synthetic data never goes into a folder holding other
data. Each task folder gets a manifest.json (source, tfds version, slices,
counts, label function, JPEG settings). JPEGs are written like the common
release's (Pillow, quality 75, 4:2:0); --jpeg-quality changes the quality.
"""
import argparse
import os
import os.path as osp
import sys
import tempfile

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout

from memba_vision.datasets.synthetic import SYNTHETIC_TASKS  # noqa: E402
from memba_vision.datasets.vtab1k import DEFAULT_JPEG_QUALITY, DataSafetyError  # noqa: E402
from memba_vision.datasets.vtab1k_tasks import task_names  # noqa: E402

DEFAULT_OUT = {'synthetic': 'data/vtab-1k-synthetic', 'tfds': 'data/vtab-1k'}


class UsageError(Exception):
    """Bad input: reported as one line, exit status 1."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='\n'.join(__doc__.splitlines()[1:]))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--synthetic', action='store_true',
                        help='write synthetic learnable tasks')
    source.add_argument('--tfds-dir', help='tensorflow-datasets data_dir to read from')
    parser.add_argument('--out', help=f'output data root (default: {DEFAULT_OUT["tfds"]}, '
                                      f'or {DEFAULT_OUT["synthetic"]} with --synthetic)')
    parser.add_argument('--tasks', nargs='+',
                        help='tasks to prepare (default: all 19 for --tfds-dir, '
                             'the three synthetic ones for --synthetic)')
    parser.add_argument('--force', action='store_true',
                        help='rebuild complete tasks too (only folders this tool wrote)')
    parser.add_argument('--jpeg-quality', type=int, default=DEFAULT_JPEG_QUALITY,
                        help='JPEG quality, 4:2:0 subsampling (default: %(default)s, '
                             'as the common VTAB-1k release)')
    synth = parser.add_argument_group('synthetic tasks')
    synth.add_argument('--num-train', type=int, default=800,
                       help='images in train800.txt (default: %(default)s)')
    synth.add_argument('--num-val', type=int, default=200,
                       help='images in val200.txt (default: %(default)s)')
    synth.add_argument('--num-test', type=int, default=1000,
                       help='images in test.txt (default: %(default)s)')
    synth.add_argument('--size', type=int, default=64,
                       help='image side in pixels (default: %(default)s)')
    synth.add_argument('--seed', type=int, default=0,
                       help='random seed (default: %(default)s)')
    tfds = parser.add_argument_group('tensorflow-datasets')
    tfds.add_argument('--download', action='store_true',
                      help='let tfds download and prepare missing datasets')
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = DEFAULT_OUT['synthetic' if args.synthetic else 'tfds']
    return args


def check_tasks(tasks, valid, kind):
    unknown = [t for t in tasks if t not in valid]
    if unknown:
        raise UsageError(f'unknown {kind} task(s) {", ".join(unknown)}; '
                         f'valid: {", ".join(valid)}')


def check_writable(out_dir):
    """Creates ``out_dir`` and proves a file can be written there."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        raise UsageError(f'output dir {out_dir} is not writable '
                         f'({err.strerror or type(err).__name__})') from None


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if not 1 <= args.jpeg_quality <= 100:
            raise UsageError('--jpeg-quality must be in [1, 100]')
        if args.synthetic:
            tasks = args.tasks or list(SYNTHETIC_TASKS)
            check_tasks(tasks, list(SYNTHETIC_TASKS), 'synthetic')
            for name in ('num_train', 'num_val', 'num_test'):
                if getattr(args, name) < 1:
                    raise UsageError(f'--{name.replace("_", "-")} must be >= 1')
            if args.size < 16:
                raise UsageError('--size must be >= 16')
        else:
            tasks = args.tasks or task_names()
            check_tasks(tasks, task_names(), 'VTAB-1k')
            if not osp.isdir(args.tfds_dir):
                raise UsageError(f'tfds dir {args.tfds_dir} not found')
        from memba_vision.datasets.vtab1k import check_data_root
        check_data_root(args.out, synthetic=args.synthetic)  # before creating anything
        check_writable(args.out)

        if args.synthetic:
            from memba_vision.datasets.synthetic import write_synthetic_task
            for task in tasks:
                written = write_synthetic_task(
                    args.out, task, args.num_train, args.num_val, args.num_test,
                    args.size, args.seed, force=args.force, jpeg_quality=args.jpeg_quality)
                print(f'[{task}] {"done" if written else "complete, skipped"}: '
                      f'{osp.join(args.out, task)}', flush=True)
        else:
            from memba_vision.datasets.tfds_vtab import import_tfds, write_tfds_task
            import_tfds()  # fail early with the install hint
            for i, task in enumerate(tasks, 1):
                print(f'[{task}] task {i}/{len(tasks)}', flush=True)
                written = write_tfds_task(task, args.tfds_dir, args.out,
                                          download=args.download, force=args.force,
                                          jpeg_quality=args.jpeg_quality)
                print(f'[{task}] {"done" if written else "complete, skipped"}: '
                      f'{osp.join(args.out, task)}', flush=True)
    except DataSafetyError as err:
        print(f'prepare_vtab1k: refused: {err}', file=sys.stderr)
        return 2
    except (UsageError, ImportError, OSError, ValueError, RuntimeError) as err:
        print(f'prepare_vtab1k: error: {err}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
