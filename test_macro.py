"""AGNAS's macro search in the ProxylessNAS space (model_macro.py, the chain genotype, --space proxyless,
--subset, retraining a chain): weight counts, block shapes, the gates by hand, derivation, genotype forms,
end-to-end searches with both methods and exact resume, torchrun, ImageFolder data, refusals.

The full-width supernet (30.8M weights) is counted on the meta device; forwards run at width 0.125
(--width_mult), where the same code is cheap on a CPU."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import darts
import datasets
import genotypes
import model_macro
import runs
import train_imagenet
import train_search
import utils
import visualize
from genotypes import AGNAS_PROXYLESS, CHAIN_BLOCKS, ChainGenotype, GenotypeError
from model_macro import ChoiceLayer, MacroNetwork, MacroSupernet, MBConv
from test_train_search import kill_and_resume, read_log

HERE = os.path.dirname(os.path.abspath(__file__))
RELEASED_IDS = [1, 1, -1, 2, 1, -1, 5, 1, 1, -1, 5, 1, 1, -1, 1, 4, 3, -1, 5, 5, 5]  # the authors' valid.py
# (C_in, C_out, stride) of the 21 searchable layers, typed from the space's definition (AGNAS Sec. 5.3)
LAYERS = ([(24, 32, 2)] + [(32, 32, 1)] * 3 + [(32, 56, 2)] + [(56, 56, 1)] * 3 + [(56, 112, 2)]
          + [(112, 112, 1)] * 3 + [(112, 128, 1)] + [(128, 128, 1)] * 3 + [(128, 256, 2)] + [(256, 256, 1)] * 3
          + [(256, 432, 1)])


def meta(build):
    with torch.device('meta'):
        return build()


# ---------------------------------------------------------------------------------------------------------
# Weight counts and shapes


def test_weight_counts_of_the_supernet_and_the_released_architecture():
    """docs/macro.md (verified against the authors' code): supernet 30,778,976 weights, 3,094,656 of them in
    the attention modules; the released architecture 6,728,936."""
    sup = meta(lambda: MacroSupernet(1000))
    attention = sum(p.numel() for n, p in sup.named_parameters() if '.attention.' in n)
    assert utils.count_params(sup) == 30_778_976 and attention == 3_094_656
    # the same attention count by hand: per layer W1 (mC x mC//16) and W2, m = 6 blocks (+1 skip)
    by_hand = sum(2 * (m * c) * (m * c // 16) for c, m in
                  ((c_out, 6 + (c_in == c_out and s == 1)) for c_in, c_out, s in LAYERS))
    assert by_hand == attention
    darts_sup = meta(lambda: MacroSupernet(1000, method='darts'))
    assert utils.count_params(darts_sup) == 30_778_976 - 3_094_656  # alphas are not weights
    assert darts_sup.alphas.shape == (21, 7)
    assert utils.count_params(meta(lambda: MacroNetwork(AGNAS_PROXYLESS))) == 6_728_936


def test_layer_table_and_skip_candidates():
    assert [(c_in, c_out, s) for c_in, c_out, s, _ in genotypes.chain_layers()] == LAYERS
    assert model_macro.layer_specs('imagenet') == LAYERS
    cifar = model_macro.layer_specs('cifar')
    assert cifar[0] == (24, 32, 1) and cifar[1:] == LAYERS[1:]  # only the first group's stride differs
    assert [genotypes.skip_allowed(i) for i in range(21)] == [c_in == c_out and s == 1 for c_in, c_out, s in LAYERS]
    assert sum(genotypes.skip_allowed(i) for i in range(21)) == 15


@pytest.mark.parametrize('name', CHAIN_BLOCKS)
@pytest.mark.parametrize('c_in, c_out, stride', [(24, 32, 2), (32, 32, 1), (112, 128, 1)])
def test_each_block_has_its_shape_and_stride(name, c_in, c_out, stride):
    k, e = int(name[1]), int(name[3])
    b = meta(lambda: model_macro.block(name, c_in, c_out, stride))
    convs = [m for m in b.modules() if isinstance(m, nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(c_in * e, c_in, 1, 1), (c_in * e, 1, k, k), (c_out, c_in * e, 1, 1)]
    assert [c.stride for c in convs] == [(1, 1), (stride, stride), (1, 1)] and convs[1].groups == c_in * e
    assert sum(isinstance(m, nn.BatchNorm2d) for m in b.modules()) == 3
    assert sum(isinstance(m, nn.ReLU6) for m in b.modules()) == 2  # none after the linear projection
    assert b.residual == (stride == 1 and c_in == c_out)
    x = torch.randn(2, c_in, 8, 8, device='meta')
    assert b(x).shape == (2, c_out, 8 // stride, 8 // stride)


def test_a_block_adds_its_input_only_where_it_keeps_the_shape():
    for c_in, c_out, stride in ((8, 8, 1), (8, 8, 2), (8, 16, 1)):
        b = model_macro.block('k3e3', c_in, c_out, stride).eval()
        last_bn = b.conv[-1]
        nn.init.zeros_(last_bn.weight)
        nn.init.zeros_(last_bn.bias)  # the block's own path now outputs 0
        x = torch.randn(2, c_in, 8, 8)
        out = b(x)
        assert torch.equal(out, x) if (c_in, c_out, stride) == (8, 8, 1) else not out.any()


def test_fixed_first_block_and_the_network_ends():
    first = MBConv(40, 24, 3, 1, 1)  # expansion 1: no expansion conv
    assert [tuple(c.weight.shape) for c in first.modules() if isinstance(c, nn.Conv2d)] == [(40, 1, 3, 3), (24, 40, 1, 1)]
    sup = meta(lambda: MacroSupernet(1000))
    assert sup.stem[0].weight.shape == (40, 3, 3, 3) and sup.stem[0].stride == (2, 2)
    assert sup.head[0].weight.shape == (1728, 432, 1, 1) and sup.classifier.weight.shape == (1000, 1728)
    for layout, size, strides, last in (('imagenet', 64, 32, 2), ('cifar', 32, 8, 4)):  # 224 -> 7; 32 -> 4
        small = MacroSupernet(10, layout=layout, width_mult=0.125)
        assert small.stem[0].stride == ((2, 2) if layout == 'imagenet' else (1, 1))
        maps = {}
        small.layers[-1].register_forward_hook(lambda m, i, o, maps=maps: maps.update(last=o.shape))
        assert small(torch.randn(1, 3, size, size)).shape == (1, 10)
        assert maps['last'] == (1, 54, last, last) and size // strides == last  # 432 x 0.125 = 54 channels


def test_attention_hidden_width_is_m_c_over_16_rounded_down():
    sup = meta(lambda: MacroSupernet(1000))
    widths = [(layer.attention.fc1.in_features, layer.attention.fc1.out_features) for layer in sup.layers]
    assert widths[0] == (6 * 32, 12) and widths[1] == (7 * 32, 14)
    assert widths[5] == (7 * 56, 24)   # 392 // 16 = 24 (392 / 16 = 24.5)
    assert widths[20] == (6 * 432, 162)
    assert all(layer.attention.fc2.weight.shape == (i, h) for layer, (i, h) in zip(sup.layers, widths))


def test_released_architecture_multiply_adds_by_hand():
    """Multiply-adds at 224x224, counted by hand (each conv: C_out * C_in / groups * k^2 * H_out * W_out),
    against utils.count_macs; over the mobile setting's 600M (the authors' lookup table: 660.9M FLOPs)."""
    def conv(c_in, c_out, k, hw_out, groups=1):
        return c_out * c_in // groups * k * k * hw_out * hw_out

    total = conv(3, 40, 3, 112) + conv(40, 40, 3, 112, 40) + conv(40, 24, 1, 112)
    hw = 112
    for name, (c_in, c_out, s) in zip(AGNAS_PROXYLESS.layers, LAYERS):
        if name == 'skip':
            continue
        k, e = genotypes.block_shape(name)
        h = c_in * e
        total += conv(c_in, h, 1, hw) + conv(h, h, k, hw // s, h) + conv(h, c_out, 1, hw // s)
        hw //= s
    total += conv(432, 1728, 1, 7) + 1728 * 1000
    net = meta(lambda: MacroNetwork(AGNAS_PROXYLESS))
    assert utils.count_macs(net, (1, 3, 224, 224)) == total
    assert 600e6 < total < 661e6


# ---------------------------------------------------------------------------------------------------------
# The gates, by hand


def small_layer(gated=True):
    torch.manual_seed(0)
    layer = ChoiceLayer(4, 4, 1, gated).double()   # 7 candidates x 4 channels, hidden 28 // 16 = 1
    for m in layer.modules():
        if isinstance(m, nn.BatchNorm2d):  # random statistics, so the blocks differ
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return layer.eval()


def test_gates_by_hand_on_a_tiny_layer():
    """Eq. 4-8 stated literally: concat the candidates' outputs on channels, GAP, W1, ReLU, W2, sigmoid,
    slice per candidate, gated sum; and the mean gate = raw sum / (images x C)."""
    layer = small_layer()
    assert layer.attention.fc1.weight.shape == (1, 28)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    outs = [b(x) for b in layer.blocks] + [x]
    f_con = torch.cat(outs, 1)                                           # (N, 7C, H, W)
    z = f_con.mean((2, 3))                                               # GAP
    w1, w2 = layer.attention.fc1.weight, layer.attention.fc2.weight
    gates = torch.sigmoid(torch.relu(z @ w1.T) @ w2.T)                   # (N, 7C)
    expected = sum(gates[:, 4 * k:4 * (k + 1), None, None] * outs[k] for k in range(7))
    layer.collecting = True
    layer.reset_importance()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    raw = [gates[:, 4 * k:4 * (k + 1)].sum().item() for k in range(7)]
    np.testing.assert_allclose(layer.mean_gates() * 3 * 4, raw, rtol=1e-12)


def test_zeroed_attention_gives_one_half_and_a_darts_layer_takes_its_weights():
    layer = small_layer()
    nn.init.zeros_(layer.attention.fc2.weight)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    outs = [b(x) for b in layer.blocks] + [x]
    torch.testing.assert_close(layer(x), 0.5 * sum(outs), rtol=0, atol=1e-12)
    plain = small_layer(gated=False)
    w = torch.softmax(torch.randn(7, dtype=torch.float64), 0)
    torch.testing.assert_close(plain(x, w), sum(wk * b(x) for wk, b in zip(w, plain.blocks)) + w[6] * x)


def test_darts_weights_mask_the_missing_skip():
    sup = MacroSupernet(10, method='darts', layout='cifar', width_mult=0.125)
    with torch.no_grad():
        sup.alphas.copy_(torch.arange(21 * 7, dtype=torch.float32).view(21, 7) % 3)
    w = sup.layer_weights()
    assert len(w[0]) == 6 and len(w[1]) == 7  # layer 0 changes shape: no skip
    row = torch.arange(7, dtype=torch.float32) % 3  # layer 0's row is 0 1 2 0 1 2 | 0
    torch.testing.assert_close(w[0], torch.softmax(row[:6], 0))
    table = sup.arch_weights()
    assert table[0, 6] == 0 and abs(table[0].sum() - 1) < 1e-12 and abs(table[1].sum() - 1) < 1e-12


# ---------------------------------------------------------------------------------------------------------
# Derivation


def test_derivation_on_a_hand_made_table():
    t = np.full((21, 7), 0.1)
    t[np.arange(21), np.arange(21) % 6] = 0.5        # layer i prefers block i % 6
    t[2, 6] = 0.9                                      # layer 2 has a skip, and it wins: the layer goes
    t[0, 6] = 0.99                                     # layer 0 has no skip: its skip column is ignored
    t[4, 6] = 0.99                                     # nor has layer 4
    t[7, :] = 0.3                                      # a tie: the lower column
    g = model_macro.derive_chain(t)
    expected = [CHAIN_BLOCKS[i % 6] for i in range(21)]
    expected[2], expected[7] = 'skip', 'k3e3'
    assert g == ChainGenotype(layers=expected)
    assert genotypes.validate(g) == g
    assert model_macro.derive_chain(np.full((21, 7), 0.2)).layers == ['k3e3'] * 21
    with pytest.raises(ValueError, match=r'\(21, 7\)'):
        model_macro.derive_chain(np.zeros((20, 7)))


def test_supernet_genotype_takes_a_table_and_its_own_gates():
    sup = MacroSupernet(10, layout='cifar', width_mult=0.125).eval()
    t = np.zeros((21, 7))
    t[:, 3] = 1
    assert sup.genotype(t).layers == ['k5e6'] * 21
    for layer in sup.layers:
        layer.collecting = True
    sup.reset_importance()
    with torch.no_grad():
        sup(torch.randn(2, 3, 32, 32))
    table = sup.importance()
    assert table.shape == (21, 7) and (table[[0, 4, 8, 12, 16, 20], 6] == 0).all()
    assert ((table[:, :6] > 0) & (table[:, :6] < 1)).all()
    assert sup.genotype() == model_macro.derive_chain(table)


def test_forcing_every_layer_computes_the_derived_network_with_the_supernet_weights():
    """model.force(genotype) (for the discretisation diagnostic): each layer runs its chosen block alone, a
    skip passes its input on; with the chosen blocks' weights, MacroNetwork computes the same."""
    torch.manual_seed(1)
    sup = MacroSupernet(10, layout='cifar', width_mult=0.125).double().eval()
    net = MacroNetwork(AGNAS_PROXYLESS, 10, layout='cifar', width_mult=0.125).double().eval()
    for part in ('stem', 'first', 'head', 'classifier'):
        getattr(net, part).load_state_dict(getattr(sup, part).state_dict())
    kept = [(i, CHAIN_BLOCKS.index(b)) for i, b in enumerate(AGNAS_PROXYLESS.layers) if b != 'skip']
    for j, (i, k) in enumerate(kept):
        net.layers[j].load_state_dict(sup.layers[i].blocks[k].state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    mixed = sup(x)
    with sup.forced(AGNAS_PROXYLESS):
        torch.testing.assert_close(sup(x), net(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(sup(x), mixed, rtol=0, atol=0)  # restored
    previous = sup.force(['k7e6'] + [None] * 20)  # one layer forced, the others keep mixing
    assert previous == [None] * 21 and sup.layers[0].forced == 5 and sup.layers[1].forced is None
    with pytest.raises(ValueError, match='layer 0 .* no candidate'):
        sup.force(['skip'] + [None] * 20)


# ---------------------------------------------------------------------------------------------------------
# The chain genotype


def test_released_architecture_round_trips_and_builds():
    g = genotypes.macro_from_ids(RELEASED_IDS)
    assert g == AGNAS_PROXYLESS and genotypes.macro_to_ids(g) == RELEASED_IDS
    assert genotypes.macro_from_ids(' '.join(map(str, RELEASED_IDS))) == g
    assert genotypes.load(arch='ids:' + ','.join(map(str, RELEASED_IDS))) == g
    assert genotypes.load(arch='AGNAS_PROXYLESS') == g
    assert genotypes.from_json(genotypes.to_json(g)) == g
    assert json.loads(genotypes.to_json(g)) == {'chain': True, 'layers': g.layers}
    assert eval(repr(g), vars(genotypes)) == g  # the repr pastes back
    net = MacroNetwork(g, 10, layout='cifar', width_mult=0.125)
    assert len(net.layers) == 21 - 5 and net(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(GenotypeError, match='no cells'):
        genotypes.cell_genotype(g, 0, 14)


@pytest.mark.parametrize('layers, words', [
    (AGNAS_PROXYLESS.layers[:20], ['21 layers', 'got 20']),
    (['k9e6'] + AGNAS_PROXYLESS.layers[1:], ['layer 0 (group 1: 24 -> 32 channels, stride 2)', "'k9e6'"]),
    (AGNAS_PROXYLESS.layers[:4] + ['skip'] + AGNAS_PROXYLESS.layers[5:],
     ['layer 4 (group 2: 32 -> 56 channels, stride 2)', 'cannot be a skip', 'changes the shape']),
    (AGNAS_PROXYLESS.layers[:12] + ['skip'] + AGNAS_PROXYLESS.layers[13:], ['layer 12', '112 -> 128']),
])
def test_bad_chain_genotype_names_the_layer(layers, words, tmp_path):
    with pytest.raises(GenotypeError) as e:
        genotypes.validate(ChainGenotype(layers))
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    path = tmp_path / 'g.json'
    path.write_text(json.dumps({'chain': True, 'layers': layers}))
    with pytest.raises(GenotypeError):
        genotypes.load(genotype_file=str(path))


@pytest.mark.parametrize('ids, words', [
    ('1,2,3', ['21 block ids, got 3']),
    ('-1' + ',0' * 20, ['layer 0', 'cannot be a skip']),
    (','.join(['0'] * 20 + ['6']), ['layer 20', 'block id 6', '-1 (skip), 0..5']),
    ('1,1,x', ['integers separated by commas']),
])
def test_bad_ids(ids, words):
    with pytest.raises(GenotypeError) as e:
        genotypes.load(arch='ids:' + ids)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


# ---------------------------------------------------------------------------------------------------------
# The search recipe


def test_space_defaults_and_refusals_of_flags():
    args = train_search.parse_args(['--space', 'proxyless', '--method', 'agnas', '--dataset', 'imagenet'])
    assert (args.epochs, args.batch_size, args.learning_rate, args.learning_rate_min) == (120, 512, 0.25, 5e-4)
    assert (args.lr_schedule, args.weight_decay, args.weight_decay_on) == ('linear', 4e-5, 'conv_fc')
    assert (args.label_smoothing, args.grad_clip, args.grad_clip_by, args.lambda_at) == (0.1, 5., 'value', 0.)
    assert args.subset == 0.1 and args.train_portion is None and args.layers is None
    darts_args = train_search.parse_args(['--space', 'proxyless', '--dataset', 'synthetic'])  # darts: ours
    assert darts_args.lambda_at == 0 and darts_args.epochs == 120 and darts_args.train_portion == 0.5
    cells = train_search.parse_args(['--space', 'darts'])
    assert (cells.lr_schedule, cells.weight_decay, cells.grad_clip_by, cells.layers) == ('cosine', 3e-4, 'norm', 8)


def test_weight_decay_only_on_convolutions_and_classifier():
    sup = MacroSupernet(10, layout='cifar', width_mult=0.125)
    plain, decayed = utils.decay_groups(sup, sup.weights(), 4e-5, 'conv_fc')
    names = {id(p): n for n, p in sup.named_parameters()}
    assert decayed['weight_decay'] == 4e-5 and plain['weight_decay'] == 0
    assert {names[id(p)] for p in decayed['params']} == {n for n, p in sup.named_parameters()
                                                        if p.dim() == 4 or n.startswith('classifier.')}
    assert all('attention' in names[id(p)] or p.dim() == 1 for p in plain['params'])
    assert len(plain['params']) + len(decayed['params']) == len(sup.weights())


def test_clip_by_value_and_the_linear_schedule():
    model = MacroSupernet(10, layout='cifar', width_mult=0.125)
    opt = torch.optim.SGD(model.weights(), 0.)
    with torch.no_grad():
        model.classifier.weight.mul_(1e4)  # huge logits: huge gradients
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    darts.weight_step(model, opt, x, y, None, 0., 0.01, clip_by='value')
    grads = torch.cat([p.grad.flatten() for p in model.weights() if p.grad is not None])
    assert grads.abs().max() == pytest.approx(0.01)  # at least one entry was clipped, none beyond
    args = train_search.parse_args(['--space', 'proxyless', '--dataset', 'synthetic', '--epochs', '4'])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], args.learning_rate)
    sched = train_search.make_scheduler(opt, args)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]['lr'])
        opt.step()
        sched.step()
    step = (0.25 - 5e-4) / 4
    assert lrs == pytest.approx([0.25, 0.25 - step, 0.25 - 2 * step, 0.25 - 3 * step], rel=1e-12)


