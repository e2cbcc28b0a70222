# LoRAp(X): rank 64 on the x half of in_proj's outputs (the conv and SSM input).
_base_ = ['./vmamba_s.py']
model = dict(backbone=dict(peft=dict(lora=dict(in_proj_x=64))))
