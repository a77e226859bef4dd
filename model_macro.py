"""The ProxylessNAS chain space: AGNAS's macro search (Sun et al., ICML 2022, Sec. 4.2 and 5.3).

A MobileNetV2-like chain (ProxylessNAS, Cai et al., ICLR 2019, its GPU space): a 3x3 stem of stride 2 to 40
channels, a fixed MBConv (3x3, expansion 1) to 24, then 21 searchable layers in six groups of widths 32, 56,
112, 128, 256, 432 (genotypes.PROXYLESS_GROUPS), then a 1x1 conv to 1728 channels, a global average pool and
the classifier. Every conv is followed by BatchNorm, every activation is ReLU6, and a block adds its input to
its output wherever it keeps the shape (stride 1, same width), as MobileNetV2 does.

- `MBConv(C_in, C_out, kernel, expansion, stride)`: 1x1 expansion (left out at expansion 1), k x k
  depthwise conv, 1x1 linear projection, each with BN; the residual where the shape is kept.
- `ChoiceLayer`: one searchable layer, its six MBConvs (kernel 3, 5, 7 x expansion 3, 6) and, where the
  layer keeps its shape, the skip (15 of the 21 layers). Under AGNAS, its own attention module
  (operations.GateAttention, r = 16, hidden width 7C // 16 or 6C // 16) gates every channel of every
  candidate, and the layer outputs sum_k gate_k * F_k (Eq. 7-8); the mean gates are the importance (Eq. 6).
  Under `darts` (this repo's own baseline, no paper has it), the layer outputs sum_k softmax(alpha)_k * F_k.
- `MacroSupernet(num_classes=1000, method='agnas')`: the supernet (30,778,976 weights at 1000 classes,
  3,094,656 of them in the attention modules). `importance()` (AGNAS) and `arch_weights()` (DARTS) give the
  layers x candidates table (21 x 7; 0 where a layer has no skip), `genotype()` its argmax per layer
  (`derive_chain`) as a genotypes.ChainGenotype. `force(choices)` makes layers compute one candidate each,
  with the supernet's weights (the discretised supernet; see its docstring).
- `MacroNetwork(genotype, num_classes=1000)`: the derived network; a chosen skip removes its layer.
  AGNAS_PROXYLESS: 6,728,936 weights.

Layouts: 'imagenet' is the space above (224x224 images: 112 after the stem, 7 at the head). 'cifar' is this
repo's own variant for 32x32 images, so the mechanism can be run and tested on a CPU (no paper has it): the
stem and the first group have stride 1, so the maps go 32 -> 16 -> 8 -> 4; every width and candidate is the
same, so one genotype fits both. `width_mult` scales every width (ProxylessNAS's width multiplier; the head keeps
its 1728 channels below 1): `train_search.py --width_mult 0.125` is the CPU-sized chain of the tests.

Initialisation: the supernet's as the authors' (convs N(0, 2 / (k^2 C_out)), BN weight 1, bias 0, linear
layers PyTorch's default); the derived network keeps PyTorch's defaults, as the authors' retraining does.
"""
from __future__ import annotations

import contextlib
import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import genotypes
from genotypes import CHAIN_BLOCKS, PROXYLESS_GROUPS, SKIP
from operations import GateAttention, GateStatistics

SPACE = 'proxyless'                 # train_search.py --space
CANDIDATES = CHAIN_BLOCKS + [SKIP]   # the columns of the importance table
METHODS = ('darts', 'agnas')         # the search methods this space supports (darts: this repo's baseline)
LAYOUTS = ('imagenet', 'cifar')
ATTENTION_RATIO = 16                 # r of the layers' attention modules (the authors' reduction=16)
DROPOUT = 0.2                        # before the derived network's classifier (the authors' retraining)
IMAGENET_LAYOUT_MIN_SIZE = 96        # images of this size and up take the 'imagenet' layout (layout_for)
# The search recipe of this space (the authors' attention_search/train.py; AGNAS Sec. 5.3), which
# train_search.py --space proxyless takes for the flags a user leaves out, whatever the method:
SEARCH_DEFAULTS = {
    'epochs': 120,                # their code; the paper (Sec. 5.3) says 50
    'batch_size': 512,            # global: 64 per GPU on 8 GPUs
    'learning_rate': 0.25,        # for the global batch of 512
    'learning_rate_min': 5e-4,
    'lr_schedule': 'linear',      # from 0.25 down to 5e-4 (per step there, per epoch here)
    'weight_decay': 4e-5,
    'weight_decay_on': 'conv_fc',  # convolutions and the classifier; not BN, not the attention FCs
    'label_smoothing': 0.1,
    'grad_clip_by': 'value',      # clip_grad_value_(5): every gradient entry into [-5, 5]
    'lambda_at': 0.,              # no teacher: the chain has no stage outputs for AGS
    'width_mult': 1.,             # the space's widths (smaller: this repo's CPU-sized variant, for tests)
}
SUBSET = 0.1                      # --dataset imagenet: 10% of the training images train the weights (Sec. 5.3)


