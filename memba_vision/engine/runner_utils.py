"""Helpers shared by tools/train.py, tools/test.py and the sweep: config loading,
up-front input checks with actionable messages, result files, and the end of a
distributed run."""
import json
import os
import os.path as osp
from typing import Optional, Tuple

from mmengine.config import Config

from ..utils import write_text_atomically

__all__ = ['load_config', 'check_pretrained', 'check_task_data', 'check_resumable',
           'experiment_info', 'result_path', 'write_result', 'end_distributed']


def load_config(path: str, cfg_options: Optional[dict] = None,
                work_dir: Optional[str] = None) -> Config:
    """Config file + --cfg-options; work_dir from the argument, the config, or
    work_dirs/<config name>."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'config file not found: {path}')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    head = cfg.get('model', {}).get('head')
    if isinstance(head, dict) and 'num_classes' in head and head['num_classes'] is None:
        from memba_vision.datasets.vtab1k import dataset_num_classes
        head['num_classes'] = dataset_num_classes(cfg.train_dataloader.dataset)
    if work_dir:
        cfg.work_dir = work_dir
    elif not cfg.get('work_dir'):
        cfg.work_dir = osp.join('work_dirs', osp.splitext(osp.basename(path))[0])
    return cfg


_AUTOCAST_WRAPPERS = ('BF16OptimWrapper', 'AmpOptimWrapper')


def set_precision(cfg: Config, amp: bool = False, fp32: bool = False) -> None:
    """bf16 autocast (``amp``), fp32 (``fp32``, or the config's autocast without CUDA).

    The VTAB configs ask for bf16 autocast (``BF16OptimWrapper``); on a CPU machine
    the config falls back to fp32 with a message. A run that trains under bf16
    autocast also tests under it (``AutocastTestLoop``), unless the config names
    its own test loop.
    """
    import torch
    if amp:
        if not torch.cuda.is_available():
            raise SystemExit('--amp needs a CUDA GPU (bf16 autocast); run without it on CPU')
        if cfg.optim_wrapper.get('type') not in _AUTOCAST_WRAPPERS:
            cfg.optim_wrapper.type = 'BF16OptimWrapper'
        cfg.optim_wrapper.dtype = 'bfloat16'
    elif cfg.optim_wrapper.get('type') in _AUTOCAST_WRAPPERS and \
            (fp32 or not torch.cuda.is_available()):
        if not fp32:
            print('no CUDA GPU: running in fp32 instead of the config\'s bf16 autocast')
        cfg.optim_wrapper.type = 'OptimWrapper'
        for key in ('dtype', 'loss_scale'):
            cfg.optim_wrapper.pop(key, None)
    bf16 = cfg.optim_wrapper.get('type') in _AUTOCAST_WRAPPERS and \
        cfg.optim_wrapper.get('dtype') in ('bfloat16', torch.bfloat16)
    test_cfg = cfg.get('test_cfg') or {}
    if bf16 and 'type' not in test_cfg:
        cfg.test_cfg = dict(test_cfg, type='AutocastTestLoop', dtype='bfloat16')


def check_pretrained(cfg: Config) -> None:
    """Fails early, with the download location, when the backbone's pretrained file is missing."""
    backbone = cfg.model.get('backbone', {})
    init = backbone.get('init_cfg') or {}
    if not isinstance(init, dict) or init.get('type') != 'Pretrained':
        return
    path = init.get('checkpoint')
    if path and osp.isfile(path):
        return
    import inspect
    from mmpretrain.registry import MODELS
    cls = MODELS.get(backbone.get('type'))
    arch = backbone.get('arch')
    if arch is None and cls is not None:
        arch = inspect.signature(cls).parameters.get('arch', inspect.Parameter.empty).default
    if isinstance(arch, str):
        url = getattr(cls, 'download_urls', {}).get(arch) if cls else None
        where = (f'download it from {url} and put it at {path}' if url else
                 f'no download location is known for arch {arch!r}; put the file at {path}')
    else:  # a custom architecture (a dict of sizes) has no official file
        where = (f'no download location is known for a custom arch ({type(arch).__name__}); '
                 f'put a checkpoint of that architecture at {path}')
    raise FileNotFoundError(
        f'pretrained backbone checkpoint {path} not found: {where} '
        f'(or point model.backbone.init_cfg.checkpoint elsewhere with --cfg-options)')


def check_task_data(dataset_cfg: dict) -> None:
    """Fails early when a VTAB1k dataset's root, task folder or list file is missing
    (tasks outside the 19 may use a ``<task>/<split>/<class>/`` folder instead)."""
    if dataset_cfg.get('type') != 'VTAB1k':
        return
    from memba_vision.datasets.vtab1k_tasks import VTAB1K_TASKS, get_task
    root, task, split = dataset_cfg.get('data_root'), dataset_cfg.get('task'), dataset_cfg.get('split')
    if task not in VTAB1K_TASKS and not osp.isdir(osp.join(str(root), str(task))):
        get_task(task)  # neither one of the 19 nor a folder: list the valid names
    hint = 'prepare it with tools/prepare_vtab1k.py (README: Data preparation)'
    if not osp.isdir(root):
        raise FileNotFoundError(f'VTAB-1k data root {root} not found: {hint}')
    list_file = osp.join(root, task, f'{split}.txt')
    if not osp.isfile(list_file) and not (task not in VTAB1K_TASKS and
                                          osp.isdir(osp.join(root, task, split))):
        raise FileNotFoundError(f'list file {list_file} not found: {hint}')


def experiment_info(cfg: Config, config_path: str) -> dict:
    """backbone / method / task of a run, from the config's ``experiment`` entry."""
    info = dict(cfg.get('experiment') or {})
    task = info.get('task') or cfg.test_dataloader.dataset.get('task')
    stem = osp.splitext(osp.basename(config_path))[0]
    prefix = stem[:-len(task) - 1] if task and stem.endswith('_' + task) else stem
    info.setdefault('backbone', prefix.split('_')[0] if '_' in prefix else prefix)
    info.setdefault('method', prefix.split('_', 2)[-1] if prefix.count('_') >= 2 else '')
    info['task'] = task
    return info


def result_path(work_dir: str, task: str) -> str:
    return osp.join(work_dir, f'result_{task}.json')


def write_result(work_dir: str, result: dict) -> str:
    """Writes result_<task>.json atomically (a failed run never leaves a partial file)."""
    os.makedirs(work_dir, exist_ok=True)
    path = result_path(work_dir, result['task'])
    write_text_atomically(path, json.dumps(result, indent=2) + '\n')
    return path


def _marked_checkpoint(work_dir: str) -> Tuple[str, Optional[str]]:
    """(the path of the work dir's ``last_checkpoint`` marker, the checkpoint it names or None
    when there is no marker)."""
    marker = osp.join(work_dir, 'last_checkpoint')
    if not osp.isfile(marker):
        return marker, None
    with open(marker) as f:
        return marker, f.read().strip()


def final_checkpoint(work_dir: str) -> Optional[str]:
    """The checkpoint named by the work dir's ``last_checkpoint`` marker, if it exists."""
    path = _marked_checkpoint(work_dir)[1]
    return path if path and osp.isfile(path) else None


def check_resumable(work_dir: str) -> None:
    """Raises if the work dir's ``last_checkpoint`` marker names a checkpoint that is gone.

    (mmengine would start resuming and fail deep inside the runner.) A work dir
    without a marker is fine: ``--resume`` then starts a fresh run.
    """
    marker, named = _marked_checkpoint(work_dir)
    if named is not None and not osp.isfile(named):
        found = sorted(f for f in os.listdir(work_dir) if f.endswith('.pth'))
        hint = (f'resume from one of {found} with --resume CHECKPOINT' if found else
                'no checkpoint is left there; train without --resume')
        raise FileNotFoundError(f'{marker} names {named!r}, which does not exist: {hint}')


def test_and_record(runner, cfg: Config, config_path: str, checkpoint: Optional[str]) -> dict:
    """Runs the test loop on ``runner``'s model and writes result_<task>.json (main process).

    Used by tools/test.py (a checkpoint loaded into a fresh runner) and by
    ``tools/train.py --test`` (the model just trained, in the same process).
    """
    from mmengine.dist import is_main_process
    metrics = runner.test()
    if 'accuracy/top1' not in metrics:
        raise SystemExit(f'error: the test loop returned no top-1 accuracy: {metrics}')
    info = experiment_info(cfg, config_path)
    result = dict(task=info['task'], top1=float(metrics['accuracy/top1']),
                  num_images=len(runner.test_dataloader.dataset), config=config_path,
                  checkpoint=checkpoint, backbone=info['backbone'], method=info['method'])
    if is_main_process():
        path = write_result(runner.work_dir, result)
        runner.logger.info(f"{result['task']}: top-1 {result['top1']:.2f}% on "
                           f"{result['num_images']} images -> {path}")
    return result


def end_distributed() -> None:
    """Destroys the default process group, if one was started, when a tool has finished.

    Left to the interpreter's exit, gloo's worker threads can outlive it and abort the
    process ("terminate called without an active exception", exit code -6) after the work
    is done. Called on success only: a rank that failed may leave its peers mid-collective,
    where destroying the group could wait forever.
    """
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
