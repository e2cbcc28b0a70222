"""tools/prepare_vtab1k.py: synthetic tasks, VTAB-1k split/label logic, CLI errors."""
import json
import os
import os.path as osp

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from memba_vision.datasets import tfds_vtab
from memba_vision.datasets.synthetic import synthetic_split, write_synthetic_task
from memba_vision.datasets.tfds_vtab import Slice, iter_examples, resolve_splits
from memba_vision.datasets.vtab1k import VTAB1k
from conftest import load_tool, snapshot

SYNTHETIC = {'dsprites_loc': 16, 'dsprites_ori': 16, 'clevr_count': 8}


def read_list(path):
    with open(path) as f:
        return [line.split() for line in f.read().splitlines() if line.strip()]


# ----------------------------------------------------------------- synthetic
@pytest.mark.parametrize('task', list(SYNTHETIC))
def test_synthetic_is_deterministic(task):
    a = list(synthetic_split(task, 'train800', 20, size=32, seed=3))
    b = list(synthetic_split(task, 'train800', 20, size=32, seed=3))
    c = list(synthetic_split(task, 'train800', 20, size=32, seed=4))
    d = list(synthetic_split(task, 'test', 20, size=32, seed=3))
    assert all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))
    assert not all(np.array_equal(x[0], y[0]) for x, y in zip(a, c))
    assert not all(np.array_equal(x[0], y[0]) for x, y in zip(a, d))
    assert a[0][0].shape == (32, 32, 3) and a[0][0].dtype == np.uint8


def test_synthetic_cli_writes_the_layout(tmp_path, capsys):
    tool = load_tool('prepare_vtab1k')
    out = tmp_path / 'vtab'
    argv = ['--synthetic', '--out', str(out), '--num-train', '24', '--num-val', '8',
            '--num-test', '16', '--size', '32', '--seed', '1']
    assert tool.main(argv) == 0
    for task, num_classes in SYNTHETIC.items():
        task_dir = out / task
        lists = {s: read_list(task_dir / f'{s}.txt')
                 for s in ('train800', 'val200', 'train800val200', 'test')}
        assert [len(lists[s]) for s in ('train800', 'val200', 'test')] == [24, 8, 16]
        assert lists['train800val200'] == lists['train800'] + lists['val200']
        for rel, label in lists['train800val200'] + lists['test']:
            assert rel.endswith('.jpg') and 0 <= int(label) < num_classes
            with Image.open(task_dir / rel) as im:
                assert im.size == (32, 32) and im.mode == 'RGB'
        # the dataset reads it with the task table's class count
        ds = VTAB1k(task, 'train800val200', data_root=str(out))
        assert len(ds) == 32 and len(ds.metainfo['classes']) == num_classes
    # same seed -> same files; a rerun skips complete tasks
    first = (out / 'clevr_count' / 'images' / 'test' / '000003.jpg').read_bytes()
    mtime = os.path.getmtime(out / 'clevr_count' / 'test.txt')
    capsys.readouterr()
    assert tool.main(argv) == 0
    assert capsys.readouterr().out.count('complete, skipped') == 3
    assert os.path.getmtime(out / 'clevr_count' / 'test.txt') == mtime
    assert tool.main(argv + ['--tasks', 'clevr_count', '--force']) == 0
    assert (out / 'clevr_count' / 'images' / 'test' / '000003.jpg').read_bytes() == first


def test_incomplete_task_is_rebuilt(tmp_path):
    assert write_synthetic_task(str(tmp_path), 'dsprites_loc', 16, 4, 8, 32, progress=False)
    os.remove(tmp_path / 'dsprites_loc' / 'images' / 'test' / '000002.jpg')
    assert write_synthetic_task(str(tmp_path), 'dsprites_loc', 16, 4, 8, 32, progress=False)
    assert not write_synthetic_task(str(tmp_path), 'dsprites_loc', 16, 4, 8, 32,
                                    progress=False)
    # other sizes than the folder holds: rebuilt
    assert write_synthetic_task(str(tmp_path), 'dsprites_loc', 16, 4, 12, 32, progress=False)
    assert len(read_list(tmp_path / 'dsprites_loc' / 'test.txt')) == 12


def _pixel_features(task_dir, split):
    """Grey image means over a 4x4 grid and the whole image: 17 features."""
    rows = read_list(osp.join(task_dir, f'{split}.txt'))
    x = torch.tensor(np.stack([np.asarray(Image.open(osp.join(task_dir, rel)))
                               for rel, _ in rows])).float().mean(-1)[:, None] / 255
    feats = torch.cat([F.adaptive_avg_pool2d(x, 4).flatten(1),
                       x.mean((1, 2, 3))[:, None]], 1)
    return feats, torch.tensor([int(label) for _, label in rows])


