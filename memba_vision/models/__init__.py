"""Backbones, PEFT modules and the data preprocessor."""
from . import backbones, peft  # noqa: F401  (registers into mmpretrain)
from .backbones import VanillaVMamba, Vim
from .data_preprocessor import AsyncClsDataPreprocessor
from .peft import LoRALinear, MembraneGate

__all__ = ['Vim', 'VanillaVMamba', 'LoRALinear', 'MembraneGate', 'AsyncClsDataPreprocessor']
