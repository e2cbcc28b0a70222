"""Every PEFT method of configs/_base_/models: it fine-tunes a tiny model from a pretrained file,
only its own tensors (and the head) change, a trainable-only checkpoint reloads exactly, and its
forward equals the method written out by hand (merged weights in a plain model, the official
flip formulation for affixes, the state split for the additional scan)."""
import math
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope
from mmpretrain.registry import MODELS

from conftest import ROOT, TINY_VIM, TINY_VMAMBA
from memba_vision.engine.hooks import PEFTCheckpointHook, complete_trainable_checkpoint
from memba_vision.models.backbones import VanillaVMamba, Vim
from memba_vision.models.peft import ParallelAdapter, parse_peft
from memba_vision.ops import selective_scan_reference

init_default_scope('mmpretrain')

# method -> (tiny-model peft, a name fragment of a tensor that must change in training)
VIM_METHODS = {
    'full': (None, 'layers.0.mixer.A_log'),
    'scratch': (None, 'layers.0.mixer.A_log'),
    'linear': ('linear', None),
    'lora-embed': (dict(lora=dict(embed=4)), 'patch_embed.proj.lora_up'),
    'lora-xproj': (dict(lora=dict(x_proj=6)), 'x_proj_b.lora_up'),
    'lora-dtproj': (dict(lora=dict(dt_proj=6)), 'dt_proj_b.lora_up'),
    'lora-in': (dict(lora=dict(in_proj=4)), 'in_proj.lora_up'),
    'lora-out': (dict(lora=dict(out_proj=4)), 'out_proj.lora_up'),
    'lorap-x': (dict(lora=dict(in_proj_x=4)), 'in_proj.lora_up'),
    'lorap-z': (dict(lora=dict(in_proj_z=4)), 'in_proj.lora_up'),
    'lora-inout': (dict(lora=dict(in_proj=2, out_proj=3)), 'out_proj.lora_up'),
    'addscan': (dict(additional_scan=dict(states=2)), 'extra_scan.1.x_proj'),
    'affix': (dict(affix=dict(tokens=2)), 'affix.transform.2'),
    'affix-noproj': (dict(affix=dict(tokens=2, projection=False)), 'affix.embedding'),
    'prompt': (dict(prompt=dict(tokens=4)), 'prompt.transform.2'),
    'prompt-noproj': (dict(prompt=dict(tokens=3, projection=False)), 'prompt.embedding'),
    'partial-a': (dict(partial=dict(A_log=True)), 'mixer.delta.A_b_log'),
    'partial-d': (dict(partial=dict(D=True)), 'mixer.delta.D_b'),
    'partial-conv': (dict(partial=dict(conv1d=True)), 'mixer.delta.conv1d_b'),
    'partial-dtbias': (dict(partial=dict(dt_bias=True)), 'mixer.delta.dt_bias_b'),
    'partial-cls': (dict(partial=dict(cls_token=True)), 'backbone.delta.cls_token'),
    'partial-pos': (dict(partial=dict(pos_embed=True)), 'backbone.delta.pos_embed'),
    'adapter': (dict(adapter=dict(rank=4)), 'out_proj.adapter_up'),
    'hybrid': (dict(lora=dict(out_proj=2, in_proj=2, in_proj_x=2, x_proj_B=2, dt_proj=2),
                    affix=dict(tokens=1), partial=dict(A_log=True, cls_token=True)),
               'x_proj.lora_up'),
    'memba': (dict(lora=dict(in_proj=4, out_proj=4), gate=dict(rank=4)), 'gate.proj_out'),
}
VMAMBA_METHODS = dict({k: VIM_METHODS[k] for k in ('linear', 'lora-embed', 'lorap-x', 'lorap-z',
                                                   'adapter', 'memba')},
                      full=(None, 'op.A_logs'), scratch=(None, 'op.A_logs'))