@pytest.mark.parametrize('task', list(SYNTHETIC))
def test_synthetic_tasks_are_learnable(tmp_path, task):
    """A linear classifier on coarse pixel means beats chance by far."""
    write_synthetic_task(str(tmp_path), task, num_train=320, num_val=8, num_test=160,
                         size=64, seed=0, progress=False)
    x_train, y_train = _pixel_features(tmp_path / task, 'train800')
    x_test, y_test = _pixel_features(tmp_path / task, 'test')
    mean, std = x_train.mean(0), x_train.std(0) + 1e-3
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    num_classes = SYNTHETIC[task]
    weight = torch.zeros(x_train.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=100)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x_train @ weight + bias, y_train) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny problem: threads only add overhead
    try:
        opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    accuracy = ((x_test @ weight + bias).argmax(1) == y_test).float().mean().item()
    assert accuracy > 3 / num_classes, f'{task}: {accuracy:.3f}'


# ----------------------------------------------------------------- tfds split logic
# tfds split sizes of the datasets VTAB-1k uses (tfds catalog).
TFDS_SIZES = {
    'cifar': {'train': 50000, 'test': 10000},
    'caltech101': {'train': 3060, 'test': 6084},
    'dtd': {'train': 1880, 'validation': 1880, 'test': 1880},
    'oxford_flowers102': {'train': 1020, 'validation': 1020, 'test': 6149},
    'oxford_iiit_pet': {'train': 3680, 'test': 3669},
    'svhn': {'train': 73257, 'test': 26032, 'extra': 531131},
    'sun397': {'train': 76128, 'validation': 10875, 'test': 21750},
    'patch_camelyon': {'train': 262144, 'validation': 32768, 'test': 32768},
    'eurosat': {'train': 27000},
    'resisc45': {'train': 31500},
    'diabetic_retinopathy': {'train': 35126, 'validation': 10906, 'test': 42670},
    'clevr_count': {'train': 70000, 'validation': 15000, 'test': 15000},
    'clevr_dist': {'train': 70000, 'validation': 15000, 'test': 15000},
    'dmlab': {'train': 65550, 'validation': 22628, 'test': 22735},
    'kitti': {'train': 6347, 'validation': 423, 'test': 711},
    'dsprites_loc': {'train': 737280},
    'dsprites_ori': {'train': 737280},
    'smallnorb_azi': {'train': 24300, 'test': 24300},
    'smallnorb_ele': {'train': 24300, 'test': 24300},
}
# VTAB's val200 per task, worked out by hand from task_adaptation/data/*.py.
VAL200 = {
    'cifar': Slice('train', 45000, 45200),           # 90% of 50000
    'caltech101': Slice('train', 2754, 2954),        # 90% of 3060
    'dtd': Slice('validation', 0, 200),
    'oxford_iiit_pet': Slice('train', 2944, 3144),   # 80% of 3680
    'svhn': Slice('train', 65931, 66131),            # 90% of 73257, floored
    'eurosat': Slice('train', 16200, 16400),         # 60% of 27000
    'resisc45': Slice('train', 18900, 19100),        # 60% of 31500
    'clevr_count': Slice('train', 63000, 63200),     # 90% of 70000
    'dsprites_loc': Slice('train', 589824, 590024),  # 80% of 737280
    'smallnorb_azi': Slice('test', 0, 200),
    'kitti': Slice('validation', 0, 200),
}
TEST_SLICE = {
    'cifar': Slice('test', 0, 10000),
    'eurosat': Slice('train', 21600, 27000),         # after 60% + 20%
    'resisc45': Slice('train', 25200, 31500),
    'clevr_dist': Slice('validation', 0, 15000),     # CLEVR's test is tfds validation
    'dsprites_ori': Slice('train', 663552, 737280),  # after 80% + 10%
    'smallnorb_ele': Slice('test', 12150, 24300),    # test[50%:]
    'dmlab': Slice('test', 0, 22735),
}


def test_every_task_has_a_split_rule():
    assert set(tfds_vtab.TFDS_TASKS) == set(TFDS_SIZES)


