"""Own data: VTAB1k on tasks outside the 19 (list and folder layouts, class count
from the data), and the README's worked example end to end on the CPU: fine-tune
from a pretrained file with tools/train.py, test with tools/test.py, tabulate."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from memba_vision.datasets import VTAB1k, task_num_classes
from memba_vision.utils import load_checkpoint_file

CLASSES = ('cat', 'dog', 'rabbit')
TINT = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], np.float64)


def image(label, rng, size=32):
    """A noisy colour field: the class is the dominant channel."""
    pixels = TINT[label] + rng.normal(0, 40, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def folder_task(root, task='my_data', n_train=24, n_test=12, seed=0):
    """mmpretrain's CustomDataset layout: <task>/<split>/<class>/<image>."""
    rng = np.random.default_rng(seed)
    for split, n in (('train', n_train), ('test', n_test)):
        for label, name in enumerate(CLASSES):
            folder = root / task / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                image(label, rng).save(folder / f'{i}.jpg')
    return root / task


def test_list_layout_class_count_from_labels_or_classes_txt(tmp_path):
    task_dir = tmp_path / 'digits_b'
    (task_dir / 'img').mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, label in enumerate([0, 6, 2, 1, 6, 0]):  # 7 classes by the largest label
        image(label % 3, rng, 8).save(task_dir / 'img' / f'{i}.jpg')
        lines.append(f'img/{i}.jpg {label}')
    for split in ('train800val200', 'test'):
        (task_dir / f'{split}.txt').write_text('\n'.join(lines) + '\n')
    ds = VTAB1k('digits_b', 'train800val200', data_root=str(tmp_path))
    assert ds.num_classes == 7 and len(ds.metainfo['classes']) == 7
    assert [ds.get_data_info(i)['gt_label'] for i in range(6)] == [0, 6, 2, 1, 6, 0]
    assert VTAB1k('digits_b', 'test', data_root=str(tmp_path), num_classes=11).num_classes == 11
    (task_dir / 'classes.txt').write_text('\n'.join(f'c{i}' for i in range(9)) + '\n')
    ds = VTAB1k('digits_b', 'test', data_root=str(tmp_path))
    assert ds.num_classes == 9 and ds.metainfo['classes'][8] == 'c8'
    with pytest.raises(ValueError, match='label 6 outside'):
        VTAB1k('digits_b', 'test', data_root=str(tmp_path), num_classes=3)
    # the 19 tasks keep their table's count
    with pytest.raises(ValueError, match='47 classes'):
        task_num_classes(str(tmp_path), 'dtd', 5)


def test_folder_layout(tmp_path):
    folder_task(tmp_path, n_train=3, n_test=2)
    ds = VTAB1k('my_data', 'train', data_root=str(tmp_path))
    assert ds.num_classes == 3 and tuple(ds.metainfo['classes']) == CLASSES
    infos = [ds.get_data_info(i) for i in range(len(ds))]
    assert len(infos) == 9
    for info in infos:  # label = the sorted class folder's index
        folder = info['img_path'].split('/')[-2]
        assert info['gt_label'] == CLASSES.index(folder)


def tool(*args):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f'{args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc


def test_worked_example_fine_tunes_tests_and_tabulates(tmp_path):
    """configs/custom/vim_s_memba_my_data.py on a 3-class folder dataset, from a
    pretrained file (a tiny Vim stands in for Vim-S on the CPU)."""
    from mmpretrain.registry import MODELS
    data = tmp_path / 'custom'
    folder_task(data)
    pretrained = tmp_path / 'pretrained.pth'  # official format: {'model': state_dict}
    torch.manual_seed(0)
    plain = MODELS.build(dict(type='Vim', arch=dict(embed_dims=32, depth=2, d_state=4),
                              img_size=32, patch_size=8))
    torch.save({'model': plain.state_dict()}, pretrained)
    cfg = tmp_path / 'my_data_tiny.py'
    cfg.write_text(f"""
_base_ = ['{ROOT}/configs/custom/vim_s_memba_my_data.py']
data_root = '{data}'
pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
model = dict(
    backbone=dict(arch=dict(_delete_=True, embed_dims=32, depth=2, d_state=4), img_size=32,
                  patch_size=8,
                  peft=dict(lora=dict(in_proj=8, out_proj=8), gate=dict(rank=4)),
                  init_cfg=dict(type='Pretrained', checkpoint='{pretrained}')),
    head=dict(in_channels=32))
train_dataloader = dict(batch_size=12, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=pipeline))
test_dataloader = dict(num_workers=0, dataset=dict(data_root=data_root, pipeline=pipeline))
max_epochs = 4
param_scheduler = [dict(type='CosineAnnealingLR', eta_min=1e-4, by_epoch=True, begin=0,
                        end=max_epochs, convert_to_iter_based=True)]
optim_wrapper = dict(optimizer=dict(lr=1e-2))
train_cfg = dict(max_epochs=max_epochs)
""")
    work = tmp_path / 'work'
    tool('tools/train.py', str(cfg), '--work-dir', str(work))
    # the VTAB-1k configs' training set: decoded once and cached
    assert 'cache_images=True' in (work / 'my_data_tiny.py').read_text()
    ckpt = load_checkpoint_file(str(work / 'epoch_4.pth'))
    assert ckpt['state_dict']['head.fc.weight'].shape == (3, 32)  # 3 classes, from the data
    tool('tools/test.py', str(cfg), str(work / 'epoch_4.pth'), '--work-dir', str(work))
    result = json.loads((work / 'result_my_data.json').read_text())
    assert result['task'] == 'my_data' and result['num_images'] == 36
    assert result['top1'] > 2 * 100 / 3, result  # chance is 33%
    table = tool('tools/vtab_table.py', str(work)).stdout
    assert 'Custom: my_data' in table and f"{result['top1']:.2f}" in table
