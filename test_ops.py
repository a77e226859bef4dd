"""The primitives of operations.py: shapes, ranges, and the dynamic convolution against a plain loop."""
import pytest
import torch
import torch.nn.functional as F

from genotypes import DARTS_PRIMITIVES, PRIMITIVES, op_kind
from operations import OPS, calibrate, combine_kernels, dynamic_conv

N, C, H = 2, 16, 8


def expected_shape(name, stride):
    h = H // stride
    kind = op_kind(name)
    if name == 'spatial_attention':
        return (N, 1, h, h)
    if name == 'channel_attention':
        return (N, C, 1, 1)
    if kind == 'dynamic':
        k = int(name[-1])
        return (N, C, k, k)
    return (N, C, h, h)


@pytest.mark.parametrize('affine', [False, True], ids=['search', 'eval'])
@pytest.mark.parametrize('stride', [1, 2], ids=['normal', 'reduce'])
@pytest.mark.parametrize('name', sorted(set(PRIMITIVES + DARTS_PRIMITIVES)))
def test_every_primitive_shape(name, stride, affine):
    op = OPS[name](C, stride, affine)
    out = op(torch.randn(N, C, H, H))
    assert tuple(out.shape) == expected_shape(name, stride)
    assert torch.isfinite(out).all()


def test_spec_order_and_kinds():
    kinds = [op_kind(p) for p in PRIMITIVES]
    assert kinds == ['feature'] * 7 + ['attention'] * 2 + ['dynamic'] * 2
    assert PRIMITIVES[6] == 'skip_connect' and PRIMITIVES[9] == 'dynamic_conv_3x3'


@pytest.mark.parametrize('name', ['spatial_attention', 'channel_attention'])
def test_attention_maps_lie_in_unit_interval(name):
    op = OPS[name](C, 1, True)
    out = op(10 * torch.randn(4, C, H, H))
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize('name', ['dynamic_conv_3x3', 'dynamic_conv_5x5'])
def test_dynamic_kernels_are_per_sample_distributions(name):
    op = OPS[name](C, 1, True)
    x = torch.randn(3, C, H, H)
    d = op(x)
    # softmax over the k*k taps of each channel (kernel decode)
    torch.testing.assert_close(d.flatten(2).sum(-1), torch.ones(3, C))
    # a kernel depends on its own sample only
    d0 = op(x[:1])
    op.eval()
    torch.testing.assert_close(op(x)[:1], op(x[:1]))
    assert not torch.allclose(d0, d[1:2])


@pytest.mark.parametrize('channels', [1, 4, 7, 16])
def test_reduced_widths_never_reach_zero(channels):
    for name in ['spatial_attention', 'channel_attention', 'dynamic_conv_3x3', 'dynamic_conv_5x5']:
        out = OPS[name](channels, 1, False)(torch.randn(2, channels, 6, 6))
        assert torch.isfinite(out).all()


@pytest.mark.parametrize('k,dilation', [(3, 1), (5, 1), (3, 2), (5, 2)])
def test_dynamic_conv_equals_per_sample_loop(k, dilation):
    x = torch.randn(3, 5, 9, 7, dtype=torch.float64)
    kernel = torch.randn(3, 5, k, k, dtype=torch.float64)
    out = dynamic_conv(x, kernel, dilation)
    for n in range(3):
        ref = F.conv2d(x[n:n + 1], kernel[n].unsqueeze(1), padding=dilation * (k - 1) // 2,
                       dilation=dilation, groups=5)
        torch.testing.assert_close(out[n:n + 1], ref)


def test_dynamic_conv_gradients_reach_kernel_and_features():
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    kernel = torch.randn(2, 4, 3, 3, requires_grad=True)
    dynamic_conv(x, kernel).square().sum().backward()
    assert x.grad.abs().sum() > 0 and kernel.grad.abs().sum() > 0


def test_summed_kernels_equal_separate_convolutions():
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    d3 = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    d5 = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    d3b = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    fused = dynamic_conv(x, combine_kernels([d3, d5, d3b]))
    plain = dynamic_conv(x, d3) + dynamic_conv(x, d5) + dynamic_conv(x, d3b)
    torch.testing.assert_close(fused, plain)


