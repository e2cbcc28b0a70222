# Memba: LoRA on in_proj (64) and out_proj (64) + LIM gates with membrane transfer.
_base_ = ['./vmamba_s.py']
model = dict(backbone=dict(peft=dict(
    lora=dict(in_proj=64, out_proj=64),
    gate=dict(rank=16, num_chunks=4, leak=0.5, threshold=1.0, transfer=True))))
