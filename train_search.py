"""Architecture search: one loop for every method and space, with attention-guided search (NOS, Sec. 3.3).

Three independent choices (docs/search.md): --space (nos | darts | nb201 | proxyless: the supernet;
proxyless is AGNAS's ProxylessNAS chain, model_macro.py), --method (how op
importance is represented and learnt, and how the cell is derived) and --lambda_at (AGS, the teacher's
attention maps as an extra loss). A method is an object with a small interface (see `darts.DartsMethod`, the
`darts` method); each other method lives in the file named after it and is registered in METHODS. Flags
a user does not give take the method's paper value (its `defaults`); the log prints what was used.

--method eoinas (eoinas.py): Gumbel-softmax sampling, the operation-importance indicator and gradual
operation pruning (EoiNAS; docs/eoinas.md), on either space.

--method darts: each step first updates the architecture matrices A on a validation batch (Eq. 13), then the network
weights on a training batch (Eq. 12); with --lambda_at > 0 both objectives add lambda * L_AT, the
attention-transfer loss against a frozen teacher's stage outputs of the same batch (docs/nos.md).
First-order by default; --unrolled uses DARTS's second-order step (finite-difference Hessian-vector
product). Writes SAVE/search_log.jsonl, SAVE/genotype.json and SAVE/checkpoint.pt every epoch.

--method agnas (agnas.py): no A; an attention module gates every edge, one level of training on the
training half, an importance pass over the validation half after each epoch, and a staged genotype (one
normal cell per stage, --stage_cell first | last | mean).

    python train_search.py --dataset cifar10 --data data              # NOS + AGS (needs a teacher)
    python train_search.py --dataset cifar10 --lambda_at 0            # plain DARTS-style search
    python train_search.py --dataset cifar10 --method agnas --space darts --seed 0   # AGNAS (agnas.py)
    torchrun --nproc_per_node=8 train_search.py --space proxyless --method agnas --dataset imagenet \\
        --data /path/to/imagenet                                      # AGNAS's macro search (docs/macro.md)
    python train_search.py --dataset synthetic --device cpu --lambda_at 0 --epochs 1 --layers 5 \\
        --init_channels 8 --batch_size 16 --synthetic_size 128 --save /tmp/search-smoke
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
from torch import nn

import agnas
import darts
import datasets
import eoinas
import gdas
import genotypes
import model_macro
import model_search
import nb201
import runs
import utils
from genotypes import OP_SUBSETS
from model_search import STAGE_CELLS, resolve_ops

SPACES = model_search.SPACES + (model_macro.SPACE,)  # the cell spaces, and the ProxylessNAS chain

KEYS = ('train_ce', 'train_at', 'val_ce', 'val_at', 'train_correct', 'val_correct')
DEFAULT_SAVE = 'runs/search'
DEFAULT_LEARNING_RATE = 0.025  # DARTS, NOS App. A
# The flags that may change when a search resumes (docs/resume-and-errors.md); every other flag defines the run and
# must match the checkpoint's. A learning rate takes effect from the resumed epoch.
RESUME_MAY_CHANGE = ('learning_rate', 'learning_rate_min', 'arch_learning_rate', 'momentum', 'weight_decay',
                     'arch_weight_decay', 'grad_clip', 'workers', 'report_freq', 'gpu', 'device', 'data', 'teacher',
                     'save', 'resume', 'no_download', 'debug', 'tensorboard', 'checkpoint_cells')
# What every checkpoint of this script holds (runs.load_resume refuses one without them as damaged).
CHECKPOINT_KEYS = ('epoch', 'model', 'optimizer', 'method', 'scheduler', 'settings')
# What a search resumed into another --save carries over from its checkpoint's folder (runs.carry_over).
RUN_FILES = ('search_log.jsonl', 'log.txt', 'genotype.json')
AT_LEVELS = ('both', 'weights')  # Fig. 6: AGS in both levels, or in the weight step only (distillation only)
# The methods (each file's class follows darts.DartsMethod's interface); a flag a user does not give takes the
# method's paper value (its `defaults(args)`).
METHODS = {'darts': darts.DartsMethod, 'eoinas': eoinas.EoiNASMethod, 'agnas': agnas.AGNASMethod,
           'gdas': gdas.GDASMethod}
# Flags whose value depends on the space (argparse default None): --space nb201 fills in the benchmark's search
# settings (nb201.search_defaults) and --space proxyless the authors' recipe (model_macro.SEARCH_DEFAULTS), then
# the method its own, then these (the cell spaces' own flags, CELL_ONLY, on a cell space only)
GENERIC_DEFAULTS = {'weight_decay': 3e-4, 'layers': 8, 'nesterov': False, 'stage_cell': 'first',
                    'batch_size': 64, 'learning_rate': DEFAULT_LEARNING_RATE, 'lr_schedule': 'cosine',
                    'weight_decay_on': 'all', 'label_smoothing': 0., 'grad_clip_by': 'norm', 'init_channels': 16,
                    'ops': 'all'}
CELL_ONLY = ('layers', 'init_channels', 'ops', 'stage_cell')  # the cell spaces' own flags
TRAIN_PORTION = 0.5      # DARTS's 25K / 25K split of CIFAR's training images (without --subset)
LR_SCHEDULES = ('cosine', 'linear')
DECAY_ON = utils.DECAY_ON
CLIP_BY = ('norm', 'value')
SEARCH_DATASETS = datasets.DATASETS + ('imagenet',)  # imagenet: --space proxyless only


def parse_args(argv=None) -> argparse.Namespace:
    p = utils.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data', default='data',
                   help='where CIFAR lives (torchvision layout); for --dataset folder, PATH with train/CLASS/IMAGE')
    p.add_argument('--no_download', action='store_true',
                   help='never download CIFAR (by default a missing CIFAR-10/100 is downloaded into --data)')
    p.add_argument('--dataset', default='cifar10',
                   help='cifar10 | cifar100 | synthetic | folder (your images) | imagenet (--space proxyless: '
                        '--data PATH holds train/CLASS/IMAGE)')
    p.add_argument('--subset', type=float, default=None,
                   help='a seeded, class-balanced share F of the training images trains the weights and a '
                        'disjoint F/4 the architecture, instead of --train_portion (default: 0.1 on imagenet, '
                        'AGNAS Sec. 5.3: 10%% and 2.5%%)')
    p.add_argument('--image_size', type=int, default=32, help='--dataset folder: images are resized to N x N')
    p.add_argument('--synthetic_size', type=int, default=512, help='images of --dataset synthetic')
    p.add_argument('--space', default=None,
                   help=f'search space: {" | ".join(SPACES)} (default: the method\'s paper\'s: nos for darts, as '
                        f'NOS publishes; darts for eoinas, agnas and gdas; NAS-Bench-201: its benchmark settings are '
                        f'the defaults, see docs/nb201.md)')
    p.add_argument('--method', default='darts', help=f'search method: {" | ".join(METHODS)}')
    p.add_argument('--stage_cell', default=None,
                   help=f'--method agnas: the normal cell each stage takes: {" | ".join(STAGE_CELLS)} (mean: '
                        f'derived from the mean importance of the stage\'s cells; default first)')
    p.add_argument('--ops', default=None,
                   help=f'NOS op set (Fig. 7 ablation): {" | ".join(OP_SUBSETS)} (default all)')
    p.add_argument('--batch_size', type=int, default=None,
                   help='images per step, each level (default 64, App. A; gdas 256; proxyless 512); the global batch, '
                        'split evenly under torchrun')
    p.add_argument('--learning_rate', type=float, default=None,
                   help=f'weights: SGD (default {DEFAULT_LEARNING_RATE}; proxyless 0.25)')
    p.add_argument('--lr_schedule', default=None,
                   help=f'{" | ".join(LR_SCHEDULES)}: from --learning_rate down to --learning_rate_min over the '
                        f'epochs (default cosine; proxyless linear)')
    p.add_argument('--learning_rate_min', type=float, default=None,
                   help='end of the cosine schedule (default: the method\'s, see docs/search.md)')
    p.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    p.add_argument('--nesterov', action='store_true', default=None,
                   help='Nesterov momentum (default: on for --space nb201 and --method gdas, as their reference searches)')
    p.add_argument('--weight_decay', type=float, default=None,
                   help='weights (default 3e-4, App. A; nb201 and gdas: 5e-4; proxyless 4e-5)')
    p.add_argument('--weight_decay_on', default=None,
                   help=f'{" | ".join(DECAY_ON)}: decay every weight, or only the convolutions and the classifier '
                        f'(default all; proxyless conv_fc)')
    p.add_argument('--label_smoothing', type=float, default=None,
                   help='of the weights\' cross-entropy (default 0; proxyless 0.1)')
    p.add_argument('--grad_clip', type=float, default=5.0, help='gradient clip of the weights (DARTS: 5)')
    p.add_argument('--grad_clip_by', default=None,
                   help=f'{" | ".join(CLIP_BY)}: clip the gradient\'s norm, or each entry (default norm; '
                        f'proxyless value)')
    p.add_argument('--arch_learning_rate', type=float, default=None,
                   help='A: Adam, betas (0.5, 0.999) (default: the method\'s)')
    p.add_argument('--arch_weight_decay', type=float, default=1e-3, help='A (App. A)')
    p.add_argument('--unrolled', action='store_true', help='second-order architecture step (DARTS)')
    p.add_argument('--no_fast', action='store_true',
                   help='search with the per-edge reference cells instead of the fast path (same search)')
    p.add_argument('--checkpoint_cells', action='store_true',
                   help='recompute each cell in the backward instead of keeping its activations: about a third '
                        'of the memory for about 1.3x the time, the same search (docs/fast-path.md)')
    p.add_argument('--epochs', type=int, default=None, help='search epochs (default: the method\'s)')
    p.add_argument('--init_channels', type=int, default=None, help='channels of the first cells (default 16, DARTS)')
    p.add_argument('--layers', type=int, default=None,
                   help='cells of the proxy network (default 8; nb201: 15, i.e. 3 stages of N = 5)')
    p.add_argument('--width_mult', type=float, default=None,
                   help='--space proxyless: every width times F (default 1: the space\'s; less: a CPU-sized '
                        'chain, this repo\'s)')
    p.add_argument('--track_running_stats', type=int, default=None, choices=(0, 1),
                   help='--space nb201: 1 (default) keeps running BN statistics in the cells, 0 normalises by the '
                        'batch in evaluation too (both were run by the benchmark\'s reference searches)')
    p.add_argument('--benchmark', default=None, metavar='PATH',
                   help='--space nb201: the NAS-Bench-201 file (or NATS-Bench topology file) to look the derived cell '
                        'up in after every epoch (needs `pip install -r requirements-nb201.txt`)')
    p.add_argument('--train_portion', type=float, default=None,
                   help=f'share of the train set for weights (default {TRAIN_PORTION}; the rest: the architecture)')
    p.add_argument('--lambda_at', type=float, default=None,
                   help='AGS weight; 0 = no teacher (default: the method\'s: 1000 for darts, 0 for eoinas)')
    p.add_argument('--at_levels', default='both',
                   help='where AGS enters: both (Eq. 12 and 13) | weights (Eq. 12 only: "distillation only", Fig. 6)')
    p.add_argument('--teacher', default=None,
                   help='teacher checkpoint, or the teacher.py --save folder holding it (default: '
                        'teachers/pyramidnet110_DATASET, where `teacher.py --dataset DATASET` writes)')
    p.add_argument('--seed', type=int, default=2, help='seeds weights, A, batches and augmentation (DARTS: 2)')
    p.add_argument('--gpu', type=int, default=0, help='CUDA device (single process; under torchrun LOCAL_RANK picks)')
    p.add_argument('--sync_bn', action='store_true',
                   help='under torchrun: BatchNorm over the global batch, so N processes compute what one does')
    p.add_argument('--no_augment', action='store_true', help='no random crop/flip on the search data')
    p.add_argument('--double', action='store_true', help='float64 weights and data (slow; exactness checks)')
    p.add_argument('--device', default=None, help='cpu to run on the CPU')
    p.add_argument('--workers', type=int, default=2, help='data-loading processes')
    p.add_argument('--report_freq', type=int, default=50,
                   help='steps between progress lines (also every 30 s; 0: none)')
    p.add_argument('--tensorboard', action='store_true',
                   help='also write TensorBoard event files into SAVE/tensorboard: every figure of the epoch '
                        'records and the importance heatmaps (needs pip install tensorboard)')
    p.add_argument('--debug', action='store_true',
                   help='also log debugging lines: under torchrun, each process\'s checksum of the architecture '
                        'at the end (the processes compare them after every epoch in any case)')
    p.add_argument('--save', default=None,
                   help='output folder: log, search_log.jsonl, genotype.json, checkpoint (default: runs/search, '
                        'or the folder of --resume PATH)')
    p.add_argument('--resume', nargs='?', const='', default=None,
                   help='continue from a checkpoint (default: SAVE/checkpoint.pt); see RESUME_MAY_CHANGE')
    eoinas.add_args(p)
    gdas.add_args(p)
    args = p.parse_args(argv)
    fill_method_defaults(args)
    return args


def fill_method_defaults(args) -> None:
    """Flags left at None take, in this order: the space the method's paper searched (`--space`: the other
    defaults may depend on it), the space's values (nb201: the benchmark's search settings; proxyless: the
    authors' recipe), the method's (docs/search.md), then GENERIC_DEFAULTS; unknown methods are left to
    check_args."""
    if args.method in METHODS and getattr(args, 'space', None) is None:
        args.space = METHODS[args.method].defaults(args).get('space', 'nos')
    space = getattr(args, 'space', None)
    values = []
    if space == 'nb201':
        values.append(nb201.search_defaults(args.method))
    elif space == model_macro.SPACE:
        values.append(model_macro.SEARCH_DEFAULTS)
        if args.dataset == 'imagenet' and args.train_portion is None:
            values.append({'subset': model_macro.SUBSET})  # AGNAS Sec. 5.3: 10% (+ 2.5%) of ImageNet
    if args.method in METHODS:
        values.append(METHODS[args.method].defaults(args))
    generic = dict(GENERIC_DEFAULTS)
    if space == 'nb201':
        del generic['stage_cell']  # one cell for all: check_nb201_args refuses --stage_cell there
    if space == model_macro.SPACE:
        generic = {k: v for k, v in generic.items() if k not in CELL_ONLY}  # refused there (check_chain_args)
    for defaults in values + [generic]:
        for key, value in defaults.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
    if getattr(args, 'subset', None) is None and getattr(args, 'train_portion', None) is None:
        args.train_portion = TRAIN_PORTION


def ours_notice(args) -> str | None:
    """A sentence for the first lines of the log when the run is this repo's own combination (no paper ran
    it): a method on a space its paper did not search (`paper_spaces`), or AGS with a method other than
    NOS's (`paper_ags`)."""
    cls = METHODS[args.method]
    parts = []
    if args.space not in getattr(cls, 'paper_spaces', (args.space,)):
        parts.append(f'--method {args.method} on --space {args.space}')
    if args.lambda_at > 0 and not getattr(cls, 'paper_ags', True):
        parts.append(f'attention-guided search (--lambda_at {args.lambda_at:g}) with --method {args.method}')
    if not parts:
        return None
    doc = {'nb201': 'nb201', 'proxyless': 'macro'}.get(args.space, 'nos' if args.method == 'darts' else args.method)
    return (f'this is one of this repo\'s own combinations, which no paper ran: {" and ".join(parts)} '
            f'(docs/{doc}.md says what it computes)')


