"""The promises a run folder keeps when things go wrong (issue 22, "Broken promises" 1-15), one test (or a few)
per promise, each on the smallest run that shows it: a full disk, two runs on one --save, damaged checkpoints,
search_adwp.py's --save / divergence / resume rules, every method's resumed optimizer, no checkpoint of a
diverged state, a finished run resumed elsewhere, generated bad genotype JSON, other scripts' checkpoints,
visualize.py on ADWPNAS output, retraining an unfinished search, summarize.py, and `next:` lines followed as
printed on the CPU."""
import errno
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

import genotypes
import runs
import search_adwp
import summarize
import teacher
import train_cifar
import train_imagenet
import train_search
import utils
import visualize
from test_train_search import die_after

HERE = os.path.dirname(os.path.abspath(__file__))
run = utils.exit_code  # (main, argv) -> the exit code the command line would give
# the cheapest runs of each script (the DARTS space: what is tested here does not depend on the space)
CIFAR = ['--device', 'cpu', '--dataset', 'synthetic', '--synthetic_size', '32', '--layers', '3',
         '--init_channels', '4', '--batch_size', '8', '--workers', '0', '--report_freq', '0', '--arch', 'DARTS_V2']
SEARCH = ['--dataset', 'synthetic', '--device', 'cpu', '--workers', '0', '--layers', '3', '--init_channels', '4',
          '--batch_size', '4', '--synthetic_size', '16', '--report_freq', '0', '--lambda_at', '0', '--space', 'darts']
TEACHER = ['--depth', '11', '--alpha', '12', '--dataset', 'synthetic', '--synthetic_size', '32', '--batch_size', '16',
           '--workers', '0', '--device', 'cpu', '--report_freq', '0']
# an intensive space of K = 2 candidates per node, so that ADWPNAS needs no stage-0 search
SPACE = {'normal': [[['sep_conv_3x3', 0], ['skip_connect', 1]], [['sep_conv_3x3', 1], ['max_pool_3x3', 2]],
                    [['dil_conv_3x3', 0], ['skip_connect', 3]], [['sep_conv_5x5', 1], ['avg_pool_3x3', 4]]],
         'reduce': [[['max_pool_3x3', 0], ['sep_conv_3x3', 1]], [['skip_connect', 2], ['max_pool_3x3', 1]],
                    [['sep_conv_3x3', 0], ['skip_connect', 2]], [['max_pool_3x3', 0], ['dil_conv_3x3', 3]]]}
ADWP = ['--K', '2', '--dataset', 'synthetic', '--device', 'cpu', '--workers', '0', '--layers', '3',
        '--init_channels', '4', '--batch_size', '8', '--synthetic_size', '32', '--report_freq', '0', '--gen_hidden',
        '8', '--hyper_epochs', '1', '--cross_start', '2', '--cross_end', '2', '--epochs', '2']


def error(capsys) -> str:
    """The one line a refused run prints."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith('note: ')]
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in err, err
    return lines[0]


def fails(capsys, main, argv, *words) -> str:
    capsys.readouterr()
    assert run(main, argv) == 2
    err = error(capsys)
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.fixture(scope='module')
def space_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('space') / 'intensive_space.json'
    path.write_text(json.dumps(SPACE))
    return str(path)


@pytest.fixture(scope='module')
def cifar_half(tmp_path_factory):
    """A two-epoch train_cifar.py run killed after its first epoch (tests copy it and go on from there)."""
    save = tmp_path_factory.mktemp('cifar')
    with pytest.MonkeyPatch.context() as m:
        m.setattr(runs, 'save_checkpoint', die_after())
        assert run(train_cifar.main, CIFAR + ['--epochs', '2', '--save', save]) == 130
    return save


def copy_run(folder, to):
    shutil.copytree(folder, to)
    return to


@pytest.fixture(scope='module')
def search(tmp_path_factory):
    """A finished one-epoch search (train_search.py) and what it printed."""
    save = tmp_path_factory.mktemp('search')
    out = []
    patch = pytest.MonkeyPatch()
    patch.setattr(sys, 'stdout', Tee(out))
    try:
        assert run(train_search.main, SEARCH + ['--epochs', '1', '--save', save]) == 0
    finally:
        patch.undo()
    return save, ''.join(out)


@pytest.fixture(scope='module')
def adwp(tmp_path_factory, space_file):
    """A finished two-epoch ADWPNAS search (search_adwp.py)."""
    save = tmp_path_factory.mktemp('adwp')
    assert run(search_adwp.main, ['--intensive_space', space_file, '--save', save] + ADWP) == 0
    return save


class Tee:
    """sys.stdout that also keeps what was written (the loggers' stream handlers write to sys.stdout)."""

    def __init__(self, out):
        self.out, self.stdout = out, sys.stdout

    def write(self, text):
        self.out.append(text)
        return self.stdout.write(text)

    def flush(self):
        self.stdout.flush()


def records(path) -> list[dict]:
    return runs.read_jsonl(str(path))


# ---------------------------------------------------------------------------------------------------------
# 1. A full disk while a checkpoint is written: one sentence, exit 2, the previous checkpoint intact, no .tmp


def full_disk_at(monkeypatch):
    """The first checkpoint write meets a full disk: its temporary file is a link to /dev/full, where the kernel
    itself answers every write with ENOSPC (no root needed)."""
    real = runs.save_checkpoint

    def save(state, path):
        os.symlink('/dev/full', f'{path}.tmp')
        real(state, path)

    monkeypatch.setattr(runs, 'save_checkpoint', save)


@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='needs /dev/full (Linux)')
def test_a_full_disk_keeps_the_previous_checkpoint_and_removes_the_temporary_file(cifar_half, tmp_path, capsys,
                                                                                  monkeypatch):
    save = copy_run(cifar_half, tmp_path / 'run')
    full_disk_at(monkeypatch)
    fails(capsys, train_cifar.main, CIFAR + ['--epochs', '2', '--save', save, '--resume'],
          f'writing the checkpoint {save / "checkpoint.pt"} failed: the disk is full; the previous checkpoint '
          f'{save / "checkpoint.pt"} is intact and its temporary file was removed: make room (or fix the disk) and '
          f'add --resume to the same command')
    assert not (save / 'checkpoint.pt.tmp').exists()
    assert runs.load_checkpoint(str(save / 'checkpoint.pt'))['epoch'] == 1  # intact, checksum and all


