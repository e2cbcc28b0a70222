"""Counts a config's parameters without loading any weights.

    python tools/count_params.py configs/_base_/models/vim_s_memba.py

The last line is ``trainable (excluding head): N``.
"""
import argparse
import os.path as osp
import sys
from collections import defaultdict

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def count(cfg_model) -> dict:
    """Parameter counts of a model config, built without pretrained weights."""
    import memba_vision  # noqa: F401
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    from memba_vision.models.peft import PEFT_MODULE_NAMES
    init_default_scope('mmpretrain')
    cfg_model = cfg_model.copy()
    if 'backbone' in cfg_model:
        cfg_model['backbone'] = dict(cfg_model['backbone'], init_cfg=None)
    model = MODELS.build(cfg_model)
    groups = defaultdict(int)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith('head.'):
            groups['head'] += p.numel()
        elif 'lora_' in name:  # by the wrapped layer (nested LoRA: in_proj and its x half)
            layer = name.replace('.original_layer', '').split('.lora_')[0].rsplit('.', 1)[-1]
            groups['lora (' + layer + ')'] += p.numel()
        elif '.gate.' in name:
            groups['membrane gate'] += p.numel()
        else:  # the other PEFT modules by name (affix, prompt, delta, extra_scan, adapter_*)
            parts = [part for part in name.split('.') if part in PEFT_MODULE_NAMES]
            groups[parts[0].split('_')[0] if parts and parts[0].startswith('adapter')
                   else parts[0] if parts else 'other backbone'] += p.numel()
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith('head.'))
    trainable_no_head = sum(v for k, v in groups.items() if k != 'head')
    return dict(total=total, backbone=total - head, groups=dict(groups),
                trainable_excluding_head=trainable_no_head)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config')
    args = p.parse_args()
    from mmengine.config import Config
    cfg = Config.fromfile(args.config)
    c = count(cfg.model)
    print(f"total parameters:      {c['total']:>12,}")
    print(f"backbone (no head):    {c['backbone']:>12,}")
    for k, v in sorted(c['groups'].items()):
        print(f'trainable {k:<19}{v:>12,}')
    print(f"trainable (excluding head): {c['trainable_excluding_head']}")


if __name__ == '__main__':
    main()
