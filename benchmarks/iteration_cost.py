"""Issue 19: the cost of one RL iteration, today's path ("before") against the notebook's defaults ("after").

In one process, two PPO states on the same model (MODEL) from the same adapter initialisation (seed), fed the same
train prompts (one PromptSampler each, same seed), iterations alternated (before, after, then after, before, ...):
- "before" = the path before issue 19: DTYPE float32, OLD_LOGPROBS "recompute", KL_MONITOR_EVERY 1, CKPT_EVERY 1,
  CKPT_EVERY_S 0, ROLLOUT_MERGED False;
- "after" = the notebook's defaults (whatever DTYPE "auto" gives on this machine).
Each iteration is the notebook's own: `train_iteration` (rollout, reward, update, the log line) and, when
`checkpoint_due` says so, `save_checkpoint`, as `train_loop` runs them (no eval monitor, no similarity metric).
One warm-up iteration per arm, then --iters measured ones; s_per_iter_* are medians of the whole iteration
(checkpoint included), phases_* the per-phase medians (and means: the KL monitor and a time-based checkpoint do
not run every iteration, so the mean is what they cost on average).

    .venv/bin/python benchmarks/iteration_cost.py --iters 5 --threads 2          # the lead's run, alone on the machine
    .venv/bin/python benchmarks/iteration_cost.py --params tests/tiny_params.json --iters 2 --out /tmp/ic
    .venv/bin/python benchmarks/iteration_cost.py --iters 0 --gains rl_before.json rl_after.json  # add the gains
    .venv/bin/python benchmarks/iteration_cost.py --iters 5 --threads 2 --issue "issue 33" --before-multinomial \
        --before-set ROLLOUT_MERGED=False --before-set PREFIX_SHARING=False --out benchmarks/iteration_cost_issue33

--before-set NAME=VALUE (repeatable) gives the "before" arm other knobs than the issue-19 BEFORE below;
--before-multinomial makes it sample with torch.multinomial (the sampler before issue 33's `draw`).

`--gains BEFORE.json AFTER.json`: two `benchmarks/pipeline_seeds.py` outputs (arm "rl", 300 s runs with the two
configurations); their gain (mean, CI, iterations) is added as gain_before / gain_after. With `--iters 0` nothing
is measured: the gains are added to the existing <out>.json and the table rewritten.

Writes <out>.json (s_per_iter_before, s_per_iter_after, speedup, phases_before, phases_after, threads, loadavg,
...), <out>.md and <out>.png (the median phases of each arm, stacked).
"""
import dataclasses
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from ppo_seeds import Context, cpu_name, fresh_model, notebook_config, overrides_of, write_report  # noqa: E402

BEFORE = {"DTYPE": "float32", "OLD_LOGPROBS": "recompute", "KL_MONITOR_EVERY": 1, "CKPT_EVERY": 1, "CKPT_EVERY_S": 0,
          "ROLLOUT_MERGED": False}
ARMS = ("before", "after")


def multinomial_draw(probs, generator=None):
    """The sampler before issue 33 (torch.multinomial: V exponentials per row), for --before-multinomial."""
    import torch
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Arm:
    """One PPO state with its sampler, run folder and log, stepped one notebook iteration at a time."""

    def __init__(self, ctx: Context, P: dict, name: str, reward_fn, seed: int, run_path: Path,
                 multinomial: bool = False):
        nb = ctx.nb
        self.multinomial = multinomial
        self.nb, self.P, self.name, self.reward_fn = nb, P, name, reward_fn
        model, tok = fresh_model(nb, P, seed, ctx.device)
        nb.seed_everything(seed)
        self.state = nb.make_ppo_state(model, tok, P)
        self.sampler = nb.PromptSampler(ctx.train_pairs, seed)
        shutil.rmtree(run_path, ignore_errors=True)
        self.run_path = run_path
        self.logs = nb.start_or_resume(run_path, self.state, self.sampler, resume=False)
        self.t0 = self.last_ckpt = time.time()
        self.dtype = str(next(model.get_base_model().parameters()).dtype).replace("torch.", "")

    def step(self) -> dict:
        """One iteration as train_loop runs it -> its log record plus 'iteration_s' (the whole wall time) and
        this iteration's own checkpoint seconds as t_checkpoint."""
        nb, P, t1 = self.nb, self.P, time.time()
        real_draw = nb.draw
        nb.draw = multinomial_draw if self.multinomial else real_draw
        try:
            nb.train_iteration(self.run_path, self.state, self.sampler, self.reward_fn, None, None, 0, self.logs, self.t0)
        finally:
            nb.draw = real_draw
        t_ckpt, t2 = 0.0, time.time()
        if nb.checkpoint_due(self.state.iteration, P.CKPT_EVERY, P.CKPT_EVERY_S, t2 - self.last_ckpt):
            nb.save_checkpoint(self.run_path, self.state, self.sampler, self.logs, P.CKPT_KEEP)
            self.last_ckpt = time.time()
            t_ckpt = self.last_ckpt - t2
        return {**self.logs[-1], "t_checkpoint": t_ckpt, "iteration_s": time.time() - t1}


