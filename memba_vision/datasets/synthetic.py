"""Small learnable stand-ins for three VTAB-1k structured tasks.

They carry the real task names and class counts, so the real configs and the
result tables work unchanged on them:

- ``dsprites_loc``: one shape in one cell of a 4x4 grid; label = cell (16).
- ``dsprites_ori``: one long bar through the centre; label = its orientation,
  [0, 180) degrees in 16 bins.
- ``clevr_count``: 3..10 equal-area shapes; label = count - 3 (8), as in VTAB.

The signal is high-contrast and unambiguous (bright shapes on a dark
background); nuisances vary mildly: the hue of background and shapes (at a
fixed brightness, so the count stays readable from the lit area), pixel noise,
sub-cell position and angle jitter, shape type. Everything is deterministic
given the seed.
"""
import zlib
from typing import Callable, Dict, Iterator, Tuple

import numpy as np

from .vtab1k import DEFAULT_JPEG_QUALITY
from .vtab1k_tasks import get_task

__all__ = ['SYNTHETIC_TASKS', 'render_example', 'synthetic_split',
           'write_synthetic_task']

_SUPERSAMPLE = 4  # shapes are drawn on a 4x finer grid, then box-filtered
_SPLIT_IDS = {'train800': 0, 'val200': 1, 'test': 2}
_BG_LEVEL = 28.0      # background brightness (mean over channels), fixed
_FG_LEVEL = (190.0, 215.0)  # shape brightness range


def _tint(rng: np.random.Generator, level: float, amplitude: float) -> np.ndarray:
    """An RGB colour of mean ``level`` with a random zero-mean hue tint."""
    v = rng.normal(size=3)
    v -= v.mean()
    v /= np.abs(v).max() + 1e-6
    return (level + amplitude * rng.uniform(0.3, 1.0) * v).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    noise = rng.normal(0, 6, size=(size, size, 3)).astype(np.float32)
    return _tint(rng, _BG_LEVEL, 12) + noise


def _shape_colour(rng: np.random.Generator) -> np.ndarray:
    return _tint(rng, rng.uniform(*_FG_LEVEL), 40)


def _paint(canvas: np.ndarray, inside: Callable, box: Tuple[float, float, float, float],
           colour: np.ndarray):
    """Blends ``colour`` into ``canvas`` with the anti-aliased coverage of a shape.

    Args:
        inside: fn(yy, xx) -> bool mask, on sub-pixel centre coordinates in pixels.
        box: (y0, x0, y1, x1) bounds of the shape in pixels; only that window is drawn.
    """
    size, s = canvas.shape[0], _SUPERSAMPLE
    y0, x0 = (max(0, int(np.floor(v))) for v in box[:2])
    y1, x1 = (min(size, int(np.ceil(v))) for v in box[2:])
    if y1 <= y0 or x1 <= x0:
        return
    ys = (np.arange(y0 * s, y1 * s, dtype=np.float32) + 0.5) / s
    xs = (np.arange(x0 * s, x1 * s, dtype=np.float32) + 0.5) / s
    yy, xx = np.meshgrid(ys, xs, indexing='ij')
    cover = inside(yy, xx).reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    cover = cover.astype(np.float32)[..., None]
    window = canvas[y0:y1, x0:x1]
    window *= 1 - cover
    window += cover * colour


