"""A pure-PyTorch stand-in for ``memba_vision._scan_cuda`` (same functions and arguments).

Each function is the reference op (``ops.selective_scan_tokens``,
``ops.causal_conv1d_tokens``, ``ops.lim_reference`` on flipped tokens, ``F.conv2d``) and its
autograd gradient, with the extension's output conventions (``out``/``dz_out``
buffers, ``accumulate``, scales, stacked directions, grids walked by columns, the states the
forward stores for the backward). It lets the tests run ``ops.bidirectional_ssm`` and
``ops.cross_scan`` on the CPU and compare them with the per-op paths.
"""
import torch
import torch.nn.functional as F

from memba_vision.ops import causal_conv1d_tokens, lim_reference, selective_scan_tokens


def _store(out, value, scale=1.0, accumulate=False):
    value = value * scale
    if out is None:
        return value.contiguous()
    out.copy_(out + value.to(out.dtype) if accumulate else value)
    return out


def _wide(t):
    """``t`` in fp32, or fp64 when it is fp64: the kernels compute in fp32."""
    return None if t is None else t.to(torch.promote_types(t.dtype, torch.float32))


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _store_params(dA_out, dD_out, dA, dD):
    """The kernels' optional A and D gradient outputs."""
    for out, g in ((dA_out, dA), (dD_out, dD)):
        if out is not None:
            out.copy_(g)


STATE_EVERY = 16  # scan steps between the states the kernels' forward stores


def _scan_states(u, delta, A, B, delta_bias, softplus, reverse, rows=0):
    """The scan's state before every 16th step of its visiting order (reversed, then over a
    row-major (rows, L / rows) grid by columns when rows > 0), (B, ceil(L / 16), D, N), fp32
    (fp64 for fp64): what the kernels' forward stores with ``save_states``."""
    ct = torch.promote_types(u.dtype, torch.float32)
    L = u.shape[1]
    order = _column_order(L, rows, u.device) if rows else torch.arange(L, device=u.device)
    order = order.flip(0) if reverse else order
    dt = delta[:, order].to(ct) + (0 if delta_bias is None else delta_bias.to(ct))
    dt = F.softplus(dt) if softplus else dt
    dtu, Bs = dt * u[:, order].to(ct), B[:, order].to(ct)
    h = dt.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    states = []
    for s in range(L):
        if s % STATE_EVERY == 0:
            states.append(h)
        h = torch.exp(dt[:, s, :, None] * A.to(ct)) * h + dtu[:, s, :, None] * Bs[:, s, None, :]
    return torch.stack(states, 1)


def _check_states(op, states, expected):
    """The backward's states must be those its forward stored for the same scan."""
    if states is None or not torch.equal(states, expected):
        raise AssertionError(f'{op}: states are not those of this scan')


