"""CUDA-graph replay of the backbones equals the eager forward and backward."""
import copy

import pytest
import torch

from memba_vision.models.backbones import VanillaVMamba, Vim

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
TINY_VIM = dict(arch=dict(embed_dims=64, depth=3, d_state=16), img_size=32, patch_size=8,
                drop_path_rate=0.0)
# no LoRA dropout: eager and graphed runs draw different random masks
# d_state and gate rank 16: on a GPU the memba_vision scan and gate kernels run
MEMBA = dict(lora=dict(in_proj=8, out_proj=8, dropout=0.0), gate=dict(rank=16, num_chunks=4))


def _randomise_peft(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_cpu_inputs_run_eagerly():
    """cuda_graph=True on a CPU input: the graph machinery is never entered, and output and
    gradients are those of a cuda_graph=False copy."""
    torch.manual_seed(0)
    model = Vim(**TINY_VIM, peft=MEMBA, cuda_graph=True)
    _randomise_peft(model)
    eager = copy.deepcopy(model)
    eager.cuda_graph = False

    def refuse(*args):
        raise AssertionError('a CPU input reached the CUDA-graph path')

    model._graphs = refuse
    x = torch.randn(2, 3, 32, 32)
    results = []
    for m in (model, eager):
        out = m(x)[0]
        out.sum().backward()
        results.append((out.detach(), [p.grad for p in m.parameters() if p.requires_grad]))
    (out, grads), (out_ref, grads_ref) = results
    assert torch.equal(out, out_ref) and len(grads) == len(grads_ref) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref))


def _step(model, x, amp):
    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=amp):
        out = model(x)[0]
    loss = (out.float() * torch.arange(out.shape[1], device=out.device)).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach().float(), grads


@needs_gpu
@pytest.mark.parametrize('backbone,amp', [('vim', False), ('vim', True), ('vmamba', False)])
def test_graph_replay_matches_eager(backbone, amp):
    torch.manual_seed(0)
    if backbone == 'vim':
        eager = Vim(**TINY_VIM, peft=MEMBA)
    else:
        eager = VanillaVMamba(arch=dict(dims=16, depths=[1, 1, 2, 1], d_state=8), img_size=64,
                              drop_path_rate=0.0, peft=MEMBA)
    _randomise_peft(eager)
    eager = eager.cuda().train()
    graphed = copy.deepcopy(eager)
    graphed.cuda_graph = True
    size = 32 if backbone == 'vim' else 64
    # mamba-ssm's backward sums with atomics, so eager grads vary at ~1e-4 run to run
    tol = dict(rtol=2e-2, atol=2e-2) if amp else dict(rtol=1e-3, atol=1e-3)
    for step, batch in enumerate((4, 4, 4, 2)):  # replays with new data, then a new shape
        x = torch.randn(batch, 3, size, size, device='cuda')
        out_e, grads_e = _step(eager, x, amp)
        out_g, grads_g = _step(graphed, x, amp)
        torch.testing.assert_close(out_g, out_e, **tol)
        assert grads_g.keys() == grads_e.keys() and grads_e
        for name in grads_e:
            torch.testing.assert_close(grads_g[name], grads_e[name], **tol, msg=name)
        # an optimiser step between replays: the graphs must see the new weights
        with torch.no_grad():
            for pe, pg in zip(eager.parameters(), graphed.parameters()):
                if pe.requires_grad:
                    pe.add_(0.01)
                    pg.add_(0.01)
    assert len(graphed._graphs.graphs) == 2  # batch 4 and batch 2
    graphed.eval()
    eager.eval()
    with torch.no_grad():
        x = torch.randn(3, 3, size, size, device='cuda')
        torch.testing.assert_close(graphed(x)[0], eager(x)[0], rtol=1e-4, atol=1e-5)
    assert len(graphed._graphs.graphs) == 3
    graphed.cpu()
    assert not graphed._graphs.graphs  # moving the module drops its graphs


@needs_gpu
def test_grad_accumulation_across_replays():
    torch.manual_seed(0)
    model = Vim(**TINY_VIM, peft=MEMBA, cuda_graph=True).cuda().train()
    _randomise_peft(model)
    x = torch.randn(4, 3, 32, 32, device='cuda')
    model(x)[0].sum().backward()
    first = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model(x)[0].sum().backward()  # .grad accumulates; it never aliases graph memory
    for n, p in model.named_parameters():
        if n in first:
            torch.testing.assert_close(p.grad, 2 * first[n], rtol=1e-3, atol=1e-3, msg=n)


@needs_gpu
def test_random_ops_draw_fresh_masks_on_replay():
    torch.manual_seed(0)
    peft = dict(MEMBA, lora=dict(in_proj=8, out_proj=8, dropout=0.5))
    model = Vim(**dict(TINY_VIM, drop_path_rate=0.5), peft=peft, cuda_graph=True).cuda().train()
    _randomise_peft(model)
    x = torch.randn(4, 3, 32, 32, device='cuda')
    outs = [model(x)[0].detach() for _ in range(3)]
    assert not torch.equal(outs[1], outs[2])


@needs_gpu
def test_new_signatures_do_not_leave_a_workspace_behind():
    """Every capture warms up on one shared side stream: cuBLAS keeps a workspace per
    stream it has seen, so a stream per capture would add ~32 MiB per signature."""
    from memba_vision.models.cuda_graph import CUDAGraphs
    graphs = CUDAGraphs()
    lin = torch.nn.Linear(256, 256).cuda()

    def allocated_after(batch):
        x = torch.randn(batch, 256, device='cuda')
        with torch.no_grad():
            graphs(lin, lambda t: (lin(t),), x)
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    allocated_after(4)  # the first capture may create the shared stream's workspace
    start = allocated_after(5)
    grown = allocated_after(6) - start
    grown += allocated_after(7) - allocated_after(6)
    assert grown < 4 * 2**20, f'{grown / 2**20:.1f} MiB more after two new signatures'


@needs_gpu
def test_persistent_stream_is_one_stream_per_purpose_and_device():
    from memba_vision.utils import persistent_stream
    dev = torch.device('cuda', torch.cuda.current_device())
    warm = persistent_stream('cuda_graph_warmup')
    assert persistent_stream('cuda_graph_warmup', dev) is warm  # default: the current device
    gate = persistent_stream('memba_gate', dev)
    assert gate is not warm and persistent_stream('memba_gate', 'cuda') is gate
    assert gate != torch.cuda.current_stream(dev) and gate.device == dev
