"""Run folders: logs and per-epoch JSONL, atomic checkpoints, what --resume checks and what may change, the
genotype a training run builds, and the end-of-run report. Every script (search, retraining, teacher,
ADWPNAS) goes through these, so a run folder looks and resumes the same whatever wrote it.
"""
from __future__ import annotations

import bisect
import functools
import json
import logging
import math
import os
import platform
import shlex
import shutil
import socket
import sys
import time

import torch

import utils
from utils import UserError, format_time

try:
    import fcntl  # the run-folder lock (POSIX); elsewhere runs go unlocked
except ImportError:
    fcntl = None

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


# ---------------------------------------------------------------------------------------------------------
# One run per folder. Two runs on one --save would interleave one log and overwrite each other's checkpoints,
# so the first takes an flock on SAVE/.lock and a second is refused while it is held. The operating system
# drops an flock when its process ends in any way (a crash or kill -9 included), so a lock is never stale;
# the file holds the holder's pid and host for the refusal. Under torchrun rank 0 locks for all.

LOCK = '.lock'
_held: dict[str, tuple] = {}  # absolute folder -> (open lock file, whether this run made the folder)


def lock_folder(save: str) -> None:
    """Take SAVE's lock for this process (made if missing), or refuse in one sentence naming the run that holds
    it. Taking it again in the same process is a no-op; `holds_folder_lock` gives it back."""
    folder = os.path.abspath(save)
    if fcntl is None or folder in _held:
        return
    made = not os.path.exists(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK)
    while True:
        f = open(path, 'a+')  # noqa: SIM115 (held open while the run lasts: the lock is on it)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or 'another process'
            f.close()
            if made:
                os.rmdir(folder)
            raise UserError(f'{save} is in use by another run ({holder}); wait for it to end, or give this run '
                            f'another --save') from None
        try:  # the holder may have released and removed the file between our open and our flock: retry
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        f.close()
    f.truncate(0)
    f.write(f'pid {os.getpid()} on {socket.gethostname()}, since {time.strftime("%Y-%m-%d %H:%M:%S")}\n')
    f.flush()
    _held[folder] = (f, made)


def unlock_folder(save: str) -> None:
    """Give SAVE's lock back: the lock file goes, and so does the folder if this run made it and left it empty
    (a refused run leaves nothing behind)."""
    folder = os.path.abspath(save)
    f, made = _held.pop(folder, (None, False))
    if f is None:
        return
    try:
        os.remove(os.path.join(folder, LOCK))
    except OSError:
        pass
    f.close()
    if made:
        try:
            os.rmdir(folder)
        except OSError:  # not empty: the run wrote its files
            pass


