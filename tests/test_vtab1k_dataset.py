"""VTAB1k dataset: loading, validation errors and the in-memory image cache."""
import os
import os.path as osp

import numpy as np
import pytest
import torch
from PIL import Image

from memba_vision.datasets.vtab1k import VTAB1k
from mmpretrain.registry import DATASETS

TASK = 'kitti'  # 4 classes
# (relative path, label, (height, width)) per split; train800val200 = both.
TRAIN = [('images/train/a.jpg', 0, (12, 10)), ('images/train/b.jpg', 3, (8, 8)),
         ('images/train/c.jpg', 1, (16, 12))]
VAL = [('images/val/d.jpg', 2, (10, 14))]
TEST = [('images/test/e.jpg', 3, (9, 9)), ('images/test/f.jpg', 0, (11, 7))]
RESIZE = [dict(type='LoadImageFromFile'),
          dict(type='Resize', scale=(8, 8), interpolation='bicubic'),
          dict(type='PackInputs')]


def write_list(path, entries):
    with open(path, 'w') as f:
        f.write(''.join(f'{rel} {label}\n' for rel, label, _ in entries))


@pytest.fixture
def root(tmp_path):
    """data_root with one hand-written kitti task folder."""
    task_dir = tmp_path / TASK
    rng = np.random.default_rng(0)
    for rel, _, (h, w) in TRAIN + VAL + TEST:
        path = task_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    write_list(task_dir / 'train800.txt', TRAIN)
    write_list(task_dir / 'val200.txt', VAL)
    write_list(task_dir / 'train800val200.txt', TRAIN + VAL)
    write_list(task_dir / 'test.txt', TEST)
    return tmp_path


def one_line_error(excinfo):
    msg = str(excinfo.value)
    assert '\n' not in msg, msg
    return msg


@pytest.mark.parametrize('split,entries', [('train800val200', TRAIN + VAL),
                                           ('train800', TRAIN), ('val200', VAL),
                                           ('test', TEST)])
def test_length_labels_and_metainfo(root, split, entries):
    ds = VTAB1k(TASK, split, data_root=str(root))
    assert len(ds) == len(entries)
    assert ds.get_gt_labels().tolist() == [label for _, label, _ in entries]
    assert ds.metainfo['classes'] == ('0', '1', '2', '3')
    assert [ds.get_data_info(i)['img_path'] for i in range(len(ds))] == \
        [osp.join(str(root), TASK, rel) for rel, _, _ in entries]


def test_pipeline_output_and_registry(root):
    ds = DATASETS.build(dict(type='VTAB1k', task=TASK, split='train800',
                             data_root=str(root), pipeline=RESIZE))
    sample = ds[1]
    assert sample['inputs'].shape == (3, 8, 8) and sample['inputs'].dtype == torch.uint8
    assert sample['data_samples'].gt_label.tolist() == [3]
    assert sample['data_samples'].ori_shape == (8, 8)
    raw = VTAB1k(TASK, 'train800', data_root=str(root),
                 pipeline=[dict(type='LoadImageFromFile'), dict(type='PackInputs')])
    assert raw[2]['inputs'].shape == (3, 16, 12)


def test_unknown_task_and_split(root):
    with pytest.raises(FileNotFoundError) as exc:  # no such folder: not your own data either
        VTAB1k('imagenet', data_root=str(root))
    msg = one_line_error(exc)
    assert "'imagenet'" in msg and 'caltech101' in msg and 'smallnorb_ele' in msg
    with pytest.raises(ValueError, match='train800val200'):
        VTAB1k(TASK, 'trainval', data_root=str(root))


def test_missing_root_and_task_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        VTAB1k(TASK, data_root=str(tmp_path / 'nowhere'))
    msg = one_line_error(exc)
    assert 'nowhere' in msg and 'tools/prepare_vtab1k.py' in msg and 'Data preparation' in msg
    with pytest.raises(FileNotFoundError) as exc:
        VTAB1k(TASK, data_root=str(tmp_path))
    msg = one_line_error(exc)
    assert osp.join(str(tmp_path), TASK) in msg and 'tools/prepare_vtab1k.py' in msg


def test_missing_list_file(root):
    os.remove(root / TASK / 'test.txt')
    with pytest.raises(FileNotFoundError) as exc:
        VTAB1k(TASK, 'test', data_root=str(root))
    assert 'test.txt' in one_line_error(exc)


def test_empty_list_file(root):
    (root / TASK / 'val200.txt').write_text('\n\n')
    with pytest.raises(ValueError) as exc:
        VTAB1k(TASK, 'val200', data_root=str(root))
    msg = one_line_error(exc)
    assert osp.join(str(root), TASK, 'val200.txt') in msg and 'empty' in msg


@pytest.mark.parametrize('bad_line', ['images/train/b.jpg', 'images/train/b.jpg three',
                                      'images/train/b.jpg 1.5'])
def test_malformed_line(root, bad_line):
    (root / TASK / 'train800.txt').write_text(f'images/train/a.jpg 0\n{bad_line}\n')
    with pytest.raises(ValueError) as exc:
        VTAB1k(TASK, 'train800', data_root=str(root))
    msg = one_line_error(exc)
    assert 'train800.txt, line 2' in msg and 'malformed' in msg


