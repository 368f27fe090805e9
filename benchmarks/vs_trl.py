"""Our RL loop against TRL's GRPOTrainer and RLOOTrainer on this CPU (issue 19, item 3).

The three systems share everything that is not the algorithm: the notebook's model (`load_base`, MODEL from the
parameters cell, fp32 on CPU; no hub id is ever passed: the model object is built here and handed to the trainer),
a fresh LoRA with LORA_R / LORA_ALPHA / LORA_DROPOUT / LORA_TARGETS (peft `LoraConfig`), the train prompts rendered
by the notebook's `chat_prompt` (TRL gets them as plain, already rendered strings, so both see the same tokens), the
exact reward (`make_reward_fn("similarity")`: 10 x cos(MiniLM(answer), MiniLM(reference)), wrapped as a TRL reward
function that reads the dataset's `reference` column), MAX_NEW_TOKENS, TEMPERATURE (no top-k / top-p), PPO_LR
(constant, no warm-up, AdamW, no weight decay), MAX_GRAD_NORM, beta = KL_COEF, clip epsilon = PPO_CLIP, and
PPO_BATCH_SIZE answers per rollout = PPO_BATCH_SIZE / PPO_SAMPLES_PER_PROMPT prompts x PPO_SAMPLES_PER_PROMPT
answers, split into PPO_MINIBATCH_SIZE-row optimizer steps (TRL: per_device_train_batch_size = PPO_MINIBATCH_SIZE,
steps_per_generation = PPO_BATCH_SIZE / PPO_MINIBATCH_SIZE, num_iterations = PPO_EPOCHS, so both take the same
number of optimizer steps per rollout and TRL, like us, recomputes the old log-probs for the importance ratio).

TRL configuration chosen (and why):
- GRPO: loss_type="dr_grpo" (token losses summed and divided by a constant, max_completion_length: no length bias),
  scale_rewards="batch" (the reward is continuous, ~0-10: a per-group std is tiny for near-identical answers and
  would blow their differences up; the batch std keeps the scale of the whole rollout, like our running std);
- RLOO: TRL's defaults for its loss (leave-one-out baseline, KL in the reward), normalize_advantages=False;
- both: bf16=False (TRL's default is bf16 autocast, ours fp32 on CPU), activation_checkpointing=False (TRL's
  default gradient_checkpointing is True; we do not checkpoint, so the same work is timed; --trl-grad-ckpt turns
  it on to see its memory/time trade), the reference = the same PEFT model with the adapter disabled (TRL does
  that when it wraps the base model with peft_config itself), no saving, no logging integrations, use_cpu, one process.
- Ours: the notebook's PPO iteration (`run_iteration` / `train_loop`) on the default configuration, RL only (the
  KL to the base model; no SFT stage, since TRL gets none), no checkpoints (TRL saves none either). What TRL cannot
  express and so stays ours only: the PPO-ptx term (PTX_COEF) and the entropy bonus of RLOO.

    .venv/bin/python benchmarks/vs_trl.py --mode cost --rounds 2 --steps 6 --threads 1
    .venv/bin/python benchmarks/vs_trl.py --mode learn --budget 600 --seeds 0 1 2 --threads 1
    .venv/bin/python benchmarks/vs_trl.py --mode cost --params tests/tiny_params.json --steps 1 --rounds 1 --out /tmp/t

cost: each system runs in its own subprocess (peak RSS = that child's ru_maxrss, from os.wait4), one warm-up
rollout then --steps timed rollouts; systems alternate round-robin over --rounds. s_per_sample = median seconds
per rollout / PPO_BATCH_SIZE. learn: each (system, seed) trains for --budget wall seconds in its own subprocess,
then the notebook's `evaluate` on the whole eval split (greedy), paired with the base answers (ppo_seeds.py's
evaluation and caching); each run's result is cached as JSON under --cache, so a killed benchmark resumes.
Writes <out>.json and <out>.md; the fields of a mode that was not run are null (the previous values of the other
mode are kept when <out>.json exists).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from ppo_seeds import (Context, cpu_name, evaluate_after, fresh_model, key_of, paired_gain_ci,  # noqa: E402
                       run_key_fields, notebook_config, overrides_of)

SYSTEMS = ("ours", "grpo", "rloo")
COST_FIELDS = [f"{k}_{s}" for k in ("s_per_sample", "samples_per_s", "peak_rss_mb") for s in SYSTEMS] + \
    ["ratio_time_vs_grpo", "ratio_time_vs_rloo", "ratio_rss_vs_grpo", "ratio_rss_vs_rloo", "cost_rollouts",
     "cost_threads", "cost_seconds_per_rollout", "cost_peak_rss_mb_per_round"]
LEARN_FIELDS = [f"{k}_{s}" for k in ("gain", "gain_ci_low", "gain_ci_high", "gains", "rollouts") for s in SYSTEMS] + \
    ["budget_s", "seeds", "learn_threads"]


class LiteContext:
    """What a cost run needs (the notebook, its parameters, the train pairs, the embedder), without the base eval."""

    def __init__(self, P: dict, threads: int):
        torch.set_num_threads(threads)
        from nbimport import load_notebook
        self.nb, self.P = load_notebook(), P
        self.device = self.nb.resolve_device(P.DEVICE)
        pairs = self.nb.load_pairs(str(ROOT / P.DATA_PATH), P.DATA_COLUMNS, P.EVAL_FRAC)
        self.train_pairs = self.nb.split_pairs(pairs, "train")
        self.embedder = self.nb.Embedder(P.EMBEDDER, device=self.device)


# --- TRL -------------------------------------------------------------------------------------------------------
def trl_reward(ctx):
    """The notebook's exact similarity as a TRL reward function: (prompts, completions, reference) -> list[float]."""
    score = ctx.nb.make_reward_fn("similarity", ctx.embedder, None, device=ctx.device)

    def similarity(prompts, completions, reference, **_):
        return [float(x) for x in score(prompts, completions, reference)]
    return similarity


