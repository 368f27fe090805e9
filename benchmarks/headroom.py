"""The headroom RL can distil (issue 20, baselines step 2): greedy vs the best of K sampled answers.

On the first --n-prompts eval prompts (the same number from each family, so every family is represented), for the
base model and for an SFT model (a fresh LoRA, seed --seed, trained with the notebook's `sft_train` for
--sft-budget seconds with the notebook's LoRA / PPO_LR / PPO_MINIBATCH_SIZE; `ppo_seeds.train_sft`):
- the greedy answer's similarity (the notebook's evaluation: `evaluate`, temperature 0, EVAL_MAX_NEW_TOKENS);
- for each temperature T (0.7 and 1.0), K_max = 32 sampled answers per prompt (same cap, TOP_K, TOP_P and
  LOGITS_MODE as the evaluation), scored with the notebook's `similarity`, from which
  - best_of[K] for K = 1, 2, 4, ..., 32: the expected maximum over a random K-subset of the 32 scores, drawn
    without replacement, computed exactly from the sorted scores (`best_of_k`; best_of[1] is the mean score);
  - mean_sample: the mean score of the samples; spread: the std of a prompt's 32 scores (ddof 0), averaged over
    prompts — how much signal one group of samples carries;
  - sample_length and sample_eos_frac: the samples' mean length in tokens and the share that stop at EOS.
All per family and overall (a family's figure is the mean over its prompts). RL at best moves the greedy answer
toward the best samples; best_of[K] - greedy says how far that is.

    .venv/bin/python benchmarks/headroom.py          # 2 models x 2 T x 24 prompts x 32 samples, + 300 s of SFT
    .venv/bin/python benchmarks/headroom.py --params tests/tiny_params.json --n-prompts 4 --sft-budget 2 \\
        --k-max 4 --out /tmp/headroom                # the tiny model, seconds

Writes <out>.json (settings, machine, threads, os.getloadavg() before/after this call, seconds of this call and
measured_seconds summed over resumed calls; models.<base|sft>.overall
and models.<base|sft>.per_family.<family>, each {n, greedy, temperatures: {T: {mean_sample, spread,
sample_length, sample_eos_frac, best_of: {K: value}}}}; every prompt's scores under rows), <out>.md and <out>.png
(best-of-K curves with the greedy lines). Intermediate results (greedy answers, the SFT adapter, the samples after
every generate() call) are cached under --cache (runs/bench/headroom/), so a killed run resumes where it stopped.
"""
import dataclasses
import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from base_eval import load_notebook  # noqa: E402
from ppo_seeds import cached_json, fresh_model, key_of, notebook_config, overrides_of, train_sft  # noqa: E402

# Parameters that change the base model's answers (the cache key of its results); the SFT model adds SFT_KEYS.
ANSWER_KEYS = ("MODEL", "DEVICE", "DTYPE", "DATA_PATH", "EMBEDDER", "EVAL_MAX_NEW_TOKENS", "TOP_K", "TOP_P",
               "LOGITS_MODE", "PCA_K", "EVAL_BATCH_SIZE", "LORA_R", "LORA_ALPHA", "LORA_DROPOUT", "LORA_TARGETS")
# (train_sft's LR / batch / step cap, under either the PPO_* or the SFT_* names; those the notebook has are used)
SFT_KEYS = ("PPO_LR", "PPO_MINIBATCH_SIZE", "MAX_GRAD_NORM", "TRAIN_MAX_ITERS", "SFT_LR", "SFT_BATCH_SIZE",
            "SFT_MAX_STEPS")


def balanced_prompts(pairs: list[dict], n: int) -> list[dict]:
    """The first n pairs taking families in turn (n = 4m with 4 families: the first m of each), in data order;
    n = 0 (or n >= len) keeps every pair."""
    if not n or n >= len(pairs):
        return list(pairs)
    by_family: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        by_family.setdefault(p["family"], []).append(i)
    turns = [idx[j] for j in range(max(map(len, by_family.values()))) for idx in by_family.values() if j < len(idx)]
    return [pairs[i] for i in sorted(turns[:n])]