def check_args(args) -> None:
    """Bad flag values become one-sentence errors."""
    if args.method not in METHODS:
        raise utils.UserError(f'unknown --method {args.method!r}; valid methods: {", ".join(METHODS)}')
    runs.check_tensorboard(args.tensorboard)
    if args.space == model_macro.SPACE:
        check_chain_args(args)
    elif args.width_mult is not None:
        raise utils.UserError(f'--width_mult scales the ProxylessNAS chain (--space {model_macro.SPACE}); the '
                              f'{args.space} space takes --init_channels')
    if args.checkpoint_cells and args.space == model_macro.SPACE:
        raise utils.UserError(f'--checkpoint_cells recomputes the cells of a cell space ({", ".join(model_search.SPACES)}); '
                              f'the {model_macro.SPACE} chain has none: drop the flag')
    if args.stage_cell is not None and args.stage_cell not in STAGE_CELLS:
        raise utils.UserError(f'unknown --stage_cell {args.stage_cell!r}; valid values: {", ".join(STAGE_CELLS)}')
    for name, cls in METHODS.items():  # a method's own flags would be ignored by another method
        given = [f for f in getattr(cls, 'flags', ()) if name != args.method and getattr(args, f, None) is not None]
        if given:
            raise utils.UserError(f'--{given[0]} belongs to --method {name} and --method {args.method} would ignore '
                                  f'it; drop it or pass --method {name}')
    if args.at_levels not in AT_LEVELS:
        raise utils.UserError(f'unknown --at_levels {args.at_levels!r}; valid values: {", ".join(AT_LEVELS)}')
    if args.space not in SPACES:
        raise utils.UserError(f'unknown --space {args.space!r}; valid spaces: {", ".join(SPACES)}')
    if args.ops is not None and args.ops not in OP_SUBSETS:
        raise utils.UserError(f'unknown --ops {args.ops!r}; valid op sets: {", ".join(OP_SUBSETS)}')
    if args.space in ('darts', 'nb201') and args.ops not in (None, 'all'):
        fixed = genotypes.DARTS_PRIMITIVES if args.space == 'darts' else genotypes.NB201_PRIMITIVES
        raise utils.UserError(f'--ops {args.ops} applies to --space nos only; the {args.space} space has its '
                              f'fixed op set ({", ".join(fixed)})')
    check_nb201_args(args)
    if args.dataset not in SEARCH_DATASETS:
        raise utils.UserError(f'unknown --dataset {args.dataset!r}; choose one of {", ".join(SEARCH_DATASETS)}')
    if args.dataset == 'imagenet':
        if args.space != model_macro.SPACE:
            raise utils.UserError(f'--dataset imagenet searches the ProxylessNAS chain (--space proxyless); the '
                                  f'{args.space} space\'s supernet is built for 32x32 images: use --dataset folder '
                                  f'--image_size N to search it on your own images')
        if args.image_size != 32:
            raise utils.UserError('--image_size applies to --dataset folder only; ImageNet images are cropped to '
                                  '224x224: drop the flag')
    else:
        datasets.check_image_size(args.dataset, getattr(args, 'image_size', 32))
    for name, allowed in (('lr_schedule', LR_SCHEDULES), ('weight_decay_on', DECAY_ON), ('grad_clip_by', CLIP_BY)):
        if getattr(args, name) not in allowed:
            raise utils.UserError(f'unknown --{name} {getattr(args, name)!r}; valid values: {", ".join(allowed)}')
    if args.subset is not None and args.train_portion is not None:
        raise utils.UserError('--subset picks the images of both sides of the search (F and F/4), so --train_portion '
                              'would be ignored: give one of the two')
    utils.check_flags(args, {'train_portion': utils.Range(0, 1, low_open=True, high_open=True)})
    if args.learning_rate_min > args.learning_rate:
        raise utils.UserError(f'--learning_rate_min {args.learning_rate_min:g} is above --learning_rate '
                              f'{args.learning_rate:g}; the cosine schedule runs from the second down to the '
                              f'first')
    METHODS[args.method].check_args(args)


