"""Does a search's op importance predict what each op contributes? The discretisation diagnostic.

AGNAS §6.1 (Sun et al., ICML 2022; Fig. 3, 7-9): at the end of a search, keep one op on one edge of the
trained supernet and prune the others, every other edge as trained, and measure the supernet's accuracy on
the held-out half: the op's *discretised accuracy*. Kendall's tau between the ranking of an edge's ops by
this accuracy and their ranking by the method's importance says whether the importance means what a
derivation assumes it means. EoiNAS Fig. 1 asks the same of DARTS and GDAS (with stand-alone models), and
its Fig. 5 shows how densely the importance values crowd.

    python diagnose.py runs/search                            # every edge, every alive op
    python diagnose.py runs/search --edges normal:1,cell0:1 --batches 20 --finetune_steps 10
    python diagnose.py runs/search --derive accuracy          # + genotype_accuracy.json (ours)
    torchrun --nproc_per_node=4 diagnose.py runs/search       # the edges split over 4 processes

RUN_DIR is a train_search.py --save folder (any method, any space). The supernet is built by the method's
own `build_model` from the checkpoint's flags and loaded from it; its importance is the method's own
(`importance()`: DARTS/GDAS the softmax of A, EoiNAS the indicator I, AGNAS each cell's mean gates).
- An *edge* is a row of A in a cell type (`normal:1`: discretised in every normal cell, since they share the
  row) or a row of one cell (`cell3:1`; AGNAS's cells have their own gates, so its edges are always these).
- Keeping op o (model_search.Network.restrict_edges): A-weighted methods give the edge weight 1 on o alone
  (DARTS-PT's projection); a gated edge (AGNAS) keeps o with its own gate, the pruned ops outputting zero.
- The other edges compute as trained: the softmax of A over the alive ops (`--rest softmax`), or each row's
  strongest op alone (`--rest argmax`, the default for GDAS, whose weights only ever ran one op per edge);
  a Gumbel sample is never drawn, so every evaluation is deterministic.
- Evaluation: the held-out half (the images that trained A, without augmentation), in eval mode: BatchNorm
  uses the running statistics of the search (`--bn batch`: each batch's own statistics, the stored ones left
  as they were). `--finetune_steps K` first takes K weight steps (the search's step, on K fixed batches of
  the training half) with the edge discretised, as DARTS-PT does (AGNAS §6.1 does not say); every weight
  and statistic is restored before the next candidate.
- `--derive accuracy`: DARTS-PT's perturbation rule (Wang et al., ICLR 2021, "Rethinking Architecture
  Selection in Differentiable NAS"): removing op o from its edge costs the supernet acc - acc(without o);
  the method's own derivation then runs on that matrix of costs instead of its importance. Written to
  RUN_DIR/genotype_accuracy.json; this repo's own combination, no paper of the four has it.

Writes RUN_DIR/diagnose.json, diagnose.csv (one row per edge and op), and with matplotlib
diagnose_edges_GROUP.png (accuracy and importance per op, per edge) and diagnose_density.png (the density
of the importance values, EoiNAS Fig. 5). docs/diagnose.md has the commands for the papers' figures.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import darts
import datasets
import genotypes
import model_macro
import nb201
import runs
import train_search
import utils
import visualize
from genotypes import op_kind
from model_search import resolve_ops

LEVEL = 0.95            # the central share of random rankings' tau that the band holds
BAND_DRAWS = 20000      # seeded draws of the mean tau when the edges have different op counts
BAND_SEED = 0
REST = ('softmax', 'argmax')
REST_DEFAULT = {'gdas': 'argmax'}  # every other A-weighted method: softmax; AGNAS: its gates
BN_MODES = ('running', 'batch')
DERIVE = ('accuracy',)
MAX_PRELOAD_BYTES = 2 << 30  # the evaluation batches are kept on the device when they fit in this
TIE_BREAK = 1e-6        # --derive accuracy: a loss increase breaks ties between equal accuracy costs


def parse_args(argv=None) -> argparse.Namespace:
    p = utils.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('run_dir', help='a train_search.py --save folder (or its checkpoint.pt)')
    p.add_argument('--edges', default='all',
                   help='all | none (the importance density only) | a comma list of: normal, reduce, cellI (all '
                        'their edges), normal:R, reduce:R, cellI:R (row R: an index or a label such as 1->2), '
                        'layerI (the ProxylessNAS chain)')
    p.add_argument('--only_ops', default=None, help='comma list of ops: rank only these (default: every alive op)')
    p.add_argument('--batches', type=int, default=None, help='evaluate on the first N batches of the held-out half')
    p.add_argument('--batch_size', type=int, default=None, help='default: the search\'s')
    p.add_argument('--bn', default='running', help=f'BatchNorm in evaluation: {" | ".join(BN_MODES)}')
    p.add_argument('--rest', default=None,
                   help=f'the other edges: {" | ".join(REST)} (default: argmax for gdas, softmax otherwise)')
    p.add_argument('--finetune_steps', type=int, default=0, help='weight steps after discretising, per candidate')
    p.add_argument('--finetune_lr', type=float, default=None, help='default: the search\'s --learning_rate')
    p.add_argument('--derive', default=None, help='accuracy: also derive a genotype by DARTS-PT\'s rule (ours)')
    p.add_argument('--variants', default=None, metavar='CELL:G',
                   help='EoiNAS Fig. 1: write the derived genotype once per op on gene G of its normal or reduce '
                        'cell (a classic DARTS cell), to retrain each with train_cifar.py; the gene\'s edge is '
                        'measured too')
    p.add_argument('--seed', type=int, default=0, help='draws the --finetune_steps batches')
    p.add_argument('--benchmark', default=None, metavar='PATH',
                   help='NAS-Bench-201: look the genotypes up in this file (default: the search\'s --benchmark)')
    p.add_argument('--data', default=None, help='where the data lives (default: the search\'s --data)')
    p.add_argument('--gpu', type=int, default=0, help='CUDA device (under torchrun LOCAL_RANK picks)')
    p.add_argument('--device', default=None, help='cpu to run on the CPU')
    p.add_argument('--workers', type=int, default=2, help='data-loading processes')
    p.add_argument('--no_plots', action='store_true', help='skip the plots')
    return p.parse_args(argv)


def check_args(args) -> None:
    if args.bn not in BN_MODES:
        raise utils.UserError(f'unknown --bn {args.bn!r}; valid values: {", ".join(BN_MODES)}')
    if args.rest is not None and args.rest not in REST:
        raise utils.UserError(f'unknown --rest {args.rest!r}; valid values: {", ".join(REST)}')
    if args.derive is not None and args.derive not in DERIVE:
        raise utils.UserError(f'unknown --derive {args.derive!r}; valid value: accuracy (the importance\'s own '
                              f'derivation is the search\'s genotype.json)')
    for flag, low in (('batches', 1), ('batch_size', 1), ('finetune_steps', 0)):
        value = getattr(args, flag)
        if value is not None and value < low:
            raise utils.UserError(f'--{flag} must be at least {low}, got {value}')
    if args.finetune_lr is not None and not (args.finetune_lr > 0 and math.isfinite(args.finetune_lr)):
        raise utils.UserError(f'--finetune_lr must be a finite number > 0, got {args.finetune_lr}')


# ---------------------------------------------------------------------------------------------------------
# Kendall's tau and the band of random rankings


def kendall_tau_b(x, y) -> float | None:
    """Kendall's tau-b of two equally long sequences, ties counted (Kendall 1945):
    (n_c - n_d) / sqrt((n_0 - n_x) (n_0 - n_y)), n_0 = n(n-1)/2 pairs, n_x / n_y the pairs tied in x / y.
    None when it is undefined (fewer than 2 items, or every item tied in x or in y)."""
    n = len(x)
    if n != len(y):
        raise ValueError(f'tau needs two rankings of the same length, got {n} and {len(y)}')
    concordant = discordant = tied_x = tied_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            tied_x += dx == 0
            tied_y += dy == 0
            if dx * dy > 0:
                concordant += 1
            elif dx * dy < 0:
                discordant += 1
    pairs = n * (n - 1) // 2
    denominator = math.sqrt((pairs - tied_x) * (pairs - tied_y))
    return None if denominator == 0 else (concordant - discordant) / denominator


def inversion_distribution(n: int) -> np.ndarray:
    """P(a random permutation of n items has k inversions), k = 0 .. n(n-1)/2 (the Mahonian numbers over
    n!): tau = 1 - 4k / (n(n-1)) for a random ranking of n untied items."""
    counts = np.ones(1)
    for m in range(2, n + 1):  # inserting the m-th item adds 0 .. m-1 inversions
        counts = np.convolve(counts, np.ones(m))
    return counts / counts.sum()


def random_tau_band(ns, level: float = LEVEL, draws: int = BAND_DRAWS, seed: int = BAND_SEED) -> dict:
    """The central `level` interval of the mean tau over edges with ns[e] ops each, when every edge's
    ranking is random (no ties): exact (convolving the inversion distributions) when every edge has the same
    number of ops, else from `draws` seeded draws of each edge's exact distribution."""
    ns = [int(n) for n in ns if n >= 2]
    if not ns:
        return {'low': None, 'high': None, 'method': None}
    q = (1 - level) / 2
    if len(set(ns)) == 1:
        n, edges = ns[0], len(ns)
        dist = np.ones(1)
        for _ in range(edges):
            dist = np.convolve(dist, inversion_distribution(n))
        taus = 1 - 4 * np.arange(len(dist)) / (n * (n - 1) * edges)  # the mean tau of each total k
        order = np.argsort(taus, kind='stable')
        taus, cdf = taus[order], np.cumsum(dist[order])
        low, high = taus[np.searchsorted(cdf, q - 1e-12)], taus[np.searchsorted(cdf, 1 - q - 1e-12)]
        return {'low': float(low), 'high': float(high), 'method': 'exact'}
    rng = np.random.default_rng(seed)
    total = np.zeros(draws)
    for n in ns:
        dist = inversion_distribution(n)
        total += 1 - 4 * rng.choice(len(dist), size=draws, p=dist) / (n * (n - 1))
    low, high = np.quantile(total / len(ns), [q, 1 - q])
    return {'low': float(low), 'high': float(high), 'method': f'{draws} seeded draws'}


