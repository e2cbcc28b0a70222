"""mamba-ssm's ``selective_scan_fn``: the GPU scan for what memba_vision's kernels do not
cover yet (VMamba's (b, d, l) scan, and scans whose A, D or delta_bias train).

Interim: a later change replaces it with memba_vision's own kernels. mamba_ssm is
imported on first use, never at module import.
"""
import functools
from typing import Callable, Optional, Tuple

from torch import Tensor

from ..dispatch import try_import

__all__ = ['load', 'unavailable_reason', 'selective_scan_mamba_ssm']


@functools.lru_cache(maxsize=None)
def load() -> Tuple[Optional[Callable], str]:
    """(mamba_ssm's selective_scan_fn, '') or (None, why it cannot be imported)."""
    return try_import('mamba_ssm.ops.selective_scan_interface', 'selective_scan_fn', 'mamba-ssm')


def unavailable_reason(u: Tensor) -> str:
    """'' when mamba-ssm can scan tensors like ``u``, else why not."""
    return 'tensors are on the CPU' if not u.is_cuda else load()[1]


def selective_scan_mamba_ssm(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> Tensor:
    """``ops.selective_scan`` on mamba-ssm's kernel (the gate z fused into it)."""
    dt = u.dtype
    # The kernel wants u, delta, B, C and z in one dtype and A, D, bias in fp32.
    return load()[0](u, delta.to(dt), A.float(), B.to(dt), C.to(dt),
                     None if D is None else D.float(), None if z is None else z.to(dt),
                     None if delta_bias is None else delta_bias.float(), delta_softplus)
