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
from memba_vision.evaluation.paper_results import PAPER_CSV, paper_row, paper_rows
from conftest import load_tool


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
        ('vim_s', 'memba', 'ours'), ('vim_s', 'Memba(in+out-proj) (paper)', 'paper'),
        ('vmamba_s', 'lora', 'ours'), ('vmamba_s', 'LoRA(in+out_proj) (paper)', 'paper')]
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


def test_paper_row_under_each_of_ours(work_dir):
    table = build_table(collect_results(str(work_dir)))
    paper = rows_by_name(table)['vim_s', 'Memba(in+out-proj) (paper)']
    assert paper.method == 'memba' and paper.missing == []
    assert paper.tasks['cifar'] == 63.2 and paper.tasks['smallnorb_ele'] == 40.3
    # means from the cells: 539.5 / 7, 342.6 / 4, 493.5 / 8, 1375.6 / 19
    assert paper.groups == pytest.approx({'natural': 77.071429, 'specialized': 85.65,
                                          'structured': 61.6875}, abs=1e-6)
    assert paper.average == pytest.approx(72.4, abs=1e-9)
    notes = ' '.join(table.notes)
    assert 'computed from the task cells' in notes and 'arXiv:2506.18184' in notes
    assert 'MambaPEFT' in notes and 'No published numbers' not in notes


def test_rows_without_a_paper_row_are_noted(tmp_path):
    write_result(str(tmp_path / 'a' / 'result_dtd.json'), 'dtd', 60.0, 'vim_s', 'lora')
    write_result(str(tmp_path / 'b' / 'result_dtd.json'), 'dtd', 61.0, 'vmamba_s', 'full')
    write_result(str(tmp_path / 'c' / 'result_dtd.json'), 'dtd', 62.0, 'vim_s', 'lora-in')
    table = build_table(collect_results(str(tmp_path)))
    assert [(r.backbone, r.method, r.source) for r in table.rows] == [
        ('vim_s', 'lora', 'ours'), ('vim_s', 'lora-in', 'ours'), ('vim_s', 'lora-in', 'paper'),
        ('vmamba_s', 'full', 'ours')]
    assert 'No published numbers for: vim_s/lora, vmamba_s/full.' in table.notes


def test_hybrid_pairing_is_labelled():
    ref = paper_row('vim_s', 'hybrid')
    assert ref.label == 'Hybrid (paper, searched)' and ref.paper_method == 'Hybrid'
    assert 'starting point' in ref.note and 'never published' in ref.note
    assert paper_row('vmamba_s', 'hybrid') is None and paper_row('vim_s', 'lora') is None


def read_paper_csv():
    with open(PAPER_CSV, newline='') as f:
        return {(r['backbone'], r['method']): r for r in csv.DictReader(f)}


def test_paper_rows_are_the_csvs_cells_and_their_means():
    """Every mapped row: the 19 cells as in the CSV, means from the cells, the printed means
    kept; printed and computed means differ beyond rounding in two rows only."""
    table = read_paper_csv()
    rows = paper_rows()
    assert len(rows) == 13 + 6
    for (backbone, method), ref in rows.items():
        cells = table[ref.paper_backbone, ref.paper_method]
        assert ref.tasks == {t: float(cells[t]) for t in VTAB1K_TASKS}
        assert ref.printed['overall'] == float(cells['overall_mean'])
        assert ref.means['overall'] == pytest.approx(float(cells['mean_of_19_recomputed']),
                                                     abs=0.005 + 1e-9)
        for g, names in VTAB1K_GROUPS.items():
            assert ref.means[g] == pytest.approx(sum(ref.tasks[t] for t in names) / len(names))
            assert ref.printed[g] == float(cells[f'{g}_mean'])
    assert {k: sorted(r.differs) for k, r in rows.items() if r.differs} == {
        ('vim_s', 'lora-embed'): ['natural', 'overall'],
        ('vmamba_s', 'lora'): ['natural', 'overall', 'structured']}
    assert rows['vim_s', 'lora-embed'].differs['overall'][0] == 58.6
    assert rows['vim_s', 'lora-embed'].differs['overall'][1] == pytest.approx(57.542105)
    assert rows['vmamba_s', 'lora'].differs['overall'] == pytest.approx((73.20, 73.368421))