def density(values, grid) -> np.ndarray:
    """Gaussian kernel density estimate with Silverman's rule-of-thumb bandwidth (EoiNAS Fig. 5's KDE)."""
    v = np.asarray(values, dtype=np.float64)
    spread = min(v.std(ddof=1), np.subtract(*np.percentile(v, [75, 25])) / 1.34) if len(v) > 1 else 0.
    h = 0.9 * (spread if spread > 0 else max(v.std(), 1e-3)) * len(v) ** -0.2
    z = (np.asarray(grid)[:, None] - v[None, :]) / h
    return np.exp(-0.5 * z ** 2).sum(1) / (len(v) * h * math.sqrt(2 * math.pi))


# ---------------------------------------------------------------------------------------------------------
# The search: its supernet, importance and genotype, as train_search.py built them


@dataclass
class Search:
    folder: str
    args: argparse.Namespace       # the search's flags
    model: torch.nn.Module
    method: object
    importance: dict               # the method's importance(): per cell type, per cell ('cell i'), or 'layers'
    genotype: object
    dtype: torch.dtype
    data_stats: dict | None = None

    @property
    def chain(self) -> bool:
        """The ProxylessNAS chain (--space proxyless): layers, not cells."""
        return isinstance(self.model, model_macro.MacroSupernet)

    @property
    def per_cell(self) -> bool:
        """Each cell has its own importance and no cell type has one (AGNAS on the cell spaces)."""
        return not self.chain and not any(k in self.importance for k in ('normal', 'reduce', 'mean'))


def load_search(path: str, device, data: str | None = None) -> Search:
    """The search in `path` (its --save folder or checkpoint), rebuilt by train_search.py's METHODS."""
    folder = path if os.path.isdir(path) else os.path.dirname(path) or '.'
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, runs.CHECKPOINT)):
        raise utils.UserError(f'{path} is not a search folder: it holds no {runs.CHECKPOINT} (train_search.py writes '
                              f'SAVE/{runs.CHECKPOINT} after each epoch); pass the --save folder of a search')
    ckpt = runs.load_checkpoint(path)
    script = runs.checkpoint_script(ckpt)
    if script != 'train_search.py' or 'args' not in ckpt:
        what = f'a checkpoint of {script}' if script else 'not a checkpoint of this project'
        raise utils.UserError(f'{path} holds {what}, not of a search; diagnose.py reads the --save folder of a '
                              f'train_search.py run')
    saved = dict(ckpt['args'])
    if saved.get('method') not in train_search.METHODS:
        raise utils.UserError(f'{path} was searched with --method {saved.get("method")!r}, which this version of '
                              f'train_search.py does not have (it has {", ".join(train_search.METHODS)})')
    args = train_search.parse_args(['--method', saved['method'], '--space', saved.get('space', 'nos')])
    vars(args).update(saved)
    if data is not None:
        args.data = data
    if args.method == 'agnas' and args.space == 'nos' and any(
            op_kind(o) in ('attention', 'dynamic') for o in resolve_ops(args.space, args.ops)):
        raise utils.UserError(f'{path} is an AGNAS search over NOS\'s attention or dynamic ops (this repo\'s '
                              f'experimental combination), whose gated edges read those ops\' descriptors off '
                              f'skip_connect\'s output, so an edge cannot keep one op alone; diagnose AGNAS on the '
                              f'darts, nb201 or proxyless space, or over --ops feature')
    stats = ckpt.get('data_stats')
    classifier = ckpt.get('model', {}).get('classifier.weight')
    classes = len(classifier) if classifier is not None else datasets.num_classes(args.dataset, args.data)
    dtype = torch.float64 if args.double else torch.float32
    cls = train_search.METHODS[args.method]
    model = cls.build_model(args, classes).to(device, dtype)
    try:
        model.load_state_dict(ckpt['model'])
        method = cls(model, args)
        method.load_state_dict(ckpt['method'])
    except (RuntimeError, KeyError, ValueError) as e:
        raise utils.UserError(f'the checkpoint in {path} does not fit the supernet its own flags build '
                              f'({utils.one_line(str(e))[:200]}); it was written by another version of this '
                              f'code') from None
    importance = {k: np.asarray(v, dtype=np.float64) for k, v in method.importance().items()}
    if not importance:
        raise utils.UserError(f'{path} holds no importance yet (the search has not finished an epoch)')
    model._criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)  # the search's (fine-tuning)
    model.tau = None  # no Gumbel sample: every evaluation is deterministic
    if hasattr(model, 'set_skip_dropout'):
        model.set_skip_dropout(0.)
    return Search(folder, args, model, method, importance, method.genotype(), dtype, data_stats=stats)