def trl_dataset(ctx, tok):
    """The train pairs as a datasets.Dataset: `prompt` (rendered by chat_prompt) and `reference`."""
    from datasets import Dataset
    return Dataset.from_list([{"prompt": ctx.nb.chat_prompt(tok, p["prompt"]), "reference": p["reference"]}
                              for p in ctx.train_pairs])


def trl_config(system: str, P: dict, seed: int, max_steps: int, out_dir: str, grad_ckpt: bool):
    """GRPOConfig / RLOOConfig matching our configuration (see the module docstring)."""
    from trl import GRPOConfig, RLOOConfig
    common = dict(output_dir=out_dir, seed=seed, max_steps=max_steps, learning_rate=P.PPO_LR,
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=P.PPO_WEIGHT_DECAY,
                  max_grad_norm=P.MAX_GRAD_NORM, per_device_train_batch_size=P.PPO_MINIBATCH_SIZE,
                  gradient_accumulation_steps=1, steps_per_generation=P.PPO_BATCH_SIZE // P.PPO_MINIBATCH_SIZE,
                  num_generations=P.PPO_SAMPLES_PER_PROMPT, num_iterations=P.PPO_EPOCHS,
                  max_completion_length=P.MAX_NEW_TOKENS, temperature=P.TEMPERATURE, top_k=0, top_p=1.0,
                  beta=P.KL_COEF, epsilon=P.PPO_CLIP, bf16=False, fp16=False, use_cpu=True,
                  activation_checkpointing=grad_ckpt, save_strategy="no", report_to="none", logging_steps=10 ** 9,
                  disable_tqdm=True, dataloader_num_workers=0)
    if system == "grpo":
        return GRPOConfig(**common, loss_type="dr_grpo", scale_rewards="batch")
    return RLOOConfig(**common, normalize_advantages=False)


def rollout_clock(steps_per_rollout: int, budget_s: float = float("inf")):
    """A TrainerCallback that records the end time of every rollout (steps_per_rollout optimizer steps) and stops
    training before a rollout that would end past budget_s (as our train_loop does: elapsed + last <= budget)."""
    from transformers import TrainerCallback

    class RolloutClock(TrainerCallback):
        def __init__(self):
            self.t0, self.ends = None, []

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.time()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % steps_per_rollout == 0:
                self.ends.append(time.time())
                last = self.ends[-1] - (self.ends[-2] if len(self.ends) > 1 else self.t0)
                if self.ends[-1] - self.t0 + last > budget_s:
                    control.should_training_stop = True

        def seconds(self) -> list[float]:
            """Seconds of each rollout (generation + its optimizer steps), in order."""
            return np.diff([self.t0] + self.ends).tolist()
    return RolloutClock()


