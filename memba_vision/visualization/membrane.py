"""The LIM's internal state, recomputed from a gate's input currents, and its token layout.

``lim_trace`` runs the recurrence of ``ops.lim_reference`` (Algorithm 1) and keeps
what the op does not return: the membrane of every chunk before its reset and
the reset (spike) mask. ``lim_order_to_sequence`` puts a per-position value of a
LIM direction back in the model's token order (direction 1 sees the tokens
reversed); the trimmed tail (the last L - T*l positions of the direction's
order, which the LIM leaves out) is NaN.
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ['LIMTrace', 'lim_trace', 'lim_order_to_sequence']


class LIMTrace(NamedTuple):
    """One LIM call, chunk by chunk (B batch, T chunks, l = L // T positions, R units)."""
    potential: Tensor  # (B, T, l, R) membrane before the reset, leak * u + x_i
    spikes: Tensor     # (B, T, l, R) bool, potential > threshold (these units reset to 0)
    out: Tensor        # (B, T, l, R) membrane after the reset, the op's output
    u_mean: Tensor     # (B, l, R) mean of ``out`` over chunks, handed to the next layer


def lim_trace(x: Tensor, num_chunks: int = 4, leak: float = 0.5, threshold: float = 1.0,
              u_prev: Optional[Tensor] = None) -> LIMTrace:
    """LIM on x (B, L, R) with the previous membrane u_prev (B, L // T, R) or None.

    Integrates in x's dtype (pass fp64 for exact comparisons); the tail of
    L - T * (L // T) tokens is trimmed, as in the op.
    """
    B, L, R = x.shape
    T = num_chunks
    l = L // T
    chunks = x[:, :l * T].unflatten(1, (T, l))
    u = x.new_zeros(B, l, R) if u_prev is None else u_prev.to(x.dtype)
    potentials, spikes, outs = [], [], []
    for i in range(T):
        potential = leak * u + chunks[:, i]
        fired = potential > threshold
        u = torch.where(fired, torch.zeros_like(potential), potential)
        potentials.append(potential)
        spikes.append(fired)
        outs.append(u)
    out = torch.stack(outs, 1)
    return LIMTrace(torch.stack(potentials, 1), torch.stack(spikes, 1), out, out.mean(1))


def lim_order_to_sequence(values: Tensor, length: int, reverse: bool) -> Tensor:
    """(B, T*l) values in a LIM direction's order -> (B, length) in token order.

    ``reverse``: the direction saw the tokens last to first. Positions the LIM
    trimmed are NaN.
    """
    B, n = values.shape
    seq = values.new_full((B, length), float('nan'))
    seq[:, :n] = values
    return seq.flip(1) if reverse else seq
