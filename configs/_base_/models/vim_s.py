# Vim-S (vim_s_midclstok, ImageNet-1k 80.5%) with a linear head, no PEFT.
pretrained = 'work_dirs/pretrained/vim_s_midclstok_80p5acc.pth'
model = dict(
    type='ImageClassifier',
    backbone=dict(type='Vim', arch='small', img_size=224, cuda_graph=True, drop_path_rate=0.1,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=None,
    head=dict(type='LinearClsHead', num_classes=1000, in_channels=384,
              loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
              init_cfg=dict(type='Constant', layer='Linear', val=0)),
)