# ---------------------------------------------------------------------------------------------------------
# Edges


@dataclass
class Edge:
    name: str               # normal:1 | reduce:1 | cell3:1 | layer7
    group: str              # the cell type (normal | reduce), or 'layers' on the chain
    cells: list             # the supernet cells (layers) it is discretised in
    row: int                # its row in the importance matrix (0 on the chain)
    label: str              # 1->2 (genotypes.row_labels)
    ops: list               # candidate op indices
    importance: list        # of the candidates
    accuracy: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    removed: list = field(default_factory=list)   # --derive accuracy: (accuracy, loss) without each alive op


def units(search: Search) -> list:
    """The supernet's cells (or the chain's layers), each as (index, group)."""
    if search.chain:
        return [(i, 'layers') for i in range(len(search.model.layers))]
    return [(i, 'reduce' if c.reduction else 'normal') for i, c in enumerate(search.model.cells)]


def edge_labels(search: Search) -> list[str]:
    """The names of a cell's rows ('1->2'), or of the chain's layers."""
    if search.chain:
        return genotypes.row_labels(search.args.space, len(search.model.layers))
    return genotypes.row_labels(search.args.space, len(search.model.alive_masks()[0]))


def alive_rows(search: Search, cell: int) -> list[list[bool]]:
    """Which ops each row of cell (layer) `cell` may compute: its alive mask (the chain: its candidates)."""
    if search.chain:
        return [search.model.available[cell].tolist()]
    return search.model._alive_lists[int(search.model.cells[cell].reduction)]


def importance_matrix(search: Search, scope: str, cell: int) -> np.ndarray:
    """The rows x ops importance an edge of `scope` ranks by: its cell type's (AGNAS on NAS-Bench-201: the
    mean over the cells, which its genotype is derived from), or its own cell's."""
    imp = search.importance
    if search.chain:
        return imp['layers'][cell:cell + 1]
    if scope.startswith('cell'):
        return imp.get(f'cell {cell}', imp.get(units(search)[cell][1]))
    return imp[scope] if scope in imp else imp['mean']


def parse_edges(search: Search, text: str, only_ops: str | None = None, keep_single: bool = False) -> list[Edge]:
    """The edges `--edges` names, with their candidate ops (alive, and in --only_ops if given). An edge with
    fewer than two candidates has nothing to rank: left out, unless named (or `keep_single`)."""
    model, labels = search.model, edge_labels(search)
    ops = list(model.ops)
    wanted = None
    if only_ops:
        wanted = [o.strip() for o in only_ops.split(',') if o.strip()]
        unknown = [o for o in wanted if o not in ops]
        if unknown:
            raise utils.UserError(f'--only_ops {unknown[0]} is not an op of this search; its ops: {", ".join(ops)}')
    cells = units(search)
    types = sorted({g for _, g in cells})
    if text.strip() == 'all':
        items = [('layers', None)] if search.chain else (
            [(f'cell{i}', None) for i, _ in cells] if search.per_cell else [(t, None) for t in types])
    else:
        items = []
        for part in text.split(','):
            scope, _, row = part.strip().partition(':')
            if search.chain and scope.startswith('layer') and scope[5:].isdigit():
                items.append((scope, 0))
                continue
            items.append((scope, _row(row, labels, part.strip()) if row else None))
    edges = []
    for scope, row in items:
        explicit = row is not None
        if search.chain:
            if scope == 'layers':
                edges += [e for i, _ in cells for e in _edges(search, f'layer{i}', [i], 0, labels, wanted, False,
                                                               keep_single)]
                continue
            if scope.startswith('layer') and scope[5:].isdigit():
                i = int(scope[5:])
                if i >= len(cells):
                    raise utils.UserError(f'there is no {scope}: the chain has layers 0 to {len(cells) - 1}')
                edges += _edges(search, scope, [i], 0, labels, wanted, True, keep_single)
                continue
            raise utils.UserError(f'--edges {scope!r} names no layer of the chain; use all, layers, or layerI '
                                  f'(0 to {len(cells) - 1})')
        if scope in types:
            members = [i for i, g in cells if g == scope]
            if search.per_cell:  # each cell has its own gates: one edge per cell
                edges += [e for i in members
                          for e in _edges(search, f'cell{i}', [i], row, labels, wanted, explicit, keep_single)]
                continue
            edges += _edges(search, scope, members, row, labels, wanted, explicit, keep_single)
        elif scope.startswith('cell') and scope[4:].isdigit():
            i = int(scope[4:])
            if i >= len(cells):
                raise utils.UserError(f'there is no {scope}: the supernet has cells 0 to {len(cells) - 1}')
            edges += _edges(search, scope, [i], row, labels, wanted, explicit, keep_single)
        else:
            raise utils.UserError(f'--edges {scope!r} names no edge; use all, {", ".join(types)}, cellI, or one of '
                                  f'them with :ROW (e.g. {types[0]}:1 or cell0:{labels[1]})')
    seen, unique = set(), []
    for e in edges:
        if (e.name, e.row) not in seen:
            seen.add((e.name, e.row))
            unique.append(e)
    if not unique:
        raise utils.UserError('no chosen edge has two or more alive ops to rank (a pruning search leaves one op '
                              'per edge at its end); name an edge explicitly to evaluate its op')
    return unique


def _row(text: str, labels: list[str], part: str) -> int:
    if text.isdigit():
        if int(text) >= len(labels):
            raise utils.UserError(f'there is no edge {part}: a cell has {len(labels)} edges, rows 0 to '
                                  f'{len(labels) - 1}')
        return int(text)
    if text in labels:
        return labels.index(text)
    raise utils.UserError(f'there is no edge {part}: rows are 0 to {len(labels) - 1} or the labels '
                          f'{", ".join(labels)}')


