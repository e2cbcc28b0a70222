"""A test loop under bf16 autocast (mmengine's ``fp16`` switch only gives float16)."""
import torch
from mmengine.runner import TestLoop
from mmpretrain.registry import LOOPS

__all__ = ['AutocastTestLoop']


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
        # mmengine's TestLoop.run_iter enters mmengine's autocast without a dtype, which then
        # takes torch's CUDA autocast dtype (float16 unless set): set it for the loop's run
        # (tests/test_engine.py::test_autocast_test_loop_restores_the_autocast_dtype)
        previous = torch.get_autocast_dtype('cuda')
        torch.set_autocast_dtype('cuda', self.dtype)
        try:
            return super().run()
        finally:
            torch.set_autocast_dtype('cuda', previous)
