"""diagnose.py: Kendall's tau-b by hand, the band of random rankings, Network.restrict_edges (one edge changes,
nothing else; fast == reference), a hand-built supernet whose signal op ranks first with tau 1, every method's
checkpoint, DARTS-PT's derivation rule, and the one-sentence refusals."""
import argparse
import itertools
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import agnas
import datasets
import diagnose
import genotypes
import runs
import train_search
import utils
from model_macro import MacroSupernet
from model_search_fast import Network

TINY = ['--dataset', 'synthetic', '--device', 'cpu', '--workers', '0', '--layers', '3', '--init_channels', '4',
        '--batch_size', '8', '--synthetic_size', '32', '--report_freq', '0']
QUICK = ['--device', 'cpu', '--workers', '0', '--batches', '1', '--no_plots']
LOG = logging.getLogger('test_diagnose')
HERE = os.path.dirname(os.path.abspath(__file__))


def search_run(tmp_path_factory, name, *flags):
    save = str(tmp_path_factory.mktemp(name))
    assert utils.exit_code(train_search.main, TINY + list(flags) + ['--save', save]) == 0
    return save


@pytest.fixture(scope='module')
def darts_run(tmp_path_factory):
    return search_run(tmp_path_factory, 'darts', '--space', 'darts', '--epochs', '1', '--lambda_at', '0')


@pytest.fixture(scope='module')
def eoinas_run(tmp_path_factory):  # on the NOS space; two prunes: 9 of the 11 ops alive on every edge
    return search_run(tmp_path_factory, 'eoinas', '--method', 'eoinas', '--space', 'nos', '--epochs', '2',
                      '--eoi_warmup', '0', '--prune_every', '1')


@pytest.fixture(scope='module')
def agnas_run(tmp_path_factory):
    return search_run(tmp_path_factory, 'agnas', '--method', 'agnas', '--space', 'darts', '--epochs', '1',
                      '--layers', '5')


@pytest.fixture(scope='module')
def gdas_run(tmp_path_factory):
    return search_run(tmp_path_factory, 'gdas', '--method', 'gdas', '--epochs', '1')


NB201 = ['--space', 'nb201', '--batch_size', '4', '--synthetic_size', '8', '--epochs', '1']


@pytest.fixture(scope='module')
def nb201_run(tmp_path_factory):
    return search_run(tmp_path_factory, 'nb201', '--method', 'darts', *NB201)


@pytest.fixture(scope='module')
def nb201_agnas_run(tmp_path_factory):
    return search_run(tmp_path_factory, 'nb201a', '--method', 'agnas', *NB201)


@pytest.fixture(scope='module')
def chain_run(tmp_path_factory):
    save = str(tmp_path_factory.mktemp('chain'))
    argv = ['--dataset', 'synthetic', '--device', 'cpu', '--workers', '0', '--space', 'proxyless', '--width_mult',
            '0.125', '--batch_size', '8', '--synthetic_size', '16', '--report_freq', '0', '--method', 'agnas',
            '--epochs', '1', '--save', save]
    assert utils.exit_code(train_search.main, argv) == 0
    return save


def diagnose_run(capsys, *args):
    assert utils.exit_code(diagnose.main, list(args) + QUICK) == 0, capsys.readouterr().err
    with open(os.path.join(args[0], 'diagnose.json')) as f:
        return json.load(f)


