"""Retrain a derived cell from scratch on CIFAR-10 or CIFAR-100 (NOS Sec. 4.3, Appendix A.1; spec §8).

    python train_cifar.py --genotype_file runs/search/genotype.json            # CIFAR-10, paper settings
    python train_cifar.py --genotype_file runs/search/genotype.json --dataset cifar100
    python train_cifar.py --arch DARTS_V2 --device cpu --dataset synthetic --epochs 2 --layers 5 \\
        --init_channels 8                                                       # a CPU smoke run

The defaults are the paper's: 20 cells, 36 channels, auxiliary tower weight 0.4, cutout 16, drop-path 0.3
(raised linearly from 0 over the epochs, as DARTS does), 600 epochs, batch 128, SGD momentum 0.9,
lr 0.25 cosine to 0 (DARTS: 0.025), weight decay 3e-4 (CIFAR-10) / 5e-4 (CIFAR-100), grad clip 5.
The whole training set trains, the test set is evaluated after every epoch.

Writes SAVE/log.txt, SAVE/metrics.jsonl (one line per epoch), SAVE/checkpoint.pt (every epoch, atomic),
SAVE/result.json, and ends with one line on stdout:

    final test_error=2.67 params_M=3.35 macs_M=528.4

test_error: top-1 test error in % after the last epoch; params_M: weights in millions without the
auxiliary tower (DARTS's count); macs_M: multiply-adds of one 32x32 image in millions (utils.count_macs).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn

import genotypes
import utils
from model import NetworkCIFAR

DEFAULT_ARCH = 'DARTS_V2'
DEFAULT_LAYERS = 20
WEIGHT_DECAY = {'cifar10': 3e-4, 'cifar100': 5e-4, 'synthetic': 3e-4}  # NOS App. A.1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Retrain a derived cell on CIFAR-10/100 (NOS Sec. 4.3).',
                                formatter_class=utils.HelpFormatter)
    p.add_argument('--data', default='data', help='folder holding (or to hold) the CIFAR data')
    p.add_argument('--dataset', default='cifar10', choices=utils.DATASETS,
                   help='synthetic: made-up CIFAR-shaped data, no download (smoke tests)')
    p.add_argument('--synthetic_size', type=int, default=512, help='training images of --dataset synthetic')
    p.add_argument('--arch', default=None,
                   help=f'a genotype named in genotypes.py (default {DEFAULT_ARCH} unless --genotype_file)')
    p.add_argument('--genotype_file', default=None, help='genotype.json written by train_search.py')
    p.add_argument('--epochs', type=int, default=600, help='NOS App. A.1')
    p.add_argument('--batch_size', type=int, default=128, help='NOS App. A.1')
    p.add_argument('--learning_rate', type=float, default=0.25,
                   help='initial lr, cosine to 0; 0.25 is the NOS paper\'s (App. A.1), DARTS used 0.025')
    p.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    p.add_argument('--weight_decay', type=float, default=None,
                   help='default per dataset: 3e-4 for cifar10 (and synthetic), 5e-4 for cifar100')
    p.add_argument('--init_channels', type=int, default=36, help='channels of the first cells')
    p.add_argument('--layers', type=int, default=None,
                   help=f'cells in the network (default {DEFAULT_LAYERS}; a per-layer genotype sets its own)')
    p.add_argument('--auxiliary', dest='auxiliary', action='store_true', default=True,
                   help='auxiliary tower at 2/3 depth (on by default; DARTS\'s flag, accepted)')
    p.add_argument('--no_auxiliary', dest='auxiliary', action='store_false', help='no auxiliary tower')
    p.add_argument('--auxiliary_weight', type=float, default=0.4, help='weight of the auxiliary loss')
    p.add_argument('--cutout_length', type=int, default=16, help='0 turns cutout off')
    p.add_argument('--autoaugment', action='store_true',
                   help='torchvision\'s CIFAR-10 AutoAugment policy after crop and flip, cutout last (ADWPNAS)')
    p.add_argument('--drop_path_prob', type=float, default=0.3,
                   help='final drop-path probability; epoch e uses drop_path_prob * e / epochs')
    p.add_argument('--grad_clip', type=float, default=5., help='gradient norm clip (0: none)')
    p.add_argument('--gpu', type=int, default=0, help='CUDA device')
    p.add_argument('--device', default=None, help='cpu to run on the CPU')
    p.add_argument('--no_amp', action='store_true', help='CUDA: train in fp32 instead of bf16 autocast')
    p.add_argument('--no_channels_last', action='store_true', help='CUDA: keep the NCHW memory layout')
    p.add_argument('--save', default=None, help='output folder (default eval-DATASET-TIME)')
    p.add_argument('--resume', nargs='?', const='', default=None, metavar='PATH',
                   help='continue from PATH (default SAVE/checkpoint.pt)')
    p.add_argument('--seed', type=int, default=0, help='seeds weights, batches, augmentation, drop-path')
    p.add_argument('--workers', type=int, default=4, help='data-loading processes')
    p.add_argument('--report_freq', type=int, default=50, help='log every N steps (0: never)')
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.weight_decay is None:
        args.weight_decay = WEIGHT_DECAY[args.dataset]
    genotype, label = utils.resolve_genotype(args.arch, args.genotype_file, DEFAULT_ARCH)
    args.layers = utils.genotype_layers(genotype, args.layers, DEFAULT_LAYERS, label)
    for name in ('epochs', 'batch_size', 'init_channels', 'layers', 'synthetic_size'):
        if getattr(args, name) < 1:
            raise utils.UserError(f'--{name} must be at least 1, got {getattr(args, name)}')
    if not 0 <= args.drop_path_prob < 1:
        raise utils.UserError(f'--drop_path_prob must be in [0, 1), got {args.drop_path_prob}')
    genotype_json = genotypes.to_json(genotype)
    save, resume = utils.run_folder(args.save, args.resume, f'eval-{args.dataset}')
    device = utils.get_device(args.gpu, args.device)
    cuda = device.type == 'cuda'
    amp_dtype = torch.bfloat16 if cuda and not args.no_amp else None
    channels_last = cuda and not args.no_channels_last

    # Everything that must match before the checkpoint is touched, so a mismatch costs nothing.
    ckpt = None
    if resume is not None:
        ckpt = utils.load_checkpoint(resume)
        utils.check_genotype(ckpt, genotype_json, label, resume)
        utils.check_same('dataset', ckpt['dataset'], args.dataset, resume)
        if args.dataset == 'synthetic':
            utils.check_same('synthetic_size', ckpt['synthetic_size'], args.synthetic_size, resume)
        for name in ('layers', 'init_channels', 'auxiliary', 'epochs'):
            utils.check_same(name, ckpt['args'][name], getattr(args, name), resume)

    logger = utils.get_logger(save, 'train_cifar')
    logger.info(f'args: {vars(args)}')
    logger.info(f'genotype {label}: {genotype!r}')
    logger.info(f'weight decay {args.weight_decay:g} ({args.dataset}); lr {args.learning_rate:g} cosine to 0;'
                f' device {device}, {"bf16 autocast" if amp_dtype else "fp32"}'
                f'{", channels_last" if channels_last else ""}')

    train_data = utils.get_dataset(args.dataset, args.data, True, args.cutout_length, args.synthetic_size,
                                   autoaugment=args.autoaugment)
    test_data = utils.get_dataset(args.dataset, args.data, False, 0, args.synthetic_size)
    num_classes = utils.NUM_CLASSES[args.dataset]

    utils.set_seed(args.seed)
    model = NetworkCIFAR(args.init_channels, num_classes, args.layers, args.auxiliary, genotype).to(device)
    params = utils.count_params(model)
    macs = utils.count_macs(model, (1, 3, 32, 32))
    logger.info(f'weights {params / 1e6:.2f}M (without the auxiliary tower), multiply-adds {macs / 1e6:.1f}M '
                f'per 32x32 image')
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    optimizer = torch.optim.SGD(model.parameters(), args.learning_rate, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=0.)
    criterion = nn.CrossEntropyLoss()
    start_epoch = 0
    metrics_path = os.path.join(save, 'metrics.jsonl')
    if ckpt is not None:
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        scheduler.load_state_dict(ckpt['scheduler'])
        start_epoch = ckpt['epoch']
        utils.trim_jsonl(metrics_path, start_epoch)
        logger.info(f'resumed from {resume} after epoch {start_epoch}')

    # BatchNorm in the auxiliary tower cannot train on a batch of one image: drop such a last batch.
    drop_last = len(train_data) % args.batch_size == 1
    test_loader = utils.make_loader(test_data, args.batch_size, False, args.workers, pin=cuda)
    test = (float('nan'),) * 3
    for epoch in range(start_epoch, args.epochs):
        g = utils.seed_epoch(args.seed, epoch)
        model.drop_path_prob = args.drop_path_prob * epoch / args.epochs
        lr = scheduler.get_last_lr()[0]
        train_loader = utils.make_loader(train_data, args.batch_size, True, args.workers, generator=g,
                                         drop_last=drop_last, pin=cuda)
        progress = utils.Progress(len(train_loader), args.report_freq, logger, f'epoch {epoch + 1} ')
        start = time.time()
        train_loss, train_acc = utils.train_epoch(
            model, train_loader, optimizer, criterion, device,
            aux_weight=args.auxiliary_weight if args.auxiliary else 0., grad_clip=args.grad_clip,
            amp_dtype=amp_dtype, channels_last=channels_last, progress=progress)
        scheduler.step()
        test = utils.evaluate(model, test_loader, criterion, device, amp_dtype=amp_dtype,
                              channels_last=channels_last)
        seconds = time.time() - start
        logger.info(f'epoch {epoch + 1}/{args.epochs} lr {lr:.5f} drop_path {model.drop_path_prob:.3f} '
                    f'train_loss {train_loss:.4f} train_acc {train_acc:.2f} test_loss {test[0]:.4f} '
                    f'test_acc {test[1]:.2f} test_top5 {test[2]:.2f} ({seconds:.0f}s)')
        # metrics first: a run killed between the two writes logs this epoch again on resume, and
        # utils.trim_jsonl drops the stale line
        utils.append_jsonl(metrics_path, {
            'epoch': epoch + 1, 'lr': lr, 'drop_path_prob': model.drop_path_prob, 'train_loss': train_loss,
            'train_acc': train_acc, 'test_loss': test[0], 'test_acc': test[1], 'test_top5': test[2],
            'seconds': seconds})
        utils.save_checkpoint({
            'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
            'scheduler': scheduler.state_dict(), 'epoch': epoch + 1, 'arch': label, 'genotype': genotype_json,
            'dataset': args.dataset, 'synthetic_size': args.synthetic_size, 'args': vars(args),
        }, os.path.join(save, 'checkpoint.pt'))

    if start_epoch >= args.epochs:  # resumed a finished run: report it again
        test = utils.evaluate(model, test_loader, criterion, device, amp_dtype=amp_dtype,
                              channels_last=channels_last)
    result = {
        'dataset': args.dataset, 'arch': label, 'genotype': json.loads(genotype_json), 'epochs': args.epochs,
        'test_error': 100. - test[1], 'test_acc': test[1], 'test_top5': test[2], 'test_loss': test[0],
        'params': params, 'params_M': params / 1e6, 'macs': macs, 'macs_M': macs / 1e6,
        'learning_rate': args.learning_rate, 'weight_decay': args.weight_decay, 'seed': args.seed,
    }
    utils.write_json(os.path.join(save, 'result.json'), result)
    line = f'final test_error={result["test_error"]:.2f} params_M={params / 1e6:.2f} macs_M={macs / 1e6:.1f}'
    logger.info(f'wrote {os.path.join(save, "result.json")}')
    print(line, flush=True)
    return result


if __name__ == '__main__':
    utils.run_main(main)
