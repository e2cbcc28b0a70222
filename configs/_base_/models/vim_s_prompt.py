# Prompt-tuning with projection: 8 input tokens (4 before, 4 after the sequence) from
# Embedding(8, 384) -> Linear -> Tanh -> Linear.
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(prompt=dict(tokens=8, projection=True))))
