"""Issue 21: data-parallel RL throughput on this machine: 1 process x 2 threads, 1 process x 1 thread and
2 processes x 1 thread (gloo, through accelerate), the same total batch (PPO_BATCH_SIZE responses per iteration).

Each measurement is a fresh set of processes (parallel.launch_local), each rank with its own model, embedder and
similarity reward (REWARD_FN "similarity": the MLP would add only its fit), running the notebook's own
`run_iteration` (rollout of its share of the prompts, advantages, update with the gradients all-reduced).
One warm-up iteration, then --iters measured ones, each timed between barriers on rank 0; then the SFT stage's
step (`sft_step`, SFT_BATCH_SIZE references split over the ranks) the same way, one warm-up and --sft-steps
measured. The three settings are alternated over --rounds rounds (order reversed every other round).
samples/s = PPO_BATCH_SIZE (SFT: SFT_BATCH_SIZE) / the median seconds per iteration (step) over all measured
iterations (steps) of a setting.

    .venv/bin/python benchmarks/data_parallel.py --rounds 3 --iters 3          # the lead's run, alone on the machine
    .venv/bin/python benchmarks/data_parallel.py --params tests/tiny_params.json --rounds 1 --iters 1 --out /tmp/dp_smoke

Writes <out>.json (samples_per_s_1p2t, samples_per_s_1p1t, samples_per_s_2p1t, speedup_2p_vs_1p1t, the same
with sft_ in front for the SFT step, allreduce_bytes_per_step, allreduce_bytes_per_iteration, per-setting
seconds, the CPU, loadavg before/after) and <out>.md.
"""
from __future__ import annotations

import dataclasses
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from nbimport import load_notebook  # noqa: E402
from rlft_support import parallel  # noqa: E402
from ppo_seeds import cpu_name, notebook_config, overrides_of, write_report  # noqa: E402

SETTINGS = {"1p2t": (1, 2), "1p1t": (1, 1), "2p1t": (2, 1)}  # name: (processes, threads per process)


def timed(fn, n: int, barrier) -> list[float]:
    """fn() 1 + n times, each between barriers; the seconds of the last n (the first is the warm-up)."""
    seconds = []
    for i in range(1 + n):
        barrier()
        t0 = time.perf_counter()
        fn()
        barrier()
        if i > 0:
            seconds.append(time.perf_counter() - t0)
    return seconds


def rank_run(P: dict, iters: int, sft_steps: int, seed: int, out: str) -> None:
    """One rank (or the single process): warm-up + `iters` timed RL iterations, then warm-up + `sft_steps` timed
    SFT steps -> rank 0 writes `out` (JSON)."""
    import torch
    nb = load_notebook()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = None
    if world > 1:
        from accelerate import Accelerator
        accelerator = Accelerator(cpu=True)
    device = torch.device("cpu")
    nb.seed_everything(seed)
    base, tok = nb.load_base(P.MODEL, P.CACHE_DIR, device, torch.float32, seed=seed)
    model = nb.add_lora(base, P.LORA_R, P.LORA_ALPHA, P.LORA_DROPOUT, P.LORA_TARGETS)
    state = nb.make_ppo_state(model, tok, P)
    if accelerator is not None:
        parallel.enable_data_parallel(state, accelerator, seed)
    pairs = nb.split_pairs(nb.load_pairs(str(ROOT / P.DATA_PATH), P.DATA_COLUMNS, P.EVAL_FRAC), "train")
    sampler = nb.PromptSampler(pairs, seed)
    reward_fn = nb.make_reward_fn("similarity", nb.Embedder(P.EMBEDDER, device=device), None, device=device)
    barrier = accelerator.wait_for_everyone if accelerator is not None else (lambda: None)
    seconds = timed(lambda: nb.run_iteration(state, sampler, reward_fn, None), iters, barrier)
    rl_bytes = state.comm.reduced_bytes
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, counters = torch.optim.AdamW(params, lr=P.SFT_LR), {}
    sft_seconds = timed(lambda: nb.sft_step(model, tok, sampler.next_batch(P.SFT_BATCH_SIZE), optimizer, params,
                                            P.MAX_GRAD_NORM, counters, state.comm), sft_steps, barrier)
    if accelerator is None or accelerator.is_main_process:
        Path(out).write_text(json.dumps({
            "seconds": seconds, "sft_seconds": sft_seconds, "bytes_per_step": parallel.allreduce_bytes_per_step(state),
            "reduced_bytes": rl_bytes, "sft_reduced_bytes": state.comm.reduced_bytes - rl_bytes,
            "sft_bytes_per_step": 4 * sum(p.numel() for p in params),
            "iterations": 1 + iters, "threads": torch.get_num_threads(), "world": world}))


def measure(P: dict, name: str, iters: int, sft_steps: int, seed: int, work: Path) -> dict:
    """One fresh launch of setting `name` -> rank 0's record."""
    processes, threads = SETTINGS[name]
    out = work / f"{name}-{time.time_ns()}.json"
    parallel.launch_local(rank_run, (P, iters, sft_steps, seed, str(out)), num_processes=processes, threads=threads)
    record = json.loads(out.read_text())
    print(f"{name}: " + " ".join(f"{s:.2f}" for s in record["seconds"]) + " s/iteration; SFT "
          + " ".join(f"{s:.2f}" for s in record["sft_seconds"]) + " s/step", flush=True)
    return record


