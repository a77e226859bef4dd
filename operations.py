"""The primitives of the heterogeneous search space (NOS, Sec. 3.1) and of DARTS's space.

`OPS[name](C, stride, affine)` builds an op, as in DARTS. What an op returns depends on its kind
(`genotypes.op_kind`, also the `kind` column of docs/nos.md):

- feature ops (DARTS's convs, pools, identity) map (N,C,H,W) to (N,C,H',W');
- attention ops return a map in [0,1] that multiplies features: (N,1,H',W') or (N,C,1,1);
- dynamic ops return a per-sample depthwise kernel (N,C,k,k) that convolves features (`dynamic_conv`).

`calibrate` combines the three kinds as the heterogeneous residual block does (Eq. 5 and Eq. 9).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genotypes import op_kind  # noqa: F401  (re-exported: ops and their kinds in one place)


class ReLUConvBN(nn.Sequential):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True, bias=False):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=bias),
            nn.BatchNorm2d(C_out, affine=affine))


class DilConv(nn.Sequential):
    """ReLU, depthwise (dilated) conv, pointwise conv, BN: DARTS's dil_conv and half of its sep_conv."""

    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation, affine=True):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride, padding, dilation=dilation, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine))


class SepConv(nn.Sequential):
    """DARTS's separable conv: the depthwise-pointwise pair applied twice, the first carrying the stride."""

    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True):
        super().__init__(
            DilConv(C_in, C_in, kernel_size, stride, padding, 1, affine),
            DilConv(C_in, C_out, kernel_size, 1, padding, 1, affine))


class Identity(nn.Module):
    def forward(self, x):
        return x


class Zero(nn.Module):
    """DARTS's `none`: zeros at the output resolution."""

    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        if self.stride == 1:
            return x.mul(0.)
        return x[:, :, ::self.stride, ::self.stride].mul(0.)


class FactorizedReduce(nn.Module):
    """Halves the resolution with two offset stride-2 1x1 convs, concatenated (DARTS)."""

    def __init__(self, C_in, C_out, affine=True):
        super().__init__()
        assert C_out % 2 == 0, 'FactorizedReduce needs an even number of output channels'
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x):
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


