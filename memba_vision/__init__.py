"""memba_vision: Memba fine-tuning of vision Mamba backbones on OpenMMLab.

Importing the package registers its backbones, datasets, hooks and metrics into
mmpretrain's registries, so a config only needs
``custom_imports = dict(imports=['memba_vision'], allow_failed_imports=False)``.
"""
from .version import __version__
from .utils import register_safe_globals

register_safe_globals()  # mmengine --resume keeps torch.load(weights_only=True)

from . import ops, models  # noqa: E402,F401

__all__ = ['__version__']
