"""An optimiser-wrapper constructor that keeps mmengine's per-parameter settings in few groups."""
from typing import List

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
    """

    def add_params(self, params: List[dict], module: nn.Module, prefix: str = '',
                   **kwargs) -> None:
        if prefix:  # mmengine's recursion into a child module
            return super().add_params(params, module, prefix, **kwargs)
        per_param: List[dict] = []
        super().add_params(per_param, module, prefix, **kwargs)
        merged = {}
        for group in per_param:
            key = tuple(sorted((k, repr(v)) for k, v in group.items() if k != 'params'))
            merged.setdefault(key, dict(group, params=[]))['params'].extend(group['params'])
        params.extend(merged.values())
