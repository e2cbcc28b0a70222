"""Backend choice for every op: the one environment override, lazy imports, per-run logs.

Each op (``ops.scan``, ``ops.lim``, the fused ``ops.bidirectional_ssm``) lists its
backends fastest first, each with why it does not apply to the inputs at hand,
and ``choose`` takes the first that applies. ``MEMBA_BACKEND=reference`` forces
the PyTorch references everywhere (debugging, parity tests). Which backend an op
ran is logged once per run; ``reset_backend_log`` starts a new run (a served
process runs many). Nothing here imports a CUDA package at module import.
"""
import functools
import importlib
import os
from typing import Callable, Optional, Sequence, Tuple

__all__ = ['ENV', 'reference_forced', 'choose', 'log_once', 'reset_backend_log', 'try_import',
           'extension', 'cuda_unavailable']

ENV = 'MEMBA_BACKEND'
_logged = set()


def reference_forced() -> bool:
    """True when ``MEMBA_BACKEND=reference``; ValueError for any other non-empty value."""
    value = os.environ.get(ENV, '').strip().lower()
    if value not in ('', 'reference'):
        raise ValueError(f'{ENV} must be unset or reference, got {value!r}')
    return value == 'reference'


def choose(op: str, candidates: Sequence[Tuple[str, Optional[Callable[[], str]]]]) -> str:
    """The first of ``candidates`` that applies, logged once per run.

    ``candidates``: (name, a callable returning '' or why it does not apply), fastest
    first; the last one, ``('reference', None)``, always applies.
    """
    if reference_forced():
        name, skipped = 'reference', [f'{ENV}=reference']
    else:
        skipped = []
        for name, why_not in candidates:
            why = why_not() if why_not is not None else ''
            if not why:
                break
            skipped.append(f'{name}: {why}')
    log_once(f'{op}:{name}', f'memba_vision.ops: {op} runs on {name}'
                             + (f' ({"; ".join(skipped)})' if skipped else ''))
    return name


def log_once(key: str, msg: str) -> None:
    """Logs ``msg`` through mmengine's current logger the first time ``key`` is seen this run."""
    if key in _logged:
        return
    _logged.add(key)
    from mmengine.logging import print_log
    print_log(msg, logger='current')


def reset_backend_log() -> None:
    """Forgets what was logged: the next run logs its backends again."""
    _logged.clear()


def try_import(module: str, name: Optional[str] = None,
               label: Optional[str] = None) -> Tuple[Optional[object], str]:
    """(the module, or its attribute ``name``, '') or (None, why it cannot be imported).

    ``label`` names it in the reason. A built extension fails here too when it was
    built against another torch or CUDA.
    """
    try:
        found = importlib.import_module(module)
        return (getattr(found, name) if name else found), ''
    except Exception as e:  # ImportError, or a CUDA build that fails to load
        return None, f'{label or module} unavailable: {type(e).__name__}: {e}'.split('\n')[0]


@functools.lru_cache(maxsize=None)
def extension(module: str) -> Tuple[Optional[object], str]:
    """(the compiled extension ``module``, '') or (None, why not); imported once, on first use."""
    return try_import(module)


def cuda_unavailable(t, load: Callable[[], Tuple[Optional[object], str]]) -> str:
    """'' when a CUDA kernel can run on tensors like ``t``, else why not. ``load()``
    returns (the kernel's module or op, '') or (None, why not); it runs for CUDA ``t`` only."""
    if not t.is_cuda:
        return 'tensors are on the CPU'
    return load()[1]
