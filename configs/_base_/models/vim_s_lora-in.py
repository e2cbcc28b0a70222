# LoRA baseline on in_proj (32).
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(
    lora=dict(in_proj=32))))
