"""What the seed's PCA step does to the next-token distribution, and what it costs: `full` vs `pca_seed` vs
`pca_rank_k` (k = 1, 4, 16, 64) on the packaged SmolLM2 and the eval prompts.

Fidelity (teacher-forced, so every mode is judged on the same contexts): each eval prompt is answered greedily
by `full`; at every response position the matrix of logits of all positions so far (one full forward pass) goes
through each mode's transform, and the mode's next-token distribution is compared with full softmax:
mean KL(full || mode), top-1 agreement, entropy (all at temperature 1, no top-k/top-p).
Cost: `generate()` itself with each mode on a batch of eval prompts (sampled, --temperature), alternated over --runs
runs, median tokens/s; peak memory of one untimed run per mode (fresh process, RSS sampled every millisecond).
Writes benchmarks/logits_modes.json and benchmarks/logits_modes.md.

    .venv/bin/python benchmarks/logits_modes.py [--prompts 24] [--runs 3] [--threads 1]
"""
from __future__ import annotations

import argparse, json, os, statistics, subprocess, sys, time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import generate as gb  # noqa: E402  (setup, eval prompts, peak memory)

KS = (1, 4, 16, 64)
MODES = [("full", None), ("pca_seed", None)] + [("pca_rank_k", k) for k in KS]


def label(mode: str, k: int | None) -> str:
    return f"pca_rank_k (k={k})" if k else mode


def transformed(nb, matrix: torch.Tensor, seed: int) -> dict:
    """matrix [n, V] float32 (logits of the positions so far, last = current) -> {mode label: the logits [V] that
    mode samples from}. One SVD serves every k (the same arithmetic as the notebook's pca_rank_k_logits)."""
    mean, directions = nb.principal_directions(matrix)
    out = {"full": matrix[-1], "pca_seed": nb.pca_seed_logits(matrix, seed)}
    for k in KS:
        top = directions[:, :k]
        out[label("pca_rank_k", k)] = mean + ((matrix[-1] - mean) @ top) @ top.T
    return out


@torch.no_grad()
def fidelity(nb, model, tokenizer, prompts: list[str], new_tokens: int, seed: int) -> dict:
    """Teacher-forced fidelity of each mode along full's greedy responses: per mode the lists of per-position
    KL(full || mode), top-1 agreement and entropy."""
    stats = {label(m, k): {"kl": [], "top1": [], "entropy": []} for m, k in MODES}
    for prompt in tqdm(prompts, desc="fidelity"):
        gen = nb.generate(model, tokenizer, [prompt], max_new_tokens=new_tokens, temperature=0)
        seq = gen.sequences[0][gen.attention_mask[0].bool()][None]  # the real tokens, prompt then response
        logits = model(input_ids=seq).logits[0].float()  # [n, V]
        P = int(gen.attention_mask[0, :gen.prompt_len].sum())
        for t in range(P - 1, seq.shape[1] - 1):  # position t predicts response token t + 1
            matrix = logits[: t + 1]
            logp_full = matrix[-1].log_softmax(-1)
            for name, z in transformed(nb, matrix, seed).items():
                logp = z.log_softmax(-1)
                s = stats[name]
                s["kl"].append(float((logp_full.exp() * (logp_full - logp)).sum()))
                s["top1"].append(float(logp.argmax() == logp_full.argmax()))
                s["entropy"].append(float(-(logp.exp() * logp).sum()))
    return stats


def speed(nb, model, tokenizer, prompts, args) -> dict:
    """tokens/s of generate() per mode over args.runs alternated runs, and one sample text (first run, prompt 0)."""
    rec = {label(m, k): {"tokens_per_s": [], "sample": None} for m, k in MODES}
    for r in tqdm(range(args.runs), desc="speed"):
        order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
        for mode, k in order:
            torch.manual_seed(args.seed + r)
            t0 = time.perf_counter()
            gen = nb.generate(model, tokenizer, prompts, max_new_tokens=args.new_tokens, temperature=args.temperature,
                              logits_mode=mode, pca_k=k or 16, pca_seed=args.seed)
            sec = time.perf_counter() - t0
            rec[label(mode, k)]["tokens_per_s"].append(int(gen.response_mask.sum()) / sec)
            rec[label(mode, k)]["sample"] = rec[label(mode, k)]["sample"] or gen.texts[0]
    return rec


