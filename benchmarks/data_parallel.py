"""Issue 21: data-parallel RL throughput on this machine: 1 process x 2 threads, 1 process x 1 thread and
2 processes x 1 thread (gloo, through accelerate), the same total batch (PPO_BATCH_SIZE responses per iteration).

Each measurement is a fresh set of processes (rlft_dp.launch_local), each rank with its own model, embedder and
similarity reward (REWARD_FN "similarity": the MLP would add only its fit), running the notebook's own
`run_iteration` (rollout of its share of the prompts, advantages, update with the gradients all-reduced).
One warm-up iteration, then --iters measured ones, each timed between barriers on rank 0; the three settings
are alternated over --rounds rounds (order reversed every other round). samples/s = PPO_BATCH_SIZE / the median
seconds per iteration over all measured iterations of a setting.

    .venv/bin/python benchmarks/data_parallel.py --rounds 2 --iters 3          # the lead's run, alone on the machine
    .venv/bin/python benchmarks/data_parallel.py --params tests/tiny_params.json --rounds 1 --iters 1 --out /tmp/dp_smoke

Writes <out>.json (samples_per_s_1p2t, samples_per_s_1p1t, samples_per_s_2p1t, speedup_2p_vs_1p1t,
allreduce_bytes_per_step, allreduce_bytes_per_iteration, per-setting seconds, loadavg before/after) and <out>.md.
"""
from __future__ import annotations

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
import rlft_dp  # noqa: E402
from ppo_seeds import parameters, write_report  # noqa: E402

SETTINGS = {"1p2t": (1, 2), "1p1t": (1, 1), "2p1t": (2, 1)}  # name: (processes, threads per process)


def rank_run(P: dict, iters: int, seed: int, out: str) -> None:
    """One rank (or the single process): warm-up + `iters` timed iterations -> rank 0 writes `out` (JSON)."""
    import torch
    nb = rlft_dp.load_notebook()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = None
    if world > 1:
        from accelerate import Accelerator
        accelerator = Accelerator(cpu=True)
    device = torch.device("cpu")
    nb.seed_everything(seed)
    base, tok = nb.load_base(P["MODEL"], P["CACHE_DIR"], device, torch.float32, seed=seed)
    model = nb.add_lora(base, P["LORA_R"], P["LORA_ALPHA"], P["LORA_DROPOUT"], P["LORA_TARGETS"])
    state = nb.make_ppo_state(model, tok, nb.ppo_config(P))
    if accelerator is not None:
        nb.enable_data_parallel(state, accelerator, seed)
    pairs = nb.split_pairs(nb.load_pairs(str(ROOT / P["DATA_PATH"])), "train")
    sampler = nb.PromptSampler(pairs, seed)
    reward_fn = nb.make_reward_fn("similarity", nb.Embedder(P["EMBEDDER"], device=device), None, device=device)
    barrier = accelerator.wait_for_everyone if accelerator is not None else (lambda: None)
    seconds = []
    for i in range(1 + iters):
        barrier()
        t0 = time.perf_counter()
        nb.run_iteration(state, sampler, reward_fn, None)
        barrier()
        if i > 0:  # iteration 0 is the warm-up
            seconds.append(time.perf_counter() - t0)
    if accelerator is None or accelerator.is_main_process:
        Path(out).write_text(json.dumps({
            "seconds": seconds, "bytes_per_step": nb.allreduce_bytes_per_step(state),
            "reduced_bytes": state.dp.reduced_bytes if state.dp is not None else 0,
            "iterations": 1 + iters, "threads": torch.get_num_threads(), "world": world}))


def measure(P: dict, name: str, iters: int, seed: int, work: Path) -> dict:
    """One fresh launch of setting `name` -> rank 0's record."""
    processes, threads = SETTINGS[name]
    out = work / f"{name}-{time.time_ns()}.json"
    rlft_dp.launch_local(rank_run, (P, iters, seed, str(out)), num_processes=processes, threads=threads)
    record = json.loads(out.read_text())
    print(f"{name}: " + " ".join(f"{s:.2f}" for s in record["seconds"]) + " s/iteration", flush=True)
    return record


