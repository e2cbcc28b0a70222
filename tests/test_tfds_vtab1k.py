"""tools/prepare_vtab1k.py on small real tfds datasets written by tfds' own writer.

Each dataset is the real tfds builder (real features, versions and split names,
the version today's tfds builds) with its source replaced by fake examples:
``download_and_prepare`` writes real tfrecord files and ``dataset_info.json``,
which the tool then reads through ``tfds.builder(...)`` like any prepared data.
Every image encodes its example id and split as a 4x4 grid of black/white
blocks, so each written JPEG can be traced back to its example; the expected
slices and labels are worked out here by hand from the task definitions.
"""
import importlib.util
import json
import os
import os.path as osp

import numpy as np
import pytest
from PIL import Image

from memba_vision.datasets.tfds_vtab import import_tfds
from conftest import load_tool, snapshot

# the [data] extra; CI installs it, so the tests never skip there. TensorFlow is
# imported on first use only (by import_tfds, after torch), not at collection.
if not os.environ.get('CI') and not all(importlib.util.find_spec(m) for m in
                                        ('tensorflow', 'tensorflow_datasets')):
    pytest.skip("needs the [data] extra: pip install 'memba_vision[data]'",
                allow_module_level=True)
tfds = None  # tensorflow_datasets, set by the tfds fixture


@pytest.fixture(scope='module', autouse=True)
def tfds_module():
    global tfds
    tfds = import_tfds()
    tfds.disable_progress_bar()
    return tfds

SPLIT_CODE = {'train': 1, 'validation': 2, 'test': 3}
CAR, VAN, TRUCK, PEDESTRIAN = 0, 1, 2, 3


