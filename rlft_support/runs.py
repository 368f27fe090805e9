"""Run folders, checkpoints, resume, RNG streams, the training log and the caches of rlft.ipynb (its plumbing;
the notebook's section 8 says what a checkpoint holds and why). Never imports the notebook: `state` is the
notebook's PPOState (policy, value_head, optimizer, scheduler, scaler, reward_stats, kl_ctl, counters, iteration,
cfg, anchor, dp) and `sampler` its PromptSampler (seed, state_dict, load_state_dict), both handed in."""
from __future__ import annotations

import contextlib, copy, dataclasses, errno, json, math, os, random, re, shutil, signal, threading, time, warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

try:
    import fcntl  # the run-folder lock (POSIX); elsewhere runs are not locked
except ImportError:  # pragma: no cover
    fcntl = None


CKPT_POINTER, LOG_NAME = "latest", "train_log.jsonl"
CKPT_FILES = ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "value_head.safetensors",
              "training_state.pt", "state.json", LOG_NAME)  # a checkpoint is complete when all of these exist


RUN_OUTPUTS = (CKPT_POINTER, LOG_NAME, "adapter", "train_curves.png", "phase_times.png", "after_eval.json")  # + ckpt-*: a run's output
SFT_ADAPTER, PIPELINE_META = "sft_adapter", "pipeline.json"
PIPELINE_OUTPUTS = (SFT_ADAPTER, PIPELINE_META, "pipeline_result.json")  # the pipeline's files in RUN_DIR, besides
# train_loop's (pipeline_result.json: DP_RESULT, written by a data-parallel run)


