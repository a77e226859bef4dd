"""The fast search path (Network(fast=True), issue 11) computes the reference's search: the same loss,
weight gradients, architecture gradients and running statistics on one batch; the same A and genotype after
a few dozen float64 steps; dead ops of an alive mask not computed and weighed 0. Also the counting rule of
bench_search.py on hand-made cases."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import agnas
import bench_search
import darts
import datasets
import genotypes
import model_search_fast
import runs
import train_search
import utils
from model_search import NOSCell
from model_search_fast import FastCell, Network

TINY = {'C': 4, 'num_classes': 10, 'layers': 3}  # three cells: normal, reduction, reduction (stages 8/4/2 px)


class PoolTeacher(nn.Module):
    """A stand-in teacher for AGS: stage outputs at the student's three resolutions, no weights."""

    def forward_stages(self, x):
        return None, [x, F.avg_pool2d(x, 2), F.avg_pool2d(x, 4)]


def pair(space, ops=None, seed=0):
    """A reference network and a fast network holding the same weights and A (float64)."""
    torch.manual_seed(seed)
    plain = Network(TINY['C'], TINY['num_classes'], TINY['layers'], space=space, ops=ops).double()
    fast = Network(TINY['C'], TINY['num_classes'], TINY['layers'], space=space, ops=ops, fast=True).double()
    with torch.no_grad():
        for a in plain.arch_parameters():
            a.normal_()  # far from uniform, so that every coefficient matters
    fast.load_plain(plain)
    return plain, fast


def loss_of(model, x, y, lambda_at):
    logits, stages = model.forward_stages(x)
    loss = F.cross_entropy(logits, y)
    if lambda_at:
        loss = loss + lambda_at * utils.attention_transfer_loss(stages, PoolTeacher().forward_stages(x)[1])
    return loss


def backward_each(models, x, y, loss=None):
    """Each model's loss on (x, y) (cross-entropy, or loss(model)), backpropagated; returns the losses."""
    losses = []
    for model in models:
        value = F.cross_entropy(model(x), y) if loss is None else loss(model)
        value.backward()
        losses.append(value.detach())
    return losses


def assert_same_gradients(plain, fast):
    expected = fast.plain_tensors(plain, lambda t: t.grad)
    names = [n for n, _ in fast.named_parameters()]
    assert set(expected) == set(names)  # every fast parameter has its reference counterpart
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize('space, ops, lambda_at', [('darts', None, 0.), ('nos', None, 0.), ('nos', None, 10.),
                                                   ('nos', 'feature+attention', 10.)])
def test_loss_and_every_gradient_match_the_reference(space, ops, lambda_at):
    plain, fast = pair(space, ops)
    torch.manual_seed(1)
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randint(10, (2,))
    losses = backward_each((plain, fast), x, y, lambda model: loss_of(model, x, y, lambda_at))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=0)
    assert_same_gradients(plain, fast)  # weights and both architecture matrices
    assert fast.alphas_normal.grad.abs().sum() > 0 and fast.alphas_reduce.grad.abs().sum() > 0
    # the BatchNorm running statistics moved the same way (eval mode then gives the same output)
    buffers = fast.plain_tensors(plain)
    for name, b in fast.named_buffers():
        if name in buffers:
            torch.testing.assert_close(b, buffers[name], rtol=1e-12, atol=1e-15, msg=name)
    plain.eval(), fast.eval()
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-10, atol=1e-12)


def test_float32_matches_to_round_off():
    plain, fast = pair('nos')
    plain.float(), fast.float()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('space, steps', [('darts', 20), ('nos', 12)])
