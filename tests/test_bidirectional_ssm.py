"""ops.bidirectional_ssm (Vim's fused mixer core) against the per-op mixer path.

On the CPU the op runs on ``ReferenceScanKernels`` (the reference ops behind the
extension's function signatures), which checks the op's own glue: the hand-written
backward, the in-place halves of dxz, the scales and accumulations, the batched
gate products and the membrane chain. On a GPU the extension's new outputs
(strided/accumulated buffers, scales, the LIM pair) are checked against the same
stand-in, and the fused mixer against the per-op mixer.
"""
import pytest
import torch

from memba_vision.models.backbones.vim import VimMixer
from memba_vision.models.peft import parse_peft
from scan_ext_reference import ReferenceScanKernels

GATES = [dict(num_chunks=4), dict(num_chunks=4, residual=False),
         dict(num_chunks=4, transfer=False), dict(num_chunks=3, threshold=0.6), None]


def make_mixer(gate, dtype=torch.float64, device='cpu', seed=0, extra_states=0):
    """A 2-layer Vim mixer (width 20) with LoRA, the gate (or none) and ``extra_states``
    additional-scan states, random weights; LoRA, the gate and the extra states train."""
    peft = parse_peft(dict(lora=dict(in_proj=4, out_proj=4, dropout=0.0),
                           **({'gate': dict(rank=16, **gate)} if gate else {}),
                           **({'additional_scan': dict(states=extra_states)}
                              if extra_states else {})))
    mixer = VimMixer(20, d_state=16, num_layers=2, peft=peft).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random weights everywhere, so that every term matters
        for name, p in mixer.named_parameters():
            scale = 0.5 if 'A_' in name else (0.6 if 'gate' in name else 0.3)
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)
    for name, p in mixer.named_parameters():  # frozen backbone, as in PEFT
        p.requires_grad_('lora' in name or 'gate' in name or 'extra' in name)
    return mixer.to(device)


def run(mixer, hidden, membrane, fused_kernels=None, fused=False):
    """Output, new membrane and the gradients of everything trainable, for one cotangent."""
    hidden = hidden.detach().clone().requires_grad_(True)
    membrane = None if membrane is None else tuple(m.detach().clone().requires_grad_(True)
                                                   for m in membrane)
    if fused:
        result = mixer._fused(mixer.in_proj(hidden), membrane, fused_kernels)
        assert result is not None, 'the fused path did not apply'
        out, new = mixer.out_proj(result[0]), result[1]
    else:
        out, new = mixer(hidden, membrane)
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)).sum()
    if new is not None:
        loss = loss + sum((m * torch.randn(m.shape, generator=g, dtype=torch.float64).to(m)).sum()
                          for m in new)
    params = [p for p in mixer.parameters() if p.requires_grad]
    inputs = [hidden] + list(membrane or ()) + params
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)  # unused: no transfer
    return out.detach(), new, grads


def fused_and_per_op(mixer, gate, kernels):
    """``run``'s results on the fused core (``kernels``) and on the per-op mixer for one input,
    and the names of the gradients (input, membranes, trainable parameters)."""
    hidden = torch.randn(2, 13, 20, generator=torch.Generator().manual_seed(3),
                         dtype=torch.float64)
    membrane = random_membrane(gate, 2, 13)
    fused = run(mixer, hidden, membrane, kernels, fused=True)
    per_op = run(mixer, hidden, membrane)
    names = ['hidden'] + (['membrane_f', 'membrane_b'] if membrane else []) + \
        [n for n, p in mixer.named_parameters() if p.requires_grad]
    return fused, per_op, names


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def random_membrane(gate, B, L, device='cpu', dtype=torch.float64):
    if gate is None:
        return None
    g = torch.Generator().manual_seed(2)
    l = L // gate['num_chunks']
    return tuple((torch.randn(B, l, 16, generator=g, dtype=torch.float64)).to(device, dtype)
                 for _ in range(2))


