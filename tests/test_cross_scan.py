"""VMamba v0's cross scan (``ops.cross_scan``): the fused node (token-major kernels, grid walked
in place) against the official stacked formulation: output, input gradient and (full fine-tuning) every
SSM parameter's gradient. On the CPU the
node runs on the tests' stand-in of the kernels (fp64); on a GPU on the extension."""
import pytest
import torch

from conftest import requires_cuda
from memba_vision.ops.bidirectional_ssm import scan_extension
from memba_vision.ops.cross_scan import (cross_scan_backend, cross_scan_fused,
                                        cross_scan_stacked)
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


@pytest.mark.parametrize('h,w', [(3, 5), (5, 3), (4, 4), (1, 6), (7, 2), (5, 7)])
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
    def scan_dirs_fwd(u, delta, A, B, C, D, delta_bias, softplus, reverse, rows, out=None,
                      save_states=False):
        return ReferenceScanKernels.scan_dirs_fwd(u, delta, A, B, C, D, delta_bias, softplus,
                                                  reverse, [0] * len(rows), out=out,
                                                  save_states=save_states)

    @staticmethod
    def scan_dirs_bwd(u, delta, A, B, C, D, delta_bias, dout, states, softplus, reverse, rows,
                      **kw):
        return ReferenceScanKernels.scan_dirs_bwd(u, delta, A, B, C, D, delta_bias, dout,
                                                  states, softplus, reverse, [0] * len(rows),
                                                  **kw)


def run_trainable(fn, x, p, dy, **kw):
    """Output and the gradients of x and of every SSM parameter (all trainable)."""
    x = x.detach().clone().requires_grad_()
    leaves = [t.detach().clone().requires_grad_() for t in p]
    y = fn(x, *leaves, **kw)
    y.backward(dy)
    return [y.detach(), x.grad] + [t.grad for t in leaves]


TRAINABLE = ('y', 'x', 'x_proj_weight', 'dt_projs_weight', 'dt_projs_bias', 'A', 'Ds')


@pytest.mark.parametrize('h,w', [(3, 5), (4, 4)])
def test_fused_node_trains_every_ssm_parameter_like_the_stacked_scan(h, w):
    """Full fine-tuning: with every SSM parameter trainable, dispatch keeps the fused node, and
    its gradients (A's and D's from the kernels, the others from ddelta, dB and dC) equal
    autograd's through the official formulation."""
    D = 8
    p = params(D)
    x = torch.randn(2, h, w, D, dtype=torch.float64)
    dy = torch.randn(2, h * w, D, dtype=torch.float64)
    got = run_trainable(cross_scan_fused, x, p, dy, kernels=ReferenceScanKernels)
    want = run_trainable(cross_scan_stacked, x, p, dy)
    for name, g, r in zip(TRAINABLE, got, want):
        assert g is not None and g.shape == r.shape, name
        assert rel(g, r) < 1e-10, (name, rel(g, r))
    trainable = [t.float().requires_grad_() for t in p]  # (the kernels take no fp64)
    assert cross_scan_backend(x.float(), trainable, ReferenceScanKernels) == 'fused'


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


@requires_cuda
@requires_kernels
@pytest.mark.parametrize('h,w,dtype,tol', [(14, 14, torch.float32, 1e-5),
                                           (5, 9, torch.float32, 1e-5),
                                           (7, 7, torch.bfloat16, 2e-2)])
def test_fused_kernels_train_every_ssm_parameter_on_gpu(h, w, dtype, tol):
    """Full fine-tuning on the kernels: output and every gradient against the fp64 CPU
    reference (the stacked formulation on PyTorch's scan)."""
    D = 192
    p = params(D, R=12, dtype=torch.float32, device='cuda')
    x = torch.randn(2, h, w, D, device='cuda')
    dy = torch.randn(2, h * w, D, device='cuda')
    want = run_trainable(cross_scan_stacked, x.double().cpu(), [t.double().cpu() for t in p],
                         dy.double().cpu())
    got = run_trainable(cross_scan_fused, x.to(dtype), p, dy)
    errs = {name: rel(g.cpu(), r) for name, g, r in zip(TRAINABLE, got, want)}
    print(f'CROSS SCAN trainable {h}x{w} {dtype}: ' +
          ' '.join(f'{k} {v:.1e}' for k, v in errs.items()))
    assert max(errs.values()) < tol, errs
