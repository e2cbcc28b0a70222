"""VTAB-1k splits and labels on top of tensorflow-datasets (tfds).

Every task follows the definition of the public VTAB code,
github.com/google-research/task_adaptation (``task_adaptation/data/*.py`` and
``scripts/run_all_tasks.sh`` for the 19 task arguments): which tfds dataset
and config, which slices of its splits make ``train800`` / ``val200`` / ``test``
(``train800val200`` = train800 + val200), and how a label is computed from an
example's features. The logic here works on plain example dicts (numpy image +
tfds feature dict); :class:`TfdsReader` is the only part that touches tfds, an
optional dependency (``pip install memba_vision[data]``) imported lazily.
"""
import math
import os
import os.path as osp
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Tuple

import numpy as np

from .vtab1k import DEFAULT_JPEG_QUALITY
from .vtab1k_tasks import VTAB1K_TASKS, get_task

__all__ = ['Slice', 'TfdsTask', 'TFDS_TASKS', 'resolve_splits', 'iter_examples',
           'TfdsReader', 'write_tfds_task', 'import_tfds']

TFDS_INSTALL_HINT = ("reading tfds data needs tensorflow-datasets and TensorFlow: "
                     "pip install 'memba_vision[data]'")


class Slice(NamedTuple):
    """Examples [start, stop) of one tfds split, in tfds order."""
    split: str
    start: int
    stop: int

    def __str__(self):
        return f'{self.split}[{self.start}:{self.stop}]'


# ------------------------------------------------------------------ splits
# Each rule maps the tfds split sizes {'train': n, ...} to the three VTAB-1k
# splits. train800 is always the first 800 examples of tfds 'train'.
SplitRule = Callable[[Mapping[str, int]], Dict[str, List[Slice]]]


def official_val(sizes: Mapping[str, int]) -> Dict[str, List[Slice]]:
    """tfds has train/validation/test: val200 = validation[:200], test = test."""
    return dict(train800=[Slice('train', 0, 800)],
                val200=[Slice('validation', 0, 200)],
                test=[Slice('test', 0, sizes['test'])])


def train_holdout(train_percent: int, test_split: str = 'test') -> SplitRule:
    """tfds has train/test: VTAB's 'train' is train[:p%] and 'val' the rest of
    tfds train, so val200 = train[n_train:n_train+200] with n_train = p% of it."""
    def rule(sizes):
        n_train = train_percent * sizes['train'] // 100
        return dict(train800=[Slice('train', 0, 800)],
                    val200=[Slice('train', n_train, n_train + 200)],
                    test=[Slice(test_split, 0, sizes[test_split])])
    return rule


def train_only(train_percent: int, val_percent: int) -> SplitRule:
    """tfds has only train: VTAB cuts it into train p% / val v% / test (the rest)."""
    def rule(sizes):
        n = sizes['train']
        n_train, n_val = n * train_percent // 100, n * val_percent // 100
        return dict(train800=[Slice('train', 0, 800)],
                    val200=[Slice('train', n_train, n_train + 200)],
                    test=[Slice('train', n_train + n_val, n)])
    return rule


def smallnorb_split(sizes: Mapping[str, int]) -> Dict[str, List[Slice]]:
    """smallnorb: VTAB's val is test[:50%] and its test is test[50%:]."""
    half = 50 * sizes['test'] // 100
    return dict(train800=[Slice('train', 0, 800)],
                val200=[Slice('test', 0, 200)],
                test=[Slice('test', half, sizes['test'])])


# ------------------------------------------------------------------ labels
def feature_label(key: str = 'label') -> Callable[[Mapping], int]:
    """The label is a tfds ClassLabel feature as is."""
    def fn(ex):
        return int(ex[key])
    fn.__name__ = f'feature_label_{key}'
    fn.__doc__ = f'the tfds ClassLabel feature {key!r} as is'
    return fn


def binned_label(key: str, num_original: int, num_classes: int) -> Callable[[Mapping], int]:
    """dSprites: groups ``num_original`` neighbouring values into ``num_classes``
    bins, label = floor(value / (num_original / num_classes))."""
    factor = num_original / num_classes

    def fn(ex):
        return int(math.floor(float(ex[key]) / factor))
    fn.__name__ = f'binned_label_{key}'
    fn.__doc__ = f'floor({key} / {factor:g}): {num_original} values in {num_classes} bins'
    return fn