def check_nb201_args(args) -> None:
    """NAS-Bench-201's refusals: flags that mean nothing on its space, or only on it."""
    if args.space != 'nb201':
        for flag in ('benchmark', 'track_running_stats'):
            if getattr(args, flag, None) is not None:
                raise utils.UserError(f'--{flag} belongs to --space nb201; drop it or pass --space nb201')
        return
    if args.stage_cell is not None:
        raise utils.UserError('--stage_cell picks a normal cell per stage of a DARTS-style network; NAS-Bench-201 has '
                              'one cell shared by all 15, which AGNAS derives from the importance averaged over '
                              'them: drop --stage_cell')
    if args.layers % 3 or args.layers < 3:
        raise utils.UserError(f'--layers {args.layers}: the NAS-Bench-201 network has 3 stages of N cells, so '
                              f'--layers must be a multiple of 3 (15: its N = 5)')
    if args.benchmark is not None and not os.path.exists(args.benchmark):
        raise utils.UserError(f'--benchmark {args.benchmark} does not exist; download NAS-Bench-201-v1_0-e61699.pth '
                              f'(or v1_1-096897, or a NATS-Bench topology file) and pass its path')
def check_chain_args(args) -> None:
    """--space proxyless: the methods with a chain supernet, and no flag of the cell spaces."""
    if args.method not in model_macro.METHODS:
        raise utils.UserError(f'--space {model_macro.SPACE} runs --method {" or ".join(model_macro.METHODS)} (the '
                              f'chain supernet); --method {args.method} searches the cell spaces only: use '
                              f'--space darts or nos, or another method')
    utils.check_flags(args)
    try:
        model_macro.check_width(args.width_mult)
    except ValueError as e:
        raise utils.UserError(f'--{e}') from None
    given = [f for f in CELL_ONLY if getattr(args, f) is not None]
    if given:
        raise utils.UserError(f'--{given[0]} applies to the cell spaces ({", ".join(model_search.SPACES)}); the '
                              f'ProxylessNAS chain has fixed layers, widths and candidates: drop --{given[0]}')
    if args.lambda_at > 0:
        raise utils.UserError(f'--lambda_at {args.lambda_at:g}: attention-guided search matches a teacher\'s three '
                              f'stage maps with cells of the cell spaces, which the ProxylessNAS chain does not '
                              f'have; drop --lambda_at')


