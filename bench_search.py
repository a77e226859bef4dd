"""Time the search iteration and the retraining step; prints one table.

    python bench_search.py --gpu 0                 # full size, on CUDA
    python bench_search.py --device cpu --iters 3  # the same on the CPU (slow)
    python bench_search.py --device cpu --adwp_ranking 20  # ADWPNAS's ranking check instead
    python bench_search.py --gpu 0 --eoinas        # EoiNAS iterations as ops are pruned, against darts
    python bench_search.py --device cpu --count    # kernel ops, saved bytes, 1-thread CPU ms (issue 11)

Rows:
- search, DARTS space, no AGS: the repo's stand-in for DARTS's own code. It is the baseline of the ratio column.
- search, NOS space, with AGS: the PyramidNet-110 teacher, first-order.
- retraining: `train_cifar.py`'s step at 20 cells / 36 channels, in fp32 and (on CUDA) in bf16 + channels_last.

`--eoinas` prints its own table instead: the `darts` method on the DARTS space (no AGS) against EoiNAS's
iteration (`eoinas.EoiNASMethod.step` after the warm-up: weight step, then A step, each on a Gumbel
sample) with 8, 4, 2 ... ops alive per edge (`--alive`), and with the hard one-op forward.

One search iteration is what `train_search.py` runs per batch: the architecture step (Eq. 13) plus the weight
step (Eq. 12), each a forward, a backward and an optimizer step. Inputs are random tensors already on the
device, so data loading is not timed. Every row reports the median over `--iters` iterations after
`--warmup`, and the peak memory on CUDA.

`--agnas` adds a separate table on the DARTS space (`--agnas_only`: that table alone), its three rows timed
in turn within each iteration: a `darts`-method iteration (first order, no AGS), an AGNAS step (one forward, backward and SGD step on a training batch;
docs/agnas.md) and one batch of AGNAS's importance pass (eval mode, no_grad; run over the validation half after
every epoch); with `--fast_rows` the same two on the fast path (agnas.FastGatedEdges). An AGNAS epoch costs
about one step plus one importance batch per training batch.
`--count` prints another table instead, with the counting rule of issue 11 (`count_kernel_ops`,
`saved_bytes`, `cpu_ms`): per search path (the plain per-edge cells and the fast path, `Network(fast=True)`),
the kernel ops of one first-order iteration, the bytes saved for backward by one forward, and the CPU time
at batch 64 on one thread; each with its ratio to the DARTS-space plain row, which stands in for DARTS's
own search code (the same network op for op).
"""
from __future__ import annotations

import argparse
import collections
import functools
import gc
import statistics
import time

import numpy as np
import torch
import torch.utils._pytree
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import agnas
import eoinas
import genotypes
import utils
from darts import (
    Architect,
    search_loss,
    search_step,
    teacher_stages,
    teacher_stages_pair,
)
from model import NetworkCIFAR
from model_search_fast import Network
from teacher import PyramidNet, fold_batchnorm, pyramid_widths
from train_search import METHODS
from train_search import parse_args as search_args


