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
import platform
import random
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------------------
# Errors the user can fix: one sentence, non-zero exit, no traceback.


class UserError(Exception):
    """Bad input (missing data, wrong checkpoint, no CUDA, ...): the message says what to do."""


def exit_code(main, argv) -> int:
    """main(argv) in-process as the command line runs it (through `run_main`): the exit code it would give
    (0 when it returns). argv items may be paths or numbers; they are passed as strings."""
    try:
        run_main(lambda: main([str(a) for a in argv]))
    except SystemExit as e:
        return e.code
    return 0


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


def read_jsonl(path: str) -> list[dict]:
    """The records of a .jsonl log; [] when it does not exist."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_info(device: torch.device, amp_dtype: torch.dtype | None, processes: int = 1) -> dict:
    """Where and how a run trained, for its result.json (summarize.py turns it into GPU-hours)."""
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.machine() or 'cpu'
        try:  # the CPU model where Linux says it
            with open('/proc/cpuinfo') as f:
                name = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
        except (OSError, StopIteration):
            pass
    return {'device': device.type, 'device_name': name, 'processes': processes,
            'precision': 'bf16' if amp_dtype == torch.bfloat16 else 'fp32'}


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
NUM_CLASSES = {'cifar10': 10, 'cifar100': 100, 'synthetic': 10}  # 'folder': num_classes(), from the data
DATASETS = ('cifar10', 'cifar100', 'synthetic', 'folder')


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
                seed: int = 0, *, image_size: int = 32, stats: dict | None = None, augment: bool = True,
                autoaugment: bool = False):
    """CIFAR-10/100 through torchvision (no download: the error says how), the synthetic data, or your own
    images (`folder`: see folder_dataset; `stats` from data_stats, computed here when not given).
    `augment=False` keeps the training split free of random augmentation (exactness checks); `autoaugment`
    (CIFAR only) adds the CIFAR-10 AutoAugment policy to the training augmentation."""
    if autoaugment and dataset not in ('cifar10', 'cifar100'):
        raise UserError(f'--autoaugment works on CIFAR images only; leave it out with --dataset {dataset}')
    if dataset == 'folder':
        return folder_dataset(root, train, image_size, stats, cutout, augment)
    if dataset == 'synthetic':
        # train and test draw from the same class patterns (same seed), different samples
        n = synthetic_size if train else max(64, synthetic_size // 4)
        data = SyntheticImages(n + (0 if train else synthetic_size), seed=seed,
                               transform=synthetic_transforms(train and augment, cutout))
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
        return cls(root=root, train=train, download=False,
                   transform=cifar_transforms(dataset, train and augment, cutout, autoaugment))
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError):
        folder = os.path.join(root, cls.base_folder)
        if os.path.isdir(folder) and os.listdir(folder):  # there, but torchvision's checksums disagree
            raise UserError(f'the {name} files in {os.path.abspath(folder)} are damaged or incomplete (their '
                            f'checksums do not match); delete that folder and download again with '
                            f'{download}') from None
        raise UserError(f'no {name} data in {os.path.abspath(root)}: download it there with {download}, or run '
                        f'on made-up data with --dataset synthetic') from None


def make_loader(data, batch_size: int, shuffle: bool, workers: int, generator=None, sampler=None,
                drop_last: bool = False, pin: bool = False, batch_sampler=None):
    if batch_sampler is not None:  # it decides the batches (and their order) itself
        return torch.utils.data.DataLoader(data, batch_sampler=batch_sampler, num_workers=workers,
                                           pin_memory=pin, generator=generator, persistent_workers=False)
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
# Your own images (--dataset folder, issue 14): PATH/train/CLASS/IMAGE, and PATH/test or PATH/val for
# retraining and the teacher, in torchvision's ImageFolder layout. The class count and the normalisation
# statistics come from the data; unreadable images are skipped up to a share (SafeImageFolder).

MAX_UNREADABLE_SHARE = 0.01  # a run stops once more than 1% of the images an epoch reads cannot be decoded
STATS_IMAGES = 1000          # training images sampled for the mean and std
STATS_SEED = 0               # fixed, not --seed: every run on the same data gets the same statistics and order
EVAL_SPLITS = ('test', 'val')  # what retraining and the teacher evaluate on: the first of these that exists


class UnreadableImageWarning(UserWarning):
    """An image that cannot be decoded was skipped (SafeImageFolder)."""


class TooManyUnreadable(UserError):
    """More unreadable images than MAX_UNREADABLE_SHARE allows.

    Raised in a DataLoader worker, it is rebuilt in the main process from the worker's traceback text; only
    the sentence (the traceback's last line) is kept, so the user still reads one line.
    """

    def __init__(self, message: str):
        marker = f'{type(self).__name__}: '
        if 'Original Traceback' in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def _unreadable_errors() -> tuple:
    """What decoding a broken, truncated, foreign or vanished file raises (PIL through ImageFolder's loader)."""
    from PIL import Image
    return OSError, ValueError, SyntaxError, Image.DecompressionBombError


def _names(items, limit: int = 5) -> str:
    items = list(items)
    if not items:
        return 'none'
    more = f', ... ({len(items)} in all)' if len(items) > limit else ''
    return ', '.join(items[:limit]) + more


def class_difference(a: list[str], b: list[str], name_a: str, name_b: str) -> str:
    """'only in A: x, y; only in B: z' for two class lists (or their order, when the sets agree)."""
    only_a, only_b = [c for c in a if c not in b], [c for c in b if c not in a]
    if not only_a and not only_b:
        return f'the same {len(a)} names in another order'
    return f'only in {name_a}: {_names(only_a)}; only in {name_b}: {_names(only_b)}'


def _class_folders(directory: str) -> list[str]:
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir())
    if not classes:
        raise UserError(f'{directory} holds no class folders: put the images of each class in a folder of '
                        f'their own, {directory}/CLASS/IMAGE (ImageFolder layout)')
    return classes


class SafeImageFolder(torch.utils.data.Dataset):
    """torchvision's ImageFolder (root/CLASS/**/IMAGE: the same classes, samples, targets and loader) that
    checks the layout, one sentence per fault, and skips images that cannot be decoded.

    A file that fails is named in an UnreadableImageWarning the first time, and the next readable image in
    the folder's order takes its place, so batches keep their size. The distinct skipped files are counted in
    shared memory, across the DataLoader's worker processes, for the epoch summary (log_unreadable). Once
    they pass `max_share` (default MAX_UNREADABLE_SHARE) of `epoch_images` (default all the images; a process
    that reads a DistributedSampler's share passes len(sampler)), reading stops with TooManyUnreadable.
    """

    def __init__(self, root: str, transform=None, max_share: float | None = None,
                 epoch_images: int | None = None):
        import torchvision.datasets.folder as tv
        if not os.path.isdir(root):
            raise UserError(f'{root} is not a folder; it must hold one folder of images per class, '
                            f'{root}/CLASS/IMAGE (ImageFolder layout)')
        self.root = root
        self.classes = _class_folders(root)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = tv.make_dataset(root, self.class_to_idx, tv.IMG_EXTENSIONS, allow_empty=True)
        self.targets = [t for _, t in self.samples]
        counts = np.bincount(self.targets, minlength=len(self.classes))
        empty = [os.path.join(root, c) for c, k in zip(self.classes, counts) if k == 0]
        if empty:
            raise UserError(f'the class folder {_names(empty, 3)} holds no images (none named '
                            f'{"/".join(tv.IMG_EXTENSIONS)}); add images or remove the folder')
        self.transform = transform
        self.loader = tv.default_loader
        self.max_share = max_share
        self.epoch_images = epoch_images
        self._bad = multiprocessing.RawArray('b', len(self.samples))  # 1: this file failed (shared memory)
        self._skipped = multiprocessing.Value('i', 0)                 # how many did, with its own lock

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index: int):
        n = len(self.samples)
        for k in range(n):
            i = (index + k) % n
            path, target = self.samples[i]
            try:
                image = self.loader(path)
            except _unreadable_errors() as e:
                self._skip(i, path, e)
                continue
            return (self.transform(image) if self.transform is not None else image), target
        raise TooManyUnreadable(f'none of the {n} images under {self.root} can be read')

    def _skip(self, i: int, path: str, error: Exception) -> None:
        with self._skipped.get_lock():
            first = not self._bad[i]
            if first:
                self._bad[i] = 1
                self._skipped.value += 1
            count = self._skipped.value
        if first:
            warnings.warn(f'skipped the unreadable image {path} ({type(error).__name__}); {count} skipped so far',
                          UnreadableImageWarning, stacklevel=3)
        share = MAX_UNREADABLE_SHARE if self.max_share is None else self.max_share
        total = self.epoch_images or len(self.samples)
        if count > share * total:
            raise TooManyUnreadable(
                f'{count} of the {total} images under {self.root} cannot be read (the last: {path}), more than '
                f'the {share:.0%} a run skips (utils.MAX_UNREADABLE_SHARE); replace or remove them and run again')

    @property
    def skipped(self) -> int:
        return self._skipped.value

    def skipped_files(self) -> list[str]:
        bad = np.frombuffer(self._bad, dtype=np.int8)
        return [self.samples[i][0] for i in np.flatnonzero(bad)]