def holds_folder_lock(main):
    """Decorate a script's main(): every run-folder lock that it takes is given back when it returns or
    fails (the process may go on: the tests, a notebook)."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        before = set(_held)
        try:
            return main(*args, **kwargs)
        finally:
            for folder in set(_held) - before:
                unlock_folder(folder)
    return run


# logger.info(text, extra=FILE_ONLY) writes to SAVE/log.txt only, not to the terminal: what a researcher
# greps for later (tables of A every epoch) without burying the summary lines on screen.
FILE_ONLY = {'file_only': True}


class _LogFile(logging.FileHandler):
    """log.txt. A write that fails (a full disk) ends the run with utils.run_main's sentence, rather than the
    page of '--- Logging error ---' that logging prints for each line while the run goes on unlogged."""

    def handleError(self, record):
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            raise error
        super().handleError(record)


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
        fh = _LogFile(os.path.join(save, 'log.txt'))
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


def append_jsonl(path: str, record: dict) -> None:
    """One line more; a line cut short by a kill or a full disk is dropped on resume (trim_jsonl)."""
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
# Checkpoints: written atomically, so a run killed mid-write keeps its previous checkpoint; each carries the
# checksum of its contents, so a file changed on disk (or in a copy) is refused rather than resumed.

CHECKPOINT = 'checkpoint.pt'  # every run's checkpoint, inside its --save folder
CHECKSUM = 'checksum'         # its entry: utils.state_checksum of everything else in it
# What each script does, for the sentences that name another script's checkpoint.
SCRIPTS = {'train_search.py': 'a search', 'search_adwp.py': 'an ADWPNAS search', 'train_cifar.py': 'a CIFAR retraining',
           'train_imagenet.py': 'an ImageNet retraining', 'teacher.py': 'a teacher\'s training'}


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind a failed write (torch.save chains it under a RuntimeError of its zip writer)."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def save_checkpoint(state: dict, path: str) -> None:
    """Write `state` with its checksum to `path` atomically (a temporary file, then a rename). A write that
    fails (a full disk) removes the temporary file and says, in one sentence, that the previous checkpoint is
    intact. A state holding a NaN is never written (the run diverged: utils.check_state says it better)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    nan = next((name for name, t in utils.state_items(state)
                if isinstance(t, torch.Tensor) and t.is_floating_point() and bool(t.isnan().any())), None)
    kept = (f'the previous checkpoint {path} is intact' if os.path.exists(path) else
            'no checkpoint was written before')
    if nan is not None:
        raise UserError(f'{path} was not written: its state holds NaN ({nan}), so the run diverged; {kept}: '
                        f'resume from it with a lower --learning_rate')
    state = {**state, CHECKSUM: utils.state_checksum(state)}
    tmp = f'{path}.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        cause = _os_error(e)
        if cause is None:
            raise
        _remove(tmp)
        why = utils.WRITE_FAILURES.get(cause.errno) or cause.strerror or type(cause).__name__
        raise UserError(f'writing the checkpoint {path} failed: {why}; {kept} and its temporary file was '
                        f'removed: make room (or fix the disk) and add --resume to the same command') from None


_unverified: set[str] = set()  # checkpoints without a checksum that were said so already


def load_checkpoint(path: str, map_location='cpu') -> dict:
    """The checkpoint in `path` (a file, or a run folder holding checkpoint.pt), its checksum verified; every
    way it can fail (missing, cut short, damaged, changed bytes, written by other code) is one sentence that
    says what to do. A checkpoint from before checksums loads, and says once that it was not verified."""
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
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except (ImportError, AttributeError) as e:  # a module, class or function that this code does not have
        raise UserError(f'checkpoint {path} needs code that this project does not have ({utils.one_line(str(e))}); '
                        f'it was written by another project or another version of this one: resume it with '
                        f'that code, or start a new run') from None
    except Exception as e:  # noqa: BLE001 (cut short, damaged, not a checkpoint: every other way torch.load fails)
        raise UserError(f'checkpoint {path} cannot be read ({type(e).__name__}: {utils.one_line(str(e))[:120]}); '
                        f'it is cut short, damaged or not a checkpoint of this project: pass an intact copy, or '
                        f'start a new run') from None
    if not isinstance(ckpt, dict):
        raise UserError(f'{path} holds a {type(ckpt).__name__}, not a checkpoint of this project (a dict that a '
                        f'script of this project writes); pass SAVE/{CHECKPOINT} of a run')
    saved = ckpt.pop(CHECKSUM, None)
    if saved is None:
        if os.path.abspath(path) not in _unverified:
            _unverified.add(os.path.abspath(path))
            print(f'note: {path} has no checksum (it was written before checksums were), so its contents '
                  f'cannot be verified', file=sys.stderr)
    elif utils.state_checksum(ckpt) != saved:
        raise UserError(f'checkpoint {path} is damaged: its contents do not match the checksum written with it '
                        f'(the file changed on disk or in a copy); resume from an intact copy, or start a new '
                        f'run')
    return ckpt


def checkpoint_script(ckpt) -> str | None:
    """The script that wrote a checkpoint: its 'script' entry, or, in checkpoints from before that entry,
    what only that script writes; None for anything else."""
    if not isinstance(ckpt, dict):
        return None
    if isinstance(ckpt.get('script'), str):
        return ckpt['script']
    if {'arch_optimizer', 'best', 'settings'} <= set(ckpt):
        return 'search_adwp.py'
    if 'settings' in ckpt:
        return 'train_search.py'
    if {'arch', 'config', 'state_dict'} <= set(ckpt):
        return 'teacher.py'
    if 'global_batch' in ckpt:
        return 'train_imagenet.py'
    if {'synthetic_size', 'genotype'} <= set(ckpt):
        return 'train_cifar.py'
    return None