def test_a_write_error_anywhere_in_a_run_is_one_sentence(tmp_path, capsys, monkeypatch):
    """The class: a full disk under a checkpoint's writer (torch.save raising), a JSON log, a result file or
    log.txt; each ends in one sentence and exit 2, and no temporary file is left."""
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')

    with monkeypatch.context() as m:  # the writer itself fails (torch.save chains the error under its own)
        m.setattr(torch, 'save', no_space)
        with pytest.raises(utils.UserError, match='the disk is full; no checkpoint was written before'):
            runs.save_checkpoint({'epoch': 1}, str(tmp_path / 'checkpoint.pt'))
    assert os.listdir(tmp_path) == []

    full = OSError(errno.ENOSPC, 'No space left on device', str(tmp_path / 'search_log.jsonl'))

    def fail():
        raise full
    with pytest.raises(SystemExit) as e:
        utils.run_main(fail)
    assert e.value.code == 2
    assert error(capsys) == (f'error: writing {tmp_path / "search_log.jsonl"} failed: the disk is full; every '
                             f'checkpoint written before is intact: make room (or fix the disk) and add --resume '
                             f'to the same command')

    logger = runs.get_logger(str(tmp_path / 'log'), 'full')
    with monkeypatch.context() as m:  # log.txt: logging would print '--- Logging error ---' and go on
        m.setattr(logger.handlers[1].stream, 'write', no_space)
        with pytest.raises(OSError):
            logger.info('a line')
    with monkeypatch.context() as m:
        m.setattr(json, 'dump', no_space)
        with pytest.raises(OSError):
            runs.write_json(str(tmp_path / 'result.json'), {'a': 1})
    assert not (tmp_path / 'result.json.tmp').exists()


@pytest.mark.skipif(not hasattr(os, 'geteuid') or os.geteuid() != 0 or not os.path.exists('/bin/mount'),
                    reason='mounting a small tmpfs needs root')
def test_a_full_disk_on_a_small_real_file_system(cifar_half, tmp_path, capsys, monkeypatch):
    """The same on a real 16 MiB tmpfs, filled up just before the checkpoint (where root may mount one)."""
    mount = tmp_path / 'small'
    mount.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=16m', 'tmpfs', str(mount)],
                      capture_output=True, check=False).returncode:
        pytest.skip('this machine does not let root mount a tmpfs')
    save = mount / 'run'
    try:
        real = runs.save_checkpoint
        copy_run(cifar_half, save)

        def fill_then_save(state, path):
            with open(mount / 'filler', 'wb') as f, pytest.raises(OSError):
                while True:
                    f.write(b'\0' * 65536)
                    f.flush()
            real(state, path)

        monkeypatch.setattr(runs, 'save_checkpoint', fill_then_save)
        fails(capsys, train_cifar.main, CIFAR + ['--epochs', '2', '--save', save, '--resume'], 'the disk is full',
              'the previous checkpoint', 'is intact')
        assert not (save / 'checkpoint.pt.tmp').exists()
        assert runs.load_checkpoint(str(save / 'checkpoint.pt'))['epoch'] == 1
    finally:
        for handler in logging.getLogger(f'train_cifar:{save}').handlers:  # log.txt is open on the tmpfs
            handler.close()
        if subprocess.run(['umount', str(mount)], check=False).returncode:
            subprocess.run(['umount', '-l', str(mount)], check=False)


# ---------------------------------------------------------------------------------------------------------
# 2. One run per --save: a lock, released on exit, never stale after a crash


