"""--dataset folder (issue 14): a tiny ImageFolder written here runs a teacher epoch, a search with that
teacher and a retraining epoch; the class count and the statistics against numpy; a resumed search keeps the
stored statistics; each bad input is one sentence."""
import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import runs
import teacher
import train_cifar
import train_search
import utils
from test_train_search import die_after

CLASSES = ('cat', 'dog', 'fox')
SIZE = 16  # pixels: written at the --image_size used, so the statistics need no resizing by hand
COMMON = ['--dataset', 'folder', '--image_size', SIZE, '--device', 'cpu', '--workers', '0', '--batch_size', '4',
          '--report_freq', '0']
SEARCH = COMMON + ['--layers', '3', '--init_channels', '4', '--epochs', '1']
TEACHER = COMMON + ['--depth', '11', '--alpha', '12', '--epochs', '1']
RETRAIN = COMMON + ['--layers', '3', '--init_channels', '4', '--epochs', '1', '--no_auxiliary']


def write_folder(root, per_class=(('train', 4), ('val', 2)), classes=CLASSES):
    """Small RGB PNGs, each class with its own tint."""
    rng = np.random.default_rng(0)
    for split, n in per_class:
        for c, name in enumerate(classes):
            os.makedirs(root / split / name)
            for i in range(n):
                pixels = rng.integers(0, 120, (SIZE, SIZE, 3)) + 60 * c * np.eye(3, dtype=int)[c]
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f'{i}.png')
    return root


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp('images'))


run = utils.exit_code  # (main, argv) -> the exit code the command line would give


