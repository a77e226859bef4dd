"""train_search.py under torchrun on the CPU (gloo, two processes): one architecture on every rank, the
same search as one process at the same global batch (--sync_bn, float64, no augmentation), exact resume
after a kill, and the one-sentence refusals."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import runs
import train_search
import utils

HERE = os.path.dirname(os.path.abspath(__file__))
# DARTS space, 3 cells, 4 channels: 2 train + 2 val steps of a global batch of 8 per epoch, 4 epochs
TINY = ['--dataset', 'synthetic', '--device', 'cpu', '--workers', '0', '--layers', '3', '--init_channels', '4',
        '--batch_size', '8', '--synthetic_size', '32', '--report_freq', '1', '--lambda_at', '0',
        '--space', 'darts', '--epochs', '4']
EXACT = ['--no_augment', '--double']


def launch(args, nproc: int, **kw):
    """The command a user types: `torchrun --nproc_per_node=N train_search.py ...` (plain python for 1).
    Output goes to a file, never to a pipe that nobody reads while the test waits for a checkpoint."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    head = ([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc),
             '--standalone'] if nproc > 1 else [sys.executable])
    out = tempfile.TemporaryFile('w+')  # noqa: SIM115 (read and closed by finish)
    proc = subprocess.Popen(head + ['train_search.py', *map(str, args)], cwd=HERE, env=env, stdout=out,
                            stderr=subprocess.STDOUT, text=True, **kw)
    proc.output = out
    return proc


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), children first."""
    out = []
    for task in glob.glob(f'/proc/{pid}/task/*/children'):
        try:
            with open(task) as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:  # the task ended meanwhile
            continue
        for kid in kids:
            out += [kid, *descendants(kid)]
    return out


def kill_tree(pid: int) -> None:
    """kill -9 the run: torchrun and its workers, which torchrun starts in sessions of their own (so killing
    torchrun's process group would leave them running, holding the run folder's lock), then wait until every
    one of them is gone."""
    victims = [pid, *descendants(pid)]
    for v in reversed(victims):
        try:
            os.kill(v, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for v in victims[1:]:
        while alive(v):
            time.sleep(0.02)


def alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie has released its files, the lock included)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except (OSError, IndexError):
        return False


def finish(proc) -> str:
    proc.wait()
    proc.output.seek(0)
    out = proc.output.read()
    proc.output.close()
    assert proc.returncode == 0, out[-3000:]
    return out


def ckpt(save):
    return runs.load_checkpoint(os.path.join(save, 'checkpoint.pt'))


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
    save = tmp_path_factory.mktemp('ddp')
    out = finish(launch(TINY + EXACT + ['--sync_bn', '--debug', '--save', save], 2))
    return save, out


def test_ranks_end_with_one_architecture(two_process_run):
    save, out = two_process_run
    sums = dict(re.findall(r'rank (\d) arch_sha256=(\w+)', out))  # --debug's lines
    assert set(sums) == {'0', '1'} and sums['0'] == sums['1']
    with open(os.path.join(save, 'search_log.jsonl')) as f:
        assert [json.loads(line)['epoch'] for line in f] == [1, 2, 3, 4]  # written once, by rank 0
    with open(os.path.join(save, 'result.json')) as f:
        assert json.load(f)['processes'] == 2


def test_two_processes_compute_what_one_does(two_process_run, tmp_path):
    """--sync_bn, float64, no random augmentation: each global batch is split across the ranks, so the
    two-process search ends with one process's A to round-off."""
    save, _ = two_process_run
    finish(launch(TINY + EXACT + ['--no_fast', '--save', tmp_path], 1))  # --sync_bn runs the reference cells
    one, two = ckpt(tmp_path)['model'], ckpt(save)['model']
    for name in ('alphas_normal', 'alphas_reduce'):
        assert one[name].dtype == torch.float64
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-12)
        assert (one[name] - one[name].mean()).abs().max() > 1e-4  # A moved: the comparison means something


