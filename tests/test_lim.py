"""The LIM op (reference backend) against Algorithm 1 and hand-computed cases."""
import pytest
import torch

from memba_vision.ops import available_lim_backends, lim, lim_backend


def algorithm1(x, T, leak, threshold, u_prev=None):
    """Literal per-element loop of Algorithm 1 (independent of the op's tensor code)."""
    B, L, R = x.shape
    l = L // T
    out = torch.zeros_like(x)
    u_mean = torch.zeros(B, l, R, dtype=x.dtype)
    for b in range(B):
        for j in range(l):
            for r in range(R):
                u = float(u_prev[b, j, r]) if u_prev is not None else 0.0
                acc = 0.0
                for i in range(T):
                    u = leak * u + float(x[b, i * l + j, r])
                    if u > threshold:
                        u = 0.0
                    out[b, i * l + j, r] = u
                    acc += u
                u_mean[b, j, r] = acc / T
    return out, u_mean


@pytest.mark.parametrize('with_prev', [False, True])
def test_lim_matches_algorithm1_on_odd_length(with_prev):
    B, L, R, T = 2, 197, 3, 4  # l = 49, one trimmed token
    x = torch.randn(B, L, R, dtype=torch.float64)
    u_prev = torch.randn(B, L // T, R, dtype=torch.float64) if with_prev else None
    out, u_mean = lim(x, T, 0.5, 1.0, u_prev)
    ref_out, ref_mean = algorithm1(x, T, 0.5, 1.0, u_prev)
    assert out.shape == (B, L, R) and u_mean.shape == (B, 49, R)
    assert torch.equal(out[:, -1], torch.zeros(B, R, dtype=torch.float64))
    assert (out - ref_out).abs().max() < 1e-12
    assert (u_mean - ref_mean).abs().max() < 1e-12


def test_lim_hand_computed_cases():
    x = torch.tensor([0.6, 0.6, 0.6, 0.6, 5.0], dtype=torch.float64).view(1, 5, 1)
    # leak accumulates 0.6 -> 0.9 -> 1.05 fires -> 0 -> 0.6; the 5th token is trimmed
    out, u_mean = lim(x, num_chunks=4, leak=0.5, threshold=1.0)
    assert torch.allclose(out.flatten(), torch.tensor([0.6, 0.9, 0.0, 0.6, 0.0], dtype=torch.float64))
    assert torch.allclose(u_mean.flatten(), torch.tensor([2.1 / 4], dtype=torch.float64))
    # u_prev = 1.0 enters the first step: 0.5 + 0.6 = 1.1 fires
    out, u_mean = lim(x, 4, 0.5, 1.0, u_prev=torch.ones(1, 1, 1, dtype=torch.float64))
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 0.6, 0.9, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(u_mean.flatten(), torch.tensor([1.5 / 4], dtype=torch.float64))


def test_lim_gradient_is_zero_through_a_reset():
    x = torch.tensor([0.6, 0.6, 0.6, 0.6], dtype=torch.float64).view(1, 4, 1).requires_grad_()
    out, _ = lim(x, 4, 0.5, 1.0)
    out[0, 3, 0].backward()  # u4 = 0 * leak + x4 (u3 was reset): d/dx = [0, 0, 0, 1]
    assert torch.equal(x.grad.flatten(), torch.tensor([0, 0, 0, 1.0], dtype=torch.float64))
    x.grad = None
    out, _ = lim(x, 4, 0.5, 1.0)
    out[0, 1, 0].backward()  # u2 = 0.5 x1 + x2 (no reset): d/dx = [0.5, 1, 0, 0]
    assert torch.equal(x.grad.flatten(), torch.tensor([0.5, 1, 0, 0], dtype=torch.float64))


def test_lim_gradcheck_away_from_threshold():
    torch.manual_seed(3)
    x = torch.randn(2, 13, 3, dtype=torch.float64)
    u_prev = torch.randn(2, 3, 3, dtype=torch.float64)
    # keep every pre-activation at least 0.05 away from the threshold
    for _ in range(100):
        pre_ok = True
        u = u_prev.clone()
        for i in range(4):
            u = 0.5 * u + x[:, i * 3:(i + 1) * 3]
            if ((u - 1.0).abs() < 0.05).any():
                pre_ok = False
            u = torch.where(u > 1.0, torch.zeros_like(u), u)
        if pre_ok:
            break
        x, u_prev = torch.randn_like(x), torch.randn_like(u_prev)
    assert pre_ok
    x.requires_grad_(), u_prev.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: lim(a, 4, 0.5, 1.0, b), (x, u_prev))


def test_lim_bad_input_messages():
    x = torch.randn(2, 8, 3)
    with pytest.raises(ValueError, match='num_chunks must be an integer >= 1'):
        lim(x, 0)
    with pytest.raises(ValueError, match='larger than the sequence length L=8'):
        lim(x, 9)
    with pytest.raises(ValueError, match=r'u_prev must have shape .* \(2, 2, 3\)'):
        lim(x, 4, u_prev=torch.zeros(2, 3, 3))
    with pytest.raises(TypeError, match='u_prev dtype'):
        lim(x, 4, u_prev=torch.zeros(2, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r'x must be a \(B, L, R\) tensor'):
        lim(torch.randn(8, 3), 4)


def test_lim_backend_on_cpu(monkeypatch):
    x = torch.randn(1, 4, 2)
    assert lim_backend(x) == 'torch'
    assert 'torch' in available_lim_backends()
    monkeypatch.setenv('MEMBA_LIM_BACKEND', 'cuda')
    with pytest.raises(RuntimeError, match='needs CUDA tensors'):
        lim(x, 2)
    monkeypatch.setenv('MEMBA_LIM_BACKEND', 'fast')
    with pytest.raises(ValueError, match='MEMBA_LIM_BACKEND must be cuda, triton or torch'):
        lim(x, 2)
