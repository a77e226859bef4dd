"""Time the search iteration and the retraining step; prints one table.

    python bench_search.py --gpu 0                 # full size, on CUDA
    python bench_search.py --device cpu --iters 3  # the same on the CPU (slow)
    python bench_search.py --device cpu --count    # kernel ops, saved bytes, 1-thread CPU ms (issue 11)

Rows:
- search, DARTS space, no AGS: the repo's stand-in for DARTS's own code. It is the baseline of the ratio column.
- search, NOS space, with AGS: the PyramidNet-110 teacher, first-order.
- retraining: `train_cifar.py`'s step at 20 cells / 36 channels, in fp32 and (on CUDA) in bf16 + channels_last.

One search iteration is what `train_search.py` runs per batch: the architecture step (Eq. 13) plus the weight
step (Eq. 12), each a forward, a backward and an optimizer step. Inputs are random tensors already on the
device, so data loading is not timed. Every row reports the median over `--iters` iterations after
`--warmup`, and the peak memory on CUDA.

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
import statistics
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import genotypes
import utils
from model import NetworkCIFAR
from model_search import Network
from teacher import PyramidNet
from train_search import Architect, search_loss, search_step, teacher_stages


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=utils.HelpFormatter)
    p.add_argument('--batch_size', type=int, nargs='+', default=[64], help='search batch sizes to time')
    p.add_argument('--retrain_batch_size', type=int, default=128, help='train_cifar.py batch (0: skip)')
    p.add_argument('--layers', type=int, default=8, help='cells of the search network')
    p.add_argument('--init_channels', type=int, default=16, help='channels of the search network')
    p.add_argument('--teacher_depth', type=int, default=110, help='PyramidNet depth of the AGS teacher')
    p.add_argument('--iters', type=int, default=30, help='timed iterations per row (median reported)')
    p.add_argument('--warmup', type=int, default=5, help='untimed iterations first')
    p.add_argument('--gpu', type=int, default=0, help='CUDA device')
    p.add_argument('--device', default=None, help='cpu to run on the CPU')
    p.add_argument('--count', action='store_true',
                   help='print issue 11\'s table instead (kernel ops, saved MiB, 1-thread CPU ms; CPU only)')
    p.add_argument('--count_batch', type=int, default=2, help='batch of the kernel-op count (--count)')
    p.add_argument('--top', type=int, default=0, help='with --count: the N most frequent ops of each row')
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
                foreach: bool | None = None):
    """One first-order search iteration as train_search.py runs it (Eq. 13 then Eq. 12), on random tensors.

    Returns (step, forward): `step()` runs the iteration; `forward()` is the weight step's forward (the loss
    of Eq. 12, teacher included), for `saved_bytes`. `foreach=True` makes both optimizers use the foreach
    implementation, their default on CUDA (issue 11's rule); gradient clipping already does on every device.
    """
    torch.manual_seed(0)
    model = Network(args.init_channels, 10, args.layers, space=space, fast=fast).to(device)
    optimizer = torch.optim.SGD(model.weights(), 0.025, momentum=0.9, weight_decay=3e-4, foreach=foreach)
    architect = Architect(model, momentum=0.9, weight_decay=3e-4, arch_learning_rate=6e-4,
                          arch_weight_decay=1e-3, lambda_at=lambda_at)
    for group in architect.optimizer.param_groups:
        group['foreach'] = foreach
    x, xv = torch.randn(2, batch, 3, 32, 32, device=device)
    y, yv = torch.randint(10, (2, batch), device=device)
    teacher = teacher if lambda_at > 0 else None

    def step():
        out = search_step(model, architect, optimizer, x, y, xv, yv, teacher=teacher, eta=0.025)
        out['train_ce'].item()  # train_search.py syncs once per step too

    def forward():
        return search_loss(model, x, y, teacher_stages(teacher, x), lambda_at)[0]

    return step, forward


def search_row(space: str, lambda_at: float, batch: int, args, device, teacher) -> tuple[float, float]:
    step, _ = make_search(space, lambda_at, batch, args, device, teacher)
    return timed(step, device, args.warmup, args.iters)


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


def cpu_ms(step, warmup: int, iters: int, threads: int = 1) -> float:
    """Median CPU ms per call of step() with `threads` intra-op threads: the process's CPU time (user +
    system), which other processes on a shared machine barely change, unlike wall-clock time."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            step()
        times = []
        for _ in range(iters):
            t = time.process_time()
            step()
            times.append(time.process_time() - t)
    finally:
        torch.set_num_threads(old)
    return statistics.median(times) * 1e3


