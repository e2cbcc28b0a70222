"""Loops: training from a copy of the training set on the GPU; testing under bf16 autocast
(mmengine's ``fp16`` switch only gives float16)."""
import torch
from mmengine.model import is_model_wrapper
from mmengine.runner import EpochBasedTrainLoop, TestLoop
from mmpretrain.registry import LOOPS

from ..datasets.device_loader import DeviceBatchLoader

__all__ = ['AutocastTestLoop', 'DeviceDataEpochBasedTrainLoop']


@LOOPS.register_module()
class DeviceDataEpochBasedTrainLoop(EpochBasedTrainLoop):
    """``EpochBasedTrainLoop`` fed by a ``DeviceBatchLoader`` on the model's device.

    For training sets whose samples are the same in every epoch (VTAB-1k's 1,000
    cached images, no augmentation): the set is copied to the GPU once, and each
    batch is gathered there, in the order the config's sampler gives. Arguments
    are ``EpochBasedTrainLoop``'s; the config's ``train_dataloader`` is built as
    usual and wrapped (its workers never start).
    """

    def __init__(self, runner, dataloader, max_epochs: int, **kwargs):
        super().__init__(runner, dataloader, max_epochs, **kwargs)
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        self.dataloader = DeviceBatchLoader(self.dataloader, model.data_preprocessor.device)


@LOOPS.register_module()
class AutocastTestLoop(TestLoop):
    """``TestLoop`` with autocast in ``dtype`` on CUDA (fp32 elsewhere).

    The VTAB configs train under bf16 autocast; ``set_precision`` tests them in the
    same precision. ``tools/test.py --fp32`` (or ``tools/train.py --fp32``) keeps
    the plain fp32 ``TestLoop``.
    """

    def __init__(self, runner, dataloader, evaluator, dtype: str = 'bfloat16'):
        on_gpu = torch.cuda.is_available()
        super().__init__(runner, dataloader, evaluator, fp16=on_gpu)
        dtype_ = getattr(torch, dtype, None)
        if not isinstance(dtype_, torch.dtype) or not dtype_.is_floating_point:
            raise ValueError(f'AutocastTestLoop: dtype must name a torch float dtype, got {dtype!r}')
        self.dtype = dtype_

    def run(self):
        # mmengine's autocast takes the CUDA autocast dtype when it is given none
        previous = torch.get_autocast_dtype('cuda')
        torch.set_autocast_dtype('cuda', self.dtype)
        try:
            return super().run()
        finally:
            torch.set_autocast_dtype('cuda', previous)
