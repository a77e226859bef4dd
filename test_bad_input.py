"""Bad input, every script: one sentence on stderr, exit code 2, no traceback (issue 13).

Every numeric flag at 0, negative and absurd; every path flag at a missing path, a file where a folder
belongs, a folder where a file belongs, and another script's checkpoint. Each case must be refused before a
network is built (the constructors fail the test if called), so the whole sweep stays cheap; `model=True`
marks the few refusals that need the network or the data first.
"""

import numpy as np
import pytest
import torch
from PIL import Image

import bench_search
import model
import model_search
import runs
import teacher
import train_cifar
import train_imagenet
import train_search
import utils
import visualize

SCRIPTS = {'search': train_search, 'cifar': train_cifar, 'imagenet': train_imagenet, 'teacher': teacher,
           'bench': bench_search, 'visualize': visualize}
BASE = {
    'search': ['--dataset', 'synthetic', '--device', 'cpu', '--workers', '0', '--layers', '3', '--init_channels',
               '4', '--batch_size', '8', '--synthetic_size', '32', '--lambda_at', '0', '--save', '{tmp}/run'],
    'cifar': ['--dataset', 'synthetic', '--device', 'cpu', '--workers', '0', '--layers', '3', '--init_channels',
              '4', '--batch_size', '8', '--synthetic_size', '32', '--save', '{tmp}/run'],
    'imagenet': ['--device', 'cpu', '--workers', '0', '--layers', '3', '--init_channels', '4', '--batch_size',
                 '2', '--data', '{imagenet}', '--save', '{tmp}/run'],
    'teacher': ['--dataset', 'synthetic', '--device', 'cpu', '--workers', '0', '--depth', '11', '--alpha', '12',
                '--batch_size', '8', '--synthetic_size', '32', '--save', '{tmp}/run'],
    'bench': ['--device', 'cpu', '--layers', '3', '--init_channels', '4', '--batch_size', '2', '--teacher_depth',
              '11', '--iters', '1', '--warmup', '0', '--retrain_batch_size', '0'],
    'visualize': [],
}


def case(script, args, *words, model=False):
    name = f'{script} {" ".join(args)}'.replace('{', '').replace('}', '')
    return pytest.param(script, args, words, model, id=name)


