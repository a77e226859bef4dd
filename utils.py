"""What the scripts share: errors, devices, seeding, logging, meters, data, checkpoints, attention transfer,
counting, and the training/evaluation epoch of the evaluation networks.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------------------
# Errors the user can fix: one sentence, non-zero exit, no traceback.


class UserError(Exception):
    """Bad input (missing data, wrong checkpoint, no CUDA, ...): the message says what to do."""


def run_main(main) -> None:
    """Run a script's main(); a UserError or GenotypeError becomes one line on stderr and exit code 2."""
    from genotypes import GenotypeError
    try:
        main()
    except (UserError, GenotypeError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        sys.exit(130)


def get_device(gpu: int, device: str | None = None) -> torch.device:
    """`--device cpu` runs on the CPU; otherwise `--gpu N` must name a CUDA device that exists."""
    if device is not None and device != 'cuda':
        if device != 'cpu':
            raise UserError(f'--device {device} is not supported; use --device cpu, or --gpu N for CUDA')
        return torch.device('cpu')
    if not torch.cuda.is_available():
        raise UserError(f'--gpu {gpu} asks for CUDA but this machine has no CUDA device; '
                        f'pass --device cpu to run on the CPU')
    if gpu >= torch.cuda.device_count():
        raise UserError(f'--gpu {gpu} does not exist: this machine has {torch.cuda.device_count()} GPU(s)')
    torch.cuda.set_device(gpu)
    return torch.device('cuda', gpu)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_epoch(seed: int, epoch: int) -> torch.Generator:
    """Re-seed every RNG from (seed, epoch) and return a generator for the epoch's shuffling.

    An epoch then draws the same batches and augmentations whether or not the run was resumed before it,
    which is what makes `--resume` reproduce an uninterrupted run exactly.
    """
    s = seed * 1000 + epoch
    set_seed(s)
    return torch.Generator().manual_seed(s)


# ---------------------------------------------------------------------------------------------------------
# Logging and meters


def get_logger(save: str | None, name: str = 'nos', enabled: bool = True) -> logging.Logger:
    """Log to stdout and to SAVE/log.txt (appending, so a resumed run keeps one log)."""
    logger = logging.getLogger(f'{name}:{save}')
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if enabled else logging.WARNING)
    fmt = logging.Formatter('%(asctime)s %(message)s', datefmt='%m/%d %H:%M:%S')
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if save and enabled:
        os.makedirs(save, exist_ok=True)
        fh = logging.FileHandler(os.path.join(save, 'log.txt'))
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


def append_jsonl(path: str, record: dict) -> None:
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')


class AverageMeter:
    def __init__(self):
        self.sum, self.count = 0.0, 0

    def update(self, value: float, n: int = 1) -> None:
        self.sum += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / max(1, self.count)


