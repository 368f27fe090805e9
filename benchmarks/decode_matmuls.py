"""Issue 33: how much of one decode step is matmul, at the rollout's real shapes and with cold weights.

The profile's floor for generation (`profile_iteration.py`) divides its FLOPs by a large-GEMM throughput; a decode
step multiplies [B, d] rows by every weight of the model once, so each weight comes from memory, not cache. Here,
on the base model MODEL (the merged-LoRA rollout sees the same shapes), per dtype (fp32; bf16 where the CPU has
native bf16) and per batch B (--batches):
- `layers_ms`: every nn.Linear of the decoder layers applied once to a [B, in] input, in module order (cold weights);
- `head_ms` / `head_chunked_ms`: the vocabulary head [B, d] x [d, V], whole and in --head-chunk-row slices
  (bit-identical output, checked);
- `step_ms`: one real decode step, the model's forward on [B, 1] tokens with a KV cache of --context tokens.
matmul_share = (layers_ms + head_ms) / step_ms; weight_gb_per_s = the weights' bytes / (layers_ms + head_ms).
Medians of --runs alternated rounds after a warm-up.

    .venv/bin/python benchmarks/decode_matmuls.py --threads 2 --runs 5      # alone on the machine
    .venv/bin/python benchmarks/decode_matmuls.py --params tests/tiny_params.json --runs 1 --out /tmp/dm

Writes <out>.json (cpu, cpu_bf16, threads, loadavg, per dtype and batch the figures above) and <out>.md.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from ppo_seeds import cpu_name, micro_setup, write_report  # noqa: E402

CPU = torch.device("cpu")


def clock(fn) -> float:
    """Milliseconds of one call."""
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def decoder_weights(model) -> list[torch.Tensor]:
    """The weight of every nn.Linear in the decoder layers, in module order (the vocabulary head not included; on a
    PEFT model the base layers', not the LoRA factors')."""
    return [m.weight for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n and "lora_" not in n]


def timings(model, batch: int, context: int, chunk: int) -> dict:
    """One round on one model and batch: {layers_ms, head_ms, head_chunked_ms, step_ms}."""
    dtype, head, linears = model.dtype, model.get_output_embeddings().weight, decoder_weights(model)
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=dtype) for w in linears + [head]}
    x = inputs[head.shape[1]]
    whole = lambda: torch.nn.functional.linear(x, head)  # noqa: E731
    sliced = lambda: torch.cat([torch.nn.functional.linear(x, h) for h in head.split(chunk, 0)], 1)  # noqa: E731
    with torch.no_grad():
        assert torch.equal(whole(), sliced()), "the sliced head must give the same logits"
        out = {"layers_ms": clock(lambda: [torch.nn.functional.linear(inputs[w.shape[1]], w) for w in linears]),
               "head_ms": clock(whole), "head_chunked_ms": clock(sliced)}
        ids = torch.randint(0, head.shape[0], (batch, context + 1))
        cache = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        out["step_ms"] = clock(lambda: model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True))
    return out


def summary(model, rounds: list[dict]) -> dict:
    """Medians of the rounds, with the matmul share of a step and the weights' bytes per second."""
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    weights = decoder_weights(model) + [model.get_output_embeddings().weight]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    mm = med["layers_ms"] + med["head_ms"]
    return {**med, "matmul_share": mm / med["step_ms"], "weight_gb_per_s": nbytes / mm / 1e6,
            "weight_mb": nbytes / 1e6, "runs": rounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None, help="JSON of parameter overrides (e.g. tests/tiny_params.json)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batches", default="1,16,32")
    ap.add_argument("--context", type=int, default=60, help="tokens already in the KV cache (prompt + answer so far)")
    ap.add_argument("--head-chunk-rows", type=int, default=2048)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "decode_matmuls"))
    args = ap.parse_args()
    load_start, nb, p = micro_setup(args)
    dtypes = [torch.float32] + ([torch.bfloat16] if nb.cpu_has_bf16() else [])
    models = {d: nb.load_base(p.MODEL, os.path.expanduser(p.CACHE_DIR), CPU, d, seed=0)[0].eval() for d in dtypes}
    cells = [(d, b) for d in dtypes for b in (int(x) for x in args.batches.split(","))]
    rounds = {c: [] for c in cells}
    for r in range(args.runs + 1):  # round 0: warm-up
        for d, b in (cells if r % 2 == 0 else cells[::-1]):
            rec = timings(models[d], b, args.context, args.head_chunk_rows)
            print(r, d, b, {k: round(v, 1) for k, v in rec.items()}, flush=True)
            if r:
                rounds[(d, b)].append(rec)
    result = {"model": p.MODEL, "cpu": cpu_name(), "cpu_bf16": nb.cpu_has_bf16(), "threads": args.threads,
              "runs": args.runs, "context": args.context, "head_chunk_rows": args.head_chunk_rows,
              "loadavg": {"start": load_start, "end": list(os.getloadavg())},
              "cells": {f"{str(d).replace('torch.', '')}_b{b}": summary(models[d], rounds[(d, b)]) for d, b in cells}}
    write_report(args.out, result, markdown(result))


def markdown(r: dict) -> str:
    """The table: one row per dtype and batch."""
    lines = ["# One decode step: matmul share, cold weights (issue 33)", "",
             f"`{r['model']}` base weights, {r['cpu']} (native bf16: {r['cpu_bf16']}), {r['threads']} torch threads, "
             f"KV cache of {r['context']} tokens, medians of {r['runs']} alternated rounds after a warm-up. Load average "
             f"{r['loadavg']['start'][0]:.1f} → {r['loadavg']['end'][0]:.1f}. Milliseconds per decode step.", "",
             "| dtype, batch | decoder matmuls | vocabulary head | head in "
             f"{r['head_chunk_rows']}-row slices | whole step | matmul share | weight GB/s |", "|---" * 7 + "|"]
    for name, c in r["cells"].items():
        lines.append(f"| {name} | {c['layers_ms']:.1f} | {c['head_ms']:.1f} | {c['head_chunked_ms']:.1f} | "
                     f"{c['step_ms']:.1f} | {c['matmul_share']:.0%} | {c['weight_gb_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
