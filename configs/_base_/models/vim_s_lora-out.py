# LoRA baseline on out_proj (96).
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(
    lora=dict(out_proj=96))))
