"""train_cifar.py end to end on the synthetic data (CPU, tiny network), resume, and its error messages."""
import json
import os
import re

import pytest
import torch

import genotypes
import runs
import train_cifar
import utils
from test_train_search import die_after

TINY = ['--device', 'cpu', '--dataset', 'synthetic', '--synthetic_size', '128', '--layers', '5',
        '--init_channels', '8', '--batch_size', '16', '--workers', '0', '--report_freq', '0',
        '--learning_rate', '0.05', '--seed', '1']
EPOCHS = ['--epochs', '3']


def run(argv):
    """main() as the command line runs it: returns the exit code (0 on success)."""
    return utils.exit_code(train_cifar.main, argv)


def fail(argv, capsys):
    capsys.readouterr()
    assert run(argv) == 2
    return capsys.readouterr().err


@pytest.fixture(scope='module')
def genotype_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('genotype') / 'genotype.json')
    genotypes.save(genotypes.NOS_EXAMPLE, path)  # heterogeneous: attention and dynamic ops in both tiers
    return path


@pytest.fixture(scope='module')
def full_run(tmp_path_factory, genotype_file):
    """Three uninterrupted epochs; returns (SAVE, stdout)."""
    save = str(tmp_path_factory.mktemp('full'))
    capture = pytest.MonkeyPatch()
    out = []
    capture.setattr('builtins.print', lambda *a, **k: out.append(' '.join(map(str, a))))
    try:
        assert run(TINY + EPOCHS + ['--genotype_file', genotype_file, '--save', save]) == 0
    finally:
        capture.undo()
    return save, out


