# Your own image classification data, read by VTAB1k like a VTAB-1k task (same
# 224x224 pipeline, cached training images, the device-side training loop):
#   <data_root>/<task>/train800val200.txt and test.txt   list layout ('path label' lines,
#                                                         any number of lines), or
#   <data_root>/<task>/train/<class>/*.jpg and test/<class>/*.jpg   mmpretrain's
#                                                         CustomDataset folder layout
# A config sets `task` in both dataloaders (and for the folder layout split='train'
# in the training one). model.head.num_classes=None reads the class count from the
# data: <task>/classes.txt (one name a line), the class folders, or 1 + the largest
# label of the list files. See README "Fine-tune on your own data".
_base_ = ['./vtab1k.py']
data_root = 'data/custom'
train_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = dict(dataset=dict(data_root=data_root))
