"""Genotypes: the cells that a search finds and the evaluation networks build.

A genotype is DARTS's namedtuple, unchanged, so genotypes from DARTS-family papers paste in verbatim.
A cell list takes one of two forms (docs/nos.md):

- classic (DARTS): a flat list of (op, input) pairs, two per inner node;
- heterogeneous (NOS): one entry per block, ((op_i, i), (op_j, j), op_second): the two first-tier ops
  with the nodes they read, and the second-tier op applied to the block's surrogate node (Sec. 3.2).

Inputs are node indices: 0 and 1 are the cell's two inputs, 2.. the inner nodes before this block.
A classic cell is the heterogeneous special case whose second-tier op is skip_connect.

`NB201Genotype` holds a NAS-Bench-201 cell as the benchmark's architecture string (end of this file).

`StagedGenotype` (AGNAS) holds a different normal cell per stage and one cell per reduction, `MacroGenotype`
(ADWPNAS) a cell per layer; model.py asks `cell_genotype(genotype, i, layers)` for the plain Genotype of cell
i, whatever the form. `ChainGenotype` (AGNAS's macro search) has no cells: one MBConv block (or skip) per layer
of the ProxylessNAS chain, which model_macro.MacroNetwork builds.

This module imports no torch: edit it, paste genotypes into it and validate them anywhere.
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import random
from collections import namedtuple

Genotype = namedtuple('Genotype', 'normal normal_concat reduce reduce_concat')
# ADWPNAS's per-layer form (docs/adwpnas.md): one cell for every layer of a fixed depth L, reductions at
# L//3 and 2L//3 as always; `cells[i]` is a cell list (classic pairs or NOS blocks), `concat` is shared.
MacroGenotype = namedtuple('MacroGenotype', 'cells concat')

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
    if name in FEATURE_OPS or name in NB201_PRIMITIVES[1:]:  # NAS-Bench-201's ops but `none` map features
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


# ---------------------------------------------------------------------------------------------------------
# Staged genotypes (AGNAS, docs/agnas.md): one normal cell per stage and one reduction
# cell per reduction, independent of depth. The two reduction cells split a network into three stages
# (reductions at layers//3 and 2*layers//3, as everywhere here); every normal cell of stage s builds
# normal[s], reduction cell r builds reduce[r]. Each cell is a classic or a heterogeneous cell as above.
StagedGenotype = namedtuple('StagedGenotype', 'normal normal_concat reduce reduce_concat')
STAGES = 3       # normal cells of a staged genotype: one per stage
REDUCTIONS = 2   # reduction cells of a staged genotype

# AGNAS (Sun et al., ICML 2022), the authors' released CIFAR-10 cells (docs/agnas.md, verbatim): the first
# normal cell of each stage of the 8-cell supernet (cells 0, 3, 6) and its reduction cells (2, 5).
# NetworkCIFAR(36, 10, 20, True, AGNAS): 3,611,998 weights without the auxiliary tower.
AGNAS = StagedGenotype(
    normal=[
        # Cell_0 (stage 1)
        [('sep_conv_3x3', 0), ('dil_conv_3x3', 1), ('dil_conv_5x5', 0), ('skip_connect', 1),
         ('sep_conv_3x3', 0), ('sep_conv_5x5', 3), ('dil_conv_5x5', 0), ('sep_conv_3x3', 3)],
        # Cell_3 (stage 2)
        [('skip_connect', 0), ('sep_conv_3x3', 1), ('dil_conv_5x5', 0), ('sep_conv_3x3', 1),
         ('dil_conv_3x3', 0), ('sep_conv_5x5', 1), ('sep_conv_3x3', 1), ('dil_conv_5x5', 4)],
        # Cell_6 (stage 3)
        [('skip_connect', 0), ('dil_conv_5x5', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1),
         ('sep_conv_5x5', 0), ('max_pool_3x3', 2), ('sep_conv_5x5', 0), ('sep_conv_3x3', 1)]],
    normal_concat=[2, 3, 4, 5],
    reduce=[
        # Cell_2 (first reduction)
        [('max_pool_3x3', 0), ('sep_conv_5x5', 1), ('skip_connect', 0), ('sep_conv_5x5', 1),
         ('max_pool_3x3', 0), ('skip_connect', 1), ('sep_conv_5x5', 0), ('sep_conv_3x3', 1)],
        # Cell_5 (second reduction)
        [('skip_connect', 1), ('skip_connect', 0), ('dil_conv_3x3', 1), ('dil_conv_3x3', 0),
         ('avg_pool_3x3', 0), ('max_pool_3x3', 1), ('avg_pool_3x3', 0), ('max_pool_3x3', 1)]],
    reduce_concat=[2, 3, 4, 5])


def staged_cell_names(kind: str) -> list[str]:
    """How errors and drawings name the cells of a staged genotype: 'normal cell 1 (stage 1)', ..."""
    if kind == 'normal':
        return [f'normal cell {s + 1} (stage {s + 1})' for s in range(STAGES)]
    return [f'reduce cell {r + 1} (reduction {r + 1})' for r in range(REDUCTIONS)]


def validate_staged(genotype: StagedGenotype) -> StagedGenotype:
    """Check every cell of a staged genotype; the message names which cell and why."""
    fields = {}
    for kind, count in (('normal', STAGES), ('reduce', REDUCTIONS)):
        cells = getattr(genotype, kind)
        what = 'one per stage' if kind == 'normal' else 'one per reduction'
        if (not isinstance(cells, (list, tuple)) or not all(isinstance(c, (list, tuple)) for c in cells)
                or is_classic(cells)):
            raise GenotypeError(f'a staged genotype\'s {kind} must be a list of {count} cells ({what}), each a '
                                f'list of (op, input) pairs or blocks; got {cells!r:.80}')
        if len(cells) != count:
            raise GenotypeError(f'a staged genotype needs {count} {kind} cells ({what}), got {len(cells)}')
        out = []
        for cell, name in zip(cells, staged_cell_names(kind)):
            blocks = to_blocks(cell, name)
            out.append([pair for b in blocks for pair in b[:2]] if is_classic(list(cell)) else blocks)
        fields[kind] = out
        fields[kind + '_concat'] = _concat(getattr(genotype, kind + '_concat'), f'{kind}_concat')
    return StagedGenotype(**fields)


# EoiNAS: NOT the paper's cell. The paper shows its searched cells only as a drawing (Fig. 6), and the
# authors' repository (ZLab540/EoiNAS c337faa) holds several unlabelled candidates. This one is `GNAS` of
# its EoiNAS_train_semantic/genotypes.py (cell lists verbatim): of the candidates it is the closest to the
# paper's sizes (3.45M weights at CIFAR 20 cells / 36 channels against Table 1's 3.4M; 5.04M weights at
# ImageNet 14 / 48 against Table 2's 5.0M, and 548M multiply-adds by utils.count_macs against 570M) and to
# §4.6's description (a chain 2->3->4->5, skips from the inputs at nodes 3-5).
# Unverified (docs/eoinas.md): to reproduce EoiNAS, retrain the genotype.json of your own
# `train_search.py --method eoinas --space darts` run.
EOINAS_REPO_CANDIDATE = Genotype(
    normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 2),
            ('skip_connect', 1), ('sep_conv_5x5', 3), ('skip_connect', 1), ('dil_conv_5x5', 4)],
    normal_concat=[2, 3, 4, 5],
    reduce=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_5x5', 1),
            ('sep_conv_5x5', 0), ('dil_conv_5x5', 3), ('dil_conv_5x5', 2), ('dil_conv_5x5', 3)],
    reduce_concat=[2, 3, 4, 5])


def edge_names(two_tier: bool = True, steps: int = STEPS) -> list[str]:
    """Names of the rows of a search network's A, in its edge order (docs/nos.md): first-tier edges
    'i->k\'' into surrogate node k' (DARTS order), then second-tier edges 'k\'->k'; DARTS's single
    tier has edges 'i->k'."""
    mark = "'" if two_tier else ''
    first = [f'{i}->{k + 2}{mark}' for k in range(steps) for i in range(k + 2)]
    return first + ([f"{k + 2}'->{k + 2}" for k in range(steps)] if two_tier else [])


class GenotypeError(ValueError):
    """A genotype that cannot be built; the message names the cell, the block and the fault."""


def is_classic(cell) -> bool:
    """True for DARTS's flat list of (op, input) pairs, False for NOS blocks (and anything else)."""
    return (isinstance(cell, (list, tuple)) and len(cell) > 0 and isinstance(cell[0], (tuple, list))
            and len(cell[0]) > 0 and isinstance(cell[0][0], str))


