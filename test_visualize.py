"""visualize.py: the DOT text of cells (always), rendering and heatmaps (when graphviz / matplotlib exist)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import genotypes
import utils
import visualize
from visualize import KIND_COLOR

HERE = os.path.dirname(os.path.abspath(__file__))
HAS_GRAPHVIZ = importlib.util.find_spec('graphviz') is not None and shutil.which('dot') is not None
HAS_MPL = importlib.util.find_spec('matplotlib') is not None
FEATURE, ATTENTION, DYNAMIC = KIND_COLOR['feature'], KIND_COLOR['attention'], KIND_COLOR['dynamic']


def op_edges(dot):
    return [line for line in dot.splitlines() if '->' in line and 'label=' in line]


def test_dot_of_darts_v2_is_darts_drawing():
    dots = visualize.genotype_dots(genotypes.DARTS_V2)
    normal = dots['normal']
    assert normal.startswith('digraph normal {') and 'classic DARTS cell' in normal
    edges = op_edges(normal)
    assert len(edges) == 8 and all(f'color="{FEATURE}"' in e for e in edges)
    # DARTS_V2 normal: node 2 <- sep_conv_3x3 from 0 and 1; node 5 <- dil_conv_3x3 from node 2
    assert '"0" -> "2" [label="sep_conv_3x3"' in normal
    assert '"2" -> "5" [label="dil_conv_3x3"' in normal
    assert "'" not in normal                                     # no surrogate nodes in a classic cell
    assert all(f'"{k}" -> "c_{{k}}"' in normal for k in range(2, 6))
    assert '"0" -> "2" [label="max_pool_3x3"' in dots['reduce']


def test_dot_of_nos_example_has_both_tiers_and_kind_colours():
    normal = visualize.genotype_dots(genotypes.NOS_EXAMPLE)['normal']
    assert 'heterogeneous operator cell' in normal
    edges = op_edges(normal)
    assert len(edges) == 12                                      # 2 first-tier + 1 second-tier per block
    assert all(f'"{k}\'" [shape=ellipse' in normal for k in range(2, 6))
    # block 0: sep_conv_3x3 from 0 and spatial_attention from 1 into 2'; dynamic_conv_3x3 from 2' to 2
    assert f'"0" -> "2\'" [label="sep_conv_3x3", color="{FEATURE}"' in normal
    assert f'"1" -> "2\'" [label="spatial_attention", color="{ATTENTION}"' in normal
    assert f'"2\'" -> "2" [label="dynamic_conv_3x3", color="{DYNAMIC}"' in normal
    assert 'arrowhead=odot' in normal and 'arrowhead=odiamond' in normal
    for kind in ('feature', 'attention', 'dynamic'):              # the legend
        assert f'<font color="{KIND_COLOR[kind]}">' in normal


def test_malformed_cell_is_a_genotype_error():
    bad = [(('spatial_attention', 0), ('channel_attention', 1), 'skip_connect')] * 4
    with pytest.raises(genotypes.GenotypeError, match='no feature op'):
        visualize.cell_dot(bad, 'normal')


def test_edge_labels_follow_the_search_order():
    labels = visualize.edge_labels(18)
    assert labels[:3] == ["0->2'", "1->2'", "0->3'"] and labels[13] == "4->5'" and labels[14:] == [
        "2'->2", "3'->3", "4'->4", "5'->5"]
    assert visualize.edge_labels(14)[-1] == '4->5'
    rows = visualize.chosen_cells(genotypes.NOS_EXAMPLE.normal, 18, genotypes.PRIMITIVES)
    assert (0, 0) in rows and (1, 7) in rows and (14, 9) in rows  # 0->2' sep3, 1->2' spatial, 2'->2 dyn3


def fake_log(path, primitives, rows, genotype, epochs=3):
    rng = np.random.default_rng(0)
    with open(path, 'w') as f:
        for e in range(1, epochs + 1):
            rec = {'epoch': e, 'primitives': primitives, 'train_acc': 10.0 * e, 'val_acc': 9.0 * e,
                   'genotype': json.loads(genotypes.to_json(genotype))}
            for cell in ('normal', 'reduce'):
                a = rng.standard_normal((rows, len(primitives))) * 0.3 * e
                w = np.exp(a) / np.exp(a).sum(1, keepdims=True)
                rec[f'alphas_{cell}'] = w.round(6).tolist()
            f.write(json.dumps(rec) + '\n')


def run_cli(argv, capsys):
    """visualize's main through utils.run_main, in-process: (exit code, stdout, stderr)."""
    code = utils.exit_code(visualize.main, argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_on_a_genotype_json(tmp_path, capsys):
    path = str(tmp_path / 'genotype.json')
    genotypes.save(genotypes.NOS_EXAMPLE, path)
    out = str(tmp_path / 'plots')
    code, stdout, stderr = run_cli([path, '--out', out], capsys)
    assert code == 0
    with open(os.path.join(out, 'normal.dot')) as f:
        assert f.read() == visualize.genotype_dots(genotypes.NOS_EXAMPLE)['normal']
    if HAS_GRAPHVIZ:
        for cell in ('normal', 'reduce'):
            with open(os.path.join(out, f'{cell}.png'), 'rb') as f:
                assert f.read(8) == b'\x89PNG\r\n\x1a\n'
        assert 'wrote' in stdout
    else:
        assert 'digraph normal' in stdout and 'graphviz' in stderr


@pytest.mark.parametrize('space', ['nos', 'darts'])
def test_cli_on_a_search_folder(tmp_path, capsys, space):
    if space == 'nos':
        fake_log(tmp_path / 'search_log.jsonl', genotypes.PRIMITIVES, 18, genotypes.NOS_EXAMPLE)
    else:
        fake_log(tmp_path / 'search_log.jsonl', genotypes.DARTS_PRIMITIVES, 14, genotypes.DARTS_V2)
    # no genotype.json: the last epoch's genotype in the log is drawn
    code, _, stderr = run_cli([str(tmp_path), '--format', 'pdf'], capsys)
    assert code == 0, stderr
    out = tmp_path / 'plots'
    drawn = genotypes.NOS_EXAMPLE if space == 'nos' else genotypes.DARTS_V2
    assert (out / 'reduce.dot').read_text() == visualize.genotype_dots(drawn)['reduce']
    if HAS_MPL:
        for name in ('alphas_normal', 'alphas_reduce', 'alphas_evolution'):
            with open(out / f'{name}.pdf', 'rb') as f:
                assert f.read(5) == b'%PDF-'
    else:
        assert 'matplotlib' in stderr


@pytest.mark.skipif(not HAS_MPL, reason='needs matplotlib')
def test_heatmap_of_a_near_uniform_A_is_not_one_colour(tmp_path):
    """A young search: every weight within 1e-3 of 1/11. The saved PNG must show the drift: the colours of
    the smallest and the largest weight differ clearly, and both fill whole cells of the heatmap."""
    import matplotlib
    import matplotlib.image
    primitives = genotypes.PRIMITIVES
    a = 1e-3 * np.random.default_rng(0).standard_normal((18, len(primitives)))  # the search's initial A
    w = np.exp(a) / np.exp(a).sum(1, keepdims=True)
    assert np.abs(w - 1 / len(primitives)).max() < 1e-3
    records = [{'epoch': 1, 'primitives': primitives, 'alphas_normal': w.tolist(), 'alphas_reduce': w.tolist()}]
    visualize.plot_alphas(records, str(tmp_path), 'png')
    pixels = matplotlib.image.imread(tmp_path / 'alphas_normal.png')[..., :3]
    norm = visualize.heatmap_norm(w, len(primitives))
    cmap = matplotlib.colormaps[visualize.HEATMAP_CMAP]
    low, high = (np.array(cmap(norm(v))[:3]) for v in (w.min(), w.max()))
    assert np.abs(high - low).max() > 0.5
    for colour in (low, high):  # a cell of the 18 x 11 grid is some 20 x 15 pixels at 130 dpi
        assert (np.abs(pixels - colour).max(-1) < 2 / 255).sum() >= 100
    assert len(np.unique((pixels * 255).round().reshape(-1, 3), axis=0)) > 50


def test_cell_drawing_explains_k_prime_and_draws_legend_like_edges():
    normal = visualize.genotype_dots(genotypes.NOS_EXAMPLE)['normal']
    assert "surrogate node of block k" in normal and "k\' &#8594; k is its second tier" in normal
    for kind in ('feature', 'attention', 'dynamic'):  # glyph: the edge's line style and arrowhead
        assert f'{visualize.KIND_GLYPH[kind]} {visualize.KIND_MEANING[kind]}' in normal
    assert '&#9654;' in visualize.KIND_GLYPH['feature'] and visualize.KIND_ARROW['feature'] == 'normal'
    assert '&#9675;' in visualize.KIND_GLYPH['attention'] and visualize.KIND_ARROW['attention'] == 'odot'
    assert '&#9671;' in visualize.KIND_GLYPH['dynamic'] and visualize.KIND_ARROW['dynamic'] == 'odiamond'
    # labels as c_{k-2} is meant to read (a subscript), not raw TeX
    assert 'label=<0: c<sub>k-2</sub>>' in normal and 'label=<c<sub>k</sub>>' in normal
    assert 'c_{k-2}' not in normal
    # blocks in order: invisible edges pin each block before the next one's surrogate node
    chain = [line.split('[')[0].strip() for line in normal.splitlines() if 'style=invis, weight' in line]
    assert chain == ['"1" -> "2\'"', '"2" -> "3\'"', '"3" -> "4\'"', '"4" -> "5\'"']
    darts = visualize.genotype_dots(genotypes.DARTS_V2)['normal']
    assert 'surrogate' not in darts and '"2" -> "3" [style=invis' in darts


def test_without_graphviz_and_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'graphviz', None)        # import graphviz -> ImportError
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    fake_log(tmp_path / 'search_log.jsonl', genotypes.PRIMITIVES, 18, genotypes.NOS_EXAMPLE)
    code, stdout, stderr = run_cli([str(tmp_path)], capsys)
    assert code == 0
    assert 'pip install graphviz' in stderr and 'pip install matplotlib' in stderr
    assert stdout.count('digraph') == 2                         # the DOT text instead of the drawings
    assert not list((tmp_path / 'plots').glob('*.png'))


