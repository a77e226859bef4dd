"""The fast path under pruning and with --checkpoint_cells (issue 26): at random prune states (each edge losing
its own ops, as EoiNAS prunes) it computes the reference's loss, gradients and running statistics in float64,
and it computes only the alive (edge, op) pairs (counted from the convolutions' input channels, not inferred
from outputs); a checkpointed cell gives the same gradients and statistics as a kept one, in every method."""
import collections

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import agnas
import bench_search
import darts
import model_search_fast
import runs
import train_search
import utils
from eoinas import EoiNASMethod
from model_search_fast import Network
from test_fast_search import backward_each, pair
from test_train_search import die_after


def pruned_pair(space, keep, seed=0):
    plain, fast = pair(space, seed=seed)
    masks = bench_search.random_alive(plain, keep, seed=seed + keep)
    plain.set_alive(*masks)
    fast.set_alive(*masks)
    return plain, fast, masks


# (space, ops left per edge): from the first prune down to one op, DARTS's 8 ops and NOS's 11; half of them
# in the default run, the rest with -m slow
slow = pytest.mark.slow
STATES = [pytest.param('darts', 6, marks=slow), ('darts', 4), pytest.param('darts', 2, marks=slow), ('darts', 1),
          pytest.param('nos', 8, marks=slow), ('nos', 5), ('nos', 2), pytest.param('nos', 1, marks=slow)]


@pytest.mark.parametrize('space, keep', STATES)
def test_pruned_fast_path_equals_the_reference(space, keep):
    plain, fast, masks = pruned_pair(space, keep)
    assert all((m.sum(1) == keep).all() for m in masks)  # every row keeps `keep` ops ...
    assert any(not torch.equal(m[0], m[r]) for m in masks for r in range(len(m)))  # ... its own ones
    torch.manual_seed(1)
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randint(10, (2,))
    losses = backward_each((plain, fast), x, y)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=0)
    # every gradient, A's too; a dead pair's weights get none on the reference (zero on the fast path, or
    # none when the op is dead on every edge of a group)
    expected = fast.plain_tensors(plain, lambda t: torch.zeros_like(t) if t.grad is None else t.grad)
    for name, p in fast.named_parameters():
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got, expected[name], rtol=1e-9, atol=1e-12, msg=name)
    if keep > 1:  # one op left per edge weighs exactly 1 whatever A: then A's gradient is exactly 0
        assert fast.alphas_normal.grad.abs().sum() > 0
    # the running statistics of the alive pairs moved as the reference's did: eval mode reads them
    plain.eval(), fast.eval()
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-10, atol=1e-12)


class ConvChannels(TorchDispatchMode):
    """Per kind of convolution (depthwise k x k at a dilation, or pointwise C -> C), the input channels it
    reads times its output pixels: the work of the op convolutions, whichever way they are grouped."""

    def __init__(self, C):
        super().__init__()
        self.C, self.work = C, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ == 'convolution' and args[0].dim() == 4 and args[0].shape[0] > 1:
            x, w, stride, dilation = args[0], args[1], args[3], args[5]
            groups = args[8]
            if w.shape[1] == 1 and groups == x.shape[1] and w.shape[-1] > 1:      # depthwise k x k
                key = ('depthwise', w.shape[-1], dilation[0], stride[0])
            elif w.shape[-1] == 1 and w.shape[1] == self.C and w.shape[0] // groups == self.C:  # pointwise C -> C
                key = ('pointwise', stride[0])
            else:
                return out
            self.work[key] += x.shape[1] * out.shape[-2] * out.shape[-1] * x.shape[0]
        return out


