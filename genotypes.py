"""Genotypes: the cells that a search finds and the evaluation networks build.

A genotype is DARTS's namedtuple, unchanged, so genotypes from DARTS-family papers paste in verbatim.
A cell list takes one of two forms (spec §5):

- classic (DARTS): a flat list of (op, input) pairs, two per inner node;
- heterogeneous (NOS): one entry per block, ((op_i, i), (op_j, j), op_second): the two first-tier ops
  with the nodes they read, and the second-tier op applied to the block's surrogate node (Sec. 3.2).

Inputs are node indices: 0 and 1 are the cell's two inputs, 2.. the inner nodes before this block.
A classic cell is the heterogeneous special case whose second-tier op is skip_connect.

This module imports no torch: edit it, paste genotypes into it and validate them anywhere.
"""
from __future__ import annotations

import json
import os
from collections import namedtuple

Genotype = namedtuple('Genotype', 'normal normal_concat reduce reduce_concat')

# The eleven primitives of the heterogeneous space, in the order that fixes the indices of the paper's
# Fig. 5 (f0..f6, a0, a1, d0, d1).
PRIMITIVES = [
    'sep_conv_3x3',
    'sep_conv_5x5',
    'dil_conv_3x3',
    'dil_conv_5x5',
    'max_pool_3x3',
    'avg_pool_3x3',
    'skip_connect',
    'spatial_attention',
    'channel_attention',
    'dynamic_conv_3x3',
    'dynamic_conv_5x5',
]

# DARTS's own space (its order), for the paper's "space generality" experiment.
DARTS_PRIMITIVES = [
    'none',
    'max_pool_3x3',
    'avg_pool_3x3',
    'skip_connect',
    'sep_conv_3x3',
    'sep_conv_5x5',
    'dil_conv_3x3',
    'dil_conv_5x5',
]

FEATURE_OPS = PRIMITIVES[:7]
ATTENTION_OPS = ['spatial_attention', 'channel_attention']
DYNAMIC_OPS = ['dynamic_conv_3x3', 'dynamic_conv_5x5']

# Op subsets of the Fig. 7 ablation, as names that `--ops` accepts.
OP_SUBSETS = {
    'feature': FEATURE_OPS,
    'feature+attention': FEATURE_OPS + ATTENTION_OPS,
    'feature+dynamic': FEATURE_OPS + DYNAMIC_OPS,
    'all': PRIMITIVES,
}

STEPS = 4  # inner nodes (blocks) per cell
CONCAT = [2, 3, 4, 5]


def op_kind(name: str) -> str:
    """'feature', 'attention', 'dynamic' or 'none' for an op name; ValueError for an unknown one."""
    if name in FEATURE_OPS:
        return 'feature'
    if name in ATTENTION_OPS:
        return 'attention'
    if name in DYNAMIC_OPS:
        return 'dynamic'
    if name == 'none':
        return 'none'
    raise ValueError(f'unknown op {name!r}')


# DARTS (Liu et al., ICLR 2019), copied from its repository: first- and second-order CIFAR-10 cells.
DARTS_V1 = Genotype(
    normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), ('sep_conv_3x3', 1),
            ('skip_connect', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 0),
            ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('avg_pool_3x3', 0)],
    reduce_concat=[2, 3, 4, 5])
DARTS_V2 = Genotype(
    normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1),
            ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1),
            ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)],
    reduce_concat=[2, 3, 4, 5])
DARTS = DARTS_V2

# A heterogeneous cell pair in the style of the paper's Fig. 5 (two attention ops in the normal cell's
# first tier, dynamic convolutions in its second tier). Fig. 5 is a drawing that the paper's text does not
# spell out, so this is an illustrative example, not the paper's searched cell: replace it with the
# genotype.json that your own search writes.
NOS_EXAMPLE = Genotype(
    normal=[(('sep_conv_3x3', 0), ('spatial_attention', 1), 'dynamic_conv_3x3'),
            (('sep_conv_5x5', 1), ('channel_attention', 2), 'skip_connect'),
            (('dil_conv_3x3', 0), ('skip_connect', 3), 'dynamic_conv_5x5'),
            (('sep_conv_3x3', 1), ('dynamic_conv_3x3', 4), 'sep_conv_3x3')],
    normal_concat=[2, 3, 4, 5],
    reduce=[(('max_pool_3x3', 0), ('sep_conv_3x3', 1), 'skip_connect'),
            (('max_pool_3x3', 1), ('spatial_attention', 2), 'sep_conv_3x3'),
            (('skip_connect', 2), ('dynamic_conv_3x3', 0), 'channel_attention'),
            (('max_pool_3x3', 0), ('skip_connect', 3), 'skip_connect')],
    reduce_concat=[2, 3, 4, 5])


