"""VTAB-1k result tables (the layout of the paper's Table 6).

The test tool writes one ``result_<task>.json`` per task::

    {"task": "caltech101", "top1": 91.23, "num_images": 6084,
     "config": "...", "checkpoint": "...", "backbone": "vim_s", "method": "memba"}

:func:`collect_results` finds them under a work dir, :func:`build_table` groups
them into one row per (backbone, method) with the 19 task columns in table
order, the Natural / Specialized / Structured means and the average over the
tasks (not over the group means). Directly under each of our rows comes the
paper's row for the same backbone and method, where it has one
(:mod:`.paper_results`): its 19 task cells, with every mean computed from the
cells as for ours; a note lists the paper's printed means that differ from them
by more than rounding. Results on other tasks (your own data) form their own
"Custom" group after the average, outside the VTAB-1k means. Means are over
the tasks present; :func:`to_markdown` marks a mean over an incomplete set with
``*`` and lists the missing tasks, :func:`to_csv` writes plain numbers, a
``source`` column (``ours`` or ``paper``) and a ``missing`` column.
"""
import csv
import io
import json
import math
import os
import os.path as osp
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from ..datasets.vtab1k_tasks import VTAB1K_GROUPS, VTAB1K_TASKS
from .paper_results import PAPER_SOURCE, PaperRow, paper_row

__all__ = ['TaskResult', 'TableRow', 'VTABTable', 'ResultFileError', 'NoResultsError',
           'load_result', 'collect_results', 'group_results', 'summarize_row',
           'build_table', 'to_markdown', 'to_csv', 'write_table']

GROUP_LABELS = {'natural': 'Natural', 'specialized': 'Specialized',
                'structured': 'Structured'}
CUSTOM_GROUP = 'custom'  # tasks outside the 19: own columns, not in the means
AVERAGE_LABEL = 'Avg'
DASH = '–'


class ResultFileError(ValueError):
    """A result file that cannot be used; the message names the file."""


class NoResultsError(FileNotFoundError):
    """No result_*.json under the work dir."""


class TaskResult(NamedTuple):
    task: str
    top1: float               # percent
    backbone: str
    method: str
    num_images: Optional[int]
    config: str
    checkpoint: str
    path: str
    mtime: float


class TableRow(NamedTuple):
    backbone: str
    method: str
    label: str                          # method as shown in the table
    source: str                         # 'ours' | 'paper'
    tasks: Dict[str, Optional[float]]   # all 19 tasks, None where missing
    groups: Dict[str, Optional[float]]  # group -> mean over the tasks present
    group_complete: Dict[str, bool]
    average: Optional[float]            # mean over the tasks present
    average_complete: bool
    missing: List[str]
    custom: Dict[str, float] = {}       # tasks outside the 19 (own data) -> top-1


class VTABTable(NamedTuple):
    rows: List[TableRow]
    notes: List[str]      # printed under the table
    warnings: List[str]   # e.g. duplicate results; also worth printing


# ------------------------------------------------------------------ reading
def load_result(path: str) -> TaskResult:
    """Reads and validates one result file."""
    def bad(msg):
        return ResultFileError(f'{path}: {msg}')

    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError) as err:
        raise bad(f'cannot read ({err})') from None
    except json.JSONDecodeError as err:
        raise bad(f'not valid JSON ({err})') from None
    if not isinstance(data, dict):
        raise bad(f'expected a JSON object, got {type(data).__name__}')
    missing = [k for k in ('task', 'top1', 'backbone', 'method') if k not in data]
    if missing:
        raise bad(f'missing key(s) {", ".join(missing)}')
    task = data['task']
    if not isinstance(task, str) or not task.strip() or task != task.strip() or \
            any(c in task for c in '/\\|,') or task == CUSTOM_GROUP:
        raise bad(f'task must be a task folder name, got {task!r}')
    top1 = data['top1']
    if isinstance(top1, bool) or not isinstance(top1, (int, float)) or \
            not math.isfinite(top1) or not 0 <= top1 <= 100:
        raise bad(f'top1 must be a percentage in [0, 100], got {top1!r}')
    for key in ('backbone', 'method'):
        if not isinstance(data[key], str) or not data[key].strip():
            raise bad(f'{key} must be a non-empty string, got {data[key]!r}')
    num_images = data.get('num_images')
    if num_images is not None and (isinstance(num_images, bool) or
                                   not isinstance(num_images, int) or num_images < 0):
        raise bad(f'num_images must be a non-negative integer, got {num_images!r}')
    return TaskResult(task=task, top1=float(top1), backbone=data['backbone'].strip(),
                      method=data['method'].strip(), num_images=num_images,
                      config=str(data.get('config', '')),
                      checkpoint=str(data.get('checkpoint', '')),
                      path=path, mtime=osp.getmtime(path))


