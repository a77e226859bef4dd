"""Resume and divergence (issue 13): which flags may change on resume and how a changed learning rate takes
effect, the bound on the loss, the log a kill cut short, and divergence advice that finishes the run when it
is followed."""
import argparse
import json
import math
import os
import re

import pytest
import torch

import runs
import train_cifar
import train_search
import utils
from test_train_search import die_after

# the cheapest search with two steps an epoch (the DARTS space: resume and divergence do not depend on it)
SEARCH = ['--dataset', 'synthetic', '--device', 'cpu', '--workers', '0', '--layers', '3', '--init_channels', '4',
          '--batch_size', '4', '--synthetic_size', '16', '--report_freq', '1', '--lambda_at', '0', '--space', 'darts']
CIFAR = ['--device', 'cpu', '--dataset', 'synthetic', '--synthetic_size', '32', '--layers', '3',
         '--init_channels', '4', '--batch_size', '8', '--workers', '0', '--report_freq', '0', '--arch', 'DARTS_V2']


run = utils.exit_code  # (main, argv) -> the exit code the command line would give


def error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1, err
    return err


def read_log(save):
    with open(os.path.join(save, 'search_log.jsonl')) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------------------
# A learning rate changed on resume: the schedule goes on as if the run had started with it


SCHEDULES = {
    'cosine': lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, 8, eta_min=1e-4),
    'multistep': lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, [2, 5, 5], 0.1),
    'lambda': lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 3 if s < 3 else (8 - s) / 5),
}


@pytest.mark.parametrize('kind', SCHEDULES)
def test_set_learning_rate_rebases_the_schedule(kind):
    def lrs(lr0, switch_to=None):
        w = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([w], lr0, momentum=0.9)
        scheduler = SCHEDULES[kind](opt)
        out = []
        for step in range(8):
            if step == 3 and switch_to is not None:  # a resume after 3 steps with another --learning_rate
                state = scheduler.state_dict()
                scheduler = SCHEDULES[kind](opt)
                scheduler.load_state_dict(state)
                runs.set_learning_rate(opt, scheduler, switch_to)
                assert opt.param_groups[0]['initial_lr'] == switch_to and scheduler.base_lrs == [switch_to]
            out.append(opt.param_groups[0]['lr'])
            assert scheduler.get_last_lr() == [out[-1]]
            w.grad = torch.ones(1)
            opt.step()
            scheduler.step()
        return out

    started_low, switched = lrs(0.01), lrs(1.0, switch_to=0.01)
    assert switched[3:] == pytest.approx(started_low[3:], rel=1e-12)
    assert switched[0] == 1.0 * started_low[0] / 0.01  # before the switch: the old rate's schedule


def test_resume_flags_refuse_run_defining_flags_and_return_the_changeable_ones():
    ckpt = {'args': {'seed': 2, 'learning_rate': 0.025, 'workers': 2, 'unrolled': False, 'resume': None}}
    may = ('learning_rate', 'workers', 'resume')

    def namespace(**changes):
        base = {'seed': 2, 'learning_rate': 0.025, 'workers': 2, 'unrolled': False, 'resume': 'x/checkpoint.pt',
                'a_new_flag': 1}  # a flag the checkpoint does not know is not compared
        return argparse.Namespace(**{**base, **changes})

    changed = runs.resume_flags(ckpt, namespace(learning_rate=0.01, workers=0), may, 'ck.pt')
    assert changed == {'learning_rate': (0.025, 0.01), 'workers': (2, 0), 'resume': (None, 'x/checkpoint.pt')}
    assert runs.describe_changes(changed, 3) == ('changed on resume, in effect from epoch 4: --learning_rate '
                                                  '0.025 -> 0.01, --workers 2 -> 0')
    assert runs.describe_changes({'resume': (None, 'x')}, 3) is None
    with pytest.raises(utils.UserError) as e:
        runs.resume_flags(ckpt, namespace(seed=3), may, 'ck.pt')
    assert str(e.value).startswith('checkpoint ck.pt was made with --seed 2, but this run has --seed 3; --seed '
                                   'defines the run, so it cannot change on resume')
    with pytest.raises(utils.UserError, match='--unrolled off, but this run has --unrolled on'):
        runs.resume_flags(ckpt, namespace(unrolled=True), may, 'ck.pt')


# ---------------------------------------------------------------------------------------------------------
# The bound on the loss, and what the stop says


def test_loss_limit_is_far_above_chance():
    for classes in (10, 100, 1000):
        assert utils.loss_limit(classes) == pytest.approx(10 * math.log(classes) + 10)
        assert utils.loss_limit(classes) > 10 * math.log(classes)  # chance level is ln(C)
    assert utils.retry_learning_rate(1e6, 0.025) == 0.025        # above the default: back to it
    assert utils.retry_learning_rate(0.025, 0.025) == pytest.approx(0.0025)  # at or below: a tenth


