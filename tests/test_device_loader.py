"""DeviceBatchLoader: the wrapped DataLoader's batches, gathered from one copy on the device."""
import numpy as np
import pytest
import torch
from mmengine.dataset import DefaultSampler, default_collate
from PIL import Image
from torch.utils.data import DataLoader

from memba_vision.datasets.device_loader import DeviceBatchLoader
from memba_vision.datasets.vtab1k import VTAB1k

TASK = 'kitti'  # 4 classes
N, BATCH = 11, 4  # batches of 4, 4 and 3
PIPELINE = [dict(type='LoadImageFromFile'),
            dict(type='Resize', scale=(8, 8), interpolation='bicubic'),
            dict(type='PackInputs')]


@pytest.fixture
def root(tmp_path):
    """A kitti folder of N images of assorted sizes, labels 0..3."""
    task_dir = tmp_path / TASK
    (task_dir / 'images').mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(N):
        h, w = rng.integers(6, 15, 2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            task_dir / 'images' / f'{i}.png')
        lines.append(f'images/{i}.png {i % 4}\n')
    for split, part in (('train800', lines[:8]), ('val200', lines[8:]),
                        ('train800val200', lines), ('test', lines[:2])):
        (task_dir / f'{split}.txt').write_text(''.join(part))
    return str(tmp_path)


def stock_loader(root, cache_images=True):
    ds = VTAB1k(TASK, 'train800val200', data_root=root, pipeline=PIPELINE,
                cache_images=cache_images, cache_workers=2)
    return DataLoader(ds, batch_size=BATCH, sampler=DefaultSampler(ds, shuffle=True, seed=3),
                      collate_fn=default_collate)


def sample_ids(batches):
    return [[s.sample_idx for s in b['data_samples']] for b in batches]


@pytest.mark.parametrize('device', ['cpu', 'cuda'])
def test_batches_equal_the_stock_loaders_in_every_epoch(root, device):
    if device == 'cuda' and not torch.cuda.is_available():
        pytest.skip('needs a GPU')
    loader = stock_loader(root)
    ours = DeviceBatchLoader(loader, device)
    assert len(ours) == len(loader) == 3 and ours.sampler is loader.sampler
    orders = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)  # what DistSamplerSeedHook does
        expected, got = list(loader), list(ours)
        assert [len(b['data_samples']) for b in got] == [4, 4, 3]
        for e, g in zip(expected, got):
            assert g['inputs'].device.type == device and g['inputs'].dtype == torch.uint8
            assert torch.equal(g['inputs'].cpu(), e['inputs'])
            for es, gs in zip(e['data_samples'], g['data_samples']):
                assert gs.gt_label.device.type == device
                assert torch.equal(gs.gt_label.cpu(), es.gt_label)
                assert gs.metainfo == es.metainfo
        orders.append(sample_ids(got))
        assert orders[-1] == sample_ids(expected)
    # the sampler's shuffle reaches the batches: a new order in the second epoch
    assert orders[0] != orders[1]
    assert sorted(sum(orders[0], [])) == sorted(sum(orders[1], [])) == list(range(N))


def test_refuses_a_dataset_whose_samples_can_change(root):
    with pytest.raises(ValueError) as exc:
        DeviceBatchLoader(stock_loader(root, cache_images=False), 'cpu')
    msg = str(exc.value)
    assert 'static_samples' in msg and "type='EpochBasedTrainLoop'" in msg


def test_static_samples_need_the_image_cache(root):
    ds = VTAB1k(TASK, 'train800', data_root=root, pipeline=PIPELINE, cache_images=True)
    assert ds.static_samples
    assert not VTAB1k(TASK, 'train800', data_root=root, pipeline=PIPELINE).static_samples
