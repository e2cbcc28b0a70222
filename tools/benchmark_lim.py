"""Benchmark the LIM backends (PyTorch reference, fused CUDA) per call.

For each backend available on the device and each shape (B, L, R) and dtype:
forward and forward+backward time per call through ``memba_vision.ops.lim``
(training-like: inputs require grad, u_prev given, random grad_out and
grad_u_mean; median over repetitions after warm-up, CUDA events on GPU),
effective bandwidth over the minimal bytes moved, its share of the
device-to-device copy bandwidth measured in the same run, and the speed-up over
the reference. Then the whole-model view: 48 chained calls (Vim-S: 24 layers x 2
directions, u_prev = the previous call's u_mean) forward + one backward.

    python tools/benchmark_lim.py                 # GPU, all backends
    python tools/benchmark_lim.py --device cpu    # reference only, few repetitions
"""
import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from memba_vision.ops import lim, lim_backend  # noqa: E402

ENV = 'MEMBA_BACKEND'
SHAPES = {'Vim-S call': (32, 197, 16), 'VMamba stage 1': (32, 3136, 16),
          'bandwidth': (256, 3136, 64)}
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}


@contextlib.contextmanager
def forced_backend(name):
    """``lim`` runs on ``name``: 'reference' is forced, 'cuda' is the default on the GPU."""
    old = os.environ.get(ENV)
    os.environ[ENV] = 'reference' if name == 'reference' else ''
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


class Timer:
    """Median seconds per call of ``fn`` (CUDA events on GPU, perf_counter on CPU)."""

    def __init__(self, device, warmup, reps):
        self.cuda = device.type == 'cuda'
        self.warmup, self.reps = warmup, reps

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn):
        for _ in range(self.warmup):
            fn()
        inner = 1
        if self.cuda:  # several calls per timed repetition: event overhead stays negligible
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            inner = max(1, min(100, int(1e-3 / max(time.perf_counter() - t0, 1e-7))))
        times = []
        for _ in range(self.reps):
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3 / inner)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def copy_bandwidth(device, timer, nbytes):
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    sec = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / sec


def minimal_bytes(B, L, R, T, itemsize):
    """(forward, backward) bytes: every needed element read or written once."""
    l = L // T
    used, full, small = B * l * T * R, B * L * R, B * l * R
    fwd = used + small + full + small          # x, u_prev -> out, u_mean
    bwd = used + small + used + small + full + small  # x, u_prev, g_out, g_mean -> g_x, g_u
    return fwd * itemsize, bwd * itemsize


def bench_call(shape, dtype, T, device, timer):
    B, L, R = shape
    l = L // T
    x = torch.randn(B, L, R, device=device, dtype=dtype, requires_grad=True)
    u = torch.randn(B, l, R, device=device, dtype=dtype, requires_grad=True)
    g_out = torch.randn(B, L, R, device=device, dtype=dtype)
    g_mean = torch.randn(B, l, R, device=device, dtype=dtype)

    def fwd():
        return lim(x, T, 0.5, 1.0, u)

    def fwd_bwd():
        out, u_mean = lim(x, T, 0.5, 1.0, u)
        return torch.autograd.grad((out, u_mean), (x, u), (g_out, g_mean))

    return timer(fwd), timer(fwd_bwd)


def chained_calls(dtype, T, device, calls=48, shape=(32, 197, 16)):
    """A step of ``calls`` chained LIM calls (u_prev = the previous u_mean, as in the
    model) forward, then one backward through all of them."""
    B, L, R = shape
    xs = [torch.randn(B, L, R, device=device, dtype=dtype, requires_grad=True)
          for _ in range(calls)]
    g_outs = [torch.randn(B, L, R, device=device, dtype=dtype) for _ in range(calls)]

    def step():
        u, outs = None, []
        for x in xs:
            out, u = lim(x, T, 0.5, 1.0, u)
            outs.append(out)
        return torch.autograd.grad(outs, xs, g_outs)

    return step


def bench_model(dtype, T, device, timer):
    """48 chained LIM calls forward, then one backward through all of them."""
    return timer(chained_calls(dtype, T, device))


