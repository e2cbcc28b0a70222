"""Membrane, spike, saliency and implicit-attention maps of a Vim or VanillaVMamba classifier.

``explain(model, inputs)`` runs one forward and backward pass with forward hooks
on the mixers (no model code changes; the fused CUDA path is observed too) and
recomputes, from each hooked layer's input, on the reference path:

- for every layer with a Memba gate and each LIM direction: the gate's input
  currents W_in z, then ``lim_trace`` in fp64 from the membrane the layer
  received, giving per token the membrane before the reset and the fraction of
  the R units that reset, and per chunk position the transferred mean membrane;
- for Vim and the chosen layers: the cls token's row of the implicit attention
  (both directions, averaged over directions and channels).

Token layout: chunk i of a direction covers positions [i*l, (i+1)*l) of that
direction's order (reversed for direction 1, mapped back), so one map holds
all chunks; the transferred mean membrane u_mean[j] is drawn at every token the
LIM integrated at chunk position j (tokens j, l + j, ...). Tokens the LIM trims
(the last L - T*l of a direction's order) are NaN. Vim's middle cls token is
taken out of every grid (its values stay in the ``*_tokens`` arrays).
"""
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..models.backbones.vim import Vim
from ..models.backbones.vmamba import VanillaVMamba
from .attention import vim_implicit_attention
from .membrane import lim_order_to_sequence, lim_trace
from .saliency import grad_cam, input_x_gradient, pool_to_grid, tokens_to_grid

__all__ = ['mixers_of', 'default_layers', 'explain', 'MEMBRANE_KINDS']

MEMBRANE_KINDS = ('potential', 'spikes', 'u_mean')
DIRECTIONS = ('fwd', 'bwd')


def mixers_of(backbone) -> List:
    """The Mamba mixers of a backbone, in depth order (VMamba: all stages, flattened)."""
    if isinstance(backbone, Vim):
        return [layer.mixer for layer in backbone.layers]
    if isinstance(backbone, VanillaVMamba):
        return [block.op for stage in backbone.layers for block in stage.blocks]
    raise TypeError(f'maps are drawn for Vim and VanillaVMamba backbones, '
                    f'got {type(backbone).__name__}')


def default_layers(num_layers: int, count: int = 4) -> List[int]:
    """``count`` layers evenly spaced from the first to the last."""
    return sorted({round(i * (num_layers - 1) / max(count - 1, 1)) for i in range(count)})


def _gate_currents(mixer, hidden: Tensor, is_vim: bool):
    """(currents (B, L, R) per direction in that direction's order, token grid or None)."""
    gate = mixer.gate
    if is_vim:
        z = mixer.in_proj(hidden)[..., mixer.d_inner:]
        grid = None
    else:
        B, H, W, _ = hidden.shape
        z = mixer.in_proj(hidden).chunk(2, dim=-1)[1].reshape(B, H * W, -1)
        grid = (H, W)
    out = []
    for d in range(gate.directions):
        v = gate.proj_in[0 if gate.shared_proj else d](z)
        out.append(v.flip(1) if d == 1 else v)
    return out, grid


class _Recorder:
    """Forward hooks on the mixers; fills ``self.layers[k]`` with the recomputed maps."""

    def __init__(self, model, layers: Sequence[int], attention: bool):
        self.backbone = model.backbone
        self.is_vim = isinstance(self.backbone, Vim)
        self.mixers = mixers_of(self.backbone)
        self.chosen, self.attention = set(layers), attention and self.is_vim
        self.layers: Dict[int, dict] = {}
        self.handles = [m.register_forward_hook(self._hook(k)) for k, m in enumerate(self.mixers)]
        self.cls_index = self.grid = None
        self.gradcam_acts: Optional[Tensor] = None
        target = self.backbone.layers[-1].norm if self.is_vim else self.backbone.norm
        self.handles.append(target.register_forward_hook(self._gradcam_hook))

    def _gradcam_hook(self, module, args, output):
        acts = args[0]
        if acts.requires_grad:
            acts.retain_grad()
        self.gradcam_acts = acts

    def _hook(self, k: int):
        def hook(module, args, output):
            with torch.no_grad():
                self._record(k, module, args[0], args[1] if len(args) > 1 else None)
        return hook

    def _record(self, k, mixer, hidden, membrane):
        rec = self.layers.setdefault(k, {})
        gate = mixer.gate
        if gate is not None:
            currents, grid = _gate_currents(mixer, hidden, self.is_vim)
            if grid is None:
                grid = self.grid
            if membrane is None or not gate.transfer:
                membrane = (None,) * gate.directions
            L = currents[0].shape[1]
            cls = self.cls_index if self.is_vim else None
            rec['grid'] = grid
            resets = []
            for d, v in enumerate(currents):
                u_prev = membrane[d].double() if membrane[d] is not None else None
                tr = lim_trace(v.double(), gate.num_chunks, gate.leak, gate.threshold, u_prev)
                resets.append(tr.spikes.double().mean((1, 2, 3)))
                if k not in self.chosen:
                    continue
                T = gate.num_chunks
                per_token = {
                    'potential': tr.potential.mean(-1).flatten(1),
                    'spikes': tr.spikes.double().mean(-1).flatten(1),
                    'u_mean': tr.u_mean.mean(-1).repeat(1, T),
                }
                for kind, values in per_token.items():
                    seq = lim_order_to_sequence(values, L, reverse=d == 1)
                    rec[f'{DIRECTIONS[d]}_{kind}_tokens'] = seq
                    rec[f'{DIRECTIONS[d]}_{kind}'] = tokens_to_grid(seq, grid, cls)
            rec['reset_fraction'] = torch.stack(resets, 1)              # (B, directions)
        if self.attention and k in self.chosen:
            cls = self.cls_index
            alpha_f, alpha_b = vim_implicit_attention(mixer, hidden, rows=[cls])
            row = ((alpha_f + alpha_b) / 2)[:, :, 0].mean(1)            # (B, L)
            rec['attention_tokens'] = row
            rec['attention'] = tokens_to_grid(row, self.grid, cls)

    def remove(self):
        for h in self.handles:
            h.remove()


