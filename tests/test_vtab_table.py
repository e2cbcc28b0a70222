"""tools/vtab_table.py: grouping, means, missing tasks, paper rows, outputs."""
import csv
import io
import json
import os
import os.path as osp

import pytest

from memba_vision.evaluation.vtab_table import (ResultFileError, build_table,
                                                collect_results, load_result,
                                                to_csv, to_markdown)
from memba_vision.datasets.vtab1k_tasks import VTAB1K_GROUPS, VTAB1K_TASKS
from memba_vision.evaluation.paper_results import PAPER_RESULTS, paper_row
from conftest import load_tool

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))

# Full vim_s/memba run. Natural sum 525 (mean 75.00), specialized 340 (85.00),
# structured 420 (52.50); average over the 19 tasks 1285 / 19 = 67.6315...
# (the mean of the three group means would be 70.83).
FULL = {
    'cifar': 70, 'caltech101': 80, 'dtd': 90, 'oxford_flowers102': 60,
    'oxford_iiit_pet': 75, 'svhn': 85, 'sun397': 65,
    'patch_camelyon': 80, 'eurosat': 90, 'resisc45': 70, 'diabetic_retinopathy': 100,
    'clevr_count': 50, 'clevr_dist': 60, 'dmlab': 70, 'kitti': 40,
    'dsprites_loc': 55, 'dsprites_ori': 65, 'smallnorb_azi': 45, 'smallnorb_ele': 35,
}
# Partial vmamba_s/lora run: natural (50 + 60.5 + 69.5) / 3 = 60.00, specialized 90.00,
# no structured task, average 270 / 4 = 67.50.
PARTIAL = {'cifar': 50, 'caltech101': 60.5, 'dtd': 69.5, 'eurosat': 90}


def write_result(path, task, top1, backbone, method, mtime=None, **extra):
    os.makedirs(osp.dirname(path), exist_ok=True)
    data = dict(task=task, top1=top1, num_images=extra.pop('num_images', None),
                config=f'configs/vtab1k/{backbone}_{method}_{task}.py',
                checkpoint='ckpt.pth', backbone=backbone, method=method, **extra)
    if data['num_images'] is None:
        from memba_vision.datasets.vtab1k_tasks import get_task
        data['num_images'] = get_task(task).num_test
    with open(path, 'w') as f:
        json.dump(data, f)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


@pytest.fixture
def work_dir(tmp_path):
    root = tmp_path / 'work_dirs'
    for task, top1 in FULL.items():
        write_result(str(root / 'vim_s_memba' / task / f'result_{task}.json'),
                     task, top1, 'vim_s', 'memba', mtime=2_000_000_000)
    # an older duplicate of cifar with another number: the newest file wins
    write_result(str(root / 'old' / 'result_cifar.json'), 'cifar', 10.0, 'vim_s', 'memba',
                 mtime=1_000_000_000)
    for task, top1 in PARTIAL.items():
        write_result(str(root / 'vmamba' / f'result_{task}.json'), task, top1,
                     'vmamba_s', 'lora', num_images=100 if task == 'dtd' else None)
    return root


def rows_by_name(table):
    return {(r.backbone, r.label): r for r in table.rows}


def test_means_grouping_and_duplicates(work_dir):
    table = build_table(collect_results(str(work_dir)))
    assert [(r.backbone, r.label, r.source) for r in table.rows] == [
        ('vim_s', 'memba', 'ours'), ('vim_s', 'Memba (paper)', 'paper'),
        ('vmamba_s', 'lora', 'ours')]
    full = rows_by_name(table)['vim_s', 'memba']
    assert full.tasks['cifar'] == 70  # not the older 10.0
    assert full.groups == pytest.approx({'natural': 75.0, 'specialized': 85.0,
                                         'structured': 52.5})
    assert full.average == pytest.approx(67.631579, abs=1e-6)
    assert full.missing == [] and full.average_complete
    assert len(table.warnings) == 1 and 'cifar' in table.warnings[0] \
        and 'old' in table.warnings[0]

    partial = rows_by_name(table)['vmamba_s', 'lora']
    assert partial.groups['natural'] == pytest.approx(60.0)
    assert partial.groups['specialized'] == pytest.approx(90.0)
    assert partial.groups['structured'] is None
    assert partial.average == pytest.approx(67.5)
    assert not partial.group_complete['natural'] and not partial.average_complete
    assert len(partial.missing) == 15 and 'svhn' in partial.missing \
        and 'cifar' not in partial.missing