def summarize(P: dict, records: dict[str, list[dict]], load_before, load_after, rounds: int, iters: int) -> dict:
    """The issue's fields from every setting's records (RL iterations, and the same with sft_ for SFT steps)."""
    batch = P.PPO_BATCH_SIZE
    seconds = {name: [s for r in recs for s in r["seconds"]] for name, recs in records.items()}
    sft_seconds = {name: [s for r in recs for s in r["sft_seconds"]] for name, recs in records.items()}
    rate = {name: batch / statistics.median(s) for name, s in seconds.items()}
    sft_rate = {name: P.SFT_BATCH_SIZE / statistics.median(s) for name, s in sft_seconds.items()}
    dp = records["2p1t"][0]
    steps = dp["reduced_bytes"] // dp["bytes_per_step"] // dp["iterations"] if dp["bytes_per_step"] else 0
    return {"model": P.MODEL, "batch_size": batch, "samples_per_prompt": P.PPO_SAMPLES_PER_PROMPT,
            "rounds": rounds, "iterations_measured_per_launch": iters,
            **{f"samples_per_s_{name}": rate[name] for name in SETTINGS},
            "speedup_2p_vs_1p1t": rate["2p1t"] / rate["1p1t"], "speedup_2p_vs_1p2t": rate["2p1t"] / rate["1p2t"],
            "sft_batch_size": P.SFT_BATCH_SIZE, **{f"sft_samples_per_s_{name}": sft_rate[name] for name in SETTINGS},
            "sft_speedup_2p_vs_1p1t": sft_rate["2p1t"] / sft_rate["1p1t"],
            "sft_speedup_2p_vs_1p2t": sft_rate["2p1t"] / sft_rate["1p2t"], "sft_seconds": sft_seconds,
            "cpu": cpu_name(),
            "allreduce_bytes_per_step": dp["bytes_per_step"], "optimizer_steps_per_iteration": steps,
            "allreduce_bytes_per_iteration": steps * dp["bytes_per_step"],
            "seconds": seconds, "loadavg_before": list(load_before), "loadavg_after": list(load_after)}


def markdown_report(r: dict) -> str:
    lines = ["# Data-parallel RL throughput (issue 21)", "",
             f"{r['model']}, {r['batch_size']} responses per iteration ({r['samples_per_prompt']} per prompt), "
             f"{r['rounds']} alternated rounds x {r['iterations_measured_per_launch']} measured iterations after one "
             f"warm-up per launch; load average (1 min) {r['loadavg_before'][0]:.2f} before, "
             f"{r['loadavg_after'][0]:.2f} after.", "",
             f"CPU: {r['cpu']}. SFT: {r['sft_batch_size']} references per step, the same rounds.", "",
             "| setting | RL samples/s | median s/iteration | SFT samples/s | median s/SFT step |",
             "|---|---|---|---|---|"]
    for name, label in (("1p2t", "1 process x 2 threads"), ("1p1t", "1 process x 1 thread"),
                        ("2p1t", "2 processes x 1 thread (gloo)")):
        lines.append(f"| {label} | {r[f'samples_per_s_{name}']:.3f} | {statistics.median(r['seconds'][name]):.2f} | "
                     f"{r[f'sft_samples_per_s_{name}']:.2f} | {statistics.median(r['sft_seconds'][name]):.2f} |")
    lines += ["", f"RL speedup 2 processes vs 1 process x 1 thread: **{r['speedup_2p_vs_1p1t']:.2f}x** "
              f"(vs 1 process x 2 threads: {r['speedup_2p_vs_1p2t']:.2f}x). SFT: "
              f"{r['sft_speedup_2p_vs_1p1t']:.2f}x (vs 1 x 2 threads: {r['sft_speedup_2p_vs_1p2t']:.2f}x).", "",
              f"All-reduced per optimizer step: {r['allreduce_bytes_per_step']:,} bytes (the fp32 LoRA and value-head "
              f"gradients); {r['optimizer_steps_per_iteration']} steps per iteration = "
              f"{r['allreduce_bytes_per_iteration']:,} bytes per iteration."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None, help="JSON file of parameter overrides (e.g. tests/tiny_params.json)")
    ap.add_argument("--set", nargs="*", default=[], help="NAME=VALUE parameter overrides")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=3, help="measured iterations per launch, after one warm-up")
    ap.add_argument("--sft-steps", type=int, default=6, help="measured SFT steps per launch, after one warm-up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "data_parallel"), help="output path without suffix")
    args = ap.parse_args()
    P = notebook_config(**overrides_of(args.params, args.set))
    P = dataclasses.replace(P, CACHE_DIR=os.path.expanduser(P.CACHE_DIR))
    load_before, records = os.getloadavg(), {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as work:
        for i in range(args.rounds):
            for name in (list(SETTINGS) if i % 2 == 0 else list(SETTINGS)[::-1]):
                records[name].append(measure(P, name, args.iters, args.sft_steps, args.seed, Path(work)))
    result = summarize(P, records, load_before, os.getloadavg(), args.rounds, args.iters)
    write_report(args.out, result, markdown_report(result))


if __name__ == "__main__":
    main()
