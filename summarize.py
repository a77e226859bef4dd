"""Summarise runs into the table a paper prints: runs, mean ± std and best error, weights, multiply-adds,
hours (NOS Sec. 4.3 reports "best and average of 10 independent runs"; docs/search.md).

    python summarize.py runs/c10-seed*                     # retraining runs of train_cifar.py / train_imagenet.py
    python summarize.py runs/search-* --out searches.csv   # searches of train_search.py and search_adwp.py
    python summarize.py runs/random-*                      # Table 2's random baseline: the first row is the best
    python summarize.py runs/nb201-*                       # NAS-Bench-201 searches: also the benchmark table
    python summarize.py runs/eoinas-seed* --select val     # EoiNAS's best of 4: the search with the best val acc

Each RUN_DIR is one run's --save folder:
- retraining: SAVE/result.json, written at the end by train_cifar.py and train_imagenet.py. Runs are grouped
  by dataset and genotype (and network size, which the weight count tells apart); the error is the CIFAR
  test error or the ImageNet top-1 validation error, in %.
- search: SAVE/search_log.jsonl (one record per epoch), plus a final search_result.json or a result.json with
  "kind": "search" where the search wrote one. Runs are grouped by their search settings (the checkpoint's
  `settings`, or those of the log or the final result; the seed left out); the error is the proxy's
  validation error at the last epoch.
- teacher: SAVE/result.json of teacher.py (kind "teacher"; older teacher folders: their finished checkpoint);
  the error is the CIFAR test error.
Rows are sorted by mean error. The std is the sample standard deviation (n - 1), as papers report over
seeds. Hours are wall-clock hours per run (training and evaluation epochs, summed over --resume sessions);
GPU-hours are those times the number of processes, known where the run says it ran on CUDA; CPU time is the
process time of a run on the CPU (data-loading workers included), in hours, where the run measured it.
NAS-Bench-201 searches run with --benchmark also get the table papers print on that space (AGNAS Table 3): per
method and search data set, the runs, the mean ± std over them of the benchmark's test accuracy of the final
cell on CIFAR-10, CIFAR-100 and ImageNet16-120, and the search cost (hours per run).
A run without a result yet (still running, or stopped) is listed as such; a directory that is not a run is
named on stderr and skipped. The table also goes to summary.csv beside the runs (in the folder that holds
them all), or to --out (one row per group, and one per unfinished run).

--select val keeps, of the finished searches of one configuration (the same method, space, dataset and
settings; the seed left out), the one with the best final supernet validation accuracy (`val_acc_end`: the
whole held-out half in eval mode at the last epoch; logs without it: `val_acc`), and says which run won:
EoiNAS Sec. 4.2 runs 4 searches and retrains the best by validation. Retraining runs are not selected.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import statistics
import sys

import runs
import utils
from genotypes import OP_SUBSETS

RUN_FILES = ('result.json', 'search_result.json', 'search_log.jsonl', 'metrics.jsonl', 'checkpoint.pt',
             'log.txt')
SELECT = ('val',)
COLUMNS = ('kind', 'dataset', 'label', 'status', 'runs', 'error_mean', 'error_std', 'error_best', 'top5_mean',
           'params_M', 'macs_M', 'hours_per_run', 'gpu_hours_per_run', 'cpu_time_hours_per_run', 'device', 'precision',
           'seeds', 'dirs')


def build_parser() -> argparse.ArgumentParser:
    p = utils.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('run_dirs', nargs='+', metavar='RUN_DIR', help='--save folders of training or search runs')
    p.add_argument('--out', '--csv', dest='out', default=None,
                   help='where to write the table as CSV, a file or a folder (default: summary.csv in the folder '
                        'that holds the runs; \'\': nowhere)')
    p.add_argument('--select', default=None, choices=SELECT,
                   help='val: of the searches of one configuration, keep the best by final validation accuracy')
    return p


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _checkpoint(path: str) -> dict:
    """The run's checkpoint, or {} (none, or unreadable: a summary never fails on one run)."""
    ckpt_path = os.path.join(path, 'checkpoint.pt')
    if not os.path.isfile(ckpt_path):
        return {}
    try:
        return runs.load_checkpoint(ckpt_path)
    except utils.UserError:
        return {}


def _hours(record: dict) -> tuple[float | None, float | None]:
    """(wall-clock hours, GPU-hours) of a finished run's record; None where unknown. (A search's result.json
    from before CPU time was measured has `cpu_hours`, which were wall-clock hours: `wall_seconds` says the
    same, and its CPU time stays unknown.)"""
    gpu = record.get('gpu_hours')
    seconds = record.get('seconds', record.get('wall_seconds'))
    hours = seconds / 3600 if isinstance(seconds, (int, float)) else record.get('hours')
    if gpu is None and hours is not None and record.get('device') == 'cuda':
        gpu = hours * record.get('processes', record.get('world_size', 1))
    return hours, gpu


