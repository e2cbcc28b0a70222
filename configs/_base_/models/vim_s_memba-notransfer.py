# Ablation (Table 4a): LoRA + LIM gate without cross-layer membrane transfer.
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(
    lora=dict(in_proj=32, out_proj=96),
    gate=dict(rank=16, num_chunks=4, leak=0.5, threshold=1.0, transfer=False))))