def conv_work(model, C=4):
    counter = ConvChannels(C)
    with counter, torch.no_grad():
        model(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    return counter.work


@pytest.mark.parametrize('space, keep', [('darts', 4), pytest.param('nos', 5, marks=slow)])
def test_pruned_pairs_are_not_computed(space, keep):
    """The convolutions of the fast path read exactly the channels of the reference's alive ops: per kind,
    the input channels times output pixels are equal (and well below the unpruned fast path's). Computing a
    dead pair, or an op on every edge where it is alive on some, would add channels."""
    plain, fast, masks = pruned_pair(space, keep)
    full = Network(4, 10, 3, space=space, fast=True).double()
    for m in full.modules():  # NOS's merged depthwise convs would move the 3x3 kernels' work to the 5x5 kind
        if isinstance(m, model_search_fast.FastEdges):
            m.merged = False
    for model in (plain, fast, full):
        model.eval()  # the same ops in either mode; eval keeps the statistics
    expected, got, unpruned = conv_work(plain), conv_work(fast), conv_work(full)
    assert got == expected
    assert {k[0] for k in got} == {'depthwise', 'pointwise'}
    for key, work in got.items():
        assert work < unpruned[key], key
    # an independent count: the separable convs' second depthwise stage on the normal cells' ... and all
    # cells' edges: one per alive (edge, sep_conv) pair of each cell
    cols = [o for o, name in enumerate(plain.ops) if name.startswith('sep_conv')]
    pairs = sum(int(masks[cell.reduction][:, cols].sum()) for cell in plain.cells)
    second = sum(v for key, v in got.items() if key[0] == 'depthwise' and key[3] == 1)
    assert pairs > 0 and second >= pairs * 4 * 2 * 2 * 2  # at least C channels x 2x2 pixels x batch 2


def test_dead_pairs_weights_are_not_read():
    """A pruned group reads the rows of its alive pairs only (one gather for the whole network): a change to
    a dead pair's weights changes nothing, a change to an alive one does."""
    _, fast, masks = pruned_pair('darts', 3)
    fast.eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    before = fast(x)
    group = fast.cells[0].groups[0]  # the input group of a normal cell: 8 edges
    lay = fast._fast_plans[False].layouts(masks[0])[0][0]
    n = 'sep_conv_3x3'
    dead = [e for e in range(group.E) if e not in lay.edges.get(n, ())]
    alive = list(lay.edges[n])
    assert dead and alive
    with torch.no_grad():
        for e in dead:
            group.dw1[n][e * 4:(e + 1) * 4] = float('nan')
    torch.testing.assert_close(fast(x), before, rtol=0, atol=0)
    with torch.no_grad():
        group.dw1[n][alive[0] * 4] += 1
    assert not torch.allclose(fast(x), before)


@slow
def test_pruned_fast_path_keeps_the_reference_search_in_eoinas():
    """EoiNAS steps (Gumbel samples, skip dropout, the A and weight steps) after a random per-edge prune give
    the reference's A and statistics on both spaces."""
    for space, keep in (('darts', 3), ('nos', 4)):
        args = train_search.parse_args(['--method', 'eoinas', '--space', space, '--layers', '3',
                                        '--init_channels', '4', '--skip_dropout', '0', '--eoi_warmup', '0'])
        plain, fast, _ = pruned_pair(space, keep)
        g = torch.Generator().manual_seed(4)
        batches = [(torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(10, (4,), generator=g))
                   for _ in range(2)]
        for model in (plain, fast):
            torch.manual_seed(8)
            optimizer = torch.optim.SGD(model.weights(), 0.025, momentum=0.9, weight_decay=3e-4)
            method = EoiNASMethod(model, args)
            for step in range(3):
                (x, y), (xv, yv) = batches[step % 2], batches[(step + 1) % 2]
                method.step(x, y, xv, yv, None, 0.025, optimizer)
        torch.testing.assert_close(fast.alphas_normal, plain.alphas_normal, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(fast.alphas_reduce, plain.alphas_reduce, rtol=1e-8, atol=1e-10)


# -- --checkpoint_cells -----------------------------------------------------------------------------------


def one_iteration(space, fast, keep, checkpoint, unmerged=False):
    """One DARTS iteration with AGS and EoiNAS's skip dropout on (random masks inside the cells): the A step
    (through torch.autograd.grad), the weight step (through backward), and once more a backward to read the
    weight gradients; `unmerged`: the NOS space's depthwise convs unmerged, as checkpointed cells run them.
    Returns (gradients, buffers, A)."""
    torch.manual_seed(0)
    model = Network(4, 10, 3, space=space, fast=fast).double()
    if keep:
        model.set_alive(*bench_search.random_alive(model, keep, seed=1))
    model.set_skip_dropout(0.5)
    model.checkpoint_cells = checkpoint
    for m in model.modules():
        if unmerged and isinstance(m, model_search_fast.FastEdges):
            m.recomputed = True
    architect = darts.Architect(model, momentum=0.9, weight_decay=3e-4, arch_learning_rate=3e-3,
                                arch_weight_decay=1e-3, lambda_at=10.)
    optimizer = torch.optim.SGD(model.weights(), 0.025, momentum=0.9, weight_decay=3e-4)
    g = torch.Generator().manual_seed(3)
    x, xv = torch.randn(2, 4, 3, 8, 8, generator=g, dtype=torch.float64)
    y, yv = torch.randint(10, (2, 4), generator=g)
    teacher = [x, F.avg_pool2d(x, 2), F.avg_pool2d(x, 4)]
    torch.manual_seed(5)
    architect.step(None, None, None, xv, yv, teacher, 0.025, optimizer)
    darts.weight_step(model, optimizer, x, y, teacher, 10., 5.)
    optimizer.zero_grad()
    darts.search_loss(model, x, y, teacher, 10.)[0].backward(inputs=model.weights())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, {n: b.clone() for n, b in model.named_buffers()}, [a.detach().clone() for a in model.arch_parameters()]


@pytest.mark.parametrize('space, fast, keep', [pytest.param('nos', True, None, marks=slow), ('nos', True, 5),
                                               pytest.param('darts', False, None, marks=slow)])
def test_checkpointed_cells_give_the_same_gradients(space, fast, keep):
    """With --checkpoint_cells every gradient, A, and every running statistic equal those without it: the
    recomputation draws the same dropout masks and leaves the statistics alone (they move once per forward).
    Against the same convs: checkpointed cells run NOS's depthwise convs unmerged, which changes the rounding
    (`test_checkpointed_cells_run_the_depthwise_convs_unmerged`; both equal the reference in test_fast_search)."""
    (g0, b0, a0), (g1, b1, a1) = (one_iteration(space, fast, keep, c, unmerged=True) for c in (False, True))
    assert g0.keys() == g1.keys() and len(g0) > 10
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-12, atol=1e-15, msg=name)
    for name in b0:
        torch.testing.assert_close(b1[name], b0[name], rtol=1e-12, atol=1e-15, msg=name)
    for a, b in zip(a0, a1):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15)


