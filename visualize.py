"""Draw searched cells, and how the search converged.

    python visualize.py NOS_EXAMPLE                    # a genotype name in genotypes.py
    python visualize.py search-xxx/genotype.json       # the JSON that train_search.py writes
    python visualize.py search-xxx                     # a search --save folder: cells + heatmaps of A
    python visualize.py nb201-darts-s* nb201-agnas-s*  # NAS-Bench-201 searches: AGNAS App. B's figure
    python visualize.py runs/adwp8 runs/adwp8-nocross  # ADWPNAS (search_adwp.py folders): Fig. 4 and Fig. 5

Cells (both tiers of the heterogeneous residual block, Sec. 3.2, Fig. 2): per block k, the first-tier
edges from two earlier nodes into the surrogate node k', and the second-tier edge k' -> k. Edges are
coloured by op kind: feature (blue, joined by addition), attention (orange, the paper's elementwise
product), dynamic kernels (green, the paper's dynamic convolution). A classic DARTS cell (second tier
skip_connect) is drawn as DARTS draws it, without surrogate nodes. Nodes carry the genotype's indices:
0 and 1 are the cell inputs c_{k-2}, c_{k-1}; 2..5 the blocks, whose concatenation is the output c_{k}.

Writes OUT/normal.dot and OUT/reduce.dot always, OUT/normal.FORMAT and OUT/reduce.FORMAT through the
`graphviz` package and its `dot` binary (optional: without them the DOT text is printed), and for a search
folder OUT/alphas_{normal,reduce}.FORMAT (the softmaxed A, epoch by epoch, the derived cell's choices
outlined in the last panel) and OUT/alphas_evolution.FORMAT (one panel per cell type: every edge's op weights
over the epochs in grey, the derived cell's choices in colour) through matplotlib (optional).

A per-layer genotype (ADWPNAS) draws every layer's cell, OUT/cell_NN_{normal,reduce}.dot, and an ADWPNAS
search folder (`search_adwp.py --save`) gets OUT/importance_cells.FORMAT: each cell's softmax(alpha) over its
intensive candidates, the derived ops outlined.
A staged genotype (AGNAS: one normal cell per stage, one cell per reduction) draws all its cells:
OUT/normal_stage{1,2,3}.dot and OUT/reduce_{1,2}.dot. For an AGNAS search folder (`--method agnas`), the
heatmaps are OUT/importance_cells.FORMAT: the mean gates of every supernet cell after the last epoch, each
cell's derived ops outlined and the cells the staged genotype took marked in their titles.
NAS-Bench-201 (--space nb201): the cell as its architecture string draws it (OUT/cell.dot, nodes 0..3, a
`none` edge left out), and for one or more search folders OUT/nb201_epochs.FORMAT, AGNAS App. B's figure:
per epoch the benchmark's CIFAR-10 test accuracy of the derived cell (where the search had --benchmark) and
the number of skip connections in it, one line per run (OUT defaults to the first folder's plots/).
A search that prunes ops (--method eoinas) also gets the same two plots of its importance matrix I
(OUT/importance_{normal,reduce,evolution}.FORMAT, on a scale from 0 since I is never negative); pruned ops
are crossed out in the heatmaps and end their lines in the evolution plot, and warm-up epochs (weights only,
A frozen) are labelled so.

ADWPNAS (search_adwp.py --save folders, several at once): OUT/adwp_stage0.FORMAT (Fig. 4: stage 0's accuracy
and superiority per epoch, t* marked) and OUT/adwp_accuracy.FORMAT (Fig. 5: the val top-1 per epoch of each
run, the phases shaded; a run with cross-search beside one without draws Fig. 5's comparison).
"""
from __future__ import annotations

import json
import math
import os
import sys

import genotypes
import runs
import utils
from genotypes import Genotype, GenotypeError, is_classic, op_kind, to_blocks
from utils import UserError

DEFAULT_FORMAT = 'png'
MAX_PANELS = 12  # epochs shown in the heatmap grid (evenly spaced, first and last always)

KIND_COLOR = {'feature': '#1f77b4', 'attention': '#ff7f0e', 'dynamic': '#2ca02c', 'none': '#7f7f7f'}
KIND_STYLE = {'feature': 'solid', 'attention': 'dashed', 'dynamic': 'bold', 'none': 'dotted'}
# Arrowheads echo the paper's operators: (+) features, (.) attention, (x) dynamic convolution.
KIND_ARROW = {'feature': 'normal', 'attention': 'odot', 'dynamic': 'odiamond', 'none': 'normal'}
KIND_SYMBOL = {'feature': '&#8853;', 'attention': '&#8857;', 'dynamic': '&#8855;'}
# Legend glyphs drawn like the edges they explain: line style (solid, dashed, bold) and arrowhead (filled
# triangle, open circle, open diamond), in box-drawing and geometric-shape characters.
KIND_GLYPH = {'feature': '&#9472;&#9472;&#9472;&#9654;', 'attention': '&#9548;&#9548;&#9548;&#9675;',
              'dynamic': '&#9473;&#9473;&#9473;&#9671;'}
KIND_MEANING = {'feature': 'feature op (outputs added, &#8853;)',
                'attention': 'attention op (multiplies, &#8857;)',
                'dynamic': 'dynamic kernel (convolves, &#8855;)'}
INPUT_FILL, SURROGATE_FILL, NODE_FILL, OUTPUT_FILL = 'darkseagreen2', 'gray92', 'lightblue', 'palegoldenrod'
SEARCH_LOG = 'search_log.jsonl'
# Methods whose every cell has its own importance (drawn cell by cell, `plot_importance`): what it is
PER_CELL = {'agnas': 'AGNAS: mean gates', 'adwpnas': 'ADWPNAS: softmax(alpha) of the intensive candidates'}


# ---------------------------------------------------------------------------------------------------------
# DOT text (pure: no graphviz needed)


