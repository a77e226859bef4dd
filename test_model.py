"""The evaluation networks (model.py): DARTS's networks for classic genotypes, the derived block of docs/nos.md
for heterogeneous ones, drop-path, genotype checks and the multiply-add count."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import genotypes
import model
import utils
from genotypes import Genotype
from model import Cell, NetworkCIFAR, NetworkImageNet, drop_path
from operations import Identity

# Every case of docs/nos.md in one normal cell: attention / kernel / two features in the first tier,
# dynamic / attention / feature / skip_connect in the second. The reduce cell puts attention and a kernel on
# stride-2 edges from the cell's inputs.
CASES = Genotype(
    normal=[(('sep_conv_3x3', 0), ('spatial_attention', 1), 'dynamic_conv_3x3'),
            (('dynamic_conv_5x5', 2), ('sep_conv_5x5', 1), 'channel_attention'),
            (('dil_conv_3x3', 0), ('skip_connect', 3), 'sep_conv_3x3'),
            (('avg_pool_3x3', 1), ('channel_attention', 4), 'skip_connect')],
    normal_concat=[2, 3, 4, 5],
    reduce=[(('spatial_attention', 0), ('sep_conv_3x3', 1), 'spatial_attention'),
            (('max_pool_3x3', 0), ('dynamic_conv_3x3', 1), 'dynamic_conv_5x5'),
            (('skip_connect', 0), ('dil_conv_5x5', 2), 'avg_pool_3x3'),
            (('sep_conv_3x3', 3), ('channel_attention', 1), 'skip_connect')],
    reduce_concat=[2, 3, 4, 5])


def dwconv_by_hand(x, kernel):
    """F (x) D one sample at a time: each sample's own depthwise kernel, stride 1, same padding."""
    k = kernel.shape[-1]
    return torch.cat([F.conv2d(x[n:n + 1], kernel[n].unsqueeze(1), padding=k // 2, groups=x.shape[1])
                      for n in range(x.shape[0])])


def cell_by_hand(cell, s0, s1):
    """The derived cell of docs/nos.md written out block by block with the cell's own op modules."""
    states = [cell.preprocess0(s0), cell.preprocess1(s1)]
    for k, ((op_i, i), (op_j, j), op_s) in enumerate(cell._blocks):
        outs = [(cell._ops[2 * k](states[i]), op_i), (cell._ops[2 * k + 1](states[j]), op_j)]
        f = sum(h for h, op in outs if genotypes.op_kind(op) == 'feature')
        s = f
        for h, op in outs:
            if genotypes.op_kind(op) == 'attention':
                s = s + f * h
            elif genotypes.op_kind(op) == 'dynamic':
                s = s + dwconv_by_hand(f, h)
        kind = genotypes.op_kind(op_s)
        if op_s == 'skip_connect':
            node = s
        elif kind == 'feature':
            node = cell._second[str(k)](s)
        elif kind == 'attention':
            node = s + s * cell._second[str(k)](s)
        else:
            node = s + dwconv_by_hand(s, cell._second[str(k)](s))
        states.append(node)
    return torch.cat(states[2:], dim=1)


@pytest.mark.parametrize('reduction', [False, True])
def test_derived_block_matches_the_formula(reduction):
    torch.manual_seed(0)
    C = 16
    cell = Cell(CASES, 24, 32, C, reduction=reduction, reduction_prev=False).eval()
    for m in cell.modules():  # large weights and non-trivial BN statistics: no op is near-constant
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0, 2 / m.weight[0].numel() ** 0.5)
        elif isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    s0, s1 = torch.randn(3, 24, 12, 12), torch.randn(3, 32, 12, 12)
    with torch.no_grad():
        out = cell(s0, s1, drop_prob=0.5)  # eval: drop-path off
        expected = cell_by_hand(cell, s0, s1)
    size = 6 if reduction else 12
    assert out.shape == (3, 4 * C, size, size)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_skip_connect_second_tier_builds_nothing():
    cell = Cell(CASES, 16, 16, 8, reduction=False, reduction_prev=False)
    assert sorted(cell._second.keys()) == ['0', '1', '2']  # block 3's second tier is skip_connect
    classic = Cell(genotypes.DARTS_V2, 16, 16, 8, reduction=False, reduction_prev=False)
    assert len(classic._second) == 0
    # DARTS's cell: preprocess0, preprocess1 and the eight ops, in genotype order
    assert [n for n, _ in classic.named_children()] == ['preprocess0', 'preprocess1', '_ops', '_second']
    names = [op for op, _ in genotypes.DARTS_V2.normal]
    assert len(classic._ops) == 8
    for op, name in zip(classic._ops, names, strict=True):
        assert isinstance(op, Identity) == (name == 'skip_connect')