def summarize(P: dict, records: dict[str, list[dict]], load_before, load_after, rounds: int, iters: int) -> dict:
    """The issue's fields from every setting's records."""
    batch = P["PPO_BATCH_SIZE"]
    seconds = {name: [s for r in recs for s in r["seconds"]] for name, recs in records.items()}
    rate = {name: batch / statistics.median(s) for name, s in seconds.items()}
    dp = records["2p1t"][0]
    steps = dp["reduced_bytes"] // dp["bytes_per_step"] // dp["iterations"] if dp["bytes_per_step"] else 0
    return {"model": P["MODEL"], "batch_size": batch, "samples_per_prompt": P["PPO_SAMPLES_PER_PROMPT"],
            "rounds": rounds, "iterations_measured_per_launch": iters,
            **{f"samples_per_s_{name}": rate[name] for name in SETTINGS},
            "speedup_2p_vs_1p1t": rate["2p1t"] / rate["1p1t"], "speedup_2p_vs_1p2t": rate["2p1t"] / rate["1p2t"],
            "allreduce_bytes_per_step": dp["bytes_per_step"], "optimizer_steps_per_iteration": steps,
            "allreduce_bytes_per_iteration": steps * dp["bytes_per_step"],
            "seconds": seconds, "loadavg_before": list(load_before), "loadavg_after": list(load_after)}


def markdown_report(r: dict) -> str:
    lines = ["# Data-parallel RL throughput (issue 21)", "",
             f"{r['model']}, {r['batch_size']} responses per iteration ({r['samples_per_prompt']} per prompt), "
             f"{r['rounds']} alternated rounds x {r['iterations_measured_per_launch']} measured iterations after one "
             f"warm-up per launch; load average (1 min) {r['loadavg_before'][0]:.2f} before, "
             f"{r['loadavg_after'][0]:.2f} after.", "",
             "| setting | samples/s | median s/iteration |", "|---|---|---|"]
    for name, label in (("1p2t", "1 process x 2 threads"), ("1p1t", "1 process x 1 thread"),
                        ("2p1t", "2 processes x 1 thread (gloo)")):
        lines.append(f"| {label} | {r[f'samples_per_s_{name}']:.3f} | {statistics.median(r['seconds'][name]):.2f} |")
    lines += ["", f"Speedup 2 processes vs 1 process x 1 thread: **{r['speedup_2p_vs_1p1t']:.2f}x** "
              f"(vs 1 process x 2 threads: {r['speedup_2p_vs_1p2t']:.2f}x).", "",
              f"All-reduced per optimizer step: {r['allreduce_bytes_per_step']:,} bytes (the fp32 LoRA and value-head "
              f"gradients); {r['optimizer_steps_per_iteration']} steps per iteration = "
              f"{r['allreduce_bytes_per_iteration']:,} bytes per iteration."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None, help="JSON file of parameter overrides (e.g. tests/tiny_params.json)")
    ap.add_argument("--set", nargs="*", default=[], help="NAME=VALUE parameter overrides")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3, help="measured iterations per launch, after one warm-up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "data_parallel"), help="output path without suffix")
    args = ap.parse_args()
    P = parameters(args.params, args.set)
    P["CACHE_DIR"] = os.path.expanduser(P["CACHE_DIR"])
    load_before, records = os.getloadavg(), {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as work:
        for i in range(args.rounds):
            for name in (list(SETTINGS) if i % 2 == 0 else list(SETTINGS)[::-1]):
                records[name].append(measure(P, name, args.iters, args.seed, Path(work)))
    result = summarize(P, records, load_before, os.getloadavg(), args.rounds, args.iters)
    write_report(args.out, result, markdown_report(result))


if __name__ == "__main__":
    main()
