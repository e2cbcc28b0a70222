"""Evaluation: VTAB-1k result tables and published reference numbers."""
from .paper_results import PAPER_SOURCE, PaperRow, paper_row, paper_rows
from .vtab_table import (NoResultsError, ResultFileError, TableRow, TaskResult,
                         VTABTable, build_table, collect_results, group_results,
                         load_result, summarize_row, to_csv, to_markdown, write_table)

__all__ = ['PaperRow', 'PAPER_SOURCE', 'paper_row', 'paper_rows', 'TaskResult',
           'TableRow', 'VTABTable', 'ResultFileError', 'NoResultsError', 'load_result',
           'collect_results', 'group_results', 'summarize_row', 'build_table', 'to_markdown',
           'to_csv', 'write_table']