def test_bad_input_is_one_sentence(tmp_path, capsys):
    code, _, err = run_cli(['NO_SUCH_GENOTYPE'], capsys)
    assert code == 2 and 'no genotype named' in err and 'DARTS_V2' in err

    code, _, err = run_cli([str(tmp_path / 'missing.json')], capsys)
    assert code == 2 and 'does not exist' in err

    bad = tmp_path / 'bad.json'
    bad.write_text(genotypes.to_json(genotypes.NOS_EXAMPLE).replace('sep_conv_3x3', 'sep_conv_9x9', 1))
    code, _, err = run_cli([str(bad)], capsys)
    assert code == 2 and 'sep_conv_9x9' in err and 'block 0' in err

    code, _, err = run_cli([str(tmp_path)], capsys)           # a folder without a search in it
    assert code == 2 and 'genotype.json' in err

    (tmp_path / 'search_log.jsonl').write_text('{"epoch": 1}\n')
    code, _, err = run_cli([str(tmp_path)], capsys)
    assert code == 2 and 'lacks' in err and 'alphas_normal' in err


def test_cli_exit_code():
    r = subprocess.run([sys.executable, 'visualize.py', 'NO_SUCH_GENOTYPE'], cwd=HERE, capture_output=True,
                       text=True, check=False)
    assert r.returncode == 2 and r.stderr.startswith('error: no genotype named') and 'Traceback' not in r.stderr