def layout_for(image_size: int) -> str:
    """The layout for square images of `image_size` pixels: 'imagenet' from IMAGENET_LAYOUT_MIN_SIZE (stride
    32 leaves at least 3x3 maps), else 'cifar' (stride 8)."""
    return 'imagenet' if image_size >= IMAGENET_LAYOUT_MIN_SIZE else 'cifar'


def scaled(channels: int, width_mult: float) -> int:
    """A width scaled by `width_mult` (the authors' int(c * width_mult)), at least 1."""
    return max(1, int(channels * width_mult))


def check_width(width_mult: float) -> None:
    """ValueError unless `width_mult` keeps every layer's skip candidate where the full-width space has it:
    no two neighbouring widths may round to the same number."""
    widths = [scaled(genotypes.PROXYLESS_FIRST, width_mult)] + [scaled(c, width_mult) for c, _, _ in PROXYLESS_GROUPS]
    for (a, b), (c, _, _) in zip(itertools.pairwise(widths), PROXYLESS_GROUPS):
        if a == b:
            raise ValueError(f'width_mult {width_mult:g} gives the {c}-channel group the width of the group before '
                             f'it ({a}), which would add a skip candidate the space does not have; use a larger '
                             f'width_mult')


def search_layout(dataset: str, image_size: int) -> str:
    """The layout a search on `dataset` takes: 'imagenet' for ImageNet, layout_for(image_size) for your own
    images (--dataset folder), 'cifar' for the 32x32 sets."""
    if dataset == 'imagenet':
        return 'imagenet'
    return layout_for(image_size) if dataset == 'folder' else 'cifar'


def build_supernet(method: str, num_classes: int, dataset: str, image_size: int = 32,
                   width_mult: float = 1.) -> MacroSupernet:
    """The supernet of a `train_search.py --space proxyless` run (its loss: train_search.py sets it)."""
    return MacroSupernet(num_classes, method, search_layout(dataset, image_size), width_mult=width_mult)


def search_space_size() -> dict:
    """Distinct architectures: 6 blocks in each of the 6 layers without a skip, 7 candidates in the 15 with
    one (6^6 * 7^15 ~ 2.2e17); chains that differ only in where skips sit count apart, as the authors' ids do."""
    n = 1
    for i in range(genotypes.CHAIN_LAYERS):
        n *= len(CANDIDATES) if genotypes.skip_allowed(i) else len(CHAIN_BLOCKS)
    return {'paper': n, 'exact': n}


def layer_specs(layout: str = 'imagenet', width_mult: float = 1.) -> list[tuple[int, int, int]]:
    """(C_in, C_out, stride) of the 21 searchable layers; the 'cifar' layout runs the first group at stride 1."""
    if layout not in LAYOUTS:
        raise ValueError(f'unknown layout {layout!r}; valid layouts: {", ".join(LAYOUTS)}')
    check_width(width_mult)
    return [(scaled(c_in, width_mult), scaled(c_out, width_mult), 1 if layout == 'cifar' and group == 0 else stride)
            for c_in, c_out, stride, group in genotypes.chain_layers()]


