"""EoiNAS (eoinas.py, the masks and sampling of model_search.py, --method eoinas): the tests of
docs/eoinas.md: sampling statistics, compute skipped for pruned ops, the indicator on a
hand-made trace, the schedules, the prune rules (NOS node rule included), the state after a prune, the
derivation, and end to end with an exact resume; plus the refusals and the repository candidate cell."""
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bench_search
import darts
import eoinas
import genotypes
import runs
import train_search
import utils
from eoinas import (
    EoiNASMethod,
    EoiStats,
    indicator,
    prune_epochs,
    select_prunes,
    skip_dropout_p,
    temperature,
)
from genotypes import DARTS_PRIMITIVES, PRIMITIVES, op_kind
from model_search import derive_darts_cell, sample_weights
from model_search_fast import Network
from operations import calibrate
from test_train_search import (
    TINY,
    assert_bitwise,
    fails_with,
    kill_and_resume,
    log_without_times,
    read_log,
    run,
)

# one step per epoch: 4 training and 4 validation images
E2E = TINY + ['--synthetic_size', '8', '--batch_size', '4', '--method', 'eoinas', '--epochs', '5', '--eoi_warmup', '1',
              '--prune_every', '1']


def tiny_method(space='darts', extra=()):
    """A 3-cell, 4-channel supernet with its EoiNAS method and SGD, as train_search.main builds them."""
    args = train_search.parse_args(TINY + ['--method', 'eoinas', '--space', space, '--epochs', '4',
                                           '--eoi_warmup', '1', '--prune_every', '1', *extra])
    train_search.check_args(args)
    torch.manual_seed(0)
    model = EoiNASMethod.build_model(args, 10)
    optimizer = torch.optim.SGD(model.weights(), 0.025, momentum=0.9, weight_decay=3e-4)
    return model, EoiNASMethod(model, args), optimizer


def batches(n=4, size=8):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 3, size, size, generator=g), torch.randint(10, (n,), generator=g),
            torch.randn(n, 3, size, size, generator=g), torch.randint(10, (n,), generator=g))


# ---------------------------------------------------------------------------------------------------------
# 1. Sampling


@pytest.mark.parametrize('tau', [5., 0.05])
def test_sampled_op_is_categorical_in_softmax_alpha_at_any_temperature(tau):
    p = torch.tensor([0.5, 0.2, 0.2, 0.1])
    n = 20000
    torch.manual_seed(0)
    _, index = sample_weights(p.log().expand(n, 4), torch.ones(n, 4, dtype=torch.bool), tau)
    freq = torch.bincount(index, minlength=4) / n
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() < 4 * sigma).all(), (freq, p)


def test_masked_weights_are_zero_and_rows_sum_to_one():
    torch.manual_seed(0)
    alpha = torch.randn(14, 8)
    alive = torch.rand(14, 8) < 0.5
    alive[:, 4] = True
    for _ in range(20):
        w, index = sample_weights(alpha, alive, 1.)
        assert (w[~alive] == 0).all()
        torch.testing.assert_close(w.sum(1), torch.ones(14))
        assert alive[torch.arange(14), index].all()


