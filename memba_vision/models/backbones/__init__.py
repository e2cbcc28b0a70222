"""Vision Mamba backbones registered in mmpretrain's MODELS."""
from .vim import Vim
from .vmamba import VanillaVMamba

__all__ = ['Vim', 'VanillaVMamba']
