"""Leaky Integrate Membrane (LIM) op: the public entry point and its dispatch.

Algorithm 1 of the Memba paper, for x (B, L, R) split into T = ``num_chunks``
chunks of l = L // T tokens (the last L - l*T tokens are trimmed)::

    u = u_prev (B, l, R) or zeros
    for i in 0..T-1:
        u = leak * u + x[:, i*l:(i+1)*l]
        u = where(u > threshold, 0, u)        # reset where the membrane fires
        out_i = u
    out    = concat(out_i) zero-padded back to length L          (B, L, R)
    u_mean = mean_i(out_i), the membrane handed to the next layer (B, l, R)

The gradient is the exact piecewise derivative: zero through a reset, one
elsewhere. ``lim`` checks its inputs once (the same messages whichever backend
runs) and dispatches to the fused CUDA extension (``cuda``, kernels/lim) on the GPU, else
to the PyTorch reference (``reference``).
"""
from typing import Optional, Tuple

from torch import Tensor

from ..dispatch import choose
from .cuda import lim_cuda, unavailable_reason
from .reference import lim_reference

__all__ = ['lim', 'lim_reference', 'lim_backend']


def _check_inputs(x: Tensor, num_chunks: int, u_prev: Optional[Tensor]) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f'lim: x must be a (B, L, R) tensor, got {shape}')
    if not x.is_floating_point():
        raise TypeError(f'lim: x must be a floating-point tensor, got {x.dtype}')
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f'lim: num_chunks must be an integer >= 1, got {num_chunks!r}')
    B, L, R = x.shape
    if num_chunks > L:
        raise ValueError(f'lim: num_chunks ({num_chunks}) is larger than the '
                         f'sequence length L={L}')
    if u_prev is not None:
        expected = (B, L // num_chunks, R)
        if not isinstance(u_prev, Tensor) or u_prev.shape != expected:  # torch.Size is a tuple
            got = tuple(u_prev.shape) if isinstance(u_prev, Tensor) else type(u_prev).__name__
            raise ValueError(f'lim: u_prev must have shape (B, L // num_chunks, R) = '
                             f'{expected}, got {got}')
        if u_prev.device != x.device:
            raise ValueError(f'lim: u_prev is on {u_prev.device} but x is on {x.device}')
        if u_prev.dtype != x.dtype:
            raise TypeError(f'lim: u_prev dtype {u_prev.dtype} differs from x dtype {x.dtype}')


def lim_backend(x: Tensor) -> str:
    """'cuda' or 'reference': the backend ``lim`` runs for tensors like ``x``."""
    return choose('LIM', (('cuda', lambda: unavailable_reason(x)), ('reference', None)))


def lim(x: Tensor, num_chunks: int = 4, leak: float = 0.5, threshold: float = 1.0,
        u_prev: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """LIM neuron over chunks of the token axis.

    Args:
        x: (B, L, R) input currents.
        num_chunks: T, the number of time steps the sequence is split into.
        leak: membrane decay per step (0.5 = time constant 2).
        threshold: the membrane resets to 0 where it exceeds this value.
        u_prev: (B, L // T, R) membrane from the previous layer, or None.

    Returns:
        out (B, L, R), zero on the trimmed tail, and u_mean (B, L // T, R).
    """
    _check_inputs(x, num_chunks, u_prev)
    fn = lim_cuda if lim_backend(x) == 'cuda' else lim_reference
    return fn(x, num_chunks, float(leak), float(threshold), u_prev)
