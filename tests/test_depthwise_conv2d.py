"""ops.depthwise_conv2d: VMamba's depthwise 3x3 conv + bias + SiLU on channels-last maps.

The fused node runs on the CPU with the extension replaced by its stand-in
(tests/scan_ext_reference.py) and on a GPU with the real kernels; both are compared with the
conv written out as nine shifted products (no F.conv2d) in fp64.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import output_and_input_grad, requires_cuda
from memba_vision.ops.depthwise_conv2d import (depthwise_conv2d_silu,
                                               depthwise_conv2d_silu_backend,
                                               depthwise_conv2d_silu_fused,
                                               depthwise_conv2d_silu_per_op)
from scan_ext_reference import ReferenceScanKernels


def conv_by_shifts(x, weight, bias):
    """silu(bias + sum_{i,j} W[:, 0, i, j] x[h+i-1, w+j-1]), zero outside the grid, x (B, H,
    W, D): the definition, tap by tap."""
    B, H, W, D = x.shape
    xp = F.pad(x, (0, 0, 1, 1, 1, 1))  # (B, H+2, W+2, D)
    pre = bias.to(x.dtype).expand(B, H, W, D).clone() if bias is not None \
        else x.new_zeros(B, H, W, D)
    for i in range(3):
        for j in range(3):
            pre = pre + weight[:, 0, i, j].to(x.dtype) * xp[:, i:i + H, j:j + W]
    return F.silu(pre)


def conv_inputs(B=2, H=5, W=7, D=12, dtype=torch.float64, device='cpu', seed=0):
    """x: the x half of a (B, H, W, 2D) tensor, as in_proj's output is; weight (D, 1, 3, 3)
    and bias (D,) fp32 (fp64 in fp64 runs) as nn.Conv2d holds them."""
    g = torch.Generator().manual_seed(seed)
    xz = torch.randn(B, H, W, 2 * D, generator=g, dtype=torch.float64)
    wd = torch.promote_types(dtype, torch.float32)
    w = (0.5 * torch.randn(D, 1, 3, 3, generator=g, dtype=torch.float64)).to(wd)
    b = (0.3 * torch.randn(D, generator=g, dtype=torch.float64)).to(wd)
    return xz.to(device, dtype)[..., :D], w.to(device), b.to(device)


def test_both_paths_are_the_conv_written_out():
    """fp64 on the CPU (the extension replaced by its stand-in), x the strided half of a wider
    tensor, odd H != W: output and x's gradient of the fused node and of the per-op path."""
    x, w, b = conv_inputs()
    assert not x.is_contiguous()
    want = output_and_input_grad(conv_by_shifts, x, w, b)
    fused = output_and_input_grad(lambda *a: depthwise_conv2d_silu_fused(*a, kernels=ReferenceScanKernels),
                       x, w, b)
    per_op = output_and_input_grad(depthwise_conv2d_silu_per_op, x, w, b)
    for got in (fused, per_op):
        for a, c in zip(got, want):
            assert a.shape == c.shape and torch.allclose(a, c, rtol=1e-12, atol=1e-12)
    assert fused[0].is_contiguous()


def test_depthwise_conv_runs_per_op_where_the_kernels_cannot():
    x, w, b = conv_inputs(D=12)
    ref = ReferenceScanKernels
    assert depthwise_conv2d_silu_backend(x, w, b, ref) == 'fused'
    assert depthwise_conv2d_silu_backend(x, w, None, ref) == 'fused'
    assert depthwise_conv2d_silu_backend(x, w, b) == 'per-op'  # CPU
    assert depthwise_conv2d_silu_backend(x, w.clone().requires_grad_(), b, ref) == 'per-op'
    assert depthwise_conv2d_silu_backend(x, w, b.clone().requires_grad_(), ref) == 'per-op'
    w5 = torch.zeros(12, 1, 5, 5, dtype=w.dtype)
    assert depthwise_conv2d_silu_backend(x, w5, b, ref) == 'per-op'
    x6, w6, b6 = conv_inputs(D=6)
    assert depthwise_conv2d_silu_backend(x6, w6, b6, ref) == 'per-op'  # 6 % 4
    assert depthwise_conv2d_silu_backend(x[..., 1:-3], w[1:-3], b[1:-3], ref) == 'per-op'
    # a 5x5 filter on the per-op path keeps its size (padding 2)
    u = depthwise_conv2d_silu(x, w5 + 1.0, b)
    assert u.shape == x.shape


def test_fused_depthwise_conv_keeps_nothing_but_its_inputs():
    """The fused node keeps x (a view of in_proj's output, alive anyway) and the filters; the
    per-op path also keeps the conv's output (SiLU's input), a map as large as x."""
    from test_silu_gate import new_saved_bytes
    x, w, b = conv_inputs(B=2, H=5, W=7, D=12)

    def fused(x):
        return depthwise_conv2d_silu_fused(x, w, b, kernels=ReferenceScanKernels)

    def per_op(x):
        return depthwise_conv2d_silu_per_op(x, w, b)
    filters = w.nbytes + b.nbytes  # the module's own parameters
    assert new_saved_bytes(fused, x) == filters
    assert new_saved_bytes(per_op, x) >= x.numel() * x.element_size()


@requires_cuda
@pytest.mark.parametrize('shape', [(3, 5, 7, 12), (2, 14, 14, 192), (2, 9, 4, 100),
                                   (1, 56, 56, 64)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_fused_depthwise_conv_on_gpu(shape, dtype):
    """The CUDA kernels against the conv written out in fp64 on the CPU, output and x's
    gradient each within 1e-5 (fp32) relative to its norm; bf16 no further than 2x the per-op
    path (cuDNN) in bf16 on the GPU. x is the strided half of a wider tensor; the tiles of the
    backward (4 x 8) and the 64-channel blocks do not divide H, W and D in every case."""
    B, H, W, D = shape
    x, w, b = conv_inputs(B, H, W, D)
    want = output_and_input_grad(conv_by_shifts, x, w, b)
    xg, wg, bg = conv_inputs(B, H, W, D, dtype=dtype, device='cuda')
    assert depthwise_conv2d_silu_backend(xg, wg, bg) == 'fused'
    got = output_and_input_grad(depthwise_conv2d_silu, xg, wg, bg)
    with torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32):
        per_op = output_and_input_grad(depthwise_conv2d_silu_per_op, xg, wg, bg)
    assert got[0].dtype == dtype and got[1].dtype == dtype

    def rel(a, c):
        return ((a.double().cpu() - c).norm() / c.norm()).item()
    for name, a, p, c in zip(('u', 'dx'), got, per_op, want):
        print(f'DWCONV {dtype} {shape} {name}: fused {rel(a, c):.2e}, per-op {rel(p, c):.2e}')
        assert rel(a, c) < (1e-5 if dtype == torch.float32 else 2 * rel(p, c) + 1e-6), name