def test_calibrate_is_eq5():
    f = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    a_spatial = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    a_channel = torch.rand(2, 4, 1, 1, dtype=torch.float64)
    d3 = torch.rand(2, 4, 3, 3, dtype=torch.float64)
    d5 = torch.rand(2, 4, 5, 5, dtype=torch.float64)
    a = a_spatial + a_channel
    ref = f + f * a + dynamic_conv(f, d3) + dynamic_conv(f, d5)
    torch.testing.assert_close(calibrate(f, a, [d3, d5]), ref)
    torch.testing.assert_close(calibrate(f), f)
    torch.testing.assert_close(calibrate(f, None, [d3]), f + dynamic_conv(f, d3))


def test_skip_connect_reduces_with_factorized_reduce():
    op = OPS['skip_connect'](C, 2, True)
    assert sum(p.numel() for p in op.parameters()) > 0
    assert OPS['skip_connect'](C, 1, True)(torch.ones(1, C, 4, 4)).eq(1).all()


@pytest.mark.parametrize('name', ['dynamic_conv_3x3', 'dynamic_conv_5x5'])
def test_stride_2_kernel_generator_reads_the_full_resolution(name):
    """App. A.1's DynamicF has no stride: a stride-2 edge's kernel equals the stride-1 one on the same
    input, and its softmax over positions sees all H*W of them (also those a stride-2 conv skips)."""
    torch.manual_seed(0)
    reduce, normal = OPS[name](C, 2, True).eval(), OPS[name](C, 1, True).eval()
    normal.load_state_dict(reduce.state_dict())
    x = torch.randn(N, C, H, H)
    with torch.no_grad():
        torch.testing.assert_close(reduce(x), normal(x), rtol=0, atol=0)
        assert reduce.transform(x).flatten(2).shape[-1] == H * H  # the softmax's positions
        # a pixel at an odd position, which a stride-2 1x1 conv never reads, changes the kernel
        y = x.clone()
        y[:, :, 1, 1] += 5.
        assert not torch.allclose(reduce(y), reduce(x))


# ---------------------------------------------------------------------------------------------------------
# The attention maps and the kernel generator (NOS ICLR text, App. A.1), each restated here from its
# description with plain tensor arithmetic on the module's own weights, and the AGS loss on a hand example


def test_channel_attention_is_sigmoid_of_two_1x1_convs_over_the_pooled_input():
    torch.manual_seed(0)
    op = OPS['channel_attention'](32, 1, True).double()
    x = torch.randn(2, 32, 5, 5, dtype=torch.float64)
    w1 = op.conv_1.weight.flatten(1)               # (C/16, C)
    w2 = op.conv_2.weight.flatten(1)               # (C, C/16)
    pooled = x.mean(dim=(2, 3))                     # global average pool
    expected = torch.sigmoid(torch.relu(pooled @ w1.T) @ w2.T)
    assert w1.shape == (2, 32)                      # C -> C/16
    torch.testing.assert_close(op(x).flatten(1), expected, rtol=1e-12, atol=0)