def trl_trainer(ctx, system: str, seed: int, max_steps: int, clock, out_dir: str, grad_ckpt: bool):
    """A GRPOTrainer / RLOOTrainer on the notebook's base model (seeded as fresh_model) with our LoRA config."""
    from peft import LoraConfig
    from trl import GRPOTrainer, RLOOTrainer
    nb, P = ctx.nb, ctx.P
    nb.seed_everything(seed)
    base, tok = nb.load_base(P.MODEL, P.CACHE_DIR, ctx.device, nb.resolve_dtype(P.DTYPE, ctx.device), seed=P.SEED)
    lora = LoraConfig(task_type="CAUSAL_LM", r=P.LORA_R, lora_alpha=P.LORA_ALPHA, lora_dropout=P.LORA_DROPOUT,
                      target_modules=P.LORA_TARGETS)
    cls = GRPOTrainer if system == "grpo" else RLOOTrainer
    return cls(model=base, reward_funcs=trl_reward(ctx), args=trl_config(system, P, seed, max_steps, out_dir, grad_ckpt),
               train_dataset=trl_dataset(ctx, tok), processing_class=tok, callbacks=[clock], peft_config=lora), tok


# --- workers (one system, one process) -------------------------------------------------------------------------
def cost_ours(ctx, steps: int, seed: int) -> list[float]:
    """1 + steps PPO iterations of the notebook (run_iteration: rollout + update, no checkpoint) -> seconds each."""
    nb = ctx.nb
    model, tok = fresh_model(nb, ctx.P, seed, ctx.device)
    reward_fn = nb.make_reward_fn("similarity", ctx.embedder, None, device=ctx.device)
    state = nb.make_ppo_state(model, tok, ctx.P)
    sampler = nb.PromptSampler(ctx.train_pairs, seed)
    return [nb.run_iteration(state, sampler, reward_fn, None)[0]["seconds"] for _ in range(1 + steps)]


def cost_trl(ctx, system: str, steps: int, seed: int, out_dir: str, grad_ckpt: bool) -> list[float]:
    """1 + steps TRL rollouts (each generation + its optimizer steps) -> seconds each."""
    spr = ctx.P.PPO_BATCH_SIZE // ctx.P.PPO_MINIBATCH_SIZE
    clock = rollout_clock(spr)
    trainer, _ = trl_trainer(ctx, system, seed, (1 + steps) * spr, clock, out_dir, grad_ckpt)
    trainer.train()
    return clock.seconds()


def learn_ours(ctx, seed: int, budget: float, run_path: Path) -> dict:
    """The notebook's train_loop (RL only, default PPO configuration) for `budget` s, then the eval split."""
    nb, P, t0 = ctx.nb, ctx.P, time.time()
    model, tok = fresh_model(nb, P, seed, ctx.device)
    reward_fn = nb.make_reward_fn("similarity", ctx.embedder, None, device=ctx.device)
    nb.seed_everything(seed)
    state = nb.make_ppo_state(model, tok, P)
    logs = nb.train_loop(state, nb.PromptSampler(ctx.train_pairs, seed), reward_fn, run_path, budget_s=budget,
                         max_iterations=P.TRAIN_MAX_ITERS, ckpt_every=0, progress=False)
    return evaluate_after(ctx, P, model, tok, seed, t0, {"method": "ours", "train": {"iterations": len(logs)}})


def learn_trl(ctx, system: str, seed: int, budget: float, run_path: Path, grad_ckpt: bool) -> dict:
    """TRL for `budget` wall seconds (the clock callback stops it), then the same evaluation as ours."""
    t0, spr = time.time(), ctx.P.PPO_BATCH_SIZE // ctx.P.PPO_MINIBATCH_SIZE
    clock = rollout_clock(spr, budget_s=budget)
    trainer, tok = trl_trainer(ctx, system, seed, 10 ** 7, clock, str(run_path), grad_ckpt)
    trainer.train()
    model = trainer.model.eval()
    return evaluate_after(ctx, ctx.P, model, tok, seed, t0, {"method": system, "train": {"iterations": len(clock.ends)}})


def worker(args) -> None:
    """--worker cost|learn: one system in this process; the result as JSON in --result."""
    P = notebook_config(**overrides_of(args.params, args.set))
    out_dir = str(Path(args.cache) / "trl_out" / f"{args.system}-{os.getpid()}")
    if args.worker == "cost":
        ctx = LiteContext(P, args.threads)
        secs = (cost_ours(ctx, args.steps, args.seed) if args.system == "ours"
                else cost_trl(ctx, args.system, args.steps, args.seed, out_dir, args.trl_grad_ckpt))
        result = {"system": args.system, "seconds": secs}
    else:
        ctx = Context(P, Path(args.cache), args.threads)
        run_path = Path(args.cache) / "runs" / Path(args.result).stem
        result = (learn_ours(ctx, args.seed, args.budget, run_path) if args.system == "ours"
                  else learn_trl(ctx, args.system, args.seed, args.budget, run_path, args.trl_grad_ckpt))
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(result))