def collect_results(work_dir: str) -> List[TaskResult]:
    """All ``result_*.json`` under ``work_dir`` (recursively), validated."""
    if not osp.isdir(work_dir):
        raise NoResultsError(f'work dir {work_dir} not found')
    paths = []
    for root, dirs, files in os.walk(work_dir):
        dirs.sort()
        paths += [osp.join(root, f) for f in sorted(files)
                  if f.startswith('result_') and f.endswith('.json')]
    if not paths:
        raise NoResultsError(f'no result_*.json files under {work_dir}; '
                             'run tools/test.py on the fine-tuned checkpoints first')
    return [load_result(p) for p in paths]


def group_results(results: Sequence[TaskResult]
                  ) -> Tuple[Dict[Tuple[str, str], Dict[str, TaskResult]], List[str]]:
    """Groups results by (backbone, method); the newest file wins per task.

    Returns:
        ({(backbone, method): {task: result}}, warnings about duplicates)
    """
    groups: Dict[Tuple[str, str], Dict[str, List[TaskResult]]] = {}
    for r in results:
        groups.setdefault((r.backbone, r.method), {}).setdefault(r.task, []).append(r)
    chosen, warnings = {}, []
    for key in sorted(groups):
        chosen[key] = {}
        for task, candidates in groups[key].items():
            candidates = sorted(candidates, key=lambda r: (r.mtime, r.path))
            newest = candidates[-1]
            chosen[key][task] = newest
            if len(candidates) > 1:
                older = ', '.join(r.path for r in candidates[:-1])
                warnings.append(f'{key[0]}/{key[1]}: {task} has {len(candidates)} result '
                                f'files; using the newest {newest.path} (ignoring {older})')
    return chosen, warnings


# ------------------------------------------------------------------ rows
def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def summarize_row(backbone: str, method: str, top1: Dict[str, float],
                  label: Optional[str] = None) -> TableRow:
    """A row from per-task top-1; means over the VTAB-1k tasks present. Other
    tasks (own data) go to ``custom``, outside the means."""
    custom = {t: v for t, v in sorted(top1.items()) if t not in VTAB1K_TASKS}
    tasks = {t: top1.get(t) for t in VTAB1K_TASKS}
    groups, complete = {}, {}
    for group, names in VTAB1K_GROUPS.items():
        present = [tasks[t] for t in names if tasks[t] is not None]
        groups[group] = _mean(present)
        complete[group] = len(present) == len(names)
    present = [v for v in tasks.values() if v is not None]
    return TableRow(backbone=backbone, method=method, label=label or method, source='ours',
                    tasks=tasks, groups=groups, group_complete=complete,
                    average=_mean(present), average_complete=len(present) == len(tasks),
                    missing=[t for t, v in tasks.items() if v is None], custom=custom)


def _paper_table_row(ref: PaperRow) -> TableRow:
    """The paper's row, its means computed from its task cells (not the printed ones)."""
    groups = {g: ref.means[g] for g in VTAB1K_GROUPS}
    return TableRow(backbone=ref.backbone, method=ref.method, label=ref.label,
                    source='paper', tasks=dict(ref.tasks), groups=groups,
                    group_complete={g: True for g in groups}, average=ref.means['overall'],
                    average_complete=True, missing=[])


def _mean_label(key: str) -> str:
    return AVERAGE_LABEL if key == 'overall' else GROUP_LABELS[key]


