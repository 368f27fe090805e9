"""Our generate() vs Hugging Face `model.generate()` vs a bare forward-only KV-cache loop (the ceiling).

Same process, same model, same prompts and settings; the three are alternated (rotating order) over --runs runs
and medians are taken. Batch 1 and batch 8, --new-tokens new tokens, greedy and sampled. Writes
benchmarks/generate.json and benchmarks/generate.md.

    .venv/bin/python benchmarks/generate.py [--runs 5] [--threads 1] [--new-tokens 64]

Tokens per second count the real response tokens (up to and including EOS) of each row. HF runs with its default
cache and no score outputs. Peak memory is measured afterwards, one untimed run per implementation, as the peak
increase of the process RSS (sampled every millisecond; glibc is told to return freed blocks at once) on CPU, or
`torch.cuda.max_memory_allocated` on a GPU.
"""
from __future__ import annotations

import argparse, ctypes, json, os, statistics, subprocess, sys, threading, time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from nbimport import load_notebook  # noqa: E402

IMPLS = ("ours", "hf", "bare")
SAMPLED = dict(temperature=0.7, top_k=50, top_p=0.9)


def eval_prompts(nb, tokenizer, n: int) -> list[str]:
    """n rendered eval prompts (data/pairs.jsonl if present, else data/starter.jsonl), cycled if fewer."""
    path = ROOT / "data" / "pairs.jsonl"
    path = path if path.exists() else ROOT / "data" / "starter.jsonl"
    prompts = [p["prompt"] for p in nb.split_pairs(nb.load_pairs(str(path)), "eval")]
    return [nb.chat_prompt(tokenizer, prompts[i % len(prompts)]) for i in range(n)], path.name


def real_lengths(responses: torch.Tensor, eos_ids: list[int]) -> list[int]:
    """responses [B, T] -> per row the number of tokens up to and including the first EOS (T if none)."""
    is_eos = torch.isin(responses, torch.tensor(eos_ids))
    return [int(r.nonzero()[0]) + 1 if r.any() else responses.shape[1] for r in is_eos]


@torch.no_grad()
def bare_loop(model, ids, mask, steps: int, eos_ids: list[int]) -> torch.Tensor:
    """Forward passes and argmax only: prefill, then one token per step with the KV cache, until every row has
    emitted EOS or `steps` tokens. No sampling, no compaction. Returns tokens [B, T]."""
    net, padded = model, not bool(mask.all())
    cache, eos = DynamicCache(config=net.config), torch.tensor(eos_ids)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = net(input_ids=ids, attention_mask=mask if padded else None, position_ids=positions, cache=cache,
                 use_cache=True, logits_to_keep=1).logits
    done, out = torch.zeros(len(ids), dtype=torch.bool), []
    for step in range(steps):
        token = logits[:, -1].argmax(-1)
        out.append(token)
        done |= torch.isin(token, eos)
        if step == steps - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        positions = positions[:, -1:] + 1
        logits = net(input_ids=token[:, None], attention_mask=mask if padded else None, position_ids=positions,
                     cache=cache, use_cache=True, logits_to_keep=1).logits
    return torch.stack(out, 1)


def run_one(impl, nb, model, tokenizer, prompts, ids, mask, new_tokens, sampled, eos_ids):
    """One generation; returns (responses [B, T] with what follows EOS cut by `real_lengths`, seconds)."""
    settings = SAMPLED if sampled else dict(temperature=0)
    t0 = time.perf_counter()
    if impl == "ours":
        gen = nb.generate(model, tokenizer, prompts, max_new_tokens=new_tokens, **settings)
        out = gen.sequences[:, gen.prompt_len:]
    elif impl == "hf":
        kw = dict(do_sample=True, **SAMPLED) if sampled else dict(do_sample=False)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, **kw)[:, ids.shape[1]:]
    else:
        out = bare_loop(model, ids, mask, new_tokens, eos_ids)
    return out, time.perf_counter() - t0