def test_class_balanced_subset_is_disjoint_and_seeded():
    targets = [c for c in range(3) for _ in range(40)] + [3] * 20
    w, a = datasets.class_balanced_split(targets, 0.1)
    assert not set(w) & set(a) and w == sorted(w)
    t = np.asarray(targets)
    # per class: round(0.1 n) for the weights, round(0.025 n) for the architecture (20 images: 2 and 0)
    assert np.bincount(t[w]).tolist() == [4, 4, 4, 2] and np.bincount(t[a], minlength=4).tolist() == [1, 1, 1, 0]
    assert datasets.class_balanced_split(targets, 0.1) == (w, a)  # the same images every time
    assert datasets.class_balanced_split(targets, 0.5)[0] != w
    with pytest.raises(utils.UserError, match='none for the architecture'):
        datasets.class_balanced_split([0, 0, 1, 1], 0.5)


# ---------------------------------------------------------------------------------------------------------
# End to end: the CIFAR-sized search (this repo's variant) with both methods, exact resume


run = utils.exit_code  # (main, argv) -> the exit code the command line would give
TINY = ['--dataset', 'synthetic', '--device', 'cpu', '--workers', '0', '--space', 'proxyless', '--width_mult',
        '0.125', '--batch_size', '8', '--synthetic_size', '16', '--report_freq', '0']


