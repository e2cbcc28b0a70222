"""VTAB-1k folder layout and its dataset.

One folder per task (the layout of the common PEFT release)::

    <data_root>/<task>/train800.txt          800 training images
    <data_root>/<task>/val200.txt            200 validation images
    <data_root>/<task>/train800val200.txt    train800 + val200 (the training split)
    <data_root>/<task>/test.txt              the full test split
    <data_root>/<task>/<images ...>

Each list line is ``relative/path.jpg label``, the path relative to the task
folder. :class:`VTAB1k` reads and validates a list; :func:`write_task_folder`
writes a task in this layout (used by ``tools/prepare_vtab1k.py``).
"""
import os
import os.path as osp
import pickle
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from mmengine.logging import print_log
from mmpretrain.datasets import BaseDataset
from mmpretrain.registry import DATASETS

from ..utils import write_text_atomically
from .vtab1k_tasks import get_task

__all__ = ['VTAB1k', 'VTAB1K_SPLITS', 'read_list_file', 'write_task_folder',
           'task_folder_complete']

VTAB1K_SPLITS = ('train800val200', 'train800', 'val200', 'test')
# Splits with their own images; train800val200 lists the images of the first two.
_WRITTEN_SPLITS = ('train800', 'val200', 'test')
PREPARE_HINT = ('prepare the data with tools/prepare_vtab1k.py '
                '(see README "Data preparation")')


def _one_line(err: BaseException) -> str:
    """First line of an exception message, with its type."""
    lines = str(err).strip().splitlines()
    return f'{type(err).__name__}: {lines[0] if lines else ""}'.rstrip(': ')


def _under(real: str, real_root: str, allow_root: bool = False) -> bool:
    if real == real_root:
        return allow_root
    return osp.commonpath([real_root, real]) == real_root


class _PathGuard:
    """Checks that relative paths resolve (symlinks included) inside a folder.

    Resolved parent folders are cached, so a list of many images in a few
    folders costs one ``realpath`` per folder plus one ``islink`` per image.
    """

    def __init__(self, root: str):
        self.root = root
        self.real_root = osp.realpath(root)
        self._dirs: Dict[str, bool] = {}

    def __call__(self, rel_path: str) -> bool:
        if osp.isabs(rel_path):
            return False
        path = osp.join(self.root, rel_path)
        if '..' in rel_path.replace('\\', '/').split('/'):
            # '..' after a symlink follows the link target: resolve it all
            return _under(osp.realpath(path), self.real_root)
        parent = osp.dirname(rel_path)
        if parent not in self._dirs:
            self._dirs[parent] = _under(osp.realpath(osp.join(self.root, parent)),
                                        self.real_root, allow_root=True)
        if not self._dirs[parent]:
            return False
        return not osp.islink(path) or _under(osp.realpath(path), self.real_root)


