"""CUDA-graph replay of a module's forward and backward, one graph per input signature.

A Mamba backbone launches a few thousand small kernels per training step; eager
PyTorch spends more host time issuing them than the GPU spends running them.
``CUDAGraphs`` captures the forward (and, with autograd on, the backward) once
per input signature and replays them, so a step costs a handful of launches.

The signature is (shape, dtype, device, training mode, grad enabled, autocast
state). Capture happens on the first call with a new signature: two warm-up
passes on a side stream (``torch.autograd.grad``, so no ``.grad`` is touched and
no optimiser state changes), then the capture itself. Gradients reach the
trainable parameters through an autograd function, so optimisers, gradient
clipping and gradient accumulation see ordinary ``.grad`` tensors.

Rules a graphed forward must follow, which the backbones here do: no host
synchronisation, no data-dependent Python control flow, and parameters updated
in place (optimisers and ``load_state_dict`` do that). Each forward of a
signature must be followed by its backward before the next forward of that
signature, since the saved activations live in the graph's memory. Random ops (dropout, drop
path) draw fresh numbers on every replay. Graphs hold their own memory pool, so
each signature keeps one set of activations alive; ``reset()`` frees them, and
must be called after changing which parameters require a gradient. Moving the
module (``.to``, ``.cuda``) resets them automatically (see
``MambaBackbone._apply``).
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..utils import persistent_stream

__all__ = ['CUDAGraphs']

_WARMUP = 2


def _autocast_state() -> Tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled('cuda'), torch.get_autocast_dtype('cuda')


class _Captured:
    """One signature's graphs: static input, outputs and (training) parameter gradients."""

    def __init__(self, fn: Callable[[Tensor], Tuple[Tensor, ...]], x: Tensor,
                 params: Sequence[nn.Parameter], with_backward: bool):
        amp_on, amp_dtype = _autocast_state()

        def run(inp):  # casts are redone inside the graph, never served from autocast's cache
            with torch.autocast('cuda', dtype=amp_dtype, enabled=amp_on, cache_enabled=False):
                return tuple(fn(inp))

        self.params = list(params) if with_backward else []
        self.static_x = x.detach().clone()
        # one stream for every capture on this device (see persistent_stream)
        side = persistent_stream('cuda_graph_warmup')
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(_WARMUP):
                outs = run(self.static_x)
                if self.params:
                    torch.autograd.grad(outs, self.params, [torch.ones_like(o) for o in outs],
                                        allow_unused=True)
                del outs
        torch.cuda.current_stream().wait_stream(side)

        pool = torch.cuda.graph_pool_handle()
        self.fwd = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.fwd, pool=pool, capture_error_mode='thread_local'):
            self.static_outs = run(self.static_x)
        self.bwd = None
        if self.params:
            self.static_gouts = tuple(torch.zeros_like(o) for o in self.static_outs)
            self.bwd = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.bwd, pool=pool, capture_error_mode='thread_local'):
                grads = torch.autograd.grad(self.static_outs, self.params, self.static_gouts,
                                            allow_unused=True)
                self.used = [g is not None for g in grads]
                # one flat buffer: a step hands out views of a single copy of it
                self.static_flat = torch.cat([g.reshape(-1) for g in grads if g is not None])
            self.sizes = [p.numel() for p, u in zip(self.params, self.used) if u]
            self.static_outs = tuple(o.detach() for o in self.static_outs)

    def replay_forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """Copies ``x`` in, replays the forward; returns copies of the outputs."""
        self.static_x.copy_(x)
        self.fwd.replay()
        return tuple(o.clone() for o in self.static_outs)


class _Replay(torch.autograd.Function):

    @staticmethod
    def forward(ctx, captured: _Captured, x: Tensor, *params: Tensor):
        ctx.captured = captured
        return captured.replay_forward(x)

    @staticmethod
    def backward(ctx, *gouts):
        c = ctx.captured
        for static, g in zip(c.static_gouts, gouts):
            if g is None:
                static.zero_()
            else:
                static.copy_(g)
        c.bwd.replay()
        flat = c.static_flat.clone()  # a fresh buffer, so .grad never aliases graph memory
        views = iter(torch.split_with_sizes(flat, c.sizes))
        grads = [next(views).view_as(p) if u else None for p, u in zip(c.params, c.used)]
        return (None, None, *grads)


class CUDAGraphs:
    """Captures and replays ``fn(x) -> tuple of tensors`` per input signature.

    ``graphs(module, fn, x)``: ``module`` owns the parameters ``fn`` uses (its
    trainable ones get gradients); ``fn`` is the eager forward, x (B, ...) ->
    tuple of tensors. The object holds no reference to the module, and copies
    (``copy.deepcopy``, pickling) start without graphs.
    """

    def __init__(self):
        self.graphs: Dict[tuple, _Captured] = {}

    def reset(self) -> None:
        self.graphs.clear()

    def __deepcopy__(self, memo):
        return CUDAGraphs()

    def __getstate__(self):
        return {'graphs': {}}

    def __call__(self, module: nn.Module, fn: Callable[[Tensor], Tuple[Tensor, ...]],
                 x: Tensor) -> Tuple[Tensor, ...]:
        key = (tuple(x.shape), x.dtype, x.device, module.training, torch.is_grad_enabled(),
               _autocast_state())
        captured: Optional[_Captured] = self.graphs.get(key)
        if captured is None:
            params: List[nn.Parameter] = [p for p in module.parameters() if p.requires_grad]
            with_backward = torch.is_grad_enabled() and bool(params)
            captured = self.graphs[key] = _Captured(fn, x, params, with_backward)
        if captured.bwd is None:
            return captured.replay_forward(x)
        return _Replay.apply(captured, x, *captured.params)