def spawn(args, worker_mode: str, system: str, seed: int, result: Path) -> tuple[dict, float]:
    """Run this script as a worker for one system; -> (its result, its peak RSS in MB from os.wait4)."""
    cmd = [sys.executable, __file__, "--worker", worker_mode, "--system", system, "--seed", str(seed),
           "--result", str(result), "--steps", str(args.steps), "--budget", str(args.budget),
           "--threads", str(args.threads), "--cache", args.cache] + (["--params", args.params] if args.params else [])
    cmd += [x for s in args.set for x in ("--set", s)] + (["--trl-grad-ckpt"] if args.trl_grad_ckpt else [])
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{system} worker failed with exit code {proc.returncode}")
    return json.loads(result.read_text()), usage.ru_maxrss / 1024  # Linux: KiB


# --- the two modes ---------------------------------------------------------------------------------------------
def run_cost(args, P: dict) -> dict:
    """Round-robin over the systems (the order rotated each round); warm-up rollout dropped; medians."""
    secs, rss = {s: [] for s in SYSTEMS}, {s: [] for s in SYSTEMS}
    tmp = Path(args.cache) / "vs_trl_cost"
    for r in range(args.rounds):
        for system in SYSTEMS[r % 3:] + SYSTEMS[:r % 3]:
            res, mb = spawn(args, "cost", system, args.seed, tmp / f"{system}-r{r}.json")
            secs[system] += res["seconds"][1:]
            rss[system].append(mb)
            print(f"cost round {r} {system}: {np.median(res['seconds'][1:]):.2f} s/rollout, {mb:.0f} MB", flush=True)
    batch = P.PPO_BATCH_SIZE
    out = {"cost_seconds_per_rollout": secs, "cost_peak_rss_mb_per_round": rss, "cost_rollouts": args.steps * args.rounds,
           "cost_threads": args.threads}
    for s in SYSTEMS:
        out[f"s_per_sample_{s}"] = float(np.median(secs[s])) / batch
        out[f"samples_per_s_{s}"] = 1.0 / out[f"s_per_sample_{s}"]
        out[f"peak_rss_mb_{s}"] = float(max(rss[s]))
    for s in ("grpo", "rloo"):
        out[f"ratio_time_vs_{s}"] = out["s_per_sample_ours"] / out[f"s_per_sample_{s}"]
        out[f"ratio_rss_vs_{s}"] = out["peak_rss_mb_ours"] / out[f"peak_rss_mb_{s}"]
    return out


def run_learn(args, P: dict) -> dict:
    """Every (system, seed) for --budget s in its own process, cached; gains and paired-bootstrap intervals."""
    ctx = Context(P, Path(args.cache), args.threads)  # computes (or reads) the base eval once, before the runs
    key = key_of(run_key_fields(P)
                 | {"budget": args.budget, "grad_ckpt": args.trl_grad_ckpt})
    out, runs = {"budget_s": args.budget, "seeds": args.seeds, "learn_threads": args.threads}, {}
    for system in SYSTEMS:
        runs[system] = []
        for seed in args.seeds:
            path = Path(args.cache) / f"vs_trl-{system}-{key}-s{seed}.json"
            if not path.exists():
                spawn(args, "learn", system, seed, path)
            runs[system].append(json.loads(path.read_text()))
            print(f"learn {system} seed {seed}: gain {runs[system][-1]['gain']:+.3f} "
                  f"({runs[system][-1]['train']['iterations']} rollouts)", flush=True)
        lo, hi = paired_gain_ci(ctx, runs[system], P.BOOTSTRAP)
        out |= {f"gain_{system}": float(np.mean([r["gain"] for r in runs[system]])), f"gain_ci_low_{system}": lo,
                f"gain_ci_high_{system}": hi, f"gains_{system}": [r["gain"] for r in runs[system]],
                f"rollouts_{system}": [r["train"]["iterations"] for r in runs[system]]}
    return out


def fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def load_line(r: dict) -> str:
    """'1.2 -> 1.9': the 1-minute load average before and after this call, or 'not recorded'."""
    load = r.get("loadavg")
    return f"{load['before'][0]:.1f} -> {load['after'][0]:.1f}" if load else "not recorded"


