"""The 19 VTAB-1k tasks: folder name, class count, group and test-set size.

Group order and task order follow the usual VTAB-1k tables (Natural, Specialized,
Structured). ``overall`` means are taken over the 19 tasks, not over the groups.
"""
from collections import OrderedDict
from typing import NamedTuple

__all__ = ['VTABTask', 'VTAB1K_TASKS', 'VTAB1K_GROUPS', 'get_task', 'task_names']


class VTABTask(NamedTuple):
    name: str          # folder name under data/vtab-1k/
    num_classes: int
    group: str         # 'natural' | 'specialized' | 'structured'
    num_test: int      # images in test.txt
    label: str         # short column label used in result tables


_TABLE = [
    # name                  classes group          test    label
    ('cifar',                 100, 'natural',     10000, 'CIFAR-100'),
    ('caltech101',            102, 'natural',      6084, 'Caltech101'),
    ('dtd',                    47, 'natural',      1880, 'DTD'),
    ('oxford_flowers102',     102, 'natural',      6149, 'Flowers102'),
    ('oxford_iiit_pet',        37, 'natural',      3669, 'Pets'),
    ('svhn',                   10, 'natural',     26032, 'SVHN'),
    ('sun397',                397, 'natural',     21750, 'Sun397'),
    ('patch_camelyon',          2, 'specialized', 32768, 'Camelyon'),
    ('eurosat',                10, 'specialized',  5400, 'EuroSAT'),
    ('resisc45',               45, 'specialized',  6300, 'Resisc45'),
    ('diabetic_retinopathy',    5, 'specialized', 42670, 'Retinopathy'),
    ('clevr_count',             8, 'structured',  15000, 'Clevr-Count'),
    ('clevr_dist',              6, 'structured',  15000, 'Clevr-Dist'),
    ('dmlab',                   6, 'structured',  22735, 'DMLab'),
    ('kitti',                   4, 'structured',    711, 'KITTI-Dist'),
    ('dsprites_loc',           16, 'structured',  73728, 'dSpr-Loc'),
    ('dsprites_ori',           16, 'structured',  73728, 'dSpr-Ori'),
    ('smallnorb_azi',          18, 'structured',  12150, 'sNORB-Azim'),
    ('smallnorb_ele',           9, 'structured',  12150, 'sNORB-Elev'),
]

VTAB1K_TASKS = OrderedDict((row[0], VTABTask(*row)) for row in _TABLE)

VTAB1K_GROUPS = OrderedDict(
    (group, [t.name for t in VTAB1K_TASKS.values() if t.group == group])
    for group in ('natural', 'specialized', 'structured'))

# Training split sizes shared by every task.
NUM_TRAIN800 = 800
NUM_VAL200 = 200


def task_names():
    """The 19 task folder names in table order."""
    return list(VTAB1K_TASKS)


def get_task(name: str) -> VTABTask:
    """Looks a task up by folder name; unknown names list the valid ones."""
    try:
        return VTAB1K_TASKS[name]
    except KeyError:
        raise KeyError(f'unknown VTAB-1k task {name!r}; valid tasks: '
                       f'{", ".join(VTAB1K_TASKS)}') from None