def test_hard_weights_are_one_hot_with_the_soft_gradient_under_the_same_noise():
    alpha = torch.randn(14, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    alive = torch.ones(14, 8, dtype=torch.bool)
    alive[:, 0] = False
    c = torch.randn(14, 8)
    torch.manual_seed(3)
    hard, i_hard = sample_weights(alpha, alive, 0.7, hard=True)
    (g_hard,) = torch.autograd.grad((hard * c).sum(), alpha)
    torch.manual_seed(3)
    soft, i_soft = sample_weights(alpha, alive, 0.7, hard=False)
    (g_soft,) = torch.autograd.grad((soft * c).sum(), alpha)
    assert torch.equal(i_hard, i_soft)
    torch.testing.assert_close(hard.detach(), F.one_hot(i_hard, 8).float())
    torch.testing.assert_close(g_hard, g_soft)


def test_one_sample_per_forward_is_shared_by_the_cells_of_a_type():
    torch.manual_seed(0)
    model = Network(4, 10, 5, space='darts')  # normal cells 0, 2, 4; reduction cells 1, 3
    model.tau = 1.
    seen = {}
    for i, cell in enumerate(model.cells):
        cell._ops[0].register_forward_pre_hook(lambda m, inp, i=i: seen.setdefault(i, []).append(inp[1]))
    model(torch.randn(2, 3, 8, 8))
    model(torch.randn(2, 3, 8, 8))
    for call in (0, 1):
        assert torch.equal(seen[0][call], seen[2][call]) and torch.equal(seen[0][call], seen[4][call])
        assert torch.equal(seen[1][call], seen[3][call]) and not torch.equal(seen[0][call], seen[1][call])
    assert not torch.equal(seen[0][0], seen[0][1])  # a fresh sample each forward
    assert model.last_sample.shape == (2, 14)


# ---------------------------------------------------------------------------------------------------------
# 2. Compute


def prune_half(model, seed=0):
    """Prune about half of every row's ops at random, keeping a non-none op in each row."""
    g = torch.Generator().manual_seed(seed)
    masks = []
    for m in (model.alive_normal, model.alive_reduce):
        alive = torch.rand(m.shape, generator=g) < 0.5
        alive[torch.arange(len(m)), torch.randint(1, m.shape[1], (len(m),), generator=g)] = True
        masks.append(alive)
    model.set_alive(*masks)
    return masks


def count_calls(model):
    calls = {}
    for c, cell in enumerate(model.cells):
        for r, mixed in enumerate(cell._ops):
            for o, op in enumerate(mixed._ops):
                op.register_forward_hook(lambda *_, key=(c, r, o): calls.__setitem__(key, calls.get(key, 0) + 1))
    return calls


def test_pruned_ops_are_never_computed_and_keep_no_gradient():
    torch.manual_seed(0)
    model = Network(4, 10, 3, space='darts')
    masks = prune_half(model)
    calls = count_calls(model)
    optimizer = torch.optim.SGD(model.weights(), 0.1, momentum=0.9)
    x, y = torch.randn(2, 3, 8, 8), torch.randint(10, (2,))
    for tau in (None, 1.):  # the masked softmax and the soft sample
        calls.clear()
        model.tau = tau
        darts.weight_step(model, optimizer, x, y, None, 0., 5.)
        expected = {(c, r, o) for c, cell in enumerate(model.cells) for r in range(14) for o in range(8)
                    if masks[int(cell.reduction)][r, o]}
        assert set(calls) == expected and set(calls.values()) == {1}
    for c, cell in enumerate(model.cells):
        for r, mixed in enumerate(cell._ops):
            for o, op in enumerate(mixed._ops):
                for p in op.parameters():
                    assert (p.grad is None) == (not masks[int(cell.reduction)][r, o]), (c, r, o)


def test_hard_mode_computes_the_one_sampled_op_per_edge():
    torch.manual_seed(0)
    model = Network(4, 10, 3, space='darts')
    masks = prune_half(model)
    calls = count_calls(model)
    model.tau, model.gumbel_hard = 1., True
    model(torch.randn(2, 3, 8, 8))
    picked = model.last_sample
    assert set(calls.values()) == {1}
    for c, cell in enumerate(model.cells):
        ran = sorted((r, o) for (cc, r, o) in calls if cc == c)
        assert ran == [(r, int(picked[int(cell.reduction), r])) for r in range(14)]
        assert all(masks[int(cell.reduction)][r, o] for r, o in ran)


def test_nos_second_tier_without_feature_ops_calibrates_the_surrogate():
    """A pruned second tier holding only attention and dynamic ops acts on S_k itself (S + S*A + S (x) D)."""
    torch.manual_seed(0)
    model = Network(4, 10, 3)
    alive = torch.ones(18, 11, dtype=torch.bool)
    alive[14:] = False
    alive[14:, [PRIMITIVES.index('spatial_attention'), PRIMITIVES.index('dynamic_conv_3x3')]] = True
    model.set_alive(alive, alive)
    model.tau = 1.
    cell = model.cells[0]
    seen = {}
    cell._second[0].register_forward_hook(lambda m, inp, out: seen.update(s=inp[0], out=out))
    cell.register_forward_hook(lambda m, inp, out: seen.update(cell=out))
    logits = model(torch.randn(2, 3, 8, 8))
    f, a, d = seen['out']
    assert f is None and a is not None and len(d) == 1
    torch.testing.assert_close(seen['cell'][:, :4], calibrate(seen['s'], a, d))  # node 2: the first 4 channels
    logits.sum().backward()
    assert cell._second[0]._ops[PRIMITIVES.index('spatial_attention')].conv_1.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# 3. The indicator on a hand-made trace


def trace(mode):
    stats = EoiStats(rows=1, n_ops=4, acc_mode=mode)
    for o in [0, 2, 2, 3, 0]:
        stats.record_train(torch.tensor([[o], [o]]))
    for o, acc in [(2, 75.), (0, 60.), (2, 80.)]:
        stats.record_val(torch.tensor([[o], [o]]), torch.tensor(acc))
    return stats


def test_indicator_on_a_hand_made_trace():
    last, mean = trace('last'), trace('mean')
    assert last.count[0, 0].tolist() == [2, 0, 2, 1]
    assert last.acc[0, 0].tolist() == [60, 0, 80, 0]
    assert mean.acc[0, 0].tolist() == [60, 0, 77.5, 0]
    beta = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    # C = Ca / Ce = [60/2, 0 (Ce = 0), 80/2, 0/1]; I = beta + 0.5 C (Eq. 6-7)
    assert indicator(beta, last.acc[0, 0], last.count[0, 0], 0.5).tolist() == [15.4, 0.3, 20.2, 0.1]
    assert indicator(beta, mean.acc[0, 0], mean.count[0, 0], 0.5).tolist() == [15.4, 0.3, 0.2 + 0.5 * 38.75, 0.1]
    # Ce = 0 gives C = 0, whatever Ca (the authors' code: inf or NaN)
    assert indicator([0.5, 0.5], [70., 70.], [0, 2], 1.).tolist() == [0.5, 35.5]
    # a prune resets Ce and the mean's window, and keeps Ca
    for stats in (last, mean):
        acc = stats.acc.clone()
        stats.reset_counts()
        assert not stats.count.any() and torch.equal(stats.acc, acc)
    mean.record_val(torch.tensor([[2], [2]]), torch.tensor(50.))
    assert mean.acc[0, 0].tolist() == [60, 0, 50, 0]  # the new window's mean


def test_warm_up_counts_nothing_and_the_search_counts_every_step():
    model, method, optimizer = tiny_method()
    x, y, xv, yv = batches()
    alpha = [a.detach().clone() for a in model.arch_parameters()]
    method.start_epoch(0)
    assert not method.uses_val_batch
    out = method.step(x, y, None, None, None, 0.025, optimizer)
    assert set(out) == {'train_ce', 'train_at', 'train_correct'}
    assert not method.stats.count.any() and not method.stats.acc.any()
    assert all(torch.equal(a, b) for a, b in zip(alpha, model.arch_parameters()))  # A frozen
    method.start_epoch(1)
    assert method.uses_val_batch
    out = method.step(x, y, xv, yv, None, 0.025, optimizer)
    assert {'val_ce', 'val_correct'} <= set(out)
    assert method.stats.count.sum() == 2 * 14  # one sampled op per row and cell type
    acc = 100. * out['val_correct'].item() / len(yv)
    assert set(method.stats.acc[method.stats.acc > 0].tolist()) <= {acc}
    assert not all(torch.equal(a, b) for a, b in zip(alpha, model.arch_parameters()))


# ---------------------------------------------------------------------------------------------------------
# 3b. The method's own use of the formulas (each computed here, independently of eoinas.py)


def test_a_step_counts_the_weight_steps_sample_and_records_the_a_steps_accuracy(monkeypatch):
    """Ce counts the sample of the weight step's forward (never the A step's), and Ca of the A step's
    sampled ops becomes that batch's top-1 in percent: 3 of 4 right = 75."""
    model, method, optimizer = tiny_method()
    x, y, xv, yv = batches()
    seen = {}
    weight_step, arch_step = darts.weight_step, darts.Architect.step

    def recorded_weight_step(*a, **k):
        out = weight_step(*a, **k)
        seen['train'] = model.last_sample.clone()
        return out

    def arch_step_with_3_of_4_right(self, *a, **k):
        ce, at, _ = arch_step(self, *a, **k)
        seen['val'] = model.last_sample.clone()
        logits = F.one_hot((yv + torch.tensor([0, 0, 0, 1])) % 10, 10).double()  # the last one wrong
        return ce, at, logits

    monkeypatch.setattr(darts, 'weight_step', recorded_weight_step)
    monkeypatch.setattr(darts.Architect, 'step', arch_step_with_3_of_4_right)
    method.start_epoch(1)
    method.step(x, y, xv, yv, None, 0.025, optimizer)
    assert not torch.equal(seen['train'], seen['val'])  # two draws: a swapped sample would show
    expected_count = torch.zeros(2, 14, 8, dtype=torch.float64)
    expected_acc = torch.zeros(2, 14, 8, dtype=torch.float64)
    for c in range(2):
        for r in range(14):
            expected_count[c, r, seen['train'][c, r]] = 1.
            expected_acc[c, r, seen['val'][c, r]] = 75.
    assert torch.equal(method.stats.count, expected_count)
    assert torch.equal(method.stats.acc, expected_acc)


def test_the_methods_indicator_is_beta_plus_half_ca_over_ce_and_its_prune_takes_the_minimum():
    """I = softmax(A) + 0.5 Ca / Ce over the alive ops (Eq. 6-7, lambda 0.5), computed here with numpy from
    hand-set A, Ce and Ca; the prune of a prune epoch removes each row's argmin of that I."""
    model, method, _ = tiny_method()
    rng = np.random.default_rng(3)
    alpha = rng.normal(size=(2, 14, 8))
    count = rng.integers(0, 5, size=(2, 14, 8)).astype(float)
    acc = rng.uniform(0, 100, size=(2, 14, 8)).round(1)
    with torch.no_grad():
        for a, v in zip(model.arch_parameters(), alpha):
            a.copy_(torch.from_numpy(v))
    method.stats.count.copy_(torch.from_numpy(count))
    method.stats.acc.copy_(torch.from_numpy(acc))
    beta = np.exp(alpha) / np.exp(alpha).sum(-1, keepdims=True)
    ratio = np.divide(acc, count, out=np.zeros_like(acc), where=count > 0)
    expected = beta + 0.5 * ratio
    np.testing.assert_allclose(method.current_importance().numpy(), expected, rtol=1e-6)
    extra = method.end_epoch(1, None, None)  # epoch 2 (1-indexed) is a prune epoch of this schedule
    for c, cell in enumerate(eoinas.CELLS):
        # none may go first only when the row keeps another op: with 8 alive ops the plain argmin goes
        assert extra['pruned'][cell] == [[r, DARTS_PRIMITIVES[int(np.argmin(expected[c, r]))]] for r in range(14)]
    np.testing.assert_allclose(np.array(method.importance()['normal']), expected[0], rtol=1e-6)


def test_each_epoch_sets_the_temperature_and_the_skip_dropout_of_every_edge():
    """T(e) and p(e) (the authors' code; 4 epochs, warm-up 1), typed out: T(0) = T(1) = 5, T(3) = 5 * 0.965^2;
    p(0) = 0.1 * 3/4, p(2) = 0.1 * exp(-0.2); every edge of both paths drops with p."""
    for extra in ([], ['--no_fast']):
        model, method, _ = tiny_method(extra=extra)
        holders = [m for m in model.modules() if hasattr(m, 'skip_dropout')]
        assert holders
        for epoch, tau, p in ((0, 5., 0.075), (1, 5., 0.1), (2, 4.825, 0.1 * 0.8187307530779818),
                              (3, 4.656125, 0.1 * 0.6703200460356393)):
            method.start_epoch(epoch)
            assert model.tau == pytest.approx(tau, abs=1e-12)
            assert all(m.skip_dropout == pytest.approx(p, abs=1e-15) for m in holders), (epoch, p)


# ---------------------------------------------------------------------------------------------------------
# 4. Schedules


def test_schedules():
    assert prune_epochs(160, 20, 20) == [40, 60, 80, 100, 120, 140, 160]
    assert prune_epochs(220, 20, 20, max_prunes=10)[-1] == 220 and prune_epochs(160, 20, 0) == []
    assert temperature(19) == temperature(20) == 5.
    assert temperature(159) == pytest.approx(0.0353, abs=5e-5)
    assert skip_dropout_p(0, 160) == pytest.approx(0.099375) and skip_dropout_p(20, 160) == pytest.approx(0.1)
    assert skip_dropout_p(40, 160) == pytest.approx(0.1 * np.exp(-4))


def test_method_defaults_on_both_spaces():
    darts = train_search.parse_args(['--method', 'eoinas', '--space', 'darts'])
    nos = train_search.parse_args(['--method', 'eoinas', '--space', 'nos'])
    assert (darts.epochs, nos.epochs) == (160, 220)
    for a in (darts, nos):
        assert (a.arch_learning_rate, a.learning_rate_min, a.lambda_at) == (3e-4, 1e-3, 0.)
        assert (a.eoi_lambda, a.eoi_warmup, a.prune_every, a.prune_count) == (0.5, 20, 20, 1)
        assert (a.temperature_init, a.temperature_decay, a.eoi_acc, a.skip_dropout, a.gumbel_hard) == \
            (5., 0.965, 'last', 0.1, False)
    fast = train_search.parse_args(['--method', 'eoinas', '--space', 'nos', '--prune_every', '10', '--prune_count', '2'])
    assert fast.epochs == 70  # docs/eoinas.md: NOS in 70 epochs
    assert train_search.parse_args(['--method', 'eoinas', '--epochs', '9', '--eoi_lambda', '0']).epochs == 9


# ---------------------------------------------------------------------------------------------------------
# 5. Prune rules


def test_the_lowest_importance_goes_with_ties_to_the_lower_index():
    ops = DARTS_PRIMITIVES
    imp = np.array([[0.3, 0.1, 0.1, 0.5, 0.6, 0.7, 0.8, 0.9],
                    [0.3, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.1]])
    alive = np.ones((2, 8), dtype=bool)
    assert select_prunes(imp, alive, ops) == [(0, 1), (1, 7)]
    assert select_prunes(imp, alive, ops, n=2) == [(0, 1), (1, 7), (0, 2), (1, 1)]
    alive[0, 1] = False  # pruned ops are not candidates
    assert select_prunes(imp, alive, ops)[0] == (0, 2)


def test_none_goes_before_the_last_other_op():
    ops = DARTS_PRIMITIVES
    imp = np.array([[0.9, 0, 0, 0, 0.1, 0, 0, 0]])
    alive = np.zeros((1, 8), dtype=bool)
    alive[0, [0, 4]] = True  # {none, sep_conv_3x3}, I(sep_conv_3x3) < I(none)
    assert select_prunes(imp, alive, ops) == [(0, 0)]
    alive[0, 0] = False      # one op left: nothing to prune
    assert select_prunes(imp, alive, ops) == []


def nodes_have_features(alive, ops):
    offset = 0
    for k in range(4):
        rows = alive[offset:offset + k + 2]
        if not any(rows[r, o] and op_kind(ops[o]) == 'feature' for r in range(k + 2) for o in range(len(ops))):
            return False
        offset += k + 2
    return True


def test_nos_node_rule_on_adversarial_importance():
    ops = PRIMITIVES
    feature = np.array([op_kind(o) == 'feature' for o in ops])
    # node 0 (rows 0, 1): each row holds one feature op and one attention op, the feature op lowest
    imp = np.ones((18, 11))
    alive = np.ones((18, 11), dtype=bool)
    alive[:2] = False
    alive[0, [0, 7]] = alive[1, [1, 8]] = True
    imp[:2, :7] = 0.
    picks = select_prunes(imp, alive, ops, 'nos')
    assert (0, 0) in picks and (1, 8) in picks  # row 1 keeps the node's last feature op
    # prune to one op per row with feature ops always lowest: every node keeps a feature op throughout,
    # second-tier rows are free, and the masked derivation is a valid heterogeneous cell
    rng = np.random.default_rng(0)
    for trial in range(3):
        alive = np.ones((18, 11), dtype=bool)
        imp = rng.random((18, 11)) + np.where(feature, 0., 1.)
        while alive.sum(1).max() > 1:
            for r, o in select_prunes(imp, alive, ops, 'nos', n=1 + trial):
                alive[r, o] = False
            assert nodes_have_features(alive, ops) and alive.sum(1).min() >= 1
        assert not alive[14:, feature].any()  # the free second tiers lost every feature op
        model_masks = torch.from_numpy(alive)
        model = Network(4, 10, 3)
        model.set_alive(model_masks, model_masks)
        genotypes.validate(model.genotype(importance=(imp, imp)))


# ---------------------------------------------------------------------------------------------------------
# 6. State after a prune


def test_state_after_a_prune():
    model, method, optimizer = tiny_method(extra=['--no_fast'])  # the per-edge cells: it inspects one edge
    x, y, xv, yv = batches()
    method.start_epoch(1)
    method.step(x, y, xv, yv, None, 0.025, optimizer)
    alpha = [a.detach().clone() for a in model.arch_parameters()]
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    momentum = {id(p): s['momentum_buffer'].clone() for p, s in optimizer.state.items()}
    assert method.architect.optimizer.state and method.stats.count.any()
    acc = method.stats.acc.clone()
    imp = method.current_importance()
    extra = method.end_epoch(1, None, None)  # epoch 2 (1-indexed) is a prune epoch
    for c, cell in enumerate(eoinas.CELLS):
        mask = getattr(model, f'alive_{cell}')
        assert (mask.sum(1) == 7).all()
        assert [r for r, _ in extra['pruned'][cell]] == list(range(14))
        for r, name in extra['pruned'][cell]:  # every op was alive: the lowest I goes
            o = DARTS_PRIMITIVES.index(name)
            assert not mask[r, o] and imp[c, r, o] == imp[c, r].min()
    assert all(torch.equal(a, b) for a, b in zip(alpha, model.arch_parameters()))
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())
    assert not method.architect.optimizer.state                       # Adam for A starts afresh
    assert all(torch.equal(momentum[id(p)], s['momentum_buffer']) for p, s in optimizer.state.items())
    assert not method.stats.count.any() and torch.equal(method.stats.acc, acc)  # Ce reset, Ca kept

    # the edge's output is the sum over its alive ops, weighted by the sample of the same noise
    model.set_skip_dropout(0.)
    mixed = model.cells[0]._ops[3]
    seen = {}
    mixed.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0], w=inp[1], out=out[0]))
    torch.manual_seed(5)
    model(x)
    torch.manual_seed(5)
    w, _ = sample_weights(model.alphas_normal, model.alive_normal, model.tau)
    torch.testing.assert_close(seen['w'], w[3], rtol=0, atol=0)
    alive = model.alive_normal[3].nonzero().flatten().tolist()
    manual = sum(w[3, o] * mixed._ops[o](seen['x']) for o in alive)
    torch.testing.assert_close(seen['out'], manual)


