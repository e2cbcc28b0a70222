# Affix-tuning with projection: 3 tokens per layer and direction in the in_proj output
# space, from Embedding(3, 1536) -> Linear -> Tanh -> Linear(1536, 24 x 2 x 1536).
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(affix=dict(tokens=3, projection=True))))
