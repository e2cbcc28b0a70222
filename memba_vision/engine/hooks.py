"""Runner hooks: trainable-only PEFT checkpoints and a stop on non-finite losses."""
import math
from collections import OrderedDict

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmpretrain.registry import HOOKS

__all__ = ['PEFTCheckpointHook', 'NonFiniteLossHook', 'complete_trainable_checkpoint']

_META_KEY = 'memba_vision'


def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


def _restorable_from_pretrained(model) -> bool:
    """True when the frozen backbone comes from a pretrained file (can be reloaded)."""
    init = getattr(getattr(model, 'backbone', None), 'init_cfg', None)
    return isinstance(init, dict) and init.get('type') == 'Pretrained'


@HOOKS.register_module()
class PEFTCheckpointHook(Hook):
    """Saves only the trainable tensors; restores them on top of the pretrained model.

    Before a checkpoint is written, ``state_dict`` is reduced to the parameters
    with ``requires_grad`` (LoRA, gate projections, head): a Vim-S Memba
    checkpoint is a few tens of MB instead of the whole model. (A model whose
    frozen backbone is random, not pretrained, is saved whole.) When such a
    checkpoint is loaded (``--resume``, ``load_from``, ``tools/test.py``), the model
    is first initialised from its pretrained weights (if the runner has not done
    so, as in testing), then the frozen tensors are taken from the model, so the
    load is complete and exact. A trainable key missing from the file is an error.
    """
    priority = 'VERY_LOW'

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        model = _unwrap(runner.model)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if len(trainable) == sum(1 for _ in model.parameters()):
            return  # full fine-tuning: keep everything
        if not _restorable_from_pretrained(model):
            return  # randomly initialised frozen weights must be saved
        state = checkpoint['state_dict']
        checkpoint['state_dict'] = OrderedDict((k, v) for k, v in state.items() if k in trainable)
        checkpoint.setdefault('meta', {})[_META_KEY] = dict(trainable_only=True)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        complete_trainable_checkpoint(_unwrap(runner.model), checkpoint)


def complete_trainable_checkpoint(model, checkpoint: dict) -> dict:
    """Fills a trainable-only checkpoint's state_dict with the model's frozen tensors.

    The model is initialised from its pretrained weights first if that has not
    happened yet. Other checkpoints are returned unchanged.
    """
    if not checkpoint.get('meta', {}).get(_META_KEY, {}).get('trainable_only'):
        return checkpoint
    if not getattr(model, 'is_init', False):
        model.init_weights()  # pretrained backbone first (tools/test.py path)
    state = OrderedDict((k[len('module.'):] if k.startswith('module.') else k, v)
                        for k, v in checkpoint['state_dict'].items())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    own = model.state_dict()
    missing = [k for k in trainable if k not in state]
    unknown = [k for k in state if k not in own]
    if missing or unknown:
        raise KeyError(f'trainable-only checkpoint does not match the model: '
                       f'missing {missing[:5]}, unknown {unknown[:5]}')
    for k, v in own.items():
        state.setdefault(k, v)
    checkpoint['state_dict'] = state
    return checkpoint


@HOOKS.register_module()
class NonFiniteLossHook(Hook):
    """Stops training at the first NaN/inf loss, before any checkpoint of that state.

    The last checkpoint written by CheckpointHook (``<work_dir>/last_checkpoint``)
    stays the last good one.
    """
    priority = 'HIGHEST'

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if not outputs:
            return
        for name, value in outputs.items():
            if 'loss' in name and not math.isfinite(float(value)):
                raise FloatingPointError(
                    f'{name} became {float(value)} at epoch {runner.epoch + 1}, iteration '
                    f'{runner.iter + 1}; training stopped. The last good checkpoint is the '
                    f'one named in {runner.work_dir}/last_checkpoint (if any); lower the '
                    f'learning rate or check the data, then resume with --resume.')