def load_resume(path: str, script: str, needs=()) -> dict:
    """The checkpoint that `script --resume PATH` continues. Another script's checkpoint is refused naming the
    script that wrote it and the command that continues it; one that lacks an entry of `needs` (what the
    script reads) is refused as damaged, before anything reads it."""
    ckpt = load_checkpoint(path)
    found = checkpoint_script(ckpt)
    if found != script:
        if found is None:
            raise UserError(f'{path} is not a checkpoint of this project\'s scripts, but {script} --resume needs '
                            f'the SAVE/{CHECKPOINT} of an earlier {script} run; pass one, or drop --resume to '
                            f'start a new run')
        what = SCRIPTS.get(found, 'another run')
        raise UserError(f'{path} is a checkpoint of {found} ({what}), not of {script}: continue it with `python '
                        f'{found} --resume {path}` and the flags of that run, or pass {script} the '
                        f'SAVE/{CHECKPOINT} of one of its own runs')
    missing = [k for k in needs if k not in ckpt]
    if missing:
        raise UserError(f'checkpoint {path} lacks {", ".join(repr(k) for k in missing)}, which every {script} '
                        f'checkpoint holds: it is damaged or was written by other code; resume from another '
                        f'checkpoint, or start a new run')
    return ckpt


class restoring:
    """`with runs.restoring(path):` around the code that reads a checkpoint into this run's objects: an entry
    missing or of the wrong kind, a tensor of the wrong shape (what a damaged checkpoint, or one written by
    other code, gives) becomes one sentence. A UserError raised inside keeps its own."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        from genotypes import GenotypeError
        if e is None or isinstance(e, (UserError, GenotypeError, torch.OutOfMemoryError)):
            return False
        if isinstance(e, (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError)):
            first = utils.one_line(str(e))[:160] or type(e).__name__
            raise UserError(f'checkpoint {self.path} does not fit this run ({type(e).__name__}: {first}); it is '
                            f'damaged or was written by other code: resume from another checkpoint, or start a '
                            f'new run') from None
        return False


def load_optimizer(optimizer, state: dict, scheduled: bool = True) -> None:
    """optimizer.load_state_dict(state), keeping this run's hyperparameters: momentum, weight decay, betas,
    ... come from the flags (which may change on resume), not from the checkpoint; so does the learning rate
    unless `scheduled` (a schedule's rate is the checkpoint's, re-based by set_learning_rate when the flag
    changed). Unchanged flags give back exactly the saved values, so a plain resume stays bit-identical."""
    mine = [{k: v for k, v in group.items() if k != 'params'} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, values in zip(optimizer.param_groups, mine):
        for k, v in values.items():
            if not (scheduled and k in ('lr', 'initial_lr')):
                group[k] = v


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


def run_folder(save: str | None, resume: str | None, stem: str, default: str | None = None,
               lock: bool = True) -> tuple[str, str | None]:
    """(SAVE, checkpoint to resume from) for every script that writes a run folder: SAVE defaults to the
    folder of a `--resume PATH` (so a resumed run goes on in its own folder), else to `default`, else to a
    fresh STEM-DATE-TIME folder. A file where the folder belongs is refused, and so is a folder that another
    run holds (lock_folder; `lock` False: a process other than torchrun's rank 0, which locks for all)."""
    if save is None:
        if resume:
            save = resume if os.path.isdir(resume) else (os.path.dirname(resume) or '.')
        else:
            save = default or f'{stem}-{time.strftime("%Y%m%d-%H%M%S")}'
    check_folder(save, '--save')
    if lock:
        lock_folder(save)
    return save, resume_path(os.path.join(save, CHECKPOINT), resume)


def carry_over(resume: str, save: str, names) -> list[str]:
    """A run resumed into another --save than its checkpoint's folder goes on there with its history: the
    files `names` of that folder (its JSONL log, log.txt, ...) and the checkpoint are copied into SAVE,
    replacing what SAVE holds (the checkpoint is the truth; trim_jsonl then cuts the log to it), so SAVE is a
    whole run folder that --resume, summarize.py and visualize.py read, even when no epoch is left to train.
    Returns the names copied; none when SAVE is the checkpoint's own folder."""
    path = os.path.join(resume, CHECKPOINT) if os.path.isdir(resume) else resume
    source = os.path.dirname(os.path.abspath(path))
    if source == os.path.abspath(save):
        return []
    os.makedirs(save, exist_ok=True)
    copied = []
    for name, src in [(n, os.path.join(source, n)) for n in names] + [(CHECKPOINT, path)]:
        if os.path.isfile(src):
            dst = os.path.join(save, name)
            try:
                shutil.copyfile(src, f'{dst}.tmp')
                os.replace(f'{dst}.tmp', dst)
            except OSError:
                _remove(f'{dst}.tmp')
                raise
            copied.append(name)
    return copied


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


def describe_changes(changed: dict, epoch: int, epochs: int | None = None) -> str | None:
    """The log line that says which flags changed on resume (None if none did); `epoch` 0-based, the first
    epoch the resumed run trains; `epochs` the run's length: a finished run trains none, and says so."""
    shown = {k: v for k, v in changed.items() if k not in ('resume', 'save')}
    if not shown:
        return None
    text = ', '.join(f'--{k} {_flag_text(a)} -> {_flag_text(b)}' for k, (a, b) in shown.items())
    if epochs is not None and epoch >= epochs:
        return f'changed on resume: {text}; the run had finished its {epochs} epochs, so no epoch trains with them'
    return f'changed on resume, in effect from epoch {epoch + 1}: {text}'



def log_resumed(logger: logging.Logger, path: str, epoch: int, epochs: int, changed: dict, dropped: int = 0,
                log_path: str | None = None) -> None:
    """The log lines of a resumed run: the checkpoint and the epochs it had finished, the `dropped` lines of
    `log_path` beyond it (trim_jsonl), and the flags changed on resume (describe_changes)."""
    logger.info('resumed from %s after epoch %d', path, epoch)
    if dropped:
        logger.info('dropped %d line(s) of %s beyond the checkpoint (an epoch that was not saved, or a '
                    'line cut short by a kill)', dropped, log_path)
    changes = describe_changes(changed, epoch, epochs)
    if changes:
        logger.info(changes)

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
    """Write a JSON file atomically; a write that fails leaves no temporary file behind."""
    tmp = f'{path}.tmp'
    try:
        with open(tmp, 'w') as f:
            json.dump(record, f, indent=1)
            f.write('\n')
        os.replace(tmp, path)
    except OSError:
        _remove(tmp)
        raise


def resolve_genotype(arch: str | None, genotype_file: str | None, default: str):
    """(genotype, label) from `--arch NAME` or `--genotype_file PATH` (not both); the label names it in
    logs and checkpoints."""
    import genotypes
    if arch and genotype_file:
        raise UserError('give either --arch or --genotype_file, not both')
    if genotype_file:
        refuse_checkpoint(genotype_file, '--genotype_file')
        return genotypes.load(genotype_file=genotype_file), genotype_file
    arch = arch or default
    return genotypes.load(arch=arch), arch


def refuse_checkpoint(path: str, what: str) -> None:
    """A checkpoint where a genotype.json belongs is refused naming the script that wrote it and the file to
    pass instead (torch.save writes a zip archive; anything else is left to the genotype's own checks)."""
    try:
        with open(path, 'rb') as f:
            if f.read(2) != b'PK':
                return
    except OSError:
        return
    found = checkpoint_script(load_checkpoint(path))
    raise UserError(f'{what} {path} is a checkpoint{f" of {found}" if found else ""}, not a genotype: pass the '
                    f'genotype.json that the run wrote beside it ({os.path.join(os.path.dirname(path), "genotype.json")})')


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


# ---------------------------------------------------------------------------------------------------------
# Commands a run prints for the user to run next (its `next:` lines, the advice in an error). Each repeats the
# flags that say where this run ran and on what data, so that, copied as printed, it runs on the same machine
# and data: without --device cpu a next step on a CPU machine would ask for CUDA, without --data it would look
# for CIFAR in data/.


def same_run_flags(args, keep=None) -> list[str]:
    """This run's flags that a next command repeats: --device (or --gpu N but 0), --dataset, --data (but the
    default data/), --image_size (folder data), --synthetic_size and --batch_size (synthetic data: a tiny set,
    on which the next script's paper batch of 64 to 256 may exceed the images), --workers 0 (a machine whose
    data-loading processes fail); only those in `keep` where given (a script without --dataset)."""
    value = functools.partial(getattr, args)
    dataset = value('dataset', None)
    wanted = {'device': value('device', None),
              'gpu': value('gpu', 0) if value('device', None) is None and value('gpu', 0) else None,
              'dataset': dataset, 'data': value('data', 'data') if value('data', 'data') != 'data' else None,
              'image_size': value('image_size', None) if dataset == 'folder' else None,
              'synthetic_size': value('synthetic_size', None) if dataset == 'synthetic' else None,
              'batch_size': value('batch_size', None) if dataset == 'synthetic' else None,
              'workers': 0 if value('workers', None) == 0 else None}
    return [f'--{k} {shlex.quote(str(v))}' for k, v in wanted.items()
            if v is not None and (keep is None or k in keep)]


def command(script: str, args=None, *words, keep=None, **flags) -> str:
    """`python SCRIPT WORDS --FLAG VALUE ...`: the positional `words`, the script's own `flags` (True: the
    flag alone; None: left out), then this run's same_run_flags (those not given in `flags`; only those in
    `keep` where given); quoted for the shell."""
    parts = ['python', script] + [shlex.quote(str(w)) for w in words]
    for k, v in flags.items():
        if v is True:
            parts.append(f'--{k}')
        elif v is not None and v is not False:
            parts.append(f'--{k} {shlex.quote(str(v))}')
    if args is not None:
        parts += [f for f in same_run_flags(args, keep) if f.split()[0][2:] not in flags]
    return ' '.join(parts)


def unfinished_search(genotype_file: str | None) -> str | None:
    """A warning when `genotype_file` is the genotype.json of a search that has not finished (a search
    rewrites it every epoch, so a retraining started early trains an early cell): its folder's search log
    holds fewer epochs than the search plans and no final result.json. None otherwise."""
    if not genotype_file:
        return None
    folder = os.path.dirname(os.path.abspath(genotype_file))
    try:
        records = read_jsonl(os.path.join(folder, 'search_log.jsonl'))
    except (OSError, ValueError):
        return None
    if not records or not isinstance(records[-1], dict) or os.path.exists(os.path.join(folder, 'result.json')):
        return None
    done, planned = records[-1].get('epoch'), records[-1].get('epochs')
    if not isinstance(done, int) or (isinstance(planned, int) and done >= planned):
        return None
    length = (f'{done} of its {planned} epochs' if isinstance(planned, int) else
              f'{done} epochs and has written no result.json yet')
    return (f'warning: {genotype_file} comes from a search that has run {length}; a '
            f'search rewrites genotype.json every epoch, so this trains the cell of epoch {done}: retrain once '
            f'it has finished, or pass --allow_unfinished to silence this')



def log_retraining(logger: logging.Logger, args, genotype, label: str, recipe: str | None) -> None:
    """A retraining's first log lines (train_cifar.py, train_imagenet.py): the recipe it took, its flags, a
    warning where the genotype comes from a search that has not finished (unless --allow_unfinished), the
    genotype."""
    if recipe:
        logger.info(recipe)
    logger.info(f'args: {vars(args)}')
    unfinished = None if args.allow_unfinished else unfinished_search(args.genotype_file)
    if unfinished:
        logger.warning(unfinished)
    logger.info(f'genotype {label}: {genotype!r}')


def restore_training(ckpt: dict, resume: str, model, optimizer, scheduler) -> int:
    """Load a retraining checkpoint into its network, optimizer and lr schedule (one that does not fit: one
    sentence naming `resume`); returns the epochs it had finished."""
    with restoring(resume):
        model.load_state_dict(ckpt['model'])
        load_optimizer(optimizer, ckpt['optimizer'])
        scheduler.load_state_dict(ckpt['scheduler'])
        return int(ckpt['epoch'])

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
