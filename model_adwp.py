"""ADWPNAS (Zhang, Chen, Gu, arXiv 2003.01335): the intensive space and the HyperNetwork (docs/adwpnas.md).

Stage 0 (Sec. 3.1.2, Eq. 2-5; docs/adwpnas.md) keeps, per intermediate node, the K most likely (input, op)
candidates of a DARTS search, and picks the epoch whose candidates have the highest superiority:
`derive_intensive_cell`, `stability`, `superiority`, `select_intensive_space`.

The HyperNetwork (Sec. 3.2, Fig. 2-3; docs/adwpnas.md) is the DARTS proxy skeleton (L cells, reductions at
L//3 and 2L//3) whose cell l mixes its nodes' K candidates with p_l = per-node softmax(alpha_l) (Eq. 4).
Every sep/dil conv candidate (a ConvBlock) has its kernels predicted by its own GeneratingBlock from the
cell's architecture parameters, w_alpha = G(w_G, alpha) (Eq. 8); pools, skip connections (a stride-2 one is
a FactorizedReduce), the stem, preprocessing and classifier are ordinary weights. Every BatchNorm uses batch
statistics (track_running_stats=False, D7): each alpha gives other kernels, so running statistics would
mean nothing.

`derive_macro` keeps the top-T candidates of every node of every cell (Sec. 3.2.2) and returns a
`genotypes.MacroGenotype`; `macro_space_size` is the size of the searched macro space.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import genotypes
from genotypes import CONCAT, DARTS_PRIMITIVES, STEPS, MacroGenotype
from model_search import as_array
from operations import OPS, FactorizedReduce, ReLUConvBN, without_running_stats

CELL_TYPES = ('normal', 'reduce')
CANDIDATE_OPS = [o for o in DARTS_PRIMITIVES if o != 'none']  # Sec. 3.1.2: "K non-zero operations"
CONV_OPS = ('sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5')  # the ConvBlocks
GEN_INPUTS = ('cell', 'op')  # D3: the GeneratingBlock reads all of p_l, or its own op's probability


# ---------------------------------------------------------------------------------------------------------
# Stage 0: the intensive space (Sec. 3.1.2; docs/adwpnas.md)


def derive_intensive_cell(weights, K: int = 6, ops=DARTS_PRIMITIVES, steps: int = STEPS) -> list:
    """O*_t of one cell type: for every intermediate node j, the K best (op, input) candidates.

    weights: the per-edge softmax of a DARTS search, (14, 8) rows in DARTS's edge order (docs/adwpnas.md). The
    candidates of node j are all (i, o) with i < j + 2 and o != none, scored by w_(i,j)[o]; ties go to the
    lower input, then the lower op index. Each node gets exactly K candidates (Eq. 5), listed in canonical
    order (input, then op index) so that the HyperNetwork's alpha columns do not depend on the scores.
    """
    w = as_array(weights)
    ops = list(ops)
    n_edges = sum(2 + j for j in range(steps))
    if w.shape != (n_edges, len(ops)):
        raise ValueError(f'expected per-edge weights of shape ({n_edges}, {len(ops)}), got {w.shape}')
    usable = [o for o, name in enumerate(ops) if name != 'none']
    cell, row = [], 0
    for j in range(steps):
        scored = sorted((-w[row + i, o], i, o) for i in range(j + 2) for o in usable)
        if len(scored) < K:
            raise ValueError(f'node {j + 2} has only {len(scored)} candidates, fewer than K = {K}')
        best = sorted((i, o) for _, i, o in scored[:K])
        cell.append([(ops[o], i) for i, o in best])
        row += j + 2
    return cell


def derive_intensive_space(weights_normal, weights_reduce, K: int = 6) -> dict:
    """O*_t = {O*_normal, O*_reduce} from one epoch's softmaxed alphas."""
    return {'normal': derive_intensive_cell(weights_normal, K), 'reduce': derive_intensive_cell(weights_reduce, K)}


def stability(a: dict, b: dict) -> float:
    """Eq. 2: s(A, B) = 1 - C(A, B) / (M K), both cell types pooled (D12): C counts, node by node, the
    candidates of B that are not in A, and M K is the number of candidates of B (2 x 4 x 6 = 48)."""
    changed = total = 0
    for kind in CELL_TYPES:
        for node_a, node_b in zip(a[kind], b[kind], strict=True):
            old = {tuple(c) for c in node_a}
            changed += sum(tuple(c) not in old for c in node_b)
            total += len(node_b)
    return 1. - changed / total


