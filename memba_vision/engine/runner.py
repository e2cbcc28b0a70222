"""mmengine's Runner with memba_vision's checkpoint loading."""
from mmengine.model import is_model_wrapper
from mmengine.registry import RUNNERS
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint_to_model

from ..utils import load_checkpoint_file

__all__ = ['SafeLoadRunner']


@RUNNERS.register_module()
class SafeLoadRunner(Runner):
    """Runner whose ``load_from`` and ``resume`` read local files through
    ``load_checkpoint_file``: ``weights_only=True`` with the checkpoint allow-list for
    that load only, and a one-line ``CheckpointError`` for a bad file. URLs and other
    schemes go through mmengine's loaders unchanged."""

    def load_checkpoint(self, filename: str, map_location='cpu', strict: bool = False,
                        revise_keys: list = [(r'^module.', '')]):  # noqa: B006 (mmengine's)
        if '://' in str(filename):
            return super().load_checkpoint(filename, map_location, strict, revise_keys)
        checkpoint = load_checkpoint_file(filename, map_location=map_location)
        self.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        model = self.model.module if is_model_wrapper(self.model) else self.model
        checkpoint = _load_checkpoint_to_model(model, checkpoint, strict,
                                               revise_keys=revise_keys)
        self._has_loaded = True
        self.logger.info(f'Load checkpoint from {filename}')
        return checkpoint