def test_markdown(work_dir):
    md = to_markdown(build_table(collect_results(str(work_dir))))
    lines = md.splitlines()
    header = [c.strip() for c in lines[0].strip('|').split('|')]
    assert header[:3] == ['Backbone', 'Method', 'CIFAR-100']
    assert header[9] == 'Natural' and header[14] == 'Specialized'
    assert header[23] == 'Structured' and header[24] == 'Avg' and len(header) == 25
    rows = [[c.strip() for c in line.strip('|').split('|')] for line in lines[2:6]]
    assert [r[:2] for r in rows] == [
        ['vim_s', 'memba'], ['vim_s', 'Memba(in+out-proj) (paper)'],
        ['vmamba_s', 'lora'], ['vmamba_s', 'LoRA(in+out_proj) (paper)']]
    cells = {(r[0], r[1]): r for r in rows}
    full = cells['vim_s', 'memba']
    assert full[2] == '70.00' and full[9] == '75.00' and full[14] == '85.00'
    assert full[23] == '52.50' and full[24] == '67.63'
    paper = cells['vim_s', 'Memba(in+out-proj) (paper)']  # means from the cells
    assert paper[2] == '63.20' and paper[9] == '77.07' and paper[14] == '85.65'
    assert paper[23] == '61.69' and paper[24] == '72.40'
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
    assert [(r['backbone'], r['method'], r['source'], r['label']) for r in rows] == [
        ('vim_s', 'memba', 'ours', 'memba'),
        ('vim_s', 'memba', 'paper', 'Memba(in+out-proj) (paper)'),
        ('vmamba_s', 'lora', 'ours', 'lora'),
        ('vmamba_s', 'lora', 'paper', 'LoRA(in+out_proj) (paper)')]
    full, paper, partial, _ = rows
    assert full['cifar'] == '70.00' and full['natural'] == '75.00'
    assert full['structured'] == '52.50' and full['average'] == '67.63'
    assert full['missing'] == ''
    assert paper['cifar'] == '63.20' and paper['average'] == '72.40'
    assert paper['missing'] == ''
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


def test_cli_several_work_dirs(work_dir, tmp_path, capsys):
    out = tmp_path / 'tables'
    vim, vmamba = str(work_dir / 'vim_s_memba'), str(work_dir / 'vmamba')
    assert load_tool('vtab_table').main([vim, vmamba, '--out', str(out)]) == 0
    rows = list(csv.DictReader(open(out / 'vtab_table.csv')))
    assert [(r['backbone'], r['method'], r['source']) for r in rows] == [
        ('vim_s', 'memba', 'ours'), ('vim_s', 'memba', 'paper'),
        ('vmamba_s', 'lora', 'ours'), ('vmamba_s', 'lora', 'paper')]
    with pytest.raises(SystemExit):
        load_tool('vtab_table').main([vim, vmamba])
    assert 'several work dirs need --out DIR' in capsys.readouterr().err


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


# Three full runs, with means worked out by hand, and the paper's rows for the same pairs.
TASK_ORDER = list(VTAB1K_TASKS)  # 7 natural, 4 specialized, 8 structured
OURS = {
    # FULL above: 525 / 7, 340 / 4, 420 / 8, 1285 / 19
    ('vim_s', 'memba'): (FULL, ['75.00', '85.00', '52.50', '67.63']),
    # 462 / 7 = 66, 326 / 4 = 81.5, 376 / 8 = 47, 1164 / 19 = 61.263...
    ('vim_s', 'lora-in'): (dict(zip(TASK_ORDER, [60, 62, 64, 66, 68, 70, 72, 80, 81, 82, 83,
                                                 40, 42, 44, 46, 48, 50, 52, 54])),
                           ['66.00', '81.50', '47.00', '61.26']),
    # 7 x 75.5 = 528.5 / 7, 346 / 4 = 86.5, 508 / 8 = 63.5, 1382.5 / 19 = 72.763...
    ('vmamba_s', 'lora-out'): (dict(zip(TASK_ORDER, [75.5] * 7 + [85, 86, 87, 88] +
                                        list(range(60, 68)))),
                               ['75.50', '86.50', '63.50', '72.76']),
}
PAPER = {  # Table 6 cells; means: group sums / sizes, overall: sum of the 19 / 19
    ('vim_s', 'memba'): (
        'Memba(in+out-proj) (paper)',
        '63.20 91.10 68.60 91.30 91.40 89.90 44.00 87.20 95.40 84.50 75.50 '
        '84.80 62.40 50.40 83.30 85.10 52.50 34.70 40.30',
        (539.5 / 7, 342.6 / 4, 493.5 / 8, 1375.6 / 19)),          # 77.07 85.65 61.69 72.40
    ('vim_s', 'lora-in'): (
        'LoRA(in-proj) (paper)',
        '63.40 90.30 68.20 91.00 91.00 88.60 43.50 84.70 95.00 83.80 72.90 '
        '84.00 61.30 48.60 80.00 83.50 52.60 31.80 39.50',
        (536.0 / 7, 336.4 / 4, 481.3 / 8, 1353.7 / 19)),          # 76.57 84.10 60.16 71.25
    ('vmamba_s', 'lora-out'): (
        'LoRA(out_proj) (paper)',
        '62.30 89.80 70.20 92.00 92.50 91.70 43.70 87.20 95.20 85.50 76.30 '
        '90.10 62.50 54.70 83.70 88.30 56.00 37.40 41.90',
        (542.2 / 7, 344.2 / 4, 514.6 / 8, 1401.0 / 19)),          # 77.46 86.05 64.33 73.74
}
MEAN_COLUMNS = [9, 14, 23, 24]  # Natural, Specialized, Structured, Avg in a Markdown row