def stem_and_head(layout: str, width_mult: float) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(stem, first block, head): the fixed parts around the searchable layers. The head keeps its 1728
    channels below width 1 (the authors' rule)."""
    stem = conv_bn_relu6(3, scaled(genotypes.PROXYLESS_STEM, width_mult), 3, 2 if layout == 'imagenet' else 1)
    first = MBConv(scaled(genotypes.PROXYLESS_STEM, width_mult), scaled(genotypes.PROXYLESS_FIRST, width_mult), 3, 1, 1)
    head = conv_bn_relu6(scaled(PROXYLESS_GROUPS[-1][0], width_mult), head_width(width_mult), 1, 1)
    return stem, first, head


def head_width(width_mult: float) -> int:
    return scaled(genotypes.PROXYLESS_HEAD, width_mult) if width_mult > 1 else genotypes.PROXYLESS_HEAD


def conv_bn_relu6(C_in: int, C_out: int, kernel: int, stride: int) -> nn.Sequential:
    """The stem (3x3) and the head (1x1): conv, BN, ReLU6."""
    return nn.Sequential(nn.Conv2d(C_in, C_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(C_out),
                         nn.ReLU6(inplace=True))


class MBConv(nn.Module):
    """MobileNetV2's inverted residual block, as ProxylessNAS's space uses it: 1x1 expansion to
    C_in * expansion channels (none at expansion 1), BN, ReLU6; k x k depthwise conv with the stride, BN,
    ReLU6; 1x1 linear projection to C_out, BN. The input is added to the output where the shape is kept."""

    def __init__(self, C_in: int, C_out: int, kernel: int, expansion: int, stride: int):
        super().__init__()
        hidden = C_in * expansion
        layers = []
        if expansion != 1:
            layers += [nn.Conv2d(C_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
                   nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                   nn.Conv2d(hidden, C_out, 1, bias=False), nn.BatchNorm2d(C_out)]
        self.conv = nn.Sequential(*layers)
        self.kernel, self.expansion, self.stride = kernel, expansion, stride
        self.residual = stride == 1 and C_in == C_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


def block(name: str, C_in: int, C_out: int, stride: int) -> MBConv:
    """The MBConv of a candidate name ('k5e6': 5x5, expansion 6)."""
    kernel, expansion = genotypes.block_shape(name)
    return MBConv(C_in, C_out, kernel, expansion, stride)


class ChoiceLayer(GateStatistics, nn.Module):
    """One searchable layer: the six MBConv candidates and, where the layer keeps its shape, the skip.

    gated (AGNAS, Sec. 4.2): the attention module sees the pooled output of every candidate (the skip's is the
    input itself), gates = GateAttention(m, C_out, r=16) (Eq. 4-5), output = sum_k gate_k * F_k (Eq. 7-8); the
    gates are collected while `collecting` (GateStatistics, Eq. 6). Not gated (DARTS): forward takes the
    layer's weights (m,) and returns sum_k w_k * F_k. `forced` (a candidate index, or None): the layer
    computes that candidate alone (MacroSupernet.force).
    """

    def __init__(self, C_in: int, C_out: int, stride: int, gated: bool):
        super().__init__()
        self.blocks = nn.ModuleList(block(name, C_in, C_out, stride) for name in CHAIN_BLOCKS)
        self.has_skip = stride == 1 and C_in == C_out
        self.candidates = CHAIN_BLOCKS + ([SKIP] if self.has_skip else [])
        self.C = C_out
        self.attention = GateAttention(len(self.candidates), C_out, ATTENTION_RATIO) if gated else None
        self.forced = None
        self.kept = None  # MacroSupernet.restrict_layers: (candidate indices, weights or None)
        self.reset_importance()

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        if self.forced is not None:
            return x if self.candidates[self.forced] == SKIP else self.blocks[self.forced](x)
        if self.kept is not None:
            return self._kept_forward(x, weights)
        outs = [b(x) for b in self.blocks] + ([x] if self.has_skip else [])
        if self.attention is None:
            return sum(w * o for w, o in zip(weights, outs))
        gates = self.attention(torch.stack([o.mean((2, 3)) for o in outs], 1))   # (N, m, C), Eq. 4-5
        self.collect(gates)                                                       # Eq. 6
        return sum(gates[:, k, :, None, None] * o for k, o in enumerate(outs))   # Eq. 7-8


    def _kept_forward(self, x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Only the kept candidates run; the others output zero (so the attention module sees a zero pooled
        descriptor for them, as the gated edge of a cell does for a pruned op). DARTS: sum over the kept of
        w_k F_k, w the layer's weights or the restriction's."""
        kept, fixed = self.kept
        outs = {k: x if self.candidates[k] == SKIP else self.blocks[k](x) for k in kept}
        if self.attention is None:
            w = weights if fixed is None else fixed
            return sum(w[k] * o for k, o in outs.items())
        ref = next(iter(outs.values()))
        pooled = [outs[k].mean((2, 3)) if k in outs else ref.new_zeros(ref.shape[:2])
                  for k in range(len(self.candidates))]
        gates = self.attention(torch.stack(pooled, 1))                          # (N, m, C), Eq. 4-5
        self.collect(gates)
        return sum(gates[:, k, :, None, None] * o for k, o in outs.items())     # Eq. 7-8 over the kept


def _init_supernet(module: nn.Module) -> None:
    """The authors' initialisation of the supernet: convs N(0, 2 / (k^2 C_out)), BN weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) and m.weight.is_meta:  # no values to set (counting)
            continue
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0., math.sqrt(2. / n))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MacroSupernet(nn.Module):
    """The ProxylessNAS-space supernet (see the module docstring), with the attribute names and methods the
    search loop uses for every supernet: `ops` (the table's columns), `arch_parameters()`, `weights()`,
    `new()`, `_criterion`, `fast` (False: there is one path), `importance()` / `arch_weights()`,
    `genotype()`.

    method: 'agnas' (gated layers, no architecture parameters) or 'darts' (`alphas`, layers x candidates,
    softmax per layer over its own candidates). The bool buffer `available` marks each layer's candidates
    (the skip column is False where a layer changes shape).
    """
    fast = False

    def __init__(self, num_classes: int = 1000, method: str = 'agnas', layout: str = 'imagenet',
                 criterion: nn.Module | None = None, width_mult: float = 1.):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f'unknown method {method!r} for the ProxylessNAS space; valid: {", ".join(METHODS)}')
        self.method, self.layout, self.width_mult, self._num_classes = method, layout, width_mult, num_classes
        self._criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.ops = list(CANDIDATES)
        specs = layer_specs(layout, width_mult)
        self.stem, self.first, self.head = stem_and_head(layout, width_mult)
        self.layers = nn.ModuleList(ChoiceLayer(c_in, c_out, s, method == 'agnas') for c_in, c_out, s in specs)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head_width(width_mult), num_classes)
        available = torch.tensor([[c in layer.candidates for c in CANDIDATES] for layer in self.layers])
        self.register_buffer('available', available)
        if method == 'darts':
            self.alphas = nn.Parameter(1e-3 * torch.randn(len(specs), len(CANDIDATES)))
        _init_supernet(self)

    # -- parameters ---------------------------------------------------------------------------------------
    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alphas] if self.method == 'darts' else []

    def weights(self) -> list[nn.Parameter]:
        """Every parameter but the architecture's (what the weight optimizer updates)."""
        return [p for n, p in self.named_parameters() if n != 'alphas']

    def new(self) -> MacroSupernet:
        """A fresh supernet of the same structure on the same device, holding a copy of the alphas (DARTS's
        second-order step)."""
        model_new = type(self)(self._num_classes, self.method, self.layout, self._criterion, self.width_mult)
        model_new.to(next(self.parameters()).device)
        with torch.no_grad():
            for x, y in zip(model_new.arch_parameters(), self.arch_parameters()):
                x.copy_(y)
        return model_new

    # -- forward ------------------------------------------------------------------------------------------
    def layer_weights(self) -> list[torch.Tensor | None]:
        """DARTS: each layer's softmax over its own candidates (Eq. 11 of NOS / DARTS Eq. 2); AGNAS: None."""
        if self.method != 'darts':
            return [None] * len(self.layers)
        w = F.softmax(self.alphas.masked_fill(~self.available, -math.inf), dim=-1)
        return [w[i, :len(layer.candidates)] for i, layer in enumerate(self.layers)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(self.stem(x))
        for layer, w in zip(self.layers, self.layer_weights()):
            x = layer(x, w)
        x = self.global_pooling(self.head(x))
        return self.classifier(x.flatten(1))

    def _loss(self, x, target):
        return self._criterion(self(x), target)

    def search_space_size(self) -> dict:
        return search_space_size()

    def force(self, choices=None) -> list:
        """Make layers compute one candidate each, with the supernet's weights: the discretised supernet.

        choices: None (every layer mixes its candidates again), a genotypes.ChainGenotype (every layer its
        chosen block; a skip passes the input through), or a list with one entry per layer, each a candidate
        name, its column in `ops`, or None (that layer keeps mixing). Returns the previous setting, a list
        of names and Nones, which `force` takes back. A forced layer collects no gates.
        """
        previous = [None if layer.forced is None else layer.candidates[layer.forced] for layer in self.layers]
        if choices is None:
            choices = [None] * len(self.layers)
        if isinstance(choices, genotypes.ChainGenotype):
            choices = genotypes.validate_chain(choices).layers
        if len(choices) != len(self.layers):
            raise ValueError(f'force takes one choice per layer ({len(self.layers)}), got {len(choices)}')
        for i, (layer, c) in enumerate(zip(self.layers, choices)):
            name = CANDIDATES[c] if isinstance(c, (int, np.integer)) else c
            if name is not None and name not in layer.candidates:
                raise ValueError(f'{genotypes.chain_layer_name(i)} has no candidate {c!r}; it has '
                                 f'{", ".join(layer.candidates)}')
            layer.forced = None if name is None else layer.candidates.index(name)
        return previous

    @contextlib.contextmanager
    def forced(self, choices):
        """`with model.forced(genotype): ...` runs the discretised supernet and restores the previous setting."""
        previous = self.force(choices)
        try:
            yield self
        finally:
            self.force(previous)

    @contextlib.contextmanager
    def restrict_layers(self, layers: dict):
        """Within the block, each layer i of `layers` runs only its kept candidates: layers {i: (kept
        candidate indices, weights)}, weights a list over the layer's candidates that replaces its softmax
        (DARTS; None: its own, the others weighing 0), ignored by a gated layer (AGNAS), whose kept
        candidates keep their gates. The cells' `model_search.Network.restrict_edges` for the chain
        (diagnose.py: keep one candidate with weight 1, or remove one)."""
        for i, (kept, weights) in layers.items():
            layer = self.layers[i]
            if not kept or any(not 0 <= k < len(layer.candidates) for k in kept):
                raise ValueError(f'{genotypes.chain_layer_name(i)} keeps {list(kept)}; it has candidates 0 to '
                                 f'{len(layer.candidates) - 1}')
        previous = [layer.kept for layer in self.layers]
        for i, (kept, weights) in layers.items():
            fixed = None if weights is None else [float(w) for w in weights]
            self.layers[i].kept = (sorted(kept), fixed)
        try:
            yield self
        finally:
            for layer, kept in zip(self.layers, previous):
                layer.kept = kept

    # -- importance and derivation ------------------------------------------------------------------------
    def reset_importance(self) -> None:
        for layer in self.layers:
            layer.reset_importance()

    def importance(self) -> np.ndarray:
        """AGNAS: (layers, candidates) float64, each layer's mean gate per candidate over the images collected
        since `reset_importance` (Eq. 6 divided by images x C, in (0, 1)); 0 where a layer has no skip."""
        table = np.zeros((len(self.layers), len(CANDIDATES)))
        for i, layer in enumerate(self.layers):
            table[i, :len(layer.candidates)] = layer.mean_gates()
        return table

    def arch_weights(self) -> np.ndarray:
        """DARTS: (layers, candidates) float64, each layer's softmax over its candidates; 0 where it has no skip."""
        w = F.softmax(self.alphas.detach().double().masked_fill(~self.available, -math.inf), dim=-1)
        return w.cpu().numpy()

    def genotype(self, importance=None) -> genotypes.ChainGenotype:
        """The argmax per layer of `importance` (default: the method's own table)."""
        if importance is None:
            importance = self.importance() if self.method == 'agnas' else self.arch_weights()
        return derive_chain(importance)


def derive_chain(table) -> genotypes.ChainGenotype:
    """The derived chain (the authors' export_op.py): per layer, the candidate with the largest importance
    among the layer's own (a skip only where the layer keeps its shape; ties: the lower column). table:
    (21, 7) in the columns of CANDIDATES."""
    t = np.asarray(table, dtype=np.float64)
    if t.shape != (genotypes.CHAIN_LAYERS, len(CANDIDATES)):
        raise ValueError(f'expected a ({genotypes.CHAIN_LAYERS}, {len(CANDIDATES)}) table, got {t.shape}')
    names = []
    for i, row in enumerate(t):
        m = len(CANDIDATES) if genotypes.skip_allowed(i) else len(CHAIN_BLOCKS)
        names.append(CANDIDATES[int(np.argmax(row[:m]))])
    return genotypes.ChainGenotype(layers=names)


class MacroNetwork(nn.Module):
    """The derived network of a chain genotype: stem, first block, one MBConv per kept layer (a skip removes
    its layer), head, global pool, dropout (0.2, the authors' retraining) and the classifier. A `forward`
    returns the logits. `drop_path_prob` is accepted and unused (the retraining scripts set it)."""

    def __init__(self, genotype: genotypes.ChainGenotype, num_classes: int = 1000, layout: str = 'imagenet',
                 dropout: float = DROPOUT, width_mult: float = 1.):
        super().__init__()
        genotype = genotypes.validate_chain(genotype)
        self.genotype = genotype
        self.stem, self.first, self.head = stem_and_head(layout, width_mult)
        # a skip is allowed only where a layer keeps its shape, so dropping it leaves every other layer as is
        specs = layer_specs(layout, width_mult)
        self.layers = nn.Sequential(*(block(name, c_in, c_out, s)
                                      for name, (c_in, c_out, s) in zip(genotype.layers, specs) if name != SKIP))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(head_width(width_mult), num_classes)
        self.drop_path_prob = 0.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.layers(self.first(self.stem(x))))
        return self.classifier(self.dropout(self.global_pooling(x).flatten(1)))