def explain(model, inputs: Tensor, layers: Optional[Sequence[int]] = None,
            target_class: Optional[int] = None, attention: bool = True,
            baseline: str = 'mean') -> Dict[str, np.ndarray]:
    """Maps of one batch of preprocessed images (B, 3, H, W) for the predicted class.

    Args:
        model: an mmpretrain ImageClassifier with a Vim or VanillaVMamba backbone.
        layers: mixer indices for the per-layer maps (default: 4 evenly spaced).
        target_class: explain this class instead of the prediction.
        attention: compute Vim's implicit attention rows.
        baseline: of input-gradient x input (see ``saliency.input_x_gradient``).

    Returns a dict of numpy arrays (grids (B, h, w), token arrays (B, L)):
    ``logits``, ``target``, ``input_x_gradient`` (token grid) and
    ``input_x_gradient_pixels`` (B, H, W), ``gradcam``, ``reset_fraction``
    (B, layers, directions) for gated models, and per chosen layer k
    ``layer{k}/{fwd,bwd}_{potential,spikes,u_mean}[_tokens]`` and (Vim)
    ``layer{k}/attention[_tokens]``.
    """
    backbone = model.backbone
    mixers = mixers_of(backbone)
    n = len(mixers)
    layers = default_layers(n) if layers is None else list(layers)
    for k in layers:
        if not -n <= k < n:
            raise IndexError(f'layer {k} is out of range: the model has {n} layers (0..{n - 1})')
    layers = sorted({k % n for k in layers})
    is_vim = isinstance(backbone, Vim)
    H, W = inputs.shape[-2:]
    p = backbone.patch_embed.patch_size
    grid = (H // p, W // p)
    rec = _Recorder(model, layers, attention)
    rec.grid = grid
    rec.cls_index = grid[0] * grid[1] // 2 if is_vim else None
    flags = [(q, q.requires_grad) for q in model.parameters()]
    try:
        for q, _ in flags:
            q.requires_grad_(False)
        x = inputs.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x, mode='tensor')
            if target_class is None:
                target = logits.argmax(-1)
            else:
                if not 0 <= target_class < logits.shape[-1]:
                    raise IndexError(f'target class {target_class} is out of range: the model '
                                     f'has {logits.shape[-1]} classes')
                target = torch.full_like(logits[:, 0], target_class, dtype=torch.long)
            logits.gather(1, target[:, None]).sum().backward()
    finally:
        rec.remove()
        for q, flag in flags:
            q.requires_grad_(flag)
    acts = rec.gradcam_acts
    out = {'logits': logits.detach(), 'target': target}
    pixels = input_x_gradient(x.detach(), x.grad, baseline)
    out['input_x_gradient_pixels'] = pixels
    out['input_x_gradient'] = pool_to_grid(pixels, grid)
    if is_vim:
        keep = torch.ones(acts.shape[1], dtype=torch.bool, device=acts.device)
        keep[rec.cls_index] = False
        out['gradcam'] = grad_cam(acts.detach(), acts.grad, keep).reshape(-1, *grid)
    else:
        out['gradcam'] = grad_cam(acts.detach().flatten(1, 2), acts.grad.flatten(1, 2)
                                  ).reshape(acts.shape[:3])
    resets = [rec.layers[k]['reset_fraction'] for k in range(n)
              if 'reset_fraction' in rec.layers.get(k, {})]
    if resets:
        out['reset_fraction'] = torch.stack(resets, 1)
    for k in layers:
        for name, value in rec.layers.get(k, {}).items():
            if isinstance(value, Tensor) and name != 'reset_fraction':
                out[f'layer{k}/{name}'] = value
    # membrane and attention maps stay fp64 (computed so); saliency is in the model's dtype
    result = {k: v.detach().cpu().numpy() for k, v in out.items()}
    result['layers'] = np.array(layers)
    return result
