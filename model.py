"""Evaluation networks built from a derived genotype (NOS Sec. 4.3; docs/nos.md).

`NetworkCIFAR` and `NetworkImageNet` are DARTS's (Liu et al., ICLR 2019, `model.py`): same signatures,
stems, reduction cells at 1/3 and 2/3 depth, auxiliary tower after the second reduction cell, a
`drop_path_prob` attribute that the training script sets, and a forward that returns
(logits, logits_aux), logits_aux being None in eval mode or without the auxiliary tower.

What differs is the cell: each of its four blocks is a heterogeneous residual block (Sec. 3.2, Eq. 2-9).
A classic DARTS genotype is the special case whose second-tier op is skip_connect and whose ops are all
feature ops; it builds exactly DARTS's modules (DARTS_V2, 20 cells, 36 channels: 3,349,342 weights
without the auxiliary tower, DARTS's "param size = 3.349342MB").
"""
from __future__ import annotations

import torch
from torch import nn

import genotypes
from genotypes import op_kind
from operations import OPS, FactorizedReduce, Identity, ReLUConvBN, dynamic_conv

__all__ = ['AuxiliaryHeadCIFAR', 'AuxiliaryHeadImageNet', 'Cell', 'NetworkCIFAR', 'NetworkImageNet',
           'drop_path']


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """DARTS's drop-path (FractalNet's, Larsson et al. 2017): zero the whole tensor of a random subset of
    samples (a Bernoulli mask per sample) and scale the survivors by 1/keep so the expectation is kept."""
    if drop_prob <= 0.:
        return x
    keep = 1. - drop_prob
    mask = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(keep)
    return x * mask / keep


class Cell(nn.Module):
    """A derived cell: two preprocessed inputs, four heterogeneous residual blocks, output = their concat.

    Block k reads nodes i and j through its first-tier ops o_i, o_j and writes node k+2 through its
    second-tier op o_s (docs/nos.md):
        F = sum of the feature outputs among o_i(X_i), o_j(X_j);  A = the attention map, D = the kernel
        S_k = F + F*A + dwconv(F, D)                                            (Eq. 2-5)
        node = o_s(S_k)                   if o_s is a feature op
             = S_k + S_k * o_s(S_k)       if o_s is an attention op            (Eq. 6-9)
             = S_k + dwconv(S_k, o_s(S_k)) if o_s is a dynamic op
    In a reduction cell the first-tier edges from the two inputs have stride 2; a dynamic op on such an edge
    computes its kernel D from the full-resolution input and D convolves the reduced F (the stride lies in
    F, not in what the kernel generator sees). A second-tier skip_connect is the identity and builds no
    module, so a classic DARTS cell has exactly DARTS's modules.

    Drop-path (training) drops a term only where the block keeps another path, each term independently:
    a non-identity first-tier feature output when the other first-tier op is a feature op too; the
    calibration terms F*A and dwconv(F, D) (F stays); the calibration term of an attention or dynamic
    second tier (S_k stays); never a feature second-tier output, never an identity. A classic DARTS cell
    therefore drops each non-identity op of a node independently, exactly as DARTS does.
    """

    def __init__(self, genotype: genotypes.Genotype, C_prev_prev: int, C_prev: int, C: int,
                 reduction: bool, reduction_prev: bool):
        super().__init__()
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        name = 'reduce' if reduction else 'normal'
        blocks = genotypes.to_blocks(getattr(genotype, name), name)
        self._concat = list(getattr(genotype, name + '_concat'))
        self.multiplier = len(self._concat)
        self.reduction = reduction
        self._steps = len(blocks)
        self._blocks = blocks
        # First-tier ops in DARTS's order (2k, 2k+1), so a classic cell's `_ops` is DARTS's list.
        self._ops = nn.ModuleList()
        self._indices = []
        for (op_i, i), (op_j, j), _ in blocks:
            for op, index in ((op_i, i), (op_j, j)):
                stride = 2 if reduction and index < 2 else 1
                self._ops.append(OPS[op](C, stride, True))
                self._indices.append(index)
        self._kinds = [op_kind(op) for (op_i, _), (op_j, _), _ in blocks for op in (op_i, op_j)]
        # Drop-path drops a term only where the block keeps another path. A first-tier feature output is
        # dropped when it is not the identity and the other first-tier op is a feature op too (that path
        # stays, or is dropped independently): DARTS's rule for a classic cell. Beside an attention map or
        # a kernel it is the block's only F, and dropping it would zero the whole block.
        self._drop_first = [self._kinds[e] == 'feature' and self._kinds[e ^ 1] == 'feature'
                            and not isinstance(self._ops[e], Identity) for e in range(len(self._ops))]
        # Second-tier ops, keyed by block; skip_connect (stride 1: the identity) is left out.
        self._second = nn.ModuleDict({str(k): OPS[op_s](C, 1, True)
                                      for k, (_, _, op_s) in enumerate(blocks) if op_s != 'skip_connect'})
        self._second_keys = [None if op_s == 'skip_connect' else str(k)
                             for k, (_, _, op_s) in enumerate(blocks)]
        self._second_kinds = [op_kind(op_s) for _, _, op_s in blocks]

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.) -> torch.Tensor:
        p = drop_prob if self.training else 0.
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for k in range(self._steps):
            feature, attention, kernel = None, None, None
            for e in (2 * k, 2 * k + 1):
                op = self._ops[e]
                h = op(states[self._indices[e]])
                kind = self._kinds[e]
                if kind == 'feature':
                    if self._drop_first[e]:
                        h = drop_path(h, p)
                    feature = h if feature is None else feature + h
                elif kind == 'attention':
                    attention = h
                else:
                    kernel = h
            s = _calibrate(feature, attention, kernel, p)         # Eq. 5: the surrogate node S_k
            states.append(self._second_tier(k, s, p))
        return torch.cat([states[i] for i in self._concat], dim=1)

    def _second_tier(self, k: int, s: torch.Tensor, p: float) -> torch.Tensor:
        """Node k from its surrogate S_k through the second-tier op (Eq. 6-9). Drop-path: only the
        calibration term of an attention or dynamic op (S_k stays); a feature op's output is the block's
        only path and is never dropped, nor is the identity."""
        key, kind = self._second_keys[k], self._second_kinds[k]
        if key is None:                                   # skip_connect: the identity
            return s
        out = self._second[key](s)
        if kind == 'feature':
            return out
        if kind == 'attention':
            return _calibrate(s, out, None, p)            # Eq. 9 with A = o_s(S_k)
        return _calibrate(s, None, out, p)                # Eq. 9 with D = o_s(S_k)