def test_every_vtab_method_has_a_tiny_case_here():
    from conftest import load_tool
    methods = load_tool('gen_configs').METHODS
    lora_only = {'lora', 'lora-in', 'lora-out', 'memba-in', 'memba-out'}  # covered by memba
    assert set(methods['vim_s']) - lora_only == set(VIM_METHODS) - lora_only
    assert set(methods['vmamba_s']) - lora_only == set(VMAMBA_METHODS) - lora_only


def build(kind, peft, pretrained=None, drop_path=0.0):
    if kind == 'vim':
        backbone = dict(type='Vim', arch=TINY_VIM, img_size=32, patch_size=8)
        width = TINY_VIM['embed_dims']
    else:
        backbone = dict(type='VanillaVMamba', arch=TINY_VMAMBA, img_size=32)
        width = TINY_VMAMBA['dims'] * 4
    backbone.update(peft=peft, drop_path_rate=drop_path,
                    init_cfg=dict(type='Pretrained', checkpoint=pretrained) if pretrained else None)
    model = MODELS.build(dict(type='ImageClassifier', backbone=backbone,
                              head=dict(type='LinearClsHead', num_classes=4, in_channels=width)))
    model.init_weights()
    return model


@pytest.fixture(scope='module')
def pretrained_files(tmp_path_factory):
    """A random plain tiny backbone of each kind, saved like an official file ({'model': ...})."""
    files = {}
    for kind in ('vim', 'vmamba'):
        torch.manual_seed(1)
        plain = build(kind, None).backbone
        path = tmp_path_factory.mktemp(kind) / 'pretrained.pth'
        torch.save({'model': plain.state_dict()}, path)
        files[kind] = (str(path), plain.state_dict())
    return files


def synthetic_task(n=8):
    """Images whose class is the quadrant with the brightest patch."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.1
    y = torch.arange(n) % 4
    for i, c in enumerate(y.tolist()):
        r, s = divmod(c, 2)
        x[i, :, r * 16:r * 16 + 16, s * 16:s * 16 + 16] += 1.0
    return x, y


def recipe_optim(model):
    """The VTAB-1k recipe's optimiser settings (custom keys, decay multipliers), fp32 wrapper."""
    cfg = Config.fromfile(f'{ROOT}/configs/_base_/schedules/vtab1k_100e.py').optim_wrapper
    cfg = dict(cfg.to_dict(), type='OptimWrapper', optimizer=dict(cfg.optimizer, lr=1e-2))
    cfg.pop('dtype')
    return build_optim_wrapper(model, cfg)


@pytest.mark.parametrize('kind,method', [('vim', m) for m in VIM_METHODS]
                         + [('vmamba', m) for m in VMAMBA_METHODS])
def test_method_trains_only_its_tensors_and_its_checkpoint_reloads(kind, method,
                                                                   pretrained_files):
    peft, must_change = (VIM_METHODS if kind == 'vim' else VMAMBA_METHODS)[method]
    path, plain = pretrained_files[kind]
    file = None if method == 'scratch' else path
    torch.manual_seed(0)
    model = build(kind, peft, file)
    if file:  # the pretrained tensors arrived, through any PEFT wrapper
        state = model.backbone.state_dict()
        for key, value in plain.items():
            wrapped = [k for k in state if k.replace('.original_layer', '') == key]
            assert len(wrapped) == 1 and torch.equal(state[wrapped[0]], value), key
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    everything = method in ('full', 'scratch')
    assert (trainable == {n for n, _ in model.named_parameters()}) == everything
    if method == 'linear':
        assert trainable == {'head.fc.weight', 'head.fc.bias'}
    optim = recipe_optim(model)
    x, y = synthetic_task()
    model.train()
    for _ in range(3):
        optim.update_params(F.cross_entropy(model(x, mode='tensor'), y))
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed <= trainable, f'frozen tensors changed: {sorted(changed - trainable)[:3]}'
    assert 'head.fc.weight' in changed
    if must_change:
        assert any(must_change in k for k in changed), (must_change, sorted(changed)[:5])

    # the trainable-only checkpoint the PEFT hook writes reloads onto a fresh model exactly
    ckpt = {'state_dict': dict(after), 'meta': {}}
    PEFTCheckpointHook().before_save_checkpoint(types.SimpleNamespace(model=model), ckpt)
    assert set(ckpt['state_dict']) == (set(after) if everything else trainable)
    torch.manual_seed(123)
    fresh = build(kind, peft, file)
    fresh.load_state_dict(complete_trainable_checkpoint(fresh, ckpt)['state_dict'], strict=True)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x, mode='tensor'), fresh(x, mode='tensor'))


