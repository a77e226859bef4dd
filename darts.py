"""DARTS's method (`--method darts`): the softmax relaxation over A, bilevel, first or second order.

Also what every method shares, so that no method imports the loop (train_search.py imports the methods):
- `DartsMethod` documents the method interface that train_search.py's one loop calls;
- `search_loss` (CE + lambda * L_AT: NOS Eq. 12-13), `teacher_stages` / `teacher_stages_pair` (the frozen
  teacher's maps for AGS; the pair: both batches in one forward), `weight_step` (the weight update every
  method makes) and `Architect` (the architecture step on A, which EoiNAS and GDAS reuse);
- `search_step`: one DARTS iteration (the A step on a validation batch, then the weight step).

With --lambda_at > 0 both objectives add lambda * L_AT, the attention-transfer loss against a frozen teacher's
stage outputs of the same batch (NOS Sec. 3.3). First order by default; --unrolled uses DARTS's second-order
step (finite-difference Hessian-vector product).
"""
from __future__ import annotations

import torch
from torch import nn

import model_macro
import runs
import utils
from model_search import resolve_ops
from model_search_fast import Network

# The method's defaults of the flags whose argparse default is None: the paper's values (each method file has
# its own DEFAULTS; train_search.py fills them in).
DARTS_DEFAULTS = {
    'space': 'nos',               # NOS publishes --method darts on its own space (--space darts: DARTS's)
    'epochs': 25,                 # NOS App. A
    'learning_rate_min': 0.0,     # NOS App. A: cosine to 0
    'arch_learning_rate': 6e-4,   # NOS App. A (DARTS: 3e-4)
    'lambda_at': 1000.0,          # NOS Sec. 3.3 / docs/nos.md; 0 = plain DARTS
}


def search_loss(model: Network, x, y, teacher_stages, lambda_at: float):
    """CE + lambda * L_AT (Eq. 12 on a training batch, Eq. 13 on a validation batch).

    Returns (total, ce, at, logits); `at` is a zero tensor when lambda is 0 (no teacher).
    """
    if lambda_at > 0:
        logits, stages = model.forward_stages(x)
        at = utils.attention_transfer_loss(stages, teacher_stages)
    else:
        logits = model(x)
        at = logits.new_zeros(())
    ce = model._criterion(logits, y)
    return ce + lambda_at * at, ce, at, logits


