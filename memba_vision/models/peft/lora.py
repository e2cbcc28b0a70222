"""LoRA on a frozen linear layer: y = W x + s * B(dropout(A x))."""
import torch
import torch.nn as nn
from mmpretrain.models.peft.lora import LoRALinear as _MMPretrainLoRALinear
from torch import Tensor

__all__ = ['LoRALinear']


class LoRALinear(_MMPretrainLoRALinear):
    """mmpretrain's LoRALinear with the Memba/MambaPEFT conventions.

    The down-projection A (``lora_down``, Kaiming init) maps ``in_features`` to
    ``rank``; the up-projection B (``lora_up``) is zero-initialised, so the layer
    starts as the frozen original. Unlike the parent, dropout acts on A x (the
    rank-r activations), and the scale is given directly (``scaling = scale``).

    Shapes: x (..., in_features) -> (..., out_features).

    A state dict of the plain layer (``weight``/``bias``) loads into the wrapped
    original layer, so official checkpoints load unchanged.
    """

    def __init__(self, original_layer: nn.Linear, rank: int, scale: float = 0.1,
                 dropout: float = 0.1):
        if not isinstance(original_layer, nn.Linear):
            raise TypeError(f'LoRALinear wraps an nn.Linear, got {type(original_layer).__name__}')
        width = min(original_layer.in_features, original_layer.out_features)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= width:
            raise ValueError(f'LoRA rank must be an integer in [1, {width}] for a '
                             f'{original_layer.in_features}->{original_layer.out_features} '
                             f'layer, got {rank!r}')
        super().__init__(original_layer, alpha=scale * rank, rank=rank, drop_rate=dropout)
        self.in_features = original_layer.in_features
        self.out_features = original_layer.out_features
        self.rank = rank
        self.original_layer.requires_grad_(False)

    @property
    def weight(self) -> Tensor:
        """The frozen base weight (out_features, in_features)."""
        return self.original_layer.weight

    @property
    def bias(self):
        return self.original_layer.bias

    def forward(self, x: Tensor) -> Tensor:
        update = self.lora_up(self.lora_dropout(self.lora_down(x)))
        return self.original_layer(x) + update * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear with the low-rank update folded into W."""
        base = self.original_layer
        out = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        delta = self.lora_up.weight.float() @ self.lora_down.weight.float()
        out.weight.copy_((base.weight.float() + self.scaling * delta).to(base.weight.dtype))
        if base.bias is not None:
            out.bias.copy_(base.bias)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ('weight', 'bias'):
            if prefix + name in state_dict:
                state_dict[f'{prefix}original_layer.{name}'] = state_dict.pop(prefix + name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f'in_features={self.in_features}, out_features={self.out_features}, '
                f'rank={self.rank}, scale={self.scaling:g}')