def superiority(spaces: list, accuracies: list, t: int, n: int = 2) -> float:
    """Eq. 3: S(O*_t) = prod_{i=0..n} s(O*_{t-i}, O*_t) eps(alpha_{t-i}), with eps the validation top-1
    in [0, 1]. Defined for t >= n only (it looks n epochs back)."""
    if t < n:
        raise ValueError(f'the superiority of epoch index {t} is undefined: it needs n = {n} earlier epochs')
    return math.prod(stability(spaces[t - i], spaces[t]) * accuracies[t - i] for i in range(n + 1))


def select_intensive_space(weights: list, accuracies: list, K: int = 6, n: int = 2,
                           epochs: list | None = None) -> dict:
    """Stage 0's choice: O*_{t*} with t* = argmax_t S(O*_t), ties to the later epoch (docs/adwpnas.md).

    weights: one (w_normal, w_reduce) pair of softmaxed alphas per epoch; accuracies: eps per epoch, in
    [0, 1]; epochs: their numbers for the table (default 1, 2, ...). Returns {'K', 'n', 'epoch', 'space',
    'table'}: the chosen epoch's number and candidates, and per epoch its accuracy, its stability against
    the epoch before and its superiority (None where undefined).
    """
    if len(weights) != len(accuracies):
        raise ValueError(f'{len(weights)} epochs of alphas but {len(accuracies)} accuracies')
    if len(weights) <= n:
        raise ValueError(f'the superiority window n = {n} needs at least {n + 1} epochs, got {len(weights)}')
    epochs = list(epochs) if epochs is not None else list(range(1, len(weights) + 1))
    spaces = [derive_intensive_space(wn, wr, K) for wn, wr in weights]
    table, best = [], None
    for t, (space, acc) in enumerate(zip(spaces, accuracies)):
        s = superiority(spaces, accuracies, t, n) if t >= n else None
        table.append({'epoch': epochs[t], 'accuracy': acc,
                      'stability_to_previous': stability(spaces[t - 1], space) if t else None, 'superiority': s})
        if s is not None and (best is None or s >= table[best]['superiority']):
            best = t
    return {'K': K, 'n': n, 'epoch': epochs[best], 'space': spaces[best], 'table': table}


class SpaceError(ValueError):
    """An intensive space that cannot be used; the message names the cell type, the node and the fault."""


def check_space(space, K: int | None = None, source: str = 'intensive space') -> dict:
    """Validate an intensive space {'normal': cell, 'reduce': cell} (cell: 4 nodes of K (op, input)
    candidates, as JSON lists or tuples); returns it with tuples. Raises SpaceError naming the fault."""
    if not isinstance(space, dict) or set(space) != set(CELL_TYPES):
        raise SpaceError(f'{source} must have exactly the cell types {", ".join(CELL_TYPES)}')
    out = {}
    for kind in CELL_TYPES:
        cell = space[kind]
        if not isinstance(cell, (list, tuple)) or len(cell) != STEPS:
            raise SpaceError(f'{source}: the {kind} cell needs {STEPS} nodes of candidates')
        nodes = []
        for j, node in enumerate(cell):
            where = f'{source}: {kind} node {j + 2}'
            if not isinstance(node, (list, tuple)):
                raise SpaceError(f'{where}: expected a list of (op, input) candidates, got {node!r}')
            cands = []
            for c in node:
                if (not isinstance(c, (list, tuple)) or len(c) != 2 or c[0] not in CANDIDATE_OPS
                        or isinstance(c[1], bool) or not isinstance(c[1], int) or not 0 <= c[1] < j + 2):
                    raise SpaceError(f'{where}: {c!r} is not an (op, input) candidate with op in '
                                     f'{", ".join(CANDIDATE_OPS)} and input in 0..{j + 1}')
                cands.append((c[0], c[1]))
            if len(set(cands)) != len(cands):
                raise SpaceError(f'{where}: a candidate appears twice')
            K = len(cands) if K is None else K
            if len(cands) != K:
                raise SpaceError(f'{where}: every node needs the same number K = {K} of candidates (Eq. 5), '
                                 f'got {len(cands)}')
            nodes.append(cands)
        out[kind] = nodes
    return out


# ---------------------------------------------------------------------------------------------------------
# The HyperNetwork's building blocks (Sec. 3.2.1, Fig. 2-3; docs/adwpnas.md)


def batch_norm(C: int, affine: bool = False) -> nn.BatchNorm2d:
    """BatchNorm on batch statistics always, in training and evaluation (D7)."""
    return nn.BatchNorm2d(C, affine=affine, track_running_stats=False)


