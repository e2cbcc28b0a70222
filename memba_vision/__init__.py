"""memba_vision: Memba fine-tuning of vision Mamba backbones on OpenMMLab.

Importing the package registers its backbones, datasets, hooks, loops and wrappers into
mmpretrain's registries, so a config only needs
``custom_imports = dict(imports=['memba_vision'], allow_failed_imports=False)``.
"""
import warnings

from .version import __version__

with warnings.catch_warnings():
    # mmcv-lite lacks mmcv's compiled ops; importing mmpretrain warns about one we never use
    warnings.filterwarnings('ignore', message='Fail to import ``MultiScaleDeformableAttention``')
    from . import ops, models, engine, datasets, evaluation  # noqa: F401

__all__ = ['__version__']
