"""Ops with a fast CUDA path and a pure-PyTorch reference of identical numerics."""
from .bidirectional_ssm import MembaGateParams, SSMDirection, bidirectional_ssm
from .causal_conv1d import causal_conv1d, causal_conv1d_reference, causal_conv1d_tokens
from .lim import (available_lim_backends, lim, lim_backend, lim_reference,
                  register_lim_backend)
from .selective_scan import (scan_backend, selective_scan, selective_scan_reference,
                             selective_scan_tokens)
from . import lim_backends  # noqa: F401  registers the fused LIM backends (lazy, CPU-safe)

__all__ = [
    'selective_scan', 'selective_scan_reference', 'selective_scan_tokens', 'scan_backend',
    'causal_conv1d', 'causal_conv1d_reference', 'causal_conv1d_tokens',
    'lim', 'lim_reference', 'lim_backend', 'available_lim_backends', 'register_lim_backend',
    'bidirectional_ssm', 'SSMDirection', 'MembaGateParams',
]
