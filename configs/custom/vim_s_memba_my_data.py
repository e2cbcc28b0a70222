# Worked example of README "Fine-tune on your own data": Memba on Vim-S fine-tuned on
# data/custom/my_data/train/<class>/*.jpg, tested on data/custom/my_data/test/<class>/*.jpg
# (mmpretrain's CustomDataset folder layout; the class count is read from the folders).
# For the list layout (train800val200.txt, test.txt) drop the two split= lines.
_base_ = [
    '../_base_/models/vim_s_memba.py',
    '../_base_/datasets/custom.py',
    '../_base_/schedules/vtab1k_100e.py',
    '../_base_/default_runtime.py',
]
task = 'my_data'
experiment = dict(backbone='vim_s', method='memba', task=task)
work_dir = f'work_dirs/custom/vim_s_memba/{task}'
model = dict(head=dict(num_classes=None))  # None: read from the data
train_dataloader = dict(dataset=dict(task=task, split='train'))
test_dataloader = dict(dataset=dict(task=task, split='test'))
