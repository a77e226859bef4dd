"""teacher.py: PyramidNet and ResNet-18 (+ self-calibration), the teacher API, and the training CLI."""
import json
import os
import subprocess
import sys

import pytest
import torch

import runs
import teacher
import utils

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ['--depth', '11', '--alpha', '12', '--dataset', 'synthetic', '--synthetic_size', '48',
        '--batch_size', '16', '--workers', '0', '--device', 'cpu', '--report_freq', '0']


def tiny_pyramid(num_classes=10):
    torch.manual_seed(0)
    return teacher.PyramidNet(depth=11, alpha=12, num_classes=num_classes, bottleneck=True)


@pytest.mark.parametrize('depth,bottleneck', [(20, True), (14, False)])
def test_pyramidnet_stage_shapes(depth, bottleneck):
    torch.manual_seed(0)
    model = teacher.PyramidNet(depth, alpha=24, num_classes=7, bottleneck=bottleneck)
    logits, stages = model.forward_stages(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 7)
    assert [tuple(t.shape[-2:]) for t in stages] == [(32, 32), (16, 16), (8, 8)]
    widths = teacher.pyramid_widths(depth, 24, bottleneck)
    expansion = 4 if bottleneck else 1
    assert [t.shape[1] for t in stages] == [w[-1] * expansion for w in widths]
    # the widths grow by alpha in total: 16 + alpha at the last unit
    assert widths[-1][-1] == 16 + 24
    torch.testing.assert_close(model(torch.ones(1, 3, 32, 32)), model.forward_stages(torch.ones(1, 3, 32, 32))[0])


def test_pyramidnet110_is_the_papers_teacher():
    widths = teacher.pyramid_widths(110, 84, True)
    assert [len(w) for w in widths] == [12, 12, 12]          # (110 - 2) / 9 units per stage
    assert widths[0][:3] == [18, 21, 23] and widths[-1][-1] == 100  # 16 + k * 84/36, rounded half up
    model = teacher.PyramidNet(110, 84, 10, True)
    # NOS Table 2 lists the teacher at 2.5M parameters
    assert utils.count_params(model) == 2_528_712
    assert model.fc.in_features == 400


def test_bad_depth_is_a_user_error():
    with pytest.raises(utils.UserError, match='9n'):
        teacher.PyramidNet(depth=12, bottleneck=True)


def resnet_cost(calibration):
    torch.manual_seed(0)
    model = teacher.ResNet18(10, calibration)
    return model, utils.count_params(model), utils.count_macs(model)


@pytest.fixture(scope='module')
def resnet_baseline():
    _, params, macs = resnet_cost('none')
    return params, macs


def test_resnet18_baseline_matches_table1(resnet_baseline):
    params, macs = resnet_baseline
    assert params == 11_173_962                   # Table 1: 11.17M
    assert round(macs / 1e6, 2) == 555.42         # Table 1: 555.42M FLOPs (multiply-adds)


