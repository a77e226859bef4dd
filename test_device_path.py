"""The GPU path, checked without a GPU: one search step of every method on every space, ADWPNAS's step in every
phase, and one retraining step of every network, with the model and the batches on PyTorch's `meta` device.

A tensor that a forward or a step makes on the CPU (a mask, a schedule value, an index) would fail only on a
GPU; on the meta device it fails here, as it would there ("Tensor on device cpu is not on the expected device
meta"). The methods and spaces come from the registries (train_search.METHODS, every module's SPACES), so a
method or a space added later is covered the day it lands; a combination that a method refuses is skipped by
asking the method's own check (train_search.check_args).

Every op of these steps has a meta kernel (torch 2.11-2.13), so no op needs covering another way. What the
meta device cannot do is give a value back to the host: `.item()` and `.tolist()` of a meta tensor have no
data. A search step must read nothing back (a read is a GPU sync, once per step), so `host_reads` counts them
and the steps must make none; the one exception is a hard Gumbel sample (EoiNAS's --gumbel_hard, GDAS), whose
one-op forward reads the sampled ops on the host: there the read returns a stand-in (zeros: op 0 on every
edge) and the rest of the step runs on the meta device. The parts that read on purpose once per epoch or per
prune (the log's figures, the prunes, the alive masks' CPU copy) are not steps and stay outside.
"""
import contextlib
import importlib

import pytest
import torch

import genotypes
import train_search
import utils

META = torch.device('meta')
BATCH = 2


def registered_spaces() -> list[str]:
    """Every search space any registry lists: model_search.SPACES, and the SPACES of the other model files
    and of train_search where they have one."""
    spaces = []
    for name in ('model_search', 'model_search_fast', 'model_macro', 'train_search'):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        spaces += [s for s in getattr(module, 'SPACES', ()) if s not in spaces]
    return spaces


# The first of these sizes that a space accepts: a tiny cell network (the fewest cells that the space and the
# method take, 4 channels), else a narrow chain (the ProxylessNAS space's fixed depth), else the space's own.
SIZES = [['--layers', '3', '--init_channels', '4'], ['--layers', '5', '--init_channels', '4'],
         ['--layers', '6', '--init_channels', '4'], ['--width_mult', '0.1'], []]


def search_args(method: str, space: str, extra=()):
    """train_search.py's arguments for the smallest supernet of the space (SIZES), with the method's defaults;
    a combination the method refuses at every size skips the test, with the method's own sentence."""
    for size in SIZES:
        argv = ['--dataset', 'synthetic', '--device', 'cpu', '--method', method, '--space', space,
                '--batch_size', str(BATCH), *size, *extra]
        args = train_search.parse_args(argv)
        try:
            train_search.check_args(args)
            return args
        except utils.UserError as e:
            error = e
    pytest.skip(f'--method {method} refuses --space {space} {" ".join(extra)}: {error}')


def batch(n: int = BATCH, size: int = 32, classes: int = 10, device=META):
    return torch.randn(n, 3, size, size, device=device), torch.randint(classes, (n,), device=device)


def on_meta(tensors) -> bool:
    return all(t.device == META for t in tensors)


def meta_teacher():
    """A tiny PyramidNet teacher (AGS's frozen stage maps) on the meta device."""
    import teacher
    torch.manual_seed(0)
    return teacher.PyramidNet(depth=11, alpha=12, num_classes=10, bottleneck=True).to(META).eval()


@contextlib.contextmanager
def host_reads():
    """Count the reads of meta tensors' values (`.item()`, `.tolist()`, `.cpu()`), each answered with zeros of
    the tensor's shape (a stand-in for the value the meta device does not have)."""
    reads = []
    real = {name: getattr(torch.Tensor, name) for name in ('item', 'tolist', 'cpu')}

    def stand_in(name):
        def read(self, *args, **kwargs):
            if self.device != META:
                return real[name](self, *args, **kwargs)
            reads.append(f'{name} of a {tuple(self.shape)} tensor')
            zeros = torch.zeros(self.shape, dtype=self.dtype)
            return zeros if name == 'cpu' else real[name](zeros)
        return read

    for name in real:
        setattr(torch.Tensor, name, stand_in(name))
    try:
        yield reads
    finally:
        for name, method in real.items():
            setattr(torch.Tensor, name, method)