def tiny(method: str, epochs: int) -> list:
    """The cheapest chain search: 8 images for the weights (one step), 8 for the architecture."""
    return TINY + ['--method', method, '--epochs', str(epochs)]


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    """Uninterrupted 2-epoch searches, one per method (also the references of the resume tests)."""
    runs_ = {}

    def get(method):
        if method not in runs_:
            save = tmp_path_factory.mktemp(method) / 'straight'
            assert run(train_search.main, tiny(method, 2) + ['--save', save]) == 0
            runs_[method] = save
        return runs_[method]
    return get


@pytest.mark.parametrize('method', ['agnas', 'darts'])
def test_search_writes_a_chain_and_resumes_bit_identical(method, straight, tmp_path, monkeypatch):
    straight, resumed = straight(method), tmp_path / 'resumed'
    argv = tiny(method, 2)
    g = genotypes.load(genotype_file=str(straight / 'genotype.json'))
    assert isinstance(g, ChainGenotype)
    log = read_log(straight)
    r = log[-1]
    assert [x['epoch'] for x in log] == [1, 2] and r['space'] == 'proxyless' and r['method'] == method
    assert r['primitives'] == CHAIN_BLOCKS + ['skip'] and np.array(r['importance']['layers']).shape == (21, 7)
    assert genotypes.from_json(json.dumps(r['genotype'])) == g == model_macro.derive_chain(r['importance']['layers'])
    if method == 'agnas':
        assert r['importance_images'] == 8 and 'val_acc' in r
    ckpt = runs.load_checkpoint(str(straight / 'checkpoint.pt'))
    assert ckpt['settings']['space'] == 'proxyless' and ckpt['settings']['width_mult'] == 0.125
    assert ckpt['settings']['grad_clip_by'] == 'value' and ckpt['args']['lr_schedule'] == 'linear'

    # the run dies right after its first checkpoint, then resumes
    kill_and_resume(monkeypatch, train_search.main, argv + ['--save', resumed])
    a, b = (runs.load_checkpoint(str(d / 'checkpoint.pt')) for d in (straight, resumed))
    assert a['epoch'] == b['epoch'] == 2 and a['model'].keys() == b['model'].keys()
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert (straight / 'genotype.json').read_text() == (resumed / 'genotype.json').read_text()
    assert [x['importance'] for x in read_log(straight)] == [x['importance'] for x in read_log(resumed)]


