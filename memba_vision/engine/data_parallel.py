"""Data-parallel training whose gradients are averaged after the backward, not inside it."""
from typing import Dict, List, Union

import torch
import torch.distributed as dist
from mmengine.logging import print_log
from mmengine.optim import OptimWrapper
from mmpretrain.registry import MODEL_WRAPPERS
from torch import Tensor, nn

__all__ = ['PostBackwardDataParallel']


def _by_dtype(tensors: List[Tensor]) -> Dict[tuple, List[int]]:
    """Indices of ``tensors`` grouped by (dtype, device), in first-seen order."""
    groups: Dict[tuple, List[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return groups


@MODEL_WRAPPERS.register_module()
class PostBackwardDataParallel(nn.Module):
    """Data-parallel training with one all-reduce of the gradients after each backward.

    ``DistributedDataParallel`` averages gradients from inside the backward: its
    reducer hooks every parameter's gradient accumulator, copies gradients into
    buckets and launches all-reduces on NCCL's stream while autograd runs, and
    queues an end-of-backward callback into the autograd engine. The backbones
    capture their backward into a CUDA graph from inside the forward
    (``models.cuda_graph``); under DDP that capture failed on two GPUs ("operation
    would make the legacy stream depend on a capturing blocking stream"). This
    wrapper registers no hook on the module and does no communication while
    autograd runs, so a captured or replayed backward is the same as on one GPU.

    A training step is ``OptimWrapper.update_params`` with one collective in the
    middle: forward, ``backward`` of the scaled loss, and, on the steps where the
    optimiser updates (``should_update``, gradient accumulation), the gradients
    of the trainable parameters averaged over the ranks as one flat buffer per
    dtype (a single ``all_reduce`` in the usual all-fp32 case), then ``step``
    (clipping sees the averaged gradients) and ``zero_grad``. Each rank's loss
    is the mean over its batch, so with equal batches the average is the
    gradient of the mean loss over all ranks' samples, as with DDP. A parameter
    without a gradient on a rank (not used by its batch) takes part as zeros; it
    gets the average if another rank used it, and stays without a gradient when
    no rank did, as it would in one process.

    Parameters and buffers are broadcast from rank 0 before the first training
    step (after the runner has initialised or loaded the weights; integer buffers
    are left alone); buffers are not synchronised afterwards (mmengine's default
    DDP setting). Testing and
    validation run the module on each rank's part of the data.

    Set it with ``model_wrapper_cfg = dict(type='mmpretrain.PostBackwardDataParallel')``
    (the ``mmpretrain.`` prefix because the runner looks the type up in
    mmengine's root registry); the runner builds it only for distributed runs.

    Args:
        module: the model (a ``BaseModel``).
        process_group: the group to average over (default: the world).
    """

    def __init__(self, module: nn.Module, process_group=None):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError('PostBackwardDataParallel needs an initialised process group')
        self.module = module
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self._synced = False
        print_log(f'PostBackwardDataParallel: gradients are averaged over {self.world_size} '
                  f'processes after each backward (no DDP hooks; CUDA graphs stay on)',
                  logger='current')

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def broadcast_state(self) -> None:
        """Copies rank 0's parameters and buffers into every rank's module (in place)."""
        tensors = [t.data for t in list(self.module.parameters()) + list(self.module.buffers())
                   if t.is_floating_point()]
        src = dist.get_global_rank(self.process_group, 0) if self.process_group else 0
        for idx in _by_dtype(tensors).values():
            flat = torch.cat([tensors[i].reshape(-1) for i in idx])
            dist.broadcast(flat, src, group=self.process_group)
            for i, part in zip(idx, flat.split([tensors[i].numel() for i in idx])):
                tensors[i].copy_(part.view_as(tensors[i]))
        self._synced = True

    def average_gradients(self) -> None:
        """Averages the trainable parameters' gradients over the ranks (one all-reduce
        per dtype). Every rank reduces the same tensors, whether or not it has their
        gradients, so no rank waits for a collective another one skips."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        for idx in _by_dtype(params).values():
            group = [params[i] for i in idx]
            missing = [k for k, p in enumerate(group) if p.grad is None]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
            # one more entry per parameter: 1 where this rank has its gradient
            used = grads[0].new_ones(len(group))
            if missing:
                used[missing] = 0
            flat = torch.cat([g.reshape(-1) for g in grads] + [used])
            dist.all_reduce(flat, group=self.process_group)
            sizes = [p.numel() for p in group]
            parts = flat[:-len(group)].div_(self.world_size).split(sizes)
            # read back only where this rank lacks a gradient: the usual step never waits
            anywhere = flat[-len(group):].gt(0).tolist() if missing else None
            for k, (p, part) in enumerate(zip(group, parts)):
                if p.grad is not None:
                    p.grad.copy_(part.view_as(p.grad))
                elif anywhere[k]:
                    p.grad = part.view_as(p).clone()

    def train_step(self, data: Union[dict, tuple, list],
                   optim_wrapper: OptimWrapper) -> Dict[str, Tensor]:
        """Forward, backward, gradient average and optimiser step; returns the log values."""
        if not self._synced:
            self.broadcast_state()
        with optim_wrapper.optim_context(self):
            data = self.module.data_preprocessor(data, training=True)
            if isinstance(data, dict):
                losses = self.module(**data, mode='loss')
            else:
                losses = self.module(*data, mode='loss')
        parsed_loss, log_vars = self.module.parse_losses(losses)
        optim_wrapper.backward(optim_wrapper.scale_loss(parsed_loss))
        if optim_wrapper.should_update():
            self.average_gradients()
            optim_wrapper.step()
            optim_wrapper.zero_grad()
        return log_vars

    def val_step(self, data: Union[dict, tuple, list]) -> list:
        return self.module.val_step(data)

    def test_step(self, data: Union[dict, tuple, list]) -> list:
        return self.module.test_step(data)