def test_paper_rows_beside_three_methods(tmp_path):
    for (backbone, method), (top1, _) in OURS.items():
        for task, value in top1.items():
            write_result(str(tmp_path / f'{backbone}_{method}' / task / f'result_{task}.json'),
                         task, value, backbone, method)
    # a fourth: the paper prints means its cells do not give (Natural 77.3, Structured
    # 63.3, Avg 73.20 against 540.2 / 7 = 77.17, 510.5 / 8 = 63.81, 1394.0 / 19 = 73.37)
    for task in VTAB1K_TASKS:
        write_result(str(tmp_path / 'vmamba_s_lora' / f'result_{task}.json'), task, 70.0,
                     'vmamba_s', 'lora')
    table = build_table(collect_results(str(tmp_path)))
    lines = to_markdown(table).splitlines()
    rows = [[c.strip() for c in line.strip('|').split('|')] for line in lines[2:10]]
    assert [r[:2] for r in rows] == [
        ['vim_s', 'lora-in'], ['vim_s', 'LoRA(in-proj) (paper)'],
        ['vim_s', 'memba'], ['vim_s', 'Memba(in+out-proj) (paper)'],
        ['vmamba_s', 'lora'], ['vmamba_s', 'LoRA(in+out_proj) (paper)'],
        ['vmamba_s', 'lora-out'], ['vmamba_s', 'LoRA(out_proj) (paper)']]
    by_name = {(r[0], r[1]): (i, r) for i, r in enumerate(rows)}
    task_columns = [i for i in range(2, 25) if i not in MEAN_COLUMNS]
    for (backbone, method), (top1, means) in OURS.items():
        i, ours = by_name[backbone, method]
        assert [ours[c] for c in task_columns] == [f'{top1[t]:.2f}' for t in TASK_ORDER]
        assert [ours[c] for c in MEAN_COLUMNS] == means
        label, cells, paper_means = PAPER[backbone, method]
        paper = rows[i + 1]  # directly under ours
        assert paper[:2] == [backbone, label]
        assert [paper[c] for c in task_columns] == cells.split()
        assert [paper[c] for c in MEAN_COLUMNS] == [f'{m:.2f}' for m in paper_means]
        row = table.rows[i + 1]
        assert row.source == 'paper' and row.method == method
        assert [row.groups['natural'], row.groups['specialized'], row.groups['structured'],
                row.average] == pytest.approx(list(paper_means), abs=1e-9)
    fourth = table.rows[5]
    assert fourth.label == 'LoRA(in+out_proj) (paper)'
    assert [fourth.groups['natural'], fourth.groups['specialized'], fourth.groups['structured'],
            fourth.average] == pytest.approx([540.2 / 7, 343.3 / 4, 510.5 / 8, 1394.0 / 19],
                                             abs=1e-9)
    differ = [n for n in table.notes if 'the paper prints' in n]
    assert differ == ['LoRA(in+out_proj) (paper) (vmamba_s): the paper prints Natural 77.3, '
                      'Structured 63.3, Avg 73.2; its task cells give 77.17, 63.81, 73.37.']
    assert any('computed from the task cells' in n for n in table.notes)
    csv_rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert [r['source'] for r in csv_rows] == ['ours', 'paper'] * 4
    assert csv_rows[3]['label'] == 'Memba(in+out-proj) (paper)'
    assert csv_rows[3]['structured'] == rows[3][23] and csv_rows[3]['cifar'] == '63.20'
