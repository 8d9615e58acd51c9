"""Run folders, checkpoints, random state, devices and logging shared by every trainer.

Every entry script of this repository (the decorrelated batch norm trainer of Song, Sebe and
Wang, arXiv 2207.02119, and the GAN trainers of arXiv 2212.05599) writes one self-describing
run folder:

    run_dir/config.json     resolved options, command line, versions, git commit, start time
    run_dir/resumes.jsonl   one line per resume of the run
    run_dir/stats.jsonl     one JSON object per logging interval
    run_dir/tb/             TensorBoard event files
    run_dir/metrics.json    evaluation results, merged by every evaluation script

Checkpoints and JSON files are written to a temporary file in the same folder and moved into
place with ``os.replace``, so a run killed during a save keeps the previous file whole.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import platform
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # Windows: metrics.json updates are atomic but not serialised
    fcntl = None

REPO_ROOT = Path(__file__).resolve().parents[1]


class UserError(Exception):
    """A user-facing error: printed as one line, no traceback."""


def run_main(main: Callable[[list[str] | None], int | None]) -> NoReturn:
    """Call ``main(None)`` and exit with its return code.

    A ``UserError`` prints ``error: <message>`` to stderr and exits with status 2 (the status
    argparse uses for bad flags), and Ctrl-C exits with 130. Other exceptions keep their traceback.
    """
    try:
        code = main(None)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, except where there is none or the help names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ''
        if action.default is None or '(default' in text:
            return text
        return super()._get_help_string(action)


# ---------------------------------------------------------------------------------------------
# Seeding and random state
# ---------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch on the CPU and every GPU."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def get_rng_state() -> dict:
    """Return the state of every global random generator as a ``weights_only``-safe dict.

    Python's Mersenne Twister state (625 words below 2**32) and NumPy's (624 words) are stored
    as int64 tensors, so the dict contains only tensors, lists, ints, floats, str and None and
    loads with ``torch.load(path, weights_only=True)``.
    """
    py_version, py_words, py_gauss = random.getstate()
    np_kind, np_words, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        'python': {'version': py_version,
                   'state': torch.tensor(py_words, dtype=torch.int64),
                   'gauss_next': py_gauss},
        'numpy': {'kind': str(np_kind),
                  'state': torch.from_numpy(np_words.astype(np.int64)),
                  'pos': int(np_pos),
                  'has_gauss': int(np_has_gauss),
                  'cached_gaussian': float(np_gauss)},
        'torch': torch.get_rng_state(),
        'cuda': [],
    }
    if torch.cuda.is_available():
        state['cuda'] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Restore the random generators from a dict made by ``get_rng_state``.

    When the saved CUDA states do not match the visible GPUs (a resume on another machine),
    the common devices are restored and a warning is issued.
    """
    py = state['python']
    random.setstate((py['version'], tuple(int(w) for w in py['state'].cpu().tolist()),
                     py['gauss_next']))
    npy = state['numpy']
    np.random.set_state((npy['kind'], npy['state'].cpu().numpy().astype(np.uint32), npy['pos'],
                         npy['has_gauss'], npy['cached_gaussian']))
    torch.set_rng_state(state['torch'].cpu())

    cuda_states = state.get('cuda') or []
    n_visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda_states) != n_visible:
        warnings.warn(f"the checkpoint holds the random state of {len(cuda_states)} GPU(s) but "
                      f"{n_visible} are visible; restoring the first "
                      f"{min(len(cuda_states), n_visible)}", stacklevel=2)
    for index in range(min(len(cuda_states), n_visible)):
        torch.cuda.set_rng_state(cuda_states[index].cpu(), device=index)


# ---------------------------------------------------------------------------------------------
# Devices and method names
# ---------------------------------------------------------------------------------------------

def select_device(name: str) -> torch.device:
    """Turn a ``--device`` value into a ``torch.device``.

    ``auto`` picks ``cuda`` when CUDA is available and ``cpu`` otherwise. ``cuda`` or
    ``cuda:N`` without CUDA, or with too few GPUs, raises ``UserError``.
    """
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"invalid --device {name!r}: use auto, cpu, cuda or cuda:N") from err

    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} was requested but CUDA is not available "
                            f"(torch {torch.__version__}); use --device cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {name} was requested but only {count} GPU(s) are "
                            f"visible (cuda:0 to cuda:{count - 1})")
    elif device.type == 'mps' and not torch.backends.mps.is_available():
        raise UserError(f"--device {name} was requested but MPS is not available; "
                        f"use --device cpu or auto")
    return device


def method_name(nog: bool = False, olr: bool = False, ow: bool = False) -> str:
    """Name a combination of techniques: 'nog', 'olr', 'ow' joined with '_' in that order.

    ``method_name()`` is 'baseline' and ``method_name(nog=True, olr=True)`` is 'nog_olr'.
    """
    parts = [part for part, used in (('nog', nog), ('olr', olr), ('ow', ow)) if used]
    return '_'.join(parts) or 'baseline'


# ---------------------------------------------------------------------------------------------
# Atomic files
# ---------------------------------------------------------------------------------------------