def log_unreadable(data, logger: logging.Logger) -> None:
    """After an epoch: one line naming the images skipped so far, if any (SafeImageFolder, or a Subset)."""
    while isinstance(data, torch.utils.data.Subset):
        data = data.dataset
    if isinstance(data, SafeImageFolder) and data.skipped:
        logger.warning(f'{data.skipped} unreadable image(s) skipped so far (a run stops above '
                       f'{MAX_UNREADABLE_SHARE:.0%}): {_names(data.skipped_files())}')


def folder_classes(root: str) -> list[str]:
    """The classes of PATH/train (sorted folder names, numbered as ImageFolder does) after checking the
    layout: train/ exists, and test/ and val/, where present, hold the same class folders."""
    if not os.path.isdir(root):
        raise UserError(f'--data {root} is not a folder: --dataset folder needs a PATH holding train/ (and val/ '
                        f'or test/ to retrain), each with one folder of images per class')
    train = os.path.join(root, 'train')
    if not os.path.isdir(train):
        raise UserError(f'no train/ folder in {os.path.abspath(root)}: --dataset folder needs PATH/train/CLASS/'
                        f'IMAGE (and PATH/val or PATH/test to retrain), one folder of images per class')
    classes = _class_folders(train)
    for split in EVAL_SPLITS:
        other_dir = os.path.join(root, split)
        if os.path.isdir(other_dir):
            other = _class_folders(other_dir)
            if other != classes:
                raise UserError(f'{train} and {other_dir} hold different classes '
                                f'({class_difference(classes, other, "train/", f"{split}/")}); both need the '
                                f'same class folders')
    return classes