def test_float64_search_steps_give_the_same_architecture(space, steps):
    """A few dozen first-order steps (A step + weight step, AGS in NOS) from one seed: the same A and
    genotype. Learning rates of the search's scale: much larger ones (or BatchNorm over a handful of
    values) make any two summation orders drift apart chaotically, the reference against itself too."""
    lambda_at = 10. if space == 'nos' else 0.
    plain, fast = pair(space)
    teacher = PoolTeacher() if lambda_at else None
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(10, (4,), generator=g))
               for _ in range(4)]
    start = plain.alphas_normal.detach().clone()
    for model in (plain, fast):
        optimizer = torch.optim.SGD(model.weights(), 0.025, momentum=0.9, weight_decay=3e-4)
        architect = darts.Architect(model, momentum=0.9, weight_decay=3e-4, arch_learning_rate=3e-3,
                                           arch_weight_decay=1e-3, lambda_at=lambda_at)
        for step in range(steps):
            (x, y), (xv, yv) = batches[step % 4], batches[(step + 1) % 4]
            darts.search_step(model, architect, optimizer, x, y, xv, yv, teacher=teacher, eta=0.025)
    torch.testing.assert_close(fast.alphas_normal, plain.alphas_normal, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(fast.alphas_reduce, plain.alphas_reduce, rtol=1e-8, atol=1e-10)
    assert (plain.alphas_normal.detach() - start).abs().max() > 0.03  # A really moved
    assert fast.genotype() == plain.genotype()
    if space == 'nos':  # the 3x3 transforms' borders on the 5x5 grid stayed exactly zero (no weight there)
        borders = [g.transform('dynamic_conv_3x3') for c in fast.cells for g in c.groups if g.dyn]
        assert borders and all(t[:, [0, -1]].abs().sum() == 0 and t[:, :, [0, -1]].abs().sum() == 0
                               and t[:, 1:-1, 1:-1].abs().sum() > 0 for t in borders)
        # ca2's rows off the centre tap (CA written straight onto the node kernel) stayed exactly zero too
        ca2 = [g.ca2.view(g.E * g.C, g.kernel_size ** 2, -1) for c in fast.cells for g in c.groups if g.has_ca]
        centre = ca2[0].shape[1] // 2
        assert ca2 and all(t[:, :centre].abs().sum() == 0 and t[:, centre + 1:].abs().sum() == 0
                           and t[:, centre].abs().sum() > 0 for t in ca2)
        assert fast.structural_zeros() > 0
        assert utils.count_params(fast) == utils.count_params(plain)


def test_alive_mask_skips_dead_ops_and_equals_the_pruned_reference():
    plain, fast = pair('nos')
    rows, cols = plain.alphas_normal.shape
    ops = plain.ops
    alive = torch.ones(rows, cols, dtype=torch.bool)
    alive[:, ops.index('sep_conv_5x5')] = False                 # dead everywhere: never computed
    alive[:, ops.index('channel_attention')] = False
    alive[:, ops.index('dynamic_conv_3x3')] = False
    alive[3, ops.index('max_pool_3x3')] = False                # dead on one edge: computed, weighed 0
    alive[14:, ops.index('spatial_attention')] = False         # the second tier only
    plain.set_alive(alive, alive)  # pruned as EoiNAS prunes: softmax over the alive ops, the rest not run
    fast.set_alive(alive, alive)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out, expected = fast(x), plain(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)

    out.sum().backward()
    for cell in fast.cells:
        for g, spec in zip(cell.groups, cell.specs):
            assert g.dw1['sep_conv_5x5'].grad is None and g.dw2['sep_conv_5x5'].grad is None  # not computed
            assert g.ca2.grad is None and g.transform('dynamic_conv_3x3', g.x1x1.grad).abs().sum() == 0
            assert g.transform('dynamic_conv_5x5', g.x1x1.grad).abs().sum() > 0
            if spec['tier'] == 'second':
                assert g.sa2.grad is None
            else:
                assert g.sa2.grad is not None
    expected.sum().backward()  # A's gradient: the reference's, through the masked softmax
    torch.testing.assert_close(fast.alphas_normal.grad, plain.alphas_normal.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fast.alphas_reduce.grad, plain.alphas_reduce.grad, rtol=1e-9, atol=1e-12)


def test_second_tier_without_a_feature_op_passes_the_surrogate_node_on():
    """EoiNAS may prune every feature op of a second-tier row (only the first tiers must keep one); the node's
    F is then the surrogate node S_k itself, as in NOSCell, not zero."""
    plain, fast = pair('nos')
    alive = torch.ones_like(plain.alive_normal)
    features = [o for o, name in enumerate(plain.ops) if genotypes.op_kind(name) == 'feature']
    alive[14:, features] = False  # the second tiers keep the attention and dynamic ops
    plain.set_alive(alive, alive)
    fast.set_alive(alive, alive)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out, expected = fast(x), plain(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(fast.alphas_normal.grad, plain.alphas_normal.grad, rtol=1e-9, atol=1e-12)


def eoinas_steps(models, args, batches, alive, weight_decay):
    """Six EoiNAS steps on each model from one seed (the same Gumbel noise), cycling through three batches,
    with the ops of the masks `alive` (set_alive's arguments) pruned after step 3; returns each model's
    EoiNASMethod."""
    from eoinas import EoiNASMethod
    methods = []
    for model in models:
        torch.manual_seed(8)
        optimizer = torch.optim.SGD(model.weights(), 0.025, momentum=0.9, weight_decay=weight_decay)
        method = EoiNASMethod(model, args)
        for step in range(6):
            if step == 3:
                model.set_alive(*alive)
            (x, y), (xv, yv) = batches[step % 3], batches[(step + 1) % 3]
            method.step(x, y, xv, yv, None, 0.025, optimizer)
        methods.append(method)
    return methods


@pytest.mark.parametrize('space', ['darts', 'nos'])
def test_eoinas_steps_match_the_reference(space):
    """EoiNAS on the fast path: Gumbel-softmax samples (one seed, the same noise), its weight and A steps,
    the statistics, and a prune half-way (masked softmax, dead ops skipped) give the reference's A, I and
    genotype in float64."""
    args = train_search.parse_args(['--method', 'eoinas', '--space', space, '--layers', '3', '--init_channels',
                                    '4', '--skip_dropout', '0', '--eoi_warmup', '0'])
    plain, fast = pair(space)
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(10, (4,), generator=g))
               for _ in range(3)]
    alive = torch.ones_like(plain.alive_normal)
    alive[:, 1::2] = False  # every other op pruned after step 3
    methods = eoinas_steps((plain, fast), args, batches, (alive, alive), weight_decay=3e-4)
    torch.testing.assert_close(fast.alphas_normal, plain.alphas_normal, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(fast.alphas_reduce, plain.alphas_reduce, rtol=1e-8, atol=1e-10)
    assert torch.equal(fast.last_sample, plain.last_sample)  # the same samples drawn
    torch.testing.assert_close(methods[1].current_importance(), methods[0].current_importance())
    assert methods[1].genotype() == methods[0].genotype()


def test_skip_dropout_drops_each_edge_on_its_own():
    """EoiNAS's dropout after a stride-1 skip_connect: in the fast path each edge's identity is its own
    entry (the reference's MixedOps draw one mask each). p = 1 drops every edge's skip on both paths alike;
    0 < p < 1 draws different masks for two edges from one source."""
    plain, fast = pair('darts')
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for model in (plain, fast):
        model.set_skip_dropout(0.5)
        model.eval()  # off outside training, as in the reference
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-10, atol=1e-12)
    for model in (plain, fast):
        model.set_skip_dropout(1.)
        model.train()
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-10, atol=1e-12)
    fast.set_skip_dropout(0.)
    assert not torch.allclose(fast(x), plain(x))  # dropout really acted
    assert fast._fast_plans[False].layouts(None, dropout=True)[0][0].identity_edges
    group = fast.cells[0].groups[0]
    stack = F.dropout(model_search_fast._per_edge(torch.ones(1, 2 * 4, 3, 3, dtype=torch.float64), 2, 4), 0.5, True)
    assert group.S * group.K == 8 and not torch.equal(stack[:, :4], stack[:, 4:8])  # two edges of source 0


