"""LoRA on frozen layers, in the three forms MambaPEFT uses.

* ``LoRALinear``: y = W x + s * up(dropout(down(x))), optionally on a range of
  output rows only (LoRAp: the x or z half of in_proj).
* ``MergedLoRALinear``: the weight is W + s * up @ down (x_proj, dt_proj; no dropout),
  so code that reads ``.weight`` (the SSM's per-direction parameters) sees the update.
* ``LoRAConv2d``: a k x k stride-k conv to ``rank`` channels and a 1x1 conv back,
  beside the patch embedding.

Every form wraps the frozen layer as ``original_layer``, so a plain layer's state
dict (``weight``/``bias``) loads into it and official checkpoints load unchanged;
``up`` is zero-initialised, so a wrapped layer starts as the original; ``merged()``
returns the plain layer with the update folded in.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmpretrain.models.peft.lora import LoRALinear as _MMPretrainLoRALinear
from torch import Tensor

__all__ = ['LoRALinear', 'MergedLoRALinear', 'LoRAConv2d']


def _check_rank(rank, width: int, what: str) -> None:
    """A rank above min(in, out) adds no expressiveness but is allowed (MambaPEFT's x_proj
    and dt_proj rows use r=64 on 56 outputs and 24 inputs); the bound is the larger side."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= width:
        raise ValueError(f'LoRA rank must be an integer in [1, {width}] for {what}, got {rank!r}')


def _rows(rows: Optional[Tuple[int, int]], out_features: int) -> Tuple[int, int]:
    start, stop = (0, out_features) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= start < stop <= out_features:
        raise ValueError(f'LoRA rows {rows} outside the layer\'s {out_features} outputs')
    return start, stop