def loop_lim(x, num_chunks, leak, threshold, u_prev=None):
    """Per-token loop of the LIM (chunk i of every group is token i * l + j), differentiable."""
    l = x.shape[1] // num_chunks
    u = x.new_zeros(x.shape[0], l, x.shape[2]) if u_prev is None else u_prev
    out, total = torch.zeros_like(x), 0
    for i in range(num_chunks):
        u = leak * u + x[:, i * l:(i + 1) * l]
        u = u * (u <= threshold)
        out = torch.cat([out[:, :i * l], u, out[:, (i + 1) * l:]], dim=1)
        total = total + u
    return out, total / num_chunks


@pytest.fixture
def loop_kernels(monkeypatch):
    """The stand-in extension on per-token loops, independent of the ops the per-op mixer runs."""
    import scan_ext_reference
    from test_scan_tokens import loop_conv, loop_scan

    def scan(u, delta, A, B, C, D, z, bias, softplus, reverse, gate=None):
        return loop_scan(u, delta, A, B, C, D, z, bias, softplus, reverse, gate).to(u.dtype)

    def conv(x, w, bias, activation, reverse):
        assert activation == 'silu'
        return loop_conv(x, w, bias, reverse).to(x.dtype)

    monkeypatch.setattr(scan_ext_reference, 'selective_scan_tokens', scan)
    monkeypatch.setattr(scan_ext_reference, 'causal_conv1d_tokens', conv)
    monkeypatch.setattr(scan_ext_reference, 'lim_reference', loop_lim)
    return ReferenceScanKernels


@pytest.mark.parametrize('gate', GATES)
def test_fused_core_matches_the_per_op_mixer_on_cpu(gate, loop_kernels):
    """The fused op on loop kernels (its glue and the loops) against the per-op mixer."""
    (out, new, grads), (out_ref, new_ref, grads_ref), _ = fused_and_per_op(
        make_mixer(gate), gate, loop_kernels)
    assert rel(out, out_ref) < 1e-10
    if gate is None or not gate.get('transfer', True):
        assert new is None and new_ref is None
    else:
        assert all(rel(a, b) < 1e-10 for a, b in zip(new, new_ref))
        # the LIM fired somewhere: the reset branch is exercised
        assert any((m.abs() < 1e-12).any() for m in new)
    assert len(grads) == len(grads_ref)
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        assert (a is None) == (b is None), f'gradient {i}'
        if a is not None:
            assert rel(a, b) < 1e-9, f'gradient {i}: relative error {rel(a, b):.2e}'


def test_fused_core_gate_gradients_are_not_trivial():
    """The comparison above would pass vacuously if the gate's gradients were zero."""
    mixer = make_mixer(dict(num_chunks=4))
    hidden = torch.randn(2, 13, 20, generator=torch.Generator().manual_seed(3),
                         dtype=torch.float64)
    _, _, grads = run(mixer, hidden, random_membrane(dict(num_chunks=4), 2, 13),
                      ReferenceScanKernels, fused=True)
    names = ['hidden', 'membrane_f', 'membrane_b'] + [n for n, p in mixer.named_parameters()
                                                       if p.requires_grad]
    for name, gr in zip(names, grads):
        assert gr.abs().max() > 0, name


def train_everything(mixer):
    """Full fine-tuning: every SSM parameter (A, D, conv, x_proj, dt_proj) trains too."""
    for p in mixer.parameters():
        p.requires_grad_(True)
    return mixer


@pytest.mark.parametrize('gate', [dict(num_chunks=4), None])
def test_fused_core_trains_every_ssm_parameter_like_the_per_op_mixer(gate, loop_kernels):
    """Every parameter trainable: the fused node (A's and D's gradients from the kernels,
    x_proj's, dt_proj's, the bias's and the conv's in its backward) equals the per-op mixer."""
    (out, _, grads), (out_ref, _, grads_ref), names = fused_and_per_op(
        train_everything(make_mixer(gate)), gate, loop_kernels)
    assert rel(out, out_ref) < 1e-10 and len(grads) == len(grads_ref) == len(names)
    assert {'A_log', 'A_b_log', 'D', 'conv1d.weight', 'conv1d_b.bias', 'x_proj_b.weight',
            'dt_proj.weight', 'dt_proj_b.bias'} <= set(names)
    for name, a, b in zip(names, grads, grads_ref):
        assert a is not None and b is not None, name
        assert rel(a, b) < 1e-9, f'{name}: relative error {rel(a, b):.2e}'


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


