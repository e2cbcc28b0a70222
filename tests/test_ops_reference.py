"""CPU reference ops against naive per-timestep loops written from the equations."""
import pytest
import torch
import torch.nn.functional as F

from memba_vision.ops import (causal_conv1d_reference, scan_backend, selective_scan,
                              selective_scan_reference)


def naive_scan(u, delta, A, B, C, D, z, delta_bias, softplus):
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t ; y_t = C_t . h_t + D u_t ; y *= silu(z)."""
    b, d, l = u.shape
    n = A.shape[1]
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    g = B.shape[1]
    y = torch.zeros(b, d, l, dtype=u.dtype)
    for bi in range(b):
        for c in range(d):
            grp = c // (d // g)
            h = torch.zeros(n, dtype=u.dtype)
            for t in range(l):
                dt = delta[bi, c, t] + (delta_bias[c] if delta_bias is not None else 0)
                if softplus:
                    dt = torch.log1p(torch.exp(dt))
                h = torch.exp(dt * A[c]) * h + dt * B[bi, grp, :, t] * u[bi, c, t]
                out = (C[bi, grp, :, t] * h).sum()
                if D is not None:
                    out = out + D[c] * u[bi, c, t]
                if z is not None:
                    out = out * z[bi, c, t] / (1 + torch.exp(-z[bi, c, t]))
                y[bi, c, t] = out
    return y


@pytest.mark.parametrize('groups,l,with_z,with_bias', [
    (0, 7, True, True), (1, 70, False, True), (2, 5, True, False), (0, 130, False, False)])
def test_selective_scan_reference_matches_naive_loop(groups, l, with_z, with_bias):
    b, d, n = 2, 4, 3
    f64 = dict(dtype=torch.float64)
    u, delta, z = (torch.randn(b, d, l, **f64) for _ in range(3))
    A = -torch.rand(d, n, **f64) * 2
    shape = (b, n, l) if groups == 0 else (b, groups, n, l)
    B, C = torch.randn(*shape, **f64), torch.randn(*shape, **f64)
    D = torch.randn(d, **f64)
    bias = torch.randn(d, **f64) if with_bias else None
    got = selective_scan_reference(u, delta, A, B, C, D, z if with_z else None, bias, True)
    ref = naive_scan(u, delta, A, B, C, D, z if with_z else None, bias, True)
    assert (got - ref).abs().max().item() < 1e-10


def test_selective_scan_without_softplus_and_D():
    u, delta = torch.randn(1, 2, 9, dtype=torch.float64), torch.rand(1, 2, 9, dtype=torch.float64)
    A = -torch.rand(2, 3, dtype=torch.float64)
    B, C = torch.randn(1, 3, 9, dtype=torch.float64), torch.randn(1, 3, 9, dtype=torch.float64)
    got = selective_scan(u, delta, A, B, C)
    ref = naive_scan(u, delta, A, B, C, None, None, None, False)
    assert (got - ref).abs().max().item() < 1e-10


def test_selective_scan_keeps_input_dtype_and_backend_on_cpu():
    u = torch.randn(1, 4, 6, dtype=torch.bfloat16)
    y = selective_scan(u, u.clone(), -torch.rand(4, 2), torch.randn(1, 2, 6),
                       torch.randn(1, 2, 6), delta_softplus=True)
    assert y.dtype == torch.bfloat16 and y.shape == u.shape
    assert scan_backend(u) == 'reference'


def test_causal_conv1d_matches_naive_loop():
    b, d, l, w = 2, 3, 10, 4
    x = torch.randn(b, d, l, dtype=torch.float64)
    weight, bias = torch.randn(d, w, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    ref = torch.zeros_like(x)
    for t in range(l):
        for k in range(w):  # output t sees input t - (w - 1) + k
            src = t - (w - 1) + k
            if src >= 0:
                ref[:, :, t] += weight[:, k] * x[:, :, src]
    ref = ref + bias[None, :, None]
    assert torch.allclose(causal_conv1d_reference(x, weight, bias, None), ref, atol=1e-12)
    assert torch.allclose(causal_conv1d_reference(x, weight, bias, 'silu'), F.silu(ref),
                          atol=1e-12)
