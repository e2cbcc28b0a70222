"""The CUDA extensions' ops reject wrong tensor arguments with a RuntimeError that names the op
and the argument, before touching memory (GPU).

Every op is first called with arguments laid out as memba_vision's call sites lay them out
(strided halves and slices, given output buffers): those must be accepted. Then one argument
at a time gets a wrong dtype, shape, device or strides. The calls run in a child process
(``python tests/test_kernel_arg_checks.py``), which prints one line per case, so that a
crash names the case that caused it instead of ending the test session.
"""
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cases(dev='cuda'):
    """([(name, op label, call, argument the error must name or None for a call that must
    work)], the output buffers that rejected calls must leave alone)."""
    from memba_vision.ops.bidirectional_ssm import scan_extension
    from memba_vision.ops.lim import cuda as lim_cuda
    ext = scan_extension()[0]
    lim_cuda._load()  # importing the extension registers torch.ops.memba_vision.lim
    lim_op, lim_bwd_op = torch.ops.memba_vision.lim, torch.ops.memba_vision.lim_backward
    f32, bf16, f64 = torch.float32, torch.bfloat16, torch.float64
    g = torch.Generator(device=dev).manual_seed(0)
    B, L, D, N, R = 2, 37, 64, 16, 16

    def rnd(*shape, dtype=f32):
        return torch.randn(*shape, device=dev, generator=g).to(dtype)

    def strided_last(*shape, dtype=f32):  # same shape, last axis with stride 2
        return rnd(*shape[:-1], 2 * shape[-1], dtype=dtype)[..., ::2]

    def transposed(rows, cols, dtype=f32):  # (rows, cols), not contiguous
        return rnd(cols, rows, dtype=dtype).t()

    def expanded(*shape, dtype=f32):  # repeated elements along the first axes
        return rnd(1, 1, shape[-1], dtype=dtype).expand(*shape)

    # the layouts of ops.bidirectional_ssm: halves of xz, slices of xdbl, halves of dxz
    xz, xdbl = rnd(B, L, 2 * D), rnd(B, L, 3 + 2 * N)
    scan = dict(u=xz[..., :D], delta=rnd(B, L, D), A=-torch.rand(D, N, device=dev, generator=g) - 0.1,
                B=xdbl[..., 3:3 + N], C=xdbl[..., 3 + N:], D=rnd(D), z=xz[..., D:],
                delta_bias=rnd(D), softplus=True, reverse=False)
    out = rnd(B, L, 2 * D)[..., D:]
    dz_out, dbc_out = rnd(B, L, 2 * D)[..., D:], rnd(B, L, 3 + 2 * N)[..., 3:]
    fwd = dict(scan, out=out, out_scale=0.5, accumulate=True)
    Q = (L + 15) // 16  # the states saved before every 16th scan step
    states = rnd(B, Q, D, N)
    bwd = dict(scan, dout=rnd(B, L, D), states=states, dout_scale=0.5, dz_out=dz_out,
               dz_accumulate=True, dBC_out=dbc_out)
    # the layouts of ops.cross_scan: K directions of one u, B and C slices of one x_proj output
    K = 4
    xdbl4 = rnd(B, L, K, 3 + 2 * N)
    dirs = dict(u=xz[..., :D], delta=rnd(B, L, K, D),
                A=-torch.rand(K, D, N, device=dev, generator=g) - 0.1, B=xdbl4[..., 3:3 + N],
                C=xdbl4[..., 3 + N:], D=rnd(K, D), delta_bias=rnd(K, D), softplus=True,
                reverse=[False, False, True, True], rows=[0, L, 0, L])
    dirs_out, du_dirs = rnd(B, L, K, D), rnd(B, L, K, D)
    dbc_dirs = rnd(B, L, K, 3 + 2 * N)[..., 3:]
    fwd_dirs = dict(dirs, out=dirs_out)
    states_dirs = rnd(K, B, Q, D, N)
    bwd_dirs = dict(dirs, dout=rnd(B, L, D), states=states_dirs, du_out=du_dirs,
                    dBC_out=dbc_dirs)
    dirs_bf16 = dict(dirs, **{k: dirs[k].to(bf16) for k in ('u', 'delta', 'B', 'C')})
    dA, dD, dA_dirs, dD_dirs = rnd(D, N), rnd(D), rnd(K, D, N), rnd(K, D)  # trainable A, D
    buffers = (out, dz_out, dbc_out, dirs_out, du_dirs, dbc_dirs, dA, dD, dA_dirs, dD_dirs,
               states, states_dirs)
    conv = [xz[..., :D], rnd(D, 4), rnd(D), False, True]
    conv_bwd = dict(x=xz[..., :D], weight=rnd(D, 4), bias=rnd(D), grad_y=rnd(B, L, D),
                    reverse=True, silu=True, out=out, accumulate=True)
    l = L // 4
    v = rnd(B, L, R)
    pair = [v, rnd(B, l, R), rnd(B, l, R), 4, 0.5, 1.0]
    pair_bwd = [v, rnd(B, l, R), rnd(B, l, R), rnd(2, B, L, R), rnd(B, l, R), rnd(B, l, R),
                4, 0.5, 1.0]
    v2 = rnd(B, L, 2, R)  # one input per direction
    pair2, pair2_bwd = [v2] + pair[1:], [v2] + pair_bwd[1:3] + [rnd(B, L, 2, R)] + pair_bwd[4:]
    # ops.silu_gate's norm gate: z the half of a (B, L, 2D) in_proj output, bf16
    zb = rnd(B, L, 2 * D, dtype=bf16)[..., D:]
    norm = [rnd(B, L, D), rnd(D), rnd(D), 1e-5, zb]
    norm_bwd = norm[:3] + [zb, rnd(B, L), rnd(B, L), rnd(B, L, D, dtype=bf16)]
    # ops.bidirectional_ssm's Memba gate: z and dz the halves of (B, L, 2D) tensors, bf16
    gz = [rnd(2, B, L, R, dtype=bf16), rnd(D, R), zb]
    gz_bwd = [rnd(2, B, L, D, dtype=bf16), rnd(2, B, L, R, dtype=bf16), rnd(R, D),
              rnd(B, L, 2 * D, dtype=bf16)[..., D:]]
    buffers += (gz_bwd[3],)
    # ops.depthwise_conv2d: x the half of a (B, H, W, 2D) in_proj output, bf16
    Hc, Wc = 5, 7
    xc = rnd(B, Hc, Wc, 2 * D, dtype=bf16)[..., :D]
    dw = [xc, rnd(D, 1, 3, 3), rnd(D)]
    dw_bwd = dw + [rnd(B, Hc, Wc, D, dtype=bf16)]
    # ops.layer_norm: a block norm's input, bf16 (B, H, W, C)
    ln = [rnd(B, Hc, Wc, D, dtype=bf16), rnd(D), rnd(D), 1e-5]
    ln_bwd = ln[:3] + [rnd(B * Hc * Wc), rnd(B * Hc * Wc), rnd(B, Hc, Wc, D, dtype=bf16)]
    lim = [strided_last(B, L, R), rnd(B, l, R), 4, 0.5, 1.0]  # the op copies strided inputs
    lim_bwd = [rnd(B, L, R), rnd(B, l, R), rnd(B, L, R), rnd(B, l, R), 4, 0.5, 1.0, True,
               True]

    def kw(fn, base, **change):
        return lambda: fn(**dict(base, **change))

    def pos(fn, base, index, value):
        args = list(base)
        args[index] = value
        return lambda: fn(*args)

    cases = [('scan_fwd accepts', 'scan_fwd', kw(ext.scan_fwd, fwd), None),
             ('scan_fwd accepts save_states', 'scan_fwd',
              kw(ext.scan_fwd, fwd, save_states=True), None),
             ('scan_bwd accepts', 'scan_bwd', kw(ext.scan_bwd, bwd), None),
             ('scan_bwd accepts bf16 + fp32 dBC_out', 'scan_bwd',
              kw(ext.scan_bwd, dict(bwd, **{k: bwd[k].to(bf16) for k in
                                            ('u', 'delta', 'B', 'C', 'z', 'dout')},
                                    dz_out=None, dz_accumulate=False)), None),
             ('conv_fwd accepts', 'conv_fwd', lambda: ext.conv_fwd(*conv), None),
             ('gate_z_fwd accepts', 'gate_z_fwd', lambda: ext.gate_z_fwd(*gz), None),
             ('gate_z_fwd accepts no z', 'gate_z_fwd', lambda: ext.gate_z_fwd(*gz[:2]), None),
             ('gate_z_bwd accepts', 'gate_z_bwd', lambda: ext.gate_z_bwd(*gz_bwd), None),
             ('gate_z_bwd accepts no dz', 'gate_z_bwd',
              pos(ext.gate_z_bwd, gz_bwd, 0, None), None),
             ('conv_bwd accepts', 'conv_bwd', kw(ext.conv_bwd, conv_bwd), None),
             ('lim_pair_fwd accepts', 'lim_pair_fwd', lambda: ext.lim_pair_fwd(*pair), None),
             ('lim_pair_bwd accepts', 'lim_pair_bwd', lambda: ext.lim_pair_bwd(*pair_bwd),
              None),
             ('lim_pair_fwd accepts (B, L, 2, R)', 'lim_pair_fwd',
              lambda: ext.lim_pair_fwd(*pair2), None),
             ('lim_pair_bwd accepts (B, L, 2, R)', 'lim_pair_bwd',
              lambda: ext.lim_pair_bwd(*pair2_bwd), None),
             ('scan_bwd accepts dA_out + dD_out', 'scan_bwd',
              kw(ext.scan_bwd, bwd, dA_out=dA, dD_out=dD), None),
             ('scan_dirs_fwd accepts', 'scan_dirs_fwd', kw(ext.scan_dirs_fwd, fwd_dirs), None),
             ('scan_dirs_fwd accepts save_states', 'scan_dirs_fwd',
              kw(ext.scan_dirs_fwd, fwd_dirs, save_states=True), None),
             ('scan_dirs_bwd accepts dA_out + dD_out', 'scan_dirs_bwd',
              kw(ext.scan_dirs_bwd, bwd_dirs, dA_out=dA_dirs, dD_out=dD_dirs), None),
             ('scan_dirs_bwd accepts', 'scan_dirs_bwd', kw(ext.scan_dirs_bwd, bwd_dirs), None),
             ('scan_dirs_fwd accepts bf16 + fp32 out', 'scan_dirs_fwd',
              kw(ext.scan_dirs_fwd, dict(dirs_bf16, out=dirs_out)), None),
             ('scan_dirs_bwd accepts bf16 + fp32 du_out', 'scan_dirs_bwd',
              kw(ext.scan_dirs_bwd, dict(dirs_bf16, dout=rnd(B, L, D, dtype=bf16),
                                         states=states_dirs, du_out=du_dirs)), None),
             ('norm_gate_fwd accepts', 'norm_gate_fwd', lambda: ext.norm_gate_fwd(*norm), None),
             ('norm_gate_fwd accepts fp32 z', 'norm_gate_fwd',
              pos(ext.norm_gate_fwd, norm, 4, rnd(B, L, D)), None),
             ('norm_gate_bwd accepts', 'norm_gate_bwd', lambda: ext.norm_gate_bwd(*norm_bwd),
              None),
             ('norm_gate_fwd accepts c', 'norm_gate_fwd',
              lambda: ext.norm_gate_fwd(*norm, rnd(B, L, D, dtype=bf16)), None),
             ('norm_gate_bwd accepts c', 'norm_gate_bwd',
              lambda: ext.norm_gate_bwd(*norm_bwd, rnd(B, L, D, dtype=bf16)), None),
             ('dwconv_fwd accepts', 'dwconv_fwd', lambda: ext.dwconv_fwd(*dw), None),
             ('dwconv_fwd accepts no bias', 'dwconv_fwd', pos(ext.dwconv_fwd, dw, 2, None),
              None),
             ('dwconv_bwd accepts', 'dwconv_bwd', lambda: ext.dwconv_bwd(*dw_bwd), None),
             ('layer_norm_fwd accepts', 'layer_norm_fwd', lambda: ext.layer_norm_fwd(*ln),
              None),
             ('layer_norm_bwd accepts', 'layer_norm_bwd', lambda: ext.layer_norm_bwd(*ln_bwd),
              None),
             ('lim accepts strided x', 'lim', lambda: lim_op(*lim), None),
             ('lim_backward accepts', 'lim_backward', lambda: lim_bwd_op(*lim_bwd), None)]
    bad_scan = {
        'u': [rnd(B, L, D, dtype=f64), scan['u'].cpu(), transposed(L, D).expand(B, L, D),
              rnd(L, D)],
        'delta': [rnd(B, L, D, dtype=bf16), rnd(B, L, D + 1), rnd(B, L, D).cpu(),
                  strided_last(B, L, D)],
        'A': [scan['A'].double(), rnd(D, 8), transposed(D, N), scan['A'].cpu()],
        'B': [rnd(B, L, 8), strided_last(B, L, N), rnd(B, L, N, dtype=bf16)],
        'C': [rnd(B, L + 1, N), strided_last(B, L, N), rnd(B, L, N).cpu()],
        'D': [rnd(D + 1), rnd(D, dtype=bf16), rnd(D, 2)[:, 0]],
        'z': [rnd(B, L, D + 1), rnd(B, L, D, dtype=f64), strided_last(B, L, D)],
        'delta_bias': [rnd(D, dtype=f64), rnd(1)],
    }
    for op_name, fn, base in (('scan_fwd', ext.scan_fwd, fwd), ('scan_bwd', ext.scan_bwd, bwd)):
        for arg, values in bad_scan.items():
            for i, value in enumerate(values):
                cases.append((f'{op_name} {arg} #{i}', op_name, kw(fn, base, **{arg: value}),
                              'u' if arg == 'u' else arg))
    for i, value in enumerate([rnd(B, L, D, dtype=bf16), rnd(B, L - 1, D), expanded(B, L, D),
                               out.cpu()]):
        cases.append((f'scan_fwd out #{i}', 'scan_fwd', kw(ext.scan_fwd, fwd, out=value), 'out'))
    for arg, values in {'dout': [rnd(B, L, D, dtype=f64), rnd(B, L, 2 * D),
                                 strided_last(B, L, D)],
                        'states': [rnd(B, Q, D, N, dtype=bf16), rnd(B, Q - 1, D, N),
                                   rnd(B, Q, N, D).transpose(2, 3), states.cpu(),
                                   rnd(B, L, D, N)],
                        'dz_out': [rnd(B, L, D, dtype=bf16), expanded(B, L, D), rnd(B, L, 1)],
                        'dBC_out': [rnd(B, L, 2 * N, dtype=f64), rnd(B, L, N),
                                    strided_last(B, L, 2 * N), expanded(B, L, 2 * N),
                                    dbc_out.cpu()],
                        'dA_out': [rnd(D, N, dtype=f64), rnd(D, 8), transposed(D, N),
                                   dA.cpu()],
                        'dD_out': [rnd(D, 2)[:, 0], rnd(D + 1), rnd(D, dtype=bf16)]}.items():
        for i, value in enumerate(values):
            cases.append((f'scan_bwd {arg} #{i}', 'scan_bwd', kw(ext.scan_bwd, bwd, **{arg: value}),
                          arg))
    bad_dirs = {
        'u': [rnd(B, L, D, dtype=f64), transposed(L, D).expand(B, L, D), rnd(L, D)],
        'delta': [rnd(B, L, D), rnd(B, L, 5, D), rnd(B, L, K, D, dtype=bf16),
                  strided_last(B, L, K, D), rnd(B, L, K, D).cpu()],
        'A': [rnd(K, D, 8), rnd(K - 1, D, N), rnd(D, N), rnd(K, D, N, dtype=f64)],
        'B': [rnd(B, L, K, 8), strided_last(B, L, K, N), rnd(B, L, K - 1, N)],
        'C': [rnd(B, L, K, N, dtype=bf16), rnd(B, L + 1, K, N)],
        'D': [rnd(K * D), rnd(K, D, dtype=bf16)],
        'delta_bias': [rnd(K, D, dtype=f64), transposed(K, D)],
        'reverse': [[False] * 3],
        'rows': [[0, 5, 0, 5], [0, -1, 0, L]],
    }
    for op_name, fn, base in (('scan_dirs_fwd', ext.scan_dirs_fwd, fwd_dirs),
                              ('scan_dirs_bwd', ext.scan_dirs_bwd, bwd_dirs)):
        for arg, values in bad_dirs.items():
            for i, value in enumerate(values):
                cases.append((f'{op_name} {arg} #{i}', op_name, kw(fn, base, **{arg: value}),
                              arg))
        # a rows list of the wrong length: the message names reverse and rows together
        cases.append((f'{op_name} rows of 3', op_name, kw(fn, base, rows=[0, L, 0]), 'reverse'))
    for arg, op_name, fn, base, values in [
            ('out', 'scan_dirs_fwd', ext.scan_dirs_fwd, fwd_dirs,
             [rnd(B, L, K, D, dtype=f64), rnd(B, L, D), expanded(B, L, K, D),
              dirs_out.cpu()]),
            ('dout', 'scan_dirs_bwd', ext.scan_dirs_bwd, bwd_dirs,
             [rnd(B, L, K, D), rnd(B, L, D, dtype=bf16), strided_last(B, L, D)]),
            ('states', 'scan_dirs_bwd', ext.scan_dirs_bwd, bwd_dirs,
             [rnd(K, B, Q, D, N, dtype=bf16), rnd(K, B, Q - 1, D, N), rnd(K - 1, B, Q, D, N),
              rnd(B, Q, D, N), rnd(K, B, Q, N, D).transpose(3, 4), states_dirs.cpu()]),
            ('du_out', 'scan_dirs_bwd', ext.scan_dirs_bwd, bwd_dirs,
             [rnd(B, L, K, D, dtype=f64), expanded(B, L, K, D), rnd(B, L, K - 1, D)]),
            ('dBC_out', 'scan_dirs_bwd', ext.scan_dirs_bwd, bwd_dirs,
             [rnd(B, L, K, 2 * N, dtype=f64), rnd(B, L, K, N), strided_last(B, L, K, 2 * N),
              expanded(B, L, K, 2 * N)]),
            ('dA_out', 'scan_dirs_bwd', ext.scan_dirs_bwd, bwd_dirs,
             [rnd(D, N), rnd(K, D, N, dtype=bf16), expanded(K, D, N)]),
            ('dD_out', 'scan_dirs_bwd', ext.scan_dirs_bwd, bwd_dirs,
             [rnd(D), rnd(K, D, dtype=f64)])]:
        for i, value in enumerate(values):
            cases.append((f'{op_name} {arg} #{i}', op_name, kw(fn, base, **{arg: value}), arg))
    for i, (index, arg, value) in enumerate([
            (0, 'x', rnd(B, L, D, dtype=f64)), (0, 'x', conv[0].cpu()),
            (0, 'x', strided_last(B, L, D)), (1, 'weight', rnd(D, 1, 4)),
            (1, 'weight', rnd(D, 4, dtype=bf16)), (1, 'weight', transposed(D, 4)),
            (2, 'bias', rnd(D + 1)), (2, 'bias', rnd(D, dtype=f64))]):
        cases.append((f'conv_fwd {arg} #{i}', 'conv_fwd', pos(ext.conv_fwd, conv, index, value),
                      arg))
    for arg, values in {'grad_y': [rnd(B, L, D, dtype=bf16), rnd(B, L, D + 1),
                                   strided_last(B, L, D)],
                        'out': [expanded(B, L, D), rnd(B, L, D, dtype=f64)],
                        'weight': [rnd(D, 4).cpu()]}.items():
        for i, value in enumerate(values):
            cases.append((f'conv_bwd {arg} #{i}', 'conv_bwd',
                          kw(ext.conv_bwd, conv_bwd, **{arg: value}), arg))
    for i, (index, arg, value) in enumerate([
            (0, 'x', strided_last(B, L, R)), (0, 'x', rnd(B, L, R, dtype=f64)),
            (0, 'x', v.cpu()), (1, 'u_prev_f', rnd(B, l + 1, R)),
            (2, 'u_prev_b', rnd(B, l, R, dtype=bf16)),
            (1, 'u_prev_f', rnd(B, R, l).transpose(1, 2)),
            (3, 'num_chunks', L + 1), (3, 'num_chunks', 65), (0, 'x', rnd(B, L, 3, R)),
            (0, 'x', rnd(B, L, 2, R).transpose(0, 1))]):
        cases.append((f'lim_pair_fwd {arg} #{i}', 'lim_pair_fwd',
                      pos(ext.lim_pair_fwd, pair, index, value), arg))
    cases.append(('lim_pair_bwd grad_out (per direction)', 'lim_pair_bwd',
                  pos(ext.lim_pair_bwd, pair2_bwd, 3, rnd(2, B, L, R)), 'grad_out'))
    for i, (index, arg, value) in enumerate([
            (3, 'grad_out', rnd(B, L, R)), (3, 'grad_out', rnd(2, B, L, R, dtype=bf16)),
            (3, 'grad_out', strided_last(2, B, L, R)), (4, 'grad_mean_f', rnd(B, l - 1, R)),
            (5, 'grad_mean_b', strided_last(B, l, R)), (1, 'u_prev_f', rnd(B, l, R).cpu())]):
        cases.append((f'lim_pair_bwd {arg} #{i}', 'lim_pair_bwd',
                      pos(ext.lim_pair_bwd, pair_bwd, index, value), arg))
    bad_norm = [
        (4, 'z', rnd(B, L, D, dtype=f64)), (4, 'z', zb.cpu()), (4, 'z', strided_last(B, L, D)),
        (4, 'z', rnd(B, L, 2 * D, dtype=bf16)[..., 1:D + 1]),      # rows not 4-aligned
        (4, 'z', rnd(B, L + 1, D, dtype=bf16)[:, :L]),             # rows not equally spaced
        (4, 'the channel count', rnd(B, L, 6, dtype=bf16)), (4, 'z', rnd(L, D, dtype=bf16)),
        (0, 'y', rnd(B, L, D, dtype=bf16)), (0, 'y', rnd(B, L, 2 * D)[..., :D]),
        (0, 'y', rnd(B, L + 1, D)), (1, 'weight', rnd(D + 1)), (1, 'weight', rnd(D, dtype=bf16)),
        (2, 'bias', rnd(D).cpu())]
    for i, (index, arg, value) in enumerate(bad_norm):
        cases.append((f'norm_gate_fwd {arg} #{i}', 'norm_gate_fwd',
                      pos(ext.norm_gate_fwd, norm, index, value), arg))
    for i, (index, arg, value) in enumerate([(index - (index == 4), arg, value)
                                             for index, arg, value in bad_norm[:3]] + [
            (4, 'mean', rnd(B, L + 1)), (5, 'rstd', rnd(B, L, dtype=bf16)),
            (6, 'dout', rnd(B, L, D)), (6, 'dout', strided_last(B, L, D, dtype=bf16))]):
        cases.append((f'norm_gate_bwd {arg} #{i}', 'norm_gate_bwd',
                      pos(ext.norm_gate_bwd, norm_bwd, index, value), arg))
    # the gate correction c: z's dtype, shape and device, contiguous
    for i, value in enumerate([rnd(B, L, D), rnd(B, L, D + 4, dtype=bf16),
                               strided_last(B, L, D, dtype=bf16),
                               rnd(B, L, D, dtype=bf16).cpu()]):
        cases.append((f'norm_gate_fwd c #{i}', 'norm_gate_fwd',
                      lambda value=value: ext.norm_gate_fwd(*norm, value), 'c'))
        cases.append((f'norm_gate_bwd c #{i}', 'norm_gate_bwd',
                      lambda value=value: ext.norm_gate_bwd(*norm_bwd, value), 'c'))
    for i, (index, arg, value) in enumerate([
            (0, 'S', rnd(2, B, L, R, dtype=f64)), (0, 'S', gz[0].cpu()),
            (0, 'S', rnd(2, B, L, 8, dtype=bf16)), (0, 'S', strided_last(2, B, L, R, dtype=bf16)),
            (0, 'S', rnd(B, L, R, dtype=bf16)),
            (0, 'S', rnd(2 * B * L * R + 1, dtype=bf16)[1:].view(2, B, L, R)),  # not 16-byte
            (1, 'W', rnd(D, R, dtype=bf16)), (1, 'W', transposed(D, R)), (1, 'W', rnd(D, 8)),
            (1, 'W', rnd(D * R + 1)[1:].view(D, R)),                     # not 16-byte aligned
            (1, 'the channel count', rnd(6, R)),
            (2, 'z', rnd(B, L, D)), (2, 'z', rnd(B, L, D + 4, dtype=bf16)), (2, 'z', zb.cpu()),
            (2, 'z', rnd(B, L, 2 * D, dtype=bf16)[..., 1:D + 1]),      # rows not 4-aligned
            (2, 'z', rnd(B, L + 1, D, dtype=bf16)[:, :L])]):           # rows not equally spaced
        cases.append((f'gate_z_fwd {arg} #{i}', 'gate_z_fwd', pos(ext.gate_z_fwd, gz, index, value),
                      arg))
    for i, (index, arg, value) in enumerate([
            (3, 'out', gz_bwd[3].cpu()), (3, 'out', rnd(B, L, D, dtype=f64)),
            (3, 'out', expanded(B, L, D, dtype=bf16)), (3, 'out', strided_last(B, L, D, dtype=bf16)),
            (3, 'the channel count', rnd(B, L, 6, dtype=bf16)),
            (3, 'out', rnd(B, L, 2 * D, dtype=bf16)[..., 1:D + 1]),
            (1, 'dv', rnd(2, B, L, R)), (1, 'dv', rnd(2, B, L + 1, R, dtype=bf16)),
            (1, 'dv', strided_last(2, B, L, R, dtype=bf16)),
            (0, 'dz', rnd(2, B, L, D)), (0, 'dz', rnd(B, L, D, dtype=bf16)),
            (0, 'dz', rnd(2, B, L, 2 * D, dtype=bf16)[..., :D]),
            (2, 'W_in', rnd(D, R)), (2, 'W_in', rnd(R, D, dtype=bf16)),
            (2, 'W_in', transposed(R, D)), (2, 'W_in', rnd(R * D + 1)[1:].view(R, D))]):
        cases.append((f'gate_z_bwd {arg} #{i}', 'gate_z_bwd',
                      pos(ext.gate_z_bwd, gz_bwd, index, value), arg))
    bad_dw = [
        (0, 'x', rnd(B, Hc, Wc, D, dtype=f64)), (0, 'x', xc.cpu()), (0, 'x', rnd(B, Hc * Wc, D)),
        (0, 'x', rnd(B, Hc, Wc, 2 * D, dtype=bf16)[..., ::2]),     # channels strided
        (0, 'x', rnd(B, Hc, Wc, 2 * D, dtype=bf16)[..., 1:D + 1]),  # pixels not 4-aligned
        (0, 'x', rnd(B, Hc, Wc, 6, dtype=bf16)),                    # 6 channels
        (1, 'weight', rnd(D, 1, 5, 5)), (1, 'weight', rnd(D, 1, 3, 3, dtype=bf16)),
        (1, 'weight', rnd(D, 1, 3, 3).transpose(2, 3)), (2, 'bias', rnd(D + 1)),
        (2, 'bias', rnd(D).cpu())]
    for i, (index, arg, value) in enumerate(bad_dw):
        cases.append((f'dwconv_fwd {arg} #{i}', 'dwconv_fwd', pos(ext.dwconv_fwd, dw, index, value),
                      arg))
    for i, (index, arg, value) in enumerate(bad_dw[:2] + [
            (3, 'grad_u', rnd(B, Hc, Wc, D)), (3, 'grad_u', rnd(B, Hc, Wc + 1, D, dtype=bf16)),
            (3, 'grad_u', rnd(B, Hc, Wc, 2 * D, dtype=bf16)[..., :D])]):
        cases.append((f'dwconv_bwd {arg} #{i}', 'dwconv_bwd',
                      pos(ext.dwconv_bwd, dw_bwd, index, value), arg))
    bad_ln = [
        (0, 'x', rnd(B, Hc, Wc, D, dtype=f64)), (0, 'x', ln[0].cpu()),
        (0, 'x', rnd(B, Hc, Wc, 2 * D, dtype=bf16)[..., :D]),         # rows not contiguous
        (0, 'the channel count', rnd(B, Hc, 6, dtype=bf16)),
        (0, 'the channel count', rnd(B, 2052, dtype=bf16)),
        (1, 'weight', rnd(D + 4)), (1, 'weight', rnd(D, dtype=bf16)), (2, 'bias', rnd(D).cpu())]
    for i, (index, arg, value) in enumerate(bad_ln):
        cases.append((f'layer_norm_fwd {arg} #{i}', 'layer_norm_fwd',
                      pos(ext.layer_norm_fwd, ln, index, value), arg))
    for i, (index, arg, value) in enumerate(bad_ln[:3] + [
            (3, 'mean', rnd(B * Hc * Wc + 1)), (4, 'rstd', rnd(B * Hc * Wc, dtype=bf16)),
            (5, 'dout', rnd(B, Hc, Wc, D)),
            (5, 'dout', rnd(B, Hc, Wc, 2 * D, dtype=bf16)[..., :D])]):
        cases.append((f'layer_norm_bwd {arg} #{i}', 'layer_norm_bwd',
                      pos(ext.layer_norm_bwd, ln_bwd, index, value), arg))
    for i, (index, arg, value) in enumerate([
            (0, 'x', lim[0].cpu()), (0, 'x', rnd(B * L, R)), (1, 'u_prev', rnd(B, l + 1, R)),
            (1, 'u_prev', rnd(B, l, R, dtype=f64)), (1, 'u_prev', rnd(B, l, R, dtype=f64).cpu()),
            (2, 'num_chunks', L + 1)]):
        cases.append((f'lim {arg} #{i}', 'lim', pos(lim_op, lim, index, value), arg))
    for i, (index, arg, value) in enumerate([
            (2, 'grad_out', rnd(B, l, R)), (2, 'grad_out', rnd(B, L, R, dtype=bf16)),
            (3, 'grad_u_mean', rnd(B, L, R)), (1, 'u_prev', rnd(B, l, R).cpu())]):
        cases.append((f'lim_backward {arg} #{i}', 'lim_backward',
                      pos(lim_bwd_op, lim_bwd, index, value), arg))
    return cases, buffers