def parse_args(argv=None):
    p = utils.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--batch_size', type=int, nargs='+', default=[64], help='search batch sizes to time')
    p.add_argument('--retrain_batch_size', type=int, default=128, help='train_cifar.py batch (0: skip)')
    p.add_argument('--layers', type=int, default=8, help='cells of the search network')
    p.add_argument('--init_channels', type=int, default=16, help='channels of the search network')
    p.add_argument('--teacher_depth', type=int, default=110, help='PyramidNet depth of the AGS teacher')
    p.add_argument('--iters', type=int, default=30, help='timed iterations per row (median reported)')
    p.add_argument('--warmup', type=int, default=5, help='untimed iterations first')
    p.add_argument('--agnas', action='store_true', help='also time AGNAS against the darts method (own table)')
    p.add_argument('--agnas_only', action='store_true', help='time only the AGNAS table')
    p.add_argument('--gpu', type=int, default=0, help='CUDA device')
    p.add_argument('--device', default=None, help='cpu to run on the CPU')
    adwp = p.add_argument_group('ADWPNAS ranking check (replaces the timing table when --adwp_ranking > 0)')
    adwp.add_argument('--adwp_ranking', type=int, default=0, help='architectures to rank (0: time instead)')
    adwp.add_argument('--adwp_space', default=None,
                      help='intensive_space.json (default: the top-6 of seeded random DARTS alphas)')
    adwp.add_argument('--adwp_dataset', default='synthetic', help='synthetic | cifar10')
    adwp.add_argument('--data', default='data', help='where CIFAR lives')
    adwp.add_argument('--adwp_synthetic_size', type=int, default=512, help='images of the synthetic data')
    adwp.add_argument('--adwp_layers', type=int, default=5, help='cells of the HyperNetwork and the nets')
    adwp.add_argument('--adwp_channels', type=int, default=8, help='their initial channels')
    adwp.add_argument('--adwp_hyper_epochs', type=int, default=3, help='Stage-1 epochs of the HyperNetwork')
    adwp.add_argument('--adwp_scratch_epochs', type=int, default=3, help='training epochs of each net')
    adwp.add_argument('--adwp_batch_size', type=int, default=32, help='batch of both trainings')
    adwp.add_argument('--adwp_seed', type=int, default=0, help='seeds data order, weights and the architectures')
    p.add_argument('--eoinas', action='store_true', help='time EoiNAS as ops are pruned (its own table)')
    p.add_argument('--alive', type=int, nargs='+', default=[8, 4, 2], help='--eoinas: ops alive per edge')
    p.add_argument('--fast_rows', action='store_true',
                   help='the timing table also times the fast path (Network(fast=True)) of both spaces')
    p.add_argument('--count', action='store_true',
                   help='print issue 11\'s table instead (kernel ops, saved MiB, 1-thread CPU ms; CPU only)')
    p.add_argument('--count_batch', type=int, default=2, help='batch of the kernel-op count (--count)')
    p.add_argument('--top', type=int, default=0, help='with --count: the N most frequent ops of each row')
    p.add_argument('--methods', nargs='+', choices=sorted(METHODS), default=None,
                   help='with --count: only these methods\' rows (the DARTS reference row is always measured)')
    p.add_argument('--rows', nargs='+', default=None,
                   help='with --count: only the rows whose label contains one of these (and the DARTS reference row)')
    p.add_argument('--spaces', nargs='+', choices=('darts', 'nos', 'nb201'), default=None,
                   help='with --count: only these spaces\' rows (the DARTS reference row is always measured)')
    return p.parse_args(argv)


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, iters: int) -> tuple[float, float]:
    """(median seconds per call, peak GiB on CUDA or nan)."""
    for _ in range(warmup):
        fn()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else float('nan')
    return statistics.median(times), peak


def make_search(space: str, lambda_at: float, batch: int, args, device, teacher, *, fast: bool = False,
                foreach: bool | None = None, method: str = 'darts', flags=(), alive: int | None = None,
                random_prune: bool = False, checkpoint: bool = False):
    """One first-order search iteration as train_search.py runs it (Eq. 13 then Eq. 12), on random tensors;
    with `method` 'eoinas' or 'agnas' that method's step instead (EoiNAS after its warm-up: a weight step
    and an A step on fresh Gumbel samples, with its skip dropout; AGNAS: one single-level step), built from
    train_search.py's flags plus `flags`; `alive`: only EOINAS_KEEP's first `alive` ops alive on every edge,
    or with `random_prune` `alive` ops per edge left by a random prune order (`random_alive`); `checkpoint`:
    the cells recomputed in the backward (--checkpoint_cells).

    Returns (step, forward, model): `step()` runs the iteration; `forward()` is the weight step's forward
    (the loss of Eq. 12, teacher included), for `saved_bytes`. `foreach=True` makes both optimizers use the
    foreach implementation, their default on CUDA (issue 11's rule); gradient clipping already does on every
    device.
    """
    torch.manual_seed(0)
    layers = NB201_LAYERS if space == 'nb201' else args.layers
    if method == 'darts':
        model = Network(args.init_channels, 10, layers, space=space, fast=fast).to(device)
        architect = Architect(model, momentum=0.9, weight_decay=3e-4, arch_learning_rate=6e-4,
                              arch_weight_decay=1e-3, lambda_at=lambda_at)
    else:
        sargs = search_args(['--method', method, '--space', space, '--lambda_at', str(lambda_at), '--layers',
                             str(layers), '--init_channels', str(args.init_channels), *flags]
                            + ([] if fast else ['--no_fast']))
        model = METHODS[method].build_model(sargs, 10).to(device)
        if alive is not None and random_prune:
            model.set_alive(*random_alive(model, alive, seed=alive))
        elif alive is not None:
            mask = torch.tensor([op in EOINAS_KEEP[:alive] for op in model.ops]).expand_as(model.alive_normal)
            model.set_alive(mask, mask)
        runner = METHODS[method](model, sargs)
        if method == 'eoinas':
            runner.start_epoch(sargs.eoi_warmup)  # after the warm-up: both steps, sampling, skip dropout
        architect = getattr(runner, 'architect', None)
    model.checkpoint_cells = checkpoint
    optimizer = torch.optim.SGD(model.weights(), 0.025, momentum=0.9, weight_decay=3e-4, foreach=foreach)
    for group in architect.optimizer.param_groups if architect else ():
        group['foreach'] = foreach
    x, xv = torch.randn(2, batch, 3, 32, 32, device=device)
    y, yv = torch.randint(10, (2, batch), device=device)
    teacher = teacher if lambda_at > 0 else None

    def step():
        if method == 'darts':
            out = search_step(model, architect, optimizer, x, y, xv, yv, teacher=teacher, eta=0.025)
        else:
            out = runner.step(x, y, xv, yv, teacher, 0.025, optimizer)
        out['train_ce'].item()  # train_search.py syncs once per step too

    def forward():
        return search_loss(model, x, y, teacher_stages(teacher, x), lambda_at)[0]

    return step, forward, model


