"""Folds LoRA into the frozen weights of a fine-tuned model, for deployment.

    python tools/merge_lora.py CONFIG CHECKPOINT OUT [--verify]

Every LoRA layer becomes a plain layer with W + s * B A; the membrane gate and a
ParallelAdapter are not linear and stay. OUT is a full checkpoint ({'state_dict', 'meta'}) that
tools/test.py accepts with the same config (the LoRA factors it lacks start as
an exact zero update).
"""
import argparse
import copy
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def merge_lora_layers(model) -> int:
    """Replaces every LoRA layer in ``model`` (LoRALinear, MergedLoRALinear, LoRAConv2d) by
    its merged plain layer; returns how many. Nested LoRA layers merge with their parent."""
    from memba_vision.models.peft import LoRAConv2d, LoRALinear, MergedLoRALinear
    kinds = (LoRALinear, MergedLoRALinear, LoRAConv2d)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
    targets = [(n, m) for n, m in targets  # outermost only
               if not any(n.startswith(o + '.') for o, _ in targets)]
    for name, module in targets:
        parent_name, _, attr = name.rpartition('.')
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, module.merged())
    return len(targets)


def build_finetuned(config: str, checkpoint: str):
    """The config's model with pretrained weights and the fine-tuned checkpoint loaded."""
    import memba_vision  # noqa: F401
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    from memba_vision.engine import complete_trainable_checkpoint
    from memba_vision.engine.runner_utils import load_config
    from memba_vision.utils import load_checkpoint_file
    init_default_scope('mmpretrain')
    cfg = load_config(config)
    model_cfg = cfg.model.copy()
    if cfg.get('data_preprocessor') is not None:
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    model = MODELS.build(model_cfg)
    model.init_weights()
    ckpt = complete_trainable_checkpoint(model, load_checkpoint_file(checkpoint))
    model.load_state_dict(ckpt['state_dict'], strict=True)
    return model.eval()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config')
    p.add_argument('checkpoint')
    p.add_argument('out')
    p.add_argument('--verify', action='store_true',
                   help='compare both models on a random batch and print the difference')
    args = p.parse_args()
    import torch
    from memba_vision.utils import CheckpointError
    try:  # a bad fine-tuned or pretrained checkpoint: one line
        model = build_finetuned(args.config, args.checkpoint)
    except (CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f'error: {e}')
    reference = copy.deepcopy(model) if args.verify else None
    n = merge_lora_layers(model)
    if n == 0:
        raise SystemExit(f'error: {args.config} has no LoRA layers to merge')
    if reference is not None:
        size = getattr(model.backbone, 'grid', (14, 14))[0] * getattr(
            getattr(model.backbone, 'patch_embed', None), 'patch_size', 16)
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            diff = (model(x, mode='tensor') - reference(x, mode='tensor')).abs().max().item()
        print(f'max |merged - LoRA| logit difference on a random batch: {diff:.3g}')
    torch.save({'state_dict': model.state_dict(),
                'meta': dict(merged_lora_from=args.checkpoint, config=args.config)}, args.out)
    print(f'merged {n} LoRA layers; wrote {args.out}')


if __name__ == '__main__':
    main()