def test_check_loss_stops_on_nan_and_above_the_bound():
    limit = utils.loss_limit(10)
    utils.check_loss({'train_ce': 30., 'train_at': 0.1}, limit, epoch=0, step=0)  # sane: nothing happens
    with pytest.raises(utils.NonFiniteLoss) as e:
        utils.check_loss({'train_ce': 2e13}, limit, epoch=2, step=4, kept=2, checkpoint='s/checkpoint.pt',
                         retry='--learning_rate 0.025')
    assert ('the training loss left the sensible range (train_ce 2e+13; the bound is 33' in str(e.value)
            and 'at epoch 3, step 5; the checkpoint of epoch 2 is kept' in str(e.value)
            and 'add `--resume s/checkpoint.pt --learning_rate 0.025` to the same command' in str(e.value))
    with pytest.raises(utils.NonFiniteLoss) as e:
        utils.check_loss({'loss': float('nan')}, limit, epoch=0, step=1, kept=0, retry='--learning_rate 0.025')
    assert ('became non-finite (loss nan) at epoch 1, step 2; no checkpoint was written yet: run the same '
            'command again with `--learning_rate 0.025`' in str(e.value)) and 'kept' not in str(e.value)


def test_trim_jsonl_drops_a_cut_line_and_epochs_after_the_checkpoint(tmp_path):
    path = tmp_path / 'log.jsonl'
    path.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3}\n{"epoch": 4, "train_')  # killed mid-append
    assert runs.trim_jsonl(str(path), 2) == 2
    assert path.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    assert runs.trim_jsonl(str(tmp_path / 'none.jsonl'), 2) == 0


# ---------------------------------------------------------------------------------------------------------
# End to end: following the advice finishes the run


def test_diverged_search_stops_and_following_its_advice_finishes_it(tmp_path, capsys, monkeypatch):
    """A search killed after epoch 1 resumes at lr 1e6 and diverges in epoch 2; the stop names what was kept
    and the flags to add; added (from another folder, without --save), they finish the run in its folder."""
    save = tmp_path / 'run'
    args = SEARCH + ['--epochs', '2', '--learning_rate', '0.05', '--save', save]
    real_save = runs.save_checkpoint
    # killed right after the first checkpoint
    monkeypatch.setattr(runs, 'save_checkpoint', die_after())
    assert run(train_search.main, args) == 130
    monkeypatch.setattr(runs, 'save_checkpoint', real_save)
    capsys.readouterr()
    with open(save / 'search_log.jsonl', 'a') as f:
        f.write('{"epoch": 2, "train_ce": 2.2')  # and a log line cut short by the kill

    # a flag that defines the run cannot change on resume
    assert run(train_search.main, args + ['--resume', '--seed', '3']) == 2
    assert '--seed 2, but this run has --seed 3' in error(capsys)

    assert run(train_search.main, args + ['--resume', '--learning_rate', '1e6']) == 2
    err = error(capsys)
    assert 'at epoch 2, step' in err and 'the checkpoint of epoch 1 is kept' in err
    assert ('left the sensible range' in err) or ('non-finite' in err)
    advice = re.search(r'add `([^`]+)` to the same command', err).group(1)
    assert advice == f'--resume {save / "checkpoint.pt"} --learning_rate 0.025'
    assert runs.load_checkpoint(str(save / 'checkpoint.pt'))['epoch'] == 1 and len(read_log(save)) == 1

    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    without_save = args[:args.index('--save')]
    assert run(train_search.main, without_save + ['--resume', '--learning_rate', '1e6'] + advice.split()) == 0
    out = capsys.readouterr().out
    assert not os.listdir(elsewhere)  # nothing went to runs/search: the run went on in its own folder
    records = read_log(save)
    assert [r['epoch'] for r in records] == [1, 2]
    assert records[0]['lr'] == 0.05 and records[1]['lr'] == pytest.approx(0.025 * 0.5)  # cosine, re-based
    log = (save / 'log.txt').read_text()
    assert 'changed on resume, in effect from epoch 2: --learning_rate 0.05 -> 0.025' in log
    assert 'dropped 1 line(s)' in log
    # the terminal has the genotype and how much it changed; the tables of A stay in log.txt
    assert 'importance normal' in log and 'importance normal' not in out
    assert 'choices (op or input) changed since epoch 1' in out
    assert f'its files, in {save}' in out and f'next: python visualize.py {save}' in out


def test_cifar_divergence_without_a_checkpoint_says_so_and_its_advice_finishes(tmp_path, capsys):
    args = CIFAR + ['--epochs', '1', '--learning_rate', '1e6', '--save', tmp_path / 'c']
    assert run(train_cifar.main, args) == 2
    err = error(capsys)
    assert 'at epoch 1, step' in err and 'no checkpoint was written yet' in err and 'kept' not in err
    assert not (tmp_path / 'c' / 'checkpoint.pt').exists()
    advice = re.search(r'run the same command again with `([^`]+)`', err).group(1)
    assert advice == '--learning_rate 0.00208333'  # the recipe's default: DARTS's 0.025 at batch 96, at batch 8
    assert run(train_cifar.main, args + advice.split()) == 0
    assert runs.load_checkpoint(str(tmp_path / 'c' / 'checkpoint.pt'))['epoch'] == 1
