"""Formula guards that the formula-break audit of issue 21 found missing: each test computes the expected value
independently (by hand, or from a literal typed from the paper or the authors' code) and fails when the line
that implements the formula changes. Tiny configurations; the other formula tests live beside their method."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import darts
import model_adwp
import search_adwp
import train_search
from genotypes import DARTS_PRIMITIVES
from model_search_fast import Network
from test_adwp import random_space
from test_genotypes import LITERAL_DARTS_V1, LITERAL_DARTS_V2
from test_train_search import TINY


def at_map(f):
    """at(F) by hand: the channel mean of F^2, flattened, divided by its L2 norm."""
    m = f.pow(2).mean(dim=1).flatten(1)
    return m / m.norm(dim=1, keepdim=True)


def test_search_loss_is_ce_plus_lambda_times_the_attention_transfer_loss():
    """NOS Eq. 12-13: CE + lambda * 1/2 sum_stages mean((at(S) - at(T))^2), lambda 250 here."""
    torch.manual_seed(0)
    model = Network(4, 10, 3, space='darts').double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 7])
    with torch.no_grad():
        logits, stages = model.forward_stages(x)  # batch statistics: the same output on every forward
    teacher = [torch.randn_like(s) for s in stages]
    total, ce, at, _ = darts.search_loss(model, x, y, teacher, 250.)
    ce_hand = -F.log_softmax(logits, dim=1)[torch.arange(2), y].mean()
    at_hand = 0.5 * sum(((at_map(s) - at_map(t)) ** 2).mean() for s, t in zip(stages, teacher))
    assert at_hand > 0
    torch.testing.assert_close(ce.detach(), ce_hand, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(at.detach().double(), at_hand, rtol=1e-5, atol=1e-7)  # at(F) runs in float32
    torch.testing.assert_close(total.detach(), ce_hand + 250. * at_hand, rtol=1e-5, atol=1e-5)


def test_masked_softmax_renormalises_over_the_alive_ops():
    """EoiNAS Eq. 2 over the alive ops: exp(a_o) / sum over alive q of exp(a_q), pruned entries exactly 0;
    the network's arch_weights() and its (non-sampled) edge weights are that softmax."""
    model = Network(4, 10, 3, space='darts')
    a = torch.tensor([1., 2., 0.5, -1., 0., 3., 0.25, 2.5])
    alive = torch.tensor([True, False, True, True, False, True, True, False])
    with torch.no_grad():
        model.alphas_normal.copy_(a.expand(14, 8))
        model.alphas_reduce.copy_(a.flip(0).expand(14, 8))
    model.set_alive(alive.expand(14, 8), torch.ones(14, 8, dtype=torch.bool))
    e = np.exp(np.array([1., 0., 0.5, -1., 0., 3., 0.25, 0.]))
    e[~alive.numpy()] = 0.
    expected = e / e.sum()
    normal, reduce = model.arch_weights()
    np.testing.assert_allclose(normal, np.tile(expected, (14, 1)), rtol=1e-6, atol=1e-12)
    r = np.exp(a.flip(0).numpy().astype(np.float64))
    np.testing.assert_allclose(reduce, np.tile(r / r.sum(), (14, 1)), rtol=1e-6)
    w_normal, _ = model.edge_weights()
    np.testing.assert_allclose(w_normal.detach().numpy(), np.tile(expected, (14, 1)), rtol=1e-6, atol=1e-12)


def method_of(name, extra=()):
    args = train_search.parse_args(TINY + ['--method', name, '--space', 'darts', *extra])
    train_search.check_args(args)
    torch.manual_seed(0)
    cls = train_search.METHODS[name]
    model = cls.build_model(args, 10)
    return model, cls(model, args)


@pytest.mark.parametrize('name, clip', [('darts', 0.), ('eoinas', 5.), ('gdas', 0.)])
def test_architecture_optimizer_is_darts_adam(name, clip):
    """DARTS's architect.py: Adam on A with betas (0.5, 0.999), lr --arch_learning_rate, weight decay 1e-3;
    EoiNAS's code clips A's gradient norm at 5 (ts.py), DARTS and GDAS do not clip."""
    _, method = method_of(name, ['--arch_learning_rate', '0.0007'])
    opt = method.architect.optimizer
    assert isinstance(opt, torch.optim.Adam)
    group = opt.param_groups[0]
    assert group['betas'] == (0.5, 0.999) and group['lr'] == 0.0007 and group['weight_decay'] == 1e-3
    assert method.architect.arch_grad_clip == clip


def test_gdas_has_no_skip_dropout_in_any_epoch():
    """GDAS as published: no dropout after skip_connect (EoiNAS adds it), whatever the epoch."""
    model, method = method_of('gdas', ['--epochs', '250'])
    holders = [m for m in model.modules() if hasattr(m, 'skip_dropout')]
    assert holders
    for epoch in (0, 1, 124, 249):
        method.start_epoch(epoch)
        assert model._skip_dropout == 0. and all(m.skip_dropout == 0. for m in holders)


