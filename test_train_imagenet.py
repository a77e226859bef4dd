"""train_imagenet.py on a tiny ImageFolder (CPU): two processes under torchrun (gloo) end with the same
weights, resume reproduces a run, and a missing train/ or val/ is named.

The images are 32x32 PNGs; the pipeline resizes them to 224x224, the size DARTS's ImageNet network needs."""
import json
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import runs
import train_imagenet
import utils
from test_train_search import die_after

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ['--device', 'cpu', '--layers', '3', '--init_channels', '8', '--batch_size', '4', '--workers', '0',
        '--report_freq', '0', '--arch', 'NOS_EXAMPLE']


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('imagenet')
    rng = np.random.default_rng(0)
    for split, n in (('train', 8), ('val', 4)):
        for label in ('ant', 'bee', 'cat'):
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f'{i}.png')
    return str(root)


def run(argv):
    return utils.exit_code(train_imagenet.main, argv)


def test_two_processes_keep_the_same_weights(folder, tmp_path):
    save = tmp_path / 'run'
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         os.path.join(HERE, 'train_imagenet.py'), *TINY, '--data', folder, '--epochs', '2',
         '--save', str(save)],
        check=False, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sums = dict(re.findall(r'rank (\d) weights_sha256=([0-9a-f]{64})', proc.stdout))
    assert set(sums) == {'0', '1'} and sums['0'] == sums['1']
    ckpt = torch.load(save / 'checkpoint.pt', weights_only=False)
    assert ckpt['epoch'] == 2 and train_imagenet.state_checksum(ckpt['model']) == sums['0']
    assert re.search(r'^final top1_error=\d+\.\d\d top5_error=\d+\.\d\d params_M=\d+\.\d\d macs_M=\d+\.\d$',
                     proc.stdout, re.MULTILINE)
    log = (save / 'log.txt').read_text()
    # 2 processes x 4 images: lr 0.25 scaled to the global batch of 8; 24 images / 8 = 3 steps an epoch
    assert 'global batch 8; lr 0.00390625 (= 0.25 x 8 / 512)' in log
    assert log.count('epoch 2/2') == 1  # rank 0 alone logs
    result = json.loads((save / 'result.json').read_text())
    assert result['world_size'] == 2 and result['num_classes'] == 3 and result['weights_sha256'] == sums['0']


def test_resume_reproduces_the_run_and_macs_are_checked(folder, tmp_path, monkeypatch, capsys):
    args = TINY + ['--data', folder, '--epochs', '2']
    monkeypatch.setattr(train_imagenet, 'MOBILE_MACS', 1e6)  # the tiny network is over a 1M budget
    assert run(args + ['--save', str(tmp_path / 'full')]) == 0
    out = capsys.readouterr().out
    assert "multiply-adds exceed the mobile setting's 1M" in out
    full_sum = re.findall(r'rank 0 weights_sha256=(\w+)', out)
    real_save = runs.save_checkpoint
    # the process dies right after the first epoch's checkpoint
    monkeypatch.setattr(runs, 'save_checkpoint', die_after())
    assert run(args + ['--save', str(tmp_path / 'killed')]) == 130
    monkeypatch.setattr(runs, 'save_checkpoint', real_save)
    assert run(args + ['--save', str(tmp_path / 'killed'), '--resume']) == 0
    resumed_sum = re.findall(r'rank 0 weights_sha256=(\w+)', capsys.readouterr().out)
    assert len(full_sum) == len(resumed_sum) == 1 and full_sum == resumed_sum
    full, resumed = (json.loads((tmp_path / d / 'result.json').read_text()) for d in ('full', 'killed'))
    assert full.pop('seconds') > 0 and resumed.pop('seconds') > 0
    assert full == resumed
    assert full['dataset'] == 'imagenet' and full['precision'] == 'fp32' and full['device'] == 'cpu'
    assert full['seed'] == 0 and full['epochs'] == 2 and full['processes'] == 1 and full['device_name']
    assert (tmp_path / 'full' / 'genotype.json').exists()


