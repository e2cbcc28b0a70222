# VTAB-1k: train on train800val200, test on test; 224x224 bicubic, ImageNet
# mean/std, no augmentation. A task config sets `task` in both dataloaders and
# the head's num_classes.
data_root = 'data/vtab-1k'
image_size = 224

data_preprocessor = dict(  # merged into the model by the Runner
    type='AsyncClsDataPreprocessor',  # ClsDataPreprocessor with non-blocking copies
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    to_rgb=True)

pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(image_size, image_size), interpolation='bicubic',
         backend='pillow'),
    dict(type='PackInputs'),
]

train_dataloader = dict(
    batch_size=32,
    num_workers=4,
    persistent_workers=True,
    pin_memory=True,  # so that the preprocessor's copies to the GPU are asynchronous
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='default_collate'),
    # the 1,000 training images are decoded and resized once, then kept in memory
    dataset=dict(type='VTAB1k', data_root=data_root, task=None,
                 split='train800val200', pipeline=pipeline, cache_images=True),
)
test_dataloader = dict(
    batch_size=64,
    num_workers=4,
    persistent_workers=False,
    pin_memory=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='VTAB1k', data_root=data_root, task=None, split='test',
                 pipeline=pipeline),
)
test_evaluator = dict(type='Accuracy', topk=(1, ))