NUMBERS = [
    # flags every training script shares
    *[case(s, ['--learning_rate', v], f'--learning_rate must be at least 0, got {v}')
      for s in ('search', 'cifar', 'imagenet', 'teacher') for v in ('-0.1', 'nan')],
    *[case(s, ['--momentum', v], '--momentum must be in [0, 1)', 'diverges')
      for s in ('search', 'cifar', 'imagenet', 'teacher') for v in ('-0.5', '1', '1.5')],
    *[case(s, ['--weight_decay', '-1'], '--weight_decay must be at least 0')
      for s in ('search', 'cifar', 'imagenet', 'teacher')],
    *[case(s, ['--epochs', v], f'--epochs must be at least 1, got {v}')
      for s in ('search', 'cifar', 'imagenet', 'teacher') for v in ('0', '-3')],
    *[case(s, ['--batch_size', v], f'--batch_size must be at least 1, got {v}')
      for s in ('search', 'cifar', 'imagenet', 'teacher') for v in ('0', '-8')],
    case('search', ['--batch_size', '1000000'], '--batch_size 1000000 is more than the 16 images'),
    case('cifar', ['--batch_size', '1000000'], '--batch_size 1000000 is more than the 32 training images'),
    case('teacher', ['--batch_size', '1000000'], '--batch_size 1000000 is more than the 32'),
    case('imagenet', ['--batch_size', '1000000'], 'make no batch of 1000000', model=True),
    *[case(s, ['--workers', v], '--workers must be in [0, ', f'got {v}')
      for s in ('search', 'cifar', 'imagenet', 'teacher') for v in ('-1', '100000')],
    *[case(s, ['--seed', v], '--seed must be in [0, 1000000]')
      for s in ('search', 'cifar', 'imagenet', 'teacher') for v in ('-1', '1000000000000')],
    *[case(s, ['--report_freq', '-1'], '--report_freq must be at least 0', '0 turns the progress lines off')
      for s in ('search', 'cifar', 'imagenet', 'teacher')],
    *[case(s, ['--gpu', '-1'], '--gpu must be at least 0') for s in ('search', 'cifar', 'teacher')],
    *[case(s, ['--synthetic_size', v], '--synthetic_size must be in [1, 100000]')
      for s in ('search', 'cifar', 'teacher') for v in ('0', '1000000000')],
    *[case(s, ['--grad_clip', '-1'], '--grad_clip must be at least 0', '0 turns clipping off')
      for s in ('search', 'cifar', 'imagenet')],
    *[case(s, ['--image_size', v], '--image_size applies to --dataset folder only')
      for s in ('search', 'cifar', 'teacher') for v in ('-4', '64')],
    # network sizes
    *[case(s, ['--layers', v], '--layers must be in [3, 100]', 'two reduction cells')
      for s in ('search', 'cifar', 'imagenet', 'bench') for v in ('-1', '1', '2', '1000')],
    *[case(s, ['--init_channels', v], '--init_channels must be in [1, 1024]')
      for s in ('search', 'cifar', 'imagenet', 'bench') for v in ('0', '100000')],
    # train_search.py
    case('search', ['--arch_learning_rate', '-0.1'], '--arch_learning_rate must be at least 0'),
    case('search', ['--arch_weight_decay', '-1'], '--arch_weight_decay must be at least 0'),
    case('search', ['--learning_rate_min', '-1'], '--learning_rate_min must be at least 0'),
    case('search', ['--learning_rate', '0.01', '--learning_rate_min', '0.1'], '--learning_rate_min 0.1 is above'),
    *[case('search', ['--train_portion', v], '--train_portion must be in (0, 1)', f'got {v}')
      for v in ('0', '1', '1.5', '-0.5')],
    case('search', ['--lambda_at', '-1'], '--lambda_at must be at least 0'),
    case('search', ['--lambda_at', 'inf'], '--lambda_at must be at least 0, got inf'),
    # train_cifar.py
    case('cifar', ['--auxiliary_weight', '-1'], '--auxiliary_weight must be at least 0'),
    case('cifar', ['--cutout_length', '-16'], '--cutout_length must be at least 0'),
    *[case('cifar', ['--drop_path_prob', v], '--drop_path_prob must be in [0, 1)') for v in ('1', '-0.1')],
    # train_imagenet.py
    case('imagenet', ['--warmup_epochs', '-1'], '--warmup_epochs must be at least 0'),
    *[case('imagenet', ['--label_smooth', v], '--label_smooth must be in [0, 1]') for v in ('1.5', '-0.1')],
    # teacher.py
    *[case('teacher', ['--depth', v], f'--depth {v} does not fit a bottleneck PyramidNet') for v in ('12', '-7')],
    case('teacher', ['--depth', '100001'], '--depth must be at most 1000'),
    *[case('teacher', ['--alpha', v], '--alpha must be in [0, 1000]') for v in ('-1', '1e9')],
    *[case('teacher', ['--lr_milestones', v], '--lr_milestones must be at least 1') for v in ('0', '-5')],
    *[case('teacher', ['--lr_gamma', v], '--lr_gamma must be above 0') for v in ('0', '-0.1')],
    # bench_search.py
    *[case('bench', ['--iters', v], '--iters must be at least 1') for v in ('0', '-1')],
    case('bench', ['--warmup', '-1'], '--warmup must be at least 0'),
    case('bench', ['--batch_size', '4', '0'], '--batch_size must be at least 1, got 0'),
    case('bench', ['--retrain_batch_size', '-1'], '--retrain_batch_size must be at least 0'),
    case('bench', ['--teacher_depth', '12'], '--teacher_depth 12 does not fit'),
    case('bench', ['--teacher_depth', '100000'], '--teacher_depth must be at most 1000'),
]

