"""GDAS (gdas.py, --method gdas): the temperature schedule against literal values, the hard sample's
straight-through gradient against a softmax computed here from the same noise, the method's use of both (one
op per edge in both forwards, weights before A, tau per epoch), the NOS feasibility repair on hand-made
scores, the defaults, the refusals, and end to end on synthetic data with an exact resume."""
import pytest
import torch
import torch.nn.functional as F

import darts
import gdas
import genotypes
import runs
import train_search
from genotypes import DARTS_PRIMITIVES, PRIMITIVES
from model_search import MixedOp, feature_constrained, sample_weights
from test_train_search import (
    TINY,
    assert_bitwise,
    fails_with,
    kill_and_resume,
    log_without_times,
    read_log,
    run,
)

# 2 training + 2 validation steps of 4 images per epoch, 3 epochs
E2E = TINY + ['--method', 'gdas', '--synthetic_size', '16', '--batch_size', '4', '--epochs', '3']


def tiny_method(space='darts', extra=()):
    args = train_search.parse_args(TINY + ['--method', 'gdas', '--space', space, '--epochs', '250', *extra])
    train_search.check_args(args)
    torch.manual_seed(0)
    model = gdas.GDASMethod.build_model(args, 10)
    optimizer = torch.optim.SGD(model.weights(), 0.025, momentum=0.9, nesterov=True)
    return model, gdas.GDASMethod(model, args), optimizer


def batches(n=4, size=8):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 3, size, size, generator=g), torch.randint(10, (n,), generator=g),
            torch.randn(n, 3, size, size, generator=g), torch.randint(10, (n,), generator=g))


# ---------------------------------------------------------------------------------------------------------
# The formulas


def test_temperature_falls_linearly_from_10_to_0_1_over_the_epochs():
    # tau(e) = 10 - 9.9 e / 249 for 250 epochs (the authors' GDAS.py), typed out by hand
    assert gdas.temperature(0, 250) == 10.
    assert gdas.temperature(249, 250) == pytest.approx(0.1, abs=1e-12)
    assert gdas.temperature(124, 250) == pytest.approx(5.0698795180722890, abs=1e-12)
    assert gdas.temperature(1, 250) == pytest.approx(9.9602409638554217, abs=1e-12)
    assert gdas.temperature(2, 3, 4., 1.) == 1. and gdas.temperature(0, 1) == 10.


def test_hard_sample_is_one_hot_with_the_softmax_gradient_of_the_same_noise():
    alpha = torch.tensor([[0.3, -0.2, 0.1, 0.5], [0., 0., 1., -1.]], dtype=torch.float64, requires_grad=True)
    alive = torch.ones(2, 4, dtype=torch.bool)
    c = torch.tensor([[1., 2., 3., 4.], [-1., 0.5, 2., 0.]], dtype=torch.float64)
    torch.manual_seed(7)
    w, index = sample_weights(alpha, alive, 0.5, hard=True)
    (w * c).sum().backward()
    # the same noise, drawn here: g = -log(E), E ~ Exp(1); h = softmax((alpha + g) / tau)
    torch.manual_seed(7)
    g = -torch.empty(2, 4, dtype=torch.float64).exponential_().log()
    a = alpha.detach().clone().requires_grad_()
    h = torch.softmax((a + g) / 0.5, dim=-1)
    (h * c).sum().backward()
    expected = F.one_hot((alpha.detach() + g).argmax(1), 4).double()
    assert torch.equal(w.detach(), expected) and torch.equal(index, expected.argmax(1))
    assert torch.allclose(alpha.grad, a.grad, atol=1e-15) and alpha.grad.abs().sum() > 0


def test_nos_repair_switches_the_cheapest_row_to_a_feature_op():
    # NOS columns: 0-6 feature, 7-8 attention, 9-10 dynamic; node 0 = rows 0, 1; node 1 = rows 2, 3, 4
    s = torch.full((5, 11), -3.)
    s[0, 7], s[0, 2] = 5., 4.      # row 0: spatial attention; its best feature op costs 1.0
    s[1, 9], s[1, 0] = 3., 2.5     # row 1: a dynamic op; its best feature op costs 0.5 (the cheaper)
    s[2, 8], s[3, 4], s[4, 10] = 2., 1., 6.   # node 1 already holds a feature op (row 3)
    index = s.argmax(1)
    is_feature = [True] * 7 + [False] * 4
    out = feature_constrained(s, index, [[0, 1], [2, 3, 4]], is_feature)
    assert out.tolist() == [7, 0, 8, 4, 10]
    s[1, 0] = 2.   # now both cost 1.0: the lower row switches
    assert feature_constrained(s, s.argmax(1), [[0, 1], [2, 3, 4]], is_feature).tolist()[:2] == [2, 9]


def test_nos_hard_sample_keeps_a_feature_op_in_every_first_tier():
    model, _, _ = tiny_method('nos')
    with torch.no_grad():  # attention and dynamic ops win every first-tier row by far
        for a in model.arch_parameters():
            a[:14, 7:] += 30.
    x = batches()[0]
    rows, is_feature = model.first_tiers()
    for _ in range(3):
        model(x)   # raises in NOSCell if a node's first tier has no feature op
        for sample in model.last_sample:
            for node in rows:
                assert sum(is_feature[int(o)] for o in sample[node]) == 1  # exactly the one repaired row
    torch.manual_seed(0)  # control: without the repair, node 0's first tier samples no feature op
    _, index = sample_weights(model.alphas_normal, model.alive_normal, 1., hard=True)
    assert not any(is_feature[int(o)] for o in index[:2])


