"""The headline result (issue 10): the default configuration trained for TRAIN_BUDGET_S on this CPU, over seeds.

For every seed: a fresh base model + LoRA, the reward MLP fitted with that seed (on the reward-model data, which
is sampled once from the base model and cached), `train_loop` exactly as the notebook's training cell runs it,
then the whole eval split answered greedily (EVAL_MAX_NEW_TOKENS new tokens) and compared with the base model's
answers to the same prompts. Each seed's result is cached under runs/bench/, so a killed run loses at most the
seed in progress; rerunning picks up the rest.

    .venv/bin/python benchmarks/ppo_seeds.py                          # 3 seeds x 1200 s: ~75 min on 2 cores
    .venv/bin/python benchmarks/ppo_seeds.py --seeds 0 --budget 300 --set PPO_LR=3e-4 --out /tmp/try
    .venv/bin/python benchmarks/ppo_seeds.py --params tests/tiny_params.json --budget 5 --out /tmp/tiny

Writes <out>.json (gain_mean, gain_min, gain_ci_low, gain_ci_high, per-family gains, kl_mean, distinct2_ratio,
eos_rate_before/after, mean_len_before/after, wall_s, peak_rss_mb; each seed's figures) and <out>.md.
`ablations.py` runs variants of the configuration through the same functions.
"""
import dataclasses
import argparse
import ast
import hashlib
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from base_eval import load_notebook  # noqa: E402
from nbimport import notebook_config  # noqa: E402,F401  (ppo_seeds.notebook_config: the other scripts)
from reward_model import fit_split, reward_data  # noqa: E402

ROW_KEYS = ("prompt", "similarity", "length", "eos")  # what a run keeps of each evaluated answer
JUDGED_ROW_KEYS = ("response", "reference", "first_sentence_similarity", "indep_similarity", "chrf")  # with a judge


def parse_value(text: str):
    """--set values: JSON when it parses (numbers, lists, true/false), else a Python literal (True, ('a', 'b')),
    else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text


def overrides_of(params_file: str | None, sets: list[str]) -> dict:
    """A JSON file of overrides, then NAME=VALUE overrides (an unknown name stops the script)."""
    overrides = json.loads(Path(params_file).read_text()) if params_file else {}
    for item in sets:
        name, _, value = item.partition("=")
        if name not in {f.name for f in dataclasses.fields(notebook_config())}:
            raise SystemExit(f"--set {name}: no such knob in the notebook's Config")
        overrides[name] = parse_value(value)
    return overrides


def fresh_model(nb, P: dict, seed: int, device):
    """Base model + a LoRA adapter initialised with `seed`: the notebook's load_policy (section 1)."""
    nb.seed_everything(seed)
    return nb.load_policy(P, device)


def cached_json(nb, path: Path, compute) -> dict:
    """Read path if it exists, else compute(), write it atomically (the notebook's write_json_atomic) and return it."""
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    nb.write_json_atomic(path, result)
    return result