class GeneratingBlock(nn.Module):
    """softmax -> FC(d_in -> 64) -> ReLU -> FC(64 -> N): all N numbers of one ConvBlock's kernels (Sec. 4.2).

    The softmax is the cell's per-node softmax p_l (Eq. 4), computed once by the HyperNetwork and read by
    all of the cell's GeneratingBlocks; `forward(p)` takes it. d_in is 4 K (all of p_l, `cell`) or 1 (the
    block's own op probability, `op`; D3). The output is split and reshaped into `shapes`, the kernels of
    operations.SepConv / DilConv in their layer order. PyTorch's default initialisation, no weight
    normalisation: every depthwise-pointwise pair ends in a BatchNorm, so the kernels' scale is irrelevant.
    """

    def __init__(self, d_in: int, shapes: list, hidden: int = 64):
        super().__init__()
        self.shapes = [tuple(s) for s in shapes]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, sum(self.sizes))

    def forward(self, p: torch.Tensor) -> list[torch.Tensor]:
        flat = self.fc2(F.relu(self.fc1(p)))
        return [k.view(s) for k, s in zip(flat.split(self.sizes), self.shapes)]


class HyperDilConv(nn.Module):
    """DilConv with predicted kernels: ReLU, depthwise (dilated, strided) conv, pointwise conv, BN.
    Kernels: dw (C,1,k,k), pw (C,C,1,1). No weights of its own."""

    def __init__(self, C: int, kernel_size: int, stride: int, padding: int, dilation: int):
        super().__init__()
        self.C, self.stride, self.padding, self.dilation = C, stride, padding, dilation
        self.kernel_shapes = [(C, 1, kernel_size, kernel_size), (C, C, 1, 1)]
        self.bn = batch_norm(C)

    def forward(self, x: torch.Tensor, kernels: list[torch.Tensor]) -> torch.Tensor:
        dw, pw = kernels
        x = F.conv2d(F.relu(x), dw, stride=self.stride, padding=self.padding, dilation=self.dilation,
                     groups=self.C)
        return self.bn(F.conv2d(x, pw))


