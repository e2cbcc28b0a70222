"""ops.layer_norm: LayerNorm in the storage dtype (VMamba's block norms under autocast).

The fused node runs on the CPU with the extension replaced by its stand-in
(tests/scan_ext_reference.py) and on a GPU with the real kernels; both are compared with the
norm written out in fp64, and the model's norms with autocast's own fp32 LayerNorm.
"""
import pytest
import torch
import torch.nn as nn

from conftest import output_and_input_grad, requires_cuda
from memba_vision.models.backbones.vmamba import norm_in_input_dtype
from memba_vision.ops.layer_norm import (layer_norm_backend, layer_norm_fused,
                                         layer_norm_in_dtype, layer_norm_per_op)
from scan_ext_reference import ReferenceScanKernels


def norm_by_hand(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def norm_inputs(shape=(2, 5, 7, 12), dtype=torch.float64, device='cpu', seed=0):
    """x with an offset and a scale per row (as a residual stream has), weight and bias fp32
    (fp64 in fp64 runs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x = x * (1 + torch.rand(*shape[:-1], 1, generator=g, dtype=torch.float64)) \
        + torch.randn(*shape[:-1], 1, generator=g, dtype=torch.float64)
    D = shape[-1]
    wd = torch.promote_types(dtype, torch.float32)
    w = (1 + 0.3 * torch.randn(D, generator=g, dtype=torch.float64)).to(wd)
    b = (0.2 * torch.randn(D, generator=g, dtype=torch.float64)).to(wd)
    return x.to(device, dtype), w.to(device), b.to(device)


def test_both_paths_are_the_norm_written_out():
    """fp64 on the CPU, the extension replaced by its stand-in."""
    x, w, b = norm_inputs()
    want = output_and_input_grad(norm_by_hand, x, w, b)
    fused = output_and_input_grad(lambda *a: layer_norm_fused(*a, 1e-5, kernels=ReferenceScanKernels),
                       x, w, b)
    per_op = output_and_input_grad(lambda *a: layer_norm_per_op(*a, 1e-5), x, w, b)
    for got in (fused, per_op):
        for a, c in zip(got, want):
            assert a.dtype == x.dtype and torch.allclose(a, c, rtol=1e-10, atol=1e-12)


def test_layer_norm_runs_per_op_where_the_kernels_cannot():
    x, w, b = norm_inputs()
    ref = ReferenceScanKernels
    assert layer_norm_backend(x, w, b, ref) == 'fused'
    assert layer_norm_backend(x, w, b) == 'per-op'  # CPU
    assert layer_norm_backend(x, w.clone().requires_grad_(), b, ref) == 'per-op'
    assert layer_norm_backend(x, w, None, ref) == 'per-op'
    x6, w6, b6 = norm_inputs((2, 3, 6))
    assert layer_norm_backend(x6, w6, b6, ref) == 'per-op'
    xb, wb, bb = norm_inputs((1, 2, 2052))
    assert layer_norm_backend(xb, wb, bb, ref) == 'per-op'


def test_block_norms_take_the_dtype_of_the_residual_stream_under_autocast_only():
    """Without autocast (fp32 training, the CPU references) a block norm is the module itself;
    under half-precision autocast it returns x's dtype, equal to autocast's fp32 LayerNorm
    rounded as the next product reads it."""
    norm = nn.LayerNorm(12).double()
    x, _, _ = norm_inputs(dtype=torch.float64)
    assert torch.equal(norm_in_input_dtype(norm, x), norm(x))
    normf = nn.LayerNorm(12)
    xb = x.to(torch.bfloat16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = norm_in_input_dtype(normf, xb)
    want = norm_by_hand(xb.double(), normf.weight.double(), normf.bias.double()).to(xb.dtype)
    assert got.dtype == torch.bfloat16
    assert (got.double() - want.double()).abs().max() <= 2 ** -7 * want.abs().max()


@requires_cuda
@pytest.mark.parametrize('D', [12, 96, 768, 1536, 2048])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_fused_layer_norm_on_gpu(D, dtype):
    """The CUDA kernels against the norm written out in fp64 on the CPU, output and x's
    gradient each within 1e-5 (fp32) relative to its norm; bf16 no further than 2x the per-op
    path (fp32 LayerNorm, then a cast) in bf16 on the GPU. Under autocast the model's block
    norm runs on the kernels and equals autocast's own fp32 LayerNorm, rounded to bf16."""
    x, w, b = norm_inputs((3, 37, D))
    want = output_and_input_grad(norm_by_hand, x, w, b)
    xg, wg, bg = norm_inputs((3, 37, D), dtype=dtype, device='cuda')
    assert layer_norm_backend(xg, wg, bg) == 'fused'
    got = output_and_input_grad(lambda *a: layer_norm_in_dtype(*a, 1e-5), xg, wg, bg)
    per_op = output_and_input_grad(lambda *a: layer_norm_per_op(*a, 1e-5), xg, wg, bg)
    assert got[0].dtype == dtype and got[1].dtype == dtype

    def rel(a, c):
        return ((a.double().cpu() - c).norm() / c.norm()).item()
    for name, a, p, c in zip(('out', 'dx'), got, per_op, want):
        print(f'LAYERNORM {dtype} D {D} {name}: fused {rel(a, c):.2e}, per-op {rel(p, c):.2e}')
        assert rel(a, c) < (1e-5 if dtype == torch.float32 else 2 * rel(p, c) + 1e-6), name
    if dtype == torch.bfloat16:
        norm = nn.LayerNorm(D).cuda()
        with torch.no_grad():
            norm.weight.copy_(wg)
            norm.bias.copy_(bg)
        norm.requires_grad_(False)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            mine, theirs = norm_in_input_dtype(norm, xg), norm(xg)
        assert mine.dtype == torch.bfloat16 and theirs.dtype == torch.float32
        diff = (mine.float() - theirs.to(torch.bfloat16).float()).abs()
        assert diff.max() <= 2 ** -7 * theirs.abs().max()  # at most an ulp of rounding apart