def _edge(src: str, dst: str, op: str) -> str:
    kind = op_kind(op)
    return (f'  "{src}" -> "{dst}" [label="{op}", color="{KIND_COLOR[kind]}", fontcolor="{KIND_COLOR[kind]}", '
            f'style={KIND_STYLE[kind]}, arrowhead={KIND_ARROW[kind]}];')


def _title(text: str, kinds, surrogate: bool = False) -> str:
    """An HTML-like graph label: the title over a legend of the op kinds the cell uses, each with a glyph
    drawn like its edges, and (heterogeneous cells) what the surrogate node k' is."""
    shown = [k for k in ('feature', 'attention', 'dynamic') if k in kinds]
    cells = ''.join(f'<td><font color="{KIND_COLOR[k]}">{KIND_GLYPH[k]} {KIND_MEANING[k]}</font></td>'
                    for k in shown)
    rows = f'<tr><td colspan="{len(shown)}">{text}</td></tr><tr>{cells}</tr>'
    if surrogate:
        rows += (f'<tr><td colspan="{len(shown)}"><table border="0" cellspacing="2"><tr>'
                 f'<td border="1" style="rounded" bgcolor="{SURROGATE_FILL}">k\'</td>'
                 f'<td>surrogate node of block k: its first tier (two ops from earlier nodes) meets here; '
                 f'the edge k\' &#8594; k is its second tier</td></tr></table></td></tr>')
    return f'<<table border="0" cellspacing="4">{rows}</table>>'


def cell_dot(cell, name: str = 'normal') -> str:
    """DOT text of one cell (a classic list of (op, input) pairs or NOS blocks); GenotypeError if malformed.

    The inputs come first (c_{k-2} above c_{k-1}), then the blocks in order, left to right (invisible
    edges pin each block's node before the next block's), then the output c_k; an op's label sits at the
    middle of its edge, so the labels of long edges from the inputs spread along them.
    """
    blocks = to_blocks(cell, name)
    classic = is_classic(list(cell))
    lines = [f'digraph {name} {{',
             '  rankdir=LR; nodesep=0.35; ranksep=0.45; newrank=true;',
             ('  node [shape=rect, style="rounded,filled", fontname=helvetica, fontsize=16, height=0.5, '
              'width=0.5, penwidth=2];'),
             '  edge [fontname=helvetica, fontsize=12, penwidth=1.5];',
             f'  "0" [label=<0: c<sub>k-2</sub>>, fillcolor={INPUT_FILL}];',
             f'  "1" [label=<1: c<sub>k-1</sub>>, fillcolor={INPUT_FILL}];',
             '  { rank=same; "0" -> "1" [style=invis]; }']
    kinds = set()
    previous = '1'
    for k, ((op_i, i), (op_j, j), op_s) in enumerate(blocks):
        node = str(k + 2)
        lines.append(f'  "{node}" [fillcolor={NODE_FILL}];')
        if classic:  # DARTS's drawing: both edges straight into the node
            lines.append(f'  "{previous}" -> "{node}" [style=invis, weight=10];')  # blocks in order
            lines += [_edge(str(i), node, op_i), _edge(str(j), node, op_j)]
            kinds.update(op_kind(op) for op in (op_i, op_j))
            previous = node
            continue
        surrogate = f"{node}'"
        # first tier (Eq. 2-5) into the surrogate node k', second tier (Eq. 6-9) from k' to k
        lines.append(f'  "{surrogate}" [shape=ellipse, fillcolor={SURROGATE_FILL}];')
        lines.append(f'  "{previous}" -> "{surrogate}" [style=invis, weight=10];')  # blocks in order
        lines += [_edge(str(i), surrogate, op_i), _edge(str(j), surrogate, op_j), _edge(surrogate, node, op_s)]
        kinds.update(op_kind(op) for op in (op_i, op_j, op_s))
        previous = node
    lines.append(f'  "c_{{k}}" [label=<c<sub>k</sub>>, fillcolor={OUTPUT_FILL}];')
    lines += [f'  "{k + 2}" -> "c_{{k}}" [color=gray50];' for k in range(len(blocks))]
    kind_label = 'classic DARTS cell' if classic else 'heterogeneous operator cell'
    lines += ['  labelloc=t; fontname=helvetica; fontsize=18;',
              f'  label={_title(f"{name} cell ({kind_label})", kinds, surrogate=not classic)};', '}']
    return '\n'.join(lines) + '\n'


def genotype_dots(genotype: Genotype) -> dict[str, str]:
    """{'normal': DOT, 'reduce': DOT} of a validated genotype; a staged one gives every cell (see
    staged_dots), a per-layer one every layer's (macro_dots), a NAS-Bench-201 cell {'cell': DOT}
    (nb201_dot), a chain genotype {'chain': DOT} (chain_dot)."""
    genotype = genotypes.validate(genotype)
    if isinstance(genotype, genotypes.StagedGenotype):
        return staged_dots(genotype)
    if isinstance(genotype, genotypes.MacroGenotype):
        return macro_dots(genotype)
    if isinstance(genotype, genotypes.NB201Genotype):
        return {'cell': nb201_dot(genotype)}
    if isinstance(genotype, genotypes.ChainGenotype):
        return {'chain': chain_dot(genotype)}
    if not isinstance(genotype, Genotype):  # a form without a drawing yet: one sentence, not a traceback
        raise GenotypeError(f'visualize.py does not draw a {type(genotype).__name__} yet')
    return {'normal': cell_dot(genotype.normal, 'normal'), 'reduce': cell_dot(genotype.reduce, 'reduce')}