PATHS = [
    # --save: a file where the folder belongs
    *[case(s, ['--save', '{file}'], '--save {file} is a file, but it must be a folder')
      for s in ('search', 'cifar', 'imagenet', 'teacher')],
    *[case(s, ['--save', '{file}/sub'], '--save {file}/sub cannot be made: {file} is a file')
      for s in ('search', 'cifar', 'teacher')],
    case('teacher', ['--save', '{tmp}/teacher.pt'], 'names a file, but --save is a folder', 'drop the .pt'),
    # --resume: missing, a folder without a checkpoint, a damaged file, another script's checkpoint
    *[case(s, ['--resume', '{tmp}/nothing/checkpoint.pt'], 'does not exist', 'drop --resume')
      for s in ('search', 'cifar', 'imagenet', 'teacher')],
    *[case(s, ['--resume', '{folder}'], 'is a folder without checkpoint.pt')
      for s in ('search', 'cifar', 'teacher')],
    *[case(s, ['--resume', '{garbage}'], 'cannot be read', 'damaged') for s in ('search', 'cifar', 'teacher')],
    *[case(s, ['--resume', '{killed}/checkpoint.pt'], 'stopped before it finished its first checkpoint',
           'without --resume') for s in ('search', 'cifar', 'teacher')],
    case('search', ['--save', '{killed}', '--resume'], 'stopped before it finished its first checkpoint'),
    case('search', ['--resume', '{teacher_ckpt}'],
         "is a checkpoint of teacher.py (a teacher's training), not of train_search.py"),
    case('search', ['--resume', '{cifar_ckpt}'],
         'is a checkpoint of train_cifar.py (a CIFAR retraining), not of train_search.py'),
    case('search', ['--resume', '{foreign_ckpt}'], 'is not a checkpoint of this project'),
    case('cifar', ['--resume', '{search_ckpt}'],
         'is a checkpoint of train_search.py (a search), not of train_cifar.py'),
    case('cifar', ['--resume', '{teacher_ckpt}'],
         "is a checkpoint of teacher.py (a teacher's training), not of train_cifar.py"),
    case('cifar', ['--resume', '{imagenet_ckpt}'],
         'is a checkpoint of train_imagenet.py (an ImageNet retraining), not of train_cifar.py'),
    case('imagenet', ['--resume', '{cifar_ckpt}'],
         'is a checkpoint of train_cifar.py (a CIFAR retraining), not of train_imagenet.py'),
    case('teacher', ['--resume', '{search_ckpt}'],
         'is a checkpoint of train_search.py (a search), not of teacher.py'),
    # --data: a file, nothing there, damaged CIFAR files
    case('search', ['--dataset', 'cifar10', '--data', '{file}'], '--data {file} is a file', 'cifar-10-batches-py'),
    case('cifar', ['--dataset', 'cifar100', '--data', '{file}'], '--data {file} is a file', 'cifar-100-python'),
    case('teacher', ['--dataset', 'cifar10', '--data', '{file}'], '--data {file} is a file'),
    case('imagenet', ['--data', '{file}'], '--data {file} is a file', 'train/ and val/'),
    case('imagenet', ['--data', '{tmp}/nothing'], 'no train/ folder in'),
    case('search', ['--dataset', 'cifar10', '--data', '{tmp}/nothing', '--no_download'], 'no CIFAR-10 data in',
         '--no_download forbids', 'download=True'),
    case('search', ['--dataset', 'cifar10', '--data', '{corrupt}', '--no_download'], 'CIFAR-10 files in',
         'are damaged or incomplete', 'delete that folder and run again'),
    case('cifar', ['--dataset', 'cifar100', '--data', '{corrupt}', '--no_download'], 'CIFAR-100 files in',
         'damaged or incomplete'),
    # --teacher: missing, a folder without a checkpoint, another script's checkpoint, a damaged file
    case('search', ['--lambda_at', '1000', '--teacher', '{tmp}/none.pt'], 'no teacher checkpoint at',
         'teacher.py'),
    case('search', ['--lambda_at', '1000', '--teacher', '{folder}'], 'no teacher checkpoint at'),
    case('search', ['--lambda_at', '1000', '--teacher', '{search_ckpt}'], 'is a checkpoint of train_search.py'),
    case('search', ['--lambda_at', '1000', '--teacher', '{garbage}'], 'cannot be read'),
    # --genotype_file: missing, a folder, a checkpoint
    *[case(s, ['--genotype_file', '{tmp}/none.json'], 'does not exist') for s in ('cifar', 'imagenet')],
    *[case(s, ['--genotype_file', '{folder}'], 'is a folder; pass the genotype.json in it')
      for s in ('cifar', 'imagenet')],
    *[case(s, ['--genotype_file', '{search_ckpt}'], 'is a checkpoint of train_search.py, not a genotype')
      for s in ('cifar', 'imagenet')],
    # visualize.py: a checkpoint, a folder without a search, an --out that is a file
    case('visualize', ['{search_ckpt}'], 'is a checkpoint of train_search.py, not a genotype'),
    case('visualize', ['{folder}'], 'is a folder without genotype.json'),
    case('visualize', ['{tmp}/none.json'], 'does not exist'),
    case('visualize', ['DARTS_V2', '--out', '{file}'], '--out {file} is a file'),
]