def clevr_count_label(ex: Mapping) -> int:
    """CLEVR count_all: number of objects - 3 (scenes hold 3..10 objects)."""
    return len(ex['objects']['size']) - 3


def _threshold_label(value: float, thresholds) -> int:
    """Index of the last threshold strictly below ``value`` (VTAB's binning)."""
    below = [i for i, t in enumerate(thresholds) if t < value]
    if not below:
        raise ValueError(f'value {value} is not above the first threshold {thresholds[0]}')
    return below[-1]


CLEVR_DISTANCE_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
KITTI_DISTANCE_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)


def clevr_distance_label(ex: Mapping) -> int:
    """CLEVR closest_object_distance: the smallest depth (pixel_coords[:, 2])
    binned by (0, 8, 8.5, 9, 9.5, 10, 100) into 6 classes."""
    depth = float(np.min(np.asarray(ex['objects']['pixel_coords'])[:, 2]))
    return _threshold_label(depth, CLEVR_DISTANCE_THRESHOLDS)


def kitti_vehicle_distance_label(ex: Mapping) -> int:
    """KITTI closest_vehicle_distance: the smallest z of Car/Van/Truck objects
    (type < 3), 1000 when there is none, binned by (-100, 8, 20, 999) into
    4 classes (the last one: no vehicle)."""
    objects = ex['objects']
    types = np.asarray(objects['type']).reshape(-1)
    z = np.asarray(objects['location'], dtype=np.float64).reshape(-1, 3)[:, 2]
    depth = float(np.min(np.concatenate([z[types < 3], [1000.0]])))
    return _threshold_label(depth, KITTI_DISTANCE_THRESHOLDS)


# ------------------------------------------------------------------ images
def rgb_image(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3): grey (H, W) or (H, W, 1) images are tiled to 3 channels."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image.astype(np.uint8, copy=False)


def binary_image(image: np.ndarray) -> np.ndarray:
    """dSprites stores {0, 1} masks: scaled by 255, as VTAB does."""
    return rgb_image(np.asarray(image, dtype=np.uint8) * 255)


class TfdsTask(NamedTuple):
    """How one VTAB-1k task is read from tfds."""
    builder: str                  # tfds name[/config]:version (VTAB's pin, or a checked
                                  # successor; ``versions`` lists them in preference order)
    split_rule: SplitRule
    label_fn: Callable[[Mapping], int]
    image_key: str = 'image'
    image_fn: Callable[[np.ndarray], np.ndarray] = rgb_image
    reference: str = ''           # the VTAB definition it follows
    versions: Tuple[str, ...] = ()  # versions read, newest first; () = the one in builder
    manual: str = ''              # what to download by hand, for datasets tfds cannot fetch
    note: str = ''                # why a version other than VTAB's pin gives the same task

    @property
    def name(self) -> str:
        return self.builder.split(':')[0]

    def candidates(self) -> List[str]:
        """name[/config]:version strings to try, in preference order."""
        versions = self.versions or (self.builder.split(':')[1], )
        return [f'{self.name}:{v}' for v in versions]


_TA = 'task_adaptation/data/'
# What was checked (tensorflow-datasets 4.9.10 source; tensorflow/datasets history;
# google-research/task_adaptation issues #9 and #18) so that a newer tfds version
# gives the same VTAB-1k task; also stored in each task's manifest.json.
PETS_NOTE = (
    'oxford_iiit_pet 4.0.0 (release note: "Add head bounding boxes. Fix corrupt images. '
    'Update dataset URL.") keeps 3.2.0\'s splits (train = annotations/trainval.txt, 3680; '
    'test = annotations/test.txt, 3669), label = breed id - 1 over the same 37 names and '
    'example keys (file name, hence tfds order); only a few corrupt JPEGs are re-encoded')
KITTI_NOTE = (
    'kitti 3.3.0 (release note: "Added labels for the occluded feature.") and 3.2.0 '
    '("Devkit updated.") keep 3.1.0\'s video-level split of the training images '
    '(seed 123, 10%/10% of videos: train 6347, validation 423, test 711), file-name keys '
    'and the type/location features the label uses; the VTAB authors confirmed 3.2.0 '
    'yields the same data as 3.1.0 (task_adaptation issue 18)')
RESISC45_MANUAL = (
    'download NWPU-RESISC45.rar (OneDrive link on the tfds resisc45 catalogue page) and '
    'extract it so that {manual_dir}/NWPU-RESISC45/<class>/*.jpg exist')