def test_held_out_accuracy_is_the_eval_mode_top1_over_the_whole_half():
    """val_acc_end / val_ce_end (ADWPNAS Eq. 3's epsilon, summarize --select val): every image of the held-out
    half, in eval mode (running BN statistics, DARTS's infer), computed here in one eval forward."""
    torch.manual_seed(0)
    model = Network(4, 10, 3, space='darts')
    with torch.no_grad():
        model(3. * torch.randn(8, 3, 8, 8) + 1.)  # running statistics now differ from any batch's
    x, y = torch.randn(10, 3, 8, 8), torch.randint(10, (10,))
    data = torch.utils.data.TensorDataset(x, y)
    model.train()
    out = train_search.held_out_accuracy(model, data, 4, 0, False, torch.device('cpu'), torch.float32)
    assert model.training  # the search goes on in training mode
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert out['val_acc_end'] == pytest.approx(100. * (logits.argmax(1) == y).double().mean().item(), abs=1e-9)
    assert out['val_ce_end'] == pytest.approx(F.cross_entropy(logits.double(), y).item(), rel=1e-5)


def test_unrolled_weights_take_darts_virtual_momentum_sgd_step():
    """DARTS's second order (architect.py _compute_unrolled_model): w' = w - eta (momentum * buf + dL/dw + wd w),
    with the SGD momentum buffers of a real step before it, computed here by hand."""
    torch.manual_seed(0)
    model = Network(4, 10, 3, space='darts').double()
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(10, (4,))
    xv, yv = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(10, (4,))
    eta, wd, mom = 0.1, 3e-4, 0.9
    optimizer = torch.optim.SGD(model.weights(), eta, momentum=mom, weight_decay=wd)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()  # every weight now has a momentum buffer
    architect = darts.Architect(model, momentum=mom, weight_decay=wd, arch_learning_rate=0., arch_weight_decay=0.,
                                unrolled=True)
    w = [p.detach().clone() for p in model.weights()]
    g = torch.autograd.grad(F.cross_entropy(model(x), y), model.weights())
    bufs = [optimizer.state[p]['momentum_buffer'].clone() for p in model.weights()]
    assert all(b.abs().sum() > 0 for b in bufs[:3])
    architect._unrolled_grads(x, y, None, xv, yv, None, eta, optimizer)
    for p, gp, b, q in zip(w, g, bufs, architect.unrolled_model.weights()):
        torch.testing.assert_close(q.detach(), p - eta * (mom * b + gp + wd * p), rtol=1e-9, atol=1e-12)


def test_darts_step_moves_a_on_the_validation_batch_first():
    """One first-order DARTS iteration (NOS Eq. 13 then Eq. 12): A's Adam step on the validation batch's CE at
    the current weights (Adam's first step: lr * g / (|g| + eps)), then the weight step; computed here on a
    copy of the network."""
    model, method = method_of('darts', ['--lambda_at', '0', '--arch_weight_decay', '0'])
    model.double()  # in place: the architect's Adam keeps the same parameters
    g = torch.Generator().manual_seed(2)
    x, xv = (torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    y, yv = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7])
    twin = copy.deepcopy(model)
    val_ce = F.cross_entropy(twin(xv), yv)
    grads = torch.autograd.grad(val_ce, twin.arch_parameters())
    lr = method.architect.optimizer.param_groups[0]['lr']
    expected = [a.detach() - lr * gr / (gr.abs() + 1e-8) for a, gr in zip(twin.arch_parameters(), grads)]
    optimizer = torch.optim.SGD(model.weights(), 0.025, momentum=0.9)
    out = method.step(x, y, xv, yv, None, 0.025, optimizer)
    torch.testing.assert_close(out['val_ce'], val_ce.detach(), rtol=1e-10, atol=1e-12)
    for a, e in zip(model.arch_parameters(), expected):
        torch.testing.assert_close(a.detach(), e, rtol=1e-7, atol=1e-9)


def a_spelling(cell, ops):
    """An A (14 x 8) whose softmax puts each (op, input) pair of a DARTS cell on its edge, the node's first pair
    strongest, every other entry 0 (none included: DARTS's derivation never takes it)."""
    a, start = torch.zeros(14, len(ops)), 0
    for k in range(4):
        for rank, (op, j) in enumerate(cell[2 * k:2 * k + 2]):
            a[start + j, ops.index(op)] = 3. - rank
        start += k + 2
    return a


