"""Data sets: CIFAR-10/100, the synthetic CIFAR-shaped set, your own images (--dataset folder), transforms, the
search split and loaders, and the one rule for images that cannot be decoded.
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import os
import pickle
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from runs import check_same, write_json
from utils import UserError, one_line

CIFAR_MEAN = {'cifar10': (0.4914, 0.4822, 0.4465), 'cifar100': (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {'cifar10': (0.2470, 0.2435, 0.2616), 'cifar100': (0.2673, 0.2564, 0.2762)}
NUM_CLASSES = {'cifar10': 10, 'cifar100': 100, 'synthetic': 10, 'imagenet16-120': 120}  # 'folder': from the data
DATASETS = ('cifar10', 'cifar100', 'synthetic', 'folder', 'imagenet16-120')
# ImageNet16-120 (NAS-Bench-201): the downsampled ImageNet of Chrabaszcz et al. (2017) at 16x16, classes 1-120
# of its 1000; mean and std in 0..1 (the benchmark's: 122.68, 116.66, 104.01 and 63.22, 61.26, 65.09 of 255)
IMAGENET16_MEAN = (122.68 / 255, 116.66 / 255, 104.01 / 255)
IMAGENET16_STD = (63.22 / 255, 61.26 / 255, 65.09 / 255)
IMAGENET16_CLASSES = 120
IMAGENET16_TRAIN = [f'train_data_batch_{i}' for i in range(1, 11)]
IMAGENET16_VAL = ['val_data']


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
                autoaugment: bool = False, download: bool = True):
    """CIFAR-10/100 through torchvision (downloaded into `root` when missing, as DARTS's scripts do, unless
    `download` is False: the scripts' --no_download), the synthetic data, or your own images (`folder`: see
    folder_dataset; `stats` from data_stats, computed here when not given). `augment=False` keeps the
    training split free of random augmentation (exactness checks); `autoaugment` (CIFAR only) adds the
    CIFAR-10 AutoAugment policy to the training augmentation."""
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
    if dataset == 'imagenet16-120':
        return ImageNet16(root, train, imagenet16_transforms(train and augment))
    if dataset not in ('cifar10', 'cifar100'):
        raise UserError(f'unknown dataset {dataset!r}; choose one of {", ".join(DATASETS)}')
    import torchvision
    cls = torchvision.datasets.CIFAR10 if dataset == 'cifar10' else torchvision.datasets.CIFAR100
    name = 'CIFAR-10' if dataset == 'cifar10' else 'CIFAR-100'
    fetch = download_command(cls.__name__, root)
    if os.path.exists(root) and not os.path.isdir(root):
        raise UserError(f'--data {root} is a file, but it must be the folder that holds (or is to hold) the '
                        f'{name} data ({cls.base_folder}/ in torchvision\'s layout); pass that folder')
    transform = cifar_transforms(dataset, train and augment, cutout, autoaugment)
    folder = os.path.join(root, cls.base_folder)
    try:
        return cls(root=root, train=train, download=False, transform=transform)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError):
        if not download:
            if os.path.isdir(folder) and os.listdir(folder):  # there, but torchvision's checksums disagree
                raise UserError(f'the {name} files in {os.path.abspath(folder)} are damaged or incomplete (their '
                                f'checksums do not match); delete that folder and run again without '
                                f'--no_download, or download again with {fetch}') from None
            raise UserError(f'no {name} data in {os.path.abspath(root)}, and --no_download forbids fetching it: '
                            f'drop --no_download, or download it with {fetch}, or run on made-up data with '
                            f'--dataset synthetic') from None
    download_cifar(cls, root, name)
    try:
        return cls(root=root, train=train, download=False, transform=transform)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError):
        raise UserError(f'the {name} files in {os.path.abspath(folder)} are damaged even after downloading them '
                        f'again; delete {os.path.abspath(root)} and run again') from None


def download_command(cls_name: str, root: str) -> str:
    """The command that fetches CIFAR by hand (on a machine with internet access; copy `root` over)."""
    return f'`python -c "import torchvision; torchvision.datasets.{cls_name}(\'{root}\', download=True)"`'


def download_cifar(cls, root: str, name: str) -> None:
    """Fetch CIFAR into `root` with torchvision's own download (it checks the archive's MD5). Several
    processes that start at once (torchrun) take turns through a lock file in `root`: the first downloads, the
    others find the files in place. An offline machine gets one sentence with the manual command."""
    import urllib.error
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f'.{cls.base_folder}.lock'), 'w') as lock:
        try:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        except ImportError:  # Windows: no lock (one process per machine there anyway)
            pass
        try:
            cls(root=root, train=True, download=False)
            return  # another process has just fetched it
        except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError):
            pass
        print(f'{name} is not in {os.path.abspath(root)}: downloading it with torchvision (about 170 MB; '
              f'--no_download forbids this)', flush=True)
        try:
            cls(root=root, train=True, download=True)
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            reason = getattr(e, 'reason', None) or e
            raise UserError(f'{name} could not be downloaded into {os.path.abspath(root)} ({one_line(str(reason))}); '
                            f'if this machine is offline, run {download_command(cls.__name__, root)} on one '
                            f'that is not and copy the {root} folder here, or run on made-up data with --dataset '
                            f'synthetic') from None


def imagenet16_transforms(train: bool):
    """NAS-Bench-201's ImageNet16 augmentation: random crop 16 with padding 2, horizontal flip, normalise."""
    import torchvision.transforms as T
    t = [T.RandomCrop(16, padding=2), T.RandomHorizontalFlip()] if train else []
    return T.Compose(t + [T.ToTensor(), T.Normalize(IMAGENET16_MEAN, IMAGENET16_STD)])


