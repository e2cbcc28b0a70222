# LoRA(dt_proj): rank 64, merged into dt_proj's weight, one pair per direction.
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(lora=dict(dt_proj=64))))
