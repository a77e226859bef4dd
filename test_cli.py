"""The command line of every script: a mistyped flag is one line with a suggestion; CIFAR is downloaded when
missing, and an offline machine gets one sentence with the manual command."""
import glob
import importlib
import importlib.util
import os
import urllib.error
import urllib.request

import pytest

import utils

HERE = os.path.dirname(os.path.abspath(__file__))


def scripts() -> list[str]:
    """Every top-level script (a file that ends in utils.run_main(main)), found rather than listed, so that a
    new script is covered the day it lands."""
    found = []
    for path in sorted(glob.glob(os.path.join(HERE, '*.py'))):
        with open(path) as f:
            if "if __name__ == '__main__':\n    utils.run_main(main)" in f.read():
                found.append(os.path.splitext(os.path.basename(path))[0])
    return found


def test_scripts_are_found():
    assert {'train_search', 'train_cifar', 'train_imagenet', 'teacher', 'visualize', 'summarize',
            'search_adwp'} <= set(scripts())


def test_every_parser_is_the_shared_one():
    """No file builds argparse.ArgumentParser itself: utils.ArgumentParser gives every script the one-line
    errors."""
    for path in glob.glob(os.path.join(HERE, '*.py')):
        if os.path.basename(path) in ('utils.py', os.path.basename(__file__)):
            continue
        with open(path) as f:
            assert 'argparse.ArgumentParser(' not in f.read(), path


@pytest.mark.parametrize('script', scripts())
def test_a_typo_in_a_flag_is_one_line(script, capsys):
    main = importlib.import_module(script).main
    assert utils.exit_code(main, ['--lerning_rate', '0.1', 'x']) == 2
    out = capsys.readouterr()
    err = out.err
    assert err.count('\n') == 1 and err.startswith('error: ') and err.rstrip().endswith('; see --help'), err
    assert 'usage:' not in err + out.out
    assert 'unrecognized arguments: --lerning_rate' in err or 'required' in err, err


def test_the_closest_flag_is_suggested(capsys):
    import train_cifar
    assert utils.exit_code(train_cifar.main, ['--lerning_rate', '0.1', '--epoch_s=3']) == 2
    assert capsys.readouterr().err == ('error: unrecognized arguments: --lerning_rate 0.1 --epoch_s=3 (did you mean '
                                       '--learning_rate and --epochs?); see --help\n')
    p = utils.ArgumentParser()
    p.add_argument('--seed', type=int)
    with pytest.raises(SystemExit) as e:
        p.parse_args(['--qqqqqqqq'])
    assert e.value.code == 2
    assert capsys.readouterr().err == 'error: unrecognized arguments: --qqqqqqqq; see --help\n'  # nothing close
    with pytest.raises(SystemExit):
        p.parse_args(['--seed', 'x'])
    assert capsys.readouterr().err == "error: argument --seed: invalid int value: 'x'; see --help\n"


# ---------------------------------------------------------------------------------------------------------
# CIFAR download


@pytest.fixture
def offline(monkeypatch):
    """No network: every URL opened raises the URLError urllib raises on a machine without one. Returns the
    list of URLs that were tried."""
    tried = []

    def urlopen(request, *args, **kwargs):
        tried.append(getattr(request, 'full_url', request))
        raise urllib.error.URLError(OSError(-3, 'Temporary failure in name resolution'))

    monkeypatch.setattr(urllib.request, 'urlopen', urlopen)
    return tried


SEARCH = ['--device', 'cpu', '--workers', '0', '--lambda_at', '0', '--layers', '3', '--init_channels', '4']


@pytest.mark.parametrize('dataset, cls', [('cifar10', 'CIFAR10'), ('cifar100', 'CIFAR100')])
def test_missing_cifar_is_downloaded_and_offline_is_one_sentence(dataset, cls, offline, tmp_path, capsys):
    import train_search
    data = tmp_path / 'data'
    argv = SEARCH + ['--dataset', dataset, '--data', data, '--save', tmp_path / 'run']
    assert utils.exit_code(train_search.main, argv) == 2
    out = capsys.readouterr()
    assert offline and all('cs.toronto.edu' in url for url in offline)  # torchvision's download was tried
    assert 'downloading it with torchvision' in out.out and '--no_download forbids this' in out.out
    err = out.err
    assert err.count('\n') == 1 and err.startswith('error: '), err
    name = 'CIFAR-10' if dataset == 'cifar10' else 'CIFAR-100'
    assert f'{name} could not be downloaded into {data}' in err
    assert 'Temporary failure in name resolution' in err and 'if this machine is offline' in err
    assert f'torchvision.datasets.{cls}(\'{data}\', download=True)' in err and '--dataset synthetic' in err


