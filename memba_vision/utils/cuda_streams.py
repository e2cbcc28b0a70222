"""CUDA side streams kept for the life of the process, one per purpose and device."""
from typing import Dict, Optional, Tuple

import torch

__all__ = ['persistent_stream']

_streams: Dict[Tuple[str, int], torch.cuda.Stream] = {}


def persistent_stream(purpose: str, device: Optional[torch.device] = None) -> torch.cuda.Stream:
    """The one stream for ``purpose`` on ``device`` (default: the current CUDA device).

    cuBLAS keeps a workspace (32 MiB on Hopper) for every stream it has run on, for
    the life of the process, so side work reuses one stream per purpose instead of
    creating new ones.
    """
    index = None if device is None else torch.device(device).index
    if index is None:
        index = torch.cuda.current_device()
    stream = _streams.get((purpose, index))
    if stream is None:
        stream = _streams[(purpose, index)] = torch.cuda.Stream(index)
    return stream
