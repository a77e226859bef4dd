"""The teacher of attention-guided search and the self-calibration study (NOS, Sec. 3.3, Sec. 4.1, App. A1).

- PyramidNet-110 (bottleneck, alpha = 84; Han et al., "Deep Pyramidal Residual Networks", CVPR 2017) is
  the teacher whose three stage outputs guide the search (docs/nos.md). `python teacher.py --gpu 0` trains it
  on CIFAR-10 into the folder teachers/pyramidnet110_cifar10 (checkpoint.pt, log.txt, train_log.jsonl);
  its checkpoint is `default_teacher_path('cifar10')`, where train_search.py looks by default.
- ResNet-18 (CIFAR variant) with one self-calibration op after each of stages 1, 2, 3 reproduces the
  controlled study of Table 1: `python teacher.py --arch resnet18 --calibration dynamic_conv_3x3 --gpu 0`.

API used by train_search.py: default_teacher_path, save_teacher, load_teacher, fold_batchnorm (the frozen
teacher's inference copy), and the module's `forward_stages(x) -> (logits, [t1, t2, t3])`.

Recipe (App. A1, read with Han et al.): 300 epochs, batch 32, SGD lr 0.025 momentum 0.9, weight decay
1e-4, flip + crop, lr / 10 at epochs 150 and 225. A1's literal "decayed by 10 every 30 epochs" is
`--lr_milestones 30 60 90 120 150 180 210 240 270`.
"""
from __future__ import annotations

import copy
import functools
import math
import os
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import datasets
import runs
import utils
from operations import OPS, DynamicKernel, calibrate, dynamic_conv

TEACHER_DIR = 'teachers'
DEFAULT_LEARNING_RATE = 0.025  # App. A1
# The flags that may change when a run resumes (docs/resume-and-errors.md); every other flag defines the run and must
# match the checkpoint's. --learning_rate takes effect from the resumed epoch (the step schedule goes on as if
# the run had started with it); --epochs may grow or shrink, as the schedule's milestones do not depend on it;
# the others change only how the run is executed or logged.
RESUME_MAY_CHANGE = ('learning_rate', 'epochs', 'workers', 'report_freq', 'gpu', 'device', 'amp', 'data', 'save',
                     'resume', 'no_download')
# What every checkpoint of this script holds (runs.load_resume refuses one without them as damaged).
CHECKPOINT_KEYS = ('arch', 'config', 'dataset', 'state_dict', 'epoch', 'optimizer', 'scheduler')
PYRAMID = 'pyramidnet'
RESNET18 = 'resnet18'
ARCHS = {'pyramidnet110': PYRAMID, 'resnet18': RESNET18}
CALIBRATIONS = ('none', 'spatial_attention', 'channel_attention', 'dynamic_conv_3x3', 'dynamic_conv_5x5',
                'dil_dynamic_conv_3x3', 'dil_dynamic_conv_5x5')


# ---------------------------------------------------------------------------------------------------------
# PyramidNet (Han et al., 2017), as their reference implementations (Torch addpyramidnet.lua, PyTorch
# PyramidNet.py) build it for CIFAR.