class Architect:
    """DARTS's architecture step (its architect.py) on the AGS objective; Adam on A.

    First order: grad of the validation objective w.r.t. A at the current weights. Second order
    (`unrolled`): at the weights after one virtual SGD step w' = w - eta * (momentum * buf + grad + wd * w)
    on the training objective, minus eta times the Hessian-vector product, by finite differences.
    The unrolled copy of the network is built once here (not per step), so a run consumes the random
    generator identically whether or not it was resumed. `arch_grad_clip` > 0 clips A's gradient norm
    before the Adam step (EoiNAS's code); DARTS does not clip.
    """

    def __init__(self, model: Network, *, momentum: float, weight_decay: float, arch_learning_rate: float,
                 arch_weight_decay: float, lambda_at: float = 0., unrolled: bool = False,
                 arch_grad_clip: float = 0.):
        self.model = model
        self.arch_grad_clip = arch_grad_clip
        self.network_momentum = momentum
        self.network_weight_decay = weight_decay
        self.lambda_at = lambda_at
        self.unrolled = unrolled
        self.optimizer = torch.optim.Adam(model.arch_parameters(), lr=arch_learning_rate, betas=(0.5, 0.999),
                                          weight_decay=arch_weight_decay)
        self.unrolled_model = model.new() if unrolled else None

    def _loss(self, model, x, y, t):
        return search_loss(model, x, y, t, self.lambda_at)

    def step(self, x_train, y_train, t_train, x_val, y_val, t_val, eta, network_optimizer):
        """One update of A; returns the validation (ce, at, logits) that it saw, detached."""
        arch = self.model.arch_parameters()
        if self.unrolled:
            grads, (ce, at, logits) = self._unrolled_grads(x_train, y_train, t_train, x_val, y_val, t_val,
                                                           eta, network_optimizer)
        else:
            total, ce, at, logits = self._loss(self.model, x_val, y_val, t_val)
            grads = torch.autograd.grad(total, arch)
        for p, g in zip(arch, grads):
            p.grad = g
        utils.average_gradients(arch)
        if self.arch_grad_clip:
            nn.utils.clip_grad_norm_(arch, self.arch_grad_clip)
        self.optimizer.step()
        return ce.detach(), at.detach(), logits.detach()

    def _unrolled_grads(self, x_train, y_train, t_train, x_val, y_val, t_val, eta, network_optimizer):
        model, unrolled = self.model, self.unrolled_model
        weights = model.weights()
        total = self._loss(model, x_train, y_train, t_train)[0]
        dtheta = torch.autograd.grad(total, weights)
        # each weight's own decay (a space may decay only some weights: train_search.weight_groups)
        decay = {id(p): group['weight_decay'] for group in network_optimizer.param_groups for p in group['params']}
        with torch.no_grad():
            for p, g, q in zip(weights, dtheta, unrolled.weights()):
                d = g + decay.get(id(p), self.network_weight_decay) * p
                buf = network_optimizer.state.get(p, {}).get('momentum_buffer')
                if buf is not None:
                    d = d + self.network_momentum * buf
                q.copy_(p - eta * d)
            for a, b in zip(model.arch_parameters(), unrolled.arch_parameters()):
                b.copy_(a)
            for a, b in zip(model.buffers(), unrolled.buffers()):
                b.copy_(a)
        total, ce, at, logits = self._loss(unrolled, x_val, y_val, t_val)
        u_arch, u_weights = unrolled.arch_parameters(), unrolled.weights()
        grads = torch.autograd.grad(total, u_arch + u_weights)
        dalpha, vector = grads[:len(u_arch)], grads[len(u_arch):]
        implicit = self._hessian_vector_product(vector, x_train, y_train, t_train)
        return [g - eta * h for g, h in zip(dalpha, implicit)], (ce, at, logits)

    def _hessian_vector_product(self, vector, x, y, t, r: float = 1e-2):
        """(grad_A L(w + R v) - grad_A L(w - R v)) / 2R with R = r / |v| (DARTS, Eq. 8 of its paper)."""
        weights, arch = self.model.weights(), self.model.arch_parameters()
        R = r / torch.cat([v.flatten() for v in vector]).norm()
        with torch.no_grad():
            for p, v in zip(weights, vector):
                p.add_(R * v)
        grads_p = torch.autograd.grad(self._loss(self.model, x, y, t)[0], arch)
        with torch.no_grad():
            for p, v in zip(weights, vector):
                p.sub_(2 * R * v)
        grads_n = torch.autograd.grad(self._loss(self.model, x, y, t)[0], arch)
        with torch.no_grad():
            for p, v in zip(weights, vector):
                p.add_(R * v)
        return [(gp - gn) / (2 * R) for gp, gn in zip(grads_p, grads_n)]


def space_options(args) -> dict:
    """The Network's keyword arguments that belong to one space: NAS-Bench-201's --track_running_stats."""
    if args.space == 'nb201':
        return {'track_running_stats': bool(args.track_running_stats)}
    return {}


def teacher_stages(teacher, x):
    """The attention maps at(T) of the frozen teacher's three stage outputs for a batch (docs/nos.md), (N, H*W)
    each, what L_AT reads of the teacher: computed once per batch, not once per loss; None without AGS."""
    if teacher is None:
        return None
    with torch.no_grad():  # the teacher is frozen, in eval mode
        return [utils.attention_map(t) for t in teacher.forward_stages(x)[1]]


