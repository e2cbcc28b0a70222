"""Backbones and PEFT modules."""
from . import backbones, peft  # noqa: F401  (registers into mmpretrain)
from .backbones import VanillaVMamba, Vim
from .peft import LoRALinear, MembraneGate

__all__ = ['Vim', 'VanillaVMamba', 'LoRALinear', 'MembraneGate']