def _edges(search: Search, scope: str, cells: list, row: int | None, labels, wanted, explicit: bool,
           keep_single: bool = False) -> list[Edge]:
    ops = list(search.model.ops)
    group = units(search)[cells[0]][1]
    matrix = importance_matrix(search, scope, cells[0])
    out = []
    for r in ([row] if row is not None else range(len(labels))):
        alive = alive_rows(search, cells[0])[r]
        if wanted is not None and explicit:
            pruned = [ops[o] for o in range(len(ops)) if ops[o] in wanted and not alive[o]]
            if pruned:
                raise utils.UserError(f'{pruned[0]} was pruned from edge {scope}:{r} ({labels[r]}) during the search '
                                      f'(or is not a candidate there), so it has no importance to rank; drop it '
                                      f'from --only_ops')
        candidates = [o for o in range(len(ops)) if alive[o] and (wanted is None or ops[o] in wanted)]
        if len(candidates) < 2 and not (explicit or keep_single):
            continue
        name = scope if search.chain else f'{scope}:{r}'
        out.append(Edge(name, group, list(cells), r, labels[cells[0]] if search.chain else labels[r], candidates,
                        [float(matrix[r][o]) for o in candidates]))
    return out


# ---------------------------------------------------------------------------------------------------------
# Evaluation of a restricted supernet


def one_hot(o: int, n: int) -> list[float]:
    return [1. if k == o else 0. for k in range(n)]


def cannot_run(search: Search, restriction: dict) -> str | None:
    """Why the supernet cannot run under this restriction, or None: on the NOS space an inner node must keep
    a first-tier edge that computes a feature op."""
    if search.chain or search.args.space != 'nos':
        return None
    model = search.model
    feature = [op_kind(o) == 'feature' for o in model.ops]
    for i in {i for i, _ in restriction}:
        alive = [list(r) for r in alive_rows(search, i)]
        for (j, r), (kept, _) in restriction.items():
            if j == i:
                alive[r] = [o in kept for o in range(len(model.ops))]
        offset = 0
        for k in range(genotypes.STEPS):
            if not any(alive[r][o] and feature[o] for r in range(offset, offset + k + 2) for o in range(len(feature))):
                return f'leaves node {k + 2} without a feature op'
            offset += k + 2
    return None


def restricted(model, restriction: dict):
    """The supernet with these edges restricted (model_search.Network.restrict_edges; the chain's layers:
    model_macro.MacroSupernet.restrict_layers, keyed (layer, 0))."""
    if isinstance(model, model_macro.MacroSupernet):
        return model.restrict_layers({i: v for (i, _), v in restriction.items()})
    return model.restrict_edges(restriction)


class Evaluator:
    """Accuracy and loss of the supernet under a restriction, on fixed batches of the held-out half; with
    `finetune` batches, after that many weight steps (restoring every weight and statistic afterwards)."""

    def __init__(self, search: Search, batches, finetune=(), lr: float = 0., bn: str = 'running', rest=None):
        self.search, self.model, self.batches = search, search.model, batches
        self.finetune, self.lr, self.bn = list(finetune), lr, bn
        self.rest = rest or {}
        self.count = 0

    def __call__(self, restriction: dict) -> tuple[float, float]:
        model = self.model
        saved = None
        if self.finetune or self.bn == 'batch':  # both move weights or BatchNorm statistics
            saved = [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]
        try:
            with restricted(model, {**self.rest, **restriction}):
                if self.finetune:
                    self._finetune()
                return self._evaluate()
        finally:
            self.count += 1
            if saved is not None:
                with torch.no_grad():
                    for t, s in zip(list(model.parameters()) + list(model.buffers()), saved):
                        t.copy_(s)

    def _finetune(self) -> None:
        """The search's weight step (its optimizer, loss and clip; no teacher) on the fine-tuning batches."""
        args, model = self.search.args, self.model
        optimizer = train_search.make_optimizer(model, args, self.lr)
        model.train()
        for x, y in self.finetune:
            darts.weight_step(model, optimizer, x, y, None, 0., args.grad_clip, args.grad_clip_by or 'norm')

    @torch.no_grad()
    def _evaluate(self) -> tuple[float, float]:
        model = self.model
        model.train(self.bn == 'batch')
        correct = loss = None
        n = 0
        for x, y in self.batches():
            logits = model(x)
            c, s = (logits.argmax(1) == y).sum(), F.cross_entropy(logits, y, reduction='sum').double()
            correct, loss = (c, s) if correct is None else (correct + c, loss + s)
            n += len(y)
        return 100. * correct.item() / n, loss.item() / n


def load_batches(search: Search, args, device):
    """(evaluation batches, fine-tuning batches, images): the held-out half in order, without augmentation
    (the images A was searched on, as the search split them: train_search.search_data), and --finetune_steps
    batches of the training half drawn with --seed."""
    s = search.args
    train, _, held_out, _ = train_search.search_data(s, search.data_stats)
    batch = args.batch_size or s.batch_size
    pin = device.type == 'cuda'
    loader = datasets.make_loader(held_out, batch, False, args.workers, pin=pin)
    limit = len(loader) if args.batches is None else min(args.batches, len(loader))
    images = min(len(held_out), limit * batch)
    nbytes = images * held_out[0][0].numel() * (8 if search.dtype == torch.float64 else 4)

    def move(x, y):
        return x.to(device, search.dtype, non_blocking=True), y.to(device, non_blocking=True)

    def take(loader, n):
        out = []
        for x, y in loader:
            out.append(move(x, y))
            if len(out) == n:
                break
        return out

    if nbytes <= MAX_PRELOAD_BYTES:
        kept = take(loader, limit)
        batches = lambda: kept
    else:  # too large to keep: read them again for every evaluation
        def batches():
            for i, (x, y) in enumerate(loader):
                if i == limit:
                    return
                yield move(x, y)
    finetune = []
    if args.finetune_steps:
        g = torch.Generator().manual_seed(args.seed)
        utils.set_seed(args.seed)  # the augmentation of the batches, drawn once for every candidate
        loader = datasets.make_loader(train, batch, True, args.workers, generator=g, pin=pin,
                                      drop_last=len(train) >= batch)
        while len(finetune) < args.finetune_steps:
            finetune += take(loader, args.finetune_steps - len(finetune))
    return batches, finetune, images


