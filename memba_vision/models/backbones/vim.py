"""Vision Mamba (Vim) with a middle class token and the bidirectional "v2" mixer.

Module and parameter names follow the official release, so its checkpoints load
without renaming (``layers.N.mixer.in_proj.weight``, ``...A_b_log``, ``norm_f.weight``).
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn.bricks import DropPath
from mmpretrain.registry import MODELS
from torch import Tensor

from ...ops import causal_conv1d_tokens, selective_scan_tokens
from ...ops.dispatch import log_once
from ...ops.bidirectional_ssm import (MembaGateParams, SSMDirection, bidirectional_ssm,
                                      bidirectional_ssm_reason)
from ..peft import (AdditionalScan, LearnedTokens, PEFTConfig, TensorDeltas, build_gate,
                    check_supported, freeze_all_but_peft, parse_peft, wrap_embed, wrap_in_proj,
                    shift, wrap_merged, wrap_out_proj)
from .base import MambaBackbone
from .ssm_layers import RMSNorm, init_A_log, init_dt_bias, resolve_dt_rank

__all__ = ['Vim', 'VimMixer', 'VimBlock']

VIM_URLS = {
    'tiny': 'https://huggingface.co/hustvl/Vim-tiny-midclstok (vim_t_midclstok_76p1acc.pth)',
    'small': 'https://huggingface.co/hustvl/Vim-small-midclstok (vim_s_midclstok_80p5acc.pth)',
}


class VimMixer(nn.Module):
    """Bidirectional Mamba mixer of Vim (bimamba v2), with the Memba hooks.

    hidden (B, L, C) -> in_proj -> x, z (B, L, D) each. The forward direction
    scans x with gate z; the backward direction scans flip(x) with gate flip(z),
    with its own conv1d_b / x_proj_b / dt_proj_b / A_b_log / D_b. The gate branch
    z is where Memba's MembraneGate acts (one LIM per direction). Output:
    out_proj((y_fwd + flip(y_bwd)) / 2) (B, L, C).

    Everything stays token-major (B, L, D): the backward direction is scanned
    in reverse token order instead of flipping, and the gate's correction is
    handed to the scan in low-rank form, so no (B, L, D) tensor is transposed,
    flipped or copied. On CUDA both directions and the gate run as one
    autograd node (``ops.bidirectional_ssm``), affix tokens and extra states
    included; otherwise each piece is its own op, as written out in ``_ssm``,
    ``_ssm_affix`` and ``forward``.

    PEFT (see ``models.peft``): LoRA wraps in_proj / out_proj (also LoRAp on
    either half of in_proj, a ParallelAdapter beside out_proj) and, merged into
    the weight, x_proj / dt_proj of each direction; ``delta`` holds partial
    tuning's zero-initialised deltas (A_log, D, conv1d, dt_bias and their ``_b``
    twins); ``extra_scan`` the additional-scan states of each direction; affix
    tokens come from the backbone, one (2, T, 2D) tensor per layer.
    """

    def __init__(self, dim: int, d_state: int = 16, expand: int = 2, d_conv: int = 4,
                 dt_rank='auto', num_layers: int = 24, peft: Optional[PEFTConfig] = None):
        super().__init__()
        self.dim, self.d_state = dim, d_state
        self.d_inner = d_inner = expand * dim
        self.dt_rank = dt_rank = resolve_dt_rank(dt_rank, dim)
        in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        out_proj = nn.Linear(d_inner, dim, bias=False)
        with torch.no_grad():  # prenorm-residual rescale of the official init
            out_proj.weight.div_(math.sqrt(num_layers))
        B_rows = (dt_rank, dt_rank + d_state)
        for suffix in ('', '_b'):
            conv = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
            x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
            dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
            nn.init.uniform_(dt_proj.weight, -dt_rank ** -0.5, dt_rank ** -0.5)
            init_dt_bias(dt_proj.bias)
            x_proj = wrap_merged(wrap_merged(x_proj, peft, 'x_proj'), peft, 'x_proj_B', B_rows)
            setattr(self, 'conv1d' + suffix, conv)
            setattr(self, 'x_proj' + suffix, x_proj)
            setattr(self, 'dt_proj' + suffix, wrap_merged(dt_proj, peft, 'dt_proj'))
        self.A_log = nn.Parameter(init_A_log(d_inner, d_state))
        self.A_b_log = nn.Parameter(init_A_log(d_inner, d_state))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.D_b = nn.Parameter(torch.ones(d_inner))
        self.in_proj = wrap_in_proj(in_proj, peft)
        self.out_proj = wrap_out_proj(out_proj, peft)
        self.gate = build_gate(peft, d_inner, shared_proj=True)  # one W_in/W_out pair
        self.delta = self._deltas(peft.partial if peft is not None else None, d_conv)
        self.extra_scan = None
        if peft is not None and peft.additional_scan is not None:
            k = peft.additional_scan.states
            self.extra_scan = nn.ModuleList([AdditionalScan(self.A_log, k),
                                             AdditionalScan(self.A_b_log, k)])

    def _deltas(self, partial, d_conv: int):
        if partial is None:
            return None
        D, N = self.d_inner, self.d_state
        shapes = {}
        for sfx in ('', '_b'):
            if partial.A_log:
                shapes['A_b_log' if sfx else 'A_log'] = (D, N)
            if partial.D:
                shapes['D' + sfx] = (D,)
            if partial.conv1d:
                shapes['conv1d' + sfx] = (D, 1, d_conv)
            if partial.dt_bias:
                shapes['dt_bias' + sfx] = (D,)
        return TensorDeltas(shapes) if shapes else None

    def _direction(self, backward: bool) -> SSMDirection:
        """The SSM parameters of one scan direction (``_b`` for the backward one)."""
        sfx = '_b' if backward else ''
        conv, x_proj, dt_proj = (getattr(self, n + sfx) for n in ('conv1d', 'x_proj', 'dt_proj'))
        A_name = 'A_b_log' if backward else 'A_log'
        A = -torch.exp(shift(self.delta, A_name, getattr(self, A_name)).float())
        x_proj_weight = x_proj.weight
        if self.extra_scan is not None:
            A, x_proj_weight = self.extra_scan[int(backward)].extend(A, x_proj_weight,
                                                                      self.dt_rank)
        return SSMDirection(shift(self.delta, 'conv1d' + sfx, conv.weight).squeeze(1), conv.bias,
                            x_proj_weight, dt_proj.weight,
                            shift(self.delta, 'dt_bias' + sfx, dt_proj.bias), A,
                            shift(self.delta, 'D' + sfx, getattr(self, 'D' + sfx)))

    def _ssm(self, x: Tensor, z: Optional[Tensor], gate, backward: bool) -> Tensor:
        """One scan direction on token-major x, z (B, L, D) -> y (B, L, D).

        The backward direction convolves anti-causally and scans from the last
        token to the first, which equals the official flip -> scan -> flip.
        """
        p = self._direction(backward)
        x = causal_conv1d_tokens(x, p.conv_weight, p.conv_bias, activation='silu',
                                 reverse=backward)
        n = p.A.shape[1]  # d_state, plus additional-scan states
        dt, B, C = F.linear(x, p.x_proj_weight).split([self.dt_rank, n, n], dim=-1)
        dt = F.linear(dt, p.dt_proj_weight)                             # bias in the scan
        return selective_scan_tokens(x, dt, p.A, B, C, p.D, z=z, delta_bias=p.dt_bias,
                                     delta_softplus=True, reverse=backward, gate=gate)

    def _fused(self, xz: Tensor, membrane, kernels=None):
        """(y, new membrane) through ``ops.bidirectional_ssm``, or None where it does not apply.

        ``kernels``: a stand-in for the CUDA extension (the tests' CPU reference).
        """
        gate = self.gate
        if (kernels is None and not xz.is_cuda) or \
                (gate is not None and not (gate.shared_proj and gate.directions == 2)):
            return None
        dirs = (self._direction(False), self._direction(True))
        settings = weights = None
        if gate is not None:
            settings = MembaGateParams(gate.num_chunks, gate.leak, gate.threshold, gate.residual)
            weights = (gate.proj_in[0].weight, gate.proj_out[0].weight)
        reason = bidirectional_ssm_reason(xz, dirs, weights, settings, kernels)
        if reason:
            log_once(f'vim:composable:{reason}', f'memba_vision Vim: per-op mixer path ({reason})')
            return None
        log_once('vim:fused', 'memba_vision Vim: mixer core runs as one fused autograd node')
        transfer = gate is not None and gate.transfer
        y, new = bidirectional_ssm(xz, dirs, weights, settings, membrane if transfer else None,
                                   kernels)
        return y, (new if transfer else (membrane if gate is None else None))

    def _fused_affix(self, xz: Tensor, affix: Tensor, kernels=None) -> Optional[Tensor]:
        """``_ssm_affix``'s result halved (B, L, D) through ``ops.bidirectional_ssm``, or None
        where that does not apply.

        One sequence serves both directions: [forward affix, x, backward affix reversed]
        (B, T + L + T, 2D). The forward direction's outputs at x's tokens see only what precedes
        them (the forward affix and x), the backward direction's only what follows them (x and
        its affix, walked from the end), so they equal the two per-direction sequences'.
        """
        if self.gate is not None:
            return None
        B, L, _ = xz.shape
        T = affix.shape[1]
        a = affix.to(xz.dtype).expand(B, -1, -1, -1)                     # (B, 2, T, 2D)
        fused = self._fused(torch.cat([a[:, 0], xz, a[:, 1].flip(1)], 1), None, kernels)
        return None if fused is None else fused[0][:, T:T + L]

    def _ssm_affix(self, x: Tensor, z: Tensor, affix: Tensor) -> Tensor:
        """Both directions with T affix tokens ahead of each direction's sequence.

        affix (2, T, 2D): [x | z] values of the forward and the backward direction's
        tokens in scan order. They run through the conv and the scan and their
        outputs are dropped (so their z half has no effect). -> y_fwd + y_bwd (B, L, D).
        """
        B, L, _ = x.shape
        T = affix.shape[1]
        ax, az = affix.to(x.dtype).expand(B, -1, -1, -1).chunk(2, dim=-1)  # (B, 2, T, D)
        y_f = self._ssm(torch.cat([ax[:, 0], x], 1), torch.cat([az[:, 0], z], 1), None,
                        backward=False)[:, T:]
        # the backward direction scans from the end: its first tokens go last, reversed
        y_b = self._ssm(torch.cat([x, ax[:, 1].flip(1)], 1), torch.cat([z, az[:, 1].flip(1)], 1),
                        None, backward=True)[:, :L]
        return y_f + y_b

    def forward(self, hidden: Tensor, membrane=None, affix: Optional[Tensor] = None):
        xz = self.in_proj(hidden)                                       # (B, L, 2D)
        x, z = xz.chunk(2, dim=-1)                                      # (B, L, D) views
        if affix is not None:
            y = self._fused_affix(xz, affix)
            if y is None:
                y = self._ssm_affix(x, z, affix) / 2
            return self.out_proj(y), membrane
        fused = self._fused(xz, membrane)
        if fused is not None:
            return self.out_proj(fused[0]), fused[1]
        gates = (None, None)
        if self.gate is not None:  # z' = z + spikes W_out^T, applied inside the scan
            gates, membrane = self.gate.lim_spikes(z, membrane)
        z_scan = z if self.gate is None or self.gate.residual else None
        y = self._ssm(x, z_scan, gates[0], backward=False) \
            + self._ssm(x, z_scan, gates[1], backward=True)
        return self.out_proj(y / 2), membrane


class VimBlock(nn.Module):
    """Add -> RMSNorm -> mixer, carrying the fp32 residual stream and the membrane.

    (hidden, residual, membrane) -> (mixer output, new residual, new membrane);
    ``residual`` is None for the first block. ``drop_path`` acts on the incoming
    hidden state, as in the official block.
    """

    def __init__(self, dim: int, mixer: VimMixer, drop_path: float = 0., eps: float = 1e-5):
        super().__init__()
        self.mixer = mixer
        self.norm = RMSNorm(dim, eps=eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, hidden: Tensor, residual: Optional[Tensor], membrane=None,
                affix: Optional[Tensor] = None):
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        residual = residual.float()
        hidden, membrane = self.mixer(self.norm(residual), membrane, affix)
        return hidden, residual, membrane


class VimPatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, H/p * W/p, C) by a p x p, stride-p convolution."""

    def __init__(self, patch_size: int, in_channels: int, embed_dims: int, peft=None):
        super().__init__()
        self.patch_size = patch_size
        self.proj = wrap_embed(nn.Conv2d(in_channels, embed_dims, patch_size, stride=patch_size),
                               peft)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        H, W = x.shape[-2:]
        p = self.patch_size
        if x.dim() != 4 or H % p or W % p:
            raise ValueError(f'Vim: input of shape {tuple(x.shape)} is not a (B, C, H, W) batch '
                             f'with H and W divisible by the patch size {p}')
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