def test_skip_dropout_gradients_match_the_reference_in_nos():
    """EoiNAS's skip dropout in the NOS space: each edge's identity is its own copy of X, beside the copies
    of X that a merged group's one pointwise conv reads (`_fan` sums all their gradients). With p = 1 (the
    same draw on both paths) the loss and every gradient are the reference's."""
    plain, fast = pair('nos')
    torch.manual_seed(1)
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randint(10, (2,))
    for model in (plain, fast):
        model.set_skip_dropout(1.)
    assert len(fast._fast_plans[False].layouts(None, dropout=True)[0][2].identity_edges) > 1  # a tuple spec
    losses = backward_each((plain, fast), x, y)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=0)
    assert_same_gradients(plain, fast)


def agnas_pair(space, ops=None, seed=0):
    """A reference AGNAS supernet (AttentionMixedOp edges) and a fast one (FastGatedEdges) holding the same
    weights, float64; five cells, the fewest AGNAS searches with."""
    torch.manual_seed(seed)
    plain = agnas.build_network(4, 10, 5, space=space, ops=ops).double()
    fast = agnas.build_network(4, 10, 5, space=space, ops=ops, fast=True).double()
    fast.load_plain(plain)
    return plain, fast


@pytest.mark.parametrize('space, ops', [('darts', None), ('nos', None),
                                       ('nos', ['dil_conv_3x3', 'skip_connect', 'channel_attention'])])
