"""Reporting: evaluation statistics (bootstrap intervals, per-family tables, paired comparisons, distinct-n),
the reward model's metrics, and the plots and committed tables the notebook shows. Never imports the notebook:
the reward model and the log records are handed in."""
from __future__ import annotations

import json, math, re
from pathlib import Path

import numpy as np
import torch

from rlft_support.judge import JUDGE_METRICS

ROW_METRICS = ("first_sentence_similarity",) + JUDGE_METRICS  # per-row metrics beside `similarity`, when present


def bootstrap_ci(values, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` ([N] numbers); (nan, nan) when empty."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    means = v[np.random.default_rng(seed).integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def distinct_n(text: str, n: int = 2) -> float:
    """Unique word n-grams / all word n-grams of one text (lower-cased words); nan when it has none."""
    words = re.findall(r"\w+", text.lower())
    grams = list(zip(*(words[i:] for i in range(n))))
    return len(set(grams)) / len(grams) if grams else float("nan")


def mean_distinct_n(texts: list[str], n: int = 2) -> float:
    """Mean of `distinct_n` over the texts that have an n-gram (0.0 if none has): 1 = no repeats within a response."""
    values = [d for d in (distinct_n(t, n) for t in texts) if not math.isnan(d)]
    return float(np.mean(values)) if values else 0.0


def summarize_rows(rows: list[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """Figures of one group of evaluated rows (see `evaluate`): n, similarity + 95% CI, length, EOS, distinct-2, KL."""
    sims = [r["similarity"] for r in rows]
    lo, hi = bootstrap_ci(sims, n_boot, seed=seed)
    out = {"n": len(rows), "similarity": float(np.mean(sims)), "ci_low": lo, "ci_high": hi,
           "length": float(np.mean([r["length"] for r in rows])),
           "eos_frac": float(np.mean([r["eos"] for r in rows])),
           "distinct2": mean_distinct_n([r["response"] for r in rows], 2)}
    if all("kl" in r for r in rows):
        out["kl"] = float(np.mean([r["kl"] for r in rows]))
    for m in [m for m in ROW_METRICS if rows and all(m in r for r in rows)]:  # the judge's (evaluate's judge=)
        lo_m, hi_m = bootstrap_ci([r[m] for r in rows], n_boot, seed=seed)
        out.update({m: float(np.mean([r[m] for r in rows])), f"{m}_ci_low": lo_m, f"{m}_ci_high": hi_m})
    return out


def summarize_by_family(rows: list[dict], n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """{family: figures, ..., 'overall': figures} (families sorted)."""
    families = sorted({r["family"] for r in rows})
    table = {f: summarize_rows([r for r in rows if r["family"] == f], n_boot, seed) for f in families}
    table["overall"] = summarize_rows(rows, n_boot, seed)
    return table


def paired_comparison(result_a: dict, result_b: dict, n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Per family and overall: mean of s_B - s_A over the same prompts, with a paired-bootstrap 95% interval."""
    a = {r["prompt"]: r for r in result_a["rows"]}
    b = {r["prompt"]: r for r in result_b["rows"]}
    if set(a) != set(b):
        raise ValueError(f"paired_comparison needs the same prompts in both results ({len(set(a) ^ set(b))} differ)")
    prompts = list(a)
    out = {}
    for fam in sorted({a[p]["family"] for p in prompts}) + ["overall"]:
        ps = [p for p in prompts if fam == "overall" or a[p]["family"] == fam]
        diff = [b[p]["similarity"] - a[p]["similarity"] for p in ps]
        lo, hi = bootstrap_ci(diff, n_boot, seed=seed)
        out[fam] = {"n": len(ps), "mean_a": float(np.mean([a[p]["similarity"] for p in ps])),
                    "mean_b": float(np.mean([b[p]["similarity"] for p in ps])),
                    "diff": float(np.mean(diff)), "ci_low": lo, "ci_high": hi}
    return out


def paired_gain(rows_a: list[dict], rows_b: list[dict], metric: str = "similarity", n_boot: int = 1000,
                seed: int = 0) -> dict:
    """Mean of metric_B - metric_A over the prompts both row lists hold (matched by prompt), with a paired-bootstrap
    95% interval: {n, diff, ci_low, ci_high}; n = 0 and nan when none."""
    a = {r["prompt"]: r for r in rows_a}
    diff = [r[metric] - a[r["prompt"]][metric] for r in rows_b if r["prompt"] in a]
    lo, hi = bootstrap_ci(diff, n_boot, seed=seed)
    return {"n": len(diff), "diff": float(np.mean(diff)) if diff else float("nan"), "ci_low": lo, "ci_high": hi}


def gain_by_base_stop(base_rows: list[dict], rows: list[dict], metric: str = "similarity", n_boot: int = 1000,
                      seed: int = 0) -> dict[str, dict]:
    """The paired gain of `rows` over `base_rows` split by how the BASE answer ended: 'base_eos' (it stopped by
    itself: the gain there is not the format's) and 'base_capped' (it hit the length cap) -> {split: paired_gain}."""
    stopped = {r["prompt"] for r in base_rows if r["eos"]}
    return {name: paired_gain(base_rows, [r for r in rows if (r["prompt"] in stopped) == keep], metric, n_boot, seed)
            for name, keep in (("base_eos", True), ("base_capped", False))}


def format_table(table: dict[str, dict], digits: int = 2) -> str:
    """A markdown table of `{row name: {column: value}}` (numbers rounded)."""
    cols = list(dict.fromkeys(c for row in table.values() for c in row))
    fmt = lambda v: f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    lines = ["| group | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fmt(row.get(c, "")) for c in cols) + " |" for name, row in table.items()]
    return "\n".join(lines)


def correlation(kind: str, a: np.ndarray, b: np.ndarray) -> float:
    """'pearson' or 'spearman' correlation of two [n] arrays; nan when n < 3 or either is constant."""
    from scipy.stats import pearsonr, spearmanr  # scipy comes with sentence-transformers
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float((pearsonr if kind == "pearson" else spearmanr)(a, b).statistic)


def reward_metrics(pred: torch.Tensor, target: torch.Tensor, prompt_id: torch.Tensor, constant: float) -> dict:
    """pred, target, prompt_id: [N]. Pearson, global and mean within-prompt Spearman, MSE vs a constant predictor."""
    p, t, ids = pred.double().numpy(), target.double().numpy(), prompt_id.numpy()
    within = [correlation("spearman", p[ids == i], t[ids == i]) for i in np.unique(ids)]
    within = [w for w in within if not math.isnan(w)]
    return {"n": int(len(t)), "pearson": correlation("pearson", p, t), "spearman_global": correlation("spearman", p, t),
            "spearman_within_prompt": float(np.mean(within)) if within else float("nan"),
            "n_prompts_within": len(within), "mse": float(np.mean((p - t) ** 2)),
            "mse_constant": float(np.mean((constant - t) ** 2))}


def evaluate_reward_model(rm, data: dict, idx: torch.Tensor, train_idx: torch.Tensor) -> dict:
    """reward_metrics on the generated rows of `idx` (anchors excluded); constant = train generated mean.

    rm: the reward model, called as rm(prompt_emb [n, D], response_emb [n, D]) -> [n] scores."""
    gen_mask = torch.tensor([k == "generated" for k in data["kind"]])
    rows, train_rows = idx[gen_mask[idx]], train_idx[gen_mask[train_idx]]
    device = next(rm.parameters()).device
    with torch.no_grad():
        pred = rm.eval()(data["prompt_emb"][rows].to(device), data["response_emb"][rows].to(device)).cpu()
    empty = torch.tensor([not data["responses"][i].strip() for i in rows.tolist()], dtype=torch.bool)
    pred = pred.masked_fill(empty, 0.0)  # as RewardMLP.score does
    out = reward_metrics(pred, data["label"][rows], data["prompt_id"][rows], data["label"][train_rows].mean().item())
    return out | {"pred": pred, "target": data["label"][rows], "rows": rows}


def plot_reward_fit(rm_test: dict, history: dict, temperatures: torch.Tensor, path=None):
    """Left: the reward model's score against the true similarity on held-out prompts (`evaluate_reward_model`'s
    pred / target, [n] each), coloured by the sampling temperature ([n]). Right: the fit's train and validation
    MSE per epoch (`fit_reward_mlp`'s history). Saved as PNG at `path` when given. Returns the figure."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    sc = ax[0].scatter(rm_test["target"], rm_test["pred"], c=temperatures, cmap="viridis", s=12)
    lims = [min(rm_test["target"].min(), rm_test["pred"].min()).item(), 10]
    ax[0].plot(lims, lims, "k--", lw=1)
    ax[0].set(xlabel="true similarity", ylabel="reward-model score",
              title=f"held-out prompts: Spearman {rm_test['spearman_global']:.2f}")
    fig.colorbar(sc, ax=ax[0], label="sampling temperature")
    ax[1].plot(history["train"], label="train MSE"); ax[1].plot(history["val"], label="validation MSE")
    ax[1].axvline(history["best_epoch"], color="k", ls=":", lw=1)
    ax[1].set(xlabel="epoch", ylabel="MSE", yscale="log", title="fit, early-stopped on validation prompts")
    ax[1].legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


PLOT_PANELS = (("score", "similarity", "eval_similarity"), ("reward_gap",), ("kl_ref",), ("entropy",), ("clip_frac", "approx_kl"),
               ("value_loss",), ("explained_variance",), ("response_len",), ("eos_rate",))


def finite_points(logs: list[dict], key: str) -> list[tuple[int, float]]:
    """(iteration + 1, value) of each record whose `key` is a finite number (NaN, missing and None are no data).
    value_loss counts only where a critic ran: some record has a finite explained_variance (under
    ADVANTAGE = "group" every one is NaN, and value_loss is 0 by construction)."""
    if key == "value_loss" and not finite_points(logs, "explained_variance"):
        return []
    return [(r["iteration"] + 1, r[key]) for r in logs
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def plot_training(logs: list[dict], path=None):
    """Training curves against the iteration, one panel per PLOT_PANELS entry that has data in `logs`, three a row:
    a panel whose keys are all NaN or missing (`finite_points`; under the group advantage reward_gap when no
    similarity is logged, value_loss, explained_variance) is not drawn. Saved as PNG at `path` when given.
    Returns the figure."""
    import matplotlib.pyplot as plt
    panels = [{k: finite_points(logs, k) for k in keys} for keys in PLOT_PANELS]
    panels = [{k: pts for k, pts in p.items() if pts} for p in panels]
    panels = [p for p in panels if p]
    if not panels:
        fig, ax = plt.subplots(figsize=(6, 1.5), constrained_layout=True)
        ax.text(0.5, 0.5, "no training curves: the log has no RL iterations", ha="center", va="center")
        ax.set_axis_off()
    else:
        rows = math.ceil(len(panels) / 3)
        fig, axes = plt.subplots(rows, 3, figsize=(13, 3 * rows), squeeze=False, constrained_layout=True)
        for ax in axes.flat[len(panels):]:
            fig.delaxes(ax)
        for ax, panel in zip(axes.flat, panels):
            for key, points in panel.items():
                xs, ys = zip(*points)
                sparse = key.startswith("eval_") or len(points) < 30
                ax.plot(xs, ys, marker="o" if sparse else None, ms=3, label=key)
            ax.set_title(" / ".join(panel), fontsize=10)
            ax.set_xlabel("iteration")
            if len(panel) > 1:
                ax.legend(fontsize=8)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


PHASES = ("t_generate", "t_old_logprobs", "t_ref", "t_reward", "t_update", "t_checkpoint", "t_monitor")


def phase_matrix(logs: list[dict]) -> np.ndarray:
    """[iterations, len(PHASES)] seconds from log records (a missing or NaN phase counts 0 s)."""
    rows = [[r.get(k) if isinstance(r.get(k), (int, float)) and math.isfinite(r.get(k)) else 0.0 for k in PHASES]
            for r in logs]
    return np.array(rows, dtype=float).reshape(len(logs), len(PHASES))


def plot_phase_times(logs: list[dict], path=None):
    """Where each iteration's time goes: stacked bars of PHASES per iteration (seconds), with each phase's share
    of the total in the legend; saved as PNG at `path` when given. Returns the figure."""
    import matplotlib.pyplot as plt
    times = phase_matrix(logs)
    fig, ax = plt.subplots(figsize=(10, 4), constrained_layout=True)
    x, bottom, total = np.arange(1, len(logs) + 1), np.zeros(len(logs)), max(times.sum(), 1e-9)
    for j, name in enumerate(PHASES):
        ax.bar(x, times[:, j], bottom=bottom, width=1.0 if len(logs) > 30 else 0.8,
               label=f"{name[2:]} ({100 * times[:, j].sum() / total:.0f}%)")
        bottom += times[:, j]
    ax.set_xlabel("iteration")
    ax.set_ylabel("seconds")
    ax.set_title("where an iteration's time goes")
    ax.legend(fontsize=8, ncol=4)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def plot_gains(ax, variants: dict, title: str) -> None:
    """Horizontal bars of each variant's mean gain with its 95% interval, and a dot per seed. `variants`:
    name -> {gain_mean, gain_ci_low, gain_ci_high, gains} (ablations.json's variants, pipeline_seeds.json's arms)."""
    names = list(variants)
    v = [variants[n] for n in names]
    means = np.array([x["gain_mean"] for x in v])
    err = np.array([[m - x["gain_ci_low"], x["gain_ci_high"] - m] for m, x in zip(means, v)]).T
    ax.barh(names, means, xerr=err, color="tab:blue", alpha=0.7)
    for i, x in enumerate(v):
        ax.plot(x["gains"], [i] * len(x["gains"]), "k.", ms=6)
    ax.axvline(0, color="k", lw=1)
    ax.invert_yaxis()
    ax.set(xlabel="similarity gain on the eval split (bar: mean, dots: seeds, line: 95% interval)", title=title)


def minus_sft(pipeline: dict) -> dict:
    """pipeline_seeds.json's arms other than 'sft' and the free baseline 'prompt', as plot_gains variants of their
    difference from SFT alone: rl_over_sft_mean with its paired 95% interval, and per seed the arm's gain minus
    SFT's gain of that seed."""
    sft = pipeline["arms"].get("sft")
    if sft is None:
        return {}
    return {arm: paired_variant(a, "rl_over_sft", sft) for arm, a in pipeline["arms"].items()
            if arm not in ("sft", "prompt")}


def paired_variant(arm: dict, key: str, reference: dict | None) -> dict:
    """One plot_gains variant from an arm's paired difference `key` (key_mean / _ci_low / _ci_high); its dots are
    the arm's gain minus `reference`'s gain of the same seed (none without a reference)."""
    ref = dict(zip(reference["seeds"], reference["gains"])) if reference else {}
    return {"gain_mean": arm[f"{key}_mean"], "gain_ci_low": arm[f"{key}_ci_low"], "gain_ci_high": arm[f"{key}_ci_high"],
            "gains": [g - ref[s] for s, g in zip(arm["seeds"], arm["gains"]) if s in ref]}


def over_prompt(pipeline: dict) -> dict:
    """pipeline_seeds.json's trained arms minus the free baseline `prompt`, as plot_gains variants, two rows an
    arm: the reward's metric (gain_over_prompt_*, dots: the arm's gain minus prompt's of that seed) and the E5 judge,
    which training never sees (indep_gain_over_prompt_*, no dots: the summary keeps no per-seed judge figure).
    {} without a `prompt` arm or on runs cached before the judge."""
    prompt = pipeline["arms"].get("prompt")
    if prompt is None:
        return {}
    out = {}
    for arm, a in pipeline["arms"].items():
        if arm == "prompt" or a.get("indep_gain_over_prompt_mean") is None:
            continue
        out[f"{arm}: MiniLM"] = paired_variant(a, "gain_over_prompt", prompt)
        out[f"{arm}: E5 judge"] = paired_variant(a, "indep_gain_over_prompt", None)
    return out


def plot_results(pipeline: dict, path=None):
    """The headline of the results section, from the committed benchmarks/pipeline_seeds.json. First panel: each
    arm's gain over the base (bar: mean over seeds, line: 95% paired-bootstrap interval over prompts, dots: seeds;
    the notebook's default arm marked). Then, where the JSON has them: each trained arm minus the free baseline
    `prompt` on the reward's metric and on the E5 judge (`over_prompt`), and each arm minus SFT alone (`minus_sft`)."""
    import matplotlib.pyplot as plt
    label = lambda arm: f"{arm} (default)" if arm == pipeline.get("default_arm") else arm
    panels = [(over_prompt(pipeline), "minus the free baseline `prompt`, on the same prompts",
               "difference in 10 × cos, MiniLM (the reward's) or E5 (the judge's)"),
              ({label(a): d for a, d in minus_sft(pipeline).items()}, "minus SFT alone, on the same prompts",
               "difference in similarity gain (bar: mean, dots: seeds, line: 95% interval)")]
    panels = [p for p in panels if p[0]]
    rows = max([len(pipeline["arms"])] + [len(p[0]) for p in panels])
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(7 + 6 * len(panels), 1.5 + 0.5 * rows), squeeze=False,
                             constrained_layout=True)
    seeds = sorted({s for a in pipeline["arms"].values() for s in a["seeds"]})
    plot_gains(axes[0, 0], {label(arm): a for arm, a in pipeline["arms"].items()},
               f"gain over the base model, {pipeline['budget_s']:.0f} s per run, seeds {seeds}")
    for ax, (variants, title, xlabel) in zip(axes[0, 1:], panels):
        plot_gains(ax, variants, title)
        ax.set_xlabel(xlabel)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def plot_pipeline(pipeline: dict, path=None):
    """benchmarks/pipeline_seeds.json's runs: the SFT loss per step (and the held-out NLL at each check); the RL
    rollout score per iteration (one line per run). The arms' gains are `plot_results`."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4), constrained_layout=True)
    for arm, summary in pipeline["arms"].items():
        for run in summary["runs"]:
            label = f"{arm}, seed {run['seed']}"
            sft, rl = run["train"].get("sft_curve") or [], run["train"].get("curve") or []
            if sft:
                line, = axes[0].plot([r["step"] for r in sft], [r["loss"] for r in sft], alpha=0.7, label=label)
                val = [r for r in sft if "val_nll" in r]  # the held-out stop's checks (SFT_VAL_FRAC > 0)
                if val:
                    axes[0].plot([r["step"] for r in val], [r["val_nll"] for r in val], "o--", ms=3,
                                 color=line.get_color(), label=f"{label}, held-out train prompts")
            if rl:
                axes[1].plot([r["iteration"] + 1 for r in rl], [r["score"] for r in rl], alpha=0.7, label=label)
    axes[0].set(xlabel="SFT step", ylabel="reference NLL per token", title="SFT stage")
    axes[1].set(xlabel="RL iteration", ylabel="rollout score (mean over the batch)", title="RL stage")
    for ax in axes:
        ax.legend(fontsize=7)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def show_committed(names, folder="benchmarks") -> dict[str, dict]:
    """Display each committed table folder/<name>.md (as Markdown in a notebook; a line saying so where it is
    missing). Returns {name: the parsed folder/<name>.json} for the names whose JSON exists."""
    from IPython.display import Markdown, display
    folder = Path(folder)
    for name in names:
        table = folder / f"{name}.md"
        display(Markdown(table.read_text()) if table.exists() else f"({table} not found)")
    return {name: json.loads((folder / f"{name}.json").read_text()) for name in names
            if (folder / f"{name}.json").exists()}


def show_examples(rows: list[dict], n: int, before: list[dict] | None = None) -> None:
    """Print n evenly spaced rows of an evaluation: prompt, answer and its similarity, reference. With `before` (the
    base model's rows, the same prompts) the base answer and the tuned one side by side."""
    base = {r["prompt"]: r for r in before or []}
    for row in rows[:: max(1, len(rows) // n)][:n]:
        if before is None:
            print(f"\n[{row['family']}] {row['prompt']}\n  model ({row['similarity']:.2f}): {row['response']!r}"
                  f"\n  reference: {row['reference']}")
        else:
            old = base[row["prompt"]]
            print(f"\n[{row['family']}] {row['prompt']}\n  base  ({old['similarity']:.2f}): {old['response']!r}"
                  f"\n  tuned ({row['similarity']:.2f}): {row['response']!r}\n  reference: {row['reference']!r}")


def show_logit_candidates(candidates: dict, decode) -> None:
    """For each name -> logits [V] (float): their range, the entropy of their softmax and its 3 likeliest tokens
    (`decode`: a list of ids -> text)."""
    for name, z in candidates.items():
        p = z.softmax(-1)
        top = p.topk(3)
        entropy = -(p * p.clamp_min(1e-30).log()).sum()
        print(f"  {name:18s} logits range [{z.min():+.3f}, {z.max():+.3f}]  entropy {entropy:5.2f}  top: "
              + ", ".join(f"{decode([int(i)])!r} {float(v):.3g}" for v, i in zip(top.values, top.indices)))


def plot_curve(values: list[float], chance: float, xlabel: str, ylabel: str, label: str = "mean reward of the batch"):
    """values [N] against 1..N, with a dashed line at `chance`; shown, and returned."""
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(6, 2.5))
    plt.plot(range(1, len(values) + 1), values, marker="o", label=label)
    plt.axhline(chance, color="grey", ls="--", label="chance")
    plt.xlabel(xlabel), plt.ylabel(ylabel), plt.legend(), plt.show()
    return fig


def show_stats_row(i: int | None, stats: dict | None, keys: tuple[str, ...]) -> None:
    """One line of a table of iteration statistics: the header when i is None, else iteration i's `keys`."""
    if i is None:
        print("iter " + " ".join(f"{k[:12]:>12}" for k in keys))
    else:
        print(f"{i:4d} " + " ".join(f"{stats.get(k, float('nan')):12.4g}" for k in keys))
