"""AGNAS: attention-guided op importance, with a cell per stage (Sun et al., ICML 2022; ../shared/spec/agnas.md).

There are no architecture parameters. Behind every edge of the supernet sits its own SE-style attention
module (`GateAttention`): it pools each op's output, passes the concatenated pooled vector through two
bias-free FCs and a sigmoid, and gates every channel of every op (Eq. 4-5). The edge outputs the sum of the
gated op outputs (Eq. 7-8, `AttentionMixedOp`); the summed gates of an op are its importance (Eq. 6). All
weights, ops and attention FCs, train in one level on the training half (Alg. 1); after every epoch
`importance_pass` forwards the whole validation half (eval mode, no_grad) and collects each edge's mean gates,
from which each supernet cell is derived by DARTS's rule, and one normal cell per stage plus the two
reduction cells form the `genotypes.StagedGenotype` (agnas.md §2).

Layout (methods.md): the supernet is model_search.Network; this file holds only what is AGNAS's own, and
model_search.py never imports it. `build_network` hands `AttentionMixedOp` to the Network as its mixed-op
factory. `AGNASMethod` is the `--method agnas` of train_search.py.

Over the NOS space (agnas.md §8, this repo's own, experimental) the gates replace NOS's softmax weights:
features, attention maps and dynamic kernels are each gated before NOS's calibration, and each op's pooled
descriptor is taken from its effect on the edge's skip output.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import genotypes
import utils
from model_search import MixedOp, Network, resolve_ops, stage_layout
from operations import dynamic_conv

# The AGNAS search settings (agnas.md §3) for the flags whose argparse default is None (methods.md).
# Everything else the search uses is train_search.py's default and matches §3: 8 cells, 16 channels,
# batch 64, 25K/25K split, SGD lr 0.025, momentum 0.9, wd 3e-4, gradient-norm clip 5.
DEFAULTS = {
    'epochs': 50,                 # §5.2
    'learning_rate_min': 0.001,   # the authors' code (the paper does not say): cosine to 0.001
    'lambda_at': 0.0,             # AGNAS has no teacher; > 0 adds NOS's AGS (this repo's own combination)
}
MIN_LAYERS = 5  # a normal cell in each of the three stages (model_search.stage_layout)


class GateAttention(nn.Module):
    """The attention module of one edge (Eq. 4-5; agnas.md §1.3): gates = sigmoid(W2 ReLU(W1 GAP(F_con))).

    W1 = Linear(mC, mC/r), W2 = Linear(mC/r, mC), both without bias; r = m by default (the authors'
    `ratio=8` for 8 ops), so the hidden width is C. The sigmoid is the last layer: every gate is its own
    value in (0, 1), with no normalisation across ops.

    forward takes the pooled descriptors (N, m, C), one C-vector per op: GAP(cat(F_k)) = cat(GAP(F_k)), so
    the edge never builds the (N, mC, H, W) concatenation. Returns the gates (N, m, C); op k's gates are
    channels [kC, (k+1)C) of Eq. 5's output (half-open slices, agnas.md §6.2).
    """

    def __init__(self, m: int, C: int, r: int | None = None):
        super().__init__()
        r = m if r is None else r
        if (m * C) % r:
            raise ValueError(f'the reduction ratio r={r} must divide m*C = {m * C}')
        self.m, self.C = m, C
        self.fc1 = nn.Linear(m * C, m * C // r, bias=False)   # W1 (Eq. 5)
        self.fc2 = nn.Linear(m * C // r, m * C, bias=False)   # W2 (Eq. 5)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        n = pooled.shape[0]
        logits = self.fc2(F.relu(self.fc1(pooled.reshape(n, self.m * self.C))))
        return torch.sigmoid(logits).view(n, self.m, self.C)   # Eq. 5


def gap(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling (Eq. 4): (N, C, H, W) -> (N, C)."""
    return x.mean(dim=(2, 3))