def test_killed_torchrun_search_resumes_exactly(two_process_run, tmp_path):
    save, _ = two_process_run
    args = TINY + EXACT + ['--sync_bn', '--save', tmp_path]
    proc = launch(args, 2, start_new_session=True)
    path = tmp_path / 'checkpoint.pt'
    while proc.poll() is None:  # wait for the state it needs (a first checkpoint), not for a clock
        if path.exists():
            kill_tree(proc.pid)
            break
        time.sleep(0.02)
    proc.wait()
    killed_at = runs.load_checkpoint(str(path))['epoch']
    assert 1 <= killed_at < 4, 'the run ended before it could be killed'
    finish(launch(args + ['--resume'], 2))
    resumed, whole = ckpt(tmp_path), ckpt(save)
    assert resumed['epoch'] == 4
    for name, t in whole['model'].items():
        assert torch.equal(resumed['model'][name], t), name


def refusal(monkeypatch, capsys, world, args):
    monkeypatch.setenv('WORLD_SIZE', str(world))
    monkeypatch.setenv('LOCAL_WORLD_SIZE', str(world))
    assert utils.exit_code(train_search.main, args) == 2, 'not refused'
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1, err
    return err


def test_a_batch_that_does_not_split_names_the_divisors(monkeypatch, capsys, tmp_path):
    err = refusal(monkeypatch, capsys, 3, TINY + ['--save', tmp_path])
    assert '--batch_size 8' in err and '[1, 2, 4, 8]' in err


def test_unrolled_sync_bn_and_oversubscription_are_refused(monkeypatch, capsys, tmp_path):
    assert '--unrolled' in refusal(monkeypatch, capsys, 2, TINY + ['--unrolled', '--save', tmp_path])
    assert 'torchrun' in refusal(monkeypatch, capsys, 1, TINY + ['--sync_bn', '--save', tmp_path])
    cores = len(os.sched_getaffinity(0))
    world = 2 * cores if 8 % (2 * cores) == 0 else 8
    if world > cores:
        assert 'oversubscribe' in refusal(monkeypatch, capsys, world, TINY + ['--save', tmp_path])


def test_resume_with_another_global_batch_names_both(two_process_run, monkeypatch, capsys):
    save, _ = two_process_run
    args = [a if a != '8' else '4' for a in TINY] + EXACT + ['--sync_bn', '--save', save, '--resume']
    err = refusal(monkeypatch, capsys, 2, args)
    assert 'batch_size' in err and '8' in err and '4' in err


def test_global_batch_sampler_splits_each_batch_as_one_process_cuts_it():
    one = list(utils.GlobalBatchSampler(10, 4, 0, 1, generator=torch.Generator().manual_seed(0)))
    parts = [list(utils.GlobalBatchSampler(10, 4, r, 2, generator=torch.Generator().manual_seed(0)))
             for r in range(2)]
    assert [a + b for a, b in zip(*parts)] == one  # 4+4+2 images: every batch split in halves
    assert len(utils.GlobalBatchSampler(9, 4, 0, 2)) == 2  # a last batch of one image makes no pair


@pytest.mark.parametrize('method, extra', [
    ('eoinas', ['--eoi_warmup', '1', '--prune_every', '1']),  # samples, Ce/Ca and prunes agree
    ('agnas', ['--layers', '5']),                               # the importance pass's sums agree
])
def test_every_method_ends_with_one_architecture_on_every_rank(method, extra, tmp_path):
    args = TINY + ['--method', method, '--epochs', '3', *extra, '--debug', '--save', tmp_path]
    out = finish(launch(args, 2))
    sums = dict(re.findall(r'rank (\d) arch_sha256=(\w+)', out))  # --debug's lines
    assert set(sums) == {'0', '1'} and sums['0'] == sums['1']
    with open(os.path.join(tmp_path, 'search_log.jsonl')) as f:
        records = [json.loads(line) for line in f]
    assert [r['method'] for r in records] == [method] * 3
