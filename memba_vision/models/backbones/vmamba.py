"""Vanilla VMamba (VMamba "v0"): SS2D blocks with the gate branch z, no MLP.

Parameter names follow the official release; ``convert_official`` accepts both
its legacy names (``blocks.j.ln_1`` / ``self_attention`` / ``patch_embed.proj`` /
``norm`` / ``head``) and the current ones (``blocks.j.norm`` / ``op`` /
``patch_embed.0`` / ``classifier.*``).
"""
import re
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
from mmcv.cnn.bricks import DropPath
from mmpretrain.registry import MODELS
from torch import Tensor

from ...ops.cross_scan import cross_scan
from ...ops.depthwise_conv2d import depthwise_conv2d_silu
from ...ops.layer_norm import layer_norm_in_dtype
from ...ops.bidirectional_ssm import MembaGateParams
from ...ops.silu_gate import memba_norm_silu_gate, norm_silu_gate
from ..peft import (PEFTConfig, build_gate, check_supported, freeze_all_but_peft, parse_peft,
                    wrap_embed, wrap_in_proj, wrap_out_proj)
from .base import MambaBackbone
from .ssm_layers import init_A_log, init_dt_bias, resolve_dt_rank

__all__ = ['VanillaVMamba', 'SS2D', 'VSSBlock', 'PatchMerging2D']

_URL = 'https://github.com/MzeroMiko/VMamba/releases/download/%23v0cls/'
VMAMBA_URLS = {
    'tiny': _URL + 'vssmtiny_dp01_ckpt_epoch_292.pth',
    'small': _URL + 'vssmsmall_dp03_ckpt_epoch_238.pth',
    'base': _URL + 'vssmbase_dp06_ckpt_epoch_241.pth',
}
K_DIRECTIONS = 4  # row-major, column-major, and both reversed


class SS2D(nn.Module):
    """2D selective scan mixer (VMamba v0) with the Memba hooks.

    x (B, H, W, C) -> in_proj -> x, z (B, H, W, D). x: depthwise 3x3 conv + SiLU,
    then four selective scans over the row-major, column-major and reversed token
    orders (stacked parameters ``x_proj_weight`` (4, R + 2N, D),
    ``dt_projs_weight`` (4, D, R), ``dt_projs_bias`` (4, D), ``A_logs`` (4D, N),
    ``Ds`` (4D,)), merged by summation; LayerNorm ``out_norm`` and y * SiLU(z) as one
    op (``ops.silu_gate``); ``out_proj``. Memba's gate corrects z inside that op: a
    forward and a backward LIM over the row-major tokens, each with its own
    projections, their corrections averaged.
    """

    def __init__(self, dim: int, d_state: int = 16, ssm_ratio: float = 2.0,
                 dt_rank='auto', d_conv: int = 3, peft: Optional[PEFTConfig] = None):
        super().__init__()
        self.d_state = d_state
        self.d_inner = D = int(ssm_ratio * dim)
        self.dt_rank = R = resolve_dt_rank(dt_rank, dim)
        in_proj = nn.Linear(dim, 2 * D, bias=False)
        out_proj = nn.Linear(D, dim, bias=False)
        for lin in (in_proj, out_proj):
            nn.init.trunc_normal_(lin.weight, std=.02)
        self.conv2d = nn.Conv2d(D, D, d_conv, padding=(d_conv - 1) // 2, groups=D, bias=True)
        x_proj = [nn.Linear(D, R + 2 * d_state, bias=False).weight for _ in range(K_DIRECTIONS)]
        self.x_proj_weight = nn.Parameter(torch.stack(x_proj))                  # (4, R+2N, D)
        self.dt_projs_weight = nn.Parameter(
            torch.empty(K_DIRECTIONS, D, R).uniform_(-R ** -0.5, R ** -0.5))    # (4, D, R)
        self.dt_projs_bias = nn.Parameter(torch.empty(K_DIRECTIONS, D))         # (4, D)
        init_dt_bias(self.dt_projs_bias)
        self.A_logs = nn.Parameter(init_A_log(D, d_state, copies=K_DIRECTIONS))  # (4D, N)
        self.Ds = nn.Parameter(torch.ones(K_DIRECTIONS * D))
        self.out_norm = nn.LayerNorm(D)
        self.in_proj = wrap_in_proj(in_proj, peft)
        self.out_proj = wrap_out_proj(out_proj, peft)
        self.gate = build_gate(peft, D, shared_proj=False)  # a W_in/W_out pair per direction

    def cross_scan(self, x: Tensor) -> Tensor:
        """x (B, H, W, D) -> merged scan output (B, H*W, D) in row-major order, fp32."""
        return cross_scan(x, self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias,
                          -torch.exp(self.A_logs.float()), self.Ds)

    def forward(self, x: Tensor, membrane=None):
        B, H, W, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)               # (B, H, W, D)
        # channels-last all the way: the conv reads x where in_proj wrote it
        x = depthwise_conv2d_silu(x, self.conv2d.weight, self.conv2d.bias)
        y = self.cross_scan(x)                                # (B, L, D) fp32
        z = z.reshape(B, H * W, -1)
        norm = self.out_norm
        if self.gate is None:  # out_norm(y) * silu(z)
            y = norm_silu_gate(y, z, norm.weight, norm.bias, norm.eps)
        else:  # z' = z + the mean of the two directions' S_d W_d^T
            g = self.gate
            settings = MembaGateParams(g.num_chunks, g.leak, g.threshold, g.residual)
            y, new = memba_norm_silu_gate(
                y, z, norm.weight, norm.bias, norm.eps, torch.cat([p.weight for p in g.proj_in]),
                torch.cat([p.weight for p in g.proj_out], dim=1), settings,
                membrane if g.transfer else None)
            membrane = new if g.transfer else None
        return self.out_proj(y).view(B, H, W, -1), membrane