def macro_dots(genotype: genotypes.MacroGenotype) -> dict[str, str]:
    """A per-layer genotype's cells (ADWPNAS: one cell per layer): {'cell_00_normal': DOT, ...,
    'cell_02_reduce': DOT, ...}, the reduction cells where the network has them."""
    reductions = genotypes.reduction_layers(len(genotype.cells))
    width = len(str(len(genotype.cells) - 1))
    dots = {}
    for i, cell in enumerate(genotype.cells):
        name = f'cell_{i:0{width}d}_{"reduce" if i in reductions else "normal"}'
        dots[name] = cell_dot(cell, name)
    return dots


def nb201_dot(genotype: genotypes.NB201Genotype) -> str:
    """A NAS-Bench-201 cell: nodes 0 (input) .. 3 (output), one labelled edge per op; `none` edges are left out."""
    lines = ['digraph cell {', '  rankdir=LR;', f'  label="NAS-Bench-201 {genotype.arch}"; labelloc=t; fontsize=10;',
             '  node [shape=circle];']
    lines += [f'  n{i} [label="{i}"];' for i in range(genotypes.NB201_NODES)]
    lines += [f'  n{j} -> n{i} [label="{op}", color="{KIND_COLOR["feature"]}"];'
              for op, j, i in genotype.edges() if op != 'none']
    return '\n'.join(lines + ['}']) + '\n'


def count_skips(arch: str) -> int:
    """Skip connections in a NAS-Bench-201 cell (AGNAS App. B counts them per epoch)."""
    return genotypes.NB201Genotype(arch).ops().count('skip_connect')


