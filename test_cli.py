"""The command line of every script: a mistyped flag is one line with a suggestion; CIFAR is downloaded when
missing, and an offline machine gets one sentence with the manual command."""
import glob
import importlib
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