def test_classic_genotype_is_darts():
    """A DARTS genotype computes DARTS's cell: node = h1 + h2, the op outputs summed (DARTS model.py)."""
    torch.manual_seed(0)
    cell = Cell(genotypes.DARTS_V1, 16, 16, 8, reduction=True, reduction_prev=False).eval()
    s0, s1 = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    states = [cell.preprocess0(s0), cell.preprocess1(s1)]
    for k in range(4):
        (_, i), (_, j) = genotypes.DARTS_V1.reduce[2 * k], genotypes.DARTS_V1.reduce[2 * k + 1]
        states.append(cell._ops[2 * k](states[i]) + cell._ops[2 * k + 1](states[j]))
    torch.testing.assert_close(cell(s0, s1), torch.cat(states[2:], dim=1))
    # the same cell written as NOS blocks with a skip_connect second tier is the same network
    as_blocks = Genotype(normal=genotypes.to_blocks(genotypes.DARTS_V1.normal), normal_concat=[2, 3, 4, 5],
                         reduce=genotypes.to_blocks(genotypes.DARTS_V1.reduce), reduce_concat=[2, 3, 4, 5])
    a, b = NetworkCIFAR(8, 10, 5, True, genotypes.DARTS_V1), NetworkCIFAR(8, 10, 5, True, as_blocks)
    def shapes(net):
        return [(n, p.shape) for n, p in net.state_dict().items()]

    assert shapes(a) == shapes(b)


def test_darts_v2_weight_counts_are_darts():
    # DARTS's logs: "param size = 3.349342MB" (CIFAR-10) and "param size = 4.718752MB" (ImageNet),
    # both without the auxiliary tower
    assert utils.count_params(NetworkCIFAR(36, 10, 20, True, genotypes.DARTS_V2)) == 3_349_342
    assert utils.count_params(NetworkImageNet(48, 1000, 14, True, genotypes.DARTS_V2)) == 4_718_752


def test_evaluation_ops_are_affine():
    net = NetworkCIFAR(8, 10, 5, True, genotypes.NOS_EXAMPLE)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.affine for m in bns)


@pytest.mark.parametrize('arch', ['NOS_EXAMPLE', 'DARTS_V2'])
@pytest.mark.parametrize('network', ['cifar', 'imagenet'])
def test_forward_backward(arch, network):
    torch.manual_seed(0)
    genotype = getattr(genotypes, arch)
    if network == 'cifar':
        net, size = NetworkCIFAR(8, 10, 5, True, genotype), 32
    else:  # the 7x7 final pool of DARTS's ImageNet network needs about 224x224 (see NetworkImageNet)
        net, size = NetworkImageNet(8, 10, 3, True, genotype), 224
    net.drop_path_prob = 0.2
    x, y = torch.randn(2, 3, size, size), torch.tensor([1, 7])
    logits, aux = net(x)
    assert logits.shape == aux.shape == (2, 10)
    (F.cross_entropy(logits, y) + 0.4 * F.cross_entropy(aux, y)).backward()
    unused = [n for n, p in net.named_parameters() if p.grad is None]
    assert not unused  # every op of the genotype is on the path to the loss
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    net.eval()
    logits, aux = net(x)
    assert aux is None and logits.shape == (2, 10)


def test_no_auxiliary_tower():
    net = NetworkCIFAR(8, 10, 5, False, genotypes.NOS_EXAMPLE)
    assert not any('auxiliary' in n for n, _ in net.named_parameters())
    assert net(torch.randn(2, 3, 32, 32))[1] is None


def test_drop_path_only_in_training():
    torch.manual_seed(0)
    net = NetworkCIFAR(8, 10, 5, False, genotypes.NOS_EXAMPLE)
    x = torch.randn(4, 3, 32, 32)
    net.eval()
    with torch.no_grad():
        net.drop_path_prob = 0.
        clean = net(x)[0]
        net.drop_path_prob = 0.5
        assert torch.equal(net(x)[0], clean)
        assert torch.equal(net(x)[0], clean)
    net.train()
    with torch.no_grad():
        net.drop_path_prob = 0.
        torch.manual_seed(1)
        a = net(x)[0]
        torch.manual_seed(1)
        assert torch.equal(net(x)[0], a)  # no randomness without drop-path
        net.drop_path_prob = 0.5
        torch.manual_seed(1)
        assert not torch.allclose(net(x)[0], a)


def test_drop_path_is_per_sample_and_rescaled():
    torch.manual_seed(0)
    x = torch.ones(2000, 3, 2, 2)
    y = drop_path(x, 0.25)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()  # whole samples, 1/keep
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.25) < 0.04
    assert drop_path(x, 0.) is x


