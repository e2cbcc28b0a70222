"""bf16 autocast training whose optimiser step never waits for the GPU."""
from contextlib import contextmanager

import torch
from mmengine.optim import OptimWrapper
from mmpretrain.registry import OPTIM_WRAPPERS

__all__ = ['BF16OptimWrapper']


@OPTIM_WRAPPERS.register_module()
class BF16OptimWrapper(OptimWrapper):
    """``OptimWrapper`` under bf16 autocast, without loss scaling, clipping without a host sync.

    mmengine's ``AmpOptimWrapper`` scales the loss with a GradScaler, which reads its
    inf check back to the host every step, and ``OptimWrapper`` logs the clipped
    gradient norm as a Python float, another wait. bf16 has fp32's exponent range,
    so a power-of-two loss scale changes no gradient value above about 1e-38 (it is
    exact both ways) and is left out; the gradient norm stays a tensor (``grad_norm``), which
    ``DeferredRuntimeInfoHook`` logs with the loss. A non-finite loss is caught by
    ``DeferredRuntimeInfoHook`` instead of a skipped step.

    Args:
        dtype: must be 'bfloat16' (float16 needs loss scaling: use AmpOptimWrapper).
        Other arguments: as ``OptimWrapper`` (optimizer, accumulative_counts, clip_grad).
    """

    def __init__(self, *args, dtype='bfloat16', **kwargs):
        super().__init__(*args, **kwargs)
        if dtype not in ('bfloat16', torch.bfloat16):
            raise ValueError(f'BF16OptimWrapper: dtype must be bfloat16, got {dtype!r} '
                             f'(float16 needs loss scaling: use AmpOptimWrapper)')
        self.cast_dtype = torch.bfloat16
        self.grad_norm = None  # the last clipped gradient norm, a tensor

    @contextmanager
    def optim_context(self, model):
        # the model's device, not the machine's: a model on the CPU of a GPU machine is
        # autocast on the CPU
        param = next(model.parameters(), None)
        device = param.device.type if param is not None else \
            ('cuda' if torch.cuda.is_available() else 'cpu')
        with super().optim_context(model), torch.autocast(device, dtype=self.cast_dtype):
            yield

    def _clip_grad(self) -> None:
        # mmengine's OptimWrapper._clip_grad logs float(grad_norm): a host-GPU sync every step
        # (tests/test_engine.py::test_bf16_wrapper_steps_like_autocast_clip_and_adamw_...)
        params = [p for group in self.optimizer.param_groups for p in group['params']
                  if p.requires_grad and p.grad is not None]
        if params:
            self.grad_norm = self.clip_func(params, **self.clip_grad_kwargs)

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        state_dict.pop('loss_scaler', None)  # checkpoints written by AmpOptimWrapper
        super().load_state_dict(state_dict)