def teacher_stages_pair(teacher, x_train, x_val, train: bool, val: bool) -> tuple:
    """(t_train, t_val): the frozen teacher's stage maps (`teacher_stages`) of the training and the validation
    batch, each None where its objective has no L_AT (`train`, `val` false) or there is no teacher. Where both
    are needed, one forward on the two batches together, split back: the teacher is in eval mode, so an
    image's maps do not depend on the rest of its batch, and one forward launches half the kernels of two
    (docs/nos.md)."""
    if teacher is None or not (train and val):
        return teacher_stages(teacher if train else None, x_train), teacher_stages(teacher if val else None, x_val)
    n = x_train.shape[0]
    both = teacher_stages(teacher, torch.cat([x_train, x_val]))
    return [t[:n] for t in both], [t[n:] for t in both]


def weight_step(model, optimizer, x, y, t, lambda_at: float, grad_clip: float, clip_by: str = 'norm'):
    """The weight update (Eq. 12 on a training batch): CE + lambda * L_AT, SGD, gradient clip: of the norm
    (DARTS) or, with clip_by='value', of every entry (the authors' ProxylessNAS-space search).
    Returns (ce, at, logits), detached."""
    weights = model.weights()
    optimizer.zero_grad(set_to_none=True)
    total, ce, at, logits = search_loss(model, x, y, t, lambda_at)
    total.backward(inputs=weights)  # the weight step leaves the architecture's gradient alone
    utils.average_gradients(weights)  # under torchrun: the global batch's gradient on every process
    if grad_clip and clip_by == 'value':
        nn.utils.clip_grad_value_(weights, grad_clip)
    elif grad_clip:
        nn.utils.clip_grad_norm_(weights, grad_clip)
    optimizer.step()
    return ce.detach(), at.detach(), logits.detach()