# ----------------------------------------------------------------------- by-hand formulations
def randomize_peft(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def merged_plain_vim(model):
    """A plain Vim (peft=None) with every LoRA update and delta folded in, by hand."""
    b = model.backbone
    plain = Vim(TINY_VIM, img_size=32, patch_size=8, drop_path_rate=0.0).eval()
    state = {}
    src = b.state_dict()
    for key in plain.state_dict():
        base = [k for k in src if k.replace('.original_layer', '') == key]
        state[key] = src[base[0]].clone()
    for name, module in b.named_modules():
        if hasattr(module, 'lora_down') and hasattr(module, 'rows'):
            key = name.replace('.original_layer', '') + '.weight'
            w_up, w_down = module.lora_up.weight, module.lora_down.weight
            start, stop = module.rows
            state[key][start:stop] += module.scaling * w_up @ w_down
        elif hasattr(module, 'lora_down'):  # LoRAConv2d: k x k down then 1x1 up
            up = module.lora_up.weight[:, :, 0, 0]
            delta = torch.einsum('or,rcij->ocij', up, module.lora_down.weight)
            state[name.replace('.original_layer', '') + '.weight'] += module.scaling * delta
    for name, module in b.named_modules():
        if name.endswith('delta'):
            owner = name[:-len('delta')]
            for tensor, value in module.named_parameters():
                target = {'dt_bias': 'dt_proj.bias', 'dt_bias_b': 'dt_proj_b.bias',
                          'conv1d': 'conv1d.weight', 'conv1d_b': 'conv1d_b.weight'}.get(
                              tensor, tensor)
                state[owner + target] += value
    plain.load_state_dict(state)
    return plain


@pytest.mark.parametrize('peft', [
    dict(lora=dict(x_proj=3)), dict(lora=dict(dt_proj=3)), dict(lora=dict(embed=3)),
    dict(lora=dict(in_proj=3, in_proj_x=2, in_proj_z=2, out_proj=3)),
    dict(lora=dict(x_proj=2, x_proj_B=2)),
    dict(partial=dict(A_log=True, D=True, conv1d=True, dt_bias=True, cls_token=True,
                      pos_embed=True)),
], ids=['xproj', 'dtproj', 'embed', 'in-x-z-out', 'xproj+B', 'partial-all'])
def test_lora_and_partial_equal_a_plain_model_with_the_update_folded_in(peft):
    lora = peft.get('lora')
    if lora is not None:
        peft = dict(peft, lora=dict(lora, dropout=0.0))
    model = build('vim', peft).eval()
    randomize_peft(model)
    plain = merged_plain_vim(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.backbone(x)[0], plain(x)[0], atol=1e-5, rtol=1e-4)
    # and the deployment tool's merge gives the same plain layers
    from conftest import load_tool
    merged = load_tool('merge_lora').merge_lora_layers(model)
    assert (merged > 0) == (lora is not None)
    assert not any(hasattr(m, 'lora_down') for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model.backbone(x)[0], plain(x)[0], atol=1e-5, rtol=1e-4)


def test_parallel_adapter_follows_its_formula():
    lin = nn.Linear(6, 4)
    ad = ParallelAdapter(lin, rank=3, scale=0.1).eval()
    randomize_peft(ad)
    x = torch.randn(5, 6)
    expected = lin(x) + 0.1 * F.relu(x @ ad.adapter_down.weight.t()) @ ad.adapter_up.weight.t()
    assert torch.allclose(ad(x), expected, atol=1e-6)
    assert not any(p.requires_grad for p in lin.parameters())


def literal_direction(mixer, x, z, sfx, A=None, xproj=None):
    """One direction of the official mixer, channels-first, inputs in its own token order."""
    conv = getattr(mixer, 'conv1d' + sfx)
    L, D = x.shape[1], x.shape[2]
    xc = F.silu(F.conv1d(x.transpose(1, 2), conv.weight, conv.bias,
                         padding=conv.weight.shape[-1] - 1, groups=D)[..., :L])
    weight = xproj if xproj is not None else getattr(mixer, 'x_proj' + sfx).weight
    n = (weight.shape[0] - mixer.dt_rank) // 2
    dt, B, C = (xc.transpose(1, 2) @ weight.t()).split([mixer.dt_rank, n, n], dim=-1)
    dt_proj = getattr(mixer, 'dt_proj' + sfx)
    A_log, Dp = (mixer.A_b_log, mixer.D_b) if sfx else (mixer.A_log, mixer.D)
    A = -torch.exp(A_log) if A is None else A
    y = selective_scan_reference(xc, (dt @ dt_proj.weight.t()).transpose(1, 2), A,
                                 B.transpose(1, 2), C.transpose(1, 2),
                                 Dp if A.shape[1] == mixer.d_state else Dp * 0,
                                 None if z is None else z.transpose(1, 2), dt_proj.bias, True)
    return y.transpose(1, 2)


def test_affix_equals_the_official_prefix_formulation():
    """Each direction's tokens go in front of that direction's (flipped, for backward) xz."""
    model = build('vim', dict(affix=dict(tokens=2))).eval()
    randomize_peft(model)
    mixer = model.backbone.layers[1].mixer
    hidden = torch.randn(2, 9, TINY_VIM['embed_dims'])
    tokens = model.backbone.affix().view(2, TINY_VIM['depth'], 2, -1)[:, 1]   # (T, 2, 2D)
    with torch.no_grad():
        ours, _ = mixer(hidden, None, tokens.permute(1, 0, 2))
        xz = mixer.in_proj(hidden)
        fwd = torch.cat([tokens[:, 0].expand(2, -1, -1), xz], 1)
        bwd = torch.cat([tokens[:, 1].expand(2, -1, -1), xz.flip(1)], 1)
        y_f = literal_direction(mixer, *fwd.chunk(2, -1), '')[:, 2:]
        y_b = literal_direction(mixer, *bwd.chunk(2, -1), '_b')[:, 2:]
        expected = mixer.out_proj((y_f + y_b.flip(1)) / 2)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-4)