def random_alive(model, keep: int, seed: int = 0) -> list[torch.Tensor]:
    """Alive masks (one per cell type) with `keep` ops per row, pruned one op per row at a time in a random
    order that follows EoiNAS's rules (`eoinas.select_prunes` with random importance; NOS: every inner node
    keeps a first-tier feature op). Each edge loses its own ops, as in a real search."""
    rng = np.random.default_rng(seed)
    masks = []
    for alive in model.alive_masks():
        a = alive.cpu().numpy().copy()
        while a.sum(1).max() > keep:
            for r, o in eoinas.select_prunes(rng.random(a.shape), a, model.ops, model.space, 1):
                if a[r].sum() > keep:
                    a[r, o] = False
        masks.append(torch.from_numpy(a))
    return masks


def search_row(space: str, lambda_at: float, batch: int, args, device, teacher, fast: bool = False):
    """(median seconds, peak GiB) of a first-order darts-method iteration."""
    step = make_search(space, lambda_at, batch, args, device, teacher, fast=fast)[0]
    return timed(step, device, args.warmup, args.iters)


# Ops kept when a row has k alive, most expensive first: the convolutions survive, so the saving
# measured is the smallest a prune order can give (the parameter-free ops go first).
EOINAS_KEEP = ['sep_conv_5x5', 'sep_conv_3x3', 'dil_conv_5x5', 'dil_conv_3x3', 'skip_connect', 'max_pool_3x3',
               'avg_pool_3x3', 'none']


def eoinas_step(alive: int, hard: bool, fast: bool, batch: int, args, device):
    """One EoiNAS iteration (a function) on the DARTS space with `alive` ops per edge (EOINAS_KEEP's first),
    or hard (GDAS's one-op forward, on the reference cells); its skip dropout on, as after the warm-up."""
    return make_search('darts', 0., batch, args, device, None, fast=fast, method='eoinas',
                       flags=['--gumbel_hard'] if hard else [], alive=alive)[0]


def eoinas_table(args, device) -> None:
    """darts against EoiNAS at each --alive count (reference cells and fast path) and hard, per batch size,
    timed in turn within each iteration (`interleaved`); ratios to the darts method on the reference cells."""
    print(f'{"method":8} {"path":5} {"sampling":9} {"alive/edge":>10} {"batch":>5} {"ms/iter":>9} {"images/s":>9} '
          f'{"peak GiB":>9} {"vs darts":>9}')
    for batch in args.batch_size:
        rows = [('darts', 'plain', 'softmax', 8, make_search('darts', 0., batch, args, device, None)[0]),
                ('darts', 'fast', 'softmax', 8, make_search('darts', 0., batch, args, device, None, fast=True)[0])]
        for fast in (False, True):
            for k in args.alive:
                rows.append(('eoinas', 'fast' if fast else 'plain', 'soft', k,
                             eoinas_step(k, False, fast, batch, args, device)))
        rows.append(('eoinas', 'plain', 'hard', 1, eoinas_step(8, True, False, batch, args, device)))
        times = interleaved([r[-1] for r in rows], device, args.warmup, args.iters)
        base = times[0][0]
        for (method, path, sampling, k, _), (t, peak) in zip(rows, times):
            print(f'{method:8} {path:5} {sampling:9} {k:10d} {batch:5d} {t * 1e3:9.1f} {2 * batch / t:9.0f} '
                  f'{peak:9.2f} {t / base:8.2f}x')


# ---------------------------------------------------------------------------------------------------------
# Issue 11's counting rule: kernel ops per iteration, bytes saved for backward, CPU time on one thread

