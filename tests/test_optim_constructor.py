"""MergedParamGroupsConstructor: mmengine's per-parameter settings, in few groups."""
import copy

import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope
from mmpretrain.registry import MODELS

import memba_vision  # noqa: F401

from conftest import ROOT

TINY_VIM = dict(embed_dims=32, depth=2, d_state=4)
MEMBA = dict(lora=dict(in_proj=8, out_proj=8, dropout=0.0), gate=dict(rank=4, num_chunks=4))


def _classifier():
    torch.manual_seed(0)
    clf = MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='Vim', arch=TINY_VIM, img_size=32, patch_size=8, peft=MEMBA,
                      drop_path_rate=0.0),
        head=dict(type='LinearClsHead', num_classes=5, in_channels=32)))
    with torch.no_grad():  # a live gate and LoRA path
        for p in clf.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return clf


def _settings(optim):
    """{param id: (lr, weight_decay)} as the optimiser will apply them."""
    return {id(p): (g['lr'], g['weight_decay'])
            for g in optim.optimizer.param_groups for p in g['params']}


def test_merged_groups_match_mmengine_per_parameter_settings():
    init_default_scope('mmpretrain')
    cfg = Config.fromfile(f'{ROOT}/configs/_base_/schedules/vtab1k_100e.py').optim_wrapper
    cfg = dict(cfg, type='OptimWrapper')  # the constructor is what is under test
    cfg.pop('dtype')
    assert cfg['constructor'] == 'MergedParamGroupsConstructor'
    default_cfg = {k: v for k, v in cfg.items() if k != 'constructor'}

    clf_a, clf_b = _classifier(), _classifier()
    merged = build_optim_wrapper(clf_a, copy.deepcopy(cfg))
    default = build_optim_wrapper(clf_b, copy.deepcopy(default_cfg))
    trainable = [p for p in clf_a.parameters() if p.requires_grad]
    assert len(default.optimizer.param_groups) == len(trainable)  # one group per tensor
    assert len(merged.optimizer.param_groups) == 2  # decayed weights; the head bias (no decay)

    ids_a = {id(p): n for n, p in clf_a.named_parameters()}
    ids_b = {id(p): n for n, p in clf_b.named_parameters()}
    got = {ids_a[i]: s for i, s in _settings(merged).items()}
    want = {ids_b[i]: s for i, s in _settings(default).items()}
    assert got == want
    assert got['head.fc.bias'][1] == 0.0 and got['head.fc.weight'][1] == 1e-4

    # the same training trajectory, clipping included
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for clf, optim in ((clf_a, merged), (clf_b, default)):
        clf.train()
        for _ in range(3):
            optim.update_params(torch.nn.functional.cross_entropy(clf(x, mode='tensor'), y))
    for (n, pa), pb in zip(clf_a.named_parameters(), clf_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7, msg=n)


def test_frozen_tensors_are_counted_in_one_line():
    """mmengine warns once per frozen tensor; the constructor logs one line that counts them."""
    import logging

    from mmengine.logging import MMLogger
    init_default_scope('mmpretrain')
    cfg = Config.fromfile(f'{ROOT}/configs/_base_/schedules/vtab1k_100e.py').optim_wrapper
    cfg = dict(cfg, type='OptimWrapper')
    cfg.pop('dtype')
    clf = _classifier()
    frozen = sum(1 for p in clf.parameters() if not p.requires_grad)
    assert frozen > 10
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        build_optim_wrapper(clf, cfg)
        # the stock constructor still warns, and the filter is gone afterwards
        build_optim_wrapper(clf, {k: v for k, v in cfg.items() if k != 'constructor'})
    finally:
        logger.removeHandler(handler)
    skipped = [m for m in messages if 'requires_grad=False' in m]
    assert skipped[0] == f'{frozen} frozen tensors (requires_grad=False) are not optimised'
    assert len(skipped) == 1 + frozen and all('is skipped since' in m for m in skipped[1:])
