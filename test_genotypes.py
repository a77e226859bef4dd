"""Genotypes: the two cell forms, round trips through repr and JSON, and the messages for bad ones."""
import pytest

import genotypes as G
from genotypes import Genotype, GenotypeError


@pytest.mark.parametrize('name', ['DARTS_V1', 'DARTS_V2', 'NOS_EXAMPLE'])
def test_repr_pastes_back(name):
    g = getattr(G, name)
    assert eval(repr(g), vars(G)) == g


@pytest.mark.parametrize('name', ['DARTS_V1', 'DARTS_V2', 'NOS_EXAMPLE'])
def test_json_round_trip(name, tmp_path):
    g = getattr(G, name)
    path = tmp_path / 'genotype.json'
    G.save(g, str(path))
    assert G.load(genotype_file=str(path)) == g
    assert G.from_json(G.to_json(g)) == g


def test_classic_cell_is_second_tier_skip():
    blocks = G.to_blocks(G.DARTS_V2.normal)
    assert blocks[0] == (('sep_conv_3x3', 0), ('sep_conv_3x3', 1), 'skip_connect')
    assert blocks[3] == (('skip_connect', 0), ('dil_conv_3x3', 2), 'skip_connect')
    assert G.is_classic(G.DARTS_V2.normal) and not G.is_classic(G.NOS_EXAMPLE.normal)


def test_load_by_name():
    assert G.load('DARTS_V2') == G.DARTS_V2


def _with_normal(cell):
    return Genotype(normal=cell, normal_concat=[2, 3, 4, 5], reduce=G.NOS_EXAMPLE.reduce,
                    reduce_concat=[2, 3, 4, 5])


def _blocks():
    return [list(b) for b in G.NOS_EXAMPLE.normal]


@pytest.mark.parametrize('change,words', [
    (lambda c: c.__setitem__(1, (('sep_conv_9x9', 0), ('skip_connect', 1), 'skip_connect')),
     ['normal block 1', "unknown op 'sep_conv_9x9'"]),
    (lambda c: c.__setitem__(0, (('sep_conv_3x3', 0), ('sep_conv_3x3', 2), 'skip_connect')),
     ['normal block 0', 'input 2 does not exist yet']),
    (lambda c: c.__setitem__(2, (('spatial_attention', 0), ('dynamic_conv_3x3', 1), 'skip_connect')),
     ['normal block 2', 'no feature op']),
    (lambda c: c.pop(), ['normal', 'needs 4 blocks, got 3']),
    (lambda c: c.__setitem__(3, (('sep_conv_3x3', 0), 'skip_connect')), ['normal block 3', 'expected']),
])
def test_malformed_genotypes_name_block_and_fault(change, words):
    cell = _blocks()
    change(cell)
    with pytest.raises(GenotypeError) as e:
        G.validate(_with_normal(cell))
    for w in words:
        assert w in str(e.value)


def test_classic_with_wrong_length_and_bad_concat():
    with pytest.raises(GenotypeError, match='8 \\(op, input\\) pairs'):
        G.validate(_with_normal(G.DARTS_V2.normal[:6]))
    with pytest.raises(GenotypeError, match='normal_concat'):
        G.validate(G.DARTS_V2._replace(normal_concat=[2, 3]))


def test_unknown_name_and_bad_file(tmp_path):
    with pytest.raises(GenotypeError, match='no genotype named .*DARTS_V2'):
        G.load('NOPE')
    with pytest.raises(GenotypeError, match='does not exist'):
        G.load(genotype_file=str(tmp_path / 'missing.json'))
    bad = tmp_path / 'bad.json'
    bad.write_text('{"normal": [')
    with pytest.raises(GenotypeError, match='not valid JSON'):
        G.load(genotype_file=str(bad))


@pytest.mark.parametrize('k', range(G.STEPS))
def test_random_blocks_are_exactly_the_space_of_spec_7(k):
    """valid_blocks(k), from which random_genotype draws uniformly, is every block the genotype checks
    accept (inputs i < j, at least one first-tier feature op), each once: C(k+2, 2) * 105 * 11."""
    blocks = G.valid_blocks(k)
    assert len(blocks) == len(set(blocks)) == (k + 2) * (k + 1) // 2 * 105 * 11
    accepted = set()
    other = [(('sep_conv_3x3', 0), ('sep_conv_3x3', 1), 'skip_connect')] * G.STEPS
    for i in range(k + 2):
        for j in range(i + 1, k + 2):
            for a in G.PRIMITIVES:
                for b in G.PRIMITIVES:
                    for s in G.PRIMITIVES:
                        cell = list(other)
                        cell[k] = ((a, i), (b, j), s)
                        try:
                            G.to_blocks(cell)
                        except GenotypeError:
                            continue
                        accepted.add(cell[k])
    assert set(blocks) == accepted


def test_random_space_size_is_the_exact_count():
    size = 1
    for k in range(G.STEPS):
        size *= len(G.valid_blocks(k))
    assert size == 180 * (105 * 11) ** 4  # docs/nos.md's exact count, per cell type