NO_KERNEL_OPS = ('detach', 'lift_fresh', 'set_', 'resize_', '_local_scalar_dense')


def launches_kernel(func) -> bool:
    """Every aten op counts except views (`func.is_view`) and ops that launch no kernel: detach, empty*
    (allocation only: empty, empty_like, empty_strided, new_empty, new_empty_strided), lift_fresh, set_,
    resize_, _local_scalar_dense."""
    name = func.overloadpacket.__name__
    return not (func.is_view or name in NO_KERNEL_OPS or name.startswith(('empty', 'new_empty')))


class KernelCounter(TorchDispatchMode):
    """Counts, by name, the aten ops that reach the dispatcher (forward, backward and optimizers)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if launches_kernel(func):
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_kernel_ops(fn) -> collections.Counter:
    """Runs fn() once to warm up (optimizer state, lazy buffers), then once more under `KernelCounter`;
    returns its Counter (op name -> calls). The total is `sum(counter.values())`."""
    fn()
    with KernelCounter() as counter:
        fn()
    return counter.ops


def saved_bytes(forward) -> int:
    """Bytes autograd saves for backward while `forward()` runs (a saved_tensors_hooks pack hook), each
    storage counted once however many saved tensors view it; parameters included."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[(s.device, s.data_ptr())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values())


