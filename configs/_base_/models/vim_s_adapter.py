# ParallelAdapter: ReLU bottleneck d_inner -> 32 -> embed_dims beside out_proj, s = 0.1.
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(adapter=dict(rank=32, scale=0.1))))