def _calibrate(feature: torch.Tensor, attention: torch.Tensor | None, kernel: torch.Tensor | None,
               drop_prob: float) -> torch.Tensor:
    """Eq. 5 / Eq. 9, F (+) F (.) A (+) F (x) D, with drop-path on each calibration term (docs/nos.md).

    operations.calibrate computes the same sum without drop-path; the terms are kept apart here so that
    each can be dropped on its own, as DARTS drops each op output.
    """
    out = feature
    if attention is not None:
        out = out + drop_path(feature * attention, drop_prob)
    if kernel is not None:
        out = out + drop_path(dynamic_conv(feature, kernel), drop_prob)
    return out


class _AuxiliaryHead(nn.Module):
    """DARTS's auxiliary tower: ReLU, 5x5 average pool to 2x2, 1x1 conv to 128, 2x2 conv to 768, classifier."""

    def __init__(self, C: int, num_classes: int, pool_stride: int, bn_after_768: bool):
        super().__init__()
        layers = [
            nn.ReLU(inplace=False),  # DARTS: inplace, which rewrites the trunk's tensor; not here
            nn.AvgPool2d(5, stride=pool_stride, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False)]
        if bn_after_768:
            layers.append(nn.BatchNorm2d(768))
        self.features = nn.Sequential(*layers, nn.ReLU(inplace=True))
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class AuxiliaryHeadCIFAR(_AuxiliaryHead):
    """DARTS's auxiliary tower for 8x8 inputs (after the second reduction cell): pools 8x8 -> 2x2."""

    def __init__(self, C: int, num_classes: int):
        super().__init__(C, num_classes, pool_stride=3, bn_after_768=True)