def pyplot(what: str):
    """matplotlib.pyplot on the Agg backend (files only, no display needed), or None when matplotlib is not
    installed: then a note on stderr says that `what` are not drawn."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print(f'note: matplotlib is not installed (pip install matplotlib), so {what} are not drawn',
              file=sys.stderr)
        return None
    return plt


def plot_nb201(runs_records: list[tuple[str, list[dict]]], out: str, fmt: str) -> list[str]:
    """AGNAS App. B: per epoch, the derived cell's benchmark CIFAR-10 test accuracy (runs with --benchmark)
    and its number of skip connections, one line per run."""
    plt = pyplot('the NAS-Bench-201 curves')
    if plt is None:
        return []
    looked_up = any('benchmark' in r for _, recs in runs_records for r in recs)
    fig, axes = plt.subplots(1, 2 if looked_up else 1, figsize=(11 if looked_up else 5.5, 4), squeeze=False)
    skip_ax = axes[0, -1]
    for label, recs in runs_records:
        epochs = [r['epoch'] for r in recs]
        skip_ax.plot(epochs, [count_skips(r['genotype']['nb201']) for r in recs], marker='.', label=label)
        if looked_up:
            acc = [r.get('benchmark', {}).get('cifar10_test') for r in recs]
            axes[0, 0].plot(epochs, [math.nan if a is None else a for a in acc], marker='.', label=label)
    skip_ax.set(xlabel='epoch', ylabel='skip connections in the derived cell', ylim=(-0.2, 6.2),
                title='skip connections (of 6 edges)')
    if looked_up:
        axes[0, 0].set(xlabel='epoch', ylabel='CIFAR-10 test accuracy (%)', title='benchmark accuracy of the derived cell')
        axes[0, 0].legend(fontsize=7)
    else:
        skip_ax.legend(fontsize=7)
        print('note: no run was searched with --benchmark, so only the skip connections are drawn', file=sys.stderr)
    fig.tight_layout()
    path = os.path.join(out, f'nb201_epochs.{fmt}')
    fig.savefig(path)
    plt.close(fig)
    return [path]


ADWP_SPACE = 'intensive_space.json'  # what marks a search_adwp.py --save folder


def read_adwp_run(path: str) -> tuple[dict, list[dict]]:
    """(intensive_space.json, search_log.jsonl records) of a search_adwp.py --save folder."""
    try:
        with open(os.path.join(path, ADWP_SPACE)) as f:
            space = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f'{os.path.join(path, ADWP_SPACE)} cannot be read ({e}); pass a search_adwp.py --save '
                        f'folder') from None
    return space, runs.read_jsonl(os.path.join(path, SEARCH_LOG))


def plot_adwp(adwp_runs: list[tuple[str, dict, list[dict]]], out: str, fmt: str) -> list[str]:
    """ADWPNAS's figures from search_adwp.py folders (label, intensive_space.json, search_log.jsonl records):
    - Fig. 4 (adwp_stage0.FMT, from the first run): stage 0, per epoch of the DARTS search, epsilon (the
      supernet's held-out top-1, Eq. 3) and the superiority S of that epoch's intensive space, t* marked;
    - Fig. 5 (adwp_accuracy.FMT): per epoch of the macro search, the val top-1 of the relaxed HyperNetwork
      on the held-out half, one line per run, with the phases of the first run shaded. Fig. 5 compares a
      run with cross-search and one without (--cross_start E --cross_end E): pass both folders."""
    plt = pyplot('the ADWPNAS curves')
    if plt is None:
        return []
    written = []
    label, space, _ = adwp_runs[0]
    table = space.get('table') or []
    if table:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        epochs = [row['epoch'] for row in table]
        ax.plot(epochs, [100 * row['accuracy'] for row in table], marker='.', color='C0', label='accuracy (epsilon)')
        ax.set(xlabel='stage-0 epoch', ylabel='held-out top-1 (%)', title=f'ADWPNAS Fig. 4: stage 0 of {label}')
        twin = ax.twinx()
        s = [math.nan if row['superiority'] is None else row['superiority'] for row in table]
        twin.plot(epochs, s, marker='.', color='C1', label='superiority S (Eq. 3)')
        twin.set_ylabel('superiority S')
        if space.get('epoch') is not None:
            twin.axvline(space['epoch'], color='C1', linestyle=':', label=f't* = {space["epoch"]}')
        lines = ax.get_legend_handles_labels()
        lines2 = twin.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc='lower right')
        fig.tight_layout()
        written.append(os.path.join(out, f'adwp_stage0.{fmt}'))
        fig.savefig(written[-1])
        plt.close(fig)
    else:
        print('note: the intensive space was given (--intensive_space), not selected, so stage 0 (Fig. 4) is not '
              'drawn', file=sys.stderr)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = {'train': '#eeeeee', 'cross': '#ffe9c9'}
    first = adwp_runs[0][2]
    for r in first:  # the phases of the first run: Stage 1 grey, cross-search orange, basic search white
        if r.get('phase') in colors:
            ax.axvspan(r['epoch'] - 0.5, r['epoch'] + 0.5, color=colors[r['phase']], linewidth=0)
    for label, _, records in adwp_runs:
        ax.plot([r['epoch'] for r in records], [r['val_acc'] for r in records], marker='.', label=label)
    ax.set(xlabel='epoch', ylabel='val top-1 (%)',
           title='ADWPNAS Fig. 5: accuracy per epoch (grey: Stage 1, orange: cross-search)')
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(os.path.join(out, f'adwp_accuracy.{fmt}'))
    fig.savefig(written[-1])
    plt.close(fig)
    return written


def staged_dots(genotype: genotypes.StagedGenotype) -> dict[str, str]:
    """A staged genotype's cells: {'normal_stage1': DOT, ..., 'normal_stage3', 'reduce_1', 'reduce_2'}."""
    dots = {}
    for kind, stem in (('normal', 'normal_stage'), ('reduce', 'reduce_')):
        for n, cell in enumerate(getattr(genotype, kind), 1):
            dots[f'{stem}{n}'] = cell_dot(cell, f'{stem}{n}')
    return dots


# A chain genotype (AGNAS's macro search, the ProxylessNAS space): one box per layer, filled by kernel size,
# outlined by expansion; a skipped layer is a dashed grey box (the derived network has no layer there).
KERNEL_FILL = {3: '#c6dbef', 5: '#6baed6', 7: '#2171b5'}
EXPANSION_PEN = {3: 1, 6: 3}


def chain_dot(genotype: genotypes.ChainGenotype, name: str = 'chain') -> str:
    """DOT text of a chain genotype: stem, fixed first block, the 21 searchable layers (kernel, expansion,
    stride and widths of each; skips dashed), head, one row per group of the space."""
    genotype = genotypes.validate_chain(genotype)
    lines = [f'digraph {name} {{', '  rankdir=TB; nodesep=0.15; ranksep=0.3; newrank=true;',
             '  node [shape=rect, style="rounded,filled", fontname=helvetica, fontsize=11, height=0.45];',
             '  edge [color=gray50, arrowsize=0.6];',
             f'  stem [label="stem\\n3x3 conv, s2\\n3 -> {genotypes.PROXYLESS_STEM}", fillcolor={INPUT_FILL}];',
             (f'  first [label="MBConv k3 e1\\n{genotypes.PROXYLESS_STEM} -> {genotypes.PROXYLESS_FIRST}", '
              f'fillcolor={INPUT_FILL}];'), '  stem -> first;']
    previous, group_nodes = 'first', {}
    for i, (name_, (c_in, c_out, stride, group)) in enumerate(zip(genotype.layers, genotypes.chain_layers())):
        node = f'L{i}'
        if name_ == genotypes.SKIP:
            label = f'{i}: skip\\n{c_in} -> {c_out}'
            lines.append(f'  {node} [label="{label}", style="rounded,dashed", color=gray60, fontcolor=gray45, '
                         f'fillcolor=white];')
        else:
            k, e = genotypes.block_shape(name_)
            label = f'{i}: MBConv k{k} e{e}\\ns{stride}, {c_in} -> {c_out}'
            font = 'white' if k == 7 else 'black'
            lines.append(f'  {node} [label="{label}", fillcolor="{KERNEL_FILL[k]}", fontcolor={font}, '
                         f'penwidth={EXPANSION_PEN[e]}];')
        lines.append(f'  {previous} -> {node};')
        group_nodes.setdefault(group, []).append(node)
        previous = node
    for nodes in group_nodes.values():  # a group per row, left to right
        lines.append('  { rank=same; ' + ' '.join(nodes) + ' }')
    lines += [(f'  head [label="1x1 conv\\n{genotypes.PROXYLESS_GROUPS[-1][0]} -> {genotypes.PROXYLESS_HEAD}, pool, '
               f'FC", fillcolor={OUTPUT_FILL}];'), f'  {previous} -> head;',
              '  labelloc=t; fontname=helvetica; fontsize=14;',
              ('  label="ProxylessNAS chain (strides of the 224x224 layout): fill = kernel (light 3, mid 5, dark '
               '7), thick border = expansion 6, dashed = skip (layer removed)";'), '}']
    return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------------------------------------
# Input


def edge_labels(n_rows: int) -> list[str]:
    """Row labels of A in the search log's edge order (docs/nos.md): 14 first-tier edges j -> k' in DARTS's
    order, then the 4 second-tier edges k' -> k; the DARTS space has the 14 edges j -> k only."""
    if n_rows not in (14, 18):
        raise UserError(f'an architecture matrix has {n_rows} rows; expected 18 (NOS) or 14 (DARTS)')
    return genotypes.edge_names(two_tier=n_rows == 18)


def chosen_cells(cell, n_rows: int, primitives: list[str]) -> list[tuple[int, int]]:
    """(row, column) of A behind each op of a derived cell, to outline them on the heatmap."""
    blocks, classic = to_blocks(cell), is_classic(list(cell))
    labels = edge_labels(n_rows)
    mark = '' if n_rows == 14 else "'"
    out = []
    for k, ((op_i, i), (op_j, j), op_s) in enumerate(blocks):
        pairs = [(f'{i}->{k + 2}{mark}', op_i), (f'{j}->{k + 2}{mark}', op_j)]
        if not classic and n_rows == 18:
            pairs.append((f"{k + 2}'->{k + 2}", op_s))
        out += [(labels.index(e), primitives.index(op)) for e, op in pairs if op in primitives]
    return out


def read_search_log(path: str) -> list[dict]:
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if not line.endswith('\n'):  # the last line, still being written by a running search
                    break
                raise UserError(f'{path} line {n} is not valid JSON; the file is damaged (a search writes one '
                                f'JSON object per epoch)') from None
            needed = ({'importance'} if rec.get('space') == 'proxyless'  # the chain's one table
                      else {'importance', 'cell_genotypes'} if rec.get('method') in PER_CELL  # per cell, not A
                      else {'alphas_normal'} if rec.get('space') == 'nb201'  # one matrix
                      else {'alphas_normal', 'alphas_reduce'})
            missing = ({'epoch', 'primitives'} | needed) - set(rec)
            if missing:
                raise UserError(f'{path} line {n} lacks {", ".join(sorted(missing))}; it is not a search log '
                                f'of train_search.py')
            records.append(rec)
    if not records:
        raise UserError(f'{path} holds no epochs yet; let the search finish an epoch first')
    return records


def load_input(arg: str) -> tuple[Genotype, list[dict] | None, str]:
    """(genotype, search log records or None, default output folder) for the CLI argument."""
    if os.path.isdir(arg):
        log_path = os.path.join(arg, SEARCH_LOG)
        geno_path = os.path.join(arg, 'genotype.json')
        records = read_search_log(log_path) if os.path.isfile(log_path) else None
        if os.path.isfile(geno_path):
            genotype = genotypes.load(genotype_file=geno_path)
        elif records is not None and 'genotype' in records[-1]:
            genotype = genotypes.from_json(json.dumps(records[-1]['genotype']), f'{log_path} (last epoch)')
        else:
            raise UserError(f'{arg} is a folder without genotype.json or {SEARCH_LOG}; pass a search --save '
                            f'folder, a genotype.json or a genotype name in genotypes.py')
        return genotype, records, os.path.join(arg, 'plots')
    if os.path.isfile(arg) or arg.endswith('.json') or os.sep in arg:
        runs.refuse_checkpoint(arg, 'the argument')
        genotype = genotypes.load(genotype_file=arg)  # GenotypeError names a missing or malformed file
        stem = os.path.splitext(os.path.basename(arg))[0]
        return genotype, None, os.path.join(os.path.dirname(arg) or '.', f'plots_{stem}')
    try:
        genotype = genotypes.load(arch=arg)
    except GenotypeError as e:
        raise GenotypeError(f'{e}; nor is {arg!r} a file or folder') from None
    return genotype, None, os.path.join('plots', arg)


# ---------------------------------------------------------------------------------------------------------
# Rendering (optional dependencies)


def _write_bytes(path: str, data: bytes) -> None:
    tmp = f'{path}.tmp'
    with open(tmp, 'wb') as f:
        f.write(data)
    os.replace(tmp, path)


def render_cells(dots: dict[str, str], out: str, fmt: str) -> list[str]:
    """Render each DOT with graphviz; without the package or the `dot` binary, say so once and print the
    DOT text (still written to OUT/*.dot) so that it can be rendered elsewhere."""
    try:
        import graphviz
    except ImportError:
        graphviz = None
    why = None
    written = []
    if graphviz is None:
        why = 'the graphviz Python package is not installed (pip install graphviz)'
    else:
        try:
            for name, text in dots.items():
                path = os.path.join(out, f'{name}.{fmt}')
                _write_bytes(path, graphviz.Source(text).pipe(format=fmt))
                written.append(path)
        except graphviz.ExecutableNotFound:
            why = ('the graphviz `dot` program is not installed (apt-get install graphviz, brew install '
                   'graphviz, or conda install graphviz)')
    if why:
        print(f'note: {why}, so the cells are not drawn; their DOT text follows (also in {out}/*.dot; render '
              f'with `dot -T{fmt} FILE.dot -o FILE.{fmt}`)', file=sys.stderr)
        for text in dots.values():
            print(text)
    return written


def _panel_epochs(n: int, max_panels: int = MAX_PANELS) -> list[int]:
    """Indices of the epochs to show: all when few, else evenly spaced with the first and the last."""
    if n <= max_panels:
        return list(range(n))
    return sorted({round(i * (n - 1) / (max_panels - 1)) for i in range(max_panels)})


# Distinct colours per op in the line plots, hues grouped by kind: features blue-purple-brown-gray,
# attention orange-red, dynamic greens; kinds also differ in line style.
OP_COLOR = {'sep_conv_3x3': '#1f77b4', 'sep_conv_5x5': '#17becf', 'dil_conv_3x3': '#9467bd',
            'dil_conv_5x5': '#e377c2', 'max_pool_3x3': '#8c564b', 'avg_pool_3x3': '#bcbd22',
            'skip_connect': '#7f7f7f', 'none': '#000000', 'spatial_attention': '#ff7f0e',
            'channel_attention': '#d62728', 'dynamic_conv_3x3': '#2ca02c', 'dynamic_conv_5x5': '#006400'}
KIND_LINE = {'feature': '-', 'none': ':', 'attention': '--', 'dynamic': '-.'}
# The heatmaps of softmax(A) use a diverging scale centred on 1/|ops|, the uniform weight every row starts
# at: white is "no preference yet", red above uniform, blue below. A scale from 0 to the maximum would paint
# a young or small search, all of whose weights are near 1/|ops|, one flat colour.
HEATMAP_CMAP = 'RdBu_r'


def heatmap_norm(weights, n_ops: int):
    """The colour scale of the heatmaps: centred on 1/n_ops, symmetric, spanning the largest deviation from
    it over all the epochs shown (so panels compare), never narrower than 1e-6."""
    import numpy as np
    from matplotlib.colors import CenteredNorm
    centre = 1. / n_ops
    halfrange = max(float(np.abs(np.asarray(weights) - centre).max()), 1e-6)
    return CenteredNorm(vcenter=centre, halfrange=halfrange)


def heatmap_scale(weights, n_ops: int, key: str = 'alphas'):
    """(colour map, norm) of the heatmaps of `key`: softmax(A) on heatmap_norm's diverging scale; an
    importance I, never negative, from 0 (white) to its largest value (dark red)."""
    import numpy as np
    from matplotlib.colors import Normalize
    if key == 'importance':
        return 'Reds', Normalize(0., max(float(np.nanmax(weights)), 1e-6))
    return HEATMAP_CMAP, heatmap_norm(weights, n_ops)


def is_warmup(record: dict) -> bool:
    """An epoch in which the method trained the weights only (EoiNAS's warm-up: A frozen, I uniform); logs
    from before the `warmup` field tell it by the missing val_acc of a pruning method's record."""
    return bool(record.get('warmup', 'alive' in record and 'val_acc' not in record))


def plot_alphas(records: list[dict], out: str, fmt: str, key: str = 'alphas') -> list[str]:
    """Heatmaps of the softmaxed A per cell type over the epochs (KEY_CELL.FORMAT), and one figure of the
    weights over the epochs, a panel per cell type, the derived cell's ops highlighted (KEY_evolution.FORMAT).

    key 'importance': the same plots of the method's importance matrix (the record's `importance`; EoiNAS's
    I = beta + lambda C, never negative, so on a scale from 0). Records with `alive` (a pruning method) cross
    out the pruned ops; the warm-up epochs are labelled as such."""
    plt = pyplot('the heatmaps of the architecture weights')
    if plt is None:
        return []
    import numpy as np
    from matplotlib.patches import Rectangle

    primitives = records[-1]['primitives']
    epochs = [r['epoch'] for r in records]
    cells = [c for c in ('normal', 'reduce') if key == 'importance' and c in records[-1]['importance']
             or key != 'importance' and f'alphas_{c}' in records[-1]]
    what, label = (('importance I', 'importance I') if key == 'importance' else ('softmax(A)', 'softmax weight'))
    written, evolution = [], []
    for cell in cells:
        try:
            weights = np.array([r['importance'][cell] if key == 'importance' else r[f'alphas_{cell}']
                                for r in records], dtype=float)  # (E, rows, ops)
        except (ValueError, KeyError):
            raise UserError(f'the {key} of the {cell} cell in the search log change shape between epochs, or '
                            f'are missing in some; the log mixes runs: search into a fresh --save folder') from None
        if weights.ndim != 3 or weights.shape[2] != len(primitives):
            raise UserError(f'alphas_{cell} in the search log is not an (edges x {len(primitives)} ops) matrix '
                            f'per epoch')
        # pruned ops: `alive` of a record is after that epoch's prune; a line ends at its op's prune
        alive = (np.array([r['alive'][cell] for r in records], dtype=bool)
                 if all('alive' in r for r in records) else None)
        rows = edge_labels(weights.shape[1])
        genotype = records[-1].get('genotype')
        chosen = []
        if genotype:
            try:
                chosen = chosen_cells(genotypes.from_json(json.dumps(genotype)).__getattribute__(cell),
                                      len(rows), primitives)
            except (GenotypeError, ValueError, AttributeError):
                chosen = []

        # 1) the weights, epoch by epoch
        show = _panel_epochs(len(records))
        ncols = min(len(show), 4)
        nrows = math.ceil(len(show) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(2.9 * ncols + 1.6, 3.6 * nrows + 1.4), sharex=True,
                                 sharey=True, squeeze=False, layout='constrained')
        cmap, norm = heatmap_scale(weights[show], len(primitives), key)
        for ax in axes.flat[len(show):]:
            ax.axis('off')
        for n, (ax, e) in enumerate(zip(axes.flat, show)):
            im = ax.imshow(weights[e], cmap=cmap, norm=norm, aspect='auto', interpolation='nearest')
            warm = is_warmup(records[e])
            ax.set_title(f'epoch {epochs[e]}' + ('\n(warm-up: weights only, A frozen)' if warm else ''),
                         fontsize=10 if not warm else 8, color='gray' if warm else 'black')
            ax.set_xticks(range(len(primitives)))
            ax.set_yticks(range(len(rows)))
            ax.set_yticklabels(rows, fontsize=7)
            # the column names under the lowest panel of each column only
            if n + ncols >= len(show):
                ax.xaxis.set_tick_params(labelbottom=True)
                ax.set_xticklabels(primitives, rotation=90, fontsize=7)
                for tick, op in zip(ax.get_xticklabels(), primitives):
                    tick.set_color(KIND_COLOR[op_kind(op)])
            if alive is not None:
                dead_r, dead_c = np.nonzero(~alive[e])
                ax.scatter(dead_c, dead_r, marker='x', s=18, color='gray', linewidths=1)
            if e == len(records) - 1:
                for r, c in chosen:
                    ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor='black', lw=1.8))
        scale = ('from 0; I is never negative' if key == 'importance'
                 else f'white: uniform, 1/{len(primitives)} = {1 / len(primitives):.4f}')
        fig.colorbar(im, ax=axes, shrink=0.5, label=f'{label} ({scale})')
        fig.suptitle(f'{cell} cell: {what}, edges (rows) x ops (columns)'
                     + ('; black boxes: the derived cell' if chosen else '')
                     + ('; x: pruned' if alive is not None else ''))
        path = os.path.join(out, f'{key}_{cell}.{fmt}')
        fig.savefig(path, dpi=130)
        plt.close(fig)
        written.append(path)
        if alive is not None:  # values up to the epoch whose prune removed the op
            before = np.concatenate([np.ones_like(alive[:1]), alive[:-1]])
            weights = np.where(before, weights, np.nan)
        evolution.append((cell, weights, rows, chosen))

    # 2) the weights over the epochs, one panel per cell type: every (edge, op) a thin grey line, the derived
    # cell's choices in colour, so the search converging onto its cell stands out
    if not evolution:
        return written
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(1, len(evolution), figsize=(7.2 * len(evolution), 6.4), sharey=True, squeeze=False,
                             layout='constrained')
    palette = plt.get_cmap('tab20').colors
    for ax, (cell, weights, rows, chosen) in zip(axes.flat, evolution):
        for r in range(weights.shape[1]):
            for o in range(weights.shape[2]):
                ax.plot(epochs, weights[:, r, o], color='0.78', lw=0.6, zorder=1)
        for n, (r, o) in enumerate(chosen):  # a colour per choice; the line style tells the op's kind
            op = primitives[o]
            ax.plot(epochs, weights[:, r, o], color=palette[n % len(palette)], lw=2, ls=KIND_LINE[op_kind(op)],
                    marker='o', ms=3, label=f'{rows[r]}: {op}', zorder=2)
        warm = [e for e, rec in zip(epochs, records) if is_warmup(rec)]
        if warm:
            ax.axvspan(min(warm) - 0.5, max(warm) + 0.5, color='0.93', zorder=0, label='warm-up (A frozen)')
        ax.set_title(f'{cell} cell' + (': the derived cell\'s choices in colour' if chosen else ''), fontsize=11)
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if chosen or warm:
            ax.legend(fontsize=7, ncol=3, loc='upper center', bbox_to_anchor=(0.5, -0.12), title='edge: op',
                      title_fontsize=7, frameon=False)
    axes.flat[0].set_ylabel(label)
    fig.suptitle(f'{what} of every edge and op over the search (grey), the derived cell\'s choices in colour'
                 + ('; lines end where an op was pruned' if any('alive' in r for r in records) else ''))
    path = os.path.join(out, f'{key}_evolution.{fmt}')
    fig.savefig(path, dpi=130)
    plt.close(fig)
    written.append(path)
    return written