class HyperSepConv(nn.Module):
    """SepConv with predicted kernels: two HyperDilConv halves (dilation 1), the first carrying the stride.
    Kernels: dw1, pw1, dw2, pw2."""

    def __init__(self, C: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.first = HyperDilConv(C, kernel_size, stride, padding, 1)
        self.second = HyperDilConv(C, kernel_size, 1, padding, 1)
        self.kernel_shapes = self.first.kernel_shapes + self.second.kernel_shapes

    def forward(self, x: torch.Tensor, kernels: list[torch.Tensor]) -> torch.Tensor:
        return self.second(self.first(x, kernels[:2]), kernels[2:])


HYPER_OPS = {
    'sep_conv_3x3': lambda C, stride: HyperSepConv(C, 3, stride, 1),
    'sep_conv_5x5': lambda C, stride: HyperSepConv(C, 5, stride, 2),
    'dil_conv_3x3': lambda C, stride: HyperDilConv(C, 3, stride, 2, 2),
    'dil_conv_5x5': lambda C, stride: HyperDilConv(C, 5, stride, 4, 2),
}


def fixed_op(name: str, C: int, stride: int) -> nn.Module:
    """A candidate whose weights are not predicted (D5): a pool followed by BN(affine=False) as in DARTS's
    MixedOp, or skip_connect (the identity, or a FactorizedReduce at stride 2, an ordinary weight)."""
    op = without_running_stats(OPS[name](C, stride, False))
    if 'pool' in name:
        op = nn.Sequential(op, batch_norm(C))
    return op


class HyperCell(nn.Module):
    """Cell l of the HyperNetwork (Eq. 4): node j = sum_c p_(l,j,c) o_c(N_(i_c)) over its K candidates.

    space_cell: 4 nodes of K (op, input) candidates (O*_normal or O*_reduce). In a reduction cell the
    candidates reading N0 or N1 have stride 2. `generators[str(c)]` predicts the kernels of conv candidate
    c (candidates numbered node by node, c = j K + k), one GeneratingBlock per ConvBlock.
    """

    def __init__(self, space_cell, C_prev_prev: int, C_prev: int, C: int, reduction: bool,
                 reduction_prev: bool, gen_input: str = 'cell', gen_hidden: int = 64):
        super().__init__()
        if gen_input not in GEN_INPUTS:
            raise ValueError(f'unknown generator input {gen_input!r}; choose one of {", ".join(GEN_INPUTS)}')
        self.reduction = reduction
        self.gen_input = gen_input
        pre0 = FactorizedReduce(C_prev_prev, C, False) if reduction_prev else ReLUConvBN(C_prev_prev, C, 1, 1, 0,
                                                                                         False)
        self.preprocess0 = without_running_stats(pre0)
        self.preprocess1 = without_running_stats(ReLUConvBN(C_prev, C, 1, 1, 0, False))
        self.K = len(space_cell[0])
        self.candidates = [(j, op, i) for j, node in enumerate(space_cell) for op, i in node]
        self._ops = nn.ModuleList()
        self.generators = nn.ModuleDict()
        d_in = STEPS * self.K if gen_input == 'cell' else 1
        for c, (_, op, i) in enumerate(self.candidates):
            stride = 2 if reduction and i < 2 else 1
            if op in HYPER_OPS:
                conv = HYPER_OPS[op](C, stride)
                self._ops.append(conv)
                self.generators[str(c)] = GeneratingBlock(d_in, conv.kernel_shapes, gen_hidden)
            else:
                self._ops.append(fixed_op(op, C, stride))
        self.multiplier = len(CONCAT)

    def generate(self, p: torch.Tensor, alive=None) -> list:
        """Eq. 8 for this cell: the kernels of every conv candidate (None for the others) from p_l (4, K)."""
        flat = p.flatten()
        kernels = [None] * len(self.candidates)
        for key, gb in self.generators.items():
            c = int(key)
            if alive is None or alive[c]:
                kernels[c] = gb(flat if self.gen_input == 'cell' else flat[c:c + 1])
        return kernels

    def forward(self, s0, s1, p: torch.Tensor, kernels: list, alive=None) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        flat = p.flatten()
        for j in range(STEPS):
            node = 0
            for c in range(j * self.K, (j + 1) * self.K):
                if alive is not None and not alive[c]:
                    continue  # p = 0 exactly (a discrete architecture, D14): the op adds nothing
                i = self.candidates[c][2]
                op = self._ops[c]
                h = op(states[i], kernels[c]) if kernels[c] is not None else op(states[i])
                node = node + flat[c] * h                                   # Eq. 4
            states.append(node)
        return torch.cat([states[i] for i in CONCAT], dim=1)


class HyperNetwork(nn.Module):
    """The macro-search network (Fig. 3): DARTS's proxy skeleton with one HyperCell per layer.

    C: initial channels; layers: cells (reductions at layers//3 and 2*layers//3, needs >= 3); space: the
    intensive space {'normal', 'reduce'} (normal cells take O*_normal, reduction cells O*_reduce).
    `alphas` (L, 4, K) holds every cell's own architecture parameters (Sec. 3.2.1), initialised
    1e-3 N(0, 1) as in DARTS.

    forward(x, alphas) = run(x, p, generate(p)) with p = softmax(alphas) per node: the gradient reaches
    alpha both through the mixing weights p and through the generated kernels.
    """

    def __init__(self, C: int, num_classes: int, layers: int, space: dict, gen_input: str = 'cell',
                 gen_hidden: int = 64, stem_multiplier: int = 3):
        super().__init__()
        if layers < 3:
            raise ValueError(f'the HyperNetwork needs at least 3 cells (two of them reduction cells), got {layers}')
        self.space = check_space(space)
        self.K = len(self.space['normal'][0])
        self._layers = layers
        self.reduction_layers = list(genotypes.reduction_layers(layers))
        C_curr = stem_multiplier * C
        self.stem = without_running_stats(nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
                                                        nn.BatchNorm2d(C_curr)))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in self.reduction_layers
            if reduction:
                C_curr *= 2
            cell = HyperCell(self.space['reduce' if reduction else 'normal'], C_prev_prev, C_prev, C_curr,
                             reduction, reduction_prev, gen_input, gen_hidden)
            self.cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        self.alphas = nn.Parameter(1e-3 * torch.randn(layers, STEPS, self.K))

    # -- parameters ---------------------------------------------------------------------------------------
    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alphas]

    def generator_parameters(self) -> list[nn.Parameter]:
        """w_G: the GeneratingBlocks' parameters."""
        return [p for cell in self.cells for p in cell.generators.parameters()]

    def weights(self) -> list[nn.Parameter]:
        """Everything that gate g_G opens (D6): w_G and the ordinary weights (stem, preprocessing,
        FactorizedReduce, classifier); i.e. every parameter except alphas."""
        return [p for n, p in self.named_parameters() if n != 'alphas']

    def sample_alphas(self, std: float = 1., generator: torch.Generator | None = None) -> torch.Tensor:
        """Stage 1's random encoding (D2): i.i.d. N(0, std^2) of the shape of `alphas`, drawn on the CPU from
        `generator` (so a seed gives the same draws on every device), a fresh draw at every call."""
        return (std * torch.randn(self.alphas.shape, generator=generator)).to(self.alphas.device)

    # -- forward ------------------------------------------------------------------------------------------
    @staticmethod
    def probabilities(alphas: torch.Tensor) -> torch.Tensor:
        """p: the softmax over each node's K candidates (Eq. 4), (L, 4, K)."""
        return F.softmax(alphas, dim=-1)

    def generate(self, p: torch.Tensor, alive=None) -> list:
        """w_alpha = G(w_G, alpha) (Eq. 8): per cell, the list of its candidates' kernels."""
        return [cell.generate(p[li], None if alive is None else alive[li]) for li, cell in enumerate(self.cells)]

    def run(self, x: torch.Tensor, p: torch.Tensor, kernels: list, alive=None) -> torch.Tensor:
        """The relaxed network (Eq. 4) with mixing weights p and the given kernels; returns logits."""
        s0 = s1 = self.stem(x)
        for li, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, p[li], kernels[li], None if alive is None else alive[li])
        return self.classifier(self.global_pooling(s1).flatten(1))

    def forward(self, x: torch.Tensor, alphas: torch.Tensor | None = None, alive=None) -> torch.Tensor:
        """Logits for `alphas` (default: the parameter). `alive` ((L, 4K) lists of bools) skips the candidates
        of p = 0, the -inf logits of a discrete architecture (D14; search_adwp.evaluate passes it); without it
        every candidate is computed, which gives the same logits (p = 0 weighs them out) and reads nothing back
        from the device, as every search step must not."""
        alphas = self.alphas if alphas is None else alphas
        p = self.probabilities(alphas)
        return self.run(x, p, self.generate(p, alive), alive)

    # -- derivation ---------------------------------------------------------------------------------------
    def genotype(self, T: int = 2, alphas: torch.Tensor | None = None) -> MacroGenotype:
        return derive_macro(self.alphas if alphas is None else alphas, self.space, T)

    def discrete_alphas(self, genotype: MacroGenotype) -> torch.Tensor:
        """D14: logits 0 for the candidates a per-layer genotype chose and -inf for the rest, so that
        forward(x, discrete_alphas(g)) evaluates g with predicted weights (tests and the ranking check)."""
        return discrete_alphas(genotype, self.space).to(self.alphas.device)


