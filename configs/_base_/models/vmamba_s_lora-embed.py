# LoRA(embed): a rank-32 conv beside the patch embedding (4x4 stride 4, then 1x1).
_base_ = ['./vmamba_s.py']
model = dict(backbone=dict(peft=dict(lora=dict(embed=32))))
