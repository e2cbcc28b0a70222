"""Strict loading of official backbone checkpoints into our backbones.

Every backbone parameter must come from the file: missing backbone keys (PEFT
keys excepted), unexpected keys and shape mismatches are errors that list the
first offenders. The classifier head of the file is dropped by the backbone's
``convert`` function.
"""
import os
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
from mmengine.logging import print_log

from ...utils.checkpoint import CheckpointNotFoundError, extract_state_dict, load_checkpoint_file
from ..peft import is_peft_param

__all__ = ['load_pretrained', 'PretrainedNotFoundError']


class PretrainedNotFoundError(CheckpointNotFoundError):
    pass


def _first(keys: List[str], n: int = 8) -> str:
    shown = ', '.join(keys[:n])
    return shown + (f', ... ({len(keys)} in all)' if len(keys) > n else '')


def _target_key(model: nn.Module, key: str, model_keys: set) -> Optional[str]:
    """The model key a checkpoint key loads into (a plain layer's keys into its PEFT wrapper)."""
    if key in model_keys:
        return key
    path, _, name = key.rpartition('.')
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    if name not in ('weight', 'bias'):
        return None
    while hasattr(module, 'original_layer'):  # PEFT wrappers (LoRA, adapter) of a plain layer
        module, path = module.original_layer, f'{path}.original_layer'
    target = f'{path}.{name}'
    return target if target in model_keys else None


def load_pretrained(model: nn.Module, path: str,
                    convert: Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]],
                    checkpoint_key: Optional[str] = None, download_hint: str = '') -> None:
    """Loads an official checkpoint file into ``model``; raises on any mismatch.

    Args:
        model: the backbone.
        path: checkpoint file (``torch.load`` with ``weights_only=True``).
        convert: maps the file's key names onto the backbone's and drops its head.
        checkpoint_key: entry of the file holding the weights ('model', 'model_ema',
            'state_dict'); default: the first of state_dict/model/module present.
        download_hint: appended to the error when the file is missing.
    """
    if not os.path.isfile(path):
        raise PretrainedNotFoundError(
            f'pretrained checkpoint {path} not found{": " + download_hint if download_hint else ""}')
    state = extract_state_dict(load_checkpoint_file(path), path, checkpoint_key)
    state = convert(dict(state))
    model_state = model.state_dict()
    model_keys = set(model_state)
    targets = {k: _target_key(model, k, model_keys) for k in state}
    unexpected = sorted(k for k, t in targets.items() if t is None)
    covered = {t for t in targets.values() if t is not None}
    missing = sorted(k for k in model_keys - covered if not is_peft_param(k))
    name = type(model).__name__
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f'{len(missing)} backbone keys missing from the file (first: {_first(missing)})')
        if unexpected:
            parts.append(f'{len(unexpected)} unexpected keys (first: {_first(unexpected)})')
        raise KeyError(f'{path} does not match {name}: ' + '; '.join(parts))
    mismatched = [f'{k} {tuple(v.shape)} vs {tuple(model_state[targets[k]].shape)}'
                  for k, v in state.items() if v.shape != model_state[targets[k]].shape]
    if mismatched:
        raise ValueError(f'{path} does not match {name}: shape mismatch for '
                         f'{_first(mismatched, 4)}')
    model.load_state_dict(state, strict=False)
    print_log(f'{name}: loaded {len(state)} tensors from {path}, 0 missing, 0 unexpected',
              logger='current')
