"""Runner hooks, the bf16 test loop and the optimiser constructor (registered in
mmpretrain's registries)."""
from .hooks import NonFiniteLossHook, PEFTCheckpointHook, complete_trainable_checkpoint
from .loops import AutocastTestLoop
from .optim_constructor import MergedParamGroupsConstructor

__all__ = ['PEFTCheckpointHook', 'NonFiniteLossHook', 'complete_trainable_checkpoint',
           'MergedParamGroupsConstructor', 'AutocastTestLoop']