def hold_lock(folder) -> subprocess.Popen:
    """Another process that takes FOLDER's lock and waits."""
    code = f'import runs, sys, time; runs.lock_folder({str(folder)!r}); print("locked", flush=True); time.sleep(600)'
    holder = subprocess.Popen([sys.executable, '-c', code], cwd=HERE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == 'locked'
    return holder


def test_a_second_run_on_the_same_save_is_refused_by_every_script(tmp_path, capsys, space_file):
    save = tmp_path / 'run'
    holder = hold_lock(save)
    try:
        for main, argv in ((train_search.main, SEARCH), (train_cifar.main, CIFAR), (teacher.main, TEACHER),
                           (search_adwp.main, ADWP + ['--intensive_space', space_file]),
                           (train_imagenet.main, ['--device', 'cpu', '--data', tmp_path])):
            fails(capsys, main, argv + ['--save', save], f'{save} is in use by another run (pid {holder.pid} on ',
                  'wait for it to end, or give this run another --save')
        assert os.listdir(save) == [runs.LOCK]  # nothing written
    finally:
        holder.kill()  # as kill -9 would: the operating system drops the lock with the process
        holder.wait()
    # a lock is never stale: the crashed holder's lock is gone, the next run goes ahead (here to a refusal
    # after the lock) and gives it back
    fails(capsys, train_cifar.main, CIFAR + ['--epochs', '1', '--save', save, '--resume', tmp_path / 'none.pt'],
          'does not exist')
    assert not (save / runs.LOCK).exists()
    holder = hold_lock(save)  # another process can take it at once
    holder.kill()
    holder.wait()


def test_the_lock_is_given_back_when_a_run_fails_and_a_refused_run_leaves_nothing(tmp_path, capsys):
    fails(capsys, train_cifar.main, CIFAR + ['--epochs', '1', '--learning_rate', '-1', '--save', tmp_path / 'x'],
          '--learning_rate')
    assert not (tmp_path / 'x').exists()
    fails(capsys, train_cifar.main, CIFAR + ['--epochs', '1', '--resume', tmp_path / 'none.pt', '--save',
                                             tmp_path / 'y'], 'does not exist')  # refused after the lock was taken
    assert not (tmp_path / 'y').exists() and runs._held == {}


# ---------------------------------------------------------------------------------------------------------
# 3. Damaged checkpoints: every way a checkpoint can fail to load is one sentence; a checksum catches changed bytes


def copy_of(cifar_half, tmp_path, name='damaged.pt'):
    path = tmp_path / name
    path.write_bytes((cifar_half / 'checkpoint.pt').read_bytes())
    return path


def rewrite(path, change):
    """Load, change and write back a checkpoint as other code would: through runs.save_checkpoint, so that its
    checksum fits and what is tested is the change itself."""
    state = runs.load_checkpoint(path)
    change(state)
    runs.save_checkpoint(state, str(path))


def resume_fails(capsys, path, *words) -> str:
    return fails(capsys, train_cifar.main, CIFAR + ['--epochs', '2', '--save', os.path.dirname(path) + '/elsewhere',
                                                    '--resume', path], *words)


def test_changed_bytes_inside_a_tensor_are_refused(cifar_half, tmp_path, capsys):
    path = copy_of(cifar_half, tmp_path)
    weight = max(runs.load_checkpoint(path)['model'].values(), key=torch.Tensor.numel)
    data = bytearray(path.read_bytes())
    at = data.find(weight.numpy().tobytes())  # the tensor's bytes in the file
    assert at > 0 and weight.numel() * 4 >= 512
    data[at + 100:at + 356] = bytes(range(256))  # 256 bytes: what the issue's 1e24 weights came from
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=False)['epoch'] == 1  # torch.load itself takes it
    resume_fails(capsys, path, 'is damaged: its contents do not match the checksum written with it')