def held_bytes(forward) -> int:
    """Bytes of the storages that a call of forward() allocates and that are still alive when it returns
    (after one warm-up call, so that caches are not counted): what autograd keeps for the backward, and
    what torch.utils.checkpoint keeps of a checkpointed cell (its inputs), which `saved_bytes` cannot see.
    A storage an op shares with one of its inputs (a view, an in-place op) is not new; so parameters and
    buffers are never counted."""
    forward()
    made = {}

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                     if isinstance(t, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                    st = t.untyped_storage()
                    made[st.data_ptr()] = (StorageWeakRef(st), st.nbytes())
            return out

    with Allocations():
        out = forward()
    gc.collect()
    total = sum(n for ref, n in made.values() if not ref.expired())
    del out
    return total


def cpu_ms(step, warmup: int, iters: int, threads: int = 1) -> float:
    """Median CPU ms per call of step() with `threads` intra-op threads: the process's CPU time (user +
    system), which other processes on a shared machine barely change, unlike wall-clock time."""
    return cpu_ms_in_turn([step], warmup, iters, threads)[0]


def cpu_ms_in_turn(steps, warmup: int, iters: int, threads: int = 1) -> list[float]:
    """`cpu_ms` of several steps, run in turn within each iteration, so that what a shared machine's load
    does to the CPU's speed (caches, memory bandwidth, frequency) hits them alike and their ratio holds."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            for step in steps:
                step()
        times = [[] for _ in steps]
        for _ in range(iters):
            for step, ts in zip(steps, times):
                t = time.process_time()
                step()
                ts.append(time.process_time() - t)
    finally:
        torch.set_num_threads(old)
    return [statistics.median(ts) * 1e3 for ts in times]


COUNT_ROWS = (  # (label, method, space, AGS, fast[, options]): the DARTS reference first (the ratio's baseline)
    ('DARTS space, plain (reference)', 'darts', 'darts', False, False),
    ('NOS + AGS, plain', 'darts', 'nos', True, False),
    ('DARTS space, fast', 'darts', 'darts', False, True),
    ('NOS + AGS, fast', 'darts', 'nos', True, True),
    # --checkpoint_cells: each cell recomputed in the backward (issue 26's memory target)
    ('NOS + AGS, fast, checkpointed', 'darts', 'nos', True, True, {'checkpoint': True}),
    ('EoiNAS, DARTS space, plain', 'eoinas', 'darts', False, False),
    ('EoiNAS, DARTS space, fast', 'eoinas', 'darts', False, True),
    # as ops are pruned: `alive` ops left per edge, each edge in its own random order (`random_alive`)
    *((f'EoiNAS, DARTS, {k} alive, {path}', 'eoinas', 'darts', False, path == 'fast',
       {'alive': k, 'random_prune': True}) for k in (6, 4, 2) for path in ('plain', 'fast')),
    ('EoiNAS, NOS + AGS, plain', 'eoinas', 'nos', True, False),
    ('EoiNAS, NOS + AGS, fast', 'eoinas', 'nos', True, True),
    ('AGNAS, DARTS space, plain', 'agnas', 'darts', False, False),
    ('AGNAS, DARTS space, fast', 'agnas', 'darts', False, True),
    ('AGNAS, NOS, plain', 'agnas', 'nos', False, False),
    ('AGNAS, NOS, fast', 'agnas', 'nos', False, True),
    # NAS-Bench-201's search network (15 cells at --init_channels)
    ('NB201, darts, plain', 'darts', 'nb201', False, False),
    ('NB201, darts, fast', 'darts', 'nb201', False, True),
    ('NB201, EoiNAS, plain', 'eoinas', 'nb201', False, False),
    ('NB201, EoiNAS, fast', 'eoinas', 'nb201', False, True),
    ('NB201, AGNAS, plain', 'agnas', 'nb201', False, False),
    ('NB201, AGNAS, fast', 'agnas', 'nb201', False, True),
)
NB201_LAYERS = 15  # the benchmark's N = 5 cells per stage, whatever --layers says for the other rows


def count_table(args) -> list[dict]:
    """Issue 11's table on the CPU: per row, kernel ops of one iteration at --count_batch (the count does
    not depend on the batch), multiply-adds per image (`utils.count_macs`, 32 x 32), the bytes saved by one
    forward (`saved_bytes`) and held for its backward (`held_bytes`) at the timing batch, and 1-thread ms
    at that batch. The teacher (PyramidNet-`--teacher_depth`, random weights: what it computes does not
    change the count) runs in the AGS rows, as it does in train_search.py."""
    device = torch.device('cpu')
    teacher = fold_batchnorm(PyramidNet(args.teacher_depth, 84, 10, True))  # as train_search.py runs it
    batch = args.batch_size[0]
    rows = []
    plain_steps = {}  # key -> (row, step) of a plain row whose fast row is still to come
    fast_steps = {}  # key -> step of an unchecked fast row, for its checkpointed row
    for spec in COUNT_ROWS:
        label, method, space, ags, fast = spec[:5]
        options = spec[5] if len(spec) > 5 else {}
        if label != COUNT_ROWS[0][0] and (args.methods and method not in args.methods
                                          or args.spaces and space not in args.spaces
                                          or args.rows and not any(r in label for r in args.rows)):
            continue
        lambda_at = 1000. if ags else 0.
        step, _, model = make_search(space, lambda_at, args.count_batch, args, device, teacher, fast=fast,
                                     foreach=True, method=method, **options)
        ops = count_kernel_ops(step)
        row = {'label': label, 'key': (method, space, options.get('alive')), 'fast': fast,
               'checkpoint': options.get('checkpoint', False), 'ops': sum(ops.values()), 'by_op': ops,
               'macs': utils.count_macs(model)}
        if ags:
            x = torch.randn(args.count_batch, 3, 32, 32)
            # one forward on the training and validation batches together (darts.teacher_stages_pair)
            row['teacher_ops'] = sum(count_kernel_ops(functools.partial(teacher_stages_pair, teacher, x, x, True,
                                                                        True)).values())
        step, forward, _ = make_search(space, lambda_at, batch, args, device, teacher, fast=fast, foreach=True,
                                       method=method, **options)
        row['saved'] = saved_bytes(forward)
        row['held'] = held_bytes(forward)
        partner = plain_steps.pop(row['key'], None) if fast and not row['checkpoint'] else None
        if partner is not None:  # the same row on the reference cells: both timed again, in turn
            partner[0]['ms'], row['ms'] = cpu_ms_in_turn([partner[1], step], args.warmup, args.iters)
        elif row['checkpoint'] and row['key'] in fast_steps:  # timed in turn with the row without the flag
            row['ms_unchecked'], row['ms'] = cpu_ms_in_turn([fast_steps.pop(row['key']), step], args.warmup,
                                                            args.iters)
        else:
            row['ms'] = cpu_ms(step, args.warmup, args.iters)
        if fast and not row['checkpoint'] and any(len(r) > 5 and r[5].get('checkpoint') and r[1:3] == row['key'][:2]
                                                  for r in COUNT_ROWS):
            fast_steps[row['key']] = step  # its checkpointed row comes next
        if not fast:
            plain_steps[row['key']] = (row, step)
        rows.append(row)
        print(f'# {label}: {row["ops"]} ops, {row["macs"] / 1e6:.1f} M MACs, saved {row["saved"] / 2**20:.1f} MiB, '
              f'held {row["held"] / 2**20:.1f} MiB, {row["ms"]:.1f} ms', flush=True)  # progress
    return rows


def print_count_table(rows: list[dict], args) -> None:
    base = rows[0]
    plain = {r['key']: r for r in rows if not r['fast']}
    fast = {r['key']: r for r in rows if r['fast'] and not r['checkpoint']}
    print(f'{args.layers} cells / {args.init_channels} ch; kernel ops of one first-order iteration (A step + '
          f'weight step, foreach optimizers) at batch {args.count_batch}; multiply-adds per 32 x 32 image; '
          f'MiB saved by one forward (saved_bytes) and held for its backward (held_bytes), and CPU ms '
          f'(process CPU time, 1 thread, median of {args.iters} after {args.warmup}) at batch '
          f'{args.batch_size[0]}; "vs plain": against the same row on the reference cells')
    print(f'{"method, space, path":32} {"kernel ops":>10} {"vs DARTS":>8} {"MACs (M)":>9} {"vs plain":>8} '
          f'{"saved MiB":>9} {"held MiB":>9} {"vs DARTS":>8} {"CPU ms":>9} {"vs DARTS":>8} {"vs plain":>8}')
    for r in rows:
        p = plain.get(r['key'])
        vs = (f'{r["macs"] / p["macs"]:.2f}x', f'{r["ms"] / p["ms"]:.2f}x') if p else ('-', '-')
        print(f'{r["label"]:32} {r["ops"]:10d} {r["ops"] / base["ops"]:7.2f}x {r["macs"] / 1e6:9.1f} {vs[0]:>8} '
              f'{r["saved"] / 2**20:9.1f} {r["held"] / 2**20:9.1f} {r["held"] / base["held"]:7.2f}x '
              f'{r["ms"]:9.1f} {r["ms"] / base["ms"]:7.2f}x {vs[1]:>8}')
    for r in rows:
        if 'teacher_ops' in r:
            rest = r['ops'] - r['teacher_ops']
            print(f'{r["label"]}: the teacher\'s forward (both batches, BatchNorms folded) is {r["teacher_ops"]} of '
                  f'its kernel ops; without it {rest} ({rest / base["ops"]:.2f}x)')
    for r in rows:
        if r['checkpoint'] and r['key'] in fast:
            f = fast[r['key']]
            print(f'{r["label"]}: held {r["held"] / f["held"]:.2f}x and CPU time '
                  f'{r["ms"] / r.get("ms_unchecked", f["ms"]):.2f}x of the same row without checkpointing'
                  + (' (the two timed in turn)' if 'ms_unchecked' in r else ''))
    if args.top:
        for r in rows:
            print(f'{r["label"]}: ' + ', '.join(f'{n} {c}' for n, c in r['by_op'].most_common(args.top)))


def retrain_row(batch: int, amp: bool, args, device) -> tuple[float, float]:
    torch.manual_seed(0)
    model = NetworkCIFAR(36, 10, 20, True, genotypes.NOS_EXAMPLE).to(device)
    model.drop_path_prob = 0.3
    if amp:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    batches = [(torch.randn(batch, 3, 32, 32, device=device), torch.randint(10, (batch,), device=device))]

    def step():
        utils.train_epoch(model, batches, optimizer, nn.CrossEntropyLoss(), device, aux_weight=0.4,
                          amp_dtype=torch.bfloat16 if amp else None, channels_last=amp)

    return timed(step, device, args.warmup, args.iters)


def interleaved(fns, device, warmup: int, iters: int) -> list[tuple[float, float]]:
    """Like `timed` for several functions, run in turn within each iteration, so that a shared machine's
    changing load hits all of them alike and their ratio holds. [(median seconds, peak GiB or nan)]."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    peaks = [0.] * len(fns)
    for _ in range(iters):
        for i, fn in enumerate(fns):
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[i].append(time.perf_counter() - t)
            if device.type == 'cuda':
                peaks[i] = max(peaks[i], torch.cuda.max_memory_allocated(device) / 2**30)
    return [(statistics.median(t), p if device.type == 'cuda' else float('nan')) for t, p in zip(times, peaks)]


