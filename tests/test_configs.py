"""Configs: generated files are current, every VTAB config builds with the right class
count and the DeiT recipe, and parameter counts match the paper (Table 3)."""
import copy
import glob
import os.path as osp
import subprocess
import sys

import pytest
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmpretrain.registry import DATASETS, MODELS

from conftest import ROOT
from memba_vision.datasets.vtab1k_tasks import VTAB1K_TASKS

sys.path.insert(0, osp.join(ROOT, 'tools'))
import count_params  # noqa: E402
import gen_configs  # noqa: E402

CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', 'vtab1k', '*.py')))


def test_generated_configs_are_current():
    assert len(CONFIGS) == 2 * 6 * 19
    assert gen_configs.stale_files() == []
    # and the check fails when a file is edited by hand
    path = CONFIGS[0]
    text = open(path).read()
    try:
        with open(path, 'w') as f:
            f.write(text.replace('num_classes=', 'num_classes=1+'))
        assert gen_configs.stale_files() == [osp.basename(path)]
        assert subprocess.call([sys.executable, osp.join(ROOT, 'tools', 'gen_configs.py'),
                                '--check'], stdout=subprocess.DEVNULL) == 1
    finally:
        with open(path, 'w') as f:
            f.write(text)


@pytest.fixture(scope='module')
def fake_vtab_root(tmp_path_factory):
    """Every task with one tiny image per list file."""
    from PIL import Image
    root = tmp_path_factory.mktemp('vtab')
    for task in VTAB1K_TASKS:
        d = root / task / 'images'
        d.mkdir(parents=True)
        Image.new('RGB', (8, 8)).save(d / '0.jpg')
        for split in ('train800', 'val200', 'train800val200', 'test'):
            (root / task / f'{split}.txt').write_text('images/0.jpg 0\n')
    return str(root)


def strip_head(model_cfg):
    cfg = copy.deepcopy(model_cfg.to_dict())
    cfg['head'].pop('num_classes')
    return cfg


def test_every_vtab_config_builds_with_its_task_and_the_recipe(fake_vtab_root):
    init_default_scope('mmpretrain')
    built = {}
    for path in CONFIGS:
        cfg = Config.fromfile(path)
        exp = cfg.experiment
        task = VTAB1K_TASKS[exp.task]
        name = osp.basename(path)
        assert name == f'{exp.backbone}_{exp.method}_{exp.task}.py'
        # class count and task wiring
        assert cfg.model.head.num_classes == task.num_classes, name
        for loader in ('train_dataloader', 'test_dataloader'):
            assert cfg[loader].dataset.task == exp.task, name
        assert cfg.train_dataloader.dataset.split == 'train800val200'
        assert cfg.test_dataloader.dataset.split == 'test'
        # DeiT recipe of DESIGN.md
        opt = cfg.optim_wrapper
        assert (opt.optimizer.type, opt.optimizer.lr, opt.optimizer.weight_decay) == ('AdamW', 1e-3, 1e-4)
        assert opt.clip_grad.max_norm == 5.0 and cfg.train_dataloader.batch_size == 32
        # the fast settings (bf16 autocast, CUDA-graph replay) are the configs' own
        assert (opt.type, opt.dtype) == ('BF16OptimWrapper', 'bfloat16')
        assert cfg.default_hooks.runtime_info.type == 'DeferredRuntimeInfoHook'
        assert cfg.model.backbone.cuda_graph is True
        assert cfg.train_cfg.max_epochs == 100
        assert cfg.train_cfg.type == 'EpochBasedTrainLoop'
        warm, cos = cfg.param_scheduler
        assert (warm.type, warm.end, cos.type, cos.begin, cos.end, cos.eta_min) == \
            ('LinearLR', 10, 'CosineAnnealingLR', 10, 100, 1e-5)
        assert opt.paramwise_cfg.norm_decay_mult == 0 and opt.paramwise_cfg.bias_decay_mult == 0
        for key in ('.pos_embed', '.cls_token', '.A_log', '.A_b_log', '.D', '.D_b'):
            assert opt.paramwise_cfg.custom_keys[key].decay_mult == 0
        resize = cfg.test_dataloader.dataset.pipeline[1]
        assert (resize.scale, resize.interpolation) == ((224, 224), 'bicubic')
        assert cfg.data_preprocessor.mean == [123.675, 116.28, 103.53]
        drop = cfg.model.backbone.drop_path_rate
        assert drop == (0.1 if exp.backbone == 'vim_s' else 0.3)
        # datasets build
        for loader in ('train_dataloader', 'test_dataloader'):
            ds_cfg = dict(cfg[loader].dataset, data_root=fake_vtab_root, cache_images=False)
            ds = DATASETS.build(ds_cfg)
            assert len(ds.metainfo['classes']) == task.num_classes
        # the model: one build per backbone/method, heads checked per task
        key = (exp.backbone, exp.method)
        if key not in built:
            model_cfg = cfg.model.copy()
            model_cfg.backbone = dict(model_cfg.backbone, init_cfg=None)
            built[key] = (MODELS.build(model_cfg), strip_head(cfg.model))
        model, ref = built[key]
        assert strip_head(cfg.model) == ref, name
    assert len(built) == 12


EXPECTED_TRAINABLE = {  # paper Table 3 (head excluded)
    'vim_s_memba': 4718592, 'vim_s_memba-in': 2064384, 'vim_s_memba-out': 3244032,
    'vim_s_lora-in': 1474560, 'vim_s_lora-out': 2654208,
    'vmamba_s_memba': 7987200, 'vmamba_s_memba-in': 5591040, 'vmamba_s_memba-out': 3993600,
    'vmamba_s_lora': 6389760, 'vmamba_s_lora-in': 3993600, 'vmamba_s_lora-out': 2396160,
}


@pytest.mark.parametrize('name', sorted(EXPECTED_TRAINABLE))
def test_trainable_parameter_counts_match_the_paper(name):
    cfg = Config.fromfile(osp.join(ROOT, 'configs', '_base_', 'models', f'{name}.py'))
    assert count_params.count(cfg.model)['trainable_excluding_head'] == EXPECTED_TRAINABLE[name]


def test_count_params_cli_prints_the_count_last():
    out = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'count_params.py'),
                          osp.join(ROOT, 'configs', 'vtab1k', 'vim_s_memba_dtd.py')],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == 'trainable (excluding head): 4718592'
