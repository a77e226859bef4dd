"""bench_search.py runs and prints its table (timings themselves are never asserted)."""
import bench_search


def test_bench_prints_one_row_per_configuration(capsys):
    bench_search.main(['--device', 'cpu', '--layers', '3', '--init_channels', '4', '--batch_size', '4',
                       '--teacher_depth', '11', '--iters', '1', '--warmup', '0', '--retrain_batch_size', '0'])
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line.split() for line in lines[2:]]
    assert [r[:2] for r in rows] == [['search', 'darts'], ['search', 'nos']]
    assert rows[0][-1] == '1.00x' and float(rows[1][-4]) > 0