def k_values(k_max: int) -> list[int]:
    """1, 2, 4, ... up to k_max (k_max itself last, even when it is not a power of two)."""
    ks = [2 ** j for j in range(int(math.log2(k_max)) + 1)]
    return ks if ks[-1] == k_max else ks + [k_max]


def best_of_k(scores, ks: list[int]) -> dict[int, float]:
    """Expected max of a uniformly random K-subset (without replacement) of one prompt's n scores, exactly:
    with s_(1) <= ... <= s_(n) sorted, E[max] = sum_i s_(i) C(i-1, K-1) / C(n, K) (s_(i) is the max of the
    C(i-1, K-1) subsets whose other K-1 members lie below it). scores: [n] floats; every K in 1..n."""
    s, n = np.sort(np.asarray(scores, dtype=np.float64)), len(scores)
    out = {}
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(f"best_of_k: K={k} needs 1 <= K <= {n} scores")
        weights = np.array([math.comb(i - 1, k - 1) / math.comb(n, k) for i in range(1, n + 1)])
        out[k] = float(weights @ s)
    return out


def sample_chunk(nb, P: dict, model, tok, embedder, pairs: list[dict], k: int, temperature: float,
                 seed: int) -> list[dict]:
    """k sampled answers to each of `pairs` in one generate() call of len(pairs) * k rows (each prompt's k rows
    together), scored against its reference. Returns per pair {scores: [k], length: mean tokens, eos: share}."""
    prompts = [nb.chat_prompt(tok, p["prompt"]) for p in pairs for _ in range(k)]
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    gen = nb.generate(model, tok, prompts, max_new_tokens=P.EVAL_MAX_NEW_TOKENS, temperature=temperature,
                      top_k=P.TOP_K, top_p=P.TOP_P, logits_mode=P.LOGITS_MODE, pca_k=P.PCA_K,
                      pca_seed=seed, generator=generator)
    scores = nb.similarity(gen.texts, [p["reference"] for p in pairs for _ in range(k)], embedder).tolist()
    lengths, eos = gen.response_mask.sum(-1).tolist(), [s == "eos" for s in gen.stop_reason]
    return [{"scores": scores[j * k:(j + 1) * k], "length": float(np.mean(lengths[j * k:(j + 1) * k])),
             "eos": float(np.mean(eos[j * k:(j + 1) * k]))} for j in range(len(pairs))]


class Stack:
    """The notebook, its parameters, the eval prompts and the cache folder; the embedder is loaded on first use."""

    def __init__(self, args):
        torch.set_num_threads(args.threads)
        self.args, self.nb = args, load_notebook()
        self.P = notebook_config(**overrides_of(args.params, args.set))
        self.device = self.nb.resolve_device(self.P.DEVICE)
        pairs = self.nb.load_pairs(str(ROOT / self.P.DATA_PATH), self.P.DATA_COLUMNS, self.P.EVAL_FRAC)
        self.train_pairs = self.nb.split_pairs(pairs, "train")
        self.pairs = balanced_prompts(self.nb.split_pairs(pairs, "eval"), args.n_prompts)
        self.ks, self.temperatures = k_values(args.k_max), [float(t) for t in args.temperatures]
        settings = {k: getattr(self.P, k) for k in ANSWER_KEYS} | {"n_prompts": args.n_prompts, "k_max": args.k_max,
                                                          "batch_rows": args.batch_rows, "seed": args.seed}
        self.sft_parameters = {k: getattr(self.P, k) for k in SFT_KEYS if hasattr(self.P, k)}
        sft = settings | self.sft_parameters | {"sft_budget_s": args.sft_budget}
        self.folders = {"base": Path(args.cache) / f"base-{key_of(settings)}",
                        "sft": Path(args.cache) / f"sft-{key_of(sft)}"}
        self._embedder = None

    @property
    def embedder(self):
        if self._embedder is None:
            self._embedder = self.nb.Embedder(self.P.EMBEDDER, device=self.device)
        return self._embedder


