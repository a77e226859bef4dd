"""train_search.py end to end on synthetic data (CPU): outputs, exact resume after a kill, the second-order
step against exact autograd, and the one-sentence errors."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import darts
import genotypes
import runs
import teacher
import train_search
import utils
from genotypes import PRIMITIVES
from model_search_fast import Network

HERE = os.path.dirname(os.path.abspath(__file__))
# the smallest proxy network that keeps three stages (32/16/8 px), and a 2-step epoch
TINY = ['--dataset', 'synthetic', '--device', 'cpu', '--workers', '0', '--layers', '3', '--init_channels', '4',
        '--batch_size', '8', '--synthetic_size', '32', '--report_freq', '1']


def save_tiny_teacher(path, dataset='synthetic', num_classes=10):
    torch.manual_seed(0)
    model = teacher.PyramidNet(depth=11, alpha=12, num_classes=num_classes, bottleneck=True)
    teacher.save_teacher(model, str(path), dataset)
    return str(path)


@pytest.fixture(scope='module')
def tiny_teacher(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp('teacher') / 'tiny.pt')


def run(args):
    """main() in-process as the command line runs it; returns the exit code (0 when it returns)."""
    return utils.exit_code(train_search.main, args)


def read_log(save):
    with open(os.path.join(save, 'search_log.jsonl')) as f:
        return [json.loads(line) for line in f]


# The kill-and-resume harness the end-to-end tests of every script share.
TIMES = ('seconds', 'cpu_seconds')  # differ between two runs of the same search


def log_without_times(save):
    """The search log's records without their times: what two runs of one search must log alike."""
    return [{k: v for k, v in r.items() if k not in TIMES} for r in read_log(save)]


def die_after(epoch=None):
    """runs.save_checkpoint as a kill right after a checkpoint leaves it: it writes the checkpoint of `epoch`
    (None: of the first epoch it writes), then stops the run (KeyboardInterrupt, exit code 130)."""
    save = runs.save_checkpoint

    def save_then_die(state, path):
        save(state, path)
        if epoch is None or state['epoch'] == epoch:
            raise KeyboardInterrupt
    return save_then_die


def kill_and_resume(monkeypatch, main, args, epoch=None):
    """Run `args` (which name --save) killed right after the checkpoint of `epoch`, then resume it to the end."""
    with monkeypatch.context() as m:
        m.setattr(runs, 'save_checkpoint', die_after(epoch))
        assert utils.exit_code(main, args) == 130
    assert utils.exit_code(main, args + ['--resume']) == 0


