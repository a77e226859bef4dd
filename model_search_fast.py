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
dropout)`): the softmax of A, or a Gumbel-softmax sample. With alive masks (EoiNAS prunes each edge's own
ops) every op runs on exactly the edges where it is alive: its grouped conv covers those edges only, and one
gather per forward reads the weight rows and BatchNorm statistics of the alive (edge, op) pairs for the whole
network (`_Gather`), so a pruned search computes what the reference's MixedOps compute
(test_fast_prune.py counts it). Dead pairs weigh exactly 0. A method whose edges weigh
themselves (AGNAS) passes its own group of edges (`fast_edges`, agnas.FastGatedEdges), which overrides
`FastEdges.mix`.

NAS-Bench-201's cell (`--space nb201`) has its own section below (`NB201FastCell`, `NB201Edges`, `NB201Plan`):
the same source-group idea on its one-input cell, proven equal to model_search.NB201Cell by test_nb201_fast.py.
"""
from __future__ import annotations

import dataclasses
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

    Every op is computed on exactly the edges where it is alive (`edges[name]`, in edge order e = s * K + k;
    `none` never is: it adds w * 0), so that a pruned search computes what the reference's MixedOps compute.
    Pools and a stride-1 identity give the same output on every edge from one source: they run once per
    source that has an edge where they are alive (`sources[name]`). `index[kind]` lists, per (target,
    entry), the flat index of the coefficient in A's (rows x ops) matrix, or `zero` (a dead op on an edge, or
    an edge that does not feed that target). Entries of 'F' (the stacked feature outputs): separable convs
    (op by op, each over its edges), dilated convs, pools x their sources, then FactorizedReduce x its edges
    (stride 2) or identity x its sources (stride 1; x its edges with `dropout`, EoiNAS's skip dropout, since
    every edge drops its own copy). 'SA': spatial attention maps x its edges. 'D' (kernels of the node's one
    depthwise conv, see `_node`): dynamic kernels x (source, op, target) pairs (`dyn_pairs`), channel
    attention x its edges (a kernel with CA at its centre tap), and, in the group that carries it
    (`spec['carrier']`), the identity kernel with coefficient `one`. In a group from an inner node, 'F' and
    'D' end with the targets' pending sums from the earlier groups (coefficient 1: `fold`), so that one
    contraction also does that addition. `full`: every op of the space alive on every edge (the weights are
    then used as they are stored; otherwise FastEdges gathers the rows of the alive pairs).
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
        self.S, self.K, self.E = S, K, E
        stride = self.stride = spec['stride']
        on = {name: tuple(e for e in range(E) if alive[rows[e // K][e % K]][col[name]]) for name in ops}
        self.full = all(len(on[name]) == E for name in ops if name != 'none')
        self.edges = {name: on[name] for name in ops if name != 'none' and on[name]}
        self.sources = {name: tuple(sorted({e // K for e in es})) for name, es in self.edges.items()}
        live = list(self.edges)
        conv = [n for n in live if n in CONV_OPS]
        self.seps = [n for n in conv if CONV_OPS[n][3]]
        self.dils = [n for n in conv if not CONV_OPS[n][3]]
        self.conv = self.seps + self.dils
        self.pools = [n for n in live if n in POOL_OPS]
        skip = self.edges.get('skip_connect', ())
        # identity (stride 1): per source; under skip dropout (EoiNAS) per edge, each edge dropping its own copy
        self.identity = bool(skip) and stride == 1
        self.identity_edges = skip if self.identity and dropout else ()
        self.fr = skip if stride == 2 else ()  # FactorizedReduce, per edge
        self.sa = self.edges.get('spatial_attention', ())
        self.ca = self.edges.get('channel_attention', ())
        self.dyn = [n for n in live if n in DYNAMIC_SIZES]
        self.dyn_pairs = [(n, s * K + k) for s in range(S) for n in self.dyn for k in range(K)
                          if s * K + k in self.edges[n]]

        def coef(name, e, kt):
            r = rows[e // K][e % K]
            return r * ncol + col[name] if e % K == kt and alive[r][col[name]] else zero

        def per_source(name, kt):
            return [coef(name, s * K + kt, kt) for s in self.sources[name]]

        index = {}
        f = []
        for kt in range(K):
            row = [coef(n, e, kt) for n in self.conv for e in self.edges[n]]
            for n in self.pools:
                row += per_source(n, kt)
            row += [coef('skip_connect', e, kt) for e in self.fr + self.identity_edges]
            if self.identity and not self.identity_edges:
                row += per_source('skip_connect', kt)
            f.append(row)
        # what the earlier groups gave these targets so far joins the contraction with coefficient 1
        self.fold = {kind for kind in pending if kind == 'F' and f[0] or kind == 'D' and (self.dyn or self.ca)}
        if 'F' in self.fold:
            f = [row + [one if j == kt else zero for j in range(K)] for kt, row in enumerate(f)]
        if f[0]:
            index['F'] = f
        if self.sa:
            index['SA'] = [[coef('spatial_attention', e, kt) for e in self.sa] for kt in range(K)]
        self.delta = spec.get('carrier', False) and any(n in DYNAMIC_SIZES or n == 'channel_attention'
                                                         for n in ops)
        if self.dyn or self.ca:
            index['D'] = [[coef(n, e, kt) for n, e in self.dyn_pairs]
                          + [coef('channel_attention', e, kt) for e in self.ca]
                          + ([one] if self.delta else [])
                          + ([one if j == kt else zero for j in range(K)] if 'D' in self.fold else [])
                          for kt in range(K)]
        self.index = index
        self.kinds = set(index) | ({'D'} if self.delta else set())


class FastWeights:
    """The contraction weights of every group of one cell type, gathered once per forward
    (`FastPlan.prepare`); each cell takes its own `split()` of them (one backward op per cell)."""

    def __init__(self, layouts, flat, shapes, given=None):
        self.layouts, self.flat, self.shapes = layouts, flat, shapes
        self.given = given or [None] * len(layouts)  # per group: a pruned group's gathered rows (`_Gather`)

    def with_given(self, given: list) -> FastWeights:
        return FastWeights(self.layouts, self.flat, self.shapes, given)

    def split(self) -> list[dict]:
        if self.flat is None:  # gated edges (AGNAS): no coefficients, each group weighs itself
            return [{} for _ in self.layouts]
        pieces = iter(self.flat.split([k * n for _, _, (k, n) in self.shapes]))
        out = [{} for _ in self.layouts]
        for (g, kind, (k, n)), piece in zip(self.shapes, pieces):
            out[g][kind] = piece.view(k, n, 1)
        return out


def _alive_rows(alive, rows: int, ops: int) -> list[list[bool]]:
    """An alive mask (tensor or nested list) as `rows` lists of `ops` bools, checked for its shape."""
    if isinstance(alive, torch.Tensor):
        alive = alive.tolist()
    alive = [[bool(v) for v in row] for row in alive]
    if len(alive) != rows or any(len(row) != ops for row in alive):
        raise ValueError(f'the alive mask must be {rows} x {ops} (rows x ops)')
    return alive


class FastPlan:
    """The group structure of one cell type (normal or reduction) of the fast path, shared by its cells.

    `prepare(weights, alive, dropout)` takes any (rows x ops) weight matrix (DARTS's softmax of A, a
    Gumbel-softmax sample, ...), an optional alive mask of the same shape (bool; None: all alive) and whether
    skip dropout is on (then every edge's identity is its own entry), and returns the FastWeights the cells
    use. An op is computed on the edges where it is alive only (`_Layout`); dead entries weigh exactly 0, as
    in the reference with those weights zeroed.
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
            alive = _alive_rows(alive, self.rows, len(self.ops))
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


GRID = 5  # merged depthwise convs (NOS space): every kernel on the 5 x 5 grid, a 3 x 3 one with a zero border


def _grid_taps(k: int) -> torch.Tensor:
    """Per tap of the GRID x GRID grid, the index of that tap in a centred k x k kernel, or -1 (the border)."""
    p = (GRID - k) // 2
    return torch.tensor([(a - p) * k + (b - p) if p <= a < p + k and p <= b < p + k else -1
                         for a in range(GRID) for b in range(GRID)])


class _MergedGather:
    """The merged depthwise weights (`FastEdges.merged`) of groups that compute every op on every edge, read
    for all of them at once (the fast Network does it once per forward): one cat of their 3x3 and 5x5
    depthwise weights (flattened, and a 0 for the border taps) and one index_select. The border taps of a 3x3
    kernel read the 0, so they get no gradient; the parameters keep the reference's shapes.
    items: [group]; `weights()`: per group, name -> merged weight."""

    def __init__(self, groups):
        self.groups = groups
        self.params, index, self.shapes, at = [], [], [], 0  # shapes: (group, name, shape) per merged weight
        for j, group in enumerate(groups):
            names, weights = group._merged_index()
            base = []
            for name in names:
                base.append(at)
                self.params.append(group._param(name))
                at += self.params[-1].numel()
            base = torch.tensor(base)
            for name, (shape, slot, loc) in weights.items():
                index.append(torch.where(loc >= 0, base[slot] + loc, -1))
                self.shapes.append((j, name, shape))
        index = torch.cat(index)
        # `at`: the appended 0; int32 (what autograd saves for the backward is half an int64 index)
        self.index = torch.where(index >= 0, index, at).to(self.params[0].device, torch.int32)

    def weights(self) -> list[dict]:
        zero = self.params[0].new_zeros(1)
        flat = torch.cat([p.reshape(-1) for p in self.params] + [zero])
        pieces = flat.index_select(0, self.index).split([math.prod(s) for _, _, s in self.shapes])
        out = [{} for _ in self.groups]
        for (j, name, shape), piece in zip(self.shapes, pieces):
            out[j][name] = piece.view(shape)
        return out


def _per_edge(x: torch.Tensor, S: int, K: int) -> torch.Tensor:
    """(N, S*C, H, W) -> (N, S*K*C, H, W): each source's channels copied for its K edges, edge-major."""
    N, _, H, W = x.shape
    C = x.shape[1] // S
    return x.view(N, S, 1, C, H, W).expand(N, S, K, C, H, W).reshape(N, S * K * C, H, W)


_CONSTANTS = {}  # small index and 0/1 tensors, made once per (content, device, dtype)


def _constant(key, make) -> torch.Tensor:
    if key not in _CONSTANTS:
        _CONSTANTS[key] = make()
    return _CONSTANTS[key]


def _copy_sources(x: torch.Tensor, S: int, sources: tuple) -> torch.Tensor:
    """(N, S*C, H, W) -> (N, len(sources)*C, H, W): the channels of source sources[j] as block j (one copy
    per edge: `sources` holds each edge's source)."""
    N, _, H, W = x.shape
    C = x.shape[1] // S
    J = len(sources)
    if S == 1:
        return x.view(N, 1, C * H * W).expand(N, J, C * H * W).reshape(N, J * C, H, W)
    if J % S == 0 and sources == tuple(s for s in range(S) for _ in range(J // S)):
        return _per_edge(x, S, J // S)
    index = _constant(('sources', sources, x.device), lambda: torch.tensor(sources, device=x.device))
    return x.reshape(N, S, C * H * W).index_select(1, index).view(N, J * C, H, W)


@dataclasses.dataclass(frozen=True)
class _Repeat:
    """A `_fan` spec (S = 1): x seen n times, as an expanded (N, n, C, H, W) view (no copy)."""
    n: int


def _hand_out(x: torch.Tensor, S: int, specs) -> list[torch.Tensor]:
    """What each consumer of x takes (see `_fan`), without autograd bookkeeping."""
    C = x.shape[1] // S
    copies, out = {}, []
    for spec in specs:
        if spec is None:
            out.append(x)
        elif isinstance(spec, _Repeat):
            out.append(x.unsqueeze(1).expand(x.shape[0], spec.n, *x.shape[1:]))
        elif isinstance(spec, int):
            out.append(x[:, spec * C:(spec + 1) * C])
        else:
            if spec not in copies:
                copies[spec] = _copy_sources(x, S, spec)
            out.append(copies[spec])
    return out


class _Fan(torch.autograd.Function):
    """The consumers of one tensor x (N, S*C, H, W) of S sources (see `_fan`), each handed its own output, so
    that their gradients come back one by one and are summed in one reduction (two kernels: cat, then a sum,
    or with S > 1 a 0/1 contraction onto the sources) rather than by autograd's pairwise adds."""

    @staticmethod
    def forward(ctx, x, S, specs):
        ctx.set_materialize_grads(False)
        ctx.meta = (S, x.shape[1] // S, specs)
        return tuple(t.view_as(t) for t in _hand_out(x, S, specs))  # one output each, shared copies shared

    @staticmethod
    def backward(ctx, *grads):
        S, C, specs = ctx.meta
        got = [(spec, g) for spec, g in zip(specs, grads) if g is not None]
        if not got:
            return None, None, None
        if all(spec is None for spec, _ in got):
            return (got[0][1] if len(got) == 1 else torch.stack([g for _, g in got]).sum(0)), None, None
        N, H, W = got[0][1].shape[0], *got[0][1].shape[-2:]
        # n copies of x (S = 1) as a copy for n edges of source 0: (N, n * C, H, W), a view
        got = [((0,) * spec.n, g.reshape(N, -1, H, W)) if isinstance(spec, _Repeat) else (spec, g) for spec, g in got]
        src = tuple(s for spec, _ in got for s in (range(S) if spec is None else (spec,) if isinstance(spec, int)
                                                   else spec))
        g = torch.cat([g for _, g in got], 1) if len(got) > 1 else got[0][1]
        if src == tuple(range(S)):
            return g, None, None
        g = g.reshape(N, len(src), C * H * W)
        if S == 1:
            return g.sum(1).view(N, C, H, W), None, None
        key = ('fan', src, S, g.device, g.dtype)
        onto = _constant(key, lambda: torch.eye(S, dtype=g.dtype, device=g.device)[:, list(src), None])
        return F.conv1d(g, onto).view(N, S * C, H, W), None, None


def _fan(x: torch.Tensor, S: int, specs) -> list[torch.Tensor]:
    """One tensor per consumer of x (N, S*C, H, W): x itself (spec None), the channels of source s (spec s;
    a view), or a copy of the sources of a list of edges (spec: a tuple with each edge's source, (N, len *
    C, H, W); consumers with the same tuple share one copy). Under autograd, with several consumers, their
    gradients are summed by `_Fan` in one reduction."""
    specs = tuple(specs)
    copies = sum(isinstance(s, tuple) for s in specs)
    if (torch.is_grad_enabled() and x.requires_grad
            and (len(specs) > 3 or copies and (len(specs) > 1 or S > 1))):
        return list(_Fan.apply(x, S, specs))
    return _hand_out(x, S, specs)


class _BatchNormStack(torch.autograd.Function):
    """cat([BN(z), *rest], 1) for a non-affine BatchNorm in training mode, saving its normalised output (a view
    of the returned stack, which the contraction saves anyway) instead of its input z, so that the op
    outputs are saved once. The backward is native_batch_norm_backward with the output y as the input, mean
    0 and invstd 1, and the batch's invstd as the affine weight: the gradient of y = (z - mu) * invstd with
    respect to z is invstd * (g - mean(g) - y * mean(g * y)), which is what that call computes."""

    @staticmethod
    def forward(ctx, z, running_mean, running_var, *rest):
        y, _, invstd = torch.native_batch_norm(z, None, None, running_mean, running_var, True, BN_MOMENTUM, BN_EPS)
        stack = torch.cat([y, *rest], 1) if rest else y
        ctx.save_for_backward(stack, invstd)
        ctx.sizes = [z.shape[1]] + [t.shape[1] for t in rest]
        return stack

    @staticmethod
    def backward(ctx, g):
        stack, invstd = ctx.saved_tensors
        c = ctx.sizes[0]
        key = ('bn', c, g.device, g.dtype)
        zero, one = _constant(key, lambda: (torch.zeros(c, dtype=g.dtype, device=g.device),
                                             torch.ones(c, dtype=g.dtype, device=g.device)))
        gy = g[:, :c] if len(ctx.sizes) > 1 else g
        y = stack[:, :c] if len(ctx.sizes) > 1 else stack
        gz = torch.ops.aten.native_batch_norm_backward(gy, y, invstd, None, None, zero, one, True, BN_EPS,
                                                       [True, False, False])[0]
        rest = g.split(ctx.sizes, 1)[1:] if len(ctx.sizes) > 1 else ()
        return (gz, None, None, *rest)


def _stack_bn(z, mean, var, training: bool, rest=()) -> torch.Tensor:
    """cat([BatchNorm(z), *rest], 1): through `_BatchNormStack` while training under autograd (mean/var:
    the running statistics to update, or None)."""
    if training and torch.is_grad_enabled():
        return _BatchNormStack.apply(z, mean, var, *rest)
    y = F.batch_norm(z, mean, var, None, None, training, BN_MOMENTUM, BN_EPS)
    return torch.cat([y, *rest], 1) if rest else y


def _contract(stack: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_q weight[k, q] * stack[:, q] for every target k: (N, Q, L) x (K, Q, 1) -> (N, K, L) in one
    kernel (a 1x1 convolution): the weighted sums of Eq. 2-4 / 6-8 over ops and edges."""
    return F.conv1d(stack, weight)


def _op_major(t: torch.Tensor, S: int, C: int, K: int) -> torch.Tensor:
    """A merged first-stage depthwise conv's output (N, S*C*J*K, H, W), channel-multiplied over ReLU(X) and
    so in the order (source, channel, op, target), as a view in the order (op, source, target, channel) that
    the pointwise conv reads: (N, J, S, K, C, H*W)."""
    N, _, H, W = t.shape
    return t.view(N, S, C, -1, K, H * W).permute(0, 3, 1, 4, 2, 5)


def _channel_major(g: torch.Tensor, n: int, S: int, C: int, K: int) -> list[torch.Tensor]:
    """The inverse of `_op_major` for the gradients of n such outputs with the same J, side by side in g
    (N, n*J*S*K*C, H, W; a channel slice will do): n tensors (N, S*C*J*K, H, W) back in their conv's order,
    with one copy for all of them, input-major, so that each is a contiguous slice of it."""
    N, _, H, W = g.shape
    g = g.view(N, n, -1, S, K, C, H * W).permute(1, 0, 3, 5, 2, 4, 6).contiguous()  # (input, N, S, C, J, K, HW)
    return [t.view(N, -1, H, W) for t in g.unbind(0)]


class _Taps(torch.autograd.Function):
    """The dynamic kernels' taps (Fig. 1 of the NOS paper): per (sample, pair), the bottleneck z (m, HW) read at
    each tap's softmax positions mask (kk, HW), tap-major: mask @ z^T, (N*P, kk, m). Autograd's bmm would
    hand z's gradient back transposed, and the view that made z would then copy it; here it comes back in
    z's own layout (the same two bmm)."""

    @staticmethod
    def forward(ctx, z, mask):
        ctx.save_for_backward(z, mask)
        return torch.bmm(mask, z.transpose(1, 2))

    @staticmethod
    def backward(ctx, g):
        z, mask = ctx.saved_tensors
        gz = torch.bmm(g.transpose(1, 2), mask) if ctx.needs_input_grad[0] else None
        gmask = torch.bmm(g, z) if ctx.needs_input_grad[1] else None
        return gz, gmask


class _Unmultiply(torch.autograd.Function):
    """The outputs of the merged first-stage depthwise convs (`FastEdges.merged`), each reordered by
    `_op_major`, as one (N, sum J * S*K*C, H, W) tensor in the order (op, source, target, channel) that the
    pointwise conv reads: one cat of permuted views. In the backward, one copy puts every input's gradient
    back into its conv's order at once (`_channel_major`; with the same J for every input, as the merged pairs
    have; else one copy per input)."""

    @staticmethod
    def forward(ctx, S, C, K, *outs):
        N, _, H, W = outs[0].shape
        ctx.meta = (S, C, K, [t.shape[1] // (S * C * K) for t in outs])
        return torch.cat([_op_major(t, S, C, K) for t in outs], 1).view(N, -1, H, W)

    @staticmethod
    def backward(ctx, g):
        S, C, K, js = ctx.meta
        if len(set(js)) == 1:
            return (None, None, None, *_channel_major(g, len(js), S, C, K))
        pieces = g.split([j * S * K * C for j in js], 1)
        return (None, None, None, *(_channel_major(t, 1, S, C, K)[0] for t in pieces))


class _MergedPointwise(torch.autograd.Function):
    """The first pointwise stage of the merged separable and dilated pairs and every 1x1 conv from X, as one
    grouped conv (`FastEdges.fuses_pointwise`: one source, stride 1). Its input is the cat of the merged
    depthwise outputs in the order (op, target, channel), dilated pair first (as `_Unmultiply` orders
    them), and of G copies of X: a grouped conv's groups all have C inputs and C outputs, so x1x1's R rows
    run as G groups that each read X, the last padded with zero rows ('pwx', `_merged_index`). The output
    comes back in pieces, without the padding: [dilated | separable, SA, bottlenecks (the input of the
    'mid' BatchNorm) | CA | transforms]. Against `_Unmultiply`, pw1, x1x1 and the cat of the 'mid' pieces,
    that is two kernels fewer forward and one backward. The input is rebuilt in the backward rather than
    saved (its copies of X would be saved beside X). `xs`: X's copies as `_fan` hands them out, (N, G, C,
    H, W), so that their gradients join X's other consumers' in one reduction."""

    @staticmethod
    def forward(ctx, sizes, weight, xs, dil, sep):
        G, C = xs.shape[1:3]
        K = dil.shape[1] // (2 * C)
        ctx.save_for_backward(weight, xs, dil, sep)
        ctx.meta = (sizes, K)
        u = F.conv2d(_MergedPointwise._input(xs, dil, sep, K), weight, groups=4 * K + G)
        return tuple(u.split(sizes + [u.shape[1] - sum(sizes)], 1)[:-1])

    @staticmethod
    def _input(xs, dil, sep, K):
        N, G, C, H, W = xs.shape
        pieces = [_op_major(t, 1, C, K) for t in (dil, sep)]
        return torch.cat(pieces + [xs.view(N, G // K, 1, K, C, H * W)], 1).view(N, -1, H, W)

    @staticmethod
    def backward(ctx, *grads):
        weight, xs, dil, sep = ctx.saved_tensors
        sizes, K = ctx.meta
        N, G, C, H, W = xs.shape
        pad = weight.shape[0] - sum(sizes)
        if pad:
            zero = _constant(('pad', N, pad, H, W, xs.device, xs.dtype),
                             lambda: xs.new_zeros(N, pad, H, W))
            grads = (*grads, zero)
        g = torch.cat(grads, 1)
        need_x, need_w = any(ctx.needs_input_grad[2:]), ctx.needs_input_grad[1]
        gi, gw, _ = torch.ops.aten.convolution_backward(
            g, _MergedPointwise._input(xs, dil, sep, K), weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0],
            4 * K + G, [need_x, need_w, False])
        if not need_x:
            return None, gw, None, None, None
        n = 4 * K * C  # the depthwise outputs' gradients back in their convs' order: one copy for both
        return (None, gw, gi[:, n:].view(N, G, C, H, W), *_channel_major(gi[:, :n], 2, 1, C, K))


class FastEdges(nn.Module):
    """All edges of one source group (S sources x K targets = E edges), every op of the space at once.

    Parameters hold the reference's per-edge weights stacked edge by edge (e = s * K + k) and op by op;
    `from_plain` assembles them from the reference cell's MixedOps. `forward` returns the group's
    contributions to its K targets: 'F' (N, K, C, H, W), the weighted feature sum (Eq. 2 / 6); 'SA'
    (N, K, 1, H, W), the weighted spatial attention (Eq. 3 / 7); 'D' (N, K, C, k, k), the weighted sum of
    the kernels (Eq. 4 / 8) with channel attention and the identity folded in (see `_node`). `pending`: the
    targets' sums so far, added to 'F' and 'D' inside the contraction where the layout says so (`fold`).
    `hand_back`: the caller reads the group's input too (a node in the cell's output); 'X' is then that input
    as the fan hands it out, so that its gradient joins the fan's reduction.

    Under an alive mask (a pruned search) each op runs on its alive edges only: the convs are grouped over
    just those edges, and one gather per forward reads the rows of the alive (edge, op) pairs from all the
    group's weights (`_weights`) and one the BatchNorm statistics (`_bn_index`); the weights of dead pairs
    are not read. Their gradient is then zero rather than None (SGD's weight decay and momentum move them,
    which changes nothing: a pruned op is never computed again).

    `merged` (FastCell sets it in the NOS space): with every op alive on every edge, the two separable
    convs share one depthwise conv per stage and the two dilated convs one, each kernel on the 5 x 5 grid (a
    3 x 3 one with a zero border; `_MergedGather`). The first stage's are channel-multiplied over ReLU(X),
    so that no copy of ReLU(X) per edge is made or saved (`_Unmultiply` reorders their outputs; with one
    source at stride 1, `_MergedPointwise` reorders them and runs pw1 and x1x1 as one conv).
    """
    merged = False
    recomputed = False

    def __init__(self, C: int, stride: int, ops: list[str], S: int, K: int, carrier: bool = False):
        super().__init__()
        self.C, self.stride, self.S, self.K = C, stride, S, K
        E = self.E = S * K
        full = self.full = _Layout({'rows': [[0] * K] * S, 'stride': stride}, ops, [[True] * len(ops)], 0)
        self.conv, self.seps, self.dils, self.pools, self.dyn = full.conv, full.seps, full.dils, full.pools, full.dyn
        self.has_identity, self.has_fr = full.identity, bool(full.fr)
        self.has_sa, self.has_ca = bool(full.sa), bool(full.ca)
        self.m_att = max(1, C // 16)  # operations.SpatialAttention / ChannelAttention width
        self.m_dyn = max(1, C // 8)   # operations.DynamicKernel bottleneck width
        # the node's kernel (dynamic kernels, CA at the centre tap, identity): the largest dynamic size
        ks = self.kernel_size = max((DYNAMIC_SIZES[n] for n in self.dyn), default=1)
        kk = ks * ks
        if carrier and (self.dyn or self.has_ca):
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
        if self.has_fr:  # skip_connect on a stride-2 edge: FactorizedReduce, two offset 1x1 convs
            self.fr1 = param(E * C // 2, C, 1, 1)
            self.fr2 = param(E * C // 2, C, 1, 1)
        # Every 1x1 conv that reads X, one block of rows per source (so that one conv, grouped by source, runs
        # them all; stride 1): per source [spatial attention's first conv (its stride is taken by
        # subsampling the output) x K | kernel generators' bottlenecks, (op, target) | CA's first conv x K (it
        # commutes with CA's global pool: both are linear) | kernel transforms, (op, target, tap)]. A
        # transform sits on the node's ks x ks grid: a smaller op's k x k taps at its centre, zero rows at the
        # border, masked out of the softmax over taps (`tap_bias`), so that they get no gradient and stay
        # exactly zero (weight decay of 0 is 0) and no forward has to pad them.
        nd = len(self.dyn)
        self.x_rows = {'sa': K * self.m_att * self.has_sa, 'bneck': nd * K * self.m_dyn,
                       'ca': K * self.m_att * self.has_ca, 'tf': nd * K * kk}
        R = sum(self.x_rows.values())
        if R:
            w = param(S * R, C, 1, 1).detach()
            for s in range(S):
                for j, n in enumerate(self.dyn):
                    k = DYNAMIC_SIZES[n]
                    border = torch.ones(ks, ks, dtype=torch.bool)
                    border[(ks - k) // 2:(ks + k) // 2, (ks - k) // 2:(ks + k) // 2] = False
                    a = s * R + R - self.x_rows['tf'] + j * K * kk
                    w[a:a + K * kk].view(K, kk, C)[:, border.flatten()] = 0
                    self.structural_zeros += K * C * (kk - k * k)
            self.x1x1 = nn.Parameter(w)
        if self.has_sa:
            self.sa2 = param(E, self.m_att, 3, 3)
        if self.has_ca:
            # the second conv writes CA straight onto the centre tap of the node's kernel (see `_node`): its
            # rows for the other k*k - 1 taps are zero and their bias -inf, so the sigmoid gives exactly 0
            # there and passes no gradient back (those rows stay zero), and no forward pads CA into a kernel
            self.ca2 = nn.Parameter(self._on_taps(param(E * C, self.m_att, 1, 1).detach(), kk))
            bias = torch.full((E * C, kk), float('-inf'))
            bias[:, kk // 2] = 0
            self.register_buffer('ca_bias', bias.flatten() if kk > 1 else None, persistent=False)
            self.structural_zeros += E * C * (kk - 1) * self.m_att
        if self.dyn:  # kernel decode (C/8 -> C), per (source, op, target)
            self.decode = param(E * nd * C, self.m_dyn, 1, 1)
        # The running statistics of every non-affine BatchNorm of the group: row 0 means, row 1 variances; one
        # block of channels per (kind, op, edge or source): `bn_blocks` (key -> channel range), in the order in
        # which the BatchNorms of an unpruned group read them:
        #   mid   [first separable stage (op, edge) | sa conv (edge) | bottlenecks (source, op, target)]
        #   final [second separable stage (op, edge) | dilated convs (op, edge) | pools (op, source) |
        #          FactorizedReduce (edge)]
        # (on a stride-2 group the bottlenecks, which read the full-resolution X, have a BatchNorm of their own)
        blocks = ([(('sep1', n, e), C) for n in self.seps for e in range(E)]
                  + [(('sa', e), self.m_att) for e in range(E) if self.has_sa]
                  + [(('bneck', n, e), self.m_dyn) for s in range(S) for n in self.dyn
                     for e in range(s * K, (s + 1) * K)]
                  + [(('sep2', n, e), C) for n in self.seps for e in range(E)]
                  + [(('dil', n, e), C) for n in self.dils for e in range(E)]
                  + [(('pool', n, s), C) for n in self.pools for s in range(S)]
                  + [(('fr', e), C) for e in range(E) if self.has_fr])
        self.bn_blocks, a = {}, 0
        for key, size in blocks:
            self.bn_blocks[key] = (a, a + size)
            a += size
        self.register_buffer('bn_stats', torch.stack([torch.zeros(a), torch.ones(a)]))

    # -- helpers ------------------------------------------------------------------------------------------
    @staticmethod
    def _on_taps(w: torch.Tensor, kk: int) -> torch.Tensor:
        """(E*C, m, 1, 1) conv weights -> (E*C*kk, m, 1, 1): each output channel's row at the centre of its kk
        taps, zero rows at the others."""
        if kk == 1:
            return w
        rows = w.new_zeros(w.shape[0], kk, w.shape[1])
        rows[:, kk // 2] = w.flatten(1)
        return rows.view(-1, w.shape[1], 1, 1)

    def _x_block(self, s: int, kind: str, j: int = 0, k: int = 0) -> tuple[int, int]:
        """Rows of x1x1 for source s: kind 'sa' / 'ca' (target k), 'bneck' / 'tf' (dynamic op j, target k)."""
        a = s * sum(self.x_rows.values())
        for key, size in self.x_rows.items():
            if key == kind:
                break
            a += size
        width = {'sa': self.m_att, 'ca': self.m_att, 'bneck': self.m_dyn, 'tf': self.kernel_size ** 2}[kind]
        a += ((j * self.K + k) if kind in ('bneck', 'tf') else k) * width
        return a, a + width

    def transform(self, name: str, t: torch.Tensor | None = None) -> torch.Tensor:
        """The kernel transform rows of dynamic op `name` in x1x1 (or in `t`, a tensor shaped like it, e.g. its
        gradient), edge by edge on the node's ks x ks grid: (E, ks, ks, C)."""
        t = self.x1x1 if t is None else t
        ks, j = self.kernel_size, self.dyn.index(name)
        rows = [t[slice(*self._x_block(s, 'tf', j, k))] for s in range(self.S) for k in range(self.K)]
        return torch.stack(rows).view(self.E, ks, ks, self.C)

    def merges(self, lay: _Layout) -> bool:
        """Whether this group runs the merged depthwise convs (`merged`) under layout `lay`: not in a cell that
        the backward recomputes (`recomputed`; Network.checkpoint_cells)."""
        return self.merged and not self.recomputed and lay.full and len(self.seps) == 2 and len(self.dils) == 2

    @property
    def fuses_pointwise(self) -> bool:
        """Whether the merged path runs pw1 and x1x1 as one grouped conv (`_MergedPointwise`): one source,
        stride 1 (x1x1's rows for SA and the bottlenecks read X at the output's resolution) and rows in x1x1."""
        return (self.S == 1 and self.stride == 1 and len(self.seps) == 2 and len(self.dils) == 2
                and hasattr(self, 'x1x1'))

    @property
    def x_copies(self) -> int:
        """G, the copies of X that `_MergedPointwise` reads: x1x1's R rows in groups of C (a grouped conv's
        groups are all C x C, as pw1's are), rounded up to a multiple of K copies."""
        return self.K * -(-self.x1x1.shape[0] // (self.K * self.C))

    def _merged_index(self) -> tuple[list[str], dict]:
        """The merged depthwise weights as (param names, {name: (shape, slot, loc)}): per element of the
        weight, its parameter (`slot` into the names) and its flat index there (`loc`; -1: a border tap of
        a 3 x 3 kernel, a structural 0). 'dw1s' / 'dw1d': the first stage of the separable / dilated pair,
        (S*C*2*K, 1, 5, 5) in the order (source, channel, op, target) of a channel-multiplied conv;
        'dw2': the second separable stage, (2*E*C, 1, 5, 5) in the order (op, edge, channel); 'pwx' (where
        `fuses_pointwise`): `_MergedPointwise`'s weight, (4*K*C + G*C, C, 1, 1), pw1's rows of the dilated
        pair, then of the separable pair, then x1x1's, then zero rows; 'decode': the decode conv's weight,
        tap-major, (P*kk*C, m, 1, 1), each (source, op, target) pair's C rows once per tap."""
        if 'merged_index' in self._cache:
            return self._cache['merged_index']
        C, S, K, E = self.C, self.S, self.K, self.E
        names = [f'dw1.{n}' for n in self.conv] + [f'dw2.{n}' for n in self.seps]

        def weight(ops, stage, row, j):  # per output channel: the row of op j's parameter that it reads
            size = torch.tensor([CONV_OPS[n][0] for n in ops])[j]
            taps = torch.stack([_grid_taps(CONV_OPS[n][0]) for n in ops])[j]  # (channels, GRID * GRID)
            loc = torch.where(taps >= 0, row[:, None] * size[:, None] ** 2 + taps, -1)
            slot = torch.tensor([names.index(f'{stage}.{n}') for n in ops])[j][:, None].expand_as(loc)
            return (row.numel(), 1, GRID, GRID), slot.reshape(-1), loc.reshape(-1)

        s, c = torch.arange(S).view(S, 1, 1, 1), torch.arange(C).view(1, C, 1, 1)
        j, k = torch.arange(2).view(1, 1, 2, 1), torch.arange(K).view(1, 1, 1, K)
        row = ((s * K + k) * C + c).expand(S, C, 2, K).reshape(-1)  # channel (s, c, j, k): edge s*K + k, channel c
        j1 = j.expand(S, C, 2, K).reshape(-1)
        out = {'dw1s': weight(self.seps, 'dw1', row, j1), 'dw1d': weight(self.dils, 'dw1', row, j1),
               'dw2': weight(self.seps, 'dw2', torch.arange(E * C).repeat(2),
                             torch.arange(2).repeat_interleave(E * C))}  # (op, edge, channel)
        if self.fuses_pointwise:  # 'pwx': pw1's rows, dilated pair first, then x1x1's, then zero rows
            names += ['pw1', 'x1x1']
            R, G = self.x1x1.shape[0], self.x_copies
            rows = torch.cat([torch.arange(2 * E * C, 4 * E * C), torch.arange(2 * E * C), torch.arange(R),
                              torch.full((G * C - R,), -1)])
            slot = torch.cat([torch.full((4 * E * C,), names.index('pw1')), torch.full((G * C,), len(names) - 1)])
            loc = torch.where(rows[:, None] >= 0, rows[:, None] * C + torch.arange(C), -1)
            out['pwx'] = ((rows.numel(), C, 1, 1), slot[:, None].expand_as(loc).reshape(-1), loc.reshape(-1))
        if self.dyn:  # 'decode': the tap-major decode conv's weight, each pair's C rows once per tap (`forward`)
            names.append('decode')
            m, kk, P = self.m_dyn, self.kernel_size ** 2, E * len(self.dyn)  # pair p's rows: p*C .. (p+1)*C
            row = (torch.arange(P).view(P, 1, 1) * C + torch.arange(C)).expand(P, kk, C).reshape(-1, 1)
            loc = (row * m + torch.arange(m)).reshape(-1)
            out['decode'] = ((P * kk * C, m, 1, 1), torch.full_like(loc, len(names) - 1), loc)
        self._cache['merged_index'] = names, out
        return names, out

    def _plan(self, lay: _Layout, device, dtype) -> dict:
        """Everything `forward` reads under layout `lay` besides the activations, made once per layout: per
        weight, the rows of the alive pairs (and one index that gathers them all from the flattened weights,
        unless the layout is full); the BatchNorm channels; the pieces of x1x1's output."""
        key = ('plan', id(lay), device, dtype)
        if key in self._cache:
            return self._cache[key]
        C, K, S, E = self.C, self.K, self.S, self.E
        kk = self.kernel_size ** 2
        rows = {}  # weight name -> [(row, row + n)] of the alive pairs, in the order forward uses them
        for n in lay.conv:
            rows[f'dw1.{n}'] = [(e * C, (e + 1) * C) for e in lay.edges[n]]
        for n in lay.seps:
            rows[f'dw2.{n}'] = [(e * C, (e + 1) * C) for e in lay.edges[n]]
        if lay.conv:
            rows['pw1'] = [((self.conv.index(n) * E + e) * C, (self.conv.index(n) * E + e + 1) * C)
                           for n in lay.conv for e in lay.edges[n]]
        if lay.seps:
            rows['pw2'] = [((self.seps.index(n) * E + e) * C, (self.seps.index(n) * E + e + 1) * C)
                           for n in lay.seps for e in lay.edges[n]]
        half = C // 2
        for name in ('fr1', 'fr2'):
            if lay.fr:
                rows[name] = [(e * half, (e + 1) * half) for e in lay.fr]
        # x1x1: per source, [sa | bottlenecks | ca | transforms] of its alive pairs
        pieces = []  # per source: [(kind, rows)] of its conv's output
        for s in range(S):
            mine = [(k_, e) for k_, e in ((e % K, e) for e in range(s * K, (s + 1) * K))]
            part = [('sa', [self._x_block(s, 'sa', k=k) for k, e in mine if e in lay.sa]),
                    ('bneck', [self._x_block(s, 'bneck', self.dyn.index(n), e % K) for n, e in lay.dyn_pairs
                               if e // K == s]),
                    ('ca', [self._x_block(s, 'ca', k=k) for k, e in mine if e in lay.ca]),
                    ('tf', [self._x_block(s, 'tf', self.dyn.index(n), e % K) for n, e in lay.dyn_pairs
                            if e // K == s])]
            pieces.append([(kind, r) for kind, r in part if r])
        sizes = [[sum(b - a for a, b in r) for _, r in p] for p in pieces]
        uniform = all(sz == sizes[0] for sz in sizes) and all(
            [kind for kind, _ in p] == [kind for kind, _ in pieces[0]] for p in pieces)
        x_rows = [[ab for _, r in p for ab in r] for p in pieces]
        if any(x_rows):
            if uniform:
                rows['x1x1'] = [ab for r in x_rows for ab in r]
            else:
                for s, r in enumerate(x_rows):
                    if r:
                        rows[f'x1x1.{s}'] = r
        if lay.sa:
            rows['sa2'] = [(e, e + 1) for e in lay.sa]
        if lay.ca:
            rows['ca2'] = [(e * C * kk, (e + 1) * C * kk) for e in lay.ca]
        if lay.dyn:  # each pair's rows once per tap (the decode conv is tap-major, see `forward`)
            pairs = [(e // K * len(self.dyn) + self.dyn.index(n)) * K + e % K for n, e in lay.dyn_pairs]  # (s, op, k)
            rows['decode'] = [(p * C, (p + 1) * C) for p in pairs for _ in range(kk)]
        plan = {'rows': rows, 'x_pieces': pieces, 'x_uniform': uniform and S > 1 and any(x_rows)}
        plan['names'] = list(dict.fromkeys(self._param_name(n) for n in rows))
        # BatchNorm channels, per call
        bn = {'mid': [('sep1', n, e) for n in lay.seps for e in lay.edges[n]]
              + [('sa', e) for e in lay.sa]
              + ([('bneck', n, e) for n, e in lay.dyn_pairs] if self.stride == 1 else []),
              'bneck': [('bneck', n, e) for n, e in lay.dyn_pairs] if self.stride == 2 else [],
              'final': [('sep2', n, e) for n in lay.seps for e in lay.edges[n]]
              + [('dil', n, e) for n in lay.dils for e in lay.edges[n]]
              + [('pool', n, s) for n in lay.pools for s in lay.sources[n]]
              + [('fr', e) for e in lay.fr]}
        ranges = {call: [self.bn_blocks[b] for b in blocks] for call, blocks in bn.items() if blocks}
        plan['bn_ranges'] = ranges
        if lay.full:  # every call reads one range of the statistics
            plan['bn_local'] = {call: _merge(rs)[0] for call, rs in ranges.items()}
            assert all(len(_merge(rs)) == 1 for rs in ranges.values())
        else:  # the channels gathered (`_Gather`), call after call
            plan['bn_channels'] = [c for rs in ranges.values() for a, b in rs for c in range(a, b)]
            at, plan['bn_local'] = 0, {}
            for call, rs in ranges.items():
                n_c = sum(b - a for a, b in rs)
                plan['bn_local'][call] = (at, at + n_c)
                at += n_c
        if lay.dyn and any(DYNAMIC_SIZES[n] < self.kernel_size for n, _ in lay.dyn_pairs):
            ks = self.kernel_size
            bias = torch.zeros(len(lay.dyn_pairs), ks, ks, C)  # the decode conv's, per (pair, tap, channel)
            for p, (n, _) in enumerate(lay.dyn_pairs):
                b = (ks - DYNAMIC_SIZES[n]) // 2
                if b:
                    bias[p] = float('-inf')
                    bias[p, b:ks - b, b:ks - b] = 0
            plan['tap_bias'] = bias.flatten().to(device, dtype)
        if lay.ca and self.kernel_size > 1:
            plan['ca_bias'] = torch.cat([self.ca_bias[a:b] for a, b in rows['ca2']]) if not lay.full else None
        self._cache[key] = plan
        return plan

    def _merged_gather(self, device) -> _MergedGather:
        key = ('merged_gather', device)
        if key not in self._cache:
            self._cache[key] = _MergedGather([self])
        return self._cache[key]

    @staticmethod
    def _param_name(name: str) -> str:
        return 'x1x1' if name.startswith('x1x1') else name

    def _param(self, name: str) -> torch.Tensor:
        name = self._param_name(name)
        if '.' in name:
            d, n = name.split('.', 1)
            return getattr(self, d)[n]
        return getattr(self, name)

    # -- forward ------------------------------------------------------------------------------------------
    def forward(self, xs: list[torch.Tensor], coef: dict, lay: _Layout, pending=None, given=None,
                hand_back: bool = False) -> dict:
        S, K, C, stride = self.S, self.K, self.C, self.stride
        x = xs[0] if len(xs) == 1 else torch.cat(xs, 1)  # (N, S*C, H, W)
        N, _, H, W = x.shape
        Ho, Wo = (H, W) if stride == 1 else ((H + 1) // 2, (W + 1) // 2)
        plan = self._plan(lay, x.device, x.dtype)
        merged = self.merges(lay)
        fused = merged and self.fuses_pointwise  # pw1 and x1x1 as one conv (_MergedPointwise)
        if lay.full:  # the weights and statistics as stored
            w, stats, own = {name: self._param(name) for name in plan['rows']}, self.bn_stats, None
            if merged:  # the merged depthwise weights: gathered for the whole network, or here for this group
                w.update(given[0] if given is not None else self._merged_gather(x.device).weights()[0])
        else:  # the rows of the alive pairs, gathered for the whole network at once (or here, for this group)
            own = None if given is not None else _Gather([(self, plan)])
            w, stats = given if given is not None else (own.weights()[0], own.statistics()[0])

        def running(call):  # the running statistics one BatchNorm call updates (views)
            a, b = plan['bn_local'][call]
            return stats[0, a:b], stats[1, a:b]

        def batch_norm(z, call):
            return F.batch_norm(z, *running(call), None, None, self.training, BN_MOMENTUM, BN_EPS)

        def spec(edges):  # what a consumer of X (or ReLU(X)) on these edges reads, see `_fan`
            sources = tuple(e // K for e in edges)
            if sources == tuple(range(S)):
                return None
            return sources[0] if len(sources) == 1 else sources

        # the consumers of X: ReLU, pools (per source), identity, the 1x1 convs (grouped by source)
        x_specs = [None] if lay.conv or lay.fr else []
        x_specs += [None if len(lay.sources[n]) == S else lay.sources[n][0] for n in lay.pools]
        if lay.identity_edges:
            x_specs.append(spec(lay.identity_edges))
        elif lay.identity:
            x_specs.append(None if len(lay.sources['skip_connect']) == S else lay.sources['skip_connect'][0])
        pieces = plan['x_pieces']
        by_source = S > 1 and not plan['x_uniform'] and any(pieces)
        if fused:  # x1x1's G copies of X, the last consumer
            x_specs.append(_Repeat(self.x_copies))
        else:
            x_specs += [s for s in range(S) if pieces[s]] if by_source else [None] if any(pieces) else []
        if hand_back:  # the caller reads x too (out['X']): its gradient joins this fan's one reduction
            x_specs.insert(0, None)
        x_uses = _fan(x, S, x_specs)
        x_back = x_uses.pop(0) if hand_back else None
        x_copies = x_uses.pop() if fused else None
        x_uses = iter(x_uses)
        mid, final = [], []  # the inputs of the BatchNorm before ReLUs (mid) and before the stack (final)
        if lay.conv or lay.fr:
            r = F.relu(next(x_uses))
            fr_counts = [sum(e // K == s for e in lay.fr) for s in range(S)]
            fr_spec = None if len(set(fr_counts)) == 1 else spec(lay.fr)
            r_specs = [None, None] if merged else [spec(lay.edges[n]) for n in lay.conv]
            r_uses = iter(_fan(r, S, r_specs + ([fr_spec] if lay.fr else [])))
        rows = {}  # kind -> per-source (N, n, H, W) pieces of the 1x1 convs' output
        if merged:  # two channel-multiplied depthwise convs (separable pair, dilated pair) on the 5 x 5 grid
            d = (F.conv2d(next(r_uses), w['dw1s'], None, stride, 2, 1, S * C),
                 F.conv2d(next(r_uses), w['dw1d'], None, stride, 4, 2, S * C))
            if fused:  # then pw1 and x1x1 in one conv: [dilated | mid: separable, SA, bottlenecks | CA | ...]
                kinds = [(kind, sum(b - a for a, b in r)) for kind, r in pieces[0]]
                n_mid = 2 * K * C + sum(n for kind, n in kinds if kind in ('sa', 'bneck'))
                tail = [(kind, n) for kind, n in kinds if kind not in ('sa', 'bneck')]
                z1_dil, z1_mid, *out = _MergedPointwise.apply([2 * K * C, n_mid] + [n for _, n in tail], w['pwx'],
                                                              x_copies, d[1], d[0])
                rows = {kind: [t] for (kind, _), t in zip(tail, out)}
                mid.append(z1_mid)
            else:
                d = _Unmultiply.apply(S, C, K, *d)
        elif lay.conv:  # each op one depthwise conv over its edges' copies of ReLU(X)
            d = []
            for n in lay.conv:
                _, pad, dil, _ = CONV_OPS[n]
                d.append(F.conv2d(next(r_uses), w[f'dw1.{n}'], None, stride, pad, dil, len(lay.edges[n]) * C))
            d = torch.cat(d, 1) if len(d) > 1 else d[0]
        n_pairs = [len(lay.edges[n]) for n in lay.conv]
        n_sep = sum(n_pairs[:len(lay.seps)]) * C
        if lay.conv and not fused:  # then one pointwise conv for every (op, edge)
            z1 = F.conv2d(d, w['pw1'], groups=sum(n_pairs))
            # one split (its backward is one cat; two slices would cost a scatter each and an add)
            z1_sep, z1_dil = z1.split([n_sep, z1.shape[1] - n_sep], 1) if lay.seps and lay.dils else (z1, z1)
            if lay.seps:
                mid.append(z1_sep)
        pools = []
        for n in lay.pools:  # once per source: the same on every edge from it
            pools.append(F.max_pool2d(next(x_uses), 3, stride, 1) if n == 'max_pool_3x3'
                         else F.avg_pool2d(next(x_uses), 3, stride, 1, count_include_pad=False))
        identity = next(x_uses) if lay.identity else None
        if any(pieces) and not fused:
            sizes = [[(kind, sum(hi - lo for lo, hi in rr)) for kind, rr in p] for p in pieces]
            if by_source:  # pruned unevenly: one conv per source
                ys = [F.conv2d(next(x_uses), w[f'x1x1.{s}']).split([n for _, n in sizes[s]], 1) if pieces[s]
                      else () for s in range(S)]
            else:  # one conv, grouped by source: one split into every (source, kind) block
                y = F.conv2d(next(x_uses), w['x1x1'], groups=S).split([n for sz in sizes for _, n in sz], 1)
                ys = [y[s * len(sizes[0]):(s + 1) * len(sizes[0])] for s in range(S)]
            for sz, blocks in zip(sizes, ys):
                for (kind, _), t in zip(sz, blocks):
                    rows.setdefault(kind, []).append(t)

        def joined(kind):  # (N, rows, H, W): the kind's rows of every source
            t = rows[kind]
            return torch.cat(t, 1) if len(t) > 1 else t[0]

        if lay.sa and not fused:  # its 1x1 conv carries the edge's stride: the stride-1 output subsampled
            mid += [t[:, :, ::2, ::2] if stride == 2 else t for t in rows['sa']]
        if lay.dyn and stride == 1 and not fused:
            mid += rows['bneck']
        if lay.fr:  # FactorizedReduce: two offset 1x1 convs per edge, each edge's halves side by side
            rf = next(r_uses)
            groups = S if fr_spec is None else 1 if isinstance(fr_spec, int) else len(lay.fr)
            o1 = F.conv2d(rf, w['fr1'], stride=2, groups=groups)
            o2 = F.conv2d(rf[:, :, 1:, 1:], w['fr2'], stride=2, groups=groups)
            fr = torch.stack([o1.view(N, len(lay.fr), C // 2, Ho, Wo), o2.view(N, len(lay.fr), C // 2, Ho, Wo)], 2)
        pieces_mid = []
        if mid:
            # every consumer of this BatchNorm (second separable stage, SA's 3x3 conv, kernel generators)
            # starts with a ReLU: one for all of them
            if fused:  # a slice of the conv's output: a BatchNorm that saved it would hold all of that output
                b1 = F.relu(_stack_bn(mid[0], *running('mid'), self.training))
            else:
                b1 = F.relu(batch_norm(torch.cat(mid, 1) if len(mid) > 1 else mid[0], 'mid'))
            sizes = ([n_sep] if lay.seps else []) + ([len(lay.sa) * self.m_att] if lay.sa else []) + (
                [len(lay.dyn_pairs) * self.m_dyn] if lay.dyn and stride == 1 else [])
            pieces_mid = list(b1.split(sizes, 1)) if len(sizes) > 1 else [b1]
        pieces_mid = iter(pieces_mid)

        # features: second stage of the separable convs, then the stack [BN(seps, dils, pools, FR) | identity
        # | pending], whose BatchNorm saves its output (the stack) rather than its input (_BatchNormStack)
        stacks = {}  # per kind, the entries that `mix` weighs and sums for each target
        if lay.seps:
            r2 = next(pieces_mid)
            if merged:  # one depthwise conv for both ops
                d = F.conv2d(r2, w['dw2'], None, 1, GRID // 2, 1, r2.shape[1])
            else:
                r2 = r2.split([len(lay.edges[n]) * C for n in lay.seps], 1) if len(lay.seps) > 1 else [r2]
                d = []
                for n, t in zip(lay.seps, r2):
                    _, pad, dil, _ = CONV_OPS[n]
                    d.append(F.conv2d(t, w[f'dw2.{n}'], None, 1, pad, dil, len(lay.edges[n]) * C))
                d = torch.cat(d, 1) if len(d) > 1 else d[0]
            final.append(F.conv2d(d, w['pw2'], groups=sum(n_pairs[:len(lay.seps)])))
        if lay.dils:
            final.append(z1_dil)
        final += pools
        if lay.fr:
            final.append(fr.view(N, len(lay.fr) * C, Ho, Wo))
        rest = []
        skip = None  # for a gated `mix`: the skip outputs (N, n, C, Ho, Wo), one per source or per edge
        if lay.identity_edges:  # each edge's own dropout mask, as each reference MixedOp draws its own
            identity = F.dropout(identity, self.skip_dropout, self.training)
        if lay.identity:
            rest.append(identity)
            skip = identity.view(N, -1, C, Ho, Wo)
        if 'F' in lay.fold:
            rest.append(pending['F'].reshape(N, K * C, Ho, Wo))
        if final:
            stack = _stack_bn(torch.cat(final, 1) if len(final) > 1 else final[0], *running('final'),
                              self.training, rest)
        elif rest:
            stack = torch.cat(rest, 1) if len(rest) > 1 else rest[0]
        if final or rest:
            stacks['F'] = stack.view(N, -1, C, Ho, Wo)
            if lay.fr:
                q = stacks['F'].shape[1] - len(lay.fr)  # FR's entries are the last ones (no identity at stride 2)
                skip = stacks['F'][:, q:]

        # spatial attention (Eq. 3 / 7): 1x1 conv, BN, ReLU (above), 3x3 conv -> 1 per edge, sigmoid
        if lay.sa:
            sa = torch.sigmoid(F.conv2d(next(pieces_mid), w['sa2'], padding=1, groups=len(lay.sa)))
            stacks['SA'] = sa.view(N, len(lay.sa), 1, Ho, Wo)

        # the node's kernel entries: dynamic kernels (Eq. 4 / 8), channel attention, identity (see _node)
        ks = self.kernel_size
        kk = ks * ks
        kernels = []
        if lay.dyn:  # Fig. 1: every (source, op, target) pair at once, each op's k*k taps on the ks x ks grid
            P = len(lay.dyn_pairs)
            z = next(pieces_mid) if stride == 1 else F.relu(batch_norm(
                torch.cat(rows['bneck'], 1) if len(rows['bneck']) > 1 else rows['bneck'][0], 'bneck'))
            z = z.contiguous().view(N * P, self.m_dyn, H * W)                                  # (a) bottleneck
            # the softmax of a strided view returns a contiguous tensor: no copy of its own
            mask = joined('tf').view(N, -1, kk, H * W).softmax(dim=-1).view(N * P, kk, H * W)  # (b) positions
            # (c) decode, tap-major: every tap of a pair is a group of the conv (the gathers repeat the pair's
            # decode rows per tap), so that the conv's bias masks a smaller kernel's border taps with -inf:
            # exactly 0 after the softmax, and no gradient
            taps = _Taps.apply(z, mask).view(N, P * kk * self.m_dyn, 1, 1)
            decode = w['decode']
            if lay.full and not merged:  # as stored, not gathered: each pair's rows once per tap, here (one copy)
                decode = decode.view(P, 1, -1).expand(P, kk, C * self.m_dyn).contiguous().view(-1, self.m_dyn, 1, 1)
            kern = F.conv2d(taps, decode, plan.get('tap_bias'), groups=P * kk).view(N, P, kk, C)
            kernels.append(kern.softmax(dim=2).transpose(2, 3))                                # over taps
        if lay.ca:  # global pool, 1x1 conv C -> C/16 (above), ReLU, 1x1 conv -> C, sigmoid: a centre tap
            g = joined('ca')
            # ReLU(mean) as (1/HW) * ReLU(sum): elu with alpha 0 is a scaled ReLU, and a sum's backward is a
            # view (a mean's is a division)
            g = torch.ops.aten.elu(g.sum((2, 3), keepdim=True), 0., 1. / (g.shape[2] * g.shape[3]), 1.)
            bias = self.ca_bias if lay.full else plan['ca_bias']
            g = torch.sigmoid(F.conv2d(g, w['ca2'], bias, groups=len(lay.ca)))  # (N, n*C*kk, 1, 1)
            kernels.append(g.view(N, len(lay.ca), C, kk))
        if lay.delta:
            kernels.append(self.delta.view(1, 1, C, kk).expand(N, 1, C, kk))
        if 'D' in lay.fold:
            kernels.append(pending['D'].reshape(N, K, C, kk))
        if lay.dyn or lay.ca:  # (N, entries, C, kk); the dynamic kernels alone are a strided view: a copy
            stack = torch.cat(kernels, 1) if len(kernels) > 1 else kernels[0].contiguous()
            stacks['D'] = stack.view(N, -1, C, ks, ks)
        if own is not None and self.training:  # this group's gathered statistics back in place
            own.flush()
        out = self.mix(stacks, coef, lay, skip)
        if lay.delta and 'D' not in out:  # the identity alone (every kernel op pruned here): coefficient 1
            out['D'] = kernels[0].view(N, 1, C, ks, ks).expand(N, K, C, ks, ks)
        if hand_back:
            out['X'] = x_back
        return out

    def mix(self, stacks: dict, coef: dict, lay: _Layout, skip=None) -> dict:
        """The weighted sums over ops and edges (Eq. 2-4 / 6-8) for every kind: stacks[kind] (N, Q, c, h, w)
        (the Q stacked entries; c = C channels, 1 for spatial attention maps; h x w: the resolution, or the
        kernel's taps for 'D') -> (N, K, c, h, w), one contraction each with the (K, Q) coefficients that
        `FastPlan.prepare` gathered. A gated edge (agnas.FastGatedEdges) overrides this with its per-sample,
        per-channel gates; `skip` is for it: the edges' skip_connect outputs, (N, S, C, h, w) (identity), or
        (N, E, C, h, w) (FactorizedReduce); None without skip_connect."""
        return {kind: _contract(t.flatten(2), coef[kind]).view(t.shape[0], -1, *t.shape[2:])
                for kind, t in stacks.items()}

    # -- the reference's weights ----------------------------------------------------------------------
    def from_plain(self, mixed: list, ops: list[str], get) -> dict:
        """This group's parameters and buffers (name -> tensor) assembled from the reference's MixedOps of
        its edges (`mixed[e]`, e = s * K + k), `get(t)` applied to each reference tensor (t.detach() to
        copy weights and buffers; t.grad to compare gradients, which leaves out the buffers)."""
        col = {n: i for i, n in enumerate(ops)}
        K, S, C = self.K, self.S, self.C
        ks = self.kernel_size

        def ops_of(n):
            return [m._ops[col[n]] for m in mixed]

        def cat(ts, shape=lambda t: t):  # None (no gradient, or a buffer's) when any piece is None
            ts = [get(t) for t in ts]
            return None if any(t is None for t in ts) else torch.cat([shape(t) for t in ts])

        def on_grid(t):  # a k*k transform's rows (k*k, C, 1, 1) on the node's ks x ks grid, zero border
            k = math.isqrt(t.shape[0])
            p = (ks - k) // 2
            return F.pad(t.view(k, k, C), (0, 0, p, p, p, p)).view(ks * ks, C, 1, 1)

        out = {}
        first = {n: [op[0] if CONV_OPS[n][3] else op for op in ops_of(n)] for n in self.conv}  # DilConv
        for n in self.conv:
            out[f'dw1.{n}'] = cat([d[1].weight for d in first[n]])
        if self.conv:
            out['pw1'] = cat([d[2].weight for n in self.conv for d in first[n]])
        for n in self.seps:
            out[f'dw2.{n}'] = cat([op[1][1].weight for op in ops_of(n)])
        if self.seps:
            out['pw2'] = cat([op[1][2].weight for n in self.seps for op in ops_of(n)])
        if self.has_fr:
            out['fr1'] = cat([op.conv_1.weight for op in ops_of('skip_connect')])
            out['fr2'] = cat([op.conv_2.weight for op in ops_of('skip_connect')])
        if hasattr(self, 'x1x1'):
            rows = []
            for s in range(S):
                es = range(s * K, (s + 1) * K)
                if self.has_sa:
                    rows += [(ops_of('spatial_attention')[e].conv_1.weight, None) for e in es]
                rows += [(ops_of(n)[e].bottleneck[0].weight, None) for n in self.dyn for e in es]
                if self.has_ca:
                    rows += [(ops_of('channel_attention')[e].conv_1.weight, None) for e in es]
                rows += [(ops_of(n)[e].transform.weight, on_grid) for n in self.dyn for e in es]
            got = [get(t) for t, _ in rows]
            out['x1x1'] = None if any(t is None for t in got) else torch.cat(
                [f(t) if f else t for t, (_, f) in zip(got, rows)])
        if self.has_sa:
            out['sa2'] = cat([op.conv_2.weight for op in ops_of('spatial_attention')])
        if self.has_ca:
            w = cat([op.conv_2.weight for op in ops_of('channel_attention')])
            out['ca2'] = None if w is None else self._on_taps(w, ks * ks)
        if self.dyn:
            out['decode'] = cat([ops_of(n)[e].decode.weight for s in range(S) for n in self.dyn
                                 for e in range(s * K, (s + 1) * K)])

        def bn_of(key):  # the reference BatchNorm behind a block of `bn_blocks`
            kind, n, i = key if len(key) == 3 else (key[0], None, key[1])
            if kind == 'sep1':
                return ops_of(n)[i][0][3]
            if kind == 'sep2':
                return ops_of(n)[i][1][3]
            if kind == 'dil':
                return ops_of(n)[i][3]
            if kind == 'pool':  # the same statistics on every edge of a source: take edge (s, 0)
                return ops_of(n)[i * K][1]
            if kind == 'bneck':
                return ops_of(n)[i].bottleneck[1]
            return ops_of('spatial_attention')[i].bn_1 if kind == 'sa' else ops_of('skip_connect')[i].bn

        stats = [cat([getattr(bn_of(key), f'running_{stat}') for key in self.bn_blocks]) for stat in ('mean', 'var')]
        if self.bn_blocks and stats[0] is not None:
            out['bn_stats'] = torch.stack(stats)
        return {k: v for k, v in out.items() if v is not None}


class _Gather:
    """The weight rows and BatchNorm statistics of the alive (edge, op) pairs of pruned groups, read for all
    of them at once (the fast Network does it once per forward for the whole network): one cat of their
    weights (flattened) and one index_select of the alive rows; one cat of their statistics and one
    index_select of the alive channels. `flush()` writes back the statistics the BatchNorms updated (one
    index_copy_, one foreach copy). items: [(group, group._plan(layout, ...))]."""

    def __init__(self, items):
        self.items = items
        self.params, start, at = [], {}, 0
        for j, (group, plan) in enumerate(items):
            for name in plan['names']:
                start[(j, name)] = at
                self.params.append(group._param(name))
                at += self.params[-1].numel()
        index, self.shapes = [], []  # (item, name, shape) of each gathered piece
        for j, (group, plan) in enumerate(items):
            for name, rows in plan['rows'].items():
                t = group._param(name)
                width, base = t[0].numel(), start[(j, group._param_name(name))]
                index += [torch.arange(base + lo * width, base + hi * width) for lo, hi in rows]
                self.shapes.append((j, name, (sum(hi - lo for lo, hi in rows), *t.shape[1:])))
        self.bn_groups = [group for group, plan in items if plan.get('bn_channels')]
        self.bn_sizes = [group.bn_stats.shape[1] for group in self.bn_groups]
        channels, self.bn_at, at, base = [], [], 0, 0
        for group, plan in items:
            c = plan.get('bn_channels')
            self.bn_at.append((at, at + len(c)) if c else None)
            if c:
                channels.append(torch.tensor(c) + base)
                at, base = at + len(c), base + group.bn_stats.shape[1]
        ref = self.params[0] if self.params else self.bn_groups[0].bn_stats
        self.index = torch.cat(index).to(ref.device) if index else None
        self.bn_index = torch.cat(channels).to(ref.device) if channels else None
        self._updated = None

    def weights(self) -> list[dict]:
        """Per item, weight name -> the rows of its alive pairs."""
        out = [{} for _ in self.items]
        if self.index is None:
            return out
        flat = torch.cat([p.reshape(-1) for p in self.params]) if len(self.params) > 1 else self.params[0].reshape(-1)
        picked = flat.index_select(0, self.index)
        pieces = picked.split([math.prod(shape) for _, _, shape in self.shapes])
        for (j, name, shape), piece in zip(self.shapes, pieces):
            out[j][name] = piece.view(shape)
        return out

    def statistics(self) -> list:
        """Per item, (2, channels): the running means and variances of its BatchNorms' alive channels, which
        they update in place (then `flush`), or None."""
        if self.bn_index is None:
            return [None] * len(self.items)
        full = (torch.cat([g.bn_stats for g in self.bn_groups], 1) if len(self.bn_groups) > 1
                else self.bn_groups[0].bn_stats)
        gathered = full.index_select(1, self.bn_index)
        self._updated = (full, gathered)
        return [None if at is None else gathered[:, at[0]:at[1]] for at in self.bn_at]

    def flush(self) -> None:
        full, gathered = self._updated
        full.index_copy_(1, self.bn_index, gathered)
        if len(self.bn_groups) > 1:  # `full` was a copy: back into each group's buffer
            torch._foreach_copy_([g.bn_stats for g in self.bn_groups], list(full.split(self.bn_sizes, 1)))
        self._updated = None


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
        for group in self.groups:  # NOS only: merging raises the DARTS space's multiply-adds too much
            group.merged = space == 'nos'

    def forward(self, s0, s1, weights: FastWeights):
        x = self.preprocess(s0, s1)  # (N, 2C, H, W): both preprocessed inputs, the input group's X
        h, w = x.shape[-2:]
        size = ((h + 1) // 2, (w + 1) // 2) if self.reduction else (h, w)
        states = [x[:, :x.shape[1] // 2], x[:, x.shape[1] // 2:]]  # views; only a multiplier > steps reads them
        shape = (x.shape[0], x.shape[1] // 2, *size)
        coefs = weights.split()
        groups = iter(zip(self.groups, coefs, weights.layouts, weights.given))

        def run(xs, pending=None, hand_back=False):
            group, coef, layout, given = next(groups)
            out = group(xs, coef, layout, pending, given, hand_back)
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
                # a node in the cell's output is read by that cat too: handed back by its group's fan, so that
                # its two gradients are summed in the fan's reduction, not by one more add (`_fan`)
                hand_back = k >= self._steps - self._multiplier
                pending = run([node], rest, hand_back)
                if hand_back:
                    states[-1] = pending.pop('X')
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


class _NodeConv(torch.autograd.Function):
    """dwconv(f, D) + f * SA, as `_node` computes a node: the per-sample depthwise conv (operations.dynamic_conv,
    the batch folded into the channels), then f * SA added in place: two kernels forward (against autograd's
    conv, mul, add) and four backward (conv backward, then the gradient of f * SA added in place to f's, and
    that of SA: a product summed over channels; against five)."""

    @staticmethod
    def forward(ctx, f, D, sa):
        n, c, h, w = f.shape
        k = D.shape[-1]
        f, D = f.contiguous().view(1, n * c, h, w), D.contiguous().view(n * c, 1, k, k)
        out = F.conv2d(f, D, padding=(k - 1) // 2, groups=n * c).view(n, c, h, w)
        out.addcmul_(f.view(n, c, h, w), sa)
        ctx.save_for_backward(f, D, sa)
        return out

    @staticmethod
    def backward(ctx, g):
        f, D, sa = ctx.saved_tensors
        n, c, h, w = g.shape
        k = D.shape[-1]
        need_f, need_d, need_sa = ctx.needs_input_grad
        gf, gd = None, None
        if need_f or need_d:
            gf, gd, _ = torch.ops.aten.convolution_backward(
                g.reshape(1, n * c, h, w), f, D, None, [1, 1], [(k - 1) // 2] * 2, [1, 1], False, [0, 0], n * c,
                [need_f, need_d, False])
        if need_f:
            gf = gf.view(n, c, h, w).addcmul_(g, sa)
        if need_d:
            gd = gd.view(n, c, k, k)
        gsa = None
        if need_sa:  # SA is one map per sample (broadcast over channels), or per channel (AGNAS's gates)
            gsa = g * f.view(n, c, h, w)
            gsa = gsa.sum(1, keepdim=True) if sa.shape[1] == 1 < c else gsa
        return gf, gd, gsa


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
    if 'SA' in c:
        return _NodeConv.apply(f, c['D'], c['SA'])
    f = f.contiguous()  # a slice of the pending sums; the per-sample conv folds the batch into channels
    return dynamic_conv(f, c['D'].contiguous())


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
    sa = ca = ()  # no attention or dynamic ops (what agnas's gated `mix` reads of a layout)
    dyn = dyn_pairs = ()

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
        alive = _alive_rows([[True] * len(self.ops)] * self.rows if alive is None else alive, self.rows,
                            len(self.ops))
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
        xs = iter(_fan(x, 1, [None] * (bool(lay.convs) + lay.pool + lay.identity)))
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

    With alive masks (`set_alive`), the fast path computes each op on the edges where it is alive only, and
    weighs dead (edge, op) pairs 0. `checkpoint_cells` (model_search.Network; --checkpoint_cells) recomputes
    each cell in the backward; its cells run the depthwise convs unmerged (see the property).
    """

    @property
    def checkpoint_cells(self) -> bool:
        return self.__dict__.get('_checkpoint_cells', False)

    @checkpoint_cells.setter
    def checkpoint_cells(self, on: bool) -> None:
        """Recomputed cells run the NOS space's depthwise convs unmerged (`FastEdges.merged`): the merged
        forward costs more multiply-adds (the 3x3 kernels' zero borders) and, on the CPU, more time, which a
        recomputation pays twice; the merged backward's saving is not repeated. Measured on the CPU (NOS + AGS,
        batch 8, `bench_search.py --count`, each timed in turn with the un-checkpointed step): 1.42x its time
        merged, 1.36x unmerged, for 17,221 kernel ops instead of 15,510. Both compute the same values; the flag
        may change when a search resumes."""
        self.__dict__['_checkpoint_cells'] = bool(on)
        for m in self.modules():
            if isinstance(m, FastEdges):
                m.recomputed = bool(on)

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
        self._gathers, self._flush = {}, None
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

    def _weights_of_cells(self) -> list:
        """As the reference's, and the weights and statistics that the pruned groups of every cell read,
        gathered once for the whole network (`_Gather`); the statistics go back after the forward."""
        out = super()._weights_of_cells()
        if not self.fast or self.space == 'nb201' or not all(isinstance(w, FastWeights) for w in out):
            return out
        ref = next(self.parameters())
        items, where, merged = [], [], []
        for i, (cell, fw) in enumerate(zip(self.cells, out)):
            for g, (group, lay) in enumerate(zip(cell.groups, fw.layouts)):
                if not lay.full:
                    items.append((group, group._plan(lay, ref.device, ref.dtype)))
                    where.append((i, g))
                elif group.merges(lay):
                    merged.append((i, g, group))
        if merged:  # the merged depthwise weights of every group, one gather (`_MergedGather`)
            key = ('merged', tuple(id(group) for _, _, group in merged), ref.device)
            if key not in self._gathers:
                self._gathers[key] = _MergedGather([group for _, _, group in merged])
            given = [list(fw.given) for fw in out]
            for (i, g, _), w in zip(merged, self._gathers[key].weights()):
                given[i][g] = (w, None)
            out = [fw.with_given(gv) for fw, gv in zip(out, given)]
        if not items:
            return out
        key = (tuple((id(group), id(plan)) for group, plan in items), ref.device, ref.dtype)
        if key not in self._gathers:  # one layout at a time (a prune changes it for good)
            self._gathers = {k: v for k, v in self._gathers.items() if k[0] == 'merged'}
            self._gathers[key] = _Gather(items)
        gather = self._gathers[key]
        given = [list(fw.given) for fw in out]
        for (i, g), w, stats in zip(where, gather.weights(), gather.statistics()):
            given[i][g] = (w, stats)
        if self.training:
            self._flush = gather
        return [fw.with_given(gv) for fw, gv in zip(out, given)]

    def forward_stages(self, x: torch.Tensor):
        self._flush = None
        try:
            return super().forward_stages(x)
        finally:  # the pruned groups' updated statistics back into their buffers
            if self._flush is not None:
                self._flush.flush()
                self._flush = None

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
