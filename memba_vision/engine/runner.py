"""mmengine's Runner with memba_vision's checkpoint loading, and checkpoint saves that cost the
training loop little: the config is not formatted again each time, frozen PEFT tensors are not
copied to the host, the others are copied in one batch, and the file is written behind the
loop."""
import os
import os.path as osp
import time
from collections import OrderedDict
from typing import Callable, Optional

import mmengine
import torch
from mmengine.config import Config
from mmengine.dist import master_only
from mmengine.optim import OptimWrapper
from mmengine.registry import RUNNERS
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint_to_model
from mmengine.utils import get_git_hash

from ..utils import load_checkpoint_file
from .checkpoint_writer import BackgroundWriter, host_snapshot
from .hooks import PEFTCheckpointHook, _unwrap, trainable_only_keys

__all__ = ['SafeLoadRunner']


class _FormatOnceConfig(Config):
    """mmengine's Config whose ``pretty_text`` is formatted again only when the config
    changed. mmengine's Runner writes ``pretty_text`` into every checkpoint's meta, and
    formatting a VTAB config with yapf took 50 ms on an H200 machine's CPU and 0.1-0.35 s
    on a 2-core one, at every save. The unformatted text (about 1 ms) is the key."""

    @classmethod
    def of(cls, cfg: Config) -> '_FormatOnceConfig':
        new = cls.__new__(cls)
        new.__dict__.update(cfg.__dict__)  # as Config.__copy__ does
        return new

    @property
    def pretty_text(self) -> str:
        raw = Config(self.to_dict(), format_python_code=False).pretty_text
        cached = self.__dict__.get('_formatted')
        if cached is None or cached[0] != raw:
            cached = (raw, super().pretty_text)
            object.__setattr__(self, '_formatted', cached)  # (Config's setattr sets keys)
        return cached[1]


@RUNNERS.register_module()
class SafeLoadRunner(Runner):
    """Runner whose ``load_from`` and ``resume`` read local files through
    ``load_checkpoint_file``: ``weights_only=True`` with the checkpoint allow-list for
    that load only, and a one-line ``CheckpointError`` for a bad file. URLs and other
    schemes go through mmengine's loaders unchanged.

    Its local checkpoint saves hold what mmengine's do, taken at less cost to the loop: the
    config's text for the meta is formatted once, not at every save (``_FormatOnceConfig``);
    a PEFT save copies only the tensors it writes to the host (mmengine copies the whole
    model before ``PEFTCheckpointHook`` drops the frozen ones), and in one batch; and with a
    ``finish`` callback (``AtomicCheckpointHook``) the file is written on a background thread
    while training goes on (``wait_for_saves``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cfg = _FormatOnceConfig.of(self.cfg)
        self._writer = BackgroundWriter()

    @master_only
    def save_checkpoint(self, out_dir: str, filename: str, file_client_args=None,
                        save_optimizer: bool = True, save_param_scheduler: bool = True,
                        meta: Optional[dict] = None, by_epoch: bool = True,
                        backend_args=None, finish: Optional[Callable[[], None]] = None):
        """mmengine's ``save_checkpoint`` (same arguments and file); to a local folder, the
        checkpoint is taken as the class says, and with ``finish`` the file is written behind
        the loop, then ``finish()`` runs (on the writer's thread). The previous save is
        finished first, and its error, if any, raised."""
        self._writer.wait()
        if file_client_args is not None or backend_args is not None or '://' in str(out_dir):
            super().save_checkpoint(out_dir, filename, file_client_args, save_optimizer,
                                    save_param_scheduler, meta, by_epoch, backend_args)
            if finish is not None:
                finish()
            return
        checkpoint, copied = self._checkpoint(meta, by_epoch, save_optimizer,
                                              save_param_scheduler)
        self.call_hook('before_save_checkpoint', checkpoint=checkpoint)
        path = osp.join(out_dir, filename)

        def write():
            copied()
            os.makedirs(out_dir, exist_ok=True)
            torch.save(checkpoint, path)
            if finish is not None:
                finish()

        if finish is None:
            write()
        else:
            self._writer.submit(write, name=f'checkpoint save to {path}')

    def wait_for_saves(self) -> None:
        """Returns when no checkpoint is being written; raises a failed write's error."""
        self._writer.wait()

    def _checkpoint(self, meta, by_epoch, save_optimizer, save_param_scheduler):
        """(mmengine's checkpoint dict with host copies of the tensors, a function that waits
        for the copies)."""
        meta = {} if meta is None else meta
        if not isinstance(meta, dict):
            raise TypeError(f'meta should be a dict or None, but got {type(meta)}')
        # mmengine's numbering: the epoch counter moves on after the epoch-end hooks
        meta.setdefault('epoch', self.epoch + 1 if by_epoch else self.epoch)
        meta.setdefault('iter', self.iter if by_epoch else self.iter + 1)
        meta.update(cfg=self.cfg.pretty_text, seed=self.seed,
                    experiment_name=self.experiment_name,
                    time=time.strftime('%Y%m%d_%H%M%S', time.localtime()),
                    mmengine_version=mmengine.__version__ + get_git_hash())
        if hasattr(self.train_dataloader.dataset, 'metainfo'):
            meta.update(dataset_meta=self.train_dataloader.dataset.metainfo)
        model = _unwrap(self.model)
        state = model.state_dict()
        peft = any(isinstance(h, PEFTCheckpointHook) for h in self.hooks)
        keep = trainable_only_keys(model) if peft else None
        if keep is not None:  # the hook keeps these alone: the frozen ones are not copied
            kept = OrderedDict((k, v) for k, v in state.items() if k in keep)
            kept._metadata = getattr(state, '_metadata', None)
            state = kept
        checkpoint = dict(meta=meta, state_dict=state,
                          message_hub=self.message_hub.state_dict())
        if save_optimizer:
            if not isinstance(self.optim_wrapper, OptimWrapper):
                raise TypeError(f'self.optim_wrapper should be an `OptimWrapper` or '
                                f'`OptimWrapperDict` instance, but got {self.optim_wrapper}')
            checkpoint['optimizer'] = self.optim_wrapper.state_dict()
        if save_param_scheduler and self.param_schedulers is None:
            self.logger.warning('`save_param_scheduler` is True but `self.param_schedulers` '
                                'is None, so skip saving parameter schedulers')
        elif save_param_scheduler:
            schedulers = self.param_schedulers
            checkpoint['param_schedulers'] = (
                {name: [s.state_dict() for s in group] for name, group in schedulers.items()}
                if isinstance(schedulers, dict) else [s.state_dict() for s in schedulers])
        return host_snapshot(checkpoint)

    def load_checkpoint(self, filename: str, map_location='cpu', strict: bool = False,
                        revise_keys: list = [(r'^module.', '')]):  # noqa: B006 (mmengine's)
        if '://' in str(filename):
            return super().load_checkpoint(filename, map_location, strict, revise_keys)
        self.wait_for_saves()
        checkpoint = load_checkpoint_file(filename, map_location=map_location)
        self.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        model = _unwrap(self.model)
        checkpoint = _load_checkpoint_to_model(model, checkpoint, strict,
                                               revise_keys=revise_keys)
        self._has_loaded = True
        self.logger.info(f'Load checkpoint from {filename}')
        return checkpoint
