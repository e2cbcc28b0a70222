"""A ClsDataPreprocessor whose host-to-GPU copies do not make the host wait for the GPU."""
import torch
from mmpretrain.models.utils import ClsDataPreprocessor
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample

__all__ = ['AsyncClsDataPreprocessor']


@MODELS.register_module()
class AsyncClsDataPreprocessor(ClsDataPreprocessor):
    """mmpretrain's ClsDataPreprocessor, with copies that overlap the GPU's work.

    A copy from pageable host memory first waits for everything queued on the
    GPU, so the stock preprocessor holds the host at the start of every step
    until the previous step has finished, and the GPU then idles while the host
    prepares the next one. Here the images are copied with ``non_blocking=True``
    (asynchronous when the data loader pins them, ``pin_memory=True``), and the
    labels of a batch (B,) are gathered into one pinned tensor and copied once,
    before the stock ``forward`` (which then finds them on the device).

    Args:
        non_blocking: copy with ``non_blocking`` (mmengine's BaseDataPreprocessor
            argument, which mmpretrain's ClsDataPreprocessor does not pass on).
        Other arguments and the outputs: ClsDataPreprocessor's.
    """

    def __init__(self, non_blocking: bool = True, **kwargs):
        super().__init__(**kwargs)
        # mmpretrain's ClsDataPreprocessor calls BaseDataPreprocessor.__init__ without
        # its non_blocking argument, so mmengine's cast_data always copies blocking
        self._non_blocking = non_blocking

    def forward(self, data: dict, training: bool = False) -> dict:
        samples = data.get('data_samples')
        if self.device.type == 'cuda' and samples and \
                all(isinstance(s, DataSample) and 'gt_label' in s for s in samples):
            labels = [s.gt_label for s in samples]
            if labels[0].device.type == 'cpu':
                sizes = [label.numel() for label in labels]
                batch = torch.cat(labels).pin_memory().to(self.device, non_blocking=True)
                for sample, label in zip(samples, batch.split(sizes)):
                    sample.set_gt_label(label)
        return super().forward(data, training)