COUNT_ROWS = (  # (label, space, AGS, fast): the DARTS reference first; it is the ratio's baseline
    ('DARTS space, plain (reference)', 'darts', False, False),
    ('NOS + AGS, plain', 'nos', True, False),
    ('DARTS space, fast', 'darts', False, True),
    ('NOS + AGS, fast', 'nos', True, True),
)


def count_table(args) -> list[dict]:
    """Issue 11's table on the CPU: per row, kernel ops of one iteration at --count_batch (the count does
    not depend on the batch), MiB saved by one forward at the timing batch, and 1-thread ms at that batch
    (skipped with --iters 0). The teacher (PyramidNet-`--teacher_depth`, random weights: what it computes
    does not change the count) runs in the AGS rows, as it does in train_search.py."""
    device = torch.device('cpu')
    teacher = PyramidNet(args.teacher_depth, 84, 10, True).eval().requires_grad_(False)
    batch = args.batch_size[0]
    rows = []
    for label, space, ags, fast in COUNT_ROWS:
        lambda_at = 1000. if ags else 0.
        step, _ = make_search(space, lambda_at, args.count_batch, args, device, teacher, fast=fast,
                              foreach=True)
        ops = count_kernel_ops(step)
        row = {'label': label, 'space': space, 'fast': fast, 'ops': sum(ops.values()), 'by_op': ops}
        if ags:
            x = torch.randn(args.count_batch, 3, 32, 32)
            row['teacher_ops'] = 2 * sum(count_kernel_ops(functools.partial(teacher_stages, teacher, x)).values())
        step, forward = make_search(space, lambda_at, batch, args, device, teacher, fast=fast, foreach=True)
        row['saved'] = saved_bytes(forward)
        row['ms'] = cpu_ms(step, args.warmup, args.iters) if args.iters else float('nan')
        rows.append(row)
    return rows


def print_count_table(rows: list[dict], args) -> None:
    base = rows[0]
    plain = {r['space']: r for r in rows if not r['fast']}
    print(f'{args.layers} cells / {args.init_channels} ch; kernel ops of one first-order iteration (A step + '
          f'weight step, foreach optimizers) at batch {args.count_batch}; saved MiB of one forward and CPU '
          f'ms (process CPU time, 1 thread, median of {args.iters} after {args.warmup}) at batch '
          f'{args.batch_size[0]}')
    print(f'{"path":32} {"kernel ops":>10} {"vs DARTS":>8} {"saved MiB":>9} {"vs DARTS":>8} {"CPU ms":>9} '
          f'{"vs DARTS":>8} {"vs plain":>8}')
    for r in rows:
        vs_plain = f'{r["ms"] / plain[r["space"]]["ms"]:.2f}x' if r['space'] in plain else '-'
        print(f'{r["label"]:32} {r["ops"]:10d} {r["ops"] / base["ops"]:7.2f}x {r["saved"] / 2**20:9.1f} '
              f'{r["saved"] / base["saved"]:7.2f}x {r["ms"]:9.1f} {r["ms"] / base["ms"]:7.2f}x {vs_plain:>8}')
    for r in rows:
        if 'teacher_ops' in r:
            rest = r['ops'] - r['teacher_ops']
            print(f'{r["label"]}: the teacher\'s two forwards are {r["teacher_ops"]} of its kernel ops; without '
                  f'them {rest} ({rest / base["ops"]:.2f}x)')
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


def main(argv=None):
    args = parse_args(argv)
    if args.count:
        if args.device != 'cpu':
            raise utils.UserError('--count measures on the CPU; pass --device cpu')
        print(f'device: CPU; torch {torch.__version__}; teacher PyramidNet-{args.teacher_depth} in the AGS rows')
        print_count_table(count_table(args), args)
        return
    device = utils.get_device(args.gpu, args.device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    teacher = PyramidNet(args.teacher_depth, 84, 10, True).to(device).eval().requires_grad_(False)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
    print(f'device: {name}; torch {torch.__version__}; search net {args.layers} cells / {args.init_channels} '
          f'ch, teacher PyramidNet-{args.teacher_depth}; median of {args.iters} after {args.warmup} warm-up')
    rows = []
    for batch in args.batch_size:
        base, peak = search_row('darts', 0., batch, args, device, None)
        rows.append(('search', 'darts', 'eager fp32, no AGS', batch, base, peak, base))
        t, peak = search_row('nos', 1000., batch, args, device, teacher)
        rows.append(('search', 'nos', 'eager fp32, AGS', batch, t, peak, base))
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


if __name__ == '__main__':
    utils.run_main(main)