def key_of(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


# Knobs added after runs were cached, each at the value that reproduces how those runs trained: left out of a
# run's key while at that value, so `--reuse` of a committed JSON and the cache keep matching.
NEUTRAL = {"PPO_WHOLE_GROUPS": False, "PREFIX_SHARING": False, "SFT_RL_SPLIT": 0.0, "RL_AFTER_SFT_LR_SCALE": 1.0,
           "RL_AFTER_SFT_PTX_SCALE": 1.0, "SYSTEM_PROMPT": "", "DATA_COLUMNS": {}, "EVAL_FRAC": 0.2,
           "BOK_SAMPLES": 8, "BOK_MARGIN": 0.5, "BOK_PROMPTS_PER_STEP": 4,
           "UNLABELLED_FRAC": 0.0}  # BOK_: only "sft+bok" reads them
NOT_TRAINING = ("DEMO", "FFT", "RUN_DIR", "RESUME", "EXPORT_")  # what a run's numbers never depend on


def run_key_fields(P, skip: tuple = ()) -> dict:
    """P's knobs that make two runs the same run: all but those starting with NOT_TRAINING or `skip`, and the
    NEUTRAL ones at their neutral value."""
    return {k: v for k, v in dataclasses.asdict(P).items()
            if not k.startswith(NOT_TRAINING + tuple(skip)) and not (k in NEUTRAL and v == NEUTRAL[k])}


class Context:
    """What every run shares: the notebook, its parameters, the data, the embedder, the base model's eval answers
    and the reward-model data (both computed once and cached under `cache`)."""

    def __init__(self, P: dict, cache: Path, threads: int):
        torch.set_num_threads(threads)
        self.nb, self.P, self.cache = load_notebook(), P, cache
        self.device = self.nb.resolve_device(P.DEVICE)
        pairs = self.nb.load_pairs(str(ROOT / P.DATA_PATH), P.DATA_COLUMNS, P.EVAL_FRAC)
        self.train_pairs, eval_pairs = self.nb.split_pairs(pairs, "train"), self.nb.split_pairs(pairs, "eval")
        self.eval_pairs = eval_pairs[:P.EVAL_N] if P.EVAL_N else eval_pairs
        self.embedder = self.nb.Embedder(P.EMBEDDER, device=self.device)
        eval_keys = ("MODEL", "DATA_PATH", "EVAL_N", "EVAL_MAX_NEW_TOKENS", "EVAL_TEMPERATURE", "LOGITS_MODE")
        self.base_eval = cached_json(self.nb, cache / f"base_eval-{key_of({k: getattr(P, k) for k in eval_keys})}.json",
                                     lambda: self.nb.evaluate(*fresh_model(self.nb, P, P.SEED, self.device),
                                                              self.eval_pairs, self.embedder, P, with_kl=False,
                                                              progress=False))
        self._rm_data = {}

    def reward_data(self, model, tok, frac: float = 0.0) -> dict:
        """The notebook's reward-model data (sampled from the base model; cached on disk by the notebook), on the
        labelled train pairs of UNLABELLED_FRAC = frac (all of them at 0), as the notebook's section 6 cell."""
        if frac not in self._rm_data:
            P, labelled = self.P, self.nb.unlabelled_split(self.train_pairs, frac)[0]
            rm_pairs = labelled[:P.RM_PROMPTS] if P.RM_PROMPTS else labelled
            name = "reward_data.safetensors" if frac == 0 else f"reward_data-unlabelled{frac:g}.safetensors"
            self._rm_data[frac] = reward_data(self.nb, P, model, tok, rm_pairs, self.embedder, self.cache / name)
        return self._rm_data[frac]

    def reward_fn(self, P: dict, model, tok, seed: int):
        """REWARD_FN as the notebook builds it; the MLP is fitted with `seed` (split and initialisation)."""
        nb = self.nb
        if P.REWARD_FN != "mlp":
            return nb.make_reward_fn(P.REWARD_FN, self.embedder, None, device=self.device)
        rm, _, _ = fit_split(nb, P, self.reward_data(model, tok, P.UNLABELLED_FRAC), seed)
        return nb.make_reward_fn("mlp", self.embedder, rm.to(self.device), device=self.device)


def train_ppo(ctx: Context, P: dict, model, tok, seed: int, run_path: Path) -> dict:
    """The notebook's training cell: PPO with P's configuration until TRAIN_BUDGET_S. Returns training figures."""
    nb = ctx.nb
    reward_fn = ctx.reward_fn(P, model, tok, seed)
    nb.seed_everything(seed)
    state = nb.make_ppo_state(model, tok, P)
    sampler = nb.PromptSampler(ctx.train_pairs, seed)
    logs = nb.train_loop(state, sampler, reward_fn, run_path, budget_s=P.TRAIN_BUDGET_S,
                         max_iterations=P.TRAIN_MAX_ITERS, ckpt_every=0, progress=sys.stderr.isatty())
    last = logs[-5:]
    return {"iterations": len(logs), "responses": len(logs) * P.PPO_BATCH_SIZE,
            "final_score": float(np.mean([r["score"] for r in last])) if last else float("nan"),
            "final_kl_ref": float(np.mean([r["kl_ref"] for r in last])) if last else float("nan"),
            "curve": [{k: r.get(k) for k in ("iteration", "score", "kl_ref", "response_len", "eos_rate")} for r in logs]}


def train_sft(ctx: Context, P: dict, model, tok, seed: int, run_path: Path) -> dict:
    """Supervised fine-tuning on the references with the same LoRA, budget and learning rate as PPO."""
    nb = ctx.nb
    nb.seed_everything(seed)
    sampler = nb.PromptSampler(ctx.train_pairs, seed)
    logs = nb.sft_train(model, tok, sampler, budget_s=P.TRAIN_BUDGET_S, max_steps=P.TRAIN_MAX_ITERS,
                        batch_size=P.PPO_MINIBATCH_SIZE, lr=P.PPO_LR,
                        max_grad_norm=P.MAX_GRAD_NORM, progress=sys.stderr.isatty())
    return {"iterations": len(logs), "final_loss": float(np.mean([r["loss"] for r in logs[-5:]])) if logs else float("nan")}


def run_one(ctx: Context, P: dict, seed: int, method: str, run_path: Path) -> dict:
    """Fresh model, train (PPO or SFT; its log in run_path), evaluate after; the paired comparison with the base."""
    t0 = time.time()
    model, tok = fresh_model(ctx.nb, P, seed, ctx.device)
    train = (train_ppo if method == "ppo" else train_sft)(ctx, P, model, tok, seed, run_path)
    return evaluate_after(ctx, P, model, tok, seed, t0, {"method": method, "train": train})


def evaluate_after(ctx: Context, P: dict, model, tok, seed: int, t0: float, fields: dict) -> dict:
    """The trained model on the whole eval split (greedy) and its paired comparison with the base; `fields`
    (what was trained, its figures) lead the record. t0: when the run started (for train_seconds / wall_s)."""
    t_train = time.time() - t0
    judge = getattr(ctx, "judge", None)  # pipeline_seeds.py sets one: its rows keep the answers and its metrics
    after = ctx.nb.evaluate(model, tok, ctx.eval_pairs, ctx.embedder, P, with_kl=P.EVAL_KL, progress=False,
                            judge=judge)
    comparison = ctx.nb.paired_comparison(ctx.base_eval, after, n_boot=P.BOOTSTRAP, seed=seed)
    rows = after["rows"]
    return {"seed": seed, **fields, "train_seconds": t_train, "wall_s": time.time() - t0,
            "gain": comparison["overall"]["diff"], "comparison": comparison, "table": after["table"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # this process, so far
            "kl_mean": float(np.mean([r.get("kl", float("nan")) for r in rows])),
            "examples": [{k: r[k] for k in ("prompt", "family", "response", "similarity")} for r in rows[::20]],
            "rows": [{k: r[k] for k in ROW_KEYS + (JUDGED_ROW_KEYS if judge else ()) if k in r} for r in rows]}


def run_seeds(ctx: Context, P: dict, seeds: list[int], name: str, method: str = "ppo") -> list[dict]:
    """run_one per seed, each cached as <cache>/<name>-<config key>-s<seed>.json."""
    key = key_of(run_key_fields(P) | {"m": method})
    out = []
    for seed in seeds:
        path = ctx.cache / f"{name}-{key}-s{seed}.json"
        out.append(cached_json(ctx.nb, path, lambda: run_one(ctx, P, seed, method, ctx.cache / "runs" / path.stem)))
        print(f"{name} seed {seed}: gain {out[-1]['gain']:+.3f} ({out[-1]['train']['iterations']} iterations, "
              f"{out[-1]['wall_s']:.0f} s)", flush=True)
    return out


def paired_gain_ci(ctx: Context, runs: list[dict], n_boot: int, seed: int = 0) -> tuple[float, float]:
    """95% paired-bootstrap interval of the mean gain: prompts resampled, the gain averaged over seeds."""
    base = {r["prompt"]: r["similarity"] for r in ctx.base_eval["rows"]}
    diff = np.mean([[r["similarity"] - base[r["prompt"]] for r in run["rows"]] for run in runs], axis=0)
    return ctx.nb.bootstrap_ci(diff.tolist(), n_boot, seed=seed)


def gain_at_equal_length(ctx: Context, runs: list[dict]) -> tuple[float, float]:
    """Mean gain over the prompts whose answer hit the length cap both before and after (so the length did not
    change), and that share of all (prompt, seed) pairs: how much of the gain is not a change of length."""
    cap, base = ctx.P.EVAL_MAX_NEW_TOKENS, {r["prompt"]: r for r in ctx.base_eval["rows"]}
    diffs = [r["similarity"] - base[r["prompt"]]["similarity"] for run in runs for r in run["rows"]
             if r["length"] >= cap and base[r["prompt"]]["length"] >= cap]
    total = sum(len(run["rows"]) for run in runs)
    return (float(np.mean(diffs)) if diffs else float("nan")), len(diffs) / max(total, 1)


def summarize(ctx: Context, runs: list[dict]) -> dict:
    """The issue's named fields over seeds."""
    base_t = ctx.base_eval["table"]["overall"]
    gains = [r["gain"] for r in runs]
    lo, hi = paired_gain_ci(ctx, runs, ctx.P.BOOTSTRAP)
    families = sorted(k for k in runs[0]["comparison"] if k != "overall")
    capped_gain, capped_share = gain_at_equal_length(ctx, runs)
    return {"gain_mean": float(np.mean(gains)), "gain_min": float(min(gains)), "gain_std": float(np.std(gains)),
            "gain_ci_low": lo, "gain_ci_high": hi, "gains": gains,
            "family_gains": {f: float(np.mean([r["comparison"][f]["diff"] for r in runs])) for f in families},
            "similarity_before": base_t["similarity"],
            "similarity_after": float(np.mean([r["table"]["overall"]["similarity"] for r in runs])),
            "kl_mean": float(np.mean([r["kl_mean"] for r in runs])),
            "distinct2_ratio": float(np.mean([r["table"]["overall"]["distinct2"] for r in runs]) / base_t["distinct2"]),
            "eos_rate_before": base_t["eos_frac"],
            "eos_rate_after": float(np.mean([r["table"]["overall"]["eos_frac"] for r in runs])),
            "mean_len_before": base_t["length"],
            "mean_len_after": float(np.mean([r["table"]["overall"]["length"] for r in runs])),
            "iterations_mean": float(np.mean([r["train"]["iterations"] for r in runs])),
            "gain_both_capped": capped_gain, "share_both_capped": capped_share}


def markdown_report(r: dict) -> str:
    """The committed table."""
    fam = " · ".join(f"{k} {v:+.2f}" for k, v in r["family_gains"].items())
    acc = r["acceptance"]
    lines = [
        "# Headline: PPO with the default configuration, over seeds", "",
        f"Model `{r['model']}`, data `{r['data']}`: {r['eval_prompts']} eval prompts answered greedily "
        f"({r['eval_max_new_tokens']} new tokens) before and after {r['budget_s']} s of training per seed "
        f"({r['threads']} torch thread(s), {r['machine']}). Similarity = 10 × cos(all-MiniLM-L6-v2). The interval is a "
        f"95% paired bootstrap over prompts of the seed-averaged gain. {r.get('note', '')}", "",
        "| figure | value |", "|---|---|",
        f"| gain, mean over seeds | **{r['gain_mean']:+.2f}** (per seed {', '.join(f'{g:+.2f}' for g in r['gains'])}) |",
        f"| 95% interval | [{r['gain_ci_low']:+.2f}, {r['gain_ci_high']:+.2f}] |",
        f"| similarity before → after | {r['similarity_before']:.2f} → {r['similarity_after']:.2f} |",
        f"| gain per family | {fam} |",
        f"| KL(policy ‖ base) per answer | {r['kl_mean']:.2f} nats |",
        f"| distinct-2 after / before | {r['distinct2_ratio']:.3f} |",
        f"| EOS rate before → after | {r['eos_rate_before']:.2f} → {r['eos_rate_after']:.2f} |",
        f"| mean length before → after (tokens) | {r['mean_len_before']:.1f} → {r['mean_len_after']:.1f} |",
        f"| gain where the answer hit the {r['eval_max_new_tokens']}-token cap before and after (same length; "
        f"{r['share_both_capped']:.0%} of answers) | {r['gain_both_capped']:+.2f} |",
        f"| PPO iterations per seed (mean) | {r['iterations_mean']:.0f} |",
        f"| wall time, summed over seeds (training + evaluation) | {r['wall_s'] / 60:.1f} min; peak RSS {r['peak_rss_mb']:.0f} MB |", "",
        "Acceptance (gain_mean ≥ 0.75, every seed > 0.3, interval excludes 0, distinct2_ratio ≥ 0.9): "
        + ", ".join(f"{k} **{'yes' if v else 'no'}**" for k, v in acc.items()) + ".", ""]
    return "\n".join(lines)


def common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--params", default=None, help="JSON file of parameter overrides (e.g. tests/tiny_params.json)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override one parameter")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--cache", default=str(ROOT / "runs" / "bench"), help="per-seed results and shared caches")
    ap.add_argument("--note", default="", help="a sentence for the markdown (e.g. how the runs shared the machine)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap)
    ap.add_argument("--budget", type=float, default=1200, help="TRAIN_BUDGET_S per seed")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "ppo_seeds"), help="output path without suffix")
    args = ap.parse_args()
    P = notebook_config(**overrides_of(args.params, args.set) | {"TRAIN_BUDGET_S": args.budget})
    t0 = time.time()
    ctx = Context(P, Path(args.cache), args.threads)
    runs = run_seeds(ctx, P, args.seeds, "ppo_seeds")
    r = summarize(ctx, runs)
    r |= run_metadata(ctx, args, t0) | {
        "wall_s": sum(x["wall_s"] for x in runs), "peak_rss_mb": max(x["peak_rss_mb"] for x in runs),
        "acceptance": {"gain_mean>=0.75": r["gain_mean"] >= 0.75, "every_seed>0.3": r["gain_min"] > 0.3,
                       "ci_excludes_0": r["gain_ci_low"] > 0, "distinct2_ratio>=0.9": r["distinct2_ratio"] >= 0.9},
        "runs": runs}
    write_report(args.out, r, markdown_report(r))