class PyramidBlock(nn.Module):
    """Pyramidal residual unit: BN-conv-BN-ReLU-conv-BN (basic) or BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-
    conv1x1-BN (bottleneck, expansion 4); no ReLU after the addition (Han et al., Fig. 6(d)).

    The shortcut is the identity, average-pooled 2x2 when the unit has stride 2 and zero-padded along the
    channels to the unit's wider output (their "zero-padded identity shortcut", Sec. 3.2).
    """

    def __init__(self, c_in: int, planes: int, stride: int, bottleneck: bool):
        super().__init__()
        self.expansion = 4 if bottleneck else 1
        c_out = planes * self.expansion
        if bottleneck:
            layers = [nn.BatchNorm2d(c_in), nn.Conv2d(c_in, planes, 1, bias=False),
                      nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
                      nn.Conv2d(planes, planes, 3, stride, 1, bias=False),
                      nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
                      nn.Conv2d(planes, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        else:
            layers = [nn.BatchNorm2d(c_in), nn.Conv2d(c_in, planes, 3, stride, 1, bias=False),
                      nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
                      nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.residual = nn.Sequential(*layers)
        self.stride = stride
        self.pad = c_out - c_in
        assert self.pad >= 0, 'a pyramidal unit never narrows'

    def forward(self, x):
        out = self.residual(x)
        shortcut = F.avg_pool2d(x, 2, 2) if self.stride != 1 else x
        if self.pad and not torch.is_grad_enabled():
            # Without autograd (the frozen teacher of a search, evaluation): add the shortcut into the first
            # channels in place, the same sums as padding it with zeros and adding, in one kernel instead of two
            out.narrow(1, 0, shortcut.shape[1]).add_(shortcut)  # (`out[:, :c] += ...` would copy back too)
            return out
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad))
        return out + shortcut


def pyramid_widths(depth: int, alpha: float, bottleneck: bool) -> list[list[int]]:
    """The `planes` of every unit, stage by stage: the running width 16 + k * alpha / (3n) (additive
    pyramid, Han et al. Eq. 2), rounded half up as both reference implementations do (Lua
    math.floor(x + 0.5); PyTorch round(), which agrees except at exact halves)."""
    per = 9 if bottleneck else 6
    if depth < per + 2 or (depth - 2) % per:
        kind = 'bottleneck' if bottleneck else 'basic'
        raise utils.UserError(f'--depth {depth} does not fit a {kind} PyramidNet: it needs depth = {per}n + 2 '
                              f'(n >= 1 units per stage), e.g. {per * 12 + 2} or {per + 2}')
    n = (depth - 2) // per
    add = alpha / (3 * n)
    width, stages = 16.0, []
    for _ in range(3):
        stage = []
        for _ in range(n):
            width += add
            stage.append(math.floor(width + 0.5))
        stages.append(stage)
    return stages


class PyramidNet(nn.Module):
    """PyramidNet for 32x32 inputs: conv3x3(16)-BN stem, three stages of pyramidal units (the first unit of
    stages 2 and 3 has stride 2), final BN-ReLU-global avg pool-fc.

    PyramidNet-110, bottleneck, alpha 84 has 2,528,712 weights for 10 classes (NOS Table 2: 2.5M); its
    widths run 18, 21, 23, ... 100 (x4 = 400 output channels, Han et al.'s "output feat. dimension").

    `forward_stages` also returns the three stage outputs (32, 16, 8 px) that attention transfer pairs
    with the search network's (docs/nos.md): the output of each stage's last unit, before the final BN-ReLU,
    as in Zagoruyko & Komodakis's reference code, which takes the raw group outputs g0, g1, g2 of its
    pre-activation networks. All three are then the same kind of tensor (a residual sum), like the
    student's cell outputs, which see no ReLU either.
    """

    arch = PYRAMID

    def __init__(self, depth: int = 110, alpha: float = 84, num_classes: int = 10, bottleneck: bool = True):
        super().__init__()
        self.config = {'depth': depth, 'alpha': alpha, 'bottleneck': bottleneck, 'num_classes': num_classes}
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        c_in, stages = 16, []
        for s, widths in enumerate(pyramid_widths(depth, alpha, bottleneck)):
            units = []
            for u, planes in enumerate(widths):
                unit = PyramidBlock(c_in, planes, 2 if s > 0 and u == 0 else 1, bottleneck)
                units.append(unit)
                c_in = planes * unit.expansion
            stages.append(nn.Sequential(*units))
        self.stages = nn.ModuleList(stages)
        self.bn_final = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He init, fan-out, as the reference code
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2. / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_stages(self, x):
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        x = F.relu(self.bn_final(x))
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return logits, outs

    def forward(self, x):
        return self.forward_stages(x)[0]


# ---------------------------------------------------------------------------------------------------------
# ResNet-18 for CIFAR with self-calibration after stages 1-3 (Sec. 4.1, Table 1)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Calibration(nn.Module):
    """One self-calibration op in the heterogeneous residual form (Eq. 5 with F = x): x + x * A(x) for
    attention, x + dwconv(x, D(x)) for a dynamic kernel, with dilation 2 for the dilated variants of
    Table 1 (which Sec. 4.1 then excludes from the search space)."""

    def __init__(self, name: str, C: int):
        super().__init__()
        self.name = name
        if name in ('spatial_attention', 'channel_attention'):
            self.kind, self.dilation = 'attention', 1
            self.op = OPS[name](C, 1, True)
        elif name.removeprefix('dil_') in ('dynamic_conv_3x3', 'dynamic_conv_5x5'):
            self.kind, self.dilation = 'dynamic', 2 if name.startswith('dil_') else 1
            self.op = DynamicKernel(C, int(name[-1]))
        else:
            raise utils.UserError(f'unknown --calibration {name!r}; choose one of {", ".join(CALIBRATIONS)}')

    def forward(self, x):
        if self.kind == 'attention':
            return calibrate(x, self.op(x))               # Eq. 5: F + F (.) A
        return x + dynamic_conv(x, self.op(x), self.dilation)  # Eq. 5: F + F (x) D

    def extra_repr(self):
        return self.name


class ResNet18(nn.Module):
    """ResNet-18, CIFAR variant: 3x3 stem, no max-pool, stages 64-128-256-512 of two BasicBlocks each;
    `calibration` inserts one op after each of stages 1, 2, 3 (Sec. 4.1)."""

    arch = RESNET18

    def __init__(self, num_classes: int = 10, calibration: str = 'none'):
        super().__init__()
        self.config = {'num_classes': num_classes, 'calibration': calibration}
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        widths, c_in, stages, calib = (64, 128, 256, 512), 64, [], []
        for s, c in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(c_in, c, 1 if s == 0 else 2), BasicBlock(c, c)))
            c_in = c
            if s < 3:
                calib.append(nn.Identity() if calibration == 'none' else Calibration(calibration, c))
        self.stages = nn.ModuleList(stages)
        self.calibration = nn.ModuleList(calib)
        self.fc = nn.Linear(512, num_classes)

    def forward_stages(self, x):
        x = self.stem(x)
        outs = []
        for s, stage in enumerate(self.stages):
            x = stage(x)
            if s < 3:
                x = self.calibration[s](x)
                outs.append(x)
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return logits, outs

    def forward(self, x):
        return self.forward_stages(x)[0]


