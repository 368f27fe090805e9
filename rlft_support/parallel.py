"""Data parallelism for rlft.ipynb (issue 21): the one collective the method calls, and the launchers.

The method (notebook sections 7 and 8) sees only `state.comm`: `SingleProcess()` in one process, where every
method is the identity, or `DataParallel` over the ranks of a Hugging Face `Accelerator` (gloo between CPU
processes, NCCL between GPUs). This module never imports the notebook: `train_rank` and `run_pipeline_parallel`
take its `run_pipeline` as `run_fn`.

    from rlft_support.parallel import launch_local
    launch_local(fn, (arg1, arg2), num_processes=2)  # fn(*args) on ranks 0 and 1; fn builds Accelerator(cpu=True)

On GPUs or several machines use `accelerate launch rlft_dp.py train` (see the README, "Scale out") instead.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
from pathlib import Path

from rlft_support.config import seed_everything  # first: it sets OMP_WAIT_POLICY before torch loads

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast as accelerate_broadcast
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from rlft_support.runs import PipelineResult, read_log, save_atomically, write_json_atomic


class SingleProcess:
    """The collective of a one-process run: every method is the identity (x itself, `flag` itself), so the method
    reads the same in one process and on W ranks, and one process computes bit for bit what it computes without
    it. `reduce_grads` is None: guarded_step then skips a non-finite loss itself, before its backward."""
    rank, world, is_main, reduced_bytes = 0, 1, True, 0
    reduce_grads = None

    def gather(self, x):
        """Every rank's rows: x."""
        return x

    def sum(self, x):
        """x summed over the ranks: x."""
        return x

    def broadcast(self, x):
        """Rank 0's x: x."""
        return x

    def all(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank: flag."""
        return flag

    def own(self, x):
        """This rank's share of a batch: x."""
        return x

    def own_indices(self, idx: torch.Tensor, rows: int) -> torch.Tensor:
        """This rank's rows of minibatch idx: idx."""
        return idx

    def barrier(self) -> None:
        """Wait for every rank: nothing to wait for."""


class DataParallel:
    """The ranks of one data-parallel run, through a Hugging Face `Accelerator`, with SingleProcess's interface.
    Each rank holds a consecutive share of the batch's rows, whole prompts (all K answers) each; the few
    batch-wide statistics see every rank's rows, so W ranks compute what one process computes on the combined
    batch. Tensors travel on the accelerator's device and come back on their own; `reduced_bytes` counts the
    gradient bytes all-reduced."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator, self.rank, self.world = accelerator, accelerator.process_index, accelerator.num_processes
        self.is_main, self.reduced_bytes = accelerator.is_main_process, 0

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[b, ...] on every rank -> [W·b, ...] in rank order (all-gather)."""
        return self.accelerator.gather(x.contiguous().to(self.accelerator.device)).to(x.device)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks (all-reduce)."""
        return self.accelerator.reduce(x.to(self.accelerator.device), "sum").to(x.device)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x, on every rank."""
        return accelerate_broadcast(x.clone().to(self.accelerator.device), from_process=0).to(x.device)

    def all(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank (so all ranks take the same branch). A Ctrl-C that a rank deferred
        (deferred_interrupts) is raised here, as KeyboardInterrupt, on every rank at the same call."""
        votes = self.sum(torch.tensor([float(not flag), float(_INTERRUPTED.is_set())]))
        if votes[1] > 0:
            _INTERRUPTED.clear()
            raise KeyboardInterrupt(f"interrupted (Ctrl-C reached {votes[1].item():.0f} of {self.world} ranks)")
        return bool(votes[0] == 0)

    def own(self, x):
        """This rank's consecutive share of a batch (a tensor [W·b, ...] or a list) -> [b, ...]."""
        if len(x) % self.world:
            raise ValueError(f"{len(x)} rows (prompts) do not split evenly over {self.world} ranks")
        b = len(x) // self.world
        return x[self.rank * b:(self.rank + 1) * b]

    def own_indices(self, idx: torch.Tensor, rows: int) -> torch.Tensor:
        """The rows of minibatch idx (global row numbers) that this rank holds, as its own row numbers [0, rows)."""
        first = self.rank * rows
        return idx[(idx >= first) & (idx < first + rows)] - first

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        self.accelerator.wait_for_everyone()

    def reduce_grads(self, params: list[torch.Tensor]) -> None:
        """Sum the gradients of `params` over the ranks in one flat fp32 all-reduce (a rank with no gradient,
        e.g. no rows in this minibatch, adds zeros); every rank then holds the same p.grad."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.sum(torch.cat([g.detach().float().flatten() for g in grads]))
        self.reduced_bytes += flat.numel() * flat.element_size()
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad = g.view_as(p).to(p.dtype).clone()


_INTERRUPTED = threading.Event()  # a Ctrl-C this rank deferred (deferred_interrupts); DataParallel.all raises it


@contextlib.contextmanager
def deferred_interrupts():
    """Inside, in one rank of a launched run: Ctrl-C (SIGINT, which a notebook's interrupt sends to the kernel and
    every rank forked from it) does not raise where it lands, which would leave the other ranks waiting in a
    collective, but is noted; the next DataParallel.all raises it on every rank at once, so train_loop's save path
    runs on all of them and rank 0 saves. A second Ctrl-C before that raises at once."""
    def note(signum, frame):
        if _INTERRUPTED.is_set():
            raise KeyboardInterrupt
        _INTERRUPTED.set()
    _INTERRUPTED.clear()
    previous = signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _INTERRUPTED.clear()


def broadcast_parameters(comm, params) -> None:
    """Every rank's `params` become rank 0's, in place (as DDP does when it wraps a model)."""
    with torch.no_grad():
        for p in params:
            p.copy_(comm.broadcast(p.detach()))


def allreduce_bytes_per_step(state) -> int:
    """The bytes one optimizer step all-reduces: the fp32 gradients of the LoRA and value-head parameters."""
    return 4 * sum(p.numel() for p in state.trainable_parameters())


def enable_data_parallel(state, accelerator: Accelerator, seed: int) -> DataParallel:
    """Make `state` (a PPOState) one rank of a data-parallel run: its trainable weights become rank 0's (as DDP
    does when it wraps a model), ranks > 0 reseed python/numpy/torch with seed + 1000003·rank so their rollouts
    sample independently (rank 0 keeps its streams), and state.comm is set. Returns the DataParallel."""
    comm = DataParallel(accelerator)
    broadcast_parameters(comm, state.trainable_parameters())
    if comm.rank > 0:
        seed_everything(seed + 1000003 * comm.rank)
    state.comm = comm
    return comm


def rank_seed(seed: int, rank: int, iteration: int) -> int:
    """The seed of data-parallel rank > 0 at an iteration (rank 0's RNG streams are checkpointed instead)."""
    return int(np.random.SeedSequence([seed, rank, iteration]).generate_state(1)[0])


def writes_files(state) -> bool:
    """Whether this process writes the run's files: the one process, or rank 0 of a data-parallel run (the other
    ranks hold the same weights and optimizer state and write nothing)."""
    return state.comm.is_main


DP_RESULT = "pipeline_result.json"  # rank 0's summary of a launched run (PipelineResult's figures), in RUN_DIR


def train_rank(run_fn, model, tokenizer, train_pairs, reward_fn, run_path, cfg, embedder=None) -> None:
    """One rank of a data-parallel training run, as notebook_launcher or `accelerate launch` starts it: an
    Accelerator (gloo between CPU processes, one torch thread each on CPUs: forked OpenMP pools are unsafe),
    run_fn (the notebook's run_pipeline) with it and `cfg` (the Config), then on rank 0 the final adapter (run_path/adapter) and the
    run's figures (DP_RESULT), which `launched_pipeline` reads back. Ctrl-C is deferred (deferred_interrupts):
    in the RL stage every rank stops at the same point and rank 0 saves, then the rank ends as normally."""
    cpu = next(model.parameters()).device.type == "cpu"
    if cpu:
        torch.set_num_threads(1)
    accelerator = Accelerator(cpu=cpu)
    with deferred_interrupts():
        result = run_fn(model, tokenizer, train_pairs, reward_fn, run_path, cfg, embedder=embedder,
                        accelerator=accelerator)
    if accelerator.is_main_process:
        save_atomically(Path(run_path) / "adapter", model.save_pretrained)
        write_json_atomic(Path(run_path) / DP_RESULT, {
            "seconds": result.seconds, "sft_steps": result.sft_steps, "iterations": result.iterations,
            "samples_seen": result.samples_seen, "resumed": result.resumed, "processes": accelerator.num_processes})
    accelerator.wait_for_everyone()


def launched_pipeline(model, run_path, cfg):
    """After a launched run: rank 0's final adapter loaded into this process's `model`, and the run's
    PipelineResult (the RL log read from run_path; state None and sft_logs [] stay in the ranks)."""
    run_path = Path(run_path)
    set_peft_model_state_dict(model, load_file(run_path / "adapter" / "adapter_model.safetensors"))
    r = json.loads((run_path / DP_RESULT).read_text())
    return PipelineResult(cfg.PIPELINE, None, [], read_log(run_path), r["seconds"], r["sft_steps"],
                          r["iterations"], r["samples_seen"], r["resumed"])


def run_pipeline_parallel(num_processes: int, model, tokenizer, train_pairs, reward_fn, run_path, cfg, *,
                          run_fn, embedder=None, port: int = 0):
    """run_fn (the notebook's run_pipeline) on `num_processes` ranks of this machine, started by accelerate's
    notebook_launcher (forked from this kernel, so the model in memory is each rank's copy; on CPUs only: CUDA
    cannot be forked once used, so GPUs use `make train-dp`). `port`: the rendezvous port (0: a free one).
    Interrupting the cell interrupts the ranks too: in the RL stage they stop together, rank 0 saves, and this
    returns launched_pipeline, as the one-process run returns after Ctrl-C; in the SFT stage KeyboardInterrupt."""
    from accelerate import notebook_launcher
    wait_through_interrupts(notebook_launcher, train_rank,
                            (run_fn, model, tokenizer, train_pairs, reward_fn, run_path, cfg, embedder),
                            num_processes=num_processes, use_port=str(port or free_port()), master_addr="127.0.0.1")
    return launched_pipeline(model, run_path, cfg)


def wait_through_interrupts(fn, *args, **kwargs) -> None:
    """fn(*args, **kwargs) in a thread while this (main) thread waits: a Ctrl-C here is noted, not raised, because
    the ranks fn launched got it too and are saving (a launcher in the main thread would install torch elastic's
    SIGINT handler, which kills them). Re-raises fn's error; as KeyboardInterrupt after a Ctrl-C."""
    outcome, done, interrupted = {}, threading.Event(), False

    def target():
        try:
            fn(*args, **kwargs)
        except BaseException as error:  # handed to the waiting thread
            outcome["error"] = error
        finally:
            done.set()
    threading.Thread(target=target, name="rlft-launcher", daemon=True).start()
    while not done.is_set():
        try:  # not Thread.join: a Ctrl-C inside it can mark a running thread as ended (Python 3.11)
            done.wait(0.5)
        except KeyboardInterrupt:
            if not interrupted:
                print("\ninterrupted: the ranks stop together and rank 0 saves; waiting for them", flush=True)
            interrupted = True
    if "error" in outcome:
        if interrupted:
            raise KeyboardInterrupt("the data-parallel run was interrupted") from outcome["error"]
        raise outcome["error"]


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
