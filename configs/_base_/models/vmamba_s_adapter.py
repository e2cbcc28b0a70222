# ParallelAdapter: ReLU bottleneck d_inner -> 32 -> dim beside out_proj, s = 0.1.
_base_ = ['./vmamba_s.py']
model = dict(backbone=dict(peft=dict(adapter=dict(rank=32, scale=0.1))))