def build(arch: str, config: dict) -> nn.Module:
    """The network of a checkpoint's arch name and config."""
    if arch == PYRAMID:
        return PyramidNet(**config)
    if arch == RESNET18:
        return ResNet18(**config)
    raise utils.UserError(f'unknown architecture {arch!r}; this project builds {PYRAMID} and {RESNET18}')


def describe(arch: str, config: dict) -> str:
    if arch == PYRAMID:
        kind = 'bottleneck' if config.get('bottleneck') else 'basic'
        alpha = config.get('alpha')
        alpha = f'{alpha:g}' if isinstance(alpha, (int, float)) else alpha
        return f'PyramidNet-{config.get("depth")} ({kind}, alpha={alpha})'
    if arch == RESNET18:
        return f'ResNet-18 (calibration {config.get("calibration")})'
    return repr(arch)


# ---------------------------------------------------------------------------------------------------------
# Teacher API (train_search.py)


def default_teacher_folder(dataset: str, depth: int = 110, alpha: float = 84, bottleneck: bool = True) -> str:
    """teacher.py's default --save folder: teachers/pyramidnet110_cifar10 for the paper's teacher; other
    shapes get their own folder."""
    if (depth, alpha, bottleneck) == (110, 84, True):
        name = 'pyramidnet110'
    else:
        name = f'pyramidnet{depth}_alpha{alpha:g}' + ('' if bottleneck else '_basic')
    return os.path.join(TEACHER_DIR, f'{name}_{dataset}')


def default_teacher_path(dataset: str, depth: int = 110, alpha: float = 84, bottleneck: bool = True) -> str:
    """Where teacher.py writes, and train_search.py looks for, the teacher of `dataset`: the checkpoint in
    its default --save folder, teachers/pyramidnet110_cifar10/checkpoint.pt for the paper's teacher."""
    return os.path.join(default_teacher_folder(dataset, depth, alpha, bottleneck), runs.CHECKPOINT)