class AttentionMixedOp(MixedOp):
    """An edge whose op outputs are gated by its own GateAttention (agnas.md §1, §7).

    Builds its ops as MixedOp does (DARTS's ops with affine=False, a pool followed by BatchNorm(affine=False))
    and returns MixedOp's triple (features, attention, kernels), so DARTS's and NOS's cells use it unchanged:
    - DARTS space: features = sum_k gate_k * o_k(x) (Eq. 7-8); no attention, no kernels.
    - NOS space (§8, experimental): features = sum w_o * o(x) over feature ops, attention = sum w_o * a_o(x),
      kernels = [w_o * D_o] (exact: dwconv is linear in the kernel). Op descriptors: GAP(o(x)) for a
      feature op, GAP(x' * a(x)) for an attention op, GAP(dwconv(x', D)) for a dynamic op, x' being the
      edge's skip_connect output. w = g / sum_o g_o per channel (this repo's decision; §8 says w = g): raw
      gates make an edge a sum of about 5.5 ops that the surrogate node's kernels and maps multiply and the
      identity ops compound node to node (initial cross-entropy 866 in the 5-cell, 16-channel supernet),
      while normalised ones make it a convex combination, as NOS's softmax does. The importance stays
      the raw gates.
    `weights` is accepted and ignored (the cells pass None): the gates replace the softmax weights.

    While `collecting` (see `importance_pass`), every forward adds gates.sum over batch and channels to a
    float64 accumulator on the gates' device (no host sync) and the batch size to an image count.
    """

    def __init__(self, C: int, stride: int, ops: list[str]):
        super().__init__(C, stride, ops)
        self.C = C
        self.attention = GateAttention(len(ops), C)
        self.plain = not (self.attention_idx or self.dynamic_idx)  # DARTS's space: feature ops only
        if not self.plain and 'skip_connect' not in ops:
            raise ValueError('AGNAS over attention or dynamic ops needs skip_connect among the ops: their '
                             'descriptors pool their effect on the skip output (agnas.md §8)')
        self.skip_idx = ops.index('skip_connect') if 'skip_connect' in ops else None
        self.collecting = False
        self.reset_importance()

    def reset_importance(self) -> None:
        self._gate_sum = None   # (m,) float64 on the device of the gates
        self._images = 0

    def mean_gates(self) -> np.ndarray:
        """Each op's mean gate over the collected images and its C channels (agnas.md §2), float64 (m,)."""
        if not self._images:
            raise RuntimeError('no importance collected yet: run agnas.importance_pass first')
        return (self._gate_sum / (self._images * self.C)).cpu().numpy()

    def forward(self, x: torch.Tensor, weights=None):
        outs = [op(x) for op in self._ops]
        if self.plain:
            pooled = torch.stack([gap(o) for o in outs], dim=1)
        else:
            skip = outs[self.skip_idx]
            desc = []
            for i, o in enumerate(outs):
                if i in self.attention_idx:
                    desc.append(gap(skip * o))
                elif i in self.dynamic_idx:
                    desc.append(gap(dynamic_conv(skip, o)))
                else:
                    desc.append(gap(o))
            pooled = torch.stack(desc, dim=1)
        gates = self.attention(pooled)                                 # (N, m, C), Eq. 4-5
        if self.collecting:                                            # Eq. 6, summed over the images
            s = gates.detach().sum(dim=(0, 2), dtype=torch.float64)
            self._gate_sum = s if self._gate_sum is None else self._gate_sum + s
            self._images += x.shape[0]
        if not self.plain:  # NOS variant: convex weights per channel (see the class docstring)
            gates = gates / gates.sum(dim=1, keepdim=True)
        g = gates[:, :, :, None, None]                                 # broadcast over H, W (or k, k)
        features = sum(g[:, i] * outs[i] for i in self.feature_idx)   # Eq. 7-8
        attention = sum(g[:, i] * outs[i] for i in self.attention_idx) if self.attention_idx else None
        kernels = [g[:, i] * outs[i] for i in self.dynamic_idx]
        return features, attention, kernels


def build_network(C: int, num_classes: int, layers: int, criterion=None, space: str = 'darts', ops=None,
                  **kwargs) -> Network:
    """AGNAS's supernet: model_search.Network with gated edges and no architecture parameters."""
    return Network(C, num_classes, layers, criterion, space=space, ops=ops, method='agnas',
                   mixed_op=AttentionMixedOp, **kwargs)


def gated_edges(model: Network) -> list[AttentionMixedOp]:
    return [m for m in model.modules() if isinstance(m, AttentionMixedOp)]


