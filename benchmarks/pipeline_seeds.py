"""The headline of issue 20: the notebook's training pipeline (run_pipeline) per arm, over seeds, at one budget.

For every arm (`sft`, `rl`, `sft+rl`; the default is the notebook's PIPELINE) and seed: a fresh base model + LoRA, `run_pipeline` with
PIPELINE = arm and TRAIN_BUDGET_S = --budget (the same call the notebook's training cell makes; the train-split
monitor is off, so every second of the budget trains), then the whole eval split answered greedily and paired
with the base model's answers (ppo_seeds.py's Context, evaluation and caching). The load average is recorded
before and after each run: the budget is wall time, so a busy machine silently trains less. Each run is cached
as JSON under --cache, so a killed benchmark resumes with the runs still missing. `--reuse FILE` takes the runs
of an earlier, committed output whose configuration key matches (so a headline too long for one session can be
finished in the next: each run records the CPU and commit it was measured on, `measured_on`).

    .venv/bin/python benchmarks/pipeline_seeds.py          # 3 arms x 3 seeds x 1200 s (~3.5 h), alone on the machine
    .venv/bin/python benchmarks/pipeline_seeds.py --arms sft+rl --seeds 0 --budget 300 --set SFT_FRACTION=0.3 \
        --out /tmp/try
    .venv/bin/python benchmarks/pipeline_seeds.py --params tests/tiny_params.json --budget 5 --out /tmp/tiny

Writes <out>.json: at the top level, for the default arm, gain_mean, gain_min, gain_ci_low, gain_ci_high,
distinct2_ratio, rl_over_sft_mean, rl_over_sft_ci_low (the paired difference arm − sft: per prompt, each arm
averaged over seeds, bootstrap over prompts); under `arms`, per arm, the same plus family_gains, kl_mean,
eos_rate_after, mean_len_after, samples_seen, iterations, loadavg (and every run); budget_s, seeds, threads,
machine. And <out>.md, a table of the arms.
"""
import dataclasses
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from ppo_seeds import (Context, cached_json, common_args, cpu_name, evaluate_after, fresh_model,  # noqa: E402
                       key_of, notebook_config, overrides_of, run_metadata, summarize, write_report)

ARMS = ("sft", "rl", "sft+rl")  # the default arm is the notebook's PIPELINE (--set PIPELINE=... to change it)