def _column_order(L, rows, device):
    """The tokens of a row-major (rows, L / rows) grid in the order a walk by columns visits
    them."""
    return torch.arange(L, device=device).view(rows, L // rows).t().reshape(-1)


def _grid_scan(rows, u, delta, A, B, C, D, delta_bias, softplus, reverse):
    """selective_scan_tokens over a row-major (rows, L / rows) grid walked column by column
    (``rows=0``: in token order): the tokens are gathered in visit order and scattered back."""
    if not rows:
        return selective_scan_tokens(u, delta, A, B, C, D, None, delta_bias, softplus, reverse)
    order = _column_order(u.shape[1], rows, u.device)
    y = selective_scan_tokens(u[:, order], delta[:, order], A, B[:, order], C[:, order], D,
                              None, delta_bias, softplus, reverse)
    return y[:, torch.argsort(order)]


def _directions(u, delta, A, B, C, D, delta_bias, softplus, reverse, rows):
    """The K scans of ``scan_dirs_fwd``, stacked (B, L, K, D)."""
    return torch.stack([
        _grid_scan(rows[k], u, delta[:, :, k], A[k], B[:, :, k], C[:, :, k],
                   None if D is None else D[k], None if delta_bias is None else delta_bias[k],
                   softplus, reverse[k]) for k in range(delta.shape[2])], dim=2)


def _dirs_states(u, delta, A, B, delta_bias, softplus, reverse, rows):
    """The states of ``scan_dirs_fwd``'s K scans, (K, B, ceil(L / 16), D, N)."""
    return torch.stack([
        _scan_states(u, delta[:, :, k], A[k], B[:, :, k],
                     None if delta_bias is None else delta_bias[k], softplus, reverse[k], rows[k])
        for k in range(delta.shape[2])])


class ReferenceScanKernels:
    """The extension's functions, computed by the reference ops."""

    @staticmethod
    def scan_fwd(u, delta, A, B, C, D, z, delta_bias, softplus, reverse, out=None,
                 out_scale=1.0, accumulate=False, save_states=False):
        with torch.no_grad():
            y = selective_scan_tokens(u, delta, A, B, C, D, z, delta_bias, softplus, reverse)
            states = (_scan_states(u, delta, A, B, delta_bias, softplus, reverse)
                      if save_states else None)
        return _store(out, y, out_scale, accumulate), states

    @staticmethod
    def scan_bwd(u, delta, A, B, C, D, z, delta_bias, dout, states, softplus, reverse,
                 dout_scale=1.0, dz_out=None, dz_accumulate=False, dBC_out=None, dA_out=None,
                 dD_out=None):
        _check_states('scan_bwd', states,
                      _scan_states(u, delta, A, B, delta_bias, softplus, reverse))
        u_, delta_, B_, C_, z_ = (_leaf(t) for t in (u, delta, B, C, z))
        A, D = _leaf(A), _leaf(D if D is not None else torch.zeros_like(A[:, 0]))
        with torch.enable_grad():
            y = selective_scan_tokens(u_, delta_, A, B_, C_, D, z_, delta_bias, softplus,
                                      reverse)
            leaves = [u_, delta_, B_, C_, A, D] + ([z_] if z_ is not None else [])
            grads = torch.autograd.grad(y, leaves, dout * dout_scale)
        du, ddelta, dB, dC = (g.contiguous() for g in grads[:4])  # as the kernels return them
        _store_params(dA_out, dD_out, grads[4], grads[5])
        dz = None
        if z_ is not None:
            dz = _store(dz_out, grads[6], 1.0, dz_accumulate)
        if dBC_out is not None:
            dBC_out.copy_(torch.cat([dB, dC], dim=-1))
        return du, ddelta, dz, dB, dC

    @staticmethod
    def gate_z_fwd(S, W, z=None):
        with torch.no_grad():
            zp = torch.matmul(_wide(S), _wide(W).t())                       # (2, B, L, D)
            if z is not None:
                zp = zp + _wide(z)
        return zp.to(S.dtype).contiguous()

    @staticmethod
    def gate_z_bwd(dz, dv, W_in, out):
        with torch.no_grad():
            v_sum = _wide(dv).sum(0)                                        # (B, L, R)
            g = torch.matmul(v_sum, _wide(W_in))
            if dz is not None:
                g = g + _wide(dz).sum(0)
            out.copy_(g)
        return v_sum.to(dv.dtype)

    @staticmethod
    def conv_fwd(x, weight, bias, reverse, silu):
        with torch.no_grad():
            return causal_conv1d_tokens(_wide(x), _wide(weight), _wide(bias),
                                        'silu' if silu else None, reverse).to(x.dtype).contiguous()

    @staticmethod
    def conv_bwd(x, weight, bias, grad_y, reverse, silu, out=None, accumulate=False):
        x_ = _leaf(_wide(x))
        with torch.enable_grad():
            y = causal_conv1d_tokens(x_, _wide(weight), _wide(bias), 'silu' if silu else None,
                                     reverse)
            dx, = torch.autograd.grad(y, [x_], grad_y.to(y.dtype))
        return _store(out, dx, 1.0, accumulate)

    @staticmethod
    def _dwconv(x, weight, bias):
        """silu(conv2d(x) + bias), x (B, H, W, D), in the kernels' precision."""
        pre = F.conv2d(_wide(x).permute(0, 3, 1, 2), _wide(weight), _wide(bias), padding=1,
                       groups=x.shape[-1])
        return F.silu(pre).permute(0, 2, 3, 1)

    @staticmethod
    def dwconv_fwd(x, weight, bias):
        with torch.no_grad():
            return ReferenceScanKernels._dwconv(x, weight, bias).to(x.dtype).contiguous()

    @staticmethod
    def dwconv_bwd(x, weight, bias, grad_u):
        x_ = _leaf(_wide(x))
        with torch.enable_grad():
            u = ReferenceScanKernels._dwconv(x_, weight, bias)
            dx, = torch.autograd.grad(u, [x_], grad_u.to(u.dtype))
        return dx.to(x.dtype).contiguous()

    @staticmethod
    def _lim_pair(xs, prev, num_chunks, leak, threshold):
        """Each direction's (out in input token order, u_mean); xs: its input (B, L, R)."""
        outs, means = [], []
        for d, (xd, pd) in enumerate(zip(xs, prev)):
            o, m = lim_reference(xd.flip(1) if d else xd, num_chunks, leak, threshold, pd)
            outs.append(o.flip(1) if d else o)
            means.append(m)
        return outs, means

    @staticmethod
    def _per_direction(x):
        """x (B, L, R) shared, or (B, L, 2, R): one input per direction; the stacking axis of
        the outputs (0, or 2 for x's layout)."""
        return ([x, x], 0) if x.dim() == 3 else (list(x.unbind(2)), 2)

    @staticmethod
    def lim_pair_fwd(x, u_prev_f, u_prev_b, num_chunks, leak, threshold):
        xs, axis = ReferenceScanKernels._per_direction(x)
        with torch.no_grad():
            outs, means = ReferenceScanKernels._lim_pair(xs, (u_prev_f, u_prev_b), num_chunks,
                                                         leak, threshold)
        return torch.stack(outs, axis), torch.stack(means)

    @staticmethod
    def lim_pair_bwd(x, u_prev_f, u_prev_b, grad_out, grad_mean_f, grad_mean_b, num_chunks,
                     leak, threshold):
        xs, axis = ReferenceScanKernels._per_direction(x)
        xs = [_leaf(xd) for xd in xs]
        prev = [_leaf(u_prev_f), _leaf(u_prev_b)]
        with torch.enable_grad():
            outs, means = ReferenceScanKernels._lim_pair(xs, prev, num_chunks, leak, threshold)
            loss = sum((o * g).sum() for o, g in zip(outs, grad_out.unbind(axis)))
            for m, g in zip(means, (grad_mean_f, grad_mean_b)):
                if g is not None:
                    loss = loss + (m * g).sum()
            leaves = xs + [p for p in prev if p is not None]
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        gx = torch.stack([g if g is not None else torch.zeros_like(xd)
                          for g, xd in zip(grads[:2], xs)], axis)
        rest = iter(grads[2:])
        gp = [None if p is None else next(rest) for p in prev]
        return gx, gp[0], gp[1]

    @staticmethod
    def scan_dirs_fwd(u, delta, A, B, C, D, delta_bias, softplus, reverse, rows, out=None,
                      save_states=False):
        with torch.no_grad():
            y = _directions(u, delta, A, B, C, D, delta_bias, softplus, reverse, rows)
            states = _dirs_states(u, delta, A, B, delta_bias, softplus, reverse, rows) \
                if save_states else None
        return _store(out, y), states

    @staticmethod
    def scan_dirs_bwd(u, delta, A, B, C, D, delta_bias, dout, states, softplus, reverse, rows,
                      du_out=None, dBC_out=None, dA_out=None, dD_out=None):
        _check_states('scan_dirs_bwd', states,
                      _dirs_states(u, delta, A, B, delta_bias, softplus, reverse, rows))
        u_, delta_, B_, C_ = (_leaf(t) for t in (u, delta, B, C))
        A, D = _leaf(A), _leaf(D if D is not None else torch.zeros_like(A[..., 0]))
        with torch.enable_grad():
            y = _directions(u_, delta_, A, B_, C_, D, delta_bias, softplus, reverse, rows)
            # every direction receives dout; u's gradient is kept per direction
            grads = torch.autograd.grad(y, [delta_, B_, C_, A, D],
                                        dout.unsqueeze(2).expand_as(y), retain_graph=True)
            du = torch.stack([torch.autograd.grad(y[:, :, k], u_, dout, retain_graph=True)[0]
                              for k in range(y.shape[2])], dim=2)
        _store_params(dA_out, dD_out, grads[3], grads[4])
        ddelta, dB, dC = (g.contiguous() for g in grads[:3])
        du = _store(du_out, du)
        if dBC_out is not None:
            dBC_out.copy_(torch.cat([dB, dC], dim=-1))
        return du, ddelta, dB, dC

    @staticmethod
    def _layer_norm(x, weight, bias, eps):
        """LayerNorm over the last axis in the kernels' precision, written out by hand."""
        x = _wide(x)
        mean = x.mean(-1, keepdim=True)
        rstd = ((x - mean) ** 2).mean(-1, keepdim=True).add(eps).rsqrt()
        return (x - mean) * rstd * weight + bias, mean, rstd

    @staticmethod
    def layer_norm_fwd(x, weight, bias, eps):
        with torch.no_grad():
            out, mean, rstd = ReferenceScanKernels._layer_norm(x, weight, bias, eps)
        return out.to(x.dtype), mean.reshape(-1), rstd.reshape(-1)

    @staticmethod
    def _eps_of(x, rstd):
        """The backward kernels take the forward's statistics instead of eps; the references
        recover it: eps = 1 / rstd^2 - var(x) over the rows of x (..., D)."""
        var = x.double().reshape(-1, x.shape[-1]).var(-1, unbiased=False)
        return (rstd.double().reshape(-1) ** -2 - var).mean().item()

    @staticmethod
    def layer_norm_bwd(x, weight, bias, mean, rstd, dout):
        x_ = _leaf(x)
        eps = ReferenceScanKernels._eps_of(x, rstd)
        with torch.enable_grad():
            out, _, _ = ReferenceScanKernels._layer_norm(x_, weight, bias, eps)
            dx, = torch.autograd.grad(out, [x_], dout.to(out.dtype))
        return dx.to(x.dtype).contiguous()

    @staticmethod
    def _norm_gate(y, weight, bias, eps, z, c=None):
        """LayerNorm(y) * silu(z + c) in y's precision, written out by hand (no
        F.layer_norm)."""
        yn, mean, rstd = ReferenceScanKernels._layer_norm(y, weight, bias, eps)
        zw = z.to(y.dtype) + (0 if c is None else c.to(y.dtype))
        return yn * (zw * torch.sigmoid(zw)), mean, rstd

    @staticmethod
    def norm_gate_fwd(y, weight, bias, eps, z, c=None):
        with torch.no_grad():
            out, mean, rstd = ReferenceScanKernels._norm_gate(y, weight, bias, eps, z, c)
        return out.to(z.dtype), mean.squeeze(-1), rstd.squeeze(-1)

    @staticmethod
    def norm_gate_bwd(y, weight, bias, z, mean, rstd, dout, c=None):
        y_, z_ = _leaf(y), _leaf(z)
        eps = ReferenceScanKernels._eps_of(y, rstd)
        with torch.enable_grad():
            out, _, _ = ReferenceScanKernels._norm_gate(y_, weight, bias, eps, z_, c)
            dy, dz = torch.autograd.grad(out, [y_, z_], dout.to(out.dtype))  # dz: z''s
        return dy.contiguous(), dz.to(z.dtype).contiguous()
