"""Builds the VTAB-1k result table from the result_<task>.json files of work dirs.

    python tools/vtab_table.py WORK_DIR [--out DIR]
    python tools/vtab_table.py WORK_DIR [WORK_DIR ...] --out DIR

Searches each WORK_DIR recursively, writes vtab_table.md and vtab_table.csv to
--out (default: the one WORK_DIR) and prints the Markdown table. The paper's row
for each of our backbone/method rows is shown directly under it; every mean is
computed from the task cells.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout

from memba_vision.evaluation.vtab_table import (NoResultsError, ResultFileError,  # noqa: E402
                                                build_table, collect_results,
                                                to_markdown, write_table)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('work_dirs', nargs='+', metavar='WORK_DIR',
                        help='folder searched recursively for result_*.json')
    parser.add_argument('--out', help='output folder (default: WORK_DIR, when there is one)')
    args = parser.parse_args(argv)
    if args.out is None and len(args.work_dirs) > 1:
        parser.error('several work dirs need --out DIR')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        results = [r for wd in args.work_dirs for r in collect_results(wd)]
        table = build_table(results)
        md_path, csv_path = write_table(table, args.out or args.work_dirs[0])
    except (NoResultsError, ResultFileError, OSError) as err:
        print(f'vtab_table: error: {err}', file=sys.stderr)
        return 1
    for warning in table.warnings:
        print(f'vtab_table: warning: {warning}', file=sys.stderr)
    print(to_markdown(table))
    print(f'wrote {md_path} and {csv_path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