def run_metadata(ctx: Context, args, t0: float) -> dict:
    """What a result was measured on (both scripts' JSON start with it)."""
    P = ctx.P
    return {"model": P.MODEL, "data": P.DATA_PATH, "eval_prompts": len(ctx.eval_pairs), "budget_s": args.budget,
            "seeds": args.seeds, "eval_max_new_tokens": P.EVAL_MAX_NEW_TOKENS, "threads": args.threads,
            "machine": platform.machine(), "cpu": cpu_name(), "cpu_bf16": ctx.nb.cpu_has_bf16(), "overrides": args.set, "note": args.note, "this_call_s": time.time() - t0}


def micro_setup(args) -> tuple:
    """A micro-benchmark's start: args.threads torch threads, then (the 1-minute load averages now, the notebook, its
    parameters with the --params JSON's overrides)."""
    torch.set_num_threads(args.threads)
    load = list(os.getloadavg())
    return load, load_notebook(), notebook_config(**(json.loads(Path(args.params).read_text()) if args.params else {}))


def cpuinfo_field(key: str) -> str:
    """The value of the first `key` line of /proc/cpuinfo ('' where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), "")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo ('' where there is none): figures differ a lot between CPUs."""
    return cpuinfo_field("model name")


def cpu_flags() -> list[str]:
    """The vector-unit flags of this CPU that decide its matmul kernels (avx2, avx512f, avx512_bf16, amx_bf16)."""
    return sorted(set(cpuinfo_field("flags").split()) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})


def write_report(out: str, result: dict, markdown: str) -> None:
    """<out>.json and <out>.md, and the markdown printed."""
    out = Path(out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
