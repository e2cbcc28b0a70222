"""VMamba's output gate y * silu(z') and Memba's correction of z.

``silu_gate``: z' = z, or z corrected by given spikes (``gate.py``). ``silu_gate_lim``: the
whole Memba gate of a VMamba block, both scan directions' LIMs included: z' = z +
0.5 (S_0 W_out,0^T + S_1 W_out,1^T), S_d = LIM_d(z W_in,d^T), direction 0 over the tokens in
order and direction 1 reversed, each with its own membrane. Backends: ``fused`` (one autograd
node on the extension's LIM pair, ``lim_node.py``) and ``per-op`` (``ops.lim`` per direction,
then ``silu_gate``).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..bidirectional_ssm.node import MembaGateParams
from ..dispatch import choose
from ..lim import lim
from .gate import silu_gate, silu_gate_reference
from .lim_node import silu_gate_lim_fused, silu_gate_lim_fused_reason

__all__ = ['silu_gate', 'silu_gate_reference', 'silu_gate_lim',
           'silu_gate_lim_per_op', 'silu_gate_lim_fused', 'silu_gate_lim_backend']

Membrane = Optional[Tuple[Optional[Tensor], Optional[Tensor]]]


def silu_gate_lim_per_op(y: Tensor, z: Tensor, w_in: Tensor, w_out: Tensor,
                         gate: MembaGateParams, membrane: Membrane = None
                         ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """``silu_gate_lim`` op by op: one product for both directions' W_in, ``ops.lim`` on each
    direction (the reversed one on flipped tokens), ``silu_gate`` on the spikes."""
    R = w_in.shape[0] // 2
    v = F.linear(z, w_in)                                               # (B, L, 2R)
    prev = membrane if membrane is not None else (None, None)
    s_f, m_f = lim(v[..., :R], gate.num_chunks, gate.leak, gate.threshold, prev[0])
    s_b, m_b = lim(v[..., R:].flip(1), gate.num_chunks, gate.leak, gate.threshold, prev[1])
    spikes = torch.cat([s_f, s_b.flip(1)], dim=-1)                      # input token order
    return silu_gate(y, z, spikes, 0.5 * w_out, gate.residual), (m_f, m_b)


def silu_gate_lim_backend(z: Tensor, gate: MembaGateParams, kernels=None) -> str:
    """'fused' or 'per-op' for these inputs (logged once per run)."""
    return choose('Memba gate', (('fused', lambda: silu_gate_lim_fused_reason(z, gate, kernels)),
                                 ('per-op', None)))


def silu_gate_lim(y: Tensor, z: Tensor, w_in: Tensor, w_out: Tensor, gate: MembaGateParams,
                  membrane: Membrane = None, kernels=None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """y (B, L, D) * silu(z') with z (B, L, D) corrected by both directions' LIMs.

    w_in (2R, D): W_in of direction 0, then of direction 1; w_out (D, 2R) likewise; ``gate``:
    the LIM settings and whether z' keeps z; ``membrane``: the previous layer's pair of
    (B, L // T, R) membranes (None: zeros). Returns (the product, in y's and z's promoted
    dtype; the new pair of membranes). ``kernels``: a stand-in for the CUDA extension (the
    tests' CPU reference).
    """
    if silu_gate_lim_backend(z, gate, kernels) == 'fused':
        return silu_gate_lim_fused(y, z, w_in, w_out, gate, membrane, kernels)
    return silu_gate_lim_per_op(y, z, w_in, w_out, gate, membrane)