def derive_macro(alphas, space: dict, T: int = 2) -> MacroGenotype:
    """Sec. 3.2.2: in every cell l and node j keep the T candidates of highest p_(l,j,.) (ties: the lower
    candidate index), strongest first. Two picks may read the same input (D11). Cell l takes its candidates
    from O*_reduce at layers//3 and 2*layers//3, else from O*_normal."""
    a = torch.as_tensor(as_array(alphas))
    layers = a.shape[0]
    p = F.softmax(a, dim=-1).numpy()
    reductions = genotypes.reduction_layers(layers)
    cells = []
    for l in range(layers):
        cell_space = space['reduce' if l in reductions else 'normal']
        cell = []
        for j in range(STEPS):
            order = sorted(range(p.shape[2]), key=lambda c: (-p[l, j, c], c))[:T]
            cell += [tuple(cell_space[j][c]) for c in order]
        cells.append(cell)
    return MacroGenotype(cells=cells, concat=list(CONCAT))


def discrete_alphas(genotype: MacroGenotype, space: dict) -> torch.Tensor:
    """(L, 4, K) logits: 0 at every candidate the genotype picks (two per node), -inf elsewhere (D14)."""
    genotype = genotypes.validate(genotype)
    layers = len(genotype.cells)
    reductions = genotypes.reduction_layers(layers)
    K = len(space['normal'][0])
    out = torch.full((layers, STEPS, K), float('-inf'))
    for l, cell in enumerate(genotype.cells):
        kind = 'reduce' if l in reductions else 'normal'
        for j in range(STEPS):
            for pair in cell[2 * j:2 * j + 2]:
                node = [tuple(c) for c in space[kind][j]]
                if tuple(pair) not in node:
                    raise ValueError(f'cell {l} ({kind}) node {j + 2}: {pair!r} is not in the intensive space '
                                     f'({node})')
                out[l, j, node.index(tuple(pair))] = 0.
    return out


def macro_space_size(K: int = 6, T: int = 2, nodes: int = STEPS, layers: int = 8) -> int:
    """Sec. 4.2: C(K, T)^(nodes L) discrete architectures (15^32 ~ 4.3e37 for L = 8)."""
    return math.comb(K, T) ** (nodes * layers)
