# Ablation (Table 4a): LIM gate alone, no LoRA.
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(
    gate=dict(rank=16, num_chunks=4, leak=0.5, threshold=1.0, transfer=True))))