_PREFIX = {'lim': 'memba_vision::lim', 'lim_backward': 'memba_vision::lim_backward'}


def _run_cases() -> None:
    """Child process: one ``CASE`` line before and one ``RESULT`` line after every call."""
    cases, buffers = _cases()
    torch.cuda.synchronize()
    for name, op, call, arg in cases:
        print(f'CASE {name}', flush=True)
        before = [b.clone() for b in buffers]
        try:
            call()
            torch.cuda.synchronize()
            status, msg = 'ok', ''
        except RuntimeError as e:
            status, msg = 'raised', str(e).split('\n')[0]
        if arg is not None:  # a rejected call must leave the caller's buffers as they were
            torch.cuda.synchronize()
            if not all(torch.equal(a, b) for a, b in zip(before, buffers)):
                status = 'touched'
        else:
            for b, a in zip(buffers, before):  # accepted calls may write: reset
                b.copy_(a)
        print(f'RESULT {name}\t{status}\t{msg}', flush=True)


requires_ext = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@requires_ext
def test_every_op_checks_every_tensor_argument():
    from memba_vision.ops.bidirectional_ssm import scan_extension
    from memba_vision.ops.lim import cuda as lim_cuda
    for loaded in (scan_extension(), lim_cuda._load()):
        if loaded[0] is None:
            pytest.skip(loaded[1])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                              [ROOT, os.environ.get('PYTHONPATH', '')])))
    lines = proc.stdout.splitlines()
    started = [ln[5:] for ln in lines if ln.startswith('CASE ')]
    results = dict(ln[7:].split('\t', 1) for ln in lines if ln.startswith('RESULT '))
    if proc.returncode != 0:
        crashed = started[-1] if started and started[-1] not in results else None
        pytest.fail(f'the case process ended with code {proc.returncode} '
                    f'(in case {crashed!r}):\n{proc.stderr[-3000:]}')
    cases, _ = _cases()
    assert len(cases) > 100 and len(results) == len(cases)
    failures = []
    for name, op, _, arg in cases:
        status, msg = results[name].split('\t', 1)
        if arg is None:
            if status != 'ok':
                failures.append(f'{name}: rejected a valid call: {msg}')
            continue
        prefix = _PREFIX.get(op, f'memba_vision {op}')
        if status != 'raised':
            failures.append(f'{name}: {status} instead of a RuntimeError')
        elif not re.search(re.escape(f'{prefix}: {arg}') + r'\b', msg):
            failures.append(f'{name}: message does not name {prefix!r} and {arg!r}: {msg}')
    assert not failures, '\n'.join(failures)


if __name__ == '__main__':
    sys.path.insert(0, ROOT)
    _run_cases()
