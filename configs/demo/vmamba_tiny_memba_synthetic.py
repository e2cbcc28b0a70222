# CPU/GPU demo: the Vim demo's data, schedule and Memba settings on a tiny Memba VanillaVMamba
# (4 stages of widths 32-256 on a 32x32 image in 2x2 patches: a 16x16 token grid, then 8x8,
# 4x4 and 2x2, as many tokens as the gate's 4 chunks in the last stage). d_state and the gate
# rank are VMamba-S's (16), so on a GPU it runs the same cross-scan kernels as the real model.
# Usage as configs/demo/vim_tiny_memba_synthetic.py.
_base_ = ['./vim_tiny_memba_synthetic.py']
experiment = dict(backbone='vmamba_tiny')

model = dict(
    backbone=dict(
        _delete_=True, type='VanillaVMamba', arch=dict(dims=32, depths=[1, 1, 2, 1], d_state=16),
        img_size=32, patch_size=2, drop_path_rate=0.0, cuda_graph=True,
        peft=dict(lora=dict(in_proj=16, out_proj=16),
                  gate=dict(rank=16, num_chunks=4, leak=0.5, threshold=1.0, transfer=True))),
    head=dict(in_channels=256),
)