def test_additional_scan_adds_independent_states():
    """y = scan over the N pretrained states + scan over the k extra ones (D once), gated."""
    model = build('vim', dict(additional_scan=dict(states=3))).eval()
    randomize_peft(model)
    mixer = model.backbone.layers[0].mixer
    hidden = torch.randn(2, 9, TINY_VIM['embed_dims'])
    with torch.no_grad():
        ours, _ = mixer(hidden)
        x, z = mixer.in_proj(hidden).chunk(2, -1)
        ys = []
        for sfx, extra in (('', mixer.extra_scan[0]), ('_b', mixer.extra_scan[1])):
            xd, zd = (x, z) if not sfx else (x.flip(1), z.flip(1))
            base = literal_direction(mixer, xd, None, sfx)
            w = getattr(mixer, 'x_proj' + sfx).weight
            extra_w = torch.cat([w[:mixer.dt_rank], extra.x_proj.weight], 0)   # [dt | B' | C']
            more = literal_direction(mixer, xd, None, sfx, A=-torch.exp(extra.A_log),
                                     xproj=extra_w)
            y = (base + more) * F.silu(zd)
            ys.append(y if not sfx else y.flip(1))
        expected = mixer.out_proj((ys[0] + ys[1]) / 2)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-4)
    # the extra A starts as the pretrained first column
    fresh = build('vim', dict(additional_scan=dict(states=3)))
    m0 = fresh.backbone.layers[0].mixer
    assert torch.equal(m0.extra_scan[1].A_log, m0.A_b_log[:, :1].expand(-1, 3))


