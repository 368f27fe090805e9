"""Threads on a busy machine (issue 18 §4): greedy decode speed under OpenMP's default (spinning) wait policy vs
OMP_WAIT_POLICY=PASSIVE (the notebook's default, set in its common cell before torch loads), on a quiet machine
and with one competing busy process that this script starts (bounded in time) and stops.

Each measurement is a fresh subprocess (the wait policy is read once, when torch loads): the packaged model in fp32,
--threads torch threads, batch 1 and batch 8, --new-tokens greedy tokens, best of 2 after a warm-up. The four
settings (policy × quiet/busy) are alternated over --rounds rounds; medians over rounds.

    .venv/bin/python benchmarks/threads.py [--rounds 2] [--threads 2] [--params tests/tiny_params.json]

Writes benchmarks/threads.json (tok_s[policy][condition][batch], busy_slowdown_default, busy_slowdown_passive =
quiet / busy tokens/s at batch 8, quiet_ratio_passive = passive / default quiet tokens/s at batch 8, loadavg) and
benchmarks/threads.md.
"""
from __future__ import annotations

import argparse, contextlib, json, os, statistics, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from generate import competing_process  # noqa: E402
from ppo_seeds import write_report  # noqa: E402

POLICIES = {"default": None, "passive": "PASSIVE"}
PROMPTS = ["What is the capital of France?", "Explain photosynthesis briefly.", "Name three primary colours.",
           "Why is the sky blue?", "How do vaccines work?", "What is a prime number?", "Describe the water cycle.",
           "Who wrote Hamlet?"]


def worker(args) -> None:
    """Child: tokens/s of greedy generate() at batch 1 and 8 -> one JSON line on stdout."""
    import torch
    sys.path.insert(0, str(ROOT))  # nbimport.py
    from nbimport import load_notebook, notebook_config
    nb, P = load_notebook(), notebook_config(**(json.loads(Path(args.params).read_text()) if args.params else {}))
    torch.set_num_threads(args.threads)
    model, tok = nb.load_base(P.MODEL, os.path.expanduser(P.CACHE_DIR), torch.device("cpu"), torch.float32)
    prompts, out = [nb.chat_prompt(tok, p) for p in PROMPTS], {}
    for b in (1, 8):
        nb.generate(model, tok, prompts[:b], max_new_tokens=4, temperature=0)
        rates = []
        for _ in range(2):
            t = time.perf_counter()
            g = nb.generate(model, tok, prompts[:b], max_new_tokens=args.new_tokens, temperature=0)
            rates.append(g.response_mask.sum().item() / (time.perf_counter() - t))
        out[str(b)] = max(rates)
    print(json.dumps(out))


def measure(args, policy: str | None, busy: bool) -> dict:
    """One child run under `policy`, with a competing `while True` process alive during it when busy."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, __file__, "--worker", "--threads", str(args.threads), "--new-tokens", str(args.new_tokens)]
    with competing_process(args.busy_s) if busy else contextlib.nullcontext():
        res = subprocess.run(cmd + (["--params", args.params] if args.params else []), env=env, capture_output=True,
                             text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--busy-s", type=float, default=300, help="upper bound on the competing process's life")
    ap.add_argument("--params", default=None, help="JSON of parameter overrides (tests/tiny_params.json: smoke test)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "threads"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    load_before, runs = os.getloadavg(), {p: {"quiet": [], "busy": []} for p in POLICIES}
    settings = [(p, c) for c in ("quiet", "busy") for p in POLICIES]
    for r in range(args.rounds):
        for policy, cond in settings[r % len(settings):] + settings[: r % len(settings)]:
            runs[policy][cond].append(measure(args, POLICIES[policy], cond == "busy"))
            print(f"round {r} {policy:8s} {cond:5s} {runs[policy][cond][-1]}", flush=True)
    tok_s = {p: {c: {b: statistics.median(x[b] for x in runs[p][c]) for b in ("1", "8")} for c in runs[p]} for p in runs}
    out = {"tok_s": tok_s, "runs": runs, "threads": args.threads, "new_tokens": args.new_tokens, "rounds": args.rounds,
           "busy_slowdown_default": tok_s["default"]["quiet"]["8"] / tok_s["default"]["busy"]["8"],
           "busy_slowdown_passive": tok_s["passive"]["quiet"]["8"] / tok_s["passive"]["busy"]["8"],
           "quiet_ratio_passive": tok_s["passive"]["quiet"]["8"] / tok_s["default"]["quiet"]["8"],
           "loadavg": {"before": load_before, "after": os.getloadavg()}, "model": json.loads(Path(args.params).read_text()).get("MODEL") if args.params else "packaged"}
    rows = [f"| {p} | {c} | {tok_s[p][c]['1']:.1f} | {tok_s[p][c]['8']:.1f} |" for p in POLICIES for c in ("quiet", "busy")]
    write_report(args.out, out,
        f"# Decode speed on a quiet vs a busy machine: OpenMP wait policy\n\n{out['model']} model, fp32, {args.threads} torch "
        f"threads, {args.new_tokens} greedy tokens, medians of {args.rounds} alternated rounds (fresh process each). "
        f"Busy = one competing `while True` process. Load average {load_before} -> {out['loadavg']['after']}.\n\n"
        "| OMP wait policy | machine | batch 1 tok/s | batch 8 tok/s |\n|---|---|---|---|\n" + "\n".join(rows) +
        f"\n\nbusy_slowdown (batch 8, quiet / busy): default {out['busy_slowdown_default']:.2f}x, passive "
        f"{out['busy_slowdown_passive']:.2f}x; passive / default on a quiet machine: {out['quiet_ratio_passive']:.2f}.\n")


if __name__ == "__main__":
    main()
