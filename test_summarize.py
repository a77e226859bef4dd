"""summarize.py: grouping, mean ± std and best against a hand computation, GPU-hours, CSV, unfinished runs,
searches, and the directories that are not runs. Run folders are written by hand in the scripts' formats;
test_train_cifar.py summarises a real run."""
import csv
import json
import os

import pytest

import runs
import summarize
import utils

GENOTYPE_A = {'normal': [['sep_conv_3x3', 0]], 'reduce': [['max_pool_3x3', 1]]}  # only compared, never built
GENOTYPE_B = {'normal': [['dil_conv_3x3', 0]], 'reduce': [['max_pool_3x3', 1]]}


def train_run(root, name, error, seed, genotype=GENOTYPE_A, **extra):
    """A finished train_cifar.py run folder: result.json and metrics.jsonl."""
    path = root / name
    path.mkdir()
    result = {'kind': 'train', 'script': 'train_cifar', 'dataset': 'cifar10', 'arch': extra.pop('arch', 'A'),
              'genotype': genotype, 'epochs': 600, 'test_error': error, 'test_acc': 100 - error,
              'test_top5': 99.5, 'params': 2_600_000, 'params_M': 2.6, 'macs': 440_000_000, 'macs_M': 440.,
              'seed': seed, 'seconds': 7200., 'device': 'cuda', 'device_name': 'NVIDIA H100',
              'processes': 1, 'precision': 'bf16', **extra}
    (path / 'result.json').write_text(json.dumps(result))
    runs.append_jsonl(str(path / 'metrics.jsonl'), {'epoch': 600, 'seconds': 12.})
    return str(path)


def search_run(root, name, val_accs, seed, lambda_at=1000., epochs=2, device=None):
    """A train_search.py run folder: search_log.jsonl (one record per epoch done) and the checkpoint."""
    path = root / name
    path.mkdir()
    for epoch, acc in enumerate(val_accs, 1):
        runs.append_jsonl(str(path / 'search_log.jsonl'), {'epoch': epoch, 'val_acc': acc, 'seconds': 1800.,
                                                            'genotype': GENOTYPE_A})
    settings = {'dataset': 'cifar10', 'space': 'nos', 'ops': ['sep_conv_3x3', 'skip_connect'], 'layers': 8,
                'init_channels': 16, 'lambda_at': lambda_at, 'unrolled': False, 'epochs': epochs}
    runs.save_checkpoint({'epoch': len(val_accs), 'settings': settings,
                           'args': {'seed': seed, 'device': device, 'gpu': 0}}, str(path / 'checkpoint.pt'))
    return str(path)


def test_groups_by_genotype_with_mean_std_best_and_gpu_hours(tmp_path, capsys):
    runs = [train_run(tmp_path, f'a{s}', e, s) for s, e in enumerate([2.60, 2.75, 2.53])]
    runs.append(train_run(tmp_path, 'b0', 3.10, 0, GENOTYPE_B, arch='B', processes=4, seconds=3600.))
    rows = summarize.main(runs + ['--csv', str(tmp_path / 'table.csv')])
    a, b = rows
    # by hand: mean (2.60 + 2.75 + 2.53) / 3 = 2.6267; sample std sqrt(sum d^2 / 2) = 0.1124
    assert a['runs'] == 3 and a['label'] == 'A' and a['seeds'] == '0, 1, 2'
    assert a['error_mean'] == pytest.approx(2.626667, abs=1e-6)
    assert a['error_std'] == pytest.approx(0.112398, abs=1e-6)
    assert a['error_best'] == 2.53 and a['params_M'] == 2.6 and a['macs_M'] == 440.
    assert a['hours_per_run'] == pytest.approx(2.) and a['gpu_hours_per_run'] == pytest.approx(2.)
    assert a['top5_mean'] == pytest.approx(0.5)
    assert b['runs'] == 1 and b['error_std'] is None and b['gpu_hours_per_run'] == pytest.approx(4.)  # 4 GPUs
    out = capsys.readouterr().out
    assert '2.63 ± 0.11' in out and '2.53' in out and 'NVIDIA H100 bf16' in out
    with open(tmp_path / 'table.csv') as f:
        table = list(csv.DictReader(f))
    assert [r['label'] for r in table] == ['A', 'B']
    assert float(table[0]['error_std']) == pytest.approx(a['error_std']) and table[1]['error_std'] == ''


