"""Evaluation: VTAB-1k result tables and published reference numbers."""
from .paper_results import NO_REFERENCE, PAPER_RESULTS, PaperRow, paper_row
from .vtab_table import (NoResultsError, ResultFileError, TableRow, TaskResult,
                         VTABTable, build_table, collect_results, group_results,
                         load_result, summarize_row, to_csv, to_markdown, write_table)

__all__ = ['PaperRow', 'PAPER_RESULTS', 'NO_REFERENCE', 'paper_row', 'TaskResult',
           'TableRow', 'VTABTable', 'ResultFileError', 'NoResultsError', 'load_result',
           'collect_results', 'group_results', 'summarize_row', 'build_table', 'to_markdown',
           'to_csv', 'write_table']