def num_classes(dataset: str, root: str) -> int:
    """Classes of a dataset: fixed for CIFAR and the synthetic data, counted in PATH/train for `folder`."""
    if dataset == 'folder':
        return len(folder_classes(root))
    if dataset not in NUM_CLASSES:
        raise UserError(f'unknown dataset {dataset!r}; choose one of {", ".join(DATASETS)}')
    return NUM_CLASSES[dataset]


def dataset_name(dataset: str, root: str) -> str:
    """A run's data in file names: the dataset, or folder-NAME for --dataset folder (NAME: the last part of
    PATH), so that teachers of different folders get different default paths."""
    if dataset != 'folder':
        return dataset
    return f'folder-{os.path.basename(os.path.abspath(root))}'


def check_image_size(dataset: str, image_size: int) -> None:
    """--image_size resizes your own images; CIFAR-style networks halve it twice (multiple of 4)."""
    if dataset != 'folder' and image_size != 32:
        raise UserError(f'--image_size applies to --dataset folder only; {dataset} images are 32x32, drop the '
                        f'flag')
    if image_size < 8 or image_size % 4:
        raise UserError(f'--image_size must be a multiple of 4 and at least 8 (the networks halve it twice), '
                        f'got {image_size}')


def _resize(image_size: int) -> list:
    import torchvision.transforms as T
    return [T.Resize(image_size), T.CenterCrop(image_size)]  # shorter side to N, then the centre N x N


