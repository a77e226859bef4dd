"""AGNAS (agnas.py; docs/agnas.md tests 1-10): gates, the fast GAP path, slicing, Eq. 4-8 as the
paper states them, derivation, stage selection, weight counts, the importance pass, the staged genotype, and
end to end on synthetic data with an exact resume and the one-sentence refusals."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import agnas
import datasets
import genotypes
import runs
import teacher
import train_cifar
import train_search
import utils
import visualize
from genotypes import AGNAS, DARTS_PRIMITIVES, PRIMITIVES, GenotypeError, StagedGenotype
from model import NetworkCIFAR
from model_search import derive_darts_cell, stage_matrices
from operations import dynamic_conv
from test_train_search import die_after

M = len(DARTS_PRIMITIVES)
TINY = ['--method', 'agnas', '--dataset', 'synthetic', '--device', 'cpu', '--workers', '0', '--layers', '5',
        '--init_channels', '4', '--batch_size', '8', '--synthetic_size', '16', '--report_freq', '0']


def edge_and_input(C=4, stride=1, ops=DARTS_PRIMITIVES, seed=0):
    torch.manual_seed(seed)
    edge = agnas.AttentionMixedOp(C, stride, list(ops)).double()
    x = torch.randn(3, C, 8, 8, dtype=torch.float64)
    return edge, x


def gates_of(edge, x):
    """(edge output, gates (N, m, C)) of one forward."""
    seen = []
    handle = edge.attention.register_forward_hook(lambda mod, inp, out: seen.append(out))
    out = edge(x)
    handle.remove()
    return out, seen[0]


def op_outputs(edge, x):
    return [op(x) for op in edge._ops]


# ---------------------------------------------------------------------------------------------------------
# 1-4: the attention module and the edge


def test_gates_are_free_sigmoids_and_zeroed_fcs_give_one_half():
    edge, x = edge_and_input()
    (features, attention, kernels), g = gates_of(edge, x)
    assert g.shape == (3, M, 4) and attention is None and kernels == []
    assert ((g > 0) & (g < 1)).all()
    assert not torch.allclose(g.sum(1), torch.ones(3, 4, dtype=g.dtype))   # no softmax across ops
    with torch.no_grad():
        edge.attention.fc1.weight.zero_()
        edge.attention.fc2.weight.zero_()
    edge.collecting = True
    (features, _, _), g = gates_of(edge, x)
    assert torch.equal(g, torch.full_like(g, 0.5))
    torch.testing.assert_close(features, 0.5 * sum(op_outputs(edge, x)), rtol=1e-12, atol=1e-12)
    assert np.array_equal(edge.mean_gates(), np.full(M, 0.5))


def test_fast_path_equals_the_literal_concatenation():
    """GAP(cat F_k) = cat(GAP F_k): the gates and the output of the edge equal Eq. 4-8 computed on the
    (N, mC, H, W) concatenation (docs/agnas.md, "Efficiency")."""
    edge, x = edge_and_input(stride=2)
    (features, _, _), g = gates_of(edge, x)
    f_con = torch.cat(op_outputs(edge, x), dim=1)                         # (N, mC, H', W')
    att = torch.sigmoid(edge.attention.fc2(F.relu(edge.attention.fc1(f_con.mean((2, 3))))))   # Eq. 4-5
    torch.testing.assert_close(g.reshape(3, -1), att, rtol=0, atol=1e-14)
    weighted = f_con * att[:, :, None, None]                              # Eq. 7
    out = sum(weighted[:, k * 4:(k + 1) * 4] for k in range(M))           # Eq. 8
    torch.testing.assert_close(features, out, rtol=0, atol=1e-12)


class FixedLogits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, h):
        return self.logits.expand(h.shape[0], -1)


@pytest.mark.parametrize('k', [0, 3, M - 1])
def test_each_op_owns_its_own_channel_slice(k):
    edge, x = edge_and_input()
    logits = torch.full((1, M * 4), -10., dtype=torch.float64)
    logits[0, k * 4:(k + 1) * 4] = 10.
    edge.attention.fc2 = FixedLogits(logits)
    edge.collecting = True
    features = edge(x)[0]
    hi, lo = torch.sigmoid(torch.tensor(10., dtype=torch.float64)), torch.sigmoid(torch.tensor(-10., dtype=torch.float64))
    expected = np.full(M, lo.item())
    expected[k] = hi.item()
    np.testing.assert_allclose(edge.mean_gates(), expected, rtol=1e-13, atol=0)
    outs = op_outputs(edge, x)
    torch.testing.assert_close(features, sum((hi if i == k else lo) * o for i, o in enumerate(outs)),
                               rtol=1e-12, atol=1e-12)


def test_paper_equations_4_to_8_give_the_same_output_and_importance():
    """Eq. 4-8 as the paper (§4.1) writes them, restated here in numpy: concatenate the m op outputs on
    channels (F_con), average over h x w (Eq. 4), Atten = sigmoid(W2 ReLU(W1 F_gap)) (Eq. 5), A_k = the sum
    of op k's c activations (Eq. 6, with half-open slices, docs/agnas.md), F~ = F_con (x) Atten (Eq. 7),
    F_out = the element-wise sum of the m c-channel slices of F~ (Eq. 8)."""
    edge, x = edge_and_input()
    edge.collecting = True
    out = edge(x)[0].detach().numpy()
    maps = [o.detach().numpy() for o in op_outputs(edge, x)]
    W1 = edge.attention.fc1.weight.detach().numpy()
    W2 = edge.attention.fc2.weight.detach().numpy()
    b, c = x.shape[0], x.shape[1]

    F_con = np.concatenate(maps, axis=1)                               # b x (m c) x h x w
    h, w = F_con.shape[2:]
    F_gap = F_con.sum(axis=(2, 3)) / (h * w)                           # Eq. 4
    hidden = np.maximum(F_gap @ W1.T, 0.)                              # ReLU(W1 F_gap)
    Atten = 1. / (1. + np.exp(-(hidden @ W2.T)))                       # Eq. 5
    A = np.array([Atten[:, i * c:(i + 1) * c].sum() for i in range(M)])   # Eq. 6, summed over the batch
    F_tilde = F_con * Atten[:, :, None, None]                          # Eq. 7
    F_out = sum(F_tilde[:, i * c:(i + 1) * c] for i in range(M))       # Eq. 8

    np.testing.assert_allclose(out, F_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(edge.mean_gates() * b * c, A, rtol=1e-13, atol=0)   # raw sum = mean x N x C


def test_nos_edge_gates_features_attention_and_kernels():
    """docs/agnas.md: one GateAttention(11, C); descriptors GAP(o(X)), GAP(X' * a(X)), GAP(dwconv(X', D));
    features = sum w o(X), attention = sum w a(X), kernels = w D, with w = g / sum_o g (this repo's
    normalisation, README); the importance is the mean of w, the weights the forward uses, and the raw gates'
    means are kept beside it."""
    edge, x = edge_and_input(ops=PRIMITIVES)
    assert isinstance(edge.attention, agnas.GateAttention) and edge.attention.fc1.in_features == 11 * 4
    (features, attention, kernels), g = gates_of(edge, x)
    outs = op_outputs(edge, x)
    skip = outs[PRIMITIVES.index('skip_connect')]
    kind = [genotypes.op_kind(o) for o in PRIMITIVES]
    desc = [dynamic_conv(skip, o) if k == 'dynamic' else skip * o if k == 'attention' else o
            for o, k in zip(outs, kind)]
    pooled = torch.stack([d.mean((2, 3)) for d in desc], 1)
    torch.testing.assert_close(g, edge.attention(pooled), rtol=0, atol=1e-14)
    gg = (g / g.sum(1, keepdim=True))[:, :, :, None, None]
    assert torch.allclose(gg.sum(1), torch.ones(()).double())  # a convex combination per channel
    edge.collecting = True
    edge(x)
    np.testing.assert_allclose(edge.mean_raw_gates(), g.detach().mean((0, 2)).numpy(), rtol=1e-12)  # raw gates
    np.testing.assert_allclose(edge.mean_gates(), gg.detach().mean((0, 2, 3, 4)).numpy(), rtol=1e-12)  # w
    torch.testing.assert_close(features, sum(gg[:, i] * outs[i] for i in range(11) if kind[i] == 'feature'))
    torch.testing.assert_close(attention, sum(gg[:, i] * outs[i] for i in range(11) if kind[i] == 'attention'))
    assert len(kernels) == 2
    for d, i in zip(kernels, [i for i in range(11) if kind[i] == 'dynamic']):
        torch.testing.assert_close(d, gg[:, i] * outs[i])


@pytest.mark.parametrize('space, ops, convex', [('nos', 'feature', True), ('nos', None, True),
                                                ('darts', None, False)])
def test_the_nos_variant_normalises_its_gates_whatever_the_op_set(space, ops, convex):
    """Over NOS the edge weighs its ops by w = g / sum_o g, also with --ops feature (no attention or dynamic
    op among them); DARTS's space weighs them by the raw gates (Eq. 7-8). Computed here from the gates."""
    torch.manual_seed(0)
    net = agnas.build_network(4, 10, 5, space=space, ops=ops).double()
    edge = net.cells[0]._ops[2]
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    (features, _, _), g = gates_of(edge, x)
    outs = op_outputs(edge, x)
    w = g / g.sum(1, keepdim=True) if convex else g
    kind = [genotypes.op_kind(o) for o in net.ops]
    expected = sum(w[:, i, :, None, None] * outs[i] for i in range(len(outs)) if kind[i] in ('feature', 'none'))
    torch.testing.assert_close(features, expected, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------
# 5-6: derivation and stage selection


def reference_parse(W, steps=4):
    """DARTS's _parse (what the authors' code derives with), restated: per node, its incoming edges ranked
    by their strongest op other than `none`, the first two kept, each with its strongest such op."""
    none = DARTS_PRIMITIVES.index('none')
    gene, start = [], 0
    for i in range(steps):
        rows = W[start:start + i + 2]
        strength = [max(v for k, v in enumerate(row) if k != none) for row in rows]
        for j in sorted(range(i + 2), key=lambda e: -strength[e])[:2]:
            best = max((k for k in range(len(rows[j])) if k != none), key=lambda k: rows[j][k])
            gene.append((DARTS_PRIMITIVES[best], j))
        start += i + 2
    return gene


def test_none_is_never_chosen_and_the_rule_follows_the_reference():
    W = np.full((14, M), 0.5)
    W[:, 0] = 0.99        # none strongest everywhere
    W[:, 4] = 0.6         # sep_conv_3x3 next
    assert all(op == 'sep_conv_3x3' for op, _ in derive_darts_cell(W))
    rng = np.random.default_rng(0)
    for _ in range(50):
        W = rng.uniform(0, 1, (14, M))
        assert derive_darts_cell(W) == reference_parse(W)
    net = agnas.build_network(4, 10, 5)
    cells = rng.uniform(0, 1, (5, 14, M))
    assert net.cell_genotypes(cells) == [reference_parse(c) for c in cells]   # each cell on its own


def test_stage_selection_first_last_mean():
    rng = np.random.default_rng(1)
    imp = rng.uniform(0, 1, (8, 14, M))
    normal, reduce = stage_matrices(imp, 'first')
    assert all(np.array_equal(n, imp[i]) for n, i in zip(normal, (0, 3, 6)))
    assert all(np.array_equal(r, imp[i]) for r, i in zip(reduce, (2, 5)))
    normal, _ = stage_matrices(imp, 'last')
    assert all(np.array_equal(n, imp[i]) for n, i in zip(normal, (1, 4, 7)))
    normal, _ = stage_matrices(imp, 'mean')
    for n, (a, b) in zip(normal, ((0, 1), (3, 4), (6, 7))):
        np.testing.assert_allclose(n, (imp[a] + imp[b]) / 2, rtol=0, atol=1e-15)
    net = agnas.build_network(4, 10, 8)
    g = net.genotype('first', imp)
    assert isinstance(g, StagedGenotype)
    assert g.normal == [reference_parse(imp[i]) for i in (0, 3, 6)]
    assert g.reduce == [reference_parse(imp[i]) for i in (2, 5)]
    assert net.genotype('mean', imp).normal[1] == reference_parse((imp[3] + imp[4]) / 2)
    with pytest.raises(ValueError, match='no normal cell in stage 2'):
        stage_matrices(imp[:4], 'first')


# ---------------------------------------------------------------------------------------------------------
# 7-8: networks and weight counts


def test_agnas_supernet_has_no_alphas_and_ce_reaches_every_attention_fc():
    torch.manual_seed(0)
    net = agnas.build_network(4, 10, 5)
    assert net.arch_parameters() == [] and not hasattr(net, 'alphas_normal')
    assert len(net.weights()) == len(list(net.parameters()))
    assert len(agnas.gated_edges(net)) == 5 * 14
    x, y = torch.randn(4, 3, 16, 16), torch.randint(10, (4,))
    F.cross_entropy(net(x), y).backward()
    fcs = [p for n, p in net.named_parameters() if '.attention.fc' in n]
    assert len(fcs) == 2 * 5 * 14 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in fcs)


