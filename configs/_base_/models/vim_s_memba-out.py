# Memba with LoRA on out_proj only (96) + LIM gate.
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(
    lora=dict(out_proj=96),
    gate=dict(rank=16, num_chunks=4, leak=0.5, threshold=1.0, transfer=True))))