def one_thread_run(capsys, *args):
    """diagnose_run on one intra-op thread, as each torchrun worker of the tests runs (OMP_NUM_THREADS=1):
    the CPU convolutions split their sums over input channels by the thread count, so a loss's last bits
    depend on it, and only runs on as many threads are bitwise comparable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return diagnose_run(capsys, *args)
    finally:
        torch.set_num_threads(threads)


def fails_with(capsys, args, *words):
    assert utils.exit_code(diagnose.main, list(args)) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1, err
    for w in words:
        assert w in err, (w, err)


# ---------------------------------------------------------------------------------------------------------
# Kendall's tau-b and the random band, against hand computations


def test_tau_b_by_hand():
    assert diagnose.kendall_tau_b([1, 2, 3, 4], [10, 20, 30, 40]) == 1
    assert diagnose.kendall_tau_b([1, 2, 3, 4], [4, 3, 2, 1]) == -1
    # pairs of [1,2,2,3] / [1,3,2,2]: (0,1) (0,2) (0,3) concordant, (1,3) discordant, (1,2) tied in x, (2,3)
    # tied in y: (3 - 1) / sqrt((6 - 1) (6 - 1)) = 0.4
    assert diagnose.kendall_tau_b([1, 2, 2, 3], [1, 3, 2, 2]) == pytest.approx(0.4)
    # [1,1,2] / [1,2,2]: one concordant pair, one tie in each: 1 / sqrt(2 * 2)
    assert diagnose.kendall_tau_b([1, 1, 2], [1, 2, 2]) == pytest.approx(0.5)
    # a pair tied in both counts in both: (0 - 5) / sqrt(5 * 5)
    assert diagnose.kendall_tau_b([1, 1, 2, 3], [5, 5, 1, 0]) == pytest.approx(-1)
    # [3,1,2] / [1,2,3]: (0,1) D, (0,2) D, (1,2) C: (1 - 2) / 3
    assert diagnose.kendall_tau_b([3, 1, 2], [1, 2, 3]) == pytest.approx(-1 / 3)
    assert diagnose.kendall_tau_b([1, 1, 1], [1, 2, 3]) is None
    assert diagnose.kendall_tau_b([5], [1]) is None


def test_random_band_exact_and_simulated():
    # permutations of 4 by inversions: 1 3 5 6 5 3 1 (of 24)
    assert diagnose.inversion_distribution(4) * 24 == pytest.approx([1, 3, 5, 6, 5, 3, 1])
    # 3 ops: tau -1, -1/3, 1/3, 1 with probabilities 1, 2, 2, 1 (of 6); the central half is [-1/3, 1/3]
    band = diagnose.random_tau_band([3], level=0.5)
    assert (band['low'], band['high'], band['method']) == (pytest.approx(-1 / 3), pytest.approx(1 / 3), 'exact')
    assert diagnose.random_tau_band([3], level=0.95)['low'] == pytest.approx(-1)
    # the mean of two 2-op edges: -1, 0, 1 with 1/4, 1/2, 1/4: its central 40% is {0}
    band = diagnose.random_tau_band([2, 2], level=0.4)
    assert (band['low'], band['high']) == (pytest.approx(0), pytest.approx(0))
    # different sizes: seeded draws, against the quantiles of the enumerated distribution
    taus = []
    for p2, p3 in itertools.product(itertools.permutations(range(2)), itertools.permutations(range(3))):
        taus.append((diagnose.kendall_tau_b(p2, range(2)) + diagnose.kendall_tau_b(p3, range(3))) / 2)
    band = diagnose.random_tau_band([2, 3], level=0.5)
    assert band['method'].endswith('seeded draws')
    assert (band['low'], band['high']) == (pytest.approx(np.quantile(taus, 0.25), abs=0.2),
                                           pytest.approx(np.quantile(taus, 0.75), abs=0.2))
    assert diagnose.random_tau_band([1])['low'] is None


def test_density_silverman_by_hand():
    """EoiNAS Fig. 5's KDE: Gaussian kernels of bandwidth h = 0.9 min(sd, IQR / 1.34) n^(-1/5) (Silverman).
    For the values 0 and 1: sd 0.7071, IQR 0.5 (numpy's linear percentiles 0.25 and 0.75), so h = 0.9 * 0.5 / 1.34
    * 2^(-1/5); at 0 the density is (1 + exp(-1 / (2 h^2))) / (2 h sqrt(2 pi))."""
    h = 0.9 * (0.5 / 1.34) * 2 ** -0.2
    assert h == pytest.approx(0.292349, rel=1e-5)
    expected = (1 + np.exp(-1 / (2 * h * h))) / (2 * h * np.sqrt(2 * np.pi))
    assert diagnose.density([0., 1.], [0.])[0] == pytest.approx(expected)
    grid = np.linspace(-3, 4, 7001)
    assert diagnose.density([0., 1., .2], grid).sum() * (grid[1] - grid[0]) == pytest.approx(1, abs=1e-4)


def test_edge_records_and_summary_by_hand():
    """Per edge: tau-b of importance against accuracy and against lower loss, the top-1 match and its chance
    (ties at the top counted), the margin; per cell type and over all: the mean tau over the edges where it is
    defined, and the band of random rankings of the sizes that were measured (an op that could not run is not
    ranked)."""
    ops = ['a', 'b', 'c', 'd', 'e']
    search = argparse.Namespace(model=argparse.Namespace(ops=ops))
    # importance order a < c < d < b; accuracy a 50, b 70, c 70, d 40: pairs ab C, ac C, ad D, bc tied in
    # accuracy, bd C, cd D: (3 - 2) / sqrt(6 * 5); by lower loss 4 C, 2 D: 1/3
    one = diagnose.edge_record(search, diagnose.Edge('normal:0', 'normal', [0], 0, '0->2', [0, 1, 2, 3],
                                                     [.1, .4, .2, .3], [50., 70., 70., 40.], [1., .5, .6, 1.2]))
    assert one['tau'] == pytest.approx(1 / 30 ** .5) and one['tau_loss'] == pytest.approx(1 / 3)
    assert (one['top_importance'], one['top_accuracy'], one['match'], one['match_chance']) == ('b', 'b', True, .5)
    assert one['margin'] == pytest.approx(.1)
    # e could not run (None): ranked over a, c, d, b, which agree fully
    two = diagnose.edge_record(search, diagnose.Edge('normal:1', 'normal', [0], 1, '1->2', [0, 4, 1, 2, 3],
                                                     [.5, .1, .2, .3, .05], [60., None, 30., 40., 20.],
                                                     [.1, None, .9, .5, 1.5]))
    assert (two['tau'], two['tau_loss'], two['match'], two['match_chance']) == (1, 1, True, .25)
    flat = diagnose.edge_record(search, diagnose.Edge('normal:2', 'normal', [0], 2, '0->3', [0, 1], [.6, .4],
                                                      [50., 50.], [1., 2.]))
    assert flat['tau'] is None and flat['match'] and flat['match_chance'] == 1
    three = diagnose.edge_record(search, diagnose.Edge('reduce:0', 'reduce', [1], 0, '0->2', [0, 1, 2],
                                                       [.2, .3, .5], [80., 60., 40.], [.2, .4, .6]))
    assert (three['tau'], three['top_importance'], three['top_accuracy'], three['match']) == (-1, 'c', 'a', False)
    summary = diagnose.summarise([one, two, flat, three])
    normal, reduce, every = summary['normal'], summary['reduce'], summary['all']
    assert normal['edges'] == 2 and normal['mean_tau'] == pytest.approx((1 / 30 ** .5 + 1) / 2)
    # by lower loss: over every edge where it is defined, the flat one too (1 / 3, 1, 1), with the band of 4, 4, 2
    assert normal['edges_loss'] == 3 and normal['mean_tau_loss'] == pytest.approx((1 / 3 + 1 + 1) / 3)
    assert normal['random_band_loss']['method'].endswith('seeded draws')
    assert (normal['top1_match'], normal['top1_chance']) == (1, pytest.approx((.5 + .25) / 2))

    def tau(p):   # the band of two 4-op edges, enumerated: (concordant - discordant) / 6 over 24 x 24 rankings
        return sum((p[i] < p[j]) - (p[i] > p[j]) for i in range(4) for j in range(i + 1, 4)) / 6
    perms = list(itertools.permutations(range(4)))
    means = sorted((tau(p) + tau(q)) / 2 for p in perms for q in perms)
    # the smallest mean whose cumulative share reaches 2.5%, and the one reaching 97.5%: the 15th and 562nd of 576
    assert normal['random_band'] == {'low': pytest.approx(means[14]), 'high': pytest.approx(means[561]),
                                     'method': 'exact'}
    assert (reduce['edges'], reduce['mean_tau'], reduce['top1_match']) == (1, -1, 0)
    assert reduce['top1_chance'] == pytest.approx(1 / 3)
    assert every['edges'] == 3 and every['mean_tau'] == pytest.approx((1 / 30 ** .5 + 1 - 1) / 3)
    assert every['random_band']['method'].endswith('seeded draws')   # 4, 4 and 3 ops
    assert every['top1_chance'] == pytest.approx((.5 + .25 + 1 / 3) / 3)
    assert list(diagnose.summarise([one, two])) == ['normal']   # one cell type: no 'all'
    only_loss = diagnose.summarise([flat])['normal']   # no accuracy ranking defined: the loss's alone
    assert (only_loss['edges'], only_loss['mean_tau'], only_loss['top1_match']) == (0, None, None)
    assert (only_loss['edges_loss'], only_loss['mean_tau_loss']) == (1, 1)
    assert only_loss['random_band_loss'] == {'low': -1, 'high': 1, 'method': 'exact'}   # 2 ops: -1 or 1


# ---------------------------------------------------------------------------------------------------------
# Network.restrict_edges


def edge_outputs(model, x, edges=None):
    """Every MixedOp's output (features) per (cell, row) in one forward, under `edges` if given."""
    out, hooks = {}, []

    def keep(key):
        def hook(module, inputs, output):
            out[key] = (inputs[0], output[0])
        return hook

    for i, cell in enumerate(model.cells):
        for r, edge in enumerate(model.cell_edges(cell)):
            hooks.append(edge.register_forward_hook(keep((i, r))))
    try:
        with torch.no_grad():
            if edges is None:
                logits = model(x)
            else:
                with model.restrict_edges(edges):
                    logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return logits, out


@pytest.mark.parametrize('space', ['darts', 'nos'])
def test_discretising_an_edge_changes_only_that_edge(space):
    torch.manual_seed(0)
    model = Network(4, 10, 3, space=space).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    n = len(model.ops)
    cell, row, op = 1, 4, model.ops.index('sep_conv_3x3')   # row 4: 2->3 (into node 3)
    logits, before = edge_outputs(model, x)
    restricted, after = edge_outputs(model, x, {(cell, row): ([op], diagnose.one_hot(op, n))})
    edge = model.cell_edges(model.cells[cell])[row]
    assert torch.allclose(after[(cell, row)][1], edge._ops[op](after[(cell, row)][0]))  # weight 1 on the op alone
    assert not torch.allclose(before[(cell, row)][1], after[(cell, row)][1])
    # every edge that does not read the changed node computes what it did: cell 0, and in cell 1 the edges
    # into nodes 2 and 3 (rows 0-4; NOS: also node 2's second tier, row 14)
    unchanged = [(0, r) for r in range(len(model.alive_normal))] + [(1, r) for r in range(5) if r != row]
    unchanged += [(1, 14)] if space == 'nos' else []
    for key in unchanged:
        assert torch.equal(before[key][1], after[key][1]), key
    assert not torch.allclose(logits, restricted)
    _, again = edge_outputs(model, x)  # the block ends: the edge is as trained again
    assert torch.equal(again[(cell, row)][1], before[(cell, row)][1])


@pytest.mark.parametrize('space', ['darts', 'nos'])
def test_restricted_fast_path_equals_reference(space):
    torch.manual_seed(0)
    ref = Network(4, 10, 3, space=space).double().eval()
    fast = Network(4, 10, 3, space=space, fast=True).double().eval()
    fast.load_plain(ref)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    n = len(ref.ops)
    for edges in ({(0, 1): ([3], diagnose.one_hot(3, n)), (2, 1): ([3], diagnose.one_hot(3, n))},  # a row, both cells
                  {(1, 3): ([o for o in range(n) if o != 2], None)},                             # op 2 removed
                  {(0, 1): ([], None)}):                                                         # the edge removed
        with torch.no_grad(), ref.restrict_edges(edges):
            a = ref(x)
        with torch.no_grad(), fast.restrict_edges(edges):
            b = fast(x)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        assert not torch.allclose(a, ref(x))


def test_restrict_edges_refuses_what_does_not_exist():
    model = Network(4, 10, 3, space='darts')
    for edges in ({(3, 0): ([1], None)}, {(0, 14): ([1], None)}, {(0, 0): ([8], None)}, {(0, 0): ([1], [1.])}):
        with pytest.raises(ValueError), model.restrict_edges(edges):
            pass


# ---------------------------------------------------------------------------------------------------------
# A hand-built supernet: one op carries the signal


def test_signal_op_ranks_first_with_tau_one():
    """NOS cells over four convolutions, every op's weights zero except dil_conv_3x3 on the edges 1->2' and
    2'->2 of every cell, which A also favours; a nearest-class-mean classifier reads the signal. Keeping
    dil_conv_3x3 on one of those edges keeps the signal, keeping any other op zeroes it (a constant output):
    dil_conv_3x3 ranks first and, the other ops tied in both rankings, tau is 1. On an edge whose ops all
    output zero nothing can be ranked."""
    torch.manual_seed(0)
    ops = ['sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5']
    signal, rows = 2, [1, 14]
    model = Network(4, 10, 3, space='nos', ops=ops).double().eval()
    with torch.no_grad():
        for cell in model.cells:
            for r, edge in enumerate(model.cell_edges(cell)):
                for o, op in enumerate(edge._ops):
                    if not (r in rows and o == signal):
                        for p in op.parameters():
                            p.zero_()
        for a in model.arch_parameters():
            a.zero_()
            a[rows, signal] = 8.
        data = datasets.SyntheticImages(32, size=16, seed=0)
        x, y = data.data.double(), data.targets
        seen = {}
        hook = model.classifier.register_forward_hook(lambda m, i, o: seen.update(f=i[0]))
        model(x)
        hook.remove()
        means = torch.stack([seen['f'][y == c].mean(0) for c in range(10)])
        model.classifier.weight.copy_(means)
        model.classifier.bias.copy_(-0.5 * means.pow(2).sum(1))
    search = diagnose.Search('.', argparse.Namespace(space='nos', method='darts'), model, None,
                             dict(zip(model.cell_types, model.arch_weights())), model.genotype(), torch.float64)
    evaluate = diagnose.Evaluator(search, lambda: [(x, y)])
    edges = diagnose.parse_edges(search, 'normal:1,reduce:14,normal:0')
    diagnose.measure(search, evaluate, edges, False, LOG)
    for e in edges[:2]:
        record = diagnose.edge_record(search, e)
        assert record['top_importance'] == record['top_accuracy'] == 'dil_conv_3x3'
        assert record['tau'] == 1 and record['match']
        assert record['accuracy'][signal] > max(a for o, a in enumerate(record['accuracy']) if o != signal)
    flat = diagnose.edge_record(search, edges[2])
    assert len(set(flat['accuracy'])) == 1 and flat['tau'] is None
    # what is evaluated: each op kept alone at weight 1 (DARTS-PT's projection; Network.restrict_edges is tested
    # above to compute exactly that), then each alive op removed, the others at their trained weights
    seen = []
    edge = diagnose.Edge('normal:1', 'normal', [0], 1, '1->2', [0, 1, 2, 3], [0.] * 4)
    diagnose.measure(search, lambda r: seen.append(r) or (0., 0.), [edge], True, LOG)
    assert seen == [{(0, 1): ([o], [1. if k == o else 0. for k in range(4)])} for o in range(4)] + \
        [{(0, 1): ([k for k in range(4) if k != o], None)} for o in range(4)]


# ---------------------------------------------------------------------------------------------------------
# Every method's checkpoint


def test_darts_checkpoint(darts_run, capsys):
    result = diagnose_run(capsys, darts_run, '--edges', 'normal:1,reduce:0->2')
    search = diagnose.load_search(darts_run, torch.device('cpu'))
    normal = next(e for e in result['edges'] if e['edge'] == 'normal:1')
    assert normal['ops'] == genotypes.DARTS_PRIMITIVES and normal['cells'] == [0]
    assert normal['importance'] == pytest.approx(search.importance['normal'][1].tolist())
    assert [e['edge'] for e in result['edges']] == ['normal:1', 'reduce:0']
    assert result['derived']['genotype'] == json.loads(genotypes.to_json(search.genotype))
    assert result['derived']['drop'] == pytest.approx(result['supernet']['accuracy'] - result['derived']['accuracy'])
    assert result['cost']['evaluations'] == 2 * 8 + 2 and result['settings']['rest'] == 'softmax'
    with open(os.path.join(darts_run, 'diagnose.csv')) as f:
        assert len(f.read().strip().splitlines()) == 1 + 2 * 8
    density = diagnose_run(capsys, darts_run, '--edges', 'none')   # EoiNAS Fig. 5's values alone
    values = search.importance['normal'].flatten()
    assert density['spread']['normal']['values'] == 112 and 'edges' not in density
    assert density['spread']['normal']['std'] == pytest.approx(values.std())


def test_variants_replace_one_gene(darts_run, nb201_run, capsys):
    """EoiNAS Fig. 1: the derived genotype once per op on one gene (its edge's importance beside each)."""
    diagnose_run(capsys, darts_run, '--edges', 'none', '--variants', 'normal:3')
    search = diagnose.load_search(darts_run, torch.device('cpu'))
    with open(os.path.join(darts_run, 'variants', 'variants.json')) as f:
        listed = json.load(f)
    op, source = search.genotype.normal[3]
    row = 2 + source   # gene 3 is node 1's second input: rows 2, 3, 4 are its edges
    assert listed['edge'] == f'normal:{row}' and len(listed['variants']) == 7   # every op but none
    for v in listed['variants']:
        genotype = genotypes.load(genotype_file=v['genotype_file'])
        assert genotype.normal[3] == (v['op'], source) and v['selected'] == (v['op'] == op)
        assert genotype.normal[:3] == search.genotype.normal[:3] and genotype.reduce == search.genotype.reduce
        assert v['importance'] == pytest.approx(search.importance['normal'][row][genotypes.DARTS_PRIMITIVES.index(v['op'])])
    fails_with(capsys, [darts_run, '--variants', 'normal:8'] + QUICK, 'no gene', '0 to 7')
    fails_with(capsys, [nb201_run, '--variants', 'normal:0'] + QUICK, 'classic DARTS cell')


def test_eoinas_checkpoint_with_pruned_ops(eoinas_run, capsys):
    search = diagnose.load_search(eoinas_run, torch.device('cpu'))
    alive = search.model.alive_normal[14].tolist()
    assert sum(alive) == 9
    result = diagnose_run(capsys, eoinas_run, '--edges', "normal:2'->2")   # NOS's second tier, by its label
    edge = result['edges'][0]
    assert edge['edge'] == 'normal:14' and edge['ops'] == [o for o, a in zip(genotypes.PRIMITIVES, alive) if a]
    assert edge['importance'] == pytest.approx([search.importance['normal'][14][o] for o in range(11) if alive[o]])
    assert None not in edge['accuracy']
    pruned = genotypes.PRIMITIVES[alive.index(False)]
    fails_with(capsys, [eoinas_run, '--edges', 'normal:14', '--only_ops', pruned] + QUICK, pruned, 'pruned')


def test_agnas_checkpoint(agnas_run, capsys):
    result = diagnose_run(capsys, agnas_run, '--edges', 'cell2:1')
    search = diagnose.load_search(agnas_run, torch.device('cpu'))
    assert result['settings']['rest'] == 'gates' and result['edges'][0]['cells'] == [2]
    assert result['edges'][0]['importance'] == pytest.approx(search.importance['cell 2'][1].tolist())
    fails_with(capsys, [agnas_run, '--rest', 'argmax'] + QUICK, '--rest', 'gates')
    ckpt = runs.load_checkpoint(agnas_run)   # AGNAS over NOS (ours) cannot keep one op alone: refused
    ckpt['args']['space'] = 'nos'
    nos = os.path.join(os.path.dirname(agnas_run), 'agnas-nos')
    runs.save_checkpoint(ckpt, os.path.join(nos, 'checkpoint.pt'))
    fails_with(capsys, [nos] + QUICK, 'over NOS', 'skip_connect')


def test_gdas_checkpoint(gdas_run, capsys):
    """GDAS's weights only ran one op per edge: the other edges take their strongest op alone by default."""
    result = diagnose_run(capsys, gdas_run, '--edges', 'reduce:3')
    search = diagnose.load_search(gdas_run, torch.device('cpu'))
    assert result['method'] == 'gdas' and result['settings']['rest'] == 'argmax'
    assert result['edges'][0]['importance'] == pytest.approx(search.importance['reduce'][3].tolist())
    assert diagnose_run(capsys, gdas_run, '--edges', 'reduce:3', '--rest', 'softmax')['edges'][0]['accuracy'] != [None] * 8


def test_edges_name_cell_types_cells_and_rows(darts_run, agnas_run):
    darts_search = diagnose.load_search(darts_run, torch.device('cpu'))
    every = diagnose.parse_edges(darts_search, 'all')
    assert [e.name for e in every] == [f'{t}:{r}' for t in ('normal', 'reduce') for r in range(14)]
    assert every[14].cells == [1, 2] and every[14].group == 'reduce'
    one = diagnose.parse_edges(darts_search, 'cell2:3')   # DARTS's row in one cell only, its type's importance
    assert (one[0].cells, one[0].importance) == ([2], darts_search.importance['reduce'][3].tolist())
    agnas_search = diagnose.load_search(agnas_run, torch.device('cpu'))   # 5 cells, reductions 1 and 3
    every = diagnose.parse_edges(agnas_search, 'all')
    assert len(every) == 5 * 14 and every[14].name == 'cell1:0'
    assert [e.name for e in diagnose.parse_edges(agnas_search, 'normal:2')] == ['cell0:2', 'cell2:2', 'cell4:2']


def test_nb201_checkpoints(nb201_run, nb201_agnas_run, capsys, monkeypatch):
    """NAS-Bench-201: one matrix for every cell (AGNAS: the mean over the cells, which it derives from);
    --derive accuracy writes the architecture string and looks both genotypes up in the benchmark."""
    looked_up = []

    class FakeBenchmark:
        def __init__(self, path):
            assert path == 'bench.pth'

        def lookup(self, arch):
            looked_up.append(arch)
            return {'index': 7, **{k: 50. for k, _, _ in diagnose.nb201.ACCURACIES}}

    monkeypatch.setattr(diagnose.nb201, 'Benchmark', FakeBenchmark)
    ckpt = runs.load_checkpoint(nb201_run)   # the search's own --benchmark, as a search with one stores it
    ckpt['args']['benchmark'] = 'bench.pth'
    nb201_run = os.path.join(os.path.dirname(nb201_run), 'nb201-benchmark')
    runs.save_checkpoint(ckpt, os.path.join(nb201_run, 'checkpoint.pt'))
    result = diagnose_run(capsys, nb201_run, '--derive', 'accuracy')
    assert [e['edge'] for e in result['edges']] == [f'normal:{r}' for r in range(6)]
    assert result['edges'][2]['cells'] == [0, 1, 2] and result['edges'][2]['label'] == '1->2'
    genotype = genotypes.load(genotype_file=os.path.join(nb201_run, 'genotype_accuracy.json'))
    assert isinstance(genotype, genotypes.NB201Genotype)
    assert looked_up == [result['derived']['genotype']['nb201'], genotype.arch]
    assert result['derive_accuracy']['benchmark']['index'] == 7
    assert result['cost']['evaluations'] == 6 * 5 * 2 + 3
    result = diagnose_run(capsys, nb201_agnas_run, '--edges', 'normal:1', '--benchmark', 'bench.pth')
    search = diagnose.load_search(nb201_agnas_run, torch.device('cpu'))
    assert result['edges'][0]['importance'] == pytest.approx(search.importance['mean'][1].tolist())
    assert looked_up[-1] == search.genotype.arch and result['derived']['benchmark']['index'] == 7   # --benchmark


def test_chain_checkpoint(chain_run, capsys):
    """AGNAS's macro search: an edge is a layer of the chain, ranked over its own candidates."""
    result = diagnose_run(capsys, chain_run, '--edges', 'layer3,layer0')
    assert [e['edge'] for e in result['edges']] == ['layer3', 'layer0']
    assert result['edges'][0]['ops'][-1] == 'skip' and 'skip' not in result['edges'][1]['ops']
    fails_with(capsys, [chain_run, '--edges', 'layer21'] + QUICK, 'no layer21', '0 to 20')


def test_restricted_chain_layer_keeps_its_gate():
    torch.manual_seed(0)
    sup = MacroSupernet(10, layout='cifar', width_mult=0.125).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    layer, k = sup.layers[3], 2
    seen = {}
    hook = layer.register_forward_hook(lambda m, i, o: seen.update(x=i[0], out=o))
    with torch.no_grad(), sup.restrict_layers({3: ([k], None)}):
        sup(x)
    hook.remove()
    h = seen['x']
    block = layer.blocks[k](h)
    pooled = torch.zeros(2, len(layer.candidates), layer.C, dtype=torch.float64)
    pooled[:, k] = block.mean((2, 3))
    torch.testing.assert_close(seen['out'], layer.attention(pooled)[:, k, :, None, None] * block)
    assert layer.kept is None   # the block ends


# ---------------------------------------------------------------------------------------------------------
# --derive accuracy (DARTS-PT's perturbation rule)


def test_accuracy_derivation_picks_the_costliest_removal(darts_run):
    """Hand-made removal accuracies: on each edge, removing op 7 - (row % 4) costs the most; the edges of
    each node are ranked by that cost (rows 1, 2, 5, ...) as DARTS's rule ranks edges by their best op."""
    search = diagnose.load_search(darts_run, torch.device('cpu'))
    edges = diagnose.parse_edges(search, 'all', keep_single=True)
    for e in edges:
        e.removed = [(50., 1.)] * 8
        e.removed[7 - e.row % 4] = (50. - 1 - e.row, 1.)   # later rows cost more
    genotype, cost = diagnose.accuracy_genotype(search, edges, (60., 1.))
    assert cost['normal'][3][4] == pytest.approx(10. + 1 + 3)
    expected = []
    for node, rows in enumerate([[0, 1], [2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12, 13]]):
        top = sorted(rows, key=lambda r: -r)[:2]
        expected += [(genotypes.DARTS_PRIMITIVES[7 - r % 4], r - rows[0]) for r in top]
    assert [tuple(p) for p in genotype.normal] == expected
    assert [tuple(p) for p in genotype.reduce] == expected


def removal_costs(monkeypatch, cost):
    """Evaluations answered without running the supernet: the supernet 60%, a candidate kept alone 50%, and the
    supernet without op o on row r of cell (layer) i 60% - cost(i, r, o) (loss 1 + the same, so that the rule's
    loss tie-break agrees). Returns the count of evaluations per kind."""
    counts = {'removal': 0, 'other': 0}

    def fake(self, restriction):
        self.count += 1
        kept = [(key, ops) for key, (ops, weights) in restriction.items() if weights is None and ops]
        if len(kept) != len(restriction) or not restriction:   # the supernet, a keep, or a genotype inside it
            counts['other'] += 1
            return (60., 1.) if not restriction else (50., 2.)
        counts['removal'] += 1
        (i, r), ops = kept[0]
        missing = [o for o, a in enumerate(diagnose.alive_rows(self.search, i)[r]) if a and o not in ops]
        assert len(missing) == 1 and all(set(v) == set(ops) for _, v in kept)   # one op, in every cell of the edge
        c = cost(i, r, missing[0])
        return 60. - c, 1. + c

    monkeypatch.setattr(diagnose.Evaluator, '__call__', fake)
    return counts


def darts_pick(costliest):
    """DARTS's rule typed out: per node, the two edges whose costliest op costs most (later rows cost more
    below), each with that op; `costliest(row)` names the op."""
    out = []
    for rows in ([0, 1], [2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12, 13]):
        out += [(costliest(r), r - rows[0]) for r in sorted(rows, reverse=True)[:2]]
    return out


@pytest.mark.parametrize('which', ['darts', 'agnas', 'chain'])
def test_derive_accuracy_writes_the_genotype(which, request, capsys, monkeypatch):
    """--derive accuracy end to end on the classic cell (DARTS), the staged cell (AGNAS, each stage from its own
    cell's costs) and the chain (its argmax per layer), with removal accuracies made up by hand: the genotype
    file holds the costliest op of each edge, chosen by the method's own rule, and loads as a genotype."""
    run = request.getfixturevalue(f'{which}_run')
    prims = genotypes.DARTS_PRIMITIVES
    if which == 'chain':
        def cost(i, r, o):   # a distinct cost per candidate; the layer's costliest available one wins
            return 1. + (3 * o + i) % 7
    else:
        def cost(i, r, o):   # op 1 + (i + r) % 7 (never none) costs 1 + r, the others 0.5
            return 1. + r if o == 1 + (i + r) % 7 else 0.5
    counts = removal_costs(monkeypatch, cost)
    assert utils.exit_code(diagnose.main, [run, '--derive', 'accuracy'] + QUICK) == 0, capsys.readouterr().err
    path = os.path.join(run, 'genotype_accuracy.json')
    out = capsys.readouterr().out
    assert f'next: python train_cifar.py --genotype_file {path}' in out
    with open(os.path.join(run, 'diagnose.json')) as f:
        result = json.load(f)
    search = diagnose.load_search(run, torch.device('cpu'))
    if which == 'chain':
        genotype = genotypes.load(genotype_file=path)
        from model_macro import CANDIDATES
        expected = []
        for i, available in enumerate(search.model.available.tolist()):
            best = max((o for o in range(len(CANDIDATES)) if available[o]), key=lambda o: cost(i, 0, o))
            expected.append(CANDIDATES[best])
        assert list(genotype.layers) == expected
        alive = int(search.model.available.sum())
    else:
        genotype = genotypes.load(genotype_file=path)
        if which == 'darts':   # one cost matrix per cell type: cell 0's (normal) and cell 1's (reduce)
            assert [tuple(p) for p in genotype.normal] == darts_pick(lambda r: prims[1 + r % 7])
            assert [tuple(p) for p in genotype.reduce] == darts_pick(lambda r: prims[1 + (1 + r) % 7])
            alive = 2 * 14 * 8
        else:   # 5 cells, reductions 1 and 3: the stages' first normal cells are 0, 2 and 4
            assert isinstance(genotype, genotypes.StagedGenotype)
            for cell, i in zip(genotype.normal + genotype.reduce, [0, 2, 4, 1, 3]):
                assert [tuple(p) for p in cell] == darts_pick(lambda r, i=i: prims[1 + (i + r) % 7]), i
            alive = 5 * 14 * 8
    assert result['derive_accuracy']['genotype'] == json.loads(genotypes.to_json(genotype))
    # every candidate kept alone, every alive op removed, the supernet, the two genotypes inside it (announced)
    assert counts['removal'] == alive and result['cost']['evaluations'] == 2 * alive + 3
    assert f'{2 * alive + 3} evaluations of' in out


def test_derive_accuracy_needs_every_edge(darts_run, capsys):
    fails_with(capsys, [darts_run, '--derive', 'accuracy', '--edges', 'normal'] + QUICK, '--edges')


# ---------------------------------------------------------------------------------------------------------
# Evaluation details and refusals


def test_finetune_and_batch_norm_restore_the_supernet(darts_run, capsys):
    search = diagnose.load_search(darts_run, torch.device('cpu'))
    args = diagnose.parse_args([darts_run, '--finetune_steps', '2'] + QUICK)
    batches, finetune, _ = diagnose.load_batches(search, args, torch.device('cpu'))
    assert len(finetune) == 2
    state = {k: v.clone() for k, v in search.model.state_dict().items()}
    keep = {(0, 1): ([4], diagnose.one_hot(4, 8))}
    plain = diagnose.Evaluator(search, batches)(keep)
    tuned = diagnose.Evaluator(search, batches, finetune, 0.1)(keep)
    batch_bn = diagnose.Evaluator(search, batches, bn='batch')(keep)
    assert tuned[1] != plain[1] and batch_bn[1] != plain[1]
    for k, v in search.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert diagnose.Evaluator(search, batches)(keep) == plain


def test_refusals(darts_run, tmp_path, capsys):
    fails_with(capsys, [str(tmp_path)] + QUICK, 'not a search folder')
    other = tmp_path / 'cifar'
    runs.save_checkpoint({'script': 'train_cifar.py', 'epoch': 1}, str(other / 'checkpoint.pt'))
    fails_with(capsys, [str(other)] + QUICK, 'train_cifar.py', 'not of a search')
    fails_with(capsys, [darts_run, '--edges', 'normal:14'] + QUICK, 'no edge normal:14', '0 to 13')
    fails_with(capsys, [darts_run, '--edges', 'cell7:1'] + QUICK, 'no cell7', '0 to 2')
    fails_with(capsys, [darts_run, '--edges', 'edge3'] + QUICK, 'names no edge')
    fails_with(capsys, [darts_run, '--edges', 'normal:9->9'] + QUICK, 'no edge normal:9->9')
    fails_with(capsys, [darts_run, '--only_ops', 'conv_7x7'] + QUICK, 'conv_7x7', 'not an op')
    fails_with(capsys, [darts_run, '--bn', 'frozen'] + QUICK, '--bn')
    fails_with(capsys, [darts_run] + QUICK + ['--batches', '0'], '--batches')


def test_agnas_gated_edge_keeps_its_gate():
    """AGNAS's keep-one: the edge outputs its kept op times the gate its attention module gives when the
    pruned ops output zero (zero descriptors, as for `none`). The fast path's restricted supernet equals the
    reference supernet with that edge computed by hand."""
    torch.manual_seed(0)
    ref = agnas.build_network(4, 10, 5, space='darts').double().eval()
    fast = agnas.build_network(4, 10, 5, space='darts', fast=True).double().eval()
    fast.load_plain(ref)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    o = ref.ops.index('sep_conv_3x3')
    edge = ref.cells[0]._ops[1]

    def kept_alone(h, weights=None):
        out = edge._ops[o](h)
        pooled = torch.zeros(h.shape[0], len(ref.ops), edge.C, dtype=h.dtype)
        pooled[:, o] = agnas.gap(out)
        return edge.attention(pooled)[:, o, :, None, None] * out, None, []

    with torch.no_grad(), fast.restrict_edges({(0, 1): ([o], None)}):
        a = fast(x)
    with torch.no_grad(), ref.restrict_edges({(0, 1): ([o], None)}):   # the reference's gated edges: the same
        torch.testing.assert_close(ref(x), a, rtol=1e-9, atol=1e-9)
    edge.forward = kept_alone
    with torch.no_grad():
        b = ref(x)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(a, fast(x))


@pytest.mark.slow  # two processes start torch
def test_torchrun_derives_by_accuracy_as_one_process(nb201_run, capsys):
    """--derive accuracy under torchrun: the removals measured on both ranks are gathered, and rank 0 derives
    and writes the genotype one process on as many threads writes."""
    one = one_thread_run(capsys, nb201_run, '--derive', 'accuracy')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone',
                           'diagnose.py', nb201_run, '--derive', 'accuracy', *QUICK], cwd=HERE, env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(os.path.join(nb201_run, 'diagnose.json')) as f:
        two = json.load(f)
    assert two['cost']['processes'] == 2 and two['cost']['evaluations'] == one['cost']['evaluations']
    assert two['cost']['threads'] == one['cost']['threads'] == 1
    assert two['derive_accuracy'] == one['derive_accuracy'] and two['edges'] == one['edges']


@pytest.mark.slow  # two processes start torch: ~20 s of the suite's budget
def test_torchrun_splits_the_edges_and_gathers_them(darts_run, capsys):
    """Two processes (gloo on the CPU), the edges split between them: rank 0 writes what one process on as
    many threads writes."""
    args = ['--edges', 'normal:1,reduce:3,normal:2']
    one = one_thread_run(capsys, darts_run, *args)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone',
                           'diagnose.py', darts_run, *args, *QUICK], cwd=HERE, env=env, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(os.path.join(darts_run, 'diagnose.json')) as f:
        two = json.load(f)
    assert two['cost']['processes'] == 2 and two['cost']['evaluations'] == one['cost']['evaluations']
    assert two['cost']['threads'] == one['cost']['threads'] == 1
    for key in ('supernet', 'derived', 'summary'):
        assert two[key] == one[key]
    assert two['edges'] == one['edges']