def plot_importance(records: list[dict], out: str, fmt: str) -> list[str]:
    """A method with an importance per cell (PER_CELL): a heatmap of each supernet cell's (edges x ops) after
    the last epoch, the cell's own derived ops outlined; AGNAS's mean gates, with the cells that the staged
    genotype took named in the panel titles, and ADWPNAS's softmax(alpha_l) over its candidates."""
    plt = pyplot('the importance matrices')
    if plt is None:
        return []
    import numpy as np
    from matplotlib.patches import Rectangle

    last = records[-1]
    primitives = last['primitives']
    names = list(last['importance'])
    try:
        mats = np.array([last['importance'][k] for k in names], dtype=float)   # (cells, rows, ops)
    except ValueError:
        raise UserError('the importance matrices of the last search log record differ in shape; the log is '
                        'damaged') from None
    if mats.ndim != 3 or mats.shape[2] != len(primitives):
        raise UserError(f'importance in the search log is not an (edges x {len(primitives)} ops) matrix per cell')
    rows = edge_labels(mats.shape[1])
    reductions = last.get('reduction_cells', [])
    stages = last.get('stages', [])
    rule = last.get('stage_cell', 'first')
    taken = {}
    for s, cells in enumerate(stages, 1):
        if rule in ('first', 'last') and cells:
            taken[cells[0] if rule == 'first' else cells[-1]] = f'stage {s}'
        else:
            taken.update({c: f'stage {s} (mean)' for c in cells})
    taken.update({r: f'reduction {n}' for n, r in enumerate(reductions, 1)})

    ncols = min(len(names), 4)
    nrows = math.ceil(len(names) / ncols)
    # every panel names its columns (a panel whose neighbours below are missing would have none otherwise)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.9 * ncols + 1.6, 4.6 * nrows + 1.4), sharex=True,
                             sharey=True, squeeze=False, layout='constrained')
    for ax in axes.flat[len(names):]:
        ax.axis('off')
    vmin, vmax = float(mats.min()), float(mats.max())
    for i, ax in enumerate(axes.flat[:len(names)]):
        im = ax.imshow(mats[i], cmap='viridis', vmin=vmin, vmax=vmax, aspect='auto')
        kind = 'reduce' if i in reductions else 'normal'
        title = f'{names[i]} ({kind})' + (f'\n-> {taken[i]}' if i in taken else '')
        ax.set_title(title, fontsize=9, color='red' if i in taken else 'black')
        ax.set_xticks(range(len(primitives)))
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(rows, fontsize=7)
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_xticklabels(primitives, rotation=90, fontsize=7)
        for tick, op in zip(ax.get_xticklabels(), primitives):
            tick.set_color(KIND_COLOR[op_kind(op)])
        try:
            chosen = chosen_cells(genotypes.validate(Genotype(last['cell_genotypes'][i], genotypes.CONCAT,
                                                              last['cell_genotypes'][i], genotypes.CONCAT)).normal,
                                  len(rows), primitives)
        except (GenotypeError, ValueError, IndexError, TypeError):
            chosen = []
        for r, c in chosen:
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor='red', lw=1.5))
    what = PER_CELL.get(last.get('method'), PER_CELL['agnas'])
    fig.colorbar(im, ax=axes, shrink=0.5, label=what.split(': ')[1])
    fig.suptitle(f'{what} of each supernet cell, epoch {last["epoch"]}, edges (rows) x ops '
                 f'(columns); red boxes: each cell\'s derived ops')
    path = os.path.join(out, f'importance_cells.{fmt}')
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return [path]