def _ext():
    from memba_vision.ops.bidirectional_ssm import scan_extension
    ext, why = scan_extension()
    if ext is None:
        pytest.skip(why)
    return ext


@cuda
@pytest.mark.parametrize('dtype,tol', [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_extension_outputs_match_the_reference_kernels(dtype, tol):
    ext, ref = _ext(), ReferenceScanKernels
    g = torch.Generator(device='cuda').manual_seed(0)
    Bsz, L, D = 2, 37, 100

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device='cuda', generator=g) * scale).to(dtype)

    xz = rnd(Bsz, L, 2 * D)
    x, z = xz[..., :D], xz[..., D:]
    xdbl = rnd(Bsz, L, 3 + 32, scale=0.5)
    Bm, Cm = xdbl[..., 3:19], xdbl[..., 19:]
    delta = rnd(Bsz, L, D, scale=0.5)
    A = -torch.rand(D, 16, device='cuda', generator=g) - 0.1
    Dv, bias = torch.randn(D, device='cuda', generator=g), torch.randn(D, device='cuda', generator=g) * 0.1
    dout = rnd(Bsz, L, D)
    for reverse in (False, True):
        base = rnd(Bsz, L, D)
        got, want = base.clone(), base.clone()
        _, states = ext.scan_fwd(x, delta, A, Bm, Cm, Dv, z, bias, True, reverse,
                                 out=got, out_scale=0.5, accumulate=True, save_states=True)
        _, states_ref = ref.scan_fwd(x, delta, A, Bm, Cm, Dv, z, bias, True, reverse, out=want,
                                     out_scale=0.5, accumulate=True, save_states=True)
        assert rel(got, want) < tol and rel(states, states_ref) < tol
        dz_got, dz_want = xz.clone(), xz.clone()  # accumulate into a strided half
        dbc_got, dbc_want = torch.zeros_like(xdbl), torch.zeros_like(xdbl)
        r_got = ext.scan_bwd(x, delta, A, Bm, Cm, Dv, z, bias, dout, states, True, reverse,
                             dout_scale=0.5, dz_out=dz_got[..., D:], dz_accumulate=True,
                             dBC_out=dbc_got[..., 3:])
        r_want = ref.scan_bwd(x.float(), delta.float(), A, Bm.float(), Cm.float(), Dv,
                              z.float(), bias, dout.float(), states_ref, True, reverse,
                              dout_scale=0.5, dz_out=dz_want[..., D:], dz_accumulate=True,
                              dBC_out=dbc_want[..., 3:])
        for a, b in zip(r_got[:2], r_want[:2]):
            assert rel(a, b) < tol
        assert rel(dz_got, dz_want) < tol and rel(dbc_got, dbc_want) < tol
        assert torch.equal(dz_got[..., :D], xz[..., :D])  # the other half untouched
    _, states = ext.scan_fwd(x, delta, A, Bm, Cm, Dv, z, bias, True, False, save_states=True)
    with pytest.raises(RuntimeError, match="dBC_out must be"):  # neither fp32 nor u's dtype
        ext.scan_bwd(x, delta, A, Bm, Cm, Dv, z, bias, dout, states, True, False,
                     dBC_out=torch.zeros(Bsz, L, 32, device='cuda', dtype=torch.float64))
    w, cb = torch.randn(D, 4, device='cuda', generator=g), torch.randn(D, device='cuda', generator=g)
    for reverse in (False, True):
        got, want = xz.clone(), xz.clone()
        ext.conv_bwd(x, w, cb, dout, reverse, True, out=got[..., :D], accumulate=True)
        ref.conv_bwd(x, w, cb, dout, reverse, True, out=want[..., :D], accumulate=True)
        assert rel(got, want) < tol
    l = L // 4
    prev = (rnd(Bsz, l, 16), rnd(Bsz, l, 16))
    for v in (rnd(Bsz, L, 16, scale=1.5), rnd(Bsz, L, 2, 16, scale=1.5)):  # shared, per direction
        out_got, mean_got = ext.lim_pair_fwd(v, *prev, 4, 0.5, 1.0)
        out_want, mean_want = ref.lim_pair_fwd(v, *prev, 4, 0.5, 1.0)
        assert out_got.shape == out_want.shape
        assert rel(out_got, out_want) < tol and rel(mean_got, mean_want) < tol
        gout, gm = rnd(*out_want.shape), (rnd(Bsz, l, 16), None)
        got = ext.lim_pair_bwd(v, *prev, gout, *gm, 4, 0.5, 1.0)
        want = ref.lim_pair_bwd(v, *prev, gout, *gm, 4, 0.5, 1.0)
        for a, b in zip(got, want):
            assert rel(a, b) < tol