@MODELS.register_module()
class Vim(MambaBackbone):
    """Vision Mamba backbone (middle cls token, bidirectional v2 mixer, RMSNorm).

    Args:
        arch: 'tiny' (192 x 24), 'small' (384 x 24), or a dict with keys
            embed_dims, depth and optionally d_state, expand, d_conv, dt_rank.
        img_size: training input size; the position embedding is resized for
            other (patch-divisible) sizes, and when loading a 224 checkpoint.
        patch_size, in_channels: patch embedding.
        drop_rate: dropout after the position embedding.
        drop_path_rate: stochastic depth, linear over the blocks (0.1 in the
            VTAB recipe).
        peft: the PEFT methods (see ``memba_vision.models.peft.parse_peft``); None
            or 'full' trains everything, 'linear' nothing. Otherwise only the
            methods' tensors train. Backbone-level methods: prompt tokens (half
            before, half after the sequence; the cls index moves with them), affix
            tokens for every layer, deltas of cls_token / pos_embed, LoRA on the
            patch embedding.
        checkpoint_key: entry of the pretrained file holding the weights.
        cuda_graph: replay forward and backward as CUDA graphs on CUDA inputs
            (see ``MambaBackbone``).
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH)`` loads an official
            checkpoint strictly (see ``pretrained.load_pretrained``).

    Output: a 1-tuple with the final-normed middle cls token (B, C), what the
    official model's head sees.
    """
    arch_zoo = {
        'tiny': dict(embed_dims=192, depth=24),
        'small': dict(embed_dims=384, depth=24),
    }
    arch_keys = {'embed_dims', 'depth', 'd_state', 'expand', 'd_conv', 'dt_rank'}
    required_arch_keys = ('embed_dims', 'depth')
    download_urls = VIM_URLS

    def __init__(self, arch: Union[str, dict] = 'small', img_size: int = 224,
                 patch_size: int = 16, in_channels: int = 3, drop_rate: float = 0.,
                 drop_path_rate: float = 0.1, norm_eps: float = 1e-5,
                 peft: Optional[dict] = None, checkpoint_key: Optional[str] = None,
                 cuda_graph: bool = False, init_cfg: Optional[dict] = None):
        super().__init__(cuda_graph=cuda_graph, init_cfg=init_cfg)
        self.arch_name, arch = self.resolve_arch(arch)
        self.embed_dims = C = arch['embed_dims']
        self.depth = depth = arch['depth']
        self.peft = parse_peft(peft)
        self.checkpoint_key = checkpoint_key

        check_supported(self.peft, 'Vim', methods=('lora', 'gate', 'adapter', 'additional_scan',
                                                   'affix', 'prompt', 'partial'),
                        lora=('in_proj', 'out_proj', 'in_proj_x', 'in_proj_z', 'x_proj',
                              'x_proj_B', 'dt_proj', 'embed'))
        if self.peft is not None and self.peft.gate is not None and self.peft.affix is not None:
            raise ValueError('Vim: peft.gate and peft.affix cannot be combined')
        self.patch_embed = VimPatchEmbed(patch_size, in_channels, C, self.peft)
        if img_size % patch_size:
            raise ValueError(f'Vim: img_size {img_size} is not divisible by patch_size {patch_size}')
        self.grid = (img_size // patch_size,) * 2
        num_tokens = self.grid[0] * self.grid[1] + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, C))
        self.pos_drop = nn.Dropout(drop_rate)
        if self.peft is not None and self.peft.gate is not None \
                and self.peft.gate.num_chunks > num_tokens:
            raise ValueError(f'Vim: gate num_chunks={self.peft.gate.num_chunks} exceeds the '
                             f'sequence length {num_tokens} at img_size {img_size}')

        dpr = [0.0] + torch.linspace(0, drop_path_rate, depth).tolist()  # block i gets dpr[i]
        mixer_kw = {k: arch[k] for k in ('d_state', 'expand', 'd_conv', 'dt_rank') if k in arch}
        self.layers = nn.ModuleList(
            VimBlock(C, VimMixer(C, num_layers=depth, peft=self.peft, **mixer_kw),
                     drop_path=dpr[i], eps=norm_eps) for i in range(depth))
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm_f = RMSNorm(C, eps=norm_eps)
        self._init_embeddings()
        self._build_token_methods()
        if self.peft is not None:
            freeze_all_but_peft(self)

    def _build_token_methods(self) -> None:
        """Backbone-level PEFT: cls/pos deltas, prompt tokens, affix tokens."""
        peft = self.peft
        partial = peft.partial if peft is not None else None
        shapes = {n: getattr(self, n).shape for n in ('cls_token', 'pos_embed')
                  if partial is not None and getattr(partial, n)}
        self.delta = TensorDeltas(shapes) if shapes else None
        self.prompt = self.affix = None
        C = self.embed_dims
        if peft is not None and peft.prompt is not None:
            p = peft.prompt
            self.prompt = LearnedTokens(p.tokens, C, p.projection, token_dim=C, hidden=C)
        if peft is not None and peft.affix is not None:
            a, width = peft.affix, 2 * self.layers[0].mixer.d_inner  # the in_proj output
            self.affix = LearnedTokens(a.tokens, self.depth * 2 * width, a.projection,
                                       token_dim=width, hidden=a.hidden or width)

    def _init_embeddings(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=.02)
        nn.init.trunc_normal_(self.cls_token, std=.02)
        w = self.patch_embed.proj.weight  # lecun normal, as the official init
        nn.init.trunc_normal_(w, std=math.sqrt(1.0 / (w[0].numel())) / .87962566103423978)
        nn.init.zeros_(self.patch_embed.proj.bias)

    # ------------------------------------------------------------------ loading
    def convert_official(self, state: dict) -> dict:
        """Official Vim state dict -> this backbone's: drops the head, resizes pos_embed."""
        state = {k: v for k, v in state.items() if not k.startswith('head.')}
        pos = state.get('pos_embed')
        if pos is not None and pos.shape != self.pos_embed.shape:
            state['pos_embed'] = self.resize_pos_embed(pos, self.grid)
        return state

    @staticmethod
    def resize_pos_embed(pos: Tensor, grid: Tuple[int, int]) -> Tensor:
        """(1, h*w + 1, C) with the cls entry at index h*w // 2 -> the same for ``grid``.

        The source grid is assumed square; patch entries are resized bicubically.
        """
        n = pos.shape[1] - 1
        side = int(round(math.sqrt(n)))
        if side * side != n:
            raise ValueError(f'Vim: cannot resize a position embedding of {n} patches '
                             f'(not a square grid)')
        mid = n // 2
        cls_pos = pos[:, mid:mid + 1]
        patches = torch.cat([pos[:, :mid], pos[:, mid + 1:]], dim=1)
        patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches.float(), size=grid, mode='bicubic',
                                align_corners=False).to(pos.dtype)
        patches = patches.permute(0, 2, 3, 1).flatten(1, 2)
        new_mid = grid[0] * grid[1] // 2
        return torch.cat([patches[:, :new_mid], cls_pos, patches[:, new_mid:]], dim=1)

    # ------------------------------------------------------------------ forward
    def forward_features(self, x: Tensor) -> Tuple[Tensor]:
        x, grid = self.patch_embed(x)                                   # (B, M, C)
        B, M, _ = x.shape
        pos = shift(self.delta, 'pos_embed', self.pos_embed)
        pos = pos if grid == self.grid else self.resize_pos_embed(pos, grid)
        mid = M // 2
        cls = shift(self.delta, 'cls_token', self.cls_token).expand(B, -1, -1)
        x = torch.cat([x[:, :mid], cls, x[:, mid:]], dim=1)
        hidden = self.pos_drop(x + pos)
        if self.prompt is not None:  # (T, C): ceil(T/2) before the sequence, the rest after
            p = self.prompt().to(hidden.dtype).expand(B, -1, -1)
            first = (p.shape[1] + 1) // 2
            hidden = torch.cat([p[:, :first], hidden, p[:, first:]], dim=1)
            mid += first
        affix = None
        if self.affix is not None:  # (T, depth * 2 * 2D) -> per layer (2, T, 2D)
            tokens = self.affix()
            affix = tokens.view(tokens.shape[0], self.depth, 2, -1).permute(1, 2, 0, 3)
        residual, membrane = None, None
        for i, layer in enumerate(self.layers):
            hidden, residual, membrane = layer(hidden, residual, membrane,
                                               None if affix is None else affix[i])
        residual = residual + self.drop_path(hidden)
        hidden = self.norm_f(residual)
        return (hidden[:, mid],)