def test_no_download_forbids_it(offline, tmp_path, capsys):
    import train_cifar
    argv = ['--device', 'cpu', '--dataset', 'cifar10', '--data', tmp_path / 'data', '--no_download',
            '--save', tmp_path / 'run']
    assert utils.exit_code(train_cifar.main, argv) == 2
    assert not offline  # nothing was fetched
    err = capsys.readouterr().err
    assert '--no_download forbids fetching it' in err and 'download=True' in err


# ---------------------------------------------------------------------------------------------------------
# The search cost on the CPU: CPU time, not wall-clock time


def test_cpu_seconds_count_children_and_not_sleep():
    import subprocess
    import sys
    import time
    before = utils.cpu_seconds()
    time.sleep(0.3)  # waiting costs no CPU time
    assert utils.cpu_seconds() - before < 0.15
    before = utils.cpu_seconds()
    # a child that burns 0.3 s of its own CPU time (as a DataLoader worker does), ended and waited for
    subprocess.run([sys.executable, '-c', 'import time\nwhile time.process_time() < 0.3: pass'], check=True)
    assert utils.cpu_seconds() - before >= 0.3


# ---------------------------------------------------------------------------------------------------------
# Retraining recipes (train_cifar.py --preset) and the learning rate that scales with the batch


def recipe_args(argv=(), **values):
    import train_cifar
    args = train_cifar.build_parser().parse_args(list(argv))
    vars(args).update(values)
    return args


def test_a_learning_rate_not_given_scales_with_the_batch():
    import train_cifar
    args = recipe_args(['--batch_size', '32'], preset='nos')
    line = train_cifar.apply_preset(args, {'batch_size'}, 'given')
    # NOS App. A.1: lr 0.25 at batch 128, so 0.25 * 32 / 128 at batch 32; the rest is the preset's
    assert (args.learning_rate, args.epochs, args.drop_path_prob) == (0.0625, 600, 0.3)
    assert 'its lr 0.25 at batch 128, scaled linearly to batch 32' in line
    args = recipe_args(['--batch_size', '32', '--learning_rate', '0.1'], preset='nos')
    train_cifar.apply_preset(args, {'batch_size', 'learning_rate'}, 'given')
    assert args.learning_rate == 0.1  # given: it wins
    args = recipe_args(preset='agnas')
    line = train_cifar.apply_preset(args, set(), 'given')
    # AGNAS Sec. 5.2 and its code: batch 96, lr 0.025, drop-path 0.2, 600 epochs
    assert (args.batch_size, args.learning_rate, args.drop_path_prob, args.epochs) == (96, 0.025, 0.2, 600)
    assert line.startswith('retraining recipe: --preset agnas (given): epochs 600, batch_size 96, learning_rate '
                           '0.025, drop_path_prob 0.2')
    args = recipe_args(['--autoaugment', '--epochs', '7'], preset='adwpnas')
    train_cifar.apply_preset(args, {'autoaugment', 'epochs'}, 'given')
    assert (args.batch_size, args.learning_rate, args.epochs) == (98, 0.025, 7)
    args = recipe_args(['--autoaugment'], preset='adwpnas')
    train_cifar.apply_preset(args, {'autoaugment'}, 'given')
    assert args.epochs == 1500  # ADWPNAS Sec. 4.3: 1500 epochs with AutoAugment