def test_spatial_attention_is_sigmoid_of_a_3x3_conv_over_a_bottleneck():
    torch.manual_seed(0)
    op = OPS['spatial_attention'](32, 2, True).double().eval()
    with torch.no_grad():
        op.bn_1.running_mean.uniform_(-0.5, 0.5)
        op.bn_1.running_var.uniform_(0.5, 2.)
    x = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    bn = op.bn_1
    z = F.conv2d(x, op.conv_1.weight, stride=2)                       # 1x1, C -> C/16, the edge's stride
    z = (z - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    z = z * bn.weight[:, None, None] + bn.bias[:, None, None]
    expected = torch.sigmoid(F.conv2d(torch.relu(z), op.conv_2.weight, padding=1))  # 3x3 -> 1 map
    torch.testing.assert_close(op(x), expected, rtol=1e-12, atol=0)
    assert expected.shape == (2, 1, 4, 4)


def test_dynamic_kernel_pools_context_into_taps_and_softmaxes_each_channel():
    torch.manual_seed(0)
    op = OPS['dynamic_conv_3x3'](16, 1, True).double().eval()
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    conv, bn = op.bottleneck[0], op.bottleneck[1]
    z = torch.relu((F.conv2d(x, conv.weight) - bn.running_mean[:, None, None])
                   / torch.sqrt(bn.running_var[:, None, None] + bn.eps) * bn.weight[:, None, None]
                   + bn.bias[:, None, None]).flatten(2)                         # (N, C/8, HW)
    mask = torch.softmax(F.conv2d(x, op.transform.weight).flatten(2), dim=2)    # (N, 9, HW): over positions
    taps = torch.einsum('nmp,ntp->nmt', z, mask)                                 # (N, C/8, 9)
    decoded = torch.einsum('cm,nmt->nct', op.decode.weight.flatten(1), taps)     # (N, C, 9)
    expected = torch.softmax(decoded, dim=2).view(2, 16, 3, 3)                   # over the 9 taps
    torch.testing.assert_close(op(x), expected, rtol=1e-12, atol=1e-15)


def test_attention_transfer_loss_on_a_hand_example():
    """at(F) = normalise(mean over channels of F^2); L_AT = 1/2 sum over stages of mean((at_S - at_T)^2).
    Student 1x2x1x2 with channels [1, 2] and [3, 0]: at = [5, 2] / sqrt(29); teacher [1, 0], [1, 0]: at = [1, 0]."""
    import math

    import utils
    s = torch.tensor([[[[1., 2.]], [[3., 0.]]]])
    t = torch.tensor([[[[1., 0.]], [[1., 0.]]]])
    one = 0.5 * ((5 / math.sqrt(29) - 1) ** 2 + (2 / math.sqrt(29)) ** 2) / 2
    assert utils.attention_transfer_loss([s], [t]).item() == pytest.approx(one, rel=1e-6)
    assert utils.attention_transfer_loss([s, s], [t, s]).item() == pytest.approx(one, rel=1e-6)  # a sum


def test_attention_transfer_backward_by_hand_equals_autograd_of_the_formula():
    """`utils._AttentionTransfer`'s written-out backward against autograd through at(F) = F.normalize(mean_c F^2)
    and 1/2 sum mean((at_S - at_T)^2), in float64: one stage plain, one with a sample whose ||a|| is below
    normalize's eps (there dq/da = 1/eps, with no projection), scaled by an upstream gradient of 3."""
    import utils
    torch.manual_seed(0)
    s1 = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    small = torch.randn(2, 5, 2, 2, dtype=torch.float64)
    small[1] *= 1e-7  # a ~ 1e-14 per position: ||a|| < 1e-12
    s2 = small.requires_grad_()
    maps = [F.normalize(torch.rand(2, 16, dtype=torch.float64), dim=1),
            F.normalize(torch.rand(2, 4, dtype=torch.float64), dim=1)]
    assert torch.linalg.vector_norm(s2[1].detach().pow(2).mean(0)) < 1e-12
    ref = 0.5 * sum(((F.normalize(s.pow(2).mean(1).flatten(1), dim=1) - t) ** 2).mean()
                    for s, t in zip((s1, s2), maps))
    want = torch.autograd.grad(3 * ref, (s1, s2))
    got_loss = utils._AttentionTransfer.apply(2, s1, s2, *maps)
    got = torch.autograd.grad(3 * got_loss, (s1, s2))
    torch.testing.assert_close(got_loss, ref, rtol=1e-14, atol=0)
    assert got[1][1].abs().max() > 0  # the small sample's gradient is there, and checked
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-300)
    assert torch.autograd.gradcheck(lambda s: utils._AttentionTransfer.apply(1, s, maps[0]), (s1,))
    # under create_graph the gradient is differentiable again (DARTS's exact second order, test_train_search)
    assert torch.autograd.gradgradcheck(lambda s: utils._AttentionTransfer.apply(1, s, maps[0]), (s1,))


def test_teacher_maps_give_the_loss_of_the_teacher_features():
    """`darts.teacher_stages` hands the loss the teacher's maps at(T), once per batch: the same loss as its stage
    outputs; a map of the wrong length is refused with the resolutions in the message."""
    import utils
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 7, 4, 4)
    assert torch.equal(utils.attention_transfer_loss([s], [t]),
                       utils.attention_transfer_loss([s], [utils.attention_map(t)]))
    with pytest.raises(ValueError, match=r'a \(4, 4\) student stage with a 9-position teacher stage'):
        utils.attention_transfer_loss([s], [torch.rand(2, 9)])
    with pytest.raises(ValueError, match=r'a \(4, 4\) student stage with a \(3, 3\) teacher stage'):
        utils.attention_transfer_loss([s], [torch.rand(2, 7, 3, 3)])
