# DeiT-style fine-tuning recipe used by MambaPEFT and Memba on VTAB-1k:
# AdamW 1e-3, wd 1e-4, batch 32, 100 epochs (10 linear warm-up, cosine to 1e-5),
# gradient clipping at 5. No decay on norms, biases, embeddings and SSM A/D.
# Partial tuning's deltas decay x10 (A, D, conv) and x100 (dt bias), as in MambaPEFT.
# bf16 autocast on a GPU (tools/train.py --fp32 for the fp32 reference; CPU runs
# fall back to fp32 by themselves), without loss scaling and without reading values
# back to the host every step (BF16OptimWrapper). Parameters with equal settings
# share one parameter group (MergedParamGroupsConstructor), and AdamW is PyTorch's fused
# one (the same update in one kernel per group instead of a chain of multi-tensor kernels).
no_decay = dict(decay_mult=0.0)
optim_wrapper = dict(
    type='BF16OptimWrapper',
    constructor='MergedParamGroupsConstructor',
    dtype='bfloat16',
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=1e-4, eps=1e-8, betas=(0.9, 0.999),
                   fused=True),
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        custom_keys={
            '.pos_embed': no_decay, '.cls_token': no_decay,
            '.A_log': no_decay, '.A_b_log': no_decay, '.A_logs': no_decay,
            '.D': no_decay, '.D_b': no_decay, '.Ds': no_decay,
            # partial tuning's zero-initialised deltas (MambaPEFT): decay pulls them back to
            # the pretrained value; the longer key wins over the ones above
            '.delta.A_': dict(decay_mult=10.0), '.delta.D': dict(decay_mult=10.0),
            '.delta.conv1d': dict(decay_mult=10.0), '.delta.dt_bias': dict(decay_mult=100.0),
            '.delta.cls_token': dict(decay_mult=1.0), '.delta.pos_embed': dict(decay_mult=1.0),
        }),
    clip_grad=dict(max_norm=5.0),
)
warmup_epochs = 10
max_epochs = 100
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=warmup_epochs,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=warmup_epochs,
         end=max_epochs, convert_to_iter_based=True),
]
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs)
# the recipe's lr is for one GPU at batch 32: tools/train.py --auto-scale-lr scales it by
# (GPUs x batch size) / 32
auto_scale_lr = dict(base_batch_size=32, enable=False)
test_cfg = dict()
