"""Where a bf16 base wins or loses on a CPU with native bf16 (avx512_bf16 / AMX): the notebook's own forward
passes, fp32 against bf16, measured side by side in one process.

Same packaged model + the notebook's LoRA (r, alpha, targets from the parameters cell), loaded twice (fp32 base
and bf16 base; LoRA fp32 in both, as `add_lora` makes it). Over one fixed batch of --batch random sequences
(--prompt-len + --response-len tokens), each arm runs `policy_logprobs` (the backbone, then the log-softmax over
the vocabulary in chunks of --chunks positions, as PPO's update does) without grad and with a backward of
logprobs + 0.01 * entropy; plus the same with the whole model's logits at once (plain `model(...)`, the usual
micro-benchmark). Arms: fp32, bf16 (fp32 LoRA, no autocast: the notebook's CPU bf16 path) and bf16 under
`torch.autocast("cpu", bfloat16)` (LoRA matmuls in bf16 too). --runs rounds after one warm-up round, order
reversed every other round; medians.

    .venv/bin/python benchmarks/bf16_passes.py --threads 2 --runs 3      # alone on the machine
    .venv/bin/python benchmarks/bf16_passes.py --params tests/tiny_params.json --runs 1 --out /tmp/bf16p

Writes <out>.json (per arm and pass: fwd_s, fwdbwd_s medians and every run; cpu, cpu_bf16, threads, loadavg) and
<out>.md.
"""
import argparse
import contextlib
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
ARMS = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False), "bf16_autocast": (torch.bfloat16, True)}


def passes(nb, model, seq, mask, prompt_len: int, chunks: list[int], autocast: bool) -> dict:
    """Seconds of each pass on one model: {name: (forward no-grad s, forward+backward s)}."""
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    out = {}
    for chunk in chunks:
        with torch.no_grad(), ctx():
            t = time.perf_counter(); nb.policy_logprobs(model, None, seq, mask, prompt_len, 0.7, chunk=chunk)
            fwd = time.perf_counter() - t
        t = time.perf_counter()
        with ctx():
            o = nb.policy_logprobs(model, None, seq, mask, prompt_len, 0.7, chunk=chunk)
        (o.logprobs.sum() + 0.01 * o.entropy.sum()).backward()
        out[f"policy_logprobs_chunk{chunk}"] = (fwd, time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
    with torch.no_grad(), ctx():
        t = time.perf_counter(); model(input_ids=seq, attention_mask=mask).logits.float().log_softmax(-1)
        fwd = time.perf_counter() - t
    t = time.perf_counter()
    with ctx():
        logits = model(input_ids=seq, attention_mask=mask).logits.float()
    logits.log_softmax(-1).mean().backward()
    out["whole_logits"] = (fwd, time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None, help="JSON of parameter overrides (e.g. tests/tiny_params.json)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--response-len", type=int, default=48)
    ap.add_argument("--chunks", default="16,128", help="LOGPROB_CHUNK values to time")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "bf16_passes"))
    args = ap.parse_args()
    load_start, nb, p = micro_setup(args)
    models = {}
    for name, (dtype, _) in ARMS.items():
        if dtype not in models:
            base, _ = nb.load_base(p.MODEL, os.path.expanduser(p.CACHE_DIR), CPU, dtype, seed=0)
            torch.manual_seed(0)
            models[dtype] = nb.add_lora(base, p.LORA_R, p.LORA_ALPHA, p.LORA_DROPOUT, p.LORA_TARGETS)
    vocab = models[torch.float32].config.vocab_size
    torch.manual_seed(1)
    seq = torch.randint(0, vocab, (args.batch, args.prompt_len + args.response_len))
    mask = torch.ones_like(seq)
    chunks = [int(c) for c in args.chunks.split(",")]
    runs = {a: [] for a in ARMS}
    order = list(ARMS)
    for r in range(args.runs + 1):  # round 0: warm-up
        for arm in (order if r % 2 == 0 else order[::-1]):
            dtype, autocast = ARMS[arm]
            rec = passes(nb, models[dtype], seq, mask, args.prompt_len, chunks, autocast)
            print(r, arm, {k: f"{f:.2f}/{b:.2f}" for k, (f, b) in rec.items()}, flush=True)
            if r:
                runs[arm].append(rec)
    result = {"model": p.MODEL, "cpu": cpu_name(), "cpu_bf16": nb.cpu_has_bf16(), "threads": args.threads,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"), "runs": args.runs,
              "batch": args.batch, "tokens": args.prompt_len + args.response_len, "response_len": args.response_len,
              "loadavg": {"start": load_start, "end": list(os.getloadavg())}, "arms": {}}
    for arm, recs in runs.items():
        result["arms"][arm] = {name: {"fwd_s": statistics.median(r[name][0] for r in recs),
                                      "fwdbwd_s": statistics.median(r[name][1] for r in recs),
                                      "fwd_runs": [r[name][0] for r in recs], "fwdbwd_runs": [r[name][1] for r in recs]}
                               for name in recs[0]}
    write_report(args.out, result, markdown(result))


def markdown(r: dict) -> str:
    """The table: seconds per pass, per arm, and the ratio to fp32."""
    names = list(r["arms"]["fp32"])
    lines = ["# fp32 vs bf16 base on this CPU: the notebook's forward passes", "",
             f"`{r['model']}` + LoRA, {r['cpu']} (native bf16: {r['cpu_bf16']}), {r['threads']} torch threads, "
             f"batch {r['batch']} × {r['tokens']} tokens ({r['response_len']} scored), medians of {r['runs']} "
             f"alternated runs after a warm-up. Load average {r['loadavg']['start'][0]:.1f} → "
             f"{r['loadavg']['end'][0]:.1f}. Seconds (× fp32's time: below 1 is faster).", "",
             "| pass | " + " | ".join(f"{a} fwd | {a} fwd+bwd" for a in r["arms"]) + " |",
             "|---" * (1 + 2 * len(r["arms"])) + "|"]
    for n in names:
        cells = []
        for a, d in r["arms"].items():
            f32 = r["arms"]["fp32"][n]
            cells += [f"{d[n]['fwd_s']:.2f} ({d[n]['fwd_s'] / f32['fwd_s']:.2f}×)",
                      f"{d[n]['fwdbwd_s']:.2f} ({d[n]['fwdbwd_s'] / f32['fwdbwd_s']:.2f}×)"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
