"""Implicit attention of the selective scan ("The Hidden Attention of Mamba Models",
Ali et al. 2024), on the reference path.

Unrolling the scan of ``ops.selective_scan_reference`` (zero-order hold for A,
dt * B for the input: h_i = exp(dt_i A) h_{i-1} + dt_i B_i u_i) gives, per
channel, y_i = sum_{j <= i} alpha[i, j] u_j + D u_i with::

    alpha[i, j] = C_i . (prod_{k=j+1..i} exp(dt_k A)) . (dt_j B_j)
                = sum_n C_i[n] exp(A[n] * (S_i - S_j)) dt_j B_j[n],   S = cumsum(dt)

For Vim each direction's terms are recomputed in fp64 from a layer's input
(in_proj, conv + SiLU, x_proj, dt_proj + bias + softplus); the backward
direction scans the reversed sequence, and its matrix is mapped back to token
order (so it is upper-triangular there).
"""
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import causal_conv1d_tokens

__all__ = ['ScanTerms', 'implicit_attention', 'vim_scan_terms', 'vim_implicit_attention']


class ScanTerms(NamedTuple):
    """One scan direction's inputs in scan order (b batch, l tokens, d channels, n states)."""
    u: Tensor      # (b, l, d) scanned input (conv + SiLU output)
    delta: Tensor  # (b, l, d) dt = softplus(dt_proj(.) + bias)
    A: Tensor      # (d, n)
    B: Tensor      # (b, l, n)
    C: Tensor      # (b, l, n)
    D: Tensor      # (d,)


def implicit_attention(delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       rows: Optional[Sequence[int]] = None) -> Tensor:
    """alpha (b, d, len(rows), l) of a scan in scan order; rows None = every token.

    delta (b, l, d) (after softplus), A (d, n), B and C (b, l, n). alpha[.., i, j]
    is 0 for j > i. Memory: one (b, l, d, n) block per row.
    """
    b, l, d = delta.shape
    rows = range(l) if rows is None else rows
    S = delta.cumsum(1)                                         # (b, l, d)
    dB = delta[..., None] * B[:, :, None, :]                    # (b, l, d, n) dt_j B_j
    out = []
    for i in rows:
        gap = (S[:, i:i + 1] - S)[:, :i + 1]                    # (b, i+1, d) sum_{k=j+1..i} dt_k
        decay = torch.exp(gap[..., None] * A)                   # (b, i+1, d, n)
        row = torch.einsum('bn,bjdn->bdj', C[:, i], decay * dB[:, :i + 1])
        out.append(F.pad(row, (0, l - i - 1)))
    return torch.stack(out, 2)


@torch.no_grad()
def vim_scan_terms(mixer, hidden: Tensor, backward: bool) -> ScanTerms:
    """The scan inputs of one direction of a ``VimMixer`` for its input hidden (b, l, C).

    Everything after in_proj runs in fp64 on the reference ops; the backward
    direction's terms are returned in its scan order (tokens reversed).
    """
    x = mixer.in_proj(hidden)[..., :mixer.d_inner].double()
    p = mixer._direction(backward)
    f64 = lambda t: t.double()  # noqa: E731
    u = causal_conv1d_tokens(x, f64(p.conv_weight), f64(p.conv_bias), activation='silu',
                             reverse=backward)
    dt, B, C = F.linear(u, f64(p.x_proj_weight)).split(
        [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    delta = F.softplus(F.linear(dt, f64(p.dt_proj_weight)) + f64(p.dt_bias))
    if backward:
        u, delta, B, C = (t.flip(1) for t in (u, delta, B, C))
    return ScanTerms(u, delta, f64(p.A), B, C, f64(p.D))


def vim_implicit_attention(mixer, hidden: Tensor, rows: Optional[Sequence[int]] = None
                           ) -> Tuple[Tensor, Tensor]:
    """(forward, backward) alpha of a ``VimMixer``, each (b, d, len(rows), l) in token order.

    ``rows``: token positions (None = all). The mixer's ungated output per
    direction is y_i = sum_j alpha[i, j] u_j + D u_i (u in token order).
    """
    l = hidden.shape[1]
    rows = list(range(l)) if rows is None else list(rows)
    out = []
    for backward in (False, True):
        t = vim_scan_terms(mixer, hidden, backward)
        scan_rows = [l - 1 - r for r in rows] if backward else rows
        alpha = implicit_attention(t.delta, t.A, t.B, t.C, scan_rows)
        out.append(alpha.flip(-1) if backward else alpha)
    return out[0], out[1]
