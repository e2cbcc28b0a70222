"""Runner hooks, the bf16 optimiser wrapper, the train and test loops, the optimiser
constructor and the data-parallel wrapper (registered in mmpretrain's registries)."""
from .data_parallel import PostBackwardDataParallel
from .hooks import (AtomicCheckpointHook, DeferredRuntimeInfoHook, NonFiniteLossHook,
                    PEFTCheckpointHook, complete_trainable_checkpoint)
from .loops import AutocastTestLoop, DeviceDataEpochBasedTrainLoop
from .optim_constructor import MergedParamGroupsConstructor
from .optim_wrapper import BF16OptimWrapper

__all__ = ['PEFTCheckpointHook', 'AtomicCheckpointHook', 'NonFiniteLossHook',
           'DeferredRuntimeInfoHook', 'complete_trainable_checkpoint',
           'MergedParamGroupsConstructor', 'AutocastTestLoop', 'DeviceDataEpochBasedTrainLoop',
           'BF16OptimWrapper', 'PostBackwardDataParallel']