def assert_bitwise(a, b):
    """a and b (tensors, or dicts, lists and tuples of them and of plain values) are equal to the bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_bitwise(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_bitwise(x, y)
    else:
        assert a == b or (isinstance(a, float) and np.isnan(a) and np.isnan(b))


def fails_with(capsys, args, *words):
    assert run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1, err
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.fixture(scope='module')
def searched(tmp_path_factory, tiny_teacher):
    """One epoch of attention-guided search at a tiny size (layers 5, 8 channels, batch 16)."""
    save = tmp_path_factory.mktemp('search')
    args = ['--dataset', 'synthetic', '--device', 'cpu', '--workers', '0', '--layers', '5',
            '--init_channels', '8', '--batch_size', '16', '--synthetic_size', '128', '--epochs', '1',
            '--teacher', tiny_teacher, '--lambda_at', '1000', '--save', save]
    assert run(args) == 0
    return save, args


def test_search_writes_genotype_log_and_checkpoint(searched):
    save, _ = searched
    g = genotypes.load(genotype_file=os.path.join(save, 'genotype.json'))
    assert not genotypes.is_classic(g.normal)
    records = read_log(save)
    assert len(records) == 1
    r = records[0]
    assert r['epoch'] == 1 and r['primitives'] == PRIMITIVES
    for key in ('train_acc', 'val_acc', 'train_ce', 'val_ce', 'lr', 'seconds'):
        assert isinstance(r[key], float), key
    assert r['train_at'] > 0 and r['val_at'] > 0  # the teacher's attention maps were used at both levels
    assert genotypes.from_json(json.dumps(r['genotype'])) == g
    for name in ('alphas_normal', 'alphas_reduce'):
        rows = torch.tensor(r[name])
        assert rows.shape == (18, 11)
        torch.testing.assert_close(rows.sum(1), torch.ones(18, dtype=rows.dtype), atol=1e-5, rtol=0)
    ckpt = runs.load_checkpoint(os.path.join(save, 'checkpoint.pt'))
    assert ckpt['epoch'] == 1 and ckpt['settings']['lambda_at'] == 1000
    assert {'optimizer', 'method', 'scheduler'} <= set(ckpt) and 'arch_optimizer' in ckpt['method']
    # A moved away from its start (the network is built right after seeding with --seed 2), and the
    # genotype is the one A derives
    utils.set_seed(2)
    model = Network(8, 10, 5, fast=ckpt['settings']['fast'])
    start = [a.detach().clone() for a in model.arch_parameters()]
    model.load_state_dict(ckpt['model'])
    assert all((a - s).abs().min() > 0 for a, s in zip(model.arch_parameters(), start))
    assert genotypes.validate(model.genotype()) == g
    torch.testing.assert_close(torch.tensor(r['alphas_normal'], dtype=torch.float32),
                               torch.softmax(model.alphas_normal.detach(), -1), atol=1e-6, rtol=0)


def test_existing_checkpoint_needs_resume(searched, capsys):
    save, args = searched
    fails_with(capsys, args, str(save), '--resume', 'another --save')


def test_resume_with_other_settings_names_both(searched, capsys):
    _, args = searched
    fails_with(capsys, args[:args.index('--layers')] + ['--layers', '6'] + args[args.index('--layers') + 2:]
               + ['--resume'], 'layers', '5', '6')
    fails_with(capsys, args + ['--resume', '--space', 'darts', '--lambda_at', '0'], 'nos', 'darts')


def test_killed_search_resumes_exactly(tmp_path, tiny_teacher):
    """A 2-epoch search killed during epoch 2 and resumed ends with the A and genotype of an
    uninterrupted run."""
    args = TINY + ['--epochs', '2', '--teacher', tiny_teacher, '--lambda_at', '1000']
    straight = tmp_path / 'straight'
    assert run(args + ['--save', straight]) == 0

    killed = tmp_path / 'killed'
    ckpt_path = killed / 'checkpoint.pt'
    stderr = tmp_path / 'killed.stderr'
    with open(stderr, 'w') as err:
        proc = subprocess.Popen([sys.executable, 'train_search.py', *map(str, args), '--save', str(killed)],
                                cwd=HERE, stdout=subprocess.DEVNULL, stderr=err)
    try:
        # Wait for the state the test needs, however slow the machine: the epoch-1 checkpoint (written
        # atomically, so it exists only whole) or the end of the process. No clock.
        while not ckpt_path.exists() and proc.poll() is None:
            time.sleep(0.02)
        proc.kill()  # SIGKILL: no clean-up, as a pre-empted job
    finally:
        proc.wait()
    assert ckpt_path.exists(), f'the search ended before its first checkpoint: {stderr.read_text()}'
    assert runs.load_checkpoint(str(ckpt_path))['epoch'] == 1, 'the run was not killed during epoch 2'
    assert run(args + ['--save', killed, '--resume']) == 0

    a = runs.load_checkpoint(str(straight / 'checkpoint.pt'))
    b = runs.load_checkpoint(str(ckpt_path))
    assert a['epoch'] == b['epoch'] == 2
    for name in ('alphas_normal', 'alphas_reduce'):
        assert torch.equal(a['model'][name], b['model'][name]), name
    assert (straight / 'genotype.json').read_text() == (killed / 'genotype.json').read_text()
    logs = [read_log(d) for d in (straight, killed)]
    assert [r['epoch'] for r in logs[1]] == [1, 2]
    assert [r['alphas_normal'] for r in logs[0]] == [r['alphas_normal'] for r in logs[1]]


def test_unrolled_search_runs_with_attention_transfer(tmp_path, tiny_teacher):
    args = TINY + ['--synthetic_size', '16', '--epochs', '1', '--unrolled', '--teacher', tiny_teacher,
                   '--save', tmp_path]
    assert run(args) == 0
    (record,) = read_log(tmp_path)
    assert record['val_at'] > 0 and record['train_at'] > 0
    assert runs.load_checkpoint(str(tmp_path / 'checkpoint.pt'))['settings']['unrolled'] is True


def test_darts_space_search_derives_a_classic_genotype(tmp_path):
    assert run(TINY + ['--synthetic_size', '16', '--epochs', '1', '--space', 'darts', '--lambda_at', '0',
                       '--save', tmp_path]) == 0
    g = genotypes.load(genotype_file=str(tmp_path / 'genotype.json'))
    assert genotypes.is_classic(g.normal) and genotypes.is_classic(g.reduce)
    (record,) = read_log(tmp_path)
    assert record['train_at'] == 0 and len(record['alphas_normal']) == 14


def test_second_order_gradient_matches_exact_autograd(monkeypatch):
    """DARTS's finite-difference hypergradient (with L_AT in both levels) against double backward.

    The finite difference steps the weights by R = 0.01 / |v|; where that crosses a ReLU or max-pool
    kink, grad_A jumps and the difference quotient is off by jump / 2R (a property of DARTS's method,
    not of this code). So this check runs on a smooth twin of the network: softplus for ReLU,
    average for max pooling.
    """
    avg_pool2d = F.avg_pool2d
    monkeypatch.setattr(F, 'relu', lambda x, inplace=False: F.softplus(x))
    monkeypatch.setattr(F, 'max_pool2d', lambda x, kernel_size, stride=None, padding=0, dilation=1,
                        ceil_mode=False, return_indices=False:
                        avg_pool2d(x, kernel_size, stride, padding, ceil_mode, False))
    torch.manual_seed(0)
    model = Network(4, 10, 3).double()
    with torch.no_grad():
        for a in model.arch_parameters():
            a.normal_(0, 0.5)
    xt, yt = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randint(10, (4,))
    xv, yv = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randint(10, (4,))
    tt = [torch.randn(4, 3, s, s, dtype=torch.float64) for s in (16, 8, 4)]
    tv = [torch.randn(4, 3, s, s, dtype=torch.float64) for s in (16, 8, 4)]
    lam, eta, wd = 10., 0.1, 3e-4
    optimizer = torch.optim.SGD(model.weights(), eta, momentum=0.9, weight_decay=wd)
    architect = darts.Architect(model, momentum=0.9, weight_decay=wd, arch_learning_rate=0.,
                                       arch_weight_decay=0., lambda_at=lam, unrolled=True)
    architect.unrolled_model.double()
    grads, _ = architect._unrolled_grads(xt, yt, tt, xv, yv, tv, eta, optimizer)

    names = [n for n, _ in model.named_parameters() if n not in ('alphas_normal', 'alphas_reduce')]
    weights, arch = model.weights(), model.arch_parameters()
    g = torch.autograd.grad(darts.search_loss(model, xt, yt, tt, lam)[0], weights, create_graph=True)
    unrolled = {n: w - eta * (gw + wd * w) for n, w, gw in zip(names, weights, g)}
    unrolled.update(alphas_normal=arch[0], alphas_reduce=arch[1])

    val_logits, val_stages = torch.func.functional_call(Stages(model), {f'net.{n}': v for n, v in unrolled.items()},
                                                        (xv,))
    val = F.cross_entropy(val_logits, yv) + lam * utils.attention_transfer_loss(val_stages, tv)
    exact = torch.autograd.grad(val, arch)
    for approx, ref in zip(grads, exact):
        torch.testing.assert_close(approx, ref, rtol=1e-3, atol=1e-5)


class Stages(torch.nn.Module):
    """forward = net.forward_stages, so torch.func.functional_call can swap in other parameters."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.forward_stages(x)