def test_every_way_a_checkpoint_fails_to_load_is_one_sentence(cifar_half, tmp_path, capsys, monkeypatch):
    path = copy_of(cifar_half, tmp_path)
    data = path.read_bytes()

    path.write_bytes(data[:len(data) // 2])  # cut short (a copy that stopped)
    resume_fails(capsys, path, 'cannot be read', 'cut short, damaged or not a checkpoint')
    path.write_bytes(b'\0' * 1000)  # garbage
    resume_fails(capsys, path, 'cannot be read')
    torch.save([1, 2, 3], path)  # not a dict
    resume_fails(capsys, path, 'holds a list, not a checkpoint of this project')

    # a pickled object whose class was renamed, or whose module is gone (other code, another version)
    module = tmp_path / 'ckmod.py'
    module.write_text('class Thing:\n    pass\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    import ckmod
    state = runs.load_checkpoint(copy_of(cifar_half, tmp_path))
    runs.save_checkpoint({**state, 'extra': ckmod.Thing()}, str(path))
    module.write_text('class Renamed:\n    pass\n')
    monkeypatch.delitem(sys.modules, 'ckmod')
    resume_fails(capsys, path, 'needs code that this project does not have', 'Thing')
    module.unlink()
    resume_fails(capsys, path, 'needs code that this project does not have', 'ckmod')

    # an entry missing, or of the wrong shape or kind
    path = copy_of(cifar_half, tmp_path)
    rewrite(path, lambda s: s.pop('model'))
    resume_fails(capsys, path, "lacks 'model', which every train_cifar.py checkpoint holds")
    path = copy_of(cifar_half, tmp_path, 'shape.pt')
    rewrite(path, lambda s: s['model'].update({k: v[:1] for k, v in s['model'].items() if v.dim() == 4}))
    resume_fails(capsys, path, 'does not fit this run (RuntimeError')
    path = copy_of(cifar_half, tmp_path, 'kind.pt')
    rewrite(path, lambda s: s.update(args=[1, 2]))
    resume_fails(capsys, path, 'does not fit this run (TypeError')


def test_a_checkpoint_from_before_checksums_loads_and_says_so_once(cifar_half, tmp_path, capsys):
    path = copy_of(cifar_half, tmp_path)
    state = torch.load(path, weights_only=False)
    del state[runs.CHECKSUM]
    torch.save(state, path)
    capsys.readouterr()
    assert runs.load_checkpoint(path)['epoch'] == 1
    assert runs.load_checkpoint(path)['epoch'] == 1
    err = capsys.readouterr().err
    assert err.count('note: ') == 1 and 'has no checksum' in err


def test_a_checkpoint_holding_nan_is_never_written(tmp_path):
    with pytest.raises(utils.UserError, match=r'its state holds NaN \(model/w\), so the run diverged'):
        runs.save_checkpoint({'model': {'w': torch.tensor([1., float('nan')])}}, str(tmp_path / 'c.pt'))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------
# 4-6. search_adwp.py checks --save, stops a diverging run, and resumes by train_search.py's rules


def test_adwp_checks_save_like_every_script(tmp_path, capsys, space_file):
    a_file = tmp_path / 'file'
    a_file.write_text('x')
    args = ADWP + ['--intensive_space', space_file]
    fails(capsys, search_adwp.main, args + ['--save', a_file], f'--save {a_file} is a file')
    fails(capsys, search_adwp.main, args + ['--save', a_file / 'run'], 'cannot be made', 'is a file')
    if os.geteuid() != 0:  # root may write anywhere
        (tmp_path / 'ro').mkdir(mode=0o555)
        fails(capsys, search_adwp.main, args + ['--save', tmp_path / 'ro' / 'run'], 'may not write')


def test_adwp_stops_a_diverging_search(tmp_path, capsys, space_file):
    save = tmp_path / 'run'
    args = ['--intensive_space', space_file, '--save', save] + ADWP
    err = fails(capsys, search_adwp.main, args + ['--learning_rate', '1e9'], 'epoch 1',
                'no checkpoint was written yet: run the same command again with `--learning_rate 0.025`')
    assert 'left the sensible range' in err or 'non-finite' in err
    assert not (save / 'genotype.json').exists() and not (save / 'checkpoint.pt').exists()


def test_adwp_never_saves_weights_that_blew_up(tmp_path, capsys, monkeypatch, space_file):
    """The issue's case: a loss of 4.6e7 is finite, so a check for non-finite losses alone let the run end with
    exit 0 and a genotype; the state about to be saved is checked, and refused, at the end of the epoch."""
    save = tmp_path / 'run'
    blow_up_after(monkeypatch, search_adwp, 'train_epoch', at=1)
    fails(capsys, search_adwp.main, ['--intensive_space', space_file, '--save', save] + ADWP,
          'at the end of epoch 1, so they were not saved; no checkpoint was written yet')
    assert not (save / 'checkpoint.pt').exists() and not (save / 'genotype.json').exists()


def test_adwp_resume_applies_and_reports_what_may_change_and_refuses_the_rest(tmp_path, capsys, space_file,
                                                                             monkeypatch):
    save = tmp_path / 'run'  # the resumed epoch 2 is a cross-search epoch: weights and alpha both learn
    args = ['--intensive_space', space_file, '--save', save] + ADWP + ['--cross_start', '1', '--epochs', '3']
    with monkeypatch.context() as m:
        m.setattr(runs, 'save_checkpoint', die_after())
        assert run(search_adwp.main, args) == 130
    fails(capsys, search_adwp.main, args + ['--resume', '--seed', '3'], 'was made for seed 2, but this run has seed 3')
    fails(capsys, search_adwp.main, args + ['--resume', '--gen_hidden', '16'], 'gen_hidden 8, but this run has '
          'gen_hidden 16')

    clips = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, 'clip_grad_norm_', lambda p, c, *a, **k: clips.append(c) or real_clip(p, c))
    new = {'learning_rate': 0.01, 'momentum': 0.5, 'weight_decay': 1e-3, 'grad_clip': 2.0,
           'arch_learning_rate': 1e-3, 'arch_weight_decay': 1e-2}
    assert run(search_adwp.main, args + ['--resume'] + [f'--{k}={v}' for k, v in new.items()]) == 0
    log = (save / 'log.txt').read_text()
    assert ('changed on resume, in effect from epoch 2: --learning_rate 0.025 -> 0.01, --momentum 0.9 -> 0.5, '
            '--weight_decay 0.0003 -> 0.001, --grad_clip 5 -> 2, --arch_learning_rate 0.0003 -> 0.001, '
            '--arch_weight_decay 0.001 -> 0.01') in log
    # in force, not only written down: the optimizers and the clip of epoch 2 use the new values
    ckpt = runs.load_checkpoint(str(save / 'checkpoint.pt'))
    w, a = ckpt['optimizer']['param_groups'][0], ckpt['arch_optimizer']['param_groups'][0]
    assert (w['momentum'], w['weight_decay'], w['initial_lr']) == (0.5, 1e-3, 0.01)
    assert (a['lr'], a['weight_decay']) == (1e-3, 1e-2)
    assert clips and set(clips) == {2.0}
    assert all(ckpt['args'][k] == v for k, v in new.items())
    lrs = [r['lr'] for r in records(save / 'search_log.jsonl')]  # cosine over 3 epochs, re-based on 0.01
    assert lrs == pytest.approx([0.025, 0.01 * 0.75, 0.01 * 0.25])


# ---------------------------------------------------------------------------------------------------------
# 7. On resume every method runs with this run's changeable flags, not with the checkpoint's


def optimizers(obj, depth: int = 2) -> dict:
    """{attribute path: optimizer} of a method object (its own attributes, and theirs: the architect's)."""
    found = {}
    for name, value in vars(obj).items():
        if isinstance(value, torch.optim.Optimizer):
            found[name] = value
        elif depth > 1 and hasattr(value, '__dict__') and not isinstance(value, (torch.nn.Module, torch.Tensor)):
            found.update({f'{name}.{k}': v for k, v in optimizers(value, depth - 1).items()})
    return found


@pytest.mark.parametrize('method', sorted(train_search.METHODS))
def test_every_method_resumes_with_this_runs_flags(method):
    base = SEARCH + ['--method', method, '--layers', '5'] + (['--epochs', '2', '--prune_every', '0', '--eoi_warmup',
                                                             '0'] if method == 'eoinas' else [])
    old = train_search.parse_args(base + ['--arch_learning_rate', '3e-4', '--arch_weight_decay', '1e-3'])
    new = train_search.parse_args(base + ['--arch_learning_rate', '0.05', '--arch_weight_decay', '0.5'])
    cls = train_search.METHODS[method]
    saved = cls(cls.build_model(old, 10), old)
    state = saved.state_dict()
    for opt in optimizers(saved).values():  # some state to carry over (Adam's moments)
        for group in opt.param_groups:
            for p in group['params']:
                p.grad = torch.ones_like(p)
        opt.step()
    state = saved.state_dict()
    resumed, fresh = cls(cls.build_model(new, 10), new), cls(cls.build_model(new, 10), new)
    resumed.load_state_dict(state)
    assert set(optimizers(resumed)) == set(optimizers(fresh))
    for name, opt in optimizers(resumed).items():
        for group, want in zip(opt.param_groups, optimizers(fresh)[name].param_groups):
            assert {k: v for k, v in group.items() if k != 'params'} == \
                   {k: v for k, v in want.items() if k != 'params'}, (method, name)
        assert opt.state_dict()['state'], 'the moments come from the checkpoint'


@pytest.mark.slow
def test_eoinas_resumed_with_another_arch_learning_rate_uses_it(tmp_path, monkeypatch):
    """The issue's case end to end: the log said 0.0003 -> 0.05 while Adam kept 0.0003."""
    save = tmp_path / 'run'
    args = SEARCH + ['--method', 'eoinas', '--epochs', '2', '--prune_every', '0', '--eoi_warmup', '0',
                     '--save', save]
    with monkeypatch.context() as m:
        m.setattr(runs, 'save_checkpoint', die_after())
        assert run(train_search.main, args) == 130
    assert run(train_search.main, args + ['--resume', '--arch_learning_rate', '0.05']) == 0
    assert '--arch_learning_rate 0.0003 -> 0.05' in (save / 'log.txt').read_text()
    state = runs.load_checkpoint(str(save / 'checkpoint.pt'))['method']['arch_optimizer']
    assert state['param_groups'][0]['lr'] == 0.05


# ---------------------------------------------------------------------------------------------------------
# 8. No checkpoint of a diverged state; the advice names a checkpoint that works


def test_check_state_refuses_non_finite_weights_and_a_wild_loss():
    sane = {'model': {'w': torch.ones(3)}}
    utils.check_state(sane, {'loss': 2.3}, 33., epoch=1, kept=1)
    with pytest.raises(utils.NonFiniteLoss) as e:
        utils.check_state({'model': {'w': torch.tensor([1., float('inf')])}}, {'loss': 2.3}, 33., epoch=1, kept=1,
                          checkpoint='s/checkpoint.pt', retry='--learning_rate 0.025')
    assert str(e.value).startswith('the weights at the end of epoch 2 hold non-finite values (1 tensor(s), the '
                                   'first model/w), so they were not saved; the checkpoint of epoch 1 is kept')
    with pytest.raises(utils.NonFiniteLoss) as e:
        utils.check_state(sane, {'loss': 1e13}, 33., epoch=0, kept=0, retry='--learning_rate 0.025')
    assert ('the loss of the weights left the sensible range (loss 1e+13; the bound is 33, ten times chance level '
            'plus 10) at the end of epoch 1, so they were not saved; no checkpoint was written yet: run the same '
            'command again with `--learning_rate 0.025`') in str(e.value)


def test_state_loss_normalises_by_the_batch_and_leaves_the_model_as_it_was():
    """A short search's running statistics lag its weights; the check must not call healthy weights diverged."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)).eval()
    x, y = torch.randn(8, 3) * 100 + 50, torch.randint(2, (8,))  # far from the running statistics (0, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # by hand: the batch's own mean and (biased) variance
        h = model[0](x)
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5) * model[1].weight + model[1].bias
        expected = torch.nn.functional.cross_entropy(model[2](h), y).item()
    assert utils.state_loss(model, x, y) == pytest.approx(expected, rel=1e-5)
    assert not model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def blow_up_after(monkeypatch, module, name, at: int):
    """The last step of the `at`-th epoch (module.name runs one epoch a call) leaves weights of 1e24 behind, as
    the issue's run did: the epoch's own losses were fine, the weights it would save were not."""
    real, calls = getattr(module, name), []

    def epoch_then_blow_up(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == at:
            model = args[0] if isinstance(args[0], torch.nn.Module) else args[0].model  # a method holds one
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1e24)
        return out

    monkeypatch.setattr(module, name, epoch_then_blow_up)


def test_a_diverged_state_is_not_saved_and_the_advice_finishes_the_run(cifar_half, tmp_path, capsys, monkeypatch):
    save = copy_run(cifar_half, tmp_path / 'run')
    args = CIFAR + ['--epochs', '2', '--save', save, '--resume']
    blow_up_after(monkeypatch, utils, 'train_epoch', at=1)  # epoch 2, the first this run trains
    err = fails(capsys, train_cifar.main, args, 'at the end of epoch 2, so they were not saved',
                f'the checkpoint of epoch 1 is kept and nothing after it was written: add `--resume '
                f'{save / "checkpoint.pt"} --learning_rate 0.000208333` to the same command')  # DARTS's 0.025 at batch
    # 96, scaled to this run's batch 8 (0.00208), was not above the recipe's rate: the advice is a tenth of it
    assert runs.load_checkpoint(str(save / 'checkpoint.pt'))['epoch'] == 1
    monkeypatch.undo()
    advice = err.split('add `')[1].split('`')[0].split()
    assert run(train_cifar.main, args + advice) == 0  # the checkpoint it names can work


def test_a_search_never_saves_weights_that_blew_up(tmp_path, capsys, monkeypatch):
    save = tmp_path / 'run'
    blow_up_after(monkeypatch, train_search, 'search_epoch', at=1)
    fails(capsys, train_search.main, SEARCH + ['--epochs', '1', '--save', save], 'the loss of the weights',
          'at the end of epoch 1, so they were not saved; no checkpoint was written yet')
    assert not (save / 'checkpoint.pt').exists() and not (save / 'genotype.json').exists()


# ---------------------------------------------------------------------------------------------------------
# 9. A finished run resumed into another --save


def test_a_finished_search_resumed_into_another_save(search, tmp_path, capsys):
    old, _ = search
    new = tmp_path / 'new'
    assert run(train_search.main, SEARCH + ['--epochs', '1', '--resume', old / 'checkpoint.pt', '--save', new,
                                            '--learning_rate', '0.01']) == 0
    assert records(new / 'search_log.jsonl') == records(old / 'search_log.jsonl')
    assert {'log.txt', 'genotype.json', 'checkpoint.pt', 'result.json'} <= set(os.listdir(new))
    log = (new / 'log.txt').read_text()
    assert log.startswith((old / 'log.txt').read_text())  # the history, then this session
    assert 'in effect from epoch 2' not in log
    assert 'changed on resume: --learning_rate 0.025 -> 0.01; the run had finished its 1 epochs' in log
    assert json.loads((new / 'result.json').read_text())['wall_seconds'] > 0
    assert run(train_search.main, SEARCH + ['--epochs', '1', '--save', new, '--resume',
                                            '--learning_rate', '0.01']) == 0  # a whole run folder


# ---------------------------------------------------------------------------------------------------------
# 11. Every script recognises every other script's checkpoint, names it and says what to run instead


def test_each_script_names_the_script_that_wrote_a_checkpoint(tmp_path):
    for writer in runs.SCRIPTS:
        path = str(tmp_path / f'{writer}.pt')
        runs.save_checkpoint({'script': writer, 'epoch': 1}, path)
        for reader in runs.SCRIPTS:
            if reader == writer:
                assert runs.load_resume(path, reader)['epoch'] == 1
                continue
            with pytest.raises(utils.UserError) as e:
                runs.load_resume(path, reader)
            assert str(e.value).startswith(f'{path} is a checkpoint of {writer} ({runs.SCRIPTS[writer]}), not of '
                                           f'{reader}: continue it with `python {writer} --resume {path}`')
    # checkpoints from before the 'script' entry are told apart by what only their script writes
    legacy = {'search_adwp.py': {'settings': {}, 'best': {}, 'arch_optimizer': {}}, 'train_search.py': {'settings': {}},
              'teacher.py': {'arch': 'p', 'config': {}, 'state_dict': {}}, 'train_imagenet.py': {'global_batch': 8},
              'train_cifar.py': {'synthetic_size': 8, 'genotype': '{}'}}
    for script, state in legacy.items():
        assert runs.checkpoint_script(state) == script
    runs.save_checkpoint({'model': {}}, str(tmp_path / 'other.pt'))
    with pytest.raises(utils.UserError, match='is not a checkpoint of this project'):
        runs.load_resume(str(tmp_path / 'other.pt'), 'train_search.py')


def test_search_and_adwp_checkpoints_are_named_by_the_other_script(search, adwp, tmp_path, capsys, space_file):
    old, _ = search
    fails(capsys, train_search.main, SEARCH + ['--epochs', '1', '--resume', adwp / 'checkpoint.pt', '--save',
                                               tmp_path / 'a'],
          'is a checkpoint of search_adwp.py (an ADWPNAS search), not of train_search.py',
          f'`python search_adwp.py --resume {adwp / "checkpoint.pt"}`')
    fails(capsys, search_adwp.main, ADWP + ['--intensive_space', space_file, '--resume', old / 'checkpoint.pt',
                                            '--save', tmp_path / 'b'],
          'is a checkpoint of train_search.py (a search), not of search_adwp.py')
    fails(capsys, train_search.main, SEARCH + ['--lambda_at', '1', '--teacher', old, '--save', tmp_path / 'c'],
          'is a checkpoint of train_search.py', 'train a teacher with `python teacher.py --device cpu --dataset '
          'synthetic --synthetic_size 16 --batch_size 4 --workers 0`')
    # where a genotype.json belongs
    fails(capsys, train_cifar.main, CIFAR[:-2] + ['--genotype_file', old / 'checkpoint.pt', '--save', tmp_path / 'd'],
          f'--genotype_file {old / "checkpoint.pt"} is a checkpoint of train_search.py, not a genotype: pass the '
          f'genotype.json that the run wrote beside it ({old / "genotype.json"})')
    fails(capsys, visualize.main, [adwp / 'checkpoint.pt'], 'is a checkpoint of search_adwp.py, not a genotype')


# ---------------------------------------------------------------------------------------------------------
# 12. visualize.py on ADWPNAS output: its per-layer genotype and its per-cell parameters


def test_adwp_log_carries_importance_like_every_method(adwp):
    rec = records(adwp / 'search_log.jsonl')[-1]
    assert rec['method'] == 'adwpnas' and rec['primitives'] == genotypes.DARTS_PRIMITIVES
    assert sorted(rec['importance']) == ['cell 0', 'cell 1', 'cell 2'] and rec['reduction_cells'] == [1, 2]
    p = torch.tensor(rec['alphas'])  # (cells, nodes, K): each node's K candidates sit at their (edge, op)
    rows = genotypes.edge_names(False)
    for cell in range(3):
        space = SPACE['reduce' if cell in (1, 2) else 'normal']
        m = torch.tensor(rec['importance'][f'cell {cell}'])
        assert m.shape == (14, 8) and m.sum().item() == pytest.approx(4., abs=1e-5)  # 4 nodes, each sums to 1
        for j, node in enumerate(space):
            for (op, i), value in zip(node, p[cell, j]):
                assert m[rows.index(f'{i}->{j + 2}'), genotypes.DARTS_PRIMITIVES.index(op)] == pytest.approx(value)


def test_visualize_draws_every_layer_and_the_per_cell_parameters(adwp, tmp_path, capsys):
    out = tmp_path / 'plots'
    assert run(visualize.main, [adwp / 'genotype.json', '--out', out]) == 0
    assert {'cell_0_normal.dot', 'cell_1_reduce.dot', 'cell_2_reduce.dot'} <= set(os.listdir(out))
    assert run(visualize.main, [adwp, '--out', tmp_path / 'folder']) == 0
    made = set(os.listdir(tmp_path / 'folder'))
    assert 'cell_1_reduce.dot' in made
    pytest.importorskip('matplotlib')
    assert 'importance_cells.png' in made


# ---------------------------------------------------------------------------------------------------------
# 10. Any genotype JSON, however malformed, gives a genotype or one sentence: generated bad inputs


ATOMS = [0, 1, -1, 7, 2, 10 ** 30, -(10 ** 30), 1.5, float('inf'), True, False, None, '', 'sep_conv_3x3',
         'no_such_op', 'skip_connect', '|', [], {}, [[]], [2, 3, 4, 5], {'normal': []}]


def paths(value, at=()):
    """Every place in a JSON tree, as a list of keys and indices (the root is ())."""
    yield at
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, at + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, at + (i,))


def mutate(data, rng):
    """One random change at one random place: a value of another kind, a deleted, doubled, wrapped or unwrapped
    element, an extra key, deep nesting, a string or a number made huge or negative."""
    import copy
    data = copy.deepcopy(data)
    at = rng.choice(list(paths(data)))
    parent = data
    for key in at[:-1]:
        parent = parent[key]
    node = parent[at[-1]] if at else data
    kind = rng.randrange(9)
    if kind == 0:
        new = rng.choice(ATOMS)
    elif kind == 1 and isinstance(node, list) and node:
        new = node[:]
        del new[rng.randrange(len(new))]
    elif kind == 2 and isinstance(node, list) and node:
        new = node + [rng.choice(node)]
    elif kind == 3:
        new = [node]
    elif kind == 4 and isinstance(node, list) and len(node) == 1:
        new = node[0]
    elif kind == 5 and isinstance(node, dict) and node:
        new = dict(node)
        del new[rng.choice(list(new))]
    elif kind == 6 and isinstance(node, dict):
        new = {**node, rng.choice(['staged', 'cells', 'nb201', 'extra', 'concat']): rng.choice(ATOMS)}
    elif kind == 7:
        new = node
        for _ in range(rng.choice([3, 50])):
            new = [new]
    elif isinstance(node, int) and not isinstance(node, bool):
        new = rng.choice([-node, node + 100, node * 10 ** 20])
    elif isinstance(node, str):
        new = rng.choice([node[::-1], node + '~9', node.upper(), node * 3])
    else:
        new = rng.choice(ATOMS)
    if not at:
        return new
    parent[at[-1]] = new
    return data


def outcome(text: str):
    """The genotype that a JSON text gives, or the GenotypeError; anything else fails the test."""
    try:
        return genotypes.from_json(text, 'g.json')
    except genotypes.GenotypeError as e:
        assert str(e) and '\n' not in str(e) and 'Traceback' not in str(e)
        return e


def test_generated_bad_genotype_json_gives_a_genotype_or_one_sentence():
    """Every form's examples (genotypes.JSON_FORMS: a new form is covered as soon as it is listed there) go
    through 4000 random chains of one to three changes (a fixed seed); each result is a valid genotype (that
    validates and round-trips unchanged) or a GenotypeError, never another exception."""
    import random
    rng = random.Random(22)
    examples = [json.loads(genotypes.to_json(e)) for f in genotypes.JSON_FORMS for e in f.examples]
    bad = valid = 0
    for _ in range(4000):
        data = rng.choice(examples)
        for _ in range(rng.randint(1, 3)):
            data = mutate(data, rng)
        text = json.dumps(data)
        if rng.random() < 0.05:  # a place nested thousands deep (as text: Python's json cannot write it)
            at = rng.randrange(len(text))
            text = text[:at] + '[' * 5000 + text[at:] + ']' * 5000
        got = outcome(text)
        if isinstance(got, genotypes.GenotypeError):
            bad += 1
            continue
        valid += 1
        assert genotypes.validate(got) == got and genotypes.from_json(genotypes.to_json(got)) == got
    assert bad > 3000 and valid > 20  # both outcomes occur, and the changes mostly break the genotype
    for text in ('[' * 100_000, '{"normal": ' * 50_000, '', 'null', '"DARTS_V2"', '[1, 2]', '{}', 'NaN',
                 '{"cells": "' + 'x' * 10 ** 6 + '", "concat": [2, 3, 4, 5]}'):
        assert isinstance(outcome(text), genotypes.GenotypeError), text[:40]


def test_the_net_under_the_checks_turns_any_other_fault_into_one_sentence():
    """genotypes.checked, under every form's parse: 40,000 generated chains found no input that gets past the
    forms' own checks, so the net is tested on its own (a fault deep inside a check that no check names)."""
    for fault in (lambda: [0][int('1')], lambda: {}['normal'], lambda: len(5), lambda: int('x'), lambda: None.cells):
        with pytest.raises(genotypes.GenotypeError, match=r'^g\.json is not a valid genotype: \w+Error \(') as e:
            genotypes.checked('g.json', fault)
        assert '\n' not in str(e.value)
    with pytest.raises(ZeroDivisionError):  # a bug in this code is not blamed on the file
        genotypes.checked('g.json', lambda: 1 / 0)


def test_the_issues_bad_genotypes_in_every_reader(tmp_path, capsys):
    """The issue's cases through the scripts that read genotype files: one sentence, exit 2."""
    good = json.loads(genotypes.to_json(genotypes.DARTS_V2))
    nos = json.loads(genotypes.to_json(genotypes.NOS_EXAMPLE))
    staged = json.loads(genotypes.to_json(genotypes.AGNAS))
    cases = {'concat_int': {**good, 'normal_concat': 5}, 'cell_int': {**good, 'normal': 3},
             'empty_pair': {**good, 'normal': [[]] + good['normal'][1:]}, 'nos_block_int': {**nos, 'reduce': [1] * 4},
             'staged_empty': {**staged, 'normal': [[], [], []]}, 'nested': json.loads('[' * 500 + ']' * 500)}
    for name, data in cases.items():
        path = tmp_path / f'{name}.json'
        path.write_text(json.dumps(data))
        for main, argv in ((train_cifar.main, CIFAR[:-2] + ['--genotype_file', path, '--save', tmp_path / name]),
                           (visualize.main, [path, '--out', tmp_path / f'plots_{name}'])):
            fails(capsys, main, argv, str(path))
    deep = tmp_path / 'deep.json'
    deep.write_text('[' * 100_000)
    fails(capsys, visualize.main, [deep], 'nests its brackets too deeply')


# ---------------------------------------------------------------------------------------------------------
# 13. Retraining the genotype.json of a search that has not finished says so


def test_retraining_an_unfinished_search_warns_and_the_flag_silences_it(search, tmp_path, capsys):
    old, _ = search
    folder = tmp_path / 'running'
    folder.mkdir()
    (folder / 'genotype.json').write_text((old / 'genotype.json').read_text())
    runs.append_jsonl(str(folder / 'search_log.jsonl'), {**records(old / 'search_log.jsonl')[0], 'epochs': 25})
    # a batch larger than the data stops each run right after the warning would be given
    args = CIFAR[:-2] + ['--epochs', '1', '--genotype_file', folder / 'genotype.json', '--batch_size', '100000']
    fails(capsys, train_cifar.main, args + ['--save', tmp_path / 'a'], '--batch_size 100000')
    assert (f'warning: {folder / "genotype.json"} comes from a search that has run 1 of its 25 epochs; a search '
            f'rewrites genotype.json every epoch, so this trains the cell of epoch 1') in \
        (tmp_path / 'a' / 'log.txt').read_text()
    fails(capsys, train_cifar.main, args + ['--save', tmp_path / 'b', '--allow_unfinished'], '--batch_size 100000')
    assert 'warning' not in (tmp_path / 'b' / 'log.txt').read_text()
    assert runs.unfinished_search(str(old / 'genotype.json')) is None  # a finished search: no word


# ---------------------------------------------------------------------------------------------------------
# 14. summarize.py: a finished teacher, a short ADWPNAS label, summary.csv beside the runs


def test_summarize_lists_a_teacher_and_adwpnas_and_writes_beside_the_runs(adwp, tmp_path, monkeypatch, capsys):
    root = tmp_path / 'runs'
    root.mkdir()
    teacher_run = root / 'teacher'
    assert run(teacher.main, TEACHER + ['--epochs', '1', '--save', teacher_run]) == 0
    old_teacher = root / 'old-teacher'  # one from before teacher.py wrote result.json
    old_teacher.mkdir()
    (old_teacher / 'checkpoint.pt').write_bytes((teacher_run / 'checkpoint.pt').read_bytes())
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rows = summarize.main([str(teacher_run), str(old_teacher), str(adwp), '--out', ''])
    done = {r['dirs']: r for r in rows if r['status'] == 'done'}
    top1 = runs.load_checkpoint(str(teacher_run / 'checkpoint.pt'))['test_top1']
    assert done[str(teacher_run)]['kind'] == 'teacher'
    assert done[str(teacher_run)]['error_mean'] == pytest.approx(100 - top1)
    assert done[str(old_teacher)]['error_mean'] == pytest.approx(100 - top1)
    label = done[str(adwp)]['label']
    assert label.startswith('adwpnas ') and 'intensive space ' in label and len(label) < 250
    summarize.main([str(teacher_run), str(old_teacher)])
    assert (root / 'summary.csv').exists() and not os.listdir(elsewhere)  # beside the runs, not in the cwd
    summarize.main([str(teacher_run), '--out', str(tmp_path / 'mine.csv')])
    assert (tmp_path / 'mine.csv').exists()


# ---------------------------------------------------------------------------------------------------------
# 15. `next:` lines repeat the machine and data flags: followed as printed, they run on the CPU


def test_next_lines_followed_as_printed_run_on_the_cpu(search, tmp_path):
    old, out = search
    # a line copied whole into a shell runs: what it says about itself is a shell comment
    lines = [line.split('next: ', 1)[1] for line in out.splitlines() if 'next: ' in line]
    assert len(lines) == 2
    visualize_line, retrain_line = lines
    assert retrain_line.split('    # ')[0] == (f'python train_cifar.py --genotype_file {old / "genotype.json"} --device '
                                             f'cpu --dataset synthetic --synthetic_size 16 --batch_size 4 --workers 0')
    scripts = {'visualize.py': visualize.main, 'train_cifar.py': train_cifar.main}
    for line, smaller in ((visualize_line, ['--out', tmp_path / 'plots']),
                          (retrain_line, ['--epochs', '1', '--layers', '3', '--init_channels', '4', '--batch_size',
                                          '8', '--save', tmp_path / 'retrain'])):
        words = shlex.split(line, comments=True)  # as a shell reads it
        assert words[0] == 'python'
        assert run(scripts[words[1]], words[2:] + smaller) == 0, line  # only the size added, to keep it short
    # and the retraining's own next line (draw the cell), followed as printed
    retrained = (tmp_path / 'retrain' / 'log.txt').read_text()
    words = shlex.split(retrained.split('next: ', 1)[1].splitlines()[0], comments=True)
    assert words[:2] == ['python', 'visualize.py']
    assert run(visualize.main, words[2:] + ['--out', tmp_path / 'cell']) == 0


def test_adwp_names_the_stage0_search_for_this_machine(capsys):
    fails(capsys, search_adwp.main, ['--dataset', 'synthetic', '--device', 'cpu', '--workers', '0'],
          '`python train_search.py --space darts --lambda_at 0 --device cpu --dataset synthetic --synthetic_size '
          '512 --batch_size 98 --workers 0`')


def test_the_flags_a_next_command_repeats():
    args = train_cifar.build_parser().parse_args(['--device', 'cpu', '--dataset', 'folder', '--data', 'my data',
                                                  '--image_size', '64', '--workers', '0'])
    assert runs.command('train_search.py', args, teacher='t') == ("python train_search.py --teacher t --device cpu "
                                                                  "--dataset folder --data 'my data' --image_size 64 "
                                                                  "--workers 0")
    tiny = train_cifar.build_parser().parse_args(['--device', 'cpu', '--dataset', 'synthetic', '--synthetic_size',
                                                  '32', '--batch_size', '8'])  # a tiny set: the batch that fits it
    assert runs.command('train_search.py', tiny) == ('python train_search.py --device cpu --dataset synthetic '
                                                     '--synthetic_size 32 --batch_size 8')
    gpu = train_cifar.build_parser().parse_args(['--gpu', '1'])
    assert runs.command('teacher.py', gpu) == 'python teacher.py --gpu 1 --dataset cifar10'