def bench_model_graph(dtype, T, device, timer):
    """The same 48-call forward + backward captured once in a CUDA graph, then replayed:
    the LIM cost of a training step whose launches are graph-captured."""
    step = chained_calls(dtype, T, device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as capture requires
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return timer(graph.replay)


def bench_eager_floor(dtype, device, timer, calls=48, shape=(32, 197, 16)):
    """48 ``x * 2`` forward + one backward: this host's eager cost of the simplest op."""
    xs = [torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
          for _ in range(calls)]
    g_outs = [torch.randn(*shape, device=device, dtype=dtype) for _ in range(calls)]
    return timer(lambda: torch.autograd.grad([x * 2 for x in xs], xs, g_outs))


def fmt(v, spec, width):
    return f'{v:{spec}}'.rjust(width) if v is not None else '-'.rjust(width)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    parser.add_argument('--num-chunks', type=int, default=4)
    parser.add_argument('--warmup', type=int, default=None)
    parser.add_argument('--reps', type=int, default=None)
    parser.add_argument('--shapes', nargs='*', default=None,
                        help='B,L,R triples (default: the three standard shapes)')
    parser.add_argument('--dtypes', nargs='*', default=list(DTYPES), choices=list(DTYPES))
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('no CUDA device; use --device cpu for a reference-only smoke run')
    on_gpu = device.type == 'cuda'
    timer = Timer(device, args.warmup if args.warmup is not None else (20 if on_gpu else 1),
                  args.reps if args.reps is not None else (50 if on_gpu else 2))
    backends = ['reference']
    if on_gpu and lim_backend(torch.empty(1, device=device)) == 'cuda':
        backends.append('cuda')
    if args.shapes:
        shapes = {f'#{i}': tuple(int(v) for v in s.split(',')) for i, s in enumerate(args.shapes)}
    else:
        shapes = SHAPES
    T = args.num_chunks

    copy_bw = copy_bandwidth(device, timer, (1 << 30) if on_gpu else (1 << 28))
    results = {}  # (shape name, dtype, backend) -> (fwd s, fwd+bwd s)
    for sname, shape in shapes.items():
        for dname in args.dtypes:
            for backend in backends:
                with forced_backend(backend):
                    try:
                        results[sname, dname, backend] = bench_call(
                            shape, DTYPES[dname], T, device, timer)
                    except Exception as e:  # e.g. out of memory for the reference
                        print(f'{backend} {shape} {dname}: {type(e).__name__}: {e}',
                              file=sys.stderr)
                        results[sname, dname, backend] = (None, None)
                if on_gpu:
                    torch.cuda.empty_cache()
    model, graphed, floor = {}, {}, {}
    for dname in args.dtypes:
        for backend in backends:
            with forced_backend(backend):
                model[dname, backend] = bench_model(DTYPES[dname], T, device, timer)
                if on_gpu and backend != 'reference':
                    graphed[dname, backend] = bench_model_graph(DTYPES[dname], T, device, timer)
        floor[dname] = bench_eager_floor(DTYPES[dname], device, timer)

    # ------------------------------------------------------------------ report
    name = torch.cuda.get_device_name(device) if on_gpu else 'CPU'
    print(f'\nLIM benchmark on {name}: torch {torch.__version__}, '
          f'backends {backends}, num_chunks={T}, leak=0.5, threshold=1.0, '
          f'{timer.reps} reps after {timer.warmup} warm-up (median)')
    print(f'device-to-device copy bandwidth (read+write): {copy_bw / 1e9:.0f} GB/s')
    head = (f'{"shape (B,L,R)":<30}{"dtype":>6}{"backend":>8} |{"fwd us":>11}{"GB/s":>8}'
            f'{"%copy":>7}{"x ref":>7} |{"f+b us":>11}{"GB/s":>8}{"%copy":>7}{"x ref":>7}')
    print(head)
    print('-' * len(head))
    for sname, shape in shapes.items():
        for dname in args.dtypes:
            itemsize = torch.empty(0, dtype=DTYPES[dname]).element_size()
            fwd_b, bwd_b = minimal_bytes(*shape, T, itemsize)
            ref = results[sname, dname, 'reference']
            for backend in backends:
                t_f, t_fb = results[sname, dname, backend]
                row = f'{sname + " " + str(shape):<30}{dname:>6}{backend:>8} |'
                for t, nbytes, t_ref in ((t_f, fwd_b, ref[0]), (t_fb, fwd_b + bwd_b, ref[1])):
                    bw = nbytes / t if t else None
                    row += (fmt(t * 1e6 if t else None, '.1f', 11)
                            + fmt(bw / 1e9 if bw else None, '.1f', 8)
                            + fmt(100 * bw / copy_bw if bw else None, '.0f', 6) + '%'
                            + fmt(t_ref / t if t and t_ref else None, '.1f', 7))
                    row += ' |' if nbytes == fwd_b else ''
                print(row)
    print('\nwhole model (Vim-S): 48 chained LIM calls (32,197,16) forward + backward')
    for dname in args.dtypes:
        for backend in backends:
            t = model[dname, backend]
            print(f'  {dname:>5} {backend:>7}: {t * 1e3:8.2f} ms total, {t / 48 * 1e6:7.1f} us '
                  f'per call, x{model[dname, "torch"] / t:.1f} vs torch')
            if (dname, backend) in graphed:
                g = graphed[dname, backend]
                print(f'  {dname:>5} {backend:>7}: {g * 1e3:8.2f} ms total, {g / 48 * 1e6:7.1f} us '
                      f'per call, replayed as one CUDA graph')
        print(f'  {dname:>5}  eager floor of this host: 48 x (x * 2) forward + backward '
              f'{floor[dname] * 1e3:.2f} ms ({floor[dname] / 48 * 1e6:.1f} us per op)')

    best = backends[-1]
    small = results.get(('Vim-S call', 'fp32', best), (None, None))[1]
    big = results.get(('bandwidth', 'fp32', best), (None, None))
    parts = [f'summary [{name}]: best backend {best}']
    if small:
        parts.append(f'Vim-S call fp32 fwd+bwd {small * 1e6:.1f} us')
    if big[0]:
        fwd_b, bwd_b = minimal_bytes(*SHAPES['bandwidth'], T, 4)
        parts.append(f'(256,3136,64) fp32 {100 * fwd_b / big[0] / copy_bw:.0f}% (fwd) / '
                     f'{100 * (fwd_b + bwd_b) / big[1] / copy_bw:.0f}% (fwd+bwd) of copy bandwidth')
    if 'fp32' in args.dtypes:
        parts.append(f'48-call model fp32 {model["fp32", best] * 1e3:.2f} ms eager'
                     + (f', {graphed["fp32", best] * 1e3:.2f} ms as a CUDA graph'
                        if ('fp32', best) in graphed else '')
                     + f' (torch {model["fp32", "torch"] * 1e3:.2f} ms; host floor '
                     f'{floor["fp32"] * 1e3:.2f} ms for 48 x*2)')
    print('; '.join(parts))


if __name__ == '__main__':
    main()
