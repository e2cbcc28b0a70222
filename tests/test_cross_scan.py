"""VMamba v0's cross scan (``ops.cross_scan``): the fused node (token-major kernels, grid walked
in place) against the official stacked formulation, output and input gradient. On the CPU the
node runs on the tests' stand-in of the kernels (fp64); on a GPU on the extension."""
import pytest
import torch

from conftest import requires_cuda
from memba_vision.ops.bidirectional_ssm import scan_extension
from memba_vision.ops.cross_scan import cross_scan, cross_scan_fused, cross_scan_stacked
from scan_ext_reference import ReferenceScanKernels


def params(D, R=3, N=16, dtype=torch.float64, device='cpu', seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)
    return (rnd(4, R + 2 * N, D, scale=0.3), rnd(4, D, R, scale=0.5), rnd(4, D, scale=0.3) - 1,
            -torch.exp(rnd(4 * D, N, scale=0.5)), rnd(4 * D))


def run(fn, x, p, dy, **kw):
    x = x.detach().clone().requires_grad_()
    y = fn(x, *p, **kw)
    y.backward(dy)
    return y.detach(), x.grad


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize('h,w', [(3, 5), (5, 3), (4, 4), (1, 6), (7, 2)])
def test_fused_node_equals_the_official_stacked_scan(h, w):
    D = 8
    p = params(D)
    x = torch.randn(2, h, w, D, dtype=torch.float64)
    dy = torch.randn(2, h * w, D, dtype=torch.float64)
    y, dx = run(cross_scan_fused, x, p, dy, kernels=ReferenceScanKernels)
    y_ref, dx_ref = run(cross_scan_stacked, x, p, dy)
    assert y.shape == (2, h * w, D)
    assert rel(y, y_ref) < 1e-10 and rel(dx, dx_ref) < 1e-10
    # every direction matters: dropping the column-major ones changes the result
    if h > 1 and w > 1:
        rows_only = run(cross_scan_fused, x, (p[0], p[1], p[2], p[3], p[4]), dy,
                        kernels=_RowsIgnored)[0]
        assert rel(rows_only, y_ref) > 1e-3


class _RowsIgnored(ReferenceScanKernels):
    """The stand-in walking every direction row-major (a deliberately wrong kernel)."""

    @staticmethod
    def scan_dirs_fwd(u, delta, A, B, C, D, delta_bias, softplus, reverse, rows, out=None):
        return ReferenceScanKernels.scan_dirs_fwd(u, delta, A, B, C, D, delta_bias, softplus,
                                                  reverse, [0] * len(rows), out=out)


def test_dispatch_uses_the_stacked_scan_when_parameters_train():
    D = 8
    p = params(D)
    x = torch.randn(1, 3, 4, D, dtype=torch.float64)
    trainable = [t.clone().requires_grad_() for t in p]
    y = cross_scan(x, *trainable, kernels=ReferenceScanKernels)
    y.sum().backward()  # the stacked path gives every parameter a gradient
    assert all(t.grad is not None for t in trainable)


requires_kernels = pytest.mark.skipif(
    scan_extension()[0] is None, reason=f'needs the scan extension: {scan_extension()[1]}')


@requires_cuda
@requires_kernels
@pytest.mark.parametrize('h,w,dtype,tol', [
    (56, 56, torch.float32, 1e-5), (7, 7, torch.float32, 1e-5), (5, 9, torch.float32, 1e-5),
    (14, 28, torch.float32, 1e-5), (5, 9, torch.bfloat16, 2e-2), (28, 14, torch.bfloat16, 2e-2)])
def test_fused_kernels_match_the_stacked_scan_on_gpu(h, w, dtype, tol):
    D = 192
    p = params(D, R=12, dtype=torch.float32, device='cuda')
    x = torch.randn(2, h, w, D, device='cuda')
    dy = torch.randn(2, h * w, D, device='cuda')
    # the reference in fp64 on the CPU (PyTorch's scan: mamba-ssm has no fp64)
    y_ref, dx_ref = run(cross_scan_stacked, x.double().cpu(), [t.double().cpu() for t in p],
                        dy.double().cpu())
    y, dx = run(cross_scan_fused, x.to(dtype), p, dy)
    errs = (rel(y.cpu(), y_ref), rel(dx.cpu(), dx_ref))
    print(f'CROSS SCAN {h}x{w} {dtype}: output {errs[0]:.1e}, input-grad {errs[1]:.1e}')
    assert max(errs) < tol, errs
