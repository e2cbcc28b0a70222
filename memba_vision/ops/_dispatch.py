"""Lazy access to optional CUDA kernels (mamba-ssm, causal-conv1d) and one-time logs.

Nothing here imports a CUDA package at module import: the first CUDA call tries
the import once and remembers the outcome.
"""
import functools
from typing import Callable, Optional, Tuple

_logged = set()


def log_once(key: str, msg: str) -> None:
    """Logs ``msg`` through mmengine's current logger the first time ``key`` is seen."""
    if key in _logged:
        return
    _logged.add(key)
    from mmengine.logging import print_log
    print_log(msg, logger='current')


@functools.lru_cache(maxsize=None)
def mamba_ssm_scan_fn() -> Tuple[Optional[Callable], str]:
    """(mamba_ssm's selective_scan_fn, '') or (None, why it is unusable)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as e:  # ImportError, or a CUDA build that fails to load
        return None, f'mamba-ssm unavailable: {type(e).__name__}: {e}'.split('\n')[0]
    return selective_scan_fn, ''


@functools.lru_cache(maxsize=None)
def triton_scan_fn() -> Tuple[Optional[Callable], str]:
    """(memba_vision's Triton selective scan, '') or (None, why it is unusable)."""
    try:
        from .selective_scan_triton import selective_scan_triton
    except Exception as e:
        return None, f'triton unavailable: {type(e).__name__}: {e}'.split('\n')[0]
    return selective_scan_triton, ''


@functools.lru_cache(maxsize=None)
def causal_conv1d_cuda_fn() -> Tuple[Optional[Callable], str]:
    """(causal_conv1d_fn, '') or (None, why it is unusable)."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception as e:
        return None, f'causal-conv1d unavailable: {type(e).__name__}: {e}'.split('\n')[0]
    return causal_conv1d_fn, ''
