"""Ops, one package each (its reference, its fast paths, its choice between them), and
``dispatch``, which chooses for all of them (``MEMBA_BACKEND=reference`` forces the
references; which backend ran is logged once per run)."""
from .bidirectional_ssm import MembaGateParams, SSMDirection, bidirectional_ssm
from .conv import causal_conv1d_reference, causal_conv1d_tokens
from .cross_scan import cross_scan
from .depthwise_conv2d import depthwise_conv2d_silu
from .dispatch import reset_backend_log
from .layer_norm import layer_norm_in_dtype
from .lim import lim, lim_backend, lim_reference
from .scan import scan_backend, selective_scan, selective_scan_reference, selective_scan_tokens
from .silu_gate import memba_norm_silu_gate, norm_silu_gate, silu_gate, silu_gate_reference

__all__ = [
    'selective_scan', 'selective_scan_reference', 'selective_scan_tokens', 'scan_backend',
    'causal_conv1d_reference', 'causal_conv1d_tokens', 'cross_scan', 'depthwise_conv2d_silu',
    'lim', 'lim_reference', 'lim_backend',
    'bidirectional_ssm', 'SSMDirection', 'MembaGateParams', 'silu_gate', 'silu_gate_reference',
    'norm_silu_gate', 'memba_norm_silu_gate', 'layer_norm_in_dtype',
    'reset_backend_log',
]
