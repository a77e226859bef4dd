"""What the scripts share: errors, devices, seeding, logging, meters, data, checkpoints, attention transfer,
counting, and the training/evaluation epoch of the evaluation networks.
"""
from __future__ import annotations

import argparse
import bisect
import json
import logging
import math
import multiprocessing
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
    """Run a script's main(); a UserError or GenotypeError becomes one line on stderr and exit code 2, and so
    does running out of memory (an absurd --batch_size or network size)."""
    from genotypes import GenotypeError
    try:
        main()
    except (UserError, GenotypeError) as e:
        print(f'error: {_one_line(str(e))}', file=sys.stderr)
        sys.exit(2)
    except (torch.OutOfMemoryError, MemoryError) as e:
        print(f'error: the run ran out of memory ({_one_line(str(e)) or type(e).__name__}); use a smaller '
              f'--batch_size or a smaller network (--init_channels, --layers)', file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        if "can't allocate memory" not in str(e):  # the CPU allocator's words
            raise
        print(f'error: the run ran out of memory ({_one_line(str(e))}); use a smaller --batch_size or a '
              f'smaller network (--init_channels, --layers)', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        sys.exit(130)


def _one_line(text: str) -> str:
    """The sentence of an error. A UserError raised in a DataLoader worker comes back re-raised with the
    worker's traceback in its text ("Caught UserError in DataLoader worker process 0. Original Traceback
    ..."); its last line, "utils.UserError: <sentence>", holds the sentence."""
    lines = text.strip().splitlines()
    if len(lines) > 1 and lines[0].startswith('Caught ') and 'Original Traceback' in text:
        return lines[-1].split(': ', 1)[-1]
    return lines[0] if lines else ''


def get_device(gpu: int, device: str | None = None) -> torch.device:
    """`--device cpu` runs on the CPU; otherwise `--gpu N` must name a CUDA device that exists."""
    if device is not None and device != 'cuda':
        if device != 'cpu':
            raise UserError(f'--device {device} is not supported; use --device cpu, or --gpu N for CUDA')
        return torch.device('cpu')
    if not torch.cuda.is_available():
        raise UserError(f'--gpu {gpu} asks for CUDA but this machine has no CUDA device; '
                        f'pass --device cpu to run on the CPU')
    if gpu < 0 or gpu >= torch.cuda.device_count():
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
# Flag values: 0, negative and absurd values are refused in one sentence before anything is built.


class Range(tuple):
    """The values a numeric flag accepts: [low, high], an end open with low_open / high_open, None: no bound."""

    def __new__(cls, low=None, high=None, low_open=False, high_open=False):
        return super().__new__(cls, (low, high, low_open, high_open))

    def __contains__(self, v) -> bool:
        low, high, low_open, high_open = self
        return (math.isfinite(v) and (low is None or (v > low if low_open else v >= low))
                and (high is None or (v < high if high_open else v <= high)))

    def __str__(self) -> str:
        low, high, low_open, high_open = self
        low, high = (None if v is None else _number(v) for v in (low, high))
        if low is not None and high is not None:
            return f'in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
        if low is not None:
            return f'{"above" if low_open else "at least"} {low}'
        return f'{"below" if high_open else "at most"} {high}' if high is not None else 'a finite number'


def _number(v) -> str:
    """A flag value as the user would type it: integers in full, floats in %g."""
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else f'{v:g}'


# Upper bounds are there to catch typos (an extra zero or three), far beyond any published setting:
# DARTS-family networks have 8-20 cells of 16-48 channels; more cells or channels than these would not fit
# a GPU anyway. The seed feeds numpy, whose seeds must stay below 2^32, as seed * 1000 + epoch (seed_epoch).
MAX_LAYERS, MAX_CHANNELS, MAX_SYNTHETIC, MAX_SEED = 100, 1024, 100_000, 10 ** 6
MAX_WORKERS = max(16, 4 * (os.cpu_count() or 1))  # data-loading processes: 4 per CPU core is plenty

# Every numeric flag that several scripts share; a script adds its own through check_flags(args, extra).
FLAG_RANGES = {
    'epochs': Range(1), 'batch_size': Range(1), 'synthetic_size': Range(1, MAX_SYNTHETIC),
    'init_channels': Range(1, MAX_CHANNELS), 'layers': Range(3, MAX_LAYERS),
    'learning_rate': Range(0), 'learning_rate_min': Range(0), 'arch_learning_rate': Range(0),
    'momentum': Range(0, 1, high_open=True), 'weight_decay': Range(0), 'arch_weight_decay': Range(0),
    'grad_clip': Range(0), 'lambda_at': Range(0), 'auxiliary_weight': Range(0), 'cutout_length': Range(0),
    'drop_path_prob': Range(0, 1, high_open=True), 'workers': Range(0, MAX_WORKERS), 'report_freq': Range(0),
    'seed': Range(0, MAX_SEED), 'gpu': Range(0),
}
FLAG_HINTS = {  # what to do, where the range alone does not say it
    'layers': 'the network needs two reduction cells (at 1/3 and 2/3 of its depth) and a normal cell',
    'momentum': 'SGD momentum of 1 or more never forgets a gradient and diverges',
    'workers': '0 loads the data in the training process itself',
    'report_freq': '0 turns the progress lines off',
    'grad_clip': '0 turns clipping off',
}


def check_flags(args, extra: dict | None = None) -> None:
    """Refuse a numeric flag outside its Range (FLAG_RANGES, plus `extra` for a script's own flags) or not a
    finite number, naming the flag, the range and the value. Flags the script lacks or left at None pass."""
    for name, allowed in {**FLAG_RANGES, **(extra or {})}.items():
        value = getattr(args, name, None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and v not in allowed:
                hint = FLAG_HINTS.get(name)
                raise UserError(f'--{name} must be {allowed}, got {_number(v)}' + (f' ({hint})' if hint else ''))


def check_folder(path: str, flag: str) -> None:
    """Refuse an output folder that cannot be one: an existing file, or a path through a file, or a place
    this user may not write; a missing folder is fine (the run makes it)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f'{flag} {path} is a file, but it must be a folder (the run writes its files into it); '
                        f'pick another {flag}')
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f'{flag} {path} cannot be made: {parent} is a file, not a folder; pick another {flag}')
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f'{flag} {path}: this user may not write in {parent}; pick another {flag}')


# ---------------------------------------------------------------------------------------------------------
# Logging and meters


# logger.info(text, extra=FILE_ONLY) writes to SAVE/log.txt only, not to the terminal: what a researcher
# greps for later (tables of A every epoch) without burying the summary lines on screen.
FILE_ONLY = {'file_only': True}


def get_logger(save: str | None, name: str = 'nos', enabled: bool = True) -> logging.Logger:
    """Log to stdout and to SAVE/log.txt (appending, so a resumed run keeps one log); records logged with
    `extra=FILE_ONLY` go to the file only."""
    logger = logging.getLogger(f'{name}:{save}')
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if enabled else logging.WARNING)
    fmt = logging.Formatter('%(asctime)s %(message)s', datefmt='%m/%d %H:%M:%S')
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    stream.addFilter(lambda record: not getattr(record, 'file_only', False))
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
    """Progress lines within an epoch: step i/total, images/s, time left, and the caller's running figures.

    A line at the first step (so a run says at once that it runs, and how fast), then whenever `every`
    steps or `interval` seconds have passed since the last line, whichever comes first, and at the last
    step. `every` 0 turns the lines off (tests, scripts that parse stdout).
    """

    def __init__(self, total: int, every: int, logger: logging.Logger, prefix: str = '',
                 interval: float = 30., clock=time.monotonic):
        self.total, self.every, self.logger, self.prefix = total, every, logger, prefix
        self.interval, self.clock = interval, clock
        self.start = self.last = clock()
        self.images = 0

    def step(self, i: int, batch: int, extra: str = '') -> None:
        self.images += batch
        done = i + 1
        if not self.every:
            return
        now = self.clock()
        if done == 1 or done % self.every == 0 or done == self.total or now - self.last >= self.interval:
            self.last = now
            elapsed = now - self.start
            rate = format_sig(self.images / elapsed) if elapsed > 0 else '-'
            when = (f'{format_time(elapsed / done * (self.total - done))} left' if done < self.total
                    else f'took {format_time(elapsed)}')
            self.logger.info(f'{self.prefix}step {done}/{self.total}  {rate} img/s  {when}  {extra}')


def format_sig(x: float, digits: int = 3) -> str:
    """x with `digits` significant digits and no exponent: 1234 -> '1234', 56.78 -> '56.8', 0.01234 ->
    '0.0123' (images per second span 0.1 on a CPU to 10^4 on a GPU)."""
    if not math.isfinite(x) or x == 0:
        return f'{x:g}'
    return f'{x:.{max(0, digits - 1 - math.floor(math.log10(abs(x))))}f}'


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


def cifar_transforms(dataset: str, train: bool, cutout: int = 0):
    """DARTS's CIFAR augmentation: random crop 32 pad 4, horizontal flip, normalise (+ cutout)."""
    import torchvision.transforms as T
    t = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
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
                seed: int = 0):
    """CIFAR-10/100 through torchvision (no download: the error says how), or the synthetic data."""
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
    name = 'CIFAR-10' if dataset == 'cifar10' else 'CIFAR-100'
    download = (f'`python -c "import torchvision; torchvision.datasets.{cls.__name__}(\'{root}\', '
                f'download=True)"`')
    if os.path.exists(root) and not os.path.isdir(root):
        raise UserError(f'--data {root} is a file, but it must be the folder that holds (or is to hold) the '
                        f'{name} data ({cls.base_folder}/ in torchvision\'s layout); pass that folder')
    try:
        return cls(root=root, train=train, download=False, transform=cifar_transforms(dataset, train, cutout))
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError):
        folder = os.path.join(root, cls.base_folder)
        if os.path.isdir(folder) and os.listdir(folder):  # there, but torchvision's checksums disagree
            raise UserError(f'the {name} files in {os.path.abspath(folder)} are damaged or incomplete (their '
                            f'checksums do not match); delete that folder and download again with '
                            f'{download}') from None
        raise UserError(f'no {name} data in {os.path.abspath(root)}: download it there with {download}, or run '
                        f'on made-up data with --dataset synthetic') from None


def make_loader(data, batch_size: int, shuffle: bool, workers: int, generator=None, sampler=None,
                drop_last: bool = False, pin: bool = False):
    return torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=workers, pin_memory=pin, drop_last=drop_last, generator=generator,
        persistent_workers=False)


