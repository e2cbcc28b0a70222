# Partial tuning of the position embedding: a zero-initialised delta.
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(partial=dict(pos_embed=True))))