def make_optimizer(model, args, lr: float | None = None):
    """The weights' SGD (diagnose.py's fine-tuning builds the same one, at its own `lr`)."""
    return torch.optim.SGD(utils.decay_groups(model, model.weights(), args.weight_decay, args.weight_decay_on),
                           args.learning_rate if lr is None else lr, momentum=args.momentum,
                           weight_decay=args.weight_decay, nesterov=bool(args.nesterov))


def make_scheduler(optimizer, args):
    """The weights' learning rate per epoch: cosine (DARTS) or linear (the authors' ProxylessNAS-space search,
    which steps it per batch) from --learning_rate down to --learning_rate_min."""
    if args.lr_schedule == 'linear':
        def factor(epoch: int) -> float:
            end = args.learning_rate_min / args.learning_rate if args.learning_rate else 1.
            return 1. - (1. - end) * epoch / args.epochs
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(args.epochs), eta_min=args.learning_rate_min)


# ---------------------------------------------------------------------------------------------------------
# The loop


def search_epoch(method, optimizer, train_loader, val_loader, *, teacher, eta, device, dtype, epoch, logger,
                 report_freq, has_checkpoint, loss_limit=math.inf, checkpoint='', retry='') -> tuple:
    """One epoch of method.step: (stats, the last training batch); the validation batches cycle if the
    validation part is shorter. A loss that is not finite or above `loss_limit` stops the run
    (utils.check_loss; `retry`: the advice's flags).
    Under torchrun the figures are the global batch's: the per-process sums are added in the one sync."""
    sums, counts = {}, {'train': 0, 'val': 0}
    progress = utils.Progress(len(train_loader), report_freq, logger, prefix=f'epoch {epoch + 1} ')
    val_iter = iter(val_loader) if method.uses_val_batch else None
    xv = yv = None
    for step, (x, y) in enumerate(train_loader):
        x, y = x.to(device, dtype, non_blocking=True), y.to(device, non_blocking=True)
        if val_iter is not None:
            try:
                xv, yv = next(val_iter)
            except StopIteration:
                val_iter = iter(val_loader)
                xv, yv = next(val_iter)
            xv, yv = xv.to(device, dtype, non_blocking=True), yv.to(device, non_blocking=True)
        out = method.step(x, y, xv, yv, teacher, eta, optimizer)
        keys = [k for k in KEYS if k in out]
        sizes = {'train': x.shape[0], 'val': 0 if xv is None else xv.shape[0]}
        local = torch.stack([out[k].double() * (1 if k.endswith('_correct') else sizes[k.split('_')[0]])
                             for k in keys] + [out[keys[0]].new_tensor(float(n), dtype=torch.float64)
                                               for n in sizes.values()])
        totals = utils.all_sum(local).tolist()  # the one sync
        sizes = dict(zip(sizes, totals[len(keys):]))
        step_sums = dict(zip(keys, totals))
        utils.check_loss({k: v / max(1., sizes[k.split('_')[0]]) for k, v in step_sums.items()
                          if k.endswith(('_ce', '_at'))}, loss_limit, epoch=epoch, step=step,
                         kept=epoch if has_checkpoint else 0, checkpoint=checkpoint, retry=retry)
        for half, n in sizes.items():
            counts[half] += n
        for k, v in step_sums.items():
            sums[k] = sums.get(k, 0.) + v
        mean = {k: v / max(1, counts[k.split('_')[0]]) for k, v in sums.items()}
        text = f'ce {mean["train_ce"]:.3f}  ' + (f'at {mean["train_at"]:.4g}  ' if teacher is not None else '')
        text += f'top1 {100 * mean["train_correct"]:.2f}'
        if 'val_ce' in mean:
            text += f'  val_ce {mean["val_ce"]:.3f}  val_top1 {100 * mean["val_correct"]:.2f}'
        progress.step(step, int(sizes['train']), text)
    mean = {k: v / max(1, counts[k.split('_')[0]]) for k, v in sums.items()}
    stats = {k: v for k, v in mean.items() if not k.endswith('_correct')}
    stats['train_acc'] = 100 * mean['train_correct']
    if 'val_correct' in mean:
        stats['val_acc'] = 100 * mean['val_correct']
    return stats, (x, y)


