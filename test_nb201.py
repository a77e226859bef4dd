"""NAS-Bench-201 as --space nb201 (issue 23): the search network's size, the cell on hand-made inputs, the
architecture string, the derivation, the benchmark lookup through the real API, and every method end to end
on synthetic data, resumed bit-identical."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import agnas
import genotypes
import model_search
import nb201
import runs
import train_search
import utils
from genotypes import NB201_PRIMITIVES, GenotypeError, NB201Genotype
from test_train_search import (
    assert_bitwise,
    kill_and_resume,
    log_without_times,
    read_log,
)

run = utils.exit_code
BEST = '|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|'
ALL_SKIP = '|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|'


# ---------------------------------------------------------------------------------------------------------
# The network


def test_search_network_weight_count():
    # NAS-Bench-201's search network, C 16, N 5, CIFAR-10 head, cell BN affine off: 1,692,826 weights (its
    # reference implementation's count; the 6 x 5 matrix not included)
    net = model_search.Network(16, 10, 15, space='nb201')
    assert utils.count_params(net) == 1_692_826
    assert [tuple(a.shape) for a in net.arch_parameters()] == [(6, 5)]
    assert net.cell_types == ('normal',) and len(net.cells) == 15 and len(net.resblocks) == 2
    # the cells' BN is not affine; the stem's, the residual blocks' and the last one are (544 weights)
    affine = sum(m.weight.numel() + m.bias.numel() for m in net.modules()
                 if isinstance(m, torch.nn.BatchNorm2d) and m.affine)
    assert affine == 544
    assert all(not m.affine for c in net.cells for m in c.modules() if isinstance(m, torch.nn.BatchNorm2d))


def one_hot(op: str, rows: int = 6) -> torch.Tensor:
    w = torch.zeros(rows, len(NB201_PRIMITIVES), dtype=torch.float64)
    w[:, NB201_PRIMITIVES.index(op)] = 1
    return w


def cell(C=2, **kw):
    torch.manual_seed(0)
    return model_search.NB201Cell(C, NB201_PRIMITIVES, **kw).double()


def test_cell_sums_edges_node_by_node():
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    c = cell()
    # skip everywhere: node1 = x, node2 = x + node1 = 2x, node3 = x + node1 + node2 = 4x (the output)
    assert torch.allclose(c(x, one_hot('skip_connect')), 4 * x)
    assert torch.equal(c(x, one_hot('none')), torch.zeros_like(x))
    # avg_pool_3x3 with count_include_pad=False and no BN: a corner averages its 4 neighbours
    p = c._ops[0]._ops[NB201_PRIMITIVES.index('avg_pool_3x3')](x)
    assert torch.allclose(p[0, 0, 0, 0], x[0, 0, :2, :2].mean())
    assert torch.allclose(p[1, 1, 2, 2], x[1, 1, 1:4, 1:4].mean())


@pytest.mark.parametrize('op,k', [('nor_conv_1x1', 1), ('nor_conv_3x3', 3)])
def test_nor_conv_is_relu_conv_bn(op, k):
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    edge = cell()._ops[0]._ops[NB201_PRIMITIVES.index(op)]
    conv = edge[1]
    assert conv.kernel_size == (k, k) and conv.padding == (k // 2, k // 2) and conv.bias is not None
    with torch.no_grad():  # an identity kernel, a bias that BN removes again
        conv.weight.zero_()
        conv.weight[0, 0, k // 2, k // 2] = conv.weight[1, 1, k // 2, k // 2] = 1
        conv.bias.fill_(3.)
    r = x.clamp(min=0)
    expect = (r - r.mean((0, 2, 3), keepdim=True)) / torch.sqrt(r.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(edge.train()(x), expect)


def test_track_running_stats_off_normalises_by_the_batch_in_eval():
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    tracked, batch = cell(), cell(track_running_stats=False)
    w = one_hot('nor_conv_1x1')
    assert all(m.running_mean is None for m in batch.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert torch.allclose(batch.eval()(x, w), batch.train()(x, w))
    assert not torch.allclose(tracked.eval()(x, w), tracked.train()(x, w))


def test_network_forward_and_stages():
    net = model_search.Network(4, 10, 6, space='nb201')
    logits, stages = net.forward_stages(torch.randn(2, 3, 16, 16))
    assert logits.shape == (2, 10)
    assert [tuple(s.shape[1:]) for s in stages] == [(4, 16, 16), (8, 8, 8), (16, 4, 4)]
    with pytest.raises(ValueError, match='multiple of'):
        model_search.Network(4, 10, 7, space='nb201')


# ---------------------------------------------------------------------------------------------------------
# The architecture string


def test_string_round_trips():
    g = genotypes.load(BEST)
    assert g == NB201Genotype(BEST) and g.arch == BEST
    assert g.ops() == ['nor_conv_3x3'] * 3 + ['skip_connect'] + ['nor_conv_3x3'] * 2
    assert g.edges()[2] == ('nor_conv_3x3', 1, 2)  # row 2 is the edge 2<-1
    assert genotypes.from_json(genotypes.to_json(g)) == g
    assert json.loads(genotypes.to_json(g)) == {'nb201': BEST}
    assert eval(repr(g), vars(genotypes)) == g  # the repr pastes into genotypes.py
    assert genotypes.nb201_arch(g.ops()) == BEST
    assert genotypes.validate(g) == g


@pytest.mark.parametrize('arch,where', [
    ('|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|', 'expected 3 nodes'),
    ('|conv_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|', "node 1, edge 1 ('conv_3x3~0' at character 1): unknown op"),
    ('|none~0|+|none~0|none~2|+|none~0|none~1|none~2|', "node 2, edge 2 ('none~2' at character 17)"),
    ('|none~0|+|none~0|+|none~0|none~1|none~2|', 'node 2 (at character 9) needs 2 edge(s)'),
    ('|none~0|+|none~0|none1|+|none~0|none~1|none~2|', 'expected op~source'),
    ('none~0|+|none~0|none~1|+|none~0|none~1|none~2|', 'node 1 (at character 0) must be written'),
])
def test_malformed_strings_name_what_and_where(arch, where):
    with pytest.raises(GenotypeError, match=None) as e:
        genotypes.load(arch)
    assert where in str(e.value)
    with pytest.raises(GenotypeError):
        genotypes.from_json(json.dumps({'nb201': arch}))


def test_malformed_arch_is_one_sentence_in_train_cifar(capsys):
    import train_cifar
    assert run(train_cifar.main, ['--arch', '|nor_conv_3x3~0|+|none~0|', '--device', 'cpu']) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and 'expected 3 nodes' in err


# ---------------------------------------------------------------------------------------------------------
# Derivation


def test_derivation_keeps_none_and_breaks_ties_low():
    w = np.full((6, 5), 0.1)
    w[0, NB201_PRIMITIVES.index('nor_conv_3x3')] = 0.6
    w[1, NB201_PRIMITIVES.index('none')] = 0.6            # `none` wins edge 2<-0: a valid NB201 cell
    w[2, [1, 4]] = 0.3                                      # a tie: the lower op index (skip_connect)
    w[3, NB201_PRIMITIVES.index('avg_pool_3x3')] = 0.5
    w[4, NB201_PRIMITIVES.index('nor_conv_1x1')] = 0.5
    w[5, NB201_PRIMITIVES.index('skip_connect')] = 0.5
    assert model_search.derive_nb201(w) == \
        '|nor_conv_3x3~0|+|none~0|skip_connect~1|+|avg_pool_3x3~0|nor_conv_1x1~1|skip_connect~2|'


def test_network_genotype_masks_pruned_ops_and_agnas_averages_cells():
    net = model_search.Network(4, 10, 3, space='nb201')
    with torch.no_grad():
        net.alphas_normal.copy_(torch.tensor(one_hot('none').numpy() * 5))
    assert net.genotype().ops() == ['none'] * 6
    alive = torch.ones(6, 5, dtype=torch.bool)
    alive[:, 0] = False  # `none` pruned everywhere (EoiNAS): the next best op
    net.set_alive(alive)
    assert 'none' not in net.genotype().ops()
    # AGNAS: each edge position's importance averaged over all cells, then the argmax (App. B)
    imp = np.zeros((3, 6, 5))
    imp[0, :, 3] = 0.9    # cell 0 says nor_conv_3x3 ...
    imp[1:, :, 1] = 0.5   # ... two cells say skip_connect: mean 0.3 vs 0.333
    arch = model_search.derive_nb201(imp.mean(0))
    assert NB201Genotype(arch).ops() == ['skip_connect'] * 6
    assert agnas.build_network(4, 10, 3, space='nb201').genotype(importance=imp).ops() == ['skip_connect'] * 6


# ---------------------------------------------------------------------------------------------------------
# The benchmark lookup, against a small file written with the API package's own classes


def write_benchmark(path, accs: dict) -> None:
    """A NAS-Bench-201 file of made-up numbers: accs[arch] = (c10 valid, c10 test, c100 valid, c100 test,
    in16 valid, in16 test), two trials each (the lookup averages them: the second is 1 point lower)."""
    api = pytest.importorskip('nas_201_api')
    meta, infos = list(accs), {}
    for index, arch in enumerate(meta):
        full = api.ArchResults(index, arch)
        v = accs[arch]
        evals = {'cifar10-valid': {'x-valid': v[0], 'ori-test': v[1]}, 'cifar10': {'ori-test': v[1]},
                 'cifar100': {'x-valid': v[2], 'x-test': v[3], 'ori-test': (v[2] + v[3]) / 2},
                 'ImageNet16-120': {'x-valid': v[4], 'x-test': v[5], 'ori-test': (v[4] + v[5]) / 2}}
        for dataset, sets in evals.items():
            for seed, shift in ((777, 0.5), (888, -0.5)):
                r = api.ResultsCount(dataset, None, {0: 90.}, {0: .3}, 1.0, 100., {'arch_str': arch}, seed, 1, None)
                acc = {f'{name}@0': a + shift for name, a in sets.items()}
                r.update_eval(acc, {k: 1. for k in acc}, {k: 2. for k in acc})
                full.update(dataset, seed, r)
        infos[index] = {'less': api.ArchResults(index, arch).state_dict(), 'full': full.state_dict()}
    torch.save({'meta_archs': meta, 'arch2infos': infos, 'evaluated_indexes': list(range(len(meta)))}, path)


ACCS = {BEST: (91.6, 94.37, 73.49, 73.51, 46.77, 47.31), ALL_SKIP: (39.77, 54.30, 15.03, 15.61, 16.43, 16.32)}


def test_lookup_through_the_api(tmp_path):
    path = tmp_path / 'NAS-Bench-201-test.pth'
    write_benchmark(path, ACCS)
    bench = nb201.Benchmark(str(path))
    assert len(bench) == 2 and bench.kind == 'NAS-Bench-201' and bench.seconds >= 0
    assert bench.lookup(ALL_SKIP) == {'index': 1, 'cifar10_valid': 39.77, 'cifar10_test': 54.3,
                                      'cifar100_valid': 15.03, 'cifar100_test': 15.61, 'imagenet16_valid': 16.43,
                                      'imagenet16_test': 16.32}
    assert bench.lookup(BEST)['cifar10_test'] == 94.37
    assert bench.lookup(genotypes.NB201_EXAMPLE.arch) == {'index': -1}
    assert 'not in the benchmark' in nb201.describe({'index': -1})


def test_bad_benchmark_files_are_one_sentence(tmp_path):
    pytest.importorskip('nas_201_api')
    with pytest.raises(utils.UserError, match='does not exist'):
        nb201.Benchmark(str(tmp_path / 'missing.pth'))
    junk = tmp_path / 'junk.pth'
    junk.write_text('not a benchmark')
    with pytest.raises(utils.UserError, match='is not a NAS-Bench-201 file'):
        nb201.Benchmark(str(junk))
    torch.save({'meta_archs': []}, tmp_path / 'dict.pth')
    with pytest.raises(utils.UserError, match='is not a NAS-Bench-201 file'):
        nb201.Benchmark(str(tmp_path / 'dict.pth'))


# ---------------------------------------------------------------------------------------------------------
# Every method end to end on synthetic data: one epoch, a kill, the resume, bit-identical


SEARCH = ['--dataset', 'synthetic', '--device', 'cpu', '--workers', '0', '--space', 'nb201', '--layers', '3',
          '--init_channels', '4', '--batch_size', '4', '--synthetic_size', '8', '--report_freq', '0', '--epochs', '2']
METHOD_FLAGS = {'darts': [], 'darts-unrolled': ['--unrolled'], 'agnas': [],
                'eoinas': ['--eoi_warmup', '1', '--prune_every', '1', '--prune_count', '4']}
# the second-order step is the slowest (minutes on a shared 2-core machine): behind the slow marker
VARIANTS = [pytest.param(v, marks=pytest.mark.slow) if v == 'darts-unrolled' else v
            for v in sorted(set(METHOD_FLAGS) | set(train_search.METHODS))]


def command(variant, save):
    method = variant.split('-')[0]
    return SEARCH + ['--method', method, *METHOD_FLAGS.get(variant, []), '--save', save]


@pytest.mark.parametrize('variant', VARIANTS)
def test_every_method_searches_nb201_and_resumes_bit_identical(variant, tmp_path, monkeypatch, capsys):
    whole, killed = tmp_path / 'whole', tmp_path / 'killed'
    assert run(train_search.main, command(variant, whole)) == 0
    kill_and_resume(monkeypatch, train_search.main, command(variant, killed), epoch=1)
    a, b = (runs.load_checkpoint(str(d / 'checkpoint.pt')) for d in (whole, killed))
    assert a['epoch'] == b['epoch'] == 2
    for key in ('model', 'method', 'optimizer'):
        assert_bitwise(a[key], b[key])
    logs = [log_without_times(d) for d in (whole, killed)]
    assert logs[0] == logs[1]
    g = genotypes.load(genotype_file=str(whole / 'genotype.json'))
    assert isinstance(g, NB201Genotype) and logs[0][-1]['genotype'] == {'nb201': g.arch}
    assert logs[0][-1]['space'] == 'nb201' and 'benchmark' not in logs[0][-1]
    assert 'no --benchmark' in (whole / 'log.txt').read_text()
    if variant == 'eoinas':  # pruned down to one op per edge, and that op is the genotype's
        alive = a['model']['alive_normal']
        assert alive.sum(1).tolist() == [1] * 6
        assert [NB201_PRIMITIVES[i] for i in alive.int().argmax(1).tolist()] == g.ops()
    if variant == 'agnas':  # the importance averaged over the cells decides
        mean = np.array(logs[0][-1]['importance']['mean'])
        assert mean.shape == (6, 5) and model_search.derive_nb201(mean) == g.arch
        assert len(logs[0][-1]['cell_genotypes']) == 3


def test_search_with_benchmark_records_every_epoch(tmp_path):
    pytest.importorskip('nas_201_api')
    first = tmp_path / 'first'
    assert run(train_search.main, command('darts', first) + ['--epochs', '1']) == 0
    found = genotypes.load(genotype_file=str(first / 'genotype.json')).arch
    path = tmp_path / 'bench.pth'
    write_benchmark(path, {ALL_SKIP: ACCS[ALL_SKIP], found: (80., 85., 60., 61., 30., 31.)})
    save = tmp_path / 'looked-up'
    assert run(train_search.main, command('darts', save) + ['--epochs', '1', '--benchmark', path]) == 0
    records = read_log(save)
    assert records[0]['benchmark'] == {'arch': found, 'index': 1, 'cifar10_valid': 80., 'cifar10_test': 85.,
                                       'cifar100_valid': 60., 'cifar100_test': 61., 'imagenet16_valid': 30.,
                                       'imagenet16_test': 31.}
    result = json.loads((save / 'result.json').read_text())
    assert result['benchmark'] == records[-1]['benchmark']
    log = (save / 'log.txt').read_text()
    assert 'loaded in' in log and 'C10 80.00/85.00' in log


def test_arch_missing_from_benchmark_is_logged_and_the_search_goes_on(tmp_path):
    pytest.importorskip('nas_201_api')
    path = tmp_path / 'bench.pth'
    write_benchmark(path, {genotypes.NB201_EXAMPLE.arch: ACCS[BEST]})
    save = tmp_path / 's'
    # the synthetic search at this seed does not derive the example cell
    assert run(train_search.main, command('darts', save) + ['--epochs', '1', '--benchmark', path]) == 0
    assert read_log(save)[0]['benchmark']['index'] == -1
    assert 'not in the benchmark file' in (save / 'log.txt').read_text()


@pytest.mark.parametrize('flags,message', [
    (['--benchmark', 'no/such/file.pth'], 'does not exist'),
    (['--ops', 'feature'], 'applies to --space nos only'),
    (['--stage_cell', 'last', '--method', 'agnas'], 'drop --stage_cell'),
    (['--layers', '4'], 'multiple of 3'),
])
def test_refused_flags_on_nb201(flags, message, capsys, tmp_path):
    assert run(train_search.main, SEARCH + ['--save', tmp_path] + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and message in err


def test_nb201_flags_refused_on_other_spaces(capsys, tmp_path):
    argv = [a if a != 'nb201' else 'darts' for a in SEARCH] + ['--save', tmp_path, '--track_running_stats', '0']
    assert run(train_search.main, argv) == 2
    assert 'belongs to --space nb201' in capsys.readouterr().err


def test_nb201_defaults_are_the_benchmark_settings():
    args = train_search.parse_args(['--space', 'nb201', '--method', 'darts'])
    assert (args.epochs, args.learning_rate, args.learning_rate_min, args.weight_decay, args.nesterov,
            args.batch_size, args.arch_learning_rate, args.arch_weight_decay, args.layers, args.init_channels,
            args.lambda_at, args.train_portion) == (50, 0.025, 0.001, 5e-4, True, 64, 3e-4, 1e-3, 15, 16, 0., 0.5)
    assert train_search.parse_args(['--space', 'nb201', '--method', 'eoinas']).epochs == 100  # 20 + 20 * 4
    assert train_search.parse_args(['--space', 'nb201', '--method', 'agnas']).epochs == 50
    given = train_search.parse_args(['--space', 'nb201', '--weight_decay', '3e-4', '--epochs', '7'])
    assert (given.weight_decay, given.epochs) == (3e-4, 7)
    other = train_search.parse_args(['--space', 'darts', '--lambda_at', '0'])
    assert (other.weight_decay, other.layers, other.nesterov, other.stage_cell) == (3e-4, 8, False, 'first')


def test_gradients_of_nb201_match_finite_differences_in_a():
    # the relaxed cell is differentiable in A: d loss / d A against a central difference (float64)
    torch.manual_seed(1)
    net = model_search.Network(2, 3, 3, space='nb201').double()
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    net.train()
    grad = torch.autograd.grad(F.cross_entropy(net(x), y), net.alphas_normal)[0]
    eps, (i, j) = 1e-6, (4, 3)
    with torch.no_grad():
        net.alphas_normal[i, j] += eps
        up = F.cross_entropy(net(x), y)
        net.alphas_normal[i, j] -= 2 * eps
        down = F.cross_entropy(net(x), y)
    assert abs((up - down).item() / (2 * eps) - grad[i, j].item()) < 1e-6


# ---------------------------------------------------------------------------------------------------------
# The evaluation network, ImageNet16-120, retraining


def test_evaluation_network_weights_by_hand():
    from model_nb201 import NB201Network
    net = NB201Network(16, 10, 15, genotypes.load(BEST))
    # per cell: 5 nor_conv_3x3 (9 C^2 weights + an affine BN of 2 C, no conv bias); stem 3*9*16 + 32; the two
    # residual blocks (convs, affine BNs, 1x1 shortcuts); the last BN 128; the classifier 64*10 + 10
    cells = sum(5 * 5 * (9 * c * c + 2 * c) for c in (16, 32, 64))
    res = (9 * 16 * 32 + 9 * 32 * 32 + 4 * 32 + 16 * 32) + (9 * 32 * 64 + 9 * 64 * 64 + 4 * 64 + 32 * 64)
    assert utils.count_params(net) == cells + (3 * 9 * 16 + 32) + res + 128 + 650
    logits, aux = net(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and aux is None
    # a cell whose node 1 has only `none` in reaches node 3 only through the other edges
    dead = NB201Network(4, 10, 3, genotypes.load('|none~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|')).eval()
    x = torch.randn(1, 4, 8, 8)
    assert torch.equal(dead.cells[0](x), x)


def write_imagenet16(folder, images_per_batch=6):
    """Fake downsampled-ImageNet batches: labels 1..1000 in the official layout (R, G, B planes)."""
    import pickle
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for name in [f'train_data_batch_{i}' for i in range(1, 11)] + ['val_data']:
        labels = [1, 120, 121, 1000, 7, 60][:images_per_batch]
        data = rng.integers(0, 256, (len(labels), 768), dtype=np.uint8)
        with open(os.path.join(folder, name), 'wb') as f:
            pickle.dump({'data': data, 'labels': labels}, f)
    return data, labels


def test_imagenet16_reads_the_official_batches(tmp_path):
    import datasets
    data, _ = write_imagenet16(tmp_path)
    train = datasets.ImageNet16(str(tmp_path), True)
    assert len(train) == 10 * 4 and train.targets[:4] == [0, 119, 6, 59]  # labels 121 and 1000 are dropped
    val = datasets.get_dataset('imagenet16-120', str(tmp_path), train=False)
    x, y = val[3]
    assert x.shape == (3, 16, 16) and y == 59
    # the R plane of the 6th image, pixel (0, 1), normalised with the benchmark's mean and std
    assert abs(x[0, 0, 1].item() - (data[5, 1] / 255 - 122.68 / 255) / (63.22 / 255)) < 1e-5
    assert datasets.num_classes('imagenet16-120', str(tmp_path)) == 120
    with pytest.raises(utils.UserError, match='no ImageNet16 data'):
        datasets.ImageNet16(str(tmp_path / 'nothing'), True)
    (tmp_path / 'train_data_batch_3').write_text('junk')
    with pytest.raises(utils.UserError, match='not a downsampled-ImageNet batch'):
        datasets.ImageNet16(str(tmp_path), True)


def test_train_cifar_builds_the_nb201_network_with_its_recipe(tmp_path, monkeypatch):
    import train_cifar
    seen = {}
    real = train_cifar.NB201Network

    def spy(C, num_classes, layers, genotype):
        seen.update(C=C, layers=layers, arch=genotype.arch)
        return real(C, num_classes, layers, genotype)

    monkeypatch.setattr(train_cifar, 'NB201Network', spy)
    save = tmp_path / 'eval'
    argv = ['--arch', BEST, '--device', 'cpu', '--dataset', 'synthetic', '--synthetic_size', '16', '--epochs', '1',
            '--batch_size', '8', '--init_channels', '4', '--layers', '3', '--workers', '0', '--save', save]
    result = train_cifar.main([str(a) for a in argv])
    assert seen == {'C': 4, 'layers': 3, 'arch': BEST}
    args = runs.load_checkpoint(str(save / 'checkpoint.pt'))['args']
    assert (args['learning_rate'], args['weight_decay'], args['nesterov'], args['cutout_length'],
            args['auxiliary'], args['drop_path_prob'], args['epochs']) == (0.1 * 8 / 256, 5e-4, True, 0, False, 0., 1)
    assert result['genotype'] == {'nb201': BEST}
    parsed = train_cifar.build_parser().parse_args(['--arch', BEST])
    train_cifar.apply_nb201_schedule(parsed, {'arch'}, genotypes.load(BEST), BEST)
    assert (parsed.epochs, parsed.batch_size, parsed.init_channels, parsed.layers) == (200, 256, 16, 15)


def test_nb201_schedule_refusals(capsys):
    import train_cifar
    assert run(train_cifar.main, ['--arch', 'DARTS_V2', '--nb201_schedule', '--device', 'cpu']) == 2
    assert 'trains NAS-Bench-201 architectures' in capsys.readouterr().err
    assert run(train_cifar.main, ['--arch', BEST, '--drop_path_prob', '0.2', '--device', 'cpu']) == 2
    assert 'no auxiliary tower and no drop-path' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The table and the figure papers print


def fake_search(folder, method, seed, c10, c100, in16, archs):
    """A finished NAS-Bench-201 search folder: one log record per epoch (its cell in `archs`), result.json."""
    os.makedirs(folder)
    bench = {'index': 3, 'cifar10_test': c10, 'cifar100_test': c100, 'imagenet16_test': in16}
    with open(os.path.join(folder, 'search_log.jsonl'), 'w') as f:
        f.writelines(json.dumps({'epoch': e, 'method': method, 'space': 'nb201', 'primitives': NB201_PRIMITIVES,
                                'alphas_normal': [[0.2] * 5] * 6, 'importance': {}, 'cell_genotypes': [],
                                'genotype': {'nb201': arch}, 'val_acc': 50., 'seconds': 1800.,
                                'benchmark': {**bench, 'arch': arch, 'cifar10_test': c10 - len(archs) + e}}) + '\n' for e, arch in enumerate(archs, 1))
    runs.write_json(os.path.join(folder, 'result.json'),
                    {'kind': 'search', 'method': method, 'space': 'nb201', 'dataset': 'cifar10', 'seed': seed,
                     'epochs': len(archs), 'wall_seconds': 3600. * seed, 'cpu_hours': seed,
                     'genotype': {'nb201': archs[-1]}, 'benchmark': {**bench, 'arch': archs[-1]}})


def test_summarize_prints_the_nb201_table(tmp_path, capsys):
    import summarize
    dirs = []
    for seed, (c10, c100, in16) in enumerate([(94., 72., 45.), (93., 70., 44.), (92., 71., 46.)], 1):
        dirs.append(tmp_path / f'agnas-{seed}')
        fake_search(dirs[-1], 'agnas', seed, c10, c100, in16, [BEST])
    dirs.append(tmp_path / 'darts-1')
    fake_search(dirs[-1], 'darts', 1, 54.3, 15.61, 16.32, [ALL_SKIP])
    rows = summarize.nb201_rows([str(d) for d in dirs])
    assert [(r['method'], r['runs']) for r in rows] == [('agnas', 3), ('darts', 1)]
    agnas = rows[0]
    assert agnas['cifar10_test_mean'] == pytest.approx(93.) and agnas['cifar10_test_std'] == pytest.approx(1.)
    assert agnas['cifar100_test_mean'] == pytest.approx(71.) and agnas['cifar100_test_std'] == pytest.approx(1.)
    assert agnas['imagenet16_test_mean'] == pytest.approx(45.) and agnas['hours_per_run'] == pytest.approx(2.)
    assert rows[1]['cifar10_test_std'] is None
    summarize.main([str(d) for d in dirs] + ['--csv', ''])
    out = capsys.readouterr().out
    assert 'NAS-Bench-201' in out and '93.00 ± 1.00' in out and '54.30 ± -' in out


def test_visualize_draws_app_b_figure(tmp_path):
    pytest.importorskip('matplotlib')
    import visualize
    a, b = tmp_path / 'darts', tmp_path / 'agnas'
    fake_search(a, 'darts', 1, 54.3, 15.6, 16.3, [BEST, ALL_SKIP, ALL_SKIP])
    fake_search(b, 'agnas', 1, 93., 70., 44., [ALL_SKIP, BEST, BEST])
    assert visualize.count_skips(ALL_SKIP) == 6 and visualize.count_skips(BEST) == 1
    visualize.main([str(a), str(b), '--out', str(tmp_path / 'plots')])
    assert (tmp_path / 'plots' / 'nb201_epochs.png').stat().st_size > 0
    dot = (tmp_path / 'plots' / 'cell.dot').read_text()
    assert 'n0 -> n1 [label="skip_connect"' in dot and dot.count('->') == 6  # the first folder's final cell
    assert 'n0 -> n1' not in visualize.nb201_dot(genotypes.load('|none~0|+|none~0|none~1|+|none~0|none~1|none~2|'))
