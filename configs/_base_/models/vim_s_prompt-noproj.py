# Prompt-tuning without projection: 8 learned input tokens.
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(prompt=dict(tokens=8, projection=False))))
