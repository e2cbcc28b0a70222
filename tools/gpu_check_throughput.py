"""Training images/s of runs with different GPU counts, from mmengine's logged iteration times.

    python tools/gpu_check_throughput.py 1:WORK_DIR_1GPU 2:WORK_DIR_2GPUS [--batch 32]

Each WORK_DIR is a finished ``tools/train.py --test`` (or ``dist_train.sh ... --test``) run of
one config. The iteration time is the mean of the ``time`` values in the run's
``vis_data/scalars.json`` from epoch 2 on (epoch 1 captures the CUDA graphs); images/s is
``batch * GPUs / time``. Prints one line per run and PASS/FAIL for the speed-up of the
largest GPU count over one GPU (expected above 0.75 x the GPU ratio).
"""
import argparse
import glob
import json
import os.path as osp


def images_per_second(work_dir: str, gpus: int, batch: int):
    """(images/s, number of logged intervals) of the run in ``work_dir``."""
    rows = [json.loads(line) for f in glob.glob(osp.join(work_dir, '*', 'vis_data',
                                                         'scalars.json'))
            for line in open(f) if line.strip()]
    times = [r['time'] for r in rows if 'time' in r and r.get('epoch', 0) >= 2]
    if not times:
        return float('nan'), 0
    return batch * gpus * len(times) / sum(times), len(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('runs', nargs='+', metavar='GPUS:WORK_DIR')
    p.add_argument('--batch', type=int, default=32, help='batch size per GPU')
    args = p.parse_args()
    rates = {}
    for run in args.runs:
        gpus, work_dir = run.split(':', 1)
        gpus = int(gpus)
        rates[gpus], n = images_per_second(work_dir, gpus, args.batch)
        results = glob.glob(osp.join(work_dir, 'result_*.json'))
        top1 = f"{json.load(open(results[0]))['top1']:.2f}%" if results else 'none'
        print(f'[gpu_check] multi: {gpus} GPU(s): {rates[gpus]:.0f} train img/s (batch '
              f'{args.batch} per GPU, {n} logged intervals from epoch 2), top-1 {top1}')
    most = max(rates)
    speedup = rates[most] / rates[1] if 1 in rates else float('nan')
    ok = speedup > 0.75 * most
    print(f'[gpu_check] multi: {"PASS" if ok else "FAIL"} training speed-up on {most} GPUs '
          f'{speedup:.2f}x (expected above {0.75 * most:.2f}x)')


if __name__ == '__main__':
    main()
