"""Official checkpoint layouts, written as test data from the architecture formulas.

Key names and shapes of the released Vim (hustvl/Vim, models_mamba.py +
mamba_simple.py, bimamba v2) and Vanilla-VMamba v0 (MzeroMiko/VMamba, first
release and current vmamba.py) checkpoints. Independent of memba_vision's modules.
"""
import math
import re

import torch


def vim_layout(embed=384, depth=24, d_state=16, expand=2, d_conv=4, patch=16, img=224,
               num_classes=1000):
    d_inner, dt_rank = expand * embed, math.ceil(embed / 16)
    keys = {
        'patch_embed.proj.weight': (embed, 3, patch, patch), 'patch_embed.proj.bias': (embed,),
        'cls_token': (1, 1, embed), 'pos_embed': (1, (img // patch) ** 2 + 1, embed),
        'norm_f.weight': (embed,),
        'head.weight': (num_classes, embed), 'head.bias': (num_classes,),
    }
    for i in range(depth):
        p = f'layers.{i}.'
        keys[p + 'norm.weight'] = (embed,)
        keys[p + 'mixer.in_proj.weight'] = (2 * d_inner, embed)
        keys[p + 'mixer.out_proj.weight'] = (embed, d_inner)
        for s in ('', '_b'):
            keys[p + f'mixer.conv1d{s}.weight'] = (d_inner, 1, d_conv)
            keys[p + f'mixer.conv1d{s}.bias'] = (d_inner,)
            keys[p + f'mixer.x_proj{s}.weight'] = (dt_rank + 2 * d_state, d_inner)
            keys[p + f'mixer.dt_proj{s}.weight'] = (d_inner, dt_rank)
            keys[p + f'mixer.dt_proj{s}.bias'] = (d_inner,)
        keys[p + 'mixer.A_log'] = keys[p + 'mixer.A_b_log'] = (d_inner, d_state)
        keys[p + 'mixer.D'] = keys[p + 'mixer.D_b'] = (d_inner,)
    return keys


def vmamba_v0_layout(dims=96, depths=(2, 2, 27, 2), d_state=16, ratio=2, patch=4,
                     num_classes=1000, legacy=True):
    """legacy=True: first-release names (ln_1, self_attention, patch_embed.proj, norm, head)."""
    keys = {'patch_embed.proj.weight': (dims, 3, patch, patch), 'patch_embed.proj.bias': (dims,),
            'patch_embed.norm.weight': (dims,), 'patch_embed.norm.bias': (dims,)}
    for i, depth in enumerate(depths):
        c = dims * 2 ** i
        d, r = ratio * c, math.ceil(c / 16)
        for j in range(depth):
            p = f'layers.{i}.blocks.{j}.'
            keys.update({p + 'ln_1.weight': (c,), p + 'ln_1.bias': (c,)})
            q = p + 'self_attention.'
            keys.update({
                q + 'in_proj.weight': (2 * d, c), q + 'conv2d.weight': (d, 1, 3, 3),
                q + 'conv2d.bias': (d,), q + 'x_proj_weight': (4, r + 2 * d_state, d),
                q + 'dt_projs_weight': (4, d, r), q + 'dt_projs_bias': (4, d),
                q + 'A_logs': (4 * d, d_state), q + 'Ds': (4 * d,),
                q + 'out_norm.weight': (d,), q + 'out_norm.bias': (d,),
                q + 'out_proj.weight': (c, d)})
        if i < len(depths) - 1:
            keys.update({f'layers.{i}.downsample.norm.weight': (4 * c,),
                         f'layers.{i}.downsample.norm.bias': (4 * c,),
                         f'layers.{i}.downsample.reduction.weight': (2 * c, 4 * c)})
    last = dims * 2 ** (len(depths) - 1)
    keys.update({'norm.weight': (last,), 'norm.bias': (last,),
                 'head.weight': (num_classes, last), 'head.bias': (num_classes,)})
    if legacy:
        return keys
    renamed = {}
    for k, v in keys.items():
        k = k.replace('patch_embed.proj.', 'patch_embed.0.').replace('patch_embed.norm.', 'patch_embed.2.')
        k = re.sub(r'\.ln_1\.', '.norm.', k)
        k = re.sub(r'\.self_attention\.', '.op.', k)
        k = re.sub(r'^(norm|head)\.', r'classifier.\1.', k)
        renamed[k] = v
    return renamed


def random_checkpoint(layout, path, seed, wrap='model', extra=None):
    """Writes random tensors of ``layout`` as an official-style checkpoint file."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in layout.items():
        t = torch.randn(*shape, generator=g) * 0.05
        if k.endswith(('A_log', 'A_b_log', 'A_logs')):
            t = torch.log(torch.rand(*shape, generator=g) * 4 + 0.5)
        if k.endswith(('norm.weight', 'norm_f.weight', 'ln_1.weight')):
            t = 1 + t
        sd[k] = t
    ckpt = {wrap: sd} if wrap else sd
    if extra:
        ckpt.update(extra)
    torch.save(ckpt, path)
    return sd
