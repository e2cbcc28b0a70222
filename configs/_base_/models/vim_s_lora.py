# LoRA baseline on in_proj (32) and out_proj (96).
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(
    lora=dict(in_proj=32, out_proj=96))))