class ImageNet16(torch.utils.data.Dataset):
    """ImageNet16-120 from the official downsampled-ImageNet files (Imagenet16_train.zip, Imagenet16_val.zip of
    Chrabaszcz et al., 2017): pickled batches `train_data_batch_1` .. `_10` and `val_data` under `root` (or under
    root/Imagenet16_train and root/Imagenet16_val, as they unzip), each a dict with 'data' (N, 768) uint8, the
    R, G and B planes of a 16x16 image, and 'labels' 1..1000. Only labels 1..120 are kept, as 0..119. train:
    the 151,700 training images; else the 6,000 validation images (NAS-Bench-201 splits them into its x-valid
    and x-test halves of 3,000). No download: the error says where to put the files."""

    def __init__(self, root: str, train: bool, transform=None, classes: int = IMAGENET16_CLASSES):
        names = IMAGENET16_TRAIN if train else IMAGENET16_VAL
        sub = 'Imagenet16_train' if train else 'Imagenet16_val'
        folder = next((d for d in (root, os.path.join(root, sub)) if os.path.isfile(os.path.join(d, names[0]))),
                      None)
        if folder is None:
            raise UserError(f'no ImageNet16 data in {os.path.abspath(root)}: unzip the downsampled ImageNet 16x16 '
                            f'files (Imagenet16_train.zip, Imagenet16_val.zip from image-net.org) there, so that '
                            f'{names[0]} lies in {root} or {os.path.join(root, sub)}')
        data, labels = [], []
        for name in names:
            path = os.path.join(folder, name)
            try:
                with open(path, 'rb') as f:
                    batch = pickle.load(f, encoding='latin1')
                x, y = np.asarray(batch['data'], dtype=np.uint8), np.asarray(batch['labels'], dtype=np.int64)
            except FileNotFoundError:
                raise UserError(f'{path} is missing: the ImageNet16 {"training" if train else "validation"} set '
                                f'is the files {", ".join(names)}; unzip all of them there') from None
            except (OSError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError):
                raise UserError(f'{path} is not a downsampled-ImageNet batch (a pickled dict with data and labels); '
                                f'unzip the official files again') from None
            keep = (y >= 1) & (y <= classes)
            data.append(x[keep].reshape(-1, 3, 16, 16).transpose(0, 2, 3, 1))  # planes -> HWC images
            labels.append(y[keep] - 1)
        self.data = np.concatenate(data)
        self.targets = np.concatenate(labels).tolist()
        self.classes = list(range(classes))
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        from PIL import Image
        img = Image.fromarray(self.data[i])
        return (self.transform(img) if self.transform else img), self.targets[i]


def make_loader(data, batch_size: int, shuffle: bool, workers: int, generator=None, sampler=None,
                drop_last: bool = False, pin: bool = False, batch_sampler=None):
    if batch_sampler is not None:  # it decides the batches (and their order) itself
        return torch.utils.data.DataLoader(data, batch_sampler=batch_sampler, num_workers=workers,
                                           pin_memory=pin, generator=generator, persistent_workers=False)
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


SUBSET_SEED = 0       # fixed, not --seed: every search with --subset F reads the same images
SUBSET_ARCH_SHARE = 0.25  # the architecture's images: a quarter of the weights' (AGNAS Sec. 5.3: 10% and 2.5%)


