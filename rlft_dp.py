"""Data-parallel plumbing for rlft.ipynb (issue 21): start W local processes joined by gloo, for the tests, the
benchmark and CPU runs. The method (DataParallel, enable_data_parallel, rank_loss, ...) lives in the notebook,
sections 7 and 8.1; this module only starts processes and sets the environment `accelerate` reads.

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
sys.path.insert(0, str(ROOT))
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


def parameters(params_file: str | None = None) -> dict:
    """The notebook's parameters cell, then the overrides of a JSON file (e.g. tests/tiny_params.json)."""
    import json
    from nbimport import notebook_parameters
    P = notebook_parameters()
    if params_file:
        P.update(json.loads(Path(params_file).read_text()))
    return P


def train(P: dict) -> None:
    """The notebook's training run on this process's rank (started by `accelerate launch`, see `make train-dp`):
    the model, data, embedder and reward as sections 1, 2, 4 and 6 build them, then the notebook's train_rank.
    REWARD_FN must be "similarity" here (the reward MLP is fitted by the notebook's section 6)."""
    import torch
    nb = load_notebook()
    if P["REWARD_FN"] != "similarity":
        raise SystemExit(f"make train-dp: REWARD_FN={P['REWARD_FN']!r}; the script entry runs REWARD_FN='similarity' "
                         "(fit the reward model in the notebook, or use NUM_PROCESSES there)")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    nb.seed_everything(P["SEED"])
    base, tok = nb.load_base(P["MODEL"], os.path.expanduser(P["CACHE_DIR"]), device,
                             nb.resolve_dtype(P["DTYPE"], device), seed=P["SEED"])
    model = nb.add_lora(base, P["LORA_R"], P["LORA_ALPHA"], P["LORA_DROPOUT"], P["LORA_TARGETS"])
    train_pairs = nb.split_pairs(nb.load_pairs(str(ROOT / P["DATA_PATH"])), "train")
    embedder = nb.Embedder(P["EMBEDDER"], device=device)
    reward_fn = nb.make_reward_fn("similarity", embedder, None, device=device)
    nb.train_rank(model, tok, train_pairs, reward_fn, Path(P["RUN_DIR"]), P, embedder=embedder)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="rlft data-parallel entry (run it with `accelerate launch`)")
    ap.add_argument("command", choices=["train"])
    ap.add_argument("--params", default=None, help="JSON file of parameter overrides")
    args = ap.parse_args()
    train(parameters(args.params))