def sample_scores(stack: Stack, model, tok, temperature: float, path: Path) -> None:
    """sample_chunk over every prompt, --batch-rows rows per call (at least one prompt); the results so far are
    rewritten to `path` after each call and read back on a rerun, so a killed run resumes. Seeded per chunk."""
    nb, args, k = stack.nb, stack.args, stack.args.k_max
    done = json.loads(path.read_text()) if path.exists() else {}
    per_call = max(1, args.batch_rows // k)
    t0 = time.time()
    for start in range(0, len(stack.pairs), per_call):
        if str(start) in done:
            continue
        seed, t_chunk = int(key_of([args.seed, temperature, start]), 16), time.time()
        with torch.no_grad():
            rows = sample_chunk(nb, stack.P, model, tok, stack.embedder, stack.pairs[start:start + per_call], k,
                                temperature, seed)
        done[str(start)] = [r | {"seconds": (time.time() - t_chunk) / len(rows), "load1": os.getloadavg()[0]}
                            for r in rows]
        path.parent.mkdir(parents=True, exist_ok=True)
        nb.write_json_atomic(path, done)
        print(f"  T={temperature}: {min(start + per_call, len(stack.pairs))}/{len(stack.pairs)} prompts, "
              f"{time.time() - t0:.0f} s", flush=True)


def load_or_train_sft(stack: Stack, model, tok) -> dict:
    """Train the fresh LoRA with `ppo_seeds.train_sft` for --sft-budget s and save the adapter, or load the saved
    one (the figures file is written after the adapter, so its presence means the adapter is complete)."""
    nb, folder = stack.nb, stack.folders["sft"]
    figures, adapter = folder / "sft_train.json", folder / "adapter"
    if figures.exists():
        set_peft_model_state_dict(model, load_file(str(adapter / "adapter_model.safetensors")))
        model.eval()
        return json.loads(figures.read_text())
    P = dataclasses.replace(stack.P, TRAIN_BUDGET_S=stack.args.sft_budget)
    t0 = time.time()
    lean = argparse.Namespace(nb=nb, train_pairs=stack.train_pairs)  # all that train_sft reads of its context
    train = train_sft(lean, P, model, tok, stack.args.seed, folder) | {"seconds": time.time() - t0}
    shutil.rmtree(folder / "adapter.tmp", ignore_errors=True)
    model.save_pretrained(folder / "adapter.tmp")
    shutil.rmtree(adapter, ignore_errors=True)
    os.replace(folder / "adapter.tmp", adapter)
    nb.write_json_atomic(figures, train)
    return train


def measure_model(stack: Stack, name: str) -> dict:
    """Greedy answers and the samples at every T for `name` ('base' or 'sft'), each cached in its folder; the
    model is only loaded (and for 'sft' trained, or its saved adapter loaded) if something is not cached yet."""
    nb, P, folder = stack.nb, stack.P, stack.folders[name]
    loaded, out, t0 = [], {"temperatures": {}}, time.time()

    def model_tok():
        if not loaded:
            model, tok = fresh_model(nb, P, stack.args.seed, stack.device)
            model.eval()
            out["train"] = load_or_train_sft(stack, model, tok) if name == "sft" else None
            loaded.extend([model, tok])
        return loaded

    greedy_P = dataclasses.replace(P, EVAL_TEMPERATURE=0.0)

    def greedy_answers():
        model, tok = model_tok()
        t_greedy = time.time()
        result = nb.evaluate(model, tok, stack.pairs, stack.embedder, greedy_P, with_kl=False, progress=False)
        return result | {"seconds": time.time() - t_greedy}

    greedy = cached_json(nb, folder / "greedy.json", greedy_answers)
    out["greedy"], out["greedy_seconds"] = [r["similarity"] for r in greedy["rows"]], greedy["seconds"]
    for t in stack.temperatures:
        path = folder / f"samples-T{t}.json"
        if not finished(stack, path):
            print(f"{name}: {stack.args.k_max} samples per prompt at T={t}", flush=True)
            sample_scores(stack, *model_tok(), t, path)
        done = json.loads(path.read_text())
        out["temperatures"][str(t)] = [row for start in sorted(done, key=int) for row in done[start]]
    if name == "sft" and "train" not in out:
        out["train"] = json.loads((folder / "sft_train.json").read_text())
    out["seconds"] = time.time() - t0
    chunks = [r for rows in out["temperatures"].values() for r in rows]
    out["sample_seconds"], out["load1_max"] = sum(r["seconds"] for r in chunks), max(r["load1"] for r in chunks)
    return out


def finished(stack: Stack, path: Path) -> bool:
    """Whether a samples file holds every prompt (then the model need not be loaded for it)."""
    return path.exists() and sum(len(v) for v in json.loads(path.read_text()).values()) == len(stack.pairs)


def group_figures(greedy: list[float], samples: dict[str, list[dict]], ks: list[int], idx: list[int]) -> dict:
    """Figures of the prompts `idx`: n, greedy, and per T mean_sample, spread, sample_length, sample_eos_frac and
    best_of {K: mean over the prompts of best_of_k}. samples: {T: per-prompt {scores, length, eos}}."""
    out = {"n": len(idx), "greedy": float(np.mean([greedy[i] for i in idx])), "temperatures": {}}
    for t, rows in samples.items():
        rows = [rows[i] for i in idx]
        per_prompt = [best_of_k(r["scores"], ks) for r in rows]
        out["temperatures"][t] = {
            "mean_sample": float(np.mean([np.mean(r["scores"]) for r in rows])),
            "spread": float(np.mean([np.std(r["scores"]) for r in rows])),
            "sample_length": float(np.mean([r["length"] for r in rows])),
            "sample_eos_frac": float(np.mean([r["eos"] for r in rows])),
            "best_of": {str(k): float(np.mean([b[k] for b in per_prompt])) for k in ks}}
    return out


def summarize(stack: Stack, measured: dict) -> dict:
    """models.<name>: overall and per_family figures (group_figures), the SFT figures, seconds; and every row."""
    pairs, fams = stack.pairs, sorted({p["family"] for p in stack.pairs})
    models, rows = {}, []
    for name, m in measured.items():
        fig = lambda idx: group_figures(m["greedy"], m["temperatures"], stack.ks, idx)
        models[name] = {"overall": fig(list(range(len(pairs)))),
                        "per_family": {f: fig([i for i, p in enumerate(pairs) if p["family"] == f]) for f in fams},
                        "train": m.get("train"), "greedy_seconds": m["greedy_seconds"],
                        "sample_seconds": m["sample_seconds"], "this_call_seconds": m["seconds"],
                        "loadavg_during_sampling_max": m["load1_max"]}
        rows += [{"model": name, "prompt": p["prompt"], "family": p["family"], "greedy": m["greedy"][i],
                  "samples": {t: s[i]["scores"] for t, s in m["temperatures"].items()}} for i, p in enumerate(pairs)]
    return {"models": models, "rows": rows}


def markdown_report(r: dict) -> str:
    """The committed table: rows model x T, columns greedy, mean sample, best-of K, spread; then per family."""
    s, ks = r["settings"], r["settings"]["ks"]
    lines = ["# Headroom: greedy vs the best of K sampled answers", "",
             f"Model `{s['model']}`, data `{s['data']}`: {s['n_prompts_used']} eval prompts ({s['per_family_n']}), "
             f"{s['k_max']} samples per prompt at each temperature, {s['max_new_tokens']} new tokens. SFT: a fresh "
             f"LoRA (seed {s['seed']}) trained with `sft_train` for {s['sft_budget_s']:g} s. Similarity = 10 × "
             f"cos(all-MiniLM-L6-v2). best-of-K = expected max over random K-subsets of the {s['k_max']} samples "
             f"(exact); spread = std of a prompt's {s['k_max']} scores, averaged over prompts. {r['threads']} torch "
             f"thread(s), {r['machine']}; {r['measured_seconds'] / 60:.1f} min of generation, scoring and SFT; "
             f"1-min load average at most {max(m['loadavg_during_sampling_max'] for m in r['models'].values()):.1f}"
             f" while sampling.", "",
             "| model | T | greedy | mean sample | " + " | ".join(f"best of {k}" for k in ks) + " | spread |",
             "|---" * (len(ks) + 5) + "|"]
    for name, m in r["models"].items():
        for t, v in m["overall"]["temperatures"].items():
            lines.append(f"| {name} | {t} | {m['overall']['greedy']:.2f} | {v['mean_sample']:.2f} | "
                         + " | ".join(f"{v['best_of'][str(k)]:.2f}" for k in ks) + f" | {v['spread']:.2f} |")
    lines += ["", f"Per family: greedy → best of {ks[-1]} (spread) at each T.", "",
              "| model | family | n | greedy | " + " | ".join(f"T={t}" for t in s["temperatures"]) + " |",
              "|---" * (len(s["temperatures"]) + 4) + "|"]
    for name, m in r["models"].items():
        for f, g in m["per_family"].items():
            cells = [f"{g['temperatures'][str(t)]['best_of'][str(ks[-1])]:.2f} "
                     f"({g['temperatures'][str(t)]['spread']:.2f})" for t in s["temperatures"]]
            lines.append(f"| {name} | {f} | {g['n']} | {g['greedy']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_headroom(r: dict, path) -> None:
    """Best-of-K curves (one per model x T, K on a log axis) and each model's greedy score as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    ks = r["settings"]["ks"]
    for c, (name, m) in enumerate(r["models"].items()):
        ax.axhline(m["overall"]["greedy"], color=f"C{c}", ls="--", lw=1, label=f"{name}: greedy")
        for j, (t, v) in enumerate(m["overall"]["temperatures"].items()):
            ax.plot(ks, [v["best_of"][str(k)] for k in ks], marker="os^v"[j % 4], color=f"C{c}",
                    ls=("-", ":", "-.", (0, (5, 1)))[j % 4], label=f"{name}: best of K, T={t}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set(xlabel="K (samples per prompt)", ylabel="similarity (mean over prompts)",
           title=f"Headroom on {r['settings']['n_prompts_used']} eval prompts")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def settings_of(stack: Stack) -> dict:
    """What the JSON says it measured."""
    P, a = stack.P, stack.args
    fams = sorted({p["family"] for p in stack.pairs})
    return {"model": P.MODEL, "data": P.DATA_PATH, "n_prompts": a.n_prompts, "n_prompts_used": len(stack.pairs),
            "per_family_n": ", ".join(f"{f} {sum(p['family'] == f for p in stack.pairs)}" for f in fams),
            "k_max": a.k_max, "ks": stack.ks, "temperatures": stack.temperatures, "sft_budget_s": a.sft_budget,
            "seed": a.seed, "batch_rows": a.batch_rows, "max_new_tokens": P.EVAL_MAX_NEW_TOKENS,
            "top_k": P.TOP_K, "top_p": P.TOP_P, "logits_mode": P.LOGITS_MODE,
            "lora": {k: getattr(P, k) for k in ("LORA_R", "LORA_ALPHA", "LORA_DROPOUT", "LORA_TARGETS")},
            "sft_parameters": stack.sft_parameters, "overrides": a.set, "params_file": a.params}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None, help="JSON file of parameter overrides (e.g. tests/tiny_params.json)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override one parameter")
    ap.add_argument("--n-prompts", type=int, default=24, help="eval prompts, the same number per family; 0 = all")
    ap.add_argument("--sft-budget", type=float, default=300, help="seconds of sft_train for the SFT model")
    ap.add_argument("--k-max", type=int, default=32, help="samples per prompt (best-of-K for K = 1, 2, 4, ..., this)")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0])
    ap.add_argument("--batch-rows", type=int, default=32, help="rows per generate() call (prompts x k-max)")
    ap.add_argument("--seed", type=int, default=0, help="the SFT LoRA's seed and the sampling seed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=str(ROOT / "runs" / "bench" / "headroom"), help="intermediate results")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "headroom"), help="output path without suffix")
    args = ap.parse_args()
    load_before, t0 = os.getloadavg(), time.time()
    stack = Stack(args)
    measured = {name: measure_model(stack, name) for name in ("base", "sft")}
    r = {"settings": settings_of(stack), "machine": f"{platform.machine()} {stack.device.type}",
         "threads": args.threads, "loadavg_before": list(load_before)}
    r |= summarize(stack, measured) | {"loadavg_after": list(os.getloadavg()), "seconds": time.time() - t0}
    r["measured_seconds"] = sum(m["greedy_seconds"] + m["sample_seconds"] + (m["train"] or {}).get("seconds", 0)
                                for m in r["models"].values())  # over all (resumed) calls, not loading
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(r, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown_report(r))
    plot_headroom(r, out.with_suffix(".png"))
    print(markdown_report(r))


if __name__ == "__main__":
    main()