def _cpu_hours(record: dict) -> float | None:
    """CPU time in hours (process time, data-loading workers included) of a run on the CPU; None where not
    measured (a GPU run, or an older result.json)."""
    return record.get('cpu_time_hours')


def _cpu_hours_of_log(log: list[dict]) -> float | None:
    """CPU time in hours summed over a search log's epochs; None if an epoch lacks it (a GPU run keeps it
    too, but there the cost is GPU-hours)."""
    if not log or not all('cpu_seconds' in r for r in log):
        return None
    return sum(r['cpu_seconds'] for r in log) / 3600


def read_run(path: str) -> dict:
    """One run folder as a record: {'status': 'done' | 'unfinished' | 'not a run', ...}."""
    if not os.path.isdir(path):
        return {'status': 'not a run', 'dir': path,
                'why': 'does not exist' if not os.path.exists(path) else 'is not a directory'}
    present = [f for f in RUN_FILES if os.path.exists(os.path.join(path, f))]
    if not present:
        return {'status': 'not a run', 'dir': path,
                'why': f'not a run folder (it holds none of {", ".join(RUN_FILES)})'}
    result = None
    for name in ('search_result.json', 'result.json'):
        if name in present:
            try:
                result = _read_json(os.path.join(path, name))
            except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
                return {'status': 'unfinished', 'dir': path, 'kind': '?', 'why': f'{name} cannot be read ({e})'}
            break
    log = runs.read_jsonl(os.path.join(path, 'search_log.jsonl'))
    if (result or {}).get('kind') == 'search' or 'search_result.json' in present or (result is None and log):
        return _read_search(path, result, log)
    if result is not None:
        return _read_training(path, result)
    if present == ['log.txt']:
        return {'status': 'unfinished', 'dir': path, 'kind': '?',
                'why': 'only a log.txt: the run is in its first epoch, or stopped before the first ended '
                       '(its log.txt says why)'}
    ckpt = _checkpoint(path)
    if runs.checkpoint_script(ckpt) == 'teacher.py':
        return _read_teacher(path, ckpt)
    done = [r['epoch'] for r in runs.read_jsonl(os.path.join(path, 'metrics.jsonl'))]
    epoch = done[-1] if done else ckpt.get('epoch', 0)
    total = ckpt.get('args', {}).get('epochs')
    dataset = ckpt.get('dataset', 'imagenet' if 'num_classes' in ckpt else '?')
    return {'status': 'unfinished', 'dir': path, 'kind': 'train', 'dataset': dataset,
            'label': ckpt.get('arch', '?'),
            'why': f'no result.json yet: {epoch} of {total or "?"} epochs done (still running, or stopped: '
                   f'--resume continues it)'}


def _read_training(path: str, result: dict) -> dict:
    kind = 'teacher' if result.get('kind') == 'teacher' else 'train'
    if 'test_error' in result:
        error, top5 = result['test_error'], 100. - result['test_top5'] if 'test_top5' in result else None
    elif 'top1_error' in result:
        error, top5 = result['top1_error'], result.get('top5_error')
    else:
        return {'status': 'unfinished', 'dir': path, 'kind': kind,
                'why': 'result.json holds no test_error or top1_error'}
    hours, gpu = _hours(result)
    genotype = json.dumps(result.get('genotype'), sort_keys=True)
    return {'status': 'done', 'dir': path, 'kind': kind, 'dataset': result.get('dataset', '?'),
            'label': result.get('arch', '?'), 'error': error, 'top5': top5, 'params_M': result.get('params_M'),
            'macs_M': result.get('macs_M'), 'hours': hours, 'gpu_hours': gpu, 'cpu_time_hours': _cpu_hours(result),
            'device': result.get('device_name', result.get('device')), 'precision': result.get('precision'),
            'seed': result.get('seed'),
            'key': (kind, result.get('dataset'), genotype, result.get('arch'), result.get('params'),
                    result.get('macs'))}


