# Memba with LoRA on in_proj only (32) + LIM gate.
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(
    lora=dict(in_proj=32),
    gate=dict(rank=16, num_chunks=4, leak=0.5, threshold=1.0, transfer=True))))