def test_checkpointed_cells_run_the_depthwise_convs_unmerged():
    """A recomputed cell runs the NOS space's depthwise convs unmerged (its forward runs twice, and the merged
    one costs more multiply-adds); the flag switches every group back and forth, and both give the same loss."""
    torch.manual_seed(0)
    model = Network(4, 10, 3, space='nos', fast=True).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    groups = [m for m in model.modules() if isinstance(m, model_search_fast.FastEdges)]
    full = model._fast_plans[False].layouts(None)[0][0]
    assert full.full and all(g.merged for g in groups) and groups[0].merges(full)
    losses = []
    for on in (False, True, False):
        model.checkpoint_cells = on
        assert model.checkpoint_cells is on and all(g.merges(full) is not on for g in groups)
        torch.manual_seed(1)
        losses.append(model(x).sum())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=0)
    assert torch.equal(losses[2], losses[0])


def test_one_source_groups_run_pw1_and_the_1x1_convs_as_one_conv(monkeypatch):
    """A merged group with one source at stride 1 runs pw1 and x1x1 as one grouped conv (`_MergedPointwise`,
    once per such group and forward). Its weight: pw1's dilated rows, then its separable rows, then x1x1's,
    then zero rows up to G*C rows (G a multiple of K, fewer than K*C zero rows). A cell's input group (two
    sources) does not fuse. (The float64 tests hold its values and gradients to the reference's.)"""
    torch.manual_seed(0)
    model = Network(4, 10, 3, space='nos', fast=True)
    groups = [m for m in model.modules() if isinstance(m, model_search_fast.FastEdges)]
    fused = [g for g in groups if g.fuses_pointwise]
    assert fused and all(g.fuses_pointwise == (g.S == 1 and g.stride == 1) for g in groups)
    for g, w in zip(fused, model_search_fast._MergedGather(fused).weights()):
        C, K, R = g.C, g.K, g.x1x1.shape[0]
        G = w['pwx'].shape[0] // C - 4 * K
        assert G % K == 0 and 0 <= G * C - R < K * C
        n = 2 * K * C  # pw1: [sep_conv_3x3, sep_conv_5x5 | dil_conv_3x3, dil_conv_5x5], K*C rows each
        assert torch.equal(w['pwx'], torch.cat([g.pw1[n:], g.pw1[:n], g.x1x1, g.x1x1.new_zeros(G * C - R, C, 1, 1)]))
    calls = []
    apply = model_search_fast._MergedPointwise.apply
    monkeypatch.setattr(model_search_fast._MergedPointwise, 'apply', lambda *a: calls.append(1) or apply(*a))
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert len(calls) == len(fused)


