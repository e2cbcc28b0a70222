"""Shared base of the Mamba backbones: strict official-checkpoint init, CUDA-graph replay."""
from typing import Dict, Optional, Set, Tuple

from mmpretrain.models.backbones.base_backbone import BaseBackbone
from torch import Tensor

from ..cuda_graph import CUDAGraphs
from .pretrained import load_pretrained

__all__ = ['MambaBackbone']


class MambaBackbone(BaseBackbone):
    """BaseBackbone whose ``init_cfg=dict(type='Pretrained', checkpoint=PATH)`` loads
    an official checkpoint strictly through ``convert_official``.

    Subclasses set ``arch_name``, ``checkpoint_key`` and ``download_urls``
    (arch name -> where the official file can be downloaded) and implement
    ``forward_features`` (the eager forward).

    Args:
        cuda_graph: on CUDA inputs, replay the forward and backward as CUDA
            graphs captured once per input shape (see ``models.cuda_graph``);
            the step then costs a few launches instead of thousands. CPU inputs
            always run eagerly.
        init_cfg: see above.
    """
    arch_zoo: Dict[str, dict] = {}
    arch_keys: Set[str] = set()       # keys a dict arch may have
    required_arch_keys: Tuple[str, ...] = ()
    download_urls: Dict[str, str] = {}
    arch_name: str = 'custom'
    checkpoint_key: Optional[str] = None

    @classmethod
    def resolve_arch(cls, arch) -> Tuple[str, dict]:
        """('small', settings) for a zoo name, ('custom', arch) for a valid dict."""
        name = cls.__name__
        if isinstance(arch, str):
            if arch not in cls.arch_zoo:
                raise KeyError(f'{name}: unknown arch {arch!r}; valid: {", ".join(cls.arch_zoo)} '
                               f'or a dict with keys {sorted(cls.arch_keys)}')
            return arch, dict(cls.arch_zoo[arch])
        arch = dict(arch)
        if set(arch) - cls.arch_keys or not set(cls.required_arch_keys) <= set(arch):
            raise KeyError(f'{name}: a dict arch needs {" and ".join(cls.required_arch_keys)} '
                           f'and may have {sorted(cls.arch_keys)}; got {sorted(arch)}')
        return 'custom', arch

    def __init__(self, cuda_graph: bool = False, init_cfg: Optional[dict] = None):
        super().__init__(init_cfg=init_cfg)
        self.cuda_graph = bool(cuda_graph)
        self._graphs = CUDAGraphs()

    def forward_features(self, x: Tensor) -> Tuple[Tensor, ...]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        if self.cuda_graph and x.is_cuda:
            return self._graphs(self, self.forward_features, x)
        return self.forward_features(x)

    def reset_cuda_graphs(self) -> None:
        """Drops the captured graphs (and their memory); call after changing requires_grad."""
        self._graphs.reset()

    def _apply(self, fn, *args, **kwargs):
        self._graphs.reset()  # .to() / .cuda() move the tensors the graphs point at
        return super()._apply(fn, *args, **kwargs)

    def convert_official(self, state: dict) -> dict:
        raise NotImplementedError

    def init_weights(self) -> None:
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            url = self.download_urls.get(self.arch_name)
            hint = (f'download it from {url} and put it there (or set '
                    f'model.backbone.init_cfg.checkpoint)' if url else '')
            load_pretrained(self, cfg['checkpoint'], self.convert_official,
                            checkpoint_key=self.checkpoint_key, download_hint=hint)
            self._is_init = True
            return
        super().init_weights()

    def train(self, mode: bool = True):
        super().train(mode)
        return self  # BaseBackbone.train returns None, which breaks model.eval() chaining