class _FrozenWrapper(nn.Module):
    """A PEFT wrapper of a frozen ``original_layer``: ``weight``/``bias`` are the original's, and
    a plain layer's ``weight``/``bias`` keys load into it."""

    @property
    def weight(self) -> Tensor:
        """The frozen base weight."""
        return self.original_layer.weight

    @property
    def bias(self):
        return self.original_layer.bias

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ('weight', 'bias'):
            if prefix + name in state_dict:
                state_dict[f'{prefix}original_layer.{name}'] = state_dict.pop(prefix + name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _plain(layer: nn.Module) -> nn.Module:
    """``layer`` with every LoRA wrapper inside it merged."""
    return layer.merged() if hasattr(layer, 'merged') else layer


class LoRALinear(_FrozenWrapper, _MMPretrainLoRALinear):
    """mmpretrain's LoRALinear with the Memba/MambaPEFT conventions.

    The down-projection (``lora_down``, Kaiming init) maps ``in_features`` to
    ``rank``; the up-projection (``lora_up``) is zero-initialised. Dropout acts on
    the rank-r activations and the scale is given directly (``scaling = scale``).
    ``rows=(start, stop)`` restricts the update to those outputs. The wrapped
    layer may itself be a LoRALinear (two branches on one layer).

    Shapes: x (..., in_features) -> (..., out_features).
    """

    def __init__(self, original_layer: nn.Module, rank: int, scale: float = 0.1,
                 dropout: float = 0.1, rows: Optional[Tuple[int, int]] = None):
        if not isinstance(original_layer, (nn.Linear, LoRALinear)):
            raise TypeError(f'LoRALinear wraps an nn.Linear, got {type(original_layer).__name__}')
        start, stop = _rows(rows, original_layer.out_features)
        _check_rank(rank, max(original_layer.in_features, stop - start),
                    f'a {original_layer.in_features}->{stop - start} layer')
        super().__init__(original_layer, alpha=scale * rank, rank=rank, drop_rate=dropout)
        self.in_features = original_layer.in_features
        self.out_features = original_layer.out_features
        self.rank, self.rows = rank, (start, stop)
        if (start, stop) != (0, self.out_features):
            self.lora_up = nn.Linear(rank, stop - start, bias=False)
            nn.init.zeros_(self.lora_up.weight)
        if isinstance(original_layer, nn.Linear):  # a wrapped LoRALinear keeps its branch
            original_layer.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)                               # (N, in)
        h = self.lora_dropout(self.lora_down(x2))                          # (N, rank)
        out = self.original_layer(x2)                                      # (N, out)
        # the scale goes on the (rows, rank) weight, and the up-projection adds its product to
        # the base output in place (the base product's output is not saved): no temporary of
        # the output's size and no elementwise pass over it, forwards or backwards
        w_up = (self.lora_up.weight * self.scaling).to(out.dtype)
        start, stop = self.rows
        target = out if (start, stop) == (0, self.out_features) else out[:, start:stop]
        target.addmm_(h.to(out.dtype), w_up.t())
        return out.view(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear with the low-rank update(s) folded into W."""
        base = _plain(self.original_layer)
        out = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        weight = base.weight.float().clone()
        start, stop = self.rows
        weight[start:stop] += self.scaling * (self.lora_up.weight.float()
                                              @ self.lora_down.weight.float())
        out.weight.copy_(weight.to(base.weight.dtype))
        if base.bias is not None:
            out.bias.copy_(base.bias)
        return out

    def extra_repr(self) -> str:
        rows = '' if self.rows == (0, self.out_features) else f', rows={self.rows}'
        return (f'in_features={self.in_features}, out_features={self.out_features}, '
                f'rank={self.rank}, scale={self.scaling:g}{rows}')


class MergedLoRALinear(_FrozenWrapper):
    """A frozen linear layer whose weight is W + s * up @ down (on ``rows`` only).

    The wrapped layer may itself be a MergedLoRALinear (updates on two row ranges).

    ``weight`` is the merged (trainable) weight; forward is F.linear with it.
    Shapes: x (..., in_features) -> (..., out_features).
    """

    def __init__(self, original_layer: nn.Linear, rank: int, scale: float = 0.1,
                 rows: Optional[Tuple[int, int]] = None):
        super().__init__()
        if not isinstance(original_layer, (nn.Linear, MergedLoRALinear)):
            raise TypeError(f'MergedLoRALinear wraps an nn.Linear, got '
                            f'{type(original_layer).__name__}')
        self.in_features = original_layer.in_features
        self.out_features = original_layer.out_features
        start, stop = _rows(rows, self.out_features)
        _check_rank(rank, max(self.in_features, stop - start),
                    f'a {self.in_features}->{stop - start} layer')
        self.original_layer = original_layer
        if isinstance(original_layer, nn.Linear):  # a wrapped MergedLoRALinear keeps its update
            original_layer.requires_grad_(False)
        self.lora_down = nn.Linear(self.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, stop - start, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.rank, self.scaling, self.rows = rank, float(scale), (start, stop)

    @property
    def weight(self) -> Tensor:
        w = self.original_layer.weight
        delta = self.scaling * (self.lora_up.weight @ self.lora_down.weight)
        start, stop = self.rows
        if (start, stop) != (0, self.out_features):
            delta = F.pad(delta, (0, 0, start, self.out_features - stop))
        return w + delta.to(w.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        base = self.original_layer
        while not isinstance(base, nn.Linear):
            base = base.original_layer
        out = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        out.weight.copy_(self.weight)
        if base.bias is not None:
            out.bias.copy_(base.bias)
        return out

    def extra_repr(self) -> str:
        return (f'in_features={self.in_features}, out_features={self.out_features}, '
                f'rank={self.rank}, scale={self.scaling:g}, rows={self.rows}, merged')


class LoRAConv2d(_FrozenWrapper):
    """y = conv(x) + s * up(dropout(down(x))) beside a frozen nn.Conv2d.

    ``down``: the original's kernel, stride and padding to ``rank`` channels;
    ``up``: 1x1 to the original's channels (zero-initialised); no biases.
    Shapes: (B, C_in, H, W) -> the original conv's output.
    """

    def __init__(self, original_layer: nn.Conv2d, rank: int, scale: float = 0.1,
                 dropout: float = 0.1):
        super().__init__()
        if not isinstance(original_layer, nn.Conv2d):
            raise TypeError(f'LoRAConv2d wraps an nn.Conv2d, got {type(original_layer).__name__}')
        conv = original_layer
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        _check_rank(rank, max(conv.out_channels, fan_in),
                    f'a conv with {conv.out_channels} channels')
        self.original_layer = conv.requires_grad_(False)
        self.lora_down = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, conv.stride,
                                   conv.padding, bias=False)
        self.lora_up = nn.Conv2d(rank, conv.out_channels, 1, bias=False)
        nn.init.zeros_(self.lora_up.weight)
        self.lora_dropout = nn.Dropout(dropout)
        self.rank, self.scaling = rank, float(scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.original_layer(x) + \
            self.scaling * self.lora_up(self.lora_dropout(self.lora_down(x)))

    @torch.no_grad()
    def merged(self) -> nn.Conv2d:
        """The plain conv: the 1x1 up conv folds into the k x k down kernel."""
        conv = self.original_layer
        out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                        conv.padding, bias=conv.bias is not None,
                        device=conv.weight.device, dtype=conv.weight.dtype)
        up = self.lora_up.weight.flatten(1).float()                       # (C_out, r)
        delta = torch.einsum('or,rikl->oikl', up, self.lora_down.weight.float())
        out.weight.copy_((conv.weight.float() + self.scaling * delta).to(conv.weight.dtype))
        if conv.bias is not None:
            out.bias.copy_(conv.bias)
        return out

    def extra_repr(self) -> str:
        return f'rank={self.rank}, scale={self.scaling:g}'
