"""memba_vision: Memba fine-tuning of vision Mamba backbones on OpenMMLab.

Importing the package registers its backbones, datasets, hooks and metrics into
mmpretrain's registries, so a config only needs
``custom_imports = dict(imports=['memba_vision'], allow_failed_imports=False)``.
"""
import warnings

# mmcv-lite lacks mmcv's compiled ops; mmpretrain warns about one we never use.
warnings.filterwarnings('ignore', message='Fail to import ``MultiScaleDeformableAttention``')

from .version import __version__  # noqa: E402
from .utils import register_safe_globals  # noqa: E402

register_safe_globals()  # mmengine --resume keeps torch.load(weights_only=True)

from . import ops, models, engine, datasets, evaluation  # noqa: E402,F401

__all__ = ['__version__']
