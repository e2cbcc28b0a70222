"""Safe checkpoint loading: ``torch.load(weights_only=True)`` plus an allow-list.

``torch.load`` defaults to ``weights_only=True`` since PyTorch 2.6, which rejects
the few non-tensor objects that training checkpoints carry: mmengine's message
hub (HistoryBuffer with numpy arrays and scalars, and ``getattr`` for its
statistics methods, served by a restricted stand-in), the ``args`` Namespace of
DeiT-style checkpoints (Vim) and the yacs config of Swin-style ones (VMamba).
``load_checkpoint_file`` allow-lists exactly those, for its own load only
(``torch.serialization.safe_globals``; nothing is registered process-wide), and
turns a bad file into a ``CheckpointError`` whose one-line message names the file
and what is wrong with it. yacs is not a dependency: its ``CfgNode`` is mapped onto
an inert dict stand-in.
"""
import argparse
import contextlib
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch

__all__ = ['CheckpointError', 'safe_loading', 'load_checkpoint_file', 'extract_state_dict',
           'OpaqueConfig']


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing or cannot be loaded; the message is one line."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    pass


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


def _safe_globals() -> list:
    """What mmengine, DeiT-style and Swin-style checkpoints hold besides tensors."""
    from mmengine.logging.history_buffer import HistoryBuffer
    safe = [HistoryBuffer, argparse.Namespace, (OpaqueConfig, 'yacs.config.CfgNode'),
            (_history_buffer_getattr, 'builtins.getattr')]
    return safe + _numpy_globals()


@contextlib.contextmanager
def safe_loading() -> Iterator[None]:
    """Within this block, ``torch.load(weights_only=True)`` also accepts the allow-list."""
    with torch.serialization.safe_globals(_safe_globals()):
        yield


_ZIP_MAGIC = b'PK\x03\x04'
_PICKLE_PROTO = b'\x80'  # what the legacy (non-zip) torch.save format starts with


def _describe_failure(path: str, error: BaseException) -> str:
    """What is wrong with ``path``, from the file itself and the unpickler's error; never
    torch's advice to load it with ``weights_only=False``."""
    with open(path, 'rb') as f:
        head = f.read(4)
    if not head:
        return f'checkpoint {path} is empty (0 bytes)'
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO)):
        return f'{path} is not a PyTorch checkpoint (it starts with {head!r})'
    causes, e = [], error
    while e is not None and len(causes) < 4:
        causes.append(str(e))
        e = e.__cause__ or e.__context__
    text = '\n'.join(causes)
    found = re.search(r'GLOBAL ([\w.]+)', text)
    if found:
        return (f'checkpoint {path} refused: it references {found.group(1)}, which a '
                f'checkpoint never needs')
    refused = re.search(r'checkpoint asks for (getattr\(.*?\)); refused', text)
    if refused:
        return (f'checkpoint {path} refused: it asks for {refused.group(1)}, which a '
                f'checkpoint never needs')
    if head.startswith(_ZIP_MAGIC) and not zipfile.is_zipfile(path):
        return f'checkpoint {path} is truncated (its zip archive has no central directory)'
    if isinstance(error, EOFError) or re.search(r'unexpected EOF|Ran out of input|'
                                                r'truncated|CRC', text):
        return f'checkpoint {path} is truncated or corrupted (it ends too early)'
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and
             'weights_only' not in ln and 'torch.load' not in ln]
    why = lines[0] if lines else type(error).__name__
    return f'checkpoint {path} cannot be loaded: {why}'


def load_checkpoint_file(path: str, map_location: Any = 'cpu') -> Dict[str, Any]:
    """Loads a checkpoint with ``weights_only=True`` and the allow-list (for this load only).

    Raises ``CheckpointError`` (one line naming the file) for a missing file, one that
    is not a PyTorch checkpoint, a truncated one, or one that references anything beyond
    tensors and the allow-list (its code is never run).
    """
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f'checkpoint file not found: {path}')
    try:
        with safe_loading():
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (described from the file; the line says it all)
        raise CheckpointError(_describe_failure(path, e)) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{path} holds a {type(ckpt).__name__}, not a checkpoint dict')
    return ckpt


def extract_state_dict(ckpt: Dict[str, Any], path: str = '<checkpoint>',
                       key: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint, with 'module.'/'backbone.' prefixes removed.

    ``key`` picks a sub-dict ('model', 'model_ema', 'state_dict'); by default the
    first of 'state_dict', 'model', 'module' present, else the dict itself.
    """
    if key is not None:
        if key not in ckpt:
            raise CheckpointError(f'{path} has no {key!r} entry (top-level keys: '
                                  f'{sorted(ckpt)[:10]})')
        sd = ckpt[key]
    else:
        sd = next((ckpt[k] for k in ('state_dict', 'model', 'module') if k in ckpt), ckpt)
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f'{path}: no state dict found')
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    sd = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in sd.items()}
    if any(k.startswith('backbone.') for k in sd):  # a whole mmpretrain classifier
        sd = {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}
    return sd