def test_agnas_gated_edges_match_the_reference(space, ops):
    """AGNAS on the fast path: the loss, the gradient of every weight (ops and the gates' FCs) and the
    BatchNorm statistics equal the reference's in float64 (each gradient to 1e-9 of its largest entry:
    the NOS variant normalises its gates, which costs a few more ulps), and so do the gates an importance
    pass collects."""
    plain, fast = agnas_pair(space, ops)
    torch.manual_seed(1)
    x, y = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.randint(10, (3,))
    losses = backward_each((plain, fast), x, y)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=0)
    expected = fast.plain_tensors(plain, lambda t: t.grad)
    assert set(expected) == {n for n, _ in fast.named_parameters()}
    assert any('gate_fc1' in n for n in expected)
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-9 * expected[name].abs().max(),
                                   msg=name)
    buffers = fast.plain_tensors(plain)
    for name, b in fast.named_buffers():
        if name in buffers:
            torch.testing.assert_close(b, buffers[name], rtol=1e-12, atol=1e-15, msg=name)
    loader = [(x, y), (x[:2], y[:2])]
    passes = [agnas.importance_pass(model, loader, torch.device('cpu')) for model in (plain, fast)]
    assert passes[0]['images'] == passes[1]['images'] == 5
    np.testing.assert_allclose(passes[1]['importance'], passes[0]['importance'], rtol=1e-12, atol=0)
    assert passes[1]['importance'].shape == (5, 14 if space == 'darts' else 18, len(fast.ops))
    assert fast.staged_genotype('first', passes[1]['importance']) == plain.staged_genotype('first',
                                                                                           passes[0]['importance'])


