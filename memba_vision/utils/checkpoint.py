"""Safe checkpoint loading: ``torch.load(weights_only=True)`` plus an allow-list.

``torch.load`` defaults to ``weights_only=True`` since PyTorch 2.6, which rejects
the few non-tensor objects that training checkpoints carry: mmengine's message
hub (HistoryBuffer with numpy arrays and scalars, and ``getattr`` for its
statistics methods, served by a restricted stand-in), the ``args`` Namespace of
DeiT-style checkpoints (Vim) and the yacs config of Swin-style ones (VMamba).
``register_safe_globals`` allow-lists exactly those types so mmengine's own
``--resume`` and our loaders keep ``weights_only=True``. yacs is not a
dependency: its ``CfgNode`` is mapped onto an inert dict stand-in.
"""
import argparse
import os
import pickle
from collections import OrderedDict
from typing import Any, Dict, Optional

import numpy as np
import torch

__all__ = ['register_safe_globals', 'load_checkpoint_file', 'OpaqueConfig']


class OpaqueConfig:
    """Inert stand-in for config objects pickled into checkpoints (yacs CfgNode).

    Unpickling one yields a plain OrderedDict of the config's items, which the
    weights-only unpickler can fill without running any foreign code.
    """

    def __new__(cls, *args, **kwargs):
        return OrderedDict()


def _numpy_globals():
    """The numpy callables/types that pickled arrays and scalars refer to."""
    found = [np.ndarray, np.dtype]
    for mod_name in ('numpy._core.multiarray', 'numpy.core.multiarray'):
        try:
            mod = __import__(mod_name, fromlist=['_reconstruct', 'scalar'])
        except ImportError:
            continue
        for name in ('_reconstruct', 'scalar'):
            fn = getattr(mod, name, None)
            if fn is not None:
                found.append((fn, f'{mod_name}.{name}'))
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:  # numpy >= 1.25: one class per dtype
        found += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith('DType')]
    return found


def _history_buffer_getattr(obj, name):
    """``getattr`` as mmengine checkpoints use it, and nothing more.

    A pickled HistoryBuffer refers to its statistics methods as
    ``getattr(HistoryBuffer, 'min')``; any other use is refused.
    """
    from mmengine.logging.history_buffer import HistoryBuffer
    registered = {'min', 'max', 'mean', 'current', *HistoryBuffer._statistics_methods}
    if obj is HistoryBuffer and name in registered:
        return getattr(obj, name)
    raise pickle.UnpicklingError(
        f'checkpoint asks for getattr({type(obj).__name__}, {name!r}); refused')


_registered = False


def register_safe_globals() -> None:
    """Allow-lists what mmengine, DeiT-style and Swin-style checkpoints hold."""
    global _registered
    if _registered:
        return
    from mmengine.logging.history_buffer import HistoryBuffer
    safe = [HistoryBuffer, argparse.Namespace, (OpaqueConfig, 'yacs.config.CfgNode'),
            (_history_buffer_getattr, 'builtins.getattr')]
    safe += _numpy_globals()
    torch.serialization.add_safe_globals(safe)
    _registered = True


def load_checkpoint_file(path: str, map_location: Any = 'cpu') -> Dict[str, Any]:
    """Loads a checkpoint with ``weights_only=True``; clear errors for bad files."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    register_safe_globals()
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling of disallowed globals, truncated files, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f'cannot load checkpoint {path} safely (weights_only=True): '
                           f'{first}') from e
    if not isinstance(ckpt, dict):
        raise TypeError(f'{path} holds a {type(ckpt).__name__}, not a checkpoint dict')
    return ckpt


def extract_state_dict(ckpt: Dict[str, Any], path: str = '<checkpoint>',
                       key: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint, with 'module.'/'backbone.' prefixes removed.

    ``key`` picks a sub-dict ('model', 'model_ema', 'state_dict'); by default the
    first of 'state_dict', 'model', 'module' present, else the dict itself.
    """
    if key is not None:
        if key not in ckpt:
            raise KeyError(f'{path} has no {key!r} entry (top-level keys: {sorted(ckpt)[:10]})')
        sd = ckpt[key]
    else:
        sd = next((ckpt[k] for k in ('state_dict', 'model', 'module') if k in ckpt), ckpt)
    if not isinstance(sd, dict) or not sd:
        raise TypeError(f'{path}: no state dict found')
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    sd = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in sd.items()}
    if any(k.startswith('backbone.') for k in sd):  # a whole mmpretrain classifier
        sd = {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}
    return sd
