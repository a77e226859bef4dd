"""model_search.py: the search network's shapes, the heterogeneous node against Eq. 2-9 computed by hand,
the derivation rule of docs/nos.md on hand-made matrices, DARTS's space, and the search-space size."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import genotypes
import utils
from genotypes import DARTS_PRIMITIVES, DARTS_V2, OP_SUBSETS, PRIMITIVES, op_kind
from model_search import (
    Network,
    NOSCell,
    derive_cell,
    derive_darts_cell,
    resolve_ops,
    search_space_size,
)
from operations import calibrate, combine_kernels, dynamic_conv

IDX = {name: i for i, name in enumerate(PRIMITIVES)}


def plain_dwconv(x, kernel):
    """Per-sample, per-channel 'same' convolution, one plain conv2d call each (the paper's F (x) D)."""
    n, c, _, _ = x.shape
    k = kernel.shape[-1]
    out = torch.empty_like(x)
    for i in range(n):
        for j in range(c):
            out[i, j] = F.conv2d(x[i, j][None, None], kernel[i, j][None, None], padding=k // 2)[0, 0]
    return out


@pytest.mark.parametrize('space', ['nos', 'darts'])
def test_shapes_stages_and_alphas(space):
    torch.manual_seed(0)
    model = Network(8, 10, 5, space=space)
    rows, cols = (18, 11) if space == 'nos' else (14, 8)
    assert model.alphas_normal.shape == model.alphas_reduce.shape == (rows, cols)
    assert model.alphas_normal.abs().max() < 1e-2  # 1e-3 * N(0, 1)
    assert model.reduction_layers == [1, 3] and model.stage_layers == [0, 2, 4]
    for size in (32, 16):
        x = torch.randn(2, 3, size, size)
        logits, stages = model.forward_stages(x)
        assert logits.shape == (2, 10)
        # the last cell before each reduction cell and the last cell: 32/16/8 px at 32x32, 4 nodes each
        assert [tuple(s.shape[1:]) for s in stages] == [(32, size, size), (64, size // 2, size // 2),
                                                       (128, size // 4, size // 4)]
    torch.testing.assert_close(model(x), logits)
    # the A matrices are parameters (state_dict carries them) but not weights
    assert set(model.state_dict()) >= {'alphas_normal', 'alphas_reduce'}
    arch = {id(p) for p in model.arch_parameters()}
    assert not arch & {id(p) for p in model.weights()}
    assert len(model.weights()) + 2 == len(list(model.parameters()))


def test_reduction_cell_strides():
    """First-tier edges from the two cell inputs have stride 2 in reduction cells, every other edge 1."""
    torch.manual_seed(0)
    cell = NOSCell(4, 4, 8, 8, 4, reduction=True, reduction_prev=False, ops=PRIMITIVES)
    x = torch.randn(2, 4, 8, 8)
    edge = 0
    for k in range(4):
        for j in range(k + 2):
            f, a, kernels = cell._ops[edge](x if j < 2 else x[:, :, ::2, ::2], torch.full((11,), 1 / 11))
            assert f.shape == (2, 4, 4, 4), (k, j)
            assert a.shape == (2, 4, 4, 4)  # spatial (N,1,4,4) + channel (N,C,1,1)
            assert [d.shape for d in kernels] == [(2, 4, 3, 3), (2, 4, 5, 5)]
            edge += 1
    for second in cell._second:
        assert second(x[:, :, ::2, ::2], torch.full((11,), 1 / 11))[0].shape == (2, 4, 4, 4)
    out = cell(torch.randn(2, 8, 8, 8), torch.randn(2, 8, 8, 8), F.softmax(torch.randn(18, 11), -1))
    assert out.shape == (2, 16, 4, 4)


def test_fused_kernel_sum_equals_per_kernel_dwconv():
    """docs/nos.md: summing the (zero-padded) kernels first and convolving once is the plain formula."""
    torch.manual_seed(0)
    f = torch.randn(2, 3, 7, 7)
    kernels = [torch.randn(2, 3, 3, 3), torch.randn(2, 3, 5, 5), torch.randn(2, 3, 3, 3)]
    plain = sum(plain_dwconv(f, d) for d in kernels)
    torch.testing.assert_close(dynamic_conv(f, combine_kernels(kernels)), plain, atol=1e-5, rtol=1e-5)
    a = torch.rand(2, 1, 7, 7) + torch.rand(2, 3, 1, 1)
    torch.testing.assert_close(calibrate(f, a, kernels), f + f * a + plain, atol=1e-5, rtol=1e-5)


def hand_tier(edges, weights):
    """Eq. 2-5 (or 6-9 with one edge) from each op's own output: edges = [(MixedOp, input, row)]."""
    feats, atts, kernels = 0, 0, []
    for mixed, x, row in edges:
        w = weights[row]
        for o, name in enumerate(PRIMITIVES):
            y = w[o] * mixed._ops[o](x)
            kind = op_kind(name)
            if kind == 'feature':
                feats = feats + y
            elif kind == 'attention':
                atts = atts + y
            else:
                kernels.append(y)
    return feats + feats * atts + sum(plain_dwconv(feats, d) for d in kernels)


@pytest.mark.parametrize('reduction', [False, True], ids=['normal', 'reduce'])
def test_search_node_matches_eq_2_to_9(reduction):
    torch.manual_seed(0)
    C = 4
    cell = NOSCell(4, 4, 6, 6, C, reduction=reduction, reduction_prev=False, ops=PRIMITIVES)
    s0, s1 = torch.randn(2, 6, 8, 8), torch.randn(2, 6, 8, 8)
    weights = F.softmax(torch.randn(18, 11), dim=-1)
    with torch.no_grad():
        out = cell(s0, s1, weights)
        x0, x1 = cell.preprocess0(s0), cell.preprocess1(s1)
        # node 2 (block 0): first tier on edges 0 (from input 0) and 1 (from input 1), second tier row 14
        s2 = hand_tier([(cell._ops[0], x0, 0), (cell._ops[1], x1, 1)], weights)
        node2 = hand_tier([(cell._second[0], s2, 14)], weights)
        torch.testing.assert_close(out[:, :C], node2, atol=1e-5, rtol=1e-4)
        # node 3 (block 1) reads inputs 0, 1 and node 2 on edges 2, 3, 4; its second tier is row 15
        s3 = hand_tier([(cell._ops[2], x0, 2), (cell._ops[3], x1, 3), (cell._ops[4], node2, 4)], weights)
        node3 = hand_tier([(cell._second[1], s3, 15)], weights)
        torch.testing.assert_close(out[:, C:2 * C], node3, atol=1e-5, rtol=1e-4)


def test_gradients_reach_alphas_and_weights_through_attention_transfer():
    torch.manual_seed(0)
    model = Network(8, 10, 5)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    teacher_stages = [torch.randn(2, 5, 32, 32), torch.randn(2, 7, 16, 16), torch.randn(2, 9, 8, 8)]
    logits, stages = model.forward_stages(x)
    at = utils.attention_transfer_loss(stages, teacher_stages)
    at.backward(retain_graph=True)
    # L_AT alone moves A (both cells feed the stages) and the weights before the last stage
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in model.arch_parameters())
    assert model.stem[0].weight.grad.abs().sum() > 0
    model.zero_grad()
    (F.cross_entropy(logits, y) + 1000 * at).backward()
    assert all(a.grad.abs().sum() > 0 for a in model.arch_parameters())
    assert all(p.grad is not None for p in model.weights())


# ---------------------------------------------------------------------------------------------------------
# Derivation (docs/nos.md)


def matrix(entries, base=0.01, ops=PRIMITIVES, rows=18):
    """A hand-made weight matrix: `base` everywhere, then {(row, op name): value}."""
    w = np.full((rows, len(ops)), base)
    for (row, name), v in entries.items():
        w[row, list(ops).index(name)] = v
    return w


def test_derive_first_tier_needs_a_feature_op():
    # block 0: the two strongest ops are attention (edge 0) and dynamic (edge 1): not allowed together
    w = matrix({(0, 'spatial_attention'): 0.5, (1, 'dynamic_conv_3x3'): 0.4, (0, 'sep_conv_3x3'): 0.05,
                (1, 'max_pool_3x3'): 0.3, (14, 'channel_attention'): 0.6})
    blocks = derive_cell(w)
    assert blocks[0] == (('spatial_attention', 0), ('max_pool_3x3', 1), 'channel_attention')
    # the same with the feature op on the attention's side: 0.4 + 0.35 beats 0.5 + 0.05
    w = matrix({(0, 'spatial_attention'): 0.5, (1, 'dynamic_conv_3x3'): 0.4, (0, 'sep_conv_3x3'): 0.35})
    assert derive_cell(w)[0][:2] == (('sep_conv_3x3', 0), ('dynamic_conv_3x3', 1))


def test_derive_uses_two_different_predecessors():
    # block 1 (edges 2, 3, 4 from nodes 0, 1, 2): node 1's edge holds the two strongest ops
    w = matrix({(3, 'sep_conv_5x5'): 0.6, (3, 'dil_conv_3x3'): 0.5, (2, 'skip_connect'): 0.2,
                (4, 'dynamic_conv_5x5'): 0.3, (15, 'dynamic_conv_5x5'): 0.9})
    assert derive_cell(w)[1] == (('sep_conv_5x5', 1), ('dynamic_conv_5x5', 2), 'dynamic_conv_5x5')


def test_derive_ties_break_by_op_index_then_input_index():
    # all equal: lowest op index on the two lowest inputs, in every block
    blocks = derive_cell(np.full((18, 11), 1 / 11))
    assert blocks == [(('sep_conv_3x3', 0), ('sep_conv_3x3', 1), 'sep_conv_3x3')] * 4
    # block 0: two ops of equal weight on edge 0 -> the lower op index
    w = matrix({(0, 'max_pool_3x3'): 0.5, (0, 'dil_conv_3x3'): 0.5, (1, 'skip_connect'): 0.25,
                (14, 'spatial_attention'): 0.5, (14, 'sep_conv_5x5'): 0.5})
    assert derive_cell(w)[0] == (('dil_conv_3x3', 0), ('skip_connect', 1), 'sep_conv_5x5')
    # block 1: sep_conv on node 0 pairs equally well with skip on node 1 or on node 2 -> the lower input
    w = matrix({(2, 'sep_conv_3x3'): 0.5, (3, 'skip_connect'): 0.25, (4, 'skip_connect'): 0.25})
    assert derive_cell(w)[1][:2] == (('sep_conv_3x3', 0), ('skip_connect', 1))
    # block 2: all four pairings of two ops on nodes 0 and 3 tie -> the lower op index on both
    w = matrix({(5, 'avg_pool_3x3'): 0.5, (5, 'sep_conv_5x5'): 0.5,
                (8, 'avg_pool_3x3'): 0.25, (8, 'sep_conv_5x5'): 0.25})
    assert derive_cell(w)[2][:2] == (('sep_conv_5x5', 0), ('sep_conv_5x5', 3))


def test_derive_is_optimal_on_random_matrices():
    """Against every admissible candidate: the chosen pair scores highest, and the result validates."""
    rng = np.random.default_rng(0)
    feature = np.array([op_kind(o) == 'feature' for o in PRIMITIVES])
    for _ in range(20):
        w = F.softmax(torch.from_numpy(rng.normal(size=(18, 11)) * 3), dim=-1).numpy()
        blocks = derive_cell(w)
        genotypes.validate(genotypes.Genotype(blocks, [2, 3, 4, 5], blocks, [2, 3, 4, 5]))
        offset = 0
        for k, ((oi, i), (oj, j), os_) in enumerate(blocks):
            rows = w[offset:offset + k + 2]
            assert i < j
            score = rows[i, IDX[oi]] + rows[j, IDX[oj]]
            best = max((rows[a][:, None] + rows[b][None, :] - 9 * np.outer(~feature, ~feature)).max()
                       for a, b in itertools.combinations(range(k + 2), 2))
            assert score == pytest.approx(best, abs=1e-12)
            assert w[14 + k, IDX[os_]] == w[14 + k].max()
            offset += k + 2


def test_derive_op_subset_uses_its_columns():
    ops = OP_SUBSETS['feature+dynamic']
    w = matrix({(0, 'dynamic_conv_5x5'): 0.9, (1, 'avg_pool_3x3'): 0.5, (14, 'dynamic_conv_3x3'): 0.7},
               ops=ops)
    assert derive_cell(w, ops)[0] == (('dynamic_conv_5x5', 0), ('avg_pool_3x3', 1), 'dynamic_conv_3x3')
    with pytest.raises(ValueError, match='shape'):
        derive_cell(np.zeros((18, 11)), ops)


def test_derive_darts_cell_rebuilds_darts_v2_and_ignores_none():
    """Weights that put each of DARTS_V2's pairs on its edge (strongest first) derive DARTS_V2 back."""
    for cell in (DARTS_V2.normal, DARTS_V2.reduce):
        entries, start = {}, 0
        for k in range(4):
            for rank, (op, j) in enumerate(cell[2 * k:2 * k + 2]):
                entries[(start + j, op)] = 0.6 - 0.1 * rank
                entries[(start + j, 'none')] = 0.05
            for j in range(k + 2):  # 'none' is strongest on the unused edges: DARTS ignores it
                entries.setdefault((start + j, 'none'), 0.9)
            start += k + 2
        w = matrix(entries, ops=DARTS_PRIMITIVES, rows=14)
        assert derive_darts_cell(w) == list(cell)
    # ties: equal edges keep the lower input, equal ops the lower op index
    assert derive_darts_cell(np.full((14, 8), 0.125))[:2] == [('max_pool_3x3', 0), ('max_pool_3x3', 1)]


def test_networks_derive_valid_genotypes():
    torch.manual_seed(0)
    nos = Network(8, 10, 3)
    g = genotypes.validate(nos.genotype())
    assert not genotypes.is_classic(g.normal) and g.normal_concat == [2, 3, 4, 5]
    darts = Network(8, 10, 3, space='darts')
    g = genotypes.validate(darts.genotype())
    assert genotypes.is_classic(g.normal) and len(g.reduce) == 8
    assert all(op != 'none' for op, _ in g.normal + g.reduce)


# ---------------------------------------------------------------------------------------------------------
# DARTS's space, op subsets, search-space size


def test_darts_space_weight_count_matches_darts():
    """DARTS logs 'param size = 1.930618MB' for its CIFAR-10 search network (A not counted)."""
    model = Network(16, 10, 8, space='darts')
    assert utils.count_params(model) == 1_930_618
    assert sum(p.numel() for p in model.weights()) == 1_930_618


@pytest.mark.parametrize('subset', list(OP_SUBSETS))
def test_op_subsets_build_and_derive_within_the_subset(subset):
    torch.manual_seed(0)
    model = Network(8, 10, 3, ops=subset)
    ops = OP_SUBSETS[subset]
    assert model.ops == ops and model.alphas_normal.shape == (18, len(ops))
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    g = model.genotype()
    used = {op for b in g.normal + g.reduce for op in (b[0][0], b[1][0], b[2])}
    assert used <= set(ops)


def test_resolve_ops_rejects_bad_sets():
    with pytest.raises(ValueError, match='feature\\+attention'):
        resolve_ops('nos', 'attention')
    with pytest.raises(ValueError, match='order'):
        resolve_ops('nos', ['skip_connect', 'sep_conv_3x3'])
    with pytest.raises(ValueError, match='feature op'):
        resolve_ops('nos', ['spatial_attention', 'dynamic_conv_3x3'])
    with pytest.raises(ValueError, match='nos, darts'):
        resolve_ops('enas')
    assert resolve_ops('darts') == DARTS_PRIMITIVES


def test_search_space_size():
    size = search_space_size()
    assert size['paper'] == 180 * 11 ** 12 and f'{size["paper"]:.1e}' == '5.6e+14'
    assert size['exact'] == 180 * (105 * 11) ** 4 and f'{size["exact"]:.1e}' == '3.2e+14'
    darts = search_space_size(DARTS_PRIMITIVES, 'darts')
    assert darts['paper'] == darts['exact'] == 180 * 7 ** 8 and f'{darts["exact"]:.1e}' == '1.0e+09'
    assert search_space_size(11) == size
    assert search_space_size(OP_SUBSETS['feature']) == {'paper': 180 * 7 ** 12, 'exact': 180 * 7 ** 12}
    assert search_space_size(OP_SUBSETS['feature+attention'])['exact'] == 180 * ((81 - 4) * 9) ** 4
    assert Network(8, 10, 3).search_space_size() == size


def test_search_space_size_counts_what_the_rule_admits():
    """Brute force on a 2-block cell over 3 ops: enumerate every derivable cell."""
    ops = ['sep_conv_3x3', 'spatial_attention', 'dynamic_conv_3x3']
    per_block = []
    for k in range(2):
        choices = [((a, i), (b, j), s) for i, j in itertools.combinations(range(k + 2), 2)
                   for a in ops for b in ops for s in ops
                   if 'feature' in (op_kind(a), op_kind(b))]
        per_block.append(choices)
    cells = set(itertools.product(*per_block))
    assert len(cells) == search_space_size(ops, steps=2)['exact'] == 1 * 3 * (9 - 4) ** 2 * 3 ** 2
    assert search_space_size(ops, steps=2)['paper'] == 3 * 3 ** 6


def test_new_copies_alphas_not_identity():
    torch.manual_seed(0)
    model = Network(8, 10, 3, ops='feature+attention')
    with torch.no_grad():
        model.alphas_normal.add_(1.)
    copy = model.new()
    assert copy.ops == model.ops and copy.space == model.space
    for a, b in zip(copy.arch_parameters(), model.arch_parameters()):
        assert a is not b and torch.equal(a, b)
    assert [p.shape for p in copy.weights()] == [p.shape for p in model.weights()]


@pytest.mark.parametrize('space', ['darts', 'nos'])
def test_edge_weights_are_the_softmax_of_each_row_of_a(space):
    """Eq. 11: w = softmax over the ops of each row of A. Rows log(1), log(2), ...: w = (1, 2, ...) / sum."""
    torch.manual_seed(0)
    model = Network(4, 10, 3, space=space)
    n = len(model.ops)
    literal = torch.arange(1., n + 1) / (n * (n + 1) / 2)
    with torch.no_grad():
        model.alphas_normal.copy_(torch.log(torch.arange(1., n + 1)).expand_as(model.alphas_normal))
        model.alphas_reduce.copy_(torch.log(torch.arange(n, 0., -1)).expand_as(model.alphas_reduce))
    w_normal, w_reduce = model.edge_weights()
    torch.testing.assert_close(w_normal, literal.expand_as(w_normal))
    torch.testing.assert_close(w_reduce, literal.flip(0).expand_as(w_reduce))
    a_normal, _ = model.arch_weights()
    np.testing.assert_allclose(a_normal, literal.expand_as(w_normal).numpy(), rtol=1e-6)