def rest_restriction(search: Search, rest: str) -> dict:
    """--rest argmax: every row of every cell (every layer) keeps its strongest alive op (the softmax of A)
    at weight 1."""
    if rest != 'argmax':
        return {}
    model, n = search.model, len(search.model.ops)
    if search.chain:
        table = model.arch_weights()
        return {(i, 0): ([int(np.argmax(row))], one_hot(int(np.argmax(row)), n)) for i, row in enumerate(table)}
    out = {}
    for t, w in enumerate(model.arch_weights()):
        for i, group in units(search):
            if int(group == 'reduce') == t:
                for r, row in enumerate(w):
                    o = int(np.argmax(row))
                    out[(i, r)] = ([o], one_hot(o, n))
    return out


def genotype_restriction(search: Search, genotype) -> dict:
    """Every edge of every cell (every layer) as the genotype says: a chosen edge keeps its op at weight 1,
    the others compute nothing (the derived architecture inside the supernet)."""
    model, n = search.model, len(search.model.ops)
    if search.chain:
        cols = [model.ops.index(name) for name in genotypes.validate_chain(genotype).layers]
        return {(i, 0): ([o], one_hot(o, n)) for i, o in enumerate(cols)}
    rows = len(model.alive_masks()[0])
    out = {}
    for i, cell in enumerate(model.cells):
        if isinstance(genotype, genotypes.NB201Genotype):  # one op on every edge, the same in every cell
            chosen = {r: model.ops.index(op) for r, op in enumerate(genotype.ops())}
        else:
            g = genotypes.cell_genotype(genotype, i, len(model.cells))
            chosen = dict(visualize.chosen_cells(g.reduce if cell.reduction else g.normal, rows, list(model.ops)))
        for r in range(rows):
            out[(i, r)] = ([chosen[r]], one_hot(chosen[r], n)) if r in chosen else ([], None)
    return out


def measure(search: Search, evaluate: Evaluator, edges: list[Edge], removal: bool, logger) -> None:
    """Each candidate op of each edge kept alone (and, with `removal`, each alive op removed); a candidate
    the supernet cannot run (`cannot_run`) gets None."""
    n = len(search.model.ops)
    for k, e in enumerate(edges):
        for o in e.ops:
            keep = {(i, e.row): ([o], one_hot(o, n)) for i in e.cells}
            acc, loss = (None, None) if cannot_run(search, keep) else evaluate(keep)
            e.accuracy.append(acc)
            e.loss.append(loss)
        if removal:
            alive = alive_rows(search, e.cells[0])[e.row]
            for o in range(n):
                drop = {(i, e.row): ([q for q in range(n) if alive[q] and q != o], None) for i in e.cells}
                e.removed.append(None if not alive[o] or cannot_run(search, drop) else evaluate(drop))
        logger.info('edge %d/%d %s (%s): %s', k + 1, len(edges), e.name, e.label, '  '.join(
            f'{search.model.ops[o]} {a:.2f}' if a is not None else f'{search.model.ops[o]} n/a'
            for o, a in zip(e.ops, e.accuracy)))


# ---------------------------------------------------------------------------------------------------------
# What the measurements say


def edge_record(search: Search, e: Edge) -> dict:
    """Per edge: the candidates' importance, discretised accuracy and loss, and how the rankings agree."""
    ops = list(search.model.ops)
    done = [k for k, a in enumerate(e.accuracy) if a is not None]
    imp = [e.importance[k] for k in done]
    acc = [e.accuracy[k] for k in done]
    tau = kendall_tau_b(imp, acc) if len(done) >= 2 else None
    tau_loss = kendall_tau_b(imp, [-e.loss[k] for k in done]) if len(done) >= 2 else None
    record = {'edge': e.name, 'label': e.label, 'group': e.group, 'cells': e.cells, 'row': e.row,
              'ops': [ops[o] for o in e.ops], 'importance': e.importance, 'accuracy': e.accuracy, 'loss': e.loss,
              'tau': tau, 'tau_loss': tau_loss}
    if done:
        top_imp = done[int(np.argmax(imp))]
        best = max(acc)
        # with ties at the top, the most important op matches when it is among the most accurate; a random
        # pick matches as often as those tied ops are
        record.update(top_importance=ops[e.ops[top_imp]], top_accuracy=ops[e.ops[done[acc.index(best)]]],
                      match=e.accuracy[top_imp] == best, match_chance=acc.count(best) / len(acc))
    ranked = sorted(e.importance, reverse=True)
    record['margin'] = ranked[0] - ranked[1] if len(ranked) > 1 else None
    if len(done) >= 2:
        record['band'] = [random_tau_band([len(done)])[k] for k in ('low', 'high')]
    if e.removed:
        record['removed'] = {ops[o]: r for o, r in enumerate(e.removed) if r is not None}
    return record


def summarise(records: list[dict]) -> dict:
    """Per cell type (the chain: its layers) and over all edges: the mean tau over the edges where it is
    defined, with the band of random rankings of the same sizes, and how often the most important op is (one
    of) the most accurate; and the mean tau of the ranking by lower loss over the edges where that one is
    defined (losses tie far less often than accuracies on few images), with its own band."""
    out = {}
    groups = list(dict.fromkeys(r['group'] for r in records))
    for group in groups + (['all'] if len(groups) > 1 else []):
        members = [r for r in records if group in (r['group'], 'all')]
        rs = [r for r in members if r['tau'] is not None]
        rl = [r for r in members if r['tau_loss'] is not None]
        if not rs and not rl:
            continue
        sizes = [sum(a is not None for a in r['accuracy']) for r in rs]
        out[group] = {'edges': len(rs), 'mean_tau': float(np.mean([r['tau'] for r in rs])) if rs else None,
                      'random_band': random_tau_band(sizes),
                      'top1_match': float(np.mean([r['match'] for r in rs])) if rs else None,
                      'top1_chance': float(np.mean([r['match_chance'] for r in rs])) if rs else None,
                      'edges_loss': len(rl),
                      'mean_tau_loss': float(np.mean([r['tau_loss'] for r in rl])) if rl else None,
                      'random_band_loss': random_tau_band([sum(v is not None for v in r['loss']) for r in rl])}
    return out


ESSENTIAL = 1e9  # the cost of removing an op the supernet cannot run without (finite: it meets -inf in NOS's sums)


def accuracy_genotype(search: Search, edges: list[Edge], supernet: tuple[float, float]):
    """DARTS-PT's perturbation rule (ours here): the cost of removing op o from its edge is the supernet's
    accuracy minus the accuracy without o (a loss increase breaks ties, TIE_BREAK); the method's own
    derivation runs on these costs in place of its importance. Returns (genotype, {scope: rows x ops})."""
    model = search.model
    n = len(model.ops)
    rows = 1 if search.chain else len(model.alive_masks()[0])
    scopes = {}
    for e in edges:
        cost = scopes.setdefault(e.name.split(':')[0], np.full((rows, n), -np.inf))
        alive = alive_rows(search, e.cells[0])[e.row]
        for o, r in enumerate(e.removed):
            if r is not None:
                cost[e.row, o] = supernet[0] - r[0] + TIE_BREAK * (r[1] - supernet[1])
            elif alive[o]:
                cost[e.row, o] = ESSENTIAL
    if search.chain:
        genotype = model.genotype(np.concatenate([scopes[f'layer{i}'] for i in range(len(model.layers))]))
    elif model.method == 'agnas':  # a matrix per cell: its own (per_cell) or its type's (NAS-Bench-201's mean)
        cells = units(search)
        cost = np.stack([scopes[f'cell{i}'] if search.per_cell else scopes[g] for i, g in cells])
        genotype = model.genotype(search.args.stage_cell, cost)
    else:
        genotype = model.genotype(importance=[scopes[t] for t in model.cell_types])
    return genotypes.validate(genotype), scopes


