"""Published VTAB-1k rows shown beside ours in the result tables.

``data/memba_table6_vtab1k.csv`` is Table 6 of the Memba paper (ICLR 2026,
arXiv:2506.18184), unchanged (see ``data/README.md``): per-task top-1 (%), the
three group means and the overall mean as printed. Its Vim-S baselines come from
MambaPEFT (Yoshimura et al.). Table 6(c) (Vanilla-VMamba-S) prints no overall
column; the overall mean of those rows is the paper's Table 3 number.

:func:`paper_row` gives the row for one of our (backbone, method) pairs, or None
where the paper has none. Its means are computed from the task cells (overall:
the mean of the 19 cells); ``printed`` keeps the paper's, and ``differs`` names
those that disagree with the cells by more than rounding.
"""
import csv
import os.path as osp
from functools import lru_cache
from typing import Dict, List, NamedTuple, Optional, Tuple

from ..datasets.vtab1k_tasks import VTAB1K_GROUPS, VTAB1K_TASKS

__all__ = ['PaperRow', 'PAPER_CSV', 'PAPER_SOURCE', 'PAPER_BACKBONES', 'PAPER_METHODS',
           'MEAN_KEYS', 'paper_rows', 'paper_row']

PAPER_CSV = osp.join(osp.dirname(osp.abspath(__file__)), 'data', 'memba_table6_vtab1k.csv')
PAPER_SOURCE = ('Memba paper (ICLR 2026, arXiv:2506.18184), Table 6; its Vim-S baselines '
                'come from MambaPEFT (Yoshimura et al.)')

# our backbone -> the paper's; our method -> the paper's row of that backbone
PAPER_BACKBONES = {'vim_s': 'Vim-S', 'vmamba_s': 'Vanilla-VMamba-S'}
PAPER_METHODS = {
    'vim_s': {
        'scratch': 'Scratch', 'full': 'Full', 'lora-embed': 'LoRA(embed)',
        'lora-xproj': 'LoRA(x-proj)', 'lora-dtproj': 'LoRA(dt-proj)',
        'lora-out': 'LoRA(out-proj)', 'lora-in': 'LoRA(in-proj)', 'lorap-z': 'LoRAp(Z)',
        'lorap-x': 'LoRAp(X)', 'hybrid': 'Hybrid', 'memba-in': 'Memba(in-proj)',
        'memba-out': 'Memba(out-proj)', 'memba': 'Memba(in+out-proj)'},
    'vmamba_s': {
        'lora-in': 'LoRA(in_proj)', 'lora-out': 'LoRA(out_proj)', 'lora': 'LoRA(in+out_proj)',
        'memba-in': 'Memba(in_proj)', 'memba-out': 'Memba(out_proj)',
        'memba': 'Memba(in+out_proj)'},
}
MEAN_KEYS = ('natural', 'specialized', 'structured', 'overall')

HYBRID_NOTE = ("the paper's Hybrid is the combination found by MambaPEFT's search, whose final "
               "setting was never published; our hybrid is that search's starting point, so "
               "the two rows are different settings")


class PaperRow(NamedTuple):
    """One published row, paired with our (backbone, method)."""
    backbone: str                            # ours, e.g. 'vim_s'
    method: str                              # ours, e.g. 'lora-in'
    paper_backbone: str                      # as in the CSV, e.g. 'Vim-S'
    paper_method: str                        # as in the CSV, e.g. 'LoRA(in-proj)'
    label: str                               # how the row is named in the table
    tasks: Dict[str, float]                  # the 19 task cells, top-1 %
    means: Dict[str, float]                  # MEAN_KEYS -> mean computed from the cells
    printed: Dict[str, float]                # MEAN_KEYS -> mean as printed
    differs: Dict[str, Tuple[float, float]]  # mean -> (printed, computed), beyond rounding
    note: str                                # how to read the pairing, or ''


def _mean(values: List[float]) -> float:
    return sum(values) / len(values)


def _half_unit(text: str) -> float:
    """Half a unit of the last printed digit: the most that rounding moved the number."""
    return 0.5 * 10 ** -len(text.strip().partition('.')[2])


def _make_row(backbone: str, method: str, cells: Dict[str, str]) -> PaperRow:
    tasks = {t: float(cells[t]) for t in VTAB1K_TASKS}
    means = {g: _mean([tasks[t] for t in names]) for g, names in VTAB1K_GROUPS.items()}
    means['overall'] = _mean(list(tasks.values()))
    printed = {k: float(cells[f'{k}_mean']) for k in MEAN_KEYS}
    # a mean of rounded cells drifts by at most their rounding, the printed mean by its own
    cell_rounding = max(_half_unit(cells[t]) for t in VTAB1K_TASKS)
    differs = {k: (printed[k], means[k]) for k in MEAN_KEYS
               if abs(printed[k] - means[k]) >
               cell_rounding + _half_unit(cells[f'{k}_mean']) + 1e-9}
    hybrid = method == 'hybrid'
    return PaperRow(backbone=backbone, method=method, paper_backbone=cells['backbone'],
                    paper_method=cells['method'],
                    label='Hybrid (paper, searched)' if hybrid else f'{cells["method"]} (paper)',
                    tasks=tasks, means=means, printed=printed, differs=differs,
                    note=HYBRID_NOTE if hybrid else '')


@lru_cache(maxsize=None)
def paper_rows() -> Dict[Tuple[str, str], PaperRow]:
    """{(our backbone, our method): PaperRow} for every pair the paper has a row for."""
    with open(PAPER_CSV, newline='', encoding='utf-8') as f:
        table = {(r['backbone'], r['method']): r for r in csv.DictReader(f)}
    rows = {}
    for backbone, methods in PAPER_METHODS.items():
        for method, paper_method in methods.items():
            key = (PAPER_BACKBONES[backbone], paper_method)
            if key not in table:
                raise KeyError(f'{PAPER_CSV} has no row {key[0]},{key[1]}')
            rows[backbone, method] = _make_row(backbone, method, table[key])
    return rows


def paper_row(backbone: str, method: str) -> Optional[PaperRow]:
    """The paper's row for our ``backbone`` and ``method``, or None where it has none."""
    return paper_rows().get((backbone, method))