# ---------------------------------------------------------------------------------------------------------
# One-sentence errors


def test_missing_cifar_names_the_directory_and_both_ways_out(tmp_path, capsys):
    fails_with(capsys, ['--dataset', 'cifar10', '--data', tmp_path, '--device', 'cpu', '--lambda_at', '0',
                        '--no_download', '--save', tmp_path / 's'], str(tmp_path), 'download=True',
               '--dataset synthetic')


def test_missing_teacher_says_how_to_train_one_or_search_without(tmp_path, capsys):
    fails_with(capsys, TINY + ['--teacher', tmp_path / 'none.pt', '--save', tmp_path / 's'],
               'none.pt', 'python teacher.py', '--lambda_at 0')


def test_teacher_of_another_dataset_names_both(tmp_path, capsys):
    path = save_tiny_teacher(tmp_path / 'c100.pt', 'cifar100', 100)
    fails_with(capsys, TINY + ['--teacher', path, '--save', tmp_path / 's'], 'cifar100', 'synthetic')


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_gpu_without_cuda_suggests_device_cpu(tmp_path, capsys):
    args = [a for a in TINY if a not in ('--device', 'cpu')]
    fails_with(capsys, args + ['--lambda_at', '0', '--save', tmp_path], '--gpu 0', '--device cpu')


