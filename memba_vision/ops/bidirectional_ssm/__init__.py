"""Vim's bidirectional SSM core with the Memba gate as one autograd node (see ``node``)."""
from .node import (CONV_WIDTH, D_STATE, GATE_RANK, MembaGateParams, SSMDirection,
                   bidirectional_ssm, bidirectional_ssm_reason, scan_extension)

__all__ = ['SSMDirection', 'MembaGateParams', 'bidirectional_ssm', 'bidirectional_ssm_reason',
           'scan_extension', 'D_STATE', 'GATE_RANK', 'CONV_WIDTH']