@pytest.fixture(scope='module')
def paths(tmp_path_factory):
    """Files and folders the cases point at: a plain file, an empty folder, a damaged checkpoint, one
    checkpoint of each script (the older teacher and cifar ones without their 'script' entry), a run killed
    while it wrote its first checkpoint, damaged CIFAR files, a tiny ImageFolder."""
    root = tmp_path_factory.mktemp('paths')
    (root / 'file').write_text('not a folder\n')
    (root / 'folder').mkdir()
    (root / 'garbage.pt').write_bytes(b'not a checkpoint')
    for name, state in (('search', {'epoch': 1, 'settings': {}, 'script': 'train_search.py', 'args': {}}),
                        ('teacher', {'arch': 'pyramidnet', 'config': {}, 'dataset': 'cifar10', 'state_dict': {}}),
                        ('cifar', {'epoch': 1, 'genotype': '{}', 'synthetic_size': 512, 'dataset': 'cifar10'}),
                        ('imagenet', {'epoch': 1, 'global_batch': 512, 'script': 'train_imagenet.py'}),
                        ('foreign', {'weights': 1})):
        runs.save_checkpoint(state, str(root / f'{name}.pt'))
    (root / 'killed').mkdir()
    (root / 'killed' / 'log.txt').write_text('args = ...\n')
    (root / 'killed' / 'checkpoint.pt.tmp').write_bytes(b'PK half a checkpoint')
    for folder in ('cifar-10-batches-py', 'cifar-100-python'):
        (root / 'corrupt' / folder).mkdir(parents=True)
        (root / 'corrupt' / folder / 'data_batch_1').write_bytes(b'truncated')
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for label in ('ant', 'bee'):
            (root / 'imagenet' / split / label).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                root / 'imagenet' / split / label / '0.png')
    return {'file': root / 'file', 'folder': root / 'folder', 'garbage': root / 'garbage.pt',
            'search_ckpt': root / 'search.pt', 'teacher_ckpt': root / 'teacher.pt',
            'cifar_ckpt': root / 'cifar.pt',
            'imagenet_ckpt': root / 'imagenet.pt', 'foreign_ckpt': root / 'foreign.pt', 'killed': root / 'killed',
            'corrupt': root / 'corrupt', 'imagenet': root / 'imagenet'}


@pytest.fixture
def no_networks(monkeypatch):
    """Building a network fails the test: bad input must be refused before."""
    def built(*args, **kwargs):
        raise AssertionError('a network was built before the bad input was refused')

    for cls in (model_search.Network, model.NetworkCIFAR, model.NetworkImageNet, teacher.PyramidNet,
                teacher.ResNet18):
        monkeypatch.setattr(cls, '__init__', built)


@pytest.mark.parametrize('script, args, words, builds_model', NUMBERS + PATHS)
def test_bad_input_is_one_sentence(script, args, words, builds_model, paths, tmp_path, capsys, request):
    if not builds_model:
        request.getfixturevalue('no_networks')
    values = {**{k: str(v) for k, v in paths.items()}, 'tmp': str(tmp_path)}
    argv = [a.format(**values) for a in BASE[script] + args]
    code = utils.exit_code(SCRIPTS[script].main, argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith('error: ') and err.count('\n') == 1 and 'Traceback' not in err, err
    for w in words:
        assert w.format(**values) in err, (w, err)


def test_every_numeric_flag_is_covered():
    """Each numeric flag of every script has a range (utils.FLAG_RANGES or the script's own)."""
    covered = set(utils.FLAG_RANGES) | {'train_portion', 'warmup_epochs', 'label_smooth', 'depth', 'alpha',
                                        'lr_milestones', 'lr_gamma', 'iters', 'warmup', 'retrain_batch_size',
                                        'teacher_depth', 'image_size', 'alive', 'adwp_ranking', 'adwp_synthetic_size',
                                        'adwp_layers', 'adwp_channels', 'adwp_hyper_epochs', 'adwp_scratch_epochs',
                                        'adwp_batch_size', 'adwp_seed', 'count_batch', 'top'}  # image_size: datasets.check_image_size
    parsers = {'search': train_search.parse_args, 'cifar': train_cifar.build_parser().parse_args,
               'imagenet': train_imagenet.build_parser().parse_args, 'teacher': teacher.parse_args,
               'bench': bench_search.parse_args}
    for name, parse in parsers.items():
        args = vars(parse([]))
        numeric = {k for k, v in args.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        numeric |= {k for k, v in args.items() if isinstance(v, list) and v and isinstance(v[0], (int, float))}
        assert numeric <= covered, (name, numeric - covered)


@pytest.mark.parametrize('error', [torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 80.00 GiB'),
                                   RuntimeError('[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: '
                                                "can't allocate memory: you tried to allocate 4000000000000 bytes")])
def test_running_out_of_memory_is_one_sentence(error, capsys):
    def main():
        raise error

    with pytest.raises(SystemExit) as e:
        utils.run_main(main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1
    assert err.startswith('error: the run ran out of memory (') and 'smaller --batch_size' in err
