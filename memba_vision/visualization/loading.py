"""A classifier from a config and a checkpoint, and images through the config's test pipeline."""
import os.path as osp
from typing import Optional, Tuple

import numpy as np
from torch import Tensor

__all__ = ['load_classifier', 'load_image']


def load_classifier(config: str, checkpoint: str, cfg_options: Optional[dict] = None,
                    device: str = 'cpu'):
    """(model in eval mode, config) for a Vim or VanillaVMamba classifier config.

    The checkpoint must fit the model exactly: a trainable-only PEFT checkpoint
    is completed from the pretrained backbone (as ``tools/test.py`` does); any
    missing, unexpected or differently shaped tensor is a ValueError naming the
    first few. CUDA-graph replay is turned off (the maps come from module hooks).
    """
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS

    from ..engine.hooks import complete_trainable_checkpoint
    from ..engine.runner_utils import check_pretrained, load_config
    from ..utils.checkpoint import load_checkpoint_file
    from .maps import mixers_of

    cfg = load_config(config, cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    model_cfg = cfg.model.copy()
    if 'backbone' in model_cfg and 'cuda_graph' in model_cfg.backbone:
        model_cfg.backbone.cuda_graph = False
    if 'data_preprocessor' not in model_cfg and cfg.get('data_preprocessor'):
        model_cfg.data_preprocessor = cfg.data_preprocessor
    model = MODELS.build(model_cfg)
    mixers_of(getattr(model, 'backbone', None))  # TypeError for other backbones
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint {checkpoint} not found')
    ckpt = load_checkpoint_file(checkpoint)
    if 'state_dict' not in ckpt or not isinstance(ckpt['state_dict'], dict):
        raise ValueError(f'{checkpoint} is not a training checkpoint (no state_dict)')
    if ckpt.get('meta', {}).get('memba_vision', {}).get('trainable_only'):
        check_pretrained(cfg)
        try:
            ckpt = complete_trainable_checkpoint(model, ckpt)
        except KeyError as e:
            raise ValueError(f'{checkpoint} does not fit the model of {config}: {e.args[0]}')
    state = {k[len('module.'):] if k.startswith('module.') else k: v
             for k, v in ckpt['state_dict'].items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f'{k} {tuple(state[k].shape)} vs {tuple(v.shape)}' for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f'{len(x)} {what} (first: {", ".join(x[:3])})'
                 for x, what in ((missing, 'missing'), (unexpected, 'unexpected'),
                                 (shapes, 'of another shape')) if x]
        raise ValueError(f'{checkpoint} does not fit the model of {config}: '
                         f'{"; ".join(parts)} tensors')
    model.load_state_dict(state)
    return model.to(device).eval(), cfg


def load_image(path: str, cfg, model) -> Tuple[Tensor, np.ndarray]:
    """(preprocessed input (1, 3, H, W) on the model's device, RGB uint8 image (H, W, 3) as seen).

    The image goes through the config's test pipeline and the model's data
    preprocessor, as in testing. A missing or undecodable file is a ValueError.
    """
    from mmengine.dataset import Compose

    if not osp.isfile(path):
        raise ValueError(f'image {path} not found')
    pipeline = Compose(cfg.test_dataloader.dataset.pipeline)
    try:
        data = pipeline(dict(img_path=path))
    except Exception as e:  # mmcv reports undecodable files in several ways
        raise ValueError(f'{path} is not a readable image ({type(e).__name__})') from None
    if data is None or 'inputs' not in data:
        raise ValueError(f'{path} is not a readable image')
    chw = data['inputs']                                          # (3, H, W) uint8, as loaded
    batch = model.data_preprocessor(dict(inputs=[chw]), False)['inputs']
    rgb = chw.permute(1, 2, 0).cpu().numpy()
    if getattr(model.data_preprocessor, '_channel_conversion', False):
        rgb = rgb[..., ::-1]                                      # BGR as loaded -> RGB
    return batch.float(), np.ascontiguousarray(rgb)
