# LoRA baseline on in_proj (64).
_base_ = ['./vmamba_s.py']
model = dict(backbone=dict(peft=dict(
    lora=dict(in_proj=64))))
