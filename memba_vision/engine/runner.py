"""mmengine's Runner with memba_vision's checkpoint loading, and checkpoint saves that do
not format the config again each time nor copy frozen PEFT tensors to the host."""
from mmengine.config import Config
from mmengine.registry import RUNNERS
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint_to_model

from ..utils import load_checkpoint_file
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
    schemes go through mmengine's loaders unchanged. Its config formats its text for the
    checkpoints' meta once, not at every save (``_FormatOnceConfig``), and a PEFT save
    copies only the tensors it writes to the host."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cfg = _FormatOnceConfig.of(self.cfg)

    def save_checkpoint(self, *args, **kwargs):
        """mmengine's save, where a PEFTCheckpointHook is registered, without copying to the
        host the frozen tensors that the hook leaves out of the file: mmengine copies the
        model's whole state dict before the hook filters it (VMamba-S Memba on an H200
        machine: 40-129 ms for its 710 tensors, 9 ms for the 266 trainable ones)."""
        model = _unwrap(self.model)
        peft = any(isinstance(h, PEFTCheckpointHook) for h in self.hooks)
        keep = trainable_only_keys(model) if peft else None
        if keep is None:
            return super().save_checkpoint(*args, **kwargs)

        def drop_frozen(module, state_dict, prefix, local_metadata):
            for key in [k for k in state_dict if k not in keep]:
                del state_dict[key]

        handle = model.register_state_dict_post_hook(drop_frozen)
        try:
            return super().save_checkpoint(*args, **kwargs)
        finally:
            handle.remove()

    def load_checkpoint(self, filename: str, map_location='cpu', strict: bool = False,
                        revise_keys: list = [(r'^module.', '')]):  # noqa: B006 (mmengine's)
        if '://' in str(filename):
            return super().load_checkpoint(filename, map_location, strict, revise_keys)
        checkpoint = load_checkpoint_file(filename, map_location=map_location)
        self.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        model = _unwrap(self.model)
        checkpoint = _load_checkpoint_to_model(model, checkpoint, strict,
                                               revise_keys=revise_keys)
        self._has_loaded = True
        self.logger.info(f'Load checkpoint from {filename}')
        return checkpoint
