"""Issue 33: three decode-step levers tried on the real rollout call, `generate()` at the rollout's batch.

`decode_matmuls.py` found one fp32 decode step bound by skinny matmul kernels, not by memory. Isolated [16, d]
matmuls on a 2-core CPU run faster as (W xᵀ)ᵀ than as torch's x Wᵀ (the weight read in place, the small input
transposed), the vocabulary head faster again in row slices; and the DynamicCache concatenates every layer's keys
and values once a step. Each lever is prototyped here (none is in the notebook) and timed on the call a rollout
makes: the packaged model with a seeded LoRA adapter merged for sampling (`ROLLOUT_MERGED`), PPO_BATCH_SIZE eval
prompts, TEMPERATURE, MAX_NEW_TOKENS, one seeded generator per call (so every arm samples from the same stream).
Arms (--arms):
- `today`: `generate(merged=True)` as the notebook runs it;
- `head_wxt`: the vocabulary head as (W_s xᵀ)ᵀ over --head-chunk-rows-row slices W_s of its weight;
- `all_wxt`: that, and every other nn.Linear given at most --max-rows rows as (W xᵀ)ᵀ;
- `prealloc`: a KV cache preallocated to P + MAX_NEW_TOKENS positions per layer, written in place (no concatenation).
Per arm: median seconds of one generate() over --runs alternated rounds after a warm-up, tokens/s, the speedup over
`today` (median seconds today / the arm's), whether the sampled tokens equal today's and the largest |log-prob|
difference (the levers change only the rounding of fp32 sums).

    .venv/bin/python benchmarks/decode_levers.py --threads 2 --runs 8        # alone on the machine
    .venv/bin/python benchmarks/decode_levers.py --params tests/tiny_params.json --runs 1 --out /tmp/dl

Writes <out>.json (cpu, cpu_flags, threads, loadavg, per arm the figures above) and <out>.md.
"""
import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from generate import build_policies, eval_prompts  # noqa: E402
from decode_matmuls import clock, decoder_weights  # noqa: E402
from ppo_seeds import cpu_flags, cpu_name, micro_setup, write_report  # noqa: E402

ARMS = ("today", "head_wxt", "all_wxt", "prealloc")
BUILT = {"preallocated_caches": 0}  # how many caches `preallocated_cache` made: the lever really ran


def wxt_linear(layer, x: torch.Tensor, chunk: int, max_rows: int) -> torch.Tensor:
    """layer(x) for x [..., d_in] -> [..., d_out], as (W xᵀ)ᵀ (in `chunk`-row slices of W where it has more rows)
    when x has at most max_rows rows and no gradient is taken; otherwise the layer's own F.linear."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] > max_rows or torch.is_grad_enabled():
        return torch.nn.functional.linear(x, layer.weight, layer.bias)
    out = wxt_matmul(layer.weight, flat, chunk).view(*x.shape[:-1], layer.weight.shape[0])
    return out if layer.bias is None else out + layer.bias


def wxt_matmul(weight: torch.Tensor, flat: torch.Tensor, chunk: int) -> torch.Tensor:
    """flat [n, d_in] x weight [d_out, d_in]ᵀ -> [n, d_out] contiguous, computed as (W_s flatᵀ)ᵀ over `chunk`-row
    slices W_s of the weight."""
    return torch.cat([torch.mm(w, flat.T) for w in weight.split(chunk)], 0).T.contiguous()


@contextlib.contextmanager
def wxt_linears(model, head_only: bool, chunk: int, max_rows: int):
    """Inside the block the plain nn.Linear layers of `model` (only the vocabulary head if head_only) compute
    `wxt_linear`; their own forward comes back on exit."""
    head = model.get_output_embeddings()
    layers = [head] if head_only else [m for m in model.modules() if type(m) is torch.nn.Linear]
    for m in layers:
        m.forward = (lambda m: lambda x: wxt_linear(m, x, chunk, max_rows))(m)
    try:
        yield
    finally:
        for m in layers:
            del m.forward


class PreallocatedLayer(DynamicLayer):
    """A DynamicCache layer whose keys/values [B, H, capacity, D] are allocated once and written in place; `keys`
    and `values` are views of the filled positions (what DynamicLayer returns after its concatenation)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states, value_states) -> None:
        B, H, _, D = key_states.shape
        self.k_buf = key_states.new_empty(B, H, self.capacity, D)
        self.v_buf = value_states.new_empty(B, H, self.capacity, D)
        self.device, self.is_initialized = key_states.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, self.length = self.length, self.length + key_states.shape[-2]
        self.k_buf[:, :, start:self.length], self.v_buf[:, :, start:self.length] = key_states, value_states
        self.keys, self.values = self.k_buf[:, :, :self.length], self.v_buf[:, :, :self.length]
        return self.keys, self.values

    def batch_select_indices(self, indices) -> None:
        self.k_buf, self.v_buf = self.k_buf[indices], self.v_buf[indices]
        self.keys, self.values = self.k_buf[:, :, :self.length], self.v_buf[:, :, :self.length]