def search_step(method: str, space: str, extra=()):
    """Build the method's supernet on the CPU (as train_search.main does), move it to the meta device, and take
    one step of the searching regime (the last epoch: after any warm-up), with a teacher where the method's
    settings use one (--lambda_at > 0: NOS's default)."""
    args = search_args(method, space, extra)
    teacher = meta_teacher() if args.lambda_at > 0 else None
    cls = train_search.METHODS[method]
    torch.manual_seed(0)
    model = cls.build_model(args, 10)
    if hasattr(model, 'alive_masks'):  # some ops pruned, as after EoiNAS's first prunes
        masks = [m.clone() for m in model.alive_masks()]
        for m in masks:
            m[:, 1] = False
        model.set_alive(*masks)
    model = model.to(META)
    optimizer = torch.optim.SGD(model.weights(), args.learning_rate, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    step = cls(model, args)
    step.start_epoch(args.epochs - 1)
    x, y = batch()
    xv, yv = batch()
    with host_reads() as reads:
        out = step.step(x, y, xv, yv, teacher, 0.01, optimizer)
    # no read back from the device in a step, but the sampled ops of a hard Gumbel sample
    assert not reads or getattr(model, 'gumbel_hard', False), reads
    assert out and on_meta(out.values()), {k: v.device for k, v in out.items()}
    assert on_meta(model.parameters()) and on_meta(model.buffers())
    assert any(p.grad is not None for p in model.weights())
    return model, reads


@pytest.mark.parametrize('space', registered_spaces())
@pytest.mark.parametrize('method', list(train_search.METHODS))
def test_one_search_step_of_every_method_on_every_space(method, space):
    search_step(method, space)


@pytest.mark.slow  # the reference NOS cells cost some 20 s of CPU time a step on the meta device
@pytest.mark.parametrize('space', registered_spaces())
@pytest.mark.parametrize('method', list(train_search.METHODS))
def test_the_reference_cells_too(method, space):
    """--no_fast: the per-edge reference cells, where the fast path is the default (they run under --sync_bn,
    and for EoiNAS's --gumbel_hard)."""
    if not train_search.METHODS[method].fast(search_args(method, space)):
        pytest.skip(f'--method {method} --space {space} runs the reference cells by default (tested above)')
    search_step(method, space, ['--no_fast'])


def test_hard_sampling():
    """--gumbel_hard (GDAS's one-op forward): its only read is the sampled op of each edge, once per forward."""
    _, reads = search_step('eoinas', 'darts', ['--gumbel_hard'])
    assert reads and all(r.startswith(('tolist', 'cpu')) for r in reads), reads


def test_second_order_darts():
    """--unrolled: the virtual step's copy of the network (Architect.unrolled_model) on the same device."""
    search_step('darts', 'darts', ['--lambda_at', '0', '--unrolled'])


# ---------------------------------------------------------------------------------------------------------
# ADWPNAS: the HyperNetwork's step in each phase


@pytest.mark.parametrize('phase, arch_split', [('train', 'train'), ('basic', 'train'), ('cross', 'train'),
                                               ('cross', 'val')])
def test_adwpnas_step_in_every_phase(phase, arch_split):
    import search_adwp
    from model_adwp import HyperNetwork
    rng = torch.Generator().manual_seed(0)
    ops = [op for op in genotypes.DARTS_PRIMITIVES if op != 'none']
    # an intensive space: K = 6 (op, input) candidates per node, all different
    space = {kind: [[(ops[(j + k) % len(ops)], k % (j + 2)) for k in range(6)] for j in range(genotypes.STEPS)]
             for kind in ('normal', 'reduce')}
    torch.manual_seed(0)
    model = HyperNetwork(4, 10, 3, space).to(META)
    w_opt = torch.optim.SGD(model.weights(), 0.025, momentum=0.9, weight_decay=3e-4)
    a_opt = torch.optim.Adam(model.arch_parameters(), 3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    x, y = batch()
    arch_batch = batch() if arch_split == 'val' else None
    loss, correct = search_adwp.adwp_step(model, phase, x, y, w_opt, a_opt, alpha_gen=rng, arch_batch=arch_batch)
    assert on_meta([loss, correct]) and on_meta(model.parameters())


# ---------------------------------------------------------------------------------------------------------
# Retraining: one step of every evaluation network (drop-path and the auxiliary tower on)


def retraining_networks():
    nets = {'DARTS_V2': 'cifar', 'NOS_EXAMPLE': 'cifar', 'AGNAS': 'cifar', 'per-layer': 'cifar',
            'NOS_EXAMPLE imagenet': 'imagenet'}
    if hasattr(genotypes, 'NB201Genotype'):
        nets['nb201'] = 'nb201'
    return nets


@pytest.mark.parametrize('name', retraining_networks())
def test_one_retraining_step(name):
    import model
    kind = retraining_networks()[name]
    torch.manual_seed(0)
    if kind == 'nb201':
        from model_nb201 import NB201Network
        net = NB201Network(4, 10, 3, genotypes.load('|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|'
                                                   'skip_connect~0|nor_conv_3x3~1|skip_connect~2|'))
        size = 32
    elif kind == 'imagenet':
        net, size = model.NetworkImageNet(4, 10, 3, True, genotypes.NOS_EXAMPLE), 224
    else:
        g = (genotypes.as_macro(genotypes.NOS_EXAMPLE, 5) if name == 'per-layer'
             else genotypes.load(arch=name))
        net, size = model.NetworkCIFAR(4, 10, 5, True, g), 32
    net = net.to(META)
    net.drop_path_prob = 0.2
    optimizer = torch.optim.SGD(net.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    x, y = batch(size=size)
    loss, logits = utils.train_step(net, x, y, optimizer, torch.nn.CrossEntropyLoss(), aux_weight=0.4)
    assert on_meta([loss, logits]) and logits.shape == (BATCH, 10) and on_meta(net.parameters())
