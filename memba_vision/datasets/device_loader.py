"""Training batches gathered from one copy of a static training set on the GPU."""
from typing import Iterator, List, Optional

import torch
from mmpretrain.structures import DataSample
from torch import Tensor

__all__ = ['DeviceBatchLoader']


class DeviceBatchLoader:
    """Yields a DataLoader's batches from a copy of its dataset on ``device``.

    VTAB-1k trains on 1,000 images without augmentation, so every epoch feeds
    the same samples in a new order. This loader stacks the dataset once, images
    (N, 3, H, W) uint8 (150 MB at 224x224) and labels (N,), on ``device``; each
    batch is then one gather there: no worker processes, no collation and no
    host-to-device copy per step.

    Batches are those of the wrapped loader: the same index lists (its
    ``batch_sampler``, so the sampler's seed, shuffling and ``set_epoch`` apply)
    in the same form as mmengine's ``default_collate`` gives them,
    ``dict(inputs=(B, 3, H, W) uint8, data_samples=[DataSample] * B)``, with the
    inputs and labels on ``device``.

    Args:
        loader: the ``torch.utils.data.DataLoader`` built from the config. Its
            dataset must have ``static_samples`` True (``VTAB1k`` with
            ``cache_images=True`` and nothing after the cache but ``PackInputs``).
        device: where the copy lives (the model's device).
    """

    def __init__(self, loader, device):
        dataset = loader.dataset
        if not getattr(dataset, 'static_samples', False):
            raise ValueError(
                f'DeviceBatchLoader keeps one copy of the training set on the device, so '
                f'every sample must be the same in every epoch; {type(dataset).__name__} '
                f'does not declare static_samples (VTAB1k does with cache_images=True and '
                f'no transform after the cache but PackInputs). Use '
                f"train_cfg=dict(type='EpochBasedTrainLoop') for this pipeline")
        self.loader = loader
        self.device = torch.device(device)
        self._images: Optional[Tensor] = None  # (N, 3, H, W) uint8 on device
        self._labels: Optional[Tensor] = None  # (N,) int64 on device
        self._metas: List[dict] = []

    @property
    def dataset(self):
        return self.loader.dataset

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def batch_sampler(self):
        return self.loader.batch_sampler

    @property
    def batch_size(self) -> Optional[int]:
        return self.loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def _load(self) -> None:
        images, labels = [], []
        for i in range(len(self.dataset)):
            sample = self.dataset[i]
            inputs, data_sample = sample.get('inputs'), sample.get('data_samples')
            if not isinstance(inputs, Tensor) or not isinstance(data_sample, DataSample) \
                    or 'gt_label' not in data_sample or data_sample.gt_label.numel() != 1:
                raise TypeError(
                    f'DeviceBatchLoader needs samples packed by PackInputs with one image '
                    f'tensor and one gt_label; sample {i} of {type(self.dataset).__name__} '
                    f'is not')
            if images and inputs.shape != images[0].shape:
                raise ValueError(f'DeviceBatchLoader needs one image shape; sample {i} is '
                                 f'{tuple(inputs.shape)}, sample 0 {tuple(images[0].shape)}')
            images.append(inputs)
            labels.append(data_sample.gt_label.reshape(1))
            self._metas.append(data_sample.metainfo)
        self._images = torch.stack(images).to(self.device)
        self._labels = torch.cat(labels).to(self.device)

    def __iter__(self) -> Iterator[dict]:
        if self._images is None:
            self._load()
        batches = [list(b) for b in self.loader.batch_sampler]
        flat = torch.tensor([i for b in batches for i in b], dtype=torch.long)
        if self.device.type == 'cuda':
            flat = flat.pin_memory()  # the copy then does not wait for queued GPU work
        index = flat.to(self.device, non_blocking=True)
        start = 0
        for batch in batches:
            idx = index[start:start + len(batch)]
            start += len(batch)
            labels = self._labels.index_select(0, idx).split(1)  # (1,) views, no host sync
            samples = [DataSample(metainfo=self._metas[i]).set_gt_label(label)
                       for i, label in zip(batch, labels)]
            yield dict(inputs=self._images.index_select(0, idx), data_samples=samples)
