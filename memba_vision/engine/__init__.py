"""Runner hooks, the bf16 optimiser wrapper, the test loop, the optimiser constructor, the
data-parallel wrapper (registered in mmpretrain's registries) and the runner the tools use."""
from .data_parallel import PostBackwardDataParallel
from .hooks import (AtomicCheckpointHook, DeferredRuntimeInfoHook, PEFTCheckpointHook,
                    complete_trainable_checkpoint)
from .loops import AutocastTestLoop
from .optim_constructor import MergedParamGroupsConstructor
from .optim_wrapper import BF16OptimWrapper
from .runner import SafeLoadRunner

__all__ = ['PEFTCheckpointHook', 'AtomicCheckpointHook', 'DeferredRuntimeInfoHook',
           'complete_trainable_checkpoint', 'MergedParamGroupsConstructor', 'AutocastTestLoop',
           'BF16OptimWrapper', 'PostBackwardDataParallel', 'SafeLoadRunner']