RETINOPATHY_MANUAL = (
    'download train.zip.00*, test.zip.00*, sample.zip and trainLabels.csv.zip from '
    'kaggle.com/c/diabetic-retinopathy-detection/data and unpack them into {manual_dir} '
    '(train/, test/, sample/, trainLabels.csv)')
TFDS_TASKS: Dict[str, TfdsTask] = {
    # Natural
    'cifar': TfdsTask('cifar100:3.*.*', train_holdout(90), feature_label(),
                      reference=_TA + 'cifar.py, num_classes=100'),
    'caltech101': TfdsTask('caltech101:3.*.*', train_holdout(90), feature_label(),
                           reference=_TA + 'caltech.py'),
    'dtd': TfdsTask('dtd:3.*.*', official_val, feature_label(), reference=_TA + 'dtd.py'),
    'oxford_flowers102': TfdsTask('oxford_flowers102:2.*.*', official_val, feature_label(),
                                  reference=_TA + 'oxford_flowers102.py'),
    # VTAB pins 3.*.*; tfds >= 4.9 builds only 4.0.0 (see PETS_NOTE)
    'oxford_iiit_pet': TfdsTask('oxford_iiit_pet:4.0.0', train_holdout(80), feature_label(),
                                reference=_TA + 'oxford_iiit_pet.py',
                                versions=('4.0.0', '3.*.*'), note=PETS_NOTE),
    'svhn': TfdsTask('svhn_cropped:3.*.*', train_holdout(90), feature_label(),
                     reference=_TA + 'svhn.py'),
    'sun397': TfdsTask('sun397/tfds:4.*.*', official_val, feature_label(),
                       reference=_TA + 'sun397.py, config=tfds'),
    # Specialized
    'patch_camelyon': TfdsTask('patch_camelyon:2.*.*', official_val, feature_label(),
                               reference=_TA + 'patch_camelyon.py'),
    'eurosat': TfdsTask('eurosat/rgb:2.*.*', train_only(60, 20), feature_label(),
                        reference=_TA + 'eurosat.py, subset=rgb'),
    'resisc45': TfdsTask('resisc45:3.*.*', train_only(60, 20), feature_label(),
                         reference=_TA + 'resisc45.py', manual=RESISC45_MANUAL),
    'diabetic_retinopathy': TfdsTask(
        'diabetic_retinopathy_detection/btgraham-300:3.*.*', official_val, feature_label(),
        reference=_TA + 'diabetic_retinopathy.py, config=btgraham-300, no heavy augmentation',
        manual=RETINOPATHY_MANUAL),
    # Structured
    'clevr_count': TfdsTask('clevr:3.*.*', train_holdout(90, test_split='validation'),
                            clevr_count_label, reference=_TA + 'clevr.py, task=count_all'),
    'clevr_dist': TfdsTask('clevr:3.*.*', train_holdout(90, test_split='validation'),
                           clevr_distance_label,
                           reference=_TA + 'clevr.py, task=closest_object_distance'),
    'dmlab': TfdsTask('dmlab:2.0.1', official_val, feature_label(), reference=_TA + 'dmlab.py'),
    # VTAB pins 3.1.0; tfds >= 4.9 builds 3.3.0 and reads 3.1.0/3.2.0 (see KITTI_NOTE)
    'kitti': TfdsTask('kitti:3.3.0', official_val, kitti_vehicle_distance_label,
                      reference=_TA + 'kitti.py, task=closest_vehicle_distance',
                      versions=('3.3.0', '3.2.0', '3.1.0'), note=KITTI_NOTE),
    'dsprites_loc': TfdsTask('dsprites:2.*.*', train_only(80, 10),
                             binned_label('label_x_position', 32, 16), image_fn=binary_image,
                             reference=_TA + 'dsprites.py, predicted_attribute='
                             'label_x_position, num_classes=16'),
    'dsprites_ori': TfdsTask('dsprites:2.*.*', train_only(80, 10),
                             binned_label('label_orientation', 40, 16), image_fn=binary_image,
                             reference=_TA + 'dsprites.py, predicted_attribute='
                             'label_orientation, num_classes=16'),
    # tfds already stores NORB's azimuth code (0, 2, ..., 34) halved: 0..17.
    'smallnorb_azi': TfdsTask('smallnorb:2.*.*', smallnorb_split, feature_label('label_azimuth'),
                              reference=_TA + 'smallnorb.py, predicted_attribute=label_azimuth'),
    'smallnorb_ele': TfdsTask('smallnorb:2.*.*', smallnorb_split,
                              feature_label('label_elevation'),
                              reference=_TA + 'smallnorb.py, predicted_attribute='
                              'label_elevation'),
}
assert list(TFDS_TASKS) == list(VTAB1K_TASKS), 'TFDS_TASKS must cover the task table'


