"""Issue 33, step 1: where one RL iteration's time goes, op by op, against what this CPU could do.

One PPO state on MODEL (the notebook's defaults unless --set), one warm-up iteration, --iters plain iterations
(their phase times, no profiler), then one iteration under `torch.profiler` (CPU, with_flops): the notebook's
`generate`, `reference_pass` and `ppo_update` (and `old_policy_pass` where it runs) are each wrapped in their own
profiler, so every phase gets its own top ops. Beside each phase, its floor on this CPU ("hardware figure"):
- compute: the phase's matmul FLOPs (the profiler's count for aten::mm / addmm / bmm / matmul) divided by a
  measured matmul throughput of this CPU at the phase's own shapes, fp32 and bf16 ([1408, 576] x [576, 1536]:
  16 rows x 88 tokens through an MLP projection);
- memory (generate only): the weights read once per decode step (parameter bytes x steps) / measured bandwidth
  (a 256 MB copy, bytes read + written);
- the figure is the larger of the two, and `x_over_floor` = measured / figure.

    .venv/bin/python benchmarks/profile_iteration.py --threads 2                       # alone on the machine
    .venv/bin/python benchmarks/profile_iteration.py --params tests/tiny_params.json --iters 0 --out /tmp/prof

Writes <out>.json (phases: seconds, flops, floor figures, top ops; hardware: throughputs; cpu, loadavg, threads)
and <out>.md.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from ppo_seeds import Context, cpu_name, fresh_model, notebook_config, overrides_of, write_report  # noqa: E402

WRAPPED = ("generate", "old_policy_pass", "reference_pass", "ppo_update")
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def hardware(hidden: int, inter: int, rows: int = 1408) -> dict:
    """Measured matmul throughput (FLOP/s) at [rows, hidden] x [hidden, inter], fp32 and bf16, plus a large square
    bf16 product, and memory bandwidth (bytes/s, read + write of a 256 MB copy)."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(rows, hidden, dtype=dtype), torch.randn(hidden, inter, dtype=dtype)
        out[f"matmul_flops_{name}"] = 2 * rows * hidden * inter / timed(lambda: a @ b, 20)
        a = torch.randn(2048, 2048, dtype=dtype)
        out[f"matmul_flops_{name}_2048"] = 2 * 2048 ** 3 / timed(lambda: a @ a, 5)
    src = torch.ones(64 * 2 ** 20)  # 256 MB fp32
    dst = torch.empty_like(src)
    out["bandwidth_bytes_per_s"] = 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), 10)
    return out


def phase_profile(prof, seconds: float, top: int) -> dict:
    """Top ops by self CPU time and the matmul FLOPs of one profiled phase."""
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    flops = sum(e.flops or 0 for e in events if e.key in MATMULS)
    return {"seconds": seconds, "flops": float(flops),
            "top_ops": [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6,
                         "share": e.self_cpu_time_total / total_self} for e in rows]}


class Profiled:
    """Replace nb.<name> by a wrapper that profiles each call into self.results[name] (when self.on)."""

    def __init__(self, nb, names, top: int):
        self.nb, self.on, self.results, self.top, self.calls = nb, False, {}, top, {}
        for name in names:
            setattr(nb, name, self.wrap(name, getattr(nb, name)))

    def wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                seconds = time.perf_counter() - t0
            self.results[name] = phase_profile(prof, seconds, self.top)
            if name == "generate":
                self.results[name]["decode_steps"] = int(out.sequences.shape[1] - out.prompt_len)
                self.results[name]["rows"] = int(out.sequences.shape[0])
            return out
        return wrapper


def floors(results: dict, hw: dict, param_bytes: int, dtype: str) -> None:
    """Add to each phase its compute floor (flops / measured matmul FLOP/s of the base dtype and of bf16), the
    memory floor of generate, the hardware figure (their max) and measured / figure."""
    for name, r in results.items():
        r["floor_compute_s"] = r["flops"] / hw[f"matmul_flops_{dtype}"]
        r["floor_compute_bf16_s"] = r["flops"] / hw["matmul_flops_bf16"]
        r["floor_memory_s"] = (param_bytes * r["decode_steps"] / hw["bandwidth_bytes_per_s"]
                               if name == "generate" else 0.0)
        r["hardware_s"] = max(r["floor_compute_s"], r["floor_memory_s"])
        r["x_over_floor"] = r["seconds"] / r["hardware_s"] if r["hardware_s"] > 0 else None  # a pass that did not run