def test_identity_edges_are_never_dropped():
    """DARTS drops op outputs but not the identity: an all-skip_connect normal cell is untouched."""
    skip = [(('skip_connect', 0), ('skip_connect', 1), 'skip_connect')] + \
        [(('skip_connect', k), ('skip_connect', k + 1), 'skip_connect') for k in range(1, 4)]
    g = Genotype(normal=skip, normal_concat=[2, 3, 4, 5], reduce=skip, reduce_concat=[2, 3, 4, 5])
    cell = Cell(g, 8, 8, 8, reduction=False, reduction_prev=False).train()
    s0, s1 = torch.randn(4, 8, 6, 6), torch.randn(4, 8, 6, 6)
    assert torch.equal(cell(s0, s1, 0.9), cell(s0, s1, 0.))


@pytest.mark.parametrize('block, fault', [
    ((('sep_conv_3x3', 0), ('conv_7x7', 1), 'skip_connect'), 'unknown op'),
    ((('sep_conv_3x3', 0), ('sep_conv_3x3', 3), 'skip_connect'), 'input 3 does not exist yet'),
    ((('spatial_attention', 0), ('dynamic_conv_3x3', 1), 'skip_connect'), 'no feature op'),
])
def test_malformed_genotype_is_refused_at_construction(block, fault):
    normal = list(genotypes.NOS_EXAMPLE.normal)
    normal[1] = block
    g = genotypes.NOS_EXAMPLE._replace(normal=normal)
    with pytest.raises(genotypes.GenotypeError, match=f'normal block 1: .*{fault}'):
        NetworkCIFAR(8, 10, 5, True, g)
    with pytest.raises(genotypes.GenotypeError, match='normal block 1'):
        NetworkImageNet(8, 10, 3, True, g)


def test_wrong_number_of_blocks_is_refused():
    g = genotypes.NOS_EXAMPLE._replace(reduce=genotypes.NOS_EXAMPLE.reduce[:3])
    with pytest.raises(genotypes.GenotypeError, match='reduce: .*needs 4 blocks, got 3'):
        NetworkCIFAR(8, 10, 5, True, g)


def test_macs_count_the_dynamic_convolution():
    """Replacing a skip_connect second tier by dynamic_conv_3x3 adds exactly the kernel generator and the
    per-sample depthwise convolution, computed here from the shapes (multiply-adds per image)."""
    first, second, op_s = genotypes.NOS_EXAMPLE.normal[1]
    assert op_s == 'skip_connect'
    plain = genotypes.NOS_EXAMPLE
    normal = list(plain.normal)
    normal[1] = (first, second, 'dynamic_conv_3x3')
    dynamic = plain._replace(normal=normal)
    C, layers = 16, 5
    diff = (utils.count_macs(NetworkCIFAR(C, 10, layers, True, dynamic))
            - utils.count_macs(NetworkCIFAR(C, 10, layers, True, plain)))
    expected = 0
    # normal cells: 0 at (C, 32x32), 2 at (2C, 16x16), 4 at (4C, 8x8); cells 1 and 3 reduce
    for c, hw in ((C, 32 * 32), (2 * C, 16 * 16), (4 * C, 8 * 8)):
        mid, kk = c // 8, 9
        expected += (c * mid * hw        # bottleneck 1x1 conv C -> C/8
                     + c * kk * hw       # kernel transform 1x1 conv C -> k*k
                     + mid * hw * kk     # (C/8, HW) x (HW, k*k) product
                     + mid * c * kk      # kernel decode 1x1 conv C/8 -> C on the k x k map
                     + c * hw * kk)      # the per-sample depthwise k x k convolution itself
    assert diff == expected


def _block0_genotype(block):
    """A cell whose block 0 is `block` (the rest plain sep_conv pairs); the first C output channels of the
    cell are node 2, the output of block 0."""
    rest = [(('sep_conv_3x3', 0), ('sep_conv_3x3', k), 'skip_connect') for k in (2, 3, 4)]
    cell = [block] + rest
    return Genotype(normal=cell, normal_concat=[2, 3, 4, 5], reduce=cell, reduce_concat=[2, 3, 4, 5])