def markdown_report(r: dict) -> str:
    """The committed table: one row per system."""
    lines = ["# Our RL loop vs TRL GRPOTrainer / RLOOTrainer", "",
             f"Model `{r['model']}`, {r['machine']} ({r.get('cpu') or 'CPU not recorded'}), trl {r['trl_version']}; "
             f"load average (1 min) {load_line(r)}; torch threads: cost {r['cost_threads']}, "
             f"learning {r['learn_threads']}. "
             f"{r['samples_per_step']} answers per rollout ({r['samples_per_step'] // r['samples_per_prompt']} prompts × "
             f"{r['samples_per_prompt']}), {r['max_new_tokens']} new tokens. Cost: median over {r['cost_rollouts']} "
             f"timed rollouts per system (one warm-up dropped per process), alternated; peak RSS of each process. "
             f"Learning: {r['budget_s']} s of training per seed (seeds {r['seeds']}), greedy eval on the whole eval "
             f"split, 95% paired bootstrap. {r.get('note', '')}", "",
             "| system | s / answer | answers / s | peak RSS (MB) | gain [95% CI] |", "|---|---|---|---|---|"]
    for s, name in zip(SYSTEMS, ("ours (notebook PPO)", "TRL GRPO (dr_grpo, batch scaling)", "TRL RLOO")):
        ci = (f" [{fmt(r.get(f'gain_ci_low_{s}'), '+.2f')}, {fmt(r.get(f'gain_ci_high_{s}'), '+.2f')}]"
              if r.get(f"gain_{s}") is not None else "")
        lines.append(f"| {name} | {fmt(r.get(f's_per_sample_{s}'), '.3f')} | {fmt(r.get(f'samples_per_s_{s}'), '.2f')} | "
                     f"{fmt(r.get(f'peak_rss_mb_{s}'), '.0f')} | {fmt(r.get(f'gain_{s}'), '+.2f')}{ci} |")
    lines += ["", f"ratio_time_vs_grpo {fmt(r.get('ratio_time_vs_grpo'), '.2f')}, ratio_time_vs_rloo "
              f"{fmt(r.get('ratio_time_vs_rloo'), '.2f')}, ratio_rss_vs_grpo {fmt(r.get('ratio_rss_vs_grpo'), '.2f')}.", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("cost", "learn"), default="cost")
    ap.add_argument("--params", default=None, help="JSON file of parameter overrides (e.g. tests/tiny_params.json)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override one parameter")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="learn: seeds per system")
    ap.add_argument("--budget", type=float, default=600, help="learn: training wall seconds per run")
    ap.add_argument("--steps", type=int, default=6, help="cost: timed rollouts per process, after one warm-up")
    ap.add_argument("--rounds", type=int, default=2, help="cost: round-robin rounds over the systems")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads in every worker")
    ap.add_argument("--trl-grad-ckpt", action="store_true", help="TRL with its default gradient checkpointing")
    ap.add_argument("--cache", default=str(ROOT / "runs" / "bench"), help="per-run results and shared caches")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "vs_trl"), help="output path without suffix")
    ap.add_argument("--note", default="", help="a sentence for the markdown")
    ap.add_argument("--worker", choices=("cost", "learn"), help=argparse.SUPPRESS)
    ap.add_argument("--system", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help="cost: the seed of every process")
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    import trl
    P, t0, out, load0 = notebook_config(**overrides_of(args.params, args.set)), time.time(), Path(args.out), os.getloadavg()
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    old = old if old.get("model") == P.MODEL else {}  # the other mode's figures, only from the same model
    r = {k: old.get(k) for k in COST_FIELDS + LEARN_FIELDS}
    r.update(run_cost(args, P) if args.mode == "cost" else run_learn(args, P))
    r = {"model": P.MODEL, "machine": platform.machine(), "trl_version": trl.__version__,
         "samples_per_step": P.PPO_BATCH_SIZE, "samples_per_prompt": P.PPO_SAMPLES_PER_PROMPT,
         "max_new_tokens": P.MAX_NEW_TOKENS, "trl_gradient_checkpointing": args.trl_grad_ckpt, "note": args.note,
         "overrides": args.set, "this_call_s": time.time() - t0, "cpu": cpu_name(),
         "loadavg": {"before": list(load0), "after": list(os.getloadavg())}, **r}
    out.with_suffix(".json").write_text(json.dumps(r, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown_report(r))
    print(markdown_report(r))


if __name__ == "__main__":
    main()
