"""Start a trainer as a subprocess, wait until it has written a file, then stop it by SIGTERM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.two_ranks import TORCHRUN_VARIABLES


@dataclass
class Stopped:
    returncode: int
    stdout: str
    stderr: str
    seconds: float  # from the signal to the exit


def start_trainer(argv: list[str], cwd: Path) -> subprocess.Popen:
    """Run ``python argv`` in its own session, one thread, without torchrun's variables."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    for name in TORCHRUN_VARIABLES:
        env.pop(name, None)
    return subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def stop_once_written(process: subprocess.Popen, path: Path, group: bool = False,
                      start_timeout: float = 90, exit_timeout: float = 30) -> Stopped:
    """Send SIGTERM once ``path`` is not empty; return the exit status, output and delay.

    ``group`` signals the whole process group (loader workers included), as schedulers and
    ``timeout`` do. Fails the test, and kills the group, when the file does not appear within
    ``start_timeout`` seconds or the process is still running ``exit_timeout`` seconds after
    the signal.
    """
    deadline = time.monotonic() + start_timeout
    while not (path.exists() and path.read_text()):
        if process.poll() is not None or time.monotonic() > deadline:
            _kill(process)
            pytest.fail(f"{path.name} was not written (exit status {process.poll()}): "
                        f"{process.communicate()[1][-2000:]}")
        time.sleep(0.02)
    sent = time.monotonic()
    if group:
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = process.communicate(timeout=exit_timeout)
    except subprocess.TimeoutExpired:
        _kill(process)
        pytest.fail(f"training still running {exit_timeout:.0f} s after SIGTERM")
    return Stopped(process.returncode, stdout, stderr, time.monotonic() - sent)


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
