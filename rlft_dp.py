"""Data-parallel plumbing for rlft.ipynb (issue 21): start W local processes joined by gloo, for the tests, the
benchmark and CPU runs. The method (DataParallel, enable_data_parallel, rank_loss, ...) lives in the notebook,
sections 7 and 8.2; this module only starts processes and sets the environment `accelerate` reads.

    from rlft_dp import launch_local
    launch_local(fn, (arg1, arg2), num_processes=2)  # fn(*args) on ranks 0 and 1; fn builds Accelerator(cpu=True)

On GPUs or several machines use `accelerate launch` (see the README, "Scale out") instead.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tests"))
from nbimport import load_notebook  # noqa: E402,F401  (the notebook as a module, as the benchmarks import it)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS picks it), so parallel runs never collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environment(rank: int, world: int, port: int, threads: int = 1) -> dict[str, str]:
    """The variables torch.distributed and accelerate read to make this process rank `rank` of `world` (CPU)."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "ACCELERATE_USE_CPU": "yes",
            "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": str(threads)}


def _worker(rank: int, world: int, port: int, threads: int, fn, args) -> None:
    os.environ.update(rank_environment(rank, world, port, threads))
    import torch
    torch.set_num_threads(threads)
    try:
        fn(*args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def launch_local(fn, args: tuple = (), num_processes: int = 2, threads: int = 1) -> None:
    """Run fn(*args) in `num_processes` fresh (spawned) processes on this machine, ranks 0..W−1 joined by gloo on
    a free port, each with `threads` torch threads. fn must be importable (a module-level function) and create
    its own `Accelerator(cpu=True)`. Raises if any rank fails (torch.multiprocessing's ProcessRaisedException)."""
    import torch.multiprocessing as mp
    mp.start_processes(_worker, args=(num_processes, free_port(), threads, fn, args), nprocs=num_processes,
                       start_method="spawn")