@pytest.mark.parametrize('missing', ['train', 'val'])
def test_missing_split_is_named(folder, tmp_path, missing, capsys):
    data = tmp_path / 'data'
    data.mkdir()
    os.symlink(os.path.join(folder, 'val' if missing == 'train' else 'train'),
               data / ('val' if missing == 'train' else 'train'))
    assert run(TINY + ['--data', str(data), '--save', str(tmp_path / 'run')]) == 2
    err = capsys.readouterr().err
    assert f'no {missing}/ folder in {data}' in err and 'ImageFolder' in err


def test_random_arch_needs_an_integer_seed(folder, tmp_path, capsys):
    assert run(TINY[:-2] + ['--arch', 'random:x', '--data', folder, '--save', str(tmp_path / 'run')]) == 2
    assert "--arch random:x: the seed 'x' is not an integer" in capsys.readouterr().err


def test_random_arch_trains_and_is_saved(folder, tmp_path):
    import genotypes
    save = tmp_path / 'run'
    assert run(TINY[:-2] + ['--arch', 'random:2', '--data', folder, '--epochs', '1', '--save', str(save)]) == 0
    assert genotypes.load(genotype_file=str(save / 'genotype.json')) == genotypes.random_genotype(2)
    assert json.loads((save / 'result.json').read_text())['arch'] == 'random:2'
# ---------------------------------------------------------------------------------------------------------
# Unreadable images are skipped, counted, and stop the run only past datasets.MAX_UNREADABLE_SHARE


@pytest.fixture(scope='module')
def damaged_folder(tmp_path_factory):
    """2 classes x 4 training images (one of them a truncated JPEG) and 2 validation images each."""
    root = tmp_path_factory.mktemp('damaged')
    rng = np.random.default_rng(1)
    for split, n in (('train', 4), ('val', 2)):
        for label in ('ant', 'bee'):
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                    root / split / label / f'{i}.jpg')
    bad = root / 'train' / 'bee' / '2.jpg'
    bad.write_bytes(bad.read_bytes()[:40])  # a copy cut short
    return root


def test_an_unreadable_image_falls_back_to_the_next_and_is_counted_once(damaged_folder):
    data = datasets.SafeImageFolder(str(damaged_folder / 'train'), max_share=0.2)  # 1 of 8 is within 20%
    bad = next(i for i, (path, _) in enumerate(data.samples) if path.endswith(os.path.join('bee', '2.jpg')))
    with pytest.warns(datasets.UnreadableImageWarning, match='bee'):
        image, label = data[bad]
    assert np.array_equal(np.asarray(image), np.asarray(data[bad + 1][0])) and label == data[bad + 1][1]
    data[bad]  # the same file again: still one distinct unreadable image
    assert data.skipped == 1 and data.skipped_files() == [str(damaged_folder / 'train' / 'bee' / '2.jpg')]
    strict = datasets.SafeImageFolder(str(damaged_folder / 'train'), max_share=0.1)
    with pytest.raises(datasets.TooManyUnreadable, match=r'1 of the 8 images under .* cannot be read'), \
            warnings.catch_warnings():
        warnings.simplefilter('ignore')
        strict[bad]


@pytest.mark.filterwarnings('ignore::datasets.UnreadableImageWarning')
def test_a_corrupt_jpeg_is_skipped_and_counted_in_the_epoch_summary(damaged_folder, tmp_path, monkeypatch,
                                                                     capsys):
    args = TINY + ['--data', str(damaged_folder), '--epochs', '1', '--save', str(tmp_path / 'run')]
    monkeypatch.setattr(datasets, 'MAX_UNREADABLE_SHARE', 0.2)  # 1 of 8 training images is within 20%
    assert run(args) == 0
    out = capsys.readouterr().out
    assert 'unreadable images skipped so far: 1 train, 0 val' in out
    assert json.loads((tmp_path / 'run' / 'metrics.jsonl').read_text())['skipped_train'] == 1
    assert 'done in' in out and 'its files, in' in out

    # at the default 1%, one unreadable image in 8 stops the run, also from a loader's worker process
    monkeypatch.undo()
    assert run(args[:args.index('--workers')] + ['--workers', '1'] + args[args.index('--workers') + 2:]
               + ['--save', str(tmp_path / 'stopped')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: 1 of the 8 images under ') and err.count('\n') == 1
    assert os.path.join('bee', '2.jpg') in err