def _cell(cell, name: str):
    """A cell must be a list (of pairs or blocks) before anything looks inside it."""
    if not isinstance(cell, (list, tuple)):
        raise GenotypeError(f'{name}: a cell is a list of (op, input) pairs or of blocks ((op_i, i), (op_j, j), '
                            f'op_second), got {cell!r:.80}')
    return cell


def _concat(concat, name: str) -> list:
    """The nodes a cell concatenates: always CONCAT, the outputs of its blocks."""
    if not isinstance(concat, (list, tuple)) or list(concat) != CONCAT:
        raise GenotypeError(f'{name} must be {CONCAT} (the outputs of the {STEPS} blocks), got {concat!r:.80}')
    return list(concat)


def to_blocks(cell, cell_name: str = 'cell') -> list:
    """The cell as validated NOS blocks ((op_i, i), (op_j, j), op_second), whichever form it came in."""
    cell = list(_cell(cell, cell_name))
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
    """Check a genotype of any form (a hand-edited one too); returns it (with tuples, not lists) or raises
    GenotypeError, whatever it holds."""
    return checked('', _validate, genotype)


def checked(source: str, check, *args):
    """check(*args), where an exception other than GenotypeError (a number where a list belongs, deep inside)
    becomes one GenotypeError naming `source`: whatever a genotype holds, the caller gets a genotype or one
    sentence. The checks name the common faults themselves; this is the net under them."""
    try:
        return check(*args)
    except GenotypeError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError, OverflowError) as e:
        where = f'{source} is not a valid genotype' if source else 'not a valid genotype'
        raise GenotypeError(f'{where}: {type(e).__name__} ({str(e)[:80]}) where a cell, a pair, an op name or an '
                            f'input index belongs') from None


