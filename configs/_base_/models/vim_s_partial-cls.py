# Partial tuning of the cls token: a zero-initialised delta.
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(partial=dict(cls_token=True))))
