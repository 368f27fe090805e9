"""The base model's evaluation figures (issue 6): what every trained model is judged against.

Runs the notebook's `evaluate()` exactly as its base-model cell does (default parameters: greedy,
EVAL_MAX_NEW_TOKENS new tokens; no KL, which is 0 by construction for the untrained adapter) on the default
packaged SmolLM2-135M-Instruct
and the eval split of the full data set (data/pairs.jsonl), and times it.

    .venv/bin/python benchmarks/base_eval.py                    # ~2.5-5 min on a 2-core CPU
    .venv/bin/python benchmarks/base_eval.py --data data/starter.jsonl --out /tmp/x   # another file

Writes benchmarks/base_eval.json (per family and overall: n, similarity, ci_low, ci_high, length, eos_frac,
distinct2; the settings; the seconds; every response) and benchmarks/base_eval.md.
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # nbimport.py
from nbimport import load_notebook, notebook_config  # noqa: E402


def markdown_report(nb, result: dict) -> str:
    """The committed markdown: set-up, the table, a few examples."""
    s, t = result["settings"], result["seconds"]
    lines = [
        "# Base model on the eval split (before any training)", "",
        f"Model `{result['model']}`, data `{result['data']}` ({result['table']['overall']['n']} eval prompts), "
        f"temperature {s['temperature']} (greedy), {s['max_new_tokens']} new tokens, logits `{s['logits_mode']}`. "
        f"Similarity = 10 × cos(all-MiniLM-L6-v2); 95% bootstrap intervals over prompts ({result['n_boot']} "
        f"resamples). Length in tokens, EOS included; eos_frac = share of responses that stop at EOS before the "
        f"cap; distinct2 = unique/all word bigrams within a response, averaged.", "",
        nb.format_table(result["table"]), "",
        f"Time: model load {t['load']:.1f} s, evaluation {t['evaluate']:.1f} s ({result['machine']}, "
        f"{result['threads']} torch threads; the machine was shared, so timings are noisy).", "",
        "## Examples", ""]
    for row in result["rows"][:: max(1, len(result["rows"]) // 6)][:6]:
        lines += [f"- **[{row['family']}] {row['prompt']}** — similarity {row['similarity']:.2f}, "
                  f"{row['length']} tokens, {'EOS' if row['eos'] else 'cut at the cap'}",
                  f"  - model: {row['response']!r}", f"  - reference: {row['reference']}"]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="JSONL pairs (default: data/pairs.jsonl, else the notebook's DATA_PATH)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: steadier on a shared machine, where 2 threads oversubscribe)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "base_eval"), help="output path without suffix")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    P = notebook_config()
    nb = load_notebook()
    data = args.data or ("data/pairs.jsonl" if (ROOT / "data" / "pairs.jsonl").exists() else P.DATA_PATH)
    nb.seed_everything(P.SEED)
    device = nb.resolve_device(P.DEVICE)
    t0 = time.time()
    model, tok = nb.load_policy(P, device)  # the notebook's section 1
    embedder = nb.Embedder(P.EMBEDDER, device=device)
    t_load = time.time() - t0
    pairs = nb.split_pairs(nb.load_pairs(str(ROOT / data)), "eval")
    pairs = pairs[:P.EVAL_N] if P.EVAL_N else pairs
    t0 = time.time()
    res = nb.evaluate(model, tok, pairs, embedder, P, with_kl=False)
    t_eval = time.time() - t0
    result = {"model": P.MODEL, "data": data, "n_boot": P.BOOTSTRAP, "settings": res["settings"],
              "seconds": {"load": t_load, "evaluate": t_eval}, "machine": f"{platform.machine()} {device.type}",
              "threads": torch.get_num_threads(), "table": res["table"], "rows": res["rows"]}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown_report(nb, result))
    print(nb.format_table(res["table"]))
    print(f"evaluation {t_eval:.1f}s; wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
