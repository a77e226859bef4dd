"""bench_search.py runs and prints its table (timings themselves are never asserted)."""
import bench_search


def test_bench_prints_one_row_per_configuration(capsys):
    bench_search.main(['--device', 'cpu', '--layers', '3', '--init_channels', '4', '--batch_size', '4',
                       '--teacher_depth', '11', '--iters', '1', '--warmup', '0', '--retrain_batch_size', '0',
                       '--fast_rows'])
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line.split() for line in lines[2:]]
    assert [r[:3] for r in rows] == [['search', 'darts', 'eager'], ['search', 'nos', 'eager'],
                                     ['search', 'darts', 'fast'], ['search', 'nos', 'fast']]
    assert rows[0][-1] == '1.00x' and float(rows[1][-4]) > 0


def test_count_table_has_every_path_with_its_ratio(capsys):
    bench_search.main(['--device', 'cpu', '--count', '--layers', '3', '--init_channels', '4', '--batch_size', '2',
                       '--teacher_depth', '11', '--iters', '1', '--warmup', '0', '--methods', 'darts', 'eoinas',
                       '--spaces', 'darts', 'nos'])
    lines = capsys.readouterr().out.splitlines()
    rows = {line[:32].strip(): line[32:].split() for line in lines if line.startswith(('DARTS', 'NOS', 'EoiNAS'))
            and 'teacher' not in line and ':' not in line[:32]}  # not the notes under the table
    pruned = [f'EoiNAS, DARTS, {k} alive, {path}' for k in (6, 4, 2) for path in ('plain', 'fast')]
    assert list(rows) == ['DARTS space, plain (reference)', 'NOS + AGS, plain', 'DARTS space, fast',
                          'NOS + AGS, fast', 'NOS + AGS, fast, checkpointed', 'EoiNAS, DARTS space, plain',
                          'EoiNAS, DARTS space, fast', *pruned, 'EoiNAS, NOS + AGS, plain', 'EoiNAS, NOS + AGS, fast']
    ops = {name: int(r[0]) for name, r in rows.items()}
    assert rows['DARTS space, plain (reference)'][1] == '1.00x'
    assert ops['DARTS space, fast'] < ops['DARTS space, plain (reference)'] / 2
    assert ops['NOS + AGS, fast'] < ops['NOS + AGS, plain'] / 2
    assert ops['EoiNAS, DARTS space, fast'] < ops['EoiNAS, DARTS space, plain'] / 2
    assert ops['EoiNAS, NOS + AGS, fast'] < ops['EoiNAS, NOS + AGS, plain'] / 2
    # pruning pays on both paths: fewer kernel ops as ops are pruned, the fast path never above its unpruned count
    for path in ('plain', 'fast'):
        counts = [ops[f'EoiNAS, DARTS, {k} alive, {path}'] for k in (6, 4, 2)]
        assert counts == sorted(counts, reverse=True) and counts[0] <= ops[f'EoiNAS, DARTS space, {path}']
    assert all(float(r[2]) > 0 and float(r[4]) > 0 for r in rows.values())  # saved MiB and CPU ms measured
