"""Converts an official Vim or Vanilla-VMamba checkpoint to memba_vision backbone weights.

    python tools/convert_checkpoint.py vssmsmall_dp03_ckpt_epoch_238.pth work_dirs/pretrained/vssm_small_v0.pth

Key names are mapped onto the backbone's (VMamba's legacy and current names
both work), the classifier head and the training state (optimizer, EMA, args)
are dropped. The backbones also load official files directly; converting once
gives a small, tensor-only file.
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def detect_family(state: dict) -> str:
    if any('.mixer.in_proj.' in k for k in state):
        return 'vim'
    if any('.blocks.' in k and ('.op.' in k or '.self_attention.' in k) for k in state):
        return 'vmamba'
    raise ValueError('neither a Vim nor a Vanilla-VMamba checkpoint '
                     f'(first keys: {sorted(state)[:5]})')


def convert(state: dict, family: str) -> dict:
    from memba_vision.models.backbones import VanillaVMamba
    if family == 'vim':
        return {k: v for k, v in state.items() if not k.startswith('head.')}
    return VanillaVMamba.convert_official(state)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('src')
    p.add_argument('dst')
    p.add_argument('--checkpoint-key', help="entry holding the weights, e.g. 'model_ema'")
    args = p.parse_args()
    import torch
    from memba_vision.utils import CheckpointError, extract_state_dict, load_checkpoint_file
    try:
        state = extract_state_dict(load_checkpoint_file(args.src), args.src,
                                   args.checkpoint_key)
        family = detect_family(state)
    except CheckpointError as e:
        raise SystemExit(f'error: {e}')
    except ValueError as e:
        raise SystemExit(f'error: {args.src}: {e}')
    out = convert(state, family)
    os.makedirs(osp.dirname(osp.abspath(args.dst)), exist_ok=True)
    torch.save({'state_dict': out, 'meta': dict(source=osp.basename(args.src), family=family)},
               args.dst)
    print(f'{family}: wrote {len(out)} backbone tensors '
          f'({sum(v.numel() for v in out.values()):,} parameters) to {args.dst}')


if __name__ == '__main__':
    main()
