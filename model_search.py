"""The search (proxy) network: DARTS's continuous relaxation over the heterogeneous operator cell (NOS).

`Network(..., space='nos')` stacks heterogeneous operator cells (Sec. 3.2; docs/nos.md): each inner node k has
a first tier (one mixed edge from every earlier node, Eq. 2-5) that forms a surrogate node S_k, and a
second tier (one mixed edge from S_k, Eq. 6-9). Every mixed edge relaxes its op choice with a softmax over
the architecture row a_edge (Eq. 11); the two matrices A (normal, reduce) have 18 rows (14 first-tier edges
in DARTS order, then the 4 second-tier edges) and one column per op.

`Network(..., space='darts')` is DARTS's own search network (none + seven feature ops, 14 edges), for the
paper's space-generality experiment and side-by-side comparison.

`genotype()` derives the discrete cell (Sec. 3.3, "Search Outcome"; docs/nos.md) through the pure functions
`derive_cell` (NOS) and `derive_darts_cell` (DARTS), which tests call on hand-made matrices.

The architecture matrices are nn.Parameters named `alphas_normal` / `alphas_reduce`, so state_dict() and
.to() carry them; `weights()` returns every other parameter and `arch_parameters()` the two matrices.
`utils.count_params` leaves out `arch_parameters()`, so it reports the weight count as DARTS does.

`Network(..., method='agnas', mixed_op=agnas.AttentionMixedOp)` is AGNAS's supernet (docs/agnas.md
§7): the same cells, each edge gated by its own attention module instead of a softmax over A, so it has no
architecture parameters. The gated edge lives in agnas.py (this file never imports a method file): the cells
take a mixed-op factory, and `agnas.build_network` passes the gated one. The Network collects each edge's
mean gates (`reset_importance`, `importance`) and derives one cell per supernet cell (`cell_genotypes`) and a
staged genotype from them (`genotype(stage_cell)`, `staged_genotype`).
Pruning and sampling (EoiNAS, docs/eoinas.md) mask rather than delete: the bool buffers
`alive_normal` / `alive_reduce` (all True unless a method prunes) keep every shape fixed, so checkpoints
and --resume work unchanged, and each MixedOp computes its alive ops only. `Network.tau` switches the edge
weights from the softmax (None, DARTS) to one Gumbel-softmax sample per forward and cell type
(`sample_weights`).

`model_search_fast.Network(..., fast=True)` computes the same search in fewer, larger kernels (its own
file); the cells here stay the readable reference, and test_fast_search.py proves the two equal.
"""
from __future__ import annotations

import contextlib
import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import genotypes
from genotypes import (
    DARTS_PRIMITIVES,
    NB201_PRIMITIVES,
    OP_SUBSETS,
    PRIMITIVES,
    Genotype,
    op_kind,
)
from operations import (
    OPS,
    FactorizedReduce,
    ReLUConvBN,
    ResNetBasicBlock,
    calibrate,
    without_running_stats,
)

SPACES = ('nos', 'darts', 'nb201')
ARCH_NAMES = ('alphas_normal', 'alphas_reduce')
NETWORK_METHODS = ('darts', 'agnas')  # 'agnas': gated edges, no A (docs/agnas.md)
STAGE_CELLS = ('first', 'last', 'mean')  # which normal cell of a stage a staged genotype takes (docs/agnas.md)


def resolve_ops(space: str = 'nos', ops=None) -> list[str]:
    """The op names (= columns of A) for a space: `ops` may be None, a key of OP_SUBSETS or a list.

    'all' means the space's full set. A NOS op list must be a subset of PRIMITIVES in their order (the column index is the primitive's
    rank, which the derivation's tie-break relies on) with at least one feature op; DARTS's space has
    its fixed op set.
    """
    if space not in SPACES:
        raise ValueError(f'unknown search space {space!r}; valid spaces: {", ".join(SPACES)}')
    if space in ('darts', 'nb201'):
        fixed = DARTS_PRIMITIVES if space == 'darts' else NB201_PRIMITIVES
        if ops is not None and ops != 'all' and list(ops) != fixed:
            raise ValueError(f'the {space} space has its fixed op set ({", ".join(fixed)}); op subsets apply to '
                             f'the NOS space only')
        return list(fixed)
    if ops is None:
        return list(PRIMITIVES)
    if isinstance(ops, str):
        if ops not in OP_SUBSETS:
            raise ValueError(f'unknown op subset {ops!r}; valid subsets: {", ".join(OP_SUBSETS)}')
        return list(OP_SUBSETS[ops])
    ops = list(ops)
    if any(o not in PRIMITIVES for o in ops) or ops != sorted(set(ops), key=PRIMITIVES.index):
        raise ValueError(f'ops must be distinct names from genotypes.PRIMITIVES in their order, got {ops}')
    if not any(op_kind(o) == 'feature' for o in ops):
        raise ValueError('ops must include at least one feature op (every first tier needs one)')
    return ops


# -- activation checkpointing of the cells (--checkpoint_cells) ---------------------------------------------
def checkpoint_cell(cell: nn.Module, *inputs):
    """cell(*inputs) with its activations recomputed in the backward instead of saved (torch.utils.checkpoint,
    non-reentrant, so that torch.autograd.grad works too): only its inputs are kept. The recomputation
    draws the same random numbers (the RNG state is restored: EoiNAS's skip dropout drops the same
    channels). Its BatchNorms update their running statistics again, as they must for the recomputation to
    save the same tensors as the forward; the cell's buffers are put back afterwards, so that the statistics
    move once per forward, as without checkpointing."""
    calls = []

    def run(*args):
        if not calls:  # the forward
            calls.append(1)
            return cell(*args)
        kept = [b.clone() for b in cell.buffers()]  # the recomputation in the backward
        try:
            return cell(*args)
        finally:  # also when the recomputation stops early (it ends once it has what the backward needs)
            with torch.no_grad():
                for b, k in zip(cell.buffers(), kept):
                    b.copy_(k)

    return torch.utils.checkpoint.checkpoint(run, *inputs, use_reentrant=False, preserve_rng_state=True)


