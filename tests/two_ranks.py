"""Run a trainer as 2 torchrun ranks in forked processes, with gloo on 127.0.0.1.

The children get the variables that torchrun sets, so the trainers start their process group
exactly as under torchrun, without torchrun's own start-up. Forking reuses the test process's
imported torch (spawn would import it again in each child, many seconds here).
"""
from __future__ import annotations

import os
import socket
import time
from typing import Callable

import pytest
import torch
import torch.multiprocessing as mp

WORLD_SIZE = 2
TORCHRUN_VARIABLES = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR',
                      'MASTER_PORT')


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _start_rank(rank: int, port: int, worker: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME='lo')
    torch.set_num_threads(1)
    worker(rank, *args)


def run_two_ranks(worker: Callable, *args, timeout: float = 120.0) -> list[int]:
    """Call ``worker(rank, *args)`` in 2 forked ranks; return their exit codes.

    Fails the test when the ranks are still running after ``timeout`` seconds (a rank
    waiting in a collective that the other left), and kills them.
    """
    if 'fork' not in mp.get_all_start_methods():
        pytest.skip('the 2-process tests fork the test process')
    context = mp.start_processes(_start_rank, args=(free_loopback_port(), worker, args),
                                 nprocs=WORLD_SIZE, join=False, start_method='fork')
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD_SIZE} training processes did not finish in "
                            f"{timeout:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [process.exitcode for process in context.processes]
