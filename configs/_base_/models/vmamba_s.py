# Vanilla-VMamba-S (VMamba v0, ImageNet-1k 83.5%) with a linear head, no PEFT.
pretrained = 'work_dirs/pretrained/vssm_small_v0.pth'
model = dict(
    type='ImageClassifier',
    backbone=dict(type='VanillaVMamba', arch='small', img_size=224, drop_path_rate=0.3,
                  cuda_graph=True,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=None,
    head=dict(type='LinearClsHead', num_classes=1000, in_channels=768,
              loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
              init_cfg=dict(type='Constant', layer='Linear', val=0)),
)