# Block 0 with every droppable term dropped, by hand: x0, x1 are the preprocessed inputs, o0, o1 the
# first-tier ops, o2 the second-tier op. A term that is kept is computed; a dropped one is left out.
DROP_CASES = {
    'two convs: both dropped (DARTS, p^2)': (
        (('sep_conv_3x3', 0), ('sep_conv_5x5', 1), 'skip_connect'), False,
        lambda x0, x1, o0, o1, o2: torch.zeros_like(x0)),
    'conv + identity: the conv is dropped, the identity stays': (
        (('sep_conv_3x3', 0), ('skip_connect', 1), 'skip_connect'), False,
        lambda x0, x1, o0, o1, o2: x1),
    'conv + attention: F stays, F*A is dropped': (
        (('sep_conv_3x3', 0), ('spatial_attention', 1), 'skip_connect'), False,
        lambda x0, x1, o0, o1, o2: o0(x0)),
    'kernel + conv: F stays, dwconv(F, D) is dropped': (
        (('dynamic_conv_3x3', 0), ('dil_conv_3x3', 1), 'skip_connect'), False,
        lambda x0, x1, o0, o1, o2: o1(x1)),
    'identity + attention: the identity stays': (
        (('skip_connect', 0), ('channel_attention', 1), 'skip_connect'), False,
        lambda x0, x1, o0, o1, o2: x0),
    'attention second tier: S stays, S*o(S) is dropped': (
        (('sep_conv_3x3', 0), ('channel_attention', 1), 'spatial_attention'), False,
        lambda x0, x1, o0, o1, o2: o0(x0)),
    'dynamic second tier: S stays, dwconv(S, o(S)) is dropped': (
        (('avg_pool_3x3', 0), ('spatial_attention', 1), 'dynamic_conv_5x5'), False,
        lambda x0, x1, o0, o1, o2: o0(x0)),
    'feature second tier is never dropped': (
        (('sep_conv_3x3', 0), ('dynamic_conv_3x3', 1), 'sep_conv_3x3'), False,
        lambda x0, x1, o0, o1, o2: o2(o0(x0))),
    'feature second tier after two convs: the convs are dropped, o(0) stays': (
        (('sep_conv_3x3', 0), ('max_pool_3x3', 1), 'dil_conv_5x5'), False,
        lambda x0, x1, o0, o1, o2: o2(torch.zeros_like(o0(x0)))),
    'reduction: a stride-2 skip_connect (FactorizedReduce) beside a pool is dropped, as in DARTS': (
        (('skip_connect', 0), ('max_pool_3x3', 1), 'skip_connect'), True,
        lambda x0, x1, o0, o1, o2: torch.zeros_like(o1(x1))),
    'reduction: a stride-2 skip_connect beside a kernel stays': (
        (('skip_connect', 0), ('dynamic_conv_3x3', 1), 'skip_connect'), True,
        lambda x0, x1, o0, o1, o2: o0(x0)),
}


@pytest.mark.parametrize('case', list(DROP_CASES))
def test_drop_path_drops_a_term_only_where_the_block_keeps_another_path(case, monkeypatch):
    """With drop_path replaced by 'always drop', block 0's output is exactly the formula without the
    droppable terms (issue 7's rule)."""
    block, reduction, expected = DROP_CASES[case]
    monkeypatch.setattr(model, 'drop_path', lambda x, p: torch.zeros_like(x) if p > 0 else x)
    torch.manual_seed(0)
    C = 8
    cell = Cell(_block0_genotype(block), 8, 8, C, reduction=reduction, reduction_prev=False).train()
    s0, s1 = torch.randn(2, 8, 8, 8), torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        out = cell(s0, s1, drop_prob=0.5)[:, :C]
        x0, x1 = cell.preprocess0(s0), cell.preprocess1(s1)
        o2 = dict(cell._second.items()).get('0')
        ref = expected(x0, x1, cell._ops[0], cell._ops[1], o2)
        assert not torch.equal(cell(s0, s1, drop_prob=0.)[:, :C], torch.zeros_like(out))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def darts_cell_forward(cell, s0, s1, drop_prob):
    """DARTS's Cell.forward (Liu et al. 2019, model.py), written out: each node sums two op outputs and
    drops each one that is not the identity, independently."""
    states = [cell.preprocess0(s0), cell.preprocess1(s1)]
    for k in range(cell._steps):
        op1, op2 = cell._ops[2 * k], cell._ops[2 * k + 1]
        h1, h2 = op1(states[cell._indices[2 * k]]), op2(states[cell._indices[2 * k + 1]])
        if not isinstance(op1, Identity):
            h1 = drop_path(h1, drop_prob)
        if not isinstance(op2, Identity):
            h2 = drop_path(h2, drop_prob)
        states.append(h1 + h2)
    return torch.cat([states[i] for i in cell._concat], dim=1)


@pytest.mark.parametrize('reduction', [False, True])
@pytest.mark.parametrize('arch', ['DARTS_V1', 'DARTS_V2'])
def test_classic_genotype_drops_exactly_as_darts(arch, reduction):
    torch.manual_seed(0)
    cell = Cell(getattr(genotypes, arch), 8, 8, 8, reduction=reduction, reduction_prev=False).train()
    s0, s1 = torch.randn(16, 8, 8, 8), torch.randn(16, 8, 8, 8)
    with torch.no_grad():
        torch.manual_seed(1)
        ours = cell(s0, s1, 0.3)
        torch.manual_seed(1)
        theirs = darts_cell_forward(cell, s0, s1, 0.3)
        torch.manual_seed(1)
        assert not torch.equal(ours, cell(s0, s1, 0.))  # drop-path did drop something
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