def resolve_splits(task: str, sizes: Mapping[str, int]) -> Dict[str, List[Slice]]:
    """The tfds slices of train800, val200, test and train800val200 for ``task``,
    given the sizes of its tfds splits; checks every slice lies inside its split."""
    get_task(task)
    splits = TFDS_TASKS[task].split_rule(sizes)
    for name, slices in splits.items():
        for s in slices:
            if s.split not in sizes:
                raise ValueError(f'{task}: {name} needs the tfds split {s.split!r}, '
                                 f'which has only {", ".join(sizes)}')
            if not 0 <= s.start < s.stop <= sizes[s.split]:
                raise ValueError(f'{task}: {name} slice {s} lies outside tfds '
                                 f'{s.split} of {sizes[s.split]} examples')
    splits['train800val200'] = splits['train800'] + splits['val200']
    return splits


def iter_examples(task: str, slices: Iterable[Slice],
                  read: Callable[[Slice], Iterable[Mapping]]
                  ) -> Iterator[Tuple[np.ndarray, int]]:
    """(RGB uint8 image, label) pairs of ``task`` over ``slices``.

    Args:
        read: fn(slice) -> example dicts of that slice in tfds order (the
            image under the task's ``image_key`` plus its tfds features).
    """
    spec = TFDS_TASKS[task]
    num_classes = get_task(task).num_classes
    for s in slices:
        count = 0
        for ex in read(s):
            label = spec.label_fn(ex)
            if not 0 <= label < num_classes:
                raise ValueError(f'{task}: example {count} of {s} has label {label} '
                                 f'outside [0, {num_classes})')
            yield spec.image_fn(ex[spec.image_key]), label
            count += 1
        if count != s.stop - s.start:
            raise ValueError(f'{task}: tfds slice {s} gave {count} examples, '
                             f'expected {s.stop - s.start}')


# ------------------------------------------------------------------ tfds adapter
def import_tfds():
    """Imports tensorflow_datasets and TensorFlow (kept off the GPU).

    torch, torchvision and triton are imported first: importing TensorFlow before
    them segfaults with the CUDA PyTorch wheels, the other order works. A missing
    package raises ImportError with a one-line install hint.
    """
    import torch  # noqa: F401
    import torchvision  # noqa: F401
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(f'{TFDS_INSTALL_HINT} (missing: {err.name or err})') from None
    try:
        tf.config.set_visible_devices([], 'GPU')  # leave the GPU to PyTorch
    except (RuntimeError, ValueError):
        pass  # devices already initialised
    return tfds


def _first_line(err: BaseException) -> str:
    msg = (str(err).strip().splitlines() or [''])[0]
    return f'{type(err).__name__}: {msg}' if msg else type(err).__name__