def _shape(kind: str, cy: float, cx: float, r: float) -> Callable:
    """Disc, square or triangle of the same area (pi r^2) centred at (cy, cx)."""
    if kind == 'disc':
        return lambda yy, xx: (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if kind == 'square':
        h = r * np.sqrt(np.pi) / 2
        return lambda yy, xx: (np.abs(yy - cy) <= h) & (np.abs(xx - cx) <= h)
    side = r * np.sqrt(4 * np.pi / np.sqrt(3))  # upright equilateral triangle
    height = side * np.sqrt(3) / 2
    top = cy - 2 * height / 3

    def inside(yy, xx):
        frac = (yy - top) / height  # 0 at the apex, 1 at the base
        return (frac >= 0) & (frac <= 1) & (np.abs(xx - cx) <= frac * side / 2)
    return inside


def _box(cy: float, cx: float, r: float) -> Tuple[float, float, float, float]:
    return cy - r - 1, cx - r - 1, cy + r + 1, cx + r + 1


def _location(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    row, col = divmod(label, 4)
    cell = size / 4
    cy = (row + 0.5 + rng.uniform(-0.12, 0.12)) * cell
    cx = (col + 0.5 + rng.uniform(-0.12, 0.12)) * cell
    r = 0.3 * cell
    kind = ('disc', 'square', 'triangle')[rng.integers(3)]
    canvas = _background(rng, size)
    _paint(canvas, _shape(kind, cy, cx, r), _box(cy, cx, 1.6 * r), _shape_colour(rng))
    return canvas


def _orientation(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    # bin centre +- 25% of a bin: neighbouring bins stay apart
    angle = np.deg2rad((label + 0.5 + rng.uniform(-0.25, 0.25)) * 180 / 16)
    cy, cx = size / 2 + rng.uniform(-0.03, 0.03, size=2) * size
    half_len, half_width = 0.42 * size, 0.06 * size
    cos, sin = np.cos(angle), np.sin(angle)

    def inside(yy, xx):
        dy, dx = yy - cy, xx - cx
        along = dx * cos - dy * sin  # image y points down: angles run anticlockwise
        across = dx * sin + dy * cos
        return (np.abs(along) <= half_len) & (np.abs(across) <= half_width)

    canvas = _background(rng, size)
    _paint(canvas, inside, _box(cy, cx, half_len + half_width), _shape_colour(rng))
    return canvas


def _count(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    count = label + 3
    r = 0.065 * size
    margin, min_dist = r + 1, 2.6 * r
    centres = []
    while len(centres) < count:  # rejection sampling of non-overlapping centres
        c = rng.uniform(margin, size - margin, size=2)
        if all(np.hypot(*(c - o)) >= min_dist for o in centres):
            centres.append(c)
    canvas = _background(rng, size)
    for cy, cx in centres:
        kind = ('disc', 'square')[rng.integers(2)]
        _paint(canvas, _shape(kind, cy, cx, r), _box(cy, cx, r), _shape_colour(rng))
    return canvas


# task name -> renderer(label, rng, size) -> float canvas (size, size, 3)
SYNTHETIC_TASKS: Dict[str, Callable[[int, np.random.Generator, int], np.ndarray]] = {
    'dsprites_loc': _location,
    'dsprites_ori': _orientation,
    'clevr_count': _count,
}


def render_example(task: str, label: int, rng: np.random.Generator,
                   size: int = 64) -> np.ndarray:
    """One RGB uint8 image (size, size, 3) of ``task`` with class ``label``."""
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f'no synthetic generator for {task!r}; synthetic tasks: '
                         f'{", ".join(SYNTHETIC_TASKS)}')
    num_classes = get_task(task).num_classes
    if not 0 <= label < num_classes:
        raise ValueError(f'{task}: label {label} outside [0, {num_classes})')
    canvas = SYNTHETIC_TASKS[task](int(label), rng, size)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def synthetic_split(task: str, split: str, num: int, size: int = 64,
                    seed: int = 0) -> Iterator[Tuple[np.ndarray, int]]:
    """Yields ``num`` (image, label) pairs with balanced, shuffled labels.

    The stream depends only on (task, split, num, size, seed).
    """
    if split not in _SPLIT_IDS:
        raise ValueError(f'split must be one of {", ".join(_SPLIT_IDS)}, got {split!r}')
    num_classes = get_task(task).num_classes
    rng = np.random.default_rng([seed, zlib.crc32(task.encode()), _SPLIT_IDS[split]])
    labels = rng.permutation(np.arange(num) % num_classes)
    for label in labels:
        yield render_example(task, int(label), rng, size), int(label)


def write_synthetic_task(out_dir: str, task: str, num_train: int = 800,
                         num_val: int = 200, num_test: int = 1000, size: int = 64,
                         seed: int = 0, force: bool = False, progress: bool = True,
                         jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> bool:
    """Writes ``<out_dir>/<task>`` in the VTAB-1k layout and marks ``out_dir``
    synthetic (``SYNTHETIC_DATA.txt``).

    The list files keep their standard names (train800.txt, val200.txt) even
    when ``num_train`` / ``num_val`` differ from 800 / 200. ``out_dir`` must be
    new, empty or already marked synthetic, and the task folder absent or
    written by this tool (else :class:`DataSafetyError`).

    Returns:
        False if a complete folder of these sizes was already there (skipped).
    """
    import os
    import os.path as osp

    from .vtab1k import (check_data_root, check_task_folder, mark_synthetic_root,
                         task_folder_complete, write_task_folder)

    if task not in SYNTHETIC_TASKS:
        raise ValueError(f'no synthetic generator for {task!r}; synthetic tasks: '
                         f'{", ".join(SYNTHETIC_TASKS)}')
    for name, value in (('num_train', num_train), ('num_val', num_val),
                        ('num_test', num_test)):
        if value < 1:
            raise ValueError(f'{name} must be >= 1, got {value}')
    if size < 16:
        raise ValueError(f'size must be >= 16, got {size}')
    check_data_root(out_dir, synthetic=True)
    task_dir = osp.join(out_dir, task)
    counts = {'train800': num_train, 'val200': num_val, 'test': num_test}
    if not force and task_folder_complete(task_dir, counts):
        check_task_folder(task_dir, synthetic=True)
        return False
    check_task_folder(task_dir, synthetic=True)
    os.makedirs(out_dir, exist_ok=True)
    mark_synthetic_root(out_dir)
    splits = {split: (synthetic_split(task, split, n, size, seed), n)
              for split, n in counts.items()}
    manifest = dict(source='synthetic', synthetic=True,
                    generator='memba_vision.datasets.synthetic', size=size, seed=seed,
                    label_function=SYNTHETIC_TASKS[task].__name__)
    write_task_folder(task_dir, splits, get_task(task).num_classes, desc=f'[{task}] ',
                      progress=progress, jpeg_quality=jpeg_quality, manifest=manifest)
    return True
