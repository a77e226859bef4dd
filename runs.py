"""Run folders: logs and per-epoch JSONL, atomic checkpoints, what --resume checks and what may change, the
genotype a training run builds, and the end-of-run report. Every script (search, retraining, teacher,
ADWPNAS) goes through these, so a run folder looks and resumes the same whatever wrote it.
"""
from __future__ import annotations

import bisect
import json
import logging
import math
import os
import pickle
import platform
import sys
import time

import torch

from utils import UserError, format_time

# ---------------------------------------------------------------------------------------------------------
# Output folders and logs


def check_folder(path: str, flag: str) -> None:
    """Refuse an output folder that cannot be one: an existing file, or a path through a file, or a place
    this user may not write; a missing folder is fine (the run makes it)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f'{flag} {path} is a file, but it must be a folder (the run writes its files into it); '
                        f'pick another {flag}')
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f'{flag} {path} cannot be made: {parent} is a file, not a folder; pick another {flag}')
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f'{flag} {path}: this user may not write in {parent}; pick another {flag}')





# logger.info(text, extra=FILE_ONLY) writes to SAVE/log.txt only, not to the terminal: what a researcher
# greps for later (tables of A every epoch) without burying the summary lines on screen.
FILE_ONLY = {'file_only': True}


def get_logger(save: str | None, name: str = 'nos', enabled: bool = True, debug: bool = False) -> logging.Logger:
    """Log to stdout and to SAVE/log.txt (appending, so a resumed run keeps one log); records logged with
    `extra=FILE_ONLY` go to the file only. `debug` (a script's --debug) adds logger.debug's lines, on every
    process: a process that does not log (`enabled` False, torchrun's ranks above 0) prints those and its
    warnings only."""
    logger = logging.getLogger(f'{name}:{save}')
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.DEBUG if debug else logging.INFO if enabled else logging.WARNING)
    fmt = logging.Formatter('%(asctime)s %(message)s', datefmt='%m/%d %H:%M:%S')
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    stream.addFilter(lambda record: not getattr(record, 'file_only', False))
    if debug and not enabled:
        stream.addFilter(lambda record: record.levelno != logging.INFO)
    logger.addHandler(stream)
    if save and enabled:
        os.makedirs(save, exist_ok=True)
        fh = logging.FileHandler(os.path.join(save, 'log.txt'))
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


def append_jsonl(path: str, record: dict) -> None:
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def read_jsonl(path: str) -> list[dict]:
    """The records of a .jsonl log; [] when it does not exist."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_info(device: torch.device, amp_dtype: torch.dtype | None, processes: int = 1) -> dict:
    """Where and how a run trained, for its result.json (summarize.py turns it into GPU-hours)."""
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.machine() or 'cpu'
        try:  # the CPU model where Linux says it
            with open('/proc/cpuinfo') as f:
                name = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
        except (OSError, StopIteration):
            pass
    return {'device': device.type, 'device_name': name, 'processes': processes,
            'precision': 'bf16' if amp_dtype == torch.bfloat16 else 'fp32'}



# ---------------------------------------------------------------------------------------------------------
# Checkpoints: written atomically, so a run killed mid-write keeps its previous checkpoint.


def save_checkpoint(state: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp'
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


CHECKPOINT = 'checkpoint.pt'  # every run's checkpoint, inside its --save folder


def load_checkpoint(path: str, map_location='cpu') -> dict:
    """The checkpoint in `path` (a file, or a run folder holding checkpoint.pt); a missing, damaged or foreign
    file is one sentence that says what to do."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, CHECKPOINT)):
            raise UserError(f'{path} is a folder without {CHECKPOINT}; pass a checkpoint file (every run writes '
                            f'SAVE/{CHECKPOINT}), or drop --resume to start a new run')
        path = os.path.join(path, CHECKPOINT)
    if not os.path.isfile(path):
        folder = os.path.dirname(path) or '.'
        started = os.path.basename(path) == CHECKPOINT and os.path.isfile(os.path.join(folder, 'log.txt'))
        if os.path.exists(f'{path}.tmp') or started:  # a run killed before (or while) it wrote its first
            raise UserError(f'checkpoint {path} does not exist: the run in {folder} stopped before it finished '
                            f'its first checkpoint, so there is nothing to resume; start afresh by running the '
                            f'same command without --resume')
        raise UserError(f'checkpoint {path} does not exist; pass the path of a checkpoint, or drop --resume to '
                        f'start a new run')
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as e:  # damaged or foreign
        raise UserError(f'checkpoint {path} cannot be read ({type(e).__name__}); it is damaged or not a '
                        f'checkpoint of this project') from None


def checkpoint_script(ckpt) -> str | None:
    """The script that wrote a checkpoint: its 'script' entry, or, in checkpoints from before that entry,
    what only that script writes; None for anything else."""
    if not isinstance(ckpt, dict):
        return None
    if 'script' in ckpt:
        return ckpt['script']
    if 'settings' in ckpt:
        return 'train_search.py'
    if {'arch', 'config', 'state_dict'} <= set(ckpt):
        return 'teacher.py'
    if 'global_batch' in ckpt:
        return 'train_imagenet.py'
    if {'synthetic_size', 'genotype'} <= set(ckpt):
        return 'train_cifar.py'
    return None


def load_resume(path: str, script: str) -> dict:
    """The checkpoint that `script --resume PATH` continues; refuses another script's checkpoint by name
    (rather than failing later on a missing entry)."""
    ckpt = load_checkpoint(path)
    found = checkpoint_script(ckpt)
    if found != script:
        what = f'a checkpoint of {found}' if found else 'not a checkpoint of this project'
        raise UserError(f'{path} is {what}, but {script} --resume needs a checkpoint that {script} wrote '
                        f'(SAVE/{CHECKPOINT} of an earlier {script} run); pass one, or drop --resume to start '
                        f'a new run')
    return ckpt


def check_same(what: str, saved, current, path: str) -> None:
    """Refuse to resume (or load) a checkpoint made for another setting, naming both."""
    if saved != current:
        raise UserError(f'checkpoint {path} was made for {what} {saved!r}, but this run has {what} '
                        f'{current!r}; start a new --save directory or run with the same {what}')


# ---------------------------------------------------------------------------------------------------------
# Run folders, resuming, and the genotype a training run builds

def resume_path(ckpt_path: str, resume: str | None) -> str | None:
    """The checkpoint to resume from, given `--resume [PATH]` (None: not given; '': the run's own
    `ckpt_path`). A fresh run refuses a folder that already holds a checkpoint rather than overwrite it."""
    if resume is None:
        if os.path.exists(ckpt_path):
            raise UserError(f'{ckpt_path} already holds a checkpoint; pass --resume to continue that run, or '
                            f'pick another --save')
        return None
    return resume or ckpt_path


def run_folder(save: str | None, resume: str | None, stem: str,
               default: str | None = None) -> tuple[str, str | None]:
    """(SAVE, checkpoint to resume from) for the training scripts: SAVE defaults to the folder of a
    `--resume PATH` (so a resumed run goes on in its own folder), else to `default`, else to a fresh
    STEM-DATE-TIME folder. A file where the folder belongs is refused."""
    if save is None:
        if resume:
            save = resume if os.path.isdir(resume) else (os.path.dirname(resume) or '.')
        else:
            save = default or f'{stem}-{time.strftime("%Y%m%d-%H%M%S")}'
    check_folder(save, '--save')
    return save, resume_path(os.path.join(save, CHECKPOINT), resume)


def trim_jsonl(path: str, last_epoch: int) -> int:
    """Forget records of epochs after the checkpoint we resume from (a run killed between writing its
    log line and its checkpoint repeats that epoch), and a line that is not JSON (a run killed while it
    appended one); the checkpoint is the truth. Returns how many lines were dropped."""
    if not os.path.exists(path):
        return 0
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict) and record.get('epoch', math.inf) <= last_epoch:
                keep.append(line if line.endswith('\n') else line + '\n')
            else:
                dropped += 1
    with open(path, 'w') as f:
        f.writelines(keep)
    return dropped


# ---------------------------------------------------------------------------------------------------------
# What may change when a run resumes (issue 13). A flag that defines the run (data, network, seed, batch,
# schedule length, ...) must match the checkpoint's; each script lists the few that may change (a learning
# rate after a divergence, data loading, logging, the device), which take effect from the resumed epoch.


def _flag_text(value) -> str:
    if isinstance(value, bool):
        return 'on' if value else 'off'
    if isinstance(value, (list, tuple)):
        return ' '.join(_flag_text(v) for v in value)
    if isinstance(value, float):
        return f'{value:g}'
    return 'unset' if value is None else str(value)


def resume_flags(ckpt: dict, args, may_change, path: str) -> dict[str, tuple]:
    """Compare this run's flags with those the checkpoint was made with (its 'args'). A changed flag not in
    `may_change` is refused in one sentence naming it and both values; the changed ones that may change are
    returned as {name: (old, new)}. Flags the checkpoint does not record (older code) are not compared."""
    saved = ckpt.get('args') or {}
    changed = {}
    for name, value in vars(args).items():
        if name not in saved or saved[name] == value:
            continue
        if name not in may_change:
            old, new = _flag_text(saved[name]), _flag_text(value)
            raise UserError(f'checkpoint {path} was made with --{name} {old}, but this run has --{name} {new}; '
                            f'--{name} defines the run, so it cannot change on resume: resume with --{name} '
                            f'{old}, or start a new run in another --save folder')
        changed[name] = (saved[name], value)
    return changed


def describe_changes(changed: dict, epoch: int) -> str | None:
    """The log line that says which flags changed on resume (None if none did); `epoch` 0-based."""
    shown = {k: v for k, v in changed.items() if k != 'resume'}
    if not shown:
        return None
    text = ', '.join(f'--{k} {_flag_text(a)} -> {_flag_text(b)}' for k, (a, b) in shown.items())
    return f'changed on resume, in effect from epoch {epoch + 1}: {text}'


def set_learning_rate(optimizer, scheduler, lr: float) -> None:
    """Re-base a schedule on a new initial learning rate from the current step on: the optimizer's
    param_groups (lr, initial_lr) and the scheduler's base_lrs become what they would be, had the run
    started with `lr` (the schedule's closed form at its last_epoch). Used when --learning_rate changes on
    resume; an unchanged rate is never touched, so a plain resume stays bit-identical."""
    from torch.optim import lr_scheduler as sched
    step = scheduler.last_epoch
    for i, group in enumerate(optimizer.param_groups):
        if isinstance(scheduler, sched.CosineAnnealingLR):
            cosine = (1 + math.cos(math.pi * step / scheduler.T_max)) / 2
            current = scheduler.eta_min + (lr - scheduler.eta_min) * cosine
        elif isinstance(scheduler, sched.MultiStepLR):
            milestones = sorted(scheduler.milestones.elements())
            current = lr * scheduler.gamma ** bisect.bisect_right(milestones, step)
        elif isinstance(scheduler, sched.LambdaLR):
            current = lr * scheduler.lr_lambdas[i](step)
        else:  # a schedule without a closed form here: scale what it reached
            current = group['lr'] * lr / scheduler.base_lrs[i] if scheduler.base_lrs[i] else lr
        group['lr'], group['initial_lr'] = current, lr
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    scheduler._last_lr = [group['lr'] for group in optimizer.param_groups]  # what get_last_lr() reports


def write_json(path: str, record: dict) -> None:
    """Write a JSON file atomically."""
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        json.dump(record, f, indent=1)
        f.write('\n')
    os.replace(tmp, path)


def resolve_genotype(arch: str | None, genotype_file: str | None, default: str):
    """(genotype, label) from `--arch NAME` or `--genotype_file PATH` (not both); the label names it in
    logs and checkpoints."""
    import genotypes
    if arch and genotype_file:
        raise UserError('give either --arch or --genotype_file, not both')
    if genotype_file:
        return genotypes.load(genotype_file=genotype_file), genotype_file
    arch = arch or default
    return genotypes.load(arch=arch), arch


def genotype_layers(genotype, layers: int | None, default: int, label: str) -> int:
    """The network's depth: a per-layer genotype (ADWPNAS) fixes it, so `--layers` may be left out and a
    different value is refused; any other genotype takes `--layers` or `default`."""
    import genotypes
    if isinstance(genotype, genotypes.MacroGenotype):
        depth = len(genotype.cells)
        if layers is not None and layers != depth:
            raise UserError(f'--layers {layers} conflicts with the per-layer genotype {label}, which has {depth} '
                            f'cells; leave out --layers or pass --layers {depth}')
        return depth
    return default if layers is None else layers


def check_genotype(ckpt: dict, genotype_json: str, label: str, path: str) -> None:
    """Refuse to resume a checkpoint trained on other cells, naming both."""
    if ckpt['genotype'] != genotype_json:
        saved, current = ckpt['arch'], label
        if saved == current:  # same name, different cells (an edited genotypes.py or file)
            saved, current = f'{saved} (as it was then)', f'{current} (as it is now)'
        check_same('genotype', saved, current, path)


# ---------------------------------------------------------------------------------------------------------
# Which paper's retraining recipe fits a genotype (train_cifar.py and train_imagenet.py --preset)

# The recipe of each named genotype of genotypes.py (random:SEED, NOS's Table 2 baseline, takes nos), and of
# each method whose search wrote a genotype.json (train_search.py's result.json or search_log.jsonl beside it).
# GDAS has no recipe of its own here: its genotypes take DARTS's.
ARCH_PRESETS = {'DARTS_V1': 'darts', 'DARTS_V2': 'darts', 'NOS_EXAMPLE': 'nos', 'AGNAS': 'agnas',
                'EOINAS_REPO_CANDIDATE': 'eoinas'}
METHOD_PRESETS = {'eoinas': 'eoinas', 'agnas': 'agnas', 'gdas': 'darts'}  # darts: nos or darts, by the search


def search_origin(genotype_file: str) -> tuple[str | None, str]:
    """(the preset of the search that wrote `genotype_file`, where that was read) from the files beside it:
    train_search.py's result.json or search_log.jsonl, search_adwp.py's intensive_space.json; (None, why not)."""
    folder = os.path.dirname(os.path.abspath(genotype_file))
    for name in ('result.json', 'search_log.jsonl'):
        path = os.path.join(folder, name)
        try:
            with open(path) as f:
                record = json.loads(f.readline() if name.endswith('.jsonl') else f.read())
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or 'method' not in record:
            continue
        method, space = record['method'], record.get('space')
        if method in METHOD_PRESETS:
            return METHOD_PRESETS[method], f'a --method {method} search ({path})'
        if method == 'darts':
            # NOS (and NOS's experiment on DARTS's space, with a teacher) retrains with NOS's recipe; a plain
            # DARTS search with DARTS's
            lambda_at = (record.get('settings') or {}).get('lambda_at', 0. if space == 'darts' else None)
            preset = 'darts' if space == 'darts' and not lambda_at else 'nos'
            return preset, f'a --method darts --space {space} search{" with AGS" if lambda_at else ""} ({path})'
    if os.path.exists(os.path.join(folder, 'intensive_space.json')):
        return 'adwpnas', f'a search_adwp.py search ({folder})'
    return None, f'no search record beside {genotype_file}'


def genotype_origin(genotype, label: str, genotype_file: str | None) -> tuple[str, str]:
    """(the paper whose retraining recipe fits a genotype, why): nos, darts, agnas, eoinas, adwpnas or nb201,
    from the genotype's form, the search files beside --genotype_file, or the name of --arch (the retraining
    scripts' --preset; nos, this repo's default, where nothing says otherwise)."""
    import genotypes
    if isinstance(genotype, genotypes.NB201Genotype):
        return 'nb201', 'a NAS-Bench-201 architecture'
    if isinstance(genotype, genotypes.MacroGenotype):
        return 'adwpnas', 'a per-layer genotype, which ADWPNAS searches'
    if isinstance(genotype, genotypes.StagedGenotype):
        return 'agnas', 'a staged genotype, which AGNAS searches'
    if isinstance(genotype, getattr(genotypes, 'ChainGenotype', ())):
        return 'agnas', 'a chain genotype, which AGNAS\'s macro search finds'
    if genotype_file:
        preset, where = search_origin(genotype_file)
        if preset is not None:
            return preset, f'the genotype comes from {where}'
        return 'nos', f'{where}: NOS\'s recipe, this repo\'s default'
    if label in ARCH_PRESETS:
        return ARCH_PRESETS[label], f'--arch {label}'
    return 'nos', f'--arch {label}: NOS\'s recipe, this repo\'s default'


# ---------------------------------------------------------------------------------------------------------
# --tensorboard: the per-epoch records as TensorBoard scalars, and the importance matrices as heatmaps


TENSORBOARD = 'tensorboard'  # the event files' folder, inside the run's --save folder


def check_tensorboard(wanted: bool) -> None:
    """--tensorboard needs the optional tensorboard package (torch.utils.tensorboard writes through it)."""
    if not wanted:
        return
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise UserError('--tensorboard needs the tensorboard package, which is not installed: pip install tensorboard '
                        '(or drop --tensorboard; the run\'s JSONL log holds the same figures)') from None


class TensorBoard:
    """SAVE/tensorboard/: each epoch's record as scalars (every number in it: losses, accuracies, learning
    rate, times; nested ones such as a NAS-Bench-201 search's `benchmark` accuracies as `benchmark/KEY`), and
    each importance matrix as a heatmap image, at step = the epoch (1-based). Only the process that writes the
    run's files makes one (`enabled`); a resumed run purges the events after its checkpoint's epoch, so a kill
    leaves no doubled steps. Without `enabled` every method does nothing."""

    def __init__(self, save: str, enabled: bool, resumed_epoch: int = 0):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(save, TENSORBOARD),
                                        purge_step=resumed_epoch + 1 if resumed_epoch else None)

    def scalars(self, record: dict, step: int, prefix: str = '') -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if isinstance(value, dict):
                self.scalars(value, step, f'{prefix}{key}/')
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != 'epoch' \
                    and math.isfinite(value):
                self.writer.add_scalar(f'{prefix}{key}', value, step)
        if not prefix:
            self.writer.flush()  # an epoch at a time: what a run killed later wrote is on disk

    def heatmaps(self, matrices: dict, ops, space: str, step: int, title: str = 'importance') -> None:
        """One image per matrix (edges x ops of `space`): a labelled heatmap through matplotlib where it is
        installed, else the matrix itself as a grey image (white: its largest value), 8 pixels per entry."""
        if self.writer is None:
            return
        import numpy as np

        import genotypes
        for name, matrix in matrices.items():
            m = np.asarray(matrix, dtype=float)
            rows = genotypes.row_labels(space, len(m))
            try:
                import matplotlib
                matplotlib.use('Agg')
                import matplotlib.pyplot as plt
            except ImportError:
                img = m / max(float(m.max()), 1e-12)
                self.writer.add_image(f'{title}/{name}', np.kron(img, np.ones((8, 8)))[None], step)
                continue
            fig, ax = plt.subplots(figsize=(1.2 + 0.35 * m.shape[1], 1.4 + 0.25 * m.shape[0]), layout='constrained')
            im = ax.imshow(m, cmap='viridis', aspect='auto', interpolation='nearest')
            ax.set_xticks(range(len(ops)), ops, rotation=90, fontsize=7)
            ax.set_yticks(range(len(rows)), rows, fontsize=7)
            ax.set_title(f'{title} {name}, epoch {step}', fontsize=9)
            fig.colorbar(im, ax=ax)
            self.writer.add_figure(f'{title}/{name}', fig, step)  # closes the figure

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def report_run(logger: logging.Logger, save: str, files: list[tuple[str, str]], next_steps: list[str],
               started: float) -> None:
    """The end of every run: its wall time, where each of its files went, and the command to run next.
    `files`: (name in SAVE, what it holds); the ones that do not exist are left out."""
    logger.info(f'done in {format_time(time.time() - started)} (wall time of this run); its files, in {save}:')
    for name, what in files:
        if os.path.exists(os.path.join(save, name)):
            logger.info(f'  {name:<17} {what}')
    for command in next_steps:
        logger.info(f'next: {command}')