def phase_summary(nb, records: list[dict]) -> dict:
    """Per phase (nb.PHASES, plus the whole iteration): median and mean seconds over the measured records."""
    times = nb.phase_matrix(records)
    out = {name: {"median": float(np.median(times[:, j])), "mean": float(np.mean(times[:, j]))}
           for j, name in enumerate(nb.PHASES)}
    whole = [r["iteration_s"] for r in records]
    out["iteration"] = {"median": float(np.median(whole)), "mean": float(np.mean(whole))}
    return out


def measure(ctx: Context, configs: dict, iters: int, seed: int, work: Path, before_multinomial: bool = False) -> dict:
    """Warm-up + `iters` alternated iterations of each arm -> {arm: [records of the measured iterations]}."""
    P0, model, tok = configs["after"], None, None
    if P0.REWARD_FN == "mlp":  # the reward model's data is sampled from the (fp32) base model
        model, tok = fresh_model(ctx.nb, configs["before"], seed, ctx.device)
    reward_fn = ctx.reward_fn(P0, model, tok, seed)  # the same reward for both arms
    del model
    arms = {name: Arm(ctx, configs[name], name, reward_fn, seed, work / name,
                      multinomial=before_multinomial and name == "before") for name in ARMS}
    records = {name: [] for name in ARMS}
    for i in range(1 + iters):
        for name in (ARMS if i % 2 == 0 else ARMS[::-1]):
            record = arms[name].step()
            print(f"{name:>6} iteration {i}: {record['iteration_s']:.2f} s "
                  + " ".join(f"{k[2:]} {record.get(k, float('nan')):.2f}" for k in ctx.nb.PHASES), flush=True)
            if i > 0:  # iteration 0 is the warm-up
                records[name].append(record)
    dtypes = {name: arms[name].dtype for name in ARMS}
    return {"records": records, "dtypes": dtypes}


def gains(before_json: str, after_json: str) -> dict:
    """gain_before / gain_after (mean, CI, iterations) from two pipeline_seeds.py outputs, arm "rl"."""
    out = {}
    for tag, path in (("before", before_json), ("after", after_json)):
        r = json.loads(Path(path).read_text())
        arm = r["arms"]["rl"]
        out |= {f"gain_{tag}": arm["gain_mean"], f"gain_{tag}_ci": [arm["gain_ci_low"], arm["gain_ci_high"]],
                f"iterations_{tag}": arm["iterations"], f"gain_{tag}_source": str(path),
                f"gain_{tag}_budget_s": r.get("budget_s"), f"gain_{tag}_seeds": r.get("seeds"),
                f"gain_{tag}_cpu": r.get("cpu") or "not recorded (an earlier session)"}
    return out


def markdown_report(r: dict) -> str:
    """The table: per-phase median (mean) seconds of each arm, the whole iteration, the speedup, the gains."""
    cell = lambda arm, k: f"{r[f'phases_{arm}'][k]['median']:.2f} ({r[f'phases_{arm}'][k]['mean']:.2f})"
    lines = [f"# One RL iteration before and after {r.get('issue', 'issue 19')}", "",
             f"{r['model']} on {r['threads']} threads of {r.get('cpu') or 'a CPU not recorded'}; "
             f"{r['iterations_measured']} measured iterations per arm after "
             f"one warm-up, alternated; base dtype before {r['dtype_before']}, after {r['dtype_after']}; "
             f"load average (1 min) {r['loadavg']['before'][0]:.2f} before, {r['loadavg']['after'][0]:.2f} after.",
             "", "Seconds per phase: median (mean).", "", "| phase | before | after |", "|---|---|---|"]
    lines += [f"| {k[2:]} | {cell('before', k)} | {cell('after', k)} |" for k in r["phases"]]
    lines += [f"| **whole iteration** | **{r['s_per_iter_before']:.2f}** | **{r['s_per_iter_after']:.2f}** |", "",
              f"Answers per second: before {r['samples_per_s_before']:.3f}, after {r['samples_per_s_after']:.3f} "
              f"({r['batch_before']} / {r['batch_after']} answers per iteration). Speedup (answers per second, "
              f"after / before; medians): **{r['speedup']:.2f}×**. Before: {r['config_before']}"
              + (" and torch.multinomial sampling" if r.get("before_multinomial") else "") + "."]
    if "gain_before" in r:
        ci = lambda tag: f"[{r[f'gain_{tag}_ci'][0]:+.2f}, {r[f'gain_{tag}_ci'][1]:+.2f}]"
        lines += ["", "| 300 s RL run | gain | 95% CI | iterations (mean per seed) |", "|---|---|---|---|",
                  f"| before | {r['gain_before']:+.2f} | {ci('before')} | {r['iterations_before']:.1f} |",
                  f"| after | {r['gain_after']:+.2f} | {ci('after')} | {r['iterations_after']:.1f} |", "",
                  f"Gains from `{r['gain_before_source']}` (CPU: {r.get('gain_before_cpu', 'not recorded')}) and "
                  f"`{r['gain_after_source']}` (CPU: {r.get('gain_after_cpu', 'not recorded')}); iterations per "
                  "300 s depend on the CPU, so compare the gains with each other, not with the timings above."]
    return "\n".join(lines) + "\n"


