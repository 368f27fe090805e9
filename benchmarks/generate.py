"""Rollout speed (issue 18): today's rollout path vs the new default, against HF generate, a bare loop and the
machine's memory bandwidth, measured in one run.

Paths (both with the same LoRA adapter attached, as in a rollout; the adapter is given seeded non-zero B so it
really changes the model):
  * "today": fp32 base, eager, adapter attached (generate(merged=False));
  * "new":   the base dtype of the parameter DTYPE (`resolve_dtype`; "auto" unless --params sets it, e.g.
             {"DTYPE": "bfloat16"} on a CPU with avx512_bf16/AMX)
             and the adapter merged for sampling (generate(merged=True));
  * "compiled": the same model as "new" (dtype, merged adapter), decoded with generate(compiled=True): the decode
             step under torch.compile on a StaticCache. Only "ours" is timed on it (HF and bare would repeat
             "new"'s); its one-time compile (batch 1 and batch 2 graphs, at warm-up) is reported as compile_s.
Per batch size (--batches, default 1, 8, 16) and path: tokens/s of ours, of HF `model.generate` (the PEFT model,
adapter attached) and of a bare forward+argmax KV-cache loop; greedy, --new-tokens tokens, the implementations
alternated (rotating order) over --runs runs, medians. Also, in the same run and with the same threads: the memory
bandwidth (copy of a large tensor), `bound_fraction_b1` = tokens/s × weight bytes read per token / bandwidth,
greedy agreement of each path's tokens with fp32 HF's, `busy_slowdown` (batch-1 decode of the new path with one
competing busy process, which the script starts — bounded in time — and stops, over without), `speedup_b1`,
`speedup_b8` (new over today, ours) and `speedup_b1_compiled`, `speedup_b8_compiled` (compiled over today, ours).
Peak RSS increase of one untimed batch-8 run per path (sampled every ms).

    .venv/bin/python benchmarks/generate.py [--runs 5] [--threads 1] [--new-tokens 64] [--params FILE.json] [--out PREFIX]
        [--paths today,new,compiled]

--params: a JSON of parameter overrides (e.g. tests/tiny_params.json: a smoke test on the tiny model).
Writes PREFIX.json and PREFIX.md (default benchmarks/generate.*).
"""
from __future__ import annotations

import argparse, contextlib, ctypes, json, os, statistics, subprocess, sys, threading, time
from pathlib import Path

OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "(unset)")  # as torch sees it (read before torch loads)
import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # nbimport.py
from nbimport import load_notebook, notebook_config  # noqa: E402
sys.path.insert(0, str(ROOT / "benchmarks"))
from ppo_seeds import cpu_name  # noqa: E402

IMPLS = ("ours", "hf", "bare")
PATHS = ("today", "new", "compiled")
PATH_IMPLS = {"today": IMPLS, "new": IMPLS, "compiled": ("ours",)}
CPU = torch.device("cpu")


def eval_prompts(nb, tokenizer, n: int) -> tuple[list[str], str]:
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
def bare_loop(net, ids, mask, steps: int, eos_ids: list[int]) -> torch.Tensor:
    """Forward passes and argmax only: prefill, then one token per step with the KV cache, until every row has
    emitted EOS or `steps` tokens. No sampling, no compaction. Returns tokens [B, T]."""
    padded = not bool(mask.all())
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


def run_one(impl: str, nb, model, tokenizer, prompts, ids, mask, new_tokens: int, merged: bool, eos_ids,
            compiled: bool = False):
    """One greedy generation -> (responses [B, T], seconds). model: the PEFT policy (adapter attached)."""
    t0 = time.perf_counter()
    if impl == "ours":
        gen = nb.generate(model, tokenizer, prompts, max_new_tokens=new_tokens, temperature=0, merged=merged,
                          compiled=compiled)
        out = gen.sequences[:, gen.prompt_len:]
    elif impl == "hf":
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 do_sample=False)[:, ids.shape[1]:]
    else:
        out = bare_loop(nb.decoder_of(model), ids, mask, new_tokens, eos_ids)
    return out, time.perf_counter() - t0