def build_table(results: Sequence[TaskResult]) -> VTABTable:
    """Our rows, each followed by the paper's row for the same backbone and method."""
    chosen, warnings = group_results(results)
    rows, refs, unpublished = [], [], []
    for (backbone, method), by_task in chosen.items():
        rows.append(summarize_row(backbone, method, {t: r.top1 for t, r in by_task.items()}))
        ref = paper_row(backbone, method)
        if ref is None:
            unpublished.append(f'{backbone}/{method}')
        else:
            rows.append(_paper_table_row(ref))
            refs.append(ref)

    def vtab_partial(r):  # some but not all of the 19
        return r.source == 'ours' and r.missing and len(r.missing) < len(VTAB1K_TASKS)

    notes = [f'Every mean is computed from the task cells shown ({AVERAGE_LABEL}: over the '
             f'{len(VTAB1K_TASKS)} tasks, not over the group means), for the paper\'s rows '
             'as for ours.']
    if any(vtab_partial(r) for r in rows):
        notes.append('`*`: mean over the tasks present only.')
    if any(r.custom for r in rows):
        notes.append('Custom: tasks outside VTAB-1k (own data), top-1 %; not part of the '
                     'VTAB-1k group means or the average.')
    for r in rows:
        if vtab_partial(r):
            notes.append(f'{r.backbone}/{r.method} is missing {len(r.missing)} of '
                         f'{len(VTAB1K_TASKS)} tasks: {", ".join(r.missing)}.')
    if refs:
        notes.append(f'(paper) rows: per-task top-1 as published in the {PAPER_SOURCE}.')
    for ref in refs:
        if ref.differs:
            printed = ', '.join(f'{_mean_label(k)} {p:g}' for k, (p, _) in ref.differs.items())
            computed = ', '.join(f'{c:.2f}' for _, c in ref.differs.values())
            notes.append(f'{ref.label} ({ref.backbone}): the paper prints {printed}; its task '
                         f'cells give {computed}.')
        if ref.note:
            notes.append(f'{ref.backbone}/{ref.method} beside {ref.label}: {ref.note}.')
    if unpublished:
        notes.append(f'No published numbers for: {", ".join(unpublished)}.')
    for key, by_task in chosen.items():
        partial = [f'{task} ({r.num_images} of {VTAB1K_TASKS[task].num_test})'
                   for task, r in by_task.items() if task in VTAB1K_TASKS and
                   r.num_images is not None and r.num_images != VTAB1K_TASKS[task].num_test]
        if partial:
            notes.append(f'{key[0]}/{key[1]} was not evaluated on the full VTAB-1k test '
                         f'split of: {", ".join(partial)}.')
    return VTABTable(rows=rows, notes=notes, warnings=warnings)


# ------------------------------------------------------------------ output
def _columns(table: Optional[VTABTable] = None) -> List[Tuple[str, str, str]]:
    """(kind, key, header) in table order: tasks with a mean after each group,
    the average, then the custom tasks of ``table`` (header ``Custom: <task>``)."""
    cols = []
    for group, names in VTAB1K_GROUPS.items():
        cols += [('task', t, VTAB1K_TASKS[t].label) for t in names]
        cols.append(('group', group, GROUP_LABELS[group]))
    cols.append(('average', 'average', AVERAGE_LABEL))
    custom = sorted({t for r in (table.rows if table else []) for t in r.custom})
    cols += [(CUSTOM_GROUP, t, f'Custom: {t}') for t in custom]
    return cols


def _cell(row: TableRow, kind: str, key: str) -> Tuple[Optional[float], bool]:
    """(value, complete) of one cell."""
    if kind == 'task':
        return row.tasks[key], True
    if kind == CUSTOM_GROUP:
        return row.custom.get(key), True
    if kind == 'group':
        return row.groups[key], row.group_complete[key]
    return row.average, row.average_complete


def to_markdown(table: VTABTable) -> str:
    cols = _columns(table)
    header = ['Backbone', 'Method'] + [c[2] for c in cols]
    lines = ['| ' + ' | '.join(header) + ' |',
             '|' + '|'.join([':--', ':--'] + ['--:'] * len(cols)) + '|']
    for row in table.rows:
        cells = [row.backbone, row.label]
        for kind, key, _ in cols:
            value, complete = _cell(row, kind, key)
            cells.append(DASH if value is None else f'{value:.2f}' + ('' if complete else '*'))
        lines.append('| ' + ' | '.join(cells) + ' |')
    if table.notes:
        lines.append('')
        lines += [f'- {n}' for n in table.notes]
    return '\n'.join(lines) + '\n'


def to_csv(table: VTABTable) -> str:
    cols = _columns(table)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator='\n')
    writer.writerow(['backbone', 'method', 'source', 'label'] +
                    [key if kind != CUSTOM_GROUP else f'{CUSTOM_GROUP}:{key}'
                     for kind, key, _ in cols] + ['missing'])
    for row in table.rows:
        values = [_cell(row, kind, key)[0] for kind, key, _ in cols]
        writer.writerow([row.backbone, row.method, row.source, row.label] +
                        ['' if v is None else f'{v:.2f}' for v in values] +
                        [' '.join(row.missing)])
    return out.getvalue()


def write_table(table: VTABTable, out_dir: str) -> Tuple[str, str]:
    """Writes ``vtab_table.md`` and ``vtab_table.csv``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    md_path, csv_path = osp.join(out_dir, 'vtab_table.md'), osp.join(out_dir, 'vtab_table.csv')
    with open(md_path, 'w', encoding='utf-8') as f:
        f.write(to_markdown(table))
    with open(csv_path, 'w', encoding='utf-8', newline='') as f:
        f.write(to_csv(table))
    return md_path, csv_path