def test_full_size_weight_counts():
    """docs/agnas.md: 8 cells, C=16, 10 classes: 5,485,946 weights, of which 3,555,328 in the attention FCs."""
    net = agnas.build_network(16, 10, 8)
    assert utils.count_params(net) == 5_485_946
    assert sum(p.numel() for n, p in net.named_parameters() if '.attention.fc' in n) == 3_555_328


def test_released_genotype_builds_3611998_weights_and_trains_a_step():
    assert genotypes.load('AGNAS') == AGNAS
    assert [genotypes.cell_genotype(AGNAS, i, 20) for i in (0, 5, 7, 12, 14, 19)] == [
        genotypes.cell_genotype(AGNAS, 0, 20)] * 2 + [genotypes.cell_genotype(AGNAS, 7, 20)] * 2 + [
        genotypes.cell_genotype(AGNAS, 14, 20)] * 2
    assert genotypes.cell_genotype(AGNAS, 3, 20).normal == AGNAS.normal[0]
    assert genotypes.cell_genotype(AGNAS, 6, 20).reduce == AGNAS.reduce[0]
    assert genotypes.cell_genotype(AGNAS, 10, 20).normal == AGNAS.normal[1]
    assert genotypes.cell_genotype(AGNAS, 13, 20).reduce == AGNAS.reduce[1]
    assert genotypes.cell_genotype(AGNAS, 16, 20).normal == AGNAS.normal[2]
    torch.manual_seed(0)
    net = NetworkCIFAR(36, 10, 20, True, AGNAS)
    assert utils.count_params(net) == 3_611_998
    net.drop_path_prob = 0.2
    before = net.classifier.weight.detach().clone()
    opt = torch.optim.SGD(net.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    batch = [(torch.randn(2, 3, 32, 32), torch.tensor([1, 7]))]
    loss, _ = utils.train_epoch(net, batch, opt, nn.CrossEntropyLoss(), torch.device('cpu'), aux_weight=0.4,
                                grad_clip=5.)
    assert np.isfinite(loss) and not torch.equal(before, net.classifier.weight)


# ---------------------------------------------------------------------------------------------------------
# 9: the importance pass


def test_importance_pass_runs_in_eval_mode_without_grad_over_every_image():
    torch.manual_seed(0)
    net = agnas.build_network(4, 10, 5)
    data = torch.utils.data.TensorDataset(torch.randn(37, 3, 16, 16), torch.randint(10, (37,)))
    loader = datasets.make_loader(data, 16, False, 0)
    seen = []
    edge = agnas.gated_edges(net)[0]
    edge.register_forward_hook(lambda mod, inp, out: seen.append((mod.training, torch.is_grad_enabled())))
    bn = net.stem[1]
    stats = bn.running_mean.clone()
    net.train()
    out = agnas.importance_pass(net, loader, torch.device('cpu'))
    assert seen == [(False, False)] * 3 and net.training and not edge.collecting
    assert torch.equal(bn.running_mean, stats)                         # eval mode: BN statistics untouched
    assert out['images'] == 37 and all(e._images == 37 for e in agnas.gated_edges(net))
    assert out['importance'].shape == (5, 14, M) and out['importance'].dtype == np.float64
    assert ((out['importance'] > 0) & (out['importance'] < 1)).all()
    # the accumulators restart with each pass: a second pass over the same images gives the same matrix
    assert np.array_equal(agnas.importance_pass(net, loader, torch.device('cpu'))['importance'], out['importance'])


def test_ags_adds_attention_transfer_to_the_single_level_loss():
    torch.manual_seed(0)
    net = agnas.build_network(4, 10, 5)
    t = teacher.PyramidNet(depth=11, alpha=12, num_classes=10, bottleneck=True).eval()
    opt = torch.optim.SGD(net.weights(), 0.025, momentum=0.9)
    method = agnas.AGNASMethod(net, argparse.Namespace(lambda_at=1000., grad_clip=5., stage_cell='first'))
    out = method.step(torch.randn(4, 3, 32, 32), torch.randint(10, (4,)), None, None, t, 0.025, opt)
    assert out['train_at'] > 0 and set(out) == {'train_ce', 'train_at', 'train_correct'}


# ---------------------------------------------------------------------------------------------------------
# The staged genotype form


def test_staged_genotype_json_repr_and_load():
    text = genotypes.to_json(AGNAS)
    assert json.loads(text)['staged'] is True
    assert genotypes.from_json(text) == AGNAS
    assert eval(repr(AGNAS), vars(genotypes)) == AGNAS
    nos = StagedGenotype([genotypes.NOS_EXAMPLE.normal] * 3, [2, 3, 4, 5], [genotypes.NOS_EXAMPLE.reduce] * 2,
                         [2, 3, 4, 5])
    assert genotypes.from_json(genotypes.to_json(nos)) == genotypes.validate(nos)


@pytest.mark.parametrize('change, words', [
    ({'normal': AGNAS.normal[:2]}, ['3 normal cells', 'one per stage', 'got 2']),
    ({'reduce': AGNAS.reduce * 2}, ['2 reduce cells', 'one per reduction', 'got 4']),
    ({'normal': AGNAS.normal[0]}, ['list of 3 cells']),
    ({'normal': [AGNAS.normal[0], [('conv_9x9', 0)] + AGNAS.normal[1][1:], AGNAS.normal[2]]},
     ['normal cell 2 (stage 2) block 0', "unknown op 'conv_9x9'"]),
    ({'reduce': [AGNAS.reduce[0], AGNAS.reduce[1][:6]]}, ['reduce cell 2 (reduction 2)', 'got 6']),
    ({'normal': [AGNAS.normal[0], AGNAS.normal[1], AGNAS.normal[2][:-1] + [('sep_conv_3x3', 6)]]},
     ['normal cell 3 (stage 3) block 3', 'input 6 does not exist']),
])
def test_bad_staged_genotype_names_the_cell_and_the_fault(tmp_path, change, words):
    bad = AGNAS._replace(**change)
    path = tmp_path / 'genotype.json'
    path.write_text(json.dumps({'staged': True, **bad._asdict()}))
    with pytest.raises(GenotypeError) as e:
        genotypes.load(genotype_file=str(path))
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    with pytest.raises(GenotypeError):
        NetworkCIFAR(8, 10, 5, False, bad)


def test_visualize_draws_every_staged_cell():
    dots = visualize.genotype_dots(AGNAS)
    assert list(dots) == ['normal_stage1', 'normal_stage2', 'normal_stage3', 'reduce_1', 'reduce_2']
    assert all(f'digraph {k}' in v for k, v in dots.items())


# ---------------------------------------------------------------------------------------------------------
# 10: end to end


run = utils.exit_code  # (main, argv) -> the exit code the command line would give


def read_log(save):
    with open(os.path.join(save, 'search_log.jsonl')) as f:
        return [json.loads(line) for line in f]


def train_cifar_builds(genotype_file, save, capsys):
    assert run(train_cifar.main, ['--genotype_file', genotype_file, '--dataset', 'synthetic', '--device', 'cpu',
                                  '--workers', '0', '--layers', '5', '--init_channels', '4', '--batch_size', '8',
                                  '--synthetic_size', '16', '--epochs', '1', '--report_freq', '0',
                                  '--save', save]) == 0
    assert 'final test_error=' in capsys.readouterr().out


DARTS_SEARCH = TINY + ['--space', 'darts', '--epochs', '2', '--stage_cell', 'mean']


@pytest.fixture(scope='module')
def darts_search(tmp_path_factory):
    """A 2-epoch AGNAS search on the DARTS space, uninterrupted (also the reference of the resume test)."""
    save = tmp_path_factory.mktemp('agnas') / 'straight'
    assert run(train_search.main, DARTS_SEARCH + ['--save', save]) == 0
    return save


def check_search_outputs(save, space, ops, rows, epochs, stage_cell):
    g = genotypes.load(genotype_file=str(save / 'genotype.json'))
    assert isinstance(g, StagedGenotype)
    log = read_log(save)
    assert [r['epoch'] for r in log] == list(range(1, epochs + 1))
    r = log[-1]
    assert r['method'] == 'agnas' and r['space'] == space and r['primitives'] == ops
    assert list(r['importance']) == [f'cell {i}' for i in range(5)]
    assert np.array(r['importance']['cell 0']).shape == (rows, len(ops))
    assert r['importance_images'] == 8 and r['stages'] == [[0], [2], [4]] and r['reduction_cells'] == [1, 3]
    assert genotypes.from_json(json.dumps(r['genotype'])) == g and len(r['cell_genotypes']) == 5
    assert 'val_acc' in r and 'val_ce' in r
    with open(save / 'log.txt') as f:  # the epoch line shows the importance pass's figures, and no teacher's
        line = next(t for t in f if f'epoch {epochs}: train_ce' in t)
    assert f'val_ce {r["val_ce"]:.4g}  val_acc {r["val_acc"]:.4g}' in line and ' at ' not in line
    assert '_at' not in line
    ckpt = runs.load_checkpoint(str(save / 'checkpoint.pt'))
    assert set(ckpt['method']) == {'importance'} and ckpt['settings']['stage_cell'] == stage_cell
    assert ckpt['args']['learning_rate_min'] == 0.001 and ckpt['args']['lambda_at'] == 0
    # the genotype is the one that the last importance pass derives
    net = agnas.build_network(4, 10, 5, space=space)
    assert genotypes.validate(net.genotype(stage_cell, ckpt['method']['importance'].numpy())) == g


def test_darts_space_search_writes_a_staged_genotype_that_train_cifar_trains(darts_search, tmp_path, capsys):
    check_search_outputs(darts_search, 'darts', DARTS_PRIMITIVES, 14, 2, 'mean')
    train_cifar_builds(darts_search / 'genotype.json', tmp_path / 'eval', capsys)
    visualize.main([str(darts_search), '--out', str(tmp_path / 'plots')])
    assert {'normal_stage1.dot', 'normal_stage2.dot', 'normal_stage3.dot', 'reduce_1.dot',
            'reduce_2.dot'} <= set(os.listdir(tmp_path / 'plots'))


def test_nos_space_search_writes_a_staged_genotype_that_train_cifar_trains(tmp_path, capsys):
    save = tmp_path / 'search'
    assert run(train_search.main, TINY + ['--space', 'nos', '--epochs', '1', '--save', save]) == 0
    check_search_outputs(save, 'nos', PRIMITIVES, 18, 1, 'first')
    train_cifar_builds(save / 'genotype.json', tmp_path / 'eval', capsys)


def test_resume_ends_bit_identical(darts_search, tmp_path, monkeypatch):
    with monkeypatch.context() as m:  # the run dies right after its first checkpoint
        m.setattr(runs, 'save_checkpoint', die_after())
        assert run(train_search.main, DARTS_SEARCH + ['--save', tmp_path]) == 130
    assert runs.load_checkpoint(str(tmp_path / 'checkpoint.pt'))['epoch'] == 1
    assert run(train_search.main, DARTS_SEARCH + ['--save', tmp_path, '--resume']) == 0

    a, b = (runs.load_checkpoint(str(d / 'checkpoint.pt')) for d in (darts_search, tmp_path))
    assert a['epoch'] == b['epoch'] == 2 and a['model'].keys() == b['model'].keys()
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert torch.equal(a['method']['importance'], b['method']['importance'])
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values(), strict=True):
        assert torch.equal(sa['momentum_buffer'], sb['momentum_buffer'])
    assert (darts_search / 'genotype.json').read_text() == (tmp_path / 'genotype.json').read_text()
    la, lb = read_log(darts_search), read_log(tmp_path)
    assert [r['importance'] for r in la] == [r['importance'] for r in lb]