def test_paper_row_only_for_vim_s(work_dir):
    table = build_table(collect_results(str(work_dir)))
    paper = rows_by_name(table)['vim_s', 'Memba (paper)']
    ref = paper_row('vim_s')  # the row is the published one, not numbers of its own
    assert paper.groups == {'natural': ref.natural, 'specialized': ref.specialized,
                            'structured': ref.structured}
    assert paper.average == ref.average
    assert all(paper.tasks[t] == ref.tasks.get(t) for t in VTAB1K_TASKS)
    assert not any(r.source == 'paper' and r.backbone == 'vmamba_s' for r in table.rows)
    notes = ' '.join(table.notes)
    assert 'VMamba-S' in notes and 'no paper row' in notes
    assert 'ICLR 2026' in notes


def test_paper_means_agree_with_each_other_and_with_the_tasks():
    """The published means, checked against each other (the average is over the 19 tasks,
    each group mean rounded to 0.01) and against the per-task cells where there are any."""
    for ref in PAPER_RESULTS.values():
        groups = {'natural': ref.natural, 'specialized': ref.specialized,
                  'structured': ref.structured}
        weighted = sum(len(VTAB1K_GROUPS[g]) * v for g, v in groups.items()) / len(VTAB1K_TASKS)
        assert abs(ref.average - weighted) <= 0.01, ref.label
        if ref.tasks:  # per-task cells rounded to 0.1
            assert sorted(ref.tasks) == sorted(VTAB1K_TASKS)
            for g, v in groups.items():
                mean = sum(ref.tasks[t] for t in VTAB1K_GROUPS[g]) / len(VTAB1K_GROUPS[g])
                assert abs(mean - v) <= 0.05 + 1e-9, (ref.label, g)
            assert abs(sum(ref.tasks.values()) / len(ref.tasks) - ref.average) <= 0.05 + 1e-9


def find_paper_table(name='memba_table6_vtab1k.csv'):
    """Copies of the paper's Table 6 in the repository (not under data/ or work_dirs/)."""
    found = []
    for top, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not (top == REPO and d in ('data', 'work_dirs'))
                   and not d.startswith('.')]
        found += [osp.join(top, name)] if name in files else []
    return found


PAPER_TABLE_CSVS = find_paper_table()
PAPER_TABLE_ROWS = {'vim_s': ('Vim-S', 'Memba(in+out-proj)'),
                    'vmamba_s': ('Vanilla-VMamba-S', 'Memba(in+out_proj)')}


@pytest.mark.skipif(not PAPER_TABLE_CSVS, reason='no copy of the paper\'s Table 6 '
                    '(memba_table6_vtab1k.csv) in the repository to compare with')
def test_paper_constants_match_the_papers_table():
    with open(PAPER_TABLE_CSVS[0]) as f:
        rows = {(r['backbone'], r['method']): r for r in csv.DictReader(f)}
    assert PAPER_RESULTS
    for backbone, ref in PAPER_RESULTS.items():
        row = rows[PAPER_TABLE_ROWS[backbone]]
        # the table's means have one decimal, the paper's text two
        for key, field in (('natural', 'natural_mean'), ('specialized', 'specialized_mean'),
                           ('structured', 'structured_mean'), ('average', 'overall_mean')):
            assert getattr(ref, key) == pytest.approx(float(row[field]), abs=0.051), \
                (backbone, key)
        for task, value in ref.tasks.items():
            assert value == float(row[task]), (backbone, task)


def test_markdown(work_dir):
    md = to_markdown(build_table(collect_results(str(work_dir))))
    lines = md.splitlines()
    header = [c.strip() for c in lines[0].strip('|').split('|')]
    assert header[:3] == ['Backbone', 'Method', 'CIFAR-100']
    assert header[9] == 'Natural' and header[14] == 'Specialized'
    assert header[23] == 'Structured' and header[24] == 'Avg' and len(header) == 25
    cells = {}
    for line in lines[2:5]:
        row = [c.strip() for c in line.strip('|').split('|')]
        cells[row[0], row[1]] = row
    full = cells['vim_s', 'memba']
    assert full[2] == '70.00' and full[9] == '75.00' and full[14] == '85.00'
    assert full[23] == '52.50' and full[24] == '67.63'
    paper = cells['vim_s', 'Memba (paper)']
    assert paper[2] == '–' and paper[9] == '77.07' and paper[14] == '85.66'
    assert paper[23] == '61.70' and paper[24] == '72.40'
    partial = cells['vmamba_s', 'lora']
    assert partial[2] == '50.00' and partial[5] == '–'
    assert partial[9] == '60.00*' and partial[14] == '90.00*'
    assert partial[23] == '–' and partial[24] == '67.50*'
    assert 'vmamba_s/lora is missing 15 of 19 tasks' in md and 'smallnorb_ele' in md
    assert ('vmamba_s/lora was not evaluated on the full VTAB-1k test split of: '
            'dtd (100 of 1880)') in md


