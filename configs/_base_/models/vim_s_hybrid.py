# Hybrid: the combination MambaPEFT's second search step STARTS from, not the searched
# final setting (never published): LoRA out_proj 8, in_proj 8, LoRAp(X) 8, LoRAp(B) 4,
# dt_proj 4, a 1-token affix with projection, A_log and cls-token deltas, all s = 0.1.
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(
    lora=dict(out_proj=8, in_proj=8, in_proj_x=8, x_proj_B=4, dt_proj=4),
    affix=dict(tokens=1, projection=True),
    partial=dict(A_log=True, cls_token=True))))
