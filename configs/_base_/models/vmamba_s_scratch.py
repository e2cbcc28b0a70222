# Scratch: random initialisation, every tensor trains (no pretrained file).
_base_ = ['./vmamba_s.py']
model = dict(backbone=dict(init_cfg=None))