@cuda
@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-6), (torch.float16, 2e-3),
                                       (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize('Bsz,L,D,off', [(2, 37, 100, 0), (3, 197, 768, 0), (1, 5, 8, 0),
                                          (2, 37, 200, 0), (2, 37, 200, 4)])
def test_gate_z_kernels_against_fp64(dtype, tol, Bsz, L, D, off):
    """Memba's gate branch against fp64: both directions' z' with z (a strided half of xz) and
    without (no residual), and z's gradient written into a strided half, the rest of xz
    untouched. fp16 / bf16 with 16-byte rows take the tensor-core kernel: D = 768, 8 and 200
    (partial 16-row tiles, a 64-channel slice of 8 or 1 tiles); D = 100 (not a multiple of 8)
    and halves 4 elements off a 16-byte boundary (off = 4) take the CUDA-core kernel, as fp32
    does."""
    ext, ref = _ext(), ReferenceScanKernels
    g = torch.Generator(device='cuda').manual_seed(D + off)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, device='cuda', generator=g) * scale).to(dt)

    xz = rnd(Bsz, L, 2 * D + off)
    half = slice(D + off, 2 * D + off)
    S, W, W_in = rnd(2, Bsz, L, 16), rnd(D, 16, scale=0.3, dt=torch.float32), \
        rnd(16, D, scale=0.3, dt=torch.float32)
    for z in (xz[..., half], None):
        got = ext.gate_z_fwd(S, W, z)
        want = ref.gate_z_fwd(S.double(), W.double(), None if z is None else z.double())
        assert got.dtype == dtype and got.shape == (2, Bsz, L, D)
        assert rel(got, want) < tol, rel(got, want)
    dzp, dv = rnd(2, Bsz, L, D), rnd(2, Bsz, L, 16)
    for dz_pair in (dzp, None):
        got, want = xz.clone(), xz.double()
        v_got = ext.gate_z_bwd(dz_pair, dv, W_in, got[..., half])
        v_want = ref.gate_z_bwd(None if dz_pair is None else dz_pair.double(), dv.double(),
                                W_in.double(), want[..., half])
        assert rel(got[..., half], want[..., half]) < tol and rel(v_got, v_want) < tol
        assert torch.equal(got[..., :D + off], xz[..., :D + off])