def plot(r: dict, phases: list[str], path: Path) -> None:
    """Two stacked bars (before, after) of the median seconds of each phase."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    bottom = np.zeros(2)
    for k in phases:
        heights = np.array([r[f"phases_{arm}"][k]["median"] for arm in ARMS])
        ax.bar(list(ARMS), heights, bottom=bottom, label=k[2:])
        bottom += heights
    ax.set_ylabel("seconds per iteration (median per phase)")
    ax.set_title(f"one RL iteration: {r['speedup']:.2f}x cheaper")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None, help="JSON file of parameter overrides (e.g. tests/tiny_params.json)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override one parameter")
    ap.add_argument("--iters", type=int, default=5, help="measured iterations per arm (after one warm-up); 0: gains only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=str(ROOT / "runs" / "bench"), help="shared caches and the arms' run folders")
    ap.add_argument("--gains", nargs=2, metavar=("BEFORE.json", "AFTER.json"), default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "iteration_cost"), help="output path without suffix")
    ap.add_argument("--before-set", action="append", default=[], metavar="NAME=VALUE",
                    help="the 'before' arm's knobs (replaces the issue-19 BEFORE), e.g. ROLLOUT_MERGED=False")
    ap.add_argument("--before-multinomial", action="store_true",
                    help="the 'before' arm samples with torch.multinomial, the sampler before issue 33")
    ap.add_argument("--issue", default="issue 19", help="the table's title")
    args = ap.parse_args()
    out = Path(args.out)
    if args.iters == 0:
        if not args.gains:
            raise SystemExit("--iters 0 only adds --gains to an existing result")
        r = json.loads(out.with_suffix(".json").read_text()) | gains(*args.gains)
        write_report(str(out), r, markdown_report(r))
        return
    P = notebook_config(**overrides_of(args.params, args.set))
    before_knobs = overrides_of(None, args.before_set) if args.before_set else BEFORE
    configs = {"before": dataclasses.replace(P, **before_knobs), "after": P}
    t0, load_before = time.time(), os.getloadavg()
    ctx = Context(P, Path(args.cache), args.threads)
    m = measure(ctx, configs, args.iters, args.seed, Path(args.cache) / "iteration_cost", args.before_multinomial)
    phases = {arm: phase_summary(ctx.nb, m["records"][arm]) for arm in ARMS}
    before, after = phases["before"]["iteration"]["median"], phases["after"]["iteration"]["median"]
    batch = {arm: configs[arm].PPO_BATCH_SIZE for arm in ARMS}
    r = {"s_per_iter_before": before, "s_per_iter_after": after,
         "samples_per_s_before": batch["before"] / before, "samples_per_s_after": batch["after"] / after,
         "speedup": (batch["after"] / after) / (batch["before"] / before), "batch_before": batch["before"],
         "batch_after": batch["after"], "before_multinomial": args.before_multinomial, "issue": args.issue,
         "s_per_iter_mean_before": phases["before"]["iteration"]["mean"],
         "s_per_iter_mean_after": phases["after"]["iteration"]["mean"],
         "phases_before": phases["before"], "phases_after": phases["after"], "phases": list(ctx.nb.PHASES),
         "threads": args.threads, "cpu": cpu_name(), "cpu_bf16": ctx.nb.cpu_has_bf16(), "loadavg": {"before": list(load_before), "after": list(os.getloadavg())},
         "model": P.MODEL, "dtype_before": m["dtypes"]["before"], "dtype_after": m["dtypes"]["after"],
         "iterations_measured": args.iters, "seed": args.seed, "config_before": before_knobs,
         "config_after": {k: getattr(P, k) for k in before_knobs}, "overrides": args.set, "wall_s": time.time() - t0,
         "records": {arm: [{k: v for k, v in rec.items() if k.startswith("t_") or k in ("iteration", "iteration_s")}
                           for rec in m["records"][arm]] for arm in ARMS}}
    if args.gains:
        r |= gains(*args.gains)
    write_report(str(out), r, markdown_report(r))
    plot(r, list(ctx.nb.PHASES), out.with_suffix(".png"))


if __name__ == "__main__":
    main()
