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
import json
import os
import os.path as osp
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from mmengine.logging import print_log
from mmengine.utils import ProgressBar
from mmpretrain.datasets import BaseDataset
from mmpretrain.registry import DATASETS

from ..utils import write_text_atomically
from .vtab1k_tasks import VTAB1K_TASKS

__all__ = ['VTAB1k', 'VTAB1K_SPLITS', 'read_list_file', 'write_task_folder',
           'task_folder_complete', 'task_num_classes', 'read_class_names',
           'check_task_folder', 'check_data_root', 'read_manifest', 'jpeg_writer',
           'DataSafetyError', 'MANIFEST', 'SYNTHETIC_MARKER']

VTAB1K_SPLITS = ('train800val200', 'train800', 'val200', 'test')
# Splits with their own images; train800val200 lists the images of the first two.
_WRITTEN_SPLITS = ('train800', 'val200', 'test')
PREPARE_HINT = ('prepare the data with tools/prepare_vtab1k.py '
                '(see README "Data preparation")')


def _one_line(err: BaseException) -> str:
    """First line of an exception message, with its type."""
    lines = str(err).strip().splitlines()
    return f'{type(err).__name__}: {lines[0] if lines else ""}'.rstrip(': ')


class _Progress:
    """mmengine's ``ProgressBar`` (count, rate, elapsed, ETA) behind a one-line title,
    redrawn about 100 times in all so that logs of long splits stay short."""

    def __init__(self, total: int, title: str, enabled: bool = True):
        self.enabled = enabled and total > 0
        self.step, self.pending = max(1, total // 100), 0
        if self.enabled:
            print(title, flush=True)
            self.bar = ProgressBar(total)

    def update(self):
        self.pending += 1
        if self.enabled and self.pending >= self.step:
            self.bar.update(self.pending)
            self.pending = 0

    def close(self):
        if self.enabled:
            if self.pending:
                self.bar.update(self.pending)
            print(flush=True)


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


@DATASETS.register_module()
class VTAB1k(BaseDataset):
    """One VTAB-1k task in the ``<data_root>/<task>/<split>.txt`` layout.

    Args:
        task (str): task folder name: one of the 19 in ``vtab1k_tasks``, or any
            other folder in the same layout (your own data).
        split (str): 'train800val200' (training), 'train800', 'val200' or 'test';
            for your own data also 'train' or 'val'. The split is the list file
            ``<task>/<split>.txt`` or, without it, mmpretrain's ``CustomDataset``
            folder layout ``<task>/<split>/<class name>/<image>`` (classes in
            sorted order over the task's split folders).
        data_root (str): folder holding the task folders.
        num_classes (int, optional): class count. The 19 tasks take it from
            their table; another task reads it from ``<task>/classes.txt`` (one
            class name a line) or, without that file, as 1 + the largest label
            of its list files.
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
                 num_classes: Optional[int] = None,
                 pipeline: Sequence = (),
                 cache_images: bool = False,
                 cache_workers: int = 8,
                 **kwargs):
        if not isinstance(task, str) or not task or task != osp.basename(task) \
                or task in ('.', '..'):
            raise ValueError(f'VTAB1k task must be a folder name under data_root, '
                             f'got {task!r}')
        valid = VTAB1K_SPLITS if task in VTAB1K_TASKS else VTAB1K_SPLITS + CUSTOM_SPLITS
        if split not in valid:
            raise ValueError(f'unknown VTAB-1k split {split!r}; valid splits: '
                             f'{", ".join(valid)}')
        for key in ('ann_file', 'data_prefix'):
            if key in kwargs:
                raise TypeError(f'VTAB1k sets {key} from task and split; do not pass it')
        self.task = task
        self.split = split
        task_names = None
        if task not in VTAB1K_TASKS and 'classes' not in (kwargs.get('metainfo') or {}) \
                and kwargs.get('classes') is None:
            task_names = read_class_names(osp.join(data_root, task))
        self.num_classes = task_num_classes(data_root, task, num_classes, task_names)
        self.cache_images = cache_images
        self.cache_workers = max(1, int(cache_workers))
        self._cache_prefix = 0  # transforms covered by the cache
        self._cache_images: Optional[np.ndarray] = None

        metainfo = dict(kwargs.pop('metainfo', None) or {})
        if kwargs.get('classes') is None and 'classes' not in metainfo:
            metainfo['classes'] = tuple(task_names or
                                        (str(i) for i in range(self.num_classes)))
        super().__init__(
            ann_file=osp.join(task, f'{split}.txt'),
            data_root=data_root,
            data_prefix=task,
            metainfo=metainfo,
            pipeline=pipeline,
            **kwargs)
        classes = self.metainfo.get('classes') or ()
        if len(classes) != self.num_classes:
            raise ValueError(f'{task} has {self.num_classes} classes but '
                             f'{len(classes)} class names were given')
        if osp.isfile(osp.join(data_root, SYNTHETIC_MARKER)):
            print_log(f'VTAB1k {task}: {data_root} holds synthetic stand-in data '
                      f'({SYNTHETIC_MARKER}), not the real task', logger='current',
                      level=30)

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
        folder = osp.join(self.task_dir, self.split)
        if not osp.isfile(self.ann_file) and self.task not in VTAB1K_TASKS and \
                osp.isdir(folder):
            entries = read_class_folders(self.task_dir, self.split,
                                         self.metainfo['classes'])
        else:
            entries = read_list_file(self.ann_file, self.task_dir, self.num_classes)
        return [dict(img_path=path, gt_label=label) for path, label in entries]

    def full_init(self):
        if self._fully_initialized:
            return
        if not self.cache_images:
            return super().full_init()
        self._cache_prefix = self._cacheable_prefix()
        # load (and subset) the data list unserialized, decode the images into
        # the cache, keep their metadata (shapes, ...) in the data list, and only
        # then let mmengine serialize it
        serialize, self.serialize_data = self.serialize_data, False
        try:
            super().full_init()
        finally:
            self.serialize_data = serialize
        self._build_cache()
        if serialize:
            self.data_bytes, self.data_address = self._serialize_data()

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
        n = len(self.data_list)

        def load(idx):
            info = dict(self.data_list[idx], sample_idx=idx)
            results = self._apply(transforms, info)
            if results is None:
                raise RuntimeError(f'cannot load image {info["img_path"]} for the cache')
            return results

        print_log(f'VTAB1k {self.task}/{self.split}: caching {n} images '
                  f'({self.cache_workers} threads)', logger='current')
        start = time.time()
        images = None
        first_path = None
        bar = _Progress(n, f'VTAB1k {self.task}/{self.split}: decoding into the cache')
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
                self.data_list[idx].update(results)
                bar.update()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        self._cache_images = images
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


# ------------------------------------------------------------- class counts
CUSTOM_SPLITS = ('train', 'val')


def _class_folders(task_dir: str) -> List[str]:
    """Sorted class folder names over the split folders of a folder-layout task."""
    from mmpretrain.datasets.custom import find_folders
    names = set()
    for split in VTAB1K_SPLITS + CUSTOM_SPLITS:
        if osp.isdir(osp.join(task_dir, split)) and \
                not osp.isfile(osp.join(task_dir, f'{split}.txt')):
            names.update(find_folders(osp.join(task_dir, split))[0])
    return sorted(names)


def read_class_folders(task_dir: str, split: str,
                       classes: Sequence[str]) -> List[Tuple[str, int]]:
    """(image path, label) of ``<task_dir>/<split>/<class>/...`` (mmpretrain's
    ``CustomDataset`` layout), label = index of the folder name in ``classes``."""
    from mmpretrain.datasets.custom import get_samples
    root = osp.join(task_dir, split)
    folder_to_idx = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(os.listdir(root)) - set(folder_to_idx))
    unknown = [n for n in unknown if osp.isdir(osp.join(root, n))]
    if unknown:
        raise ValueError(f'{root}: class folder(s) {", ".join(unknown)} not among the '
                         f'{len(classes)} classes ({", ".join(map(str, classes))})')
    samples, _ = get_samples(root, {n: i for n, i in folder_to_idx.items()
                                    if osp.isdir(osp.join(root, n))},
                             is_valid_file=lambda f: f.lower().endswith(IMAGE_SUFFIXES))
    if not samples:
        raise ValueError(f'{root} holds no images ({", ".join(IMAGE_SUFFIXES)}) in class '
                         'folders')
    return [(osp.join(root, rel), label) for rel, label in samples]


IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


def read_class_names(task_dir: str) -> Optional[List[str]]:
    """Class names from ``<task_dir>/classes.txt`` (one a line), or the class
    folders of a folder-layout task; None when there are neither."""
    path = osp.join(task_dir, 'classes.txt')
    if not osp.isfile(path):
        return (_class_folders(task_dir) or None) if osp.isdir(task_dir) else None
    with open(path, encoding='utf-8') as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise ValueError(f'{path} is empty; write one class name a line or remove it')
    return names


def _max_label(list_file: str) -> int:
    top = -1
    with open(list_file, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            parts = line.strip().rsplit(None, 1)
            if not parts:
                continue
            try:
                top = max(top, int(parts[-1]))
            except ValueError:
                raise ValueError(f'{list_file}, line {lineno}: malformed line '
                                 f'{line.strip()!r}, expected \'relative/path.jpg label\''
                                 ) from None
    return top


def task_num_classes(data_root: str, task: str, num_classes: Optional[int] = None,
                     class_names: Optional[Sequence[str]] = None) -> int:
    """Class count of a task folder.

    The 19 VTAB-1k tasks: their table (a different ``num_classes`` is an error).
    Other tasks: ``num_classes`` if given, else the length of ``classes.txt``,
    else 1 + the largest label in the task's list files.
    """
    if num_classes is not None and (isinstance(num_classes, bool) or
                                    not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f'num_classes must be a positive integer, got {num_classes!r}')
    if task in VTAB1K_TASKS:
        expected = VTAB1K_TASKS[task].num_classes
        if num_classes is not None and num_classes != expected:
            raise ValueError(f'VTAB-1k task {task} has {expected} classes, '
                             f'num_classes={num_classes} was given')
        return expected
    if num_classes is not None:
        return num_classes
    if class_names:
        return len(class_names)
    task_dir = osp.join(data_root, task)
    folders = _class_folders(task_dir) if osp.isdir(task_dir) else []
    if folders:
        return len(folders)
    if not osp.isdir(task_dir):
        raise FileNotFoundError(
            f'task folder {task_dir} not found: {task!r} is none of the VTAB-1k tasks '
            f'({", ".join(VTAB1K_TASKS)}); for your own data see README "Fine-tune on your '
            'own data"')
    lists = [osp.join(task_dir, f'{s}.txt') for s in VTAB1K_SPLITS]
    lists = [f for f in lists if osp.isfile(f)]
    if not lists:
        raise FileNotFoundError(f'task folder {task_dir} has no list file '
                                f'({", ".join(s + ".txt" for s in VTAB1K_SPLITS)}) to '
                                'count its classes from; see README "Fine-tune on your '
                                'own data"')
    top = max(_max_label(f) for f in lists)
    if top < 0:
        raise ValueError(f'the list files of {task_dir} hold no labels')
    return top + 1


def dataset_num_classes(dataset_cfg: Mapping) -> int:
    """Class count of a ``VTAB1k`` dataset config (what a config's
    ``model.head.num_classes=None`` is filled with)."""
    if dataset_cfg.get('type') != 'VTAB1k':
        raise ValueError('model.head.num_classes=None (read from the data) needs a '
                         f'VTAB1k training dataset, got {dataset_cfg.get("type")!r}')
    root, task = dataset_cfg.get('data_root', 'data/vtab-1k'), dataset_cfg.get('task')
    if not isinstance(task, str) or not task:
        raise ValueError(f'the training dataset config names no task (task={task!r})')
    names = None
    if task not in VTAB1K_TASKS and not (dataset_cfg.get('metainfo') or {}).get('classes'):
        names = read_class_names(osp.join(root, task))
    return task_num_classes(root, task, dataset_cfg.get('num_classes'), names)


# --------------------------------------------------------------------- writing
MANIFEST = 'manifest.json'
SYNTHETIC_MARKER = 'SYNTHETIC_DATA.txt'
WRITER = 'memba_vision tools/prepare_vtab1k.py'
DEFAULT_JPEG_QUALITY = 75  # the common release: PIL's defaults, quality 75, 4:2:0


class DataSafetyError(Exception):
    """Refusal to write where data this tool did not write would be replaced."""


def read_manifest(task_dir: str) -> Optional[dict]:
    """The task folder's manifest.json written by this tool, or None."""
    path = osp.join(task_dir, MANIFEST)
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get('writer') == WRITER else None


def _list_lines(list_file: str) -> Optional[List[str]]:
    if not osp.isfile(list_file):
        return None
    with open(list_file, encoding='utf-8') as f:
        return [line.strip() for line in f if line.strip()]


def task_folder_complete(task_dir: str, counts: Mapping[str, Optional[int]]) -> bool:
    """Whether the four list files exist with the expected line counts (``None``:
    any positive count), train800val200 has as many lines as train800 + val200,
    and every listed image exists. Both this tool's folders (train800val200 lists
    the images of train800 and val200) and the common release's (its own
    ``images/train800val200/...`` copies) qualify."""
    lines = {split: _list_lines(osp.join(task_dir, f'{split}.txt')) for split in VTAB1K_SPLITS}
    if any(not v for v in lines.values()):
        return False
    if len(lines['train800val200']) != len(lines['train800']) + len(lines['val200']):
        return False
    for split in _WRITTEN_SPLITS:
        expected = counts.get(split)
        if expected is not None and len(lines[split]) != expected:
            return False
    for split in VTAB1K_SPLITS:
        for line in lines[split]:
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not osp.isfile(osp.join(task_dir, parts[0])):
                return False
    return True


def _nonempty_dir(path: str) -> bool:
    return osp.isdir(path) and bool(os.listdir(path))


def check_data_root(out_dir: str, synthetic: bool) -> None:
    """Refuses (:class:`DataSafetyError`) to put synthetic data in a folder holding
    other data, or real data in a folder marked synthetic."""
    marked = osp.isfile(osp.join(out_dir, SYNTHETIC_MARKER))
    if synthetic and not marked and _nonempty_dir(out_dir):
        raise DataSafetyError(
            f'{out_dir} holds data that is not this tool\'s synthetic data (no '
            f'{SYNTHETIC_MARKER}); synthetic tasks go only to a new folder or one marked '
            'synthetic, e.g. the default data/vtab-1k-synthetic')
    if not synthetic and marked:
        raise DataSafetyError(f'{out_dir} holds synthetic data ({SYNTHETIC_MARKER}); '
                              'write real data to another --out, e.g. data/vtab-1k')


def mark_synthetic_root(out_dir: str) -> None:
    """Writes the marker that says ``out_dir`` holds synthetic stand-in data."""
    path = osp.join(out_dir, SYNTHETIC_MARKER)
    if not osp.isfile(path):
        write_text_atomically(
            path, 'Synthetic stand-ins for VTAB-1k tasks written by tools/prepare_vtab1k.py '
            '--synthetic: not real data; results on them are not VTAB-1k results.\n')


def check_task_folder(task_dir: str, synthetic: Optional[bool] = None) -> Optional[dict]:
    """Whether ``task_dir`` may be (re)written: it is absent or empty (returns
    None) or holds this tool's manifest (returns it, of the same kind, synthetic
    or real, when ``synthetic`` is given). Anything else raises
    :class:`DataSafetyError`."""
    if not _nonempty_dir(task_dir):
        if osp.exists(task_dir) and not osp.isdir(task_dir):
            raise DataSafetyError(f'{task_dir} exists and is not a folder; refusing to '
                                  'replace it')
        return None
    manifest = read_manifest(task_dir)
    if manifest is None:
        raise DataSafetyError(
            f'{task_dir} holds data this tool did not write (no {MANIFEST} of '
            'tools/prepare_vtab1k.py) and is not a complete task; refusing to touch it: '
            'move it away or choose another --out')
    if synthetic is not None and bool(manifest.get('synthetic')) != synthetic:
        kind = 'synthetic' if manifest.get('synthetic') else 'real'
        raise DataSafetyError(f'{task_dir} holds {kind} data written by this tool; '
                              'refusing to replace it with the other kind')
    return manifest


def _remove_written(task_dir: str, manifest: dict) -> int:
    """Removes the list files and images a previous run of this tool wrote (the
    paths its manifest names); returns the number of images removed."""
    removed = 0
    for split in VTAB1K_SPLITS:
        path = osp.join(task_dir, f'{split}.txt')
        if osp.isfile(path):
            os.remove(path)
    for split, count in (manifest.get('counts') or {}).items():
        if split not in _WRITTEN_SPLITS or not isinstance(count, int):
            continue
        for i in range(count):
            path = osp.join(task_dir, _image_name(split, i))
            if osp.isfile(path) and not osp.islink(path):
                os.remove(path)
                removed += 1
    return removed


def _image_name(split: str, index: int) -> str:
    return f'images/{split}/{index:06d}.jpg'


def jpeg_writer(quality: int = DEFAULT_JPEG_QUALITY) -> Callable[[np.ndarray, str], None]:
    """``fn(image, path)`` writing an RGB uint8 (H, W, 3) image as a JPEG with
    Pillow at ``quality`` and Pillow's default 4:2:0 chroma subsampling (at 75:
    byte-identical to ``Image.save(path)`` with no options)."""
    from PIL import Image

    def save(image, path):
        Image.fromarray(image).save(path, format='JPEG', quality=quality)
    return save


def _pillow_version() -> str:
    import PIL
    return PIL.__version__


def write_task_folder(task_dir: str,
                      splits: Mapping[str, Tuple[Iterable[Tuple[np.ndarray, int]], int]],
                      num_classes: int,
                      desc: str = '',
                      jpeg_quality: int = DEFAULT_JPEG_QUALITY,
                      progress: bool = True,
                      save_image: Optional[Callable[[np.ndarray, str], None]] = None,
                      manifest: Optional[dict] = None) -> Dict[str, int]:
    """Writes one task folder in the VTAB-1k layout, with a ``manifest.json``.

    Args:
        task_dir: the task folder: absent, empty, or written by this tool before
            (its manifest says so); anything else raises :class:`DataSafetyError`.
        splits: 'train800', 'val200', 'test' -> (iterable of (RGB uint8 image
            (H, W, 3), label), expected count). A split yielding more examples
            than expected fails before the extra one is written.
        num_classes: labels must lie in [0, num_classes).
        desc: prefix of the progress lines.
        jpeg_quality: JPEG quality (4:2:0 subsampling; 75 is the common release's).
        progress: a progress bar with ETA per split.
        save_image: override of the JPEG writer, ``fn(image, path)``.
        manifest: what produced the data (source, versions, slices, label
            function); stored in ``manifest.json`` with the counts and JPEG settings.

    Images go to ``images/<split>/<index>.jpg``; the manifest is written first
    (the folder is then this tool's), the four list files last (atomically), so
    an interrupted run leaves the task incomplete.

    Returns:
        number of images written per split.
    """
    missing = [s for s in _WRITTEN_SPLITS if s not in splits]
    if missing:
        raise ValueError(f'write_task_folder needs the splits {", ".join(missing)}')
    manifest = dict(manifest or {})
    old = check_task_folder(task_dir, manifest.get('synthetic'))
    if old is not None:
        removed = _remove_written(task_dir, old)
        print(f'{desc}replacing what this tool wrote in {task_dir} on '
              f'{old.get("written_at", "?")} ({old.get("source", "?")}): the list files and '
              f'{removed} images', flush=True)
    save_image = save_image or jpeg_writer(jpeg_quality)
    expected = {split: int(splits[split][1]) for split in _WRITTEN_SPLITS}
    manifest.update(
        writer=WRITER, task=osp.basename(osp.normpath(task_dir)), num_classes=num_classes,
        counts=dict(expected, train800val200=expected['train800'] + expected['val200']),
        jpeg=dict(encoder=f'Pillow {_pillow_version()}', quality=jpeg_quality,
                  subsampling='4:2:0'),
        written_at=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), complete=False)
    os.makedirs(task_dir, exist_ok=True)
    write_text_atomically(osp.join(task_dir, MANIFEST), json.dumps(manifest, indent=2) + '\n')

    lines: Dict[str, List[str]] = {}
    for split in _WRITTEN_SPLITS:
        samples, count = splits[split][0], expected[split]
        os.makedirs(osp.join(task_dir, 'images', split), exist_ok=True)
        bar = _Progress(count, f'{desc}{split}: {count} images', enabled=progress)
        out = []
        for i, (image, label) in enumerate(samples):
            if i >= count:
                raise ValueError(f'{desc}{split}: the source gave more than the {count} '
                                 'examples expected; nothing more written')
            label = int(label)
            if not 0 <= label < num_classes:
                raise ValueError(f'{desc}{split} example {i}: label {label} outside '
                                 f'[0, {num_classes})')
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f'{desc}{split} example {i}: expected an RGB uint8 '
                                 f'(H, W, 3) image, got {image.dtype} {image.shape}')
            rel = _image_name(split, i)
            save_image(image, osp.join(task_dir, rel))
            out.append(f'{rel} {label}')
            bar.update()
        bar.close()
        if len(out) != count:
            raise ValueError(f'{desc}{split}: expected {count} examples, got {len(out)}')
        lines[split] = out

    _write_atomic(osp.join(task_dir, 'train800.txt'), lines['train800'])
    _write_atomic(osp.join(task_dir, 'val200.txt'), lines['val200'])
    _write_atomic(osp.join(task_dir, 'test.txt'), lines['test'])
    _write_atomic(osp.join(task_dir, 'train800val200.txt'), lines['train800'] + lines['val200'])
    manifest['complete'] = True
    write_text_atomically(osp.join(task_dir, MANIFEST), json.dumps(manifest, indent=2) + '\n')
    return {split: len(v) for split, v in lines.items()}


def _write_atomic(path: str, lines: Sequence[str]):
    write_text_atomically(path, ''.join(line + '\n' for line in lines))
