"""ADWPNAS macro search (Zhang, Chen, Gu, arXiv 2003.01335; docs/adwpnas.md).

Stage 0 is an ordinary DARTS search (`train_search.py --space darts --lambda_at 0`). This script reads its
search_log.jsonl (--space_from), keeps the intensive space of the epoch with the highest superiority
(Eq. 2-3; or takes one with --intensive_space), then runs Algorithm 1 on a HyperNetwork with one set of
architecture parameters per cell. The phase is a pure function of the epoch (`phase`):

- train  (e < --hyper_epochs):            random alpha every step; SGD on w_G and the ordinary weights;
- basic  (the other epochs):              Adam on alpha through the predicted weights; weights frozen;
- cross  (--cross_start <= e < --cross_end): both, from one backward pass.

Writes SAVE/intensive_space.json, SAVE/search_log.jsonl (one record per epoch), SAVE/genotype.json (the
per-layer genotype of alpha*, the best validation epoch under the final generator, D9), SAVE/checkpoint.pt
(every epoch, atomic; --resume continues across phase boundaries) and SAVE/log.txt.

    python train_search.py --space darts --lambda_at 0 --layers 8 --batch_size 200 --epochs 30 \\
        --arch_learning_rate 3e-4 --learning_rate_min 0.001 --save runs/adwp-space8          # stage 0
    python search_adwp.py --space_from runs/adwp-space8/search_log.jsonl --layers 8 --save runs/adwp8
    python train_cifar.py --genotype_file runs/adwp8/genotype.json --init_channels 36 --batch_size 98 \\
        --epochs 1000 --learning_rate 0.025 --drop_path_prob 0.2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import datasets
import genotypes
import model_adwp
import runs
import utils
from genotypes import DARTS_PRIMITIVES, STEPS
from model_adwp import GEN_INPUTS, HyperNetwork, SpaceError, check_space

PHASES = ('train', 'basic', 'cross')
# (g_G, g_alpha): which parameters a phase updates (Alg. 1, Fig. 3)
GATES = {'train': (True, False), 'basic': (False, True), 'cross': (True, True)}
STAGE0 = '`python train_search.py --space darts --lambda_at 0`'
DEFAULT_SAVE = 'runs/adwp'
DEFAULT_LEARNING_RATE, DEFAULT_ARCH_LEARNING_RATE = 0.025, 3e-4  # Sec. 4.2 (DARTS's)
# The flags that may change when a search resumes, as in train_search.py; they take effect from the resumed
# epoch. Every other flag defines the run and must match the checkpoint's (the intensive space is compared
# itself, so it may come from --space_from or from the run's own intensive_space.json).
RESUME_MAY_CHANGE = ('learning_rate', 'learning_rate_min', 'arch_learning_rate', 'momentum', 'weight_decay',
                     'arch_weight_decay', 'grad_clip', 'workers', 'report_freq', 'gpu', 'device', 'data', 'save',
                     'resume', 'space_from', 'intensive_space', 'n', 'no_download')
# What every checkpoint of this script holds (runs.load_resume refuses one without them as damaged).
CHECKPOINT_KEYS = ('epoch', 'model', 'optimizer', 'arch_optimizer', 'scheduler', 'settings', 'best')
# What a search resumed into another --save carries over from its checkpoint's folder (runs.carry_over).
RUN_FILES = ('search_log.jsonl', 'log.txt', 'genotype.json', 'intensive_space.json')


def parse_args(argv=None) -> argparse.Namespace:
    p = utils.ArgumentParser(description=__doc__.split('\n\n')[0])
    src = p.add_argument_group('intensive space (give one)')
    src.add_argument('--space_from', default=None, metavar='SEARCH_LOG',
                     help=f'search_log.jsonl of a stage-0 search, {STAGE0}')
    src.add_argument('--intensive_space', default=None, metavar='JSON',
                     help='intensive_space.json of an earlier run (skips the selection)')
    p.add_argument('--K', type=int, default=6, help='candidates kept per node (Sec. 4.1)')
    p.add_argument('--n', type=int, default=2, help='epochs the superiority looks back (Eq. 3, Sec. 4.1)')
    p.add_argument('--T', type=int, default=2, help='candidates kept per node in the result (Sec. 3.2.2)')
    p.add_argument('--data', default='data', help='where CIFAR lives (torchvision layout)')
    p.add_argument('--no_download', action='store_true',
                   help='never download CIFAR (by default a missing CIFAR-10/100 is downloaded into --data)')
    p.add_argument('--dataset', default='cifar10', help=f'{" | ".join(datasets.DATASETS)}')
    p.add_argument('--synthetic_size', type=int, default=512, help='images of --dataset synthetic')
    p.add_argument('--train_portion', type=float, default=0.5, help='share of the train set that trains (DARTS)')
    p.add_argument('--layers', type=int, default=8, help='cells of the HyperNetwork (the searched depth)')
    p.add_argument('--init_channels', type=int, default=16, help='channels of the first cells (DARTS)')
    p.add_argument('--gen_input', default='cell',
                   help='GeneratingBlock input: cell (all of p_l) | op (its own op probability), D3')
    p.add_argument('--gen_hidden', type=int, default=64, help='GeneratingBlock hidden width (Sec. 4.2)')
    p.add_argument('--alpha_std', type=float, default=1.0, help='std of the random alphas of the train phase (D2)')
    p.add_argument('--arch_split', default='train', help='data of the alpha step: train (Alg. 1) | val (D8)')
    p.add_argument('--hyper_epochs', type=int, default=60, help='I_train: epochs of HyperNetwork training (D1)')
    p.add_argument('--cross_start', type=int, default=90, help='I_cs^start: first cross-search epoch')
    p.add_argument('--cross_end', type=int, default=100, help='I_cs^end: first epoch after cross-search')
    p.add_argument('--epochs', type=int, default=120, help='I_total')
    p.add_argument('--batch_size', type=int, default=98, help='Sec. 4.2')
    p.add_argument('--learning_rate', type=float, default=DEFAULT_LEARNING_RATE, help='w_G and weights: SGD, cosine')
    p.add_argument('--learning_rate_min', type=float, default=0.0, help='end of the cosine schedule (D10)')
    p.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    p.add_argument('--weight_decay', type=float, default=3e-4, help='w_G and weights')
    p.add_argument('--grad_clip', type=float, default=5.0, help='gradient-norm clip of the weights (DARTS)')
    p.add_argument('--arch_learning_rate', type=float, default=DEFAULT_ARCH_LEARNING_RATE,
                   help='alpha: Adam, betas (0.5, 0.999)')
    p.add_argument('--arch_weight_decay', type=float, default=1e-3, help='alpha')
    p.add_argument('--seed', type=int, default=2, help='seeds weights, alphas, batches and augmentation')
    p.add_argument('--gpu', type=int, default=0, help='CUDA device')
    p.add_argument('--device', default=None, help='cpu to run on the CPU')
    p.add_argument('--workers', type=int, default=2, help='data-loading processes')
    p.add_argument('--report_freq', type=int, default=50, help='steps between progress lines')
    p.add_argument('--save', default=None,
                   help=f'output folder: log, intensive_space.json, search_log.jsonl, genotype.json, checkpoint '
                        f'(default: {DEFAULT_SAVE}, or the folder of --resume PATH)')
    p.add_argument('--resume', nargs='?', const='', default=None,
                   help='continue from a checkpoint (default: SAVE/checkpoint.pt)')
    return p.parse_args(argv)


def phase(epoch: int, hyper_epochs: int = 60, cross_start: int = 90, cross_end: int = 100) -> str:
    """The phase of 0-based `epoch` (Alg. 1; docs/adwpnas.md): 'train', 'cross' or 'basic'."""
    if epoch < hyper_epochs:
        return 'train'
    if cross_start <= epoch < cross_end:
        return 'cross'
    return 'basic'


def first_selectable(hyper_epochs: int, cross_start: int, cross_end: int) -> int:
    """The first epoch whose alpha can become alpha* (D9): the generator no longer changes after it, i.e.
    from cross_end on, or from hyper_epochs on when there is no cross-search (Fig. 5's blue run)."""
    return cross_end if cross_start < cross_end else hyper_epochs


def stage0_command(args) -> str:
    """The stage-0 search, as a command to run on this machine and data (runs.command)."""
    return f'`{runs.command("train_search.py", args, space="darts", lambda_at=0)}`'


def check_args(args) -> None:
    """Bad flag values become one-sentence errors."""
    if (args.space_from is None) == (args.intensive_space is None):
        raise utils.UserError(f'give exactly one of --space_from SEARCH_LOG (the log of a stage-0 search, '
                              f'{stage0_command(args)}) and --intensive_space JSON')
    if args.dataset not in datasets.DATASETS:
        raise utils.UserError(f'unknown --dataset {args.dataset!r}; choose one of {", ".join(datasets.DATASETS)}')
    if args.gen_input not in GEN_INPUTS:
        raise utils.UserError(f'unknown --gen_input {args.gen_input!r}; choose one of {", ".join(GEN_INPUTS)}')
    if args.arch_split not in ('train', 'val'):
        raise utils.UserError(f'unknown --arch_split {args.arch_split!r}; choose train or val')
    if args.layers < 3:
        raise utils.UserError(f'--layers {args.layers} is too few: the HyperNetwork needs at least 3 cells '
                              f'(two of them reduction cells)')
    for flag in ('epochs', 'batch_size', 'init_channels', 'synthetic_size', 'gen_hidden', 'K'):
        if getattr(args, flag) < 1:
            raise utils.UserError(f'--{flag} must be at least 1, got {getattr(args, flag)}')
    if args.n < 0:
        raise utils.UserError(f'--n must be at least 0, got {args.n}')
    if args.T != 2:
        raise utils.UserError(f'--T {args.T} is not supported: the evaluation networks build DARTS\'s cell, '
                              f'two inputs per node, so only --T 2 gives a genotype that train_cifar.py builds')
    if args.K < args.T:
        raise utils.UserError(f'--K {args.K} keeps fewer candidates per node than the --T {args.T} picked')
    if not (0 <= args.hyper_epochs <= args.cross_start <= args.cross_end <= args.epochs):
        raise utils.UserError(f'the phase boundaries must satisfy 0 <= --hyper_epochs <= --cross_start <= '
                              f'--cross_end <= --epochs, got {args.hyper_epochs}, {args.cross_start}, '
                              f'{args.cross_end}, {args.epochs}')
    if first_selectable(args.hyper_epochs, args.cross_start, args.cross_end) >= args.epochs:
        raise utils.UserError(f'no basic-search epoch follows the last update of the generator (--cross_end '
                              f'{args.cross_end}, --epochs {args.epochs}), so alpha* cannot be chosen; raise '
                              f'--epochs, or pass --cross_start {args.epochs} --cross_end {args.epochs} for a run '
                              f'without cross-search')
    if not (args.alpha_std > 0 and math.isfinite(args.alpha_std)):
        raise utils.UserError(f'--alpha_std must be a positive number, got {args.alpha_std}')


# ---------------------------------------------------------------------------------------------------------
# Stage 0: the intensive space from a DARTS search log


def read_stage0_log(path: str, n: int, stage0: str = STAGE0) -> tuple[list, list, list, str]:
    """(weights, accuracies, epochs, accuracy key) of a stage-0 search_log.jsonl: per epoch the softmaxed (alphas_normal,
    alphas_reduce), epsilon of Eq. 3 and the epoch number. Epsilon is `val_acc_end` / 100: the supernet's top-1
    over the whole held-out half at the end of the epoch, in eval mode (DARTS's `infer`), never the test set.
    A log written before train_search.py logged it has only `val_acc`, the running mean of the minibatch
    accuracies of the epoch's A steps; it is used then, and `stage0_accuracy_key` says so. `stage0` is the
    command of such a search that the errors give."""
    if not os.path.isfile(path):
        raise utils.UserError(f'--space_from {path} does not exist; give the search_log.jsonl of a stage-0 '
                              f'search, {stage0}')
    records = []
    with open(path) as f:
        for k, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise utils.UserError(f'line {k} of {path} is not JSON; --space_from needs the search_log.jsonl '
                                      f'that {stage0} writes') from None
    for k, r in enumerate(records, 1):
        fault = stage0_fault(r)
        if fault:
            where = f'epoch {r["epoch"]}' if isinstance(r, dict) and 'epoch' in r else f'line {k}'
            raise utils.UserError(f'{path} cannot be a stage-0 log: {where} {fault}; ADWPNAS needs the '
                                  f'search_log.jsonl of {stage0}')
    if len(records) <= n:
        raise utils.UserError(f'{path} holds {len(records)} epoch(s), but the superiority window (--n {n}) needs '
                              f'at least {n + 1}; run the stage-0 search for at least {n + 1} epochs (the paper: '
                              f'30) or lower --n')
    weights = [(r['alphas_normal'], r['alphas_reduce']) for r in records]
    key = stage0_accuracy_key(records)
    return weights, [r[key] / 100. for r in records], [r['epoch'] for r in records], key


def stage0_accuracy_key(records: list[dict]) -> str:
    """'val_acc_end' when every epoch of the stage-0 log has it (Eq. 3's epsilon), else 'val_acc'."""
    return 'val_acc_end' if records and all('val_acc_end' in r for r in records) else 'val_acc'


def stage0_fault(record) -> str | None:
    """What makes one search_log.jsonl record unfit for stage 0 (a DARTS-space search with architecture
    parameters over DARTS's 8 ops), in words; None when it fits."""
    if not isinstance(record, dict):
        return f'is a JSON {type(record).__name__}, not a search record'
    space, method = record.get('space'), record.get('method')
    if space not in (None, 'darts'):
        return f'comes from a --space {space} search'
    if method not in (None, 'darts', 'eoinas', 'gdas') and 'alphas_normal' not in record:
        return f'comes from a --method {method} search, which has no architecture parameters A'
    ops = record.get('primitives')
    if ops is not None and ops != DARTS_PRIMITIVES:
        extra, missing = sorted(set(ops) - set(DARTS_PRIMITIVES)), sorted(set(DARTS_PRIMITIVES) - set(ops))
        what = '; '.join(t for t in (extra and f'it has {", ".join(extra)}',
                                     missing and f'it lacks {", ".join(missing)}') if t)
        return f'searched over other ops than DARTS\'s 8 ({what or "in another order"})'
    lacking = [k for k in ('epoch', 'val_acc', 'alphas_normal', 'alphas_reduce', 'primitives') if k not in record]
    if lacking:
        return f'lacks {", ".join(lacking)} (it is not a train_search.py record)'
    rows = sum(2 + j for j in range(STEPS))
    for k in ('alphas_normal', 'alphas_reduce'):
        if _shape(record[k]) != (rows, len(DARTS_PRIMITIVES)):
            shape = _shape(record[k])
            return (f'has {k} of shape {"x".join(map(str, shape)) if shape else "(not a matrix)"}, not {rows} edges x '
                    f'{len(DARTS_PRIMITIVES)} ops')
    return None


def _shape(x) -> tuple | None:
    if not isinstance(x, list) or not x or not all(isinstance(row, list) for row in x):
        return None
    return (len(x), len(x[0])) if len({len(row) for row in x}) == 1 else None


def intensive_space(args) -> dict:
    """{'space', 'K', 'n', 'epoch', 'table', 'source'}: selected from --space_from, or read from
    --intensive_space (a file this script wrote, or a bare {"normal", "reduce"} object)."""
    if args.space_from is not None:
        weights, accs, epochs, key = read_stage0_log(args.space_from, args.n, stage0_command(args))
        chosen = model_adwp.select_intensive_space(weights, accs, args.K, args.n, epochs)
        return {**chosen, 'source': os.path.abspath(args.space_from), 'accuracy': key}
    path = args.intensive_space
    if not os.path.isfile(path):
        raise utils.UserError(f'--intensive_space {path} does not exist; pass the intensive_space.json of an '
                              f'earlier search_adwp.py run, or use --space_from')
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise utils.UserError(f'--intensive_space {path} is not valid JSON ({e})') from None
    raw = data.get('space', data) if isinstance(data, dict) else data
    try:
        space = check_space(raw, None, path)
    except SpaceError as e:
        raise utils.UserError(str(e)) from None
    K = len(space['normal'][0])
    if K != args.K:
        raise utils.UserError(f'{path} keeps {K} candidates per node but --K is {args.K}; pass --K {K}')
    return {'K': K, 'n': data.get('n'), 'epoch': data.get('epoch'), 'space': space,
            'table': data.get('table', []), 'source': os.path.abspath(path)}


def space_json(space: dict) -> dict:
    return {kind: [[list(c) for c in node] for node in cell] for kind, cell in space.items()}


# ---------------------------------------------------------------------------------------------------------
# One step and one epoch


def adwp_step(model: HyperNetwork, phase_name: str, x, y, w_opt, a_opt, *, alpha_gen=None,
              alpha_std: float = 1., grad_clip: float = 5., arch_batch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of Alg. 1 in `phase_name`; returns the detached (loss, correct count) of the batch learnt from.

    train: alpha is a fresh draw of N(0, alpha_std^2) (D2); the loss updates the weights only.
    basic: alpha is the parameter; the loss updates alpha only (the weights stay bit-identical).
    cross: one backward pass feeds both optimisers.
    With `arch_batch` (--arch_split val, D8), alpha takes its step on that batch first, and the train
    batch then updates the weights only (cross) or is not used (basic).
    """
    model.train()
    update_w, update_a = GATES[phase_name]
    alphas = model.alphas if update_a else model.sample_alphas(alpha_std, alpha_gen)
    if update_a and arch_batch is not None:
        xa, ya = arch_batch
        a_opt.zero_grad(set_to_none=True)
        logits = model(xa, alphas)
        loss = F.cross_entropy(logits, ya)
        loss.backward(inputs=model.arch_parameters())
        a_opt.step()
        if not update_w:
            return loss.detach(), (logits.detach().argmax(1) == ya).sum()
        update_a = False
    weights = model.weights()
    inputs = (weights if update_w else []) + (model.arch_parameters() if update_a else [])
    w_opt.zero_grad(set_to_none=True)
    a_opt.zero_grad(set_to_none=True)
    logits = model(x, alphas)
    loss = F.cross_entropy(logits, y)
    loss.backward(inputs=inputs)
    if update_w:
        if grad_clip:
            nn.utils.clip_grad_norm_(weights, grad_clip)
        w_opt.step()
    if update_a:
        a_opt.step()
    return loss.detach(), (logits.detach().argmax(1) == y).sum()


def train_epoch(model, phase_name, loader, w_opt, a_opt, *, device, alpha_gen, alpha_std, grad_clip,
                arch_loader=None, progress=None, epoch=0, has_checkpoint=False, loss_limit=math.inf,
                checkpoint='', retry='') -> tuple[float, float]:
    """One epoch of adwp_step; returns (mean loss, top-1 %) of the batches learnt from. A loss that is not
    finite or above `loss_limit` stops the run (utils.check_loss; `retry`: the advice's flags)."""
    loss_sum, correct, seen = 0., 0., 0
    arch_iter = iter(arch_loader) if arch_loader is not None else None
    for step, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        arch_batch = None
        if arch_iter is not None:
            try:
                xa, ya = next(arch_iter)
            except StopIteration:  # the validation half is shorter: cycle it
                arch_iter = iter(arch_loader)
                xa, ya = next(arch_iter)
            arch_batch = (xa.to(device, non_blocking=True), ya.to(device, non_blocking=True))
        loss, right = adwp_step(model, phase_name, x, y, w_opt, a_opt, alpha_gen=alpha_gen, alpha_std=alpha_std,
                                grad_clip=grad_clip, arch_batch=arch_batch)
        value, right = torch.stack([loss.float(), right.float()]).tolist()  # the one sync per step
        utils.check_loss({f'{phase_name}_loss': value}, loss_limit, epoch=epoch, step=step,
                         kept=epoch if has_checkpoint else 0, checkpoint=checkpoint, retry=retry)
        n = x.shape[0] if arch_batch is None or GATES[phase_name][0] else arch_batch[0].shape[0]
        loss_sum, correct, seen = loss_sum + value * n, correct + right, seen + n
        if progress is not None:
            progress.step(step, n, f'loss {loss_sum / seen:.3f} top1 {100 * correct / seen:.2f}')
    return loss_sum / seen, 100 * correct / seen


@torch.no_grad()
def evaluate(model: HyperNetwork, loader, device, alphas=None, alpha_gen=None,
             alpha_std: float = 1.) -> tuple[float, float]:
    """(loss, top-1 %) over the loader with predicted weights: for `alphas` (kernels generated once), or,
    with alphas None, a fresh random alpha per batch (the train phase's distribution)."""
    model.eval()  # every BN uses batch statistics anyway (D7)
    fixed = None
    if alphas is not None:
        p = model.probabilities(alphas)
        alive = None if bool(torch.isfinite(alphas).all()) else (p > 0).flatten(1).tolist()
        fixed = (p, model.generate(p, alive), alive)
    loss_sum, correct, seen = 0., 0., 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if fixed is not None:
            logits = model.run(x, *fixed[:2], fixed[2])
        else:
            logits = model(x, model.sample_alphas(alpha_std, alpha_gen))
        loss_sum += F.cross_entropy(logits, y, reduction='sum').item()
        correct += (logits.argmax(1) == y).sum().item()
        seen += x.shape[0]
    return loss_sum / seen, 100 * correct / seen


def alpha_generator(g: torch.Generator) -> torch.Generator:
    """The epoch's generator of Stage-1 alphas: its own stream (not the global RNG, which the augmentation
    of --workers 0 also draws from), seeded from the epoch's seed and apart from every loader seed."""
    return torch.Generator().manual_seed(2 ** 32 + g.initial_seed())


# ---------------------------------------------------------------------------------------------------------
# The run


def settings_of(args, space: dict) -> dict:
    """What must match when a search resumes."""
    keys = ('dataset', 'synthetic_size', 'train_portion', 'layers', 'init_channels', 'K', 'T', 'gen_input',
            'gen_hidden', 'alpha_std', 'arch_split', 'hyper_epochs', 'cross_start', 'cross_end', 'epochs',
            'batch_size', 'seed')
    return {**{k: getattr(args, k) for k in keys}, 'intensive_space': space_json(space)}


def retry_flags(args, phase_name: str) -> str:
    """The divergence advice's flags: the learning rate of what the phase trains (the weights in train,
    alpha in basic, both in cross)."""
    flags = []
    if GATES[phase_name][0]:
        flags.append(f'--learning_rate {utils.retry_learning_rate(args.learning_rate, DEFAULT_LEARNING_RATE):g}')
    if GATES[phase_name][1]:
        rate = utils.retry_learning_rate(args.arch_learning_rate, DEFAULT_ARCH_LEARNING_RATE)
        flags.append(f'--arch_learning_rate {rate:g}')
    return ' '.join(flags)


def importance(p: torch.Tensor, space: dict, reductions) -> dict:
    """Each cell's softmax(alpha_l) as every method's search log holds importance: {'cell l': edges x ops},
    rows the 14 edges of DARTS's cell, columns DARTS_PRIMITIVES, each of a node's K candidates (op, input)
    at its edge and op, 0 where no candidate is."""
    offsets = [sum(k + 2 for k in range(j)) for j in range(STEPS)]
    out = {}
    for cell, probs in enumerate(p.tolist()):
        matrix = [[0.] * len(DARTS_PRIMITIVES) for _ in range(offsets[-1] + STEPS + 1)]
        for j, node in enumerate(space['reduce' if cell in reductions else 'normal']):
            for (op, i), value in zip(node, probs[j]):
                matrix[offsets[j] + i][DARTS_PRIMITIVES.index(op)] = round(value, 6)
        out[f'cell {cell}'] = matrix
    return out


@runs.holds_folder_lock
def main(argv=None) -> dict:
    started = time.time()
    args = parse_args(argv)
    check_args(args)
    # --resume PATH without --save goes on in the checkpoint's own folder
    args.save, args.resume = runs.run_folder(args.save, args.resume, 'adwp', default=DEFAULT_SAVE)
    ckpt_path = os.path.join(args.save, 'checkpoint.pt')
    ckpt, changed = None, {}
    if args.resume:  # before the intensive space: a foreign checkpoint is named first
        ckpt = runs.load_resume(args.resume, 'search_adwp.py', CHECKPOINT_KEYS)
    chosen = intensive_space(args)
    space = chosen['space']
    settings = settings_of(args, space)
    if ckpt is not None:
        with runs.restoring(args.resume):
            for key, value in settings.items():
                runs.check_same(key, ckpt['settings'].get(key), value, args.resume)
            changed = runs.resume_flags(ckpt, args, RESUME_MAY_CHANGE, args.resume)
    device = utils.get_device(args.gpu, args.device)
    data = datasets.get_dataset(args.dataset, args.data, train=True, synthetic_size=args.synthetic_size,
                                download=not args.no_download)
    # the per-epoch accuracy (and alpha*) measures the held-out half as it is, without random augmentation
    plain = datasets.get_dataset(args.dataset, args.data, train=True, synthetic_size=args.synthetic_size,
                                 augment=False, download=False)
    train_idx, val_idx = datasets.search_split(len(data), args.train_portion)

    if ckpt is not None:  # resumed into another --save: the run's history goes with it
        runs.carry_over(args.resume, args.save, RUN_FILES)
    logger = runs.get_logger(args.save, 'search_adwp')
    logger.info('args = %s', vars(args))
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    runs.write_json(os.path.join(args.save, 'intensive_space.json'),
                     {'K': chosen['K'], 'n': chosen['n'], 'epoch': chosen['epoch'], 'source': chosen['source'],
                      'accuracy': chosen.get('accuracy'),
                      'space': space_json(space), 'table': chosen['table']})
    logger.info('intensive space (K = %d) from %s, epoch %s', chosen['K'], chosen['source'], chosen['epoch'])
    if chosen.get('accuracy') == 'val_acc':
        logger.info('the stage-0 log has no val_acc_end (it predates it): Eq. 3\'s epsilon is its val_acc, the '
                    'running mean of the A steps\' minibatch accuracies, not the held-out top-1 at the epoch\'s end')
    for row in chosen['table']:
        s = row['superiority']
        logger.info('  stage-0 epoch %3d  epsilon %.4f  superiority %s', row['epoch'], row['accuracy'],
                    '-' if s is None else f'{s:.4f}')
    for kind in ('normal', 'reduce'):
        for j, node in enumerate(space[kind]):
            logger.info('  %s node %d: %s', kind, j + 2, ', '.join(f'{op}<-{i}' for op, i in node))

    utils.set_seed(args.seed)
    model = HyperNetwork(args.init_channels, datasets.NUM_CLASSES[args.dataset], args.layers, space,
                         args.gen_input, args.gen_hidden).to(device)
    w_opt = torch.optim.SGD(model.weights(), args.learning_rate, momentum=args.momentum,
                            weight_decay=args.weight_decay)
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=args.arch_learning_rate, betas=(0.5, 0.999),
                             weight_decay=args.arch_weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, float(args.epochs), eta_min=args.learning_rate_min)
    n_gen = sum(p.numel() for p in model.generator_parameters())
    n_all = sum(p.numel() for p in model.weights())
    logger.info('HyperNetwork: %d cells, %d channels, alphas %s; w_G %d weights in %d GeneratingBlocks, '
                'ordinary weights %d', args.layers, args.init_channels, tuple(model.alphas.shape), n_gen,
                sum(len(c.generators) for c in model.cells), n_all - n_gen)
    logger.info('macro space: C(%d, %d)^(4 x %d) = %.2e architectures; phases: train [0, %d), basic, cross [%d, '
                '%d), basic to %d', args.K, args.T, args.layers, model_adwp.macro_space_size(args.K, args.T, STEPS, args.layers),
                args.hyper_epochs, args.cross_start, args.cross_end, args.epochs)

    log_path = os.path.join(args.save, 'search_log.jsonl')
    geno_path = os.path.join(args.save, 'genotype.json')
    start_epoch = 0
    best = {'epoch': None, 'val_acc': None, 'alphas': None}
    if ckpt is not None:
        with runs.restoring(args.resume):  # the flags' momentum, weight decay, ... replace the checkpoint's
            model.load_state_dict(ckpt['model'])
            runs.load_optimizer(w_opt, ckpt['optimizer'])
            runs.load_optimizer(a_opt, ckpt['arch_optimizer'], scheduled=False)
            scheduler.load_state_dict(ckpt['scheduler'])
            best = dict(ckpt['best'])
            start_epoch = int(ckpt['epoch'])
        if {'learning_rate', 'learning_rate_min'} & set(changed):  # the cosine schedule goes on as if the run
            scheduler.eta_min = args.learning_rate_min               # had started with them
            runs.set_learning_rate(w_opt, scheduler, args.learning_rate)
        dropped = runs.trim_jsonl(log_path, start_epoch)
        runs.log_resumed(logger, args.resume, start_epoch, args.epochs, changed, dropped, log_path)
    elif os.path.exists(log_path):
        os.remove(log_path)  # left by a run that stopped before its first checkpoint

    pin = device.type == 'cuda'
    train_data = torch.utils.data.Subset(data, train_idx)
    val_data = torch.utils.data.Subset(data, val_idx)
    val_loader = datasets.make_loader(torch.utils.data.Subset(plain, val_idx), args.batch_size, False,
                                      args.workers, pin=pin)
    limit = utils.loss_limit(datasets.NUM_CLASSES[args.dataset])
    select_from = first_selectable(args.hyper_epochs, args.cross_start, args.cross_end)
    for epoch in range(start_epoch, args.epochs):
        name = phase(epoch, args.hyper_epochs, args.cross_start, args.cross_end)
        g = utils.seed_epoch(args.seed, epoch)
        alpha_gen = alpha_generator(g)
        train_loader = datasets.make_loader(train_data, args.batch_size, True, args.workers, generator=g, pin=pin)
        arch_loader = None
        if args.arch_split == 'val' and GATES[name][1]:
            arch_loader = datasets.make_loader(val_data, args.batch_size, True, args.workers, generator=g, pin=pin)
        lr = scheduler.get_last_lr()[0]
        logger.info('epoch %d/%d (%s) lr %e', epoch + 1, args.epochs, name, lr)
        start = time.time()
        progress = utils.Progress(len(train_loader), args.report_freq, logger, prefix=f'epoch {epoch + 1} ')
        train_loss, train_acc = train_epoch(
            model, name, train_loader, w_opt, a_opt, device=device, alpha_gen=alpha_gen, alpha_std=args.alpha_std,
            grad_clip=args.grad_clip, arch_loader=arch_loader, progress=progress, epoch=epoch,
            has_checkpoint=epoch > 0, loss_limit=limit, checkpoint=ckpt_path, retry=retry_flags(args, name))
        scheduler.step()
        # the train phase has no alpha of its own: its val figure is the mean over random architectures
        val_loss, val_acc = evaluate(model, val_loader, device, None if name == 'train' else model.alphas.detach(),
                                     alpha_gen, args.alpha_std)
        # no checkpoint of a diverged state: the weights about to be saved must be finite and their loss sane
        utils.check_state({'model': model.state_dict(), 'optimizer': w_opt.state_dict(),
                           'arch_optimizer': a_opt.state_dict()}, {'val_loss': val_loss}, limit, epoch=epoch,
                          kept=epoch, checkpoint=ckpt_path, retry=retry_flags(args, name))
        seconds = time.time() - start
        genotype = genotypes.validate(model.genotype(args.T))
        selectable = epoch >= select_from
        if selectable and (best['val_acc'] is None or val_acc >= best['val_acc']):  # ties: the later epoch (D9)
            best = {'epoch': epoch + 1, 'val_acc': val_acc, 'alphas': model.alphas.detach().cpu().clone()}
        logger.info('epoch %d (%s): train_loss %.4f train_acc %.2f val_loss %.4f val_acc %.2f (%.1f s)%s',
                    epoch + 1, name, train_loss, train_acc, val_loss, val_acc, seconds,
                    f'; alpha* from epoch {best["epoch"]} (val_acc {best["val_acc"]:.2f})' if best['epoch'] else '')
        p = model.probabilities(model.alphas.detach().cpu().double())
        record = {'epoch': epoch + 1, 'epochs': args.epochs, 'method': 'adwpnas', 'phase': name, 'lr': lr,
                  'train_loss': train_loss, 'train_acc': train_acc, 'val_loss': val_loss, 'val_acc': val_acc,
                  'seconds': seconds, 'selectable': selectable, 'best_epoch': best['epoch'],
                  'alphas': p.numpy().round(6).tolist(), 'genotype': json.loads(genotypes.to_json(genotype)),
                  # what every method's log holds: per-cell importance over (edge, op), with the primitives
                  'primitives': list(DARTS_PRIMITIVES), 'reduction_cells': model.reduction_layers,
                  'importance': importance(p, space, model.reduction_layers),
                  'cell_genotypes': [[list(pair) for pair in cell] for cell in genotype.cells]}
        runs.append_jsonl(log_path, record)
        if best['epoch'] == epoch + 1:
            genotypes.save(genotype, geno_path)
        runs.save_checkpoint({'epoch': epoch + 1, 'model': model.state_dict(), 'optimizer': w_opt.state_dict(),
                               'arch_optimizer': a_opt.state_dict(), 'scheduler': scheduler.state_dict(),
                               'settings': settings, 'best': best, 'args': vars(args),
                               'script': 'search_adwp.py'}, ckpt_path)

    final = genotypes.validate(model.genotype(args.T, best['alphas']))
    logger.info('final genotype: alpha* from epoch %d (val_acc %.2f); train it with train_cifar.py --genotype_file '
                '%s, or paste:\n%s', best['epoch'], best['val_acc'], geno_path, genotypes.macro_repr(final))
    retrain = runs.command('train_cifar.py', args, genotype_file=geno_path)  # on this machine and data
    runs.report_run(logger, args.save, [
        ('log.txt', 'the log: the intensive space, every epoch\'s phase, losses and accuracies'),
        ('intensive_space.json', 'the K candidates per node kept from stage 0 (--intensive_space reuses it)'),
        ('search_log.jsonl', 'one record per epoch: phase, losses, accuracies, alpha, genotype'),
        ('genotype.json', f'the per-layer genotype of alpha* (epoch {best["epoch"]})'),
        ('checkpoint.pt', 'the last epoch (--resume)'),
    ], [f'{runs.command("visualize.py", None, args.save)}    # draw every layer\'s cell and each cell\'s alpha',
        f'{retrain}    # retrain it, with ADWPNAS\'s settings'], started)
    return {'genotype': final, 'best_epoch': best['epoch'], 'best_val_acc': best['val_acc']}


# ---------------------------------------------------------------------------------------------------------
# The ranking check (docs/adwpnas.md): do predicted weights rank architectures as training from scratch does?


def kendall_tau(a: list, b: list) -> float:
    """Kendall's tau-b of two equally long sequences (ties in either count as neither concordant nor
    discordant; tau-b corrects the denominator for them). nan when either sequence is constant."""
    n = len(a)
    concordant = discordant = ties_a = ties_b = 0
    for i in range(n):
        for j in range(i + 1, n):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return (concordant - discordant) / denom if denom else float('nan')


def random_tau_band(scratch: list, draws: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """The central `level` interval of Kendall's tau between `scratch` and a uniformly random ranking of the
    same architectures (seeded permutations of the indices; ties in `scratch` count as in `kendall_tau`): a
    tau inside it is what a predictor with no information gives."""
    g = torch.Generator().manual_seed(seed)
    taus = sorted(kendall_tau(torch.randperm(len(scratch), generator=g).tolist(), scratch) for _ in range(draws))
    taus = [t for t in taus if not math.isnan(t)] or [float('nan')]
    lo = taus[int((1 - level) / 2 * (len(taus) - 1))]
    hi = taus[math.ceil((1 + level) / 2 * (len(taus) - 1))]
    return lo, hi


def ranking_check(space: dict, *, archs: int = 20, layers: int = 5, C: int = 8, hyper_epochs: int = 3,
                  scratch_epochs: int = 3, batch_size: int = 32, dataset: str = 'synthetic', data_root: str = 'data',
                  synthetic_size: int = 512, seed: int = 0, device=None, logger=None) -> dict:
    """Do predicted weights rank architectures as training from scratch does (docs/adwpnas.md)?

    Trains a HyperNetwork for `hyper_epochs` of Stage 1, then, for `archs` random discrete architectures
    (top-2 of random alphas per node), compares three val top-1s on the held-out half (no augmentation):
    - predicted: the HyperNetwork's predicted weights (D14);
    - control: the same network with the GeneratingBlocks reset to their untrained initial weights (the
      trained ordinary weights kept), so that what predicted weights add over the shared weights shows;
    - scratch: NetworkCIFAR trained from scratch for `scratch_epochs` on the same training half.
    Returns the rows, Kendall's tau of predicted and of control against scratch, the 95% band of tau under
    random rankings (`random_tau_band`) and the chance accuracy.
    """
    from model import NetworkCIFAR
    device = device or torch.device('cpu')
    data = datasets.get_dataset(dataset, data_root, train=True, synthetic_size=synthetic_size)
    plain = datasets.get_dataset(dataset, data_root, train=True, synthetic_size=synthetic_size, augment=False)
    train_idx, val_idx = datasets.search_split(len(data), 0.5)
    train_data = torch.utils.data.Subset(data, train_idx)
    val_loader = datasets.make_loader(torch.utils.data.Subset(plain, val_idx), batch_size, False, 0)
    num_classes = datasets.NUM_CLASSES[dataset]

    utils.set_seed(seed)
    model = HyperNetwork(C, num_classes, layers, space).to(device)
    untrained = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith('cells.') and
                 '.generators.' in n}
    w_opt = torch.optim.SGD(model.weights(), 0.025, momentum=0.9, weight_decay=3e-4)
    a_opt = torch.optim.Adam(model.arch_parameters(), 3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, float(hyper_epochs))
    for epoch in range(hyper_epochs):
        g = utils.seed_epoch(seed, epoch)
        loader = datasets.make_loader(train_data, batch_size, True, 0, generator=g)
        loss, acc = train_epoch(model, 'train', loader, w_opt, a_opt, device=device, alpha_gen=alpha_generator(g),
                                alpha_std=1., grad_clip=5.)
        sched.step()
        if logger:
            logger.info(f'stage 1 epoch {epoch + 1}/{hyper_epochs}: loss {loss:.3f} top1 {acc:.2f}')
    control = HyperNetwork(C, num_classes, layers, space).to(device)
    control.load_state_dict({**model.state_dict(), **untrained})

    sampler = torch.Generator().manual_seed(seed + 12345)
    rows = []
    for k in range(archs):
        genotype = genotypes.validate(model.genotype(2, model.sample_alphas(1., sampler)))
        alphas = model.discrete_alphas(genotype)
        predicted = evaluate(model, val_loader, device, alphas)[1]
        untrained_acc = evaluate(control, val_loader, device, alphas)[1]
        utils.set_seed(seed + k)
        net = NetworkCIFAR(C, num_classes, layers, False, genotype).to(device)
        opt = torch.optim.SGD(net.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
        s = torch.optim.lr_scheduler.CosineAnnealingLR(opt, float(scratch_epochs))
        for epoch in range(scratch_epochs):
            g = utils.seed_epoch(seed + k, epoch)
            utils.train_epoch(net, datasets.make_loader(train_data, batch_size, True, 0, generator=g), opt,
                              nn.CrossEntropyLoss(), device)
            s.step()
        scratch = utils.evaluate(net, val_loader, nn.CrossEntropyLoss(), device)[1]
        rows.append({'arch': k, 'predicted_acc': predicted, 'control_acc': untrained_acc, 'scratch_acc': scratch,
                     'params': utils.count_params(net), 'genotype': genotype})
        if logger:
            logger.info(f'architecture {k + 1}/{archs}: predicted weights {predicted:.2f}%, untrained generators '
                        f'{untrained_acc:.2f}%, from scratch {scratch:.2f}%')
    scratch = [r['scratch_acc'] for r in rows]
    return {'rows': rows, 'kendall_tau': kendall_tau([r['predicted_acc'] for r in rows], scratch),
            'control_tau': kendall_tau([r['control_acc'] for r in rows], scratch),
            'random_band': random_tau_band(scratch, seed=seed), 'chance_acc': 100. / num_classes}


if __name__ == '__main__':
    utils.run_main(main)
