"""What every script shares that is neither data nor run folders: errors, devices, seeding, flag ranges,
meters, attention transfer, counting, the training/evaluation epoch of the evaluation networks, and the
torchrun helpers. Data sets live in data.py; logs, checkpoints and resume rules in runs.py.
"""
from __future__ import annotations

import argparse
import errno
import logging
import math
import os
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
        print(f'error: {one_line(str(e))}', file=sys.stderr)
        sys.exit(2)
    except (torch.OutOfMemoryError, MemoryError) as e:
        print(f'error: the run ran out of memory ({one_line(str(e)) or type(e).__name__}); use a smaller '
              f'--batch_size or a smaller network (--init_channels, --layers)', file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        if "can't allocate memory" not in str(e):  # the CPU allocator's words
            raise
        print(f'error: the run ran out of memory ({one_line(str(e))}); use a smaller --batch_size or a '
              f'smaller network (--init_channels, --layers)', file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in WRITE_FAILURES:
            raise
        print(f'error: {write_failure(e)}; every checkpoint written before is intact: make room (or fix the disk) '
              f'and add --resume to the same command', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        sys.exit(130)


# What a failed write means, for the errors a full or broken disk gives (the class of "disk full while
# writing"): a checkpoint write says so itself (runs.save_checkpoint); any other write of a run ends here.
WRITE_FAILURES = {errno.ENOSPC: 'the disk is full', errno.EDQUOT: 'the disk quota is used up',
                  errno.EFBIG: 'the file grew beyond the size this system allows',
                  errno.EROFS: 'the file system is read-only'}


def write_failure(e: OSError) -> str:
    """'writing PATH failed: the disk is full' for an OSError of a write."""
    why = WRITE_FAILURES.get(e.errno) or e.strerror or type(e).__name__
    return f'writing {e.filename} failed: {why}' if e.filename else f'a write failed: {why}'


def one_line(text: str) -> str:
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
    'seed': Range(0, MAX_SEED), 'gpu': Range(0), 'label_smoothing': Range(0, 1, high_open=True),
    # --subset F takes F of the images for the weights and F/4 for the architecture: at most 0.8 of them
    'subset': Range(0, 0.8, low_open=True), 'width_mult': Range(0, 4, low_open=True),
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




# ---------------------------------------------------------------------------------------------------------
# Meters and progress lines


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


def cpu_seconds() -> float:
    """CPU time this process has used so far (all its threads, user + system), plus that of its children which
    have ended (the DataLoader's workers, which end with each epoch's loader): the search cost on the CPU. Wall
    time overstates it on a shared machine (2.4x on the development machine), and on a GPU it is not the cost."""
    seconds = time.process_time()
    try:
        import resource
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        seconds += children.ru_utime + children.ru_stime
    except ImportError:  # Windows: this process only
        pass
    return seconds


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




class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none to show (None, on/off switches)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def given_flags(argv=None) -> set[str]:
    """The flags named on the command line (`--name` or `--name=value`; argv None: sys.argv), without the
    dashes: what a recipe (--preset) must not override."""
    argv = sys.argv[1:] if argv is None else argv
    return {a[2:].split('=')[0] for a in argv if isinstance(a, str) and a.startswith('--')}


class ArgumentParser(argparse.ArgumentParser):
    """Every script's parser: a bad command line is one line on stderr and exit code 2, like every other
    error (`run_main`), instead of argparse's usage block: `error: unrecognized arguments: --lerning_rate
    (did you mean --learning_rate?); see --help`. Help shows the defaults (HelpFormatter)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('formatter_class', HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        prefix = 'unrecognized arguments: '
        if message.startswith(prefix):
            hints = [h for h in map(self._closest, message[len(prefix):].split()) if h]
            if hints:
                message += f' (did you mean {" and ".join(hints)}?)'
        print(f'error: {message}; see --help', file=sys.stderr)
        sys.exit(2)

    def _closest(self, arg: str) -> str | None:
        """The flag of this parser closest to a mistyped one (difflib), None where none is close."""
        import difflib
        if not arg.startswith('--'):
            return None
        flags = [s for action in self._actions for s in action.option_strings if s.startswith('--')]
        close = difflib.get_close_matches(arg.split('=', 1)[0], flags, n=1)
        return close[0] if close else None


# The flags both retraining scripts (train_cifar.py, train_imagenet.py) take alike, written once; where the
# two differ (a default, what a flag means under torchrun) the script passes its own.
AMP_CHOICES = ('none', 'bf16')  # --amp: fp32 by default (the papers' precision); bf16 opt-in


def add_cell_flags(p: argparse.ArgumentParser, default_layers: int) -> None:
    """--layers and the auxiliary tower's flags of a retrained cell network."""
    p.add_argument('--layers', type=int, default=None,
                   help=f'cells in the network (default {default_layers}; a per-layer genotype sets its own)')
    p.add_argument('--auxiliary', dest='auxiliary', action='store_true', default=True,
                   help='auxiliary tower at 2/3 depth (on by default; DARTS\'s flag, accepted)')
    p.add_argument('--no_auxiliary', dest='auxiliary', action='store_false', help='no auxiliary tower')
    p.add_argument('--auxiliary_weight', type=float, default=0.4, help='weight of the auxiliary loss')


def add_run_flags(p: argparse.ArgumentParser, *, save: str, workers: int, report_freq: int,
                  gpu_help: str = 'CUDA device', device_help: str = 'cpu to run on the CPU',
                  workers_help: str = 'data-loading processes') -> None:
    """A retraining's last flags: gradient clip, device and precision, run folder and --resume, seed, data
    loading, logging. `save`: the default folder's name as --help shows it."""
    p.add_argument('--grad_clip', type=float, default=5., help='gradient norm clip (0: none)')
    p.add_argument('--gpu', type=int, default=0, help=gpu_help)
    p.add_argument('--device', default=None, help=device_help)
    p.add_argument('--amp', default='none', choices=AMP_CHOICES,
                   help='none: fp32, as the papers trained; bf16: bf16 autocast with channels_last (faster on a GPU, '
                        'not the papers\' numerics; result.json and summarize.py show the precision)')
    p.add_argument('--no_channels_last', action='store_true', help='--amp bf16: keep the NCHW memory layout')
    p.add_argument('--save', default=None, help=f'output folder (default {save})')
    p.add_argument('--resume', nargs='?', const='', default=None, metavar='PATH',
                   help='continue from PATH (default SAVE/checkpoint.pt)')
    p.add_argument('--seed', type=int, default=0, help='seeds weights, batches, augmentation, drop-path')
    p.add_argument('--workers', type=int, default=workers, help=workers_help)
    p.add_argument('--report_freq', type=int, default=report_freq,
                   help='log every N steps (also every 30 s; 0: never)')
    p.add_argument('--tensorboard', action='store_true',
                   help='also write each epoch\'s figures as TensorBoard scalars into SAVE/tensorboard (needs pip '
                        'install tensorboard)')



# ---------------------------------------------------------------------------------------------------------
# Attention transfer (Zagoruyko & Komodakis, 2017; NOS Eq. 10 as fixed by docs/nos.md)


def attention_map(f: torch.Tensor) -> torch.Tensor:
    """at(F): the channel-mean of F squared, flattened and L2-normalised, (N, H*W), in float32. The
    readable formula; `attention_transfer_loss` computes the same with its backward written out
    (`_AttentionTransfer`)."""
    return _attention(f.float())


def _attention(f: torch.Tensor) -> torch.Tensor:
    """`attention_map` in f's own dtype."""
    return F.normalize(f.pow(2).mean(dim=1).flatten(1), dim=1)


NORMALIZE_EPS = 1e-12  # F.normalize's default: at(F) = a / max(||a||, eps)


class _AttentionTransfer(torch.autograd.Function):
    """L_AT = 1/2 * sum over stages of mean((q_S - q_T)^2) for student stages S (N, C, H, W) and the teacher's
    maps q_T (N, H*W), with q_S = at(S) = a / max(||a||, eps), a = mean_c S^2 (the forward is
    `attention_map`'s, op for op). The backward by hand, per stage of M = N*H*W positions and upstream
    gradient g:
        dL/dq = g * (q - q_T) / M
        dL/da = (dL/dq - q * <q, dL/dq>) / ||a||   (the rows' <., .>; where ||a|| < eps: dL/dq / eps)
        dL/dS = 2 * S * dL/da / C
    nine kernels a stage against autograd's nineteen (issue 26). Under create_graph the backward is autograd's
    through the same formula, so that it can be differentiated again."""

    @staticmethod
    def forward(ctx, n, *tensors):
        student, maps = tensors[:n], tensors[n:]
        loss, saved = None, []
        for s, t in zip(student, maps):
            a = s.pow(2).mean(dim=1).flatten(1)
            norm = torch.linalg.vector_norm(a, dim=1, keepdim=True)
            den = norm.clamp_min(NORMALIZE_EPS)
            q = a / den
            mse = F.mse_loss(q, t)
            loss = mse if loss is None else loss + mse
            saved += [s, t, q, norm, den]
        ctx.save_for_backward(*saved)
        ctx.n = n
        return 0.5 * loss

    @staticmethod
    def backward(ctx, g):
        saved, n = ctx.saved_tensors, ctx.n
        if torch.is_grad_enabled():  # create_graph: a gradient that autograd can differentiate again
            student, maps = saved[0::5], saved[1::5]
            with torch.enable_grad():
                loss = 0.5 * sum(F.mse_loss(_attention(s), t) for s, t in zip(student, maps))
                return (None, *torch.autograd.grad(loss, student, g, create_graph=True), *([None] * n))
        grads = []
        for i in range(n):
            s, t, q, norm, den = saved[5 * i:5 * i + 5]
            N, C, H, W = s.shape
            dq = q - t                                                   # times g / M below
            dot = torch.bmm(q.unsqueeze(1), dq.unsqueeze(2)).view(N, 1)  # <q, dq> per row
            dot = dot * (norm >= NORMALIZE_EPS)                          # clamp_min passes no gradient below eps
            da = torch.addcmul(dq, q, dot, value=-1.)                    # dq - q <q, dq>
            scale = g * (2. / (N * H * W * C)) / den                     # g / M / max(||a||, eps), and 2/C of dS
            grads.append(s * (da * scale).view(N, 1, H, W))
        return (None, *grads, *([None] * n))


def attention_transfer_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """L_AT = 1/2 * sum over stages of mean((at(S) - at(T))^2); the stages must share a resolution. A teacher
    entry is its stage output (N, C, H, W) or already its map at(T) (N, H*W; `darts.teacher_stages`)."""
    maps = []
    for s, t in zip(student, teacher, strict=True):
        if t.dim() == 4 and s.shape[-2:] != t.shape[-2:] or t.dim() != 4 and s[0, 0].numel() != t.shape[-1]:
            seen = tuple(t.shape[-2:]) if t.dim() == 4 else f'{t.shape[-1]}-position'
            raise ValueError(f'attention transfer pairs a {tuple(s.shape[-2:])} student stage with a '
                             f'{seen} teacher stage')
        maps.append(attention_map(t) if t.dim() == 4 else t)
    return _AttentionTransfer.apply(len(maps), *(s.float() for s in student), *maps)


# ---------------------------------------------------------------------------------------------------------
# Which weights decay

DECAY_ON = ('all', 'conv_fc')


def decay_groups(model: nn.Module, weights: list, weight_decay: float, on: str = 'all') -> list[dict]:
    """SGD's parameter groups for `weights` (parameters of `model`): weight decay on every one ('all', DARTS),
    or only on the convolutions (4-d) and the classifier ('conv_fc': the authors' ProxylessNAS-space search
    and retraining, AGNAS; no decay on BatchNorm or the attention FCs). Both groups take momentum."""
    if on == 'all':
        return [{'params': list(weights), 'weight_decay': weight_decay}]
    if on not in DECAY_ON:
        raise ValueError(f'unknown weight decay rule {on!r}; valid: {", ".join(DECAY_ON)}')
    ids = {id(p) for p in weights}
    decayed = {id(p) for n, p in model.named_parameters()
               if id(p) in ids and (p.dim() == 4 or n.startswith('classifier.'))}
    return [{'params': [p for p in weights if id(p) not in decayed], 'weight_decay': 0.},
            {'params': [p for p in weights if id(p) in decayed], 'weight_decay': weight_decay}]


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


def check_loss(losses: dict, limit: float = math.inf, *, epoch: int | None = None, step: int | None = 0,
               kept: int = 0, checkpoint: str = '', retry: str = '') -> None:
    """Stop a run whose loss is not finite or above `limit` (loss_limit), in one sentence: the epoch and
    step, the losses, what was kept, and what to run next. Shared by every training script.

    losses: {name: value} of this step; epoch: 0-based; step: 0-based, None for the weights at the end of the
    epoch (check_state); kept: epochs in the last checkpoint (0: none); checkpoint: its path; retry: the flags
    that the advice adds, e.g. '--learning_rate 0.025'.
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
    if step is None:
        what, where = 'loss of the weights', f'at the end of epoch {epoch + 1}, so they were not saved'
    else:
        what = 'training loss'
        where = f'at epoch {epoch + 1}, step {step + 1}' if epoch is not None else f'at step {step + 1}'
    raise NonFiniteLoss(f'the {what} {how} {where}; {_advice(kept, checkpoint, retry)}')


def _advice(kept: int, checkpoint: str, retry: str) -> str:
    """What a diverged run says to do: resume from the last checkpoint (written only after its weights passed
    check_state, so it can work) with other flags, or start again with them."""
    retry = retry or 'a lower --learning_rate'
    if kept:
        resume = f'--resume {checkpoint}' if checkpoint else '--resume'
        after = (f'the checkpoint of epoch {kept} is kept and nothing after it was written: add `{resume} '
                 f'{retry}` to the same command to go on from it')
    else:
        after = f'no checkpoint was written yet: run the same command again with `{retry}`'
    return f'{after} (or, if the data are at fault, check them)'


def check_state(state, losses: dict, limit: float = math.inf, *, epoch: int, kept: int = 0,
                checkpoint: str = '', retry: str = '') -> None:
    """Refuse to checkpoint a diverged state: every floating tensor of `state` (what the checkpoint would hold:
    weights, buffers, optimizer moments) finite, and `losses` (of those very weights: the epoch's evaluation,
    or a forward pass after its last step) finite and within `limit`. A run whose last step blew its weights
    up stops here with check_loss's sentence, and the checkpoint its advice names is the previous one, which
    passed this check, rather than one that no learning rate can rescue."""
    bad = [name for name, t in state_items(state)
           if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteLoss(f'the weights at the end of epoch {epoch + 1} hold non-finite values ({len(bad)} '
                            f'tensor(s), the first {bad[0]}), so they were not saved; '
                            f'{_advice(kept, checkpoint, retry)}')
    check_loss(losses, limit, epoch=epoch, step=None, kept=kept, checkpoint=checkpoint, retry=retry)


@torch.no_grad()
def state_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, criterion=F.cross_entropy) -> float:
    """The loss of the current weights on one batch, leaving the model as it was: what check_state needs where
    an epoch evaluates nothing (the search). Under torchrun the mean over the processes' batches.

    BatchNorm normalises by the batch (train mode), as in the steps that made the weights: the running
    statistics of a short search lag its weights (after one step they are still 90% their initial values), and
    in eval mode they can give a healthy supernet a loss of 50, a false alarm. Weights that blew up still show:
    the classifier is not normalised. Every buffer (running statistics, counters) is put back afterwards, and
    every generator too (a Gumbel sample or drop-path draws noise), so the run goes on as if this never ran."""
    was = model.training
    buffers = [b.clone() for b in model.buffers()]
    devices = [x.device.index or 0] if x.device.type == 'cuda' else []
    with torch.random.fork_rng(devices=devices):
        model.train()
        try:
            logits, _ = _split_output(model(x))
            loss = criterion(logits.float(), y) * x.shape[0]
        finally:
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
            model.train(was)
    total = all_sum(torch.stack([loss.double(), loss.new_tensor(x.shape[0], dtype=torch.float64)]))
    return (total[0] / total[1]).item()


def _split_output(out):
    """Models return logits, or (logits, auxiliary logits or None) as DARTS's networks do."""
    return out if isinstance(out, tuple) else (out, None)


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """torch.autocast in `amp_dtype` on `device`'s type; a no-op context without it (also on devices autocast
    does not know, such as the tests' meta device)."""
    import contextlib
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def train_step(model: nn.Module, x, y, optimizer, criterion, *, aux_weight: float = 0., grad_clip: float | None = 5.,
               amp_dtype: torch.dtype | None = None, channels_last: bool = False):
    """One optimizer step of an evaluation network on a batch already on its device; returns the (loss, logits)
    tensors, nothing synced (train_epoch reads the loss)."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device, amp_dtype):
        logits, aux = _split_output(model(x))
        loss = criterion(logits, y)
        if aux is not None and aux_weight > 0:
            loss = loss + aux_weight * criterion(aux, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach(), logits.detach()


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
        loss, logits = train_step(model, x, y, optimizer, criterion, aux_weight=aux_weight, grad_clip=grad_clip,
                                  amp_dtype=amp_dtype, channels_last=channels_last)
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


def state_items(state, name: str = ''):
    """(key path, leaf) of a nested state (dicts, lists and tuples walked, in order): a checkpoint, a state
    dict, a list of tensors. Paths join keys with '/' ('model/cells.0.weight', 'optimizer/state/3/...')."""
    if isinstance(state, dict):
        for k, v in state.items():
            yield from state_items(v, f'{name}/{k}' if name else str(k))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from state_items(v, f'{name}/{i}' if name else str(i))
    else:
        yield name, state


def _plain(value) -> str:
    """A plain value as text that does not depend on library versions (numpy 2 writes np.float64(0.1))."""
    if isinstance(value, np.generic):
        value = value.item()
    for kind in (bool, int, float):  # bool first: it is an int
        if isinstance(value, kind):
            return kind.__repr__(value)
    if isinstance(value, (str, bytes)) or value is None:
        return repr(value)
    return type(value).__name__  # another object: only its kind counts


def state_checksum(state) -> str:
    """sha256 of a state (a checkpoint, a state dict, a list of tensors): every tensor's dtype, shape and bytes
    (independent of its memory layout) and every plain value (numbers, strings), each with its key path."""
    import hashlib
    h = hashlib.sha256()
    for name, leaf in state_items(state):
        if isinstance(leaf, (torch.Tensor, np.ndarray)):
            t = torch.as_tensor(leaf).detach().cpu().contiguous()
            h.update(f'{name}:{t.dtype}:{tuple(t.shape)}'.encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        else:
            h.update(f'{name}={_plain(leaf)}'.encode())
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
