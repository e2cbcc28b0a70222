"""Checkpoint snapshots taken in one batch, and written to disk behind the training loop.

``host_snapshot`` copies a checkpoint's tensors to the host with every GPU copy queued before
a single wait (mmengine copies them one by one, each copy a wait of its own: 1,065 tensors for
a VMamba-S Memba checkpoint with its optimizer state). ``BackgroundWriter`` runs the file's
pickling, writing and renaming on a thread while training goes on, one checkpoint at a time.
"""
import logging
import threading
from collections import OrderedDict
from typing import Any, Callable, List, Optional, Tuple

import torch
from mmengine.logging import print_log

__all__ = ['host_snapshot', 'BackgroundWriter']


def host_snapshot(obj: Any) -> Tuple[Any, Callable[[], None]]:
    """(a copy of ``obj`` whose tensors are host copies, a function that waits until the
    copies are complete).

    ``obj`` nests dicts (their type and a state dict's ``_metadata`` are kept), lists and
    tuples; other values are shared, not copied. GPU tensors are copied into pinned memory on
    their current stream, so the copies read the values of this moment even when the stream
    goes on to update them; CPU tensors are cloned (an optimizer updates its step counters in
    place).
    """
    streams: List[torch.cuda.Stream] = []

    def copy(x):
        if isinstance(x, torch.Tensor):
            x = x.detach()
            if not x.is_cuda:
                return x.clone()
            out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            out.copy_(x, non_blocking=True)
            stream = torch.cuda.current_stream(x.device)
            if stream not in streams:
                streams.append(stream)
            return out
        if isinstance(x, dict):
            out = (OrderedDict if isinstance(x, OrderedDict) else dict)(
                (k, copy(v)) for k, v in x.items())
            if hasattr(x, '_metadata'):
                out._metadata = x._metadata
            return out
        if isinstance(x, list):
            return [copy(v) for v in x]
        if isinstance(x, tuple):
            items = [copy(v) for v in x]
            return type(x)(*items) if hasattr(x, '_fields') else type(x)(items)
        return x

    snapshot = copy(obj)
    events = []
    for stream in streams:
        events.append(torch.cuda.Event())
        events[-1].record(stream)

    def wait():
        for event in events:
            event.synchronize()

    return snapshot, wait


class BackgroundWriter:
    """Runs one job at a time on a thread of its own. ``submit`` first waits for the job before
    it, and a job's exception is raised by the next ``submit`` or ``wait``. The thread is not a
    daemon: a process that ends (also by an exception) first finishes the job in flight."""

    def __init__(self):
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def submit(self, job: Callable[[], None], name: str = 'job') -> None:
        self.wait()

        def run():
            try:
                job()
            except BaseException as e:  # handed to the training thread by wait()
                self._error = e
                print_log(f'{name} failed: {type(e).__name__}: {e}', logger='current',
                          level=logging.ERROR)

        self._thread = threading.Thread(target=run, name=f'memba_vision {name}')
        self._thread.start()

    def wait(self) -> None:
        """Returns when no job is in flight; raises the last job's exception, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
