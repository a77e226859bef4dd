"""Formula guards that the formula-break audit of issue 21 found missing: each test computes the expected value
independently (by hand, or from a literal typed from the paper or the authors' code) and fails when the line
that implements the formula changes. Tiny configurations; the other formula tests live beside their method."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import darts
import train_search
from model_search_fast import Network
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