def fails_with(capsys, main, args, *words):
    assert run(main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1, err
    for w in words:
        assert str(w) in err, (w, err)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_classes_and_statistics_match_a_hand_computation(data):
    assert datasets.num_classes('folder', str(data)) == 3
    assert teacher.default_teacher_path(datasets.dataset_name('folder', 'data/flowers/')) == os.path.join(
        'teachers', 'pyramidnet110_folder-flowers', 'checkpoint.pt')  # each folder its own default teacher
    pixels = np.stack([np.asarray(Image.open(data / 'train' / c / f'{i}.png'), dtype=np.float64) / 255
                       for c in CLASSES for i in range(4)])
    stats = datasets.folder_stats(str(data), SIZE)
    np.testing.assert_allclose(stats['mean'], pixels.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(stats['std'], pixels.std(axis=(0, 1, 2)), rtol=1e-6)
    assert stats['classes'] == list(CLASSES) and stats['images'] == stats['train_images'] == 12

    # the training images come interleaved, so both sides of the search split hold every class equally
    train = datasets.get_dataset('folder', str(data), train=True, image_size=SIZE, stats=stats)
    weights, arch = datasets.search_split(len(train), 0.5)
    assert [np.bincount([train.targets[i] for i in half]).tolist() for half in (weights, arch)] == [[2, 2, 2]] * 2
    x, y = train[0]
    assert x.shape == (3, SIZE, SIZE) and 0 <= y < 3
    test = datasets.get_dataset('folder', str(data), train=False, image_size=SIZE, stats=stats)
    assert len(test) == 6 and test.classes == list(CLASSES)


@pytest.fixture(scope='module')
def teacher_path(data, tmp_path_factory):
    save = tmp_path_factory.mktemp('teacher')
    assert run(teacher.main, TEACHER + ['--data', data, '--save', save]) == 0
    return save / 'checkpoint.pt'


def test_teacher_search_and_retraining_run_on_the_folder(data, teacher_path, tmp_path):
    state = runs.load_checkpoint(str(teacher_path))
    assert state['classes'] == list(CLASSES) and state['image_size'] == SIZE and state['config']['num_classes'] == 3
    stats = read_json(teacher_path.parent / 'data_stats.json')
    assert state['data_stats'] == stats == datasets.folder_stats(str(data), SIZE)

    search = tmp_path / 'search'
    assert run(train_search.main, SEARCH + ['--data', data, '--teacher', teacher_path, '--lambda_at', '1000',
                                            '--save', search]) == 0
    with open(search / 'search_log.jsonl') as f:
        record = json.loads(f.readline())
    assert record['train_at'] > 0  # the teacher's attention maps guided the search
    assert read_json(search / 'data_stats.json') == stats
    assert runs.load_checkpoint(str(search / 'checkpoint.pt'))['data_stats'] == stats

    retrain = tmp_path / 'retrain'
    assert run(train_cifar.main, RETRAIN + ['--data', data, '--genotype_file', search / 'genotype.json',
                                            '--save', retrain]) == 0
    result = read_json(retrain / 'result.json')
    assert result['dataset'] == 'folder' and 0 <= result['test_acc'] <= 100
    assert read_json(retrain / 'data_stats.json') == stats  # the retrained run normalises as the search did


def test_resumed_search_uses_the_stored_statistics(data, tmp_path, monkeypatch):
    args = SEARCH[:-1] + ['2', '--space', 'darts', '--data', data, '--lambda_at', '0', '--save', tmp_path]
    real_save = runs.save_checkpoint
    # the process dies right after the first epoch's checkpoint
    monkeypatch.setattr(runs, 'save_checkpoint', die_after())
    assert run(train_search.main, args) == 130
    monkeypatch.setattr(runs, 'save_checkpoint', real_save)
    stats = read_json(tmp_path / 'data_stats.json')
    os.remove(tmp_path / 'data_stats.json')

    def no_recomputing(*a, **k):
        raise AssertionError('a resumed run recomputed the statistics')

    monkeypatch.setattr(datasets, 'folder_stats', no_recomputing)
    assert run(train_search.main, args + ['--resume']) == 0
    assert read_json(tmp_path / 'data_stats.json') == stats  # written again, from the checkpoint
    ckpt = runs.load_checkpoint(str(tmp_path / 'checkpoint.pt'))
    assert ckpt['epoch'] == 2 and ckpt['data_stats'] == stats


def broken(tmp_path, data, how):
    root = tmp_path / 'data'
    shutil.copytree(data, root)
    if how == 'no train':
        shutil.rmtree(root / 'train')
    elif how == 'empty class':
        os.makedirs(root / 'train' / 'gnu')
        os.makedirs(root / 'val' / 'gnu')
    elif how == 'other val classes':
        os.rename(root / 'val' / 'fox', root / 'val' / 'wolf')
    elif how == 'unreadable':
        (root / 'train' / 'dog' / '1.png').write_bytes(b'not a png')
    return root


@pytest.mark.filterwarnings('ignore::datasets.UnreadableImageWarning')
@pytest.mark.parametrize('how,words', [
    ('no train', ['no train/ folder', 'PATH/train/CLASS/IMAGE']),
    ('empty class', [os.path.join('train', 'gnu'), 'holds no images']),
    ('other val classes', ['different classes', 'only in train/: fox', 'only in val/: wolf']),
    ('unreadable', ['1 of the 12 images', os.path.join('dog', '1.png'), '1%']),
])
def test_bad_folders_are_one_sentence(how, words, data, tmp_path, capsys):
    root = broken(tmp_path, data, how)
    fails_with(capsys, train_search.main, SEARCH + ['--data', root, '--lambda_at', '0', '--save', tmp_path / 's'],
               *words)


def test_bad_sizes_and_a_teacher_of_other_classes_are_refused(data, tmp_path, capsys):
    fails_with(capsys, train_search.main, ['--dataset', 'synthetic', '--image_size', '64', '--save', tmp_path],
               '--image_size applies to --dataset folder')
    fails_with(capsys, train_cifar.main, RETRAIN[:-1] + ['--data', data, '--save', tmp_path / 'r'], '--no_auxiliary')
    fails_with(capsys, train_cifar.main, RETRAIN + ['--image_size', '18', '--data', data], 'multiple of 4')

    torch.manual_seed(0)
    net = teacher.PyramidNet(depth=11, alpha=12, num_classes=3, bottleneck=True)
    path = tmp_path / 'other.pt'
    teacher.save_teacher(net, str(path), 'folder', classes=['ant', 'bee', 'cat'], image_size=SIZE)
    search = SEARCH + ['--data', data, '--lambda_at', '1000', '--teacher', path]
    fails_with(capsys, train_search.main, search + ['--save', tmp_path / 's1'], path, 'only in the teacher: ant, bee',
               'only in the data: dog, fox')
    teacher.save_teacher(net, str(path), 'folder', classes=list(CLASSES), image_size=32)
    fails_with(capsys, train_search.main, search + ['--save', tmp_path / 's2'], '32-pixel', '--image_size 16')


def test_unreadable_images_are_skipped_named_and_counted_across_workers(data, tmp_path, capsys):
    root = broken(tmp_path, data, 'unreadable') / 'train'
    bad = str(root / 'dog' / '1.png')
    folder = datasets.SafeImageFolder(str(root), max_share=0.5)
    index = [p for p, _ in folder.samples].index(bad)
    with pytest.warns(datasets.UnreadableImageWarning, match='dog'):
        image, target = folder[index]
    path, next_target = folder.samples[index + 1]  # the next image took its place
    assert target == next_target and np.array_equal(np.asarray(image), np.asarray(Image.open(path)))
    assert folder.skipped == 1 and folder.skipped_files() == [bad]

    # a worker process counts into the same shared memory; the main process logs it
    folder = datasets.SafeImageFolder(str(root), transform=lambda im: torch.zeros(1), max_share=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        batches = list(torch.utils.data.DataLoader(folder, batch_size=4, num_workers=1))
    assert sum(len(y) for _, y in batches) == 12 and folder.skipped == 1
    datasets.log_unreadable(torch.utils.data.Subset(folder, [0]), runs.get_logger(None, 'test_folder'))
    assert f'1 unreadable image(s) skipped so far (a run stops above 1%): {bad}' in capsys.readouterr().out

    # past the share, the worker's error reaches the main process as the one sentence
    folder = datasets.SafeImageFolder(str(root), transform=lambda im: torch.zeros(1))
    with pytest.raises(datasets.TooManyUnreadable) as e, warnings.catch_warnings():
        warnings.simplefilter('ignore')
        list(torch.utils.data.DataLoader(folder, batch_size=4, num_workers=1))
    assert str(e.value).startswith('1 of the 12 images') and '\n' not in str(e.value)
