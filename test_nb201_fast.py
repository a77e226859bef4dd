"""NAS-Bench-201 on the fast path (model_search_fast.NB201FastCell, agnas.NB201FastGatedEdges) computes the
reference cells' search (model_search.NB201Cell) in float64: the loss, every weight and architecture gradient
and the BatchNorm statistics of one batch, with --track_running_stats on and off; pruned (edge, op) pairs not
computed; the same A, importance and genotype after a few darts, EoiNAS (a prune half-way) and AGNAS steps.
Tiny networks: 3 cells (one per stage) at C 4 on 8 x 8 inputs."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import agnas
import darts
import datasets
import train_search
import utils
from model_search import NB201Cell
from model_search_fast import NB201FastCell, Network
from test_fast_search import backward_each, eoinas_steps

C, CLASSES, LAYERS = 4, 10, 3


def pair(seed=0, track_running_stats=True, method='darts'):
    """A reference NB201 network and a fast one holding the same weights and A (float64)."""
    torch.manual_seed(seed)
    kw = {'space': 'nb201', 'track_running_stats': track_running_stats}
    if method == 'agnas':
        plain = agnas.build_network(C, CLASSES, LAYERS, **kw).double()
        fast = agnas.build_network(C, CLASSES, LAYERS, fast=True, **kw).double()
    else:
        plain = Network(C, CLASSES, LAYERS, **kw).double()
        fast = Network(C, CLASSES, LAYERS, fast=True, **kw).double()
        with torch.no_grad():
            plain.alphas_normal.normal_()  # far from uniform, so that every coefficient matters
    fast.load_plain(plain)
    return plain, fast


def batches(n, seed, size=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(CLASSES, (size,), generator=g))
            for _ in range(n)]


def assert_same_gradients_and_statistics(plain, fast):
    """Each gradient to 1e-9 of its own size, or 1e-12: the convs' biases, which the BatchNorm after them
    cancels, have gradients that are zero up to round-off on both paths."""
    def grad(t):  # None for a buffer; zero for the weights of a pruned op, which have no gradient
        if not t.requires_grad:
            return None
        return torch.zeros_like(t) if t.grad is None else t.grad

    expected = fast.plain_tensors(plain, grad)
    assert set(expected) == {n for n, _ in fast.named_parameters()}  # every fast parameter has its counterpart
    for name, p in fast.named_parameters():
        torch.testing.assert_close(grad(p), expected[name], rtol=1e-9, atol=1e-12, msg=name)
    buffers = fast.plain_tensors(plain)
    assert any('bn_mean' in n for n in buffers) == plain._track_running_stats
    for name, b in fast.named_buffers():
        if name in buffers:
            torch.testing.assert_close(b, buffers[name], rtol=1e-12, atol=1e-15, msg=name)


@pytest.mark.parametrize('track_running_stats', [True, False])
def test_loss_every_gradient_and_the_statistics_match_the_reference(track_running_stats):
    plain, fast = pair(track_running_stats=track_running_stats)
    assert all(isinstance(c, NB201FastCell) for c in fast.cells) and isinstance(plain.cells[0], NB201Cell)
    (x, y), = batches(1, 1, 2)
    losses = backward_each((plain, fast), x, y)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=0)
    assert_same_gradients_and_statistics(plain, fast)  # weights, A, the cells' BN statistics
    assert fast.alphas_normal.grad.abs().sum() > 0
    plain.eval(), fast.eval()  # running statistics (track on) or the batch's (off) alike
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-10, atol=1e-12)


class ConvChannels(TorchDispatchMode):
    """Sums the output channels of the 2-d convolutions that run."""

    def __init__(self):
        super().__init__()
        self.channels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == 'convolution' and args[1].dim() == 4:  # not the contractions
            self.channels += args[1].shape[0]
        return func(*args, **(kwargs or {}))


def test_pruned_pairs_are_not_computed_and_weigh_nothing():
    """EoiNAS prunes edge by edge: a conv runs over exactly the edges where it is alive (its convolutions'
    output channels count them), dead pairs get no gradient, and everything equals the pruned reference. The
    mask has edges down to one op, an edge whose only op is `none`, a conv dead on every edge of a group."""
    plain, fast = pair()
    ops = plain.ops
    alive = torch.tensor([[1, 1, 0, 1, 0],    # 1<-0
                          [0, 0, 1, 0, 0],    # 2<-0: nor_conv_1x1 alone
                          [1, 0, 0, 0, 0],    # 2<-1: none alone
                          [0, 1, 0, 1, 1],    # 3<-0
                          [0, 0, 0, 0, 1],    # 3<-1: the pool alone (no conv from node 1)
                          [1, 0, 1, 0, 0]],   # 3<-2
                         dtype=torch.bool)
    plain.set_alive(alive)
    fast.set_alive(alive)
    (x, y), = batches(1, 2, 2)
    weights = fast.prepare_weights(fast.cell_weights()[0], False)  # the FastWeights every cell takes
    alive_convs = int(alive[:, [ops.index('nor_conv_1x1'), ops.index('nor_conv_3x3')]].sum())
    fast.eval()  # (so that these forwards leave the running statistics alone)
    for cell in fast.cells:  # each cell alone: its convolutions' output channels
        c = cell.groups[0].C
        with ConvChannels() as counted, torch.no_grad():
            cell(torch.randn(2, c, 4, 4, dtype=torch.float64), weights)
        assert counted.channels == alive_convs * c
    fast.train()
    out = fast(x)
    expected = plain(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    F.cross_entropy(out, y).backward()
    F.cross_entropy(expected, y).backward()
    assert_same_gradients_and_statistics(plain, fast)
    for cell in fast.cells:
        w1 = cell.groups[0].weight['nor_conv_1x1']  # node 0's group: the 1x1 conv is alive on edge 2<-0 only
        assert w1.grad[:cell.groups[0].C].abs().sum() == 0 and w1.grad[cell.groups[0].C:2 * cell.groups[0].C].abs().sum() > 0
        assert cell.groups[1].weight['nor_conv_3x3'].grad is None  # dead on both edges from node 1


def test_darts_steps_give_the_same_architecture():
    """Eight first-order darts steps, then one second-order A step (DARTS's unrolled step, which builds and
    runs a copy of the network: `new()` keeps the fast path): the same A and genotype."""
    plain, fast = pair()
    data = batches(3, 3)
    start = plain.alphas_normal.detach().clone()
    for model in (plain, fast):
        optimizer = torch.optim.SGD(model.weights(), 0.025, momentum=0.9, nesterov=True, weight_decay=5e-4)
        architect = darts.Architect(model, momentum=0.9, weight_decay=5e-4, arch_learning_rate=3e-3,
                                    arch_weight_decay=1e-3)
        for step in range(8):
            (x, y), (xv, yv) = data[step % 3], data[(step + 1) % 3]
            darts.search_step(model, architect, optimizer, x, y, xv, yv, eta=0.025)
        unrolled = darts.Architect(model, momentum=0.9, weight_decay=5e-4, arch_learning_rate=3e-3,
                                   arch_weight_decay=1e-3, unrolled=True)
        assert unrolled.unrolled_model.fast == model.fast
        (x, y), (xv, yv) = data[0], data[1]
        unrolled.step(x, y, None, xv, yv, None, 0.025, optimizer)
    torch.testing.assert_close(fast.alphas_normal, plain.alphas_normal, rtol=1e-8, atol=1e-10)
    assert (plain.alphas_normal.detach() - start).abs().max() > 0.01  # A really moved
    assert fast.genotype() == plain.genotype()


def test_eoinas_steps_with_a_prune_half_way_give_the_same_indicator_and_genotype():
    """EoiNAS on NB201: Gumbel samples (one seed, the same noise), weight and A steps, its statistics, and a
    prune edge by edge after step 3 (down to one op on some edges): the same A, I and genotype."""
    args = train_search.parse_args(['--method', 'eoinas', '--space', 'nb201', '--layers', str(LAYERS),
                                    '--init_channels', str(C), '--skip_dropout', '0', '--eoi_warmup', '0'])
    plain, fast = pair()
    data = batches(3, 4)
    alive = torch.rand(6, 5, generator=torch.Generator().manual_seed(6)) > 0.5
    alive[torch.arange(6), torch.tensor([3, 2, 1, 4, 3, 1])] = True  # at least one op per edge
    methods = eoinas_steps((plain, fast), args, data, (alive,), weight_decay=5e-4)
    torch.testing.assert_close(fast.alphas_normal, plain.alphas_normal, rtol=1e-8, atol=1e-10)
    assert torch.equal(fast.last_sample, plain.last_sample)  # the same samples drawn
    torch.testing.assert_close(methods[1].current_importance(), methods[0].current_importance())
    assert methods[1].genotype() == methods[0].genotype()


def test_skip_dropout_drops_each_edge_on_its_own():
    """EoiNAS's skip dropout: off in evaluation on both paths; p = 1 drops every skip alike; with 0 < p < 1
    the three edges from node 0 are three entries, each with its own mask."""
    plain, fast = pair()
    (x, _), = batches(1, 7, 2)
    for model in (plain, fast):
        model.set_skip_dropout(0.5)
        model.eval()
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-10, atol=1e-12)
    for model in (plain, fast):
        model.set_skip_dropout(1.)
        model.train()
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-10, atol=1e-12)
    layouts = fast._fast_plans[False].layouts(None, dropout=True)[0]
    assert [lay.skip_edges for lay in layouts] == [[0, 1, 2], [0, 1], [0]]
    assert all(lay.skip_edges is None for lay in fast._fast_plans[False].layouts(None)[0])


def test_agnas_gated_edges_and_steps_match_the_reference():
    """AGNAS on NB201's fast path: the loss, every weight gradient (the gates' FCs included) and the BN
    statistics of one batch; then a few single-level steps and the end-of-epoch importance pass: the same
    importance (per cell, and the mean over cells that derives the cell) and genotype."""
    args = train_search.parse_args(['--method', 'agnas', '--space', 'nb201', '--layers', str(LAYERS),
                                    '--init_channels', str(C), '--batch_size', '4'])
    plain, fast = pair(method='agnas')
    assert isinstance(fast.cells[0].groups[0], agnas.NB201FastGatedEdges)
    (x, y), = batches(1, 1, 3)
    for model in (plain, fast):
        F.cross_entropy(model(x), y).backward()
    assert_same_gradients_and_statistics(plain, fast)
    data = batches(3, 5)
    val = torch.utils.data.TensorDataset(*batches(1, 9, 6)[0])
    methods = []
    for model in (plain, fast):
        model.zero_grad()
        optimizer = torch.optim.SGD(model.weights(), 0.025, momentum=0.9, weight_decay=5e-4)
        method = agnas.AGNASMethod(model, args)
        for step in range(6):
            x, y = data[step % 3]
            method.step(x, y, None, None, None, 0.025, optimizer)
        out = method.end_epoch(0, datasets.make_loader(val, 4, False, 0), torch.device('cpu'))
        methods.append((method, out))
    (mp, op), (mf, of) = methods
    assert mf.matrix.shape == (LAYERS, 6, 5)
    np.testing.assert_allclose(mf.matrix, mp.matrix, rtol=1e-8, atol=0)
    assert of['cell_genotypes'] == op['cell_genotypes'] and mf.genotype() == mp.genotype()


def test_one_seed_builds_the_same_network_and_the_methods_take_the_fast_path():
    """Same seed, same initial weights on both paths, the same random stream after, the same weight count; the
    fast network's `new()` keeps its path; darts, eoinas and agnas search NB201 on the fast path unless
    --no_fast (and the checkpoint's settings say which layout it holds)."""
    for track in (True, False):
        torch.manual_seed(5)
        plain = Network(C, CLASSES, LAYERS, space='nb201', track_running_stats=track)
        torch.manual_seed(5)
        fast = Network(C, CLASSES, LAYERS, space='nb201', fast=True, track_running_stats=track)
        after = torch.randn(3)
        expected = fast.plain_tensors(plain)
        for name, t in fast.state_dict().items():
            assert torch.equal(t, expected[name]), name
        assert utils.count_params(fast) == utils.count_params(plain)
        copy = fast.new()
        assert copy.fast and isinstance(copy.cells[0], NB201FastCell) and copy.cells[0].groups[0].track == track
    torch.manual_seed(5)
    Network(C, CLASSES, LAYERS, space='nb201')
    assert torch.equal(after, torch.randn(3))
    for method in ('darts', 'eoinas', 'agnas'):
        for flags, is_fast in (([], True), (['--no_fast'], False)):
            args = train_search.parse_args(['--method', method, '--space', 'nb201', '--layers', str(LAYERS),
                                            '--init_channels', str(C)] + flags)
            model = train_search.METHODS[method].build_model(args, CLASSES)
            assert model.fast == is_fast and isinstance(model.cells[0], NB201FastCell) == is_fast
            assert train_search.settings_of(args)['fast'] == is_fast
    with pytest.raises(ValueError, match='NB201Edges'):
        Network(C, CLASSES, LAYERS, space='nb201', method='agnas', mixed_op=agnas.AttentionMixedOp, fast=True,
                fast_edges=agnas.FastGatedEdges)


def test_restricted_edges_equal_the_reference():
    """diagnose.py's restricted edges (Network.restrict_edges) on NB201's fast cells: an edge discretised to
    one op in two cells, an op removed, a whole edge removed; the same output as the reference cells."""
    plain, fast = pair()
    plain.eval(), fast.eval()
    (x, _), = batches(1, 10, 2)
    one_hot = [0., 0., 0., 1., 0.]
    for edges in ({(0, 1): ([3], one_hot), (2, 1): ([3], one_hot)}, {(1, 3): ([0, 1, 3, 4], None)},
                  {(0, 5): ([], None)}):
        with torch.no_grad(), plain.restrict_edges(edges):
            expected = plain(x)
        with torch.no_grad(), fast.restrict_edges(edges):
            out = fast(x)
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12)
        assert not torch.allclose(out, fast(x))