class AuxiliaryHeadImageNet(_AuxiliaryHead):
    """DARTS's ImageNet auxiliary tower for 7x7 inputs (after the second reduction cell at 224x224).

    DARTS's released code has no BatchNorm after the 2x2 conv (a typo kept "for consistency with the
    experiments in the paper"); kept out here too.
    """

    def __init__(self, C: int, num_classes: int):
        super().__init__(C, num_classes, pool_stride=2, bn_after_768=False)


def _build_cells(net: nn.Module, genotype, C_prev_prev: int, C_prev: int, C: int, layers: int,
                 reduction_prev: bool) -> int:
    """DARTS's stack: `layers` cells, reductions (channels doubled) at layers//3 and 2*layers//3.
    Returns the channels that reach the auxiliary tower."""
    genotype = genotypes.validate(genotype)  # a malformed genotype fails here, naming the block
    net.cells = nn.ModuleList()
    C_curr = C
    C_aux = None
    for i in range(layers):
        reduction = i in genotypes.reduction_layers(layers)
        if reduction:
            C_curr *= 2
        cell = Cell(genotypes.cell_genotype(genotype, i, layers), C_prev_prev, C_prev, C_curr, reduction,
                    reduction_prev)
        reduction_prev = reduction
        net.cells.append(cell)
        C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
        if i == 2 * layers // 3:
            C_aux = C_prev
    net.C_final = C_prev
    return C_aux


def _run_cells(net: nn.Module, s0: torch.Tensor, s1: torch.Tensor):
    """The cells, the auxiliary tower after cell 2*layers//3 (training only) and the classifier, shared by
    both evaluation networks; returns (logits, logits_aux or None)."""
    logits_aux = None
    for i, cell in enumerate(net.cells):
        s0, s1 = s1, cell(s0, s1, net.drop_path_prob)
        if i == 2 * net._layers // 3 and net._auxiliary and net.training:
            logits_aux = net.auxiliary_head(s1)
    logits = net.classifier(net.global_pooling(s1).flatten(1))
    return logits, logits_aux


class NetworkCIFAR(nn.Module):
    """DARTS's CIFAR evaluation network: 3x3 stem to 3C channels, `layers` cells, global pool, linear."""

    def __init__(self, C: int, num_classes: int, layers: int, auxiliary: bool, genotype):
        super().__init__()
        self._layers = layers
        self._auxiliary = auxiliary
        self.drop_path_prob = 0.
        stem_multiplier = 3
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(
            nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
            nn.BatchNorm2d(C_curr))
        C_aux = _build_cells(self, genotype, C_curr, C_curr, C, layers, reduction_prev=False)
        if auxiliary:
            self.auxiliary_head = AuxiliaryHeadCIFAR(C_aux, num_classes)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.C_final, num_classes)

    def forward(self, input):
        s = self.stem(input)
        return _run_cells(self, s, s)


class NetworkImageNet(nn.Module):
    """DARTS's ImageNet evaluation network: two stride-2 stems to 1/8 resolution (28x28 at 224x224),
    `layers` cells (the first reads a stride-2 input, so it starts with reduction_prev), 7x7 pool, linear.

    At 224x224 (DARTS's size) the tower and the final 7x7 average pool both read 7x7 maps. The pool fixes
    the input size to about that: 208 to 256 pixels per side in steps of 16 build; smaller inputs do not.
    """

    def __init__(self, C: int, num_classes: int, layers: int, auxiliary: bool, genotype):
        super().__init__()
        self._layers = layers
        self._auxiliary = auxiliary
        self.drop_path_prob = 0.
        self.stem0 = nn.Sequential(
            nn.Conv2d(3, C // 2, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C))
        self.stem1 = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C))
        C_aux = _build_cells(self, genotype, C, C, C, layers, reduction_prev=True)
        if auxiliary:
            self.auxiliary_head = AuxiliaryHeadImageNet(C_aux, num_classes)
        self.global_pooling = nn.AvgPool2d(7)
        self.classifier = nn.Linear(self.C_final, num_classes)

    def forward(self, input):
        s0 = self.stem0(input)
        return _run_cells(self, s0, self.stem1(s0))