def _read_teacher(path: str, ckpt: dict) -> dict:
    """A teacher.py folder without result.json (teachers trained before it wrote one): its checkpoint says
    whether it finished and its test accuracy."""
    config = ckpt.get('config') or {}
    label = f'{ckpt.get("arch", "?")} ' + ' '.join(f'{k}={v}' for k, v in sorted(config.items()))
    done, total = ckpt.get('epoch', -1) + 1, ckpt.get('epochs')
    if not ckpt.get('finished') or 'test_top1' not in ckpt:
        return {'status': 'unfinished', 'dir': path, 'kind': 'teacher', 'dataset': ckpt.get('dataset', '?'),
                'label': label, 'why': f'teacher at epoch {done} of {total or "?"} (still running, or stopped: '
                                       f'--resume continues it)'}
    hours = sum(r.get('seconds', 0.) for r in runs.read_jsonl(os.path.join(path, 'train_log.jsonl'))) / 3600
    return {'status': 'done', 'dir': path, 'kind': 'teacher', 'dataset': ckpt.get('dataset', '?'), 'label': label,
            'error': 100. - ckpt['test_top1'], 'top5': 100. - ckpt['test_top5'] if 'test_top5' in ckpt else None,
            'params_M': None, 'macs_M': None, 'hours': hours or None, 'gpu_hours': None, 'cpu_time_hours': None,
            'device': None,
            'precision': None, 'seed': (ckpt.get('args') or {}).get('seed'),
            'key': ('teacher', ckpt.get('dataset'), label)}


def _settings_label(settings: dict) -> str:
    """The settings that tell searches apart, short: method, space, op set, lambda_at, order, epochs, rest."""
    s = dict(settings)
    parts = []
    for name in ('method', 'space'):
        if name in s:
            parts.append(str(s.pop(name)))
    ops = s.pop('ops', None)
    if ops is not None and settings.get('space') != 'darts':  # the DARTS space has one fixed op set
        parts.append('ops=' + next((k for k, v in OP_SUBSETS.items() if list(v) == list(ops)), '+'.join(ops)))
    if 'lambda_at' in s:
        parts.append(f'lambda_at={s.pop("lambda_at"):g}')
    if 'unrolled' in s:
        parts.append('2nd order' if s.pop('unrolled') else '1st order')
    if 'epochs' in s:
        parts.append(f'{s.pop("epochs")} epochs')
    s.pop('dataset', None)
    space = s.pop('intensive_space', None)  # ADWPNAS: a table of candidates, named by a short hash
    if space is not None:
        parts.append('intensive space ' + hashlib.sha256(json.dumps(space, sort_keys=True).encode()).hexdigest()[:8])
    parts += [f'{k}={v}' for k, v in sorted(s.items())]
    return ' '.join(parts) or '(settings unknown)'


def _read_search(path: str, final: dict | None, log: list[dict]) -> dict:
    final = final or {}
    ckpt = {} if final.get('settings') else _checkpoint(path)
    last = log[-1] if log else {}
    settings = dict(final.get('settings') or last.get('settings') or ckpt.get('settings') or {})
    method = final.get('method', last.get('method', settings.get('method')))
    if method is None and 'intensive_space' in settings:  # ADWPNAS logs from before they named the method
        method = 'adwpnas'
    if method is not None:
        settings['method'] = method
    settings.pop('seed', None)
    seed = final.get('seed', ckpt.get('args', {}).get('seed'))
    total = settings.get('epochs')
    epoch = last.get('epoch', 0)
    label = _settings_label(settings)
    dataset = settings.get('dataset', final.get('dataset', '?'))
    if not final and (total is None or epoch < total):
        return {'status': 'unfinished', 'dir': path, 'kind': 'search', 'dataset': dataset, 'label': label,
                'why': f'search at epoch {epoch} of {total or "?"} (still running, or stopped: --resume '
                       f'continues it)'}
    # val_acc_end: the whole held-out half in eval mode at the last epoch; older logs have only val_acc,
    # the running mean over the epoch's A steps. A final result's figure comes first.
    val_key, val_acc = next(((k, src[k]) for src in (final, last) for k in ('val_acc_end', 'val_acc')
                             if src.get(k) is not None), ('val_acc', None))
    if val_acc is None:
        return {'status': 'unfinished', 'dir': path, 'kind': 'search', 'dataset': dataset, 'label': label,
                'why': 'the search log has no val_acc'}
    hours, gpu = _hours(final) if final else (None, None)
    device = final.get('device_name', final.get('device'))
    if hours is None and log:  # the epochs' own times: search and validation steps, no start-up
        hours = sum(r.get('seconds', 0.) for r in log) / 3600
        args = ckpt.get('args')
        if args:  # train_search.py runs on CUDA unless --device cpu
            device = 'cpu' if args.get('device') == 'cpu' else 'cuda'
            gpu = hours if device == 'cuda' else None
    return {'status': 'done', 'dir': path, 'kind': 'search', 'dataset': dataset, 'label': label,
            'error': 100. - val_acc, 'top5': None, 'params_M': None, 'macs_M': None, 'hours': hours,
            'gpu_hours': gpu, 'cpu_time_hours': (_cpu_hours(final) if final else None if device == 'cuda'
                                                 else _cpu_hours_of_log(log)),
            'device': device,
            'precision': final.get('precision'), 'seed': seed, 'val_acc': val_acc, 'val_key': val_key,
            'key': ('search', dataset, json.dumps(settings, sort_keys=True, default=str))}