def norm_in_input_dtype(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """``norm(x)``, in x's dtype when autocast runs in half precision (``ops.layer_norm``: fp32
    statistics and affine, the output rounded once): what autocast's fp32 LayerNorm hands the
    next matrix product, without an fp32 copy of x, an fp32 output and its cast, nor their
    twins in the backward."""
    if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
        return layer_norm_in_dtype(x, norm.weight, norm.bias, norm.eps)
    return norm(x)


class VSSBlock(nn.Module):
    """x + drop_path(SS2D(LayerNorm(x))), x (B, H, W, C); carries the membrane."""

    def __init__(self, dim: int, mixer: SS2D, drop_path: float = 0.):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = mixer
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, membrane=None):
        y, membrane = self.op(norm_in_input_dtype(self.norm, x), membrane)
        return x + self.drop_path(y), membrane


class PatchMerging2D(nn.Module):
    """(B, H, W, C) -> (B, H/2, W/2, 2C): 2x2 neighbours concatenated, LayerNorm, Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        nn.init.trunc_normal_(self.reduction.weight, std=.02)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[1:3]
        if H % 2 or W % 2:
            raise ValueError(f'VanillaVMamba: cannot merge patches of an odd {H}x{W} grid')
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      dim=-1)
        return self.reduction(norm_in_input_dtype(self.norm, x))


class VMambaStage(nn.Module):
    """Blocks of one resolution; the membrane flows block to block, starting from zeros."""

    def __init__(self, blocks: List[VSSBlock], downsample: Optional[PatchMerging2D]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        membrane = None
        for block in self.blocks:
            x, membrane = block(x, membrane)
        return self.downsample(x) if self.downsample is not None else x


class VMambaPatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, H/p, W/p, C): p x p stride-p conv, then LayerNorm."""

    def __init__(self, patch_size: int, in_channels: int, embed_dims: int, peft=None):
        super().__init__()
        self.patch_size = patch_size
        self.proj = wrap_embed(nn.Conv2d(in_channels, embed_dims, patch_size, stride=patch_size),
                               peft)
        self.norm = nn.LayerNorm(embed_dims)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        if x.dim() != 4 or x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f'VanillaVMamba: input of shape {tuple(x.shape)} is not a '
                             f'(B, C, H, W) batch with H and W divisible by the patch size {p}')
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