def test_csv(work_dir):
    rows = list(csv.DictReader(io.StringIO(to_csv(build_table(
        collect_results(str(work_dir)))))))
    assert [(r['backbone'], r['method'], r['source']) for r in rows] == [
        ('vim_s', 'memba', 'ours'), ('vim_s', 'memba', 'paper'), ('vmamba_s', 'lora', 'ours')]
    full, paper, partial = rows
    assert full['cifar'] == '70.00' and full['natural'] == '75.00'
    assert full['structured'] == '52.50' and full['average'] == '67.63'
    assert full['missing'] == ''
    assert paper['cifar'] == '' and paper['average'] == '72.40'
    assert partial['natural'] == '60.00' and partial['structured'] == ''
    assert partial['average'] == '67.50'  # plain number, no '*'
    assert len(partial['missing'].split()) == 15


def test_cli_writes_markdown_and_csv(work_dir, tmp_path, capsys):
    out = tmp_path / 'tables'
    assert load_tool('vtab_table').main([str(work_dir), '--out', str(out)]) == 0
    captured = capsys.readouterr()
    assert '| vim_s | memba | 70.00 |' in captured.out
    assert 'warning' in captured.err and 'cifar' in captured.err
    md = (out / 'vtab_table.md').read_text()
    assert md.startswith('| Backbone | Method |') and '67.63' in md
    assert 'missing' in (out / 'vtab_table.csv').read_text().splitlines()[0]
    # default output: the work dir itself
    assert load_tool('vtab_table').main([str(work_dir)]) == 0
    assert (work_dir / 'vtab_table.md').is_file() and (work_dir / 'vtab_table.csv').is_file()


def test_cli_empty_work_dir(tmp_path, capsys):
    (tmp_path / 'empty').mkdir()
    assert load_tool('vtab_table').main([str(tmp_path / 'empty')]) == 1
    err = capsys.readouterr().err.strip()
    assert 'no result_*.json' in err and '\n' not in err
    assert load_tool('vtab_table').main([str(tmp_path / 'missing')]) == 1
    assert 'not found' in capsys.readouterr().err


@pytest.mark.parametrize('content,reason', [
    ('{"task": "dtd", "top1": ', 'not valid JSON'),
    ('[1, 2]', 'JSON object'),
    ('{"task": "dtd", "backbone": "vim_s", "method": "memba"}', 'top1'),
    ('{"task": "a/b", "top1": 50, "backbone": "vim_s", "method": "memba"}', 'a/b'),
    ('{"task": "dtd", "top1": "high", "backbone": "vim_s", "method": "memba"}', 'top1'),
    ('{"task": "dtd", "top1": 123.0, "backbone": "vim_s", "method": "memba"}', 'top1'),
    ('{"task": "dtd", "top1": 50, "backbone": "", "method": "memba"}', 'backbone'),
])
def test_malformed_result_file(tmp_path, capsys, content, reason):
    bad = tmp_path / 'sub' / 'result_dtd.json'
    bad.parent.mkdir()
    bad.write_text(content)
    with pytest.raises(ResultFileError) as exc:
        load_result(str(bad))
    assert str(bad) in str(exc.value) and reason in str(exc.value)
    assert load_tool('vtab_table').main([str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert str(bad) in err and '\n' not in err


def test_custom_tasks_form_their_own_group(tmp_path):
    """Tasks outside the 19 (own data) get their own columns, outside the means."""
    write_result(tmp_path / 'a' / 'result_dtd.json', 'dtd', 60.0, 'vim_s', 'memba')
    write_result(tmp_path / 'b' / 'result_digits_b.json', 'digits_b', 91.5, 'vim_s', 'memba',
                 num_images=360)
    write_result(tmp_path / 'c' / 'result_my_data.json', 'my_data', 40.0, 'vim_s', 'lora',
                 num_images=36)
    table = build_table(collect_results(str(tmp_path)))
    memba = [r for r in table.rows if r.source == 'ours' and r.method == 'memba'][0]
    assert memba.custom == {'digits_b': 91.5}
    assert memba.average == 60.0 and memba.groups['natural'] == 60.0  # dtd only
    lora = [r for r in table.rows if r.source == 'ours' and r.method == 'lora'][0]
    assert lora.average is None and lora.custom == {'my_data': 40.0}
    md = to_markdown(table)
    header = md.splitlines()[0].rstrip(' |').split(' | ')
    assert header[-2:] == ['Custom: digits_b', 'Custom: my_data']
    assert header.index('Custom: digits_b') > header.index('Avg')
    memba_line = [ln for ln in md.splitlines() if '| memba |' in ln][0]
    assert memba_line.rstrip(' |').split(' | ')[-2:] == ['91.50', '–']
    assert any('not part of the VTAB-1k' in n for n in table.notes)
    rows = list(csv.reader(io.StringIO(to_csv(table))))
    assert rows[0][-3:] == ['custom:digits_b', 'custom:my_data', 'missing']
