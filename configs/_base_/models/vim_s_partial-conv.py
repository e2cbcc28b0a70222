# Partial tuning of the conv1d weights: zero-initialised deltas (weight decay x10).
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(partial=dict(conv1d=True))))
