"""Retrain a derived cell on ImageNet in the mobile setting (NOS Sec. 4.3, Appendix A.2; docs/nos.md).

    python train_imagenet.py --genotype_file runs/search/genotype.json --data /path/to/imagenet
    torchrun --nproc_per_node=4 train_imagenet.py --genotype_file runs/search/genotype.json --data ...
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        train_imagenet.py ...                                                  # several machines

--data holds train/ and val/ in the ImageFolder layout (one folder of images per class). The defaults
are the paper's: 14 cells, 48 channels, auxiliary tower weight 0.4, 300 epochs, global batch 512,
SGD momentum 0.9, lr 0.25 warmed up linearly over 5 epochs then decayed linearly to 0 (per step).
Where the paper is silent, DARTS's ImageNet settings: its stem, label smoothing 0.1, weight decay 3e-5,
grad clip 5, drop-path 0, its augmentation (random resized crop 224, flip, colour jitter 0.4/0.4/0.4/0.2).

--batch_size is per process; by default 512 / WORLD_SIZE, so the global batch is the paper's whatever the
number of processes. lr 0.25 belongs to a global batch of 512 and is scaled linearly with the global batch.
`--lr_schedule step` is DARTS's ImageNet schedule instead (ADWPNAS Sec. 4.3): lr 0.1 x 0.97 (--lr_gamma)
per epoch, an absolute lr with no warm-up and no batch scaling.
Several processes (torchrun) train with DistributedDataParallel: NCCL on CUDA, gloo with --device cpu.
Rank 0 logs and writes SAVE/checkpoint.pt each epoch; --resume needs SAVE readable by every process.
Rank 0 also writes SAVE/genotype.json (the cells trained; --arch random:SEED draws them from the NOS
space) and, at the end, SAVE/result.json (with genotype, seed, precision, device name and seconds).
At the end every rank prints `rank R weights_sha256=...` (the same on all ranks) and rank 0 prints

    final top1_error=25.80 top5_error=8.10 params_M=4.00 macs_M=440.0

(validation errors in %, weights without the auxiliary tower, multiply-adds of one 224x224 image).

A chain genotype (the ProxylessNAS space of AGNAS's macro search: --arch AGNAS_PROXYLESS, --arch
ids:1,1,-1,..., or a `train_search.py --space proxyless` genotype.json) builds model_macro.MacroNetwork and
takes the authors' retraining recipe for the flags a user leaves out (CHAIN_PRESET; AGNAS Sec. 5.3, their
retrain.py): 240 epochs, global batch 1024, lr 0.5 decayed linearly to 0 with no warm-up, weight decay 4e-5 on
the convolutions and the classifier only, label smoothing 0.1, dropout 0.2 before the classifier, no
auxiliary tower. Their Fast AutoAugment policy is not included: the augmentation stays the one above.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import datasets
import genotypes
import runs
import utils
from model import NetworkImageNet
from model_macro import MacroNetwork

DEFAULT_ARCH = 'DARTS_V2'  # DARTS's default cell; pass --genotype_file for your own
DEFAULT_LAYERS = 14
LR_SCHEDULES = ('linear', 'step')
DEFAULT_LR = {'linear': 0.25, 'step': 0.1}  # NOS App. A.2 (for a global batch of 512); DARTS's ImageNet lr
REFERENCE_BATCH = 512  # the global batch that lr 0.25 belongs to (NOS App. A.2)
MOBILE_MACS = 600e6    # mobile setting: < 600M multiply-adds at 224x224 (NOS Sec. 4.3)
DEFAULT_LEARNING_RATE = 0.25  # NOS App. A.2, for a global batch of REFERENCE_BATCH
# The defaults of the flags left at None: the cells' (NOS App. A.2, DARTS) and a chain genotype's (AGNAS's
# retraining in the ProxylessNAS space, their retrain.py); `reference_batch` is the global batch that the
# linear schedule's lr belongs to.
CELL_PRESET = {'epochs': 300, 'reference_batch': REFERENCE_BATCH, 'warmup_epochs': 5., 'weight_decay': 3e-5,
               'decay_on': 'all', 'init_channels': 48}
CHAIN_PRESET = {'epochs': 240, 'reference_batch': 1024, 'linear_lr': 0.5, 'warmup_epochs': 0., 'weight_decay': 4e-5,
                'decay_on': 'conv_fc'}
# Each paper's ImageNet recipe (--preset; chosen like train_cifar.py's, from the genotype and the search that
# found it): the flags in which the papers differ, for the flags not given. `lr` is the lr at `reference_batch`
# (the global batch); a learning rate not given scales linearly with the global batch, whatever the schedule.
STEP = {'lr_schedule': 'step', 'lr_gamma': 0.97, 'warmup_epochs': 0., 'weight_decay': 3e-5, 'decay_on': 'all',
        'init_channels': 48, 'auxiliary_weight': 0.4}  # DARTS's ImageNet recipe (its StepLR(1, 0.97))
IMAGENET_PRESETS = {
    'nos': {**CELL_PRESET, 'lr_schedule': 'linear', 'lr': DEFAULT_LR['linear'], 'auxiliary_weight': 0.4},  # App. A.2
    'darts': {**STEP, 'epochs': 250, 'reference_batch': 128, 'lr': 0.1},                 # DARTS Sec. 3.3
    'eoinas': {**STEP, 'epochs': 250, 'reference_batch': 128, 'lr': 0.1},                # EoiNAS Sec. 4.4, its code
    'adwpnas': {**STEP, 'epochs': 250, 'reference_batch': 256, 'lr': 0.1, 'auxiliary_weight': 0.7},  # Sec. 4.3
    'agnas': {**CHAIN_PRESET, 'lr_schedule': 'linear', 'lr': CHAIN_PRESET['linear_lr']},  # Sec. 5.3 (chains)
}
RECIPE_FLAGS = ('epochs', 'warmup_epochs', 'weight_decay', 'init_channels', 'lr_schedule', 'lr_gamma',
                'auxiliary_weight')
# The flags that may change when a run resumes (docs/resume-and-errors.md); every other flag defines the run and must
# match the checkpoint's. --learning_rate takes effect from the resumed epoch (the schedule goes on as if the
# run had started with it); --batch_size may change with the number of processes as long as the global batch
# stays (checked on its own); the others change only how the run is executed or logged.
RESUME_MAY_CHANGE = ('tensorboard', 'learning_rate', 'batch_size', 'workers', 'report_freq', 'gpu', 'device', 'amp',
                     'no_channels_last', 'data', 'save', 'resume', 'allow_unfinished')
# What every checkpoint of this script holds (runs.load_resume refuses one without them as damaged).
CHECKPOINT_KEYS = ('epoch', 'model', 'optimizer', 'scheduler', 'arch', 'genotype', 'num_classes', 'global_batch',
                   'args')


def build_parser() -> argparse.ArgumentParser:
    p = utils.ArgumentParser(
        description='Retrain a derived cell on ImageNet, mobile setting (NOS Sec. 4.3).')
    p.add_argument('--data', default='data/imagenet', help='folder with train/ and val/ (ImageFolder layout)')
    p.add_argument('--arch', default=None, help='a genotype named in genotypes.py (default DARTS_V2 unless '
                                                '--genotype_file), or random:SEED, a genotype drawn '
                                                'uniformly from the NOS space (Table 2\'s random baseline)')
    p.add_argument('--genotype_file', default=None, help='genotype.json written by train_search.py')
    p.add_argument('--preset', default=None, choices=sorted(IMAGENET_PRESETS),
                   help='a paper\'s ImageNet recipe for the flags not given (default: that of the method that found '
                        'the genotype, NOS\'s for cells of a paper without one; docs/retrain.md)')
    p.add_argument('--allow_unfinished', action='store_true',
                   help='no warning for the genotype.json of a search that has not finished')
    p.add_argument('--epochs', type=int, default=None, help='default 300 (NOS App. A.2); a chain genotype 240')
    p.add_argument('--batch_size', type=int, default=None,
                   help=f'per process; default {REFERENCE_BATCH} (a chain genotype: 1024) / number of processes')
    p.add_argument('--learning_rate', type=float, default=None,
                   help=f'linear: peak lr for a global batch of {REFERENCE_BATCH}, scaled linearly with the global '
                        f'batch (default {DEFAULT_LR["linear"]}); step: the absolute initial lr (default '
                        f'{DEFAULT_LR["step"]}, DARTS)')
    p.add_argument('--lr_schedule', default='linear', choices=LR_SCHEDULES,
                   help='linear: warm-up, then linear decay to 0 (NOS); step: DARTS\'s decay by --lr_gamma every '
                        'epoch, no warm-up, no batch scaling (ADWPNAS)')
    p.add_argument('--lr_gamma', type=float, default=0.97, help='--lr_schedule step: lr factor per epoch (DARTS)')
    p.add_argument('--warmup_epochs', type=float, default=None,
                   help='linear warm-up, then linear decay to 0 (default 5; a chain genotype 0)')
    p.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    p.add_argument('--weight_decay', type=float, default=None,
                   help='default 3e-5 (DARTS ImageNet; the paper is silent); a chain genotype 4e-5')
    p.add_argument('--label_smooth', type=float, default=0.1, help='label smoothing of the training loss')
    p.add_argument('--init_channels', type=int, default=None, help='channels of the first cells (default 48)')
    utils.add_cell_flags(p, DEFAULT_LAYERS)
    p.add_argument('--drop_path_prob', type=float, default=0.,
                   help='final drop-path probability; epoch e uses drop_path_prob * e / epochs')
    utils.add_run_flags(p, save='eval-imagenet-TIME', workers=8, report_freq=100,
                        gpu_help='single process only; under torchrun LOCAL_RANK picks',
                        device_help='cpu to run on the CPU (gloo backend under torchrun)',
                        workers_help='data-loading processes per training process')
    return p


def check_chain_flags(args, label: str) -> None:
    """The flags of the cell networks, refused with a chain genotype (which fixes its depth and widths)."""
    for name in ('layers', 'init_channels'):
        if getattr(args, name) is not None:
            raise utils.UserError(f'--{name} applies to cell genotypes; {label} is a chain genotype (the ProxylessNAS '
                                  f'space), whose depth and widths are fixed: drop --{name}')
    if args.drop_path_prob:
        raise utils.UserError(f'--drop_path_prob applies to cells; {label} is a chain genotype, which drops out '
                              f'before its classifier instead (0.2): drop --drop_path_prob')


def lr_factor(step: int, warmup: int, total: int) -> float:
    """NOS App. A.2: linear warm-up over `warmup` steps, then linear decay to 0 at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0., (total - step) / max(1, total - warmup))


