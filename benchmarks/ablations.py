"""The seed's choices against the plain ones (issue 10), at one equal budget and the same seeds.

Each variant changes one thing in the default configuration (the notebook's parameters cell) and is trained
and evaluated exactly like the headline (`ppo_seeds.py`: fresh LoRA per seed, whole eval split, greedy, paired
with the base model's answers). `sft` is the plain alternative to RL on a reference-similarity reward:
supervised fine-tuning on the references with the same LoRA, learning rate and budget. Every (variant, seed)
result is cached under runs/bench/, so the variants can be split over processes (`--variants`) and a last call
collects them into the table.

    .venv/bin/python benchmarks/ablations.py                           # all variants, seeds 0 1, 300 s each
    .venv/bin/python benchmarks/ablations.py --variants sft kl_prev    # a subset (results cached)
    .venv/bin/python benchmarks/ablations.py --params tests/tiny_params.json --budget 3 --out /tmp/abl

Writes <out>.json (per variant: gain_mean, gains per seed, gain vs default per seed, the interval of the gain,
kl_mean, eos_rate_after, mean_len_after, distinct2_ratio, iterations) and <out>.md.
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_seeds import ROOT, Context, common_args, notebook_config, overrides_of, run_metadata, run_seeds, summarize, write_report  # noqa: E402

# name -> (what it tests, parameter overrides of the default | "sft"). Overrides that equal the default are
# flipped at run time (see `variant_overrides`), so the table always compares against the plain/seed choice.
VARIANTS = {
    "default": ("the notebook's default configuration", {}),
    "reward": ("the other reward (exact similarity or the reward MLP)", {"REWARD_FN": ("similarity", "mlp")}),
    "adv_plus_delta": ("the seed's surrogate target ratios * (adv + delta)",
                       {"SURROGATE_TARGET": ("adv_plus_delta", "adv"), "ADVANTAGE": ("gae", "group")}),  # TD residuals need GAE
    "kl_prev": ("the seed's KL(π_old ‖ π) term in the loss", {"KL_PREV_COEF": (0.1, 0.0)}),
    "entropy": ("the entropy bonus switched (0.01 or 0)", {"PPO_ENT_COEF": (0.01, 0.0)}),
    "one_sample": ("one response per prompt, running normalisation (no group baseline)",
                   {"PPO_SAMPLES_PER_PROMPT": (1, 4), "REWARD_NORM": ("running", "group"), "ADVANTAGE": ("gae", "group")}),
    "sft": ("supervised fine-tuning on the references (same LoRA, LR, budget)", "sft"),
}


def variant_overrides(P: dict, spec) -> dict:
    """For each (value, alternative) pair: the value, unless the default already has it, then the alternative."""
    return {name: (a if getattr(P, name) != a else b) for name, (a, b) in spec.items()}


def variant_summary(ctx: Context, runs: list[dict], default_runs: list[dict] | None) -> dict:
    """summarize() plus, when the default's runs are given, the per-seed gain relative to the default."""
    s = summarize(ctx, runs)
    if default_runs:
        by_seed = {r["seed"]: r["gain"] for r in default_runs}
        s["vs_default"] = [r["gain"] - by_seed[r["seed"]] for r in runs if r["seed"] in by_seed]
        s["vs_default_mean"] = float(np.mean(s["vs_default"])) if s["vs_default"] else float("nan")
    return s


def markdown_report(r: dict) -> str:
    lines = ["# Ablations: each of the seed's choices against the plain one", "",
             f"Model `{r['model']}`, {r['eval_prompts']} eval prompts (greedy, {r['eval_max_new_tokens']} new tokens), "
             f"{r['budget_s']:.0f} s of training per run, seeds {r['seeds']}, {r['threads']} torch thread(s). "
             "Gain = mean similarity (10 × cos) after − before, paired over prompts; the interval is a 95% paired "
             "bootstrap of the seed-averaged gain. 'vs default' is the per-seed difference from the default run. "
             + r.get("note", ""), "",
             "| variant | what changes | gain (mean) | per seed | 95% interval | vs default | KL | EOS after | length after | iterations (SFT: steps) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in r["variants"].items():
        vs = f"{v['vs_default_mean']:+.2f}" if name != "default" and "vs_default_mean" in v else "–"
        changes = ", ".join(f"`{k} = {json.dumps(x)}`" for k, x in v["overrides"].items())
        lines.append(f"| {name} | {v['what']}{': ' + changes if changes else ''} | **{v['gain_mean']:+.2f}** | {', '.join(f'{g:+.2f}' for g in v['gains'])} "
                     f"| [{v['gain_ci_low']:+.2f}, {v['gain_ci_high']:+.2f}] | {vs} | {v['kl_mean']:.2f} | "
                     f"{v['eos_rate_after']:.2f} | {v['mean_len_after']:.1f} | {v['iterations_mean']:.0f} |")
    return "\n".join(lines + [""])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap)
    ap.set_defaults(seeds=[0, 1])
    ap.add_argument("--budget", type=float, default=300, help="TRAIN_BUDGET_S per run")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "ablations"), help="output path without suffix")
    args = ap.parse_args()
    P = notebook_config(**overrides_of(args.params, args.set) | {"TRAIN_BUDGET_S": args.budget})
    t0 = time.time()
    ctx = Context(P, Path(args.cache), args.threads)
    results = {}
    for name in args.variants:
        what, spec = VARIANTS[name]
        if spec == "sft":
            results[name] = (what, {}, run_seeds(ctx, P, args.seeds, "ablation", method="sft"))
        else:
            overrides = variant_overrides(P, spec)
            results[name] = (what, overrides, run_seeds(ctx, dataclasses.replace(P, **overrides), args.seeds, "ablation"))
    default_runs = results.get("default", (None, None, None))[2]
    r = run_metadata(ctx, args, t0) | {
        "variants": {name: {"what": what, "overrides": ov} | variant_summary(ctx, runs, default_runs)
                     | {"wall_s": sum(x["wall_s"] for x in runs)} for name, (what, ov, runs) in results.items()}}
    write_report(args.out, r, markdown_report(r))

if __name__ == "__main__":
    main()