def markdown(r: dict) -> str:
    hw = r["hardware"]
    lines = ["# Where one RL iteration's time goes (issue 33, step 1)", "",
             f"{r['model']} ({r['dtype']} base) on {r['threads']} threads of {r['cpu'] or 'an unrecorded CPU'}; "
             f"load average (1 min) {r['loadavg']['before'][0]:.2f} before, {r['loadavg']['after'][0]:.2f} after. "
             f"Phase seconds: median of {r['iters']} unprofiled iterations (profiled iteration in brackets).", "",
             f"Measured on this CPU: matmul [1408, {r['hidden']}] x [{r['hidden']}, {r['inter']}] "
             f"{hw['matmul_flops_fp32'] / 1e9:.0f} GFLOP/s fp32, {hw['matmul_flops_bf16'] / 1e9:.0f} GFLOP/s bf16 "
             f"(2048² square: {hw['matmul_flops_fp32_2048'] / 1e9:.0f} / {hw['matmul_flops_bf16_2048'] / 1e9:.0f}); "
             f"copy bandwidth {hw['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s.", "",
             "| phase | seconds | matmul GFLOP | compute floor (base dtype / bf16) | memory floor | × over floor |",
             "|---|---|---|---|---|---|"]
    for name, p in r["phases"].items():
        lines.append(f"| {name} | {p.get('seconds_unprofiled', float('nan')):.2f} ({p['seconds']:.2f}) | "
                     f"{p['flops'] / 1e9:.0f} | {p['floor_compute_s']:.2f} / {p['floor_compute_bf16_s']:.2f} s | "
                     f"{p['floor_memory_s']:.2f} s | " + (f"{p['x_over_floor']:.1f}×" if p["x_over_floor"] else "—") + " |")
    for name, p in r["phases"].items():
        lines += ["", f"**{name}** — top ops by self CPU time (profiled):", "", "| op | calls | self s | share |",
                  "|---|---|---|---|"]
        lines += [f"| `{o['op']}` | {o['calls']} | {o['self_s']:.2f} | {o['share']:.0%} |" for o in p["top_ops"]]
    return "\n".join(lines) + "\n"


PHASE_KEYS = {"generate": "t_generate", "old_policy_pass": "t_old_logprobs", "reference_pass": "t_ref",
              "ppo_update": "t_update"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None, help="JSON file of parameter overrides (e.g. tests/tiny_params.json)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override one parameter")
    ap.add_argument("--iters", type=int, default=3, help="unprofiled iterations after the warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--cache", default=str(ROOT / "runs" / "bench"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "profile_iteration"))
    args = ap.parse_args()
    P = notebook_config(**overrides_of(args.params, args.set))
    load_before = os.getloadavg()
    ctx = Context(P, Path(args.cache), args.threads)
    nb = ctx.nb
    model, tok = fresh_model(nb, P, P.SEED, ctx.device)
    reward_fn = ctx.reward_fn(P, model, tok, P.SEED)
    state = nb.make_ppo_state(model, tok, P)
    sampler = nb.PromptSampler(ctx.train_pairs, P.SEED)
    prof = Profiled(nb, WRAPPED, args.top)
    plain = [nb.run_iteration(state, sampler, reward_fn, None)[0] for _ in range(1 + args.iters)][1:]
    prof.on = True
    nb.run_iteration(state, sampler, reward_fn, None)
    base = model.get_base_model()
    dtype = "bf16" if next(base.parameters()).dtype == torch.bfloat16 else "fp32"
    param_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    cfg = base.config
    hw = hardware(cfg.hidden_size, getattr(cfg, "intermediate_size", 4 * cfg.hidden_size))
    floors(prof.results, hw, param_bytes, dtype)
    for name, p in prof.results.items():
        p["seconds_unprofiled"] = float(np.median([s[PHASE_KEYS[name]] for s in plain])) if plain else float("nan")
    r = {"phases": prof.results, "hardware": hw, "cpu": cpu_name(), "cpu_bf16": nb.cpu_has_bf16(),
         "threads": args.threads, "model": P.MODEL, "dtype": dtype, "param_bytes": param_bytes,
         "hidden": cfg.hidden_size, "inter": getattr(cfg, "intermediate_size", 4 * cfg.hidden_size),
         "iters": args.iters, "iteration_s_unprofiled": [s["seconds"] for s in plain], "overrides": args.set,
         "loadavg": {"before": list(load_before), "after": list(os.getloadavg())}}
    write_report(str(args.out), r, markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