def plot_chain_importance(records: list[dict], out: str, fmt: str) -> list[str]:
    """The ProxylessNAS chain (--space proxyless): its importance table, layers x candidates (AGNAS: mean
    gates; DARTS: softmax weights), one panel per epoch shown, each layer's derived candidate outlined and the
    layers without a skip candidate crossed out in the skip column."""
    plt = pyplot('the importance tables')
    if plt is None:
        return []
    import numpy as np
    from matplotlib.patches import Rectangle

    candidates = records[-1]['primitives']
    shown = [records[i] for i in _panel_epochs(len(records))]
    tables = []
    for r in shown:
        t = np.array(r['importance'].get('layers', []), dtype=float)
        if t.shape != (genotypes.CHAIN_LAYERS, len(candidates)):
            raise UserError(f'epoch {r["epoch"]} of the search log has no ({genotypes.CHAIN_LAYERS} x '
                            f'{len(candidates)}) importance table; the log is damaged')
        tables.append(t)
    no_skip = [i for i in range(genotypes.CHAIN_LAYERS) if not genotypes.skip_allowed(i)]
    skip_col = candidates.index(genotypes.SKIP)
    values = np.concatenate([np.delete(t, skip_col, 1).ravel() for t in tables] +
                            [t[[i for i in range(len(t)) if i not in no_skip], skip_col] for t in tables])
    ncols = min(len(tables), 6)
    nrows = math.ceil(len(tables) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(4.5, 2.2 * ncols + 1.4), 5.2 * nrows + 1.0), sharey=True,
                             squeeze=False, layout='constrained')
    for ax in axes.flat[len(tables):]:
        ax.axis('off')
    for ax, r, t in zip(axes.flat, shown, tables):
        masked = np.ma.array(t, mask=np.zeros_like(t, dtype=bool))
        masked.mask[no_skip, skip_col] = True
        im = ax.imshow(masked, cmap='viridis', vmin=values.min(), vmax=values.max(), aspect='auto')
        for i in no_skip:
            ax.plot([skip_col - 0.4, skip_col + 0.4], [i - 0.4, i + 0.4], color='gray', lw=0.8)
        try:
            chosen = genotypes.validate(genotypes.from_json(json.dumps(r['genotype']))).layers
        except (GenotypeError, KeyError, AttributeError):
            chosen = []
        for i, name in enumerate(chosen):
            ax.add_patch(Rectangle((candidates.index(name) - 0.5, i - 0.5), 1, 1, fill=False, edgecolor='red',
                                   lw=1.5))
        ax.set_title(f'epoch {r["epoch"]}', fontsize=9)
        ax.set_xticks(range(len(candidates)))
        ax.set_xticklabels(candidates, rotation=90, fontsize=7)
        ax.set_yticks(range(genotypes.CHAIN_LAYERS))
        ax.set_yticklabels([f'{i} (s{s})' for i, (_, _, s, _) in enumerate(genotypes.chain_layers())], fontsize=7)
    what = 'mean gates' if records[-1].get('method') == 'agnas' else 'softmax weights'
    fig.colorbar(im, ax=axes, shrink=0.5, label=what)
    fig.suptitle(f'{records[-1].get("method", "")}: {what} per layer (rows)\nand candidate (columns); red: the '
                 f'derived block;\ncrossed: no skip in that layer', fontsize=9)
    path = os.path.join(out, f'importance_layers.{fmt}')
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return [path]