# EoiNAS: NOT the paper's cell. The paper shows its searched cells only as a drawing (Fig. 6), and the
# authors' repository (ZLab540/EoiNAS c337faa) holds several unlabelled candidates. This one is `GNAS` of
# its EoiNAS_train_semantic/genotypes.py (cell lists verbatim): of the candidates it is the closest to the
# paper's sizes (3.45M weights at CIFAR 20 cells / 36 channels against Table 1's 3.4M; 5.04M weights at
# ImageNet 14 / 48 against Table 2's 5.0M, and 548M multiply-adds by utils.count_macs, 587M by the spec's
# count, against 570M) and to §4.6's description (a chain 2->3->4->5, skips from the inputs at nodes 3-5).
# Unverified (../shared/spec/eoinas.md §6): to reproduce EoiNAS, retrain the genotype.json of your own
# `train_search.py --method eoinas --space darts` run.
EOINAS_REPO_CANDIDATE = Genotype(
    normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 2),
            ('skip_connect', 1), ('sep_conv_5x5', 3), ('skip_connect', 1), ('dil_conv_5x5', 4)],
    normal_concat=[2, 3, 4, 5],
    reduce=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_5x5', 1),
            ('sep_conv_5x5', 0), ('dil_conv_5x5', 3), ('dil_conv_5x5', 2), ('dil_conv_5x5', 3)],
    reduce_concat=[2, 3, 4, 5])


def edge_names(two_tier: bool = True, steps: int = STEPS) -> list[str]:
    """Names of the rows of a search network's A, in its edge order (spec §2): first-tier edges
    'i->k\'' into surrogate node k' (DARTS order), then second-tier edges 'k\'->k'; DARTS's single
    tier has edges 'i->k'."""
    mark = "'" if two_tier else ''
    first = [f'{i}->{k + 2}{mark}' for k in range(steps) for i in range(k + 2)]
    return first + ([f"{k + 2}'->{k + 2}" for k in range(steps)] if two_tier else [])


class GenotypeError(ValueError):
    """A genotype that cannot be built; the message names the cell, the block and the fault."""


def is_classic(cell) -> bool:
    """True for DARTS's flat list of (op, input) pairs, False for NOS blocks."""
    return len(cell) > 0 and isinstance(cell[0], (tuple, list)) and isinstance(cell[0][0], str)


def to_blocks(cell, cell_name: str = 'cell') -> list:
    """The cell as validated NOS blocks ((op_i, i), (op_j, j), op_second), whichever form it came in."""
    cell = list(cell)
    if is_classic(cell):
        if len(cell) != 2 * STEPS:
            raise GenotypeError(f'{cell_name}: a classic cell needs {2 * STEPS} (op, input) pairs '
                                f'(two per block), got {len(cell)}')
        blocks = []
        for k in range(STEPS):
            a, b = cell[2 * k], cell[2 * k + 1]
            blocks.append((_pair(a, cell_name, k), _pair(b, cell_name, k), 'skip_connect'))
    else:
        if len(cell) != STEPS:
            raise GenotypeError(f'{cell_name}: a heterogeneous cell needs {STEPS} blocks, got {len(cell)}')
        blocks = []
        for k, block in enumerate(cell):
            if not isinstance(block, (tuple, list)) or len(block) != 3 or not isinstance(block[2], str):
                raise GenotypeError(f'{cell_name} block {k}: expected ((op_i, i), (op_j, j), op_second), '
                                    f'got {block!r}')
            blocks.append((_pair(block[0], cell_name, k), _pair(block[1], cell_name, k), block[2]))
    for k, ((op_i, i), (op_j, j), op_s) in enumerate(blocks):
        where = f'{cell_name} block {k}'
        for op in (op_i, op_j, op_s):
            if op not in PRIMITIVES:
                raise GenotypeError(f'{where}: unknown op {op!r}; valid ops: {", ".join(PRIMITIVES)}')
        for idx in (i, j):
            if not 0 <= idx < k + 2:
                raise GenotypeError(f'{where}: input {idx} does not exist yet (block {k} reads nodes '
                                    f'0..{k + 1})')
        if op_kind(op_i) != 'feature' and op_kind(op_j) != 'feature':
            raise GenotypeError(f'{where}: the first tier ({op_i}, {op_j}) has no feature op; at least one '
                                f'of its two ops must be one of {", ".join(FEATURE_OPS)}')
    return blocks


