"""Leaky Integrate Membrane (LIM) op: the public entry point and its reference.

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
runs) and dispatches to the fused CUDA extension, else Triton, else the
PyTorch reference below. ``MEMBA_LIM_BACKEND=cuda|triton|torch`` forces one.
"""
import os
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import forced_backend, log_once

__all__ = ['lim', 'lim_reference', 'lim_backend', 'available_lim_backends',
           'register_lim_backend']

_BACKEND_ENV = 'MEMBA_LIM_BACKEND'
_VALID_BACKENDS = ('cuda', 'triton', 'torch')
# name -> (is_available() -> bool, fn(x, num_chunks, leak, threshold, u_prev))
_BACKENDS: Dict[str, Tuple[Callable[[], bool], Callable]] = {}
# (x.is_cuda, MEMBA_LIM_BACKEND value) -> backend name, emptied whenever a backend
# is registered; failed resolutions are not cached.
_resolved: Dict[Tuple[bool, str], str] = {}


def lim_reference(x: Tensor, num_chunks: int = 4, leak: float = 0.5,
                  threshold: float = 1.0,
                  u_prev: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Eager PyTorch LIM; autograd gives the exact piecewise gradient.

    Half-precision inputs are integrated in fp32 and the results cast back, as
    the fused kernels do.
    """
    B, L, R = x.shape
    T = num_chunks
    l = L // T
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    chunks = x[:, :l * T].to(compute_dtype).unflatten(1, (T, l))  # (B, T, l, R)
    if u_prev is None:
        u = chunks.new_zeros(B, l, R)
    else:
        u = u_prev.to(compute_dtype)
    outs = []
    for i in range(T):
        u = leak * u + chunks[:, i]
        u = torch.where(u > threshold, torch.zeros_like(u), u)
        outs.append(u)
    out = torch.stack(outs, dim=1).flatten(1, 2)  # (B, l*T, R)
    if l * T < L:
        out = F.pad(out, (0, 0, 0, L - l * T))
    u_mean = torch.stack(outs, dim=0).mean(dim=0)
    return out.to(x.dtype), u_mean.to(x.dtype)


def register_lim_backend(name: str, is_available: Callable[[], bool],
                         fn: Callable) -> None:
    """Plugs a fused backend in behind ``lim`` (same signature as the reference)."""
    if name not in _VALID_BACKENDS:
        raise ValueError(f'LIM backend must be one of {_VALID_BACKENDS}, got {name!r}')
    _BACKENDS[name] = (is_available, fn)
    _resolved.clear()


register_lim_backend('torch', lambda: True, lim_reference)


def available_lim_backends() -> Tuple[str, ...]:
    """Backends usable for CUDA tensors in this process, fastest first."""
    return tuple(n for n in _VALID_BACKENDS if n in _BACKENDS and _BACKENDS[n][0]())


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


def _resolve(x: Tensor) -> str:
    forced = forced_backend(_BACKEND_ENV, _VALID_BACKENDS)
    if forced:
        if forced != 'torch':
            if not x.is_cuda:
                raise RuntimeError(f'{_BACKEND_ENV}={forced} needs CUDA tensors, '
                                   f'got a tensor on {x.device}')
            if forced not in available_lim_backends():
                raise RuntimeError(f'{_BACKEND_ENV}={forced} but that LIM backend is '
                                   f'unavailable; available: {available_lim_backends()}')
        return forced
    if not x.is_cuda:
        return 'torch'
    return available_lim_backends()[0]


def lim_backend(x: Tensor) -> str:
    """Name of the backend ``lim`` uses for a tensor like ``x`` (logged once per run)."""
    key = (x.is_cuda, os.environ.get(_BACKEND_ENV, ''))
    name = _resolved.get(key)
    if name is None:
        name = _resolved[key] = _resolve(x)
    log_once(f'lim:{name}', f'memba_vision.ops.lim: using the {name} backend')
    return name


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
    fn = _BACKENDS[lim_backend(x)][1]
    return fn(x, num_chunks, float(leak), float(threshold), u_prev)