# ---------------------------------------------------------------------------------------------------------
# 7. Derivation


def test_derivation_ignores_pruned_ops_and_none():
    torch.manual_seed(0)
    model = Network(4, 10, 3, space='darts')
    rng = np.random.default_rng(1)
    imp = rng.random((14, 8))
    alive = np.ones((14, 8), dtype=bool)
    imp[:, 7] = 5.          # dil_conv_5x5 strongest everywhere, but pruned
    alive[:, 7] = False
    imp[:, 0] = 4.          # none strongest of the alive, never chosen
    mask = torch.from_numpy(alive)
    model.set_alive(mask, mask)
    g = model.genotype(importance=(imp, imp))
    ops = [op for op, _ in g.normal + g.reduce]
    assert 'dil_conv_5x5' not in ops and 'none' not in ops
    assert g.normal == derive_darts_cell(np.where(alive, imp, -np.inf))
    # NOS: any masks the prune rules allow derive a valid heterogeneous cell
    nos = Network(4, 10, 3)
    imp = rng.random((18, 11))
    alive = np.ones((18, 11), dtype=bool)
    for _ in range(8):
        for r, o in select_prunes(imp, alive, PRIMITIVES, 'nos'):
            alive[r, o] = False
        nos.set_alive(torch.from_numpy(alive), torch.from_numpy(alive))
        g = genotypes.validate(nos.genotype(importance=(imp, imp)))
        assert not genotypes.is_classic(g.normal)
        for k, (first_i, first_j, second) in enumerate(g.normal):
            assert all(alive[row_of(i, k), PRIMITIVES.index(op)] for op, i in (first_i, first_j))
            assert alive[14 + k, PRIMITIVES.index(second)]