def _pair(pair, cell_name, k):
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str)
            or isinstance(pair[1], bool) or not isinstance(pair[1], int)):
        raise GenotypeError(f'{cell_name} block {k}: expected an (op, input) pair, got {pair!r}')
    return (pair[0], pair[1])


def validate(genotype: Genotype) -> Genotype:
    """Check both cells; returns the genotype (with tuples, not lists) or raises GenotypeError."""
    if not isinstance(genotype, Genotype):
        raise GenotypeError(f'expected a Genotype(normal, normal_concat, reduce, reduce_concat), got '
                            f'{type(genotype).__name__}')
    fields = {}
    for name in ('normal', 'reduce'):
        cell = getattr(genotype, name)
        classic = is_classic(cell)
        blocks = to_blocks(cell, name)
        fields[name] = ([pair for b in blocks for pair in b[:2]] if classic else blocks)
        concat = list(getattr(genotype, name + '_concat'))
        if concat != CONCAT:
            raise GenotypeError(f'{name}_concat must be {CONCAT} (the outputs of the {STEPS} blocks), '
                                f'got {concat}')
        fields[name + '_concat'] = concat
    return Genotype(**fields)


def reduction_layers(layers: int) -> tuple[int, int]:
    """DARTS's reduction cells: at layers//3 and 2*layers//3."""
    return layers // 3, 2 * layers // 3


def cell_genotype(genotype, i: int, layers: int) -> Genotype:
    """The plain Genotype that cell i of a `layers`-cell network builds (model.py asks only this).

    Every genotype form answers here: a plain Genotype is the same cell at every layer. Forms that give
    different cells to different layers (a cell per stage, a cell per layer) add their case here.
    """
    if isinstance(genotype, Genotype):
        return genotype
    raise GenotypeError(f'expected a genotype, got {type(genotype).__name__}')


def to_json(genotype: Genotype) -> str:
    return json.dumps(genotype._asdict(), indent=1)


def from_json(text: str, source: str = 'genotype') -> Genotype:
    """Parse the JSON that train_search.py writes; tuples come back as tuples so repr() pastes."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise GenotypeError(f'{source} is not valid JSON: {e}') from None
    if not isinstance(data, dict) or set(data) != set(Genotype._fields):
        raise GenotypeError(f'{source} must be a JSON object with the keys {", ".join(Genotype._fields)}')

    def tuplify(x):
        return tuple(tuplify(v) for v in x) if isinstance(x, list) else x

    cells = {k: [tuplify(e) for e in data[k]] if isinstance(data[k], list) else data[k]
             for k in ('normal', 'reduce')}
    return validate(Genotype(normal=cells['normal'], normal_concat=data['normal_concat'],
                             reduce=cells['reduce'], reduce_concat=data['reduce_concat']))


def save(genotype: Genotype, path: str) -> None:
    """Write genotype.json atomically (a killed run never leaves half a file)."""
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        f.write(to_json(genotype) + '\n')
    os.replace(tmp, path)


def load(arch: str | None = None, genotype_file: str | None = None) -> Genotype:
    """The genotype named `arch` in this module, or the one in `genotype_file`; validated."""
    if genotype_file:
        if not os.path.isfile(genotype_file):
            raise GenotypeError(f'genotype file {genotype_file} does not exist')
        with open(genotype_file) as f:
            return from_json(f.read(), genotype_file)
    g = globals().get(arch)
    if not isinstance(g, Genotype):
        names = sorted(k for k, v in globals().items() if isinstance(v, Genotype))
        raise GenotypeError(f'no genotype named {arch!r} in genotypes.py; known: {", ".join(names)}')
    return validate(g)