@MODELS.register_module()
class VanillaVMamba(MambaBackbone):
    """Vanilla VMamba (v0) backbone: 4 stages of VSS blocks, patch merging between.

    Args:
        arch: 'tiny' (depths [2, 2, 9, 2]), 'small' ([2, 2, 27, 2]), 'base'
            (dims 128, [2, 2, 27, 2]), or a dict with keys dims (int: first-stage
            width, doubled per stage), depths and optionally d_state, ssm_ratio,
            d_conv, dt_rank.
        img_size: input size used to check the gate's chunk count per stage.
        drop_path_rate: stochastic depth, linear over all blocks (0.3 for v0-S).
        peft: the PEFT methods (see ``memba_vision.models.peft.parse_peft``): LoRA
            on in_proj (or either half), out_proj and the patch embedding, the
            membrane gate, a ParallelAdapter; None or 'full' trains everything,
            'linear' nothing.
        checkpoint_key: entry of the pretrained file holding the weights
            ('model' by default; 'model_ema' for the EMA weights where present).
        cuda_graph: replay forward and backward as CUDA graphs on CUDA inputs
            (see ``MambaBackbone``).
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH)`` loads strictly.

    Output: a 1-tuple with the globally average-pooled final-normed feature (B, 8 * dims).
    """
    arch_zoo = {
        'tiny': dict(dims=96, depths=[2, 2, 9, 2]),
        'small': dict(dims=96, depths=[2, 2, 27, 2]),
        'base': dict(dims=128, depths=[2, 2, 27, 2]),
    }
    arch_keys = {'dims', 'depths', 'd_state', 'ssm_ratio', 'd_conv', 'dt_rank'}
    required_arch_keys = ('dims', 'depths')
    download_urls = VMAMBA_URLS

    def __init__(self, arch: Union[str, dict] = 'small', img_size: int = 224,
                 patch_size: int = 4, in_channels: int = 3, drop_path_rate: float = 0.3,
                 peft: Optional[dict] = None, checkpoint_key: Optional[str] = None,
                 cuda_graph: bool = False, init_cfg: Optional[dict] = None):
        super().__init__(cuda_graph=cuda_graph, init_cfg=init_cfg)
        self.arch_name, arch = self.resolve_arch(arch)
        depths = list(arch['depths'])
        dims = [arch['dims'] * 2 ** i for i in range(len(depths))]
        self.dims, self.depths = dims, depths
        self.num_features = dims[-1]
        self.peft = parse_peft(peft)
        self.checkpoint_key = checkpoint_key
        mixer_kw = {k: arch[k] for k in ('d_state', 'ssm_ratio', 'd_conv', 'dt_rank') if k in arch}

        if self.peft is not None and self.peft.gate is not None:
            side = img_size // patch_size
            for i in range(len(depths)):
                tokens = (side // 2 ** i) ** 2
                if self.peft.gate.num_chunks > tokens:
                    raise ValueError(f'VanillaVMamba: gate num_chunks={self.peft.gate.num_chunks}'
                                     f' exceeds the {tokens} tokens of stage {i + 1} at '
                                     f'img_size {img_size}')

        check_supported(self.peft, 'VanillaVMamba', methods=('lora', 'gate', 'adapter'),
                        lora=('in_proj', 'out_proj', 'in_proj_x', 'in_proj_z', 'embed'))
        self.patch_embed = VMambaPatchEmbed(patch_size, in_channels, dims[0], self.peft)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            start = sum(depths[:i])
            blocks = [VSSBlock(dim, SS2D(dim, peft=self.peft, **mixer_kw), dpr[start + j])
                      for j in range(depth)]
            down = PatchMerging2D(dim) if i < len(depths) - 1 else None
            self.layers.append(VMambaStage(blocks, down))
        self.norm = nn.LayerNorm(self.num_features)
        if self.peft is not None:
            freeze_all_but_peft(self)

    @staticmethod
    def convert_official(state: dict) -> dict:
        """Legacy or current official key names -> ours; the classifier head is dropped."""
        rules = [
            (r'^patch_embed\.0\.', 'patch_embed.proj.'),
            (r'^patch_embed\.2\.', 'patch_embed.norm.'),
            (r'^(layers\.\d+\.blocks\.\d+)\.ln_1\.', r'\1.norm.'),
            (r'^(layers\.\d+\.blocks\.\d+)\.self_attention\.', r'\1.op.'),
            (r'^classifier\.norm\.', 'norm.'),
        ]
        out = {}
        for key, value in state.items():
            if key.startswith(('head.', 'classifier.head.')):
                continue
            for pattern, repl in rules:
                key = re.sub(pattern, repl, key)
            out[key] = value
        return out

    def forward_features(self, x: Tensor) -> Tuple[Tensor]:
        x = self.patch_embed(x)                                # (B, H, W, C)
        for stage in self.layers:
            x = stage(x)
        x = self.norm(x)
        return (x.mean(dim=(1, 2)),)