def row_of(i, k):
    """The row of A of the first-tier edge from node i into inner node k."""
    return sum(2 + j for j in range(k)) + i


# ---------------------------------------------------------------------------------------------------------
# 8. End to end


@pytest.fixture(scope='module')
def searched(tmp_path_factory):
    save = tmp_path_factory.mktemp('eoinas')
    assert run(E2E + ['--space', 'darts', '--save', save]) == 0
    return save


def test_tiny_search_prunes_one_op_per_edge_and_epoch(searched):
    records = read_log(searched)
    assert [r['epoch'] for r in records] == [1, 2, 3, 4, 5]
    for cell in ('normal', 'reduce'):
        counts = [{sum(row) for row in r['alive'][cell]} for r in records]
        assert counts == [{8}, {7}, {6}, {5}, {4}]
        assert [len(r['pruned'][cell]) for r in records] == [0, 14, 14, 14, 14]
    for r in records:
        assert r['method'] == 'eoinas' and r['tau'] == temperature(r['epoch'] - 1, 1) and {'importance', 'alive', 'pruned'} <= set(r)
        assert np.array(r['importance']['normal']).shape == (14, 8)
        # the pruned op of each row had the lowest I among the alive ops (none of the none rule yet)
        before = np.array(records[r['epoch'] - 2]['alive']['normal']) if r['epoch'] > 1 else None
        for row, name in r['pruned']['normal']:
            imp = np.array(r['importance']['normal'][row])
            assert imp[DARTS_PRIMITIVES.index(name)] == imp[before[row]].min()
    assert 'val_acc' not in records[0] and 'val_acc' in records[1]  # the warm-up trains the weights only
    g = genotypes.load(genotype_file=str(searched / 'genotype.json'))
    assert genotypes.is_classic(g.normal)
    ckpt = runs.load_checkpoint(str(searched / 'checkpoint.pt'))
    alive = ckpt['model']['alive_normal']
    assert all(alive[row_of(i, k // 2), DARTS_PRIMITIVES.index(op)] for k, (op, i) in enumerate(g.normal))


def test_prunes_are_logged_and_the_tables_mark_pruned_ops(searched):
    """Each prune is in log.txt (and on the terminal): per edge the op pruned with its I and the ops left;
    the importance tables show `-` for ops pruned earlier and `x` after the value of those pruned now."""
    records = read_log(searched)
    with open(searched / 'log.txt') as f:
        log = [line.split(' ', 2)[2].rstrip('\n') for line in f]  # without the date and time
    r = records[2]  # epoch 3: the second of four prunes
    start = log.index('epoch 3: prune 2 of 4, the alive op of lowest I on each edge (--prune_count 1); per edge: '
                      'the op pruned (its I), the ops left')
    assert log[start + 1].split() == ['edge', 'normal', 'reduce']
    labels = genotypes.edge_names(two_tier=False)
    for row, line in zip(range(14), log[start + 2:start + 16]):
        label, *cols = re.split(r'\s{2,}', line.strip())
        assert label == labels[row] and len(cols) == 2, line
        for cell, col in zip(('normal', 'reduce'), cols):
            (op,) = [name for k, name in r['pruned'][cell] if k == row]
            name, value, left = re.fullmatch(r'(\w+) \(([\d.]+)\), (\d) left', col).groups()
            assert name == op and left == '6', line
            assert float(value) == pytest.approx(r['importance'][cell][row][DARTS_PRIMITIVES.index(op)], abs=6e-5)
    table = log.index('importance normal (columns: ' + ', '.join(DARTS_PRIMITIVES)
                      + '); -: pruned earlier, x: pruned now', start)
    rows = log[table + 1:table + 15]
    assert sum(line.split()[1:].count('-') for line in rows) == 14  # the first prune's, one per edge
    assert sum(v.endswith('x') for line in rows for v in line.split()[1:]) == 14  # this epoch's
    assert not any(line.startswith('epoch 1: prune') for line in log)  # the warm-up prunes nothing


def test_killed_search_resumes_bit_identical(searched, tmp_path, monkeypatch):
    save = tmp_path / 'killed'
    kill_and_resume(monkeypatch, train_search.main, E2E + ['--space', 'darts', '--save', save], epoch=3)
    a = runs.load_checkpoint(str(searched / 'checkpoint.pt'))
    b = runs.load_checkpoint(str(save / 'checkpoint.pt'))
    assert a['epoch'] == b['epoch'] == 5
    assert_bitwise(a['model'], b['model'])
    assert_bitwise(a['method'], b['method'])
    assert_bitwise(a['optimizer']['state'], b['optimizer']['state'])
    assert log_without_times(searched) == log_without_times(save)


def test_tiny_nos_search_writes_a_valid_heterogeneous_genotype(tmp_path):
    assert run(E2E + ['--space', 'nos', '--epochs', '2', '--save', tmp_path]) == 0
    g = genotypes.load(genotype_file=str(tmp_path / 'genotype.json'))
    assert not genotypes.is_classic(g.normal) and not genotypes.is_classic(g.reduce)
    records = read_log(tmp_path)
    assert [{sum(row) for row in r['alive']['reduce']} for r in records] == [{11}, {10}]
    assert np.array(records[-1]['importance']['normal']).shape == (18, 11)


# ---------------------------------------------------------------------------------------------------------
# Refusals: one sentence each, before the run starts


def test_refused_combinations_and_schedules(tmp_path, capsys):
    base = TINY + ['--save', tmp_path / 's']
    eoi = base + ['--method', 'eoinas', '--space', 'darts']
    fails_with(capsys, eoi + ['--unrolled'], '--unrolled', 'first-order')
    fails_with(capsys, base + ['--method', 'eoinas', '--space', 'nos', '--gumbel_hard'], '--gumbel_hard',
               '--space nos')
    fails_with(capsys, base + ['--lambda_at', '0', '--prune_every', '5'], '--prune_every', '--method eoinas')
    fails_with(capsys, base + ['--lambda_at', '0', '--gumbel_hard'], '--gumbel_hard', '--method eoinas')
    fails_with(capsys, eoi + ['--epochs', '200'], '--epochs 200', 'after epoch 160', '--epochs 160')
    fails_with(capsys, eoi + ['--epochs', '30'], 'no prune fits', 'after epoch 40', '--prune_every 0')
    fails_with(capsys, eoi + ['--epochs', '5', '--eoi_warmup', '5'], '--eoi_warmup 4')
    fails_with(capsys, eoi + ['--prune_count', '8'], '--prune_count', 'between 1 and 7')
    fails_with(capsys, eoi + ['--eoi_acc', 'median'], "'median'", 'last, mean')
    fails_with(capsys, eoi + ['--temperature_decay', '1.5'], '--temperature_decay', '(0, 1]')
    assert not os.path.exists(tmp_path / 's' / 'checkpoint.pt')


def test_resume_with_another_schedule_names_the_flag(searched, capsys):
    fails_with(capsys, E2E + ['--space', 'darts', '--save', searched, '--resume', '--eoi_lambda', '0.25'],
               '--eoi_lambda 0.5', '--eoi_lambda 0.25')


# ---------------------------------------------------------------------------------------------------------
# The repository's candidate cell (docs/eoinas.md) and the pruning benchmark


def test_repo_candidate_is_valid_and_has_the_spec_size():
    from model import NetworkCIFAR
    g = genotypes.load('EOINAS_REPO_CANDIDATE')
    assert utils.count_params(NetworkCIFAR(36, 10, 20, True, g)) == pytest.approx(3.45e6, rel=2e-3)


def test_bench_times_eoinas_as_ops_are_pruned(capsys):
    bench_search.main(['--device', 'cpu', '--eoinas', '--layers', '3', '--init_channels', '4', '--batch_size', '2',
                       '--iters', '1', '--warmup', '0', '--alive', '2'])
    rows = [line.split() for line in capsys.readouterr().out.strip().splitlines()[2:]]
    assert [r[:4] for r in rows] == [['darts', 'plain', 'softmax', '8'], ['darts', 'fast', 'softmax', '8'],
                                     ['eoinas', 'plain', 'soft', '2'], ['eoinas', 'fast', 'soft', '2'],
                                     ['eoinas', 'plain', 'hard', '1']]
    assert rows[0][-1] == '1.00x'



def test_visualize_plots_the_importance_and_marks_pruned_ops(searched, tmp_path, capsys):
    import importlib.util

    import visualize
    assert run_visualize(visualize, [str(searched), '--out', str(tmp_path)]) == 0
    err = capsys.readouterr().err
    if importlib.util.find_spec('matplotlib') is None:
        assert 'matplotlib' in err
        return
    for name in ('alphas_normal', 'importance_normal', 'importance_evolution', 'alphas_evolution'):
        assert (tmp_path / f'{name}.png').read_bytes()[:4] == b'\x89PNG'


def run_visualize(visualize, argv):
    return utils.exit_code(visualize.main, argv)