@pytest.mark.parametrize('task', list(TFDS_SIZES))
def test_split_slices(task):
    from memba_vision.datasets.vtab1k_tasks import get_task
    splits = resolve_splits(task, TFDS_SIZES[task])
    assert splits['train800'] == [Slice('train', 0, 800)]
    assert [s.stop - s.start for s in splits['val200']] == [200]
    assert splits['train800val200'] == splits['train800'] + splits['val200']
    test_size = sum(s.stop - s.start for s in splits['test'])
    assert test_size == get_task(task).num_test
    if task in VAL200:
        assert splits['val200'] == [VAL200[task]]
    if task in TEST_SLICE:
        assert splits['test'] == [TEST_SLICE[task]]
    # val200 never overlaps train800 or test
    for v in splits['val200']:
        for other in splits['train800'] + splits['test']:
            assert v.split != other.split or v.stop <= other.start or other.stop <= v.start


def test_split_outside_the_data_is_an_error():
    with pytest.raises(ValueError, match='outside'):
        resolve_splits('dtd', {'train': 500, 'validation': 1880, 'test': 1880})
    with pytest.raises(ValueError, match='validation'):
        resolve_splits('dtd', {'train': 1880, 'test': 1880})


def label(task, example):
    return tfds_vtab.TFDS_TASKS[task].label_fn(example)


def clevr(depths):
    return {'objects': {'size': np.zeros(len(depths), np.int64),
                        'pixel_coords': np.array([[10.0, 20.0, d] for d in depths])}}


def test_clevr_labels():
    assert label('clevr_count', clevr([9.0] * 3)) == 0
    assert label('clevr_count', clevr([9.0] * 7)) == 4
    assert label('clevr_count', clevr([9.0] * 10)) == 7
    # closest depth binned by (0, 8, 8.5, 9, 9.5, 10, 100]
    for depths, expected in [([7.9, 12.0], 0), ([8.0], 0), ([12.0, 8.2], 1), ([8.75], 2),
                             ([9.2, 30.0], 3), ([9.7], 4), ([10.0], 4), ([12.0, 11.0], 5)]:
        assert label('clevr_dist', clevr(depths)) == expected, depths


def test_dsprites_labels():
    for value, expected in [(0, 0), (1, 0), (2, 1), (17, 8), (31, 15)]:  # 32 -> 16 bins
        assert label('dsprites_loc', {'label_x_position': value}) == expected
    for value, expected in [(0, 0), (2, 0), (3, 1), (5, 2), (24, 9), (39, 15)]:  # 40 -> 16
        assert label('dsprites_ori', {'label_orientation': value}) == expected


def test_smallnorb_and_plain_labels():
    example = {'label_azimuth': 17, 'label_elevation': 8, 'label': 5}
    assert label('smallnorb_azi', example) == 17
    assert label('smallnorb_ele', example) == 8
    for task in ('dmlab', 'diabetic_retinopathy', 'sun397', 'cifar'):
        assert label(task, {'label': np.int64(3)}) == 3


def kitti(objects):
    """objects: (tfds type id, z in metres)."""
    return {'objects': {'type': np.array([t for t, _ in objects], np.int64),
                        'location': np.array([[1.0, 1.5, z] for _, z in objects])}}


def test_kitti_closest_vehicle_labels():
    car, van, truck, pedestrian, cyclist = 0, 1, 2, 3, 5
    cases = [([(car, 5.0)], 0), ([(van, 8.0)], 0), ([(truck, 12.0), (car, 25.0)], 1),
             ([(car, 30.0), (pedestrian, 3.0)], 2), ([(pedestrian, 3.0)], 3),
             ([(cyclist, 2.0), (pedestrian, 4.0)], 3), ([], 3)]
    for objects, expected in cases:
        assert label('kitti', kitti(objects)) == expected, objects


def fake_dsprites(n):
    """tfds-like dsprites examples: 1-channel {0,1} images, x position = id % 32."""
    return [{'image': np.full((4, 4, 1), i % 2, np.uint8), 'label_x_position': i % 32,
             'label_orientation': i % 40, 'id': i} for i in range(n)]


