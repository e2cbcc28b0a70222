"""Membrane, spike, saliency and implicit-attention maps of a Vim / VanillaVMamba classifier.

    python tools/visualize.py CONFIG CHECKPOINT IMAGE [IMAGE ...] --out-dir DIR \
        [--compare CONFIG2 CHECKPOINT2] [--layers K ...] [--target-class K]

Writes DIR/<image name>.png (one grid per image, the two models side by side with
--compare) and DIR/maps.npz with every raw map, keyed '<image name>/<model>/<map>'
(see ``memba_vision.visualization.explain`` for the maps). Files of these names
in DIR are replaced; nothing else there is touched.
"""
import argparse
import os
import os.path as osp
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import DictAction  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Draw membrane, spike, saliency and implicit-'
                                            'attention maps of a memba_vision classifier')
    p.add_argument('config', help='config file')
    p.add_argument('checkpoint', help='checkpoint file (trainable-only PEFT checkpoints are '
                   'completed from the pretrained backbone)')
    p.add_argument('images', nargs='+', metavar='IMAGE', help='image files')
    p.add_argument('--out-dir', required=True, help='where the PNGs and maps.npz go')
    p.add_argument('--compare', nargs=2, metavar=('CONFIG2', 'CHECKPOINT2'),
                   help='a second model, drawn beside the first (e.g. LoRA vs Memba)')
    p.add_argument('--layers', nargs='+', type=int, metavar='K',
                   help='mixer indices for the per-layer maps (default: 4 evenly spaced; '
                        'negative counts from the last; VMamba counts over all stages)')
    p.add_argument('--target-class', type=int, help='explain this class, not the prediction')
    p.add_argument('--baseline', choices=['mean', 'zero'], default='mean',
                   help="input-gradient x (input - baseline): 'mean' the image's mean colour "
                        "(default), 'zero' the literal gradient x normalised input")
    p.add_argument('--no-attention', action='store_true',
                   help="skip Vim's implicit attention (the slowest map on long sequences)")
    p.add_argument('--device', help='cpu or cuda[:N] (default: cuda when available)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override config keys (both models)')
    return p.parse_args(argv)


def _label(config: str, other: str = '') -> str:
    name = osp.splitext(osp.basename(config))[0]
    return name if name != other else name + '(2)'


def _unique_stems(paths):
    stems, seen = [], {}
    for path in paths:
        stem = osp.splitext(osp.basename(path))[0]
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        stems.append(stem if n == 0 else f'{stem}_{n}')
    return stems


def _save_atomically(path: str, write) -> None:
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


def run(args) -> None:
    import mmcv
    import numpy as np
    import torch

    from memba_vision.visualization import explain, mixers_of
    from memba_vision.visualization.loading import load_classifier, load_image
    from memba_vision.visualization.plotting import plot_maps

    for path in args.images:  # every image is checked before any work
        if not osp.isfile(path):
            raise ValueError(f'image {path} not found')
        with open(path, 'rb') as f:
            if mmcv.imfrombytes(f.read()) is None:
                raise ValueError(f'{path} is not a readable image')
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    specs = [(args.config, args.checkpoint)] + ([tuple(args.compare)] if args.compare else [])
    models = []
    for config, checkpoint in specs:
        model, cfg = load_classifier(config, checkpoint, args.cfg_options, device)
        n = len(mixers_of(model.backbone))
        for k in args.layers or ():
            if not -n <= k < n:
                raise IndexError(f'layer {k} is out of range: {config} has {n} layers '
                                 f'(0..{n - 1})')
        classes = getattr(getattr(model, 'head', None), 'num_classes', None)
        if args.target_class is not None and classes and not 0 <= args.target_class < classes:
            raise IndexError(f'target class {args.target_class} is out of range: {config} has '
                             f'{classes} classes')
        label = _label(config, models[0][0] if models else '')
        models.append((label, model, cfg))
    os.makedirs(args.out_dir, exist_ok=True)
    arrays, start = {}, time.time()
    stems = _unique_stems(args.images)
    for i, (path, stem) in enumerate(zip(args.images, stems)):
        results, image = [], None
        for label, model, cfg in models:
            inputs, shown = load_image(path, cfg, model)
            image = shown if image is None else image
            maps = explain(model, inputs, args.layers, args.target_class,
                           attention=not args.no_attention, baseline=args.baseline)
            results.append((label if len(models) > 1 else '', maps))
            arrays.update({f'{stem}/{label}/{k}': v[0] if v.ndim and k != 'layers' else v
                           for k, v in maps.items()})
        arrays[f'{stem}/image'] = image
        png = osp.join(args.out_dir, f'{stem}.png')
        _save_atomically(png, lambda tmp: plot_maps(image, results, tmp, title=osp.basename(path),
                                                    fmt='png'))
        done = i + 1
        eta = (time.time() - start) / done * (len(stems) - done)
        preds = ', '.join(f'class {int(m["target"][0])}' for _, m in results)
        print(f'[{done}/{len(stems)}] {path} -> {png} ({preds}; ETA {eta:.0f} s)', flush=True)
    npz = osp.join(args.out_dir, 'maps.npz')
    _save_atomically(npz, lambda tmp: np.savez_compressed(open(tmp, 'wb'), **arrays))
    print(f'raw maps: {npz}')


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, TypeError, KeyError, IndexError, FileNotFoundError, RuntimeError) as e:
        msg = e.args[0] if e.args else type(e).__name__
        raise SystemExit(f'error: {str(msg).splitlines()[0]}')


if __name__ == '__main__':
    main()
