# LoRA(x_proj): rank 64, merged into x_proj's weight, one pair per direction.
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(lora=dict(x_proj=64))))