def metrics(save):
    with open(os.path.join(save, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_end_to_end_prints_the_final_line(full_run):
    save, printed = full_run
    assert len(printed) == 1
    m = re.fullmatch(r'final test_error=(\d+\.\d\d) params_M=(\d+\.\d\d) macs_M=(\d+\.\d)', printed[0])
    assert m, printed
    with open(os.path.join(save, 'result.json')) as f:
        result = json.load(f)
    assert float(m.group(1)) == pytest.approx(result['test_error'], abs=0.006)
    assert result['test_error'] == pytest.approx(100 - metrics(save)[-1]['test_acc'])
    assert result['genotype'] == json.loads(genotypes.to_json(genotypes.NOS_EXAMPLE))
    assert result['weight_decay'] == 3e-4 and result['epochs'] == 3
    assert result['params'] > 0 and result['macs'] > 0
    with open(os.path.join(save, 'log.txt')) as f:
        log = f.read()
    assert 'weights 0.05M' in log and 'multiply-adds' in log


def test_loss_falls_and_drop_path_rises(full_run):
    rows = metrics(full_run[0])
    assert [r['epoch'] for r in rows] == [1, 2, 3]
    assert rows[-1]['test_loss'] < rows[0]['test_loss'] - 0.5
    assert rows[-1]['test_acc'] > 40  # 10 classes: chance is 10%
    # DARTS's schedule: drop_path_prob * epoch / epochs; cosine lr from 0.05
    assert [r['drop_path_prob'] for r in rows] == pytest.approx([0., 0.1, 0.2])
    assert [r['lr'] for r in rows] == pytest.approx([0.05, 0.0375, 0.0125])


def test_resume_after_a_kill_reproduces_the_run(full_run, genotype_file, tmp_path, monkeypatch):
    save = str(tmp_path / 'killed')
    args = TINY + EPOCHS + ['--genotype_file', genotype_file, '--save', save]
    real_save = runs.save_checkpoint
    # the process dies right after the first epoch's checkpoint
    monkeypatch.setattr(runs, 'save_checkpoint', die_after())
    assert run(args) == 130
    monkeypatch.setattr(runs, 'save_checkpoint', real_save)
    assert torch.load(os.path.join(save, 'checkpoint.pt'), weights_only=False)['epoch'] == 1
    assert run(args + ['--resume']) == 0

    full = torch.load(os.path.join(full_run[0], 'checkpoint.pt'), weights_only=False)
    resumed = torch.load(os.path.join(save, 'checkpoint.pt'), weights_only=False)
    assert resumed['epoch'] == full['epoch'] == 3
    assert full['model'].keys() == resumed['model'].keys()
    for name, tensor in full['model'].items():
        assert torch.equal(tensor, resumed['model'][name]), name

    def drop_time(rows):  # the times (wall-clock, CPU) differ from run to run
        return [{k: v for k, v in r.items() if k not in ('seconds', 'cpu_seconds', 'cpu_time_hours')} for r in rows]

    assert drop_time(metrics(save)) == drop_time(metrics(full_run[0]))
    with open(os.path.join(save, 'result.json')) as a, open(os.path.join(full_run[0], 'result.json')) as b:
        assert drop_time([json.load(a)]) == drop_time([json.load(b)])


def test_resume_refuses_another_genotype(full_run, capsys):
    err = fail(TINY + EPOCHS + ['--arch', 'DARTS_V2', '--save', full_run[0], '--resume'], capsys)
    assert 'genotype' in err and 'genotype.json' in err and 'DARTS_V2' in err


def test_resume_refuses_another_dataset(full_run, genotype_file, capsys):
    argv = [a if a != 'synthetic' else 'cifar10' for a in TINY]
    err = fail(argv + EPOCHS + ['--genotype_file', genotype_file, '--save', full_run[0], '--resume'], capsys)
    assert "dataset 'synthetic'" in err and "dataset 'cifar10'" in err


def test_refuses_a_used_save_without_resume(full_run, genotype_file, capsys):
    err = fail(TINY + EPOCHS + ['--genotype_file', genotype_file, '--save', full_run[0]], capsys)
    assert 'already holds a checkpoint' in err and '--resume' in err


@pytest.mark.parametrize('dataset, name, wd', [('cifar10', 'CIFAR-10', '0.0003'),
                                                ('cifar100', 'CIFAR-100', '0.0005')])
def test_missing_cifar(dataset, name, wd, tmp_path, capsys):
    argv = ['--device', 'cpu', '--dataset', dataset, '--data', str(tmp_path / 'nothing'), '--no_download',
            '--save', str(tmp_path / 'run')]
    err = fail(argv, capsys)
    assert f'no {name} data' in err and 'download' in err
    with open(tmp_path / 'run' / 'log.txt') as f:
        assert f'weight decay {wd} ({dataset})' in f.read()  # the per-dataset default, logged


def test_bad_genotype_file(tmp_path, capsys):
    bad = json.loads(genotypes.to_json(genotypes.NOS_EXAMPLE))
    bad['normal'][2][1] = ['conv_9x9', 3]
    path = tmp_path / 'bad.json'
    path.write_text(json.dumps(bad))
    err = fail(['--device', 'cpu', '--genotype_file', str(path), '--save', str(tmp_path / 'run')], capsys)
    assert 'normal block 2' in err and "unknown op 'conv_9x9'" in err
    err = fail(['--device', 'cpu', '--genotype_file', str(tmp_path / 'missing.json')], capsys)
    assert 'does not exist' in err
    err = fail(['--device', 'cpu', '--arch', 'DARTS_V2', '--genotype_file', str(path)], capsys)
    assert 'either --arch or --genotype_file' in err


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_gpu_without_cuda(tmp_path, capsys):
    err = fail(['--gpu', '0', '--dataset', 'synthetic', '--save', str(tmp_path / 'run')], capsys)
    assert 'no CUDA device' in err and '--device cpu' in err


def test_result_json_has_what_summarize_needs(full_run):
    save = full_run[0]
    with open(os.path.join(save, 'result.json')) as f:
        result = json.load(f)
    assert result['kind'] == 'train' and result['dataset'] == 'synthetic' and result['seed'] == 1
    assert result['epochs'] == 3 and result['precision'] == 'fp32' and result['device'] == 'cpu'
    assert result['device_name'] and result['processes'] == 1
    assert result['seconds'] == pytest.approx(sum(r['seconds'] for r in metrics(save)))
    assert genotypes.load(genotype_file=os.path.join(save, 'genotype.json')) == genotypes.NOS_EXAMPLE
    import summarize
    (row,) = summarize.main([save, '--csv', ''])
    assert row['runs'] == 1 and row['error_mean'] == pytest.approx(result['test_error'])
    assert row['params_M'] == result['params_M'] and row['gpu_hours_per_run'] is None


def test_random_arch_is_drawn_logged_and_saved(tmp_path):
    save = tmp_path / 'random'
    argv = TINY + ['--synthetic_size', '32', '--layers', '3', '--init_channels', '4', '--epochs', '1',
                   '--arch', 'random:5', '--save', str(save)]
    assert run(argv) == 0
    drawn = genotypes.random_genotype(5)
    assert genotypes.load(genotype_file=str(save / 'genotype.json')) == drawn
    assert f'genotype random:5: {drawn!r}' in (save / 'log.txt').read_text()
    result = json.loads((save / 'result.json').read_text())
    assert result['arch'] == 'random:5' and result['genotype'] == json.loads(genotypes.to_json(drawn))


def test_random_arch_needs_an_integer_seed(tmp_path, capsys):
    err = fail(['--device', 'cpu', '--arch', 'random:x', '--save', str(tmp_path / 'run')], capsys)
    assert err == ("error: --arch random:x: the seed 'x' is not an integer; write random:SEED with an integer "
                   "SEED, for example --arch random:0\n")


def test_fp32_is_the_default_and_bf16_is_opt_in(tmp_path, capsys):
    """The papers trained in fp32, so that is the default on every device; --amp bf16 opts in to bf16 autocast
    with channels_last, and result.json and summarize.py say which precision ran."""
    assert train_cifar.build_parser().parse_args([]).amp == 'none'
    save = tmp_path / 'bf16'
    assert run(TINY + ['--epochs', '1', '--amp', 'bf16', '--save', str(save)]) == 0
    with open(save / 'result.json') as f:
        assert json.load(f)['precision'] == 'bf16'
    assert 'bf16 autocast, channels_last' in (save / 'log.txt').read_text()
    import summarize
    (row,) = summarize.main([str(save), '--csv', ''])
    assert row['precision'] == 'bf16' and 'bf16' in capsys.readouterr().out