def agnas_rows(batch: int, args, device) -> list[tuple]:
    """(what, batch, seconds, peak GiB) on the DARTS space, timed in turn (`interleaved`): the darts-method
    iteration (the baseline), the AGNAS step and one batch of AGNAS's importance pass, on the reference cells
    and, with --fast_rows, on the fast path (agnas.FastGatedEdges) too."""
    x, xv = torch.randn(2, batch, 3, 32, 32, device=device)
    y, yv = torch.randint(10, (2, batch), device=device)
    torch.manual_seed(0)
    darts = Network(args.init_channels, 10, args.layers, space='darts').to(device)
    darts_opt = torch.optim.SGD(darts.weights(), 0.025, momentum=0.9, weight_decay=3e-4)
    architect = Architect(darts, momentum=0.9, weight_decay=3e-4, arch_learning_rate=6e-4, arch_weight_decay=1e-3)

    def darts_iteration():
        search_step(darts, architect, darts_opt, x, y, xv, yv, eta=0.025)['train_ce'].item()

    fns, names = [darts_iteration], ['darts method, 1st order, no AGS']
    for fast in (False, True) if args.fast_rows else (False,):
        torch.manual_seed(0)
        model = agnas.build_network(args.init_channels, 10, args.layers, nn.CrossEntropyLoss(), space='darts',
                                    fast=fast).to(device)
        optimizer = torch.optim.SGD(model.weights(), 0.025, momentum=0.9, weight_decay=3e-4)
        method = agnas.AGNASMethod(model, argparse.Namespace(lambda_at=0., grad_clip=5., stage_cell='first'))
        fns += [functools.partial(lambda m, o: m.step(x, y, None, None, None, 0.025, o)['train_ce'].item(),
                                  method, optimizer),
                functools.partial(lambda m: agnas.importance_pass(m, [(xv, yv)], device), model)]
        path = ', fast' if fast else ''
        names += [f'agnas step{path}', f'agnas importance pass{path}, 1 batch']
    times = interleaved(fns, device, args.warmup, args.iters)
    return [(name, batch, t, peak) for name, (t, peak) in zip(names, times)]


