"""EoiNAS as `train_search.py --method eoinas`: Gumbel-softmax sampling, the operation-importance indicator
and gradual operation pruning (Xie, Zhou and Kung, "Exploiting Operation Importance for Differentiable NAS").

What it computes, with sources and the decisions where paper and authors' code differ, is stated in
docs/eoinas.md (the paper is cited as §3.2, Eq. 7, Alg. 1). Per epoch e (0-indexed):
- the temperature T(e) and the skip dropout p(e) are set (docs/eoinas.md);
- warm-up (e < --eoi_warmup): weight steps only; A is frozen and nothing is counted;
- afterwards, per iteration (Alg. 1; docs/eoinas.md): a weight step on a training batch, then a first-order step
  of A on a validation batch (Adam; A's gradient norm clipped at 5), each on a fresh Gumbel sample. The
  statistics Ce (training samples per op) and Ca (validation accuracy of the sampled op, in percent) are
  updated on the device, without a sync;
- after a prune epoch (1-indexed: warm-up + every * m), I = beta + lambda * Ca / Ce (Eq. 6-7) ranks each
  row's alive ops, the lowest is masked out (`select_prunes`), Adam's state is cleared and Ce is reset.
The cell is derived from the last I with the pruned ops masked out (docs/eoinas.md).

`train_search.py` imports this module to register the method; this module uses DARTS's architecture step and
the shared weight step (darts.Architect, darts.weight_step, darts.teacher_stages), never the loop.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

import darts
import genotypes
import runs
import utils
from genotypes import op_kind
from model_search import masked_softmax, resolve_ops
from model_search_fast import Network

CELLS = ('normal', 'reduce')
ACC_MODES = ('last', 'mean')
ARCH_GRAD_CLIP = 5.  # the authors' code clips A's gradient norm at 5 (ts.py:360; docs/eoinas.md)

# The method's defaults (docs/eoinas.md). `epochs` is not here: it follows from the schedule
# (warm-up + every * ceil((n_ops - 1) / count): 160 on the DARTS space, 220 on the NOS space).
DEFAULTS = {
    'space': 'darts',            # the paper searched DARTS's space; --space nos is this repo's own
    'learning_rate_min': 1e-3,   # [P] §4.2: cosine to 0.001 (the authors' code: 0)
    'arch_learning_rate': 3e-4,  # [P] §4.2 (the authors' code: 6e-4)
    'lambda_at': 0.0,            # EoiNAS has no teacher; > 0 adds AGS (this repo's combination)
    'eoi_lambda': 0.5,           # lambda of Eq. 7
    'eoi_warmup': 20,            # Alg. 1: weights only for the first 20 epochs
    'prune_every': 20,           # Alg. 1: a prune every 20 epochs after the warm-up
    'prune_count': 1,            # Alg. 1: one op per row per prune
    'temperature_init': 5.0,     # §3.1 and the authors' code
    'temperature_decay': 0.965,  # the authors' code: T = 5 * 0.965^(e - 20)
    'eoi_acc': 'last',           # the authors' code: Ca is the latest batch's accuracy
    'skip_dropout': 0.1,         # the authors' code (readme: "dropout 0.1"); 0 = the paper as written
    'gumbel_hard': False,        # soft sampling (Eq. 4 and the authors' code); True = GDAS's one-op forward
}
FLAGS = tuple(k for k in DEFAULTS if k not in ('space', 'learning_rate_min', 'arch_learning_rate', 'lambda_at'))


def add_args(p) -> None:
    """The method's own flags. Their argparse default is None: the method fills DEFAULTS in, and another
    method refuses them (they would be ignored)."""
    g = p.add_argument_group('EoiNAS (--method eoinas; defaults in brackets)')
    g.add_argument('--eoi_lambda', type=float, default=None,
                   help='lambda of the indicator I = beta + lambda * Ca / Ce (Eq. 7) [0.5]; 0 ranks by beta alone')
    g.add_argument('--eoi_warmup', type=int, default=None, help='epochs of weight training only, A frozen [20]')
    g.add_argument('--prune_every', type=int, default=None,
                   help='epochs between prunes after the warm-up [20]; 0 = no pruning')
    g.add_argument('--prune_count', type=int, default=None, help='ops pruned per row at each prune [1]')
    g.add_argument('--temperature_init', type=float, default=None, help='Gumbel-softmax T during the warm-up [5]')
    g.add_argument('--temperature_decay', type=float, default=None,
                   help='T = init * decay^(epoch - warm-up) after the warm-up [0.965]')
    g.add_argument('--eoi_acc', default=None, help='Ca: last (latest batch) | mean (over the window) [last]')
    g.add_argument('--skip_dropout', type=float, default=None,
                   help='dropout after stride-1 skip_connect, decayed per epoch [0.1]; 0 = off')
    g.add_argument('--gumbel_hard', action='store_true', default=None,
                   help='GDAS\'s hard one-op forward (straight-through) instead of soft sampling; DARTS space only')


# ---------------------------------------------------------------------------------------------------------
# Schedules (docs/eoinas.md)


def temperature(epoch: int, warmup: int = 20, init: float = 5.0, decay: float = 0.965) -> float:
    """T of epoch e (0-indexed, constant within an epoch): init during the warm-up, then
    init * decay^(e - warmup) (authors' code ts.py:152,160; 5 -> 0.0353 at e = 159; docs/eoinas.md)."""
    return init if epoch < warmup else init * decay ** (epoch - warmup)


def skip_dropout_p(epoch: int, epochs: int, warmup: int = 20, p: float = 0.1) -> float:
    """Dropout after a stride-1 skip_connect in epoch e (authors' code ts.py:150,158; docs/eoinas.md):
    p (E - e - 1) / E during the warm-up, p exp(-0.2 (e - warmup)) afterwards."""
    if epoch < warmup:
        return p * (epochs - epoch - 1) / epochs
    return p * math.exp(-0.2 * (epoch - warmup))


def prunes_needed(n_ops: int, count: int) -> int:
    """Prunes that take a row of n_ops down to one op, `count` at a time."""
    return math.ceil((n_ops - 1) / count)


def default_epochs(n_ops: int, warmup: int, every: int, count: int) -> int:
    """warm-up + every * prunes (docs/eoinas.md): 20 + 20 * 7 = 160 on DARTS's 8 ops, 20 + 20 * 10 = 220 on NOS's 11.
    Without pruning (every 0), the epochs of the default period, so that ablation rows train as long."""
    return warmup + (every or DEFAULTS['prune_every']) * prunes_needed(n_ops, max(1, count))


def prune_epochs(epochs: int, warmup: int, every: int, max_prunes: int | None = None) -> list[int]:
    """1-indexed epochs after which a prune happens: warmup + every * m, m = 1, 2, ... up to `epochs`
    (Alg. 1: "epoch > 20 and epoch % 20 == 0", i.e. after 40, 60, ..., 160); none when every is 0."""
    if every <= 0:
        return []
    out = list(range(warmup + every, epochs + 1, every))
    return out if max_prunes is None else out[:max_prunes]


# ---------------------------------------------------------------------------------------------------------
# The indicator and the prune rules (docs/eoinas.md)


def indicator(beta, acc, count, lam: float) -> torch.Tensor:
    """I = beta + lam * C with C = Ca / Ce (Eq. 6-7); C := 0 where Ce = 0 (the authors' code gives inf or
    NaN there; docs/eoinas.md). Any matching shapes; float64."""
    beta, acc, count = (torch.as_tensor(v, dtype=torch.float64) for v in (beta, acc, count))
    c = torch.where(count > 0, acc / count.clamp(min=1), torch.zeros_like(acc))  # Eq. 6
    return beta + lam * c                                                        # Eq. 7


def select_prunes(importance, alive, ops, space: str = 'darts', n: int = 1) -> list[tuple[int, int]]:
    """(row, op) pairs to prune from one cell type: up to n ops per row, each the alive op of lowest I
    (ties: the lower op index; docs/eoinas.md), under the rules:
    - a row keeps at least one op, and never loses its last op other than `none` (so on {none, x} `none`
      goes even when I(x) is lower: the authors' get_min_k_no_zero, §3.3 "o != zero");
    - NOS (docs/eoinas.md): never leave an inner node with no first-tier row holding an alive feature op (the
      next-lowest I goes instead); second-tier rows are free.
    Rows are taken in order, one op each per round, n rounds, so later rows see earlier rows' prunes.
    """
    imp = np.asarray(importance, dtype=np.float64)
    alive = np.array(alive, dtype=bool)
    ops = list(ops)
    if imp.shape != alive.shape or imp.shape[1] != len(ops):
        raise ValueError(f'I {imp.shape} and alive {alive.shape} must both be rows x {len(ops)} ops')
    is_none = [o == 'none' for o in ops]
    is_feature = [op_kind(o) == 'feature' for o in ops]
    node_of = {}  # NOS: first-tier row -> its node's first-tier rows
    if space == 'nos':
        offset = 0
        for k in range(genotypes.STEPS):
            rows = list(range(offset, offset + k + 2))
            node_of.update({r: rows for r in rows})
            offset += k + 2

    def allowed(r: int, o: int) -> bool:
        others = [q for q in np.flatnonzero(alive[r]) if q != o]
        if not others or (not is_none[o] and all(is_none[q] for q in others)):
            return False
        if r in node_of and is_feature[o]:
            return any(alive[s, q] and is_feature[q] and (s, q) != (r, o) for s in node_of[r] for q in range(len(ops)))
        return True

    picks = []
    for _ in range(n):
        for r in range(len(imp)):
            for o in sorted(np.flatnonzero(alive[r]), key=lambda q: (imp[r, q], q)):
                if allowed(r, int(o)):
                    alive[r, o] = False
                    picks.append((r, int(o)))
                    break
    return picks


class EoiStats:
    """Ce and Ca per (cell type, row, op) as device tensors of shape (2, rows, ops) (docs/eoinas.md).

    record_train: Ce[sampled op] += 1 per weight step. record_val: Ca[sampled op] = the batch's top-1 in
    percent (`last`, the authors' code) or the mean of those percentages over the window (`mean`).
    Both use scatter_add_ / scatter_, so a step does not sync. reset_counts (after a prune) zeroes Ce and
    the window of `mean`; Ca keeps its values until the op is sampled on a validation batch again.
    """

    def __init__(self, rows: int, n_ops: int, device=None, acc_mode: str = 'last', cell_types: int = 2):
        if acc_mode not in ACC_MODES:
            raise ValueError(f'acc_mode must be one of {ACC_MODES}, got {acc_mode!r}')
        self.acc_mode = acc_mode
        shape = (cell_types, rows, n_ops)
        self.count = torch.zeros(shape, dtype=torch.float64, device=device)    # Ce
        self.acc = torch.zeros(shape, dtype=torch.float64, device=device)      # Ca, percent
        self.acc_sum = torch.zeros(shape, dtype=torch.float64, device=device)  # `mean`: the window's sum
        self.acc_n = torch.zeros(shape, dtype=torch.float64, device=device)    # `mean`: and its batches

    def record_train(self, index: torch.Tensor) -> None:
        """index: (cell types, rows) sampled op per row of a weight-step forward."""
        idx = index.unsqueeze(2)
        self.count.scatter_add_(2, idx, torch.ones(idx.shape, dtype=self.count.dtype, device=idx.device))

    def record_val(self, index: torch.Tensor, acc: torch.Tensor) -> None:
        """index: (cell types, rows) sampled op per row of an A-step forward; acc: that batch's top-1 in percent."""
        idx = index.unsqueeze(2)
        acc = torch.as_tensor(acc, dtype=self.acc.dtype, device=idx.device).expand(idx.shape)
        if self.acc_mode == 'last':
            self.acc.scatter_(2, idx, acc)
            return
        self.acc_sum.scatter_add_(2, idx, acc)
        self.acc_n.scatter_add_(2, idx, torch.ones_like(acc))
        self.acc.scatter_(2, idx, self.acc_sum.gather(2, idx) / self.acc_n.gather(2, idx))

    def reset_counts(self) -> None:
        for t in (self.count, self.acc_sum, self.acc_n):
            t.zero_()

    def state_dict(self) -> dict:
        return {'acc_mode': self.acc_mode, 'count': self.count.clone(), 'acc': self.acc.clone(),
                'acc_sum': self.acc_sum.clone(), 'acc_n': self.acc_n.clone()}

    def load_state_dict(self, state: dict) -> None:
        for name in ('count', 'acc', 'acc_sum', 'acc_n'):
            getattr(self, name).copy_(state[name])


# ---------------------------------------------------------------------------------------------------------
# The method (train_search.py's interface: see darts.DartsMethod)


def _flag(args, name):
    value = getattr(args, name, None)
    return DEFAULTS[name] if value is None else value


class EoiNASMethod:
    """--method eoinas: Gumbel-softmax sampling, indicator I and gradual pruning (Alg. 1; docs/eoinas.md)."""
    name = 'eoinas'
    flags = FLAGS
    paper_spaces = ('darts',)
    paper_ags = False

    @classmethod
    def defaults(cls, args) -> dict:
        try:
            n_ops = len(resolve_ops(args.space, args.ops))
        except ValueError:  # a bad --space or --ops: check_args says so
            n_ops = len(genotypes.DARTS_PRIMITIVES)
        epochs = default_epochs(n_ops, _flag(args, 'eoi_warmup'), _flag(args, 'prune_every'),
                                _flag(args, 'prune_count'))
        return {**DEFAULTS, 'epochs': epochs}

    @classmethod
    def check_args(cls, args) -> None:
        if args.unrolled:
            raise utils.UserError('--unrolled does not apply to --method eoinas, whose architecture step is '
                                  'first-order (Alg. 1); drop --unrolled')
        if args.gumbel_hard and args.space == 'nos':
            raise utils.UserError('--gumbel_hard is refused on --space nos: a hard sample runs one op per edge, '
                                  'so a node\'s first tier could lack a feature op; use --space darts or drop it')
        if args.eoi_acc not in ACC_MODES:
            raise utils.UserError(f'unknown --eoi_acc {args.eoi_acc!r}; valid values: {", ".join(ACC_MODES)}')
        for flag, ok, what in (
                ('eoi_lambda', args.eoi_lambda >= 0 and math.isfinite(args.eoi_lambda), 'a finite number >= 0'),
                ('eoi_warmup', args.eoi_warmup >= 0, 'at least 0'),
                ('prune_every', args.prune_every >= 0, 'at least 0 (0: no pruning)'),
                ('temperature_init', args.temperature_init > 0 and math.isfinite(args.temperature_init),
                 'a finite number > 0'),
                ('temperature_decay', 0 < args.temperature_decay <= 1, 'in (0, 1]'),
                ('skip_dropout', 0 <= args.skip_dropout < 1, 'in [0, 1)')):
            if not ok:
                raise utils.UserError(f'--{flag} must be {what}, got {getattr(args, flag)}')
        n_ops = len(resolve_ops(args.space, args.ops))
        if not 1 <= args.prune_count <= n_ops - 1:
            raise utils.UserError(f'--prune_count must be between 1 and {n_ops - 1} (a row of {n_ops} ops '
                                  f'keeps one), got {args.prune_count}')
        epochs, warmup, every = args.epochs, args.eoi_warmup, args.prune_every
        if warmup >= epochs:
            raise utils.UserError(f'--eoi_warmup {warmup} takes all {epochs} epochs, so A would never be '
                                  f'searched; use --eoi_warmup {epochs - 1} or less, or more --epochs')
        if every:
            needed = prunes_needed(n_ops, args.prune_count)
            last = warmup + every * needed
            if warmup + every > epochs:
                raise utils.UserError(
                    f'no prune fits in --epochs {epochs}: the first comes after epoch {warmup + every} '
                    f'(--eoi_warmup {warmup} + --prune_every {every}); use --epochs {warmup + every} or more '
                    f'({last} completes the schedule), a shorter --prune_every, or --prune_every 0 for none')
            if epochs > last:
                raise utils.UserError(
                    f'--epochs {epochs} has room for {len(prune_epochs(epochs, warmup, every))} prunes, but '
                    f'{needed} prunes of {args.prune_count} op(s) each take the {n_ops} ops of a row down to one, the last '
                    f'after epoch {last}, and nothing trains after that; use --epochs {last} or fewer, or a '
                    f'longer --prune_every')

    @classmethod
    def fast(cls, args) -> bool:
        # a hard sample runs one op per edge, which only the reference cells skip to (the fast path computes
        # every alive op); soft sampling, masks and skip dropout run on either
        return darts.DartsMethod.fast(args) and not args.gumbel_hard

    @classmethod
    def build_model(cls, args, num_classes: int) -> Network:
        return Network(args.init_channels, num_classes, args.layers, nn.CrossEntropyLoss(), space=args.space,
                       ops=resolve_ops(args.space, args.ops), fast=cls.fast(args), **darts.space_options(args))

    def __init__(self, model: Network, args):
        self.model = model
        self.ops = list(model.ops)
        self.space = args.space
        self.epochs = args.epochs
        self.lambda_at = args.lambda_at
        self.grad_clip = args.grad_clip
        self.clip_by = getattr(args, 'grad_clip_by', None) or 'norm'
        self.settings = {k: getattr(args, k) for k in FLAGS}
        for k, v in self.settings.items():
            setattr(self, k, v)
        # --at_levels weights: the teacher guides the weights only
        arch_lambda = args.lambda_at if args.at_levels == 'both' else 0.
        self.architect = darts.Architect(model, momentum=args.momentum, weight_decay=args.weight_decay,
                                        arch_learning_rate=args.arch_learning_rate,
                                        arch_weight_decay=args.arch_weight_decay, lambda_at=arch_lambda,
                                        arch_grad_clip=ARCH_GRAD_CLIP)
        self.cells = model.cell_types  # normal, reduce (NAS-Bench-201: normal only)
        self.stats = EoiStats(len(model.alphas_normal), len(self.ops), model.alphas_normal.device, self.eoi_acc,
                              len(self.cells))
        self.prune_at = prune_epochs(self.epochs, self.eoi_warmup, self.prune_every,
                                     prunes_needed(len(self.ops), self.prune_count))
        self.importance_ = None  # I at the end of the latest epoch, before its prune (what the prune saw)
        self.epoch = 0
        model.gumbel_hard = bool(self.gumbel_hard)
        self.start_epoch(0)

    @property
    def uses_val_batch(self) -> bool:
        return self.epoch >= self.eoi_warmup  # the warm-up trains the weights only

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.model.tau = temperature(epoch, self.eoi_warmup, self.temperature_init, self.temperature_decay)
        self.p = skip_dropout_p(epoch, self.epochs, self.eoi_warmup, self.skip_dropout) if self.skip_dropout else 0.
        self.model.set_skip_dropout(self.p)

    def step(self, x, y, xv, yv, teacher, eta, optimizer) -> dict:
        """Alg. 1 lines 2-5: the weight step, then (after the warm-up) A's step, each on a fresh sample;
        then the statistics. Returns detached tensors; nothing syncs (except hard mode's indices)."""
        model = self.model
        model.train()
        t_train, t_val = darts.teacher_stages_pair(teacher, x, xv, self.lambda_at > 0,
                                                   self.uses_val_batch and self.architect.lambda_at > 0)
        ce, at, logits = darts.weight_step(model, optimizer, x, y, t_train, self.lambda_at, self.grad_clip,
                                           self.clip_by)
        out = {'train_ce': ce, 'train_at': at, 'train_correct': (logits.argmax(1) == y).sum()}
        if not self.uses_val_batch:
            return out
        self.stats.record_train(model.last_sample)
        val_ce, val_at, val_logits = self.architect.step(x, y, t_train, xv, yv, t_val, eta, optimizer)
        correct = (val_logits.argmax(1) == yv).sum()
        # Ca is the top-1 of the global batch: under torchrun each process holds a share (a no-op otherwise)
        share = utils.all_sum(torch.stack([correct.to(torch.float64), correct.new_tensor(len(yv), dtype=torch.float64)]))
        self.stats.record_val(model.last_sample, share[0] * (100. / share[1]))
        out.update(val_ce=val_ce, val_at=val_at, val_correct=correct)
        return out

    def current_importance(self) -> torch.Tensor:
        """I (cell types, rows, ops) from the statistics so far; pruned ops have beta = 0 and Ce = 0, so I = 0."""
        beta = torch.stack([masked_softmax(a.detach().double(), m) for a, m in
                            zip(self.model.arch_parameters(), self.model.alive_masks())])
        return indicator(beta, self.stats.acc, self.stats.count, self.eoi_lambda)

    def end_epoch(self, epoch: int, val_loader, device) -> dict:
        """I of the epoch; after a prune epoch, the prune (docs/eoinas.md). Returns the record's EoiNAS fields."""
        imp = self.current_importance()
        self.importance_ = imp
        pruned = {c: [] for c in self.cells}
        self.lines = []
        if epoch + 1 in self.prune_at:
            imp_np = imp.cpu().numpy()
            masks = []
            for c, cell in enumerate(self.cells):
                alive = getattr(self.model, f'alive_{cell}').cpu().numpy().copy()
                for r, o in select_prunes(imp_np[c], alive, self.ops, self.space, self.prune_count):
                    alive[r, o] = False
                    pruned[cell].append([r, self.ops[o]])
                masks.append(torch.from_numpy(alive))
            self.model.set_alive(*masks)  # survivors keep their weights, BN statistics and A
            self.architect.optimizer.state.clear()  # Adam for A starts afresh (docs/eoinas.md)
            self.stats.reset_counts()  # a new window; Ca is kept
            self.lines = self.prune_lines(epoch, imp_np, pruned, [m.numpy() for m in masks])
        beta = self.model.arch_weights()
        return {'tau': self.model.tau, 'skip_dropout': self.p, 'warmup': epoch < self.eoi_warmup, 'pruned': pruned,
                'alive': {c: getattr(self.model, f'alive_{c}').cpu().tolist() for c in self.cells},
                **{f'alphas_{c}': b.round(6).tolist() for c, b in zip(self.cells, beta)}}

    def prune_lines(self, epoch: int, imp, pruned: dict, alive: list) -> list[str]:
        """The log lines of a prune: per edge and cell type, the op pruned with its I, and the ops left."""
        n = self.prune_at.index(epoch + 1) + 1
        head = (f'epoch {epoch + 1}: prune {n} of {len(self.prune_at)}, the alive op of lowest I on each edge '
                f'(--prune_count {self.prune_count}); per edge: the op pruned (its I), the ops left')
        rows = []
        for r, label in enumerate(genotypes.row_labels(self.space, len(alive[0]))):
            cols = []
            for c, cell in enumerate(self.cells):
                took = ', '.join(f'{o} ({imp[c, r, self.ops.index(o)]:.4f})' for row, o in pruned[cell] if row == r)
                cols.append(f'{took or "none"}, {int(alive[c][r].sum())} left')
            rows.append((label, cols))
        width = max(len(col) for _, cols in rows for col in cols) + 3
        lines = [head, f'  {"edge":>7}  ' + ''.join(f'{cell:<{width}}' for cell in self.cells).rstrip()]
        lines += [f'  {label:>7}  ' + ''.join(f'{col:<{width}}' for col in cols).rstrip() for label, cols in rows]
        return lines

    def log_lines(self) -> list[str]:
        """What the loop logs after the epoch line: the prune of this epoch, if there was one."""
        return getattr(self, 'lines', [])

    def importance(self) -> dict:
        """I per cell type (Eq. 7): the latest epoch's, as its prune saw it."""
        imp = self.current_importance() if self.importance_ is None else self.importance_
        return {c: imp[i].cpu().numpy() for i, c in enumerate(self.cells)}

    def genotype(self):
        """Derived from I with pruned ops at -inf (§3.3; docs/eoinas.md)."""
        imp = self.importance()
        return self.model.genotype(importance=tuple(imp[c] for c in self.cells))

    def state_dict(self) -> dict:
        return {'arch_optimizer': self.architect.optimizer.state_dict(), 'stats': self.stats.state_dict(),
                'importance': None if self.importance_ is None else self.importance_.cpu(),
                'settings': dict(self.settings)}

    def load_state_dict(self, state: dict) -> None:
        for k, v in self.settings.items():
            saved = state['settings'].get(k)
            if saved != v:
                raise utils.UserError(f'the checkpoint was made with --{k} {saved}, but this run has --{k} {v}; '
                                      f'resume with the same --{k}, or start a new --save')
        # --arch_learning_rate and --arch_weight_decay of this run (they may change on resume), Adam's moments
        runs.load_optimizer(self.architect.optimizer, state['arch_optimizer'], scheduled=False)
        self.stats.load_state_dict(state['stats'])
        imp = state['importance']
        self.importance_ = None if imp is None else imp.to(self.model.alphas_normal.device)
