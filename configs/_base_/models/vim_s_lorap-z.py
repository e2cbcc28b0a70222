# LoRAp(Z): rank 64 on the z half of in_proj's outputs (the gate).
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(lora=dict(in_proj_z=64))))