def test_random_genotype_is_reproducible_and_valid():
    g = G.load(arch='random:0')
    assert g == G.random_genotype(0) == G.load(arch='random:0')
    # pinned, so that a published random baseline stays the same cells
    assert g.normal[0] == (('skip_connect', 0), ('avg_pool_3x3', 1), 'spatial_attention')
    draws = [G.random_genotype(s) for s in range(30)]
    assert len({repr(d) for d in draws}) == 30
    for d in draws:
        assert G.validate(d) == d and eval(repr(d), vars(G)) == d
        assert not G.is_classic(d.normal) and not G.is_classic(d.reduce)


@pytest.mark.parametrize('arch', ['random:x', 'random:', 'random:1.5'])
def test_random_seed_must_be_an_integer(arch):
    with pytest.raises(GenotypeError, match=f'--arch {arch}: the seed .* is not an integer; write '
                                            f'random:SEED'):
        G.load(arch=arch)


# ---------------------------------------------------------------------------------------------------------
# Released genotypes against literal cells typed from their sources (not from genotypes.py)

# DARTS's repository (quark0/darts, cnn/genotypes.py): DARTS_V1 (first order) and DARTS_V2 (second order)
LITERAL_DARTS_V1 = (
    [('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), ('sep_conv_3x3', 1), ('skip_connect', 0),
     ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 2)],
    [('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 0), ('max_pool_3x3', 0),
     ('skip_connect', 2), ('skip_connect', 2), ('avg_pool_3x3', 0)])
LITERAL_DARTS_V2 = (
    [('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 1),
     ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)],
    [('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0),
     ('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)])
# AGNAS's authors' genotypes (Sunzh1996/AGNAS, Darts_Search_Space/genotypes.py): cells 0, 3, 6 normal, 2, 5 reduce
AGNAS_CELLS = {
    0: [('sep_conv_3x3', 0), ('dil_conv_3x3', 1), ('dil_conv_5x5', 0), ('skip_connect', 1), ('sep_conv_3x3', 0),
        ('sep_conv_5x5', 3), ('dil_conv_5x5', 0), ('sep_conv_3x3', 3)],
    2: [('max_pool_3x3', 0), ('sep_conv_5x5', 1), ('skip_connect', 0), ('sep_conv_5x5', 1), ('max_pool_3x3', 0),
        ('skip_connect', 1), ('sep_conv_5x5', 0), ('sep_conv_3x3', 1)],
    3: [('skip_connect', 0), ('sep_conv_3x3', 1), ('dil_conv_5x5', 0), ('sep_conv_3x3', 1), ('dil_conv_3x3', 0),
        ('sep_conv_5x5', 1), ('sep_conv_3x3', 1), ('dil_conv_5x5', 4)],
    5: [('skip_connect', 1), ('skip_connect', 0), ('dil_conv_3x3', 1), ('dil_conv_3x3', 0), ('avg_pool_3x3', 0),
        ('max_pool_3x3', 1), ('avg_pool_3x3', 0), ('max_pool_3x3', 1)],
    6: [('skip_connect', 0), ('dil_conv_5x5', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_5x5', 0),
        ('max_pool_3x3', 2), ('sep_conv_5x5', 0), ('sep_conv_3x3', 1)],
}
# EoiNAS's authors' repository (ZLab540/EoiNAS c337faa, EoiNAS_train_semantic/genotypes.py): `GNAS`
LITERAL_EOINAS_GNAS = (
    [('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 2), ('skip_connect', 1),
     ('sep_conv_5x5', 3), ('skip_connect', 1), ('dil_conv_5x5', 4)],
    [('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_5x5', 1), ('sep_conv_5x5', 0),
     ('dil_conv_5x5', 3), ('dil_conv_5x5', 2), ('dil_conv_5x5', 3)])


@pytest.mark.parametrize('name, literal', [('DARTS_V1', LITERAL_DARTS_V1), ('DARTS_V2', LITERAL_DARTS_V2),
                                           ('EOINAS_REPO_CANDIDATE', LITERAL_EOINAS_GNAS)])
def test_released_classic_genotypes_are_their_sources_cells(name, literal):
    g = getattr(G, name)
    assert [tuple(p) for p in g.normal] == literal[0] and [tuple(p) for p in g.reduce] == literal[1]
    assert list(g.normal_concat) == list(g.reduce_concat) == [2, 3, 4, 5]
    assert G.DARTS is G.DARTS_V2


def test_released_agnas_genotype_is_the_authors_cells_0_3_6_and_2_5():
    g = G.AGNAS
    assert [[tuple(p) for p in cell] for cell in g.normal] == [AGNAS_CELLS[0], AGNAS_CELLS[3], AGNAS_CELLS[6]]
    assert [[tuple(p) for p in cell] for cell in g.reduce] == [AGNAS_CELLS[2], AGNAS_CELLS[5]]
    assert list(g.normal_concat) == list(g.reduce_concat) == [2, 3, 4, 5]