@pytest.mark.parametrize('calibration', teacher.CALIBRATIONS[1:])
def test_resnet18_calibration_is_cheap(calibration, resnet_baseline):
    model, params, macs = resnet_cost(calibration)
    assert sum(isinstance(m, teacher.Calibration) for m in model.modules()) == 3
    logits, stages = model.forward_stages(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and [t.shape[1] for t in stages] == [64, 128, 256]
    added_params, added_macs = params - resnet_baseline[0], macs - resnet_baseline[1]
    assert 0 < added_params < 50_000              # Table 1: +0.01 .. +0.04M (channel attention: see README)
    assert 0 < added_macs < 10_000_000            # Table 1: +0.40 .. +7.62M


def test_dilated_dynamic_conv_differs_only_in_dilation():
    torch.manual_seed(0)
    plain = teacher.ResNet18(10, 'dynamic_conv_3x3').eval()
    torch.manual_seed(0)
    dilated = teacher.ResNet18(10, 'dil_dynamic_conv_3x3').eval()
    dilated.load_state_dict(plain.state_dict())   # same weights: only the dilation tells them apart
    x = torch.randn(1, 3, 16, 16)
    assert dilated.calibration[0].dilation == 2 and plain.calibration[0].dilation == 1
    assert not torch.allclose(plain(x), dilated(x))


def test_calibration_is_the_heterogeneous_residual():
    torch.manual_seed(0)
    cal = teacher.Calibration('channel_attention', 8)
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(cal(x), x + x * cal.op(x))
    dyn = teacher.Calibration('dil_dynamic_conv_5x5', 8)
    from operations import dynamic_conv
    torch.testing.assert_close(dyn(x), x + dynamic_conv(x, dyn.op(x), 2))


def test_save_load_round_trip(tmp_path):
    model = tiny_pyramid()
    model.train()
    model(torch.randn(8, 3, 32, 32))               # move the BN statistics off their initial values
    path = str(tmp_path / 'sub' / 't.pt')
    teacher.save_teacher(model, path, 'cifar10', note='x')
    loaded = teacher.load_teacher(path, 'cifar10', 'cpu')
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    ref_logits, ref_stages = model.forward_stages(x)
    logits, stages = loaded.forward_stages(x)
    torch.testing.assert_close(logits, ref_logits)
    for a, b in zip(stages, ref_stages):
        torch.testing.assert_close(a, b)


def random_statistics(model):
    """BatchNorm running statistics and affine weights away from their initial 0, 1 (so a fold has work to do)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t, lo, hi in ((m.running_mean, -1, 1), (m.running_var, .5, 2), (m.weight.data, .5, 1.5),
                              (m.bias.data, -1, 1)):
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) * (hi - lo) + lo)
    return model


@pytest.mark.parametrize('depth,bottleneck,left', [(20, True, 1), (14, False, 1 + 2 * 3)])
def test_folded_teacher_computes_the_same_maps(depth, bottleneck, left):
    torch.manual_seed(0)
    model = random_statistics(teacher.PyramidNet(depth, alpha=24, num_classes=7, bottleneck=bottleneck)).double()
    model.eval()
    folded = teacher.fold_batchnorm(model)
    # a bottleneck unit's four BNs all fold (the first one into the 1x1 conv after it, which has no padding);
    # a basic unit's first BN precedes a zero-padded 3x3 conv and stays; so does the final BN
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()) == left
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) > left  # a copy: the model keeps its
    assert not folded.training and not any(p.requires_grad for p in folded.parameters())
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref_logits, ref = model.forward_stages(x)
        logits, stages = folded.forward_stages(x)
    for a, b in zip(stages + [logits], ref + [ref_logits]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * b.abs().max().item())


def test_fold_formulas_by_hand():
    # conv (w = 2, bias 0) then BN (mean 1, var 3, eps 1, gamma 4, beta 5): s = 4 / sqrt(3 + 1) = 2,
    # t = 5 - 1 * 2 = 3, so the folded conv is 2 * 2 = 4 with bias 0 * 2 + 3 = 3
    def bn():
        b = torch.nn.BatchNorm2d(1, eps=1.)
        b.running_mean.fill_(1.), b.running_var.fill_(3.), b.weight.data.fill_(4.), b.bias.data.fill_(5.)
        return b

    def conv():
        c = torch.nn.Conv2d(1, 1, 1, bias=False)
        c.weight.data.fill_(2.)
        return c

    after = teacher.fold_batchnorm(torch.nn.Sequential(conv(), bn()))
    assert isinstance(after[1], torch.nn.Identity)
    assert after[0].weight.item() == 4. and after[0].bias.item() == 3.
    # BN then the 1x1 conv: 2 * (x * 2 + 3) = 4 x + 6
    before = teacher.fold_batchnorm(torch.nn.Sequential(bn(), conv()))
    assert isinstance(before[0], torch.nn.Identity)
    assert before[1].weight.item() == 4. and before[1].bias.item() == 6.
    # before a zero-padded conv the border would change: not folded
    padded = torch.nn.Sequential(bn(), torch.nn.Conv2d(1, 1, 3, padding=1))
    assert isinstance(teacher.fold_batchnorm(padded)[0], torch.nn.BatchNorm2d)


def test_loaded_teacher_folds(tmp_path):
    model = tiny_pyramid()
    model.train()
    model(torch.randn(8, 3, 32, 32))               # BN statistics off their initial values
    path = str(tmp_path / 't.pt')
    teacher.save_teacher(model, path, 'cifar10')   # what teacher.py writes: the unfolded network
    loaded = teacher.load_teacher(path, 'cifar10', 'cpu')
    folded = teacher.fold_batchnorm(loaded)         # as train_search.py does, after the load
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(folded.forward_stages(x)[1], loaded.forward_stages(x)[1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_shortcut_without_autograd_is_the_padded_sum():
    # without autograd a unit adds its shortcut into the first channels in place; with it, pads and adds
    model = random_statistics(teacher.PyramidNet(20, alpha=24, num_classes=7, bottleneck=True)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fast = model.forward_stages(x)[1]
    padded = model.forward_stages(x)[1]
    assert all(torch.equal(a, b) for a, b in zip(fast, padded))


def test_teacher_pair_is_the_two_batches_apart():
    import darts
    torch.manual_seed(0)
    model = teacher.fold_batchnorm(random_statistics(tiny_pyramid()).double())
    x, xv = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64)
    calls = []
    model.stem.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))  # the teacher sees one batch of 6
    t, tv = darts.teacher_stages_pair(model, x, xv, True, True)
    assert calls == [6]
    for got, want in ((t, darts.teacher_stages(model, x)), (tv, darts.teacher_stages(model, xv))):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert darts.teacher_stages_pair(model, x, xv, True, False)[1] is None
    assert darts.teacher_stages_pair(model, x, None, False, False) == (None, None)
    assert darts.teacher_stages_pair(None, x, xv, True, True) == (None, None)


@pytest.mark.parametrize('method', ['darts', 'eoinas', 'gdas'])
def test_a_search_step_runs_the_teacher_once(method):
    # darts.teacher_stages_pair in each method that steps on both batches: one teacher forward per step, on the
    # training and the validation batch together, and both levels see L_AT
    import train_search
    args = train_search.parse_args(['--dataset', 'synthetic', '--device', 'cpu', '--method', method, '--space',
                                    'darts', '--layers', '3', '--init_channels', '4', '--batch_size', '2',
                                    '--lambda_at', '1000'])
    train_search.check_args(args)
    cls = train_search.METHODS[method]
    torch.manual_seed(0)
    model = cls.build_model(args, 10)
    optimizer = torch.optim.SGD(model.weights(), 0.01)
    step = cls(model, args)
    net = teacher.fold_batchnorm(tiny_pyramid())
    calls = []
    net.stem.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    x, xv = torch.randn(2, 2, 3, 32, 32)
    y, yv = torch.randint(10, (2, 2))
    if method == 'eoinas':  # the warm-up steps the weights alone: the teacher sees the training batch only
        assert step.step(x, y, None, None, net, 0.01, optimizer)['train_at'] > 0 and calls == [2]
        step.start_epoch(args.epochs - 1)
        calls.clear()
    out = step.step(x, y, xv, yv, net, 0.01, optimizer)
    assert calls == [4] and out['train_at'] > 0 and out['val_at'] > 0


def test_default_teacher_path():
    # teacher.py's default --save folder, and the checkpoint in it (where train_search.py looks)
    assert teacher.default_teacher_path('cifar10') == os.path.join('teachers', 'pyramidnet110_cifar10',
                                                                   'checkpoint.pt')
    args = teacher.parse_args(['--dataset', 'cifar100'])
    assert os.path.join(teacher.run_paths(args)[0], 'checkpoint.pt') == teacher.default_teacher_path('cifar100')
    assert teacher.default_teacher_path('cifar100', depth=11, alpha=12) != teacher.default_teacher_path('cifar100')


def test_load_teacher_errors(tmp_path):
    missing = str(tmp_path / 'none.pt')
    with pytest.raises(utils.UserError) as e:
        teacher.load_teacher(missing, 'cifar100', 'cpu')
    assert missing in str(e.value) and 'python teacher.py --dataset cifar100 --device cpu' in str(e.value)
    assert '--lambda_at 0' in str(e.value)

    path = str(tmp_path / 't.pt')
    teacher.save_teacher(tiny_pyramid(), path, 'cifar10')
    with pytest.raises(utils.UserError, match='cifar10.*cifar100'):
        teacher.load_teacher(path, 'cifar100', 'cpu')

    resnet = str(tmp_path / 'r.pt')
    teacher.save_teacher(teacher.ResNet18(10, 'channel_attention'), resnet, 'cifar10')
    with pytest.raises(utils.UserError, match='ResNet-18.*PyramidNet'):
        teacher.load_teacher(resnet, 'cifar10', 'cpu')

    state = torch.load(path, weights_only=False)
    state['config']['alpha'] = 20                 # weights of alpha 12 under a config that says 20
    del state[runs.CHECKSUM]                      # (written so by other code: with its checksum, it is damage)
    torch.save(state, path)
    with pytest.raises(utils.UserError, match='do not fit.*PyramidNet-11'):
        teacher.load_teacher(path, 'cifar10', 'cpu')

    with open(path, 'wb') as f:
        f.write(b'not a checkpoint')
    with pytest.raises(utils.UserError, match='damaged'):
        teacher.load_teacher(path, 'cifar10', 'cpu')

    torch.save({'model': {}}, path)
    with pytest.raises(utils.UserError, match='not a teacher checkpoint'):
        teacher.load_teacher(path, 'cifar10', 'cpu')


def log_top1(save):
    with open(os.path.join(save, 'train_log.jsonl')) as f:
        return [json.loads(line) for line in f][-1]['test_top1']


def test_train_end_to_end_writes_a_teacher(tmp_path, capsys):
    save = str(tmp_path / 'teacher')
    teacher.main(TINY + ['--epochs', '1', '--save', save])
    out = capsys.readouterr().out
    assert 'final:' in out and 'checkpoint' in out
    # one folder holds everything, and the end of the run says where and what next
    assert sorted(os.listdir(save)) == ['checkpoint.pt', 'log.txt', 'result.json', 'train_log.jsonl']
    assert f'its files, in {save}' in out
    # the next command runs on this machine and data as printed
    assert (f'next: python train_search.py --teacher {save} --device cpu --dataset synthetic --synthetic_size 48 '
            f'--batch_size 16 --workers 0' in out)
    with open(os.path.join(save, 'result.json')) as f:
        result = json.load(f)
    assert result['kind'] == 'teacher' and result['test_error'] == pytest.approx(100 - log_top1(save))
    model = teacher.load_teacher(save, 'synthetic', 'cpu')  # the folder, as train_search.py --teacher takes it
    assert model.config['depth'] == 11
    with open(os.path.join(save, 'train_log.jsonl')) as f:
        log = [json.loads(line) for line in f]
    assert len(log) == 1 and 0 <= log[0]['test_top1'] <= 100
    state = torch.load(os.path.join(save, 'checkpoint.pt'), weights_only=False)
    assert state['finished'] and state['epoch'] == 0 and 'optimizer' in state

    # an existing checkpoint without --resume is refused
    with pytest.raises(utils.UserError, match='--resume'):
        teacher.main(TINY + ['--epochs', '1', '--save', save])


def test_resume_equals_uninterrupted(tmp_path):
    straight = str(tmp_path / 'a')
    teacher.main(TINY + ['--epochs', '2', '--save', straight, '--lr_milestones', '1'])
    split = str(tmp_path / 'b')
    teacher.main(TINY + ['--epochs', '1', '--save', split, '--lr_milestones', '1'])
    teacher.main(TINY + ['--epochs', '2', '--save', split, '--lr_milestones', '1', '--resume'])
    a = torch.load(os.path.join(straight, 'checkpoint.pt'), weights_only=False)
    b = torch.load(os.path.join(split, 'checkpoint.pt'), weights_only=False)
    assert a['epoch'] == b['epoch'] == 1
    for k, v in a['state_dict'].items():
        assert torch.equal(v, b['state_dict'][k]), k
    assert a['scheduler']['last_epoch'] == b['scheduler']['last_epoch'] == 2

    # resuming with another network is refused, naming both configs
    with pytest.raises(utils.UserError, match='network config'):
        teacher.main(['--depth', '20'] + TINY[2:] + ['--epochs', '3', '--save', split, '--resume'])


def test_cli_errors(tmp_path):
    save = str(tmp_path / 'x.pt')
    r = subprocess.run([sys.executable, 'teacher.py', '--device', 'cpu', '--depth', '12', '--dataset', 'synthetic',
                        '--save', save], cwd=HERE, capture_output=True, text=True, check=False)
    assert r.returncode == 2 and '--depth 12' in r.stderr and 'Traceback' not in r.stderr
    assert not os.listdir(tmp_path)
    with pytest.raises(utils.UserError, match='--arch resnet18'):
        teacher.main(['--calibration', 'spatial_attention', '--device', 'cpu'])