def select_best(runs: list[dict]) -> tuple[list[dict], list[str]]:
    """--select val: of the finished searches sharing a key (one configuration), keep the one with the best
    final validation accuracy (ties: the first given). Returns (the runs kept, one sentence per group saying
    which run won and the others' figures). Other runs pass through."""
    groups: dict = {}
    for r in runs:
        if r['status'] == 'done' and r['kind'] == 'search':
            groups.setdefault(r['key'], []).append(r)
    dropped, notes = set(), []
    for members in groups.values():
        best = max(members, key=lambda m: m['val_acc'])  # max keeps the first of equal maxima
        dropped |= {id(m) for m in members if m is not best}
        others = ', '.join(f'{m["dir"]} {m["val_acc"]:.2f}%' for m in members if m is not best)
        notes.append(f'--select val: of {len(members)} search(es) of {best["label"]} ({best["dataset"]}), '
                     f'{best["dir"]} won with {best["val_key"]} {best["val_acc"]:.2f}%'
                     + (f' (the others: {others})' if others else ''))
    return [r for r in runs if id(r) not in dropped], notes


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _join(values) -> str:
    return ', '.join(sorted({str(v) for v in values if v is not None}))


def summarize(runs: list[dict]) -> list[dict]:
    """One row per group of finished runs (sorted by kind, dataset, mean error), then one per unfinished run."""
    groups: dict = {}
    for r in runs:
        if r['status'] == 'done':
            groups.setdefault(r['key'], []).append(r)
    rows = []
    for members in groups.values():
        errors = [m['error'] for m in members]
        rows.append({
            'kind': members[0]['kind'], 'dataset': members[0]['dataset'], 'label': _join(m['label'] for m in members),
            'status': 'done', 'runs': len(members), 'error_mean': statistics.fmean(errors),
            'error_std': statistics.stdev(errors) if len(errors) > 1 else None, 'error_best': min(errors),
            'top5_mean': _mean(m['top5'] for m in members), 'params_M': members[0]['params_M'],
            'macs_M': members[0]['macs_M'], 'hours_per_run': _mean(m['hours'] for m in members),
            'gpu_hours_per_run': (_mean(m['gpu_hours'] for m in members)
                                  if all(m['gpu_hours'] is not None for m in members) else None),
            'cpu_time_hours_per_run': (_mean(m['cpu_time_hours'] for m in members)
                                       if all(m['cpu_time_hours'] is not None for m in members) else None),
            'device': _join(m['device'] for m in members), 'precision': _join(m['precision'] for m in members),
            'seeds': _join(m['seed'] for m in members), 'dirs': ' '.join(m['dir'] for m in members)})
    rows.sort(key=lambda r: (r['kind'] != 'train', r['dataset'], r['error_mean']))
    for r in runs:
        if r['status'] == 'unfinished':
            rows.append({'kind': r['kind'], 'dataset': r.get('dataset', '?'), 'label': r.get('label', '?'),
                         'status': r['why'], 'runs': 0, 'dirs': r['dir']})
    return rows


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '-'
    return f'{value:.{digits}f}'


def format_table(rows: list[dict]) -> str:
    """The rows as the fixed-width text table that summarize.py prints."""
    head = ('kind', 'dataset', 'genotype / settings', 'runs', 'error % (mean ± std)', 'best', 'top-5',
            'weights (M)', 'mult-adds (M)', 'hours/run', 'GPU-h/run', 'CPU-time h/run', 'device')
    lines = []
    done = [r for r in rows if r['status'] == 'done']
    body = []
    for r in done:
        mean = _fmt(r['error_mean']) + (f' ± {_fmt(r["error_std"])}' if r['error_std'] is not None else '')
        device = ' '.join(x for x in (r['device'], r['precision']) if x) or '-'
        body.append((r['kind'], r['dataset'], r['label'], str(r['runs']), mean, _fmt(r['error_best']),
                     _fmt(r['top5_mean']), _fmt(r['params_M']), _fmt(r['macs_M'], 1),
                     _fmt(r['hours_per_run'], 3), _fmt(r['gpu_hours_per_run'], 3),
                     _fmt(r['cpu_time_hours_per_run'], 4), device))
    if body:
        widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
        for row in [head] + body:
            lines.append('  '.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        lines.insert(1, '  '.join('-' * w for w in widths))
        lines.append('error: retraining, CIFAR test / ImageNet top-1 val error; search, the proxy\'s val error at '
                     'its last epoch. ±: sample std over the runs of a row.')
    else:
        lines.append('no finished run')
    unfinished = [r for r in rows if r['status'] != 'done']
    if unfinished:
        lines.append('')
        lines.append('not finished (not in the table):')
        lines += [f'  {r["dirs"]} ({r["kind"]}, {r["label"]}): {r["status"]}' for r in unfinished]
    return '\n'.join(lines)


def write_csv(path: str, rows: list[dict]) -> None:
    """The rows as CSV, atomically; numbers unrounded, unknowns empty."""
    tmp = f'{path}.tmp'
    with open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: '' if r.get(k) is None else r.get(k) for k in COLUMNS})
    os.replace(tmp, path)