@cuda
@pytest.mark.parametrize('gate', GATES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('trainable', [False, True])
def test_fused_mixer_matches_the_per_op_mixer_on_gpu(gate, dtype, trainable, monkeypatch):
    """Both paths against an fp64 CPU run of the per-op mixer: fp32 within 1e-4; in bf16
    (every weight in bf16 too) the fused path is at least as accurate as the per-op one.
    ``trainable``: every SSM parameter trains too (full fine-tuning)."""
    _ext()
    mixer = make_mixer(gate, dtype=dtype, device='cuda')
    if trainable:
        train_everything(mixer)
    hidden = torch.randn(2, 45, 20, generator=torch.Generator().manual_seed(3),
                         dtype=torch.float64).to('cuda', dtype)
    membrane = random_membrane(gate, 2, 45, 'cuda', dtype)
    fused = run(mixer, hidden, membrane, fused=True)
    with monkeypatch.context() as m:
        m.setenv('MEMBA_BACKEND', 'reference')  # turns the fused core off
        assert mixer._fused(mixer.in_proj(hidden), membrane) is None
        per_op = run(mixer, hidden, membrane)
    ref = run(mixer.double().cpu(), hidden.double().cpu(),
              None if membrane is None else tuple(m.double().cpu() for m in membrane))

    def flat(result):
        out, new, grads = result
        return [out] + list(new or ()) + [g for g in grads if g is not None]

    for i, (a, p, r) in enumerate(zip(flat(fused), flat(per_op), flat(ref))):
        err, err_per_op = rel(a, r), rel(p, r)
        if dtype == torch.float32:
            assert err < 1e-4, f'quantity {i}: relative error {err:.2e}'
        else:
            assert err <= 1.5 * err_per_op + 2e-3, \
                f'quantity {i}: relative error {err:.2e}, per-op path {err_per_op:.2e}'


@pytest.mark.parametrize('trainable', [False, True])
def test_affix_tokens_run_through_the_fused_core(trainable, loop_kernels):
    """Affix tokens on the fused core (one sequence [forward affix, x, backward affix
    reversed]) equal the per-op mixer's two per-direction sequences: output and the gradients
    of the input, the affix values and every trainable parameter."""
    mixer = make_mixer(None)
    if trainable:
        train_everything(mixer)
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 13, 20, generator=g, dtype=torch.float64)
    affix = torch.randn(2, 3, 2 * mixer.d_inner, generator=g, dtype=torch.float64)
    cot = torch.randn(2, 13, 20, generator=g, dtype=torch.float64)
    results = []
    for fused in (False, True):
        h, a = hidden.clone().requires_grad_(), affix.clone().requires_grad_()
        if fused:
            y = mixer._fused_affix(mixer.in_proj(h), a, loop_kernels)
            assert y is not None, 'the fused path did not apply'
            out = mixer.out_proj(y)
        else:
            out = mixer(h, None, a)[0]
        params = [p for p in mixer.parameters() if p.requires_grad]
        grads = torch.autograd.grad((out * cot).sum(), [h, a] + params)
        results.append((out.detach(), grads))
    (out_ref, grads_ref), (out, grads) = results
    assert rel(out, out_ref) < 1e-10
    for i, (x, r) in enumerate(zip(grads, grads_ref)):
        assert r.abs().max() > 0 and rel(x, r) < 1e-9, f'gradient {i}: {rel(x, r):.2e}'


@pytest.mark.parametrize('states,gate', [(6, None), (6, dict(num_chunks=4)), (20, None)])
@pytest.mark.parametrize('trainable', [False, True])
def test_extra_states_run_through_the_fused_core(states, gate, trainable, loop_kernels):
    """Additional-scan states (d_state 16 + k) on the fused core, the states scanned in groups
    of 16 (the last one padded): equal to the per-op mixer's one scan over all states."""
    mixer = make_mixer(gate, extra_states=states)
    if trainable:
        train_everything(mixer)
    assert mixer._direction(False).A.shape[1] == 16 + states
    (out, _, grads), (out_ref, _, grads_ref), names = fused_and_per_op(mixer, gate, loop_kernels)
    assert rel(out, out_ref) < 1e-10
    assert any('extra_scan' in n for n in names)
    for name, a, b in zip(names, grads, grads_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            assert rel(a, b) < 1e-9, f'{name}: relative error {rel(a, b):.2e}'