def memory_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """Memory bandwidth in GB/s (read + write) of copying an fp32 tensor of `mb` MB, median of `repeats`."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages first
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); dst.copy_(src); times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def weight_bytes(model) -> int:
    """Bytes of the parameters a decode step reads (tied weights counted once; the LoRA tensors included)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def peak_rss_mb(fn) -> float:
    """Peak increase of the process RSS while fn() runs, in MB (sampled every millisecond)."""
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


def perturb_lora_b(model, std: float = 0.05, seed: int = 0):
    """Give the LoRA B matrices (zero at init) seeded random values, so the adapter changes the model.

    The tests import it from here (tests/conftest.py), so the benchmark never imports the test folder."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model


def build_policies(nb, p: dict, paths=PATHS) -> dict:
    """{path: (PEFT policy, tokenizer, dtype name, merged, compiled)}; the same seeded adapter on each; "compiled"
    shares "new"'s model."""
    cache = os.environ.get("RLFT_CACHE", p.CACHE_DIR)
    dtypes = {"today": torch.float32, "new": nb.resolve_dtype(p.DTYPE, CPU)}  # DTYPE: "auto" or e.g. "bfloat16"
    out = {}
    for path, dtype in dtypes.items():
        base, tok = nb.load_base(p.MODEL, cache, CPU, dtype, seed=0)
        torch.manual_seed(0)  # lora_A is initialised from the global RNG: the same adapter on both paths
        lora = nb.add_lora(base, p.LORA_R, p.LORA_ALPHA, p.LORA_DROPOUT, p.LORA_TARGETS)
        out[path] = (perturb_lora_b(lora, std=0.02), tok, str(dtype).replace("torch.", ""), path == "new", False)
    if "compiled" in paths:
        out["compiled"] = (*out["new"][:4], True)
    return {path: out[path] for path in paths}


def time_batch(args, nb, policies, prompts, batch: int) -> dict:
    """Alternate every (path, impl) over args.runs runs -> per path and impl: tokens/s per run, median, tokens."""
    model0, tok = policies["today"][0], policies["today"][1]
    ids, mask = nb.encode_prompts(tok, prompts[:batch], 10**6, CPU)
    eos_ids = nb.eos_ids_of(model0, tok)
    paths = list(policies)
    combos = [(path, impl) for path in paths for impl in PATH_IMPLS[path]]
    rec = {path: {impl: {"tokens_per_s": []} for impl in PATH_IMPLS[path]} for path in paths}
    tokens = {}
    for r in range(args.runs):
        for path, impl in combos[r % len(combos):] + combos[:r % len(combos)]:  # rotate the order every run
            model, _, _, merged, compiled = policies[path]
            out, sec = run_one(impl, nb, model, tok, prompts[:batch], ids, mask, args.new_tokens, merged, eos_ids,
                               compiled)
            lengths = real_lengths(out, eos_ids)
            rec[path][impl]["tokens_per_s"].append(sum(lengths) / sec)
            tokens.setdefault((path, impl), [row[:n].tolist() for row, n in zip(out, lengths)])
    reference = tokens[("today", "hf")]  # fp32 HF greedy
    for path in paths:
        for impl in PATH_IMPLS[path]:
            d = rec[path][impl]
            d["median_tokens_per_s"] = statistics.median(d["tokens_per_s"])
        rec[path]["greedy_agreement_fp32_hf"] = agreement(tokens[(path, "ours")], reference)
    rec["tokens_identical_today_ours_hf_bare"] = tokens[("today", "ours")] == reference == tokens[("today", "bare")]
    if "compiled" in paths:
        rec["tokens_identical_compiled_new"] = tokens[("compiled", "ours")] == tokens[("new", "ours")]
    return rec


def agreement(rows: list[list[int]], reference: list[list[int]]) -> float:
    """Fraction of the reference's tokens matched position by position (a shorter row counts as mismatches)."""
    hits = sum(sum(a == b for a, b in zip(row, ref)) for row, ref in zip(rows, reference))
    return hits / max(1, sum(len(ref) for ref in reference))