def test_prompt_tokens_surround_the_sequence_and_move_the_cls_index():
    model = build('vim', dict(prompt=dict(tokens=3, projection=False))).eval()
    randomize_peft(model)
    b = model.backbone
    seen = {}
    b.layers[0].register_forward_pre_hook(lambda m, args: seen.update(input=args[0]))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = b(x)[0]
        p = b.prompt.embedding.weight
        hidden = seen['input']                     # (B, 2 + 17 + 1, C)
        assert hidden.shape[1] == 16 + 1 + 3
        assert torch.equal(hidden[:, :2], p[:2].expand(2, -1, -1))
        assert torch.equal(hidden[:, -1:], p[2:].expand(2, -1, -1))
        # the output is the token that was the cls token, now at 8 + 2
        residual, h, membrane = None, hidden, None
        for layer in b.layers:
            h, residual, membrane = layer(h, residual, membrane)
        assert torch.allclose(out, b.norm_f(residual + h)[:, 10], atol=1e-6)
        cls_in = b.cls_token[0, 0] + b.pos_embed[0, 8]
        assert torch.allclose(hidden[:, 10], cls_in.expand(2, -1), atol=1e-6)


def test_peft_names_and_unsupported_methods_fail_in_one_line():
    assert parse_peft('full') is None and parse_peft(None) is None
    assert parse_peft('linear').methods() == () and parse_peft('{}').methods() == ()
    with pytest.raises(ValueError, match="peft must be a dict, None or one of full"):
        parse_peft('lienar')
    with pytest.raises(ValueError, match=r'VanillaVMamba: peft.affix is not supported'):
        VanillaVMamba(TINY_VMAMBA, img_size=32, peft=dict(affix=dict(tokens=1)))
    with pytest.raises(ValueError, match=r'VanillaVMamba: peft.lora.x_proj is not supported'):
        VanillaVMamba(TINY_VMAMBA, img_size=32, peft=dict(lora=dict(x_proj=2)))
    with pytest.raises(ValueError, match='peft.gate and peft.affix cannot be combined'):
        Vim(TINY_VIM, img_size=32, patch_size=8, peft=dict(gate=dict(rank=2),
                                                           affix=dict(tokens=1)))
    # the command line's `--cfg-options model.backbone.peft={}` (a string) means linear probing
    from mmengine.config import DictAction
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    value = parser.parse_args(['--cfg-options', 'model.backbone.peft={}']).cfg_options
    model = build('vim', value['model.backbone.peft'])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {'head.fc.weight', 'head.fc.bias'}


def test_partial_deltas_get_mambapeft_weight_decay():
    model = build('vim', dict(partial=dict(A_log=True, D=True, conv1d=True, dt_bias=True,
                                           cls_token=True)))
    optim = recipe_optim(model)
    decay = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optim.optimizer.param_groups:
        for p in group['params']:
            decay[names[id(p)]] = group['weight_decay']
    wd = 1e-4
    assert math.isclose(decay['backbone.layers.0.mixer.delta.A_b_log'], 10 * wd)
    assert math.isclose(decay['backbone.layers.0.mixer.delta.D_b'], 10 * wd)
    assert math.isclose(decay['backbone.layers.0.mixer.delta.conv1d'], 10 * wd)
    assert math.isclose(decay['backbone.layers.0.mixer.delta.dt_bias'], 100 * wd)
    assert math.isclose(decay['backbone.delta.cls_token'], wd)