def _validate(genotype):
    if isinstance(genotype, StagedGenotype):  # staged form (AGNAS)
        return validate_staged(genotype)
    if isinstance(genotype, MacroGenotype):
        return validate_macro(genotype)
    if isinstance(genotype, NB201Genotype):
        return validate_nb201(genotype)
    if isinstance(genotype, ChainGenotype):
        return validate_chain(genotype)
    if not isinstance(genotype, Genotype):
        raise GenotypeError(f'expected a Genotype(normal, normal_concat, reduce, reduce_concat), got '
                            f'{type(genotype).__name__}')
    fields = {}
    for name in ('normal', 'reduce'):
        cell = _cell(getattr(genotype, name), name)
        classic = is_classic(cell)
        blocks = to_blocks(cell, name)
        fields[name] = ([pair for b in blocks for pair in b[:2]] if classic else blocks)
        fields[name + '_concat'] = _concat(getattr(genotype, name + '_concat'), f'{name}_concat')
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
    if isinstance(genotype, StagedGenotype):  # staged form (AGNAS): the cell of i's stage or reduction
        reductions = reduction_layers(layers)
        stage = sum(i > r for r in reductions)  # 0 before the first reduction cell, 1 between, 2 after
        r = reductions.index(i) if i in reductions else min(stage, REDUCTIONS - 1)
        return Genotype(normal=genotype.normal[min(stage, STAGES - 1)], normal_concat=genotype.normal_concat,
                        reduce=genotype.reduce[r], reduce_concat=genotype.reduce_concat)
    if isinstance(genotype, MacroGenotype):
        return macro_cell(genotype, i, layers)
    if isinstance(genotype, NB201Genotype):
        raise GenotypeError('a NAS-Bench-201 architecture builds the NAS-Bench-201 network (model_nb201.py), not '
                            'a DARTS-style network of two-input cells')
    if isinstance(genotype, ChainGenotype):
        raise GenotypeError('a chain genotype (the ProxylessNAS space) has no cells: it builds '
                            'model_macro.MacroNetwork; retrain it with train_imagenet.py')
    raise GenotypeError(f'expected a genotype, got {type(genotype).__name__}')


def to_json(genotype: Genotype) -> str:
    if isinstance(genotype, StagedGenotype):  # staged form (AGNAS): marked, so from_json knows it
        return json.dumps({'staged': True, **genotype._asdict()}, indent=1)
    if isinstance(genotype, NB201Genotype):  # {"nb201": "<architecture string>"}
        return json.dumps({'nb201': genotype.arch}, indent=1)
    if isinstance(genotype, ChainGenotype):  # chain form (AGNAS's macro search): marked too
        return json.dumps({'chain': True, 'layers': list(genotype.layers)})
    return json.dumps(genotype._asdict(), indent=1)


