"""How well the 2-layer reward MLP imitates the MiniLM similarity on prompts it never saw (issue 7).

Builds the notebook's reward-model data with its default parameters on the default packaged SmolLM2 and the
train split of the full data set (cached at runs/default/reward_data.safetensors — the same file and key as a default
notebook run, so either one fills it for the other), then fits `RewardMLP` for several split/initialisation
seeds. Figures are on the held-out test prompts' generated responses only (anchors excluded).

    .venv/bin/python benchmarks/reward_model.py            # ~3-8 min on a 2-core CPU the first time, ~30 s cached
    .venv/bin/python benchmarks/reward_model.py --prompts 0 --cache /tmp/rm_all.pt --out benchmarks/reward_model_all_prompts

Writes benchmarks/reward_model.json — spearman_global, spearman_within_prompt, pearson, mse, mse_constant
(medians over seeds; `seeds` holds each seed's figures, `seed0` the notebook's) — and benchmarks/reward_model.md.
"""
import dataclasses
import argparse
import json
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from base_eval import load_notebook, notebook_config  # noqa: E402

FIELDS = ("spearman_global", "spearman_within_prompt", "pearson", "mse", "mse_constant")


def reward_data(nb, P: dict, model, tok, pairs: list[dict], embedder, cache_path) -> dict:
    """The notebook's reward-model data for `pairs` with its RM_* settings (section 6), cached at cache_path."""
    return nb.build_reward_data(model, tok, pairs, embedder, temperatures=P.RM_TEMPERATURES,
                                n_mismatched=P.RM_MISMATCHED, max_new_tokens=P.MAX_NEW_TOKENS,
                                batch_size=P.RM_BATCH_SIZE, seed=P.SEED, cache_path=cache_path,
                                model_name=P.MODEL)


def fit_split(nb, P: dict, data: dict, seed: int):
    """Split by prompt and fit the reward MLP with `seed`, as the notebook does: (model, split, history)."""
    split = nb.split_by_prompt(data["prompt_id"], P.RM_VAL_FRAC, P.RM_TEST_FRAC, seed=seed)
    rm, hist = nb.fit_reward_mlp(data["prompt_emb"], data["response_emb"], data["label"], split["train"],
                                 split["val"], hidden=P.RM_HIDDEN, lr=P.RM_LR, max_epochs=P.RM_MAX_EPOCHS,
                                 patience=P.RM_PATIENCE, seed=seed)
    return rm, split, hist


def fit_once(nb, P, data, seed):
    """Split by prompt and fit with `seed`; the held-out test figures and the fit's epochs and seconds."""
    t0 = time.time()
    rm, split, hist = fit_split(nb, P, data, seed)
    m = nb.evaluate_reward_model(rm, data, split["test"], split["train"])
    figures = {k: v for k, v in m.items() if isinstance(v, (int, float))}
    return figures | {"best_epoch": hist["best_epoch"], "fit_seconds": time.time() - t0,
                      "test_prompts": len(torch.unique(data["prompt_id"][split["test"]]))}


def markdown_report(r: dict) -> str:
    s = r["settings"]
    rows = [f"| {name} | {r[name]:.3f} | {min(x[name] for x in r['seeds']):.3f} – {max(x[name] for x in r['seeds']):.3f} |"
            for name in FIELDS]
    return "\n".join([
        "# Reward MLP vs the true similarity, on held-out prompts", "",
        f"Model `{r['model']}`, {r['train_prompts']} train prompts of `{r['data']}`; per prompt one sampled response "
        f"per temperature {s['temperatures']} ({s['max_new_tokens']} new tokens, base model), plus the reference "
        f"and {s['n_mismatched']} mismatched references as anchors: rows {r['rows']}. Prompts split "
        f"{1 - s['val_frac'] - s['test_frac']:.2f} / {s['val_frac']} / {s['test_frac']} train / early-stopping / "
        f"test; figures on the test prompts' generated responses only (~{r['seed0']['n']} responses, "
        f"{r['seed0']['test_prompts']} prompts), median and range over {len(r['seeds'])} split+init seeds. "
        "`mse_constant` predicts the training mean; `spearman_within_prompt` is the mean over test prompts of the "
        "rank correlation among that prompt's own samples (what PPO's advantages use).", "",
        "| figure | median | range over seeds |", "|---|---|---|", *rows, "",
        f"Goal spearman_global ≥ 0.8: **{'met' if r['spearman_global'] >= 0.8 else 'not met'}**.", "",
        f"Time: data {r['seconds']['data']:.0f} s ({'read from the cache' if r['data_cached'] else 'generated'}), "
        f"one fit {statistics.median(x['fit_seconds'] for x in r['seeds']):.1f} s (median) on {r['machine']}, "
        f"{r['threads']} torch threads; the machine was shared, so timings are noisy.", ""])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="JSONL pairs (default: data/pairs.jsonl, else DATA_PATH)")
    ap.add_argument("--cache", default=str(ROOT / "runs" / "default" / "reward_data.safetensors"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=None, help="override RM_PROMPTS (0 = all train prompts)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: steadier on a shared machine, where 2 threads oversubscribe)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "reward_model"), help="output path without suffix")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    P = notebook_config()
    nb = load_notebook()
    data_path = args.data or ("data/pairs.jsonl" if (ROOT / "data" / "pairs.jsonl").exists() else P.DATA_PATH)
    nb.seed_everything(P.SEED)
    device = nb.resolve_device(P.DEVICE)
    model, tok = nb.load_policy(P, device)
    embedder = nb.Embedder(P.EMBEDDER, device=device)
    train = nb.split_pairs(nb.load_pairs(str(ROOT / data_path)), "train")
    if args.prompts is not None:
        P = dataclasses.replace(P, RM_PROMPTS=args.prompts)
    train = train[:P.RM_PROMPTS] if P.RM_PROMPTS else train
    t0 = time.time()
    data = reward_data(nb, P, model, tok, train, embedder, args.cache)
    t_data = time.time() - t0
    seeds = [fit_once(nb, P, data, P.SEED + k) for k in range(args.seeds)]
    result = {name: statistics.median(s[name] for s in seeds) for name in FIELDS}
    result |= {"seed0": seeds[0], "seeds": seeds, "model": P.MODEL, "data": data_path, "train_prompts": len(train),
               "rows": dict(Counter(data["kind"])), "data_cached": data["cached"],
               "settings": {"temperatures": P.RM_TEMPERATURES, "n_mismatched": P.RM_MISMATCHED,
                            "max_new_tokens": P.MAX_NEW_TOKENS, "val_frac": P.RM_VAL_FRAC,
                            "test_frac": P.RM_TEST_FRAC, "hidden": P.RM_HIDDEN, "lr": P.RM_LR},
               "seconds": {"data": t_data}, "machine": f"{platform.machine()} {device.type}",
               "threads": torch.get_num_threads()}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown_report(result))
    print(markdown_report(result))


if __name__ == "__main__":
    main()
