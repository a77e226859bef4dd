"""ADWPNAS (docs/adwpnas.md tests 1-9): stage-0 selection on hand-made matrices, kernel shapes, equivalence
with SepConv/DilConv, the phase gates, locality and seeding, derivation, the per-layer genotype, resume across
phase boundaries, and the pipeline end to end on synthetic data (CPU)."""
import json
import math
import os

import pytest
import torch
from torch import nn

import datasets
import genotypes as G
import model_adwp as M
import runs
import search_adwp
import train_cifar
import train_imagenet
import train_search
import utils
import visualize
from genotypes import DARTS_PRIMITIVES, GenotypeError, MacroGenotype
from model import NetworkCIFAR
from operations import OPS

OP = {name: i for i, name in enumerate(DARTS_PRIMITIVES)}


run = utils.exit_code  # (main, argv) -> the exit code the command line would give


def fails_with(capsys, main, args, *words):
    capsys.readouterr()
    assert run(main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1, err
    for w in words:
        assert w in err, (w, err)
    return err


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def random_space(seed=0, K=6):
    g = torch.Generator().manual_seed(seed)
    return M.derive_intensive_space(*torch.randn(2, 14, 8, generator=g).softmax(-1), K=K)


# ---------------------------------------------------------------------------------------------------------
# 1. Stage 0 on hand-made 14 x 8 matrices


def test_intensive_cell_keeps_top_k_never_none_with_deterministic_ties():
    w = torch.zeros(14, 8, dtype=torch.float64)
    w[:, OP['none']] = 0.9  # the strongest everywhere, never a candidate
    # node 2 reads rows 0 (input 0) and 1 (input 1)
    w[0, OP['sep_conv_3x3']] = w[1, OP['sep_conv_3x3']] = 0.5   # tie across inputs: both fit
    w[1, OP['dil_conv_5x5']] = 0.4
    w[0, OP['max_pool_3x3']] = w[0, OP['avg_pool_3x3']] = 0.3   # tie across ops: both fit
    w[1, OP['avg_pool_3x3']] = w[1, OP['skip_connect']] = 0.2   # tie for the last place: the lower op index
    cell = M.derive_intensive_cell(w, K=6)
    assert cell[0] == [('max_pool_3x3', 0), ('avg_pool_3x3', 0), ('sep_conv_3x3', 0), ('avg_pool_3x3', 1),
                       ('sep_conv_3x3', 1), ('dil_conv_5x5', 1)]
    # every other node is a 0-0 tie among all its candidates: the lowest input, then the lowest op indices
    for node in cell[1:]:
        assert node == [(op, 0) for op in DARTS_PRIMITIVES[1:7]]
    for K in (1, 6, 14):
        assert all(len(node) == K and all(op != 'none' for op, _ in node) for node in M.derive_intensive_cell(w, K))
    with pytest.raises(ValueError, match='shape'):
        M.derive_intensive_cell(w[:, :7])


def _changed(space, changes):
    """A copy of `space` where each (kind, node, slot) candidate is replaced by one the node lacks."""
    out = {k: [list(n) for n in v] for k, v in space.items()}
    for kind, j, slot in changes:
        node = out[kind][j]
        node[slot] = next((op, i) for i in range(j + 2) for op in M.CANDIDATE_OPS if (op, i) not in node)
    return out


def test_stability_counts_changed_candidates_over_48():
    a = random_space(0)
    assert M.stability(a, a) == 1
    b = _changed(a, [('normal', 0, 0), ('normal', 3, 5), ('reduce', 2, 1)])
    assert M.stability(a, b) == 1 - 3 / 48
    assert M.stability(b, a) == 1 - 3 / 48


def test_superiority_is_the_hand_product_and_undefined_before_n():
    a = random_space(0)
    b = _changed(a, [('normal', 0, 0)])
    c = _changed(b, [('reduce', 1, 2), ('reduce', 3, 0)])
    spaces, accs = [a, b, c], [0.5, 0.6, 0.7]
    expected = (M.stability(a, c) * 0.5) * (M.stability(b, c) * 0.6) * (1 * 0.7)
    assert M.stability(a, c) == 1 - 3 / 48 and M.stability(b, c) == 1 - 2 / 48
    assert math.isclose(M.superiority(spaces, accs, 2, n=2), expected, rel_tol=1e-12)
    assert M.superiority([a, a, a], [1., 1., 1.], 2) == 1.
    assert M.superiority([a, b, b], [1., 1., 1.], 2) < 1 and M.superiority([a, a, a], [1., .99, 1.], 2) < 1
    for t in (0, 1):
        with pytest.raises(ValueError, match='undefined'):
            M.superiority(spaces, accs, t, n=2)


def test_selection_takes_the_argmax_and_ties_go_to_the_later_epoch():
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(2, 14, 8, generator=g).softmax(-1)] * 4  # the same alphas at every epoch
    chosen = M.select_intensive_space([(x[0], x[1]) for x in w], [0.5, 0.5, 0.5, 0.5], K=6, n=2)
    assert chosen['epoch'] == 4 and [r['superiority'] is None for r in chosen['table']] == [True, True, False, False]
    chosen = M.select_intensive_space([(x[0], x[1]) for x in w], [0.9, 0.9, 0.9, 0.1], epochs=[7, 8, 9, 10])
    assert chosen['epoch'] == 9 and math.isclose(chosen['table'][2]['superiority'], 0.9 ** 3)
    assert chosen['space'] == M.derive_intensive_space(w[0][0], w[0][1])


