"""Builds a backbone's PEFT modules from its PEFTConfig."""
from typing import Optional

import torch.nn as nn

from .adapter import ParallelAdapter
from .config import LORA_TARGETS, PEFTConfig
from .lora import LoRAConv2d, LoRALinear, MergedLoRALinear
from .membrane_gate import MembraneGate

__all__ = ['wrap_in_proj', 'wrap_out_proj', 'wrap_merged', 'wrap_embed', 'build_gate',
           'check_supported']


def _rank(peft: Optional[PEFTConfig], target: str) -> Optional[int]:
    """The LoRA rank ``peft`` gives ``target``, or None."""
    return peft.lora_rank(target) if peft is not None else None


def _lora(layer: nn.Module, peft: Optional[PEFTConfig], target: str, rows=None) -> nn.Module:
    rank = _rank(peft, target)
    if rank is None:
        return layer
    return LoRALinear(layer, rank, scale=peft.lora.scale, dropout=peft.lora.dropout, rows=rows)


def wrap_in_proj(linear: nn.Linear, peft: Optional[PEFTConfig]) -> nn.Module:
    """in_proj (C -> 2D) with LoRA on all outputs, on the x half and/or on the z half."""
    d_inner = linear.out_features // 2
    layer = _lora(linear, peft, 'in_proj')
    layer = _lora(layer, peft, 'in_proj_x', rows=(0, d_inner))
    return _lora(layer, peft, 'in_proj_z', rows=(d_inner, 2 * d_inner))


def wrap_out_proj(linear: nn.Linear, peft: Optional[PEFTConfig]) -> nn.Module:
    """out_proj with LoRA and/or a ParallelAdapter beside it."""
    layer = _lora(linear, peft, 'out_proj')
    if peft is not None and peft.adapter is not None:
        a = peft.adapter
        layer = ParallelAdapter(layer, a.rank, scale=a.scale, dropout=a.dropout)
    return layer


def wrap_merged(linear: nn.Linear, peft: Optional[PEFTConfig], target: str,
                rows=None) -> nn.Module:
    """x_proj / dt_proj with a merged-weight LoRA update when ``target`` has a rank."""
    rank = _rank(peft, target)
    if rank is None:
        return linear
    return MergedLoRALinear(linear, rank, scale=peft.lora.scale, rows=rows)


def wrap_embed(conv: nn.Conv2d, peft: Optional[PEFTConfig]) -> nn.Module:
    """The patch embedding's conv with a low-rank conv beside it."""
    rank = _rank(peft, 'embed')
    if rank is None:
        return conv
    return LoRAConv2d(conv, rank, scale=peft.lora.scale, dropout=peft.lora.dropout)


def build_gate(peft: Optional[PEFTConfig], channels: int,
               shared_proj: bool) -> Optional[MembraneGate]:
    """A two-direction MembraneGate over ``channels`` (d_inner), or None without a gate."""
    if peft is None or peft.gate is None:
        return None
    g = peft.gate
    return MembraneGate(channels, g.rank, directions=2, shared_proj=shared_proj,
                        num_chunks=g.num_chunks, leak=g.leak, threshold=g.threshold,
                        transfer=g.transfer, residual=g.residual)


def check_supported(peft: Optional[PEFTConfig], backbone: str, methods=(), lora=()) -> None:
    """ValueError naming the first method (or LoRA target) ``backbone`` does not support."""
    if peft is None:
        return
    for key in peft.methods():
        if key not in methods:
            raise ValueError(f'{backbone}: peft.{key} is not supported on this backbone '
                             f'(supported: {", ".join(methods)})')
    for target in LORA_TARGETS:
        if peft.lora_rank(target) is not None and target not in lora:
            raise ValueError(f'{backbone}: peft.lora.{target} is not supported on this '
                             f'backbone (supported: {", ".join(lora)})')
