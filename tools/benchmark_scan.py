"""Per-call speed of the selective-scan and conv kernels at one layer's shape.

    python tools/benchmark_scan.py                      # Vim-S: (32, 197, 768), bf16
    python tools/benchmark_scan.py --batch 128 --dtype fp32

Times, side by side in one run (CUDA events, median of --reps after warm-up):
the token-major kernels of memba_vision (``memba_vision._scan_cuda``'s scan and
conv, which ``ops.bidirectional_ssm`` runs: one direction's scan, the kernels alone, and
Memba's gate branch for both directions) and mamba-ssm's ``selective_scan_fn`` on the same data
in its (b, d, l) layout, forward and forward+backward (gradients for u, delta, B, C
and z, as in PEFT). memba_vision's forward is timed as training runs it: saving the
scan's states every 16 steps, which its backward reads.
It also prints the memory-traffic floor of each call at the measured copy
bandwidth, so the gap to the hardware is visible. Needs a CUDA GPU.
"""
import argparse
import os.path as osp
import statistics
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402


def time_ms(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth():
    """Bytes read + written per second by a large device-to-device copy."""
    a = torch.empty(1 << 28, dtype=torch.uint8, device='cuda')
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), 3, 10)
    return 2 * a.numel() / (ms * 1e-3)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--length', type=int, default=197)
    p.add_argument('--dim', type=int, default=768)
    p.add_argument('--dtype', choices=['bf16', 'fp32'], default='bf16')
    p.add_argument('--warmup', type=int, default=10)
    p.add_argument('--reps', type=int, default=50)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit('benchmark_scan: needs a CUDA GPU')
    from memba_vision.ops.bidirectional_ssm import scan_extension
    from memba_vision.ops.scan.mamba_ssm import load as mamba_ssm_scan_fn
    ext, why = scan_extension()
    if ext is None:
        raise SystemExit(f'benchmark_scan: {why}')

    dt = torch.bfloat16 if args.dtype == 'bf16' else torch.float32
    b, l, d, n, r = args.batch, args.length, args.dim, 16, 16
    g = torch.Generator(device='cuda').manual_seed(0)

    def rnd(*shape, scale=1.0, dtype=dt):
        return (torch.randn(*shape, device='cuda', generator=g) * scale).to(dtype)

    xz = rnd(b, l, 2 * d).requires_grad_()
    x_dbl = rnd(b, l, 24 + 2 * n).requires_grad_()
    delta = (rnd(b, l, d, scale=0.5) - 1).requires_grad_()
    A = -torch.exp(rnd(d, n, scale=0.5, dtype=torch.float32))
    Dp, bias = rnd(d, dtype=torch.float32), rnd(d, scale=0.3, dtype=torch.float32)
    S, W = rnd(2, b, l, r, scale=0.5), rnd(d, r, scale=0.2, dtype=torch.float32)
    dz_pair, dv, W_in = rnd(2, b, l, d), rnd(2, b, l, r), rnd(r, d, dtype=torch.float32)
    conv_w, conv_b = rnd(d, 4, dtype=torch.float32), rnd(d, dtype=torch.float32)
    dy = rnd(b, l, d)
    u, z = xz[..., :d], xz[..., d:]
    Bm, Cm = x_dbl[..., 24:24 + n], x_dbl[..., 24 + n:]

    rows = []

    def add(name, fwd, bwd, nbytes):
        f = time_ms(fwd, args.warmup, args.reps)
        fb = time_ms(lambda: (fwd(), bwd()), args.warmup, args.reps)
        rows.append((name, f * 1e3, fb * 1e3, nbytes))

    # the reversed direction's scan
    inputs = [t.detach() for t in (u, delta)] + [A, Bm.detach(), Cm.detach(), Dp, z.detach(),
                                                 bias]
    _, states = ext.scan_fwd(*inputs, True, True, save_states=True)  # the backward's input

    elt = torch.finfo(dt).bits // 8
    tok = b * l * d * elt
    states_bytes = b * -(-l // 16) * d * n * 4  # fp32 states before every 16th step
    # forward floor: read u, delta, z, write y (B and C are small); backward also reads
    # dy and writes du, ddelta, dz; memba_vision's forward writes the states, its backward
    # reads them
    add('memba_vision scan', lambda: ext.scan_fwd(*inputs, True, True, save_states=True),
        lambda: ext.scan_bwd(*inputs, dy, states, True, True), (4 + 7) * tok + 2 * states_bytes)
    fn, why = mamba_ssm_scan_fn()
    if fn is not None:
        u_t = u.detach().transpose(1, 2).contiguous().requires_grad_()
        dl_t = delta.detach().transpose(1, 2).contiguous().requires_grad_()
        z_t = z.detach().transpose(1, 2).contiguous().requires_grad_()
        B_t = Bm.detach().transpose(1, 2).contiguous().requires_grad_()
        C_t = Cm.detach().transpose(1, 2).contiguous().requires_grad_()
        dy_t = dy.transpose(1, 2).contiguous()

        def mamba():
            return fn(u_t, dl_t, A, B_t, C_t, Dp, z_t, bias, True)
        f = time_ms(mamba, args.warmup, args.reps)
        fb = time_ms(lambda: mamba().backward(dy_t), args.warmup, args.reps)
        rows.append(('mamba-ssm selective_scan_fn', f * 1e3, fb * 1e3, (4 + 7) * tok))
    else:
        print(f'mamba-ssm not timed: {why}')
    x = u.detach()
    add('memba_vision conv (reversed)', lambda: ext.conv_fwd(x, conv_w, conv_b, True, True),
        lambda: ext.conv_bwd(x, conv_w, conv_b, dy, True, True), (2 + 3) * tok)
    # Memba's gate branch, both directions: z' = z + S_k W^T (read z, write two z'), and
    # dz = dz'_0 + dz'_1 + dv W_in (read two dz', write dz)
    dz_half = torch.empty_like(xz)[..., d:]
    add('memba_vision gate_z (2 dirs)', lambda: ext.gate_z_fwd(S, W, z.detach()),
        lambda: ext.gate_z_bwd(dz_pair, dv, W_in, dz_half), 6 * tok)

    bw = copy_bandwidth()
    print(f'device: {torch.cuda.get_device_name()}, shape (b, l, d) = ({b}, {l}, {d}), {args.dtype}, '
          f'copy bandwidth {bw / 1e12:.2f} TB/s')
    print(f'{"kernel":32s} {"fwd us":>9s} {"fwd+bwd us":>11s} {"floor us":>9s}')
    for name, f, fb, nbytes in rows:
        print(f'{name:32s} {f:9.1f} {fb:11.1f} {nbytes / bw * 1e6:9.1f}')
    if fn is not None:
        mamba = next(row for row in rows if row[0].startswith('mamba-ssm'))
        print(f'ratio mamba-ssm/memba_vision scan (fwd+bwd): {mamba[2] / rows[0][2]:.2f}')


if __name__ == '__main__':
    main()