def to_plain(obj: Any) -> Any:
    """Convert options and records to plain JSON values.

    Dicts get string keys, tuples and sets become lists, NumPy and 0-d torch scalars become
    Python numbers, non-finite floats become the strings 'nan', 'inf' and '-inf', and any other
    object (``Path``, ``torch.device``, …) becomes ``str(obj)``.
    """
    if isinstance(obj, dict):
        return {str(key): to_plain(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(value) for value in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((to_plain(value) for value in obj), key=str)
    if isinstance(obj, np.generic) or (isinstance(obj, torch.Tensor) and obj.numel() == 1):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    return str(obj)


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable. Some platforms cannot open a folder, so errors are ignored.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _stop_signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block ends, then deliver them again.

    A second Ctrl-C while a checkpoint is written would otherwise raise KeyboardInterrupt
    inside ``torch.save`` and end in an error from its zip writer. Signals reach only the
    main thread, so elsewhere, and for a handler that Python did not install, nothing is held.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not None:
            previous[signum] = signal.signal(signum, lambda number, frame: pending.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in pending:
            signal.raise_signal(signum)


def _write_atomic(path: str | Path, write: Callable[[Any], None], mode: str = 'wb') -> None:
    """Write ``path`` through ``write(file)`` on a temporary file, then ``os.replace`` it.

    SIGINT and SIGTERM that arrive meanwhile act once the file is in place.
    """
    with _stop_signals_deferred():
        _write_and_replace(Path(path), write, mode)


def _write_and_replace(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unlike tempfile.mkstemp (mode 0600), os.open applies the umask, so the file gets the
    # same permissions as any other file the user creates.
    tmp_name = path.parent / f'.{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp'
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_folder(path.parent)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` (converted by ``to_plain``) as indented JSON, atomically."""
    text = json.dumps(to_plain(obj), indent=2) + '\n'
    _write_atomic(path, lambda file: file.write(text), mode='w')


def read_json(path: str | Path) -> Any:
    """Read a JSON file. A file that is not valid JSON raises ``UserError`` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); fix or move the file") from err


def update_metrics(run_dir: str | Path, **entries: Any) -> None:
    """Merge ``entries`` into ``run_dir/metrics.json``, keeping every other key.

    The read-merge-write cycle holds a lock on ``run_dir/.metrics.json.lock`` (POSIX only),
    so two evaluation scripts that finish together do not drop each other's keys.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / 'metrics.json'
    with open(run_dir / '.metrics.json.lock', 'a') as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        metrics = read_json(path) if path.exists() else {}
        if not isinstance(metrics, dict):
            raise UserError(f"{path} does not contain a JSON object; fix or move the file")
        metrics.update(to_plain(entries))
        write_json_atomic(path, metrics)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def save_checkpoint(path: str | Path, state: dict) -> None:
    """Save ``state`` with ``torch.save`` to a temporary file, fsync it and move it to ``path``.

    Keep ``state`` to tensors, dicts, lists, str, int, float, bool and None, so that it loads
    with ``torch.load(weights_only=True)``.
    """
    _write_atomic(path, lambda file: torch.save(state, file))


def load_checkpoint(path: str | Path, map_location: Any = 'cpu') -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)``.

    A missing, unreadable, truncated or corrupted file, or one that does not contain a dict,
    raises ``UserError`` naming the path.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if 'weights only load failed' in str(err).lower():
            raise UserError(f"checkpoint {path} is corrupted or was not written by this "
                            f"repository: torch.load(weights_only=True) found something other "
                            f"than tensors and plain Python values in it") from err
        raise UserError(f"checkpoint {path} is corrupted or not a PyTorch checkpoint "
                        f"({err})") from err
    except Exception as err:
        # Damaged bytes reach the unpickler in many ways: besides RuntimeError, EOFError
        # and OSError, random bytes raised IndexError and KeyError in torch 2.14.
        raise UserError(f"checkpoint {path} is corrupted, truncated or unreadable "
                        f"({type(err).__name__}: {err})") from err
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} contains a {type(state).__name__}, not a dict; "
                        f"it was not written by this repository")
    return state


# ---------------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------------

def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(['git', '--no-optional-locks', *args], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


def git_state() -> dict:
    """Return the commit of the code's repository and whether tracked files differ from it.

    Both are None outside a git checkout or without git. ``--no-optional-locks`` keeps
    ``git status`` from rewriting the index.
    """
    commit = _git('rev-parse', 'HEAD')
    status = _git('status', '--porcelain', '--untracked-files=no') if commit else None
    return {'git_commit': commit or None,
            'git_dirty': None if status is None else bool(status)}


def environment_versions() -> dict:
    """Return the versions of Python, torch, torchvision, NumPy, CUDA and cuDNN in use."""
    try:
        import torchvision
        torchvision_version = torchvision.__version__
    except ImportError:
        torchvision_version = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {'python': platform.python_version(), 'torch': torch.__version__,
            'torchvision': torchvision_version, 'numpy': np.__version__,
            'cuda': torch.version.cuda, 'cudnn': cudnn}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec='seconds')


@contextlib.contextmanager
def scratch_run_dir(run_dir: Path, dry_run: bool) -> Iterator[Path]:
    """Yield ``run_dir``, or for a dry run a folder of that name in a temporary directory.

    A dry run writes what a real run writes, but the temporary directory is removed at the
    end, so the dry run leaves no folder that a later real run would have to resume.
    """
    if not dry_run:
        yield run_dir
        return
    with tempfile.TemporaryDirectory(prefix='dry_run_') as scratch:
        yield Path(scratch) / run_dir.name


def prepare_run_dir(run_dir: str | Path, resume: bool, args: argparse.Namespace,
                    argv: list[str] | None, family: str, dataset: str, method: str,
                    resume_flag: str = '--resume') -> Path:
    """Create or reopen a run folder and record how the run was started.

    A new run requires ``run_dir`` to be absent or empty. It then writes ``config.json`` with
    the family, dataset, method, seed, resolved options, command, versions, git commit and
    start time. With ``resume`` the folder must already contain a ``config.json``, which is
    kept as it is, and one line is appended to ``resumes.jsonl`` with the new command and the
    options that differ from the original ones. ``argv`` None means ``sys.argv``.
    Nothing existing is modified when a ``UserError`` is raised.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / 'config.json'
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} is an existing file; choose another folder")
    options = to_plain(vars(args))
    command = [sys.executable, *(sys.argv if argv is None else argv)]
    record = {'command': command, 'versions': environment_versions(), **git_state()}

    if resume:
        if not config_path.is_file():
            raise UserError(f"cannot resume: {config_path} not found, so {run_dir} is not a "
                            f"run folder; drop {resume_flag} to start a new run")
        config = read_json(config_path)
        original = config.get('options', {}) if isinstance(config, dict) else {}
        changed = {key: {'was': original.get(key), 'now': value}
                   for key, value in options.items() if original.get(key) != value}
        line = json.dumps({'resumed': _now(), **record, 'changed_options': changed})
        with open(run_dir / 'resumes.jsonl', 'a') as file:
            file.write(line + '\n')
            file.flush()
            os.fsync(file.fileno())
        return run_dir

    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise UserError(f"run folder {run_dir} already exists and is not empty; pass "
                        f"{resume_flag} to continue that run, or choose another folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create run folder {run_dir}: {error.strerror}; choose "
                        f"another folder") from None
    config = {'family': family, 'dataset': dataset, 'method': method,
              'seed': options.get('seed'), 'options': options, **record,
              'started': _now()}
    write_json_atomic(config_path, config)
    return run_dir


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------

def _ends_with_newline(path: Path) -> bool:
    with open(path, 'rb') as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b'\n'


class RunLogger:
    """TensorBoard scalars under ``run_dir/tb`` and one JSON line per record in ``stats.jsonl``.

    ``purge_step`` (for a resumed run) makes TensorBoard hide the events the interrupted run
    wrote at that step and later. When ``purge_key`` is also given, the records of
    ``stats.jsonl`` whose ``record[purge_key] >= purge_step`` are dropped as well, so that the
    file keeps one record per step. With ``enabled=False`` (every process but rank 0) each
    method does nothing and no file is opened.
    """

    def __init__(self, run_dir: str | Path, purge_step: int | None = None,
                 enabled: bool = True, purge_key: str | None = None):
        self.enabled = enabled
        self.writer = None
        self._stats_file = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        run_dir = Path(run_dir)
        self.stats_path = run_dir / 'stats.jsonl'
        if purge_step is not None and purge_key is not None and self.stats_path.exists():
            self._drop_records_from(purge_key, purge_step)
        self.writer = SummaryWriter(log_dir=str(run_dir / 'tb'), purge_step=purge_step)
        self._stats_file = open(self.stats_path, 'a')
        if self._stats_file.tell() > 0 and not _ends_with_newline(self.stats_path):
            # Ends a line cut short by a kill, so that the next record starts a line of its own.
            self._stats_file.write('\n')

    def _drop_records_from(self, key: str, step: int) -> None:
        kept_lines = []
        for line in self.stats_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            value = record.get(key) if isinstance(record, dict) else None
            if not isinstance(value, (int, float)) or value < step:
                kept_lines.append(line)
        text = ''.join(f'{line}\n' for line in kept_lines)
        _write_atomic(self.stats_path, lambda file: file.write(text), mode='w')

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Add each value as a TensorBoard scalar at ``step`` (TensorBoard only)."""
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), step)

    def stats(self, record: dict) -> None:
        """Append ``record`` as one JSON line to ``stats.jsonl``, flushed and fsynced."""
        if self._stats_file is None:
            return
        self._stats_file.write(json.dumps(to_plain(record)) + '\n')
        self._stats_file.flush()
        os.fsync(self._stats_file.fileno())

    def close(self) -> None:
        """Flush and close the TensorBoard writer and ``stats.jsonl``."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self._stats_file is not None:
            self._stats_file.close()
            self._stats_file = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