@pytest.mark.parametrize('space', ['darts', 'nos'])
def test_agnas_alive_masks_match_the_reference(space):
    """With alive masks (a dead (edge, op) is not computed, reads a zero descriptor and weighs 0; over NOS the
    gates are normalised over the alive ops), the reference AttentionMixedOp and the fast FastGatedEdges give
    the same loss, gradients and importance in float64; dead entries of the importance are exactly 0."""
    plain, fast = agnas_pair(space)
    g = torch.Generator().manual_seed(3)
    skip = plain.ops.index('skip_connect')
    masks = []
    for _ in range(2):
        m = torch.rand(plain.alive_normal.shape, generator=g) > 0.4
        m[:, skip] = True   # over NOS the descriptors need x'
        masks.append(m)
    for model in (plain, fast):
        model.set_alive(*masks)
    calls = []
    edge = plain.cells[0]._ops[0]
    for o, op in enumerate(edge._ops):
        op.register_forward_hook(lambda mod, inp, out, o=o: calls.append(o))
    torch.manual_seed(1)
    x, y = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.randint(10, (3,))
    losses = backward_each((plain, fast), x, y)
    assert sorted(calls) == masks[0][0].nonzero().flatten().tolist()  # the reference skips the dead ops
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=0)
    # a weight of an op that is dead on its edge is never run by the reference: its gradient is zero there
    expected = fast.plain_tensors(plain, lambda t: torch.zeros_like(t) if t.grad is None else t.grad)
    for name, p in fast.named_parameters():
        grad = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(grad, expected[name], rtol=1e-9, atol=1e-9 * expected[name].abs().max(),
                                   msg=name)
    passes = [agnas.importance_pass(model, [(x, y)], torch.device('cpu')) for model in (plain, fast)]
    np.testing.assert_allclose(passes[1]['importance'], passes[0]['importance'], rtol=1e-12, atol=0)
    np.testing.assert_allclose(passes[1]['raw_gates'], passes[0]['raw_gates'], rtol=1e-12, atol=0)
    reduction = [cell.reduction for cell in plain.cells]
    for i, imp in enumerate(passes[0]['importance']):
        dead = ~masks[1 if reduction[i] else 0].numpy()
        assert (imp[dead] == 0).all() and (imp[~dead] > 0).all()
    if space == 'nos':  # a dead skip_connect beside a live attention op: one sentence from both paths
        masks[0][0, skip] = False
        for model in (plain, fast):
            model.set_alive(*masks)
            with pytest.raises(ValueError, match='skip_connect alive on every edge'):
                model(x)


def test_agnas_float32_matches_to_round_off():
    plain, fast = agnas_pair('nos')
    plain.float(), fast.float()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('space', ['darts', 'nos'])
def test_agnas_steps_give_the_same_importance_and_genotype(space):
    """A dozen single-level AGNAS steps (AGNASMethod.step: CE, clip, SGD on every weight) and its
    end-of-epoch importance pass from one seed: the same importance matrices and staged genotype."""
    args = train_search.parse_args(['--method', 'agnas', '--space', space, '--layers', '5', '--init_channels',
                                    '4', '--batch_size', '4'])
    plain, fast = agnas_pair(space)
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(10, (4,), generator=g))
               for _ in range(3)]
    val = torch.utils.data.TensorDataset(torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64),
                                         torch.randint(10, (6,), generator=g))
    methods = []
    for model in (plain, fast):
        optimizer = torch.optim.SGD(model.weights(), 0.025, momentum=0.9, weight_decay=3e-4)
        method = agnas.AGNASMethod(model, args)
        for step in range(12):
            x, y = batches[step % 3]
            method.step(x, y, None, None, None, 0.025, optimizer)
        method.end_epoch(0, datasets.make_loader(val, 4, False, 0), torch.device('cpu'))
        methods.append(method)
    np.testing.assert_allclose(methods[1].matrix, methods[0].matrix, rtol=1e-8, atol=0)
    assert methods[1].genotype() == methods[0].genotype()


def test_train_search_picks_the_path_per_method():
    def build(flags):
        args = train_search.parse_args(['--layers', '5', '--init_channels', '4', '--lambda_at', '0'] + flags)
        return train_search.METHODS[args.method].build_model(args, 10)

    assert build(['--method', 'eoinas']).fast
    assert not build(['--method', 'eoinas', '--space', 'darts', '--gumbel_hard']).fast  # one op per edge
    assert build(['--method', 'agnas', '--space', 'darts']).fast  # agnas.FastGatedEdges
    assert not build(['--method', 'agnas', '--space', 'darts', '--no_fast']).fast
    model = Network(4, 10, 3, space='darts', fast=True)
    model.tau, model.gumbel_hard = 1., True
    with pytest.raises(ValueError, match='reference cells'):
        model(torch.randn(2, 3, 8, 8))


def test_bad_alive_mask_and_reference_mapping_say_what_is_wrong():
    plain, fast = pair('darts')
    with pytest.raises(ValueError, match='14 x 8'):
        fast._fast_plans[False].prepare(F.softmax(fast.alphas_normal, -1), [[True] * 3] * 3)
    with pytest.raises(ValueError, match='reference network'):
        plain.plain_tensors(fast)