def busy_slowdown(args, nb, policies, prompts) -> dict:
    """Batch-1 decode time of the new path with one competing busy process (bounded: args.busy_seconds) / without."""
    model, tok, _, merged, _ = policies["new"]
    run = lambda: nb.generate(model, tok, prompts[:1], max_new_tokens=args.new_tokens, temperature=0, merged=merged)  # noqa: E731

    def median_seconds():
        times = []
        for _ in range(max(1, args.runs)):
            t0 = time.perf_counter(); run(); times.append(time.perf_counter() - t0)
        return statistics.median(times)

    quiet = median_seconds()
    with competing_process(args.busy_seconds):
        time.sleep(0.2)
        busy = median_seconds()
    return {"quiet_s": quiet, "busy_s": busy, "busy_slowdown": busy / quiet}


@contextlib.contextmanager
def competing_process(seconds: float):
    """One other busy process (a `while` loop that ends by itself after `seconds`) alive for the block; killed after."""
    spin = f"import time\nt = time.time()\nwhile time.time() - t < {seconds}: pass"
    busy_proc = subprocess.Popen([sys.executable, "-c", spin])
    try:
        yield busy_proc
    finally:
        busy_proc.kill(); busy_proc.wait()


def warm_up(nb, policies, prompts) -> dict:
    """One short generation per path (as it will be timed). The compiled path compiles here, once for batch 1 and
    once for batch >= 2 (its two graphs): returns those first calls' seconds, {"batch_1": s, "batch_2": s}."""
    compile_s = {}
    for path, (model, tok, _, merged, compiled) in policies.items():
        for n in ((1, 2) if compiled else (2,)):
            t0 = time.perf_counter()
            nb.generate(model, tok, prompts[:n], max_new_tokens=2, temperature=0, merged=merged, compiled=compiled)
            if compiled:
                compile_s[f"batch_{n}"] = time.perf_counter() - t0
    return compile_s


