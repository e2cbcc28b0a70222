"""Runner hooks: trainable-only PEFT checkpoints, checkpoints that survive a kill at any
moment, and training-value logging that does not make the host wait for the GPU every
step and stops on non-finite losses."""
import math
import os
import os.path as osp
from collections import OrderedDict
from typing import Optional, Set, Tuple

import torch
from mmengine.dist import is_main_process
from mmengine.fileio.backends import LocalBackend
from mmengine.hooks import CheckpointHook, Hook, LoggerHook, RuntimeInfoHook
from mmengine.model import is_model_wrapper
from mmpretrain.registry import HOOKS

from ..utils import write_text_atomically

__all__ = ['PEFTCheckpointHook', 'AtomicCheckpointHook', 'DeferredRuntimeInfoHook',
           'complete_trainable_checkpoint', 'trainable_only_keys']

_META_KEY = 'memba_vision'


def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


def _restorable_from_pretrained(model) -> bool:
    """True when the frozen backbone comes from a pretrained file (can be reloaded)."""
    init = getattr(getattr(model, 'backbone', None), 'init_cfg', None)
    return isinstance(init, dict) and init.get('type') == 'Pretrained'


def trainable_only_keys(model) -> Optional[Set[str]]:
    """The state-dict keys a PEFT checkpoint keeps: the trainable parameters' names; None
    when the whole model must be saved (full fine-tuning, or frozen weights that no
    pretrained file can restore)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if len(trainable) == sum(1 for _ in model.parameters()):
        return None  # full fine-tuning: keep everything
    if not _restorable_from_pretrained(model):
        return None  # randomly initialised frozen weights must be saved
    return trainable


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
        keep = trainable_only_keys(_unwrap(runner.model))
        if keep is None:
            return
        state = checkpoint['state_dict']
        checkpoint['state_dict'] = OrderedDict((k, v) for k, v in state.items() if k in keep)
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
class AtomicCheckpointHook(CheckpointHook):
    """mmengine's CheckpointHook, with a work dir that is resumable whenever it is killed.

    The stock hook first deletes the checkpoints beyond ``max_keep_ckpts``, then
    writes the new one, then the ``last_checkpoint`` marker. A run killed while it
    writes (a save of a Vim-S task takes about 0.3 s) is left with a marker that
    names a deleted file, and ``--resume`` fails. This hook writes the checkpoint
    under a temporary name and renames it, then replaces the marker the same way,
    and only then deletes the outdated checkpoints: at every moment the marker
    names a complete checkpoint. With ``SafeLoadRunner`` all of that runs behind the
    training loop, and training returns once it is done. Options and file names are the
    stock hook's; ``out_dir`` must be a local folder.
    """

    def before_train(self, runner) -> None:
        super().before_train(runner)
        if not isinstance(self.file_backend, LocalBackend):
            raise ValueError(f'AtomicCheckpointHook saves to a local folder; out_dir '
                             f'{self.out_dir} is not one (use CheckpointHook there)')

    def _save_checkpoint_with_step(self, runner, step, meta):
        # mmengine's CheckpointHook._save_checkpoint_with_step removes the outdated checkpoint
        # before it writes the new one and the marker (tests/test_engine.py::
        # test_checkpoint_marker_names_a_complete_file_when_killed_mid_save)
        outdated = []
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and
                                            self.keep_ckpt_ids[-1] == step):
            # the ids go into the checkpoint's message hub, as with the stock hook
            ids = list(self.keep_ckpt_ids) + [step]
            outdated, ids = ids[:-self.max_keep_ckpts], ids[-self.max_keep_ckpts:]
            self.keep_ckpt_ids.clear()
            self.keep_ckpt_ids.extend(ids)
            runner.message_hub.update_info('keep_ckpt_ids', ids)

        filename = self.filename_tmpl.format(step)
        last = self.last_ckpt = osp.join(self.out_dir, filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        partial = f'.{filename}.part'
        marker = osp.join(runner.work_dir, 'last_checkpoint')

        def publish():  # once the file is complete
            os.replace(osp.join(self.out_dir, partial), last)
            write_text_atomically(marker, last)
            for old in outdated:
                path = osp.join(self.out_dir, self.filename_tmpl.format(old))
                if osp.isfile(path):
                    os.remove(path)

        # SafeLoadRunner writes the file behind the training loop, then publishes it
        background = hasattr(runner, 'wait_for_saves')
        runner.save_checkpoint(
            self.out_dir, partial, self.file_client_args, save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler, meta=meta, by_epoch=self.by_epoch,
            backend_args=self.backend_args, **self.args,
            **(dict(finish=publish) if background else {}))
        if is_main_process() and not background:
            publish()

    def after_train(self, runner) -> None:
        if hasattr(runner, 'wait_for_saves'):
            runner.wait_for_saves()  # the last checkpoint is on disk when training returns
        super().after_train(runner)


def _logger_schedule(runner) -> Tuple[int, bool]:
    """The LoggerHook's interval, and whether it also logs an epoch's last iteration
    (mmengine's rule: when ``ignore_last`` is off or an epoch has at most ``interval``
    iterations)."""
    loggers = [h for h in runner.hooks if isinstance(h, LoggerHook)]
    if not loggers:
        return 1, False
    logger = loggers[0]
    return logger.interval, (not logger.ignore_last
                             or len(runner.train_dataloader) <= logger.interval)


@HOOKS.register_module()
class DeferredRuntimeInfoHook(RuntimeInfoHook):
    """mmengine's RuntimeInfoHook, reading the training values back from the GPU in batches,
    and stopping training at a NaN/inf loss.

    The stock hook turns every output of a training step (the loss) into a Python
    float right after the step, which makes the host wait for the GPU every
    iteration instead of preparing the next step meanwhile. This hook keeps the
    values as tensors, together with the gradient norm that ``BF16OptimWrapper``
    leaves as a tensor, and hands them to the message hub on the iterations the
    LoggerHook logs, before every checkpoint and at the end of training: the logged
    values are the same. It does not read them back at an epoch's end (unless the
    LoggerHook logs there), so the GPU still runs the epoch's last steps while the host
    ends the epoch and loads the next one's first batch. A loss that is not finite
    raises FloatingPointError naming its iteration, before any checkpoint of that state
    is written (the one named in ``<work_dir>/last_checkpoint`` stays the last good
    one). Set it as ``default_hooks.runtime_info``.
    """

    def before_train(self, runner) -> None:
        super().before_train(runner)
        self._pending = []  # (epoch, iteration, key, value)
        self._interval, self._logs_epoch_end = _logger_schedule(runner)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        step = (runner.epoch + 1, runner.iter + 1)
        # detached: a kept loss would keep its step's autograd graph (and activations) alive
        self._pending.extend(
            step + (key, value.detach() if isinstance(value, torch.Tensor) else value)
            for key, value in (outputs or {}).items())
        grad_norm = getattr(runner.optim_wrapper, 'grad_norm', None)
        if isinstance(grad_norm, torch.Tensor):
            self._pending.append(step + ('grad_norm', grad_norm))
            runner.optim_wrapper.grad_norm = None
        if self.every_n_inner_iters(batch_idx, self._interval) or \
                (self._logs_epoch_end and self.end_of_epoch(runner.train_dataloader,
                                                            batch_idx)) or \
                self.is_last_train_iter(runner):
            self.flush(runner)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        self.flush(runner)

    def flush(self, runner) -> None:
        """Hands the pending values to the message hub, in step order; raises at the first
        loss that is not finite."""
        pending, self._pending = self._pending, []
        for epoch, it, key, value in pending:
            if isinstance(value, torch.Tensor):
                value = value.float().mean().item()
            if 'loss' in key and not math.isfinite(value):
                raise FloatingPointError(
                    f'{key} became {value} at epoch {epoch}, iteration {it}; training '
                    f'stopped. The last good checkpoint is the one named in '
                    f'{runner.work_dir}/last_checkpoint (if any); lower the learning rate or '
                    f'check the data, then resume with --resume.')
            runner.message_hub.update_scalar(f'train/{key}', value)
