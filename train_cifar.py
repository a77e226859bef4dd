"""Retrain a derived cell from scratch on CIFAR-10 or CIFAR-100 (NOS Sec. 4.3, Appendix A.1; docs/nos.md).

    python train_cifar.py --genotype_file runs/search/genotype.json            # CIFAR-10, paper settings
    python train_cifar.py --genotype_file runs/search/genotype.json --dataset cifar100
    python train_cifar.py --arch DARTS_V2 --device cpu --dataset synthetic --epochs 2 --layers 5 \\
        --init_channels 8                                                       # a CPU smoke run
    python train_cifar.py --arch random:7 --save runs/random-7                  # Table 2's random baseline
    python train_cifar.py --arch '|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|'
                                              # a NAS-Bench-201 cell, trained with the benchmark's recipe

The defaults are the paper's: 20 cells, 36 channels, auxiliary tower weight 0.4, cutout 16, drop-path 0.3
(raised linearly from 0 over the epochs, as DARTS does), 600 epochs, batch 128, SGD momentum 0.9,
lr 0.25 cosine to 0 (DARTS: 0.025), weight decay 3e-4 (CIFAR-10) / 5e-4 (CIFAR-100), grad clip 5.
A genotype found by another method trains with that method's paper's recipe (PRESETS: batch, lr, drop-path,
epochs), chosen from the genotype (or the search files beside --genotype_file) and said in the log's first
line; --preset picks one, and a flag given always wins. A learning rate not given scales linearly with
--batch_size from the recipe's (NOS: 0.25 x batch / 128).
The whole training set trains, the test set is evaluated after every epoch.

Writes SAVE/log.txt, SAVE/genotype.json (the cells trained), SAVE/metrics.jsonl (one line per epoch),
SAVE/checkpoint.pt (every epoch, atomic), SAVE/result.json (the figures below plus genotype, seed, dataset,
epochs, precision, device name and training seconds, which summarize.py reads), and ends with one line on
stdout:

    final test_error=2.67 params_M=3.35 macs_M=528.4

test_error: top-1 test error in % after the last epoch; params_M: weights in millions without the
auxiliary tower (DARTS's count); macs_M: multiply-adds of one 32x32 image (--image_size for --dataset folder)
in millions (utils.count_macs).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import torch
from torch import nn

import datasets
import genotypes
import nb201
import runs
import utils
from model import NetworkCIFAR
from model_macro import MacroNetwork, layout_for
from model_nb201 import NB201Network

DEFAULT_ARCH = 'DARTS_V2'
DEFAULT_LAYERS = 20
WEIGHT_DECAY = {'cifar10': 3e-4, 'cifar100': 5e-4, 'synthetic': 3e-4, 'folder': 3e-4}  # NOS App. A.1
# The flags that may change when a run resumes (docs/resume-and-errors.md); every other flag defines the run and must
# match the checkpoint's. --learning_rate takes effect from the resumed epoch (the cosine schedule goes on as
# if the run had started with it); the others change only how the run is executed or logged.
RESUME_MAY_CHANGE = ('tensorboard', 'learning_rate', 'workers', 'report_freq', 'gpu', 'device', 'amp', 'no_channels_last',
                     'data', 'save', 'resume', 'no_download', 'allow_unfinished')
# What every checkpoint of this script holds (runs.load_resume refuses one without them as damaged).
CHECKPOINT_KEYS = ('epoch', 'model', 'optimizer', 'scheduler', 'arch', 'genotype', 'dataset', 'synthetic_size', 'args')


def build_parser() -> argparse.ArgumentParser:
    p = utils.ArgumentParser(description='Retrain a derived cell on CIFAR-10/100 (NOS Sec. 4.3).')
    p.add_argument('--data', default='data',
                   help='folder holding (or to hold) the CIFAR data; for --dataset folder, PATH with train/ and '
                        'test/ or val/, one folder of images per class')
    p.add_argument('--no_download', action='store_true',
                   help='never download CIFAR (by default a missing CIFAR-10/100 is downloaded into --data)')
    p.add_argument('--dataset', default='cifar10', choices=datasets.DATASETS,
                   help='synthetic: made-up CIFAR-shaped data, no download (smoke tests); folder: your images')
    p.add_argument('--image_size', type=int, default=32, help='--dataset folder: images are resized to N x N')
    p.add_argument('--synthetic_size', type=int, default=512, help='training images of --dataset synthetic')
    p.add_argument('--arch', default=None,
                   help=f'a genotype named in genotypes.py (default {DEFAULT_ARCH} unless --genotype_file), '
                        f'random:SEED, a genotype drawn uniformly from the NOS space (Table 2\'s random '
                        f'baseline), or a NAS-Bench-201 architecture string |op~0|+|op~0|op~1|+|...|')
    p.add_argument('--nb201_schedule', action='store_true',
                   help='NAS-Bench-201\'s own recipe for the flags not given: 200 epochs, SGD Nesterov lr 0.1 cosine '
                        'to 0, wd 5e-4, batch 256, C 16, 15 cells, no cutout, aux tower or drop-path (the default '
                        'for a NAS-Bench-201 architecture)')
    p.add_argument('--nesterov', action='store_true', help='Nesterov momentum (on with --nb201_schedule)')
    p.add_argument('--genotype_file', default=None, help='genotype.json written by train_search.py')
    p.add_argument('--allow_unfinished', action='store_true',
                   help='no warning for the genotype.json of a search that has not finished')
    p.add_argument('--preset', default=None, choices=sorted(PRESETS),
                   help='the retraining recipe of a paper, for the flags not given (default: the one of the method '
                        'that found the genotype, see PRESETS; nos for a genotype of unknown origin)')
    p.add_argument('--epochs', type=int, default=None, help='default: the preset\'s (NOS: 600)')
    p.add_argument('--batch_size', type=int, default=None, help='default: the preset\'s (NOS: 128)')
    p.add_argument('--learning_rate', type=float, default=None,
                   help='initial lr, cosine to 0 (default: the preset\'s, scaled linearly with --batch_size: '
                        'NOS 0.25 x batch / 128)')
    p.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    p.add_argument('--weight_decay', type=float, default=None,
                   help='default per dataset: 3e-4 for cifar10 (and synthetic), 5e-4 for cifar100')
    p.add_argument('--init_channels', type=int, default=36, help='channels of the first cells')
    utils.add_cell_flags(p, DEFAULT_LAYERS)
    p.add_argument('--cutout_length', type=int, default=16, help='0 turns cutout off')
    p.add_argument('--autoaugment', action='store_true',
                   help='torchvision\'s CIFAR-10 AutoAugment policy after crop and flip, cutout last (ADWPNAS)')
    p.add_argument('--drop_path_prob', type=float, default=None,
                   help='final drop-path probability; epoch e uses drop_path_prob * e / epochs (default: the '
                        'preset\'s, NOS: 0.3)')
    utils.add_run_flags(p, save='eval-DATASET-TIME', workers=4, report_freq=50)
    return p


# ---------------------------------------------------------------------------------------------------------
# Each paper's retraining recipe (--preset): the flags in which the papers differ. All of them otherwise train
# DARTS's 20-cell, 36-channel network with auxiliary weight 0.4, cutout 16, SGD momentum 0.9 cosine to 0, weight
# decay 3e-4 and gradient clip 5. A flag given on the command line always wins; a learning rate not given is the
# preset's scaled linearly with the batch (lr x batch / the preset's batch), so a smaller batch, the usual fix
# for a smaller GPU, does not diverge at a rate meant for a larger one.
PRESETS = {
    'nos': {'epochs': 600, 'batch_size': 128, 'learning_rate': 0.25, 'drop_path_prob': 0.3},    # NOS App. A.1
    'darts': {'epochs': 600, 'batch_size': 96, 'learning_rate': 0.025, 'drop_path_prob': 0.2},  # DARTS Sec. 3.3
    'agnas': {'epochs': 600, 'batch_size': 96, 'learning_rate': 0.025, 'drop_path_prob': 0.2},  # AGNAS Sec. 5.2, code
    'eoinas': {'epochs': 600, 'batch_size': 128, 'learning_rate': 0.025, 'drop_path_prob': 0.3},  # EoiNAS Sec. 4.3
    # ADWPNAS Sec. 4.3: DARTS's recipe at batch 98 for 1000 epochs, 1500 with --autoaugment
    'adwpnas': {'epochs': 1000, 'batch_size': 98, 'learning_rate': 0.025, 'drop_path_prob': 0.2},
    'nb201': nb201.TRAIN_SCHEDULE,  # the benchmark's own (apply_nb201_schedule)
}
PRESET_KEYS = ('epochs', 'batch_size', 'learning_rate', 'drop_path_prob')
def choose_preset(args, genotype, label: str) -> tuple[str, str]:
    """(preset, why): --preset as given, else the recipe of the paper whose method found the genotype."""
    if args.preset is not None:
        return args.preset, 'given'
    return runs.genotype_origin(genotype, label, args.genotype_file)


def apply_preset(args, given: set[str], why: str) -> str:
    """Fill the preset's values into the flags not given (None); a learning rate not given scales with the
    batch. Returns the line that says what was used."""
    values = dict(PRESETS[args.preset])
    if args.preset == 'adwpnas' and args.autoaugment:
        values['epochs'] = 1500  # ADWPNAS Sec. 4.3
    for key in PRESET_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, values[key])
    scaled = ''
    if 'learning_rate' not in given:
        args.learning_rate = values['learning_rate'] * (args.batch_size / values['batch_size'])
        if args.batch_size != values['batch_size']:
            scaled = (f' (its lr {values["learning_rate"]:g} at batch {values["batch_size"]}, scaled linearly to '
                      f'batch {args.batch_size})')
    shown = ', '.join(f'{k} {getattr(args, k):g}' for k in PRESET_KEYS)
    return f'retraining recipe: --preset {args.preset} ({why}): {shown}{scaled}; a flag given wins'


def apply_nb201_schedule(args, given: set[str], genotype, label: str) -> None:
    """A NAS-Bench-201 architecture trains with the benchmark's recipe (nb201.TRAIN_SCHEDULE) in every flag
    not given; --nb201_schedule asks for it explicitly and applies to NAS-Bench-201 architectures only. Its
    network has no auxiliary tower and no drop-path: asking for them is refused."""
    is_nb201 = isinstance(genotype, genotypes.NB201Genotype)
    if args.nb201_schedule and not is_nb201:
        raise utils.UserError(f'--nb201_schedule trains NAS-Bench-201 architectures (|op~0|+...|), and {label} is '
                              f'not one; drop the flag or pass an architecture string')
    if not is_nb201:
        return
    for flag in ('auxiliary', 'drop_path_prob'):
        if flag in given and getattr(args, flag):
            raise utils.UserError(f'--{flag} is refused for a NAS-Bench-201 architecture: its network has no '
                                  f'auxiliary tower and no drop-path (the benchmark trains without them)')
    args.nb201_schedule = True
    for key, value in nb201.TRAIN_SCHEDULE.items():
        if key not in given and not (key == 'auxiliary' and 'no_auxiliary' in given):
            setattr(args, key, value)


def apply_chain(args, given: set[str], genotype, label: str) -> None:
    """A chain genotype (AGNAS's macro search, the ProxylessNAS space) retrains as model_macro.MacroNetwork in
    the layout of the image size (32x32: the CIFAR-sized chain, this repo's own): it has no cells, no
    auxiliary tower and no drop-path, so asking for them is refused."""
    if not isinstance(genotype, genotypes.ChainGenotype):
        return
    for flag in ('layers', 'init_channels', 'auxiliary', 'drop_path_prob'):
        if flag in given:
            raise utils.UserError(f'--{flag} applies to cell genotypes; {label} is a chain genotype (the ProxylessNAS '
                                  f'space), whose depth and widths are fixed and which has no auxiliary tower or '
                                  f'drop-path: drop --{flag}')
    args.auxiliary, args.drop_path_prob, args.init_channels = False, 0., None


@runs.holds_folder_lock
def main(argv=None) -> dict:
    started = time.time()
    argv = list(argv) if argv is not None else None
    args = build_parser().parse_args(argv)
    given = utils.given_flags(argv)
    genotype, label = runs.resolve_genotype(args.arch, args.genotype_file, DEFAULT_ARCH)
    if args.nb201_schedule or isinstance(genotype, genotypes.NB201Genotype):
        if args.preset not in (None, 'nb201'):
            raise utils.UserError(f'--preset {args.preset} does not fit a NAS-Bench-201 architecture, which trains '
                                  f'with the benchmark\'s recipe (--preset nb201); drop --preset')
        args.preset = 'nb201'
    args.preset, why = choose_preset(args, genotype, label)
    args.nb201_schedule = args.nb201_schedule or args.preset == 'nb201'  # the same recipe
    apply_nb201_schedule(args, given, genotype, label)  # refuses it for a genotype of another space
    apply_chain(args, given, genotype, label)
    recipe = apply_preset(args, given, why)
    if args.weight_decay is None:
        args.weight_decay = WEIGHT_DECAY.get(args.dataset, 5e-4)
    if not isinstance(genotype, genotypes.ChainGenotype):
        args.layers = runs.genotype_layers(genotype, args.layers, DEFAULT_LAYERS, label)
    utils.check_flags(args)
    runs.check_tensorboard(args.tensorboard)
    datasets.check_image_size(args.dataset, args.image_size)
    if args.auxiliary and not 8 <= args.image_size // 4 <= 10:
        raise utils.UserError(f'the auxiliary tower fits 32- to 40-pixel images only (DARTS pools its 8x8 input to '
                              f'2x2); add --no_auxiliary to train at --image_size {args.image_size}')
    genotype_json = genotypes.to_json(genotype)
    save, resume = runs.run_folder(args.save, args.resume, f'eval-{args.dataset}')
    args.save = save  # the folder in use, as the checkpoint records it
    device = utils.get_device(args.gpu, args.device)
    cuda = device.type == 'cuda'
    amp_dtype = torch.bfloat16 if args.amp == 'bf16' else None  # opt-in: the papers trained in fp32
    channels_last = amp_dtype is not None and not args.no_channels_last

    # Everything that must match before the checkpoint is touched, so a mismatch costs nothing.
    ckpt, changed = None, {}
    if resume is not None:
        ckpt = runs.load_resume(resume, 'train_cifar.py', CHECKPOINT_KEYS)
        with runs.restoring(resume):
            # the recipe a run started with stays, unless a flag says otherwise (and older runs had no --preset)
            kept = {k: ckpt['args'][k] for k in ('preset',) + PRESET_KEYS
                    if k not in given and k in ckpt['args'] and ckpt['args'][k] != getattr(args, k)}
            if kept:
                vars(args).update(kept)
                recipe = (f'retraining recipe: the checkpoint\'s, {", ".join(f"{k} {v}" for k, v in kept.items())} '
                          f'(a resumed run keeps the settings it started with)')
            runs.check_genotype(ckpt, genotype_json, label, resume)
            runs.check_same('dataset', ckpt['dataset'], args.dataset, resume)
            if args.dataset == 'synthetic':
                runs.check_same('synthetic_size', ckpt['synthetic_size'], args.synthetic_size, resume)
            for name in ('layers', 'init_channels', 'auxiliary', 'epochs'):
                runs.check_same(name, ckpt['args'][name], getattr(args, name), resume)
            changed = runs.resume_flags(ckpt, args, RESUME_MAY_CHANGE, resume)
        runs.carry_over(resume, save, ('metrics.jsonl', 'log.txt'))  # resumed into another --save

    logger = runs.get_logger(save, 'train_cifar')
    runs.log_retraining(logger, args, genotype, label, recipe)
    genotypes.save(genotype, os.path.join(save, 'genotype.json'))  # the cells trained, random:SEED's too
    logger.info(f'weight decay {args.weight_decay:g} ({args.dataset}); lr {args.learning_rate:g} cosine to 0;'
                f' device {device}, {"bf16 autocast" if amp_dtype else "fp32"}'
                f'{", channels_last" if channels_last else ""}')

    data_stats = datasets.data_stats(args.dataset, args.data, args.image_size, save, ckpt, resume)
    train_data = datasets.get_dataset(args.dataset, args.data, True, args.cutout_length, args.synthetic_size,
                                   image_size=args.image_size, stats=data_stats, autoaugment=args.autoaugment,
                                   download=not args.no_download)
    test_data = datasets.get_dataset(args.dataset, args.data, False, 0, args.synthetic_size,
                                  image_size=args.image_size, stats=data_stats, download=not args.no_download)
    num_classes = datasets.num_classes(args.dataset, args.data)
    if args.batch_size > len(train_data):
        raise utils.UserError(f'--batch_size {args.batch_size} is more than the {len(train_data)} training '
                              f'images; use a smaller --batch_size')
    if data_stats is not None:
        logger.info(datasets.folder_summary(data_stats, test_data))

    utils.set_seed(args.seed)
    if isinstance(genotype, genotypes.NB201Genotype):
        model = NB201Network(args.init_channels, num_classes, args.layers, genotype).to(device)
        logger.info('NAS-Bench-201 network (C %d, %d cells) with the benchmark\'s recipe in every flag not given '
                    '(--nb201_schedule)', args.init_channels, args.layers)
    elif isinstance(genotype, genotypes.ChainGenotype):  # AGNAS's macro search (model_macro.py)
        model = MacroNetwork(genotype, num_classes, layout=layout_for(args.image_size)).to(device)
        logger.info('ProxylessNAS chain, %s layout', layout_for(args.image_size))
    else:
        model = NetworkCIFAR(args.init_channels, num_classes, args.layers, args.auxiliary, genotype).to(device)
    params = utils.count_params(model)
    size = 16 if args.dataset == 'imagenet16-120' else args.image_size
    macs = utils.count_macs(model, (1, 3, size, size))
    logger.info(f'weights {params / 1e6:.2f}M (without the auxiliary tower), multiply-adds {macs / 1e6:.1f}M '
                f'per {size}x{size} image')
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    optimizer = torch.optim.SGD(model.parameters(), args.learning_rate, momentum=args.momentum,
                                weight_decay=args.weight_decay, nesterov=args.nesterov)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=0.)
    criterion = nn.CrossEntropyLoss()
    start_epoch = 0
    metrics_path = os.path.join(save, 'metrics.jsonl')
    if ckpt is not None:
        start_epoch = runs.restore_training(ckpt, resume, model, optimizer, scheduler)
        if 'learning_rate' in changed:  # the cosine schedule goes on as if the run had started with it
            runs.set_learning_rate(optimizer, scheduler, args.learning_rate)
        dropped = runs.trim_jsonl(metrics_path, start_epoch)
        logger.info(f'resumed from {resume} after epoch {start_epoch}'
                    + (f'; dropped {dropped} line(s) of metrics.jsonl beyond it' if dropped else ''))
        if runs.describe_changes(changed, start_epoch, args.epochs):
            logger.info(runs.describe_changes(changed, start_epoch, args.epochs))

    board = runs.TensorBoard(save, args.tensorboard, start_epoch)
    # BatchNorm in the auxiliary tower cannot train on a batch of one image: drop such a last batch.
    drop_last = len(train_data) % args.batch_size == 1
    test_loader = datasets.make_loader(test_data, args.batch_size, False, args.workers, pin=cuda)
    test = (float('nan'),) * 3
    ckpt_path = os.path.join(save, 'checkpoint.pt')
    preset = PRESETS[args.preset]  # the divergence advice goes back to the preset's rate at this batch
    retry = utils.retry_learning_rate(args.learning_rate,
                                      preset['learning_rate'] * (args.batch_size / preset['batch_size']))
    retry = f'--learning_rate {retry:g}'
    for epoch in range(start_epoch, args.epochs):
        g = utils.seed_epoch(args.seed, epoch)
        model.drop_path_prob = args.drop_path_prob * epoch / args.epochs
        lr = scheduler.get_last_lr()[0]
        train_loader = datasets.make_loader(train_data, args.batch_size, True, args.workers, generator=g,
                                         drop_last=drop_last, pin=cuda)
        progress = utils.Progress(len(train_loader), args.report_freq, logger, f'epoch {epoch + 1} ')
        start, cpu_start = time.time(), utils.cpu_seconds()
        train_loss, train_acc = utils.train_epoch(
            model, train_loader, optimizer, criterion, device,
            aux_weight=args.auxiliary_weight if args.auxiliary else 0., grad_clip=args.grad_clip,
            amp_dtype=amp_dtype, channels_last=channels_last, progress=progress,
            check=functools.partial(utils.check_loss, limit=utils.loss_limit(num_classes), epoch=epoch,
                                    kept=epoch, checkpoint=ckpt_path, retry=retry))
        scheduler.step()
        datasets.log_unreadable(train_data, logger)
        test = utils.evaluate(model, test_loader, criterion, device, amp_dtype=amp_dtype,
                              channels_last=channels_last)
        # no checkpoint of a diverged state: the weights about to be saved must be finite and their loss sane
        utils.check_state({'model': model.state_dict(), 'optimizer': optimizer.state_dict()},
                          {'test_loss': test[0]}, utils.loss_limit(num_classes), epoch=epoch, kept=epoch,
                          checkpoint=ckpt_path, retry=retry)
        seconds, cpu = time.time() - start, utils.cpu_seconds() - cpu_start
        logger.info(f'epoch {epoch + 1}/{args.epochs} lr {lr:.5f} drop_path {model.drop_path_prob:.3f} '
                    f'train_loss {train_loss:.4f} train_acc {train_acc:.2f} test_loss {test[0]:.4f} '
                    f'test_acc {test[1]:.2f} test_top5 {test[2]:.2f} ({seconds:.0f}s)')
        # metrics first: a run killed between the two writes logs this epoch again on resume, and
        # runs.trim_jsonl drops the stale line
        record = {
            'epoch': epoch + 1, 'lr': lr, 'drop_path_prob': model.drop_path_prob, 'train_loss': train_loss,
            'train_acc': train_acc, 'test_loss': test[0], 'test_acc': test[1], 'test_top5': test[2],
            'seconds': seconds, 'cpu_seconds': cpu}
        runs.append_jsonl(metrics_path, record)
        board.scalars(record, epoch + 1)
        runs.save_checkpoint({
            'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
            'scheduler': scheduler.state_dict(), 'epoch': epoch + 1, 'arch': label, 'genotype': genotype_json,
            'dataset': args.dataset, 'synthetic_size': args.synthetic_size, 'args': vars(args),
            'data_stats': data_stats,
            'script': 'train_cifar.py',
        }, ckpt_path)

    if start_epoch >= args.epochs:  # resumed a finished run: report it again
        test = utils.evaluate(model, test_loader, criterion, device, amp_dtype=amp_dtype,
                              channels_last=channels_last)
    result = {
        'kind': 'train', 'script': 'train_cifar',
        'dataset': args.dataset, 'arch': label, 'genotype': json.loads(genotype_json), 'epochs': args.epochs,
        'test_error': 100. - test[1], 'test_acc': test[1], 'test_top5': test[2], 'test_loss': test[0],
        'params': params, 'params_M': params / 1e6, 'macs': macs, 'macs_M': macs / 1e6,
        'learning_rate': args.learning_rate, 'weight_decay': args.weight_decay, 'seed': args.seed,
        'batch_size': args.batch_size, 'layers': args.layers, 'init_channels': args.init_channels,
        'drop_path_prob': args.drop_path_prob,
        # training + evaluation time of every epoch, sessions before a --resume included
        'seconds': sum(r['seconds'] for r in runs.read_jsonl(metrics_path)),
        **runs.run_info(device, amp_dtype),
    }
    epochs_run = runs.read_jsonl(metrics_path)
    if not cuda and all('cpu_seconds' in r for r in epochs_run):  # the cost of a CPU run: its CPU time
        result['cpu_time_hours'] = sum(r['cpu_seconds'] for r in epochs_run) / 3600
    board.close()
    runs.write_json(os.path.join(save, 'result.json'), result)
    line = f'final test_error={result["test_error"]:.2f} params_M={params / 1e6:.2f} macs_M={macs / 1e6:.1f}'
    logger.info(f'wrote {os.path.join(save, "result.json")}')
    runs.report_run(logger, save, [
        ('log.txt', 'the log'), ('metrics.jsonl', 'one record per epoch: losses, accuracies, lr'),
        ('checkpoint.pt', 'the last epoch (--resume)'), ('result.json', 'test error, weights, multiply-adds'),
    ], [] if isinstance(genotype, genotypes.NB201Genotype) else
        [f'{runs.command("visualize.py", None, args.genotype_file or label)}    # draw the cell'], started)
    print(line, flush=True)
    return result


if __name__ == '__main__':
    utils.run_main(main)