def preallocated_cache(net, ids, max_new_tokens: int, compiled: bool) -> tuple:
    """`make_cache`'s signature: a DynamicCache of `PreallocatedLayer`s, eager steps."""
    cache, BUILT["preallocated_caches"] = DynamicCache(config=net.config), BUILT["preallocated_caches"] + 1
    cache.layers = [PreallocatedLayer(ids.shape[1] + max_new_tokens) for _ in cache.layers]
    return cache, None


@contextlib.contextmanager
def cache_maker(nb, maker):
    """Inside the block the notebook's `decode_steps` builds its KV cache with `maker` (the name it looks up in the
    notebook module's namespace)."""
    saved, nb.make_cache = nb.make_cache, maker
    try:
        yield
    finally:
        nb.make_cache = saved


def lever(nb, model, arm: str, args):
    """The context manager that switches `arm` on (a fresh one per call)."""
    if arm in ("head_wxt", "all_wxt"):
        return wxt_linears(model, arm == "head_wxt", args.head_chunk_rows, args.max_rows)
    if arm == "prealloc":
        return cache_maker(nb, preallocated_cache)
    return contextlib.nullcontext()


def one_call(nb, p, model, tokenizer, prompts, arm: str, args) -> tuple[float, object]:
    """(seconds, Generation) of one rollout-shaped generate() with `arm` switched on."""
    generator = torch.Generator().manual_seed(0)
    with lever(nb, model, arm, args):
        t = time.perf_counter()
        out = nb.generate(model, tokenizer, prompts, max_new_tokens=p.MAX_NEW_TOKENS, temperature=p.TEMPERATURE,
                          generator=generator, merged=True)
        return time.perf_counter() - t, out


