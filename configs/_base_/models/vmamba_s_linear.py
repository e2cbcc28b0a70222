# Linear probing: the backbone is frozen, only the head trains.
_base_ = ['./vmamba_s.py']
model = dict(backbone=dict(peft='linear'))