def test_cpu_runs_have_hours_but_no_gpu_hours(tmp_path):
    run = train_run(tmp_path, 'cpu', 50., 0, device='cpu', device_name='AMD EPYC', precision='fp32')
    (row,) = summarize.main([run, '--csv', ''])
    assert row['hours_per_run'] == pytest.approx(2.) and row['gpu_hours_per_run'] is None


def test_unfinished_runs_are_listed_and_non_runs_skipped(tmp_path, capsys):
    done = train_run(tmp_path, 'done', 2.6, 0)
    running = tmp_path / 'running'
    running.mkdir()
    runs.append_jsonl(str(running / 'metrics.jsonl'), {'epoch': 1, 'seconds': 1.})
    runs.save_checkpoint({'epoch': 1, 'arch': 'DARTS_V2', 'dataset': 'cifar10', 'args': {'epochs': 600}},
                          str(running / 'checkpoint.pt'))
    not_a_run = tmp_path / 'notes'
    not_a_run.mkdir()
    (not_a_run / 'readme.txt').write_text('hello')
    rows = summarize.main([str(not_a_run), done, str(running), str(tmp_path / 'missing'),
                           '--csv', str(tmp_path / 'table.csv')])
    captured = capsys.readouterr()
    assert f'skipped {not_a_run}: not a run folder' in captured.err
    assert f'skipped {tmp_path / "missing"}: does not exist' in captured.err
    assert rows[0]['status'] == 'done' and rows[0]['dirs'] == done
    assert 'no result.json yet: 1 of 600 epochs done' in rows[1]['status'] and rows[1]['dirs'] == str(running)
    assert 'not finished' in captured.out and str(running) in captured.out
    with open(tmp_path / 'table.csv') as f:
        assert [r['dirs'] for r in csv.DictReader(f)] == [done, str(running)]


def test_no_run_at_all_is_one_sentence(tmp_path, capsys):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(SystemExit) as e:
        utils.run_main(lambda: summarize.main([str(tmp_path / 'empty'), '--csv', '']))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f'skipped {tmp_path / "empty"}: not a run folder' in err
    assert err.strip().splitlines()[-1] == ('error: none of the 1 directories given is a run folder (the --save '
                                            'folder of train_cifar.py, train_imagenet.py, train_search.py, '
                                            'search_adwp.py or teacher.py)')


def test_searches_group_by_settings(tmp_path):
    runs = [search_run(tmp_path, 's1', [50., 60.], 1), search_run(tmp_path, 's2', [55., 70.], 2),
            search_run(tmp_path, 'cpu', [40., 80.], 3, lambda_at=0., device='cpu'),
            search_run(tmp_path, 'half', [45.], 4)]
    rows = summarize.main(runs + ['--csv', ''])
    plain, ags, unfinished = rows  # sorted by mean error: 20 % before 35 %, then the unfinished run
    assert ags['kind'] == 'search' and ags['runs'] == 2 and ags['seeds'] == '1, 2'
    assert 'lambda_at=1000' in ags['label'] and '2 epochs' in ags['label']
    assert ags['error_mean'] == pytest.approx(35.) and ags['error_best'] == pytest.approx(30.)
    assert ags['hours_per_run'] == pytest.approx(1.) and ags['gpu_hours_per_run'] == pytest.approx(1.)
    assert 'lambda_at=0' in plain['label'] and plain['error_mean'] == pytest.approx(20.)
    assert plain['gpu_hours_per_run'] is None  # --device cpu
    assert unfinished['dirs'] == runs[3] and 'search at epoch 1 of 2' in unfinished['status']


def test_a_final_search_result_wins(tmp_path):
    """A search_result.json (or result.json with kind 'search') gives settings, method and GPU-hours."""
    path = search_run(tmp_path, 's', [50., 60.], 1)
    final = {'kind': 'search', 'method': 'eoinas', 'seed': 1, 'gpu_hours': 8.4, 'val_acc': 75.,
             'settings': {'dataset': 'cifar10', 'space': 'darts', 'lambda_at': 0., 'unrolled': True,
                          'epochs': 2}}
    (tmp_path / 's' / 'search_result.json').write_text(json.dumps(final))
    (row,) = summarize.main([path, '--csv', ''])
    assert row['label'] == 'eoinas darts lambda_at=0 2nd order 2 epochs'
    assert row['error_mean'] == pytest.approx(25.) and row['gpu_hours_per_run'] == pytest.approx(8.4)
    os.rename(tmp_path / 's' / 'search_result.json', tmp_path / 's' / 'result.json')
    (row,) = summarize.main([path, '--csv', ''])
    assert row['kind'] == 'search' and row['gpu_hours_per_run'] == pytest.approx(8.4)