# ---------------------------------------------------------------------------------------------------------
# The method's use of them


def test_each_step_runs_one_op_per_edge_weights_first_then_a_on_fresh_samples(monkeypatch):
    model, method, optimizer = tiny_method()
    calls = {}

    def counter(key):
        return lambda mod, inp, out: calls.__setitem__(key, calls.get(key, 0) + 1)

    for edge in (m for m in model.modules() if isinstance(m, MixedOp)):
        for op in edge._ops:
            op.register_forward_hook(counter(id(edge)))
    order, samples = [], []
    weight_step, arch_step = darts.weight_step, darts.Architect.step

    def record_weight_step(*a, **k):
        out = weight_step(*a, **k)
        order.append('weights')
        samples.append(model.last_sample.clone())
        return out

    def record_arch_step(self, *a, **k):
        out = arch_step(self, *a, **k)
        order.append('A')
        samples.append(model.last_sample.clone())
        return out

    monkeypatch.setattr(darts, 'weight_step', record_weight_step)
    monkeypatch.setattr(darts.Architect, 'step', record_arch_step)
    method.start_epoch(124)
    assert model.tau == pytest.approx(5.0698795180722890, abs=1e-12)
    before = [a.detach().clone() for a in model.arch_parameters()]
    x, y, xv, yv = batches()
    out = method.step(x, y, xv, yv, None, 0.025, optimizer)
    assert order == ['weights', 'A']
    n_edges = sum(isinstance(m, MixedOp) for m in model.modules())
    assert len(calls) == n_edges and set(calls.values()) == {2}   # one op per edge in each of two forwards
    assert not torch.equal(samples[0], samples[1])                  # a fresh sample per forward
    assert all(not torch.equal(a, b) for a, b in zip(before, model.arch_parameters()))  # A learnt (ST)
    assert set(out) == {'train_ce', 'train_at', 'val_ce', 'val_at', 'train_correct', 'val_correct'}


def test_defaults_are_the_published_settings_and_the_args_line_shows_them():
    a = train_search.parse_args(['--method', 'gdas'])
    assert (a.space, a.epochs, a.batch_size, a.learning_rate, a.learning_rate_min, a.weight_decay) == \
        ('darts', 250, 256, 0.025, 0.001, 5e-4)
    assert (a.arch_learning_rate, a.arch_weight_decay, a.lambda_at, a.tau_max, a.tau_min) == (3e-4, 1e-3, 0., 10., .1)
    assert a.nesterov is True and not gdas.GDASMethod.fast(a)
    assert train_search.ours_notice(a) is None
    assert 'gdas on --space nos' in train_search.ours_notice(train_search.parse_args(['--method', 'gdas', '--space', 'nos']))


def test_refusals(tmp_path, capsys):
    base = TINY + ['--save', tmp_path / 's']
    fails_with(capsys, base + ['--method', 'gdas', '--unrolled'], '--unrolled', 'first-order')
    fails_with(capsys, base + ['--method', 'gdas', '--tau_min', '20'], '--tau_min 20', '--tau_max 10')
    fails_with(capsys, base + ['--method', 'gdas', '--tau_max', '0'], '--tau_max', '> 0')
    fails_with(capsys, base + ['--lambda_at', '0', '--tau_max', '5'], '--tau_max', '--method gdas')


# ---------------------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope='module')
def searched(tmp_path_factory):
    save = tmp_path_factory.mktemp('gdas')
    assert run(E2E + ['--save', save]) == 0
    return save


def test_tiny_search_logs_tau_and_writes_a_darts_genotype(searched):
    records = read_log(searched)
    assert [r['tau'] for r in records] == [10., pytest.approx(5.05), pytest.approx(0.1)]
    assert all(r['method'] == 'gdas' and r['space'] == 'darts' and 'val_acc' in r for r in records)
    g = genotypes.load(genotype_file=str(searched / 'genotype.json'))
    assert genotypes.is_classic(g.normal) and all(op != 'none' for op, _ in g.normal + g.reduce)
    with open(searched / 'log.txt') as f:
        text = f.read()
    assert 'the per-edge reference cells' in text and "'space': 'darts'" in text and 'own combinations' not in text


def test_killed_search_resumes_bit_identical(searched, tmp_path, monkeypatch):
    save = tmp_path / 'killed'
    kill_and_resume(monkeypatch, train_search.main, E2E + ['--save', save], epoch=2)
    a, b = (runs.load_checkpoint(str(d / 'checkpoint.pt')) for d in (searched, save))
    assert a['epoch'] == b['epoch'] == 3
    for key in ('model', 'method'):
        assert_bitwise(a[key], b[key])
    assert_bitwise(a['optimizer']['state'], b['optimizer']['state'])
    assert log_without_times(searched) == log_without_times(save)


def test_nos_search_is_labelled_ours_and_writes_a_heterogeneous_genotype(tmp_path):
    assert run(E2E + ['--space', 'nos', '--epochs', '1', '--save', tmp_path]) == 0
    g = genotypes.load(genotype_file=str(tmp_path / 'genotype.json'))
    assert not genotypes.is_classic(g.normal)
    with open(tmp_path / 'log.txt') as f:
        head = f.read().splitlines()[:3]
    assert any('--method gdas on --space nos' in line and 'own combinations' in line for line in head)
    assert read_log(tmp_path)[0]['primitives'] == PRIMITIVES and DARTS_PRIMITIVES[0] == 'none'
