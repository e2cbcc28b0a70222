"""``y * silu(z)`` as one autograd node that saves y and z and recomputes silu(z) in the
backward, instead of keeping silu(z) (a (B, L, D) tensor per layer) from the forward."""
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['silu_gate', 'silu_gate_reference']


def silu_gate_reference(y: Tensor, z: Tensor) -> Tensor:
    """y (B, L, D) * silu(z), z (B, L, D); autograd's own backward. The product has y's and
    z's promoted dtype."""
    return y * F.silu(z)


class _SiluGate(torch.autograd.Function):

    @staticmethod
    def forward(ctx, y, z):
        with torch.autocast(y.device.type, enabled=False):  # dtypes are chosen here
            out = y * F.silu(z)
        ctx.save_for_backward(y, z)
        return out

    @staticmethod
    def backward(ctx, grad):
        y, z = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            dy = dz = None
            if ctx.needs_input_grad[0]:
                dy = (grad * F.silu(z)).to(y.dtype)
            if ctx.needs_input_grad[1]:
                dz = torch.ops.aten.silu_backward(grad * y, z.to(grad.dtype)).to(z.dtype)
        return dy, dz


def silu_gate(y: Tensor, z: Tensor) -> Tensor:
    """y (B, L, D) * silu(z), z (B, L, D): the values and gradients of
    ``silu_gate_reference``, with less kept for the backward."""
    return _SiluGate.apply(y, z)
