"""AGNAS: attention-guided op importance, with a cell per stage (Sun et al., ICML 2022; docs/agnas.md).

There are no architecture parameters. Behind every edge of the supernet sits its own SE-style attention
module (`GateAttention`): it pools each op's output, passes the concatenated pooled vector through two
bias-free FCs and a sigmoid, and gates every channel of every op (Eq. 4-5). The edge outputs the sum of the
gated op outputs (Eq. 7-8, `AttentionMixedOp`); the summed gates of an op are its importance (Eq. 6). All
weights, ops and attention FCs, train in one level on the training half (Alg. 1); after every epoch
`importance_pass` forwards the whole validation half (eval mode, no_grad) and collects each edge's mean gates,
from which each supernet cell is derived by DARTS's rule, and one normal cell per stage plus the two
reduction cells form the `genotypes.StagedGenotype` (docs/agnas.md).

Layout: the supernet is model_search.Network; this file holds only what is AGNAS's own, and no model file
imports it. `build_network` hands `AttentionMixedOp` to the Network as its mixed-op factory. `AGNASMethod` is
the `--method agnas` of train_search.py (the shared weight step is darts.weight_step). On the fast path
(model_search_fast's `Network(fast=True)`, train_search.py's default) `FastGatedEdges` computes the gated edges of a whole source
group at once; test_fast_search.py proves it equal to `AttentionMixedOp`.

Over the ProxylessNAS chain (--space proxyless, AGNAS's macro search, §4.2) the supernet is
model_macro.MacroSupernet: a gate module behind every layer rather than every edge, the same single-level step
and importance pass, and the table is layers x candidates, derived by an argmax per layer (docs/macro.md).

Over the NOS space (docs/agnas.md, this repo's own, experimental) the gates replace NOS's softmax weights:
features, attention maps and dynamic kernels are each gated before NOS's calibration, and each op's pooled
descriptor is taken from its effect on the edge's skip output.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import darts
import datasets
import genotypes
import model_macro
import utils
from model_search import MixedOp, resolve_ops, stage_layout
from model_search_fast import FastEdges, NB201Edges, Network
from operations import GateAttention, GateStatistics, dynamic_conv

# The AGNAS search settings (docs/agnas.md) for the flags whose argparse default is None (docs/search.md).
# Everything else the search uses is train_search.py's default and matches §3: 8 cells, 16 channels,
# batch 64, 25K/25K split, SGD lr 0.025, momentum 0.9, wd 3e-4, gradient-norm clip 5.
DEFAULTS = {
    'space': 'darts',             # §5.2 (CIFAR-10, DARTS's space); --space nos is this repo's own (§8)
    'epochs': 50,                 # §5.2
    'learning_rate_min': 0.001,   # the authors' code (the paper does not say): cosine to 0.001
    'lambda_at': 0.0,             # AGNAS has no teacher; > 0 adds NOS's AGS (this repo's own combination)
}
MIN_LAYERS = 5  # a normal cell in each of the three stages (model_search.stage_layout)


def gap(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling (Eq. 4): (N, C, H, W) -> (N, C)."""
    return x.mean(dim=(2, 3))