def save_teacher(model: nn.Module, path: str, dataset: str, **extra) -> None:
    """Write a checkpoint that load_teacher rebuilds: arch, config, dataset, state_dict, plus `extra`
    (optimizer state, epoch, accuracy, ...). Atomic: a run killed mid-write keeps the previous file."""
    state = {'arch': model.arch, 'config': dict(model.config), 'dataset': dataset,
             'state_dict': model.state_dict(), 'script': 'teacher.py'}
    state.update(extra)
    runs.save_checkpoint(state, path)


def load_teacher(path: str, dataset: str, device='cpu', classes: list[str] | None = None,
                 image_size: int = 32, how: str | None = None) -> nn.Module:
    """The PyramidNet teacher in `path` (a checkpoint, or the teacher.py --save folder holding it), frozen
    (eval mode, no gradients), on `device`.

    Raises utils.UserError with one sentence for a missing or damaged file, a teacher of another dataset,
    of other classes than `classes` (--dataset folder) or another image size, and a checkpoint of another
    architecture (or weights that do not fit its config); `how` is the command that trains the teacher wanted
    (runs.command, with the caller's machine and data flags).
    """
    how = how or runs.command('teacher.py', None, dataset=dataset,
                              device='cpu' if torch.device(device).type == 'cpu' else None)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, runs.CHECKPOINT)):
        path = os.path.join(path, runs.CHECKPOINT)
    if not os.path.isfile(path):
        raise utils.UserError(f'no teacher checkpoint at {path}: train one with `{how}`, or pass --lambda_at 0 to '
                              f'search without a teacher')
    state = runs.load_checkpoint(path)
    if not isinstance(state, dict) or not {'arch', 'config', 'dataset', 'state_dict'} <= set(state):
        found = runs.checkpoint_script(state)
        what = f'a checkpoint of {found}' if found else 'not a teacher checkpoint of this project'
        raise utils.UserError(f'{path} is {what} (it lacks the arch, config, dataset and weights that teacher.py '
                              f'writes); train a teacher with `{how}`')
    if state['dataset'] != dataset:
        raise utils.UserError(f'the teacher {path} was trained on {state["dataset"]}, but this run uses '
                              f'{dataset}; train a {dataset} teacher with `{how}` and pass its path')
    check_teacher_data(state, path, classes, image_size, how)
    arch, config = state['arch'], state['config']
    if arch != PYRAMID:
        raise utils.UserError(f'{path} holds a {describe(arch, config)}, not the PyramidNet teacher that '
                              f'attention-guided search expects; train one with `{how}`')
    try:
        model = build(arch, config)
        model.load_state_dict(state['state_dict'])
    except (TypeError, RuntimeError, utils.UserError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise utils.UserError(f'the weights in {path} do not fit the {describe(arch, config)} that its config '
                              f'names ({first}); the file is damaged or was written by other code') from None
    done, total = state.get('epoch'), state.get('epochs')
    if not state.get('finished', True) and done is not None and total:
        warnings.warn(f'the teacher {path} has trained {done + 1} of {total} epochs only', stacklevel=2)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An inference copy of a frozen teacher with each BatchNorm folded into the convolution next to it.

    In eval mode a BatchNorm is the affine map y = x * s + t per channel, s = gamma / sqrt(var + eps) and
    t = beta - mean * s (its running statistics). Right after a convolution it folds into that convolution:
    conv_W(x) * s + t = conv_{W * s}(x) + t (s scales the output channels; t becomes the bias). Right before
    a convolution without padding (PyramidNet's bottleneck 1x1s) it folds too: conv_W(x * s + t) =
    conv_{W * s}(x) + sum W t (s scales the input channels). Before a zero-padded convolution it does not:
    the padded border would see t where it saw zeros. So in a bottleneck PyramidNet the four BatchNorms of
    every unit fold, as does the stem's; only the final one stays (PyramidNet-110: 145 of its 146 BatchNorm kernels
    per forward go). The outputs are the same in exact arithmetic; floating point rounds them differently
    (about 1e-6 relative in float32). The fold is computed in float64 and stored in the model's dtype.

    Only adjacent (Conv2d, BatchNorm2d) or (BatchNorm2d, Conv2d) pairs inside an nn.Sequential fold; each
    folded BatchNorm becomes nn.Identity. The copy is for inference only: it is in eval mode, without
    gradients, and training it would train another network (no batch statistics). train_search.py folds the
    teacher it loads for attention-guided search; teacher.py never folds the network it trains.
    """
    model = copy.deepcopy(model).eval().requires_grad_(False)
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        layers = list(seq)
        for i, bn in enumerate(layers):
            if not (isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats and bn.running_mean is not None):
                continue
            before, after = layers[i - 1] if i else None, layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(before, nn.Conv2d):
                _fold_into(before, bn, output=True)
            elif isinstance(after, nn.Conv2d) and after.groups == 1 and (
                    after.padding == 'valid' or not any(after.padding)):
                _fold_into(after, bn, output=False)
            else:
                continue
            seq[i] = layers[i] = nn.Identity()
    return model


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d, output: bool) -> None:
    """Fold bn's affine map x * s + t into conv: after it (`output`) or before it (fold_batchnorm)."""
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else w.new_zeros(conv.out_channels)
    s = (bn.weight.detach().double() if bn.affine else 1.) / torch.sqrt(bn.running_var.double() + bn.eps)
    t = (bn.bias.detach().double() if bn.affine else 0.) - bn.running_mean.double() * s
    if output:    # BN(conv_W(x) + b) = conv_{W s}(x) + b s + t
        w, b = w * s[:, None, None, None], b * s + t
    else:         # conv_W(x s + t) + b = conv_{W s}(x) + sum_{i,k} W t_i + b   (no padding)
        w, b = w * s[None, :, None, None], b + (w * t[None, :, None, None]).sum((1, 2, 3))
    dtype = conv.weight.dtype
    conv.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    conv.bias = nn.Parameter(b.to(dtype), requires_grad=False)


def check_teacher_data(state: dict, path: str, classes: list[str] | None, image_size: int,
                       how: str = 'python teacher.py --dataset folder --data PATH') -> None:
    """A teacher trained with --dataset folder is tied to its classes and image size (teacher.py records
    both); a CIFAR teacher saw 32x32 images."""
    if classes is not None and state.get('classes') != classes:
        saved = state.get('classes') or []
        raise utils.UserError(f'the teacher {path} was trained on other classes than this run\'s data '
                              f'({datasets.class_difference(saved, classes, "the teacher", "the data")}); train a '
                              f'teacher on this data with `{how}` and pass it with --teacher')
    if state.get('image_size', 32) != image_size:
        raise utils.UserError(f'the teacher {path} was trained on {state.get("image_size", 32)}-pixel images, but '
                              f'this run uses --image_size {image_size}; train the teacher with the same '
                              f'--image_size')


# ---------------------------------------------------------------------------------------------------------
# Training (App. A1)


def parse_args(argv=None):
    p = utils.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--arch', default='pyramidnet110', choices=sorted(ARCHS),
                   help='the AGS teacher, or the Table 1 study network')
    p.add_argument('--depth', type=int, default=110, help='PyramidNet depth (9n+2 bottleneck, 6n+2 basic)')
    p.add_argument('--alpha', type=float, default=84, help='PyramidNet widening: total width added')
    p.add_argument('--block', default='bottleneck', choices=['bottleneck', 'basic'], help='PyramidNet unit')
    p.add_argument('--calibration', default='none', choices=CALIBRATIONS,
                   help='ResNet-18: op inserted after stages 1, 2, 3 (Table 1)')
    p.add_argument('--dataset', default='cifar10', choices=datasets.DATASETS, help='the search dataset')
    p.add_argument('--data', default='data',
                   help='folder holding the CIFAR data; for --dataset folder, PATH with train/ and test/ or val/')
    p.add_argument('--no_download', action='store_true',
                   help='never download CIFAR (by default a missing CIFAR-10/100 is downloaded into --data)')
    p.add_argument('--image_size', type=int, default=32, help='--dataset folder: images are resized to N x N')
    p.add_argument('--synthetic_size', type=int, default=512, help='training images of --dataset synthetic')
    p.add_argument('--epochs', type=int, default=300, help='App. A1')
    p.add_argument('--batch_size', type=int, default=32, help='App. A1')
    p.add_argument('--learning_rate', type=float, default=DEFAULT_LEARNING_RATE, help='SGD, App. A1')
    p.add_argument('--lr_milestones', type=int, nargs='+', default=[150, 225],
                   help='epochs after which the lr is divided by 10 (A1 literally: 30 60 ... 270)')
    p.add_argument('--lr_gamma', type=float, default=0.1, help='lr factor at each milestone')
    p.add_argument('--momentum', type=float, default=0.9, help='App. A1')
    p.add_argument('--weight_decay', type=float, default=1e-4, help='App. A1')
    p.add_argument('--amp', action='store_true', help='bfloat16 autocast on CUDA')
    p.add_argument('--save', default=None,
                   help='output folder: checkpoint.pt, log.txt, train_log.jsonl (default: '
                        'teachers/pyramidnet110_DATASET, where train_search.py looks, for pyramidnet; '
                        'runs/resnet18_CALIBRATION_DATASET for resnet18; the folder of --resume PATH)')
    p.add_argument('--resume', nargs='?', const='', default=None,
                   help='continue from a checkpoint (default: SAVE/checkpoint.pt)')
    p.add_argument('--seed', type=int, default=0, help='seeds weights, batches and augmentation')
    p.add_argument('--workers', type=int, default=4, help='data-loading processes')
    p.add_argument('--gpu', type=int, default=0, help='CUDA device')
    p.add_argument('--device', default=None, choices=['cpu', 'cuda'], help='cpu to run on the CPU')
    p.add_argument('--report_freq', type=int, default=100,
                   help='steps between progress lines (also every 30 s; 0: none)')
    return p.parse_args(argv)