class SpatialAttention(nn.Module):
    """Spatial attention a0 (NOS ICLR text, App. A.1.1): a saliency map (N,1,H',W') in [0,1].

    1x1 conv C -> C/16 carrying the edge's stride, BN, ReLU, 3x3 conv -> 1, sigmoid.
    """
    kind = 'attention'

    def __init__(self, C, stride=1, affine=True, reduction=16):
        super().__init__()
        mid = max(1, C // reduction)  # never 0 channels, whatever width the scripts build
        self.conv_1 = nn.Conv2d(C, mid, 1, stride=stride, bias=False)
        self.bn_1 = nn.BatchNorm2d(mid, affine=affine)
        self.conv_2 = nn.Conv2d(mid, 1, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.sigmoid(self.conv_2(F.relu(self.bn_1(self.conv_1(x)))))


class ChannelAttention(nn.Module):
    """Channel attention a1 (squeeze-and-excitation, App. A.1.1): scaling factors (N,C,1,1) in [0,1].

    Global average pool, 1x1 conv C -> C/16, ReLU, 1x1 conv -> C, sigmoid. Resolution-free, so the
    edge's stride does not change it.
    """
    kind = 'attention'

    def __init__(self, C, stride=1, affine=True, reduction=16):
        super().__init__()
        mid = max(1, C // reduction)
        self.conv_1 = nn.Conv2d(C, mid, 1, bias=False)
        self.conv_2 = nn.Conv2d(mid, C, 1, bias=False)

    def forward(self, x):
        y = F.adaptive_avg_pool2d(x, 1)
        return torch.sigmoid(self.conv_2(F.relu(self.conv_1(y))))


class DynamicKernel(nn.Module):
    """Kernel generator of the dynamic convolutions d0/d1 (Fig. 1; App. A.1.2): (N,C,k,k) per sample.

    (a) bottleneck: 1x1 conv C -> C/8, BN, ReLU;
    (b) kernel transform: 1x1 conv C -> k*k, softmax over the H*W positions, matrix product with the
        bottleneck features -> (N, C/8, k*k): global context pooled into k*k taps;
    (c) kernel decode: 1x1 conv C/8 -> C on the k x k map, softmax over the k*k taps of each channel.
    App. A.1's `DynamicF` has no stride: its 1x1 convs run at stride 1 on the edge's full-resolution input
    on every edge, so the softmax of (b) sees every position and the kernel does not depend on resolution.
    `stride` is accepted (every op takes one) and changes nothing here: on a stride-2 edge the stride lies
    in how the kernel is applied, to the reduced feature map F of the block (`calibrate`, model.Cell).
    """
    kind = 'dynamic'

    def __init__(self, C, kernel_size, stride=1, affine=True, reduction=8):
        super().__init__()
        mid = max(1, C // reduction)
        self.kernel_size = kernel_size
        self.bottleneck = nn.Sequential(
            nn.Conv2d(C, mid, 1, bias=False),  # stride 1 whatever the edge's stride (App. A.1)
            nn.BatchNorm2d(mid, affine=affine),
            nn.ReLU(inplace=False))
        self.transform = nn.Conv2d(C, kernel_size * kernel_size, 1, bias=False)
        self.decode = nn.Conv2d(mid, C, 1, bias=False)

    def forward(self, x):
        k = self.kernel_size
        z = self.bottleneck(x).flatten(2)                    # (N, C/8, HW)
        mask = self.transform(x).flatten(2).softmax(dim=2)   # (N, k*k, HW), a distribution over positions
        taps = torch.bmm(z, mask.transpose(1, 2))            # (N, C/8, k*k)
        kernel = self.decode(taps.unflatten(2, (k, k)))      # (N, C, k, k)
        return kernel.flatten(2).softmax(dim=2).view_as(kernel)


def dynamic_conv(x: torch.Tensor, kernel: torch.Tensor, dilation: int = 1) -> torch.Tensor:
    """The paper's F (x) D: depthwise conv of each sample with its own kernel, stride 1, 'same' padding.

    x: (N,C,H,W); kernel: (N,C,k,k) with k odd. The batch is folded into the channels so that one grouped
    convolution (groups = N*C) applies all N*C kernels at once.
    """
    n, c, h, w = x.shape
    k = kernel.shape[-1]
    out = F.conv2d(x.reshape(1, n * c, h, w), kernel.reshape(n * c, 1, k, k),
                   padding=dilation * (k - 1) // 2, dilation=dilation, groups=n * c)
    return out.view(n, c, h, w)


def combine_kernels(kernels) -> torch.Tensor:
    """Sum of kernels of different sizes, each zero-padded to the largest (centres aligned).

    dwconv is linear in the kernel, so sum_D dwconv(F, D) == dwconv(F, sum_D D): one convolution
    instead of one per kernel.
    """
    size = max(d.shape[-1] for d in kernels)
    total = None
    for d in kernels:
        p = (size - d.shape[-1]) // 2
        d = F.pad(d, (p, p, p, p)) if p else d
        total = d if total is None else total + d
    return total


def calibrate(feature: torch.Tensor, attention: torch.Tensor | None = None, kernels=()) -> torch.Tensor:
    """Heterogeneous residual combination, Eq. 5 / Eq. 9: F (+) F (.) A (+) sum_{D} F (x) D.

    `attention` broadcasts against `feature` ((N,1,H,W) or (N,C,1,1) or their sum); `kernels` are
    (N,C,k,k) tensors, applied as one convolution with their sum (see `combine_kernels`).
    """
    out = feature
    if attention is not None:
        out = out + feature * attention
    if len(kernels):
        out = out + dynamic_conv(feature, combine_kernels(kernels))
    return out


class ResNetBasicBlock(nn.Module):
    """NAS-Bench-201's fixed residual block between its stages (ResNet's basic block): ReLU-Conv3x3(stride)-BN,
    ReLU-Conv3x3-BN, plus a shortcut: AvgPool 2x2 (stride 2) then a 1x1 conv (no bias, no BN) when the
    stride is 2 or the width changes, the identity otherwise."""

    def __init__(self, C_in, C_out, stride, affine=True):
        super().__init__()
        self.conv_a = ReLUConvBN(C_in, C_out, 3, stride, 1, affine)
        self.conv_b = ReLUConvBN(C_out, C_out, 3, 1, 1, affine)
        if stride == 2:
            self.downsample = nn.Sequential(nn.AvgPool2d(2, stride=2), nn.Conv2d(C_in, C_out, 1, bias=False))
        elif C_in != C_out:
            self.downsample = nn.Conv2d(C_in, C_out, 1, bias=False)
        else:
            self.downsample = None

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        return shortcut + self.conv_b(self.conv_a(x))


def without_running_stats(module: nn.Module) -> nn.Module:
    """Every BatchNorm in `module` normalises by the batch's own statistics in training and evaluation alike
    (`track_running_stats=False`: NAS-Bench-201's search flag); returns the module."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return module


# ---------------------------------------------------------------------------------------------------------
# AGNAS's SE-style attention (Sun et al., ICML 2022, Eq. 4-6), shared by the gated edges of the cell spaces
# (agnas.py) and the gated choice layers of the ProxylessNAS chain (model_macro.py).


class GateAttention(nn.Module):
    """One attention module (AGNAS Eq. 4-5): gates = sigmoid(W2 ReLU(W1 GAP(F_con))), F_con the channel
    concatenation of the m candidates' outputs (ops of an edge, or MBConv blocks of a layer), C channels each.

    W1 = Linear(mC, mC // r), W2 = Linear(mC // r, mC), both without bias. The hidden width is rounded
    down, as the authors' `inp // reduction`: on an edge of the cell spaces r = m (their `ratio=8` for 8
    ops), so it is C; in the ProxylessNAS layers r = 16, so 7 x 56 channels give 392 // 16 = 24. The sigmoid
    is the last layer: every gate is its own value in (0, 1), with no normalisation across candidates.

    forward takes the pooled descriptors (N, m, C), one C-vector per candidate: GAP(cat(F_k)) = cat(GAP(F_k)),
    so the caller never builds the (N, mC, H, W) concatenation. Returns the gates (N, m, C); candidate k's
    gates are channels [kC, (k+1)C) of Eq. 5's output (half-open slices).
    """

    def __init__(self, m: int, C: int, r: int | None = None):
        super().__init__()
        r = m if r is None else r
        hidden = m * C // r
        if hidden < 1:
            raise ValueError(f'the reduction ratio r={r} leaves no hidden unit for m*C = {m * C} channels')
        self.m, self.C, self.hidden = m, C, hidden
        self.fc1 = nn.Linear(m * C, hidden, bias=False)   # W1 (Eq. 5)
        self.fc2 = nn.Linear(hidden, m * C, bias=False)   # W2 (Eq. 5)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        n = pooled.shape[0]
        logits = self.fc2(F.relu(self.fc1(pooled.reshape(n, self.m * self.C))))
        return torch.sigmoid(logits).view(n, self.m, self.C)   # Eq. 5


class GateStatistics:
    """Candidate importance from the gates (AGNAS Eq. 6), for every module that gates with GateAttention:
    while `collecting` (agnas.importance_pass sets it), `collect(gates, weights)` adds the gates, and the
    weights the forward multiplies the candidates' outputs by, each summed over the batch and the channels,
    to float64 accumulators on the gates' device (no host sync), and the batch size to an image count. The
    module sets `self.C`.

    `mean_gates()`, the importance: each candidate's mean *weight* over the images and its C channels, (m,)
    for one edge or layer, (E, m) for a group of edges. Where the forward weighs by the gates themselves (the
    DARTS space, the ProxylessNAS chain) that is the mean gate (Eq. 6). AGNAS over NOS weighs by the
    normalised gates w = g / sum_o g: the forward uses only those, so a level shared by all ops of a channel
    gets no gradient and would rank nothing, and its importance is the mean w. An op that the alive masks
    switch off weighs 0. `mean_raw_gates()`: the raw gates' means, logged beside the importance."""

    collecting = False

    def reset_importance(self) -> None:
        self._gate_sum = None    # float64 on the device of the gates
        self._weight_sum = None  # the same for the weights the forward uses
        self._images = 0

    def collect(self, gates: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """gates, weights (N, ..., m, C): batch first, channels last; weights None: the gates themselves."""
        if self.collecting:
            raw = gates.detach().sum(dim=(0, -1), dtype=torch.float64)
            used = raw if weights is None else weights.detach().sum(dim=(0, -1), dtype=torch.float64)
            self._gate_sum = raw if self._gate_sum is None else self._gate_sum + raw
            self._weight_sum = used if self._weight_sum is None else self._weight_sum + used
            self._images += gates.shape[0]

    def _mean(self, total) -> np.ndarray:
        if not self._images:
            raise RuntimeError('no importance collected yet: run agnas.importance_pass first')
        return (total / (self._images * self.C)).cpu().numpy()

    def mean_gates(self) -> np.ndarray:
        """The importance: each candidate's mean weight over the collected images and its C channels, float64."""
        return self._mean(self._weight_sum)

    def mean_raw_gates(self) -> np.ndarray:
        """Each candidate's mean raw gate (before a normalisation and the alive masks), float64."""
        return self._mean(self._gate_sum)


OPS = {
    'none': lambda C, stride, affine: Zero(stride),
    'avg_pool_3x3': lambda C, stride, affine: nn.AvgPool2d(3, stride=stride, padding=1,
                                                           count_include_pad=False),
    'max_pool_3x3': lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    'skip_connect': lambda C, stride, affine: Identity() if stride == 1 else FactorizedReduce(C, C, affine),
    'sep_conv_3x3': lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine),
    'sep_conv_5x5': lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine),
    'dil_conv_3x3': lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine),
    'dil_conv_5x5': lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine),
    'spatial_attention': lambda C, stride, affine: SpatialAttention(C, stride, affine),
    'channel_attention': lambda C, stride, affine: ChannelAttention(C, stride, affine),
    'dynamic_conv_3x3': lambda C, stride, affine: DynamicKernel(C, 3, stride, affine),
    'dynamic_conv_5x5': lambda C, stride, affine: DynamicKernel(C, 5, stride, affine),
    # NAS-Bench-201's convolutions (with its none, skip_connect and avg_pool_3x3 above): ReLU-Conv-BN. Its
    # conv has a bias exactly when its BN is not affine (the benchmark's own ReLUConvBN: bias=not affine),
    # so the search network's convs have one (1,692,826 weights at C 16, N 5) and the evaluation network's not
    'nor_conv_1x1': lambda C, stride, affine: ReLUConvBN(C, C, 1, stride, 0, affine, bias=not affine),
    'nor_conv_3x3': lambda C, stride, affine: ReLUConvBN(C, C, 3, stride, 1, affine, bias=not affine),
}