def test_bad_space_and_ops_list_the_valid_ones(tmp_path, capsys):
    fails_with(capsys, TINY + ['--space', 'enas', '--save', tmp_path], "'enas'", 'nos, darts')
    fails_with(capsys, TINY + ['--ops', 'attention', '--save', tmp_path], "'attention'", 'valid',
               'all', 'feature, feature+attention, feature+dynamic')
    fails_with(capsys, TINY + ['--space', 'darts', '--ops', 'feature', '--save', tmp_path], '--space nos')


def test_bad_method_and_at_levels_list_the_valid_ones(tmp_path, capsys):
    fails_with(capsys, TINY + ['--method', 'enas', '--save', tmp_path], "'enas'", 'darts')
    fails_with(capsys, TINY + ['--at_levels', 'arch', '--save', tmp_path], "'arch'", 'both, weights')


def test_distillation_only_uses_the_teacher_in_the_weight_step_alone(tmp_path, tiny_teacher):
    """Fig. 6's middle variant: L_AT in Eq. 12 (weights) but not in Eq. 13 (A)."""
    assert run(TINY + ['--epochs', '1', '--teacher', tiny_teacher, '--at_levels', 'weights',
                       '--save', tmp_path]) == 0
    r = read_log(tmp_path)[0]
    assert r['train_at'] > 0 and r['val_at'] == 0
    assert r['method'] == 'darts' and len(r['importance']['normal']) == 18
    with open(tmp_path / 'result.json') as f:
        result = json.load(f)
    assert result['kind'] == 'search' and result['epochs'] == 1 and result['settings']['at_levels'] == 'weights'
    assert result['wall_seconds'] == pytest.approx(r['seconds'], abs=0.1) and 'gpu_hours' not in result
    # on the CPU the cost is CPU time, the sum of the epochs' own (not the wall-clock time)
    assert result['cpu_time_seconds'] == pytest.approx(r['cpu_seconds'], abs=0.1) and r['cpu_seconds'] > 0
    assert result['cpu_time_hours'] == pytest.approx(r['cpu_seconds'] / 3600, abs=1e-4)


def test_method_defaults_fill_only_flags_not_given():
    args = train_search.parse_args(['--epochs', '7'])
    assert args.epochs == 7 and args.arch_learning_rate == 6e-4 and args.lambda_at == 1000
    assert args.learning_rate_min == 0.0


def test_tables_mark_pruned_ops_and_the_epoch_line_shows_what_was_measured():
    w = np.array([[0.1, 12.5, 0.0], [0.2, 0.25, 0.3]])
    alive = np.array([[1, 1, 0], [1, 0, 1]], bool)  # after this epoch's prune, which took row 1's b
    table = train_search.format_matrix('importance normal', w, ['a', 'b', 'c'], 'darts', alive, [(1, 'b')])
    assert table.splitlines() == ['importance normal (columns: a, b, c); -: pruned earlier, x: pruned now',
                                  '        0  0.100  12.500    -',
                                  '        1  0.200   0.250x  0.300']
    assert '-' not in train_search.format_matrix('m', w, ['a', 'b', 'c'], 'darts').split(')')[-1]
    stats = {'train_ce': 2.0, 'train_at': 0.0, 'train_acc': 50.0}
    extra = {'val_ce': 1.5, 'val_acc': 60.0, 'stages': [[0]]}  # AGNAS: the importance pass's figures
    assert train_search.epoch_summary(stats, extra, teacher=False) == 'train_ce 2  train_acc 50  val_ce 1.5  val_acc 60'
    assert train_search.epoch_summary(stats, {}, teacher=True) == 'train_ce 2  train_at 0  train_acc 50'


def test_debug_lines_only_with_debug(capsys):
    for rank, debug in ((0, False), (1, False), (0, True), (1, True)):
        logger = runs.get_logger(None, f'debug-test-{rank}-{debug}', enabled=rank == 0, debug=debug)
        logger.info('an info line')
        logger.debug(f'rank {rank} arch_sha256=abc')
        out = capsys.readouterr().out
        assert ('arch_sha256' in out) == debug and ('an info line' in out) == (rank == 0), (rank, debug, out)