class TfdsReader:
    """Reads one prepared tfds dataset from ``tfds_dir`` (the thin tfds adapter).

    Args:
        task: VTAB-1k task name; its :class:`TfdsTask` names the tfds dataset
            and the versions accepted, newest first. The first version prepared
            under ``tfds_dir`` is read.
        tfds_dir: the tfds data_dir.
        download: when none is prepared, let tfds download and build the first
            version it can build (manual datasets need their files first).
    """

    def __init__(self, task: str, tfds_dir: str, download: bool = False):
        self.tfds = import_tfds()
        spec = TFDS_TASKS[task]
        builders, errors = [], []
        for name in spec.candidates():
            try:
                builders.append((name, self.tfds.builder(name, data_dir=tfds_dir)))
            except Exception as err:  # tfds raises its own types for unknown versions
                errors.append(_first_line(err))
        if not builders:
            raise ValueError(
                f'tensorflow-datasets {self.tfds.__version__} can open none of '
                f'{", ".join(spec.candidates())} ({errors[0]}); tensorflow-datasets 4.9.10 '
                f'opens {spec.candidates()[0]}')
        prepared = [(n, b) for n, b in builders
                    if osp.isfile(osp.join(str(b.data_dir), 'dataset_info.json'))]
        if prepared:
            self.name, self.builder = prepared[0]
        elif download:
            self.name, self.builder = builders[0]
            self._download(spec, tfds_dir)
        else:
            raise FileNotFoundError(
                f'tfds dataset {spec.candidates()[0]} is not prepared under {tfds_dir}; '
                + (spec.manual.format(manual_dir=self.manual_dir(tfds_dir)) + ', then '
                   if spec.manual else '')
                + f'run with --download (or: tfds build {builders[0][0]} --data_dir '
                f'{tfds_dir})')

    @staticmethod
    def manual_dir(tfds_dir: str) -> str:
        return osp.join(tfds_dir, 'downloads', 'manual')

    def _download(self, spec: TfdsTask, tfds_dir: str):
        manual_dir = self.manual_dir(tfds_dir)
        if spec.manual and not (osp.isdir(manual_dir) and os.listdir(manual_dir)):
            raise FileNotFoundError(f'{self.name} needs a manual download: '
                                    + spec.manual.format(manual_dir=manual_dir))
        try:
            self.builder.download_and_prepare()
        except Exception as err:
            hint = (f'; {spec.manual.format(manual_dir=manual_dir)}' if spec.manual else '')
            raise RuntimeError(f'tfds could not build {self.name} under {tfds_dir}: '
                               f'{_first_line(err)}{hint}') from None

    @property
    def version(self) -> str:
        return str(self.builder.info.version)

    def split_sizes(self) -> Dict[str, int]:
        return {name: int(info.num_examples) for name, info in self.builder.info.splits.items()}

    def read(self, s: Slice) -> Iterator[Mapping]:
        ds = self.builder.as_dataset(split=str(s), shuffle_files=False)
        return iter(self.tfds.as_numpy(ds))

    def describe(self) -> dict:
        """What the manifest records about the tfds data."""
        return dict(name=self.builder.name, config=getattr(self.builder.builder_config,
                                                             'name', None),
                    version=self.version, data_dir=str(self.builder.data_dir),
                    tfds_version=self.tfds.__version__)


def write_tfds_task(task: str, tfds_dir: str, out_dir: str, download: bool = False,
                    force: bool = False, progress: bool = True, reader=None,
                    jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> bool:
    """Builds ``<out_dir>/<task>`` in the VTAB-1k layout from tfds.

    A complete task folder (this tool's or the common release's) is skipped;
    with ``force`` only a folder this tool wrote is rebuilt. A folder holding
    other data raises :class:`~memba_vision.datasets.vtab1k.DataSafetyError`.

    Returns:
        False when the task folder was already complete (skipped).
    """
    from .vtab1k import check_task_folder, task_folder_complete, write_task_folder

    info = get_task(task)
    spec = TFDS_TASKS[task]
    task_dir = osp.join(out_dir, task)
    counts = {'train800': 800, 'val200': 200, 'test': None}
    if not force and task_folder_complete(task_dir, counts):
        return False
    check_task_folder(task_dir, synthetic=False)  # before any slow tfds work
    reader = reader or TfdsReader(task, tfds_dir, download)
    splits = resolve_splits(task, reader.split_sizes())
    sizes = {name: sum(s.stop - s.start for s in slices) for name, slices in splits.items()}
    if sizes['test'] != info.num_test:
        print(f'[{task}] warning: test has {sizes["test"]} examples, the VTAB-1k table '
              f'says {info.num_test} (another tfds version?)', flush=True)
    describe = getattr(reader, 'describe', None)
    label_doc = (spec.label_fn.__doc__ or '').strip().split('\n')[0]
    manifest = dict(
        source='tfds', synthetic=False, tfds=describe() if describe else None,
        slices={name: [str(s) for s in slices] for name, slices in splits.items()},
        label_function=f'{spec.label_fn.__name__}: {label_doc}'.rstrip(': '),
        reference=f'github.com/google-research/task_adaptation {spec.reference}',
        version_note=spec.note or None)
    os.makedirs(out_dir, exist_ok=True)
    write_task_folder(
        task_dir,
        {name: (iter_examples(task, splits[name], reader.read), sizes[name])
         for name in ('train800', 'val200', 'test')},
        info.num_classes, desc=f'[{task}] ', progress=progress, jpeg_quality=jpeg_quality,
        manifest=manifest)
    return True