def test_the_decode_conv_runs_tap_major_with_the_border_mask_as_its_bias():
    """The dynamic kernels' decode conv runs one group per (pair, tap), so that its bias can mask a 3x3 pair's
    border taps: the merged gather repeats each (source, op, target) pair's C decode rows once per tap, and
    the bias is -inf on exactly the border taps of the 3x3 pairs and 0 elsewhere. (The float64 tests hold the
    kernels to the reference's.)"""
    torch.manual_seed(0)
    model = Network(16, 10, 3, space='nos', fast=True)  # C = 16: a bottleneck of m = 2 channels
    group = model.cells[0].groups[2]  # node 0's group (after S_0's): one source, 3 targets
    lay = model._fast_plans[False].layouts(None)[0][2]
    P, C, m = len(lay.dyn_pairs), group.C, group.m_dyn
    assert (P, group.kernel_size, m) == (2 * 3, 5, 2)
    w = model_search_fast._MergedGather([group]).weights()[0]['decode']
    for p in range(P):
        for t in range(25):
            assert torch.equal(w[(p * 25 + t) * C:(p * 25 + t + 1) * C], group.decode[p * C:(p + 1) * C])
    bias = group._plan(lay, torch.device('cpu'), torch.float32)['tap_bias'].view(P, 5, 5, C)
    inner = torch.zeros(5, 5, dtype=torch.bool)
    inner[1:4, 1:4] = True
    for p, (name, _) in enumerate(lay.dyn_pairs):
        masked = ~inner if name == 'dynamic_conv_3x3' else torch.zeros(5, 5, dtype=torch.bool)
        assert torch.equal(bias[p], torch.where(masked, float('-inf'), 0.)[:, :, None].expand(5, 5, C))
    assert {name for name, _ in lay.dyn_pairs} == {'dynamic_conv_3x3', 'dynamic_conv_5x5'}


def test_checkpointed_cells_hold_less_for_the_backward():
    """Checkpointed, a forward holds for its backward little more than the cells' inputs."""
    fast = Network(4, 10, 3, space='nos', fast=True)
    x = torch.randn(2, 3, 8, 8)

    def forward():
        return fast(x).sum()

    kept = bench_search.held_bytes(forward)
    fast.checkpoint_cells = True
    held = bench_search.held_bytes(forward)
    assert held < kept / 3


def test_held_bytes_counts_what_the_graph_keeps():
    a = torch.randn(256, requires_grad=True)
    # exp saves its output (1 KiB); the sum's output is the returned loss; a view of a parameter is not new
    assert bench_search.held_bytes(lambda: a.exp().sum()) == 256 * 4 + 4
    assert bench_search.held_bytes(lambda: a[:128].sum()) == 4


@slow
def test_agnas_step_with_checkpointed_cells_is_the_same():
    results = []
    for checkpoint in (False, True):
        torch.manual_seed(0)
        model = agnas.build_network(4, 10, 5, space='nos', fast=True).double()
        model.checkpoint_cells = checkpoint
        optimizer = torch.optim.SGD(model.weights(), 0.025, momentum=0.9, weight_decay=3e-4)
        method = agnas.AGNASMethod(model, train_search.parse_args(['--method', 'agnas', '--space', 'nos']))
        x, y = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.randint(10, (3,))
        method.step(x, y, None, None, None, 0.025, optimizer)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15)


@slow
def test_train_search_checkpoint_cells_resumes_and_ends_as_without(tmp_path, monkeypatch):
    """--checkpoint_cells changes memory and time, not the search: an EoiNAS search (Gumbel samples, skip
    dropout) ends with the same A with and without it, and a run killed without it resumes with it and ends
    with that A too."""
    base = ['--dataset', 'synthetic', '--device', 'cpu', '--workers', '0', '--layers', '3', '--init_channels', '4',
            '--batch_size', '8', '--synthetic_size', '32', '--report_freq', '0', '--space', 'darts', '--method',
            'eoinas', '--eoi_warmup', '0', '--epochs', '2', '--prune_every', '0', '--double']
    state = {}
    for name, flags in (('kept', []), ('checkpointed', ['--checkpoint_cells'])):
        train_search.main(base + flags + ['--save', str(tmp_path / name)])
        state[name] = runs.load_checkpoint(str(tmp_path / name / 'checkpoint.pt'))['model']
    for key in ('alphas_normal', 'alphas_reduce'):
        assert torch.equal(state['kept'][key], state['checkpointed'][key]), key
    args = base + ['--save', str(tmp_path / 'resumed')]
    with monkeypatch.context() as m:
        m.setattr(runs, 'save_checkpoint', die_after(1))
        assert utils.exit_code(train_search.main, args) == 130
    assert utils.exit_code(train_search.main, args + ['--resume', '--checkpoint_cells']) == 0
    resumed = runs.load_checkpoint(str(tmp_path / 'resumed' / 'checkpoint.pt'))
    assert resumed['epoch'] == 2
    for key in ('alphas_normal', 'alphas_reduce'):
        assert torch.equal(resumed['model'][key], state['kept'][key]), key


def test_checkpoint_cells_refuses_the_chain(capsys):
    args = ['--space', 'proxyless', '--method', 'agnas', '--checkpoint_cells', '--dataset', 'synthetic']
    assert utils.exit_code(train_search.main, args) == 2
    assert '--checkpoint_cells' in capsys.readouterr().err