def step_factor(step: int, steps_per_epoch: int, gamma: float) -> float:
    """DARTS's ImageNet schedule (its StepLR(1, gamma)): the lr of epoch e is gamma^e times the initial one."""
    return gamma ** (step // steps_per_epoch)


def state_checksum(state: dict) -> str:
    """sha256 of a state dict (weights and BN statistics), independent of the memory layout."""
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def all_mean(values: list[float], weight: float, device) -> list[float]:
    """Weighted mean over the processes of per-process means (weight: this process's sample count)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor([v * weight for v in values] + [weight], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t[:-1] / t[-1]).tolist()


def keep_resumed_recipe(args, given: set[str], world: int) -> set[str]:
    """A resumed run keeps the recipe it started with (also one from before --preset): the checkpoint's values
    of the recipe's flags not given, read ahead of the checks (a checkpoint that cannot be read is left to
    them, which say why)."""
    if args.resume is None:
        return set()
    path = args.resume or (os.path.join(args.save, runs.CHECKPOINT) if args.save else '')
    if os.path.isdir(path):
        path = os.path.join(path, runs.CHECKPOINT)
    if not os.path.isfile(path):
        return set()
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
        saved = dict(ckpt.get('args') or {})
    except Exception:  # noqa: BLE001 (any damage: runs.load_resume says what it is)
        return set()
    if 'global_batch' in ckpt and 'batch_size' not in given:
        saved['batch_size'] = max(1, ckpt['global_batch'] // world)
    kept = {k for k in RECIPE_FLAGS + ('preset', 'batch_size', 'learning_rate') if k not in given and k in saved}
    for key in kept:
        setattr(args, key, saved[key])
    return kept


def choose_recipe(args, genotype, label: str, chain: bool) -> str:
    """Set args.preset (--preset, else the paper whose method found the genotype; a cell genotype of a paper
    without an ImageNet recipe for cells takes NOS's) and return the log line that says which and why."""
    if args.preset is not None:
        why = 'given'
    else:
        args.preset, why = runs.genotype_origin(genotype, label, args.genotype_file)
        if (args.preset == 'agnas') != chain or args.preset not in IMAGENET_PRESETS:
            args.preset, why = 'nos', f'{why}; its paper has no ImageNet recipe for it, so NOS\'s'
    if (args.preset == 'agnas') != chain:
        raise utils.UserError(f'--preset {args.preset} does not fit {label}: --preset agnas is the recipe of chain '
                              f'genotypes (AGNAS\'s macro search), the others of cell genotypes; drop --preset')
    shown = ', '.join(f'{k} {v:g}' if isinstance(v, float) else f'{k} {v}' for k, v in IMAGENET_PRESETS[args.preset].items()
                      if k in RECIPE_FLAGS + ('lr', 'reference_batch'))
    return f'retraining recipe: --preset {args.preset} ({why}): {shown}; a flag given wins'


@runs.holds_folder_lock
def main(argv=None) -> dict | None:
    started = time.time()
    args = build_parser().parse_args(argv)
    world, rank, local_rank = utils.dist_env()  # torchrun's, or (1, 0, 0)
    genotype, label = runs.resolve_genotype(args.arch, args.genotype_file, DEFAULT_ARCH)
    chain = isinstance(genotype, genotypes.ChainGenotype)
    if chain:
        check_chain_flags(args, label)
        args.auxiliary = False  # the chain has no auxiliary tower
    given = utils.given_flags(argv)
    given |= keep_resumed_recipe(args, given, world)  # a resumed run's recipe counts as given
    recipe = choose_recipe(args, genotype, label, chain)
    preset = IMAGENET_PRESETS[args.preset]
    for name in RECIPE_FLAGS:
        if name not in given and name in preset:
            setattr(args, name, preset[name])
    reference_batch = preset['reference_batch']
    if args.batch_size is None:
        args.batch_size = max(1, reference_batch // world)
    lr_given = args.learning_rate is not None
    if not lr_given:  # the paper's at its batch; the linear schedule scales it below, the step one here
        args.learning_rate = preset['lr'] * (1 if args.lr_schedule == 'linear'
                                             else args.batch_size * world / reference_batch)
    if not chain:
        args.layers = runs.genotype_layers(genotype, args.layers, DEFAULT_LAYERS, label)
    runs.check_tensorboard(args.tensorboard)
    utils.check_flags(args, {'warmup_epochs': utils.Range(0), 'label_smooth': utils.Range(0, 1),
                             'lr_gamma': utils.Range(0, 1, low_open=True)})
    global_batch = args.batch_size * world
    lr = args.learning_rate * global_batch / reference_batch if args.lr_schedule == 'linear' else args.learning_rate

    # Every check that can fail runs on every rank before the process group exists, so a bad input ends
    # all processes with the same sentence instead of leaving some waiting in a collective.
    genotype_json = genotypes.to_json(genotype)
    save, resume = runs.run_folder(args.save, args.resume, 'eval-imagenet', lock=rank == 0)
    args.save = save  # the folder in use, as the checkpoint records it
    train_data, val_data = datasets.imagenet_folders(args.data)
    num_classes = len(train_data.classes)
    ckpt, changed = None, {}
    if resume is not None:
        ckpt = runs.load_resume(resume, 'train_imagenet.py', CHECKPOINT_KEYS)
        with runs.restoring(resume):
            runs.check_genotype(ckpt, genotype_json, label, resume)
            runs.check_same('number of classes', ckpt['num_classes'], num_classes, resume)
            runs.check_same('global batch', ckpt['global_batch'], global_batch, resume)
            runs.check_same('lr_schedule', ckpt['args'].get('lr_schedule', 'linear'), args.lr_schedule, resume)
            for name in ('layers', 'init_channels', 'auxiliary', 'epochs'):
                runs.check_same(name, ckpt['args'][name], getattr(args, name), resume)
            changed = runs.resume_flags(ckpt, args, RESUME_MAY_CHANGE, resume)
    device = utils.get_device(local_rank if world > 1 else args.gpu, args.device)
    cuda = device.type == 'cuda'
    amp_dtype = torch.bfloat16 if args.amp == 'bf16' else None  # opt-in: the papers trained in fp32
    channels_last = amp_dtype is not None and not args.no_channels_last
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed 224x224 shapes: pick the fastest kernels once
    if world > 1:
        dist.init_process_group('nccl' if cuda else 'gloo')
    try:
        return train(args, world, rank, device, amp_dtype, channels_last, genotype, label, genotype_json,
                     train_data, val_data, num_classes, save, resume, ckpt, global_batch, lr, changed, started,
                     reference_batch=reference_batch, recipe=recipe)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, world, rank, device, amp_dtype, channels_last, genotype, label, genotype_json, train_data,
          val_data, num_classes, save, resume, ckpt, global_batch, lr, changed=None, started=None,
          reference_batch=REFERENCE_BATCH, recipe=None):
    cuda = device.type == 'cuda'
    if ckpt is not None and rank == 0:  # resumed into another --save: the run's history goes with it
        runs.carry_over(resume, save, ('metrics.jsonl', 'log.txt'))
    logger = runs.get_logger(save if rank == 0 else None, 'train_imagenet', enabled=rank == 0)
    runs.log_retraining(logger, args, genotype, label, recipe)
    if rank == 0:
        genotypes.save(genotype, os.path.join(save, 'genotype.json'))  # the cells trained, random:SEED's too
    schedule = (f'lr {lr:g} (= {args.learning_rate:g} x {global_batch} / {reference_batch}), '
                f'{args.warmup_epochs:g} warm-up epochs then linear decay to 0' if args.lr_schedule == 'linear'
                else f'lr {lr:g} x {args.lr_gamma:g} per epoch (step decay, no warm-up, no batch scaling)')
    logger.info(f'{world} process(es) x batch {args.batch_size} = global batch {global_batch}; {schedule}; '
                f'{num_classes} classes, {len(train_data)} training '
                f'and {len(val_data)} validation images; device {device}, '
                f'{"bf16 autocast" if amp_dtype else "fp32"}{", channels_last" if channels_last else ""}')

    utils.set_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    chain = isinstance(genotype, genotypes.ChainGenotype)
    if chain:  # AGNAS's macro search: the derived ProxylessNAS chain (model_macro.py)
        model = MacroNetwork(genotype, num_classes).to(device)
    else:
        model = NetworkImageNet(args.init_channels, num_classes, args.layers, args.auxiliary, genotype).to(device)
    params = utils.count_params(model)
    macs = utils.count_macs(model, (1, 3, 224, 224)) if rank == 0 else 0
    logger.info(f'weights {params / 1e6:.2f}M (without the auxiliary tower), multiply-adds {macs / 1e6:.1f}M '
                f'per 224x224 image')
    if macs > MOBILE_MACS:
        logger.warning(f'warning: {macs / 1e6:.0f}M multiply-adds exceed the mobile setting\'s '
                       f'{MOBILE_MACS / 1e6:.0f}M' + ('' if chain else '; fewer --init_channels or --layers bring it '
                                                           'under'))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    # a chain decays its convolutions and classifier only (the authors' retrain.py); cells decay every weight
    decay_on = (CHAIN_PRESET if chain else CELL_PRESET)['decay_on']
    optimizer = torch.optim.SGD(utils.decay_groups(model, list(model.parameters()), args.weight_decay, decay_on), lr,
                                momentum=args.momentum, weight_decay=args.weight_decay)
    # Each process sees 1/world of the images; the loader drops the last partial batch so that every
    # step has the global batch.
    train_sampler = torch.utils.data.DistributedSampler(train_data, num_replicas=world, rank=rank,
                                                        shuffle=True, seed=args.seed)
    # an unreadable image is skipped with a warning, not fatal; past datasets.MAX_UNREADABLE_SHARE of the images
    # a process reads in an epoch, the run stops (the data are damaged)
    train_data.epoch_images = len(train_sampler)
    steps = len(train_sampler) // args.batch_size
    if steps == 0:
        raise utils.UserError(f'{len(train_data)} training images make no batch of {args.batch_size} per '
                              f'process; lower --batch_size')
    total, warmup = args.epochs * steps, min(round(args.warmup_epochs * steps), args.epochs * steps)
    if args.lr_schedule == 'step':
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: step_factor(s, steps, args.lr_gamma))
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))
    start_epoch = 0
    if ckpt is not None:
        start_epoch = runs.restore_training(ckpt, resume, model, optimizer, scheduler)
        if 'learning_rate' in (changed or {}):  # the schedule goes on as if the run had started with it
            runs.set_learning_rate(optimizer, scheduler, lr)
        if rank == 0:
            runs.trim_jsonl(os.path.join(save, 'metrics.jsonl'), start_epoch)
        runs.log_resumed(logger, resume, start_epoch, args.epochs, changed or {})
    board = runs.TensorBoard(save, args.tensorboard and rank == 0, start_epoch)
    net = model  # the module itself: evaluation and checkpoints bypass the DDP wrapper
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)

    train_criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smooth)
    criterion = nn.CrossEntropyLoss()
    # Validation: every rank takes every world-th image, no padding, so the pooled numbers are exact.
    val_indices = list(range(rank, len(val_data), world))
    val_data.epoch_images = len(val_indices)
    val_loader = datasets.make_loader(val_data, args.batch_size, False, args.workers, sampler=val_indices,
                                   pin=cuda)
    val = (float('nan'),) * 3
    ckpt_path = os.path.join(save, 'checkpoint.pt')
    retry = f'--learning_rate {utils.retry_learning_rate(args.learning_rate, DEFAULT_LEARNING_RATE):g}'
    for epoch in range(start_epoch, args.epochs):
        # ranks draw different augmentations and drop-path masks, each reproducible for --resume
        g = utils.seed_epoch(args.seed + 10007 * rank, epoch)
        train_sampler.set_epoch(epoch)
        net.drop_path_prob = args.drop_path_prob * epoch / args.epochs
        train_loader = datasets.make_loader(train_data, args.batch_size, False, args.workers, generator=g,
                                         sampler=train_sampler, drop_last=True, pin=cuda)
        progress = utils.Progress(len(train_loader), args.report_freq, logger, f'epoch {epoch + 1} ')
        start, epoch_lr = time.time(), scheduler.get_last_lr()[0]
        train_loss, train_acc = utils.train_epoch(
            model, train_loader, optimizer, train_criterion, device,
            aux_weight=args.auxiliary_weight if args.auxiliary else 0., grad_clip=args.grad_clip,
            amp_dtype=amp_dtype, channels_last=channels_last, progress=progress, step_hook=scheduler.step,
            check=functools.partial(utils.check_loss, limit=utils.loss_limit(num_classes), epoch=epoch,
                                    kept=epoch, checkpoint=ckpt_path, retry=retry))
        train_loss, train_acc = all_mean([train_loss, train_acc], 1., device)
        if world > 1:  # DDP keeps rank 0's BN statistics at each forward; end the epoch with them everywhere
            for b in net.buffers():
                dist.broadcast(b, 0)
        val_local = utils.evaluate(net, val_loader, criterion, device, amp_dtype=amp_dtype,
                                   channels_last=channels_last)
        val = all_mean(list(val_local), float(len(val_indices)), device)
        # no checkpoint of a diverged state: the weights about to be saved must be finite and their loss sane
        utils.check_state({'model': net.state_dict(), 'optimizer': optimizer.state_dict()}, {'val_loss': val[0]},
                          utils.loss_limit(num_classes), epoch=epoch, kept=epoch, checkpoint=ckpt_path, retry=retry)
        # the distinct unreadable images skipped so far, summed over the processes
        skipped = [round(v * world) for v in all_mean([float(train_data.skipped), float(val_data.skipped)], 1.,
                                                       device)]
        seconds = time.time() - start
        logger.info(f'epoch {epoch + 1}/{args.epochs} lr {epoch_lr:.5f} (first step) train_loss '
                    f'{train_loss:.4f} train_acc {train_acc:.2f} val_loss {val[0]:.4f} top1 {val[1]:.2f} '
                    f'top5 {val[2]:.2f} ({seconds:.0f}s; unreadable images skipped so far: {skipped[0]} '
                    f'train, {skipped[1]} val)')
        if rank == 0:
            record = {
                'epoch': epoch + 1, 'lr': epoch_lr, 'train_loss': train_loss, 'train_acc': train_acc,
                'val_loss': val[0], 'top1': val[1], 'top5': val[2], 'seconds': seconds,
                'skipped_train': skipped[0], 'skipped_val': skipped[1]}
            runs.append_jsonl(os.path.join(save, 'metrics.jsonl'), record)
            board.scalars(record, epoch + 1)
            runs.save_checkpoint({
                'model': net.state_dict(), 'optimizer': optimizer.state_dict(),
                'scheduler': scheduler.state_dict(), 'epoch': epoch + 1, 'arch': label,
                'genotype': genotype_json, 'num_classes': num_classes, 'global_batch': global_batch,
                'args': vars(args), 'script': 'train_imagenet.py',
            }, ckpt_path)

    if start_epoch >= args.epochs:  # resumed a finished run: report it again
        val = all_mean(list(utils.evaluate(net, val_loader, criterion, device, amp_dtype=amp_dtype,
                                           channels_last=channels_last)), float(len(val_indices)), device)
    checksum = state_checksum(net.state_dict())
    print(f'rank {rank} weights_sha256={checksum}', flush=True)
    if rank != 0:
        return None
    result = {
        'kind': 'train', 'script': 'train_imagenet', 'dataset': 'imagenet',
        'arch': label, 'genotype': json.loads(genotype_json), 'epochs': args.epochs,
        'num_classes': num_classes, 'top1_error': 100. - val[1], 'top5_error': 100. - val[2],
        'val_loss': val[0],
        'params': params, 'params_M': params / 1e6, 'macs': macs, 'macs_M': macs / 1e6,
        'global_batch': global_batch, 'learning_rate': lr, 'weight_decay': args.weight_decay,
        'seed': args.seed, 'world_size': world, 'weights_sha256': checksum,
        'batch_size': args.batch_size, 'layers': args.layers, 'init_channels': args.init_channels,
        'drop_path_prob': args.drop_path_prob,
        # training + validation time of every epoch, sessions before a --resume included
        'seconds': sum(r['seconds'] for r in runs.read_jsonl(os.path.join(save, 'metrics.jsonl'))),
        **runs.run_info(device, amp_dtype, world),
    }
    runs.write_json(os.path.join(save, 'result.json'), result)
    board.close()
    logger.info(f'wrote {os.path.join(save, "result.json")}')
    runs.report_run(logger, save, [
        ('log.txt', 'the log'), ('metrics.jsonl', 'one record per epoch: losses, accuracies, lr, skipped images'),
        ('checkpoint.pt', 'the last epoch (--resume)'), ('result.json', 'errors, weights, multiply-adds'),
    ], [(f'{runs.command("visualize.py", None, args.genotype_file or label)}    # draw the '
         f'{"chain" if chain else "cell"}')],
        started or time.time())
    print(f'final top1_error={result["top1_error"]:.2f} top5_error={result["top5_error"]:.2f} '
          f'params_M={params / 1e6:.2f} macs_M={macs / 1e6:.1f}', flush=True)
    return result


if __name__ == '__main__':
    utils.run_main(main)
