"""Lazy access to optional kernels (mamba-ssm, causal-conv1d, the Triton scan), backend
environment variables and once-per-run logs.

Nothing here imports a CUDA package or triton at module import: the first CUDA call tries
the import once and remembers the outcome.
"""
import functools
import importlib
import os
from typing import Callable, Optional, Tuple

_logged = set()  # (run, key) pairs


def log_once(key: str, msg: str) -> None:
    """Logs ``msg`` through mmengine's current logger the first time ``key`` is seen in the
    current run (the logger's instance: one per run, also when a ``--serve`` process runs
    many)."""
    from mmengine.logging import MMLogger, print_log
    run_key = (MMLogger.get_current_instance().instance_name, key)
    if run_key in _logged:
        return
    _logged.add(run_key)
    print_log(msg, logger='current')


def _import_fn(module: str, name: str, label: str) -> Tuple[Optional[Callable], str]:
    """(``module.name``, '') or (None, why it cannot be imported)."""
    try:
        return getattr(importlib.import_module(module, __package__), name), ''
    except Exception as e:  # ImportError, or a CUDA build that fails to load
        return None, f'{label} unavailable: {type(e).__name__}: {e}'.split('\n')[0]


def forced_backend(env: str, choices: Tuple[str, ...]) -> str:
    """The backend the environment variable ``env`` forces ('' for none), one of ``choices``."""
    forced = os.environ.get(env, '').strip().lower()
    if forced not in ('',) + choices:
        allowed = ', '.join(choices[:-1]) + ' or ' + choices[-1]
        raise ValueError(f'{env} must be {allowed}, got {forced!r}')
    return forced


def load_extension(name: str) -> Tuple[Optional[object], str]:
    """(the extension module ``memba_vision.<name>``, '') or (None, why it cannot be imported:
    not built, or built against another torch/CUDA)."""
    try:
        return importlib.import_module(f'memba_vision.{name}'), ''
    except Exception as e:
        return None, f'memba_vision.{name} unavailable: {type(e).__name__}: {e}'.split('\n')[0]


def require_loaded(loaded: Tuple[Optional[object], str]):
    """The thing a ``(thing, why not)`` pair holds; RuntimeError with the reason when empty."""
    thing, why = loaded
    if thing is None:
        raise RuntimeError(why)
    return thing


def extension_unavailable(loaded: Tuple[Optional[object], str]) -> str:
    """'' when a CUDA device is visible and ``loaded`` (a ``(thing, why not)`` pair) holds
    something, else why not."""
    import torch
    if not torch.cuda.is_available():
        return 'no CUDA device'
    return loaded[1]


@functools.lru_cache(maxsize=None)
def mamba_ssm_scan_fn() -> Tuple[Optional[Callable], str]:
    """(mamba_ssm's selective_scan_fn, '') or (None, why it is unusable)."""
    return _import_fn('mamba_ssm.ops.selective_scan_interface', 'selective_scan_fn', 'mamba-ssm')


@functools.lru_cache(maxsize=None)
def triton_scan_fn() -> Tuple[Optional[Callable], str]:
    """(memba_vision's Triton selective scan, '') or (None, why it is unusable)."""
    return _import_fn('.selective_scan_triton', 'selective_scan_triton', 'triton')


@functools.lru_cache(maxsize=None)
def causal_conv1d_cuda_fn() -> Tuple[Optional[Callable], str]:
    """(causal_conv1d_fn, '') or (None, why it is unusable)."""
    return _import_fn('causal_conv1d', 'causal_conv1d_fn', 'causal-conv1d')