def held_out_accuracy(model, data, batch_size: int, workers: int, pin: bool, device, dtype) -> dict:
    """{'val_ce_end', 'val_acc_end'}: the supernet's cross-entropy and top-1 (%) over the whole held-out half at
    the end of an epoch, in eval mode under no_grad (DARTS's `infer`), without augmentation; the figure
    ADWPNAS's stage 0 (Eq. 3's epsilon) and `summarize.py --select val` read. The forward is the method's:
    the softmax of A (darts), one Gumbel sample per batch at the epoch's temperature (eoinas, gdas), drawn
    on a forked random stream so that the search's own stream is untouched. Under torchrun each process
    takes every world-th image and the sums are added."""
    world = utils.world_size()
    rank = torch.distributed.get_rank() if world > 1 else 0
    loader = datasets.make_loader(data, max(1, batch_size // world), False, workers,
                                  sampler=list(range(rank, len(data), world)), pin=pin)
    was_training = model.training
    model.eval()
    ce = correct = n = 0.
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
            for x, y in loader:
                x, y = x.to(device, dtype, non_blocking=True), y.to(device, non_blocking=True)
                logits = model(x)
                ce = ce + torch.nn.functional.cross_entropy(logits, y, reduction='sum').double()
                correct = correct + (logits.argmax(1) == y).sum().double()
                n += x.shape[0]
    finally:
        model.train(was_training)
    totals = utils.all_sum(torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device)
                                        for v in (n, ce, correct)])).tolist()
    if not totals[0]:
        raise utils.UserError('the validation half is empty; lower --train_portion')
    return {'val_ce_end': totals[1] / totals[0], 'val_acc_end': 100. * totals[2] / totals[0]}


def format_matrix(name: str, weights, ops, space: str, alive=None, pruned=()) -> str:
    """A table of an importance matrix (rows: edges, columns: ops) for the log. With `alive` (a pruning
    method's mask after this epoch) and `pruned` (the (row, op name) pairs this epoch's prune took), an op
    pruned before the epoch shows `-` (its value, 0, means nothing) and one pruned after it its value and `x`."""
    weights = np.asarray(weights)
    labels = genotypes.row_labels(space, len(weights))
    dead = np.zeros(weights.shape, dtype=bool) if alive is None else ~np.asarray(alive, dtype=bool)
    now = np.zeros(weights.shape, dtype=bool)
    for row, op in pruned:
        now[row, list(ops).index(op)] = True
    width = max(len(f'{v:.3f}') for v in weights.flat) if weights.size else 5
    cells = [[f'{"-":^{width}} ' if d and not n else f'{v:>{width}.3f}{"x" if n else " "}'
              for v, d, n in zip(row, dead_row, now_row)] for row, dead_row, now_row in zip(weights, dead, now)]
    lines = [f'{name} (columns: {", ".join(ops)})' + ('; -: pruned earlier, x: pruned now' if dead.any() else '')]
    lines += [(f'  {label:>7} ' + ' '.join(row)).rstrip() for label, row in zip(labels, cells)]
    return '\n'.join(lines)


def epoch_summary(stats: dict, extra: dict, teacher: bool) -> str:
    """The figures of the epoch line: the epoch's own, then the validation figures that a method measured at
    the epoch's end (AGNAS's importance pass over the validation half); the attention-transfer losses only
    where a teacher is in use (without one they are 0)."""
    shown = {**stats, **{k: extra[k] for k in ('val_ce', 'val_acc') if k in extra and k not in stats}}
    if 'val_acc_end' in extra and shown.get('val_acc') != extra['val_acc_end']:  # AGNAS's pass is both
        shown['val_acc_end'] = extra['val_acc_end']
    return '  '.join(f'{k} {v:.4g}' for k, v in shown.items() if teacher or not k.endswith('_at'))


def _choices(genotype) -> list:
    """The choices a genotype makes, in order: each (op, input) of a first tier, each second-tier op."""
    if isinstance(genotype, genotypes.NB201Genotype):  # one op per edge
        return genotype.ops()
    if isinstance(genotype, genotypes.ChainGenotype):  # one block (or skip) per layer
        return list(genotype.layers)
    out = []
    for cell in (genotype.normal, genotype.reduce):
        for entry in cell:
            if len(entry) == 2 and isinstance(entry[0], str):  # classic: (op, input)
                out.append(tuple(entry))
            else:  # heterogeneous block: (op_i, i), (op_j, j), op_second
                out += [tuple(entry[0]), tuple(entry[1]), entry[2]]
    return out


def genotype_changes(old, new) -> tuple[int, int]:
    """(choices that differ, choices) between two genotypes of one space: what a researcher scans for
    from epoch to epoch (a search that still changes its mind, or one that has settled)."""
    a, b = _choices(old), _choices(new)
    return sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b)), max(len(a), len(b))


def settings_of(args) -> dict:
    """What must match when a search resumes (--batch_size is the global batch, whatever the processes)."""
    recipe = {k: None if getattr(args, k) == GENERIC_DEFAULTS[k] else getattr(args, k)  # None: older checkpoints
              for k in ('lr_schedule', 'weight_decay_on', 'label_smoothing', 'grad_clip_by')}
    return {'dataset': args.dataset, 'method': args.method, 'space': args.space,
            'ops': resolve_ops(args.space, args.ops) if args.space != model_macro.SPACE else None,
            'layers': args.layers, 'subset': args.subset, 'width_mult': args.width_mult, **recipe,
            'init_channels': args.init_channels, 'lambda_at': args.lambda_at, 'at_levels': args.at_levels,
            'unrolled': args.unrolled, 'epochs': args.epochs, 'batch_size': args.batch_size,
            'sync_bn': args.sync_bn, 'double': args.double, 'fast': METHODS[args.method].fast(args),
            'stage_cell': args.stage_cell if args.method == 'agnas' else None,  # None: older checkpoints resume
            'track_running_stats': args.track_running_stats if args.space == 'nb201' else None,
            'nesterov': args.nesterov or None}


def search_cost(log_path: str, device: torch.device, world: int = 1) -> dict:
    """The search cost from the per-epoch records (so a resumed run counts every epoch once): on a GPU,
    GPU-hours (wall-clock hours times the processes, one GPU each); on the CPU, CPU time (`cpu_seconds` of the
    records: the process time of every process, data-loading workers included), since the wall-clock time of a
    shared machine overstates it. Older logs without cpu_seconds give wall_seconds only."""
    records = runs.read_jsonl(log_path)
    seconds = sum(r['seconds'] for r in records)
    cost = {'wall_seconds': round(seconds, 1), 'processes': world}
    if device.type == 'cuda':
        return {**cost, 'gpu_hours': round(world * seconds / 3600, 4), 'device': torch.cuda.get_device_name(device)}
    cost['device'] = 'cpu'
    if all('cpu_seconds' in r for r in records):
        cpu = sum(r['cpu_seconds'] for r in records)
        cost.update(cpu_time_seconds=round(cpu, 1), cpu_time_hours=round(cpu / 3600, 4))
    return cost