@pytest.mark.parametrize('name', ['darts', 'gdas'])
def test_darts_family_derives_the_cell_that_a_spells(name):
    """DARTS's derivation (GDAS's too): DARTS_V2's cells (typed from quark0/darts) spelt into A come back."""
    model, method = method_of(name)
    with torch.no_grad():
        model.alphas_normal.copy_(a_spelling(LITERAL_DARTS_V2[0], DARTS_PRIMITIVES))
        model.alphas_reduce.copy_(a_spelling(LITERAL_DARTS_V2[1], DARTS_PRIMITIVES))
    g = method.genotype()
    assert [tuple(p) for p in g.normal] == LITERAL_DARTS_V2[0] and [tuple(p) for p in g.reduce] == LITERAL_DARTS_V2[1]


def test_gdas_a_step_sees_the_validation_batch_through_its_one_hot_sample():
    """GDAS's A step (after the weight step) is a forward of the validation batch with the hard sample's one-hot
    weights (the straight-through forward value): recomputed here on a copy whose softmax is that one-hot."""
    model, method = method_of('gdas', ['--epochs', '250'])
    g = torch.Generator().manual_seed(2)
    x, xv = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(2))
    y, yv = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7])
    optimizer = torch.optim.SGD(model.weights(), 0.025, momentum=0.9, nesterov=True)
    out = method.step(x, y, xv, yv, None, 0.025, optimizer)
    twin = copy.deepcopy(model)
    twin.tau = None
    with torch.no_grad():
        for a, sample in zip(twin.arch_parameters(), model.last_sample):
            a.copy_(1e4 * F.one_hot(sample, a.shape[1]).float())  # softmax: exactly the one-hot
        val_ce = F.cross_entropy(twin(xv), yv)
    torch.testing.assert_close(out['val_ce'], val_ce, rtol=1e-5, atol=1e-6)


def test_adwpnas_stage_1_steps_on_a_fresh_draw_of_alpha():
    """ADWPNAS Stage 1 (Alg. 1, the train phase): each step's loss is the HyperNetwork's CE at a fresh draw
    alpha ~ N(0, std^2) from the epoch's generator, not at the parameter alpha; recomputed here from the same
    draw (lr 0: the step leaves the weights as they were)."""
    torch.manual_seed(0)
    net = model_adwp.HyperNetwork(4, 10, 3, random_space(2))
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    draw = net.sample_alphas(0.5, torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = F.cross_entropy(net(x, draw), y)
        at_parameter = F.cross_entropy(net(x), y)
    w_opt = torch.optim.SGD(net.weights(), 0.)
    a_opt = torch.optim.Adam(net.arch_parameters(), 0.)
    loss, _ = search_adwp.adwp_step(net, 'train', x, y, w_opt, a_opt, alpha_gen=torch.Generator().manual_seed(5),
                                    alpha_std=0.5)
    assert not torch.isclose(expected, at_parameter)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)


def test_eoinas_derives_its_cell_from_the_indicator_not_from_a():
    """EoiNAS §3.3: the cell is DARTS's derivation of I = beta + lambda Ca / Ce. A spells DARTS_V1's cells (beta
    differences below 0.1) while Ca / Ce spells DARTS_V2's (0.5 * 30 per chosen op): V2 must come back."""
    model, method = method_of('eoinas', ['--epochs', '4', '--eoi_warmup', '1', '--prune_every', '1'])
    with torch.no_grad():
        model.alphas_normal.copy_(0.1 * a_spelling(LITERAL_DARTS_V1[0], DARTS_PRIMITIVES))
        model.alphas_reduce.copy_(0.1 * a_spelling(LITERAL_DARTS_V1[1], DARTS_PRIMITIVES))
    method.stats.count.fill_(1.)
    method.stats.acc.copy_(10. * torch.stack([a_spelling(c, DARTS_PRIMITIVES) for c in LITERAL_DARTS_V2]).double())
    g = method.genotype()
    assert [tuple(p) for p in g.normal] == LITERAL_DARTS_V2[0] and [tuple(p) for p in g.reduce] == LITERAL_DARTS_V2[1]


def test_each_cell_type_samples_from_its_own_a():
    """EoiNAS Eq. 5 per cell type: the normal cells' sample is drawn from A_normal, the reduction cells' from
    A_reduce (one sample per forward and type). A row's 50-logit op wins any Gumbel draw in practice."""
    model, method = method_of('eoinas', ['--epochs', '4', '--eoi_warmup', '1', '--prune_every', '1'])
    method.start_epoch(1)
    with torch.no_grad():
        model.alphas_normal.zero_()[:, 1] = 50.
        model.alphas_reduce.zero_()[:, 5] = 50.
    weights = model.edge_weights()
    assert model.last_sample[0].tolist() == [1] * 14 and model.last_sample[1].tolist() == [5] * 14
    assert weights[0].argmax(-1).tolist() == [1] * 14 and weights[1].argmax(-1).tolist() == [5] * 14
