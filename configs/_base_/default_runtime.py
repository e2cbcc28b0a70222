# Runtime shared by every memba_vision config.
default_scope = 'mmpretrain'
custom_imports = dict(imports=['memba_vision'], allow_failed_imports=False)

default_hooks = dict(
    # losses and the gradient norm are read back from the GPU every logger interval,
    # not after every step (which would keep the host from preparing the next one);
    # a NaN/inf loss stops training before a checkpoint of that state
    runtime_info=dict(type='DeferredRuntimeInfoHook'),
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=10),           # loss, lr, ETA
    param_scheduler=dict(type='ParamSchedulerHook'),
    # every 5 epochs (and the last): an interrupted run loses at most 5 epochs, about
    # 6 s of a Vim-S task on one H200, while saving every epoch would add about a fifth
    # to the training time (a save took 0.25-0.36 s against a 1.2 s epoch there,
    # tools/benchmark_sweep.py). PEFT runs save only their trainable tensors (see
    # PEFTCheckpointHook). AtomicCheckpointHook deletes the previous checkpoint only
    # after the new one and the last_checkpoint marker are complete.
    checkpoint=dict(type='AtomicCheckpointHook', interval=5, max_keep_ckpts=1, save_last=True),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='VisualizationHook', enable=False),
)
custom_hooks = [
    dict(type='PEFTCheckpointHook'),
]

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)
# Distributed runs (tools/dist_train.sh) average the gradients in one all-reduce after
# the backward instead of through DDP's autograd hooks, which break the backbone's
# CUDA-graph capture (memba_vision.engine.PostBackwardDataParallel).
model_wrapper_cfg = dict(type='mmpretrain.PostBackwardDataParallel')
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='UniversalVisualizer', vis_backends=vis_backends)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