def isolated_ms(model, rows: int, chunk: int) -> dict:
    """One round of the matmuls alone, each weight once on a random [rows, d_in] input, as a decode step reads them:
    {layers_linear_ms, layers_wxt_ms} over the decoder's base weights (`decoder_weights`: LoRA factors excluded) and
    {head_linear_ms, head_wxt_ms} for the vocabulary head (wxt: `wxt_matmul`, the head in `chunk`-row slices)."""
    head, weights = model.get_output_embeddings().weight, decoder_weights(model)
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights + [head]}
    linear = lambda w: torch.nn.functional.linear(inputs[w.shape[1]], w)  # noqa: E731
    wxt = lambda w: wxt_matmul(w, inputs[w.shape[1]], chunk)  # noqa: E731
    with torch.no_grad():
        return {"layers_linear_ms": clock(lambda: [linear(w) for w in weights]),
                "layers_wxt_ms": clock(lambda: [wxt(w) for w in weights]),
                "head_linear_ms": clock(lambda: linear(head)), "head_wxt_ms": clock(lambda: wxt(head))}

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None, help="JSON of parameter overrides (e.g. tests/tiny_params.json)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--head-chunk-rows", type=int, default=2048)
    ap.add_argument("--max-rows", type=int, default=64, help="most rows a layer computes as (W xᵀ)ᵀ")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "decode_levers"))
    args = ap.parse_args()
    load_start, nb, p = micro_setup(args)
    arms = args.arms.split(",")
    assert arms[0] == "today", "the first arm is the reference: today"
    model, tokenizer = build_policies(nb, p, paths=("new",))["new"][:2]
    prompts = eval_prompts(nb, tokenizer, p.PPO_BATCH_SIZE)[0]
    reference = {arm: one_call(nb, p, model, tokenizer, prompts, arm, args)[1] for arm in arms}  # warm-up
    seconds, isolated = {arm: [] for arm in arms}, []
    for r in range(args.runs):
        for arm in (arms if r % 2 == 0 else arms[::-1]):
            seconds[arm].append(one_call(nb, p, model, tokenizer, prompts, arm, args)[0])
            print(r, arm, round(seconds[arm][-1], 3), flush=True)
        isolated.append(isolated_ms(model, len(prompts), args.head_chunk_rows))
    result = {"model": p.MODEL, "cpu": cpu_name(), "cpu_flags": cpu_flags(), "threads": args.threads,
              "runs": args.runs, "batch": len(prompts), "max_new_tokens": p.MAX_NEW_TOKENS,
              "head_chunk_rows": args.head_chunk_rows, "max_rows": args.max_rows,
              "preallocated_caches": BUILT["preallocated_caches"],
              "loadavg": {"start": load_start, "end": list(os.getloadavg())},
              "isolated_ms": {k: statistics.median(i[k] for i in isolated) for k in isolated[0]},
              "arms": {arm: summary(seconds[arm], seconds["today"], reference[arm], reference["today"])
                       for arm in arms}}
    write_report(args.out, result, markdown(result))


def summary(seconds: list[float], today: list[float], gen, gen_today) -> dict:
    """One arm's figures (see the module docstring)."""
    tokens = int(gen.response_mask.sum())
    same = gen.sequences.shape == gen_today.sequences.shape and torch.equal(gen.sequences, gen_today.sequences)
    diff = float((gen.logprobs - gen_today.logprobs).abs().max()) if same else None
    med = statistics.median(seconds)
    return {"seconds": med, "tokens": tokens, "tokens_per_s": tokens / med,
            "speedup": statistics.median(today) / med, "same_tokens": same, "max_logprob_diff": diff,
            "runs_s": seconds}


def markdown(r: dict) -> str:
    """The table: one row per arm."""
    lines = ["# Decode levers on the rollout's generate() (issue 33)", "",
             f"`{r['model']}` with a merged LoRA, {r['cpu']} ({', '.join(r['cpu_flags'])}), {r['threads']} torch "
             f"threads; {r['batch']} prompts × up to {r['max_new_tokens']} tokens, sampled from one seeded stream; "
             f"medians of {r['runs']} alternated calls after a warm-up. Load average {r['loadavg']['start'][0]:.1f} → "
             f"{r['loadavg']['end'][0]:.1f}.", "",
             "| arm | seconds a call | tokens / s | speedup over today | same tokens | max log-prob diff |",
             "|---" * 6 + "|"]
    for name, a in r["arms"].items():
        diff = "—" if a["max_logprob_diff"] is None else f"{a['max_logprob_diff']:.1e}"
        lines.append(f"| {name} | {a['seconds']:.2f} | {a['tokens_per_s']:.1f} | {a['speedup']:.2f}× | "
                     f"{a['same_tokens']} | {diff} |")
    i = r["isolated_ms"]
    lines += ["", f"The same matmuls alone ({r['batch']} rows, each weight once, medians over the rounds): decoder layers "
              f"{i['layers_linear_ms']:.1f} ms as x Wᵀ, {i['layers_wxt_ms']:.1f} ms as (W xᵀ)ᵀ; vocabulary head "
              f"{i['head_linear_ms']:.1f} ms, {i['head_wxt_ms']:.1f} ms in {r['head_chunk_rows']}-row slices."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
