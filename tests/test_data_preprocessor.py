"""AsyncClsDataPreprocessor against mmpretrain's ClsDataPreprocessor."""
import pytest
import torch
from mmpretrain.models.utils import ClsDataPreprocessor
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample

import memba_vision  # noqa: F401  (registers the preprocessor)

SETTINGS = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)


def batch(pin=False):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = [3, 0, 7, 1]
    return dict(inputs=images.pin_memory() if pin else images,
                data_samples=[DataSample().set_gt_label(y) for y in labels])


def check_same(got, want, device):
    assert got['inputs'].device.type == device
    assert torch.equal(got['inputs'].cpu(), want['inputs'].cpu())
    got_labels = [s.gt_label for s in got['data_samples']]
    assert all(y.device.type == device for y in got_labels)
    assert [y.tolist() for y in got_labels] == \
        [s.gt_label.tolist() for s in want['data_samples']] == [[3], [0], [7], [1]]


class CopyRecorder(torch.Tensor):
    """A tensor that records the ``non_blocking`` flag of every ``.to`` call made on it."""
    flags = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to:
            cls.flags.append((kwargs or {}).get('non_blocking', False))
        return super().__torch_function__(func, types, args, kwargs)


@pytest.mark.parametrize('non_blocking', [True, False])
def test_copies_to_the_device_are_non_blocking_by_default(non_blocking):
    """The stock preprocessor copies blocking; ours asks mmengine's cast_data not to block."""
    kwargs = {} if non_blocking else dict(non_blocking=False)
    ours = MODELS.build(dict(type='AsyncClsDataPreprocessor', **SETTINGS, **kwargs))
    data = batch()
    data['inputs'] = data['inputs'].as_subclass(CopyRecorder)
    CopyRecorder.flags.clear()
    out = ours(data, training=True)
    assert CopyRecorder.flags and set(CopyRecorder.flags) == {non_blocking}
    stock = ClsDataPreprocessor(**SETTINGS)(batch(), training=True)
    check_same(out, stock, 'cpu')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_equal_to_the_stock_preprocessor_on_gpu():
    ours = MODELS.build(dict(type='AsyncClsDataPreprocessor', **SETTINGS)).cuda()
    stock = ClsDataPreprocessor(**SETTINGS).cuda()
    got = ours(batch(pin=True), training=True)
    torch.cuda.synchronize()
    check_same(got, stock(batch(), training=True), 'cuda')
