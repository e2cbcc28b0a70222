# Partial tuning of A_log: a zero-initialised delta per direction (weight decay x10).
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(partial=dict(A_log=True))))
