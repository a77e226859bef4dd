"""NAS-Bench-201 (Dong & Yang, ICLR 2020): its search settings, its 200-epoch training recipe, and the benchmark
lookup that turns a derived cell into the accuracies the benchmark measured for it.

The search space itself is `--space nb201` of model_search.py (the cell and skeleton) and genotypes.py (the
architecture string); this file holds what is the benchmark's own:
- `SEARCH_SETTINGS`: the reference searches' hyper-parameters (the benchmark's DARTS and GDAS configs), which
  train_search.py fills in for the flags a user leaves out under --space nb201;
- `TRAIN_SCHEDULE`: the recipe every one of the 15,625 architectures was trained with (`hp='200'`), which
  `train_cifar.py --nb201_schedule` uses;
- `Benchmark`: the benchmark file loaded once through the official API package (`nas-bench-201`, or
  `nats_bench` for NATS-Bench's topology files; `pip install -r requirements-nb201.txt`), queried with
  structured calls only (`query_index_by_arch`, `get_more_info`), never by parsing printed text.
"""
from __future__ import annotations

import contextlib
import math
import os
import pickle
import time
import warnings

from utils import UserError

# The benchmark's search configs (DARTS.config, GDAS.config of its reference code): SGD with Nesterov momentum
# 0.9, lr 0.025 cosine to 0.001, weight decay 5e-4, batch 64; A: Adam 3e-4, betas (0.5, 0.999), weight decay
# 1e-3 (train_search.py's default); the network: C 16, N 5 (15 cells); gradient-norm clip 5. No teacher.
SEARCH_SETTINGS = {
    'batch_size': 64,
    'learning_rate_min': 0.001,
    'weight_decay': 5e-4,
    'nesterov': True,
    'arch_learning_rate': 3e-4,
    'layers': 15,
    'lambda_at': 0.0,
    'track_running_stats': 1,
}
# Search epochs per method: DARTS 50 (the benchmark's config; AGNAS App. B runs 50 with DARTS's settings),
# GDAS 250. EoiNAS keeps its own schedule (warm-up 20 + 20 epochs per prune: 100 epochs on 5 ops).
SEARCH_EPOCHS = {'darts': 50, 'agnas': 50, 'gdas': 250}

# The training recipe of every architecture in the benchmark (its 200E.config, hp='200'): 200 epochs, SGD
# with Nesterov momentum 0.9, lr 0.1 cosine to 0, no warm-up, weight decay 5e-4, batch 256, cross-entropy;
# random crop (padding 4 on 32x32, 2 on ImageNet16's 16x16) and horizontal flip; no cutout, no auxiliary
# tower, no drop-path. The evaluation network: C 16, N 5, affine BN.
TRAIN_SCHEDULE = {
    'epochs': 200, 'learning_rate': 0.1, 'momentum': 0.9, 'nesterov': True, 'weight_decay': 5e-4,
    'batch_size': 256, 'init_channels': 16, 'layers': 15, 'cutout_length': 0, 'auxiliary': False,
    'drop_path_prob': 0.0, 'grad_clip': 0.0,
}

# What the lookup records: (key, the API's dataset name, the field of get_more_info). CIFAR-10's validation
# accuracy is that of the network trained on the 25k training half ('cifar10-valid'); its test accuracy that
# of the network trained on all 50k ('cifar10'), as the papers report them.
ACCURACIES = (
    ('cifar10_valid', 'cifar10-valid', 'valid-accuracy'),
    ('cifar10_test', 'cifar10', 'test-accuracy'),
    ('cifar100_valid', 'cifar100', 'valid-accuracy'),
    ('cifar100_test', 'cifar100', 'test-accuracy'),
    ('imagenet16_valid', 'ImageNet16-120', 'valid-accuracy'),
    ('imagenet16_test', 'ImageNet16-120', 'test-accuracy'),
)
HP = '200'  # the 200-epoch training that the papers report
INSTALL = 'pip install -r requirements-nb201.txt'


def search_defaults(method: str) -> dict:
    """The flags --space nb201 fills in for `method` where the user gave none (before the method's own)."""
    out = dict(SEARCH_SETTINGS)
    if method in SEARCH_EPOCHS:
        out['epochs'] = SEARCH_EPOCHS[method]
    return out