def describe_cost(cost: dict, epochs: int) -> str:
    """The log line of the search cost, naming what is counted."""
    text = f'search cost: {cost["wall_seconds"]:.1f} s wall-clock over {epochs} epochs'
    if 'gpu_hours' in cost:
        return f'{text} = {cost["gpu_hours"]:.4f} GPU-hours on {cost["processes"]} x {cost["device"]}'
    if 'cpu_time_seconds' in cost:
        text += (f'; CPU time {cost["cpu_time_seconds"]:.1f} s = {cost["cpu_time_hours"]:.4f} CPU-hours (the process '
                 f'time of {cost["processes"]} process(es), data-loading workers included)')
    return text + ' on the CPU'


def check_processes(args, world: int) -> None:
    """Refusals under torchrun, checked on every process before the process group exists, so a bad command
    ends all of them with the same sentence and none waits for another."""
    if world == 1:
        if args.sync_bn:
            raise utils.UserError('--sync_bn synchronises BatchNorm across torchrun processes; this is one '
                                  'process: drop --sync_bn or start with torchrun --nproc_per_node=N')
        return
    if args.unrolled:
        raise utils.UserError(f'--unrolled is refused under torchrun ({world} processes): the second-order '
                              f'step runs in one process; drop --unrolled or run with plain python')
    if args.batch_size % world:
        divisors = [d for d in range(1, args.batch_size + 1) if args.batch_size % d == 0]
        raise utils.UserError(f'--batch_size {args.batch_size} (the global batch) does not split evenly over '
                              f'{world} processes; use a process count among {divisors} or a batch that '
                              f'{world} divides')
    if args.device == 'cpu':
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
        local = int(os.environ.get('LOCAL_WORLD_SIZE', world))
        if local > cores:
            raise utils.UserError(f'{local} processes on this machine\'s {cores} CPU cores oversubscribe it; '
                                  f'use --nproc_per_node at most {cores}')
    elif torch.cuda.is_available():
        local = int(os.environ.get('LOCAL_WORLD_SIZE', world))
        if local > torch.cuda.device_count():
            raise utils.UserError(f'--nproc_per_node {local} exceeds the {torch.cuda.device_count()} GPUs of '
                                  f'this machine; use one process per GPU')


@runs.holds_folder_lock
def main(argv=None) -> None:
    started = time.time()
    args = parse_args(argv)
    check_args(args)
    world, rank, local_rank = utils.dist_env()
    check_processes(args, world)
    # --resume PATH without --save goes on in the checkpoint's own folder
    args.save, args.resume = runs.run_folder(args.save, args.resume, 'search', default=DEFAULT_SAVE,
                                             lock=rank == 0)
    settings = settings_of(args)
    ckpt, changed = None, {}
    if args.resume:
        ckpt = runs.load_resume(args.resume, 'train_search.py', CHECKPOINT_KEYS)
        with runs.restoring(args.resume):
            saved = {'fast': False, **ckpt['settings']}  # older checkpoints: the reference cells
            if saved['fast'] != settings['fast']:
                raise utils.UserError(f'checkpoint {args.resume} was made with the '
                                      f'{"fast path" if saved["fast"] else "reference cells (--no_fast)"}, whose '
                                      f'weights are laid out differently; resume '
                                      f'{"without" if saved["fast"] else "with"} --no_fast')
            for key, value in settings.items():
                runs.check_same(key, saved.get(key), value, args.resume)
            changed = runs.resume_flags(ckpt, args, RESUME_MAY_CHANGE, args.resume)
    device = utils.get_device(local_rank if world > 1 else args.gpu, args.device)
    data_stats = datasets.data_stats(args.dataset, args.data, args.image_size, args.save, ckpt, args.resume)
    train_data, val_data, val_plain, num_classes = search_data(args, data_stats)
    steps_on_val = METHODS[args.method].uses_val_batch is not False  # AGNAS only ranks with those images
    if args.batch_size > len(train_data) or (steps_on_val and args.batch_size > len(val_data)):
        raise utils.UserError(f'--batch_size {args.batch_size} is more than the {len(train_data)} images that '
                              f'train the weights (or the {len(val_data)} that train A); use a smaller '
                              f'--batch_size')
    teacher_net = None
    if args.lambda_at > 0:
        import teacher
        path = args.teacher or teacher.default_teacher_path(datasets.dataset_name(args.dataset, args.data))
        classes = data_stats['classes'] if data_stats else None  # --dataset folder: the teacher's must match
        teacher_net = teacher.load_teacher(path, args.dataset, device, classes=classes, image_size=args.image_size,
                                           how=runs.command('teacher.py', args))
        # frozen, for inference only: its BatchNorms folded into the convolutions (the same maps, fewer kernels)
        teacher_net = teacher.fold_batchnorm(teacher_net)
    if world > 1:
        torch.distributed.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    try:
        search(args, world, rank, device, ckpt, changed, settings, train_data, val_data, val_plain, num_classes,
               data_stats,
               teacher_net, started)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def search_data(args, data_stats) -> tuple:
    """(weights' images, architecture's images, the architecture's images without augmentation, classes). The
    architecture's images are what DARTS's A steps on: the rest of the set after --train_portion, or with
    --subset a disjoint class-balanced quarter of the weights' share. What measures on them (val_acc_end,
    AGNAS's importance pass) sees them without random augmentation. On ImageNet they keep the evaluation
    transform (resize 256, centre crop 224), as the authors' compute_attention.py."""
    if args.dataset == 'imagenet':
        data, view = datasets.imagenet_search_data(args.data, augment=not args.no_augment)
        plain = view
        num_classes = len(data.classes)
    else:
        data = view = datasets.get_dataset(args.dataset, args.data, train=True, synthetic_size=args.synthetic_size,
                                           image_size=args.image_size, stats=data_stats,
                                           augment=not args.no_augment, download=not args.no_download)
        plain = data if args.no_augment else datasets.get_dataset(
            args.dataset, args.data, train=True, synthetic_size=args.synthetic_size, image_size=args.image_size,
            stats=data_stats, augment=False, download=False)
        num_classes = datasets.num_classes(args.dataset, args.data)
    if args.subset is not None:
        train_idx, val_idx = datasets.class_balanced_split(data.targets, args.subset)
    else:
        train_idx, val_idx = datasets.search_split(len(data), args.train_portion)
    subset = torch.utils.data.Subset
    return subset(data, train_idx), subset(view, val_idx), subset(plain, val_idx), num_classes