@pytest.mark.skipif(importlib.util.find_spec('graphviz') is None, reason='needs the graphviz package')
def test_graphviz_without_dot_binary(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('PATH', str(tmp_path))                 # no `dot` on the PATH
    code, stdout, stderr = run_cli(['DARTS_V2', '--out', str(tmp_path / 'p')], capsys)
    assert code == 0 and '`dot` program is not installed' in stderr and 'digraph reduce' in stdout


def svg_text(path) -> str:
    with open(path) as f:
        return f.read()


@pytest.mark.skipif(not HAS_MPL, reason='needs matplotlib')
def test_importance_from_zero_warm_up_labelled_and_one_evolution_panel_per_cell_type(tmp_path):
    """EoiNAS's I is drawn on a scale from 0 (it is never negative), a warm-up epoch's panel says so, and the
    evolution is one figure with a panel per cell type whose coloured lines are the derived cell's choices."""
    import matplotlib
    primitives = genotypes.DARTS_PRIMITIVES
    flat = np.full((14, 8), 1 / 8)
    grown = flat.copy()
    grown[0, 4] = 3.  # I of sep_conv_3x3 on edge 0->2 after the warm-up
    alive = np.ones((14, 8), bool).tolist()
    records = [{'epoch': e, 'primitives': primitives, 'alive': {'normal': alive, 'reduce': alive},
                'importance': {'normal': m.tolist(), 'reduce': m.tolist()}, 'alphas_normal': flat.tolist(),
                'alphas_reduce': flat.tolist(), 'warmup': e == 1,
                'genotype': json.loads(genotypes.to_json(genotypes.DARTS_V2))}
               for e, m in ((1, flat), (2, grown))]
    with matplotlib.rc_context({'svg.fonttype': 'none'}):  # text stays text in the SVG
        written = visualize.plot_alphas(records, str(tmp_path), 'svg', key='importance')
    assert sorted(os.path.basename(p) for p in written) == ['importance_evolution.svg', 'importance_normal.svg',
                                                            'importance_reduce.svg']
    heatmap = svg_text(tmp_path / 'importance_normal.svg')
    assert 'epoch 1' in heatmap and 'warm-up: weights only, A frozen' in heatmap
    assert 'from 0; I is never negative' in heatmap
    cmap, norm = visualize.heatmap_scale(np.array([grown]), 8, 'importance')
    assert cmap == 'Reds'
    assert (norm.vmin, norm.vmax) == (0., 3.)
    _, norm = visualize.heatmap_scale(np.array([grown]), 8, 'alphas')  # A: centred on uniform, 1/8
    assert norm.vcenter == 1 / 8
    evolution = svg_text(tmp_path / 'importance_evolution.svg')
    assert 'normal cell' in evolution and 'reduce cell' in evolution
    # DARTS_V2's normal cell: sep_conv_3x3 from 0 and 1 into node 2, ..., dil_conv_3x3 from node 2 into node 5
    for label in ('0-&gt;2: sep_conv_3x3', '1-&gt;2: sep_conv_3x3', '2-&gt;5: dil_conv_3x3',
                  '0-&gt;2: max_pool_3x3', 'warm-up (A frozen)'):
        assert label in evolution, label


@pytest.mark.skipif(not HAS_MPL, reason='needs matplotlib')
def test_every_agnas_cell_panel_names_its_columns(tmp_path):
    import matplotlib
    cells = {f'cell {i}': np.full((14, 8), 0.5).tolist() for i in range(5)}
    record = {'epoch': 1, 'method': 'agnas', 'primitives': genotypes.DARTS_PRIMITIVES, 'importance': cells,
              'cell_genotypes': [genotypes.DARTS_V2.normal] * 5, 'stages': [[0], [2], [4]],
              'reduction_cells': [1, 3], 'stage_cell': 'first'}
    with matplotlib.rc_context({'svg.fonttype': 'none'}):
        visualize.plot_importance([record], str(tmp_path), 'svg')
    text = svg_text(tmp_path / 'importance_cells.svg')
    for op in genotypes.DARTS_PRIMITIVES:  # under each of the 5 panels, cell 0's included
        assert text.count(f'>{op}<') == 5, op
