# Affix-tuning without projection: the 3 x (24 x 2 x 1536) tokens are learned directly.
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(affix=dict(tokens=3, projection=False))))
