"""On a CUDA GPU: the CUDA kernel path (memba_vision's, mamba-ssm's) and the PyTorch reference path
give the same backbone outputs and input gradients (Vim-S, VMamba-S; plain and Memba)."""
import pytest
import torch
import torch.nn as nn
from mmpretrain.registry import MODELS

from conftest import requires_cuda
from memba_vision.models.peft import MembraneGate
from memba_vision.ops.scan.mamba_ssm import load as mamba_ssm_scan_fn

MEMBA = {'vim_s': dict(lora=dict(in_proj=32, out_proj=96), gate=dict(rank=16)),
         'vmamba_s': dict(lora=dict(in_proj=64, out_proj=64), gate=dict(rank=16))}


# (output, input gradient): about five times the values measured on an H200 without TF32
# (docs/benchmarks.md: 3.5e-7 / 8.8e-7, 3.7e-7 / 9.6e-7, 4.3e-7 / 9.3e-7, 4.3e-7 / 1.1e-6)
TOLERANCE = {('vim_s', 'plain'): (1.5e-6, 5e-6), ('vim_s', 'memba'): (2e-6, 5e-6),
             ('vmamba_s', 'plain'): (2.5e-6, 5e-6), ('vmamba_s', 'memba'): (2e-6, 5.5e-6)}


def build(kind, peft):
    cfg = dict(type='Vim', arch='small') if kind == 'vim_s' else \
        dict(type='VanillaVMamba', arch='small')
    model = MODELS.build(dict(cfg, drop_path_rate=0.0, peft=peft)).cuda().eval()
    for m in model.modules():  # make LoRA and the gates matter
        if isinstance(m, MembraneGate):
            for p in m.proj_out:
                nn.init.normal_(p.weight, std=0.05)
        if hasattr(m, 'lora_up'):
            nn.init.normal_(m.lora_up.weight, std=0.05)
    return model


def run(model, x, g):
    x = x.clone().requires_grad_()
    out = model(x)[0]
    out.backward(g)
    return out.detach(), x.grad


@pytest.fixture
def no_tf32():
    """fp32 on both paths: cuDNN's default TF32 convolutions would round the gradients that
    reach the patch embedding to 10-bit mantissas, differently on the two paths."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@requires_cuda
@pytest.mark.parametrize('kind', ['vim_s', 'vmamba_s'])
@pytest.mark.parametrize('method', ['plain', 'memba'])
def test_cuda_kernels_match_reference(kind, method, monkeypatch, no_tf32):
    if mamba_ssm_scan_fn()[0] is None:
        pytest.skip(mamba_ssm_scan_fn()[1])
    torch.manual_seed(0)
    model = build(kind, MEMBA[kind] if method == 'memba' else None)
    x = torch.randn(2, 3, 224, 224, device='cuda')
    out_cuda, grad_cuda = run(model, x, g := torch.randn(2, model.norm_f.weight.numel()
                                                     if kind == 'vim_s' else 768, device='cuda'))
    monkeypatch.setenv('MEMBA_BACKEND', 'reference')
    out_ref, grad_ref = run(model, x, g)
    out_rel = ((out_cuda - out_ref).abs().max() / out_ref.abs().max()).item()
    grad_rel = ((grad_cuda - grad_ref).abs().max() / grad_ref.abs().max()).item()
    print(f'PARITY {kind} {method}: output max|diff|/max|ref| = {out_rel:.2e} '
          f'(scale {out_ref.abs().max().item():.3g}), input-grad {grad_rel:.2e}')
    out_tol, grad_tol = TOLERANCE[kind, method]
    assert out_rel < out_tol and grad_rel < grad_tol