class DartsMethod:
    """--method darts: DARTS's softmax relaxation over A, bilevel (NOS Eq. 12-13), first or second order.

    This class is also the interface of every method; train_search.py's loop calls nothing else:
      defaults(args), check_args(args)   (classmethods) the method's flag values and refusals
      build_model(args, num_classes)     (classmethod) the supernet
      fast(args)                         (classmethod) whether build_model builds the fast path (issue 11)
      uses_val_batch                     whether step() reads a validation batch
      start_epoch(epoch)                 per-epoch schedules, before the epoch's steps
      step(x, y, xv, yv, teacher, eta, optimizer) -> dict of detached tensors (a subset of KEYS)
      end_epoch(epoch, val_loader, device) -> extra fields of the epoch's search_log.jsonl record
      importance() -> {name: rows x ops array}: what the log tables and visualize.py show
      genotype(), state_dict(), load_state_dict(state)
    load_state_dict keeps this run's flags (--arch_learning_rate, ...: they may change on resume), as
    runs.load_optimizer does; test_robustness.py checks it for every method in train_search.METHODS.
      flags (optional)                   names of the method's own flags (argparse default None); check_args
                                         refuses them with another method, which would ignore them
      log_lines() (optional)             lines the loop logs after the epoch line (EoiNAS: its prunes)
      paper_spaces, paper_ags            what a paper ran (else the log says the run is this repo's own)
    end_epoch's `alive` and `pruned` fields ({cell type: mask / [row, op]}), where a method returns them, mark
    the pruned ops in the log's importance tables.
    """
    name = 'darts'
    uses_val_batch = True
    paper_spaces = ('nos', 'darts', 'nb201')  # spaces a paper searched with this method (others: "ours", logged)
    paper_ags = True                 # NOS's AGS is this method's (--lambda_at > 0); with others it is ours

    @classmethod
    def defaults(cls, args) -> dict:
        return dict(DARTS_DEFAULTS)

    @classmethod
    def check_args(cls, args) -> None:
        pass

    @classmethod
    def fast(cls, args) -> bool:
        # --sync_bn converts BatchNorm modules; the fast path's BatchNorms are functional, so it runs the
        # reference cells (docs/fast-path.md); the ProxylessNAS chain has one path
        return not args.no_fast and not args.sync_bn and args.space != model_macro.SPACE

    @classmethod
    def build_model(cls, args, num_classes: int) -> Network:
        if args.space == model_macro.SPACE:  # the chain (this repo's DARTS baseline on AGNAS's macro space)
            return model_macro.build_supernet(cls.name, num_classes, args.dataset, args.image_size,
                                              args.width_mult)
        return Network(args.init_channels, num_classes, args.layers, nn.CrossEntropyLoss(), space=args.space,
                       ops=resolve_ops(args.space, args.ops), fast=cls.fast(args), **space_options(args))

    def __init__(self, model: Network, args):
        self.model = model
        self.lambda_at = args.lambda_at
        self.grad_clip = args.grad_clip
        self.clip_by = getattr(args, 'grad_clip_by', None) or 'norm'
        # --at_levels weights: the teacher guides the weights only (Fig. 6, "distillation only")
        arch_lambda = args.lambda_at if args.at_levels == 'both' else 0.
        self.architect = Architect(model, momentum=args.momentum, weight_decay=args.weight_decay,
                                   arch_learning_rate=args.arch_learning_rate,
                                   arch_weight_decay=args.arch_weight_decay, lambda_at=arch_lambda,
                                   unrolled=args.unrolled)

    def start_epoch(self, epoch: int) -> None:
        pass

    def step(self, x, y, xv, yv, teacher, eta, optimizer) -> dict:
        return search_step(self.model, self.architect, optimizer, x, y, xv, yv, teacher=teacher, eta=eta,
                           grad_clip=self.grad_clip, lambda_at=self.lambda_at, clip_by=self.clip_by)

    def end_epoch(self, epoch: int, val_loader, device) -> dict:
        if isinstance(self.model, model_macro.MacroSupernet):  # its table is the record's `importance`
            return {}
        return {f'alphas_{t}': w.round(6).tolist() for t, w in self.importance().items()}

    def importance(self) -> dict:
        """The softmaxed rows of A (Eq. 11), per cell type (normal, reduce; NAS-Bench-201: normal); the chain's
        one table, layers x candidates."""
        if isinstance(self.model, model_macro.MacroSupernet):
            return {'layers': self.model.arch_weights()}
        return dict(zip(self.model.cell_types, self.model.arch_weights()))

    def genotype(self):
        return self.model.genotype()

    def state_dict(self) -> dict:
        return {'arch_optimizer': self.architect.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        # --arch_learning_rate and --arch_weight_decay of this run (they may change on resume), Adam's moments
        runs.load_optimizer(self.architect.optimizer, state['arch_optimizer'], scheduled=False)



def search_step(model: Network, architect: Architect, optimizer, x_train, y_train, x_val, y_val, *,
                teacher=None, eta=0., grad_clip: float = 5., lambda_at: float | None = None,
                clip_by: str = 'norm') -> dict:
    """One `darts` iteration: the A step on the validation batch (Eq. 13), then the weight step on the
    training batch (Eq. 12). `lambda_at` weighs L_AT in the weight step (default: the architect's, i.e. AGS
    in both levels). Returns detached tensors (losses and correct counts); nothing syncs."""
    lambda_at = architect.lambda_at if lambda_at is None else lambda_at
    model.train()
    t_train, t_val = teacher_stages_pair(teacher, x_train, x_val, lambda_at > 0 or architect.lambda_at > 0,
                                         architect.lambda_at > 0)
    val_ce, val_at, val_logits = architect.step(x_train, y_train, t_train, x_val, y_val, t_val, eta, optimizer)
    ce, at, logits = weight_step(model, optimizer, x_train, y_train, t_train, lambda_at, grad_clip, clip_by)
    return {'train_ce': ce, 'train_at': at, 'val_ce': val_ce, 'val_at': val_at,
            'train_correct': (logits.argmax(1) == y_train).sum(),
            'val_correct': (val_logits.argmax(1) == y_val).sum()}