def peak_memory_mb(fn) -> float:
    """Peak memory increase while fn() runs, in MB (CUDA allocator peak on GPU, sampled RSS on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated(); fn(); torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    import psutil
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    proc, peak, stop = psutil.Process(), [0], threading.Event()
    base = proc.memory_info().rss

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=sample); thread.start()
    try:
        fn()
    finally:
        stop.set(); thread.join()
    return max(0, peak[0] - base) / 2**20


def setup(threads: int, batch: int):
    torch.set_num_threads(threads)
    nb = load_notebook(ROOT / "rlft.ipynb")
    model, tokenizer = nb.load_base("packaged", os.environ.get("RLFT_CACHE", "~/.cache/rlft"), torch.device("cpu"),
                                    torch.float32)
    prompts, data_name = eval_prompts(nb, tokenizer, batch)
    return nb, model, tokenizer, prompts, data_name


def memory_main(args) -> None:
    """--memory-only: print {impl: peak MB} for one untimed greedy run at args.batch (run in a fresh process)."""
    nb, model, tokenizer, prompts, _ = setup(args.threads, args.batch)
    ids, mask = nb.encode_prompts(tokenizer, prompts, 10**6, torch.device("cpu"))
    eos_ids = nb.eos_ids_of(model, tokenizer)
    run_one("ours", nb, model, tokenizer, prompts, ids, mask, 4, False, eos_ids)  # warm-up
    result = {impl: peak_memory_mb(lambda: run_one(impl, nb, model, tokenizer, prompts, ids, mask, args.new_tokens,
                                                    False, eos_ids)) for impl in IMPLS}
    print(json.dumps(result))


def timing(args, nb, model, tokenizer, all_prompts, batch: int, sampled: bool) -> dict:
    """Alternate the three implementations over args.runs runs; per implementation the times and token counts."""
    prompts = all_prompts[:batch]
    ids, mask = nb.encode_prompts(tokenizer, prompts, 10**6, torch.device("cpu"))
    eos_ids = nb.eos_ids_of(model, tokenizer)
    impls = [i for i in IMPLS if not (sampled and i == "bare")]
    rec = {i: {"seconds": [], "tokens": [], "tokens_per_s": []} for i in impls}
    greedy_out = {}
    for r in tqdm(range(args.runs), desc=f"batch {batch} {'sampled' if sampled else 'greedy'}"):
        torch.manual_seed(r)
        for impl in impls[r % len(impls):] + impls[:r % len(impls)]:  # rotate the order every run
            out, sec = run_one(impl, nb, model, tokenizer, prompts, ids, mask, args.new_tokens, sampled, eos_ids)
            lengths = real_lengths(out, eos_ids)
            rec[impl]["seconds"].append(sec); rec[impl]["tokens"].append(sum(lengths))
            rec[impl]["tokens_per_s"].append(sum(lengths) / sec)
            greedy_out.setdefault(impl, [row[:n].tolist() for row, n in zip(out, lengths)])
    for impl, d in rec.items():
        tps = d["tokens_per_s"]
        d["median_tokens_per_s"] = statistics.median(tps)
        d["spread"] = (max(tps) - min(tps)) / statistics.median(tps)  # (max - min) / median over the runs
    paired = [o / h for o, h in zip(rec["ours"]["tokens_per_s"], rec["hf"]["tokens_per_s"])]
    result = {"implementations": rec, "paired_ratio_ours_hf": paired}
    if not sampled:
        result["tokens_identical"] = greedy_out["ours"] == greedy_out["hf"] == greedy_out["bare"]
        result["response_lengths"] = [len(x) for x in greedy_out["ours"]]
        paired_bare = [o / b for o, b in zip(rec["ours"]["tokens_per_s"], rec["bare"]["tokens_per_s"])]
        result["paired_ratio_ours_bare"] = paired_bare
    return result


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"# generate(): ours vs Hugging Face vs a bare loop\n",
             f"{report['model']}, {report['device']}, {report['torch_threads']} torch thread(s), "
             f"{report['max_new_tokens']} new tokens, {report['runs']} alternated runs, medians; prompts: eval split "
             f"of {report['data']}. Spread = (max - min) / median of tokens/s over the runs. Load average during the "
             f"run: {report['load_average_start']} → {report['load_average_end']} (shared machine).\n",
             "| batch | decoding | ours tok/s | HF tok/s | bare tok/s | ours/HF (median of medians) | ours/HF per run (min–max) | ours/bare | spread ours / HF | greedy tokens identical |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, cell in report["cases"].items():
        imp = cell["implementations"]
        bare = imp.get("bare", {}).get("median_tokens_per_s")
        ratio = imp["ours"]["median_tokens_per_s"] / imp["hf"]["median_tokens_per_s"]
        paired = cell["paired_ratio_ours_hf"]
        ceiling = f"{imp['ours']['median_tokens_per_s'] / bare:.2f}" if bare else "–"
        lines.append(f"| {cell['batch']} | {cell['decoding']} | {imp['ours']['median_tokens_per_s']:.1f} | "
                     f"{imp['hf']['median_tokens_per_s']:.1f} | {f'{bare:.1f}' if bare else '–'} | {ratio:.2f} | "
                     f"{min(paired):.2f}–{max(paired):.2f} | {ceiling} | {imp['ours']['spread']:.0%} / "
                     f"{imp['hf']['spread']:.0%} | {cell.get('tokens_identical', '–')} |")
    mem = report["peak_memory_mb"]
    lines += ["", f"Peak memory increase during one greedy batch-{report['memory_batch']} run (MB): "
              + ", ".join(f"{k} {v:.1f}" for k, v in mem.items()) + ".", "",
              f"ratio_b1 = {report['ratio_b1']:.2f}, ratio_b8 = {report['ratio_b8']:.2f}, "
              f"ceiling ratio (ours/bare, greedy) b1 = {report['ceiling_ratio_b1']:.2f}, "
              f"b8 = {report['ceiling_ratio_b8']:.2f}."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="(memory-only) batch size")
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "generate"))
    args = ap.parse_args()
    if args.memory_only:
        return memory_main(args)
    load_start = [round(x, 1) for x in os.getloadavg()]
    nb, model, tokenizer, prompts, data_name = setup(args.threads, 8)
    nb.generate(model, tokenizer, prompts[:2], max_new_tokens=4, temperature=0)  # warm-up
    cases = {}
    for batch in (1, 8):
        for sampled in (False, True):
            key = f"b{batch}_{'sampled' if sampled else 'greedy'}"
            cases[key] = {"batch": batch, "decoding": "sampled " + str(SAMPLED) if sampled else "greedy",
                          **timing(args, nb, model, tokenizer, prompts, batch, sampled)}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    mem = subprocess.run([sys.executable, __file__, "--memory-only", "--threads", str(args.threads), "--batch", "8",
                          "--new-tokens", str(args.new_tokens)], env=env, capture_output=True, text=True, check=True)
    med = lambda k, i: cases[k]["implementations"][i]["median_tokens_per_s"]  # noqa: E731
    report = {
        "model": "packaged SmolLM2-135M-Instruct (fp32)", "device": "cpu", "torch_threads": args.threads,
        "max_new_tokens": args.new_tokens, "runs": args.runs, "data": data_name,
        "ratio_b1": med("b1_greedy", "ours") / med("b1_greedy", "hf"),
        "ratio_b8": med("b8_greedy", "ours") / med("b8_greedy", "hf"),
        "ratio_b1_sampled": med("b1_sampled", "ours") / med("b1_sampled", "hf"),
        "ratio_b8_sampled": med("b8_sampled", "ours") / med("b8_sampled", "hf"),
        "ceiling_ratio_b1": med("b1_greedy", "ours") / med("b1_greedy", "bare"),
        "ceiling_ratio_b8": med("b8_greedy", "ours") / med("b8_greedy", "bare"),
        "spread": {k: {i: v["spread"] for i, v in c["implementations"].items()} for k, c in cases.items()},
        "greedy_tokens_identical": all(cases[k]["tokens_identical"] for k in ("b1_greedy", "b8_greedy")),
        "peak_memory_mb": json.loads(mem.stdout.strip().splitlines()[-1]), "memory_batch": 8,
        "load_average_start": load_start, "load_average_end": [round(x, 1) for x in os.getloadavg()],
        "cases": cases,
    }
    Path(args.out + ".json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, Path(args.out + ".md"))
    print(Path(args.out + ".md").read_text())


if __name__ == "__main__":
    main()
