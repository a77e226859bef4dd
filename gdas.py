"""GDAS as `train_search.py --method gdas` (Dong and Yang, "Searching for a Robust Neural Architecture in Four
GPU Hours", CVPR 2019; docs/gdas.md).

GDAS is DARTS with a sampled forward: every forward pass draws one hard Gumbel-max sample per edge (one
sample per cell type, shared by its cells), runs only the sampled op of each edge, and passes gradients to
A through the Gumbel-softmax h = softmax((A + g) / tau) of the same noise (straight-through: the forward
weight is one_hot - h.detach() + h, exactly 1 on the sampled op). The temperature falls linearly from
--tau_max to --tau_min over the search (`temperature`). Each iteration is a weight step on a training batch,
then a first-order step of A on a validation batch (Adam), each on a fresh sample; there is no warm-up, no
skip dropout, no pruning and no indicator (what EoiNAS adds). The cell is derived by DARTS's rule from
softmax(A) (model_search.derive_darts_cell; on the NOS space derive_cell).

Reused, not copied: the sample is model_search.sample_weights(hard=True) (EoiNAS's sampling code), the
architecture step darts.Architect, the weight step darts.weight_step; the importance (softmax of A), the
log record, the derivation and the checkpoint state are darts.DartsMethod's.

Which cells run: a hard sample computes one op per edge, which only the per-edge reference cells
(model_search.MixedOp, `active`) can skip to; the fast path stacks every alive op of a source group into
one kernel, so it would compute all 8 ops to use one. GDAS therefore always runs the reference cells.

On the NOS space (this repo's own combination, no paper has it) a node's first tier needs a feature op
(NOS Eq. 5 calibrates the feature sum F); a hard sample whose node drew only attention or dynamic ops is
repaired by model_search.feature_constrained (the feasible one-op-per-edge choice with the largest summed
A + g, the same constraint derive_cell imposes).
"""
from __future__ import annotations

import math

import darts
import utils

# The published settings (docs/gdas.md gives each source): the authors' released NASNet-space search
# (AutoDL-Projects: configs/search-opts/GDAS-NASNet-CIFAR.config, scripts-search/GDAS-search-NASNet-space.sh).
DEFAULTS = {
    'space': 'darts',             # GDAS searched DARTS's (NASNet-like) cell; --space nos is this repo's own
    'epochs': 250,                # the authors' config: 250 epochs, no warm-up
    'batch_size': 256,            # the authors' config
    'learning_rate_min': 0.001,   # SGD 0.025, cosine to 0.001
    'weight_decay': 5e-4,         # the authors' config (DARTS: 3e-4)
    'nesterov': True,             # the authors' config: SGD with Nesterov momentum 0.9
    'arch_learning_rate': 3e-4,   # Adam 3e-4, betas (0.5, 0.999), weight decay 1e-3 (train_search's default)
    'lambda_at': 0.0,             # GDAS has no teacher; > 0 adds NOS's AGS (this repo's own combination)
    'tau_max': 10.0,              # tau falls linearly from 10 ...
    'tau_min': 0.1,               # ... to 0.1 at the last epoch
}
FLAGS = ('tau_max', 'tau_min')


def add_args(p) -> None:
    """GDAS's own flags (argparse default None: the method fills DEFAULTS in; another method refuses them)."""
    g = p.add_argument_group('GDAS (--method gdas; defaults in brackets)')
    g.add_argument('--tau_max', type=float, default=None, help='Gumbel-softmax temperature of the first epoch [10]')
    g.add_argument('--tau_min', type=float, default=None, help='temperature of the last epoch (linear in between) [0.1]')


def temperature(epoch: int, epochs: int, tau_max: float = 10., tau_min: float = 0.1) -> float:
    """tau of epoch e (0-indexed, constant within an epoch): tau_max - (tau_max - tau_min) e / (E - 1), so the
    first epoch has tau_max and the last tau_min (the authors' GDAS.py; one epoch: tau_max)."""
    if epochs <= 1:
        return tau_max
    return tau_max - (tau_max - tau_min) * epoch / (epochs - 1)


class GDASMethod(darts.DartsMethod):
    """--method gdas: hard Gumbel-max sampling with the straight-through gradient, tau linear, first order."""
    name = 'gdas'
    flags = FLAGS
    paper_spaces = ('darts', 'nb201')  # NAS-Bench-201's paper ran GDAS too
    paper_ags = False

    @classmethod
    def defaults(cls, args) -> dict:
        return dict(DEFAULTS)

    @classmethod
    def check_args(cls, args) -> None:
        if args.unrolled:
            raise utils.UserError('--unrolled does not apply to --method gdas, whose architecture step is '
                                  'first-order; drop --unrolled')
        for flag in FLAGS:
            value = getattr(args, flag)
            if not (value > 0 and math.isfinite(value)):
                raise utils.UserError(f'--{flag} must be a finite number > 0, got {value}')
        if args.tau_min > args.tau_max:
            raise utils.UserError(f'--tau_min {args.tau_min:g} is above --tau_max {args.tau_max:g}; the '
                                  f'temperature falls from the second to the first')

    @classmethod
    def fast(cls, args) -> bool:
        return False  # one op per edge: only the reference cells skip the ops a sample did not draw

    def __init__(self, model, args):
        super().__init__(model, args)  # darts.Architect (first order: check_args refuses --unrolled)
        self.epochs = args.epochs
        self.tau_max, self.tau_min = args.tau_max, args.tau_min
        model.gumbel_hard = True
        self.start_epoch(0)

    def start_epoch(self, epoch: int) -> None:
        self.model.tau = temperature(epoch, self.epochs, self.tau_max, self.tau_min)

    def step(self, x, y, xv, yv, teacher, eta, optimizer) -> dict:
        """The weight step on the training batch, then A's step on the validation batch (the authors'
        search_func), each forward on a fresh hard sample. Returns detached tensors."""
        model = self.model
        model.train()
        t_train, t_val = darts.teacher_stages_pair(teacher, x, xv, self.lambda_at > 0, self.architect.lambda_at > 0)
        ce, at, logits = darts.weight_step(model, optimizer, x, y, t_train, self.lambda_at, self.grad_clip)
        val_ce, val_at, val_logits = self.architect.step(x, y, t_train, xv, yv, t_val, eta, optimizer)
        return {'train_ce': ce, 'train_at': at, 'val_ce': val_ce, 'val_at': val_at,
                'train_correct': (logits.argmax(1) == y).sum(), 'val_correct': (val_logits.argmax(1) == yv).sum()}

    def end_epoch(self, epoch: int, val_loader, device) -> dict:
        return {'tau': self.model.tau, **super().end_epoch(epoch, val_loader, device)}
