"""NAS-Bench-201's evaluation network (Dong & Yang, ICLR 2020, Sec. 2.1): the network every one of its 15,625
architectures was trained as, built from an architecture string (genotypes.NB201Genotype).

Skeleton (C = 16, N = 5 in the benchmark): stem Conv3x3 (3 -> C) + BN; N cells at C; a residual block (stride
2, C -> 2C); N cells at 2C; a residual block (2C -> 4C); N cells at 4C; BN, ReLU, global average pool, linear.
The same as the search network's (model_search.Network, space 'nb201'), except that every BN is affine and
each edge is its one op: node i sums op(node j) over its edges (a `none` edge adds nothing), the cell outputs
node 3. No auxiliary tower, no drop-path: the benchmark trains without them. forward returns (logits, None),
as model.NetworkCIFAR does, so train_cifar.py and utils.train_epoch treat both alike.
"""
from __future__ import annotations

import torch
from torch import nn

import genotypes
from operations import OPS, ResNetBasicBlock


class NB201InferCell(nn.Module):
    """One cell of the evaluation network: an op per edge (genotype.edges()), affine BN."""

    def __init__(self, genotype: genotypes.NB201Genotype, C: int):
        super().__init__()
        self.edges = [(j, i) for _, j, i in genotype.edges()]
        self._ops = nn.ModuleList(OPS[op](C, 1, True) for op, _, _ in genotype.edges())
        self.live = [op != 'none' for op, _, _ in genotype.edges()]

    def forward(self, x):
        nodes = [x]
        for i in range(1, genotypes.NB201_NODES):
            terms = [op(nodes[j]) for op, (j, t), live in zip(self._ops, self.edges, self.live) if t == i and live]
            nodes.append(sum(terms) if terms else x.mul(0.))  # every edge into the node is `none`
        return nodes[-1]


class NB201Network(nn.Module):
    """NAS-Bench-201's network for `genotype`: C initial channels, `layers` = 3 N cells (15 in the benchmark)."""

    def __init__(self, C: int, num_classes: int, layers: int, genotype: genotypes.NB201Genotype):
        super().__init__()
        if layers < 3 or layers % 3:
            raise ValueError(f'the NAS-Bench-201 network has 3 stages of N cells, so layers must be a multiple of '
                             f'3 (15 for its N = 5), got {layers}')
        genotype = genotypes.validate(genotype)
        n = layers // 3
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        self.cells = nn.ModuleList(NB201InferCell(genotype, C * 2 ** (i // n)) for i in range(layers))
        self.reduction_layers = [n, 2 * n]  # a residual block runs before each of these cells
        self.resblocks = nn.ModuleList(ResNetBasicBlock(C * 2 ** s, C * 2 ** (s + 1), 2) for s in range(2))
        self.lastact = nn.Sequential(nn.BatchNorm2d(4 * C), nn.ReLU(inplace=False))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * C, num_classes)
        self.drop_path_prob = 0.  # train_cifar.py sets it on every network; the benchmark has no drop-path

    def forward(self, x: torch.Tensor):
        s = self.stem(x)
        for i, cell in enumerate(self.cells):
            if i in self.reduction_layers:
                s = self.resblocks[self.reduction_layers.index(i)](s)
            s = cell(s)
        out = self.global_pooling(self.lastact(s))
        return self.classifier(out.flatten(1)), None