def run_paths(args) -> tuple[str, str | None]:
    """(SAVE folder, checkpoint to resume from or None) of a run: --save is a folder, as in every script."""
    if args.save is not None and args.save.endswith('.pt'):
        raise utils.UserError(f'--save {args.save} names a file, but --save is a folder (teacher.py writes '
                              f'checkpoint.pt, log.txt and train_log.jsonl into it); drop the .pt')
    if args.arch == 'resnet18':
        default = os.path.join('runs', f'resnet18_{args.calibration}_{args.dataset}')
    else:
        default = default_teacher_folder(datasets.dataset_name(args.dataset, args.data), args.depth, args.alpha,
                                         args.block == 'bottleneck')
    return runs.run_folder(args.save, args.resume, 'teacher', default=default)


def make_model(args) -> nn.Module:
    num_classes = datasets.num_classes(args.dataset, args.data)
    if ARCHS[args.arch] == PYRAMID:
        return PyramidNet(args.depth, args.alpha, num_classes, args.block == 'bottleneck')
    return ResNet18(num_classes, args.calibration)


def cost(model: nn.Module) -> tuple[int, int]:
    return utils.count_params(model), utils.count_macs(model, (1, 3, 32, 32))


def cost_line(model: nn.Module, baseline: tuple[int, int] | None) -> str:
    params, macs = cost(model)
    line = f'{params / 1e6:.4f}M params, {macs / 1e6:.2f}M multiply-adds at 32x32'
    if baseline is not None:
        line += (f' (ResNet-18 baseline {baseline[0] / 1e6:.4f}M / {baseline[1] / 1e6:.2f}M; calibration adds '
                 f'{(params - baseline[0]) / 1e6:+.4f}M params, {(macs - baseline[1]) / 1e6:+.2f}M multiply-adds)')
    return line