def write_markdown(report: dict, path: Path) -> None:
    """The table of PREFIX.md from the report."""
    lines = ["# Rollout speed: today's path vs the new default (issue 18)\n",
             f"{report['model']}, cpu, {report['torch_threads']} torch thread(s), OMP_WAIT_POLICY="
             f"{report['omp_wait_policy']}, {report['max_new_tokens']} greedy new tokens, {report['runs']} alternated "
             f"runs, medians. " + "; ".join(f"{k} = {v}" for k, v in report["paths"].items()) + ". Memory bandwidth "
             f"{report['bandwidth_gbs']:.1f} GB/s (same run, same threads); weights read per token: today "
             f"{report['weight_mb']['today']:.0f} MB, new {report['weight_mb']['new']:.0f} MB. Load average "
             f"{report['load_average_start']} → {report['load_average_end']}.\n",
             "| batch | path | ours tok/s | HF tok/s | bare tok/s | greedy agreement with fp32 HF |",
             "|---|---|---|---|---|---|"]
    for batch, rec in report["batches"].items():
        for p in report["paths"]:
            m = {i: f"{rec[p][i]['median_tokens_per_s']:.1f}" if i in rec[p] else "–" for i in IMPLS}
            lines.append(f"| {batch} | {p} | {m['ours']} | {m['hf']} | {m['bare']} | "
                         f"{rec[p]['greedy_agreement_fp32_hf']:.0%} |")
    keys = ("speedup_b1", "speedup_b8", "speedup_b1_compiled", "speedup_b8_compiled", "bound_fraction_b1",
            "bound_fraction_b1_today", "bound_fraction_b1_compiled", "busy_slowdown")
    lines += ["", ", ".join(f"{k} = {report[k]:.2f}" for k in keys if report.get(k) is not None) + ".",
              "", "Peak RSS increase of one batch-8 run (MB): " + ", ".join(
                  f"{k} {v:.0f}" for k, v in report["peak_memory_mb"].items()) + "."]
    if report.get("compile_s"):
        lines += ["", "One-time compile of the compiled path (first call per graph, s): " + ", ".join(
            f"{k} {v:.1f}" for k, v in report["compile_s"].items()) + "."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--busy-seconds", type=float, default=300, help="upper bound on the competing process's life")
    ap.add_argument("--params", default=None, help="JSON of parameter overrides, e.g. tests/tiny_params.json")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "generate"))
    ap.add_argument("--paths", default=",".join(PATHS), help="a subset of today,new,compiled (today and new required)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_start = [round(x, 1) for x in os.getloadavg()]
    nb = load_notebook(ROOT / "rlft.ipynb")
    p = notebook_config(**(json.loads(Path(args.params).read_text()) if args.params else {}))
    policies = build_policies(nb, p, [x for x in PATHS if x in args.paths.split(",")])
    paths = list(policies)
    batches = [int(b) for b in args.batches.split(",")]
    prompts, data_name = eval_prompts(nb, policies["today"][1], max(batches + [8]))
    compile_s = warm_up(nb, policies, prompts)
    bandwidth = memory_bandwidth_gbs(64 if p.MODEL == "tiny" else 512)
    results = {str(b): time_batch(args, nb, policies, prompts, b) for b in batches}
    med = lambda b, path: results[str(b)][path]["ours"]["median_tokens_per_s"] if str(b) in results else None  # noqa: E731
    ratio = lambda b, path="new": med(b, path) / med(b, "today") if str(b) in results and path in paths else None  # noqa: E731
    wbytes = {path: weight_bytes(policies[path][0]) for path in paths}
    bound = lambda path: med(1, path) * wbytes[path] / (bandwidth * 1e9) if "1" in results and path in paths else None  # noqa: E731
    busy = busy_slowdown(args, nb, policies, prompts)
    memory = {}
    tok = policies["today"][1]
    for path in paths:
        model, _, _, merged, compiled = policies[path]
        memory[path] = peak_rss_mb(lambda: nb.generate(model, tok, prompts[:8], max_new_tokens=args.new_tokens,
                                                       temperature=0, merged=merged, compiled=compiled))
    report = {
        "model": f"MODEL={p.MODEL!r}", "device": "cpu", "cpu": cpu_name(), "cpu_bf16": nb.cpu_has_bf16(),
        "torch_threads": args.threads,
        "omp_wait_policy": OMP_WAIT_POLICY, "max_new_tokens": args.new_tokens,
        "runs": args.runs, "data": data_name,
        "paths": {path: f"{policies[path][2]}, {'compiled' if policies[path][4] else 'eager'}, adapter "
                        f"{'merged' if policies[path][3] else 'attached'}" for path in paths},
        "bandwidth_gbs": bandwidth, "weight_mb": {k: v / 2**20 for k, v in wbytes.items()},
        "speedup_b1": ratio(1), "speedup_b8": ratio(8), "speedup_b16": ratio(16),
        "speedup_b1_compiled": ratio(1, "compiled"), "speedup_b8_compiled": ratio(8, "compiled"),
        "speedup_b16_compiled": ratio(16, "compiled"), "compile_s": compile_s,
        "bound_fraction_b1": bound("new"), "bound_fraction_b1_today": bound("today"),
        "bound_fraction_b1_compiled": bound("compiled"),
        "greedy_agreement_fp32_hf": {b: {path: r[path]["greedy_agreement_fp32_hf"] for path in paths}
                                     for b, r in results.items()},
        "greedy_fp32_tokens_identical_to_hf": all(r["tokens_identical_today_ours_hf_bare"] for r in results.values()),
        "busy_slowdown": busy["busy_slowdown"], "busy": busy, "peak_memory_mb": memory,
        "load_average_start": load_start, "load_average_end": [round(x, 1) for x in os.getloadavg()],
        "batches": results,
    }
    Path(args.out + ".json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, Path(args.out + ".md"))
    print(Path(args.out + ".md").read_text())


if __name__ == "__main__":
    main()