def search(args, world, rank, device, ckpt, changed, settings, train_data, val_data, val_plain, num_classes,
           data_stats, teacher_net, started) -> None:
    method_cls = METHODS[args.method]
    ckpt_path = os.path.join(args.save, 'checkpoint.pt')
    if ckpt is not None and rank == 0:  # resumed into another --save: the run's history goes with it
        runs.carry_over(args.resume, args.save, RUN_FILES)
    logger = runs.get_logger(args.save if rank == 0 else None, 'search', enabled=rank == 0, debug=args.debug)
    logger.info('args = %s', vars(args))
    notice = ours_notice(args)
    if notice:
        logger.info(notice)
    if data_stats is not None:
        logger.info(datasets.folder_summary(data_stats))
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    dtype = torch.float64 if args.double else torch.float32
    utils.set_seed(args.seed)  # the same initial weights and A in every process
    model = method_cls.build_model(args, num_classes).to(device, dtype)
    model.checkpoint_cells = args.checkpoint_cells
    model._criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)  # the weights' and A's loss
    if args.sync_bn:
        model = utils.convert_sync_batchnorm(model)
    if teacher_net is not None:
        teacher_net.to(dtype)
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args)
    method = method_cls(model, args)
    size = model.search_space_size()
    if args.space == model_macro.SPACE:
        logger.info('method %s; search space (%s, %s layout: %d layers of %s, skip in %d): %.2e architectures',
                    args.method, args.space, model.layout, len(model.layers), ', '.join(model.ops),
                    sum(layer.has_skip for layer in model.layers), size["exact"])
        logger.info('%d images train the weights, %d the architecture (%s)', len(train_data), len(val_data),
                    f'--subset {args.subset:g}' if args.subset is not None else
                    f'--train_portion {args.train_portion:g}')
    else:
        logger.info('method %s; search space (%s, %d ops: %s): %.2e cells per cell type by the paper\'s formula, '
                    '%.2e exact', args.method, args.space, len(model.ops), ', '.join(model.ops), size['paper'],
                    size['exact'])
    logger.info('search cells: %s', f'the fast path (model_search_fast.{type(model.cells[0]).__name__})' if model.fast else
                'the per-edge reference cells' + ('' if args.no_fast else ' (this setting has no fast path)'))
    n_weights = utils.count_params(model)
    logger.info('param size = %.6fMB (%d weights)', n_weights / 1e6, n_weights)
    if world > 1:
        logger.info('%d processes x batch %d = global batch %d; BatchNorm %s', world, args.batch_size // world,
                    args.batch_size, 'over the global batch (--sync_bn)' if args.sync_bn else
                    'per process (--sync_bn makes it global)')
    if teacher_net is not None:
        logger.info('attention-guided search: lambda_at %g in %s, teacher %s', args.lambda_at,
                    'both levels' if args.at_levels == 'both' else 'the weight step only',
                    args.teacher or 'default')

    benchmark = None
    if args.space == 'nb201' and rank == 0:  # loaded once, by the process that writes the records
        if args.benchmark:
            benchmark = nb201.Benchmark(args.benchmark)
            logger.info('benchmark: %s, %s (%d architectures) loaded in %.1f s; the derived cell is looked up '
                        'after every epoch', args.benchmark, benchmark.kind, len(benchmark), benchmark.seconds)
        else:
            logger.info('no --benchmark: the derived cells are not looked up in NAS-Bench-201 (pass --benchmark '
                        'PATH to record their benchmark accuracies every epoch)')
    lookup = None

    log_path = os.path.join(args.save, 'search_log.jsonl')
    start_epoch = 0
    if ckpt is not None:
        with runs.restoring(args.resume):  # the flags' momentum, weight decay, ... replace the checkpoint's
            model.load_state_dict(ckpt['model'])
            runs.load_optimizer(optimizer, ckpt['optimizer'])
            method.load_state_dict(ckpt['method'])
            scheduler.load_state_dict(ckpt['scheduler'])
            start_epoch = int(ckpt['epoch'])
        if {'learning_rate', 'learning_rate_min'} & set(changed):  # the cosine schedule goes on as if the run
            scheduler.eta_min = args.learning_rate_min               # had started with them
            runs.set_learning_rate(optimizer, scheduler, args.learning_rate)
        dropped = runs.trim_jsonl(log_path, start_epoch) if rank == 0 else 0
        runs.log_resumed(logger, args.resume, start_epoch, args.epochs, changed, dropped, log_path)
    elif rank == 0 and os.path.exists(log_path):
        os.remove(log_path)  # left by a run that stopped before its first checkpoint
    board = runs.TensorBoard(args.save, args.tensorboard and rank == 0, start_epoch)

    pin = device.type == 'cuda'
    limit = utils.loss_limit(num_classes)
    retry = f'--learning_rate {utils.retry_learning_rate(args.learning_rate, DEFAULT_LEARNING_RATE):g}'
    previous = (genotypes.from_json(json.dumps(ckpt['genotype']), args.resume)
                if ckpt is not None and 'genotype' in ckpt else None)
    for epoch in range(start_epoch, args.epochs):
        # every process shuffles alike and takes its slice of each global batch (utils.GlobalBatchSampler)
        g = utils.seed_epoch(args.seed, epoch)
        loaders = [datasets.make_loader(d, args.batch_size, True, args.workers, generator=g, pin=pin,
                                     batch_sampler=utils.GlobalBatchSampler(len(d), args.batch_size, rank, world,
                                                                            generator=g))
                   for d in (train_data, val_data)]
        train_loader, val_loader = loaders
        lr = scheduler.get_last_lr()[0]
        logger.info('epoch %d/%d lr %e', epoch + 1, args.epochs, lr)
        start, cpu_start = time.time(), utils.cpu_seconds()
        method.start_epoch(epoch)
        stats, last_batch = search_epoch(method, optimizer, train_loader, val_loader, teacher=teacher_net, eta=lr,
                             device=device, dtype=dtype, epoch=epoch, logger=logger,
                             report_freq=args.report_freq, has_checkpoint=epoch > 0, loss_limit=limit,
                             checkpoint=ckpt_path, retry=retry)
        scheduler.step()
        utils.broadcast_state(model)  # rank 0's BatchNorm statistics everywhere (they differ without sync)
        datasets.log_unreadable(train_data, logger)
        measure_loader = datasets.make_loader(val_plain, args.batch_size, False, args.workers, pin=pin)
        extra = method.end_epoch(epoch, measure_loader, device)
        if 'val_acc_end' not in extra:
            extra.update(held_out_accuracy(model, val_plain, args.batch_size, args.workers, pin, device, dtype))
        seconds = time.time() - start
        cpu = float(utils.all_sum(torch.tensor([utils.cpu_seconds() - cpu_start], dtype=torch.float64,
                                               device=device)).item())  # every process's
        # no checkpoint of a diverged state: the weights about to be saved must be finite and their loss sane
        utils.check_state({'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                           'method': method.state_dict()}, {'loss': utils.state_loss(model, *last_batch)}, limit,
                          epoch=epoch, kept=epoch, checkpoint=ckpt_path, retry=retry)
        genotype = genotypes.validate(method.genotype())
        importance = method.importance()
        check_same_architecture(model, importance, epoch)
        logger.info('epoch %d: %s  (%.1f s%s)', epoch + 1, epoch_summary(stats, extra, teacher_net is not None),
                    seconds, '' if device.type == 'cuda' else f', CPU time {cpu:.1f} s')
        for line in getattr(method, 'log_lines', list)():  # what the method did at the epoch's end (prunes)
            logger.info(line)
        logger.info('genotype = %r', genotype)
        if benchmark is not None:
            lookup = {'arch': genotype.arch, **benchmark.lookup(genotype.arch)}
            logger.info('epoch %d: %s', epoch + 1, nb201.describe(lookup))
        if previous is not None:
            changed_choices, choices = genotype_changes(previous, genotype)
            logger.info('genotype: %d of %d choices (op or input) changed since epoch %d', changed_choices,
                        choices, epoch)
        previous = genotype
        for name, matrix in importance.items():  # log.txt only: two tables an epoch would bury the summary
            logger.info(format_matrix(f'importance {name}', matrix, model.ops, args.space,
                                      extra.get('alive', {}).get(name), extra.get('pruned', {}).get(name, ())),
                        extra=runs.FILE_ONLY)
        if rank != 0:
            continue
        record = {'epoch': epoch + 1, 'epochs': args.epochs, **stats, 'lr': lr, 'seconds': seconds, 'cpu_seconds': cpu,
                  'method': args.method,
                  'space': args.space, 'genotype': json.loads(genotypes.to_json(genotype)),
                  'primitives': list(model.ops),
                  'importance': {k: np.asarray(v).round(6).tolist() for k, v in importance.items()}, **extra}
        if lookup is not None:
            record['benchmark'] = lookup
        runs.append_jsonl(log_path, record)
        board.scalars(record, epoch + 1)
        board.heatmaps(importance, model.ops, args.space, epoch + 1)
        genotypes.save(genotype, os.path.join(args.save, 'genotype.json'))
        runs.save_checkpoint({'epoch': epoch + 1, 'model': model.state_dict(),
                               'optimizer': optimizer.state_dict(), 'method': method.state_dict(),
                               'scheduler': scheduler.state_dict(), 'settings': settings,
                               'genotype': json.loads(genotypes.to_json(genotype)), 'args': vars(args),
                               'data_stats': data_stats, 'script': 'train_search.py'},
                              ckpt_path)

    if world > 1:  # each process's own word that it ends with the architecture of every other (--debug shows it)
        logger.debug('rank %d arch_sha256=%s', rank, arch_checksum(model, method.importance()))
    board.close()
    if rank != 0:
        return
    genotype = genotypes.validate(method.genotype())
    cost = search_cost(log_path, device, world)
    logger.info(describe_cost(cost, args.epochs))
    runs.write_json(os.path.join(args.save, 'result.json'),
                     {'kind': 'search', 'method': args.method, 'space': args.space, 'dataset': args.dataset,
                      'seed': args.seed, 'epochs': args.epochs, 'settings': settings, **cost,
                      'genotype': json.loads(genotypes.to_json(genotype)),
                      **({'benchmark': final_lookup(benchmark, genotype, lookup)} if benchmark else {})})
    genotype_path = os.path.join(args.save, 'genotype.json')
    chain = args.space == model_macro.SPACE
    logger.info('final genotype (%s; paste into genotypes.py or train with --genotype_file %s):\n%r',
                args.space, genotype_path, genotype)
    runs.report_run(logger, args.save, [
        ('log.txt', 'the log, with the importance tables of every epoch'),
        ('search_log.jsonl', 'one record per epoch: losses, accuracies, importance, genotype'),
        ('genotype.json', 'the derived chain' if chain else 'the derived cell'),
        ('checkpoint.pt', 'the last epoch (--resume)'),
        ('result.json', 'settings, search cost, genotype'),
    ], [(f'{runs.command("visualize.py", None, args.save)}    # draw the {"chain" if chain else "cells"} and the '
         f'importance'), retrain_hint(args, genotype_path, model)], started)


def retrain_hint(args, genotype_path: str, model) -> str:
    """The command that retrains what the search found, on this machine and data (runs.command)."""
    if args.space != model_macro.SPACE:
        return f'{runs.command("train_cifar.py", args, genotype_file=genotype_path)}    # retrain the cell'
    if model.layout == 'imagenet':
        data = args.data if args.dataset == 'imagenet' else 'PATH_TO_IMAGENET'
        command = runs.command('train_imagenet.py', args, genotype_file=genotype_path, data=data,
                               keep=('device', 'gpu', 'workers'))
        return f'{command}    # retrain the chain'
    return f'{runs.command("train_cifar.py", args, genotype_file=genotype_path)}    # retrain the chain, CIFAR-sized'


def final_lookup(benchmark, genotype, lookup) -> dict:
    """The final genotype's benchmark record for result.json (the last epoch's, or looked up again after a
    resume that ran no epoch)."""
    if lookup is not None and lookup['arch'] == genotype.arch:
        return lookup
    return {'arch': genotype.arch, **benchmark.lookup(genotype.arch)}


def arch_checksum(model, importance: dict) -> str:
    """sha256 of the architecture state: A (if the method has it) and the importance matrices."""
    return utils.state_checksum(list(model.arch_parameters()) + [np.ascontiguousarray(v)
                                                                 for v in importance.values()])


def check_same_architecture(model, importance: dict, epoch: int) -> None:
    """Under torchrun every process must hold the same architecture state; a difference is a bug, never a
    drift to let through: the run stops, naming the epoch."""
    if not torch.distributed.is_initialized():
        return
    digest = arch_checksum(model, importance)
    digests = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        raise utils.UserError(f'the processes hold different architecture states after epoch {epoch + 1} '
                              f'(checksums {", ".join(d[:8] for d in digests)}); this is a bug: please report '
                              f'it with the command')


if __name__ == '__main__':
    utils.run_main(main)