# ------------------------------------------------------------- id images
def id_image(split, i, side, channels, high=255):
    """(side, side, channels) uint8: bits 0-11 = i, bits 12-15 = the split code."""
    code = i | (SPLIT_CODE[split] << 12)
    bits = np.array([(code >> b) & 1 for b in range(16)], np.uint8).reshape(4, 4)
    block = np.kron(bits, np.ones((side // 4, side // 4), np.uint8)) * high
    return np.repeat(block[..., None], channels, axis=2)


def decode_id(image):
    """(split, i) of an id image (any values whose bright blocks exceed half range)."""
    grey = np.asarray(image, np.float64)
    grey = grey.mean(-1) if grey.ndim == 3 else grey
    side = grey.shape[0] // 4
    blocks = grey[:side * 4, :side * 4].reshape(4, side, 4, side).mean((1, 3))
    bits = (blocks > grey.max() / 2).reshape(-1)
    code = int(sum(int(b) << k for k, b in enumerate(bits)))
    split = {v: k for k, v in SPLIT_CODE.items()}[code >> 12]
    return split, code & 0xFFF


# ------------------------------------------------------------- fake sources
def dtd_example(split, i):
    return {'image': id_image(split, i, 32, 3), 'label': (7 * i + SPLIT_CODE[split]) % 47,
            'file_name': f'{split}_{i}.jpg'}


def pet_example(split, i):
    return {'image': id_image(split, i, 32, 3), 'label': (5 * i + SPLIT_CODE[split]) % 37,
            'species': i % 2, 'file_name': f'{split}_{i}.jpg',
            'segmentation_mask': np.zeros((32, 32, 1), np.uint8),
            'head_bbox': tfds.features.BBox(0.1, 0.2, 0.5, 0.6)}


CLEVR_DEPTHS = (7.0, 8.2, 8.7, 9.2, 9.7, 12.0)  # closest depth -> distance class 0..5


def clevr_example(split, i):
    n = 3 + i % 8  # objects: count class i % 8
    depths = [CLEVR_DEPTHS[i % 6]] + [20.0] * (n - 1)
    objects = [{'3d_coords': [0.0, 0.0, 0.0], 'color': 0, 'material': 0,
                'pixel_coords': [10.0, 10.0, d], 'rotation': 0.0, 'shape': 0, 'size': 0}
               for d in depths]
    return {'image': id_image(split, i, 32, 3), 'file_name': f'{split}_{i}.png',
            'objects': objects, 'question_answer': []}


def dsprites_example(split, i):
    return {'image': id_image(split, i, 64, 1, high=1), 'label_orientation': (3 * i) % 40,
            'label_scale': 0, 'label_shape': i % 3, 'label_x_position': i % 32,
            'label_y_position': 0, 'value_orientation': 0.0, 'value_scale': 0.0,
            'value_shape': 0.0, 'value_x_position': 0.0, 'value_y_position': 0.0}


def smallnorb_example(split, i):
    image = id_image(split, i, 96, 1)
    return {'image': image, 'image2': image, 'instance': 0, 'label_azimuth': i % 18,
            'label_category': 0, 'label_elevation': (5 * i) % 9, 'label_lighting': 0}


# (tfds type, z) per i % 7 and the closest-vehicle class it gives: bins (-100, 8],
# (8, 20], (20, 999], none (pedestrians and the like do not count)
KITTI_SCENES = (([(CAR, 5.0)], 0), ([(VAN, 8.0)], 0), ([(TRUCK, 12.0), (CAR, 25.0)], 1),
                ([(CAR, 22.0), (PEDESTRIAN, 1.0)], 2), ([(VAN, 30.0), (PEDESTRIAN, 3.0)], 2),
                ([(PEDESTRIAN, 3.0)], 3), ([], 3))


def kitti_example(split, i):
    objects = [{'alpha': 0.0, 'bbox': tfds.features.BBox(0.1, 0.1, 0.4, 0.4),
                'dimensions': [1.5, 1.6, 4.0], 'location': [1.0, 1.5, z], 'occluded': 0,
                'rotation_y': 0.0, 'truncated': 0.0, 'type': t}
               for t, z in KITTI_SCENES[i % 7][0]]
    return {'image': id_image(split, i, 32, 3), 'image/file_name': f'{i:06d}.png',
            'objects': objects}


# tfds name -> (split sizes, example maker); sizes are the smallest that hold
# VTAB's slices: 800 training examples plus a 200-example validation slice
SOURCES = {
    'dtd': ({'train': 800, 'validation': 200, 'test': 24}, dtd_example),
    'oxford_iiit_pet': ({'train': 1000, 'test': 24}, pet_example),
    'clevr': ({'train': 2000, 'validation': 24}, clevr_example),
    'dsprites': ({'train': 2000}, dsprites_example),
    'smallnorb': ({'train': 800, 'test': 400}, smallnorb_example),
    'kitti': ({'train': 800, 'validation': 200, 'test': 25}, kitti_example),
}

# Expected labels, by hand from the task definitions (task_adaptation/data/*.py).
LABELS = {
    'dtd': lambda s, i: (7 * i + SPLIT_CODE[s]) % 47,
    'oxford_iiit_pet': lambda s, i: (5 * i + SPLIT_CODE[s]) % 37,
    'clevr_count': lambda s, i: i % 8,                # objects - 3
    'clevr_dist': lambda s, i: i % 6,                 # CLEVR_DEPTHS binned
    'dsprites_loc': lambda s, i: (i % 32) // 2,       # 32 positions in 16 bins
    'dsprites_ori': lambda s, i: (2 * (3 * i % 40)) // 5,  # 40 angles in 16 bins
    'smallnorb_azi': lambda s, i: i % 18,
    'smallnorb_ele': lambda s, i: (5 * i) % 9,
    'kitti': lambda s, i: KITTI_SCENES[i % 7][1],
}
# (tfds split, positions in tfds order) of train800 / val200 / test, by hand:
#   holdout 90% (clevr): train 2000 -> val = train[1800:2000], test = tfds validation
#   holdout 80% (pets): train 1000 -> val = train[800:1000]
#   dsprites 80/10/10 of train 2000 -> val = train[1600:1800], test = train[1800:2000]
#   smallnorb: val = test[:200], test = test[50%:] = test[200:400]
SLICES = {
    'dtd': [('train', 0, 800), ('validation', 0, 200), ('test', 0, 24)],
    'oxford_iiit_pet': [('train', 0, 800), ('train', 800, 1000), ('test', 0, 24)],
    'clevr_count': [('train', 0, 800), ('train', 1800, 2000), ('validation', 0, 24)],
    'clevr_dist': [('train', 0, 800), ('train', 1800, 2000), ('validation', 0, 24)],
    'dsprites_loc': [('train', 0, 800), ('train', 1600, 1800), ('train', 1800, 2000)],
    'dsprites_ori': [('train', 0, 800), ('train', 1600, 1800), ('train', 1800, 2000)],
    'smallnorb_azi': [('train', 0, 800), ('test', 0, 200), ('test', 200, 400)],
    'smallnorb_ele': [('train', 0, 800), ('test', 0, 200), ('test', 200, 400)],
    'kitti': [('train', 0, 800), ('validation', 0, 200), ('test', 0, 25)],
}
TFDS_NAME = {'clevr_count': 'clevr', 'clevr_dist': 'clevr', 'dsprites_loc': 'dsprites',
             'dsprites_ori': 'dsprites', 'smallnorb_azi': 'smallnorb',
             'smallnorb_ele': 'smallnorb'}
# the versions tensorflow-datasets 4.9.x builds (VTAB pins pets 3.*.*, kitti 3.1.0)
VERSIONS = {'oxford_iiit_pet': '4.0.0', 'kitti': '3.3.0'}


def fake_builder(name, sizes, make_example):
    """The registered tfds builder ``name`` writing ``make_example(split, i)``."""
    base = tfds.builder_cls(name)

    class Fake(base, skip_registration=True):
        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split, n) for split, n in sizes.items()}

        def _generate_examples(self, split, n):
            for i in range(n):
                yield f'{split}_{i:05d}', make_example(split, i)

    Fake.name = name
    return Fake


def run_tool(capsys, *args):
    """tools/prepare_vtab1k.py's main in this process (TensorFlow starts once)."""
    capsys.readouterr()
    code = load_tool('prepare_vtab1k').main(list(args))
    out, err = capsys.readouterr()
    return code, out, err.strip()


@pytest.fixture(scope='module')
def prepared(tmp_path_factory, tfds_module):
    """tfds data_dir with the six fake datasets, their tfds order, and the tool's output."""
    root = tmp_path_factory.mktemp('tfds')
    tfds_dir, out = root / 'tensorflow_datasets', root / 'vtab-1k'
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    order = {}
    for name, (sizes, make) in SOURCES.items():
        fake_builder(name, sizes, make)(data_dir=str(tfds_dir)).download_and_prepare(
            download_config=config)
        # tfds' own read order (it shuffles examples by key when writing)
        reader = tfds.builder(name, data_dir=str(tfds_dir))
        for split in sizes:
            ds = tfds.as_numpy(reader.as_dataset(split=split, shuffle_files=False))
            order[name, split] = [decode_id(ex['image'])[1] for ex in ds]
    code = load_tool('prepare_vtab1k').main(['--tfds-dir', str(tfds_dir), '--out', str(out), '--tasks',
                             *SLICES])
    assert code == 0
    return tfds_dir, out, order


def read_list(path):
    with open(path) as f:
        return [line.rsplit(None, 1) for line in f.read().splitlines() if line.strip()]


@pytest.mark.parametrize('task', list(SLICES))
def test_lists_labels_and_counts(prepared, task):
    tfds_dir, out, order = prepared
    name = TFDS_NAME.get(task, task)
    task_dir = out / task
    lists = {s: read_list(task_dir / f'{s}.txt')
             for s in ('train800', 'val200', 'train800val200', 'test')}
    assert lists['train800val200'] == lists['train800'] + lists['val200']
    for split, (tfds_split, start, stop) in zip(('train800', 'val200', 'test'), SLICES[task]):
        assert len(lists[split]) == stop - start
        expected_ids = order[name, tfds_split][start:stop]
        seen = []
        for rel, label in lists[split]:
            with Image.open(task_dir / rel) as im:
                assert im.mode == 'RGB'
                image_split, i = decode_id(np.asarray(im))
            assert image_split == tfds_split, (split, rel)
            assert int(label) == LABELS[task](tfds_split, i), (split, rel, i)
            seen.append(i)
        assert seen == expected_ids, split
    n_images = sum(len(files) for _, _, files in os.walk(task_dir / 'images'))
    assert n_images == sum(stop - start for _, start, stop in SLICES[task])
    manifest = json.loads((task_dir / 'manifest.json').read_text())
    assert manifest['tfds']['name'] == name and manifest['complete'] is True
    if task in VERSIONS:
        assert manifest['tfds']['version'] == VERSIONS[task] and manifest['version_note']
    assert manifest['counts'] == {'train800': 800, 'val200': 200, 'train800val200': 1000,
                                  'test': SLICES[task][2][2] - SLICES[task][2][1]}
    assert manifest['slices']['val200'] == ['{}[{}:{}]'.format(*SLICES[task][1])]
    assert manifest['jpeg']['quality'] == 75 and manifest['jpeg']['subsampling'] == '4:2:0'


def test_jpegs_are_pillow_defaults(prepared):
    """Quality 75, 4:2:0: the bytes Pillow writes with no options (the common release)."""
    _, out, _ = prepared
    path = out / 'dtd' / 'images' / 'train800' / '000003.jpg'
    with Image.open(path) as im:
        pixels = np.asarray(im)
    # re-encode the tfds image with Pillow defaults and compare with the tool's file
    tfds_dir = prepared[0]
    ds = tfds.builder('dtd', data_dir=str(tfds_dir)).as_dataset(split='train[3:4]')
    image = next(iter(tfds.as_numpy(ds)))['image']
    reference = out.parent / 'reference.jpg'
    Image.fromarray(image).save(reference)
    assert reference.read_bytes() == path.read_bytes()
    assert pixels.shape == (32, 32, 3)


def test_rerun_skips_and_force_rebuilds_only_tool_folders(prepared, capsys):
    tfds_dir, out, _ = prepared
    code, stdout, _ = run_tool(capsys, '--tfds-dir', str(tfds_dir), '--out', str(out),
                               '--tasks', 'dtd', 'kitti')
    assert code == 0 and stdout.count('complete, skipped') == 2
    lists = (out / 'kitti' / 'test.txt').read_text()
    code, stdout, err = run_tool(capsys, '--tfds-dir', str(tfds_dir), '--out', str(out),
                                 '--tasks', 'kitti', '--force')
    assert code == 0, err
    assert 'replacing what this tool wrote' in stdout and '1025 images' in stdout
    assert (out / 'kitti' / 'test.txt').read_text() == lists


def release_folder(root, task, n_test=3):
    """A task folder in the common release's shape (train800val200 has its own copies)."""
    task_dir = root / task
    lines = {}
    for split, n in (('train800', 800), ('val200', 200), ('train800val200', 1000),
                     ('test', n_test)):
        (task_dir / 'images' / split).mkdir(parents=True)
        lines[split] = []
        for i in range(n):
            rel = f'images/{split}/{i}.jpg'
            (task_dir / rel).write_bytes(b'release image %d' % i)
            lines[split].append(f'{rel} {i % 4}')
        (task_dir / f'{split}.txt').write_text('\n'.join(lines[split]) + '\n')
    return task_dir


@pytest.mark.parametrize('with_out', [True, False])
def test_tfds_runs_leave_a_release_untouched(prepared, tmp_path, with_out, capsys,
                                            monkeypatch):
    """A linked release: complete tasks are skipped, incomplete ones refused (exit 2)."""
    tfds_dir = prepared[0]
    release = tmp_path / 'release'
    release_folder(release, 'kitti')
    partial = release_folder(release, 'dtd')
    (partial / 'test.txt').unlink()  # not complete: the tool must still not touch it
    (tmp_path / 'data').mkdir()
    (tmp_path / 'data' / 'vtab-1k').symlink_to(release, target_is_directory=True)
    before = snapshot(release)
    monkeypatch.chdir(tmp_path)  # without --out: the default data/vtab-1k
    out = ['--out', 'data/vtab-1k'] if with_out else []
    code, stdout, err = run_tool(capsys, '--tfds-dir', str(tfds_dir), *out, '--tasks', 'kitti')
    assert code == 0 and 'complete, skipped' in stdout, err
    for force in ([], ['--force']):
        code, _, err = run_tool(capsys, '--tfds-dir', str(tfds_dir), *out, '--tasks',
                                'kitti', 'dtd', *force)
        assert code == 2 and '\n' not in err and 'refus' in err, err
        assert ('kitti' if force else 'dtd') in err
    assert snapshot(release) == before


def test_unprepared_dataset_is_one_line(tmp_path, capsys):
    """A tfds dir without the dataset: one line that says how to prepare it."""
    empty = tmp_path / 'empty_tfds'
    empty.mkdir()
    code, _, err = run_tool(capsys, '--tfds-dir', str(empty), '--out', str(tmp_path / 'o'),
                            '--tasks', 'oxford_iiit_pet')
    assert code == 1 and '\n' not in err, err
    assert 'oxford_iiit_pet:4.0.0' in err and '--download' in err


@pytest.mark.parametrize('task,files', [('resisc45', 'NWPU-RESISC45'),
                                        ('diabetic_retinopathy', 'trainLabels.csv')])
def test_manual_datasets_say_what_to_download(tmp_path, task, files, capsys):
    tfds_dir = tmp_path / 'tfds'
    tfds_dir.mkdir()
    code, _, err = run_tool(capsys, '--tfds-dir', str(tfds_dir), '--out', str(tmp_path / 'o'),
                            '--tasks', task, '--download')
    assert code == 1 and '\n' not in err, err
    assert files in err and osp.join(str(tfds_dir), 'downloads', 'manual') in err
    assert not (tmp_path / 'o' / task).exists()