# ---------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = utils.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('genotype', metavar='GENOTYPE_OR_JSON', nargs='+',
                   help='a genotype name in genotypes.py, a genotype.json, or a train_search.py --save folder; '
                        'several --space nb201 search folders: one line each in nb201_epochs.FORMAT')
    p.add_argument('--out', default=None, help='output folder (default: SAVE/plots for a search folder, '
                   'plots/NAME for a name, plots_STEM next to a JSON file)')
    p.add_argument('--format', default=DEFAULT_FORMAT, choices=['png', 'pdf', 'svg'])
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    adwp = [a for a in args.genotype if os.path.isfile(os.path.join(a, ADWP_SPACE))]
    written = []
    if adwp:  # search_adwp.py folders: Fig. 4 and Fig. 5 (several runs drawn together)
        if len(adwp) < len(args.genotype):
            raise UserError('search_adwp.py folders are drawn together only with other search_adwp.py folders; '
                            'pass the others separately')
        out = args.out or os.path.join(adwp[0], 'plots')
        runs.check_folder(out, '--out')
        os.makedirs(out, exist_ok=True)
        written = plot_adwp([(os.path.basename(os.path.normpath(a)), *read_adwp_run(a)) for a in adwp], out,
                            args.format)
        if len(adwp) > 1:  # one folder also gets its per-layer cells and per-cell alphas, below
            for path in written:
                print(f'wrote {path}')
            return
    inputs = [load_input(a) for a in args.genotype]
    nb201_runs = [(os.path.basename(os.path.normpath(a)) + f' ({recs[-1].get("method", "?")})', recs)
                  for a, (g, recs, _) in zip(args.genotype, inputs)
                  if isinstance(g, genotypes.NB201Genotype) and recs is not None]
    if len(inputs) > 1 and len(nb201_runs) < len(inputs):
        raise UserError('several inputs are drawn together only as NAS-Bench-201 search folders (--space nb201); '
                        'pass one genotype or folder at a time otherwise')
    genotype, records, default_out = inputs[0]
    out = args.out or default_out
    runs.check_folder(out, '--out')
    dots = genotype_dots(genotype)
    os.makedirs(out, exist_ok=True)
    for name, text in dots.items():
        with open(os.path.join(out, f'{name}.dot'), 'w') as f:
            f.write(text)
    written += render_cells(dots, out, args.format)
    if nb201_runs:
        written += plot_nb201(nb201_runs, out, args.format)
    elif records is not None and records[-1].get('space') == 'proxyless':
        written += plot_chain_importance(records, out, args.format)
    elif records is not None and records[-1].get('method') in PER_CELL:
        written += plot_importance(records, out, args.format)
    elif records is not None:
        written += plot_alphas(records, out, args.format)
        if all('alive' in r and 'importance' in r for r in records):  # a pruning method: also its I
            written += plot_alphas(records, out, args.format, key='importance')
    for path in written:
        print(f'wrote {path}')


if __name__ == '__main__':
    utils.run_main(main)