def read_list_file(list_file: str, task_dir: str,
                   num_classes: int) -> List[Tuple[str, int]]:
    """Reads and validates one list file.

    Every non-blank line must be ``relative/path label`` with an existing image
    inside ``task_dir`` and 0 <= label < num_classes. Errors are one line and
    name the list file and line number.

    Returns:
        list of (image path = task_dir/relative path, label).
    """
    if not osp.isfile(list_file):
        raise FileNotFoundError(f'VTAB-1k list file {list_file} not found; {PREPARE_HINT}')
    entries = []
    path_ok = _PathGuard(task_dir)
    with open(list_file, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            where = f'{list_file}, line {lineno}'
            parts = line.rsplit(None, 1)
            try:
                if len(parts) != 2:
                    raise ValueError
                rel_path, label = parts[0], int(parts[1])
            except ValueError:
                raise ValueError(f'{where}: malformed line {line!r}, expected '
                                 "'relative/path.jpg label'") from None
            if not path_ok(rel_path):
                raise ValueError(f'{where}: image path {rel_path!r} is absolute or '
                                 f'leaves the task folder {task_dir}; refused')
            path = osp.join(task_dir, rel_path)
            if not osp.isfile(path):
                raise FileNotFoundError(f'{where}: image {path} not found')
            if not 0 <= label < num_classes:
                raise ValueError(f'{where}: label {label} outside [0, {num_classes})')
            entries.append((path, label))
    if not entries:
        raise ValueError(f'VTAB-1k list file {list_file} is empty; {PREPARE_HINT}')
    return entries


class _Progress:
    """A one-line progress report with rate and ETA.

    On a terminal the line is redrawn at most twice a second; otherwise (logs)
    a line is printed every 10 seconds and at the end.
    """

    def __init__(self, total: int, desc: str, unit: str = 'img', enabled: bool = True):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.done, self.start = 0, time.time()
        self.tty = sys.stdout.isatty()
        self._last_time = self.start

    @staticmethod
    def _fmt(seconds: float) -> str:
        m, s = divmod(int(round(seconds)), 60)
        h, m = divmod(m, 60)
        return f'{h}h{m:02d}m{s:02d}s' if h else (f'{m}m{s:02d}s' if m else f'{s}s')

    def update(self, n: int = 1):
        self.done += n
        if not self.enabled:
            return
        now = time.time()
        finished = self.done >= self.total
        if not finished and now - self._last_time < (0.5 if self.tty else 10.0):
            return
        self._last_time = now
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        line = (f'{self.desc}{self.done}/{self.total} '
                f'({100 * self.done / max(self.total, 1):.0f}%), {rate:.1f} {self.unit}/s, '
                f'elapsed {self._fmt(elapsed)}, ETA {self._fmt(eta)}')
        end = '\n' if finished or not self.tty else ''
        print(('\r' if self.tty else '') + line, end=end, flush=True)


def _pack(items: Sequence[dict]) -> Tuple[np.ndarray, np.ndarray]:
    """Pickles dicts into one uint8 buffer plus end offsets (shared copy-on-write)."""
    blobs = [np.frombuffer(pickle.dumps(x, protocol=4), dtype=np.uint8) for x in items]
    ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
    return np.concatenate(blobs) if blobs else np.zeros(0, np.uint8), ends


def _unpack(buffer: np.ndarray, ends: np.ndarray, idx: int) -> dict:
    start = 0 if idx == 0 else int(ends[idx - 1])
    return pickle.loads(memoryview(buffer[start:int(ends[idx])]))


@DATASETS.register_module()
class VTAB1k(BaseDataset):
    """One VTAB-1k task in the ``<data_root>/<task>/<split>.txt`` layout.

    Args:
        task (str): task folder name, one of the 19 in ``vtab1k_tasks``.
        split (str): 'train800val200' (training), 'train800', 'val200' or 'test'.
        data_root (str): folder holding the task folders.
        pipeline (Sequence): transforms, as in mmpretrain.
        cache_images (bool): decode the images once at init and keep them in one
            uint8 array (N, H, W, C); epochs then run only the transforms after
            the cached prefix. The prefix is every transform before
            ``PackInputs`` and must be deterministic (:attr:`CACHEABLE`) and
            produce one image shape. Meant for the 1,000-image training split
            (~150 MB at 224x224).
        cache_workers (int): threads decoding images for the cache.
        **kwargs: other :class:`mmpretrain.datasets.BaseDataset` arguments.
    """

    # Deterministic transforms that may run once at init when cache_images=True.
    CACHEABLE = ('LoadImageFromFile', 'Resize', 'ResizeEdge', 'CenterCrop')

    def __init__(self,
                 task: str,
                 split: str = 'train800val200',
                 data_root: str = 'data/vtab-1k',
                 pipeline: Sequence = (),
                 cache_images: bool = False,
                 cache_workers: int = 8,
                 **kwargs):
        try:
            spec = get_task(task)
        except KeyError as err:
            raise ValueError(err.args[0]) from None
        if split not in VTAB1K_SPLITS:
            raise ValueError(f'unknown VTAB-1k split {split!r}; valid splits: '
                             f'{", ".join(VTAB1K_SPLITS)}')
        for key in ('ann_file', 'data_prefix'):
            if key in kwargs:
                raise TypeError(f'VTAB1k sets {key} from task and split; do not pass it')
        self.task = task
        self.split = split
        self.num_classes = spec.num_classes
        self.cache_images = cache_images
        self.cache_workers = max(1, int(cache_workers))
        self._cache_prefix = 0  # transforms covered by the cache
        self._cache_images: Optional[np.ndarray] = None
        self._cache_meta: Optional[Tuple[np.ndarray, np.ndarray]] = None

        metainfo = dict(kwargs.pop('metainfo', None) or {})
        if kwargs.get('classes') is None and 'classes' not in metainfo:
            metainfo['classes'] = tuple(str(i) for i in range(spec.num_classes))
        super().__init__(
            ann_file=osp.join(task, f'{split}.txt'),
            data_root=data_root,
            data_prefix=task,
            metainfo=metainfo,
            pipeline=pipeline,
            **kwargs)
        classes = self.metainfo.get('classes') or ()
        if len(classes) != spec.num_classes:
            raise ValueError(f'{task} has {spec.num_classes} classes but '
                             f'{len(classes)} class names were given')

    @property
    def task_dir(self) -> str:
        return self.data_prefix['img_path']

    # ---------------------------------------------------------------- loading
    def load_data_list(self) -> List[dict]:
        root = self.data_root or '.'
        if not osp.isdir(root):
            raise FileNotFoundError(f'VTAB-1k data root {root} not found; {PREPARE_HINT}')
        if not osp.isdir(self.task_dir):
            raise FileNotFoundError(
                f'VTAB-1k task folder {self.task_dir} not found; {PREPARE_HINT}')
        entries = read_list_file(self.ann_file, self.task_dir, self.num_classes)
        return [dict(img_path=path, gt_label=label) for path, label in entries]

    def full_init(self):
        if self._fully_initialized:
            return
        if self.cache_images:
            self._cache_prefix = self._cacheable_prefix()
        super().full_init()
        if self.cache_images:
            self._build_cache()

    # -------------------------------------------------------------- transforms
    @staticmethod
    def _is_loader(transform) -> bool:
        return type(transform).__name__.startswith('LoadImage')

    def _apply(self, transforms, results: dict) -> Optional[dict]:
        """Runs ``transforms`` like ``Compose``; image-loading failures become a
        one-line error that names the image."""
        for t in transforms:
            if self._is_loader(t):
                path = results.get('img_path')
                try:
                    results = t(results)
                except Exception as err:
                    raise RuntimeError(f'cannot load image {path} ({self.task}/'
                                       f'{self.split}.txt): {_one_line(err)}') from err
            else:
                results = t(results)
            if results is None:
                return None
        return results

    def prepare_data(self, idx: int):
        if self._cache_images is None:
            return self._apply(self.pipeline.transforms, self.get_data_info(idx))
        results = self.get_data_info(idx)
        results.update(_unpack(*self._cache_meta, idx))
        results['img'] = self._cache_images[idx].copy()
        return self._apply(self.pipeline.transforms[self._cache_prefix:], results)

    # ------------------------------------------------------------------ cache
    def _cacheable_prefix(self) -> int:
        """Number of leading transforms the cache covers (those before PackInputs)."""
        names = [type(t).__name__ for t in self.pipeline.transforms]
        end = names.index('PackInputs') if 'PackInputs' in names else len(names)
        prefix = names[:end]
        bad = [n for n in prefix if n not in self.CACHEABLE]
        if bad:
            raise ValueError(
                f'cache_images=True runs the transforms before PackInputs once, so they '
                f'must be deterministic ({", ".join(self.CACHEABLE)}); got '
                f'{", ".join(bad)}: set cache_images=False for this pipeline')
        if not prefix or prefix[0] != 'LoadImageFromFile':
            raise ValueError('cache_images=True needs LoadImageFromFile as the first '
                             'transform of the pipeline')
        return end

    def _build_cache(self):
        """Decodes every image once through the cacheable prefix."""
        transforms = self.pipeline.transforms[:self._cache_prefix]
        n = len(self)

        def load(idx):
            info = self.get_data_info(idx)
            results = self._apply(transforms, info)
            if results is None:
                raise RuntimeError(f'cannot load image {info["img_path"]} for the cache')
            return results

        print_log(f'VTAB1k {self.task}/{self.split}: caching {n} images '
                  f'({self.cache_workers} threads)', logger='current')
        start = time.time()
        images = None
        first_path = None
        metas = []
        bar = _Progress(n, f'VTAB1k {self.task}/{self.split} cache: ')
        pool = ThreadPoolExecutor(max_workers=self.cache_workers)
        try:
            for idx, results in enumerate(pool.map(load, range(n))):
                img = results.pop('img')
                results.pop('sample_idx', None)
                if images is None:
                    images = np.empty((n, ) + img.shape, dtype=img.dtype)
                    first_path = results['img_path']
                elif img.shape != images.shape[1:]:
                    raise ValueError(
                        f'cache_images=True needs one image shape after '
                        f'{", ".join(type(t).__name__ for t in transforms)}, but '
                        f'{results["img_path"]} is {img.shape} and {first_path} is '
                        f'{images.shape[1:]}; add a fixed-size Resize, e.g. '
                        'scale=(224, 224)')
                images[idx] = img
                metas.append(results)
                bar.update()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        self._cache_images = images
        self._cache_meta = _pack(metas)
        print_log(f'VTAB1k {self.task}/{self.split}: cached {images.shape} '
                  f'{images.dtype} ({images.nbytes / 2**20:.1f} MiB) in '
                  f'{time.time() - start:.1f}s', logger='current')

    def get_subset_(self, indices):
        if self._cache_images is not None:
            raise NotImplementedError('subsets of a VTAB1k dataset with cache_images=True '
                                      'are not supported; use indices= instead')
        return super().get_subset_(indices)

    def get_subset(self, indices):
        if self._cache_images is not None:
            raise NotImplementedError('subsets of a VTAB1k dataset with cache_images=True '
                                      'are not supported; use indices= instead')
        return super().get_subset(indices)

    def extra_repr(self) -> List[str]:
        body = [f'Task: \t{self.task}', f'Split: \t{self.split}',
                f'Task folder: \t{self.task_dir}']
        if self._cache_images is not None:
            body.append(f'Cached images: \t{tuple(self._cache_images.shape)}')
        return body


# --------------------------------------------------------------------- writing
def _list_lines(list_file: str) -> Optional[List[str]]:
    if not osp.isfile(list_file):
        return None
    with open(list_file, encoding='utf-8') as f:
        return [line.strip() for line in f if line.strip()]


def task_folder_complete(task_dir: str, counts: Mapping[str, Optional[int]]) -> bool:
    """Whether the four list files exist, have the expected line counts
    (``None``: any positive count), train800val200 = train800 + val200, and
    every listed image exists."""
    lines = {split: _list_lines(osp.join(task_dir, f'{split}.txt')) for split in VTAB1K_SPLITS}
    if any(v is None or not v for v in lines.values()):
        return False
    if lines['train800val200'] != lines['train800'] + lines['val200']:
        return False
    for split in _WRITTEN_SPLITS:
        expected = counts.get(split)
        if expected is not None and len(lines[split]) != expected:
            return False
        for line in lines[split]:
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not osp.isfile(osp.join(task_dir, parts[0])):
                return False
    return True


def _write_atomic(path: str, lines: Sequence[str]):
    write_text_atomically(path, ''.join(line + '\n' for line in lines))


def write_task_folder(task_dir: str,
                      splits: Mapping[str, Tuple[Iterable[Tuple[np.ndarray, int]], int]],
                      num_classes: int,
                      desc: str = '',
                      quality: int = 95,
                      progress: bool = True,
                      save_image: Optional[Callable[[np.ndarray, str], None]] = None
                      ) -> Dict[str, int]:
    """Writes one task folder in the VTAB-1k layout.

    Args:
        task_dir: the task folder (created).
        splits: 'train800', 'val200', 'test' -> (iterable of (RGB uint8 image
            (H, W, 3), label), expected count).
        num_classes: labels must lie in [0, num_classes).
        desc: prefix of the progress lines.
        quality: JPEG quality.
        progress: print a progress bar with ETA per split.
        save_image: override of the JPEG writer, ``fn(image, path)``.

    Images go to ``images/<split>/<index>.jpg``; the four list files are written
    last (atomically), so an interrupted run leaves the task incomplete.

    Returns:
        number of images written per split.
    """
    from PIL import Image

    def jpeg(image, path):
        Image.fromarray(image).save(path, quality=quality, subsampling=0)

    save_image = save_image or jpeg
    missing = [s for s in _WRITTEN_SPLITS if s not in splits]
    if missing:
        raise ValueError(f'write_task_folder needs the splits {", ".join(missing)}')
    os.makedirs(task_dir, exist_ok=True)
    for split in VTAB1K_SPLITS:  # mark the task incomplete while it is rewritten
        if osp.exists(osp.join(task_dir, f'{split}.txt')):
            os.remove(osp.join(task_dir, f'{split}.txt'))

    lines: Dict[str, List[str]] = {}
    for split in _WRITTEN_SPLITS:
        samples, expected = splits[split]
        image_dir = osp.join(task_dir, 'images', split)
        os.makedirs(image_dir, exist_ok=True)
        bar = _Progress(expected, f'{desc}{split}: ', enabled=progress)
        out = []
        for i, (image, label) in enumerate(samples):
            label = int(label)
            if not 0 <= label < num_classes:
                raise ValueError(f'{desc}{split} example {i}: label {label} outside '
                                 f'[0, {num_classes})')
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f'{desc}{split} example {i}: expected an RGB uint8 '
                                 f'(H, W, 3) image, got {image.dtype} {image.shape}')
            rel = f'images/{split}/{i:06d}.jpg'
            save_image(image, osp.join(task_dir, rel))
            out.append(f'{rel} {label}')
            bar.update()
        if len(out) != expected:
            raise ValueError(f'{desc}{split}: expected {expected} examples, got {len(out)}')
        lines[split] = out

    _write_atomic(osp.join(task_dir, 'train800.txt'), lines['train800'])
    _write_atomic(osp.join(task_dir, 'val200.txt'), lines['val200'])
    _write_atomic(osp.join(task_dir, 'test.txt'), lines['test'])
    _write_atomic(osp.join(task_dir, 'train800val200.txt'), lines['train800'] + lines['val200'])
    return {split: len(v) for split, v in lines.items()}