class CheckpointError(FileNotFoundError, ValueError):
    """A checkpoint, or the `latest` pointer, that cannot be used: missing, incomplete, corrupt or of another
    model. The message names the file. Both an OSError and a ValueError, so callers that skip bad folders catch it."""


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states, in types `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                   *map(float, np_state[2:])], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of `rng_state`."""
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng():
    """Run a block (e.g. an evaluation) without disturbing the training RNG streams."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def save_atomically(out: Path, save) -> Path:
    """Run `save(tmp)` (tmp: a path beside `out`, for a file or a folder), then move tmp to `out` with one
    os.replace, so a killed run leaves the old `out` or the new one, never half of one. The one atomic write:
    folders (adapters), JSON (write_json_atomic), the log (write_log) and the reward-data cache go through it."""
    out = Path(out)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    shutil.rmtree(out, ignore_errors=True)  # a folder cannot be replaced while it holds files; a file can
    os.replace(tmp, out)
    return out


def write_text_synced(path: Path, text: str) -> None:
    """Write `text` to `path` and fsync it, so it is on disk before anything (a rename, a pointer) relies on it."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then the folders themselves (their entries), deepest first."""
    paths = sorted(Path(folder).rglob("*"), key=lambda q: len(q.parts), reverse=True) + [Path(folder)]
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to path via a temporary file and one os.replace (never half-written)."""
    save_atomically(path, lambda tmp: write_text_synced(tmp, json.dumps(obj)))


def checkpoint_meta(state, sampler) -> dict:
    """The JSON part of a checkpoint (a copy): iteration, counters, reward statistics, β, sampler, config."""
    meta = {"iteration": state.iteration, "counters": state.counters, "reward_stats": state.reward_stats.state_dict(),
            "kl_beta": state.kl_ctl.beta, "sampler": sampler.state_dict(), "config": dataclasses.asdict(state.cfg)}
    if state.comm.world > 1:  # a data-parallel run resumes only with as many ranks (checkpoint_mismatch)
        meta["processes"] = state.comm.world
    return copy.deepcopy(meta)


def write_checkpoint_files(folder: Path, state, sampler, logs: list[dict]) -> None:
    """Every file of one checkpoint (CKPT_FILES), into `folder` (created fresh). A failed write (a full disk
    makes torch.save say 'unexpected pos 64 vs 0') is an OSError naming the folder and the disk's free space."""
    shutil.rmtree(folder, ignore_errors=True)  # a half-written folder left by a crash
    folder.mkdir(parents=True)
    try:
        write_checkpoint_parts(folder, state, sampler, logs)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(folder, ignore_errors=True)  # no half checkpoint left behind
        free = shutil.disk_usage(folder.parent).free / 1e6
        raise OSError(f"could not write checkpoint {folder} ({type(e).__name__}: {e}); {free:.0f} MB free on its "
                      "disk: free some space (the previous checkpoint is kept)") from e


def write_checkpoint_parts(folder: Path, state, sampler, logs: list[dict]) -> None:
    """The files of one checkpoint, into the existing `folder`."""
    state.policy.save_pretrained(folder / "adapter")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.value_head.state_dict().items()},
              folder / "value_head.safetensors")
    torch.save({"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
                "scaler": state.scaler.state_dict(), "rng": rng_state()}, folder / "training_state.pt")
    (folder / "state.json").write_text(json.dumps(checkpoint_meta(state, sampler)))
    (folder / LOG_NAME).write_text("".join(json.dumps(r) + "\n" for r in logs))


def save_checkpoint(run_path: Path, state, sampler, logs: list[dict], keep: int = 2) -> Path:
    """Write ckpt-NNNNNN/, then move the `latest` pointer onto it (os.replace), then keep only the last `keep`."""
    run_path = Path(run_path)
    name = f"ckpt-{state.iteration:06d}"
    write_checkpoint_files(run_path / name, state, sampler, logs)
    fsync_tree(run_path / name)  # on disk before the pointer names it (a power cut leaves the older one)
    write_json_atomic(run_path / CKPT_POINTER, {"checkpoint": name})
    done = sorted(p for p in run_path.glob("ckpt-*") if p.is_dir() and p.name <= name)
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return run_path / name


def pointer_name(run_path: Path) -> str | None:
    """The checkpoint folder name in run_path/latest, or None when there is no pointer. CheckpointError when
    the pointer is unreadable or names something other than a ckpt-NNNNNN folder beside it."""
    pointer = Path(run_path) / CKPT_POINTER
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{pointer} is not a checkpoint pointer ({type(e).__name__}: {e})") from e
    if not isinstance(name, str) or not re.fullmatch(r"ckpt-\d{6,}", name):
        raise CheckpointError(f"{pointer} names {name!r}, not a ckpt-NNNNNN folder")
    return name


def is_complete(folder: Path) -> bool:
    """Whether every file of a checkpoint (CKPT_FILES) exists in `folder`."""
    return all((Path(folder) / f).exists() for f in CKPT_FILES)


def latest_checkpoint(run_path: Path) -> Path | None:
    """The checkpoint the `latest` pointer names, or None when there is no pointer. Raises CheckpointError
    (a FileNotFoundError and a ValueError) naming the pointer when it is unreadable or names a missing or
    incomplete checkpoint."""
    name = pointer_name(run_path)
    if name is None:
        return None
    folder = Path(run_path) / name
    if not is_complete(folder):
        missing = next(f for f in CKPT_FILES if not (folder / f).exists())
        raise CheckpointError(f"{Path(run_path) / CKPT_POINTER} names {name}, which is missing or incomplete "
                              f"(no {missing})")
    return folder


def capture(state, sampler, logs: list[dict]) -> dict:
    """An in-memory checkpoint: copies of everything a checkpoint holds, in the layout `read_checkpoint`
    returns, so `apply_checkpoint` restores it (the training loop takes one at the start of every iteration)."""
    training = copy.deepcopy({"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
                              "scaler": state.scaler.state_dict()})
    return {"adapter": {k: v.detach().clone() for k, v in get_peft_model_state_dict(state.policy).items()},
            "value_head": {k: v.detach().clone() for k, v in state.value_head.state_dict().items()},
            "training": {**training, "rng": rng_state()}, "meta": checkpoint_meta(state, sampler), "logs": list(logs)}


def read_log_file(path: Path, torn_tail_ok: bool = False) -> list[dict]:
    """The records of one JSONL log file. `torn_tail_ok`: a last line cut short (a full disk or a kill while it
    was written) is reported with file:line and left out (the run's log: a resumed run rewrites it without that
    line); otherwise, and for any bad line before the last, ValueError naming file:line."""
    lines, records = Path(path).read_text().splitlines(), []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as e:
            if not torn_tail_ok or any(rest.strip() for rest in lines[n:]):
                raise ValueError(f"{path}:{n}: not a JSON log line ({e})") from e
            warnings.warn(f"{path}:{n}: torn last line ({len(line)} characters: {e}); left out")
    return records


CKPT_READERS = (("adapter", "adapter/adapter_model.safetensors", load_file),
                ("value_head", "value_head.safetensors", load_file),
                ("training", "training_state.pt", lambda p: torch.load(p, weights_only=True, map_location="cpu")),
                ("meta", "state.json", lambda p: json.loads(p.read_text())), ("logs", LOG_NAME, read_log_file))


def checkpoint_mismatch(data: dict, state) -> str | None:
    """Why checkpoint `data` (read_checkpoint's layout) cannot be applied to `state`, or None: the LoRA and
    value-head tensors must have this model's names and shapes, and the two states their keys."""
    shapes = lambda tensors: {k: tuple(v.shape) for k, v in tensors.items()}
    for key, name, own in (("adapter", "adapter/adapter_model.safetensors", get_peft_model_state_dict(state.policy)),
                           ("value_head", "value_head.safetensors", state.value_head.state_dict())):
        if shapes(data[key]) != shapes(own):
            return f"{name} holds other tensors than this model's (another model or LoRA configuration?)"
        bad = sorted(k for k, v in data[key].items() if v.is_floating_point() and not torch.isfinite(v).all())
        if bad:
            return f"{name} holds non-finite weights ({bad[0]}{' and more' if len(bad) > 1 else ''})"
    for key, name, keys in (("training", "training_state.pt", ("optimizer", "scheduler", "scaler", "rng")),
                            ("meta", "state.json", ("iteration", "counters", "reward_stats", "kl_beta", "sampler"))):
        if not isinstance(data[key], dict) or not all(k in data[key] for k in keys):
            return f"{name} lacks one of {keys}"
    saved, now = data["meta"].get("processes", 1), state.comm.world
    if saved != now:
        return (f"state.json was written by a run of {saved} data-parallel processes and this run has {now}: resume "
                f"with NUM_PROCESSES / N = {saved} (the batch split, the ranks' RNG streams and the log depend on it)")
    return None


def read_checkpoint(folder: Path, state) -> dict:
    """Every part of one checkpoint read into memory and checked against `state`; nothing is applied yet.
    Raises CheckpointError naming the checkpoint and the file that is missing, corrupt or of another model."""
    folder, data = Path(folder), {}
    for key, name, read in CKPT_READERS:
        try:
            data[key] = read(folder / name)
        except Exception as e:
            raise CheckpointError(f"checkpoint {folder}: {name} is missing or corrupt ({type(e).__name__}: {e})") from e
    problem = checkpoint_mismatch(data, state)
    if problem:
        raise CheckpointError(f"checkpoint {folder}: {problem}")
    return data


def apply_checkpoint(data: dict, state, sampler) -> list[dict]:
    """Copy checkpoint `data` (from read_checkpoint or capture) into `state`, `sampler` and the RNGs.
    Returns its log."""
    set_peft_model_state_dict(state.policy, data["adapter"])
    state.value_head.load_state_dict(data["value_head"])
    device, saved, meta = next(state.value_head.parameters()).device, data["training"], data["meta"]
    state.optimizer.load_state_dict(saved["optimizer"])
    for group in state.optimizer.state.values():  # optimizer moments live beside their parameters
        for k, v in group.items():
            if torch.is_tensor(v) and k != "step":
                group[k] = v.to(device)
    state.scheduler.load_state_dict(saved["scheduler"])
    state.scaler.load_state_dict(saved["scaler"])
    state.iteration, state.counters = meta["iteration"], dict(meta["counters"])
    state.reward_stats.load_state_dict(meta["reward_stats"])
    state.kl_ctl.beta = meta["kl_beta"]
    sampler.load_state_dict(meta["sampler"])
    set_rng_state(saved["rng"])
    return list(data["logs"])


def load_checkpoint(folder: Path, state, sampler) -> list[dict]:
    """Restore everything `write_checkpoint_files` saved into `state` and `sampler`, all or nothing: every file
    is read and checked first, and a failure while applying rolls everything back. Raises CheckpointError
    naming the bad file (the state is then unchanged). Returns the log so far."""
    data = read_checkpoint(folder, state)
    before = capture(state, sampler, [])
    try:
        return apply_checkpoint(data, state, sampler)
    except Exception as e:
        apply_checkpoint(before, state, sampler)
        raise CheckpointError(f"checkpoint {folder} does not fit this run ({type(e).__name__}: {e}); "
                              "nothing was changed") from e


def checkpoint_due(iteration: int, ckpt_every: int, ckpt_every_s: float, since_last_s: float) -> bool:
    """Checkpoint after this iteration? Every `ckpt_every` iterations, or once `ckpt_every_s` seconds have passed
    since the last checkpoint (either rule 0 = off; both 0: only on an interrupt)."""
    by_count = ckpt_every > 0 and iteration % ckpt_every == 0
    return by_count or (ckpt_every_s > 0 and since_last_s >= ckpt_every_s)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP while training (a scheduler, `timeout`, `docker stop`, a closed terminal): handled like
    Ctrl-C (the last completed iteration is saved), then the process exits with status 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(f"{signal.Signals(signum).name} received")
        self.signum = signum


TERMINATING_SIGNALS = ("SIGTERM", "SIGHUP")


def _terminate(signum, frame):
    raise Terminated(signum)


LOCK_NAME = ".lock"
_LOCKS: dict = {}  # run folder -> its open lock file, while this process holds the lock (re-entrant)


@contextlib.contextmanager
def run_lock(run_path: Path, writer: bool = True):
    """Hold an advisory lock on run_path (fcntl.flock on run_path/.lock, which dies with the process) while a run
    writes there; re-entrant within a process. Another process that wants it gets RuntimeError naming the
    folder and the holder's PID. A non-writer (a data-parallel rank > 0) takes none."""
    key = Path(run_path).resolve()
    if not writer or fcntl is None or key in _LOCKS:
        yield
        return
    key.mkdir(parents=True, exist_ok=True)
    f = open(key / LOCK_NAME, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise RuntimeError(f"{key} is in use by another run (PID {holder}); wait for it to end or stop it, or set "
                           "RUN_DIR to another folder") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _LOCKS[key] = f
    try:
        yield
    finally:
        del _LOCKS[key]
        f.close()  # releases the lock


class Checkpointing:
    """What the training loop does around each iteration, as a context manager:

        with Checkpointing(run_path, state, sampler, logs, cfg) as ckpt:
            while ...:
                ckpt.begin()                               # an in-memory copy (capture) of the state
                stats = train_iteration(..., ckpt.seconds)  # seconds: the checkpoint written just before it
                ckpt.end()                                 # the iteration is complete: save when checkpoint_due

    Ctrl-C or any exception inside the block: `save_on_interrupt` rolls a half-done iteration back to the copy and
    saves a checkpoint; the exception is re-raised, except a KeyboardInterrupt whose checkpoint was saved, which
    ends the block quietly. SIGTERM and SIGHUP are turned into `Terminated` inside the block (main thread only):
    saved like Ctrl-C, then SystemExit(128 + signal). `cfg`: the Config, read for
    CKPT_EVERY, CKPT_EVERY_S (0: off) and CKPT_KEEP. `writer`: this process writes files (False: a data-parallel
    rank > 0, which only rolls back)."""

    def __init__(self, run_path, state, sampler, logs: list[dict], cfg, writer: bool = True):
        self.run_path, self.state, self.sampler, self.logs, self.writer = Path(run_path), state, sampler, logs, writer
        self.every, self.every_s, self.keep = cfg.CKPT_EVERY, cfg.CKPT_EVERY_S, cfg.CKPT_KEEP
        self.snapshot, self.seconds, self.last = None, 0.0, time.time()

    def __enter__(self) -> Checkpointing:
        self.handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (getattr(signal, name) for name in TERMINATING_SIGNALS if hasattr(signal, name)):
                self.handlers[sig] = signal.signal(sig, _terminate)
        return self

    def begin(self) -> None:
        """The state as of the last completed iteration, kept until `end` (what an interrupt rolls back to)."""
        self.snapshot = capture(self.state, self.sampler, self.logs)

    def end(self) -> None:
        """The iteration is complete: drop the copy; save a checkpoint when due (`seconds`: what it took)."""
        self.snapshot, self.seconds, t1 = None, 0.0, time.time()
        if self.writer and checkpoint_due(self.state.iteration, self.every, self.every_s, t1 - self.last):
            save_checkpoint(self.run_path, self.state, self.sampler, self.logs, self.keep)
            self.last = time.time()
            self.seconds = self.last - t1  # logged in the next iteration's line

    def __exit__(self, kind, error, traceback) -> bool:
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)
        if not isinstance(error, (KeyboardInterrupt, Exception)):
            return False  # a normal end, or SystemExit and the like: nothing to save
        saved = save_on_interrupt(self.run_path, self.state, self.sampler, self.logs, self.keep,
                                  self.snapshot is not None, self.snapshot, error, self.writer)
        if saved and isinstance(error, Terminated):
            raise SystemExit(128 + error.signum) from error
        return saved and isinstance(error, KeyboardInterrupt)


def start_or_resume(run_path: Path, state, sampler, resume: bool, writer: bool = True) -> list[dict]:
    """resume: continue from the newest usable checkpoint (`resume_from`) and cut the log back to it. A fresh
    start, or a resume that finds no checkpoint, is a `fresh_start`. `writer`: this process writes the run's
    files (the one process, or rank 0 of a data-parallel run). Returns the log so far."""
    run_path = Path(run_path)
    if writer:
        run_path.mkdir(parents=True, exist_ok=True)
    logs = resume_from(run_path, state, sampler, writer) if resume else None
    if logs is None:
        if resume:
            print(f"RESUME: no checkpoint in {run_path}; starting fresh")
        fresh_start(run_path, state, sampler.seed, writer)
        logs = []
    if writer:
        write_log(run_path, logs)
    return logs


def resume_candidates(run_path: Path) -> list[Path]:
    """The checkpoints to resume from, best first: the one `latest` names, then the complete older ones,
    newest first. A `latest` that names a missing or incomplete checkpoint is skipped with a warning."""
    name = pointer_name(run_path)
    if name is None:
        return []
    try:
        first = [latest_checkpoint(run_path)]
    except CheckpointError as e:
        warnings.warn(f"{e}; trying the older checkpoints")
        first = []
    older = [p for p in sorted(run_path.glob("ckpt-*"), reverse=True) if p.name < name and is_complete(p)]
    return first + older


def resume_from(run_path: Path, state, sampler, writer: bool = True) -> list[dict] | None:
    """Load the newest usable checkpoint (all or nothing each); a bad one is named in a warning and the next
    one tried. Returns its log; None when the run folder has no `latest`; CheckpointError when none is usable."""
    bad = []
    for folder in resume_candidates(run_path):
        try:
            logs = load_checkpoint(folder, state, sampler)
        except CheckpointError as e:
            warnings.warn(f"{e}; trying the previous checkpoint")
            bad.append(folder.name)
            continue
        if folder.name != pointer_name(run_path) and writer:  # `latest` moves back onto it
            write_json_atomic(run_path / CKPT_POINTER, {"checkpoint": folder.name})
        skipped = f" (skipped the unusable {', '.join(bad)})" if bad else ""
        print(f"resumed from {folder} at iteration {state.iteration}{skipped}")
        return logs
    if pointer_name(run_path) is None:
        return None
    raise CheckpointError(f"RESUME: no usable checkpoint in {run_path} (tried {', '.join(bad) or 'none complete'}); "
                          "RESUME = False starts afresh and moves this run aside")


def fresh_start(run_path: Path, state, seed: int, writer: bool = True) -> None:
    """A fresh run: refuse a PPOState that has already trained; move an earlier run's output aside (never
    deleted); re-initialise the adapter if it was already trained (e.g. by an earlier run in this kernel)."""
    if state.iteration:
        raise ValueError(f"this PPOState has already run {state.iteration} iterations: make a new one with "
                         "make_ppo_state for a fresh run, or pass resume=True to continue from its checkpoint")
    moved = move_previous_run(run_path) if writer else None
    if moved is not None:
        print(f"fresh run (RESUME = False): moved the previous run's checkpoints, log and outputs to {moved}")
    if reset_trained_adapter(state.policy, seed):
        print(f"fresh run: the adapter was already trained (an earlier run in this kernel?); re-initialised "
              f"its LoRA weights (seed {seed}, B = 0)")


def move_previous_run(run_path: Path) -> Path | None:
    """Move an earlier run's checkpoints, pointer, log and final outputs (RUN_OUTPUTS) into a new
    run_path/previous-<time>/; the run's inputs (caches, reward model, base evaluation) stay. Returns that
    folder, or None when there was nothing to keep (no such files, or only an empty log)."""
    items = sorted(run_path.glob("ckpt-*")) + [run_path / n for n in RUN_OUTPUTS if (run_path / n).exists()]
    if not any(p.name != LOG_NAME or p.stat().st_size > 0 for p in items):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = run_path / f"previous-{stamp}", 1
    while target.exists():
        n += 1
        target = run_path / f"previous-{stamp}-{n}"
    target.mkdir()
    for path in items:
        os.replace(path, target / path.name)
    return target


def reset_lora(model, seed: int) -> int:
    """Re-initialise every LoRA pair in place as peft 0.21 does at creation (`LoraLayer.reset_lora_parameters`,
    init_lora_weights=True): A [r, in] Kaiming-uniform (a = √5), drawn in module order from a CPU generator seeded
    with `seed`; B [out, r] (and a LoRA bias) zero. The model then equals its base again, and one seed always
    gives the same adapter. Returns the number of pairs reset."""
    gen, count = torch.Generator().manual_seed(seed), 0
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            for name in module.lora_A:
                weight = module.lora_A[name].weight
                fresh = torch.empty(weight.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)
                weight.copy_(fresh)
                module.lora_B[name].weight.zero_()
                if module.lora_B[name].bias is not None:
                    module.lora_B[name].bias.zero_()
                count += 1
    return count


def reset_trained_adapter(policy, seed: int) -> bool:
    """If any LoRA B matrix is non-zero (the adapter has been trained), `reset_lora(policy, seed)`. Returns
    whether it did."""
    layers = [m for m in policy.modules() if isinstance(m, LoraLayer)]
    if not any(bool(m.lora_B[a].weight.detach().any()) for m in layers for a in m.lora_B):
        return False
    reset_lora(policy, seed)
    return True


def save_on_interrupt(run_path, state, sampler, logs, keep: int, mid_iteration: bool, snapshot: dict | None = None,
                      error: BaseException | None = None, writer: bool = True) -> bool:
    """Ctrl-C or an exception (`error`): roll a half-done iteration back to `snapshot` (taken at its start, so
    the state, the model in memory and the log are as the last completed iteration left them), then save a
    checkpoint unless `latest` already holds that iteration. If that fails, `error` gets a note saying so and
    False is returned (the caller re-raises `error`); without an `error` the failure propagates."""
    what = "interrupted" if error is None or isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}"
    what = f"{error}" if isinstance(error, Terminated) else what
    where = "mid-iteration (its half-done update is dropped)" if mid_iteration else "between iterations"
    try:
        if mid_iteration and snapshot is not None:
            apply_checkpoint(snapshot, state, sampler)
            del logs[len(snapshot["logs"]):]
        name = f"ckpt-{state.iteration:06d}"
        done = f"checkpoint {name} is already saved" if writer else "rank 0 saves the checkpoint"
        if writer and current_pointer(run_path) != name:
            done = f"saved {save_checkpoint(run_path, state, sampler, logs, keep)}"
        if writer:
            write_log(run_path, logs)
    except Exception as save_error:
        if error is None:
            raise
        error.add_note(f"rlft: saving a checkpoint after this error failed too ({type(save_error).__name__}: "
                       f"{save_error}); the last periodic checkpoint in {run_path}, if any, is intact")
        return False
    print(f"\n{what} {where}: {done} (iteration {state.iteration}); RESUME = True continues from there")
    return True


def current_pointer(run_path: Path) -> str | None:
    """pointer_name, or None when the pointer is missing or unreadable (it is about to be rewritten)."""
    try:
        return pointer_name(run_path)
    except CheckpointError:
        return None


def write_log(run_path: Path, logs: list[dict]) -> None:
    """(Re)write the JSONL log from `logs` (a resumed run drops lines written after its checkpoint)."""
    save_atomically(Path(run_path) / LOG_NAME,
                    lambda tmp: write_text_synced(tmp, "".join(json.dumps(r) + "\n" for r in logs)))


def append_log(run_path: Path, record: dict) -> None:
    """Append one line to the log, whole: one write() of the encoded line; a write cut short (a full disk) is
    undone (the file cut back to its length before) and raised, so the log never keeps a torn line."""
    path, data = Path(run_path) / LOG_NAME, (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"{path}: only {written} of {len(data)} bytes written")
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def read_log(run_path) -> list[dict]:
    """The records of run_path/train_log.jsonl."""
    path = Path(run_path) / LOG_NAME
    return read_log_file(path, torn_tail_ok=True) if path.exists() else []


LOG_FIELDS = ("iteration", "score", "similarity", "reward_gap", "kl_ref", "entropy", "clip_frac", "approx_kl",
              "value_loss", "explained_variance", "response_len", "eos_rate", "tokens_per_s", "seconds",
              "skipped_reward", "skipped_loss", "skipped_grad")


def log_record(stats: dict, metrics: dict, elapsed: float) -> dict:
    """One JSON-able log line: every PPO statistic, the extra metrics (e.g. the true similarity) and the gap."""
    record = {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in {**stats, **metrics}.items()}
    if "similarity" not in record:
        record["similarity"] = float("nan")
    record["reward_gap"] = record["score"] - record["similarity"]
    record["elapsed_s"] = elapsed
    return record


BAR_FORMAT = "{desc}{percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}"


def run_fraction(done: int, iterations_left: int, elapsed: float, budget_s: float) -> tuple[float, str]:
    """How far this call is towards the limit that will stop it first -> (fraction in [0, 1], that limit's name):
    `done` of the `iterations_left` it started with, or `elapsed` of `budget_s` seconds, whichever is further."""
    by_iterations = done / iterations_left if iterations_left > 0 else 1.0
    by_time = elapsed / budget_s if budget_s > 0 else 1.0
    if by_time > by_iterations:
        return min(by_time, 1.0), f"{budget_s:.0f} s budget" if budget_s >= 1 else f"{budget_s:.1f} s budget"
    return min(by_iterations, 1.0), f"{iterations_left} iterations"


def show_progress(bar, state, start: int, max_iterations: int, elapsed: float, budget_s: float,
                  stats: dict | None = None, done: bool = False) -> None:
    """Move the bar to this call's progress towards whichever limit stops it (100% when the loop ended normally);
    the postfix shows the iteration count, the reward, the KL and the seconds per iteration."""
    fraction, limit = run_fraction(state.iteration - start, max_iterations - start, elapsed, budget_s)
    bar.set_description(f"PPO ({limit})", refresh=False)
    if stats is not None:
        bar.set_postfix(it=f"{state.iteration}/{max_iterations}", reward=f"{stats['score']:.2f}",
                        kl=f"{stats['kl_ref']:.3f}", s_it=f"{stats['seconds']:.1f}", refresh=False)
    bar.update((1.0 if done else fraction) * 100 - bar.n)


def archive_run(run_path: Path) -> Path | None:
    """A fresh run's first step: `move_previous_run` moves an earlier run's checkpoints, log and
    outputs aside, never deleting them; the pipeline's own files (PIPELINE_OUTPUTS) follow into the same folder.
    Returns that folder, or None when there was nothing to move."""
    target = move_previous_run(run_path)
    mine = [run_path / name for name in PIPELINE_OUTPUTS if (run_path / name).exists()]
    if mine and target is None:
        target = run_path / f"previous-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        target.mkdir(parents=True)
    for path in mine:
        os.replace(path, Path(target) / path.name)
    return target


def load_sft_anchor(model, run_path: Path) -> None:
    """Put the saved SFT adapter (run_path/sft_adapter) into the model's LoRA, for `set_kl_anchor` to snapshot.
    A missing or corrupt file is a CheckpointError naming it (RL's KL anchor cannot be rebuilt without it)."""
    path = Path(run_path) / SFT_ADAPTER / "adapter_model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"RESUME with KL_ANCHOR='sft' needs {path.parent}, the adapter the SFT stage saved")
    try:
        tensors = load_file(path)
    except Exception as e:
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e}): RL's KL anchor, the SFT adapter, cannot be "
                              "rebuilt; RESUME = False starts afresh (this run is moved aside, never deleted)") from e
    set_peft_model_state_dict(model, tensors)


def read_pipeline_meta(run_path: Path) -> dict:
    """run_path/pipeline.json (write_pipeline_meta), or {} when it is missing; an unreadable one (truncated,
    not a JSON object) is named in a warning and read as {}: RESUME then counts no SFT seconds and takes PIPELINE
    and KL_ANCHOR from the Config."""
    path = Path(run_path) / PIPELINE_META
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON {type(meta).__name__}, not an object")
        return meta
    except (OSError, ValueError) as e:
        warnings.warn(f"{path} is unreadable ({e}); resuming with PIPELINE and KL_ANCHOR from the parameters and no "
                      "SFT seconds counted against the budget")
        return {}


def write_pipeline_meta(run_path: Path, cfg, sft_seconds: float, sft_logs: list[dict]) -> None:
    """run_path/pipeline.json: what the SFT stage did (PIPELINE, its seconds and steps, the step whose adapter was
    kept, KL_ANCHOR), which `resume_plan` reads back. `cfg`: the Config."""
    write_json_atomic(Path(run_path) / PIPELINE_META, {
        "pipeline": cfg.PIPELINE, "sft_seconds": sft_seconds, "budget_s": cfg.TRAIN_BUDGET_S,
        "sft_steps": len(sft_logs), "sft_restored_step": sft_logs[-1].get("restored_step") if sft_logs else None,
        "kl_anchor": cfg.KL_ANCHOR})


def resume_plan(run_path: Path, cfg, t0: float | None = None) -> tuple[float, bool, int]:
    """RESUME of a pipeline with an RL checkpoint: SFT is skipped (pipeline.json says what it did) and RL goes on
    for what is left of TRAIN_BUDGET_S: the budget − the SFT seconds − the seconds of the RL iterations already
    run (the run's log: time spent, even on iterations after the checkpoint, which RL repeats). -> (deadline:
    time.time() seconds, counted from `t0`, default now; anchor: whether RL's KL is anchored to the SFT adapter,
    which `load_sft_anchor` then puts back; sft_steps: the run's SFT steps)."""
    run_path, t0 = Path(run_path), time.time() if t0 is None else t0
    meta = read_pipeline_meta(run_path)
    anchor = (meta.get("pipeline", cfg.PIPELINE) == "sft+rl"
              and meta.get("kl_anchor", cfg.KL_ANCHOR) == "sft")
    spent = meta.get("sft_seconds", 0.0) + sum(r.get("seconds", 0.0) for r in read_log(run_path))
    return t0 + cfg.TRAIN_BUDGET_S - spent, anchor, meta.get("sft_steps", 0)


@dataclasses.dataclass
class PipelineResult:
    """What `run_pipeline` returns."""
    pipeline: str
    state: object  # the PPOState of the RL stage (None for "sft")
    sft_logs: list  # sft_train's log ([] when SFT was skipped or resumed past)
    rl_logs: list  # train_loop's log (the notebook's `train_logs`)
    seconds: dict  # {"sft": s, "rl": s, "total": s} of this call
    sft_steps: int  # SFT steps of the run (a resumed run: read from pipeline.json)
    iterations: int  # RL iterations of the run, in total
    samples_seen: int  # SFT examples + RL responses
    resumed: bool
    bok_logs: list = dataclasses.field(default_factory=list)  # "sft+bok": the best-of-K stage's log (bok_train)


def pipeline_result(cfg, state, sft_logs, rl_logs, sft_steps: int, t_sft: float, t0: float,
                    resumed: bool, bok_logs: list | None = None) -> PipelineResult:
    """Assemble the PipelineResult (samples_seen = SFT steps × SFT_BATCH_SIZE + RL iterations × PPO_BATCH_SIZE
    + best-of-K steps × BOK_PROMPTS_PER_STEP × BOK_SAMPLES; seconds "rl": the stage after SFT, RL or best-of-K)."""
    iterations, bok_logs = (state.iteration if state is not None else 0), bok_logs or []
    total = time.time() - t0
    seen = sft_steps * cfg.SFT_BATCH_SIZE + iterations * cfg.PPO_BATCH_SIZE
    seen += len(bok_logs) * cfg.BOK_PROMPTS_PER_STEP * cfg.BOK_SAMPLES
    return PipelineResult(cfg.PIPELINE, state, sft_logs, rl_logs, {"sft": t_sft, "rl": total - t_sft, "total": total},
                          sft_steps, iterations, seen, resumed, bok_logs)


def anchor_state_dict(state) -> dict[str, torch.Tensor]:
    """The anchor as CPU tensors for a checkpoint (e.g. safetensors' save_file); {} when π_ref is the base."""
    return {k: v.detach().cpu().contiguous() for k, v in (state.anchor or {}).items()}


def load_anchor(state, tensors: dict[str, torch.Tensor] | None) -> None:
    """Inverse of anchor_state_dict: an empty dict / None means π_ref = the base model. The names and shapes
    must be this policy's LoRA tensors (ValueError otherwise); values move to each parameter's device/dtype."""
    if not tensors:
        state.anchor = None
        return
    live = {name: p for name, p in state.policy.named_parameters() if "lora_" in name}
    if set(tensors) != set(live):
        missing, extra = sorted(set(live) - set(tensors)), sorted(set(tensors) - set(live))
        raise ValueError(f"anchor does not fit this adapter: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, t in tensors.items():
        if t.shape != live[name].shape:
            raise ValueError(f"anchor tensor {name}: shape {tuple(t.shape)}, the adapter has {tuple(live[name].shape)}")
    state.anchor = {name: t.to(live[name].device, live[name].dtype).clone() for name, t in tensors.items()}


def data_key(pairs: list[dict], **settings) -> str:
    """A short hash of the pairs and the settings that produced a reward-model data set (the cache key)."""
    import hashlib
    blob = json.dumps([[p["prompt"], p["reference"]] for p in pairs] + [settings], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


REWARD_DATA_FORMAT = "rlft-reward-data-1"
REWARD_DATA_TENSORS = {"prompt_id": 1, "label": 1, "temperature": 1, "prompt_emb": 2, "response_emb": 2}  # name: ndim
REWARD_DATA_TEXTS = ("prompts", "responses", "kind")


def save_reward_data(data: dict, path: str | Path) -> None:
    """Write a reward-model data set as one safetensors file (tensors; the texts and the key as JSON metadata),
    atomically. Never a pickle: loading it back runs no code."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: data[k].detach().cpu().contiguous() for k in REWARD_DATA_TENSORS}
    meta = {"format": REWARD_DATA_FORMAT, "key": data["key"],
            "texts": json.dumps({k: list(data[k]) for k in REWARD_DATA_TEXTS})}
    save_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_reward_data(path: str | Path, key: str) -> dict | None:
    """The cached data set at `path` if it is a valid safetensors cache written for `key`, else None (a foreign,
    corrupt or pickled file is reported and ignored; its contents are only parsed as data, never executed)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != REWARD_DATA_FORMAT or meta.get("key") != key:
                return None  # another format, or other settings: recompute
            if set(f.keys()) != set(REWARD_DATA_TENSORS):
                raise ValueError(f"tensors {sorted(f.keys())}, expected {sorted(REWARD_DATA_TENSORS)}")
            data = {k: f.get_tensor(k) for k in REWARD_DATA_TENSORS}
        texts = json.loads(meta["texts"])
        data |= {k: texts[k] for k in REWARD_DATA_TEXTS}
        n = len(data["prompts"])
        if any(len(data[k]) != n or not all(isinstance(t, str) for t in data[k]) for k in REWARD_DATA_TEXTS) or \
                any(data[k].ndim != d or data[k].shape[0] != n for k, d in REWARD_DATA_TENSORS.items()):
            raise ValueError("inconsistent lengths or types")
    except Exception as e:  # SafetensorError (e.g. an old torch.save pickle), bad JSON, missing or bad fields
        warnings.warn(f"{path} is not a valid reward-data cache ({type(e).__name__}: {e}); ignoring it and "
                      "regenerating the data")
        return None
    return data | {"key": key, "cached": True}