def test_missing_image(root):
    (root / TASK / 'train800.txt').write_text(
        'images/train/a.jpg 0\n\nimages/train/zzz.jpg 1\n')
    with pytest.raises(FileNotFoundError) as exc:
        VTAB1k(TASK, 'train800', data_root=str(root))
    msg = one_line_error(exc)
    assert 'train800.txt, line 3' in msg and 'zzz.jpg' in msg


@pytest.mark.parametrize('label', [4, -1])
def test_label_out_of_range(root, label):
    (root / TASK / 'test.txt').write_text(f'images/test/e.jpg {label}\n')
    with pytest.raises(ValueError) as exc:
        VTAB1k(TASK, 'test', data_root=str(root))
    msg = one_line_error(exc)
    assert 'test.txt, line 1' in msg and f'label {label}' in msg and '[0, 4)' in msg


def test_paths_leaving_the_task_folder_are_refused(root, tmp_path):
    outside = tmp_path / 'outside.jpg'
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(outside)
    (tmp_path / 'outside_dir').mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / 'outside_dir' / 'x.jpg')
    os.symlink(outside, root / TASK / 'images' / 'link.jpg')
    os.symlink(tmp_path / 'outside_dir', root / TASK / 'images' / 'linkdir')
    list_file = root / TASK / 'train800.txt'
    for line in (f'{outside} 0', '../outside.jpg 0', 'images/../../outside.jpg 0',
                 'images/link.jpg 0', 'images/linkdir/x.jpg 0',
                 # lexically images/outside.jpg, but '..' follows the link target
                 'images/linkdir/../outside.jpg 0'):
        list_file.write_text(f'images/train/a.jpg 0\n{line}\n')
        with pytest.raises(ValueError) as exc:
            VTAB1k(TASK, 'train800', data_root=str(root))
        msg = one_line_error(exc)
        assert 'train800.txt, line 2' in msg and 'refused' in msg, line
    # a '..' that stays inside the folder is fine
    list_file.write_text('images/test/../train/a.jpg 0\n')
    assert len(VTAB1k(TASK, 'train800', data_root=str(root))) == 1


def test_corrupt_image_names_the_file(root):
    bad = root / TASK / 'images' / 'train' / 'b.jpg'
    bad.write_bytes(b'not a jpeg at all')
    ds = VTAB1k(TASK, 'train800', data_root=str(root), pipeline=RESIZE)
    ds[0]  # the others still load
    with pytest.raises(RuntimeError) as exc:
        ds[1]
    msg = one_line_error(exc)
    assert str(bad) in msg and 'cannot load image' in msg


def test_cache_gives_identical_samples(root):
    plain = VTAB1k(TASK, 'train800val200', data_root=str(root), pipeline=RESIZE)
    cached = VTAB1k(TASK, 'train800val200', data_root=str(root), pipeline=RESIZE,
                    cache_images=True, cache_workers=2)
    images = cached._cache_images
    assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8
    assert images.flags['C_CONTIGUOUS']
    for i in range(len(plain)):
        a, b = plain[i], cached[i]
        assert torch.equal(a['inputs'], b['inputs'])
        assert a['data_samples'].metainfo == b['data_samples'].metainfo
        assert torch.equal(a['data_samples'].gt_label, b['data_samples'].gt_label)
    assert cached[0]['data_samples'].ori_shape == (12, 10)  # from the cached meta


def test_cache_does_not_decode_again(root):
    cached = VTAB1k(TASK, 'test', data_root=str(root), pipeline=RESIZE, cache_images=True)
    expected = [cached[i]['inputs'].clone() for i in range(len(cached))]
    for rel, _, _ in TEST:
        os.remove(root / TASK / rel)
    for i in range(len(cached)):
        assert torch.equal(cached[i]['inputs'], expected[i])
    with pytest.raises(FileNotFoundError):  # a fresh dataset does need the files
        VTAB1k(TASK, 'test', data_root=str(root), pipeline=RESIZE)


def test_cache_refuses_random_transforms(root):
    pipeline = [dict(type='LoadImageFromFile'), dict(type='Resize', scale=(8, 8)),
                dict(type='RandomFlip', prob=0.5), dict(type='PackInputs')]
    with pytest.raises(ValueError) as exc:
        VTAB1k(TASK, 'train800', data_root=str(root), pipeline=pipeline, cache_images=True)
    msg = one_line_error(exc)
    assert 'RandomFlip' in msg and 'cache_images' in msg
    # the same pipeline without the cache is fine
    VTAB1k(TASK, 'train800', data_root=str(root), pipeline=pipeline)


def test_cache_needs_one_image_shape(root):
    pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
    with pytest.raises(ValueError) as exc:
        VTAB1k(TASK, 'train800', data_root=str(root), pipeline=pipeline, cache_images=True)
    msg = one_line_error(exc)
    assert 'b.jpg' in msg and 'a.jpg' in msg and 'Resize' in msg
