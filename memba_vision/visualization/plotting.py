"""One PNG per image: saliency, implicit attention and membrane maps, optionally two models."""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ['plot_maps']

_KIND_TITLES = {'potential': 'membrane before reset', 'spikes': 'reset fraction',
                'u_mean': 'transferred mean membrane'}


def _upsample(grid: np.ndarray, size: Tuple[int, int], mode: str) -> np.ndarray:
    import torch

    from .saliency import upsample
    grid = torch.as_tensor(np.asarray(grid, dtype=np.float64))[None]
    return upsample(grid, size, mode)[0].numpy()


def _panels(label: str, maps: Dict[str, np.ndarray], i: int) -> List[List[tuple]]:
    """Rows of panels (kind, title, data) for image ``i`` of one model."""
    prefix = f'{label}\n' if label else ''
    target = int(maps['target'][i])
    logits = maps['logits'][i]
    prob = float(np.exp(logits[target] - np.logaddexp.reduce(logits)))
    rows = [[('image', f'{prefix}class {target} (p={prob:.2f})', None),
             ('overlay', 'input-gradient x input', maps['input_x_gradient'][i]),
             ('overlay', 'Grad-CAM (last layer)', maps['gradcam'][i])]]
    if 'reset_fraction' in maps:
        rows[0].append(('lines', 'units reset per layer', maps['reset_fraction'][i]))
    for k in maps['layers']:
        row = []
        if f'layer{k}/attention' in maps:
            row.append(('overlay', f'L{k} implicit attention (cls)',
                        maps[f'layer{k}/attention'][i]))
        for d in ('fwd', 'bwd'):
            for kind, title in _KIND_TITLES.items():
                key = f'layer{k}/{d}_{kind}'
                if key in maps:
                    row.append(('tokens', f'L{k} {d}: {title}', maps[key][i]))
        if row:
            rows.append(row)
    return rows


def plot_maps(image: np.ndarray, models: Sequence[Tuple[str, Dict[str, np.ndarray]]],
              path: str, index: int = 0, title: Optional[str] = None,
              fmt: Optional[str] = None) -> None:
    """Writes a PNG grid for one image; ``models`` are (label, ``explain`` output) pairs,
    drawn side by side.

    Saliency and attention maps are upsampled bilinearly and overlaid on the
    image; membrane maps are drawn per token (nearest), trimmed tokens left blank.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    H, W = image.shape[:2]
    blocks = [_panels(label, maps, index) for label, maps in models]
    widths = [max(len(r) for r in rows) for rows in blocks]
    nrows, ncols = max(len(rows) for rows in blocks), sum(widths)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.4 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis('off')
    col0 = 0
    for rows, width in zip(blocks, widths):
        for r, row in enumerate(rows):
            for c, (kind, name, data) in enumerate(row):
                ax = axes[r, col0 + c]
                ax.set_title(name, fontsize=8)
                if kind == 'lines':
                    ax.axis('on')
                    for d, lab in zip(range(data.shape[-1]), ('fwd', 'bwd')):
                        ax.plot(np.arange(len(data)), data[:, d], marker='.', label=lab)
                    ax.set_xlabel('layer', fontsize=7)
                    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                    ax.tick_params(labelsize=6)
                    ax.legend(fontsize=6)
                    continue
                ax.imshow(image)
                if kind == 'image':
                    continue
                if kind == 'overlay':
                    shown = _upsample(data, (H, W), 'bilinear')
                    im = ax.imshow(shown, cmap='inferno', alpha=0.55)
                else:
                    shown = np.ma.masked_invalid(_upsample(data, (H, W), 'nearest'))
                    if name.endswith('reset fraction'):  # in [0, 1]; all-zero maps stay dark
                        im = ax.imshow(shown, cmap='magma', alpha=0.75, vmin=0,
                                       vmax=max(float(np.nanmax(data)), 0.01))
                    else:
                        im = ax.imshow(shown, cmap='viridis', alpha=0.75)
                cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
                cb.ax.tick_params(labelsize=6)
        col0 += width
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.97, bottom=0.04, top=0.88 if title else 0.93,
                        wspace=0.55, hspace=0.45)
    fig.savefig(path, dpi=90, format=fmt)
    plt.close(fig)