def format_table(search: Search, records: list[dict], summary: dict, result: dict) -> str:
    lines = [(f'{"edge":<10} {"label":<8} {"ops":>3} {"tau":>6}  {"most important (importance)":<34} '
              f'{"most accurate (accuracy %)":<32} accuracy range')]
    for r in records:
        done = [(o, i, a) for o, i, a in zip(r['ops'], r['importance'], r['accuracy']) if a is not None]
        if not done:
            lines.append(f'{r["edge"]:<10} {r["label"]:<8} {len(r["ops"]):>3}      -  (no op can run alone here)')
            continue
        top_i = max(done, key=lambda t: t[1])
        top_a = max(done, key=lambda t: t[2])
        tau = '-' if r['tau'] is None else f'{r["tau"]:.3f}'
        accs = [a for _, _, a in done]
        lines.append(f'{r["edge"]:<10} {r["label"]:<8} {len(done):>3} {tau:>6}  '
                     f'{f"{top_i[0]} ({top_i[1]:.4g})":<34} {f"{top_a[0]} ({top_a[2]:.2f})":<32} '
                     f'{min(accs):.2f} - {max(accs):.2f}')
    for group, s in summary.items():
        band = s['random_band']
        if s['mean_tau'] is not None:
            lines.append(f'mean tau {group:<6} {s["mean_tau"]:+.3f} over {s["edges"]} edges (random rankings: '
                         f'{band["low"]:+.3f} to {band["high"]:+.3f}, {int(100 * LEVEL)}%, {band["method"]}); most '
                         f'important op most accurate on {100 * s["top1_match"]:.0f}% of edges (chance '
                         f'{100 * s["top1_chance"]:.0f}%)')
        if s['mean_tau_loss'] is not None:
            band = s['random_band_loss']
            lines.append(f'mean tau {group:<6} by lower loss {s["mean_tau_loss"]:+.3f} over {s["edges_loss"]} edges '
                         f'(random rankings: {band["low"]:+.3f} to {band["high"]:+.3f})')
    sup, der = result['supernet'], result['derived']
    lines.append(f'supernet {sup["accuracy"]:.2f}%; the derived genotype inside it {der["accuracy"]:.2f}% '
                 f'(drop {der["drop"]:.2f} points)' + (f'; {nb201.describe(der["benchmark"])}' if 'benchmark' in der
                                                       else ''))
    if 'derive_accuracy' in result:
        d = result['derive_accuracy']
        lines.append(f'genotype by accuracy (DARTS-PT\'s rule) inside the supernet {d["accuracy"]:.2f}% (drop '
                     f'{d["drop"]:.2f} points); {d["changed"]} of {d["choices"]} choices differ from the search\'s'
                     + (f'; {nb201.describe(d["benchmark"])}' if 'benchmark' in d else ''))
    return '\n'.join(lines)


def write_csv(path: str, records: list[dict]) -> None:
    columns = ['edge', 'label', 'group', 'cells', 'op', 'importance', 'accuracy', 'loss', 'importance_rank',
               'accuracy_rank', 'edge_tau', 'removed_accuracy']
    tmp = f'{path}.tmp'
    with open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in records:
            acc = [a if a is not None else -math.inf for a in r['accuracy']]
            for k, op in enumerate(r['ops']):
                removed = r.get('removed', {}).get(op)
                writer.writerow({
                    'edge': r['edge'], 'label': r['label'], 'group': r['group'],
                    'cells': ' '.join(map(str, r['cells'])), 'op': op, 'importance': r['importance'][k],
                    'accuracy': '' if r['accuracy'][k] is None else r['accuracy'][k],
                    'loss': '' if r['loss'][k] is None else r['loss'][k],
                    'importance_rank': 1 + sum(v > r['importance'][k] for v in r['importance']),
                    'accuracy_rank': '' if r['accuracy'][k] is None else 1 + sum(v > acc[k] for v in acc),
                    'edge_tau': '' if r['tau'] is None else r['tau'],
                    'removed_accuracy': '' if removed is None else removed[0]})
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# Plots (matplotlib, optional)


