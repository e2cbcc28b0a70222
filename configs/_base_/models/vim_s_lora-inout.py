# LoRA(in+out_proj) as in the paper's Table 3: in_proj rank 8, out_proj rank 12.
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(lora=dict(in_proj=8, out_proj=12))))