def folder_stats(root: str, image_size: int) -> dict:
    """Per-channel mean and std of PATH/train's pixels as the networks see them (resized, centre-cropped, in
    [0, 1]) over a fixed sample of STATS_IMAGES images (seed STATS_SEED), with the class names; std is the
    population std of all the sampled pixels."""
    import torchvision.transforms as T
    classes = folder_classes(root)
    data = SafeImageFolder(os.path.join(root, 'train'), T.Compose(_resize(image_size) + [T.ToTensor()]))
    k = min(len(data), STATS_IMAGES)
    sample = torch.randperm(len(data), generator=torch.Generator().manual_seed(STATS_SEED))[:k].sort().values
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    pixels = 0
    for i in sample.tolist():
        x = data[i][0].double()
        total += x.sum((1, 2))
        total_sq += x.pow(2).sum((1, 2))
        pixels += x[0].numel()
    mean = total / pixels
    std = (total_sq / pixels - mean ** 2).clamp_min(0).sqrt()
    std = std.clamp_min(1e-3)  # a channel of one colour would divide by zero
    return {'mean': mean.tolist(), 'std': std.tolist(), 'image_size': image_size, 'classes': classes,
            'images': k, 'train_images': len(data), 'data': os.path.abspath(root)}


def data_stats(dataset: str, root: str, image_size: int, save: str, ckpt: dict | None = None,
               ckpt_path: str | None = None) -> dict | None:
    """The normalisation statistics and class names of a --dataset folder run (None for the other datasets,
    whose statistics are constants): a resumed run's from its checkpoint, after checking that the data still
    has its classes and image size; else computed once (folder_stats). Written to SAVE/data_stats.json."""
    if dataset != 'folder':
        return None
    classes = folder_classes(root)
    stats = (ckpt or {}).get('data_stats')
    if stats is not None:
        check_same('image size', stats['image_size'], image_size, ckpt_path)
        if stats['classes'] != classes:
            raise UserError(f'checkpoint {ckpt_path} was made for other classes than {root} holds '
                            f'({class_difference(stats["classes"], classes, "the checkpoint", root)}); resume '
                            f'on the same data or start a new --save')
    else:
        stats = folder_stats(root, image_size)
    os.makedirs(save, exist_ok=True)
    write_json(os.path.join(save, 'data_stats.json'), stats)
    return stats


def folder_summary(stats: dict, eval_data=None) -> str:
    """A log line: the data, its classes, the statistics in use (and the folder evaluated on)."""
    line = (f'{stats["data"]}: {len(stats["classes"])} classes, {stats["train_images"]} training images at '
            f'{stats["image_size"]}x{stats["image_size"]}; mean {[round(v, 4) for v in stats["mean"]]} std '
            f'{[round(v, 4) for v in stats["std"]]} (from {stats["images"]} of them, in data_stats.json)')
    if eval_data is not None:
        line += f'; evaluating on {eval_data.root} ({len(eval_data)} images)'
    return line


def mixed_order(targets) -> list[int]:
    """An order of the images in which every prefix holds each class in proportion (each class's images
    shuffled with STATS_SEED, then interleaved), so that the search split (search_split: the first part
    trains the weights, the rest A) sees every class on both sides, as DARTS's split of CIFAR's stored
    order does. ImageFolder's own order is sorted by class."""
    targets = np.asarray(targets)
    rng = np.random.default_rng(STATS_SEED)
    key = np.empty(len(targets))
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        key[rng.permutation(idx)] = (np.arange(len(idx)) + 0.5) / len(idx)
    return np.lexsort((targets, key)).tolist()


def folder_transforms(image_size: int, stats: dict, train: bool, cutout: int = 0):
    """CIFAR's augmentation at N = image_size: resize, random crop padded by N/8 (4 at 32), flip, normalise
    with the data's own statistics (+ cutout); evaluation only resizes and normalises."""
    import torchvision.transforms as T
    t = _resize(image_size)
    if train:
        t += [T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip()]
    t += [T.ToTensor(), T.Normalize(stats['mean'], stats['std'])]
    if train and cutout:
        t.append(Cutout(cutout))
    return T.Compose(t)


