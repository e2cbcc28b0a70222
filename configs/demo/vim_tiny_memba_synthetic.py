# CPU demo: a tiny Memba Vim on the synthetic VTAB-style tasks written by
#   python tools/prepare_vtab1k.py --synthetic --out data/vtab-1k-synthetic
# The backbone is randomly initialised and frozen, as a pretrained one would be;
# LoRA, the membrane gates and the head learn. d_state and the gate rank are
# Vim-S's (16), so on a GPU the demo runs the same scan kernels as the real model.
# tools/sweep.py --config ... --tasks T sets the task (both datasets, experiment.task and the
# head's classes; see tools/demo.sh); with tools/train.py set train_dataloader.dataset.task,
# test_dataloader.dataset.task and model.head.num_classes.
_base_ = [
    '../_base_/datasets/vtab1k.py',
    '../_base_/schedules/vtab1k_100e.py',
    '../_base_/default_runtime.py',
]
task = 'dsprites_loc'
num_classes = 16
experiment = dict(backbone='vim_tiny', method='memba', task=task)
data_root = 'data/vtab-1k-synthetic'
image_size = 32

model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='Vim', arch=dict(embed_dims=64, depth=4, d_state=16), img_size=image_size,
        patch_size=8, drop_path_rate=0.0, cuda_graph=True,
        peft=dict(lora=dict(in_proj=16, out_proj=16),
                  gate=dict(rank=16, num_chunks=4, leak=0.5, threshold=1.0, transfer=True))),
    neck=None,
    head=dict(type='LinearClsHead', num_classes=num_classes, in_channels=64,
              loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
              init_cfg=dict(type='Constant', layer='Linear', val=0)),
)

pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(image_size, image_size), interpolation='bicubic',
         backend='pillow'),
    dict(type='PackInputs'),
]
train_dataloader = dict(batch_size=32, num_workers=1, dataset=dict(
    data_root=data_root, task=task, pipeline=pipeline))
test_dataloader = dict(batch_size=64, num_workers=1, dataset=dict(
    data_root=data_root, task=task, pipeline=pipeline))

max_epochs = 8
optim_wrapper = dict(optimizer=dict(lr=5e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-2, by_epoch=True, begin=0, end=1,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=1, end=max_epochs,
         convert_to_iter_based=True),
]
train_cfg = dict(max_epochs=max_epochs)
# a checkpoint every epoch: the demo's epochs take a second
default_hooks = dict(logger=dict(interval=5), checkpoint=dict(interval=1))