def print_agnas_table(args, device) -> None:
    print(f'AGNAS vs the darts method, DARTS space, {args.layers} cells / {args.init_channels} ch')
    print(f'{"what":38} {"batch":>5} {"ms/iter":>9} {"images/s":>9} {"peak GiB":>9} {"vs darts":>9}')
    for batch in args.batch_size:
        rows = agnas_rows(batch, args, device)
        base = rows[0][2]
        for what, b, t, peak in rows:
            images = b * (2 if what.startswith('darts') else 1)  # darts reads a train and a val batch
            print(f'{what:38} {b:5d} {t * 1e3:9.1f} {images / t:9.0f} {peak:9.2f} {t / base:8.2f}x')


MIN_RANKED = 20  # fewer architectures give a Kendall tau whose band under random rankings is too wide to read


def adwp_ranking(args, device) -> dict:
    """ADWPNAS's ranking check (search_adwp.ranking_check): Kendall's tau between predicted-weight and
    from-scratch val accuracy, beside the control with untrained generators and the band of tau under random
    rankings; prints a table."""
    import json

    import model_adwp
    import search_adwp
    if args.adwp_ranking < MIN_RANKED:
        raise utils.UserError(f'--adwp_ranking {args.adwp_ranking} ranks too few architectures: under random '
                              f'rankings Kendall\'s tau spreads too widely to say anything; use at least {MIN_RANKED}')
    if args.adwp_space:
        with open(args.adwp_space) as f:
            data = json.load(f)
        space = model_adwp.check_space(data.get('space', data), None, args.adwp_space)
    else:  # a made-up intensive space: the top-6 per node of seeded random per-edge softmaxes
        g = torch.Generator().manual_seed(args.adwp_seed)
        space = model_adwp.derive_intensive_space(*torch.randn(2, 14, 8, generator=g).softmax(-1), K=6)
    out = search_adwp.ranking_check(space, archs=args.adwp_ranking, layers=args.adwp_layers, C=args.adwp_channels,
                                    hyper_epochs=args.adwp_hyper_epochs, scratch_epochs=args.adwp_scratch_epochs,
                                    batch_size=args.adwp_batch_size, dataset=args.adwp_dataset, data_root=args.data,
                                    synthetic_size=args.adwp_synthetic_size, seed=args.adwp_seed, device=device)
    print(f'{"arch":>4} {"predicted %":>11} {"untrained G %":>13} {"scratch %":>9} {"params":>8}')
    for r in out['rows']:
        print(f'{r["arch"]:4d} {r["predicted_acc"]:11.2f} {r["control_acc"]:13.2f} {r["scratch_acc"]:9.2f} '
              f'{r["params"]:8d}')
    n = len(out['rows'])
    mean = sum(r['predicted_acc'] for r in out['rows']) / n
    control = sum(r['control_acc'] for r in out['rows']) / n
    lo, hi = out['random_band']
    print(f'kendall_tau={out["kendall_tau"]:.3f} (untrained generators: {out["control_tau"]:.3f}; random rankings of '
          f'these {n}: 95% in [{lo:.3f}, {hi:.3f}]) mean_predicted_acc={mean:.2f} mean_untrained_acc={control:.2f} '
          f'chance={out["chance_acc"]:.2f}')
    return out