def test_iter_examples_reads_the_right_slices():
    data = {'train': fake_dsprites(2000)}  # train 80% = 1600, val 10% = 200

    def read(s):
        return iter(data[s.split][s.start:s.stop])

    splits = resolve_splits('dsprites_loc', {'train': 2000})
    assert splits['val200'] == [Slice('train', 1600, 1800)]
    assert splits['test'] == [Slice('train', 1800, 2000)]
    val = list(iter_examples('dsprites_loc', splits['val200'], read))
    assert [lab for _, lab in val] == [(i % 32) // 2 for i in range(1600, 1800)]
    image, _ = val[1]  # id 1601: ones -> 255, tiled to RGB
    assert image.shape == (4, 4, 3) and image.dtype == np.uint8 and (image == 255).all()
    test = list(iter_examples('dsprites_ori', splits['test'], read))
    assert [lab for _, lab in test] == [int((i % 40) / 2.5) for i in range(1800, 2000)]

    def short_read(s):
        return iter(data[s.split][s.start:s.stop - 1])

    with pytest.raises(ValueError, match='expected 200'):
        list(iter_examples('dsprites_loc', splits['val200'], short_read))


class FakeReader:
    """Stands in for TfdsReader: kitti-like examples with a known label per split."""

    def __init__(self, sizes):
        self.sizes = sizes
        self.reads = []

    def split_sizes(self):
        return dict(self.sizes)

    def read(self, s):
        self.reads.append(s)
        z = {'train': 5.0, 'validation': 12.0, 'test': 30.0}[s.split]  # labels 0, 1, 2
        for i in range(s.start, s.stop):
            yield {'image': np.full((6, 6, 3), i % 256, np.uint8),
                   'objects': {'type': np.array([0]), 'location': np.array([[0, 0, z]])}}


def test_write_tfds_task_with_a_fake_reader(tmp_path, capsys):
    reader = FakeReader({'train': 900, 'validation': 250, 'test': 30})
    assert tfds_vtab.write_tfds_task('kitti', 'unused', str(tmp_path), reader=reader,
                                     progress=False)
    assert reader.reads == [Slice('train', 0, 800), Slice('validation', 0, 200),
                            Slice('test', 0, 30)]
    assert 'warning' in capsys.readouterr().out  # 30 test images, the table says 711
    lists = {s: read_list(tmp_path / 'kitti' / f'{s}.txt')
             for s in ('train800', 'val200', 'train800val200', 'test')}
    assert {lab for _, lab in lists['train800']} == {'0'}
    assert {lab for _, lab in lists['val200']} == {'1'}
    assert {lab for _, lab in lists['test']} == {'2'}
    assert len(lists['train800val200']) == 1000
    ds = VTAB1k('kitti', 'test', data_root=str(tmp_path))
    assert len(ds) == 30
    # complete: skipped without reading tfds again
    assert not tfds_vtab.write_tfds_task('kitti', 'unused', str(tmp_path),
                                         reader=FakeReader({}), progress=False)


# ----------------------------------------------------------------- CLI errors
def run_tool(argv, capsys):
    code = load_tool('prepare_vtab1k').main(argv)
    err = capsys.readouterr().err.strip()
    assert '\n' not in err, err
    return code, err


def test_cli_unknown_task(tmp_path, capsys):
    code, err = run_tool(['--synthetic', '--out', str(tmp_path), '--tasks', 'caltech101'],
                         capsys)
    assert code == 1 and 'caltech101' in err and 'dsprites_loc' in err
    code, err = run_tool(['--tfds-dir', str(tmp_path), '--out', str(tmp_path),
                          '--tasks', 'mnist'], capsys)
    assert code == 1 and 'mnist' in err and 'smallnorb_azi' in err


def test_cli_missing_tfds_dir(tmp_path, capsys):
    code, err = run_tool(['--tfds-dir', str(tmp_path / 'no_tfds'), '--out', str(tmp_path)],
                         capsys)
    assert code == 1 and 'no_tfds' in err and 'not found' in err


def test_cli_output_not_writable(tmp_path, capsys):
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    code, err = run_tool(['--synthetic', '--out', str(blocker / 'vtab')], capsys)
    assert code == 1 and 'not writable' in err and 'a_file' in err


def test_cli_without_tensorflow_datasets(tmp_path, capsys, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_tfds(name, *args, **kwargs):
        if name.startswith('tensorflow_datasets'):
            raise ImportError('No module named tensorflow_datasets')
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, '__import__', no_tfds)
    code, err = run_tool(['--tfds-dir', str(tmp_path), '--out', str(tmp_path / 'out'),
                          '--tasks', 'dtd'], capsys)
    assert code == 1 and "pip install 'memba_vision[data]'" in err


# ----------------------------------------------------------------- data safety
def release_folder(root, task, n_test=3):
    """A task folder in the common release's shape (train800val200 has its own copies)."""
    task_dir = root / task
    for split, n in (('train800', 800), ('val200', 200), ('train800val200', 1000),
                     ('test', n_test)):
        (task_dir / 'images' / split).mkdir(parents=True)
        lines = []
        for i in range(n):
            rel = f'images/{split}/{i}.jpg'
            (task_dir / rel).write_bytes(b'release image %d' % i)
            lines.append(f'{rel} {i % 8}')
        (task_dir / f'{split}.txt').write_text('\n'.join(lines) + '\n')
    return task_dir


SMALL = ['--num-train', '16', '--num-val', '8', '--num-test', '8', '--size', '16']


@pytest.mark.parametrize('link', [False, True])
def test_synthetic_never_touches_a_release(tmp_path, capsys, monkeypatch, link):
    release = tmp_path / 'release'
    for task in SYNTHETIC:
        release_folder(release, task)
    (tmp_path / 'data').mkdir()
    root = tmp_path / 'data' / 'vtab-1k'
    if link:
        root.symlink_to(release, target_is_directory=True)
    else:
        release.rename(root)
        release = root
    before = snapshot(release)
    for extra in ([], ['--force']):
        code, err = run_tool(['--synthetic', '--out', str(root)] + SMALL + extra, capsys)
        assert code == 2 and 'refused' in err and 'synthetic' in err, err
    # no --out: the synthetic tasks go to their own folder, marked synthetic
    monkeypatch.chdir(tmp_path)
    code, err = run_tool(['--synthetic', '--force'] + SMALL, capsys)
    assert code == 0, err
    assert (tmp_path / 'data' / 'vtab-1k-synthetic' / 'SYNTHETIC_DATA.txt').is_file()
    assert len(read_list(tmp_path / 'data' / 'vtab-1k-synthetic' / 'clevr_count' /
                         'test.txt')) == 8
    assert snapshot(release) == before
    # a release-shaped folder counts as complete: VTAB1k reads it as is
    assert tfds_vtab.write_tfds_task('clevr_count', 'unused', str(root), reader=FakeReader({}),
                                     progress=False) is False
    assert snapshot(release) == before


def test_real_data_never_goes_into_a_synthetic_root(tmp_path, capsys):
    out = tmp_path / 'synthetic'
    assert run_tool(['--synthetic', '--out', str(out), '--tasks', 'clevr_count'] + SMALL,
                    capsys)[0] == 0
    manifest = json.loads((out / 'clevr_count' / 'manifest.json').read_text())
    assert manifest['synthetic'] is True and manifest['counts']['train800val200'] == 24
    code, err = run_tool(['--tfds-dir', str(tmp_path), '--out', str(out), '--tasks', 'dtd'],
                         capsys)
    assert code == 2 and 'synthetic' in err


def test_force_rebuilds_only_what_the_tool_wrote(tmp_path, capsys):
    out = tmp_path / 'synthetic'
    argv = ['--synthetic', '--out', str(out), '--tasks', 'dsprites_loc'] + SMALL
    assert run_tool(argv, capsys)[0] == 0
    extra = out / 'dsprites_loc' / 'my_notes.txt'
    extra.write_text('mine')
    capsys.readouterr()
    assert load_tool('prepare_vtab1k').main(argv + ['--force', '--num-test', '4']) == 0
    stdout = capsys.readouterr().out
    assert 'replacing what this tool wrote' in stdout and '32 images' in stdout
    assert extra.read_text() == 'mine'  # not the tool's: kept
    assert sorted(os.listdir(out / 'dsprites_loc' / 'images' / 'test')) == \
        [f'{i:06d}.jpg' for i in range(4)]
    # a folder without the tool's manifest is refused, even with --force
    (out / 'dsprites_loc' / 'manifest.json').unlink()
    code, err = run_tool(argv + ['--force'], capsys)
    assert code == 2 and 'did not write' in err and extra.read_text() == 'mine'


def test_a_source_with_too_many_examples_fails_before_writing_them(tmp_path):
    from memba_vision.datasets.vtab1k import write_task_folder

    def source(n):
        return ((np.zeros((8, 8, 3), np.uint8), 0) for _ in range(n))

    with pytest.raises(ValueError, match='more than the 4'):
        write_task_folder(str(tmp_path / 't'), {'train800': (source(4), 4),
                                                'val200': (source(2), 2),
                                                'test': (source(12), 4)},
                          num_classes=2, progress=False)
    assert sorted(os.listdir(tmp_path / 't' / 'images' / 'test')) == \
        [f'{i:06d}.jpg' for i in range(4)]
    assert not (tmp_path / 't' / 'test.txt').exists()  # the task stays incomplete


def test_jpeg_quality(tmp_path):
    from memba_vision.datasets.vtab1k import jpeg_writer
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    jpeg_writer()(image, str(tmp_path / 'a.jpg'))
    Image.fromarray(image).save(tmp_path / 'b.jpg')  # Pillow's defaults: 75, 4:2:0
    jpeg_writer(95)(image, str(tmp_path / 'c.jpg'))
    assert (tmp_path / 'a.jpg').read_bytes() == (tmp_path / 'b.jpg').read_bytes()
    assert (tmp_path / 'c.jpg').read_bytes() != (tmp_path / 'a.jpg').read_bytes()