def plot(folder: str, search: Search, records: list[dict], logger) -> list[str]:
    """diagnose_edges_SCOPE.png (AGNAS Fig. 3, 7-9: each op's discretised accuracy as a bar, its importance
    as a line) and diagnose_density.png (EoiNAS Fig. 5: every alive op's importance, and their density)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info('plots skipped: matplotlib is not installed (pip install matplotlib)')
        return []
    written = []
    scopes = {}
    for r in records:
        scopes.setdefault('layers' if search.chain else r['edge'].split(':')[0], []).append(r)
    for scope, rs in scopes.items():
        cols = min(4, len(rs))
        rows = math.ceil(len(rs) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
        for ax, r in zip(axes.flat, rs):
            x = np.arange(len(r['ops']))
            acc = [np.nan if a is None else a for a in r['accuracy']]
            ax.bar(x, acc, color='#9ecae1', label='discretised accuracy')
            finite = [a for a in acc if not np.isnan(a)]
            if finite:
                ax.set_ylim(max(0., min(finite) - 5), min(100., max(finite) + 5))
            ax.set_xticks(x, [o.replace('_conv', '').replace('_pool', '') for o in r['ops']], rotation=60,
                          fontsize=6)
            ax.set_ylabel('accuracy %', fontsize=7)
            twin = ax.twinx()
            twin.plot(x, r['importance'], 'o-', color='#d62728', label='importance')
            twin.tick_params(labelsize=6)
            tau = 'n/a' if r['tau'] is None else f'{r["tau"]:.2f}'
            name = r['label'] if search.chain else f'{r["edge"]} ({r["label"]})'
            ax.set_title(f'{name}  tau {tau}', fontsize=8)
        for ax in list(axes.flat)[len(rs):]:
            ax.axis('off')
        fig.suptitle(f'{search.args.method} on {search.args.space}: discretised accuracy (bars) and importance '
                     f'(red)', fontsize=9)
        fig.tight_layout()
        path = os.path.join(folder, f'diagnose_edges_{scope}.png')
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    groups = list(dict.fromkeys(g for _, g in units(search)))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.2), squeeze=False)
    for ax, group in zip(axes.flat, groups):
        values = importance_values(search, group)
        grid = np.linspace(values.min(), values.max(), 200) if len(values) else np.zeros(1)
        if len(values) > 1 and values.max() > values.min():
            pad = 0.1 * (values.max() - values.min())
            grid = np.linspace(values.min() - pad, values.max() + pad, 200)
            ax.plot(grid, density(values, grid), color='#1f77b4')
        ax.plot(values, np.zeros_like(values), 'o', mfc='none', color='#ff7f0e', alpha=0.6)
        ax.set_title(f'{group}{"" if search.chain else " cells"}: {len(values)} importance values', fontsize=9)
        ax.set_xlabel('importance', fontsize=8)
        ax.set_ylabel('density (KDE)', fontsize=8)
    fig.tight_layout()
    path = os.path.join(folder, 'diagnose_density.png')
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return written + [path]


def importance_rows(search: Search, group: str) -> list[list[float]]:
    """Each edge's alive importance values over the cells of one type (each cell's own where it has one,
    else its type's matrix once), or over the chain's layers."""
    rows, typed = [], False
    for i, g in units(search):
        if g != group:
            continue
        if search.chain or f'cell {i}' in search.importance:
            matrix = importance_matrix(search, 'layers' if search.chain else f'cell{i}', i)
        elif typed:
            continue  # one matrix for every cell of the type
        else:
            matrix, typed = importance_matrix(search, group, i), True
        alive = alive_rows(search, i)
        rows += [[float(matrix[r][o]) for o in range(len(alive[r])) if alive[r][o]] for r in range(len(alive))]
    return rows


def importance_values(search: Search, group: str) -> np.ndarray:
    """Every alive op's importance on every edge of the cells of one type (EoiNAS Fig. 5's points)."""
    return np.asarray([v for row in importance_rows(search, group) for v in row], dtype=np.float64)


def spread(search: Search) -> dict:
    """How densely the importance values crowd (EoiNAS Fig. 5), per cell type: their standard deviation and
    the mean gap between each edge's two most important ops (edges with two or more alive ops)."""
    out = {}
    for group in dict.fromkeys(g for _, g in units(search)):
        rows = importance_rows(search, group)
        values = np.asarray([v for row in rows for v in row])
        gaps = [np.subtract(*sorted(row)[-1:-3:-1]) for row in rows if len(row) > 1]
        if len(values):
            out[group] = {'values': len(values), 'std': float(values.std()),
                          'mean_top2_gap': float(np.mean(gaps)) if gaps else None}
    return out


# ---------------------------------------------------------------------------------------------------------
# The run


def variant_gene(search: Search, spec: str) -> tuple[str, int, int]:
    """(cell type, gene index, supernet row) of --variants CELL:G, a gene of the search's classic cell."""
    g = search.genotype
    if not (isinstance(g, genotypes.Genotype) and genotypes.is_classic(g.normal)):
        raise utils.UserError(f'--variants replaces the op of one (op, input) pair of a classic DARTS cell '
                              f'(EoiNAS Fig. 1); this search derived a {type(g).__name__} on --space '
                              f'{search.args.space}: drop --variants')
    kind, _, gene = spec.partition(':')
    if kind not in ('normal', 'reduce') or not gene.isdigit() or int(gene) >= len(g.normal):
        raise utils.UserError(f'--variants {spec!r} names no gene; use normal:G or reduce:G, G from 0 to '
                              f'{len(g.normal) - 1} (the (op, input) pairs of genotype.json, in order)')
    gene = int(gene)
    node = gene // 2
    return kind, gene, sum(2 + k for k in range(node)) + getattr(g, kind)[gene][1]


def write_variants(search: Search, spec: str, records: list[dict], logger) -> str:
    """EoiNAS Fig. 1: the derived genotype with the op of one gene replaced by each other alive op of its
    edge, written as RUN_DIR/variants/CELLG_OP.json, and variants.json: each op's importance on that edge
    (and its discretised accuracy when this run measured the edge), for plotting against the retrained
    accuracies."""
    kind, gene, row = variant_gene(search, spec)
    g, model = search.genotype, search.model
    cell = list(getattr(g, kind))
    chosen, source = cell[gene]
    folder = os.path.join(search.folder, 'variants')
    os.makedirs(folder, exist_ok=True)
    measured = next((r for r in records if r['edge'] == f'{kind}:{row}'), None)
    alive = model._alive_lists[int(kind == 'reduce')][row]
    entries = []
    for o, op in enumerate(model.ops):
        if op == 'none' or not alive[o]:
            continue
        variant = g._replace(**{kind: cell[:gene] + [(op, source)] + cell[gene + 1:]})
        path = os.path.join(folder, f'{kind}{gene}_{op}.json')
        genotypes.save(genotypes.validate(variant), path)
        accuracy = measured['accuracy'][measured['ops'].index(op)] if measured and op in measured['ops'] else None
        entries.append({'op': op, 'selected': op == chosen, 'importance': float(search.importance[kind][row][o]),
                        'discretised_accuracy': accuracy, 'genotype_file': path})
    runs.write_json(os.path.join(folder, 'variants.json'),
                    {'gene': f'{kind}:{gene}', 'edge': f'{kind}:{row}', 'input': source, 'variants': entries})
    logger.info('wrote %d variants of gene %s:%d (edge %s:%d) in %s; retrain each: python train_cifar.py '
                '--genotype_file %s', len(entries), kind, gene, kind, row, folder,
                os.path.join(folder, f'{kind}{gene}_OP.json'))
    return folder


def importance_only(search: Search, args, logger) -> dict:
    """--edges none: how densely the importance values crowd (EoiNAS Fig. 5), without evaluating anything."""
    result = {'kind': 'diagnose', 'run': os.path.abspath(search.folder), 'method': search.args.method,
              'space': search.args.space, 'ops': list(search.model.ops), 'settings': {'edges': 'none'},
              'spread': spread(search)}
    runs.write_json(os.path.join(search.folder, 'diagnose.json'), result)
    for group, s in result['spread'].items():
        gap = 'n/a' if s['mean_top2_gap'] is None else f'{s["mean_top2_gap"]:.4g}'
        logger.info('%s: %d importance values, standard deviation %.4g, mean gap between an edge\'s two most '
                    'important ops %s', group, s['values'], s['std'], gap)
    written = [] if args.no_plots else [os.path.basename(p) for p in plot(search.folder, search, [], logger)]
    logger.info('wrote %s in %s', ', '.join(['diagnose.json'] + written), search.folder)
    return result


