"""The seed's FFT positional-encoding claim as a fair ablation (issue 12).

Four tiny byte-level causal LMs that differ only in how position enters — learned absolute embeddings, RoPE,
a causal FFT long-convolution filter, and none — with equal parameter counts (within 0.1%), equal steps and
the same data order per seed, trained on Python's own English prose (pydoc_data topics + stdlib docstrings,
~1.8 MB, built offline). Seeds outer, variants inner, one process, one torch thread (the machine is shared and
has 2 cores: one thread keeps the timings steadier and leaves a core to the others).
The definitions are experiments/fft_positions.ipynb's, imported with nbimport.

    .venv/bin/python benchmarks/fft_ablation.py            # ~13 min on one CPU core
    .venv/bin/python benchmarks/fft_ablation.py --quick    # a smoke run (not written over the committed files)
    .venv/bin/python benchmarks/fft_ablation.py --long-check 1800   # adds a 3x-longer single-seed run of
        # rope / learned / fft to the existing JSON (`long_check`): does the order hold with more training?

Writes benchmarks/fft_ablation.json (per variant: val_loss_mean, val_loss_std [bits/byte], distinct_2,
distinct_3, repeat_4, train_tokens_per_s, params, the mean validation curve) and benchmarks/fft_ablation.md.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # nbimport.py
from nbimport import load_notebook  # noqa: E402


def markdown_report(nb, results: dict) -> str:
    """The committed markdown: set-up, the table, and the verdict read off the numbers."""
    c, corpus, v = results["config"], results["corpus"], results["variants"]
    best = min(v, key=lambda k: v[k]["val_loss_mean"])
    lines = [
        "# FFT positional encoding vs learned / RoPE / none (tiny byte-level LM)", "",
        f"Corpus: {corpus['source']}, {corpus['n_bytes']:,} bytes ({corpus['n_docs']:,} documents, every 20th "
        f"held out for validation; sha256[:16] {corpus['sha256']}).",
        f"Model: {c['size']['n_layers']} layers, width {c['size']['d_model']}, {c['size']['n_heads']} heads, "
        f"context {c['size']['max_len']} bytes. Training: {c['steps']} steps x {c['tokens_per_step']} bytes, "
        f"AdamW lr {c['lr']}, seeds {c['seeds']}, same data order per seed for every variant, "
        f"{c['torch_threads']} torch thread(s); whole run {results.get('cpu_s', float('nan')) / 60:.1f} CPU-min "
        f"({results['wall_s'] / 60:.1f} min wall on a shared 2-core machine). train tokens/s = training bytes per "
        "CPU-second of the training thread (median over seeds).",
        f"Samples: {c['n_samples']} x {c['sample_len']} bytes at temperature 0.8 after 32-byte validation "
        "prompts; distinct-n pooled over the samples, repeat-4 = share of word 4-grams already seen earlier in "
        "the same sample. The *real text* row scores 12 disjoint 192-byte spans of validation text.", "",
        nb.fft_results_table(results), "",
        f"Lowest validation loss: **{best}**. Per seed (bits/byte, seeds {c['seeds']}): "
        + "; ".join(f"{k} " + ", ".join(f"{x:.3f}" for x in v[k]["val_loss_per_seed"]) for k in v) + ".",
    ]
    if "long_check" in results:
        lines += ["", nb.fft_long_check_table(results)]
    return "\n".join(lines) + "\n"


def long_check(nb, corpus: dict, steps: int, seed: int = 0, variants=("rope", "learned", "fft")):
    """Train a few variants longer (one seed) and merge the result into the committed JSON and markdown."""
    path = ROOT / "benchmarks" / "fft_ablation.json"
    results = json.loads(path.read_text())
    c = {**nb.FFT_ABLATION_DEFAULTS, "steps": steps, "eval_every": max(1, steps // 12)}
    runs = [nb.run_fft_variant(v, corpus, seed, c["steps"], c["batch"], c["lr"], c["size"], c["eval_every"],
                               c["n_samples"], c["sample_len"], progress=True) for v in variants]
    results["long_check"] = {"steps": steps, "seed": seed, "runs": [{**r, "samples": r["samples"][:2]} for r in runs]}
    path.write_text(json.dumps(results, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown_report(nb, results))
    print(path.with_suffix(".md").read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="default: the experiment notebook's FFT_ABLATION_DEFAULTS")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default="~/.cache/rlft")
    ap.add_argument("--quick", action="store_true", help="1 seed, 40 steps, written to runs/ instead")
    ap.add_argument("--long-check", type=int, default=0, metavar="STEPS",
                    help="only add a STEPS-step seed-0 run of rope/learned/fft to the existing JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    nb = load_notebook(ROOT / "experiments/fft_positions.ipynb", name="fft_positions")
    corpus = nb.load_english_corpus(args.cache_dir)
    if args.long_check:
        return long_check(nb, corpus, args.long_check)
    overrides = {"steps": args.steps} if args.steps else {}
    seeds = tuple(range(args.seeds))
    if args.quick:
        seeds, overrides = (0,), {"steps": 40, "eval_every": 10, "n_samples": 4, "sample_len": 64}
    t0 = time.process_time()
    results = nb.run_fft_ablation(corpus, seeds=seeds, **overrides)
    results["cpu_s"] = time.process_time() - t0
    out = ROOT / ("runs/fft_ablation_quick" if args.quick else "benchmarks/fft_ablation")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown_report(nb, results))
    print(out.with_suffix(".md").read_text())
    print(f"cpu {results['cpu_s']:.0f} s, wall {results['wall_s']:.0f} s -> {out}.json/.md")


if __name__ == "__main__":
    main()
