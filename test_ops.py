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
