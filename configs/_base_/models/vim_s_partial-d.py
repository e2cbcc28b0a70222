# Partial tuning of D: a zero-initialised delta per direction (weight decay x10).
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(partial=dict(D=True))))