def test_a_cpu_search_reports_cpu_time_and_old_results_stay_readable(tmp_path, capsys):
    """A search on the CPU states CPU time (process time), not wall-clock CPU-hours; a result.json written
    before that (its `cpu_hours` were wall-clock hours) is still read, with its CPU time unknown."""
    settings = {'dataset': 'cifar10', 'space': 'darts', 'lambda_at': 0., 'unrolled': False, 'epochs': 2}
    new = search_run(tmp_path, 'new', [50., 60.], 1)
    (tmp_path / 'new' / 'result.json').write_text(json.dumps(
        {'kind': 'search', 'method': 'darts', 'seed': 1, 'val_acc': 60., 'settings': settings, 'device': 'cpu',
         'wall_seconds': 7200., 'processes': 1, 'cpu_time_seconds': 2700., 'cpu_time_hours': 0.75}))
    old = search_run(tmp_path, 'old', [50., 60.], 2)
    (tmp_path / 'old' / 'result.json').write_text(json.dumps(
        {'kind': 'search', 'method': 'darts', 'seed': 2, 'val_acc': 60., 'settings': settings, 'device': 'cpu',
         'wall_seconds': 7200., 'processes': 1, 'cpu_hours': 2.0}))
    (row,) = summarize.main([new, '--csv', ''])
    assert row['hours_per_run'] == pytest.approx(2.) and row['cpu_time_hours_per_run'] == pytest.approx(0.75)
    assert row['gpu_hours_per_run'] is None
    out = capsys.readouterr().out
    assert 'CPU-time h/run' in out and '0.7500' in out
    (row,) = summarize.main([old, '--csv', ''])
    assert row['hours_per_run'] == pytest.approx(2.) and row['cpu_time_hours_per_run'] is None
    # the epochs' own CPU time where the search wrote no result.json
    log = tmp_path / 'log'
    log.mkdir()
    for epoch in (1, 2):
        runs.append_jsonl(str(log / 'search_log.jsonl'), {'epoch': epoch, 'val_acc': 60., 'seconds': 1800.,
                                                          'cpu_seconds': 900., 'settings': settings})
    (row,) = summarize.main([str(log), '--csv', ''])
    assert row['cpu_time_hours_per_run'] == pytest.approx(0.5)


def test_select_val_keeps_the_search_with_the_best_final_held_out_accuracy(tmp_path, capsys):
    """--select val (EoiNAS's best of 4): of the searches of one configuration, the one whose last epoch has
    the best val_acc_end (the whole held-out half in eval mode) stays and is named; val_acc (the running mean
    of the A steps) decides only for logs without val_acc_end; other configurations and retraining runs pass."""
    dirs = [search_run(tmp_path, f's{seed}', [50., acc], seed) for seed, acc in ((1, 70.), (2, 90.), (3, 80.))]
    for d, end in zip(dirs, (75., 72., 81.)):  # s3 has the best val_acc_end although s2 has the best val_acc
        records = runs.read_jsonl(os.path.join(d, 'search_log.jsonl'))
        records[-1]['val_acc_end'] = end
        with open(os.path.join(d, 'search_log.jsonl'), 'w') as f:
            f.write(''.join(json.dumps(r) + '\n' for r in records))
    other = search_run(tmp_path, 'plain', [40., 60.], 4, lambda_at=0.)
    train = train_run(tmp_path, 'train', 2.6, 0)
    rows = summarize.main(dirs + [other, train, '--csv', '', '--select', 'val'])
    out = capsys.readouterr().out
    (ags,) = [r for r in rows if 'lambda_at=1000' in r['label']]
    assert ags['runs'] == 1 and ags['dirs'] == dirs[2] and ags['error_mean'] == pytest.approx(19.)
    assert f'{dirs[2]} won with val_acc_end 81.00%' in out and f'{dirs[0]} 75.00%' in out
    assert len(rows) == 3 and '--select val: of 1 search(es)' in out  # the other configuration is alone
    plain = summarize.main(dirs + ['--csv', ''])  # without --select: all three, by their val_acc_end
    assert plain[0]['runs'] == 3 and plain[0]['error_best'] == pytest.approx(19.)