# An unreadable image (a truncated or corrupt JPEG in a copy of ImageNet, say) is skipped, not fatal: a
# multi-day run must not die on one file. Past this share of an epoch's images the copy itself is broken,
# and the run stops: 0.1% is 1,281 of ImageNet's 1.28M training images.
MAX_CORRUPT_SHARE = 0.001
CORRUPT_ERRORS = (OSError, SyntaxError, ValueError, EOFError)  # what PIL raises for a file it cannot decode


class SkipCorrupt(torch.utils.data.Dataset):
    """A dataset of image files (ImageFolder) whose unreadable images are skipped with a warning naming the
    file: item i falls back to the next readable image (i+1, i+2, ...), so batches keep their size, every
    process of a distributed run keeps the same number of steps, and a resumed epoch sees the same images.

    `skipped` counts the skips since `reset()`, across the DataLoader's worker processes (shared memory);
    more than MAX_CORRUPT_SHARE of `epoch_images` (the images one process sees in an epoch) stops the run
    with one sentence.
    """

    def __init__(self, data, epoch_images: int | None = None, logger: logging.Logger | None = None,
                 max_share: float | None = None):
        self.data, self.logger = data, logger
        self.epoch_images = epoch_images or len(data)
        self.max_share = MAX_CORRUPT_SHARE if max_share is None else max_share
        self.limit = math.floor(self.max_share * self.epoch_images)
        self._skipped = multiprocessing.Value('q', 0)

    def __len__(self):
        return len(self.data)

    @property
    def skipped(self) -> int:
        return self._skipped.value

    def reset(self) -> None:
        """Start counting anew (at the start of an epoch, before its loader starts its workers)."""
        self._skipped.value = 0

    def path(self, i: int) -> str:
        samples = getattr(self.data, 'samples', None)
        return samples[i][0] if samples is not None else f'item {i}'

    def __getitem__(self, i: int):
        n = len(self.data)
        for k in range(n):
            j = (i + k) % n
            try:
                return self.data[j]
            except CORRUPT_ERRORS as e:
                with self._skipped.get_lock():
                    self._skipped.value += 1
                    count = self._skipped.value
                (self.logger or logging.getLogger(__name__)).warning(
                    f'warning: skipped an unreadable image, {self.path(j)} ({type(e).__name__}: '
                    f'{_one_line(str(e))}); {count} this epoch')
                if count > self.limit:
                    raise UserError(
                        f'{count} images could not be read this epoch, more than {100 * self.max_share:g}% of '
                        f'the {self.epoch_images} an epoch reads (the last: {self.path(j)}); the data are '
                        f'damaged: repair or remove the files that the warnings name, then --resume') from None
        raise UserError('no image of the dataset can be read')


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