NB201_TESTS = (('cifar10_test', 'CIFAR-10'), ('cifar100_test', 'CIFAR-100'), ('imagenet16_test', 'ImageNet16-120'))


def nb201_rows(run_dirs) -> list[dict]:
    """One row per (method, search data set) over the finished NAS-Bench-201 searches whose final cell was
    looked up (result.json's `benchmark`): runs, mean and sample std of each test accuracy, hours per run."""
    groups: dict = {}
    for path in run_dirs:
        file = os.path.join(path, 'result.json')
        try:
            result = _read_json(file) if os.path.isfile(file) else None
        except (OSError, ValueError):  # read_run already named a result.json that cannot be read
            result = None
        if not result or result.get('kind') != 'search' or result.get('space') != 'nb201' or \
                result.get('benchmark', {}).get('index', -1) < 0:
            continue
        groups.setdefault((result.get('method', '?'), result.get('dataset', '?')), []).append(result)
    rows = []
    for (method, dataset), members in sorted(groups.items()):
        row = {'method': method, 'dataset': dataset, 'runs': len(members),
               'hours_per_run': _mean([_hours(m)[0] for m in members])}
        for key, _ in NB201_TESTS:
            values = [m['benchmark'][key] for m in members if m['benchmark'].get(key) is not None]
            row[f'{key}_mean'] = _mean(values)
            row[f'{key}_std'] = statistics.stdev(values) if len(values) > 1 else None
        rows.append(row)
    return rows


def format_nb201(rows: list[dict]) -> str:
    head = ('method', 'searched on', 'runs') + tuple(f'{name} test %' for _, name in NB201_TESTS) + ('hours/run',)
    body = [(r['method'], r['dataset'], str(r['runs']),
             *(f'{_fmt(r[f"{k}_mean"])} ± {_fmt(r[f"{k}_std"])}' for k, _ in NB201_TESTS), _fmt(r['hours_per_run'], 3))
            for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ['NAS-Bench-201: the benchmark\'s test accuracy of the final cell (mean ± std over runs)']
    lines += ['  '.join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *body]]
    return '\n'.join(lines)


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    found = []
    for path in args.run_dirs:
        run = read_run(path)
        if run['status'] == 'not a run':
            print(f'skipped {path}: {run["why"]}', file=sys.stderr)
            continue
        found.append(run)
    if not found:
        raise utils.UserError(f'none of the {len(args.run_dirs)} directories given is a run folder (the --save '
                              f'folder of train_cifar.py, train_imagenet.py, train_search.py, search_adwp.py or '
                              f'teacher.py)')
    notes = []
    if args.select == 'val':
        found, notes = select_best(found)
    rows = summarize(found)
    print(format_table(rows))
    for note in notes:
        print(note)
    nb = nb201_rows(args.run_dirs)
    if nb:
        print('\n' + format_nb201(nb))
    out = beside_the_runs([r['dir'] for r in found]) if args.out is None else args.out
    if out and os.path.isdir(out):  # a folder: summary.csv in it
        out = os.path.join(out, 'summary.csv')
    if out:
        runs.check_folder(os.path.dirname(out) or '.', '--out')
        write_csv(out, rows)
        print(f'\nwrote {out}')
    return rows


def beside_the_runs(dirs: list[str]) -> str:
    """summary.csv in the folder that holds the runs (their deepest common parent), not wherever the command
    happens to run."""
    parents = [os.path.dirname(os.path.abspath(d.rstrip(os.sep))) for d in dirs]
    return os.path.join(os.path.commonpath(parents), 'summary.csv')


if __name__ == '__main__':
    utils.run_main(main)