def _run_cell(model, cell, *inputs):
    if model.checkpoint_cells and model.training and torch.is_grad_enabled():
        return checkpoint_cell(cell, *inputs)
    return cell(*inputs)


def masked_softmax(alpha: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """softmax over each row's alive ops (Eq. 2 of EoiNAS); pruned entries are exactly 0."""
    return F.softmax(alpha.masked_fill(~alive, float('-inf')), dim=-1)


def sample_weights(alpha: torch.Tensor, alive: torch.Tensor, tau: float, hard: bool = False, tiers=None):
    """One Gumbel-softmax sample per row over the alive ops (EoiNAS Eq. 5, and GDAS: docs/eoinas.md, docs/gdas.md).

    Soft (EoiNAS's code): h = softmax((alpha + g) / tau), g ~ Gumbel(0, 1) i.i.d., pruned entries 0. Hard
    (GDAS): the one-hot of index = argmax(alpha + g) = argmax h, with h's gradient (straight-through:
    one_hot - h.detach() + h, so the forward value is exactly the one-hot). Returns (weights, index); index
    is distributed as Categorical(softmax(alpha)) over the alive ops whatever tau. Noise is drawn for every
    entry, pruned or not (as F.gumbel_softmax draws it), so the random stream does not depend on what is alive.

    tiers (hard samples on the NOS space; this repo's own rule): (first-tier rows of each node, is_feature per
    op). A hard sample runs one op per edge, and a node whose first tier sampled no feature op would have no
    F to calibrate (NOS Eq. 5); such a node takes `feature_constrained`'s repair.
    """
    logits = alpha.masked_fill(~alive, float('-inf'))
    gumbels = -torch.empty_like(logits).exponential_().log()   # Gumbel(0, 1)
    scores = logits + gumbels                                  # alpha + g
    soft = F.softmax(scores / tau, dim=-1)                     # h, Eq. 5
    index = scores.detach().argmax(dim=-1)
    if not hard:
        return soft, index
    if tiers is not None:
        index = feature_constrained(scores.detach(), index, *tiers)
    one_hot = torch.zeros_like(soft).scatter_(-1, index.unsqueeze(-1), 1.)
    return one_hot - soft.detach() + soft, index               # straight-through (GDAS)


def feature_constrained(scores: torch.Tensor, index: torch.Tensor, node_rows, is_feature) -> torch.Tensor:
    """A hard sample on the NOS space with a feature op in every node's first tier (this repo's own rule).

    scores (rows, ops): alpha + g of the sample (-inf where dead); index (rows,): its argmax per row;
    node_rows: the first-tier rows of each node; is_feature: per op. A node whose rows all sampled an
    attention or dynamic op switches one row to a feature op: the (row, feature op) that lowers the node's
    sum of sampled scores least, i.e. the argmax of sum over its rows of (alpha + g) under the constraint
    (perturb-and-MAP, as derive_cell maximises the sum of weights under the same constraint). Ties: the lower
    row, then the lower op index. Computed on the scores' device without reading a value back (a node that
    needs no repair keeps its draw through torch.where). Needs an alive feature op in every node's first tier,
    which EoiNAS's prune rule keeps and GDAS never prunes. Returns the repaired index (a new tensor).
    """
    device = scores.device
    feature = torch.tensor([bool(f) for f in is_feature], device=device)
    columns = torch.tensor([o for o, f in enumerate(is_feature) if f], device=device)
    out = index.clone()
    for rows in node_rows:
        r = torch.tensor(rows, device=device)
        drawn = out[r]
        sub = scores[r]
        cost = sub[:, columns] - sub.gather(1, drawn[:, None])     # <= 0: what switching to a feature op costs
        best = cost.flatten().argmax().view(1)                      # the first maximum: lower row, lower op
        repaired = drawn.index_put((best // len(columns),), columns.gather(0, best % len(columns)))
        out[r] = torch.where(feature[drawn].any(), drawn, repaired)
    return out


class MixedOp(nn.Module):
    """One relaxed edge (Eq. 11): every op applied to X, weighted by w = softmax(a_edge), grouped by kind.

    Returns (features, attention, kernels): sum of w_o * o(X) over feature ops; sum of w_o * o(X) over
    attention ops (None without any; spatial (N,1,H,W) and channel (N,C,1,1) maps broadcast to
    (N,C,H,W)); the list of w_o * o(X) for dynamic ops. Pools are followed by BatchNorm(affine=False),
    as in DARTS's MixedOp. DARTS's `none` counts as a feature op (it adds w * 0, exactly as in DARTS).

    NAS-Bench-201's cells pass pool_bn=False (its avg_pool_3x3 is the pool alone) and their
    --track_running_stats setting (False: every BN of the edge normalises by the batch's statistics).

    Only the ops in `active` (op indices; all by default) are computed: the Network sets it to the edge's
    alive ops, or to the one sampled op in hard mode. Features are None when no active op is a feature
    op (possible on a pruned NOS edge). `skip_dropout` > 0 applies dropout after a stride-1 skip_connect
    (EoiNAS's code; docs/eoinas.md).
    """

    def __init__(self, C: int, stride: int, ops: list[str], pool_bn: bool = True, track_running_stats: bool = True):
        super().__init__()
        self._ops = nn.ModuleList()
        for name in ops:
            op = OPS[name](C, stride, False)
            if 'pool' in name and pool_bn:  # DARTS's MixedOp; NAS-Bench-201's pool has no BN (pool_bn=False)
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            self._ops.append(op if track_running_stats else without_running_stats(op))
        kinds = [op_kind(name) for name in ops]
        self.feature_idx = [i for i, k in enumerate(kinds) if k in ('feature', 'none')]
        self.attention_idx = [i for i, k in enumerate(kinds) if k == 'attention']
        self.dynamic_idx = [i for i, k in enumerate(kinds) if k == 'dynamic']
        self.active = list(range(len(ops)))
        self.skip_idx = ops.index('skip_connect') if 'skip_connect' in ops and stride == 1 else None
        self.skip_dropout = 0.

    def _run(self, i: int, x: torch.Tensor) -> torch.Tensor:
        out = self._ops[i](x)
        if i == self.skip_idx and self.skip_dropout > 0:
            out = F.dropout(out, self.skip_dropout, self.training)
        return out

    def forward(self, x: torch.Tensor, weights: torch.Tensor):
        active = self.active
        features = [weights[i] * self._run(i, x) for i in self.feature_idx if i in active]
        attention = [weights[i] * self._run(i, x) for i in self.attention_idx if i in active]
        kernels = [weights[i] * self._run(i, x) for i in self.dynamic_idx if i in active]
        return sum(features) if features else None, sum(attention) if attention else None, kernels


def _add(a, b):
    return b if a is None else a + b


class _CellBase(nn.Module):
    """DARTS's cell frame: preprocessing of the two inputs (affine=False) and the first-tier edges.

    `mixed_op(C, stride, ops)` builds each edge: MixedOp, or a method's own edge (agnas.AttentionMixedOp).
    """

    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev, ops,
                 mixed_op=MixedOp):
        super().__init__()
        self.reduction = reduction
        self.shape = (C_prev_prev, C_prev, C, reduction, reduction_prev)  # what the fast path's cell copies
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self._steps = steps
        self._multiplier = multiplier
        self._ops = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self._ops.append(mixed_op(C, stride, ops))


class DartsCell(_CellBase):
    """DARTS's search cell: node = sum of the mixed edges from all earlier nodes."""

    def forward(self, s0, s1, weights):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for k in range(self._steps):
            # an edge that computes no op (Network.restrict_edges) gives None and adds nothing
            outs = [self._ops[offset + j](h, weights[offset + j])[0] for j, h in enumerate(states)]
            outs = [o for o in outs if o is not None]
            if not outs:
                raise RuntimeError(f'node {k + 2}: every incoming edge computes no op')
            offset += len(states)
            states.append(sum(outs))
        return torch.cat(states[-self._multiplier:], dim=1)


class NOSCell(_CellBase):
    """Heterogeneous operator cell of the search network (Sec. 3.2; docs/nos.md).

    Rows of `weights`: the first-tier edges in DARTS order (node 0: inputs 0, 1; node 1: 0, 1, 2; ...),
    then one second-tier edge per node (from its surrogate node, stride 1).
    In a reduction cell the first-tier edges from the two inputs have stride 2: their feature ops and
    spatial attention output the reduced resolution, while a dynamic op computes its kernel from the
    edge's full-resolution input (App. A.1's `DynamicF` has no stride) and that kernel convolves the
    reduced F in `calibrate` (Eq. 5).
    """

    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev, ops,
                 mixed_op=MixedOp):
        super().__init__(steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev, ops, mixed_op)
        self._second = nn.ModuleList(mixed_op(C, 1, ops) for _ in range(steps))
        self._num_first = len(self._ops)

    def forward(self, s0, s1, weights):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for k in range(self._steps):
            feats, att, kernels = None, None, []
            for j, h in enumerate(states):
                f, a, d = self._ops[offset + j](h, weights[offset + j])
                if f is not None:
                    feats = _add(feats, f)             # Eq. 2
                if a is not None:
                    att = _add(att, a)                 # Eq. 3
                kernels += d                           # Eq. 4
            offset += len(states)
            if feats is None:
                raise RuntimeError(f'node {k + 2}: no first-tier edge has an alive feature op (a pruning '
                                   f'rule was broken)')
            surrogate = calibrate(feats, att, kernels)  # Eq. 5: S_k = F + F*A + sum_D dwconv(F, D)
            f, a, d = self._second[k](surrogate, weights[self._num_first + k])  # Eq. 6-8
            # A pruned second tier may hold no feature op: F is then S_k itself, the residual that the
            # evaluation network's block applies an attention or dynamic second-tier op to (docs/nos.md).
            states.append(calibrate(surrogate if f is None else f, a, d))  # Eq. 9
        return torch.cat(states[-self._multiplier:], dim=1)


class AGNASCell(DartsCell):
    """AGNAS's search cell (docs/agnas.md): DARTS's cell whose edges gate themselves (built with
    agnas.AttentionMixedOp), so its forward ignores `weights` (the Network passes None)."""

    def forward(self, s0, s1, weights=None):
        return super().forward(s0, s1, [None] * len(self._ops))


class AGNASNOSCell(NOSCell):
    """The heterogeneous cell with gated edges (docs/agnas.md, this repo's own, experimental): NOS's forward
    unchanged, every first- and second-tier edge's softmax weights replaced by its own gates."""

    def forward(self, s0, s1, weights=None):
        return super().forward(s0, s1, [None] * (len(self._ops) + len(self._second)))


class NB201Cell(nn.Module):
    """NAS-Bench-201's search cell (Dong & Yang, ICLR 2020, Sec. 2.1): node 0 is the cell's input; node i (1..3)
    sums one mixed edge from every earlier node j; the output is node 3 (no concatenation). Rows of `weights`
    (6 x 5): the edges 1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2 (genotypes.NB201_EDGES). The edges' BN is
    non-affine; `track_running_stats` is the benchmark's search flag. A cell whose edges weigh themselves
    (AGNAS) ignores `weights` (the Network passes None)."""
    reduction = False  # every NB201 cell is a normal cell: the residual blocks between stages reduce

    def __init__(self, C: int, ops: list[str], mixed_op=MixedOp, track_running_stats: bool = True):
        super().__init__()
        self._ops = nn.ModuleList(mixed_op(C, 1, ops, pool_bn=False, track_running_stats=track_running_stats)
                                  for _ in genotypes.NB201_EDGES)

    def forward(self, x, weights=None):
        nodes, e = [x], 0
        for i in range(1, genotypes.NB201_NODES):
            node = 0
            for j in range(i):
                out = self._ops[e](nodes[j], None if weights is None else weights[e])[0]
                node = node if out is None else node + out  # None: an edge that computes no op
                e += 1
            nodes.append(node if torch.is_tensor(node) else torch.zeros_like(x))
        return nodes[-1]


class Network(nn.Module):
    """The search network (DARTS's signature first).

    C: initial channels; layers: cells, reductions at layers//3 and 2*layers//3 (needs layers >= 3);
    space: 'nos' (heterogeneous cell over `ops`), 'darts' (DARTS's search network) or 'nb201' (NAS-Bench-201's
    skeleton, see `_build_nb201`: `layers` = 3 N cells, one matrix A shared by all of them);
    ops: None (all of the space's primitives), a key of genotypes.OP_SUBSETS, or a list of primitives;
    method: 'darts' (softmax over A) or 'agnas' (gated edges built by `mixed_op`, no A; see agnas.py).

    The buffers `alive_normal` / `alive_reduce` ((rows x ops) bool, set by a pruning method) say which ops
    each edge still computes. `model_search_fast.Network(..., fast=True)` is the same network computed in
    fewer, larger kernels; this class is the reference it is proven equal to.
    """
    fast = False  # model_search_fast.Network sets it; the loop logs which path ran

    def __init__(self, C: int, num_classes: int, layers: int, criterion=None, steps: int = 4,
                 multiplier: int = 4, stem_multiplier: int = 3, space: str = 'nos', ops=None,
                 method: str = 'darts', mixed_op=None, track_running_stats: bool = True):
        super().__init__()
        if space == 'nb201' and (layers < 3 or layers % 3):
            raise ValueError(f'the NAS-Bench-201 network has 3 stages of N cells, so layers must be a multiple of '
                             f'3 (15 for its N = 5), got {layers}')
        if layers < 3:
            raise ValueError(f'the search network needs at least 3 cells (two of them reduction cells), '
                             f'got {layers}')
        self._C = C
        self._num_classes = num_classes
        self._layers = layers
        self._criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self._steps = steps
        self._multiplier = multiplier
        self._stem_multiplier = stem_multiplier
        self.space = space
        self.ops = resolve_ops(space, ops)
        if method not in NETWORK_METHODS:
            raise ValueError(f'unknown method {method!r}; valid methods: {", ".join(NETWORK_METHODS)}')
        if method == 'agnas' and mixed_op is None:
            raise ValueError("method='agnas' needs its gated edge: build it with agnas.build_network, or pass "
                             "mixed_op=agnas.AttentionMixedOp")
        self.method = method
        self._mixed_op = mixed_op
        self._track_running_stats = track_running_stats
        # one architecture matrix per cell type; NAS-Bench-201 has normal cells only
        self.cell_types = ('normal',) if space == 'nb201' else ('normal', 'reduce')
        if space == 'nb201':
            self._build_nb201(C, num_classes, layers, mixed_op or MixedOp, track_running_stats)
        else:
            self._build_darts(C, num_classes, layers, steps, multiplier, stem_multiplier, mixed_op or MixedOp)

        k = (len(genotypes.NB201_EDGES) if space == 'nb201'
             else sum(2 + i for i in range(steps)) + (steps if space == 'nos' else 0))
        for t in self.cell_types:
            if method != 'agnas':  # AGNAS has no architecture parameters: the gates decide (docs/agnas.md)
                setattr(self, f'alphas_{t}', nn.Parameter(1e-3 * torch.randn(k, len(self.ops))))
        for t in self.cell_types:
            # alive ops per row (pruning masks, never deletes: shapes stay fixed for checkpoints and --resume)
            self.register_buffer(f'alive_{t}', torch.ones(k, len(self.ops), dtype=torch.bool))
        self.tau = None            # None: softmax relaxation (DARTS); a float: Gumbel-softmax temperature
        self.gumbel_hard = False   # with tau: GDAS's one-op forward, straight-through gradient
        self.last_sample = None    # with tau: (cell types, rows) sampled op per row of the last forward
        self._skip_dropout = 0.    # set_skip_dropout
        self._restricted = {}      # restrict_edges: {cell: {row: (kept op indices, weight row or None)}}
        self.checkpoint_cells = False  # --checkpoint_cells: recompute each cell in the backward (`checkpoint_cell`)
        self._sync_alive()

    def _build_darts(self, C, num_classes, layers, steps, multiplier, stem_multiplier, mixed_op) -> None:
        """DARTS's skeleton: a 3C stem, cells of two inputs, reduction cells at layers//3 and 2*layers//3."""
        space, method = self.space, self.method
        cell_cls = NOSCell if space == 'nos' else DartsCell
        if method == 'agnas':
            cell_cls = AGNASNOSCell if space == 'nos' else AGNASCell

        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(
            nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
            nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        self.reduction_layers = [layers // 3, 2 * layers // 3]
        reduction_prev = False
        for i in range(layers):
            reduction = i in self.reduction_layers
            if reduction:
                C_curr *= 2
            self.cells.append(cell_cls(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev,
                                       self.ops, mixed_op))
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        # Attention-transfer stages (docs/nos.md): the last cell before each reduction cell, and the last cell.
        self.stage_layers = [self.reduction_layers[0] - 1, self.reduction_layers[1] - 1, layers - 1]
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        self.resblocks = None

    def _build_nb201(self, C, num_classes, layers, mixed_op, track_running_stats) -> None:
        """NAS-Bench-201's skeleton (Sec. 2.1): stem Conv3x3 (3 -> C) + BN; N cells at C; a residual block
        (stride 2, C -> 2C); N cells at 2C; a residual block (2C -> 4C); N cells at 4C; BN, ReLU, global pool,
        linear. The stem, the residual blocks and the last BN are affine; the cells' BN is not."""
        n = layers // 3
        cell_cls = NB201Cell
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        self.cells = nn.ModuleList(cell_cls(C * 2 ** (i // n), self.ops, mixed_op, track_running_stats)
                                   for i in range(layers))
        # the residual block that runs before cell i, for i in reduction_layers
        self.reduction_layers = [n, 2 * n]
        self.resblocks = nn.ModuleList(ResNetBasicBlock(C * 2 ** s, C * 2 ** (s + 1), 2) for s in range(2))
        self.stage_layers = [n - 1, 2 * n - 1, layers - 1]  # the last cell of each stage (AGS's stages)
        self.lastact = nn.Sequential(nn.BatchNorm2d(4 * C), nn.ReLU(inplace=False))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * C, num_classes)

    # -- parameters ---------------------------------------------------------------------------------------
    def arch_parameters(self) -> list[nn.Parameter]:
        """One architecture matrix per cell type (`cell_types`); none for AGNAS."""
        if self.method == 'agnas':
            return []
        return [getattr(self, f'alphas_{t}') for t in self.cell_types]

    def alive_masks(self) -> list[torch.Tensor]:
        """The alive mask of each cell type (`cell_types`), rows x ops, bool."""
        return [getattr(self, f'alive_{t}') for t in self.cell_types]

    def weights(self) -> list[nn.Parameter]:
        """All parameters except the architecture matrices (what the weight optimizer updates)."""
        return [p for n, p in self.named_parameters() if n not in ARCH_NAMES]

    def new(self) -> Network:
        """A fresh network of the same structure on the same device, holding a copy of the alphas."""
        model_new = type(self)(self._C, self._num_classes, self._layers, self._criterion, self._steps,
                               self._multiplier, self._stem_multiplier, self.space, self.ops, self.method,
                               self._mixed_op, track_running_stats=self._track_running_stats,
                               **self._extra_config())
        # the alive masks from this network's CPU copy of them, before the move: no read from the device
        model_new.set_alive(*(torch.tensor(rows, dtype=torch.bool) for rows in self._alive_lists))
        model_new.to(next(self.parameters()))  # device and dtype (--double --unrolled)
        with torch.no_grad():
            for x, y in zip(model_new.arch_parameters(), self.arch_parameters()):
                x.copy_(y)
        model_new.checkpoint_cells = self.checkpoint_cells
        return model_new

    # -- alive ops (pruning) ------------------------------------------------------------------------------
    def set_alive(self, *masks: torch.Tensor) -> None:
        """Set the alive masks (bool, rows x ops; one per cell type: normal, reduce); every row keeps at least
        one op."""
        with torch.no_grad():
            for own, mask in zip(self.alive_masks(), masks, strict=True):
                own.copy_(mask)
        self._sync_alive()

    def _sync_alive(self) -> None:
        """Cache the alive op indices per row on the CPU (once per prune or load, not per forward)."""
        rows = [m.tolist() for m in self.alive_masks()]
        if any(not any(r) for m in rows for r in m):
            raise ValueError('every row of the alive masks needs at least one alive op')
        self._alive_rows = [[[o for o, a in enumerate(r) if a] for r in m] for m in rows]
        self._alive_lists = rows
        self._all_alive = all(all(r) for m in rows for r in m)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # a checkpoint written before the masks existed has every op alive
        state_dict = {**{f'alive_{t}': torch.ones_like(m) for t, m in zip(self.cell_types, self.alive_masks())},
                      **state_dict}
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._sync_alive()
        return result

    def set_skip_dropout(self, p: float) -> None:
        """Dropout after every stride-1 skip_connect (EoiNAS's search net; 0 turns it off)."""
        self._skip_dropout = p
        for m in self.modules():
            if hasattr(m, 'skip_dropout'):  # MixedOp (and the fast path's groups of edges)
                m.skip_dropout = p

    def _extra_config(self) -> dict:
        """Constructor arguments a subclass adds (model_search_fast.Network: the path), for `new()`."""
        return {}

    def _set_active(self, *rows) -> None:
        """Tell each MixedOp which of its ops to compute (its alive ops, or a hard sample's one op; an edge
        under `restrict_edges` its kept ops); `rows`: per cell type, the op indices of each row."""
        for i, cell in enumerate(self.cells):
            kept = self._restricted.get(i, {})
            for r, (op, active) in enumerate(zip(self.cell_edges(cell), rows[1] if cell.reduction else rows[0])):
                op.active = kept[r][0] if r in kept else active

    # -- restricting edges (the discretisation diagnostic, diagnose.py) -----------------------------------
    @contextlib.contextmanager
    def restrict_edges(self, edges: dict):
        """Within the block, each edge (cell, row) of `edges` computes only its kept ops; every other edge
        computes as trained. edges: {(cell index, row): (kept op indices, weights)}, weights a list of
        len(ops) floats that replaces the row's weights in that cell, or None to keep the row's own (the
        softmax over the alive ops, as trained; the ops not kept weigh 0). Kept ops may include pruned ones;
        none kept: the edge adds nothing.
        - discretising an edge (AGNAS §6.1, DARTS-PT's projection): kept [o], weights one-hot at o;
        - removing an op (DARTS-PT's perturbation): kept = the alive ops but o, weights None.
        A gated edge (method 'agnas') weighs itself: an op that is not kept outputs zero, so the edge's
        attention module sees a zero descriptor for it, as for `none`, and the kept ops keep their gates.
        Restrictions do not nest: the block's `edges` replace any outer ones."""
        table = {}
        rows, n_ops = len(self.alive_masks()[0]), len(self.ops)
        for (i, r), (kept, weights) in edges.items():
            if not (0 <= i < len(self.cells) and 0 <= r < rows):
                raise ValueError(f'no edge (cell {i}, row {r}): the network has {len(self.cells)} cells of '
                                 f'{rows} rows')
            kept = sorted(int(o) for o in kept)
            if any(not 0 <= o < n_ops for o in kept) or len(set(kept)) != len(kept):
                raise ValueError(f'kept ops {kept} of edge (cell {i}, row {r}) must be distinct indices below {n_ops}')
            if weights is not None and len(weights) != n_ops:
                raise ValueError(f'the weights of edge (cell {i}, row {r}) need {n_ops} entries, got {len(weights)}')
            table.setdefault(i, {})[r] = (kept, None if weights is None else list(weights))
        previous, self._restricted = self._restricted, table
        self._set_active(*self._alive_rows)
        try:
            yield self
        finally:
            self._restricted = previous
            self._set_active(*self._alive_rows)

    def _restricted_weights(self, i: int, weights):
        """(weights, alive mask) of restricted cell i from its cell type's (rows x ops) weights (None: gated
        edges): the restricted rows' weights replaced where given, their alive masks set to the kept ops."""
        kept = self._restricted[i]
        if weights is not None and any(w is not None for _, w in kept.values()):
            weights = weights.clone()
            for r, (_, w) in kept.items():
                if w is not None:
                    weights[r] = torch.tensor(w, dtype=weights.dtype, device=weights.device)
        alive = [list(row) for row in self._alive_lists[int(self.cells[i].reduction)]]
        for r, (ops, _) in kept.items():
            alive[r] = [o in ops for o in range(len(self.ops))]
        return weights, alive

    def prepare_weights(self, weights, reduction: bool, alive=None):
        """What the cells of one type take with their inputs, from the type's (rows x ops) weights (None:
        gated edges) and, for a restricted cell, its alive mask. The reference cells take the matrix itself
        (each MixedOp knows its alive ops, `_set_active`); the fast path gathers its contraction weights."""
        return weights

    def _weights_of_cells(self) -> list:
        """What each cell takes with its inputs in this forward (`cell_weights` per type, prepared once per
        type; a cell under `restrict_edges` its own)."""
        raw = self.cell_weights()
        typed = [self.prepare_weights(w, bool(t)) for t, w in enumerate(raw)]
        out = []
        for i, cell in enumerate(self.cells):
            t = int(cell.reduction)
            if i in self._restricted:
                weights, alive = self._restricted_weights(i, raw[t])
                out.append(self.prepare_weights(weights, bool(t), alive))
            else:
                out.append(typed[t])
        return out

    def edge_weights(self):
        """The weights of the mixed edges for one forward, one matrix per cell type ((normal, reduce); NB201:
        (normal,)): the (masked) softmax of A, or with `tau` one Gumbel-softmax sample per cell type shared
        by all its cells (EoiNAS Eq. 5)."""
        arch, alive = self.arch_parameters(), self.alive_masks()
        if self.tau is None:
            self._set_active(*self._alive_rows)
            if self._all_alive:
                return tuple(F.softmax(a, dim=-1) for a in arch)
            return tuple(masked_softmax(a, m) for a, m in zip(arch, alive))
        tiers = self.first_tiers() if self.gumbel_hard and self.space == 'nos' else None
        samples = [sample_weights(a, m, self.tau, self.gumbel_hard, tiers) for a, m in zip(arch, alive)]
        self.last_sample = torch.stack([i for _, i in samples])
        if self.gumbel_hard:  # one op per edge; the indices go to the CPU once per forward, as in GDAS
            picked = self.last_sample.tolist()
            self._set_active(*([[i] for i in rows] for rows in picked))
        else:
            self._set_active(*self._alive_rows)
        return tuple(w for w, _ in samples)

    def first_tiers(self) -> tuple[list[list[int]], list[bool]]:
        """(the first-tier rows of each node, is_feature per op): what a hard sample on the NOS space keeps
        feasible (`feature_constrained`)."""
        rows, offset = [], 0
        for k in range(self._steps):
            rows.append(list(range(offset, offset + k + 2)))
            offset += k + 2
        return rows, [op_kind(o) == 'feature' for o in self.ops]

    # -- forward ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[0]

    def cell_weights(self):
        """Per cell type ((normal, reduce); NB201: (normal,)): what every cell of that type takes with its
        inputs. DARTS: the edge weights (`edge_weights`); AGNAS: None, its edges weigh themselves."""
        if self.method == 'agnas':
            self._set_active(*self._alive_rows)  # the gated edges compute their alive ops only
            return (None,) * len(self.cell_types)
        return self.edge_weights()

    def forward_stages(self, x: torch.Tensor):
        """(logits, [s1, s2, s3]): the outputs of the cells that pair with the teacher's three stages."""
        if self.space == 'nb201':
            return self._forward_nb201(x)
        weights = self._weights_of_cells()
        s0 = s1 = self.stem(x)
        stages = []
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, _run_cell(self, cell, s0, s1, weights[i])
            if i in self.stage_layers:
                stages.append(s1)
        out = self.global_pooling(s1)
        return self.classifier(out.flatten(1)), stages

    def _forward_nb201(self, x: torch.Tensor):
        weights = self._weights_of_cells()  # one matrix for all cells (unless a cell is restricted)
        s, stages = self.stem(x), []
        for i, cell in enumerate(self.cells):
            if i in self.reduction_layers:
                s = self.resblocks[self.reduction_layers.index(i)](s)
            s = _run_cell(self, cell, s, weights[i])
            if i in self.stage_layers:
                stages.append(s)
        out = self.global_pooling(self.lastact(s))
        return self.classifier(out.flatten(1)), stages

    def _loss(self, x, target):
        return self._criterion(self(x), target)

    # -- derivation ---------------------------------------------------------------------------------------
    def arch_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """The softmaxed rows of A (normal, reduce) over the alive ops, as float64 arrays (pruned: 0)."""
        return tuple(masked_softmax(a.detach().float(), m).cpu().double().numpy()
                     for a, m in zip(self.arch_parameters(), self.alive_masks()))

    def genotype(self, stage_cell: str = 'first', importance=None):
        """The derived genotype; under method 'agnas' the staged one (see `staged_genotype`; NB201: the cell of
        the importance averaged over all cells). Otherwise the discrete cell derived from `importance` (per
        cell type rows x ops; default: the softmaxed A), with pruned entries set to -inf so that only alive
        ops can be chosen (EoiNAS §3.3; docs/nos.md). NB201: a genotypes.NB201Genotype (`derive_nb201`)."""
        if self.method == 'agnas':
            if self.space == 'nb201':  # AGNAS App. B: each edge position's gates averaged over all cells
                importance = self.importance() if importance is None else importance
                return genotypes.NB201Genotype(derive_nb201(as_array(importance).mean(axis=0), self.ops))
            return self.staged_genotype(stage_cell, importance)
        if importance is None:
            importance = self.arch_weights()
        masked = [np.where(m.cpu().numpy(), as_array(w), -np.inf) for w, m in zip(importance, self.alive_masks())]
        if self.space == 'nb201':
            return genotypes.NB201Genotype(derive_nb201(masked[0], self.ops))
        wn, wr = masked
        derive = derive_cell if self.space == 'nos' else derive_darts_cell
        concat = list(range(2 + self._steps - self._multiplier, self._steps + 2))
        return Genotype(normal=derive(wn, self.ops, self._steps), normal_concat=concat,
                        reduce=derive(wr, self.ops, self._steps), reduce_concat=concat)

    def search_space_size(self) -> dict:
        return search_space_size(self.ops, self.space, self._steps)

    # -- AGNAS: op importance from the gates (docs/agnas.md) -------------------------------------------
    def cell_edges(self, cell) -> list[nn.Module]:
        """A cell's edges in the row order of its importance matrix: first tier, then (NOS) second tier."""
        return list(cell._ops) + list(getattr(cell, '_second', []))

    def gated_edges(self) -> list[nn.Module]:
        """The modules that collect gates (method 'agnas'): every edge of every cell."""
        return [edge for cell in self.cells for edge in self.cell_edges(cell)]

    def reset_importance(self) -> None:
        for edge in self.gated_edges():
            edge.reset_importance()

    def importance(self, raw: bool = False) -> np.ndarray:
        """(layers, edges, ops) float64: each edge's mean gate per op over the images collected since
        `reset_importance` (docs/agnas.md: A_k / (images * C), in (0, 1)); over NOS the mean of the normalised
        gates the forward uses (agnas.GateStatistics). raw: the raw gates' means instead."""
        name = 'mean_raw_gates' if raw else 'mean_gates'
        return np.stack([np.stack([getattr(edge, name)() for edge in self.cell_edges(cell)])
                         for cell in self.cells])

    def _derive(self, matrix) -> list:
        if self.space == 'nb201':
            return derive_nb201(matrix, self.ops)
        derive = derive_cell if self.space == 'nos' else derive_darts_cell
        return derive(matrix, self.ops, self._steps)

    def cell_genotypes(self, importance=None) -> list[list]:
        """One cell per supernet cell, each derived on its own from its matrix (docs/agnas.md)."""
        importance = self.importance() if importance is None else importance
        return [self._derive(m) for m in as_array(importance)]

    def staged_genotype(self, stage_cell: str = 'first', importance=None) -> genotypes.StagedGenotype:
        """One normal cell per stage (`stage_cell`: see `stage_matrices`) and the two reduction cells."""
        importance = self.importance() if importance is None else importance
        normal, reduce = stage_matrices(importance, stage_cell)
        concat = list(range(2 + self._steps - self._multiplier, self._steps + 2))
        return genotypes.StagedGenotype(normal=[self._derive(m) for m in normal], normal_concat=concat,
                                        reduce=[self._derive(m) for m in reduce], reduce_concat=concat)



def stage_layout(layers: int) -> tuple[list[list[int]], list[int]]:
    """([normal cells of stage 1, 2, 3], [the two reduction cells]) of a `layers`-cell network.

    The reduction cells (layers//3, 2*layers//3) split it into three stages (docs/agnas.md); a staged genotype
    needs a normal cell in each, so at least 5 cells.
    """
    reductions = list(genotypes.reduction_layers(layers))
    bounds = [-1] + reductions + [layers]
    stages = [list(range(a + 1, b)) for a, b in itertools.pairwise(bounds)]
    if any(not s for s in stages):
        raise ValueError(f'a network of {layers} cells has no normal cell in stage '
                         f'{1 + [bool(s) for s in stages].index(False)}; a staged genotype needs at least 5 cells')
    return stages, reductions


def stage_matrices(importance, stage_cell: str = 'first') -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The importance matrices behind a staged genotype: ([3 normal], [2 reduce]) from (layers, rows, ops).

    stage_cell: 'first' takes each stage's first normal cell (the released AGNAS genotype: cells 0, 3, 6 of
    8), 'last' its last one, 'mean' the mean of its normal cells' matrices. The reduction cells are the
    supernet's own.
    """
    if stage_cell not in STAGE_CELLS:
        raise ValueError(f'unknown stage_cell {stage_cell!r}; valid values: {", ".join(STAGE_CELLS)}')
    m = as_array(importance)
    stages, reductions = stage_layout(len(m))
    pick = {'first': lambda s: m[s[0]], 'last': lambda s: m[s[-1]], 'mean': lambda s: m[s].mean(axis=0)}
    return [pick[stage_cell](s) for s in stages], [m[r] for r in reductions]


def as_array(weights) -> np.ndarray:
    """A weight or importance matrix (tensor, array or nested lists) as a float64 numpy array."""
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().double().numpy()
    return np.asarray(weights, dtype=np.float64)


def derive_cell(weights, ops=PRIMITIVES, steps: int = genotypes.STEPS) -> list:
    """Derive a heterogeneous cell from softmaxed A rows (Sec. 3.3 "Search Outcome"; docs/nos.md).

    weights: (14 + 4) x len(ops), rows in the search cell's edge order. Per block k (node k + 2):
    - first tier: the two ops (o_i on the edge from node i, o_j from node j, i < j) that maximise
      w_i[o_i] + w_j[o_j] over all pairs of distinct predecessors, with at least one of o_i, o_j a
      feature op;
    - second tier: the argmax op of the block's second-tier row.
    Ties (equal float64 sums) break by lower op index, then lower input index: the winner is the candidate
    with the smallest key (-score, o_i, o_j, i, j), where o_i belongs to the lower input i. The second
    tier takes the lowest op index among equal maxima. `none` (not a NOS op) is never chosen.
    Returns blocks ((op_i, i), (op_j, j), op_second).
    """
    w = as_array(weights)
    ops = list(ops)
    n_first = sum(2 + k for k in range(steps))
    if w.shape != (n_first + steps, len(ops)):
        raise ValueError(f'expected A of shape ({n_first + steps}, {len(ops)}), got {w.shape}')
    usable = [o for o, name in enumerate(ops) if name != 'none']
    is_feature = [op_kind(name) == 'feature' for name in ops]
    blocks, offset = [], 0
    for k in range(steps):
        rows = w[offset:offset + k + 2]
        best = None
        for i, j in itertools.combinations(range(k + 2), 2):
            for oi, oj in itertools.product(usable, usable):
                if not (is_feature[oi] or is_feature[oj]):
                    continue
                key = (-(rows[i, oi] + rows[j, oj]), oi, oj, i, j)
                if best is None or key < best:
                    best = key
        _, oi, oj, i, j = best
        second = w[n_first + k]
        os_ = max(usable, key=lambda o: (second[o], -o))
        blocks.append(((ops[oi], i), (ops[oj], j), ops[os_]))
        offset += k + 2
    return blocks


def derive_darts_cell(weights, ops=DARTS_PRIMITIVES, steps: int = genotypes.STEPS) -> list:
    """DARTS's derivation (its model_search.genotype): per node, the two incoming edges whose strongest
    non-none op is strongest (stable sort: ties keep the lower input), each with that op (ties: lower op
    index). Returns DARTS's flat list of (op, input) pairs, strongest edge first."""
    w = as_array(weights)
    ops = list(ops)
    n_edges = sum(2 + k for k in range(steps))
    if w.shape != (n_edges, len(ops)):
        raise ValueError(f'expected A of shape ({n_edges}, {len(ops)}), got {w.shape}')
    usable = [o for o, name in enumerate(ops) if name != 'none']
    gene, start = [], 0
    for k in range(steps):
        W = w[start:start + k + 2]
        edges = sorted(range(k + 2), key=lambda x: -max(W[x][o] for o in usable))[:2]
        for j in edges:
            best = usable[0]
            for o in usable:
                if W[j][o] > W[j][best]:
                    best = o
            gene.append((ops[best], j))
        start += k + 2
    return gene


def derive_nb201(weights, ops=NB201_PRIMITIVES) -> str:
    """NAS-Bench-201's derivation: on each of the 6 edges the argmax over all ops, `none` included (a `none`
    edge is a valid architecture in the benchmark); ties take the lower op index. Returns the architecture
    string."""
    w = as_array(weights)
    ops = list(ops)
    if w.shape != (len(genotypes.NB201_EDGES), len(ops)):
        raise ValueError(f'expected A of shape ({len(genotypes.NB201_EDGES)}, {len(ops)}), got {w.shape}')
    return genotypes.nb201_arch(ops[int(np.argmax(row))] for row in w)  # argmax: the first of equal maxima


def search_space_size(ops=PRIMITIVES, space: str = 'nos', steps: int = genotypes.STEPS) -> dict:
    """Number of distinct cells per cell type (docs/nos.md).

    ops: an op list (names; kinds are counted) or a number of NOS ops (the first n of PRIMITIVES).
    Returns {'paper': ..., 'exact': ...} as Python ints:
    - NOS, 'paper': Sec. 4.2's formula prod_{n=1..steps} C(n+1, 2) * n_ops^3 (180 * 11^12 ~ 5.6e14 with
      the eleven primitives); 'exact': the count under the feature-op rule of docs/nos.md, prod C(n+1, 2) *
      (n_ops^2 - n_nonfeature^2) * n_ops (180 * (105 * 11)^4 ~ 3.2e14): the pair of predecessors, the
      ordered op pair with at least one feature op, and the second-tier op.
    - DARTS: both are prod C(n+1, 2) * n^2 over its n = 7 non-none ops (180 * 7^8 ~ 1.0e9).
    """
    if space == 'nb201':  # one cell, every op on each of its 6 edges: 5^6 = 15,625
        n = len(ops) if not isinstance(ops, int) else ops
        return {'paper': n ** len(genotypes.NB201_EDGES), 'exact': n ** len(genotypes.NB201_EDGES)}
    if isinstance(ops, int):
        ops = (PRIMITIVES if space == 'nos' else DARTS_PRIMITIVES[1:])[:ops]
    ops = [o for o in ops if o != 'none']
    n = len(ops)
    pairs = math.prod(math.comb(k + 1, 2) for k in range(1, steps + 1))
    if space == 'darts':
        count = pairs * n ** (2 * steps)
        return {'paper': count, 'exact': count}
    if space != 'nos':
        raise ValueError(f'unknown search space {space!r}; valid spaces: {", ".join(SPACES)}')
    n_other = sum(op_kind(o) != 'feature' for o in ops)
    return {'paper': pairs * n ** (3 * steps),
            'exact': pairs * ((n * n - n_other * n_other) * n) ** steps}