def class_balanced_split(targets, share: float, seed: int = SUBSET_SEED) -> tuple[list[int], list[int]]:
    """--subset: a seeded, class-balanced `share` of the images for the weights and a disjoint quarter of
    that share for the architecture (AGNAS's ImageNet search: 10% and 2.5%). Per class of n images, its
    images shuffled with `seed`, the first round(share * n) train the weights and the next
    round(share * n / 4) the architecture. Returns both index lists, sorted."""
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    weights, arch = [], []
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        k_w, k_a = round(share * len(idx)), round(share * SUBSET_ARCH_SHARE * len(idx))
        weights += idx[:k_w].tolist()
        arch += idx[k_w:k_w + k_a].tolist()
    if not weights or not arch:
        side = 'weights' if not weights else 'architecture'
        raise UserError(f'--subset {share:g} of these {len(targets)} images leaves none for the {side} (a '
                        f'class-balanced share rounds to 0 images in every class); use a larger --subset')
    return sorted(weights), sorted(arch)


# ---------------------------------------------------------------------------------------------------------
# ImageNet (ILSVRC2012) in the ImageFolder layout: PATH/train and PATH/val, one folder per class, with DARTS's
# pipeline (also the authors' of AGNAS's macro search): random resized crop 224, flip, colour jitter
# 0.4/0.4/0.4/0.2 for training; resize 256, centre crop 224 for evaluation.

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def imagenet_transforms(train: bool):
    import torchvision.transforms as T
    t = ([T.RandomResizedCrop(224), T.RandomHorizontalFlip(),
          T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2)] if train
         else [T.Resize(256), T.CenterCrop(224)])
    return T.Compose(t + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _imagenet_split(root: str, split: str, what: str) -> str:
    if os.path.exists(root) and not os.path.isdir(root):
        raise UserError(f'--data {root} is a file, but it must be a folder holding {what}, each with one folder '
                        f'of images per class (ImageFolder layout)')
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise UserError(f'no {split}/ folder in {os.path.abspath(root)}: --data must hold {what}, each with '
                        f'one folder of images per class (ImageFolder layout)')
    return folder


def imagenet_folders(root: str):
    """(train, val) SafeImageFolders of ImageNet with the training and evaluation transforms."""
    data = {split: SafeImageFolder(_imagenet_split(root, split, 'train/ and val/'), imagenet_transforms(train))
            for split, train in (('train', True), ('val', False))}
    if data['train'].classes != data['val'].classes:
        raise UserError(f'train/ has {len(data["train"].classes)} classes and val/ has '
                        f'{len(data["val"].classes)}, or their names differ; both need the same class '
                        f'folders')
    return data['train'], data['val']


def imagenet_search_data(root: str, augment: bool = True):
    """(PATH/train with the training transform, the same images with the evaluation transform): a search
    trains the weights on the first and, as the authors' compute_attention.py, ranks blocks on the second.
    One scan of the folder; both share its list of unreadable images."""
    import copy
    data = SafeImageFolder(_imagenet_split(root, 'train', 'train/'), imagenet_transforms(augment))
    view = copy.copy(data)
    view.transform = imagenet_transforms(False)
    return data, view


# ---------------------------------------------------------------------------------------------------------
# Your own images (--dataset folder): PATH/train/CLASS/IMAGE, and PATH/test or PATH/val for retraining and the
# teacher, in torchvision's ImageFolder layout (ImageNet's train/ and val/ too). The class count and the
# normalisation statistics come from the data.
#
# The one rule for images that cannot be decoded, whatever the script (SafeImageFolder): an unreadable image
# (a truncated or corrupt JPEG in a copy of ImageNet, say) is skipped, not fatal, since a multi-day run must
# not die on one file. It is named in a warning the first time, the next readable image takes its place (so
# batches keep their size, every process of a distributed run keeps the same number of steps, and a resumed
# epoch sees the same images), and each epoch's summary counts the distinct files skipped so far. Past
# MAX_UNREADABLE_SHARE of the images an epoch reads, the copy itself is broken and the run stops with one
# sentence: 1% is 12,811 of ImageNet's 1.28M training images, or one image in a folder of 100.

MAX_UNREADABLE_SHARE = 0.01
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
                f'the {share:.0%} a run skips (datasets.MAX_UNREADABLE_SHARE); replace or remove them and run again')

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
        raise UserError(f'--image_size applies to --dataset folder only; {dataset} images are '
                        f'{16 if dataset == "imagenet16-120" else 32}x{16 if dataset == "imagenet16-120" else 32}, '
                        f'drop the flag')
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
