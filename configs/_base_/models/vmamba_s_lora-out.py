# LoRA baseline on out_proj (64).
_base_ = ['./vmamba_s.py']
model = dict(backbone=dict(peft=dict(
    lora=dict(out_proj=64))))