def from_json(text: str, source: str = 'genotype') -> Genotype:
    """The genotype in a genotype.json's text, validated; tuples come back as tuples so repr() pastes. Any text
    gives a genotype or one GenotypeError sentence: the form is told by the object's keys (JSON_FORMS, at the
    end of this file), and `checked` catches what a form's own checks do not name."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise GenotypeError(f'{source} is not valid JSON: {e}') from None
    except RecursionError:
        raise GenotypeError(f'{source} nests its brackets too deeply to be a genotype') from None
    form = next((f for f in JSON_FORMS if f.recognise(data)), None)
    if form is None:
        raise GenotypeError(f'{source} must be a JSON object with the keys {", ".join(Genotype._fields)} (or '
                            f'another genotype form: {"; ".join(f"{f.name}: {f.keys}" for f in JSON_FORMS[1:])})')
    try:
        return checked(source, form.parse, data, source)
    except GenotypeError as e:  # the sentence names the file
        if str(e).startswith(source):
            raise
        raise GenotypeError(f'{source}: {e}') from None


def _plain_from_dict(data: dict, source: str) -> Genotype:
    """The plain form of from_json: {"normal": cell, "normal_concat": [...], "reduce": cell, ...}."""
    cells = {k: [_tuplify(e) for e in data[k]] if isinstance(data[k], list) else data[k]
             for k in ('normal', 'reduce')}
    return validate(Genotype(normal=cells['normal'], normal_concat=data['normal_concat'],
                             reduce=cells['reduce'], reduce_concat=data['reduce_concat']))


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def _staged_from_dict(data: dict, source: str) -> StagedGenotype:
    """The staged form of from_json: {"staged": true, "normal": [3 cells], ..., "reduce": [2 cells], ...}."""
    keys = {'staged', *StagedGenotype._fields}
    if set(data) != keys:
        raise GenotypeError(f'{source}: a staged genotype must be a JSON object with the keys '
                            f'{", ".join(sorted(keys))}')
    cells = {k: [[_tuplify(e) for e in c] if isinstance(c, list) else c for c in data[k]]
             if isinstance(data[k], list) else data[k] for k in ('normal', 'reduce')}
    return validate_staged(StagedGenotype(normal=cells['normal'], normal_concat=data['normal_concat'],
                                          reduce=cells['reduce'], reduce_concat=data['reduce_concat']))


def save(genotype: Genotype, path: str) -> None:
    """Write genotype.json atomically (a killed run never leaves half a file)."""
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        f.write(to_json(genotype) + '\n')
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# The random baseline of Table 2 ("best architecture among 30 random samples")

RANDOM_PREFIX = 'random:'
IDS_PREFIX = 'ids:'  # --arch ids:1,1,-1,...: a chain genotype in the authors' export format (macro_from_ids)


@functools.cache
def valid_blocks(k: int) -> tuple:
    """Every block k of the heterogeneous space (docs/nos.md), each once, in a fixed order: the pair of
    predecessors i < j of node k + 2, the ordered op pair (o_i, o_j) with at least one feature op (the
    derivation's rule, docs/nos.md), and the second-tier op: C(k+2, 2) * 105 * 11 blocks."""
    op_pairs = [(a, b) for a in PRIMITIVES for b in PRIMITIVES
                if op_kind(a) == 'feature' or op_kind(b) == 'feature']
    return tuple(((a, i), (b, j), s) for i, j in itertools.combinations(range(k + 2), 2)
                 for a, b in op_pairs for s in PRIMITIVES)


def random_genotype(seed: int) -> Genotype:
    """A heterogeneous genotype drawn uniformly from the exact space of docs/nos.md, 180 * (105 * 11)^4 cells
    per cell type: each block uniformly from `valid_blocks(k)`, independently, normal cell first. The same
    seed gives the same genotype (Python's own Mersenne Twister, not torch's RNG)."""
    rng = random.Random(seed)
    cells = {name: [rng.choice(valid_blocks(k)) for k in range(STEPS)] for name in ('normal', 'reduce')}
    return validate(Genotype(normal=cells['normal'], normal_concat=CONCAT, reduce=cells['reduce'],
                             reduce_concat=CONCAT))


def random_seed_of(arch: str) -> int | None:
    """The seed of `random:SEED`, None for any other name; a SEED that is not an integer fails."""
    if not arch.startswith(RANDOM_PREFIX):
        return None
    text = arch[len(RANDOM_PREFIX):]
    try:
        return int(text)
    except ValueError:
        raise GenotypeError(f'--arch {arch}: the seed {text!r} is not an integer; write random:SEED with an '
                            f'integer SEED, for example --arch random:0') from None


def load(arch: str | None = None, genotype_file: str | None = None) -> Genotype:
    """The genotype named `arch` in this module (`random:SEED`: `random_genotype(SEED)`; `ids:1,1,-1,...`:
    `macro_from_ids`), or the one in `genotype_file`; validated."""
    if genotype_file:
        if os.path.isdir(genotype_file):
            raise GenotypeError(f'genotype file {genotype_file} is a folder; pass the genotype.json in it (a '
                                f'search writes SAVE/genotype.json)')
        if not os.path.isfile(genotype_file):
            raise GenotypeError(f'genotype file {genotype_file} does not exist')
        try:
            with open(genotype_file, encoding='utf-8') as f:
                text = f.read()
        except UnicodeDecodeError:
            raise GenotypeError(f'genotype file {genotype_file} is not JSON text (a checkpoint?); pass the '
                                f'genotype.json that train_search.py writes') from None
        return from_json(text, genotype_file)
    if is_nb201_arch(arch):  # a NAS-Bench-201 architecture string, pasted as it is
        return validate_nb201(NB201Genotype(arch))
    seed = random_seed_of(arch) if arch else None
    if seed is not None:
        return random_genotype(seed)
    if arch and arch.startswith(IDS_PREFIX):  # the authors' export format of a chain genotype
        return macro_from_ids(arch[len(IDS_PREFIX):])
    g = globals().get(arch)
    if not isinstance(g, GENOTYPE_FORMS):
        names = sorted(k for k, v in globals().items() if isinstance(v, GENOTYPE_FORMS))
        raise GenotypeError(f'no genotype named {arch!r} in genotypes.py; known: {", ".join(names)}')
    return validate(g)


# ---------------------------------------------------------------------------------------------------------
# ADWPNAS's per-layer form, MacroGenotype(cells, concat) (docs/adwpnas.md). Its JSON form is
# {"cells": [...], "concat": [...]}; from_json dispatches on the "cells" key.


def validate_macro(genotype: MacroGenotype) -> MacroGenotype:
    """Check every cell (with to_blocks) and the shared concat; returns the genotype with tuples, or raises
    GenotypeError naming the cell (its layer index and whether that layer is a reduction), the block and the
    fault."""
    cells = genotype.cells
    if not isinstance(cells, (list, tuple)) or not cells:
        raise GenotypeError(f'a per-layer genotype needs a non-empty list of cells, one per layer, got '
                            f'{cells!r}')
    reductions = reduction_layers(len(cells))
    checked = []
    for i, cell in enumerate(cells):
        name = f'cell {i} ({"reduce" if i in reductions else "normal"})'
        if not isinstance(cell, (list, tuple)):
            raise GenotypeError(f'{name}: expected a list of (op, input) pairs, got {cell!r}')
        blocks = to_blocks(cell, name)
        checked.append([pair for b in blocks for pair in b[:2]] if is_classic(cell) else blocks)
    return MacroGenotype(cells=checked, concat=_concat(genotype.concat, 'concat'))


def macro_cell(genotype: MacroGenotype, i: int, layers: int) -> Genotype:
    """Cell i of a `layers`-cell network as a plain Genotype; `Cell` picks its field by `reduction`, so the
    one cell fills both."""
    n = len(genotype.cells)
    if n != layers:
        raise GenotypeError(f'the per-layer genotype has {n} cells but the network has {layers} layers; '
                            f'build the network with {n} layers (the scripts take the depth from the genotype '
                            f'when --layers is left out)')
    cell = genotype.cells[i]
    return Genotype(normal=cell, normal_concat=genotype.concat, reduce=cell, reduce_concat=genotype.concat)


def as_macro(genotype: Genotype, layers: int) -> MacroGenotype:
    """A plain Genotype laid out over `layers` cells: its reduce cell at layers//3 and 2*layers//3, its
    normal cell elsewhere (what NetworkCIFAR builds from the plain genotype)."""
    genotype = validate(genotype)
    cells = [list(genotype.reduce if i in reduction_layers(layers) else genotype.normal) for i in range(layers)]
    return validate_macro(MacroGenotype(cells=cells, concat=genotype.normal_concat))


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def macro_from_dict(data: dict, source: str = 'genotype') -> MacroGenotype:
    """The per-layer genotype of a parsed {"cells", "concat"} JSON object, validated."""
    if set(data) != set(MacroGenotype._fields):
        raise GenotypeError(f'{source} is a per-layer genotype and must be a JSON object with exactly the keys '
                            f'{", ".join(MacroGenotype._fields)}, got {", ".join(sorted(data))}')
    cells = data['cells']
    if isinstance(cells, list):
        cells = [[_tuplify(e) for e in c] if isinstance(c, list) else c for c in cells]
    return validate_macro(MacroGenotype(cells=cells, concat=data['concat']))


def macro_repr(genotype: MacroGenotype) -> str:
    """repr() with one cell per line (eval() of it in this module gives the genotype back)."""
    lines = ',\n'.join(f'    {list(cell)!r}' for cell in genotype.cells)
    return f'MacroGenotype(cells=[\n{lines}],\n  concat={list(genotype.concat)!r})'


# ---------------------------------------------------------------------------------------------------------
# NAS-Bench-201's form (Dong & Yang, ICLR 2020): one cell, shared by every cell of the network, written as
# the benchmark's architecture string. Node i (1..3) sums one edge from every earlier node j; the string
# lists, node by node (separated by '+'), each edge as `op~j` between bars:
#     |nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|
# Every one of the 5^6 = 15,625 strings is a valid architecture (a `none` edge included); the benchmark
# indexes them all. JSON form: {"nb201": "<the string>"}.

NB201_PRIMITIVES = ['none', 'skip_connect', 'nor_conv_1x1', 'nor_conv_3x3', 'avg_pool_3x3']  # the benchmark's order
NB201_NODES = 4  # node 0 is the cell input, node 3 its output
# (target, source) of each edge, in the row order of the 6 x 5 architecture matrix: 1<-0, 2<-0, 2<-1, ...
NB201_EDGES = [(i, j) for i in range(1, NB201_NODES) for j in range(i)]


def row_labels(space: str, rows: int) -> list[str]:
    """The names of the `rows` rows of a search space's importance matrix ('j->i' edges; NOS's two tiers as in
    edge_names), or their numbers where the space has another count."""
    labels = ([f'{j}->{i}' for i, j in NB201_EDGES] if space == 'nb201'
              else [f'layer {i}' for i in range(CHAIN_LAYERS)] if space == 'proxyless'  # the chain's layers
              else edge_names(space == 'nos', STEPS))
    return labels if len(labels) == rows else [str(i) for i in range(rows)]


class NB201Genotype(namedtuple('NB201Genotype', 'arch')):
    """A NAS-Bench-201 cell: `arch` is the benchmark's architecture string (validated by `validate`)."""
    __slots__ = ()

    def edges(self) -> list[tuple[str, int, int]]:
        """(op, source j, target i) of each edge, in the row order of the architecture matrix."""
        return [(op, j, i) for i, node in enumerate(parse_nb201(self.arch), start=1) for op, j in node]

    def ops(self) -> list[str]:
        """The op of each edge, in row order (1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2)."""
        return [op for op, _, _ in self.edges()]


def parse_nb201(arch) -> list[list[tuple[str, int]]]:
    """The architecture string as nodes 1..3, each a list of (op, source); GenotypeError naming what is
    wrong and where (the node, the edge, the character position in the string)."""
    if not isinstance(arch, str):
        raise GenotypeError(f'a NAS-Bench-201 architecture is a string like {NB201_EXAMPLE.arch!r}, got '
                            f'{type(arch).__name__}')
    parts = arch.split('+')
    if len(parts) != NB201_NODES - 1:
        raise GenotypeError(f'NAS-Bench-201 architecture {arch!r}: expected {NB201_NODES - 1} nodes separated by '
                            f'"+", got {len(parts)}')
    nodes, pos = [], 0
    for i, part in enumerate(parts, start=1):
        if len(part) < 2 or part[0] != '|' or part[-1] != '|':
            raise GenotypeError(f'NAS-Bench-201 architecture {arch!r}: node {i} (at character {pos}) must be '
                                f'written |op~j|...| with a bar at each end, got {part!r}')
        edges = part[1:-1].split('|')
        if len(edges) != i:
            raise GenotypeError(f'NAS-Bench-201 architecture {arch!r}: node {i} (at character {pos}) needs {i} '
                                f'edge(s), one from each of nodes 0..{i - 1}, got {len(edges)}')
        node, at = [], pos + 1
        for j, edge in enumerate(edges):
            where = f'NAS-Bench-201 architecture {arch!r}: node {i}, edge {j + 1} ({edge!r} at character {at})'
            op, sep, src = edge.partition('~')
            if not sep:
                raise GenotypeError(f'{where}: expected op~source, with a "~"')
            if op not in NB201_PRIMITIVES:
                raise GenotypeError(f'{where}: unknown op {op!r}; valid ops: {", ".join(NB201_PRIMITIVES)}')
            if src != str(j):
                raise GenotypeError(f'{where}: the edges of node {i} read nodes 0..{i - 1} in order, so this one '
                                    f'must read node {j}, not {src!r}')
            node.append((op, j))
            at += len(edge) + 1
        nodes.append(node)
        pos += len(part) + 1
    return nodes


def nb201_arch(ops) -> str:
    """The architecture string of six ops given in row order (1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2)."""
    ops = list(ops)
    if len(ops) != len(NB201_EDGES):
        raise GenotypeError(f'a NAS-Bench-201 cell has {len(NB201_EDGES)} edges, got {len(ops)} ops')
    nodes = {}
    for op, (i, j) in zip(ops, NB201_EDGES):
        nodes.setdefault(i, []).append(f'{op}~{j}')
    arch = '+'.join('|' + '|'.join(nodes[i]) + '|' for i in range(1, NB201_NODES))
    parse_nb201(arch)  # the ops must be the benchmark's
    return arch


def validate_nb201(genotype: NB201Genotype) -> NB201Genotype:
    parse_nb201(genotype.arch)
    return NB201Genotype(genotype.arch)


def is_nb201_arch(text) -> bool:
    """True for text written like an architecture string (a bar or a tilde, which no genotype name has);
    `load` then parses it."""
    return isinstance(text, str) and ('|' in text or '~' in text)


# An example, not a searched result: the architecture of the string in NAS-Bench-201's own documentation.
NB201_EXAMPLE = NB201Genotype('|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|'
                              'skip_connect~2|')
# The chain form, ChainGenotype(layers) (AGNAS's macro search, §4.2 and §5.3; model_macro.py): one choice per
# searchable layer of the ProxylessNAS chain, by name. Not to be confused with MacroGenotype above, which
# holds a DARTS cell per layer (ADWPNAS). A block is an MBConv 'kKeE' (K x K depthwise conv, expansion E);
# 'skip' removes the layer, allowed only where the layer keeps its shape (stride 1, same width).
# Its JSON form is {"chain": true, "layers": [...]}; from_json dispatches on the "chain" key.

ChainGenotype = namedtuple('ChainGenotype', 'layers')
# The six MBConv blocks of every layer, in the authors' order: the ids of their export format are 0..5.
CHAIN_BLOCKS = ['k3e3', 'k3e6', 'k5e3', 'k5e6', 'k7e3', 'k7e6']
SKIP = 'skip'
SKIP_ID = -1  # the authors' export format: -1 = skip (the layer is removed)
# The ProxylessNAS (GPU) space as AGNAS's supernet builds it: a 3x3 stem of stride 2 to PROXYLESS_STEM
# channels, a fixed MBConv (3x3, expansion 1) to PROXYLESS_FIRST, then the searchable layers in six groups of
# (width, layers, stride of the group's first layer), then a 1x1 conv to PROXYLESS_HEAD channels, a global
# pool and the classifier.
PROXYLESS_STEM, PROXYLESS_FIRST, PROXYLESS_HEAD = 40, 24, 1728
PROXYLESS_GROUPS = ((32, 4, 2), (56, 4, 2), (112, 4, 2), (128, 4, 1), (256, 4, 2), (432, 1, 1))


def chain_layers(groups=PROXYLESS_GROUPS, first: int = PROXYLESS_FIRST) -> list[tuple[int, int, int, int]]:
    """(C_in, C_out, stride, group) of every searchable layer, in order (21 in the ProxylessNAS space)."""
    out, c_in = [], first
    for g, (width, n, stride) in enumerate(groups):
        for i in range(n):
            out.append((c_in, width, stride if i == 0 else 1, g))
            c_in = width
    return out


CHAIN_LAYERS = len(chain_layers())


def skip_allowed(layer: int) -> bool:
    """Whether layer i has the skip candidate: only where it keeps its shape (15 of the 21 layers)."""
    c_in, c_out, stride, _ = chain_layers()[layer]
    return stride == 1 and c_in == c_out


def chain_layer_name(layer: int) -> str:
    """How errors and drawings name a layer: 'layer 5 (group 2: 32 -> 56 channels, stride 2)'."""
    c_in, c_out, stride, group = chain_layers()[layer]
    return f'layer {layer} (group {group + 1}: {c_in} -> {c_out} channels, stride {stride})'


def block_shape(name: str) -> tuple[int, int]:
    """(kernel, expansion) of a block name: 'k5e6' -> (5, 6)."""
    if name not in CHAIN_BLOCKS:
        raise GenotypeError(f'unknown block {name!r}; valid blocks: {", ".join(CHAIN_BLOCKS)}, {SKIP}')
    k, e = name[1:].split('e')
    return int(k), int(e)


def validate_chain(genotype: ChainGenotype) -> ChainGenotype:
    """Check a chain genotype; the message names the layer and the fault. Returns it with a list of names."""
    layers = genotype.layers
    if not isinstance(layers, (list, tuple)) or not all(isinstance(b, str) for b in layers):
        raise GenotypeError(f'a chain genotype\'s layers must be a list of {CHAIN_LAYERS} block names (one of '
                            f'{", ".join(CHAIN_BLOCKS)}, {SKIP} per layer); got {layers!r:.80}')
    if len(layers) != CHAIN_LAYERS:
        raise GenotypeError(f'a chain genotype needs {CHAIN_LAYERS} layers (the ProxylessNAS space\'s '
                            f'searchable layers), got {len(layers)}')
    for i, name in enumerate(layers):
        if name == SKIP:
            if not skip_allowed(i):
                raise GenotypeError(f'{chain_layer_name(i)} cannot be a skip: it changes the shape of its '
                                    f'input, so it needs one of {", ".join(CHAIN_BLOCKS)}')
        elif name not in CHAIN_BLOCKS:
            raise GenotypeError(f'{chain_layer_name(i)}: unknown block {name!r}; valid blocks: '
                                f'{", ".join(CHAIN_BLOCKS)}, {SKIP}')
    return ChainGenotype(layers=list(layers))


def macro_from_ids(ids) -> ChainGenotype:
    """A chain genotype from the authors' export format: 21 integers indexing CHAIN_BLOCKS, -1 for a skip
    (their `valid.py --model_id`, also ProxylessNAS-space searches that share it). `ids`: integers, or a
    string of them separated by commas or spaces ('1,1,-1,...' or '1 1 -1 ...')."""
    if isinstance(ids, str):
        parts = ids.replace(',', ' ').split()
        try:
            ids = [int(p) for p in parts]
        except ValueError:
            raise GenotypeError(f'block ids must be integers separated by commas or spaces, got {ids!r:.80}') from None
    ids = list(ids)
    if len(ids) != CHAIN_LAYERS:
        raise GenotypeError(f'the ProxylessNAS space has {CHAIN_LAYERS} searchable layers, so it needs '
                            f'{CHAIN_LAYERS} block ids, got {len(ids)}')
    names = []
    for i, b in enumerate(ids):
        if isinstance(b, bool) or not isinstance(b, int) or not SKIP_ID <= b < len(CHAIN_BLOCKS):
            raise GenotypeError(f'{chain_layer_name(i)}: block id {b!r} is not one of {SKIP_ID} (skip), '
                                f'0..{len(CHAIN_BLOCKS) - 1} ({", ".join(CHAIN_BLOCKS)})')
        names.append(SKIP if b == SKIP_ID else CHAIN_BLOCKS[b])
    return validate_chain(ChainGenotype(layers=names))


def macro_to_ids(genotype: ChainGenotype) -> list[int]:
    """The authors' export format of a chain genotype (inverse of macro_from_ids)."""
    return [SKIP_ID if b == SKIP else CHAIN_BLOCKS.index(b) for b in validate_chain(genotype).layers]


def chain_from_dict(data: dict, source: str = 'genotype') -> ChainGenotype:
    """The chain form of from_json: {"chain": true, "layers": [...]}."""
    if set(data) != {'chain', 'layers'} or data['chain'] is not True:
        raise GenotypeError(f'{source}: a chain genotype must be a JSON object {{"chain": true, "layers": '
                            f'[{CHAIN_LAYERS} block names]}}')
    return validate_chain(ChainGenotype(layers=data['layers']))


# AGNAS (Sun et al., ICML 2022), Table 2: the architecture released with the authors' code (the default of
# their valid.py --model_id: 1 1 -1 2 1 -1 5 1 1 -1 5 1 1 -1 1 4 3 -1 5 5 5), searched directly on ImageNet.
# model_macro.MacroNetwork(AGNAS_PROXYLESS): 6,728,936 weights.
AGNAS_PROXYLESS = ChainGenotype(layers=[
    'k3e6', 'k3e6', 'skip', 'k5e3',     # group 1: 32 channels, stride 2
    'k3e6', 'skip', 'k7e6', 'k3e6',     # group 2: 56, stride 2
    'k3e6', 'skip', 'k7e6', 'k3e6',     # group 3: 112, stride 2
    'k3e6', 'skip', 'k3e6', 'k7e3',     # group 4: 128, stride 1
    'k5e6', 'skip', 'k7e6', 'k7e6',     # group 5: 256, stride 2
    'k7e6'])                            # group 6: 432, stride 1

# Every genotype form, for `load` (a name in this module) and the scripts that accept any of them.
GENOTYPE_FORMS = (Genotype, StagedGenotype, MacroGenotype, NB201Genotype, ChainGenotype)


def _nb201_from_dict(data: dict, source: str) -> NB201Genotype:
    """The NAS-Bench-201 form of from_json: {"nb201": "<architecture string>"}."""
    if set(data) != {'nb201'}:
        raise GenotypeError(f'{source}: a NAS-Bench-201 genotype is a JSON object with the one key nb201, '
                            f'got {", ".join(sorted(data))}')
    return validate_nb201(NB201Genotype(data['nb201']))


# ---------------------------------------------------------------------------------------------------------
# The forms a genotype.json takes, told apart by the keys of its object (from_json tries them in order). A new
# genotype form adds a JsonForm here: how its object is recognised, how it is parsed (into a validated genotype,
# or a GenotypeError), and valid examples, which test_robustness.py mutates thousands of times to check that
# every malformed file gives a genotype or one sentence.
JsonForm = namedtuple('JsonForm', 'name keys recognise parse examples')
JSON_FORMS = [
    JsonForm('plain (DARTS or NOS cells)', ', '.join(Genotype._fields),
             lambda d: isinstance(d, dict) and set(d) == set(Genotype._fields), _plain_from_dict,
             (DARTS_V2, NOS_EXAMPLE)),
    JsonForm('staged (AGNAS)', '"staged": true and the plain keys',
             lambda d: isinstance(d, dict) and d.get('staged') is True, _staged_from_dict, (AGNAS,)),
    JsonForm('per-layer (ADWPNAS)', 'cells, concat', lambda d: isinstance(d, dict) and 'cells' in d,
             macro_from_dict, (as_macro(DARTS_V2, 5), as_macro(NOS_EXAMPLE, 3))),
    JsonForm('NAS-Bench-201', 'nb201', lambda d: isinstance(d, dict) and 'nb201' in d, _nb201_from_dict,
             (NB201_EXAMPLE,)),
    JsonForm('chain (AGNAS macro)', '"chain": true, layers', lambda d: isinstance(d, dict) and 'chain' in d,
             chain_from_dict, (AGNAS_PROXYLESS,)),
]