def importance_pass(model: Network, loader, device) -> dict:
    """Forward every image of `loader` in order, in eval mode under no_grad, collecting each edge's gates
    (agnas.md §2, §6.5: a full validation pass after every epoch; the last one decides).

    Returns {'importance': (layers, edges, ops) mean gates, 'images': n, 'val_ce': .., 'val_acc': ..}; the
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
            e._images = int(totals[0])
    n = int(totals[0])
    if not n:
        raise utils.UserError('the validation half is empty, so AGNAS has no images to rank the ops with; '
                              'lower --train_portion')
    return {'importance': model.importance(), 'images': n, 'val_ce': totals[1] / n,
            'val_acc': 100. * totals[2] / n}


class AGNASMethod:
    """--method agnas (train_search.py's method interface, see DartsMethod there).

    Single level (Alg. 1): each step is CE (+ lambda_at * L_AT with --lambda_at > 0) on the training batch,
    backward, gradient-norm clip and an SGD step on all weights; no validation batch is drawn. After every
    epoch, `importance_pass` over the validation half; the genotype is derived from the last pass.
    """
    name = 'agnas'
    uses_val_batch = False

    @classmethod
    def defaults(cls, args) -> dict:
        return dict(DEFAULTS)

    @classmethod
    def check_args(cls, args) -> None:
        if args.unrolled:
            raise utils.UserError('--unrolled does not apply to --method agnas, which has no architecture '
                                  'parameters to unroll: drop --unrolled')
        if args.layers < MIN_LAYERS:
            raise utils.UserError(f'--layers {args.layers} is too few for --method agnas: each of the three '
                                  f'stages needs a normal cell, so use at least {MIN_LAYERS} cells')

    @classmethod
    def fast(cls, args) -> bool:
        return False  # the fast path has no gated edges yet: AGNAS runs on the reference cells

    @classmethod
    def build_model(cls, args, num_classes: int) -> Network:
        return build_network(args.init_channels, num_classes, args.layers, nn.CrossEntropyLoss(),
                             space=args.space, ops=resolve_ops(args.space, args.ops))

    def __init__(self, model: Network, args):
        # train_search.py imports this file to register the method, so its step is imported here, not at
        # the top: one weight step for every method (train_search.weight_step)
        from train_search import teacher_stages, weight_step
        self._weight_step, self._teacher_stages = weight_step, teacher_stages
        self.model = model
        self.lambda_at = args.lambda_at
        self.grad_clip = args.grad_clip
        self.stage_cell = args.stage_cell
        self.batch_size = getattr(args, 'batch_size', 64)
        self.matrix = None  # the last importance pass, (layers, edges, ops)
        self.stages, self.reductions = stage_layout(len(model.cells))

    def start_epoch(self, epoch: int) -> None:
        pass

    def step(self, x, y, xv, yv, teacher, eta, optimizer) -> dict:
        self.model.train()
        t = self._teacher_stages(teacher if self.lambda_at > 0 else None, x)
        ce, at, logits = self._weight_step(self.model, optimizer, x, y, t, self.lambda_at, self.grad_clip)
        return {'train_ce': ce, 'train_at': at, 'train_correct': (logits.argmax(1) == y).sum()}

    def end_epoch(self, epoch: int, val_loader, device) -> dict:
        # the validation half in its stored order (the loop's loader shuffles), every image; under torchrun
        # each process takes every world-th image and importance_pass adds the sums up
        data, world = val_loader.dataset, utils.world_size()
        rank = torch.distributed.get_rank() if world > 1 else 0
        ordered = utils.make_loader(data, max(1, self.batch_size // world), False, val_loader.num_workers,
                                    sampler=list(range(rank, len(data), world)), pin=val_loader.pin_memory)
        out = importance_pass(self.model, ordered, device)
        self.matrix = out['importance']
        return {'val_ce': out['val_ce'], 'val_acc': out['val_acc'], 'importance_images': out['images'],
                'stage_cell': self.stage_cell, 'stages': self.stages, 'reduction_cells': self.reductions,
                'cell_genotypes': self.model.cell_genotypes(self.matrix)}

    def importance(self) -> dict:
        """Each supernet cell's mean gates, edges x ops: {'cell 0': .., 'cell 1': .., ...}."""
        if self.matrix is None:
            return {}
        return {f'cell {i}': m for i, m in enumerate(self.matrix)}

    def genotype(self) -> genotypes.StagedGenotype:
        return self.model.genotype(self.stage_cell, self.matrix)

    def state_dict(self) -> dict:
        # no architecture optimizer; the last importance pass, so that a run resumed after its last epoch
        # still derives its genotype
        return {'importance': None if self.matrix is None else torch.from_numpy(self.matrix)}

    def load_state_dict(self, state: dict) -> None:
        m = state['importance']
        self.matrix = None if m is None else m.numpy()
