"""VTAB-1k: the task table, the dataset and the data-preparation helpers."""
from .vtab1k import (VTAB1K_SPLITS, VTAB1k, read_list_file, task_folder_complete,
                     task_num_classes, write_task_folder)
from .vtab1k_tasks import (VTAB1K_GROUPS, VTAB1K_TASKS, VTABTask, get_task,
                           task_names)

# ``synthetic`` (learnable stand-in tasks) and ``tfds_vtab`` (VTAB-1k from
# tensorflow-datasets) are imported on demand by tools/prepare_vtab1k.py.

__all__ = ['VTAB1k', 'VTAB1K_SPLITS', 'VTABTask', 'VTAB1K_TASKS', 'VTAB1K_GROUPS',
           'get_task', 'task_names', 'read_list_file', 'task_folder_complete',
           'task_num_classes', 'write_task_folder']