def run_arm(ctx: Context, P: dict, arm: str, seed: int, run_path: Path) -> dict:
    """One run: fresh model, run_pipeline(PIPELINE=arm, SEED=seed) in run_path, then the eval split and the
    paired comparison with the base (ppo_seeds.evaluate_after). Load averages before and after."""
    nb, load_before = ctx.nb, os.getloadavg()
    Q = dataclasses.replace(P, PIPELINE=arm, SEED=seed, RESUME=False, CKPT_EVERY=0)
    model, tok = fresh_model(nb, Q, seed, ctx.device)
    reward_fn = ctx.reward_fn(Q, model, tok, seed)
    t0 = time.time()  # the base model is loaded and the reward fitted outside the budget, as in ppo_seeds
    result = nb.run_pipeline(model, tok, ctx.train_pairs, reward_fn, run_path, Q, progress=sys.stderr.isatty())
    if ctx.eval_dtype:  # e.g. a bf16-trained policy scored in fp32, so two dtypes are compared on the same eval
        model.to(getattr(torch, ctx.eval_dtype))
    train = {"pipeline": arm, "iterations": result.iterations, "sft_steps": result.sft_steps,
             "samples_seen": result.samples_seen, "seconds": result.seconds,
             "sft_curve": [{k: r[k] for k in ("step", "loss", "val_nll", "restored_step") if k in r}
                           for r in result.sft_logs],
             "curve": [{k: r.get(k) for k in ("iteration", "score", "kl_ref", "response_len", "eos_rate")}
                       for r in result.rl_logs]}
    out = evaluate_after(ctx, Q, model, tok, seed, t0, {"arm": arm, "train": train, "train_dtype": Q.DTYPE,
                                                        "eval_dtype": ctx.eval_dtype or Q.DTYPE})
    return out | {"loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())}


def config_key(ctx: Context, P: dict, arm: str) -> str:
    """What makes two runs of one arm and seed the same run: every parameter but the arm and the demo/FFT/run-folder
    ones (the budget included; for `rl`, which runs no SFT, the SFT ones too), and the eval dtype."""
    skip = ("DEMO", "FFT", "RUN_DIR", "RESUME", "PIPELINE") + (("SFT_", "KL_ANCHOR") if arm == "rl" else ())
    return key_of({k: v for k, v in dataclasses.asdict(P).items() if not k.startswith(skip)}
                  | ({"eval_dtype": ctx.eval_dtype} if ctx.eval_dtype else {}))


def run_cache_path(ctx: Context, key: str, arm: str, seed: int) -> Path:
    return ctx.cache / f"pipeline-{arm.replace('+', '_')}-{key}-s{seed}.json"


def git_head() -> str:
    """The checkout's commit ('' outside a git checkout)."""
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def reuse_runs(ctx: Context, keys: dict[str, str], source: Path) -> int:
    """Seed the cache with the runs of an earlier output (pipeline_seeds.json) whose arm was measured under the
    same config key (`keys`: arm -> key); runs without `measured_on` get the source's CPU and commit. Returns how
    many runs were taken."""
    src, taken = json.loads(source.read_text()), 0
    for arm, summary in src["arms"].items():
        key = keys.get(arm)
        if src.get("config_keys", {}).get(arm) != key:
            print(f"--reuse {source}: arm {arm}'s config key is not this run's {key}; nothing reused for it")
            continue
        for run in summary["runs"]:
            path = run_cache_path(ctx, key, arm, run["seed"])
            if not path.exists():
                run.setdefault("measured_on", {"cpu": src.get("cpu", ""), "commit": src.get("commit", "")})
                path.parent.mkdir(parents=True, exist_ok=True)
                ctx.nb.write_json_atomic(path, run)
                taken += 1
    return taken


def run_arms(ctx: Context, P: dict, arms: list[str], seeds: list[int], stamp: dict,
             cached_only: bool = False) -> dict[str, list[dict]]:
    """run_arm for each arm and seed (seeds alternate across arms), each cached as
    <cache>/pipeline-<arm>-<config key>-s<seed>.json; `stamp` (CPU, commit) goes to runs that lack one.
    cached_only: train nothing, take the runs already cached (arms may then have different seeds; empty arms go)."""
    runs = {arm: [] for arm in arms}
    for seed in seeds:
        for arm in arms:
            path = run_cache_path(ctx, config_key(ctx, P, arm), arm, seed)
            if cached_only and not path.exists():
                print(f"{arm} seed {seed}: not run yet (--cached-only)", flush=True)
                continue
            run = cached_json(ctx.nb, path, lambda: run_arm(ctx, P, arm, seed, ctx.cache / "runs" / path.stem)
                              | {"measured_on": stamp})
            run.setdefault("measured_on", stamp)
            runs[arm].append(run)
            print(f"{arm} seed {seed}: gain {run['gain']:+.3f} (SFT {run['train']['sft_steps']} steps, RL "
                  f"{run['train']['iterations']} iterations, {run['wall_s']:.0f} s, load "
                  f"{run['loadavg_before'][0]:.1f} -> {run['loadavg_after'][0]:.1f})", flush=True)
    return {arm: rs for arm, rs in runs.items() if rs}


def per_prompt_similarity(runs: list[dict]) -> dict[str, float]:
    """prompt -> the similarity of its answer, averaged over the seeds' runs."""
    prompts = [r["prompt"] for r in runs[0]["rows"]]
    sims = {p: [] for p in prompts}
    for run in runs:
        for r in run["rows"]:
            sims[r["prompt"]].append(r["similarity"])
    return {p: float(np.mean(v)) for p, v in sims.items()}


def over_sft(ctx: Context, runs: list[dict], sft_runs: list[dict] | None) -> dict:
    """rl_over_sft_mean / _ci_low / _ci_high: the arm minus `sft` per prompt (each seed-averaged), mean and 95%
    bootstrap interval over prompts; None without sft runs."""
    if not sft_runs:
        return {"rl_over_sft_mean": None, "rl_over_sft_ci_low": None, "rl_over_sft_ci_high": None}
    arm, sft = per_prompt_similarity(runs), per_prompt_similarity(sft_runs)
    diff = [arm[p] - sft[p] for p in arm]
    lo, hi = ctx.nb.bootstrap_ci(diff, ctx.P.BOOTSTRAP, seed=0)
    return {"rl_over_sft_mean": float(np.mean(diff)), "rl_over_sft_ci_low": lo, "rl_over_sft_ci_high": hi}


def summarize_arm(ctx: Context, runs: list[dict], sft_runs: list[dict] | None) -> dict:
    """ppo_seeds.summarize's fields, the paired difference to sft, samples seen, iterations and load averages."""
    mean = lambda key: float(np.mean([r["train"][key] for r in runs]))
    loads = [r["loadavg_before"][0] for r in runs] + [r["loadavg_after"][0] for r in runs]
    return summarize(ctx, runs) | over_sft(ctx, runs, sft_runs) | {
        "seeds": [r["seed"] for r in runs],
        "samples_seen": mean("samples_seen"), "iterations": mean("iterations"), "sft_steps": mean("sft_steps"),
        "loadavg": {"mean_1min": float(np.mean(loads)), "max_1min": float(max(loads)),
                    "per_run": [{"seed": r["seed"], "before": r["loadavg_before"], "after": r["loadavg_after"]}
                                for r in runs]},
        "wall_s": float(sum(r["wall_s"] for r in runs)), "runs": runs}


HEADLINE_FIELDS = ("gain_mean", "gain_min", "gain_ci_low", "gain_ci_high", "distinct2_ratio", "rl_over_sft_mean",
                   "rl_over_sft_ci_low", "rl_over_sft_ci_high")


def acceptance(r: dict) -> dict:
    """Issue 20's acceptance, on the default arm's figures."""
    return {"gain_mean>=0.75": r["gain_mean"] >= 0.75, "every_seed>0.3": r["gain_min"] > 0.3,
            "ci_excludes_0": r["gain_ci_low"] > 0, "distinct2_ratio>=0.9": r["distinct2_ratio"] >= 0.9,
            "rl_over_sft_ci_low>0": r["rl_over_sft_ci_low"] is not None and r["rl_over_sft_ci_low"] > 0}


def fmt(v, spec: str = "+.2f") -> str:
    return "n/a" if v is None else format(v, spec)


def markdown_report(r: dict) -> str:
    """The committed table: one column per arm."""
    arms = list(r["arms"])
    a = r["arms"]
    row = lambda name, f: f"| {name} | " + " | ".join(f(a[x]) for x in arms) + " |"
    lines = [
        "# Headline: the training pipeline per arm, over seeds", "",
        f"Model `{r['model']}`, data `{r['data']}`: {r['eval_prompts']} eval prompts answered greedily "
        f"({r['eval_max_new_tokens']} new tokens) before and after `run_pipeline` with TRAIN_BUDGET_S = "
        f"{r['budget_s']:g} s per run, seeds {r['seeds']} ({r['threads']} torch thread(s), {r['machine']}). "
        "Similarity = 10 × cos(all-MiniLM-L6-v2). Intervals: 95% paired bootstrap over prompts of the "
        f"seed-averaged difference. Runs measured on: {', '.join(r.get('cpus_of_runs', [])) or 'n/a'}. "
        f"{r.get('note', '')}", "",
        "| figure | " + " | ".join(f"`{x}`" for x in arms) + " |", "|---" * (len(arms) + 1) + "|",
        row("gain over the base, mean (per seed)", lambda x: f"**{x['gain_mean']:+.2f}** ("
            + ", ".join(f"{g:+.2f}" for g in x["gains"]) + ")"),
        row("seeds", lambda x: ", ".join(str(v) for v in x.get("seeds", []))),
        row("95% interval", lambda x: f"[{x['gain_ci_low']:+.2f}, {x['gain_ci_high']:+.2f}]"),
        row("minus `sft` (95% interval)", lambda x: f"{fmt(x['rl_over_sft_mean'])} [{fmt(x['rl_over_sft_ci_low'])}, "
            f"{fmt(x['rl_over_sft_ci_high'])}]"),
        row("gain per family", lambda x: " · ".join(f"{k} {v:+.2f}" for k, v in x["family_gains"].items())),
        row("KL(policy ‖ base) per answer, nats", lambda x: f"{x['kl_mean']:.2f}"),
        row("distinct-2 after / before", lambda x: f"{x['distinct2_ratio']:.3f}"),
        row("EOS rate after (before)", lambda x: f"{x['eos_rate_after']:.2f} ({x['eos_rate_before']:.2f})"),
        row("mean length after (before), tokens", lambda x: f"{x['mean_len_after']:.1f} ({x['mean_len_before']:.1f})"),
        row("SFT steps / RL iterations per seed", lambda x: f"{x['sft_steps']:.1f} / {x['iterations']:.1f}"),
        row("samples seen per seed (SFT examples + RL responses)", lambda x: f"{x['samples_seen']:.0f}"),
        row("load average (1 min) during its runs, mean / max", lambda x: f"{x['loadavg']['mean_1min']:.1f} / "
            f"{x['loadavg']['max_1min']:.1f}"), "",
        f"Acceptance (default arm `{r['default_arm']}`): " + ", ".join(
            f"{k} **{'yes' if v else 'no'}**" for k, v in r["acceptance"].items()) + ".", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap)
    ap.set_defaults(threads=2)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--budget", type=float, default=1200, help="TRAIN_BUDGET_S per run (SFT + RL together)")
    ap.add_argument("--eval-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="cast the trained model to this dtype before the eval split (default: the run's DTYPE)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "pipeline_seeds"), help="output path without suffix")
    ap.add_argument("--reuse", default=None, help="an earlier output JSON whose runs (same config key) are taken")
    ap.add_argument("--cached-only", action="store_true", help="train nothing: summarise the runs cached so far")
    ap.add_argument("--stamp-commit", default="", help="commit recorded on runs without one (default: HEAD)")
    args = ap.parse_args()
    P = notebook_config(**overrides_of(args.params, args.set) | {"TRAIN_BUDGET_S": args.budget})
    t0 = time.time()
    ctx = Context(P, Path(args.cache), args.threads)
    ctx.eval_dtype = args.eval_dtype
    keys = {arm: config_key(ctx, P, arm) for arm in args.arms}
    if args.reuse:
        print(f"--reuse {args.reuse}: {reuse_runs(ctx, keys, Path(args.reuse))} run(s) taken")
    stamp = {"cpu": cpu_name(), "commit": args.stamp_commit or git_head()}
    runs = run_arms(ctx, P, args.arms, args.seeds, stamp, args.cached_only)
    arms = {arm: summarize_arm(ctx, runs[arm], runs.get("sft")) for arm in runs}
    default = P.PIPELINE if P.PIPELINE in arms else next(iter(arms))
    r = {k: arms[default][k] for k in HEADLINE_FIELDS} | run_metadata(ctx, args, t0) | {
        "config_keys": keys, "commit": stamp["commit"],
        "cpus_of_runs": sorted({run["measured_on"]["cpu"] for rs in runs.values() for run in rs}),
        "eval_dtype": args.eval_dtype or P.DTYPE, "default_arm": default, "acceptance": acceptance(arms[default]),
        "wall_s": float(sum(a["wall_s"] for a in arms.values())), "arms": arms}
    write_report(args.out, r, markdown_report(r))


if __name__ == "__main__":
    main()