def test_fast_flag_builds_fast_cells_and_new_keeps_it():
    model = Network(4, 10, 3, fast=True)
    assert all(isinstance(c, FastCell) for c in model.cells) and model.new().fast
    assert isinstance(Network(4, 10, 3).cells[0], NOSCell)
    # the same weight count as the reference, so logs and tables compare
    for space, ops in (('darts', None), ('nos', None), ('nos', 'feature+dynamic')):
        assert (utils.count_params(Network(4, 10, 4, space=space, ops=ops, fast=True))
                == utils.count_params(Network(4, 10, 4, space=space, ops=ops)))


def test_train_search_uses_the_fast_path_unless_no_fast():
    for flags, cell_cls in (([], FastCell), (['--no_fast'], NOSCell)):
        args = train_search.parse_args(['--layers', '3', '--init_channels', '4', '--lambda_at', '0'] + flags)
        model = darts.DartsMethod.build_model(args, 10)
        assert isinstance(model.cells[0], cell_cls)
        # a checkpoint of one layout cannot resume the other: the settings say which it was
        assert train_search.settings_of(args)['fast'] == (cell_cls is FastCell)


# -- the counting rule (bench_search.py) ----------------------------------------------------------------


def test_count_rule_skips_views_and_kernel_free_ops():
    x = torch.randn(4, 4)

    def fn():
        y = x.view(16).detach()        # a view and a detach: no kernel
        z = torch.empty(3)             # allocation only
        return (y + 1).sum(), z

    ops = bench_search.count_kernel_ops(fn)
    assert dict(ops) == {'add': 1, 'sum': 1}


def test_saved_bytes_counts_each_storage_once():
    a = torch.randn(256, requires_grad=True)
    b = torch.randn(256, requires_grad=True)
    # a * b saves both; a[:128] * a[128:] saves two views of one storage
    assert bench_search.saved_bytes(lambda: a * b) == 2 * 256 * 4
    assert bench_search.saved_bytes(lambda: a[:128] * a[128:]) == 256 * 4


def test_one_seed_builds_the_same_network_on_both_paths():
    for space in ('darts', 'nos'):
        torch.manual_seed(5)
        plain = Network(4, 10, 3, space=space)
        torch.manual_seed(5)
        fast = Network(4, 10, 3, space=space, fast=True)
        expected = fast.plain_tensors(plain)
        for name, t in fast.state_dict().items():
            assert torch.equal(t, expected[name]), name
        after_fast = torch.randn(3)
        torch.manual_seed(5)
        Network(4, 10, 3, space=space)
        assert torch.equal(after_fast, torch.randn(3))  # the random stream after building either is the same


def test_a_checkpoint_resumes_only_with_its_own_layout(tmp_path, capsys, monkeypatch):
    """The fast path stacks the weights by source group: resuming a fast checkpoint with --no_fast (or the
    reverse) is refused in one sentence that names the flag, before any weight is loaded."""
    args = ['--dataset', 'synthetic', '--device', 'cpu', '--workers', '0', '--layers', '3', '--init_channels', '4',
            '--batch_size', '8', '--synthetic_size', '16', '--report_freq', '0', '--space', 'darts', '--lambda_at',
            '0', '--epochs', '2', '--save', str(tmp_path)]
    real = runs.save_checkpoint

    def save_then_stop(state, path):
        real(state, path)
        if state['epoch'] == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(runs, 'save_checkpoint', save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_search.main(args)
    monkeypatch.setattr(runs, 'save_checkpoint', real)
    assert runs.load_checkpoint(str(tmp_path / 'checkpoint.pt'))['settings']['fast'] is True
    assert utils.exit_code(train_search.main, args + ['--resume', '--no_fast']) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert 'made with the fast path' in err and 'resume without --no_fast' in err
    train_search.main(args + ['--resume'])  # its own layout resumes
    assert runs.load_checkpoint(str(tmp_path / 'checkpoint.pt'))['epoch'] == 2