def accuracy(logits: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """Top-k accuracies in percent."""
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    correct = pred.eq(target[:, None])
    return [correct[:, :min(k, maxk)].any(dim=1).float().mean().item() * 100 for k in topk]


class Progress:
    """Prints 'step i/total, images/s, time left' every `every` steps."""

    def __init__(self, total: int, every: int, logger: logging.Logger, prefix: str = ''):
        self.total, self.every, self.logger, self.prefix = total, every, logger, prefix
        self.start = time.time()
        self.images = 0

    def step(self, i: int, batch: int, extra: str = '') -> None:
        self.images += batch
        done = i + 1
        if self.every and (done % self.every == 0 or done == self.total):
            elapsed = time.time() - self.start
            left = elapsed / done * (self.total - done)
            self.logger.info(f'{self.prefix}step {done}/{self.total}  {self.images / elapsed:.0f} img/s  '
                             f'{format_time(left)} left  {extra}')


def format_time(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds % 3600 // 60, seconds % 60
    return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


# ---------------------------------------------------------------------------------------------------------
# Data

CIFAR_MEAN = {'cifar10': (0.4914, 0.4822, 0.4465), 'cifar100': (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {'cifar10': (0.2470, 0.2435, 0.2616), 'cifar100': (0.2673, 0.2564, 0.2762)}
NUM_CLASSES = {'cifar10': 10, 'cifar100': 100, 'synthetic': 10}
DATASETS = ('cifar10', 'cifar100', 'synthetic')


class Cutout:
    """Zero a random length x length square of a (C,H,W) tensor (DeVries & Taylor, 2017)."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        y, x = np.random.randint(h), np.random.randint(w)
        y1, y2 = max(0, y - self.length // 2), min(h, y + self.length // 2)
        x1, x2 = max(0, x - self.length // 2), min(w, x + self.length // 2)
        img = img.clone()
        img[..., y1:y2, x1:x2] = 0.
        return img


class SyntheticImages(torch.utils.data.Dataset):
    """A small, learnable, CIFAR-shaped dataset made on the spot: no download, same data for a seed.

    Each class owns a fixed smooth random pattern; a sample is its class pattern, randomly shifted and
    scaled, plus noise. A network learns it within an epoch or two, so tests can assert that loss falls.
    Samples are normalised tensors (C,H,W); `transform` (if any) applies to the tensor.
    """

    def __init__(self, n: int, num_classes: int = 10, size: int = 32, channels: int = 3, seed: int = 0,
                 noise: float = 0.5, transform=None):
        g = torch.Generator().manual_seed(seed)
        coarse = torch.randn(num_classes, channels, 4, 4, generator=g)
        patterns = F.interpolate(coarse, size=(size, size), mode='bicubic', align_corners=False)
        self.targets = torch.randint(num_classes, (n,), generator=g)
        scale = 0.75 + 0.5 * torch.rand(n, 1, 1, 1, generator=g)
        shifts = torch.randint(-3, 4, (n, 2), generator=g)
        base = patterns[self.targets] * scale
        self.data = torch.stack([torch.roll(b, tuple(s.tolist()), dims=(1, 2)) for b, s in zip(base, shifts)])
        self.data += noise * torch.randn(self.data.shape, generator=g)
        self.classes = list(range(num_classes))
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        x = self.data[i]
        return (self.transform(x) if self.transform else x), int(self.targets[i])


def cifar_transforms(dataset: str, train: bool, cutout: int = 0, autoaugment: bool = False):
    """DARTS's CIFAR augmentation: random crop 32 pad 4, horizontal flip, normalise (+ cutout). With
    `autoaugment`, torchvision's CIFAR-10 AutoAugment policy follows the flip, and cutout stays last (ADWPNAS
    Sec. 4.3)."""
    import torchvision.transforms as T
    t = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
    if train and autoaugment:
        t.append(T.AutoAugment(T.AutoAugmentPolicy.CIFAR10))
    t += [T.ToTensor(), T.Normalize(CIFAR_MEAN[dataset], CIFAR_STD[dataset])]
    if train and cutout:
        t.append(Cutout(cutout))
    return T.Compose(t)


def synthetic_transforms(train: bool, cutout: int = 0):
    """Tensor-level twin of the CIFAR augmentation for the synthetic data (flip, crop by shifting)."""
    import torchvision.transforms as T
    if not train:
        return None
    t = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    if cutout:
        t.append(Cutout(cutout))
    return T.Compose(t)


def get_dataset(dataset: str, root: str, train: bool, cutout: int = 0, synthetic_size: int = 512,
                seed: int = 0, autoaugment: bool = False):
    """CIFAR-10/100 through torchvision (no download: the error says how), or the synthetic data.
    `autoaugment` (CIFAR only) adds the CIFAR-10 AutoAugment policy to the training augmentation."""
    if autoaugment and dataset == 'synthetic':
        raise UserError('--autoaugment works on CIFAR images; the synthetic data are normalised tensors that '
                        'its policy cannot process, so leave it out with --dataset synthetic')
    if dataset == 'synthetic':
        # train and test draw from the same class patterns (same seed), different samples
        n = synthetic_size if train else max(64, synthetic_size // 4)
        data = SyntheticImages(n + (0 if train else synthetic_size), seed=seed,
                               transform=synthetic_transforms(train, cutout))
        if not train:  # the test split: samples after the training ones
            data = torch.utils.data.Subset(data, range(synthetic_size, synthetic_size + n))
        return data
    if dataset not in ('cifar10', 'cifar100'):
        raise UserError(f'unknown dataset {dataset!r}; choose one of {", ".join(DATASETS)}')
    import torchvision
    cls = torchvision.datasets.CIFAR10 if dataset == 'cifar10' else torchvision.datasets.CIFAR100
    try:
        return cls(root=root, train=train, download=False,
                   transform=cifar_transforms(dataset, train, cutout, autoaugment))
    except RuntimeError:
        name = 'CIFAR-10' if dataset == 'cifar10' else 'CIFAR-100'
        raise UserError(
            f'no {name} data in {os.path.abspath(root)}: download it there with '
            f'`python -c "import torchvision; torchvision.datasets.{cls.__name__}(\'{root}\', download=True)"`'
            f', or run on made-up data with --dataset synthetic') from None


def make_loader(data, batch_size: int, shuffle: bool, workers: int, generator=None, sampler=None,
                drop_last: bool = False, pin: bool = False):
    return torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=workers, pin_memory=pin, drop_last=drop_last, generator=generator,
        persistent_workers=False)


def search_split(n: int, train_portion: float) -> tuple[list[int], list[int]]:
    """DARTS's split of the training set: the first `portion` trains the weights, the rest the A."""
    split = math.floor(train_portion * n)
    if split == 0 or split == n:
        raise UserError(f'--train_portion {train_portion} leaves one side of the search split empty '
                        f'({n} images); use a value strictly between 0 and 1')
    return list(range(split)), list(range(split, n))


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: written atomically, so a run killed mid-write keeps its previous checkpoint.


def save_checkpoint(state: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp'
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str, map_location='cpu') -> dict:
    if not os.path.isfile(path):
        raise UserError(f'checkpoint {path} does not exist')
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as e:  # damaged or foreign
        raise UserError(f'checkpoint {path} cannot be read ({type(e).__name__}); it is damaged or not a '
                        f'checkpoint of this project') from None


def check_same(what: str, saved, current, path: str) -> None:
    """Refuse to resume (or load) a checkpoint made for another setting, naming both."""
    if saved != current:
        raise UserError(f'checkpoint {path} was made for {what} {saved!r}, but this run has {what} '
                        f'{current!r}; start a new --save directory or run with the same {what}')


# ---------------------------------------------------------------------------------------------------------
# Run folders, resuming, and the genotype a training run builds


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none to show (None, on/off switches)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def resume_path(ckpt_path: str, resume: str | None) -> str | None:
    """The checkpoint to resume from, given `--resume [PATH]` (None: not given; '': the run's own
    `ckpt_path`). A fresh run refuses a folder that already holds a checkpoint rather than overwrite it."""
    if resume is None:
        if os.path.exists(ckpt_path):
            raise UserError(f'{ckpt_path} already holds a checkpoint; pass --resume to continue that run, or '
                            f'pick another --save')
        return None
    return resume or ckpt_path


def run_folder(save: str | None, resume: str | None, stem: str) -> tuple[str, str | None]:
    """(SAVE, checkpoint to resume from) for the training scripts: SAVE defaults to the folder of a
    `--resume PATH`, else to a fresh STEM-DATE-TIME folder."""
    if save is None:
        save = (os.path.dirname(resume) or '.') if resume else f'{stem}-{time.strftime("%Y%m%d-%H%M%S")}'
    return save, resume_path(os.path.join(save, 'checkpoint.pt'), resume)


def trim_jsonl(path: str, last_epoch: int) -> None:
    """Forget records of epochs after the checkpoint we resume from (a run killed between writing its
    log line and its checkpoint repeats that epoch)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)['epoch'] <= last_epoch]
    with open(path, 'w') as f:
        f.writelines(keep)


def write_json(path: str, record: dict) -> None:
    """Write a JSON file atomically."""
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        json.dump(record, f, indent=1)
        f.write('\n')
    os.replace(tmp, path)


def resolve_genotype(arch: str | None, genotype_file: str | None, default: str):
    """(genotype, label) from `--arch NAME` or `--genotype_file PATH` (not both); the label names it in
    logs and checkpoints."""
    import genotypes
    if arch and genotype_file:
        raise UserError('give either --arch or --genotype_file, not both')
    if genotype_file:
        return genotypes.load(genotype_file=genotype_file), genotype_file
    arch = arch or default
    return genotypes.load(arch=arch), arch


def genotype_layers(genotype, layers: int | None, default: int, label: str) -> int:
    """The network's depth: a per-layer genotype (ADWPNAS) fixes it, so `--layers` may be left out and a
    different value is refused; any other genotype takes `--layers` or `default`."""
    import genotypes
    if isinstance(genotype, genotypes.MacroGenotype):
        depth = len(genotype.cells)
        if layers is not None and layers != depth:
            raise UserError(f'--layers {layers} conflicts with the per-layer genotype {label}, which has {depth} '
                            f'cells; leave out --layers or pass --layers {depth}')
        return depth
    return default if layers is None else layers


def check_genotype(ckpt: dict, genotype_json: str, label: str, path: str) -> None:
    """Refuse to resume a checkpoint trained on other cells, naming both."""
    if ckpt['genotype'] != genotype_json:
        saved, current = ckpt['arch'], label
        if saved == current:  # same name, different cells (an edited genotypes.py or file)
            saved, current = f'{saved} (as it was then)', f'{current} (as it is now)'
        check_same('genotype', saved, current, path)


# ---------------------------------------------------------------------------------------------------------
# Attention transfer (Zagoruyko & Komodakis, 2017; NOS Eq. 10 as fixed by spec §6)


def attention_map(f: torch.Tensor) -> torch.Tensor:
    """at(F): the channel-mean of F squared, flattened and L2-normalised, (N, H*W)."""
    return F.normalize(f.float().pow(2).mean(dim=1).flatten(1), dim=1)


def attention_transfer_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """L_AT = 1/2 * sum over stages of mean((at(S) - at(T))^2); the stages must share a resolution."""
    loss = 0.
    for s, t in zip(student, teacher, strict=True):
        if s.shape[-2:] != t.shape[-2:]:
            raise ValueError(f'attention transfer pairs a {tuple(s.shape[-2:])} student stage with a '
                             f'{tuple(t.shape[-2:])} teacher stage')
        loss = loss + (attention_map(s) - attention_map(t)).pow(2).mean()
    return 0.5 * loss


# ---------------------------------------------------------------------------------------------------------
# Counting weights and multiply-adds


def count_params(model: nn.Module, exclude: str = 'auxiliary') -> int:
    """Trainable weights, leaving out those whose name contains `exclude` (DARTS leaves out its head) and
    a search network's architecture parameters (`model.arch_parameters()`; DARTS does not count them)."""
    arch = {id(p) for p in model.arch_parameters()} if hasattr(model, 'arch_parameters') else set()
    return sum(p.numel() for n, p in model.named_parameters() if exclude not in n and id(p) not in arch)


def count_macs(model: nn.Module, input_size=(1, 3, 32, 32)) -> int:
    """Multiply-adds of one forward pass, from torch.utils.flop_counter (FLOPs / 2), in eval mode.

    Counting happens at the ATen level, so the per-sample dynamic convolution (a grouped conv2d) and the
    kernel generator's matrix products are counted like any other op.
    """
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    x = torch.randn(*input_size, device=p.device, dtype=p.dtype)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2 // input_size[0]


# ---------------------------------------------------------------------------------------------------------
# The training step of the evaluation networks (train_cifar.py, train_imagenet.py, teacher.py)


class NonFiniteLoss(UserError):
    pass


def _split_output(out):
    """Models return logits, or (logits, auxiliary logits or None) as DARTS's networks do."""
    return out if isinstance(out, tuple) else (out, None)


def train_epoch(model: nn.Module, loader, optimizer, criterion, device, *, aux_weight: float = 0.,
                grad_clip: float | None = 5., amp_dtype: torch.dtype | None = None,
                channels_last: bool = False, progress: Progress | None = None,
                step_hook=None) -> tuple[float, float]:
    """One epoch; returns (mean loss, top-1 %). `step_hook()` runs after every optimizer step
    (a per-step learning-rate schedule, say). Stops with NonFiniteLoss naming the step."""
    model.train()
    loss_m, top1_m = AverageMeter(), AverageMeter()
    for step, (x, y) in enumerate(loader):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits, aux = _split_output(model(x))
            loss = criterion(logits, y)
            if aux is not None and aux_weight > 0:
                loss = loss + aux_weight * criterion(aux, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if step_hook is not None:
            step_hook()
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLoss(f'the training loss became {value} at step {step + 1} of this epoch; the last '
                                f'checkpoint is kept: lower the learning rate or check the data, then --resume')
        n = x.shape[0]
        loss_m.update(value, n)
        top1_m.update(accuracy(logits.detach(), y)[0], n)
        if progress is not None:
            progress.step(step, n, f'loss {loss_m.avg:.3f} top1 {top1_m.avg:.2f}')
    return loss_m.avg, top1_m.avg


@torch.no_grad()
def evaluate(model: nn.Module, loader, criterion, device, *, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False) -> tuple[float, float, float]:
    """Returns (mean loss, top-1 %, top-5 %) over the loader."""
    model.eval()
    loss_m, top1_m, top5_m = AverageMeter(), AverageMeter(), AverageMeter()
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits, _ = _split_output(model(x))
            loss = criterion(logits.float(), y)
        top1, top5 = accuracy(logits, y, (1, 5))
        n = x.shape[0]
        loss_m.update(loss.item(), n)
        top1_m.update(top1, n)
        top5_m.update(top5, n)
    return loss_m.avg, top1_m.avg, top5_m.avg
