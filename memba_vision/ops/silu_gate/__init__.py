"""VMamba's output gate out_norm(y) * silu(z'), z' = z (LoRA) or Memba's correction of z.

``norm_silu_gate``: the out_norm of the merged cross scan times silu(z). Backends: ``fused``
(one kernel each way, ``norm_node.py``) and ``per-op`` (``F.layer_norm``, then ``silu_gate``,
``gate.py``). ``memba_norm_silu_gate``: the same with the whole Memba correction of z in a
VMamba block, both scan directions' LIMs included: z' = z + 0.5 (S_0 W_out,0^T + S_1
W_out,1^T), S_d = LIM_d(z W_in,d^T), direction 0 over the tokens in order and direction 1
reversed, each with its own membrane. Backends: ``fused`` (one autograd node on the
extension's LIM pair and norm gate, ``lim_node.py``) and ``per-op`` (``ops.lim`` per
direction, then ``norm_silu_gate``'s per-op path).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..bidirectional_ssm.node import MembaGateParams
from ..dispatch import choose
from ..lim import lim
from .gate import silu_gate, silu_gate_reference
from .lim_node import memba_norm_silu_gate_fused, memba_norm_silu_gate_fused_reason
from .norm_node import norm_silu_gate_fused, norm_silu_gate_fused_reason

__all__ = ['silu_gate', 'silu_gate_reference', 'norm_silu_gate', 'norm_silu_gate_per_op',
           'norm_silu_gate_fused', 'norm_silu_gate_backend', 'memba_norm_silu_gate',
           'memba_norm_silu_gate_per_op', 'memba_norm_silu_gate_fused',
           'memba_norm_silu_gate_backend']

Membrane = Optional[Tuple[Optional[Tensor], Optional[Tensor]]]


def norm_silu_gate_per_op(y: Tensor, z: Tensor, weight: Optional[Tensor],
                          bias: Optional[Tensor], eps: float) -> Tensor:
    """``norm_silu_gate`` op by op: ``F.layer_norm``, then ``silu_gate``."""
    y = F.layer_norm(y, y.shape[-1:], weight, bias, eps)
    return silu_gate(y, z).to(z.dtype)


def norm_silu_gate_backend(y: Tensor, z: Tensor, weight: Optional[Tensor],
                           bias: Optional[Tensor], kernels=None) -> str:
    """'fused' or 'per-op' for these inputs (logged once per run)."""
    return choose('VMamba output gate', (
        ('fused', lambda: norm_silu_gate_fused_reason(y, z, weight, bias, kernels)),
        ('per-op', None)))


def norm_silu_gate(y: Tensor, z: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float, kernels=None) -> Tensor:
    """LayerNorm(y) * silu(z) in z's dtype: y (B, L, D) the merged cross scan (fp32, fp64 in
    fp64 runs), normalised over D with ``weight``, ``bias`` (D,) and ``eps``; z (B, L, D) the
    gate branch (z or Memba's z'). ``kernels``: a stand-in for the CUDA extension (the
    tests' CPU reference)."""
    if norm_silu_gate_backend(y, z, weight, bias, kernels) == 'fused':
        return norm_silu_gate_fused(y, z, weight, bias, eps, kernels)
    return norm_silu_gate_per_op(y, z, weight, bias, eps)


def memba_norm_silu_gate_per_op(y: Tensor, z: Tensor, weight: Optional[Tensor],
                                bias: Optional[Tensor], eps: float, w_in: Tensor,
                                w_out: Tensor, gate: MembaGateParams, membrane: Membrane = None
                                ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """``memba_norm_silu_gate`` op by op: one product for both directions' W_in, ``ops.lim``
    on each direction (the reversed one on flipped tokens), one product for both W_out, then
    ``norm_silu_gate_per_op``."""
    R = w_in.shape[0] // 2
    v = F.linear(z, w_in)                                               # (B, L, 2R)
    prev = membrane if membrane is not None else (None, None)
    s_f, m_f = lim(v[..., :R], gate.num_chunks, gate.leak, gate.threshold, prev[0])
    s_b, m_b = lim(v[..., R:].flip(1), gate.num_chunks, gate.leak, gate.threshold, prev[1])
    spikes = torch.cat([s_f, s_b.flip(1)], dim=-1)                      # input token order
    correction = torch.matmul(spikes.to(z.dtype), (0.5 * w_out).to(z.dtype).t())
    zp = z + correction if gate.residual else correction
    return norm_silu_gate_per_op(y, zp, weight, bias, eps), (m_f, m_b)


def memba_norm_silu_gate_backend(y: Tensor, z: Tensor, weight: Optional[Tensor],
                                 bias: Optional[Tensor], gate: MembaGateParams,
                                 kernels=None) -> str:
    """'fused' or 'per-op' for these inputs (logged once per run)."""
    return choose('Memba gate', (
        ('fused', lambda: memba_norm_silu_gate_fused_reason(y, z, weight, bias, gate, kernels)),
        ('per-op', None)))


def memba_norm_silu_gate(y: Tensor, z: Tensor, weight: Optional[Tensor],
                         bias: Optional[Tensor], eps: float, w_in: Tensor, w_out: Tensor,
                         gate: MembaGateParams, membrane: Membrane = None, kernels=None
                         ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """``norm_silu_gate`` with z corrected by both directions' LIMs.

    w_in (2R, D): W_in of direction 0, then of direction 1; w_out (D, 2R) likewise; ``gate``:
    the LIM settings and whether z' keeps z; ``membrane``: the previous layer's pair of
    (B, L // T, R) membranes (None: zeros). Returns (the product in z's dtype, the new pair
    of membranes). ``kernels``: a stand-in for the CUDA extension (the tests' CPU reference).
    """
    if memba_norm_silu_gate_backend(y, z, weight, bias, gate, kernels) == 'fused':
        return memba_norm_silu_gate_fused(y, z, weight, bias, eps, w_in, w_out, gate, membrane,
                                          kernels)
    return memba_norm_silu_gate_per_op(y, z, weight, bias, eps, w_in, w_out, gate, membrane)
