"""Runner hooks (registered in mmpretrain's HOOKS) and tool helpers."""
from .hooks import NonFiniteLossHook, PEFTCheckpointHook, complete_trainable_checkpoint

__all__ = ['PEFTCheckpointHook', 'NonFiniteLossHook', 'complete_trainable_checkpoint']
