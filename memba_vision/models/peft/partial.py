"""Partial tuning: zero-initialised trainable deltas on pretrained tensors."""
from typing import Dict, Optional

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ['TensorDeltas', 'shift']


class TensorDeltas(nn.Module):
    """One zero-initialised parameter per named tensor; ``shift(name, t)`` is t + delta.

    A module owns one as ``delta`` (e.g. ``layers.3.mixer.delta.A_log``), so the
    optimiser settings can address the deltas by name (weight decay on a delta
    pulls the tensor back to its pretrained value).

    Args:
        shapes: tensor name -> shape of the tensor it shifts.
    """

    def __init__(self, shapes: Dict[str, torch.Size]):
        super().__init__()
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)))

    def shift(self, name: str, tensor: Tensor) -> Tensor:
        """``tensor`` plus its delta, or ``tensor`` itself when it has none."""
        delta = self._parameters.get(name)
        return tensor if delta is None else tensor + delta.to(tensor.dtype)

    def extra_repr(self) -> str:
        return ', '.join(self._parameters)


def shift(deltas: Optional[TensorDeltas], name: str, tensor: Tensor) -> Tensor:
    """``tensor`` plus its delta in ``deltas`` (which may be None: no partial tuning)."""
    return tensor if deltas is None else deltas.shift(name, tensor)