def test_visualize_draws_the_chain_and_the_importance_tables(tmp_path, capsys):
    visualize.main(['AGNAS_PROXYLESS', '--out', str(tmp_path / 'released')])
    dot = (tmp_path / 'released' / 'chain.dot').read_text()
    assert dot.count('MBConv k') == 21 - 5 + 1 and dot.count(': skip') == 5  # + the fixed first block
    assert '2: skip' in dot and '6: MBConv k7 e6\\ns2, 32 -> 56' not in dot and '6: MBConv k7 e6\\ns1, 56 -> 56' in dot
    assert '0: MBConv k3 e6\\ns2, 24 -> 32' in dot and '20: MBConv k7 e6\\ns1, 256 -> 432' in dot
    capsys.readouterr()


@pytest.mark.skipif(not __import__('importlib').util.find_spec('matplotlib'), reason='needs matplotlib')
def test_visualize_plots_a_search_folder(straight, tmp_path):
    visualize.main([str(straight('agnas')), '--out', str(tmp_path / 'plots')])
    assert {'chain.dot', 'importance_layers.png'} <= set(os.listdir(tmp_path / 'plots'))


# ---------------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize('extra, words', [
    (['--method', 'eoinas'], ['--space proxyless runs --method darts or agnas', '--method eoinas']),
    (['--layers', '8'], ['--layers applies to the cell spaces', 'drop --layers']),
    (['--stage_cell', 'last'], ['--stage_cell applies to the cell spaces']),
    (['--lambda_at', '10'], ['--lambda_at 10', 'teacher']),
    (['--subset', '0.9'], ['--subset must be']),
    (['--subset', '0'], ['--subset must be']),
    (['--subset', '0.5', '--train_portion', '0.5'], ['--subset', '--train_portion', 'give one of the two']),
    (['--width_mult', '0.03'], ['--width_mult 0.03', 'the width of the group before it']),
    (['--grad_clip_by', 'max'], ["--grad_clip_by 'max'", 'norm, value']),
])
def test_refused_flags_exit_2_with_one_sentence(tmp_path, capsys, extra, words):
    argv = [a for a in TINY if a not in ('--width_mult', '0.125')]
    argv += extra + (['--method', 'agnas'] if '--method' not in extra else [])
    assert run(train_search.main, argv + ['--save', tmp_path]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1, err
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize('extra, words', [
    (['--space', 'darts', '--dataset', 'imagenet'], ['--dataset imagenet searches the ProxylessNAS chain']),
    (['--space', 'darts', '--width_mult', '0.5'], ['--width_mult scales the ProxylessNAS chain']),
])
def test_cell_space_refusals(tmp_path, capsys, extra, words):
    assert run(train_search.main, ['--device', 'cpu', '--lambda_at', '0'] + extra + ['--save', tmp_path]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and all(w in err for w in words), err


# ---------------------------------------------------------------------------------------------------------
# Your own images, --subset, ImageNet's pipeline


def make_folder(root, splits, classes=('ant', 'bee', 'cat'), n=8, size=32):
    rng = np.random.default_rng(0)
    for split in splits:
        for label in classes:
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    root / split / label / f'{i}.png')
    return root


def test_tiny_image_folder_search_with_subset(tmp_path, capsys):
    data = make_folder(tmp_path / 'data', ['train'])
    save = tmp_path / 'search'
    argv = ['--dataset', 'folder', '--data', data, '--subset', '0.5', '--device', 'cpu', '--workers', '0',
            '--space', 'proxyless', '--method', 'agnas', '--width_mult', '0.125', '--batch_size', '12',
            '--epochs', '1', '--report_freq', '0', '--save', save]
    assert run(train_search.main, argv) == 0
    log = (save / 'log.txt').read_text()
    assert '12 images train the weights, 3 the architecture (--subset 0.5)' in log  # 4 + 1 of each class's 8
    assert read_log(save)[-1]['importance_images'] == 3
    assert isinstance(genotypes.load(genotype_file=str(save / 'genotype.json')), ChainGenotype)
    capsys.readouterr()


def test_imagenet_search_data_keeps_the_evaluation_transform_for_the_architecture(tmp_path):
    data = make_folder(tmp_path / 'imagenet', ['train'], n=8, size=40)
    args = train_search.parse_args(['--space', 'proxyless', '--method', 'agnas', '--dataset', 'imagenet',
                                    '--data', str(data), '--subset', '0.5'])
    train_search.check_args(args)
    weights, arch, plain, classes = train_search.search_data(args, None)
    assert classes == 3 and len(weights) == 12 and len(arch) == len(plain) == 3
    assert not set(weights.indices) & set(arch.indices)
    assert weights[0][0].shape == arch[0][0].shape == (3, 224, 224)
    assert torch.equal(arch[0][0], arch[0][0])            # resize 256, centre crop 224: no randomness
    assert not torch.equal(weights[0][0], weights[0][0])  # random resized crop, flip, colour jitter
    assert model_macro.search_layout('imagenet', 32) == 'imagenet' and model_macro.search_layout('folder', 32) == 'cifar'


# ---------------------------------------------------------------------------------------------------------
# Retraining a chain


def test_train_imagenet_builds_the_chain_with_the_authors_recipe(tmp_path, monkeypatch, capsys):
    data = make_folder(tmp_path / 'imagenet', ['train', 'val'], n=2)
    # the recipe and the script's path, at width 0.125 (the full network's figures are tested above)
    monkeypatch.setattr(train_imagenet, 'MacroNetwork',
                        lambda g, n: MacroNetwork(g, n, width_mult=0.125))
    save = tmp_path / 'eval'
    result = train_imagenet.main(['--arch', 'AGNAS_PROXYLESS', '--data', str(data), '--device', 'cpu', '--workers',
                                  '0', '--batch_size', '2', '--report_freq', '0', '--epochs', '1', '--save',
                                  str(save)])
    log = (save / 'log.txt').read_text()
    assert 'lr 0.000976562 (= 0.5 x 2 / 1024), 0 warm-up epochs' in log
    assert result['weight_decay'] == 4e-5 and result['epochs'] == 1
    ckpt = runs.load_checkpoint(str(save / 'checkpoint.pt'))
    assert ckpt['args']['auxiliary'] is False and ckpt['args']['warmup_epochs'] == 0
    assert [g['weight_decay'] for g in ckpt['optimizer']['param_groups']] == [0., 4e-5]
    assert genotypes.load(genotype_file=str(save / 'genotype.json')) == AGNAS_PROXYLESS
    args = train_imagenet.build_parser().parse_args(['--arch', 'AGNAS_PROXYLESS'])
    assert args.epochs is None  # filled from CHAIN_PRESET: 240
    assert train_imagenet.CHAIN_PRESET['epochs'] == 240 and train_imagenet.CHAIN_PRESET['reference_batch'] == 1024
    capsys.readouterr()


def test_train_cifar_retrains_a_searched_chain(straight, tmp_path, monkeypatch, capsys):
    """The CIFAR-sized chain (this repo's): train_cifar.py builds MacroNetwork in the 32x32 layout."""
    import train_cifar
    built = {}

    def small(g, n, layout):
        built['layout'] = layout
        return MacroNetwork(g, n, layout=layout, width_mult=0.125)
    monkeypatch.setattr(train_cifar, 'MacroNetwork', small)
    genotype = str(straight('agnas') / 'genotype.json')
    base = ['--genotype_file', genotype, '--dataset', 'synthetic', '--device', 'cpu', '--workers', '0',
            '--batch_size', '8', '--synthetic_size', '16', '--epochs', '1', '--report_freq', '0']
    assert run(train_cifar.main, base + ['--save', tmp_path / 'eval']) == 0
    assert built == {'layout': 'cifar'} and 'final test_error=' in capsys.readouterr().out
    assert run(train_cifar.main, base + ['--auxiliary', '--save', tmp_path / 'aux']) == 2
    assert '--auxiliary applies to cell genotypes' in capsys.readouterr().err


@pytest.mark.parametrize('extra, words', [(['--layers', '14'], ['--layers applies to cell genotypes']),
                                          (['--drop_path_prob', '0.1'], ['--drop_path_prob applies to cells'])])
def test_train_imagenet_refuses_cell_flags_with_a_chain(extra, words, tmp_path, capsys):
    assert utils.exit_code(train_imagenet.main, ['--arch', 'ids:' + ','.join(map(str, RELEASED_IDS)), '--data',
                                                 str(tmp_path), '--device', 'cpu'] + extra) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and all(w in err for w in words), err


# ---------------------------------------------------------------------------------------------------------
# torchrun: one architecture on both ranks


def test_two_processes_end_with_one_architecture(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        env.pop(k, None)
    argv = tiny('agnas', 1) + ['--debug', '--save', str(tmp_path)]  # --debug: each rank's checksum
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                           'train_search.py', *argv], cwd=HERE, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sums = dict(re.findall(r'rank (\d) arch_sha256=(\w+)', proc.stdout))
    assert set(sums) == {'0', '1'} and sums['0'] == sums['1']
    assert read_log(tmp_path)[-1]['importance_images'] == 8  # the two ranks' halves, added up
    assert math.isfinite(read_log(tmp_path)[-1]['train_ce'])