def memory_main(args) -> None:
    """--memory-only: one untimed run per mode in this (fresh) process; prints {mode: peak MB}."""
    nb, model, tokenizer, prompts, _ = gb.setup(args.threads, args.batch)
    nb.generate(model, tokenizer, prompts[:1], max_new_tokens=2, temperature=0)  # warm-up
    out = {}
    for mode, k in MODES:
        out[label(mode, k)] = gb.peak_memory_mb(lambda: nb.generate(
            model, tokenizer, prompts, max_new_tokens=args.new_tokens, temperature=args.temperature,
            logits_mode=mode, pca_k=k or 16, pca_seed=args.seed))
    print(json.dumps(out))


def write_markdown(report: dict, path: Path) -> None:
    lines = ["# Logits modes: what the seed's PCA step does, and what it costs\n",
             f"{report['model']}, {report['threads']} torch thread(s). Fidelity: {report['fidelity_positions']} "
             f"response positions of {report['fidelity_prompts']} eval prompts ({report['data']}), teacher-forced "
             f"on `full`'s greedy answers (≤ {report['new_tokens']} tokens), temperature 1. Speed: `generate()` on "
             f"{report['batch']} eval prompts, {report['new_tokens']} new tokens, temperature {report['temperature']}, "
             f"median of {report['runs']} alternated runs (spread = (max − min) / median). Memory: peak RSS increase "
             f"of one run. Entropy of the uniform distribution over the {report['vocab']} tokens: "
             f"{report['uniform_entropy']:.2f} nats.\n",
             "| mode | mean KL(full ‖ mode) nats | top-1 agreement | entropy nats | tokens/s | spread | peak memory MB | sample (prompt 0) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in report["modes"].items():
        sample = (m["sample"] or "").replace("\n", " ").replace("|", "\\|")[:90]
        lines.append(f"| {name} | {m['mean_kl']:.3f} | {m['top1_agreement']:.1%} | {m['mean_entropy']:.2f} | "
                     f"{m['tokens_per_s']:.1f} | {m['spread']:.0%} | {m['peak_memory_mb']:.0f} | {sample} |")
    lines += ["", f"Prompt 0: {report['prompt0']!r}"]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16, help="eval prompts for the fidelity measurement")
    ap.add_argument("--batch", type=int, default=8, help="eval prompts per generate() call for speed and memory")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "logits_modes"))
    args = ap.parse_args()
    if args.memory_only:
        return memory_main(args)
    nb, model, tokenizer, prompts, data_name = gb.setup(args.threads, max(args.prompts, args.batch))
    fid = fidelity(nb, model, tokenizer, prompts[:args.prompts], args.new_tokens, args.seed)
    spd = speed(nb, model, tokenizer, prompts[:args.batch], args)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, __file__, "--memory-only", "--threads", str(args.threads), "--batch", str(args.batch),
           "--new-tokens", str(args.new_tokens), "--temperature", str(args.temperature), "--seed", str(args.seed)]
    mem = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    modes = {}
    for name in fid:
        tps = spd[name]["tokens_per_s"]
        modes[name] = {"mean_kl": statistics.mean(fid[name]["kl"]), "top1_agreement": statistics.mean(fid[name]["top1"]),
                       "mean_entropy": statistics.mean(fid[name]["entropy"]), "tokens_per_s": statistics.median(tps),
                       "tokens_per_s_runs": tps, "spread": (max(tps) - min(tps)) / statistics.median(tps),
                       "peak_memory_mb": mem[name], "sample": spd[name]["sample"]}
    report = {"model": "packaged SmolLM2-135M-Instruct (fp32, CPU)", "threads": args.threads, "data": data_name,
              "fidelity_prompts": args.prompts, "fidelity_positions": len(fid["full"]["kl"]), "batch": args.batch,
              "new_tokens": args.new_tokens, "temperature": args.temperature, "runs": args.runs, "seed": args.seed,
              "vocab": len(tokenizer), "uniform_entropy": float(torch.log(torch.tensor(float(len(tokenizer))))),
              "prompt0": nb.split_pairs(nb.load_pairs(str(ROOT / "data" / data_name)), "eval")[0]["prompt"], "load_average_end": [round(x, 1) for x in os.getloadavg()], "modes": modes}
    Path(args.out + ".json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    write_markdown(report, Path(args.out + ".md"))
    print(Path(args.out + ".md").read_text())


if __name__ == "__main__":
    main()