def folder_dataset(root: str, train: bool, image_size: int = 32, stats: dict | None = None, cutout: int = 0,
                   augment: bool = True):
    """PATH/train (in mixed_order) or, for evaluation, PATH/test or PATH/val, as SafeImageFolders."""
    classes = folder_classes(root)
    if stats is None:
        stats = folder_stats(root, image_size)
    transform = folder_transforms(image_size, stats, train and augment, cutout)
    if train:
        data = SafeImageFolder(os.path.join(root, 'train'), transform)
        order = mixed_order(data.targets)
        data.samples = [data.samples[i] for i in order]
        data.targets = [data.targets[i] for i in order]
        return data
    for split in EVAL_SPLITS:
        if os.path.isdir(os.path.join(root, split)):
            data = SafeImageFolder(os.path.join(root, split), transform)
            assert data.classes == classes  # folder_classes checked it
            return data
    raise UserError(f'{os.path.abspath(root)} has no test/ or val/ folder: retraining and the teacher evaluate '
                    f'on one; add it with the same class folders as train/')


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
    a search network's architecture parameters (`model.arch_parameters()`; DARTS does not count them) and
    the weights that are zero by construction (`model.structural_zeros()`, the search network's fast path)."""
    arch = {id(p) for p in model.arch_parameters()} if hasattr(model, 'arch_parameters') else set()
    zeros = model.structural_zeros() if hasattr(model, 'structural_zeros') else 0
    return sum(p.numel() for n, p in model.named_parameters() if exclude not in n and id(p) not in arch) - zeros


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


# ---------------------------------------------------------------------------------------------------------
# Several processes (torchrun): PyTorch's own process groups, NCCL on CUDA and gloo on the CPU.


def dist_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) as torchrun sets them; (1, 0, 0) for a plain `python` run."""
    return (int(os.environ.get('WORLD_SIZE', '1')), int(os.environ.get('RANK', '0')),
            int(os.environ.get('LOCAL_RANK', '0')))


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over the processes (in place; `t` itself without a process group)."""
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


def average_gradients(params) -> None:
    """Replace every .grad by its mean over the processes, in one collective: each process's loss is the
    mean over its equal share of the global batch, so the mean of the gradients is the gradient of the
    global batch's loss (what one process computes on the whole batch)."""
    world = world_size()
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_state(module: nn.Module) -> None:
    """Rank 0's parameters and buffers everywhere (BatchNorm statistics differ per rank without sync)."""
    if torch.distributed.is_initialized():
        for t in list(module.parameters()) + list(module.buffers()):
            torch.distributed.broadcast(t.data, 0)


def state_checksum(tensors) -> str:
    """sha256 of tensors (a state dict or a list), independent of their memory layout."""
    import hashlib
    h = hashlib.sha256()
    items = tensors.items() if isinstance(tensors, dict) else enumerate(tensors)
    for name, t in items:
        h.update(str(name).encode())
        t = torch.as_tensor(t).detach().cpu().contiguous()
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This process's share of each global batch: the indices are shuffled by `generator` (the same on every
    process, from seed_epoch) and cut into batches of `batch_size` exactly as one process would cut them;
    process r takes the r-th of `world` equal slices of each. A last partial batch is trimmed to a multiple
    of `world` (a last batch of fewer than `world` images is dropped), so every process of a step holds the
    same number of images and the mean of their gradients is the global batch's gradient."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, generator=None, shuffle: bool = True):
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.generator, self.shuffle = generator, shuffle

    def _batches(self):
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        for start in range(0, self.n, self.batch_size):
            batch = order[start:start + self.batch_size]
            share = len(batch) // self.world
            if share:
                yield batch[self.rank * share:(self.rank + 1) * share].tolist()

    def __iter__(self):
        return self._batches()

    def __len__(self):
        full, last = divmod(self.n, self.batch_size)
        return full + (last >= self.world)


class _SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the global batch on any device: the per-channel sums are added over the processes with
    the differentiable `torch.distributed.nn.functional.all_reduce`, so the backward pass is exact too.
    (`nn.SyncBatchNorm` refuses CPU tensors; on CUDA `convert_sync_batchnorm` uses it instead.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not torch.distributed.is_initialized():
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        n = x.new_tensor([x.shape[0] * x.shape[2] * x.shape[3]])
        stats = all_reduce(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), n]))
        C = x.shape[1]
        count = stats[-1]
        mean = stats[:C] / count
        var = stats[C:2 * C] / count - mean * mean  # biased, as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * count / (count - 1))
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d of `module` normalised over the global batch (--sync_bn): nn.SyncBatchNorm on CUDA,
    the differentiable all-reduce version above elsewhere; weights and statistics carry over."""
    if any(t.is_cuda for t in module.state_dict().values()):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, _SyncBatchNorm2d):
            new = _SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            ref = next(iter(child.state_dict().values()))
            new.to(device=ref.device, dtype=ref.dtype).load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_sync_batchnorm(child)
    return module
