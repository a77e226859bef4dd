"""The fast path of the search network: the same search as model_search.py, in fewer, larger kernels.

`model_search.py` holds the readable supernet (one `MixedOp` per edge): the code to fork and to read against
the papers. This file computes the same search by *source group* (`FastCell`), and `Network(..., fast=True)`
builds it; `test_fast_search.py` proves the two equal in float64 (if they ever disagree, the reference is
right). docs/fast-path.md explains the levers and their measured kernel counts.

What makes it fast (each lever's count is in BENCHMARKS.md):
- Edges leaving the same node read the same input, so all edges of a *source group* (the two cell inputs
  together; then each inner node; in NOS also each surrogate node S_k, whose one second-tier edge is a
  group of its own) are computed at once: the same op on E edges is one grouped (depthwise: channel-
  multiplied) convolution, and the non-affine BatchNorms of a group are one BatchNorm over the
  concatenated channels (it is per-channel, so nothing changes).
- Pools + non-affine BatchNorm, and identity, give the same output on every edge from one source: they
  are computed once per source and their weights summed (by the contraction below).
- The weighted sums over ops and edges (Eq. 2-4, 6-8; DARTS's node sums) are one tensor contraction per
  group and kind (a 1x1 convolution over the stacked op outputs), whose weights are gathered from the
  (rows x ops) matrix once per cell type and forward (FastPlan.prepare).
- The dynamic kernels of a node are summed before its one depthwise convolution (operations.calibrate).

The fast cells take any (rows x ops) weight matrix per cell type (`FastPlan.prepare(weights, alive,
dropout)`): the softmax of A, or a Gumbel-softmax sample; with alive masks an op dead on every edge of a
source group is not computed, and dead (edge, op) pairs weigh exactly 0. A method whose edges weigh
themselves (AGNAS) passes its own group of edges (`fast_edges`, agnas.FastGatedEdges), which overrides
`FastEdges.mix`.

NAS-Bench-201's cell (`--space nb201`) has its own section below (`NB201FastCell`, `NB201Edges`, `NB201Plan`):
the same source-group idea on its one-input cell, proven equal to model_search.NB201Cell by test_nb201_fast.py.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import genotypes
import model_search
from operations import dynamic_conv

# DARTS's convolutions (operations.OPS): name -> (kernel, padding, dilation, separable)
CONV_OPS = {'sep_conv_3x3': (3, 1, 1, True), 'sep_conv_5x5': (5, 2, 1, True),
            'dil_conv_3x3': (3, 2, 2, False), 'dil_conv_5x5': (5, 4, 2, False)}
POOL_OPS = ('max_pool_3x3', 'avg_pool_3x3')
DYNAMIC_SIZES = {'dynamic_conv_3x3': 3, 'dynamic_conv_5x5': 5}
BN_MOMENTUM, BN_EPS = 0.1, 1e-5  # nn.BatchNorm2d's defaults, which the reference cells use


def _group_specs(steps: int, space: str, reduction: bool) -> list[dict]:
    """The source groups of a cell in the order the fast cell runs them.

    Each group: 'sources' (state indices; ('S', k) for the surrogate node of block k), 'targets' (the inner
    nodes its edges feed), 'rows' (rows[s][k]: the row of A of the edge from source s to target k),
    'stride'. Edges are numbered e = s * K + k (K targets). The two cell inputs form one group: they feed
    the same nodes, so their edges stack. 'carrier': the group that adds the identity kernel of its
    targets' node calibration (every node receives from exactly one: the input group or its second tier).
    """
    n_first = sum(2 + i for i in range(steps))
    offsets = [sum(2 + i for i in range(k)) for k in range(steps)]

    def first(sources, targets, stride):
        return {'tier': 'first', 'sources': tuple(sources), 'targets': tuple(targets), 'stride': stride,
                'rows': [[offsets[k] + j for k in targets] for j in sources]}

    groups = [dict(first((0, 1), range(steps), 2 if reduction else 1), carrier=True)]
    for k in range(steps):
        if space == 'nos':
            groups.append({'tier': 'second', 'sources': (('S', k),), 'targets': (k,), 'stride': 1,
                           'rows': [[n_first + k]], 'carrier': True})
        if k < steps - 1:
            groups.append(first((2 + k,), range(k + 1, steps), 1))
    return groups


class _Layout:
    """What one group computes under an alive mask, and where its contraction weights come from.

    An op is computed in a group when it is alive on at least one of the group's edges (`none` never is:
    it adds w * 0). `index[kind]` lists, per (target, entry), the flat index of the coefficient in A's
    (rows x ops) matrix, or `zero` (a dead op on an edge, or an edge that does not feed that target).
    Entries of 'F' (the stacked feature outputs): separable convs x edges, dilated convs x edges, pools x
    sources, FactorizedReduce x edges (stride 2) or identity x sources (stride 1; x edges with `dropout`,
    EoiNAS's skip dropout, since every edge drops its own copy). 'SA': spatial attention
    maps x edges. 'D' (kernels of the node's one depthwise conv, see `_node`): dynamic kernels (in column
    order) x edges, channel attention x edges (a kernel with CA at its centre tap), and, in the group that
    carries it (`spec['carrier']`), the identity kernel with coefficient `one`. In a group from an inner
    node, 'F' and 'D' end with the targets' pending sums from the earlier groups (coefficient 1: `fold`),
    so that one contraction also does that addition.
    """

    def __init__(self, spec: dict, ops: list[str], alive, zero: int, one: int = 0, pending=(),
                 dropout: bool = False):
        ncol = len(ops)
        col = {name: i for i, name in enumerate(ops)}
        rows = spec['rows']
        self.rows, self.ncol, self.zero, self.one = rows, ncol, zero, one  # how to read `index` (gated edges)
        self.alive = alive  # rows x ops (gated edges: which (edge, op) pairs weigh)
        S, K = len(rows), len(rows[0])
        E = S * K
        stride = spec['stride']
        live = [name for name in ops if name != 'none'
                and any(alive[r][col[name]] for rr in rows for r in rr)]
        conv = [n for n in live if n in CONV_OPS]
        self.conv = [n for n in conv if CONV_OPS[n][3]] + [n for n in conv if not CONV_OPS[n][3]]
        self.seps = [n for n in self.conv if CONV_OPS[n][3]]
        self.pools = [n for n in live if n in POOL_OPS]
        self.identity = 'skip_connect' in live and stride == 1
        # skip dropout (EoiNAS): every edge drops its own copy of the identity, so it is x edges, not x sources
        self.identity_edges = self.identity and dropout
        self.fr = 'skip_connect' in live and stride == 2
        self.sa = 'spatial_attention' in live
        self.ca = 'channel_attention' in live
        self.dyn = [n for n in live if n in DYNAMIC_SIZES]

        def coef(name, s, k):
            r = rows[s][k]
            return r * ncol + col[name] if alive[r][col[name]] else zero

        def per_edge(name, kt):
            return [coef(name, e // K, kt) if e % K == kt else zero for e in range(E)]

        index = {}
        f = []
        for kt in range(K):
            row = []
            for name in self.conv:
                row += per_edge(name, kt)
            for name in self.pools:
                row += [coef(name, s, kt) for s in range(S)]
            if self.fr:
                row += per_edge('skip_connect', kt)
            if self.identity_edges:
                row += per_edge('skip_connect', kt)
            elif self.identity:
                row += [coef('skip_connect', s, kt) for s in range(S)]
            f.append(row)
        # what the earlier groups gave these targets so far joins the contraction with coefficient 1
        self.fold = {kind for kind in pending if kind == 'F' and f[0] or kind == 'D' and (self.dyn or self.ca)}
        if 'F' in self.fold:
            f = [row + [one if j == kt else zero for j in range(K)] for kt, row in enumerate(f)]
        if f[0]:
            index['F'] = f
        if self.sa:
            index['SA'] = [per_edge('spatial_attention', kt) for kt in range(K)]
        self.delta = spec.get('carrier', False) and any(n in DYNAMIC_SIZES or n == 'channel_attention'
                                                         for n in ops)
        if self.dyn or self.ca:
            index['D'] = [[i for name in self.dyn for i in per_edge(name, kt)]
                          + (per_edge('channel_attention', kt) if self.ca else [])
                          + ([one] if self.delta else [])
                          + ([one if j == kt else zero for j in range(K)] if 'D' in self.fold else [])
                          for kt in range(K)]
        self.index = index
        self.kinds = set(index) | ({'D'} if self.delta else set())


class FastWeights:
    """The contraction weights of every group of one cell type, gathered once per forward
    (`FastPlan.prepare`); each cell takes its own `split()` of them (one backward op per cell)."""

    def __init__(self, layouts, flat, shapes):
        self.layouts, self.flat, self.shapes = layouts, flat, shapes

    def split(self) -> list[dict]:
        if self.flat is None:  # gated edges (AGNAS): no coefficients, each group weighs itself
            return [{} for _ in self.layouts]
        pieces = iter(self.flat.split([k * n for _, _, (k, n) in self.shapes]))
        out = [{} for _ in self.layouts]
        for (g, kind, (k, n)), piece in zip(self.shapes, pieces):
            out[g][kind] = piece.view(k, n, 1)
        return out


class FastPlan:
    """The group structure of one cell type (normal or reduction) of the fast path, shared by its cells.

    `prepare(weights, alive, dropout)` takes any (rows x ops) weight matrix (DARTS's softmax of A, a
    Gumbel-softmax sample, ...), an optional alive mask of the same shape (bool; None: all alive) and whether
    skip dropout is on (then every edge's identity is its own entry), and returns the FastWeights the cells
    use. Columns dead on every edge of a group are not computed there; dead entries
    weigh exactly 0, as in the reference with those weights zeroed.
    """

    def __init__(self, steps: int, space: str, ops: list[str], reduction: bool):
        self.ops = list(ops)
        self.groups = _group_specs(steps, space, reduction)
        self.rows = sum(2 + i for i in range(steps)) + (steps if space == 'nos' else 0)
        self._layouts = {}
        self._index = {}
        self._tail = {}

    def layouts(self, alive=None, dropout: bool = False) -> tuple[list[_Layout], tuple]:
        if alive is None:
            key = (None, dropout)
            alive = [[True] * len(self.ops)] * self.rows
        else:
            if isinstance(alive, torch.Tensor):
                alive = alive.tolist()
            alive = [[bool(v) for v in row] for row in alive]
            if len(alive) != self.rows or any(len(row) != len(self.ops) for row in alive):
                raise ValueError(f'the alive mask must be {self.rows} x {len(self.ops)} (rows x ops)')
            key = (tuple(map(tuple, alive)), dropout)
        if key not in self._layouts:
            zero = self.rows * len(self.ops)
            layouts, given = [], set()  # kinds the first-tier groups have given the nodes still to come
            for spec in self.groups:
                pending = given if spec['tier'] == 'first' and spec['sources'] != (0, 1) else ()
                layouts.append(_Layout(spec, self.ops, alive, zero, zero + 1, pending, dropout))
                if spec['tier'] == 'first':
                    given = given | layouts[-1].kinds
            self._layouts[key] = layouts
        return self._layouts[key], key

    def prepare(self, weights: torch.Tensor | None, alive=None, dropout: bool = False) -> FastWeights:
        if weights is None:  # gated edges: the layouts only
            return FastWeights(self.layouts(alive, dropout)[0], None, [])
        if weights.shape != (self.rows, len(self.ops)):
            raise ValueError(f'expected weights of shape ({self.rows}, {len(self.ops)}), got '
                             f'{tuple(weights.shape)}')
        layouts, key = self.layouts(alive, dropout)
        cache = (key, weights.device)
        if cache not in self._index:
            flat, shapes = [], []
            for g, layout in enumerate(layouts):
                for kind, matrix in layout.index.items():
                    shapes.append((g, kind, (len(matrix), len(matrix[0]))))
                    flat += [i for row in matrix for i in row]
            self._index[cache] = (torch.tensor(flat, dtype=torch.long, device=weights.device), shapes)
        index, shapes = self._index[cache]
        tail = self._tail.get((weights.device, weights.dtype))
        if tail is None:
            tail = self._tail[(weights.device, weights.dtype)] = torch.tensor([0., 1.], dtype=weights.dtype,
                                                                              device=weights.device)
        # one gather for all groups: A's entries, a 0 for every dead or absent (edge, op), a 1 for the identity
        return FastWeights(layouts, torch.cat([weights.flatten(), tail])[index], shapes)


def _merge(ranges) -> list[tuple[int, int]]:
    merged = []
    for a, b in ranges:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


class _FanOut(torch.autograd.Function):
    """n uses of one tensor whose gradients are summed by one reduction (two kernels: stack, sum) rather
    than by autograd's n - 1 pairwise adds. With repeat=K, x (N, S*C, H, W) is first copied K times per
    source, edge-major (N, S*K*C, H, W), and the same reduction also sums over the copies."""

    @staticmethod
    def forward(ctx, x, n, S, K):
        ctx.set_materialize_grads(False)
        ctx.shape = (S, K)
        if K > 1:
            x = _per_edge(x, S, K)
        return tuple(x.view_as(x) for _ in range(n))

    @staticmethod
    def backward(ctx, *grads):
        grads = [g for g in grads if g is not None]
        if not grads:
            return None, None, None, None
        S, K = ctx.shape
        if K == 1:
            return (torch.stack(grads).sum(0) if len(grads) > 1 else grads[0]), None, None, None
        N, _, H, W = grads[0].shape
        # stacked beside the copies' axis, so that one reduction over two adjacent axes sums both (on the
        # CPU several times faster than reducing a leading and an inner axis)
        g = torch.stack([g.view(N, S, K, -1) for g in grads], 2).sum((2, 3))
        return g.view(N, -1, H, W), None, None, None


def _per_edge(x: torch.Tensor, S: int, K: int) -> torch.Tensor:
    """(N, S*C, H, W) -> (N, S*K*C, H, W): each source's channels copied for its K edges, edge-major."""
    N, _, H, W = x.shape
    C = x.shape[1] // S
    return x.view(N, S, 1, C, H, W).expand(N, S, K, C, H, W).reshape(N, S * K * C, H, W)


def _fan_out(x: torch.Tensor, n: int, S: int = 1, K: int = 1):
    """n handles on x (on its K-fold copy per source, see _FanOut) for n consumers; plain x (or the copy)
    when the pairwise adds are as cheap."""
    if (n > 3 or K > 1 and n > 1) and torch.is_grad_enabled() and x.requires_grad:
        return _FanOut.apply(x, n, S, K)
    if K > 1:
        x = _per_edge(x, S, K)
    return (x,) * n


def _contract(stack: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_q weight[k, q] * stack[:, q] for every target k: (N, Q, L) x (K, Q, 1) -> (N, K, L) in one
    kernel (a 1x1 convolution): the weighted sums of Eq. 2-4 / 6-8 over ops and edges."""
    return F.conv1d(stack, weight)


class FastEdges(nn.Module):
    """All edges of one source group (S sources x K targets = E edges), every op of the space at once.

    Parameters hold the reference's per-edge weights stacked edge by edge (e = s * K + k) and op by op;
    `from_plain` assembles them from the reference cell's MixedOps. `forward` returns the group's
    contributions to its K targets: 'F' (N, K, C, H, W), the weighted feature sum (Eq. 2 / 6); 'SA'
    (N, K, 1, H, W), the weighted spatial attention (Eq. 3 / 7); 'D' (N, K, C, k, k), the weighted sum of
    the kernels (Eq. 4 / 8) with channel attention and the identity folded in (see `_node`). `pending`: the
    targets' sums so far, added to 'F' and 'D' inside the contraction where the layout says so (`fold`).
    """

    def __init__(self, C: int, stride: int, ops: list[str], S: int, K: int, carrier: bool = False):
        super().__init__()
        self.C, self.stride, self.S, self.K = C, stride, S, K
        E = self.E = S * K
        full = _Layout({'rows': [[0] * K] * S, 'stride': stride}, ops, [[True] * len(ops)], 0)
        self.conv, self.seps, self.pools, self.dyn = full.conv, full.seps, full.pools, full.dyn
        self.has_identity, self.has_fr, self.has_sa, self.has_ca = full.identity, full.fr, full.sa, full.ca
        self.m_att = max(1, C // 16)  # operations.SpatialAttention / ChannelAttention width
        self.m_dyn = max(1, C // 8)   # operations.DynamicKernel bottleneck width
        # the node's kernel (dynamic kernels, CA at the centre tap, identity): the largest dynamic size
        self.kernel_size = max((DYNAMIC_SIZES[n] for n in self.dyn), default=1)
        if carrier and (self.dyn or self.has_ca):
            kk = self.kernel_size ** 2
            self.register_buffer('delta', F.pad(torch.ones(1, 1, C, 1), (kk // 2, kk // 2)).view(1, 1, C * kk),
                                 persistent=False)
        self._cache = {}
        self.structural_zeros = 0
        self.skip_dropout = 0.  # EoiNAS: dropout after each stride-1 edge's skip_connect (MixedOp.skip_dropout)

        def param(*shape, fan_in=None):  # nn.Conv2d's initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            fan_in = fan_in or math.prod(shape[1:])
            return nn.Parameter(torch.empty(*shape).uniform_(-fan_in ** -0.5, fan_in ** -0.5))

        # separable and dilated convs: [ReLU, depthwise (stride), pointwise, BN] (twice for sep_conv)
        self.dw1 = nn.ParameterDict({n: param(E * C, 1, CONV_OPS[n][0], CONV_OPS[n][0]) for n in self.conv})
        self.dw2 = nn.ParameterDict({n: param(E * C, 1, CONV_OPS[n][0], CONV_OPS[n][0]) for n in self.seps})
        if self.conv:
            self.pw1 = param(len(self.conv) * E * C, C, 1, 1)
        if self.seps:
            self.pw2 = param(len(self.seps) * E * C, C, 1, 1)
            self.register_buffer('bn2_mean', torch.zeros(len(self.seps) * E * C))
            self.register_buffer('bn2_var', torch.ones(len(self.seps) * E * C))
        if self.has_fr:  # skip_connect on a stride-2 edge: FactorizedReduce, two offset 1x1 convs
            self.fr1 = param(E * C // 2, C, 1, 1)
            self.fr2 = param(E * C // 2, C, 1, 1)
        # 1x1 convs from X, each followed by BN and ReLU: the spatial attention's first conv (per edge, the
        # edge's stride), and the kernel generators' bottlenecks (per dynamic op, then per edge; stride 1)
        if self.has_sa:
            self.xsa = param(E * self.m_att, C, 1, 1)
            self.sa2 = param(E, self.m_att, 3, 3)
        if self.has_ca:
            self.ca1 = param(E * self.m_att, C, 1, 1)
            # the second conv writes CA straight onto the centre tap of the node's kernel (see `_node`): its
            # rows for the other k*k - 1 taps are zero and their bias -inf, so the sigmoid gives exactly 0
            # there and passes no gradient back (those rows stay zero), and no forward pads CA into a kernel
            kk = self.kernel_size ** 2
            self.ca2 = nn.Parameter(self._on_taps(param(E * C, self.m_att, 1, 1).detach(), kk))
            bias = torch.full((E * C, kk), float('-inf'))
            bias[:, kk // 2] = 0
            self.register_buffer('ca_bias', bias.flatten() if kk > 1 else None, persistent=False)
            self.structural_zeros += E * C * (kk - 1) * self.m_att
        if self.dyn:
            self.xdyn = nn.ParameterDict({n: param(E * self.m_dyn, C, 1, 1) for n in self.dyn})
            # kernel transform (C -> k*k) of each op, and decode (C/8 -> C) per op, then per edge.
            # Transform layout (edge, tap row, tap column, input channel) on the node's ks x ks grid: a
            # smaller op's k x k taps sit at its centre and its border rows are zero. Their taps are masked
            # out of the softmax (`_tap_bias`), so the border gets no gradient and stays exactly zero (weight
            # decay of 0 is 0), and no forward has to pad the weights (issue 11: one op per op and step)
            k = DYNAMIC_SIZES
            self.transform = nn.ParameterDict(
                {n: nn.Parameter(self._on_grid(param(E, k[n], k[n], C, fan_in=C).detach(), self.kernel_size))
                 for n in self.dyn})
            # their zero borders, which utils.count_params leaves out (the reference has no such weights),
            # as it leaves out ca2's rows off the centre tap
            self.structural_zeros += E * C * sum(self.kernel_size ** 2 - k[n] ** 2 for n in self.dyn)
            self.decode = param(E * len(self.dyn) * C, self.m_dyn, 1, 1)
        # BN1: one non-affine BatchNorm over [pointwise outputs of the first conv stage | pools |
        # FactorizedReduce | sa conv | bottlenecks]; the buffer range of each piece
        seg, a = {}, 0
        for key, size in ([(('conv', n), E * C) for n in self.conv] + [(('pool', n), S * C) for n in self.pools]
                          + ([('fr', E * C)] if self.has_fr else []) + ([('sa', E * self.m_att)] if self.has_sa else [])
                          + ([('dyn', E * len(self.dyn) * self.m_dyn)] if self.dyn else [])):
            seg[key] = (a, a + size)
            a += size
        self.bn1_segments = seg
        self.register_buffer('bn1_mean', torch.zeros(a))
        self.register_buffer('bn1_var', torch.ones(a))

    # -- helpers ------------------------------------------------------------------------------------------
    def _take(self, t: torch.Tensor, ranges) -> torch.Tensor:
        """Rows [a, b) of t for each range: a view when they are adjacent (always, with nothing pruned)."""
        merged = _merge(ranges)
        if len(merged) == 1:
            a, b = merged[0]
            return t if (a, b) == (0, t.shape[0]) else t[a:b]
        return t.index_select(0, self._index(merged, t.device))

    def _index(self, merged, device):
        key = ('index', tuple(merged), device)
        if key not in self._cache:
            self._cache[key] = torch.cat([torch.arange(a, b) for a, b in merged]).to(device)
        return self._cache[key]

    def _batch_norm(self, z, mean, var, ranges):
        """Non-affine BatchNorm of z (training: batch statistics) with the running statistics at `ranges`."""
        merged = _merge(ranges)
        if len(merged) == 1:
            return F.batch_norm(z, self._take(mean, merged), self._take(var, merged), None, None,
                                self.training, BN_MOMENTUM, BN_EPS)
        idx = self._index(merged, mean.device)  # pruned ops in between: gather, then write the updates back
        m, v = mean.index_select(0, idx), var.index_select(0, idx)
        out = F.batch_norm(z, m, v, None, None, self.training, BN_MOMENTUM, BN_EPS)
        if self.training:
            with torch.no_grad():
                mean.index_copy_(0, idx, m)
                var.index_copy_(0, idx, v)
        return out

    def _dyn_rows(self, kept, width: int) -> list[tuple[int, int]]:
        """Ranges of the kept dynamic ops' blocks in an (op, edge, width) layout."""
        return [(j * self.E * width, (j + 1) * self.E * width) for j, n in enumerate(self.dyn) if n in kept]

    @staticmethod
    def _on_grid(w: torch.Tensor, ks: int) -> torch.Tensor:
        """(E, k, k, C) transform rows zero-padded to the node's ks x ks grid."""
        p = (ks - w.shape[1]) // 2
        return F.pad(w, (0, 0, p, p, p, p)) if p else w

    @staticmethod
    def _on_taps(w: torch.Tensor, kk: int) -> torch.Tensor:
        """(E*C, m, 1, 1) conv weights -> (E*C*kk, m, 1, 1): each output channel's row at the centre of its kk
        taps, zero rows at the others."""
        if kk == 1:
            return w
        rows = w.new_zeros(w.shape[0], kk, w.shape[1])
        rows[:, kk // 2] = w.flatten(1)
        return rows.view(-1, w.shape[1], 1, 1)

    def _transform_weights(self, kept) -> list[torch.Tensor]:
        """The kernel transforms of the kept ops as 1x1 conv weights, (edge, ks*ks) rows each."""
        return [self.transform[n].view(self.E * self.kernel_size ** 2, self.C, 1, 1) for n in kept]

    def _tap_bias(self, kept, ref: torch.Tensor):
        """(ops, 1, 1, ks*ks): 0 on the taps of each kept op, -inf on a smaller kernel's border (so that the
        softmax over taps of Fig. 1 (c) runs over its own k*k taps only); None when no op needs it."""
        ks = self.kernel_size
        if all(DYNAMIC_SIZES[n] == ks for n in kept):
            return None
        key = ('bias', tuple(kept), ref.device, ref.dtype)
        if key not in self._cache:
            bias = torch.full((len(kept), ks, ks), float('-inf'), dtype=ref.dtype)
            for j, n in enumerate(kept):
                p = (ks - DYNAMIC_SIZES[n]) // 2
                bias[j, p:ks - p, p:ks - p] = 0
            self._cache[key] = bias.view(len(kept), 1, 1, ks * ks).to(ref.device)
        return self._cache[key]

    # -- forward ------------------------------------------------------------------------------------------
    def forward(self, xs: list[torch.Tensor], coef: dict, lay: _Layout, pending=None) -> dict:
        S, K, E, C, stride = self.S, self.K, self.E, self.C, self.stride
        x = xs[0] if len(xs) == 1 else torch.cat(xs, 1)  # (N, S*C, H, W)
        N, _, H, W = x.shape
        Ho, Wo = (H, W) if stride == 1 else ((H + 1) // 2, (W + 1) // 2)
        # one source at stride 1: ONE 1x1 conv from X for [sa conv | bottlenecks | CA's first conv |
        # kernel transforms] (CA's conv moves before its global pool: both are linear, they commute)
        merged = S == 1 and stride == 1 and (lay.sa + len(lay.dyn) + lay.ca) > 1
        nd = len(lay.dyn)
        uses = (int(bool(lay.conv or lay.fr)) + len(lay.pools) + int(lay.identity)
                + (int(lay.sa or lay.ca or bool(nd)) if merged else int(lay.sa) + 2 * nd + int(lay.ca)))
        x_uses = iter(_fan_out(x, uses))
        stacks = {}  # per kind, the entries that `mix` weighs and sums for each target

        # BN1's input: [first conv stage | pools | FactorizedReduce | sa conv | bottlenecks]
        bn_in, bn_ranges, split = [], [], []
        if lay.conv or lay.fr:
            r = F.relu(next(x_uses))
        if lay.conv:
            # every edge's copy of ReLU(X), edge-major, so that each op is one depthwise conv over E*C channels
            # (one copy; a channel-multiplied conv on ReLU(X) would instead need its outputs reordered, and
            # that reorder costs two ops per op in the backward)
            d = []
            for n, rr_n in zip(lay.conv, _fan_out(r, len(lay.conv), S, K)):
                _, pad, dil, _ = CONV_OPS[n]
                d.append(F.conv2d(rr_n, self.dw1[n], None, stride, pad, dil, E * C))
            i = [self.conv.index(n) for n in lay.conv]
            w = self._take(self.pw1, [(j * E * C, (j + 1) * E * C) for j in i])
            bn_in.append(F.conv2d(torch.cat(d, 1) if len(d) > 1 else d[0], w, groups=len(d) * E))
            bn_ranges += [self.bn1_segments[('conv', n)] for n in lay.conv]
            split += [len(lay.seps) * E * C, (len(lay.conv) - len(lay.seps)) * E * C]
        for n in lay.pools:  # once per source: the same on every edge from it
            pool = (F.max_pool2d(next(x_uses), 3, stride, 1) if n == 'max_pool_3x3'
                    else F.avg_pool2d(next(x_uses), 3, stride, 1, count_include_pad=False))
            bn_in.append(pool)
            bn_ranges.append(self.bn1_segments[('pool', n)])
        if lay.pools:
            split.append(len(lay.pools) * S * C)
        if lay.fr:
            bn_in += [F.conv2d(r, self.fr1, stride=2, groups=S), F.conv2d(r[:, :, 1:, 1:], self.fr2, stride=2,
                                                                          groups=S)]
            bn_ranges.append(self.bn1_segments['fr'])
            split.append(E * C)
        dyn_rows = self._dyn_rows(lay.dyn, self.m_dyn)
        x_dyn = [self.xdyn[n] for n in lay.dyn]
        x_tf = self._transform_weights(lay.dyn)
        if merged:
            w = ([self.xsa] if lay.sa else []) + x_dyn + ([self.ca1] if lay.ca else []) + x_tf
            y = F.conv2d(next(x_uses), torch.cat(w) if len(w) > 1 else w[0])
            n_bn = E * self.m_att * lay.sa + nd * E * self.m_dyn
            y_bn, y_ca, y_tf = y.split([n_bn, E * self.m_att * lay.ca, nd * E * self.kernel_size ** 2], 1)
            if n_bn:
                bn_in.append(y_bn)
        else:
            if lay.sa:
                bn_in.append(F.conv2d(next(x_uses), self.xsa, stride=stride, groups=S))
            # the kernel generator has no stride (App. A.1): on a stride-2 group its bottleneck reads the
            # full-resolution X, so it gets a BatchNorm of its own below instead of joining BN1's input
            dyn_in = [F.conv2d(next(x_uses), w, groups=S) for w in x_dyn]
            if stride == 1:
                bn_in += dyn_in
        if lay.sa:
            bn_ranges.append(self.bn1_segments['sa'])
            split.append(E * self.m_att)
        if lay.dyn and stride == 1:
            a0 = self.bn1_segments['dyn'][0]
            bn_ranges += [(a0 + a, a0 + b) for a, b in dyn_rows]
            split.append(nd * E * self.m_dyn)
        pieces = []
        if bn_in:
            b1 = self._batch_norm(torch.cat(bn_in, 1) if len(bn_in) > 1 else bn_in[0], self.bn1_mean,
                                  self.bn1_var, bn_ranges)
            pieces = list(b1.split(split, 1)) if len(split) > 1 else [b1]
        pieces = iter(pieces)

        # features: second stage of the separable convs, then the stack [seps, dils, pools, FR | identity]
        stack = []
        if lay.conv:
            mid, final = next(pieces), next(pieces)
            if lay.seps:
                r2 = F.relu(mid)
                r2 = r2.split(E * C, 1) if len(lay.seps) > 1 else [r2]
                d = []
                for n, t in zip(lay.seps, r2):
                    _, pad, dil, _ = CONV_OPS[n]
                    d.append(F.conv2d(t, self.dw2[n], None, 1, pad, dil, E * C))
                i = [self.seps.index(n) for n in lay.seps]
                ranges = [(j * E * C, (j + 1) * E * C) for j in i]
                z2 = F.conv2d(torch.cat(d, 1) if len(d) > 1 else d[0], self._take(self.pw2, ranges),
                              groups=len(d) * E)
                stack.append(self._batch_norm(z2, self.bn2_mean, self.bn2_var, ranges))
            if len(lay.conv) > len(lay.seps):
                stack.append(final)
        if lay.pools:
            stack.append(next(pieces))
        skip = None  # for a gated `mix`: the skip outputs (N, S, C, Ho, Wo), or FactorizedReduce's 6-d view
        if lay.fr:  # BN1 holds it as (half, e, C/2): each edge's C channels are its two halves
            stack.append(next(pieces).view(N, 2, E, C // 2, Ho, Wo).transpose(1, 2))
            skip = stack[-1]
        if lay.identity_edges:  # each edge's own dropout mask, as each reference MixedOp draws its own
            stack.append(F.dropout(_per_edge(next(x_uses), S, K), self.skip_dropout, self.training))
        elif lay.identity:
            stack.append(next(x_uses))
        if lay.identity:
            skip = stack[-1].view(N, -1, C, Ho, Wo)
        if 'F' in lay.fold:
            stack.append(pending['F'].reshape(N, K * C, Ho, Wo))
        if stack:
            if lay.fr:  # 6-d, so that the FactorizedReduce halves join without a copy of their own
                stack = torch.cat([t if t.dim() == 6 else t.view(N, -1, 2, C // 2, Ho, Wo) for t in stack], 1)
            else:
                stack = torch.cat(stack, 1) if len(stack) > 1 else stack[0]
            stacks['F'] = stack.view(N, -1, C, Ho, Wo)

        # spatial attention (Eq. 3 / 7): 1x1 conv, BN, ReLU (above), 3x3 conv -> 1 per edge, sigmoid
        if lay.sa:
            sa = torch.sigmoid(F.conv2d(F.relu(next(pieces)), self.sa2, padding=1, groups=E))  # (N, E, Ho, Wo)
            stacks['SA'] = sa.view(N, E, 1, Ho, Wo)

        # the node's kernel entries: dynamic kernels (Eq. 4 / 8), channel attention, identity (see _node)
        ks = self.kernel_size
        kk = ks * ks
        kernels = []
        if lay.dyn:  # Fig. 1: every (op, edge) at once, each op's k*k taps on the ks x ks grid
            if stride == 1:
                z = next(pieces)
            else:  # full resolution (see above): the bottlenecks' own BatchNorm, on BN1's 'dyn' buffers
                a0 = self.bn1_segments['dyn'][0]
                z = self._batch_norm(torch.cat(dyn_in, 1) if nd > 1 else dyn_in[0], self.bn1_mean, self.bn1_var,
                                     [(a0 + a, a0 + b) for a, b in dyn_rows])
            z = F.relu(z).view(N * nd * E, self.m_dyn, H * W)                                # (a) bottleneck
            if not merged:
                y_tf = [F.conv2d(next(x_uses), w, groups=S) for w in x_tf]  # stride 1, as the bottleneck
                y_tf = torch.cat(y_tf, 1) if nd > 1 else y_tf[0]
            if merged:  # a slice of the merged conv's output: one copy, so that the view below is one
                y_tf = y_tf.contiguous()
            mask = y_tf.view(N * nd * E, kk, H * W).softmax(dim=2)                       # (b) over positions
            taps = torch.bmm(z, mask.transpose(1, 2)).view(N, nd * E * self.m_dyn, ks, ks)
            w = self._take(self.decode, self._dyn_rows(lay.dyn, C))
            kern = F.conv2d(taps, w, groups=nd * E).view(N, nd, E, C, kk)                    # (c) decode
            bias = self._tap_bias(lay.dyn, kern)
            if bias is not None:
                kern = kern + bias
            kernels.append(kern.softmax(dim=4).view(N, nd * E, C * kk))                      # softmax over taps
        if lay.ca:  # global pool, 1x1 conv C -> C/16, ReLU, 1x1 conv -> C, sigmoid: a kernel's centre tap
            if merged:
                g = F.adaptive_avg_pool2d(y_ca, 1)
            else:
                g = F.conv2d(F.adaptive_avg_pool2d(next(x_uses), 1), self.ca1, groups=S)
            g = torch.sigmoid(F.conv2d(F.relu(g), self.ca2, self.ca_bias, groups=E))  # (N, E*C*kk, 1, 1)
            kernels.append(g.view(N, E, C * kk))
        if lay.delta:
            kernels.append(self.delta.expand(N, 1, C * kk))
        if 'D' in lay.fold:
            kernels.append(pending['D'].reshape(N, K, C * kk))
        if lay.dyn or lay.ca:
            stack = torch.cat(kernels, 1) if len(kernels) > 1 else kernels[0]
            stacks['D'] = stack.view(N, -1, C, ks, ks)
        out = self.mix(stacks, coef, lay, skip)
        if lay.delta and 'D' not in out:  # the identity alone (every kernel op pruned here): coefficient 1
            out['D'] = kernels[0].view(N, 1, C, ks, ks).expand(N, K, C, ks, ks)
        return out

    def mix(self, stacks: dict, coef: dict, lay: _Layout, skip=None) -> dict:
        """The weighted sums over ops and edges (Eq. 2-4 / 6-8) for every kind: stacks[kind] (N, Q, c, h, w)
        (the Q stacked entries; c = C channels, 1 for spatial attention maps; h x w: the resolution, or the
        kernel's taps for 'D') -> (N, K, c, h, w), one contraction each with the (K, Q) coefficients that
        `FastPlan.prepare` gathered. A gated edge (agnas.FastGatedEdges) overrides this with its per-sample,
        per-channel gates; `skip` is for it: the edges' skip_connect outputs, (N, S, C, h, w), or
        FactorizedReduce's (N, E, 2, C/2, h, w) view; None without skip_connect."""
        return {kind: _contract(t.flatten(2), coef[kind]).view(t.shape[0], -1, *t.shape[2:])
                for kind, t in stacks.items()}

    # -- the reference's weights ----------------------------------------------------------------------
    def from_plain(self, mixed: list, ops: list[str], get) -> dict:
        """This group's parameters and buffers (name -> tensor) assembled from the reference's MixedOps of
        its edges (`mixed[e]`, e = s * K + k), `get(t)` applied to each reference tensor (t.detach() to
        copy weights and buffers; t.grad to compare gradients, which leaves out the buffers)."""
        col = {n: i for i, n in enumerate(ops)}
        E, K, S = self.E, self.K, self.S

        def ops_of(n):
            return [m._ops[col[n]] for m in mixed]

        def join(ts):  # None (no gradient, or a buffer's) when any piece is None
            return None if any(t is None for t in ts) else torch.cat(ts)

        def cat(ts):
            return join([get(t) for t in ts])

        out = {}
        first = {n: [op[0] if CONV_OPS[n][3] else op for op in ops_of(n)] for n in self.conv}
        for n in self.conv:
            out[f'dw1.{n}'] = cat([d[1].weight for d in first[n]])
        if self.conv:
            out['pw1'] = join([cat([d[2].weight for d in first[n]]) for n in self.conv])
        for n in self.seps:
            out[f'dw2.{n}'] = cat([op[1][1].weight for op in ops_of(n)])
        if self.seps:
            out['pw2'] = join([cat([op[1][2].weight for op in ops_of(n)]) for n in self.seps])
            out['bn2_mean'] = join([cat([op[1][3].running_mean for op in ops_of(n)]) for n in self.seps])
            out['bn2_var'] = join([cat([op[1][3].running_var for op in ops_of(n)]) for n in self.seps])
        if self.has_fr:
            out['fr1'] = cat([op.conv_1.weight for op in ops_of('skip_connect')])
            out['fr2'] = cat([op.conv_2.weight for op in ops_of('skip_connect')])
        if self.has_sa:
            out['xsa'] = cat([op.conv_1.weight for op in ops_of('spatial_attention')])
            out['sa2'] = cat([op.conv_2.weight for op in ops_of('spatial_attention')])
        if self.has_ca:
            out['ca1'] = cat([op.conv_1.weight for op in ops_of('channel_attention')])
            w = cat([op.conv_2.weight for op in ops_of('channel_attention')])
            out['ca2'] = None if w is None else self._on_taps(w, self.kernel_size ** 2)
        dyn = {n: ops_of(n) for n in self.dyn}
        if self.dyn:
            for n in self.dyn:
                out[f'xdyn.{n}'] = cat([op.bottleneck[0].weight for op in dyn[n]])
                w = cat([op.transform.weight for op in dyn[n]])
                k = DYNAMIC_SIZES[n]
                out[f'transform.{n}'] = None if w is None else self._on_grid(w.view(E, k, k, self.C),
                                                                              self.kernel_size)
            out['decode'] = cat([dyn[n][e].decode.weight for n in self.dyn for e in range(E)])
        for stat in ('mean', 'var'):
            pieces = []
            for key in self.bn1_segments:
                if key == 'fr':
                    half = self.C // 2
                    bns = [op.bn for op in ops_of('skip_connect')]
                    pieces += [getattr(bn, f'running_{stat}')[h * half:(h + 1) * half] for h in (0, 1)
                               for bn in bns]
                elif key == 'sa':
                    pieces += [getattr(op.bn_1, f'running_{stat}') for op in ops_of('spatial_attention')]
                elif key == 'dyn':
                    pieces += [getattr(dyn[n][e].bottleneck[1], f'running_{stat}') for n in self.dyn
                               for e in range(E)]
                elif key[0] == 'pool':  # the same statistics on every edge of a source: take edge (s, 0)
                    pieces += [getattr(ops_of(key[1])[s * K][1], f'running_{stat}') for s in range(S)]
                else:
                    pieces += [getattr(d[3], f'running_{stat}') for d in first[key[1]]]
            if pieces:
                out[f'bn1_{stat}'] = cat(pieces)
        return {k: v for k, v in out.items() if v is not None}


class _FastPreprocess(nn.Module):
    """The reference's preprocessing of the two cell inputs (ReLU, 1x1 conv, non-affine BN; FactorizedReduce
    for s0 after a reduction cell), returned as one (N, 2C, H, W) tensor: the X of the input group. One
    BatchNorm over both; when both inputs have the same width and s0 needs no reduction, also one ReLU and
    one grouped conv. (F.batch_norm with the modules' fixed momentum 0.1: their step counter never mattered.)
    """

    def __init__(self, C_prev_prev: int, C_prev: int, C: int, reduction_prev: bool):
        super().__init__()
        self.C = C
        self.pair = not reduction_prev and C_prev_prev == C_prev
        self.reduce0 = reduction_prev

        def param(c_out, c_in):  # nn.Conv2d's initialisation
            return nn.Parameter(torch.empty(c_out, c_in, 1, 1).uniform_(-c_in ** -0.5, c_in ** -0.5))

        if self.pair:
            self.w = param(2 * C, C_prev)
        else:
            if reduction_prev:
                self.w0a, self.w0b = param(C // 2, C_prev_prev), param(C // 2, C_prev_prev)
            else:
                self.w0 = param(C, C_prev_prev)
            self.w1 = param(C, C_prev)
        self.register_buffer('bn_mean', torch.zeros(2 * C))
        self.register_buffer('bn_var', torch.ones(2 * C))

    def forward(self, s0, s1):
        if self.pair:
            z = F.conv2d(F.relu(torch.cat([s0, s1], 1)), self.w, groups=2)
        else:
            r0, r1 = F.relu(s0), F.relu(s1)
            z = ([F.conv2d(r0, self.w0a, stride=2), F.conv2d(r0[:, :, 1:, 1:], self.w0b, stride=2)]
                 if self.reduce0 else [F.conv2d(r0, self.w0)])
            z = torch.cat(z + [F.conv2d(r1, self.w1)], 1)
        return F.batch_norm(z, self.bn_mean, self.bn_var, None, None, self.training, BN_MOMENTUM, BN_EPS)

    def from_plain(self, p0: nn.Module, p1: nn.Module, get) -> dict:
        """From the reference cell's preprocess0 (ReLUConvBN or FactorizedReduce) and preprocess1."""
        bn0 = p0.bn if self.reduce0 else p0[2]
        w0 = [p0.conv_1.weight, p0.conv_2.weight] if self.reduce0 else [p0[1].weight]
        out = {'bn_mean': [bn0.running_mean, p1[2].running_mean], 'bn_var': [bn0.running_var, p1[2].running_var]}
        if self.pair:
            out['w'] = [w0[0], p1[1].weight]
        elif self.reduce0:
            out.update(w0a=[w0[0]], w0b=[w0[1]], w1=[p1[1].weight])
        else:
            out.update(w0=[w0[0]], w1=[p1[1].weight])
        out = {k: [get(t) for t in v] for k, v in out.items()}  # None: no gradient (buffers)
        return {k: torch.cat(v) for k, v in out.items() if all(t is not None for t in v)}


class FastCell(nn.Module):
    """The fast path of DartsCell (space 'darts') and NOSCell (space 'nos'): the same cell, run by source
    group (see the section comment). `forward(s0, s1, weights)` takes the FastWeights that
    `FastPlan.prepare` made of the cell type's (rows x ops) weights.

    Order of work: the group of the two inputs (contributions to every node); then per node k: its first
    tier is complete (NOS: S_k = F + F*A + dwconv(F, D), Eq. 5; its second-tier group, Eq. 6-9; DARTS:
    node = F), and its own group adds its contributions to the later nodes.
    """

    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev, ops, space,
                 edges=None):
        super().__init__()
        self.reduction = reduction
        self.preprocess = _FastPreprocess(C_prev_prev, C_prev, C, reduction_prev)
        self._steps = steps
        self._multiplier = multiplier
        self.space = space
        self.specs = _group_specs(steps, space, reduction)
        edges = edges or FastEdges  # or a method's own group of edges (agnas.FastGatedEdges)
        self.groups = nn.ModuleList(edges(C, spec['stride'], ops, len(spec['sources']), len(spec['targets']),
                                              spec.get('carrier', False)) for spec in self.specs)

    def forward(self, s0, s1, weights: FastWeights):
        x = self.preprocess(s0, s1)  # (N, 2C, H, W): both preprocessed inputs, the input group's X
        h, w = x.shape[-2:]
        size = ((h + 1) // 2, (w + 1) // 2) if self.reduction else (h, w)
        states = [x[:, :x.shape[1] // 2], x[:, x.shape[1] // 2:]]  # views; only a multiplier > steps reads them
        shape = (x.shape[0], x.shape[1] // 2, *size)
        coefs = weights.split()
        groups = iter(zip(self.groups, coefs, weights.layouts))

        def run(xs, pending=None):
            group, coef, layout = next(groups)
            out = group(xs, coef, layout, pending)
            for kind, v in (pending or {}).items():  # the sums the contraction did not fold in
                if kind not in layout.fold:
                    out[kind] = out[kind] + v if kind in out else v
            return out

        pending = run([x])  # (N, K, ...) per kind: what the nodes still to come have received
        for k in range(self._steps):
            current, rest = {}, {}
            for kind, v in pending.items():
                if v.shape[1] == 1:
                    current[kind] = v.squeeze(1)
                else:
                    first, rest[kind] = v.split([1, v.shape[1] - 1], 1)
                    current[kind] = first.squeeze(1)
            node = _node(current, x, shape)
            if self.space == 'nos':
                second = {kind: v.squeeze(1) for kind, v in run([node]).items()}
                # a pruned second tier without a feature op: F is S_k itself (as in NOSCell)
                node = _node({'F': node, **second}, x, shape)  # Eq. 6-9
            states.append(node)
            if k < self._steps - 1:
                pending = run([node], rest)
        return torch.cat(states[-self._multiplier:], dim=1)

    def from_plain(self, plain: nn.Module, ops: list[str], get) -> dict:
        """Every parameter (and, with get=detach, buffer) of this cell from the reference cell `plain`."""
        out = {f'preprocess.{k}': v for k, v in self.preprocess.from_plain(plain.preprocess0, plain.preprocess1,
                                                                          get).items()}
        n_first = len(plain._ops)
        for i, (spec, group) in enumerate(zip(self.specs, self.groups)):
            mixed = [plain._ops[r] if r < n_first else plain._second[r - n_first]
                     for row in spec['rows'] for r in row]
            for name, t in group.from_plain(mixed, ops, get).items():
                out[f'groups.{i}.{name}'] = t
        return {k: v for k, v in out.items() if v is not None}


def _node(c: dict, like: torch.Tensor, shape) -> torch.Tensor:
    """A node from its summed contributions (Eq. 5 / 9): S = F + F*(SA + CA) + dwconv(F, D), computed as
    dwconv(F, D + CA*delta + delta) + F*SA, where delta is the identity kernel: dwconv is linear in the
    kernel, and a kernel that is c at its centre tap scales by c. The groups already put CA and delta in
    'D' (`FastEdges.forward`). F is zero when every feature op into the node is dead."""
    f = c.get('F')
    if f is None:
        f = like.new_zeros(shape)
    if 'D' not in c:
        return f + f * c['SA'] if 'SA' in c else f
    f = f.contiguous()  # a slice of the pending sums; the per-sample conv folds the batch into channels
    out = dynamic_conv(f, c['D'].contiguous())
    return out + f * c['SA'] if 'SA' in c else out


# -- NAS-Bench-201 ------------------------------------------------------------------------------------------
# NB201's cell (model_search.NB201Cell) by source group: the edges from node j to the later nodes read the same
# input, so each conv op over them is ONE convolution with (edges x C) output channels after ONE ReLU of the
# input, one non-affine BatchNorm covers every conv output of the group, the pool and the identity are
# computed once per source, and the weighted sum over ops and edges is one contraction (`_contract`) that
# also adds what the earlier groups gave the same nodes (coefficient 1). Under an alive mask a conv runs only
# over the edges where it is alive (EoiNAS prunes edge by edge); the pool and the identity run when alive
# on any edge of the group, weighed 0 on the others.

NB201_CONVS = {'nor_conv_1x1': 1, 'nor_conv_3x3': 3}  # ReLU -> Conv k x k (with bias) -> BN (affine off)


def _nb201_groups() -> list[dict]:
    """The source groups of NB201's cell, in the order the cell runs them: node j (0, 1, 2) feeds the nodes
    j+1..3; 'rows' (one source): the rows of A of those edges, in target order (genotypes.NB201_EDGES)."""
    nodes = genotypes.NB201_NODES
    return [{'sources': (j,), 'targets': tuple(range(j + 1, nodes)),
             'rows': [[genotypes.NB201_EDGES.index((i, j)) for i in range(j + 1, nodes)]]}
            for j in range(nodes - 1)]


class _NB201Layout:
    """What one NB201 group computes under an alive mask, and where its contraction weights come from.

    `convs`: op -> the edges (0..K-1) where it is alive, ops dead on every edge left out; `pool`, `identity`:
    alive on some edge; `skip_edges`: under EoiNAS's skip dropout, the edges whose identity is alive (each
    draws its own mask, so each is its own entry), else None. `index['F']` lists per target k the flat index
    of each stack entry's coefficient in [A.flatten(), 0, 1] (FastPlan.prepare gathers them): the conv
    entries (op by op, then edge), the pool, the identity (x sources, or x skip_edges), then the K pending
    sums of the earlier groups (`fold`: coefficient `one` on the diagonal). Also what agnas's gated `mix`
    reads of a layout (`rows`, `ncol`, `zero`, `one`, `alive`: the whole mask; no attention or dynamic ops).
    """
    sa = ca = False
    dyn = ()

    def __init__(self, spec: dict, ops: list[str], alive, zero: int, one: int, fold: bool, dropout: bool):
        col = {name: i for i, name in enumerate(ops)}
        ncol = len(ops)
        (rows,) = spec['rows']
        self.rows, self.ncol, self.zero, self.one, self.alive = spec['rows'], ncol, zero, one, alive
        K = len(rows)

        def edges(name):
            return [k for k in range(K) if name in col and alive[rows[k]][col[name]]]

        def coef(name, k):
            return rows[k] * ncol + col[name] if alive[rows[k]][col[name]] else zero

        self.convs = {n: edges(n) for n in ops if n in NB201_CONVS and edges(n)}
        self.pool = bool(edges('avg_pool_3x3'))
        self.identity = bool(edges('skip_connect'))
        self.skip_edges = edges('skip_connect') if dropout and self.identity else None
        f = []
        for k in range(K):
            row = [coef(n, k) if e == k else zero for n, es in self.convs.items() for e in es]
            if self.pool:
                row.append(coef('avg_pool_3x3', k))
            if self.skip_edges:
                row += [coef('skip_connect', k) if e == k else zero for e in self.skip_edges]
            elif self.identity:
                row.append(coef('skip_connect', k))
            f.append(row)
        self.fold = fold and bool(f[0])  # a group that computes nothing passes the pending sums on as they are
        if self.fold:
            f = [row + [one if j == k else zero for j in range(K)] for k, row in enumerate(f)]
        self.index = {'F': f} if f[0] else {}


class NB201Plan(FastPlan):
    """FastPlan for NAS-Bench-201's one cell type: its three source groups and their layouts per alive mask;
    `prepare(weights, alive, dropout)` (one gather of every group's contraction weights) is FastPlan's."""

    def __init__(self, ops: list[str]):  # FastPlan's attributes, for NB201's groups
        self.ops = list(ops)
        self.groups = _nb201_groups()
        self.rows = len(genotypes.NB201_EDGES)
        self._layouts, self._index, self._tail = {}, {}, {}

    def layouts(self, alive=None, dropout: bool = False) -> tuple[list[_NB201Layout], tuple]:
        if alive is None:
            alive = [[True] * len(self.ops)] * self.rows
        elif isinstance(alive, torch.Tensor):
            alive = alive.tolist()
        alive = [[bool(v) for v in row] for row in alive]
        if len(alive) != self.rows or any(len(row) != len(self.ops) for row in alive):
            raise ValueError(f'the alive mask must be {self.rows} x {len(self.ops)} (rows x ops)')
        key = (tuple(map(tuple, alive)), dropout)
        if key not in self._layouts:
            zero = self.rows * len(self.ops)
            self._layouts[key] = [_NB201Layout(spec, self.ops, alive, zero, zero + 1, g > 0, dropout)
                                  for g, spec in enumerate(self.groups)]
        return self._layouts[key], key


class NB201Edges(nn.Module):
    """All K edges leaving one node of an NB201 cell, every op at once (see the section comment).

    Parameters: per conv op its K edges' weights and biases stacked edge by edge ((K*C, C, k, k), (K*C,));
    buffers (with track_running_stats): the running statistics of one BatchNorm over [1x1 convs | 3x3 convs],
    each K*C channels, edge-major. `forward(x, coef, layout, pending)` returns the group's sums for its K
    targets, (N, K, C, H, W), the pending sums of the earlier groups included. `from_plain` assembles the
    tensors from the reference's MixedOps of these edges.
    """

    def __init__(self, C: int, ops: list[str], K: int, track_running_stats: bool = True):
        super().__init__()
        self.C, self.K, self.E, self.S = C, K, K, 1  # E, S: what agnas's gated `mix` reads (one source)
        self.track = track_running_stats
        self.convs = [n for n in ops if n in NB201_CONVS]
        self.skip_dropout = 0.  # EoiNAS: dropout after each edge's skip_connect (MixedOp.skip_dropout)
        self._cache = {}

        def param(*shape):  # nn.Conv2d's initialisation (the Network loads the reference's weights anyway)
            bound = math.prod(shape[1:]) ** -0.5 if len(shape) > 1 else C ** -0.5
            return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))

        k = NB201_CONVS
        self.weight = nn.ParameterDict({n: param(K * C, C, k[n], k[n]) for n in self.convs})
        self.bias = nn.ParameterDict({n: param(K * C) for n in self.convs})  # bias=not affine, as the benchmark's
        if track_running_stats and self.convs:
            self.register_buffer('bn_mean', torch.zeros(len(self.convs) * K * C))
            self.register_buffer('bn_var', torch.ones(len(self.convs) * K * C))

    def _ranges(self, n: str, edges, per_op: bool) -> list[tuple[int, int]]:
        """Channel ranges of op n's `edges` in its weight (per_op False) or in the BatchNorm's buffers."""
        a = self.convs.index(n) * self.K * self.C if per_op else 0
        return _merge([(a + e * self.C, a + (e + 1) * self.C) for e in edges])

    def _rows(self, t: torch.Tensor, ranges) -> torch.Tensor:
        """Rows of t in `ranges`: a view when they are adjacent (always, with nothing pruned)."""
        if len(ranges) == 1:
            a, b = ranges[0]
            return t if (a, b) == (0, t.shape[0]) else t[a:b]
        key = (tuple(ranges), t.device)
        if key not in self._cache:
            self._cache[key] = torch.cat([torch.arange(a, b) for a, b in ranges]).to(t.device)
        return t.index_select(0, self._cache[key])

    def _batch_norm(self, z: torch.Tensor, lay: _NB201Layout) -> torch.Tensor:
        if not self.track:  # the batch's statistics in training and evaluation alike
            return F.batch_norm(z, None, None, None, None, True, BN_MOMENTUM, BN_EPS)
        ranges = _merge([r for n, es in lay.convs.items() for r in self._ranges(n, es, True)])
        mean, var = self._rows(self.bn_mean, ranges), self._rows(self.bn_var, ranges)
        out = F.batch_norm(z, mean, var, None, None, self.training, BN_MOMENTUM, BN_EPS)
        if self.training and len(ranges) > 1:  # gathered (pruned edges in between): write the updates back
            idx = self._cache[(tuple(ranges), z.device)]
            with torch.no_grad():
                self.bn_mean.index_copy_(0, idx, mean)
                self.bn_var.index_copy_(0, idx, var)
        return out

    def forward(self, x: torch.Tensor, coef: dict, lay: _NB201Layout, pending=None) -> torch.Tensor:
        N, C, H, W = x.shape
        xs = iter(_fan_out(x, bool(lay.convs) + lay.pool + lay.identity))
        entries = []
        if lay.convs:  # one ReLU, one conv per op over its alive edges, one BatchNorm over them all
            r = F.relu(next(xs))
            z = []
            for n, es in lay.convs.items():
                ranges = self._ranges(n, es, False)
                z.append(F.conv2d(r, self._rows(self.weight[n], ranges), self._rows(self.bias[n], ranges),
                                  padding=NB201_CONVS[n] // 2))
            entries.append(self._batch_norm(torch.cat(z, 1) if len(z) > 1 else z[0], lay))
        if lay.pool:  # once per source: the same on every edge from it (no BN after it in NB201)
            entries.append(F.avg_pool2d(next(xs), 3, 1, 1, count_include_pad=False))
        if lay.skip_edges:  # each edge's own dropout mask, as each reference MixedOp draws its own
            entries.append(F.dropout(_per_edge(next(xs), 1, len(lay.skip_edges)), self.skip_dropout,
                                     self.training))
        elif lay.identity:
            entries.append(next(xs))
        if not entries:  # every edge of the group is `none`: it adds nothing
            return pending if pending is not None else x.new_zeros(N, self.K, C, H, W)
        if lay.fold:
            entries.append(pending.reshape(N, -1, H, W))
        stack = torch.cat(entries, 1) if len(entries) > 1 else entries[0]
        return self.mix({'F': stack.view(N, -1, C, H, W)}, coef, lay)['F']

    def mix(self, stacks: dict, coef: dict, lay, skip=None) -> dict:
        """The weighted sum over ops and edges: stacks['F'] (N, Q, C, H, W) -> (N, K, C, H, W), one
        contraction with the (K, Q) coefficients FastPlan.prepare gathered (agnas's gated edges override it)."""
        t = stacks['F']
        return {'F': _contract(t.flatten(2), coef['F']).view(t.shape[0], -1, *t.shape[2:])}

    def from_plain(self, mixed: list, ops: list[str], get) -> dict:
        """This group's parameters and buffers from the reference MixedOps of its edges (`mixed[k]`: the edge
        to its k-th target), `get(t)` applied to each reference tensor (see FastEdges.from_plain)."""
        col = {n: i for i, n in enumerate(ops)}

        def cat(ts):  # None (no gradient, or a buffer's) when any piece is None
            ts = [get(t) for t in ts]
            return None if any(t is None for t in ts) else torch.cat(ts)

        out = {}
        for n in self.convs:
            convs = [m._ops[col[n]] for m in mixed]  # ReLUConvBN: [ReLU, Conv2d, BatchNorm2d]
            out[f'weight.{n}'] = cat([op[1].weight for op in convs])
            out[f'bias.{n}'] = cat([op[1].bias for op in convs])
        if self.track and self.convs:
            for stat in ('mean', 'var'):
                out[f'bn_{stat}'] = cat([getattr(m._ops[col[n]][2], f'running_{stat}') for n in self.convs
                                         for m in mixed])
        return {k: v for k, v in out.items() if v is not None}


class NB201FastCell(nn.Module):
    """The fast path of model_search.NB201Cell: its three source groups (node 0 -> 1, 2, 3; node 1 -> 2, 3;
    node 2 -> 3) in turn, each group's contraction adding the pending sums of the earlier ones, so that node
    j + 1 is complete when group j is done. `forward(x, weights)` takes the FastWeights of NB201Plan.prepare.
    `edges`: a method's own group of edges (agnas.NB201FastGatedEdges)."""
    reduction = False

    def __init__(self, C: int, ops: list[str], track_running_stats: bool = True, edges=None):
        super().__init__()
        self.specs = _nb201_groups()
        edges = edges or NB201Edges
        self.groups = nn.ModuleList(edges(C, ops, len(spec['targets']), track_running_stats)
                                    for spec in self.specs)

    def forward(self, x: torch.Tensor, weights: FastWeights) -> torch.Tensor:
        node, pending = x, None
        for group, coef, lay in zip(self.groups, weights.split(), weights.layouts):
            out = group(node, coef, lay, pending)  # (N, K, C, H, W): the sums of node j's K targets
            if out.shape[1] == 1:
                node = out.squeeze(1)
            else:  # one split (one op in the backward, where a slice and a select would be three)
                node, pending = out.split([1, out.shape[1] - 1], 1)
                node = node.squeeze(1)
        return node

    def from_plain(self, plain: nn.Module, ops: list[str], get) -> dict:
        """Every parameter (and, with get=detach, buffer) of this cell from the reference NB201Cell `plain`."""
        out = {}
        for i, (spec, group) in enumerate(zip(self.specs, self.groups)):
            for name, t in group.from_plain([plain._ops[r] for r in spec['rows'][0]], ops, get).items():
                out[f'groups.{i}.{name}'] = t
        return out


class Network(model_search.Network):
    """`model_search.Network` with a choice of path (DARTS's signature first, then `fast`, `fast_edges`).

    fast: False builds the readable per-edge cells (DartsCell / NOSCell / NB201Cell, the reference); True builds
    FastCell (NB201FastCell), the same search in fewer, larger kernels (equal to the reference up to float round-off,
    test_fast_search.py). Its parameters are the reference's stacked by source group, and it starts from the
    reference's initial weights (same seed, same network); `load_plain(plain)` copies a reference network
    into it. Its state_dict has the fast layout.
    fast_edges: with method 'agnas' and fast=True, the fast path's gated group of edges (agnas.FastGatedEdges;
    on NAS-Bench-201 agnas.NB201FastGatedEdges).

    With alive masks (`set_alive`), the fast path does not compute an op that is dead on every edge of a
    source group, and weighs dead (edge, op) pairs 0.
    """

    def __init__(self, C: int, num_classes: int, layers: int, criterion=None, steps: int = 4,
                 multiplier: int = 4, stem_multiplier: int = 3, space: str = 'nos', ops=None,
                 method: str = 'darts', mixed_op=None, fast: bool = False, fast_edges=None,
                 track_running_stats: bool = True):
        if fast and method == 'agnas' and fast_edges is None:
            raise ValueError("method='agnas' with fast=True needs the fast path's gated edges: build it with "
                             "agnas.build_network, or pass fast_edges=agnas.FastGatedEdges")
        super().__init__(C, num_classes, layers, criterion, steps, multiplier, stem_multiplier, space, ops,
                         method, mixed_op, track_running_stats)
        self.fast = fast
        self._fast_edges = fast_edges
        if not fast:
            return
        if space == 'nb201':
            self._build_nb201_fast(fast_edges, track_running_stats)
            return
        self._fast_plans = {r: FastPlan(steps, space, self.ops, r) for r in (False, True)}
        for i, ref in enumerate(self.cells):
            # the reference cell's initial weights: one seed, one search, whichever the path
            with torch.random.fork_rng(devices=[]):
                cell = FastCell(steps, multiplier, *ref.shape, self.ops, space, fast_edges)
            cell.load_state_dict(cell.from_plain(ref, self.ops, torch.Tensor.detach))
            self.cells[i] = cell

    def _build_nb201_fast(self, fast_edges, track_running_stats: bool) -> None:
        """NB201FastCell in place of every NB201Cell, from its initial weights (one matrix A, one plan)."""
        edges = getattr(fast_edges, 'func', fast_edges)  # a class, or a functools.partial of one
        if edges is not None and not issubclass(edges, NB201Edges):
            raise ValueError(f'the NAS-Bench-201 cells take a group of NB201Edges, not {edges.__name__}')
        self._fast_plans = {False: NB201Plan(self.ops)}
        n = self._layers // 3
        for i, ref in enumerate(self.cells):
            with torch.random.fork_rng(devices=[]):
                cell = NB201FastCell(self._C * 2 ** (i // n), self.ops, track_running_stats, fast_edges)
            cell.load_state_dict(cell.from_plain(ref, self.ops, torch.Tensor.detach))
            self.cells[i] = cell

    def _extra_config(self) -> dict:
        return {'fast': self.fast, 'fast_edges': self._fast_edges}

    def structural_zeros(self) -> int:
        """Weights that are zero by construction (the transform borders), not weights to count."""
        return sum(m.structural_zeros for m in self.modules() if isinstance(m, FastEdges))

    def _set_active(self, *rows) -> None:
        if not self.fast:  # the fast cells take the alive mask with their weights (FastPlan.prepare)
            super()._set_active(*rows)

    def cell_weights(self):
        if self.fast and self.gumbel_hard:  # refused before a sample is drawn
            raise ValueError('the fast path computes every alive op; a hard Gumbel sample (one op per edge) '
                             'runs on the reference cells: build the network with fast=False')
        return super().cell_weights()

    def prepare_weights(self, weights, reduction: bool, alive=None):
        if not self.fast:
            return weights
        # one gather of the contraction weights per cell type (gated: layouts only), shared by its cells
        if alive is None:
            alive = None if self._all_alive else self._alive_lists[reduction]
        dropout = self.training and self._skip_dropout > 0
        return self._fast_plans[reduction].prepare(weights, alive, dropout)

    def gated_edges(self) -> list[nn.Module]:
        if not self.fast:
            return super().gated_edges()
        return [group for cell in self.cells for group in cell.groups]

    def importance(self, raw: bool = False) -> np.ndarray:
        if not self.fast:
            return super().importance(raw)
        out = np.empty((len(self.cells), self._fast_plans[False].rows, len(self.ops)))
        for i, cell in enumerate(self.cells):  # a group's (E, ops) gates back to the rows of its edges
            for spec, group in zip(cell.specs, cell.groups):
                gates = group.mean_raw_gates() if raw else group.mean_gates()
                for e, row in enumerate(r for rr in spec['rows'] for r in rr):
                    out[i, row] = gates[e]
        return out

    def plain_tensors(self, plain: Network, get=torch.Tensor.detach) -> dict:
        """This fast network's tensors (name -> tensor) assembled from the reference network `plain` of the
        same configuration: `get(t)` of each of its tensors (detach: weights and buffers; `lambda t: t.grad`:
        gradients, parameters only)."""
        if not self.fast or plain.fast:
            raise ValueError('plain_tensors maps a reference network (fast=False) into a fast one')
        out = {}
        for name, t in itertools.chain(plain.named_parameters(), plain.named_buffers()):
            if not name.startswith('cells.'):
                out[name] = get(t)
        for i, (cell, ref) in enumerate(zip(self.cells, plain.cells)):
            for name, t in cell.from_plain(ref, self.ops, get).items():
                out[f'cells.{i}.{name}'] = t
        return {k: v for k, v in out.items() if v is not None}

    def load_plain(self, plain: Network) -> None:
        """Copy the reference network `plain` (fast=False, same configuration) into this fast network."""
        state = self.plain_tensors(plain)
        own = self.state_dict()
        missing = [k for k in own if k not in state and not k.endswith('num_batches_tracked')]
        if missing:
            raise ValueError(f'no reference tensor for {missing[:3]}')
        self.load_state_dict({**own, **state})