@pytest.mark.parametrize('extra, words', [
    (['--unrolled'], ['--unrolled', '--method agnas', 'no architecture parameters']),
    (['--stage_cell', 'middle'], ["'middle'", 'first, last, mean']),
    (['--layers', '4'], ['--layers 4', 'each of the three stages', 'at least 5']),
])
def test_refused_flags_exit_2_with_one_sentence(tmp_path, capsys, extra, words):
    assert run(train_search.main, TINY + extra + ['--save', tmp_path]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / 'checkpoint.pt').exists()


def test_bench_times_agnas_against_the_darts_method(capsys):
    import bench_search
    bench_search.main(['--device', 'cpu', '--layers', '5', '--init_channels', '4', '--batch_size', '2',
                       '--iters', '1', '--warmup', '0', '--agnas_only'])
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line.rsplit(maxsplit=5) for line in lines[2:]]
    assert [r[0] for r in rows] == ['darts method, 1st order, no AGS', 'agnas step', 'agnas importance pass, 1 batch']
    assert rows[0][-1] == '1.00x' and all(float(r[2]) > 0 for r in rows)


def test_box_sums_give_the_gap_of_a_dynamic_conv_without_it():
    """GAP(dwconv(x, D)) = sum_t D_t B_t / HW (FastGatedEdges' descriptor of a dynamic op), on a hand-made
    input: with x = 1 everywhere, B counts the in-image pixels each tap reads."""
    ones = torch.ones(1, 1, 3, 4, dtype=torch.float64)
    b = agnas.box_sums(ones, 3)
    expected = torch.tensor([[6., 8., 6.], [9., 12., 9.], [6., 8., 6.]], dtype=torch.float64)  # (H-|dy|)(W-|dx|)
    assert torch.equal(b[0, 0], expected)
    torch.manual_seed(0)
    x, d = torch.randn(2, 3, 5, 6, dtype=torch.float64), torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close((d * agnas.box_sums(x, 5)).sum((2, 3)) / 30, agnas.gap(dynamic_conv(x, d)),
                               rtol=1e-12, atol=1e-14)
