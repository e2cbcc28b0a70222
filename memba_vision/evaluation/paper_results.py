"""Published VTAB-1k reference numbers shown beside our rows in the result tables.

Source: "Memba: Membrane-driven Parameter-Efficient Fine-Tuning for Mamba"
(ICLR 2026; arXiv:2506.18184) and the README of its public code
(github.com/Intelligent-Computing-Lab-Yale/Memba), vision table "VTAB-1k with
Vim-S", row "Memba (in+out proj)", 4,718K trainable parameters. Those sources
give the group means and the average only, no per-task numbers; the average
is the mean over the 19 tasks (7 x 77.07 + 4 x 85.66 + 8 x 61.70) / 19 = 72.41,
not the mean of the three group means (74.81).

No VMamba-S reference numbers are available to us, so VMamba-S rows get no
paper row; the tables say so in a note instead.
"""
from typing import Dict, NamedTuple, Optional

__all__ = ['PaperRow', 'PAPER_RESULTS', 'NO_REFERENCE', 'PAPER_SOURCE', 'paper_row']

PAPER_SOURCE = ('Memba paper (ICLR 2026, arXiv:2506.18184) and its public README '
                '(github.com/Intelligent-Computing-Lab-Yale/Memba)')


class PaperRow(NamedTuple):
    """A published row: per-task top-1 (may be empty) and the summary means (%)."""
    backbone: str
    method: str
    label: str                 # how the row is named in the table
    tasks: Dict[str, float]    # task -> top-1; empty when unpublished
    natural: Optional[float]
    specialized: Optional[float]
    structured: Optional[float]
    average: Optional[float]   # mean over the 19 tasks
    params_k: Optional[float]  # trainable parameters (thousands), head excluded
    source: str


PAPER_RESULTS: Dict[str, PaperRow] = {
    'vim_s': PaperRow(
        backbone='vim_s', method='memba', label='Memba (paper)', tasks={},
        natural=77.07, specialized=85.66, structured=61.70, average=72.40,
        params_k=4718, source=PAPER_SOURCE + ', row "Memba (in+out proj)", Vim-S'),
}

# Backbones we know have no published reference numbers, with the reason.
NO_REFERENCE: Dict[str, str] = {
    'vmamba_s': 'no published VMamba-S Memba VTAB-1k numbers are available to us, '
                'so no paper row is shown',
}


def paper_row(backbone: str) -> Optional[PaperRow]:
    """The paper's Memba row for ``backbone``, or None."""
    return PAPER_RESULTS.get(backbone)
