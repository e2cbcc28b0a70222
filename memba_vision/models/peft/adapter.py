"""ParallelAdapter: a small bottleneck MLP beside a frozen linear layer (out_proj)."""
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .lora import _FrozenWrapper

__all__ = ['ParallelAdapter']


class ParallelAdapter(_FrozenWrapper):
    """y = layer(x) + s * up(dropout(relu(down(x)))), up zero-initialised, no biases.

    Wraps the layer as ``original_layer`` (a plain layer's state dict loads into it).
    Shapes: x (..., in_features) -> (..., out_features).
    """

    def __init__(self, original_layer: nn.Module, rank: int = 32, scale: float = 0.1,
                 dropout: float = 0.1):
        super().__init__()
        in_features, out_features = original_layer.in_features, original_layer.out_features
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= in_features:
            raise ValueError(f'adapter rank must be an integer in [1, {in_features}], '
                             f'got {rank!r}')
        self.in_features, self.out_features = in_features, out_features
        self.original_layer = original_layer
        if isinstance(original_layer, nn.Linear):
            original_layer.requires_grad_(False)
        self.adapter_down = nn.Linear(in_features, rank, bias=False)
        self.adapter_up = nn.Linear(rank, out_features, bias=False)
        nn.init.zeros_(self.adapter_up.weight)
        self.dropout = nn.Dropout(dropout)
        self.rank, self.scale = rank, float(scale)

    def forward(self, x: Tensor) -> Tensor:
        branch = self.adapter_up(self.dropout(F.relu(self.adapter_down(x))))
        return self.original_layer(x) + self.scale * branch

    def extra_repr(self) -> str:
        return f'rank={self.rank}, scale={self.scale:g}'
