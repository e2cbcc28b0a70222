"""An optimiser-wrapper constructor that keeps mmengine's per-parameter settings in few groups."""
import logging
from typing import List

from mmengine.logging import MMLogger, print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from mmpretrain.registry import OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn

__all__ = ['MergedParamGroupsConstructor']


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class MergedParamGroupsConstructor(DefaultOptimWrapperConstructor):
    """``DefaultOptimWrapperConstructor`` with identical parameter groups merged.

    With a ``paramwise_cfg`` mmengine gives every parameter its own group, so a
    PEFT model's ~150 trainable tensors become ~150 groups and AdamW, gradient
    clipping and the AMP scaler launch their kernels group by group. Here the
    per-parameter settings (lr, weight decay and any other option) are computed
    exactly as mmengine computes them, then parameters whose settings are equal
    share one group, in first-seen order.

    mmengine logs one warning per frozen parameter it leaves out (hundreds for a
    PEFT model); they are replaced by one line that counts them.
    """

    def add_params(self, params: List[dict], module: nn.Module, prefix: str = '',
                   **kwargs) -> None:
        if prefix:  # mmengine's recursion into a child module
            return super().add_params(params, module, prefix, **kwargs)
        per_param: List[dict] = []
        logger = MMLogger.get_current_instance()
        frozen = _FrozenSkipFilter()
        logger.addFilter(frozen)
        try:
            super().add_params(per_param, module, prefix, **kwargs)
        finally:
            logger.removeFilter(frozen)
        if frozen.count:
            print_log(f'{frozen.count} frozen tensors (requires_grad=False) are not '
                      f'optimised', logger='current', level=logging.INFO)
        merged = {}
        for group in per_param:
            key = tuple(sorted((k, repr(v)) for k, v in group.items() if k != 'params'))
            merged.setdefault(key, dict(group, params=[]))['params'].extend(group['params'])
        params.extend(merged.values())


class _FrozenSkipFilter(logging.Filter):
    """Drops (and counts) mmengine's 'X is skipped since its requires_grad=False' warnings."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().endswith('is skipped since its requires_grad=False'):
            self.count += 1
            return False
        return True