def main(argv=None) -> dict | None:
    started, cpu_started = time.time(), time.process_time()
    args = parse_args(argv)
    check_args(args)
    world, rank, local_rank = utils.dist_env()
    device = utils.get_device(local_rank if world > 1 else args.gpu, args.device)
    logger = runs.get_logger(None, 'diagnose', enabled=rank == 0)
    search = load_search(args.run_dir, device, args.data)
    method = search.args.method
    gated = search.model.method == 'agnas'
    if gated and args.rest is not None:
        raise utils.UserError(f'--rest does not apply to --method {method}: its edges weigh themselves with their '
                              f'gates; drop --rest')
    rest = args.rest or ('gates' if gated else REST_DEFAULT.get(method, 'softmax'))
    derive = args.derive == 'accuracy'
    if derive and (args.edges.strip() != 'all' or args.only_ops):
        raise utils.UserError('--derive accuracy derives a whole genotype, so it needs every edge and op: drop '
                              '--edges and --only_ops')
    if args.variants:  # a bad gene is refused before anything is evaluated; its edge is measured too
        kind, _, row = variant_gene(search, args.variants)
        if args.edges.strip() not in ('all', 'none'):
            args.edges += f',{kind}:{row}'
    if args.edges.strip() == 'none':  # EoiNAS Fig. 5 alone: the importance values, no evaluation
        if rank != 0:
            return None
        result = importance_only(search, args, logger)
        if args.variants:
            write_variants(search, args.variants, [], logger)
        return result
    edges = parse_edges(search, args.edges, args.only_ops, keep_single=derive)
    batches, finetune, images = load_batches(search, args, device)
    lr = args.finetune_lr or search.args.learning_rate
    evaluate = Evaluator(search, batches, finetune, lr, args.bn, rest_restriction(search, rest))
    candidates = sum(len(e.ops) + (sum(alive_rows(search, e.cells[0])[e.row]) if derive else 0) for e in edges)
    logger.info('%s search on %s (%s): %d edges, %d evaluations of %d held-out images each (%s BatchNorm%s; '
                'other edges: %s)%s', method, search.args.space, search.folder, len(edges), candidates + 2 + derive,
                images, args.bn, f', {args.finetune_steps} weight steps first at lr {lr:g}' if finetune else '', rest,
                f'; {world} processes' if world > 1 else '')
    result = {'kind': 'diagnose', 'run': os.path.abspath(search.folder), 'method': method,
              'space': search.args.space, 'ops': list(search.model.ops),
              'settings': {'edges': args.edges, 'only_ops': args.only_ops, 'images': images,
                           'batches': args.batches, 'batch_size': args.batch_size or search.args.batch_size,
                           'bn': args.bn, 'rest': rest, 'finetune_steps': args.finetune_steps,
                           'finetune_lr': lr if finetune else None, 'seed': args.seed}}
    benchmark = None
    if rank == 0:
        path = args.benchmark or getattr(search.args, 'benchmark', None)
        if path and isinstance(search.genotype, genotypes.NB201Genotype):
            benchmark = nb201.Benchmark(path)  # the search's own file, where it had one
        supernet = evaluate({})
        derived = evaluate(genotype_restriction(search, search.genotype))
        result['supernet'] = {'accuracy': supernet[0], 'loss': supernet[1]}
        result['derived'] = {'genotype': json.loads(genotypes.to_json(search.genotype)), 'accuracy': derived[0],
                             'loss': derived[1], 'drop': supernet[0] - derived[0]}
        if benchmark is not None:
            result['derived']['benchmark'] = benchmark.lookup(search.genotype.arch)
    measure(search, evaluate, edges[rank::world], derive, logger)
    count, cpu = evaluate.count, time.process_time() - cpu_started
    if world > 1:  # every process measured its share of the edges; rank 0 gathers them
        torch.distributed.init_process_group('gloo', timeout=datetime.timedelta(days=7))
        try:
            shares = [None] * world if rank == 0 else None
            mine = [(e.accuracy, e.loss, e.removed) for e in edges[rank::world]]
            torch.distributed.gather_object((mine, count, cpu), shares, dst=0)
        finally:
            torch.distributed.destroy_process_group()
        if rank != 0:
            return None
        count, cpu = sum(s[1] for s in shares), sum(s[2] for s in shares)
        for r, (mine, _, _) in enumerate(shares):
            for e, (acc, loss, removed) in zip(edges[r::world], mine):
                e.accuracy, e.loss, e.removed = acc, loss, removed
    records = [edge_record(search, e) for e in edges]
    summary = summarise(records)
    result.update(edges=records, summary=summary, spread=spread(search))
    written = ['diagnose.json', 'diagnose.csv']
    if derive:
        genotype, cost = accuracy_genotype(search, edges, supernet)
        acc = evaluate(genotype_restriction(search, genotype))
        count += 1
        changed, choices = train_search.genotype_changes(search.genotype, genotype)
        genotypes.save(genotype, os.path.join(search.folder, 'genotype_accuracy.json'))
        written.append('genotype_accuracy.json')
        result['derive_accuracy'] = {'rule': 'DARTS-PT perturbation (Wang et al., ICLR 2021); ours',
                                     'genotype': json.loads(genotypes.to_json(genotype)), 'accuracy': acc[0],
                                     'loss': acc[1], 'drop': supernet[0] - acc[0], 'changed': changed,
                                     'choices': choices,
                                     'costs': {k: [[float(v) if np.isfinite(v) else None for v in row] for row in m]
                                               for k, m in cost.items()}}
        if benchmark is not None:
            result['derive_accuracy']['benchmark'] = benchmark.lookup(genotype.arch)
    result['cost'] = {'evaluations': count, 'images_per_evaluation': images,
                      'finetune_steps_per_evaluation': args.finetune_steps,
                      'wall_seconds': round(time.time() - started, 2), 'cpu_seconds': round(cpu, 2),
                      'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
                      'processes': world,
                      # the CPU's kernels sum in an order that depends on this, so a loss's last bits do too
                      'threads': torch.get_num_threads()}
    runs.write_json(os.path.join(search.folder, 'diagnose.json'), result)
    write_csv(os.path.join(search.folder, 'diagnose.csv'), records)
    logger.info('\n%s', format_table(search, records, summary, result))
    if not args.no_plots:
        written += [os.path.basename(p) for p in plot(search.folder, search, records, logger)]
    if args.variants:
        written.append(os.path.relpath(write_variants(search, args.variants, records, logger), search.folder))
    logger.info('%d evaluations in %.1f s (%.1f s of CPU time); wrote %s in %s', count, time.time() - started,
                cpu, ', '.join(written), search.folder)
    if derive:  # on this machine (diagnose's --device/--gpu) and the search's data (runs.command)
        machine = argparse.Namespace(**{**vars(search.args), 'device': args.device, 'gpu': args.gpu})
        logger.info('next: %s', runs.command('train_cifar.py', machine,
                                             genotype_file=os.path.join(search.folder, 'genotype_accuracy.json')))
    return result


if __name__ == '__main__':
    utils.run_main(main)