# ---------------------------------------------------------------------------------------------------------
# 2-3. Kernel shapes and equivalence with operations.SepConv / DilConv


def _convs(op):
    return [m for m in op.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize('gen_input', ['cell', 'op'])
def test_generated_kernels_match_the_conv_layers_at_every_width(gen_input):
    space = random_space(1)
    net = M.HyperNetwork(4, 10, 4, space, gen_input=gen_input)
    kernels = net.generate(net.probabilities(net.alphas))
    widths = set()
    for cell, cell_kernels in zip(net.cells, kernels):
        C = cell.preprocess1[1].out_channels
        widths.add(C)
        convs = [c for c, (_, op, _) in enumerate(cell.candidates) if op in M.CONV_OPS]
        assert sorted(map(int, cell.generators)) == convs  # one GeneratingBlock per ConvBlock, no more
        for c, (_, op, i) in enumerate(cell.candidates):
            stride = 2 if cell.reduction and i < 2 else 1
            if op not in M.CONV_OPS:
                assert cell_kernels[c] is None
                continue
            ref = _convs(OPS[op](C, stride, False))
            assert [tuple(k.shape) for k in cell_kernels[c]] == [tuple(m.weight.shape) for m in ref]
            gb = cell.generators[str(c)]
            k = int(op[-1])
            n = (2 if op.startswith('sep') else 1) * (C * k * k + C * C)
            assert (gb.fc1.in_features, gb.fc1.out_features) == (24 if gen_input == 'cell' else 1, 64)
            assert (gb.fc2.in_features, gb.fc2.out_features) == (64, n)
    assert widths == {4, 8, 16}


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('op', M.CONV_OPS)
def test_hyper_ops_equal_sepconv_and_dilconv_with_the_same_kernels(op, stride):
    torch.manual_seed(0)
    C = 6
    hyper = M.HYPER_OPS[op](C, stride)
    kernels = [torch.randn(s) for s in hyper.kernel_shapes]
    ref = OPS[op](C, stride, False)
    with torch.no_grad():
        for m, k in zip(_convs(ref), kernels, strict=True):
            m.weight.copy_(k)
    x = torch.randn(3, C, 12, 12)
    ref.train()  # batch statistics, as the Hyper ops use always
    torch.testing.assert_close(hyper(x, kernels), ref(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# 4-5. Gates, gradients, locality, seeding


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    net = M.HyperNetwork(4, 10, 3, random_space(2))
    w_opt = torch.optim.SGD(net.weights(), 0.1, momentum=0.9, weight_decay=3e-4)
    a_opt = torch.optim.Adam(net.arch_parameters(), 0.01, betas=(0.5, 0.999), weight_decay=1e-3)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(10, (4,))
    return net, w_opt, a_opt, x, y


def _snapshot(params):
    return [p.detach().clone() for p in params]


def test_each_phase_updates_exactly_its_parameters(tiny):
    net, w_opt, a_opt, x, y = tiny
    gen_ids = {id(p) for p in net.generator_parameters()}
    ordinary = [p for p in net.weights() if id(p) not in gen_ids]
    assert len(gen_ids) > 0 and len(ordinary) > 0 and net.arch_parameters() == [net.alphas]
    for name, weights_move, alpha_moves in (('train', True, False), ('basic', False, True), ('cross', True, True)):
        gens, ords, alpha = (_snapshot(net.generator_parameters()), _snapshot(ordinary),
                             net.alphas.detach().clone())
        search_adwp.adwp_step(net, name, x, y, w_opt, a_opt, alpha_gen=torch.Generator().manual_seed(1))
        moved_gen = all(not torch.equal(a, b) for a, b in zip(gens, net.generator_parameters()))
        moved_ord = all(not torch.equal(a, b) for a, b in zip(ords, ordinary))
        unmoved = all(torch.equal(a, b) for a, b in zip(gens + ords, net.generator_parameters() + ordinary))
        assert (moved_gen and moved_ord) if weights_move else unmoved, name
        assert (not torch.equal(alpha, net.alphas)) == alpha_moves, name
        if name == 'train':
            assert net.alphas.grad is None  # no gradient reached alpha at all


def test_alpha_gradient_flows_through_the_mixing_weights_and_the_generator(tiny):
    net, _, _, x, y = tiny
    for detach_mix in (True, False):
        net.zero_grad(set_to_none=True)
        p = net.probabilities(net.alphas)
        kernels = net.generate(p if detach_mix else p.detach())
        nn.functional.cross_entropy(net.run(x, p.detach() if detach_mix else p, kernels), y).backward()
        assert net.alphas.grad is not None and net.alphas.grad.abs().sum() > 0, detach_mix


@pytest.mark.parametrize('gen_input', ['cell', 'op'])
def test_perturbing_one_cell_changes_only_its_kernels(gen_input):
    torch.manual_seed(0)
    net = M.HyperNetwork(4, 10, 3, random_space(3), gen_input=gen_input)
    alphas = net.sample_alphas(1., torch.Generator().manual_seed(0))
    before = net.generate(net.probabilities(alphas))
    alphas[1] += torch.randn(alphas[1].shape)
    after = net.generate(net.probabilities(alphas))
    for layer in range(3):
        pairs = [(a, b) for ka, kb in zip(before[layer], after[layer]) if ka is not None for a, b in zip(ka, kb)]
        assert pairs
        if layer == 1:
            assert all(not torch.equal(a, b) for a, b in pairs)
        else:
            assert all(torch.equal(a, b) for a, b in pairs)


def test_sample_alphas_is_seeded_and_fresh_each_draw(tiny):
    net = tiny[0]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = net.sample_alphas(1., g1), net.sample_alphas(1., g1)
    assert a.shape == (3, 4, 6) and not torch.equal(a, b)
    assert torch.equal(a, net.sample_alphas(1., g2)) and torch.equal(b, net.sample_alphas(1., g2))
    torch.testing.assert_close(net.sample_alphas(3., torch.Generator().manual_seed(5)), 3 * a)


# ---------------------------------------------------------------------------------------------------------
# 6. Derivation


def test_derive_macro_takes_the_top_two_per_node_per_cell():
    space = random_space(4)
    alphas = torch.zeros(3, 4, 6)  # cells 1 and 2 are reduction cells at L = 3
    alphas[0, 0, 4], alphas[0, 0, 2] = 2., 1.           # top-2: candidate 4, then 2
    alphas[1, 3, 5] = alphas[1, 3, 1] = 1.              # a tie at the top: the lower index first
    g = M.derive_macro(alphas, space)
    assert g.cells[0][0:2] == [space['normal'][0][4], space['normal'][0][2]]
    assert g.cells[0][2:4] == [space['normal'][1][0], space['normal'][1][1]]  # all equal: candidates 0, 1
    assert g.cells[1][6:8] == [space['reduce'][3][1], space['reduce'][3][5]]
    assert g.cells[2][0:2] == list(space['reduce'][0][:2])
    G.validate(g)
    # two picks on one edge (D11): both of node 2's strongest candidates read input 0
    same_edge = [c for c in space['normal'][0] if c[1] == 0]
    alphas = torch.zeros(3, 4, 6)
    for c in same_edge[:2]:
        alphas[0, 0, space['normal'][0].index(c)] = 3.
    pairs = M.derive_macro(alphas, space).cells[0][:2]
    assert {i for _, i in pairs} == {0} and len(set(pairs)) == 2
    assert M.macro_space_size(6, 2, 4, 8) == 15 ** 32


def test_discrete_alphas_evaluate_exactly_the_genotype(tiny):
    net = tiny[0]
    g = net.genotype(2, net.sample_alphas(1., torch.Generator().manual_seed(0)))
    a = net.discrete_alphas(g)
    assert (a == 0).sum() == 3 * 4 * 2 and torch.isinf(a).sum() == 3 * 4 * 4
    nodes = [[sorted(c[2 * j:2 * j + 2]) for c in cells for j in range(4)] for cells in (net.genotype(2, a).cells, g.cells)]
    assert nodes[0] == nodes[1]  # the same two picks per node (a tie at 0 lists them by candidate index)
    assert net(torch.randn(2, 3, 16, 16), a).shape == (2, 10)


# ---------------------------------------------------------------------------------------------------------
# 7. The per-layer genotype


def test_darts_v2_laid_out_per_layer_builds_the_same_network():
    macro = G.as_macro(G.DARTS_V2, 8)
    assert [i for i, c in enumerate(macro.cells) if c == G.DARTS_V2.reduce] == [2, 5]
    torch.manual_seed(0)
    plain = NetworkCIFAR(36, 10, 8, True, G.DARTS_V2).eval()
    torch.manual_seed(0)
    per_layer = NetworkCIFAR(36, 10, 8, True, macro).eval()
    assert [(n, p.shape) for n, p in plain.named_parameters()] == [(n, p.shape) for n, p in per_layer.named_parameters()]
    assert utils.count_params(plain) == utils.count_params(per_layer) == 1_154_926  # docs/adwpnas.md: 1.15M
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain(x)[0], per_layer(x)[0])


def test_macro_genotype_round_trips_through_json_and_repr(tmp_path):
    g = M.derive_macro(torch.randn(5, 4, 6, generator=torch.Generator().manual_seed(0)), random_space(5))
    g = G.validate(g)
    assert eval(repr(g), vars(G)) == g and eval(G.macro_repr(g), vars(G)) == g
    assert set(json.loads(G.to_json(g))) == {'cells', 'concat'}
    G.save(g, str(tmp_path / 'genotype.json'))
    loaded = G.load(genotype_file=str(tmp_path / 'genotype.json'))
    assert isinstance(loaded, MacroGenotype) and loaded == g
    assert G.cell_genotype(g, 3, 5) == G.Genotype(g.cells[3], [2, 3, 4, 5], g.cells[3], [2, 3, 4, 5])


def test_bad_per_layer_genotypes_name_the_cell():
    cells = [list(c) for c in G.as_macro(G.DARTS_V2, 8).cells]
    bad = [list(c) for c in cells]
    bad[5][3] = ('sep_conv_9x9', 1)
    with pytest.raises(GenotypeError, match=r"cell 5 \(reduce\) block 1: unknown op 'sep_conv_9x9'"):
        G.validate(MacroGenotype(bad, [2, 3, 4, 5]))
    bad = [list(c) for c in cells]
    bad[1] = bad[1][:6]
    with pytest.raises(GenotypeError, match=r'cell 1 \(normal\): a classic cell needs 8'):
        G.validate(MacroGenotype(bad, [2, 3, 4, 5]))
    with pytest.raises(GenotypeError, match='concat'):
        G.validate(MacroGenotype(cells, [2, 3]))
    with pytest.raises(GenotypeError, match='has 8 cells but the network has 14 layers'):
        NetworkCIFAR(8, 10, 14, False, MacroGenotype(cells, [2, 3, 4, 5]))
    with pytest.raises(GenotypeError, match='exactly the keys cells, concat'):
        G.from_json(json.dumps({'cells': cells, 'concat': [2, 3, 4, 5], 'normal': []}))


def test_autoaugment_sits_between_flip_and_cutout():
    import numpy as np
    import torchvision.transforms as T
    from PIL import Image
    t = datasets.cifar_transforms('cifar10', True, cutout=16, autoaugment=True).transforms
    kinds = [type(x) for x in t]
    assert kinds == [T.RandomCrop, T.RandomHorizontalFlip, T.AutoAugment, T.ToTensor, T.Normalize, datasets.Cutout]
    assert t[2].policy == T.AutoAugmentPolicy.CIFAR10
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert datasets.cifar_transforms('cifar10', True, 16, True)(img).shape == (3, 32, 32)
    assert T.AutoAugment not in map(type, datasets.cifar_transforms('cifar10', True, 16).transforms)
    with pytest.raises(utils.UserError, match='--autoaugment'):
        datasets.get_dataset('synthetic', 'data', True, autoaugment=True)


def test_imagenet_step_decay_is_absolute_per_epoch_and_takes_the_depth_from_the_genotype(tmp_path, capsys):
    import numpy as np
    from PIL import Image
    assert [train_imagenet.step_factor(s, 3, 0.97) for s in (0, 2, 3, 7)] == [1, 1, 0.97, 0.97 ** 2]
    rng = np.random.default_rng(0)
    for split, n in (('train', 2), ('val', 1)):
        for label in ('a', 'b', 'c'):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / split / label / f'{i}.png')
    G.save(G.as_macro(G.DARTS_V2, 3), str(tmp_path / 'macro.json'))
    args = ['--device', 'cpu', '--data', tmp_path, '--genotype_file', tmp_path / 'macro.json', '--init_channels', '8',
            '--batch_size', '3', '--workers', '0', '--report_freq', '0', '--epochs', '2', '--lr_schedule', 'step',
            '--lr_gamma', '0.5']
    fails_with(capsys, train_imagenet.main, args + ['--layers', '14', '--save', tmp_path / 'x'], '--layers 14',
               '3 cells')
    # lr 0.1 given (a default one scales with the batch), halved after each epoch, no warm-up
    assert run(train_imagenet.main, args + ['--learning_rate', '0.1', '--save', tmp_path / 'run']) == 0
    assert [r['lr'] for r in read_jsonl(tmp_path / 'run' / 'metrics.jsonl')] == [0.1, 0.05]
    assert 'lr 0.1 x 0.5 per epoch (step decay' in (tmp_path / 'run' / 'log.txt').read_text()
    assert runs.load_checkpoint(str(tmp_path / 'run' / 'checkpoint.pt'))['args']['layers'] == 3


# ---------------------------------------------------------------------------------------------------------
# 8-9. The pipeline on synthetic data: stage 0, the search (with refusals and resume), retraining

STAGE0 = ['--dataset', 'synthetic', '--device', 'cpu', '--space', 'darts', '--lambda_at', '0', '--epochs', '3',
          '--layers', '3', '--init_channels', '4', '--batch_size', '16', '--synthetic_size', '32', '--workers', '0',
          '--report_freq', '0']
PHASES_2111 = ['--hyper_epochs', '2', '--cross_start', '3', '--cross_end', '4', '--epochs', '5']


@pytest.fixture(scope='module')
def stage0(tmp_path_factory):
    save = tmp_path_factory.mktemp('stage0')
    assert run(train_search.main, STAGE0 + ['--save', save]) == 0
    return str(save / 'search_log.jsonl')


def test_pipeline_stage0_search_and_one_epoch_of_retraining(stage0, tmp_path, capsys):
    save = tmp_path / 'adwp'
    assert run(search_adwp.main, ['--space_from', stage0, '--dataset', 'synthetic', '--device', 'cpu',
                                  '--workers', '0', '--layers', '5', '--init_channels', '8', '--batch_size', '16',
                                  '--synthetic_size', '32', '--report_freq', '0', '--save', save] + PHASES_2111) == 0
    chosen = json.loads((save / 'intensive_space.json').read_text())
    assert chosen['epoch'] == 3 and [r['superiority'] is None for r in chosen['table']] == [True, True, False]
    # Eq. 3's epsilon: the stage-0 supernet's held-out top-1 at each epoch's end, in [0, 1]
    assert chosen['accuracy'] == 'val_acc_end'
    assert [r['accuracy'] for r in chosen['table']] == [r['val_acc_end'] / 100 for r in read_jsonl(stage0)]
    assert all(len(node) == 6 for kind in ('normal', 'reduce') for node in chosen['space'][kind])
    records = read_jsonl(save / 'search_log.jsonl')
    assert [r['phase'] for r in records] == ['train', 'train', 'basic', 'cross', 'basic']
    assert [r['selectable'] for r in records] == [False] * 4 + [True] and records[-1]['best_epoch'] == 5
    assert torch.tensor(records[0]['alphas']).shape == (5, 4, 6)
    assert records[2]['lr'] < records[0]['lr'] and all(0 <= r['val_acc'] <= 100 for r in records)
    g = G.load(genotype_file=str(save / 'genotype.json'))
    assert isinstance(g, MacroGenotype) and len(g.cells) == 5
    assert G.from_json(json.dumps(records[-1]['genotype'])) == g  # alpha* is the last (only selectable) epoch
    out = capsys.readouterr().out  # the end of every run: wall time, the files, the next commands
    assert 'done in ' in out and 'intensive_space.json the K candidates' in out
    assert (f'next: python train_cifar.py --genotype_file {save / "genotype.json"} --device cpu --dataset synthetic '
            f'--synthetic_size 32 --batch_size 16 --workers 0    # retrain it' in out)  # on this machine and data

    retrain = ['--genotype_file', save / 'genotype.json', '--dataset', 'synthetic', '--device', 'cpu',
               '--workers', '0', '--epochs', '1', '--init_channels', '8', '--batch_size', '16',
               '--synthetic_size', '32', '--report_freq', '0']
    fails_with(capsys, train_cifar.main, retrain + ['--layers', '6', '--save', tmp_path / 'x'], '--layers 6',
               '5 cells')
    assert run(train_cifar.main, retrain + ['--save', tmp_path / 'eval']) == 0  # depth from the genotype
    result = json.loads((tmp_path / 'eval' / 'result.json').read_text())
    assert 'final test_error=' in capsys.readouterr().out and len(result['genotype']['cells']) == 5
    assert runs.load_checkpoint(str(tmp_path / 'eval' / 'checkpoint.pt'))['args']['layers'] == 5

    pytest.importorskip('matplotlib')  # visualize.py's ADWPNAS figures: Fig. 4 (stage 0) and Fig. 5 (accuracy)
    assert run(visualize.main, [save, save, '--out', tmp_path / 'plots']) == 0
    assert {'adwp_stage0.png', 'adwp_accuracy.png'} <= set(os.listdir(tmp_path / 'plots'))


def test_search_resumed_at_every_phase_boundary_ends_bit_identical(stage0, tmp_path, monkeypatch):
    args = ['--space_from', stage0, '--dataset', 'synthetic', '--device', 'cpu', '--workers', '0', '--layers', '3',
            '--init_channels', '4', '--batch_size', '8', '--synthetic_size', '16', '--report_freq', '0'] + PHASES_2111
    assert run(search_adwp.main, args + ['--save', tmp_path / 'straight']) == 0
    real_save = runs.save_checkpoint
    stops = [2, 3, 4]  # train -> basic, basic -> cross, cross -> basic

    def save_then_die(state, path):  # killed right after the checkpoint of a phase's last epoch
        real_save(state, path)
        if stops and state['epoch'] == stops[0]:
            stops.pop(0)
            raise KeyboardInterrupt

    monkeypatch.setattr(runs, 'save_checkpoint', save_then_die)
    killed = tmp_path / 'killed'
    assert run(search_adwp.main, args + ['--save', killed]) == 130
    for _ in range(3):
        assert run(search_adwp.main, args + ['--save', killed, '--resume']) in (0, 130)
    assert not stops
    a = runs.load_checkpoint(str(tmp_path / 'straight' / 'checkpoint.pt'))
    b = runs.load_checkpoint(str(killed / 'checkpoint.pt'))
    assert a['epoch'] == b['epoch'] == 5 and a['model'].keys() == b['model'].keys()
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert a['best']['epoch'] == b['best']['epoch'] and torch.equal(a['best']['alphas'], b['best']['alphas'])
    assert (tmp_path / 'straight' / 'genotype.json').read_text() == (killed / 'genotype.json').read_text()
    strip = [[{k: v for k, v in r.items() if k != 'seconds'} for r in read_jsonl(d / 'search_log.jsonl')]
             for d in (tmp_path / 'straight', killed)]
    assert strip[0] == strip[1] and len(strip[0]) == 5


# ---------------------------------------------------------------------------------------------------------
# Bad input: one sentence


def _fake_log(path, records):
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    return str(path)


def test_stage0_logs_of_another_space_or_too_short_are_refused(tmp_path, capsys):
    rows = torch.full((14, 8), 1 / 8).tolist()
    darts = [{'epoch': e, 'val_acc': 50., 'primitives': DARTS_PRIMITIVES, 'alphas_normal': rows,
              'alphas_reduce': rows} for e in (1, 2)]
    nos = [dict(r, primitives=G.PRIMITIVES, alphas_normal=torch.zeros(18, 11).tolist()) for r in darts * 2]
    base = ['--dataset', 'synthetic', '--device', 'cpu', '--save', tmp_path / 's']
    err = fails_with(capsys, search_adwp.main, base + ['--space_from', _fake_log(tmp_path / 'nos.jsonl', nos)],
                     'cannot be a stage-0 log: epoch 1 searched over other ops than DARTS\'s 8 (it has '
                     'channel_attention, dynamic_conv_3x3', '--space darts --lambda_at 0')
    assert 'avg_pool_3x3' not in err  # what is wrong, not the list of DARTS's ops
    # what is wrong, said for each kind of log that is not a stage-0 one
    for records, words in (
            ([dict(r, space='nos') for r in nos], 'epoch 1 comes from a --space nos search'),
            ([{'epoch': 1, 'method': 'agnas', 'space': 'darts', 'primitives': DARTS_PRIMITIVES, 'val_acc': 50.,
               'importance': {'cell 0': rows}}] * 3, ('epoch 1 comes from a --method agnas search, which has no '
                                                     'architecture parameters A')),
            ([dict(r, alphas_reduce=rows[:10]) for r in darts * 2], ('epoch 1 has alphas_reduce of shape 10x8, '
                                                                    'not 14 edges x 8 ops')),
            ([{'epoch': 1, 'val_acc': 50.}] * 3, 'epoch 1 lacks alphas_normal, alphas_reduce, primitives'),
            ([[1, 2]] * 3, 'line 1 is a JSON list, not a search record')):
        fails_with(capsys, search_adwp.main, base + ['--space_from', _fake_log(tmp_path / 'bad.jsonl', records)],
                   words)
    fails_with(capsys, search_adwp.main, base + ['--space_from', _fake_log(tmp_path / 'short.jsonl', darts)],
               'holds 2 epoch(s)', '(--n 2) needs at least 3')
    fails_with(capsys, search_adwp.main, base + ['--space_from', tmp_path / 'none.jsonl'], 'does not exist')
    fails_with(capsys, search_adwp.main, base, 'exactly one of --space_from')
    fails_with(capsys, search_adwp.main, base + ['--space_from', 'x', '--cross_end', '120'], 'alpha* cannot be chosen')
    fails_with(capsys, search_adwp.main, base + ['--space_from', 'x', '--T', '3'], '--T 2')
    bad = {'normal': [[('sep_conv_3x3', 0)] * 6] * 4, 'reduce': [[('sep_conv_3x3', 0)] * 6] * 4}
    (tmp_path / 'space.json').write_text(json.dumps(bad))
    fails_with(capsys, search_adwp.main, base + ['--intensive_space', tmp_path / 'space.json'],
               'normal node 2: a candidate appears twice')


def test_phase_is_a_pure_function_of_the_epoch():
    assert [search_adwp.phase(e) for e in (0, 59, 60, 89, 90, 99, 100, 119)] == \
        ['train', 'train', 'basic', 'basic', 'cross', 'cross', 'basic', 'basic']
    assert {search_adwp.phase(e, 60, 120, 120) for e in range(60, 120)} == {'basic'}  # Fig. 5, no cross-search
    assert search_adwp.first_selectable(60, 90, 100) == 100 and search_adwp.first_selectable(60, 120, 120) == 60


def test_kendall_tau_against_hand_counts():
    tau = search_adwp.kendall_tau
    assert tau([1, 2, 3, 4], [1, 3, 2, 4]) == (5 - 1) / 6  # one discordant pair of six
    assert tau([1, 2, 3], [3, 2, 1]) == -1
    assert math.isclose(tau([1, 1, 2], [1, 2, 3]), 2 / math.sqrt(2 * 3))  # tau-b: one pair tied in the first
    assert math.isnan(tau([1, 1, 1], [1, 2, 3]))


# ---------------------------------------------------------------------------------------------------------
# Fidelity: each formula restated here, independently of model_adwp / search_adwp


def test_a_generating_block_is_two_fcs_with_a_relu_over_the_cells_probabilities():
    """Sec. 3.2.1, Fig. 3 (D3-D5): kernels = split(W2 relu(W1 p + b1) + b2), p = all of the cell's per-node
    softmax (`cell`) or the block's own op probability (`op`)."""
    torch.manual_seed(0)
    for gen_input in ('cell', 'op'):
        net = M.HyperNetwork(4, 10, 4, random_space(1), gen_input=gen_input)
        with torch.no_grad():
            net.alphas.normal_()
        p = torch.softmax(net.alphas, dim=-1)                      # per node (Eq. 4), (L, 4, K)
        kernels = net.generate(net.probabilities(net.alphas))
        cell, li = net.cells[0], 0
        for key, gb in cell.generators.items():
            c = int(key)
            x = p[li].flatten() if gen_input == 'cell' else p[li].flatten()[c:c + 1]
            flat = gb.fc2.weight @ torch.relu(gb.fc1.weight @ x + gb.fc1.bias) + gb.fc2.bias
            expected = torch.cat([k.flatten() for k in kernels[li][c]])
            torch.testing.assert_close(expected, flat, rtol=1e-6, atol=1e-7)


def test_stage0_epsilon_is_the_held_out_accuracy_at_the_epochs_end(tmp_path):
    """Eq. 3's epsilon is `val_acc_end` / 100 (the whole held-out half in eval mode, as DARTS's infer), not
    `val_acc` (the running mean of the A steps); a log without it falls back to val_acc and says so."""
    rows = torch.full((14, 8), 1 / 8).tolist()
    records = [{'epoch': e, 'val_acc': 10. * e, 'val_acc_end': 90. - e, 'primitives': DARTS_PRIMITIVES,
                'alphas_normal': rows, 'alphas_reduce': rows} for e in (1, 2, 3)]
    _, accs, epochs, key = search_adwp.read_stage0_log(_fake_log(tmp_path / 'a.jsonl', records), 2)
    assert key == 'val_acc_end' and accs == [0.89, 0.88, 0.87] and epochs == [1, 2, 3]
    old = [{k: v for k, v in r.items() if k != 'val_acc_end'} for r in records]
    _, accs, _, key = search_adwp.read_stage0_log(_fake_log(tmp_path / 'b.jsonl', old), 2)
    assert key == 'val_acc' and accs == [0.1, 0.2, 0.3]


def test_random_ranking_band_of_kendall_tau_at_20_architectures():
    """Under random rankings of n = 20 untied items, tau has mean 0 and variance 2(2n + 5) / (9n(n - 1))
    (Kendall), sd 0.162: the 95% band is about +-0.32."""
    lo, hi = search_adwp.random_tau_band(list(range(20)), draws=4000, seed=0)
    sd = math.sqrt(2 * 45 / (9 * 20 * 19))
    assert lo == pytest.approx(-1.96 * sd, abs=0.04) and hi == pytest.approx(1.96 * sd, abs=0.04)


@pytest.mark.slow
def test_predicted_weights_beat_twice_chance_and_the_ranking_is_reported(capsys):
    """The ranking check at full size: 20 architectures, predicted weights after a short Stage 1 against a
    short training from scratch; the predicted accuracy beats twice chance. Kendall's tau, its band under
    random rankings and the control with untrained generators are printed (not asserted: synthetic data)."""
    # Stage 1 as BENCHMARKS.md measured it: 512 images (bench_search's default) for 10 epochs, 80 steps. With
    # 256 images for 3 epochs (12 steps) the generators had not learnt yet (16.3% predicted, 16.0% with
    # untrained generators), and the test failed from the commit that added it.
    out = search_adwp.ranking_check(random_space(3), archs=20, layers=5, C=8, hyper_epochs=10, scratch_epochs=2,
                                    batch_size=32, synthetic_size=512, seed=0)
    predicted = [r['predicted_acc'] for r in out['rows']]
    assert len(out['rows']) == 20 and sum(predicted) / 20 > 2 * out['chance_acc']
    control = sum(r['control_acc'] for r in out['rows']) / 20
    lo, hi = out['random_band']
    print(f'predicted={sum(predicted) / 20:.2f}% untrained={control:.2f}% kendall_tau={out["kendall_tau"]:.3f} '
          f'untrained_tau={out["control_tau"]:.3f} band=[{lo:.3f}, {hi:.3f}]')