@contextlib.contextmanager
def _full_unpickling():
    """The benchmark files are pickles of the API's own objects, which torch.load's weights-only default (torch
    >= 2.6) refuses; the API's torch.load runs with full unpickling for the file the user chose, only here."""
    key = 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'
    old = os.environ.get(key)
    os.environ[key] = '1'
    try:
        with warnings.catch_warnings():  # torch's note that the variable is set: we set it, for this load
            warnings.filterwarnings('ignore', message='Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD')
            yield
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old


class Benchmark:
    """The benchmark, loaded once (on rank 0). `Benchmark(path)`: a NAS-Bench-201 file (.pth: v1_0-e61699,
    v1_1-096897) through `nas_201_api.NASBench201API`, or a NATS-Bench topology file or folder
    (NATS-tss-v1_0-3ffb9*) through `nats_bench.create(path, 'tss', fast_mode=True)`. Bad input (no such path,
    no API package, a file that is not a benchmark) raises UserError with one sentence. `seconds`: the load
    time. `lookup(arch)` -> {'index': i, 'cifar10_valid': .., ..., 'imagenet16_test': ..} (accuracies in %,
    averaged over the benchmark's trials), or {'index': -1} for an architecture the file does not hold."""

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise UserError(f'--benchmark {path} does not exist; download NAS-Bench-201-v1_0-e61699.pth (or '
                            f'v1_1-096897, or a NATS-Bench topology file) and pass its path')
        if os.path.isfile(path) and not os.access(path, os.R_OK):
            raise UserError(f'--benchmark {path} cannot be read (permissions); make it readable or pass another copy')
        nats = os.path.isdir(path) or 'NATS' in os.path.basename(path)
        start = time.time()
        try:
            if nats:
                import nats_bench
            else:
                from nas_201_api import NASBench201API
        except ImportError:
            package = 'nats_bench' if nats else 'nas-bench-201'
            raise UserError(f'--benchmark needs the {package} package (the official API): install it with '
                            f'`{INSTALL}`') from None
        try:
            with _full_unpickling():
                if nats:
                    self.api = nats_bench.create(path, 'tss', fast_mode=True, verbose=False)
                else:
                    self.api = NASBench201API(path, verbose=False)
        except (AssertionError, OSError, EOFError, KeyError, ValueError, TypeError, AttributeError, IndexError,
                RuntimeError, pickle.UnpicklingError) as e:  # the API fails on what is not its file in many ways
            kind = 'a NATS-Bench topology file or folder' if nats else 'a NAS-Bench-201 file'
            raise UserError(f'--benchmark {path} is not {kind} (the API could not load it: '
                            f'{type(e).__name__}: {str(e)[:120]}); pass the benchmark file itself') from None
        self.path = path
        self.kind = 'NATS-Bench (topology)' if nats else 'NAS-Bench-201'
        self.seconds = time.time() - start

    def __len__(self) -> int:
        return len(self.api)

    def lookup(self, arch: str) -> dict:
        index = self.api.query_index_by_arch(arch)
        if index < 0:
            return {'index': -1}
        out = {'index': int(index)}
        for key, dataset, field in ACCURACIES:
            try:
                info = self.api.get_more_info(index, dataset, hp=HP, is_random=False)
            except (KeyError, ValueError):  # a file without this data set (the v1_0 'less' part, say)
                info = {}
            value = info.get(field)
            out[key] = None if value is None or not math.isfinite(value) else round(float(value), 4)
        return out


def describe(result: dict) -> str:
    """The lookup as one short log phrase."""
    if result.get('index', -1) < 0:
        return 'not in the benchmark file'
    fmt = {k: ('n/a' if result.get(k) is None else f'{result[k]:.2f}') for k, _, _ in ACCURACIES}
    return (f'benchmark #{result["index"]}: C10 {fmt["cifar10_valid"]}/{fmt["cifar10_test"]}  C100 '
            f'{fmt["cifar100_valid"]}/{fmt["cifar100_test"]}  IN16 {fmt["imagenet16_valid"]}/{fmt["imagenet16_test"]}'
            f' (valid/test %)')