def test_the_recipe_follows_the_method_that_found_the_genotype(tmp_path):
    import json

    import genotypes
    import train_cifar

    def choose(argv, genotype=None):
        args = recipe_args(argv)
        label = args.arch or args.genotype_file
        genotype = genotype or genotypes.load(arch=args.arch, genotype_file=args.genotype_file)
        return train_cifar.choose_preset(args, genotype, label)

    assert choose(['--arch', 'DARTS_V2'])[0] == 'darts'
    assert choose(['--arch', 'NOS_EXAMPLE'])[0] == 'nos' and choose(['--arch', 'random:3'])[0] == 'nos'
    assert choose(['--arch', 'AGNAS']) == ('agnas', 'a staged genotype, which AGNAS searches')
    assert choose(['--arch', 'EOINAS_REPO_CANDIDATE'])[0] == 'eoinas'
    assert choose(['--arch', 'AGNAS', '--preset', 'nos']) == ('nos', 'given')  # --preset wins
    macro = genotypes.as_macro(genotypes.DARTS_V2, 5)
    assert choose(['--arch', 'DARTS_V2'], macro)[0] == 'adwpnas'
    # a genotype.json: the search files beside it say which method wrote it
    for name, records, preset in (
            ('eoinas', {'result.json': {'kind': 'search', 'method': 'eoinas', 'space': 'darts'}}, 'eoinas'),
            ('nos', {'search_log.jsonl': {'epoch': 1, 'method': 'darts', 'space': 'nos'}}, 'nos'),
            ('darts', {'search_log.jsonl': {'epoch': 1, 'method': 'darts', 'space': 'darts'}}, 'darts'),
            ('ags', {'result.json': {'method': 'darts', 'space': 'darts', 'settings': {'lambda_at': 1000.}}}, 'nos'),
            ('gdas', {'search_log.jsonl': {'epoch': 1, 'method': 'gdas', 'space': 'darts'}}, 'darts'),
            ('adwp', {'intensive_space.json': {'K': 6}}, 'adwpnas'),
            ('bare', {}, 'nos')):
        folder = tmp_path / name
        folder.mkdir()
        genotypes.save(genotypes.DARTS_V2, str(folder / 'genotype.json'))
        for file, record in records.items():
            (folder / file).write_text(json.dumps(record) + '\n')
        chosen, why = choose(['--genotype_file', str(folder / 'genotype.json')])
        assert chosen == preset, (name, chosen, why)
        assert (name in ('bare', 'adwp')) or str(folder) in why


# ---------------------------------------------------------------------------------------------------------
# --tensorboard (an optional extra: the tests that read event files back need `pip install tensorboard`, which
# CI does not install, ~55 MB with its dependencies; they are skipped without it)

HAS_TENSORBOARD = importlib.util.find_spec('tensorboard') is not None


def test_tensorboard_without_the_package_is_one_sentence(monkeypatch, tmp_path, capsys):
    import sys

    import train_search
    monkeypatch.setitem(sys.modules, 'tensorboard', None)  # import tensorboard -> ImportError
    argv = ['--dataset', 'synthetic', '--device', 'cpu', '--tensorboard', '--save', tmp_path / 'run']
    assert utils.exit_code(train_search.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and '--tensorboard needs the tensorboard package' in err
    assert 'pip install tensorboard' in err and not (tmp_path / 'run').exists()


def read_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={'scalars': 0, 'images': 0})
    events.Reload()
    return events


@pytest.mark.skipif(not HAS_TENSORBOARD, reason='needs the tensorboard package (pip install tensorboard)')
def test_tensorboard_holds_the_records_scalars_and_the_heatmaps(tmp_path):
    import runs
    import train_search
    save = tmp_path / 'search'
    argv = ['--dataset', 'synthetic', '--device', 'cpu', '--workers', '0', '--space', 'darts', '--lambda_at', '0',
            '--layers', '3', '--init_channels', '4', '--batch_size', '8', '--synthetic_size', '32',
            '--epochs', '2', '--report_freq', '0', '--tensorboard', '--save', save]
    assert utils.exit_code(train_search.main, argv) == 0
    records = runs.read_jsonl(str(save / 'search_log.jsonl'))
    events = read_events(save / 'tensorboard')
    for key in ('train_ce', 'val_ce', 'train_acc', 'val_acc', 'lr', 'seconds', 'cpu_seconds'):
        points = events.Scalars(key)
        assert [p.step for p in points] == [1, 2], key
        assert [p.value for p in points] == pytest.approx([r[key] for r in records], rel=1e-6), key
    assert {'importance/normal', 'importance/reduce'} <= set(events.Tags()['images'])
    assert [e.step for e in events.Images('importance/normal')] == [1, 2]
    # nested figures (a NAS-Bench-201 search's benchmark accuracies) are read generically
    board = runs.TensorBoard(str(tmp_path / 'other'), True)
    board.scalars({'epoch': 3, 'val_acc': 50., 'benchmark': {'arch': '|x~0|', 'cifar10_test': 93.5,
                                                            'cifar100_test': None}}, 3)
    board.close()
    events = read_events(tmp_path / 'other' / 'tensorboard')
    assert sorted(events.Tags()['scalars']) == ['benchmark/cifar10_test', 'val_acc']
    assert events.Scalars('benchmark/cifar10_test')[0].value == 93.5
