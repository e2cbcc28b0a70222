"""Builds a mixer's PEFT modules from its PEFTConfig."""
from typing import Optional

import torch.nn as nn

from .config import PEFTConfig
from .lora import LoRALinear
from .membrane_gate import MembraneGate

__all__ = ['wrap_lora', 'build_gate']


def wrap_lora(linear: nn.Linear, peft: Optional[PEFTConfig], name: str) -> nn.Module:
    """``linear`` wrapped in LoRALinear when ``peft`` gives layer ``name`` a rank."""
    rank = peft.lora_rank(name) if peft is not None else None
    if rank is None:
        return linear
    return LoRALinear(linear, rank, scale=peft.lora.scale, dropout=peft.lora.dropout)


def build_gate(peft: Optional[PEFTConfig], channels: int,
               shared_proj: bool) -> Optional[MembraneGate]:
    """A two-direction MembraneGate over ``channels`` (d_inner), or None without a gate."""
    if peft is None or peft.gate is None:
        return None
    g = peft.gate
    return MembraneGate(channels, g.rank, directions=2, shared_proj=shared_proj,
                        num_chunks=g.num_chunks, leak=g.leak, threshold=g.threshold,
                        transfer=g.transfer, residual=g.residual)
