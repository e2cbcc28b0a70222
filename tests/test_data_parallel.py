"""PostBackwardDataParallel: two processes (gloo on the CPU, NCCL on two GPUs) train like one
process on the concatenated batches, and tools/train.py / tools/test.py work with
--launcher pytorch (gloo, two CPU processes)."""
import json
import os
import re
import socket
import subprocess
import sys
import tempfile

import pytest
import torch

from conftest import ROOT, requires_cuda, write_tiny_config

sys.path.insert(0, os.path.join(ROOT, 'tests'))
import dist_worker  # noqa: E402

PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_ranks(case, backend, out_dir, world=2, timeout=300):
    """Starts ``world`` processes of tests/dist_worker.py; returns each rank's saved states."""
    env = dict(os.environ, MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(world), OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
    if backend == 'gloo':  # CPU ranks: on a machine with fewer GPUs than ranks, mmengine's
        env['CUDA_VISIBLE_DEVICES'] = ''  # logger would look up a GPU for LOCAL_RANK and fail
    procs = [subprocess.Popen([PY, os.path.join(ROOT, 'tests', 'dist_worker.py'), case, backend,
                               str(out_dir)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    # every failed rank's log: the first to fail is often not rank 0, which then only reports
    # that its peer closed the connection
    failed = [f'rank {r} failed:\n{log[-4000:]}' for r, (p, log) in enumerate(zip(procs, logs))
              if p.returncode != 0]
    assert not failed, '\n'.join(failed)
    return [torch.load(out_dir / f'rank{r}.pt', weights_only=True) for r in range(world)]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_against_reference(case, ranks, device, tol):
    want = dist_worker.reference(case, device)
    start = dist_worker.trainable(dist_worker.build(case, 'cpu')[0])
    for step, ref in enumerate(want):
        got0, got1 = ranks[0]['states'][step], ranks[1]['states'][step]
        assert got0.keys() == ref.keys()
        for name in ref:
            assert torch.equal(got0[name], got1[name]), f'step {step}: ranks differ in {name}'
            moved = ref[name] - start[name]
            if moved.abs().max() == 0:  # no gradient anywhere (``unused``): untouched
                assert torch.equal(got0[name], start[name]), f'step {step}: {name} moved'
            else:  # compare the updates, so that a tolerance means something
                err = rel(got0[name] - start[name], moved)
                assert err < tol, f'step {step}, {name}: relative error {err:.2e}'


@pytest.mark.parametrize('case', ['toy', 'toy_accum', 'vim'])
def test_two_gloo_processes_train_like_one_process_on_the_whole_batch(case, tmp_path):
    ranks = run_ranks(case, 'gloo', tmp_path)
    check_against_reference(case, ranks, 'cpu', tol=1e-5)
    frozen0, frozen1 = ranks[0]['frozen'], ranks[1]['frozen']
    assert frozen0.keys() and all(torch.equal(frozen0[k], frozen1[k]) for k in frozen0)


def test_toy_case_uses_a_parameter_on_one_rank_only():
    """The toy case's point: b gets a gradient from rank 0's half only, ``unused`` from none."""
    batch = dist_worker.toy_batches('cpu')[0]
    assert dist_worker.half(batch, 0)['flags'].any()
    assert not dist_worker.half(batch, 1)['flags'].any()


def test_wrapper_is_the_distributed_default_of_every_config():
    from mmengine.config import Config
    from mmengine.model import is_model_wrapper
    from mmengine.registry import MODEL_WRAPPERS, DefaultScope
    for path in ('configs/vtab1k/vim_s_memba_clevr_count.py',
                 'configs/vtab1k/vmamba_s_lora_dtd.py',
                 'configs/demo/vim_tiny_memba_synthetic.py'):
        cfg = Config.fromfile(os.path.join(ROOT, path))
        assert cfg.model_wrapper_cfg == dict(type='mmpretrain.PostBackwardDataParallel'), path
    # the runner looks the type up in mmengine's root registry (Runner.wrap_model)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        cls = MODEL_WRAPPERS.get('mmpretrain.PostBackwardDataParallel')
    from memba_vision.engine import PostBackwardDataParallel
    assert cls is PostBackwardDataParallel
    assert is_model_wrapper(PostBackwardDataParallel.__new__(PostBackwardDataParallel))


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    """A tiny demo config on a synthetic task with an odd number (75) of test images."""
    root = tmp_path_factory.mktemp('dist')
    cfg, _ = write_tiny_config(root, ['dsprites_loc'], 112, 16, 75, size=16,
                               gate=dict(rank=4, num_chunks=2), batch_size=16, extra="""
max_epochs = 2
param_scheduler = []
optim_wrapper = dict(optimizer=dict(lr=2e-2))
train_cfg = dict(max_epochs=max_epochs)
default_hooks = dict(logger=dict(interval=1))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
""")
    # mmengine's pytorch launcher calls torch.cuda.set_device, which fails without a GPU;
    # the CPU processes of these runs skip it (sitecustomize is imported at start-up). At
    # exit, after everything else, each rank writes whether its process group still exists.
    site = root / 'site'
    site.mkdir()
    (site / 'sitecustomize.py').write_text(
        'import atexit, os\n'
        'import torch\n'
        'if not torch.cuda.is_available():\n'
        '    torch.cuda.set_device = lambda device: None\n'
        'def _report():\n'
        '    import torch.distributed as dist\n'
        '    with open(os.path.join(os.environ["PG_AT_EXIT"], os.environ["RANK"]), "w") as f:\n'
        '        f.write(str(dist.is_initialized()))\n'
        'if "PG_AT_EXIT" in os.environ and "RANK" in os.environ:\n'
        '    atexit.register(_report)\n')
    return root, str(cfg), str(site)


def torchrun(*args, site, nproc=2, timeout=300):
    """tools/train.py or tools/test.py with --launcher pytorch in ``nproc`` CPU processes.
    Each rank's process group must be gone when it exits: left to the interpreter's exit,
    gloo's threads can abort a finished run."""
    cmd = [PY, '-m', 'torch.distributed.run', '--nnodes=1', f'--nproc_per_node={nproc}',
           f'--master_port={free_port()}', *args, '--launcher', 'pytorch']
    at_exit = tempfile.mkdtemp(prefix='pg_at_exit_', dir=os.path.dirname(site))
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='',  # CPU processes
               PYTHONPATH=os.pathsep.join([site, ROOT, os.environ.get('PYTHONPATH', '')]),
               PG_AT_EXIT=at_exit)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, f'{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    reports = {r: open(os.path.join(at_exit, r)).read() for r in sorted(os.listdir(at_exit))}
    assert reports == {str(r): 'False' for r in range(nproc)}, reports
    return proc


def test_dist_train_and_test_through_the_runner(synthetic):
    root, cfg, site = synthetic
    work = root / 'work'
    torchrun('tools/train.py', cfg, '--work-dir', str(work), '--test', site=site)
    logs = ''.join(open(p).read() for p in work.glob('*/*.log'))
    assert 'PostBackwardDataParallel: gradients are averaged over 2 processes' in logs
    # 128 images, 16 per process and step: 4 iterations an epoch
    assert re.search(r'Epoch\(train\)\s+\[2\]\[4/4\]', logs), logs[-2000:]
    final = work / 'epoch_2.pth'
    assert final.exists()
    trained = json.load(open(work / 'result_dsprites_loc.json'))

    one = root / 'one'
    # on the CPU like the two-process runs: the same model on a GPU may round differently
    subprocess.run([PY, 'tools/test.py', cfg, str(final), '--work-dir', str(one)], cwd=ROOT,
                   check=True, capture_output=True, env=dict(
                       os.environ, CUDA_VISIBLE_DEVICES='', PYTHONPATH=os.pathsep.join(
                           [ROOT, os.environ.get('PYTHONPATH', '')])))
    single = json.load(open(one / 'result_dsprites_loc.json'))
    two = root / 'two'
    torchrun('tools/test.py', cfg, str(final), '--work-dir', str(two), site=site)
    double = json.load(open(two / 'result_dsprites_loc.json'))
    # 75 images over 2 processes: the sampler pads one; counted twice, the accuracy of a
    # model that is neither always right nor always wrong would change (c/75 != (c+d)/76)
    assert 0 < single['top1'] < 100, single
    assert single['num_images'] == double['num_images'] == trained['num_images'] == 75
    assert double['top1'] == single['top1'] == trained['top1']


@requires_cuda
def test_graphed_step_through_the_wrapper_equals_an_eager_step_on_one_gpu(tmp_path):
    """World size 1, NCCL in this process: wrapper + CUDA graphs == plain eager training."""
    import torch.distributed as dist
    from memba_vision.engine import PostBackwardDataParallel
    store = dist.FileStore(str(tmp_path / 'store'), 1)
    dist.init_process_group('nccl', store=store, rank=0, world_size=1)
    try:
        want = dist_worker.reference('vim', 'cuda')  # eager, no wrapper
        model, batches, wrapper = dist_worker.build('vim_graph', 'cuda')
        assert model.backbone.cuda_graph
        start = dist_worker.trainable(model)
        ddp = PostBackwardDataParallel(model)
        ddp.train()
        for step, batch in enumerate(batches):
            ddp.train_step(batch, wrapper)
            got = dist_worker.trainable(model)
            for name in want[step]:
                moved = want[step][name] - start[name]
                assert rel(got[name] - start[name], moved) < 1e-4, (step, name)
        assert model.backbone._graphs.graphs, 'the backbone did not use CUDA graphs'
    finally:
        dist.destroy_process_group()


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs 2 CUDA GPUs')


@two_gpus
@pytest.mark.parametrize('case,tol', [('vim_graph', 1e-4), ('vim_graph_bf16', 5e-2)])
def test_two_gpus_with_cuda_graphs_train_like_one_gpu_on_the_whole_batch(case, tol, tmp_path):
    ranks = run_ranks(case, 'nccl', tmp_path)
    check_against_reference(case, ranks, 'cuda', tol=tol)