@runs.holds_folder_lock
def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    if args.arch == 'pyramidnet110' and args.calibration != 'none':
        raise utils.UserError('--calibration applies to --arch resnet18 only (the Table 1 study); drop it or '
                              'add --arch resnet18')
    # Han et al.'s deepest PyramidNet has 272 layers and their widest alpha 270; beyond 1000 is a typo
    utils.check_flags(args, {'depth': utils.Range(high=1000), 'alpha': utils.Range(0, 1000),
                             'lr_milestones': utils.Range(1), 'lr_gamma': utils.Range(0, low_open=True)})
    datasets.check_image_size(args.dataset, args.image_size)
    if ARCHS[args.arch] == PYRAMID:
        pyramid_widths(args.depth, args.alpha, args.block == 'bottleneck')  # a bad --depth fails here
    log_dir, resume_path = run_paths(args)
    args.save = log_dir  # the folder in use, as the checkpoint records it
    ckpt_path = os.path.join(log_dir, runs.CHECKPOINT)
    state, changed = None, {}
    if resume_path is not None:
        state = runs.load_resume(resume_path, 'teacher.py', CHECKPOINT_KEYS)
    device = utils.get_device(args.gpu, args.device)
    data_stats = datasets.data_stats(args.dataset, args.data, args.image_size, log_dir, state, resume_path)
    train_data = datasets.get_dataset(args.dataset, args.data, train=True, synthetic_size=args.synthetic_size,
                                   seed=args.seed, image_size=args.image_size, stats=data_stats,
                                   download=not args.no_download)
    test_data = datasets.get_dataset(args.dataset, args.data, train=False, synthetic_size=args.synthetic_size,
                                  seed=args.seed, image_size=args.image_size, stats=data_stats,
                                  download=not args.no_download)
    if args.batch_size > len(train_data):
        raise utils.UserError(f'--batch_size {args.batch_size} is more than the {len(train_data)} training '
                              f'images; use a smaller --batch_size')
    utils.set_seed(args.seed)
    model = make_model(args)  # before the log folder exists: a bad --depth leaves nothing behind
    arch = model.arch
    if state is not None:  # before the log folder too: a refused resume leaves nothing behind
        with runs.restoring(resume_path):
            for what, key, current in (('dataset', 'dataset', args.dataset), ('architecture', 'arch', arch),
                                       ('network config', 'config', model.config)):
                runs.check_same(what, state.get(key), current, resume_path)
            changed = runs.resume_flags(state, args, RESUME_MAY_CHANGE, resume_path)
        runs.carry_over(resume_path, log_dir, ('train_log.jsonl', 'log.txt'))  # resumed into another --save
    logger = runs.get_logger(log_dir, 'teacher')
    logger.info(f'args: {vars(args)}')
    if data_stats is not None:
        logger.info(datasets.folder_summary(data_stats, test_data))
    baseline = None
    if arch == RESNET18:
        baseline = cost(ResNet18(datasets.num_classes(args.dataset, args.data)))
    logger.info(f'{describe(arch, model.config)}: {cost_line(model, baseline)}')
    model.to(device)
    channels_last = device.type == 'cuda'
    if channels_last:
        model.to(memory_format=torch.channels_last)

    optimizer = torch.optim.SGD(model.parameters(), args.learning_rate, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.lr_milestones, args.lr_gamma)
    start, best = 0, 0.0
    if state is not None:
        with runs.restoring(resume_path):
            model.load_state_dict(state['state_dict'])
            runs.load_optimizer(optimizer, state['optimizer'])
            scheduler.load_state_dict(state['scheduler'])
            start, best = int(state['epoch']) + 1, float(state.get('best_top1', 0.0))
        if 'learning_rate' in changed:  # the step schedule goes on as if the run had started with it
            runs.set_learning_rate(optimizer, scheduler, args.learning_rate)
        runs.trim_jsonl(os.path.join(log_dir, 'train_log.jsonl'), start)
        logger.info(f'resumed from {resume_path} after epoch {start}')
        if runs.describe_changes(changed, start, args.epochs):
            logger.info(runs.describe_changes(changed, start, args.epochs))

    test_loader = datasets.make_loader(test_data, max(args.batch_size, 256), False, args.workers,
                                    pin=device.type == 'cuda')
    retry = f'--learning_rate {utils.retry_learning_rate(args.learning_rate, DEFAULT_LEARNING_RATE):g}'
    criterion = nn.CrossEntropyLoss()
    amp_dtype = torch.bfloat16 if args.amp and device.type == 'cuda' else None
    test_loss = top1 = top5 = float('nan')
    for epoch in range(start, args.epochs):
        g = utils.seed_epoch(args.seed, epoch)
        train_loader = datasets.make_loader(train_data, args.batch_size, True, args.workers, generator=g,
                                         pin=device.type == 'cuda')
        lr = optimizer.param_groups[0]['lr']
        tic = time.time()
        progress = utils.Progress(len(train_loader), args.report_freq, logger, f'epoch {epoch + 1} ')
        train_loss, train_top1 = utils.train_epoch(
            model, train_loader, optimizer, criterion, device, grad_clip=None, amp_dtype=amp_dtype,
            channels_last=channels_last, progress=progress,
            check=functools.partial(utils.check_loss, limit=utils.loss_limit(datasets.num_classes(args.dataset, args.data)),
                                    epoch=epoch, kept=epoch, checkpoint=ckpt_path, retry=retry))
        scheduler.step()
        datasets.log_unreadable(train_data, logger)
        seconds = time.time() - tic
        test_loss, top1, top5 = utils.evaluate(model, test_loader, criterion, device, amp_dtype=amp_dtype,
                                               channels_last=channels_last)
        # no checkpoint of a diverged state: the weights about to be saved must be finite and their loss sane
        utils.check_state({'model': model.state_dict(), 'optimizer': optimizer.state_dict()},
                          {'test_loss': test_loss}, utils.loss_limit(datasets.num_classes(args.dataset, args.data)),
                          epoch=epoch, kept=epoch, checkpoint=ckpt_path, retry=retry)
        best = max(best, top1)
        logger.info(f'epoch {epoch + 1}/{args.epochs} lr {lr:.2e} train loss {train_loss:.4f} top1 '
                    f'{train_top1:.2f} | test loss {test_loss:.4f} top1 {top1:.2f} top5 {top5:.2f} | '
                    f'{seconds:.0f}s ({seconds / len(train_loader):.3f}s/step)')
        runs.append_jsonl(os.path.join(log_dir, 'train_log.jsonl'), {
            'epoch': epoch + 1, 'lr': lr, 'train_loss': train_loss, 'train_top1': train_top1,
            'test_loss': test_loss, 'test_top1': top1, 'test_top5': top5, 'seconds': seconds})
        save_teacher(model, ckpt_path, args.dataset, epoch=epoch, epochs=args.epochs,
                     finished=epoch + 1 == args.epochs, optimizer=optimizer.state_dict(),
                     scheduler=scheduler.state_dict(), best_top1=best, test_top1=top1, test_top5=top5,
                     args=vars(args), image_size=args.image_size, data_stats=data_stats,
                     classes=data_stats['classes'] if data_stats else None)
    if start >= args.epochs:
        logger.info(f'{ckpt_path} has already trained {start} epochs (--epochs {args.epochs}); nothing to do')
        test_loss, top1, top5 = utils.evaluate(model, test_loader, criterion, device, amp_dtype=amp_dtype,
                                               channels_last=channels_last)
    logger.info(f'final: {describe(arch, model.config)} on {args.dataset}: test top1 {top1:.2f} '
                f'(error {100 - top1:.2f}%) top5 {top5:.2f} (error {100 - top5:.2f}%), best top1 {best:.2f}; '
                f'{cost_line(model, baseline)}; checkpoint {ckpt_path}')
    params, macs = cost(model)
    runs.write_json(os.path.join(log_dir, 'result.json'), {  # what summarize.py lists
        'kind': 'teacher', 'script': 'teacher', 'dataset': args.dataset, 'arch': describe(arch, model.config),
        'epochs': args.epochs, 'test_error': 100. - top1, 'test_acc': top1, 'test_top5': top5,
        'test_loss': test_loss, 'best_top1': best, 'params': params, 'params_M': params / 1e6, 'macs': macs,
        'macs_M': macs / 1e6, 'learning_rate': args.learning_rate, 'batch_size': args.batch_size, 'seed': args.seed,
        'seconds': sum(r.get('seconds', 0.) for r in runs.read_jsonl(os.path.join(log_dir, 'train_log.jsonl'))),
        **runs.run_info(device, amp_dtype)})
    if arch == PYRAMID:
        after = f'{runs.command("train_search.py", args, teacher=log_dir)}    # search with it'
    else:
        after = (f'{runs.command("teacher.py", args, arch="resnet18", calibration="OTHER")}    # another row of '
                 f'Table 1')
    runs.report_run(logger, log_dir, [
        (runs.CHECKPOINT, 'the network (train_search.py --teacher reads it; --resume continues it)'),
        ('log.txt', 'the log'), ('train_log.jsonl', 'one record per epoch: losses, accuracies, lr'),
        ('result.json', 'test error, weights, multiply-adds (summarize.py lists it)'),
    ], [after], started)


if __name__ == '__main__':
    utils.run_main(main)