def main(argv=None):
    args = parse_args(argv)
    utils.check_flags(args, {'iters': utils.Range(1), 'warmup': utils.Range(0),
                             'retrain_batch_size': utils.Range(0), 'teacher_depth': utils.Range(high=1000),
                             'alive': utils.Range(1, 11), 'adwp_ranking': utils.Range(0, 1000),
                             'adwp_synthetic_size': utils.Range(1, 100000), 'adwp_layers': utils.Range(3, 100),
                             'adwp_channels': utils.Range(1, 1024), 'adwp_hyper_epochs': utils.Range(1, 1000),
                             'adwp_scratch_epochs': utils.Range(1, 1000), 'adwp_batch_size': utils.Range(1, 4096),
                             'adwp_seed': utils.Range(0, 10**6), 'count_batch': utils.Range(1, 4096),
                             'top': utils.Range(0, 1000)})
    try:  # a --teacher_depth that makes no bottleneck PyramidNet fails here, before any network is built
        pyramid_widths(args.teacher_depth, 84, True)
    except utils.UserError as e:
        raise utils.UserError(str(e).replace('--depth', '--teacher_depth')) from None
    if args.count:
        if args.device != 'cpu':
            raise utils.UserError('--count measures on the CPU; pass --device cpu')
        if args.layers < agnas.MIN_LAYERS and (args.methods is None or 'agnas' in args.methods):
            raise utils.UserError(f'the AGNAS rows need --layers {agnas.MIN_LAYERS} or more (a normal cell per stage); '
                                  f'raise --layers, or leave them out with --methods darts eoinas')
        print(f'device: CPU; torch {torch.__version__}; teacher PyramidNet-{args.teacher_depth} in the AGS rows')
        print_count_table(count_table(args), args)
        return
    device = utils.get_device(args.gpu, args.device)
    if args.adwp_ranking > 0:
        return adwp_ranking(args, device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    if args.agnas_only:
        return print_agnas_table(args, device)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
    if args.eoinas:
        print(f'device: {name}; torch {torch.__version__}; search net {args.layers} cells / {args.init_channels} '
              f'ch, DARTS space; median of {args.iters} after {args.warmup} warm-up')
        return eoinas_table(args, device)
    teacher = fold_batchnorm(PyramidNet(args.teacher_depth, 84, 10, True)).to(device)  # as train_search.py
    print(f'device: {name}; torch {torch.__version__}; search net {args.layers} cells / {args.init_channels} '
          f'ch, teacher PyramidNet-{args.teacher_depth}; median of {args.iters} after {args.warmup} warm-up')
    rows = []
    for batch in args.batch_size:
        base, peak = search_row('darts', 0., batch, args, device, None)
        rows.append(('search', 'darts', 'eager fp32, no AGS', batch, base, peak, base))
        t, peak = search_row('nos', 1000., batch, args, device, teacher)
        rows.append(('search', 'nos', 'eager fp32, AGS', batch, t, peak, base))
        if args.fast_rows:
            t, peak = search_row('darts', 0., batch, args, device, None, fast=True)
            rows.append(('search', 'darts', 'fast fp32, no AGS', batch, t, peak, base))
            t, peak = search_row('nos', 1000., batch, args, device, teacher, fast=True)
            rows.append(('search', 'nos', 'fast fp32, AGS', batch, t, peak, base))
    if args.retrain_batch_size:
        b = args.retrain_batch_size
        t, peak = retrain_row(b, False, args, device)
        rows.append(('retrain', 'NOS_EXAMPLE', 'eager fp32', b, t, peak, None))
        if device.type == 'cuda':
            t, peak = retrain_row(b, True, args, device)
            rows.append(('retrain', 'NOS_EXAMPLE', 'bf16 + channels_last', b, t, peak, None))

    print(f'{"stage":8} {"space":12} {"path":22} {"batch":>5} {"ms/iter":>9} {"images/s":>9} {"peak GiB":>9} '
          f'{"vs DARTS":>9}')
    for stage, space, path, batch, t, peak, base in rows:
        ratio = f'{t / base:.2f}x' if base else '-'
        images = batch * (2 if stage == 'search' else 1)  # a search iteration consumes a train and a val batch
        print(f'{stage:8} {space:12} {path:22} {batch:5d} {t * 1e3:9.1f} {images / t:9.0f} {peak:9.2f} '
              f'{ratio:>9}')
    if args.agnas:
        print()
        print_agnas_table(args, device)


if __name__ == '__main__':
    utils.run_main(main)
