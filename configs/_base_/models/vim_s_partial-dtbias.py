# Partial tuning of the dt bias: zero-initialised deltas (weight decay x100).
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(partial=dict(dt_bias=True))))
