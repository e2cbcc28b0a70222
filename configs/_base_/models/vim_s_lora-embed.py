# LoRA(embed): a rank-32 conv beside the patch embedding (k x k stride k, then 1x1).
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(lora=dict(embed=32))))