CHECKPOINT = 'checkpoint.pt'  # every run's checkpoint, inside its --save folder


def load_checkpoint(path: str, map_location='cpu') -> dict:
    """The checkpoint in `path` (a file, or a run folder holding checkpoint.pt); a missing, damaged or foreign
    file is one sentence that says what to do."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, CHECKPOINT)):
            raise UserError(f'{path} is a folder without {CHECKPOINT}; pass a checkpoint file (every run writes '
                            f'SAVE/{CHECKPOINT}), or drop --resume to start a new run')
        path = os.path.join(path, CHECKPOINT)
    if not os.path.isfile(path):
        folder = os.path.dirname(path) or '.'
        started = os.path.basename(path) == CHECKPOINT and os.path.isfile(os.path.join(folder, 'log.txt'))
        if os.path.exists(f'{path}.tmp') or started:  # a run killed before (or while) it wrote its first
            raise UserError(f'checkpoint {path} does not exist: the run in {folder} stopped before it finished '
                            f'its first checkpoint, so there is nothing to resume; start afresh by running the '
                            f'same command without --resume')
        raise UserError(f'checkpoint {path} does not exist; pass the path of a checkpoint, or drop --resume to '
                        f'start a new run')
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as e:  # damaged or foreign
        raise UserError(f'checkpoint {path} cannot be read ({type(e).__name__}); it is damaged or not a '
                        f'checkpoint of this project') from None


def checkpoint_script(ckpt) -> str | None:
    """The script that wrote a checkpoint: its 'script' entry, or, in checkpoints from before that entry,
    what only that script writes; None for anything else."""
    if not isinstance(ckpt, dict):
        return None
    if 'script' in ckpt:
        return ckpt['script']
    if 'settings' in ckpt:
        return 'train_search.py'
    if {'arch', 'config', 'state_dict'} <= set(ckpt):
        return 'teacher.py'
    if 'global_batch' in ckpt:
        return 'train_imagenet.py'
    if {'synthetic_size', 'genotype'} <= set(ckpt):
        return 'train_cifar.py'
    return None


def load_resume(path: str, script: str) -> dict:
    """The checkpoint that `script --resume PATH` continues; refuses another script's checkpoint by name
    (rather than failing later on a missing entry)."""
    ckpt = load_checkpoint(path)
    found = checkpoint_script(ckpt)
    if found != script:
        what = f'a checkpoint of {found}' if found else 'not a checkpoint of this project'
        raise UserError(f'{path} is {what}, but {script} --resume needs a checkpoint that {script} wrote '
                        f'(SAVE/{CHECKPOINT} of an earlier {script} run); pass one, or drop --resume to start '
                        f'a new run')
    return ckpt


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


def run_folder(save: str | None, resume: str | None, stem: str,
               default: str | None = None) -> tuple[str, str | None]:
    """(SAVE, checkpoint to resume from) for the training scripts: SAVE defaults to the folder of a
    `--resume PATH` (so a resumed run goes on in its own folder), else to `default`, else to a fresh
    STEM-DATE-TIME folder. A file where the folder belongs is refused."""
    if save is None:
        if resume:
            save = resume if os.path.isdir(resume) else (os.path.dirname(resume) or '.')
        else:
            save = default or f'{stem}-{time.strftime("%Y%m%d-%H%M%S")}'
    check_folder(save, '--save')
    return save, resume_path(os.path.join(save, CHECKPOINT), resume)


def trim_jsonl(path: str, last_epoch: int) -> int:
    """Forget records of epochs after the checkpoint we resume from (a run killed between writing its
    log line and its checkpoint repeats that epoch), and a line that is not JSON (a run killed while it
    appended one); the checkpoint is the truth. Returns how many lines were dropped."""
    if not os.path.exists(path):
        return 0
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict) and record.get('epoch', math.inf) <= last_epoch:
                keep.append(line if line.endswith('\n') else line + '\n')
            else:
                dropped += 1
    with open(path, 'w') as f:
        f.writelines(keep)
    return dropped


# ---------------------------------------------------------------------------------------------------------
# What may change when a run resumes (issue 13). A flag that defines the run (data, network, seed, batch,
# schedule length, ...) must match the checkpoint's; each script lists the few that may change (a learning
# rate after a divergence, data loading, logging, the device), which take effect from the resumed epoch.


def _flag_text(value) -> str:
    if isinstance(value, bool):
        return 'on' if value else 'off'
    if isinstance(value, (list, tuple)):
        return ' '.join(_flag_text(v) for v in value)
    if isinstance(value, float):
        return f'{value:g}'
    return 'unset' if value is None else str(value)


def resume_flags(ckpt: dict, args, may_change, path: str) -> dict[str, tuple]:
    """Compare this run's flags with those the checkpoint was made with (its 'args'). A changed flag not in
    `may_change` is refused in one sentence naming it and both values; the changed ones that may change are
    returned as {name: (old, new)}. Flags the checkpoint does not record (older code) are not compared."""
    saved = ckpt.get('args') or {}
    changed = {}
    for name, value in vars(args).items():
        if name not in saved or saved[name] == value:
            continue
        if name not in may_change:
            old, new = _flag_text(saved[name]), _flag_text(value)
            raise UserError(f'checkpoint {path} was made with --{name} {old}, but this run has --{name} {new}; '
                            f'--{name} defines the run, so it cannot change on resume: resume with --{name} '
                            f'{old}, or start a new run in another --save folder')
        changed[name] = (saved[name], value)
    return changed


def describe_changes(changed: dict, epoch: int) -> str | None:
    """The log line that says which flags changed on resume (None if none did); `epoch` 0-based."""
    shown = {k: v for k, v in changed.items() if k != 'resume'}
    if not shown:
        return None
    text = ', '.join(f'--{k} {_flag_text(a)} -> {_flag_text(b)}' for k, (a, b) in shown.items())
    return f'changed on resume, in effect from epoch {epoch + 1}: {text}'


def set_learning_rate(optimizer, scheduler, lr: float) -> None:
    """Re-base a schedule on a new initial learning rate from the current step on: the optimizer's
    param_groups (lr, initial_lr) and the scheduler's base_lrs become what they would be, had the run
    started with `lr` (the schedule's closed form at its last_epoch). Used when --learning_rate changes on
    resume; an unchanged rate is never touched, so a plain resume stays bit-identical."""
    from torch.optim import lr_scheduler as sched
    step = scheduler.last_epoch
    for i, group in enumerate(optimizer.param_groups):
        if isinstance(scheduler, sched.CosineAnnealingLR):
            cosine = (1 + math.cos(math.pi * step / scheduler.T_max)) / 2
            current = scheduler.eta_min + (lr - scheduler.eta_min) * cosine
        elif isinstance(scheduler, sched.MultiStepLR):
            milestones = sorted(scheduler.milestones.elements())
            current = lr * scheduler.gamma ** bisect.bisect_right(milestones, step)
        elif isinstance(scheduler, sched.LambdaLR):
            current = lr * scheduler.lr_lambdas[i](step)
        else:  # a schedule without a closed form here: scale what it reached
            current = group['lr'] * lr / scheduler.base_lrs[i] if scheduler.base_lrs[i] else lr
        group['lr'], group['initial_lr'] = current, lr
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    scheduler._last_lr = [group['lr'] for group in optimizer.param_groups]  # what get_last_lr() reports


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


def check_genotype(ckpt: dict, genotype_json: str, label: str, path: str) -> None:
    """Refuse to resume a checkpoint trained on other cells, naming both."""
    if ckpt['genotype'] != genotype_json:
        saved, current = ckpt['arch'], label
        if saved == current:  # same name, different cells (an edited genotypes.py or file)
            saved, current = f'{saved} (as it was then)', f'{current} (as it is now)'
        check_same('genotype', saved, current, path)


def report_run(logger: logging.Logger, save: str, files: list[tuple[str, str]], next_steps: list[str],
               started: float) -> None:
    """The end of every run: its wall time, where each of its files went, and the command to run next.
    `files`: (name in SAVE, what it holds); the ones that do not exist are left out."""
    logger.info(f'done in {format_time(time.time() - started)} (wall time of this run); its files, in {save}:')
    for name, what in files:
        if os.path.exists(os.path.join(save, name)):
            logger.info(f'  {name:<17} {what}')
    for command in next_steps:
        logger.info(f'next: {command}')


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
    """A training loss that is not finite, or left the sensible range (check_loss)."""


def loss_limit(num_classes: int) -> float:
    """The largest training loss a run may report before it counts as diverged, as a NaN does.

    Chance level is ln(C) (2.3 for 10 classes, 4.6 for 100, 6.9 for 1000): a network that knows nothing
    and says so. The bound is 10 ln(C) + 10 (33 for CIFAR-10, 56 for CIFAR-100, 79 for ImageNet): ten
    times chance, plus a margin for few classes. A mean cross-entropy that high means the network puts,
    on average, odds of e^-33 or less on the right class; a run at a sane learning rate never gets there
    (its loss starts near ln(C) and falls), while a diverging one passes it within a few steps on its way
    to 1e13 or NaN. The same bound applies to a loss with an auxiliary term or label smoothing, which
    stay of the same order.
    """
    return 10 * math.log(num_classes) + 10


def retry_learning_rate(current: float, default: float) -> float:
    """The learning rate that the divergence advice suggests: back to the script's default (the paper's)
    when the run was above it, else a tenth of the current one."""
    return default if current > default else current / 10


def check_loss(losses: dict, limit: float = math.inf, *, epoch: int | None = None, step: int = 0,
               kept: int = 0, checkpoint: str = '', retry: str = '') -> None:
    """Stop a run whose loss is not finite or above `limit` (loss_limit), in one sentence: the epoch and
    step, the losses, what was kept, and what to run next. Shared by every training script.

    losses: {name: value} of this step; epoch: 0-based; kept: epochs in the last checkpoint (0: none);
    checkpoint: its path; retry: the flags that the advice adds, e.g. '--learning_rate 0.025'.
    The advice works when followed: `--resume` continues from the checkpoint, and a changed
    --learning_rate takes effect from the resumed epoch (resume_flags, set_learning_rate).
    """
    if all(math.isfinite(v) and v <= limit for v in losses.values()):
        return
    text = ', '.join(f'{k} {v:.4g}' for k, v in losses.items())
    if all(math.isfinite(v) for v in losses.values()):
        how = f'left the sensible range ({text}; the bound is {limit:.3g}, ten times chance level plus 10)'
    else:
        how = f'became non-finite ({text})'
    where = f'at epoch {epoch + 1}, step {step + 1}' if epoch is not None else f'at step {step + 1}'
    retry = retry or 'a lower --learning_rate'
    if kept:
        resume = f'--resume {checkpoint}' if checkpoint else '--resume'
        after = (f'the checkpoint of epoch {kept} is kept and nothing after it was written: add `{resume} '
                 f'{retry}` to the same command to go on from it')
    else:
        after = f'no checkpoint was written yet: run the same command again with `{retry}`'
    raise NonFiniteLoss(f'the training loss {how} {where}; {after} (or, if the data are at fault, check them)')


def _split_output(out):
    """Models return logits, or (logits, auxiliary logits or None) as DARTS's networks do."""
    return out if isinstance(out, tuple) else (out, None)


def train_epoch(model: nn.Module, loader, optimizer, criterion, device, *, aux_weight: float = 0.,
                grad_clip: float | None = 5., amp_dtype: torch.dtype | None = None,
                channels_last: bool = False, progress: Progress | None = None,
                step_hook=None, check=check_loss) -> tuple[float, float]:
    """One epoch; returns (mean loss, top-1 %). `step_hook()` runs after every optimizer step
    (a per-step learning-rate schedule, say). `check({'loss': value}, step)` stops a diverged run
    (check_loss with the script's bound and advice; by default non-finite losses only)."""
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
        check({'loss': value}, step=step)
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