def box_sums(x: torch.Tensor, k: int, ones: torch.Tensor | None = None) -> torch.Tensor:
    """B (N, C, k, k): B[..., i, j] sums the zero-padded x over the H x W window that tap (i, j) of a k x k
    'same' depthwise conv reads, so that GAP(dwconv(x, D)) = sum_t D_t B_t / HW for any kernel D (dwconv is
    linear in x): one depthwise conv of x with an all-ones H x W kernel (`ones`, (C, 1, H, W), may be
    passed in to skip its allocation)."""
    C, H, W = x.shape[1:]
    if ones is None:
        ones = x.new_ones(C, 1, H, W)
    return F.conv2d(x, ones, padding=k // 2, groups=C)


SKIP_NEEDED = ('AGNAS over attention or dynamic ops needs skip_connect alive on every edge: their descriptors pool '
               'their effect on the skip output (keep skip_connect alive in the alive masks)')


class AttentionMixedOp(GateStatistics, MixedOp):
    """An edge whose op outputs are gated by its own GateAttention (docs/agnas.md).

    Builds its ops as MixedOp does (DARTS's ops with affine=False, a pool followed by BatchNorm(affine=False))
    and returns MixedOp's triple (features, attention, kernels), so DARTS's and NOS's cells use it unchanged:
    - DARTS space: features = sum_k gate_k * o_k(x) (Eq. 7-8); no attention, no kernels.
    - NOS space (§8, experimental): features = sum w_o * o(x) over feature ops, attention = sum w_o * a_o(x),
      kernels = [w_o * D_o] (exact: dwconv is linear in the kernel). Op descriptors: GAP(o(x)) for a
      feature op, GAP(x' * a(x)) for an attention op, GAP(dwconv(x', D)) for a dynamic op, x' being the
      edge's skip_connect output. w = g / sum_o g_o per channel (`normalize`, this repo's decision; §8 says
      w = g), whatever the op set (--ops feature too): raw gates make an edge a sum of about 5.5 ops that
      the surrogate node's kernels and maps multiply and the identity ops compound node to node (initial
      cross-entropy 866 in the 5-cell, 16-channel supernet), while normalised ones make it a convex
      combination, as NOS's softmax does. The importance is the mean of w, the weights the forward uses
      (GateStatistics); the raw gates are logged beside it.
    `weights` is accepted and ignored (the cells pass None): the gates replace the softmax weights.

    Alive masks (`active`, set by the Network from its alive_normal / alive_reduce, as for MixedOp): a dead
    op is not computed, its descriptor is 0 (as `none`'s) and its weight is 0 (before the normalisation);
    over attention or dynamic ops skip_connect must stay alive (the descriptors need x'). The fast path
    (FastGatedEdges) computes the same, test_fast_search.py proves it.

    normalize: None decides by the ops (normalise when attention or dynamic ops are among them);
    agnas.build_network passes space == 'nos'. Its gates are collected while `collecting` (GateStatistics).
    """

    def __init__(self, C: int, stride: int, ops: list[str], normalize: bool | None = None, **kwargs):
        super().__init__(C, stride, ops, **kwargs)  # kwargs: MixedOp's (NAS-Bench-201's cells pass them)
        self.C = C
        self.attention = GateAttention(len(ops), C)
        self.plain = not (self.attention_idx or self.dynamic_idx)  # DARTS's space: feature ops only
        self.normalize = not self.plain if normalize is None else normalize
        if not self.plain and 'skip_connect' not in ops:
            raise ValueError('AGNAS over attention or dynamic ops needs skip_connect among the ops: their '
                             'descriptors pool their effect on the skip output (docs/agnas.md)')
        self.skip_idx = ops.index('skip_connect') if 'skip_connect' in ops else None
        self.reset_importance()

    def forward(self, x: torch.Tensor, weights=None):
        m = len(self._ops)
        dead = len(self.active) < m
        outs = {i: self._ops[i](x) for i in self.active}  # a dead op is not computed
        if not self.plain:
            if self.skip_idx not in outs:
                raise ValueError(SKIP_NEEDED)
            skip = outs[self.skip_idx]
        desc = []
        for i in range(m):
            if i not in outs:
                desc.append(None)                                      # dead: a zero descriptor
            elif i in self.attention_idx:
                desc.append(gap(skip * outs[i]))
            elif i in self.dynamic_idx:
                desc.append(gap(dynamic_conv(skip, outs[i])))
            else:
                desc.append(gap(outs[i]))
        zero = next(d for d in desc if d is not None).new_zeros(x.shape[0], self.C)
        pooled = torch.stack([zero if d is None else d for d in desc], dim=1)
        gates = self.attention(pooled)                                 # (N, m, C), Eq. 4-5
        w = gates
        if dead:
            w = w * gates.new_tensor([float(i in outs) for i in range(m)])[:, None]
        if self.normalize:  # NOS variant: convex weights per channel (see the class docstring)
            w = w / w.sum(dim=1, keepdim=True)
        self.collect(gates, w)                                         # Eq. 6, summed over the images
        g = w[:, :, :, None, None]                                     # broadcast over H, W (or k, k)
        features = [g[:, i] * outs[i] for i in self.feature_idx if i in outs]   # Eq. 7-8
        attention = [g[:, i] * outs[i] for i in self.attention_idx if i in outs]
        kernels = [g[:, i] * outs[i] for i in self.dynamic_idx if i in outs]
        return sum(features) if features else None, sum(attention) if attention else None, kernels


class FastGatedEdges(GateStatistics, FastEdges):
    """The gated edges of one source group on the fast path (issue 11): model_search_fast.FastEdges's op outputs
    for all E edges at once, weighed by E GateAttentions instead of A. The same computation as E
    `AttentionMixedOp`s (test_fast_search.py proves it), in a few batched kernels:
    - descriptors (Eq. 4): one mean over the group's stacked op outputs gives every entry's GAP. Over NOS (§8,
      see AttentionMixedOp), with x' the edges' skip outputs: GAP(x' * SA) as one batched product;
      GAP(x' * CA) = CA * GAP(x'); GAP(dwconv(x', D)) = sum over taps t of D_t * B_t / HW, where B_t, the sum
      of the zero-padded x' over the window that tap t reads, is one depthwise conv of x' with an all-ones
      H x W kernel (dwconv is linear in x'). Each edge's (m, C) descriptors are gathered from these, a zero
      row for `none`;
    - the E attention modules (Eq. 5) as two grouped 1x1 convs: gates (N, E, m, C);
    - the weighted sums (Eq. 7-8; NOS: Eq. 2-4, 6-8 with w = g / sum_o g) as one contraction per kind whose
      coefficients are per sample and channel: (N, K, Q, C) gathered from the gates at once, then
      einsum('nkqc,nqc..->nkc..').
    Parameters: FastEdges's, and `gate_fc1` (E*C, m*C, 1) / `gate_fc2` (E*m*C, C, 1), the edges' W1 / W2
    stacked edge by edge. Collects its gates like AttentionMixedOp (GateStatistics; `mean_gates`: (E, m)).
    """

    def __init__(self, C: int, stride: int, ops: list[str], S: int, K: int, carrier: bool = False,
                 normalize: bool | None = None):
        super().__init__(C, stride, ops, S, K, carrier)
        m = self.m = len(ops)
        self.ops = list(ops)
        self.plain = not (self.has_sa or self.has_ca or self.dyn)  # DARTS's space: feature ops only
        self.normalize = not self.plain if normalize is None else normalize  # as AttentionMixedOp
        hidden = C  # GateAttention's r = m: the hidden width is m*C / m

        def linear(*shape):  # nn.Linear's initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            return nn.Parameter(torch.empty(*shape, 1).uniform_(-shape[1] ** -0.5, shape[1] ** -0.5))

        self.gate_fc1 = linear(self.E * hidden, m * C)   # W1 of every edge (Eq. 5)
        self.gate_fc2 = linear(self.E * m * C, hidden)   # W2 of every edge (Eq. 5)
        self.reset_importance()

    def _gated_index(self, lay, device) -> tuple:
        """(descriptor index, coefficient index, entries per kind, skip entries, alive mask): where each edge's
        op descriptors sit in the descriptor table (a dead (edge, op) reads the zero row), where each
        (target, entry) coefficient sits in [gates | 0 | 1], and the (E, m, 1) alive mask of the gates (None
        when every op is alive)."""
        key = ('gated', id(lay), device)
        if key in self._cache:
            return self._cache[key]
        E, m = self.E, self.m
        edge_of_row = {r: e for e, r in enumerate(r for rr in lay.rows for r in rr)}
        zero, one = E * m, E * m + 1

        def local(i):  # A's flat (row, op) index, as the layout holds it -> (edge, op) of this group
            if i in (lay.zero, lay.one):
                return zero if i == lay.zero else one
            r, o = divmod(i, lay.ncol)
            return edge_of_row[r] * m + o

        col = {n: o for o, n in enumerate(self.ops)}
        rows = [r for rr in lay.rows for r in rr]  # edge e's row of the alive mask
        alive = [[bool(lay.alive[r][o]) for o in range(m)] for r in rows]
        if not self.plain and not all(row[col['skip_connect']] for row in alive):
            raise ValueError(SKIP_NEEDED)
        kinds = [k for k in ('F', 'SA', 'D') if k in lay.index]
        coef = {k: [[local(i) for i in row] for row in lay.index[k]] for k in kinds}
        # the descriptor table: [GAP of each F entry | GAP(x' SA) per edge | GAP(x' CA) per edge |
        # GAP(dwconv(x', D)) per dynamic op and edge | 0]
        where = {i: q for row in coef['F'] for q, i in enumerate(row) if i < zero}
        n_f = len(coef['F'][0])
        extra = {}
        a = n_f
        for n, edges in (('spatial_attention', lay.sa), ('channel_attention', lay.ca)):
            for i, e in enumerate(edges):
                extra[e * m + col[n]] = a + i
            a += len(edges)
        for i, (n, e) in enumerate(lay.dyn_pairs):  # FastEdges orders them by (source, op, target)
            extra[e * m + col[n]] = a + i
        a += len(lay.dyn_pairs)
        desc = [where.get(i, extra.get(i, a)) for i in range(E * m)]  # `a`: the zero row (`none`)
        skip = sorted({where[e * m + col['skip_connect']] for e in range(E)}) if not self.plain else []
        flat = [i for k in kinds for row in coef[k] for i in row]
        mask = None if all(all(row) for row in alive) else torch.tensor(alive, device=device).view(E, m, 1)
        out = (torch.tensor(desc, device=device), torch.tensor(flat, device=device),
               [(k, len(coef[k][0])) for k in kinds], (skip[0], len(skip)) if skip else None, mask)
        if skip:
            assert skip == list(range(skip[0], skip[0] + len(skip)))  # the skip entries are adjacent
        self._cache[key] = out
        return out

    def _entries(self, lay, kind: str, edges, per: int, device) -> torch.Tensor:
        """For each of `edges` (in order), the index of its x' entry: its source (identity) or itself (FR)."""
        key = ('entries', id(lay), kind, device)
        if key not in self._cache:
            self._cache[key] = torch.tensor([e // per for e in edges], device=device)
        return self._cache[key]

    def _const(self, value: float, ref: torch.Tensor) -> torch.Tensor:
        key = ('const', value, ref.device, ref.dtype)
        if key not in self._cache:
            self._cache[key] = torch.full((1, 1, 1), value, dtype=ref.dtype, device=ref.device)
        return self._cache[key].expand(ref.shape[0], 1, ref.shape[2])

    def mix(self, stacks: dict, coef: dict, lay, skip=None) -> dict:
        if 'F' not in stacks and self.plain:  # no op of the group computes (edges restricted by diagnose.py)
            return {}
        f = stacks['F']                                        # (N, Q, C, H, W)
        N, _, C, H, W = f.shape
        E, m = self.E, self.m
        desc_index, coef_index, entries, skip_entries, mask = self._gated_index(lay, f.device)
        pooled = f.mean((3, 4))                                # GAP of every entry (Eq. 4)
        table = [pooled]
        if skip_entries is not None:  # NOS (§8): descriptors of the attention and dynamic ops from x'
            a, n_skip = skip_entries                           # x': n_skip = S (identity) or E (FR) entries
            # (N, n_skip, C, H, W): the identity is the group's input itself (saved for backward anyway);
            # FactorizedReduce's entries are a view of the stack (copied here: a slice of the batch's rows)
            x_skip = skip.reshape(N, n_skip, C, H, W)
            per = E // n_skip                                  # edges per skip entry
            if lay.sa:  # GAP(x' * SA), one row per edge where SA is alive (lay.sa)
                if tuple(lay.sa) == tuple(range(E)):  # alive everywhere: (N, n_skip, per, HW) @ (N, n_skip, HW, C)
                    sa = stacks['SA'].view(N, n_skip, per, H * W)
                    table.append(torch.matmul(sa, x_skip.flatten(3).transpose(2, 3)).view(N, E, C) / (H * W))
                else:  # pruned on some edges: each alive edge's x' entry
                    sa = stacks['SA'].view(N, len(lay.sa), 1, H * W)
                    xs = x_skip.flatten(3).index_select(1, self._entries(lay, 'sa', lay.sa, per, f.device))
                    table.append((sa * xs).sum(3) / (H * W))
            nd, kk = len(lay.dyn), self.kernel_size ** 2
            P = len(lay.dyn_pairs)                             # the kernel stack: [dynamic pairs | CA | ...]
            if lay.ca:  # CA sits at the centre tap of its kernel entries (FastEdges.forward)
                ca = stacks['D'][:, P:P + len(lay.ca)].flatten(3)[..., kk // 2]   # (N, edges with CA, C)
                entry = self._entries(lay, 'ca', lay.ca, per, f.device)
                table.append(ca * pooled[:, a:a + n_skip].index_select(1, entry))
            if nd:  # GAP(dwconv(x', D)) = sum_t D_t B_t / HW, per (source, op, target) pair of lay.dyn_pairs
                key = ('ones', n_skip * C, H, W, f.device, f.dtype)
                if key not in self._cache:
                    self._cache[key] = torch.ones(n_skip * C, 1, H, W, dtype=f.dtype, device=f.device)
                box = box_sums(x_skip.view(N, n_skip * C, H, W), self.kernel_size, self._cache[key])
                box = box.view(N, n_skip, C, kk)               # x' per source (identity) or per edge (FR)
                entry = self._entries(lay, 'dyn', [e for _, e in lay.dyn_pairs], per, f.device)
                kern = stacks['D'][:, :P].reshape(N, P, C, kk)
                table.append((kern * box.index_select(1, entry)).sum(3) / (H * W))
        table.append(self._const(0., pooled))
        desc = torch.cat(table, 1).index_select(1, desc_index)                 # (N, E*m, C)
        hidden = F.relu(F.conv1d(desc.view(N, E * m * C, 1), self.gate_fc1, groups=E))
        gates = torch.sigmoid(F.conv1d(hidden, self.gate_fc2, groups=E)).view(N, E, m, C)   # Eq. 5
        w = gates if mask is None else gates * mask.to(gates.dtype)            # a dead (edge, op) weighs 0
        if self.normalize:  # NOS variant: convex weights per channel (AttentionMixedOp)
            w = w / w.sum(dim=2, keepdim=True)
        self.collect(gates, w)                                                 # Eq. 6, summed over the images
        w = torch.cat([w.view(N, E * m, C), self._const(0., pooled), self._const(1., pooled)], 1)
        w = w.index_select(1, coef_index).split([self.K * q for _, q in entries], 1)
        out = {}
        for (kind, q), wk in zip(entries, w):  # Eq. 7-8: sum over entries q of w[n, k, q, c] * entry q
            wk = wk.view(N, self.K, q, C)
            t = stacks[kind]
            out[kind] = (torch.einsum('nkqc,nqhw->nkchw', wk, t.squeeze(2)) if kind == 'SA'
                         else torch.einsum('nkqc,nqchw->nkchw', wk, t))
        return out

    def from_plain(self, mixed: list, ops: list[str], get) -> dict:
        return gates_from_plain(super().from_plain(mixed, ops, get), mixed, get)


def gates_from_plain(out: dict, mixed: list, get) -> dict:
    """A fused group's attention weights (`gate_fc1`, `gate_fc2`) from its reference edges' GateAttentions,
    added to `out` (the op weights' mapping); the fast-path edges of both spaces share it."""
    for name, attr in (('gate_fc1', 'fc1'), ('gate_fc2', 'fc2')):
        ts = [get(getattr(e.attention, attr).weight) for e in mixed]
        if all(t is not None for t in ts):
            out[name] = torch.cat(ts).unsqueeze(-1)
    return out


class NB201FastGatedEdges(GateStatistics, NB201Edges):
    """AGNAS's gated edges of one NAS-Bench-201 source group on the fast path: model_search_fast.NB201Edges's
    op outputs for its K edges, weighed by K GateAttentions instead of A; the same computation as K
    `AttentionMixedOp`s (test_nb201_fast.py proves it). NB201's ops are all feature ops, so the gate arithmetic
    is FastGatedEdges's over DARTS's space, and its methods are reused as they are: one mean pools every
    stacked entry (a pool or identity entry serves all the source's edges), the K attention modules run as two
    grouped 1x1 convs, and the weighted sums are one per-sample, per-channel contraction."""

    plain = True  # feature ops only: each descriptor is GAP(o(x))
    _gated_index = FastGatedEdges._gated_index
    _const = FastGatedEdges._const
    mix = FastGatedEdges.mix

    def __init__(self, C: int, ops: list[str], K: int, track_running_stats: bool = True, normalize: bool = False):
        super().__init__(C, ops, K, track_running_stats)
        m = self.m = len(ops)
        self.ops = list(ops)
        self.normalize = normalize  # as AttentionMixedOp's (build_network: raw gates on NB201)

        def linear(*shape):  # nn.Linear's initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            return nn.Parameter(torch.empty(*shape, 1).uniform_(-shape[1] ** -0.5, shape[1] ** -0.5))

        self.gate_fc1 = linear(K * C, m * C)   # W1 of every edge (Eq. 5; hidden width m*C / r = C)
        self.gate_fc2 = linear(K * m * C, C)   # W2 of every edge (Eq. 5)
        self.reset_importance()

    def from_plain(self, mixed: list, ops: list[str], get) -> dict:
        return gates_from_plain(super().from_plain(mixed, ops, get), mixed, get)


def build_network(C: int, num_classes: int, layers: int, criterion=None, space: str = 'darts', ops=None,
                  **kwargs) -> Network:
    """AGNAS's supernet: model_search.Network with gated edges and no architecture parameters (with
    fast=True, the fast path's FastGatedEdges; on NAS-Bench-201, NB201FastGatedEdges). Over NOS the gates are
    normalised whatever the op set."""
    normalize = space == 'nos'
    fast_edges = NB201FastGatedEdges if space == 'nb201' else FastGatedEdges
    return Network(C, num_classes, layers, criterion, space=space, ops=ops, method='agnas',
                   mixed_op=functools.partial(AttentionMixedOp, normalize=normalize),
                   fast_edges=functools.partial(fast_edges, normalize=normalize), **kwargs)


def gated_edges(model: Network) -> list[GateStatistics]:
    return [m for m in model.modules() if isinstance(m, GateStatistics)]


def importance_pass(model: Network, loader, device) -> dict:
    """Forward every image of `loader` in order, in eval mode under no_grad, collecting each edge's gates
    (docs/agnas.md: a full validation pass after every epoch; the last one decides).

    Returns {'importance': (layers, edges, ops) mean weights (GateStatistics.mean_gates), 'raw_gates': the
    raw gates' means (cell spaces; None for the chain), 'images': n, 'val_ce': .., 'val_acc': ..}; the
    cross-entropy and top-1 of the same pass come for free and are logged.
    """
    was_training = model.training
    edges = gated_edges(model)
    model.eval()
    model.reset_importance()
    for e in edges:
        e.collecting = True
    ce = correct = None
    n = 0
    try:
        with torch.no_grad():
            dtype = next(model.parameters()).dtype  # float64 under --double
            for x, y in loader:
                x, y = x.to(device, dtype, non_blocking=True), y.to(device, non_blocking=True)
                logits = model(x)
                batch_ce = F.cross_entropy(logits, y, reduction='sum').double()
                batch_correct = (logits.argmax(1) == y).sum()
                ce = batch_ce if ce is None else ce + batch_ce
                correct = batch_correct if correct is None else correct + batch_correct
                n += x.shape[0]
    finally:
        for e in edges:
            e.collecting = False
        model.train(was_training)
    # under torchrun each process saw its share of the images: add up the gate sums and the counts
    totals = utils.all_sum(torch.tensor([float(n), 0. if ce is None else ce.item(),
                                         0. if correct is None else float(correct.item())],
                                        dtype=torch.float64, device=device)).tolist()
    if utils.world_size() > 1:
        for e in edges:
            e._gate_sum = utils.all_sum(e._gate_sum)
            e._weight_sum = utils.all_sum(e._weight_sum)
            e._images = int(totals[0])
    n = int(totals[0])
    if not n:
        raise utils.UserError('the validation half is empty, so AGNAS has no images to rank the ops with; '
                              'lower --train_portion')
    raw = model.importance(raw=True) if isinstance(model, Network) else None  # the cell spaces' edges
    return {'importance': model.importance(), 'raw_gates': raw, 'images': n, 'val_ce': totals[1] / n,
            'val_acc': 100. * totals[2] / n}


class AGNASMethod:
    """--method agnas (train_search.py's method interface, see darts.DartsMethod).

    Single level (Alg. 1): each step is CE (+ lambda_at * L_AT with --lambda_at > 0) on the training batch,
    backward, gradient-norm clip and an SGD step on all weights; no validation batch is drawn. After every
    epoch, `importance_pass` over the validation half; the genotype is derived from the last pass.
    """
    name = 'agnas'
    uses_val_batch = False
    paper_spaces = ('darts', 'nb201', 'proxyless')  # Table 1; NAS-Bench-201 (§5.4, App. B); Table 2
    paper_ags = False

    @classmethod
    def defaults(cls, args) -> dict:
        return dict(DEFAULTS)

    @classmethod
    def check_args(cls, args) -> None:
        if args.unrolled:
            raise utils.UserError('--unrolled does not apply to --method agnas, which has no architecture '
                                  'parameters to unroll: drop --unrolled')
        if args.space not in ('nb201', model_macro.SPACE) and args.layers < MIN_LAYERS:
            raise utils.UserError(f'--layers {args.layers} is too few for --method agnas: each of the three '
                                  f'stages needs a normal cell, so use at least {MIN_LAYERS} cells')

    @classmethod
    def fast(cls, args) -> bool:
        return darts.DartsMethod.fast(args)  # FastGatedEdges whenever darts would take the fast path

    @classmethod
    def build_model(cls, args, num_classes: int) -> Network:
        if args.space == model_macro.SPACE:  # AGNAS's macro search: gated choice layers (docs/agnas.md)
            return model_macro.build_supernet(cls.name, num_classes, args.dataset, args.image_size,
                                              args.width_mult)
        return build_network(args.init_channels, num_classes, args.layers, nn.CrossEntropyLoss(),
                             space=args.space, ops=resolve_ops(args.space, args.ops), fast=cls.fast(args),
                             **darts.space_options(args))

    def __init__(self, model: Network, args):
        self.model = model
        self.lambda_at = args.lambda_at
        self.grad_clip = args.grad_clip
        self.clip_by = getattr(args, 'grad_clip_by', None) or 'norm'
        self.stage_cell = args.stage_cell
        self.batch_size = getattr(args, 'batch_size', 64)
        self.matrix = None  # the last importance pass: (layers, edges, ops), or the chain's (layers, candidates)
        self.chain = isinstance(model, model_macro.MacroSupernet)
        self.nb201 = not self.chain and model.space == 'nb201'  # one cell for all 15: derived from their mean
        self.stages, self.reductions = ([], []) if self.nb201 or self.chain else stage_layout(len(model.cells))

    def start_epoch(self, epoch: int) -> None:
        pass

    def step(self, x, y, xv, yv, teacher, eta, optimizer) -> dict:
        self.model.train()
        t = darts.teacher_stages(teacher if self.lambda_at > 0 else None, x)
        ce, at, logits = darts.weight_step(self.model, optimizer, x, y, t, self.lambda_at, self.grad_clip,
                                           self.clip_by)
        return {'train_ce': ce, 'train_at': at, 'train_correct': (logits.argmax(1) == y).sum()}

    def end_epoch(self, epoch: int, val_loader, device) -> dict:
        # the validation half in its stored order (the loop's loader shuffles), every image; under torchrun
        # each process takes every world-th image and importance_pass adds the sums up
        data, world = val_loader.dataset, utils.world_size()
        rank = torch.distributed.get_rank() if world > 1 else 0
        ordered = datasets.make_loader(data, max(1, self.batch_size // world), False, val_loader.num_workers,
                                    sampler=list(range(rank, len(data), world)), pin=val_loader.pin_memory)
        out = importance_pass(self.model, ordered, device)
        self.matrix = out['importance']
        # the pass is a full eval-mode pass over the held-out half: it is also the epoch's val_acc_end
        end = {'val_ce': out['val_ce'], 'val_acc': out['val_acc'], 'val_acc_end': out['val_acc'],
               'val_ce_end': out['val_ce'], 'importance_images': out['images']}
        if self.chain:  # the table itself is the record's `importance`
            return end
        if self.nb201:
            return {**end, 'cell_genotypes': self.model.cell_genotypes(self.matrix)}
        return {**end,
                'stage_cell': self.stage_cell, 'stages': self.stages, 'reduction_cells': self.reductions,
                'cell_genotypes': self.model.cell_genotypes(self.matrix),
                # over NOS the importance is the normalised gates; the raw gates' means beside it
                **({'raw_gates': np.asarray(out['raw_gates']).round(6).tolist()} if self.model.space == 'nos'
                   else {})}

    def importance(self) -> dict:
        """Each supernet cell's mean gates, edges x ops: {'cell 0': .., 'cell 1': .., ...}."""
        if self.matrix is None:
            return {}
        if self.chain:  # the chain's one table: layers x candidates
            return {'layers': self.matrix}
        cells = {f'cell {i}': m for i, m in enumerate(self.matrix)}
        # NAS-Bench-201: the mean over the cells first, the matrix its one cell is derived from
        return {'mean': self.matrix.mean(axis=0), **cells} if self.nb201 else cells

    def genotype(self) -> genotypes.StagedGenotype | genotypes.ChainGenotype:
        if self.chain:
            return self.model.genotype(self.matrix)
        return self.model.genotype(self.stage_cell, self.matrix)

    def state_dict(self) -> dict:
        # no architecture optimizer; the last importance pass, so that a run resumed after its last epoch
        # still derives its genotype
        return {'importance': None if self.matrix is None else torch.from_numpy(self.matrix)}

    def load_state_dict(self, state: dict) -> None:
        m = state['importance']
        self.matrix = None if m is None else m.numpy()
