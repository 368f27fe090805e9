"""Write the README's results block from the committed benchmark JSONs, so its figures are never retyped.

    python tools/readme_results.py           # rewrite the block between the markers in README.md
    python tools/readme_results.py --check   # exit 1 if README.md's block differs (the tests run this)

The block lies between `<!-- results:begin -->` and `<!-- results:end -->`.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
ARM_NAMES = {"sft+rl": "SFT then RL", "sft": "SFT alone", "rl": "RL alone"}
ARM_DETAILS = {"rl": " (PPO-ptx)"}  # shown on the arm's own bullet only


def signed(x: float) -> str:
    return f"{x:+.2f}"


def ci(arm: dict, key: str) -> str:
    """'+0.35 [+0.17, +0.54]' from arm[key_mean], arm[key_ci_low], arm[key_ci_high]."""
    return f"{signed(arm[key + '_mean'])} [{signed(arm[key + '_ci_low'])}, {signed(arm[key + '_ci_high'])}]"


def arm_line(name: str, arm: dict, default: bool = False) -> str:
    """One bullet: an arm's gain, its interval, per-seed gains, length and EOS after."""
    seeds = ", ".join(f"{signed(g)} (seed {k})" for g, k in zip(arm["gains"], arm["seeds"])) if "seeds" in arm \
        else ", ".join(signed(g) for g in arm["gains"])
    label = ARM_NAMES.get(name, name) + ARM_DETAILS.get(name, "") + (", the default" if default else "")
    bold, interval = ci(arm, "gain").split(" ", 1)
    return (f"  - {label}: **{bold}** {interval}; per seed {seeds}; {arm['samples_seen']:.0f} samples seen; answers "
            f"{arm['mean_len_after']:.1f} tokens long, EOS rate {arm['eos_rate_after']:.2f}, "
            f"KL to the base {arm['kl_mean']:.1f} nats" + over_prompt(arm) + ".")


def over_prompt(arm: dict) -> str:
    """'; over the free baseline ..., the E5 judge's ..., chrF ...' where the arm has them (issue 32), else ''."""
    if arm.get("indep_gain_over_prompt_mean") is None:
        return ""
    return (f"; over the free baseline {ci(arm, 'gain_over_prompt')}, the E5 judge's "
            f"{ci(arm, 'indep_gain_over_prompt')}, chrF {arm['chrf_gain_over_prompt_mean']:+.1f}")


def prompt_line(arm: dict) -> str:
    """The free baseline's bullet: the untrained model with the system line, no training."""
    bold, interval = ci(arm, "gain").split(" ", 1)
    return (f"  - The free baseline `prompt` (the untrained model told `BASELINE_SYSTEM_PROMPT`, no training): "
            f"**{bold}** {interval}; answers {arm['mean_len_after']:.1f} tokens long, EOS rate {arm['eos_rate_after']:.2f}.")


def pipeline_block(d: dict) -> list[str]:
    """The headline bullets from benchmarks/pipeline_seeds.json."""
    default = d.get("default_arm", "sft+rl")
    order = [default] + [a for a in ("sft+rl", "sft", "rl") if a in d["arms"] and a != default]
    counts = sorted({len(a.get("seeds", d["seeds"])) for name, a in d["arms"].items() if name != "prompt"})
    n_seeds = " or ".join(str(n) for n in counts)
    cpus = ", ".join(d.get("cpus_of_runs") or [d["cpu"]])
    lines = [f"- **Headline** (`benchmarks/pipeline_seeds.md`): {n_seeds} seed(s) × {d['budget_s']:.0f} s per "
             f"run, one run at a time on the {d['threads']}-thread CPU ({cpus}); gain in similarity to held-out references "
             f"(10 × cos of all-MiniLM-L6-v2, {d['eval_prompts']} eval prompts, greedy), 95% paired-bootstrap "
             "intervals:"]
    lines += [prompt_line(d["arms"]["prompt"])] if "prompt" in d["arms"] else []
    lines += [arm_line(a, d["arms"][a], a == default) for a in order]
    for a in (x for x in order if x != "sft" and d["arms"][x].get("rl_over_sft_mean") is not None):
        arm, name = d["arms"][a], ARM_NAMES.get(a, a) + (" (the default)" if a == default else "")
        bold, interval = ci(arm, "rl_over_sft").split(" ", 1)
        judge = f"; the E5 judge's {ci(arm, 'indep_rl_over_sft')}" if arm.get("indep_rl_over_sft_mean") is not None else ""
        lines.append(f"  - {name} minus SFT alone, same prompts: **{bold}** {interval}{judge}.")
    met = [k for k, v in d["acceptance"].items() if v]
    missed = [k for k, v in d["acceptance"].items() if not v]
    short = [f"{d['budget_s']:.0f} s, not its 1200 s"] if d["budget_s"] < 1200 else []
    short += [f"{n_seeds} seed(s) an arm, not its 3"] if counts[0] < 3 else []
    lines.append(f"  - Acceptance of issues 20 and 32 ({'; '.join(short) or 'as specified'}): met "
                 f"{', '.join(f'`{k}`' for k in met) or 'none'}; missed {', '.join(f'`{k}`' for k in missed) or 'none'}.")
    return lines


def bf16_learning(learn: dict | None) -> str:
    """The end of the bf16 bullet: its learning over seeds from benchmarks/speed_learning_bf16_600s.json."""
    if not learn:
        return "; its learning is not measured over seeds, so `DTYPE = \"auto\"` keeps fp32 on CPUs."
    a, b = learn["arms"]["rl"], learn["arms"]["rl-bf16"]
    verdict = ("more" if b["over_parent_ci_low"] > 0 else "less" if b["over_parent_ci_high"] < 0
               else "as much within noise")
    return (f". Learning, RL alone for {learn['budget_s']:.0f} s, seeds {learn['seeds']} "
            f"(`benchmarks/speed_learning_bf16_600s.md`, on {', '.join(learn['cpus_of_runs'])}): fp32 {ci(a, 'gain')} "
            f"with {a['samples_seen']:.0f} answers per seed, bf16 {ci(b, 'gain')} with {b['samples_seen']:.0f}; bf16 "
            f"minus fp32 {ci(b, 'over_parent')}, judge's {ci(b, 'indep_over_parent')}. Within the budget the "
            f"bf16 path saw {b['samples_seen'] / a['samples_seen']:.2f}x the answers and learned {verdict}, so "
            "`DTYPE = \"auto\"` keeps fp32 on CPUs.")


def issue33_block(extra: dict) -> list[str]:
    """Issue 33's bullets, from benchmarks/iteration_cost_issue33.json, speed_learning_600s.json,
    iteration_cost_bf16_cpu.json, speed_learning_bf16_600s.json, batch32_600s.json and vs_trl.json (those committed)."""
    ic = extra.get("iteration_cost_issue33")
    if not ic:
        return []
    ph = lambda arm, k: ic[f"phases_{arm}"][k]["median"]  # noqa: E731
    lines = [f"- **Samples per second** (`benchmarks/iteration_cost_issue33.md` on {ic['cpu']}, {ic['threads']} threads, "
             f"medians of {ic['iterations_measured']} alternated iterations): {ic['samples_per_s_before']:.2f} answers/s "
             f"before, {ic['samples_per_s_after']:.2f} after (**{ic['speedup']:.2f}x**): rollouts on merged LoRA "
             "weights, inverse-CDF sampling, the K answers of a prompt sharing its forward (the references of PPO-ptx "
             f"too), whole groups per minibatch; generate {ph('before', 't_generate'):.1f} -> "
             f"{ph('after', 't_generate'):.1f} s, reference {ph('before', 't_ref'):.1f} -> {ph('after', 't_ref'):.1f} s, "
             f"update {ph('before', 't_update'):.1f} -> {ph('after', 't_update'):.1f} s."]
    learn = extra.get("speed_learning_600s")
    if learn and {"rl", "rl-fast"} <= set(learn["arms"]):
        a, b = learn["arms"]["rl"], learn["arms"]["rl-fast"]
        per100 = lambda x: 100 * x["gain_mean"] / max(x["samples_seen"], 1)  # noqa: E731
        lines.append(f"  - RL alone for {learn['budget_s']:.0f} s, seeds {learn['seeds']} "
                     f"(`benchmarks/speed_learning_600s.md`): before {ci(a, 'gain')} with {a['samples_seen']:.0f} "
                     f"answers per seed ({per100(a):+.3f} per 100 answers), after {ci(b, 'gain')} with "
                     f"{b['samples_seen']:.0f} ({per100(b):+.3f}); after minus before, same prompts: "
                     f"{ci(b, 'over_parent')}.")
    bf = extra.get("iteration_cost_bf16_cpu")
    if bf:
        lines.append(f"  - A bf16 base on this CPU with LoRA under bf16 autocast and π_old recomputed "
                     f"(`benchmarks/iteration_cost_bf16_cpu.md`): {bf['samples_per_s_after']:.2f} against "
                     f"{bf['samples_per_s_before']:.2f} answers/s for the fp32 path ({bf['speedup']:.2f}x)"
                     + bf16_learning(extra.get("speed_learning_bf16_600s")))
    big = extra.get("batch32_600s")
    if big and {"rl", "rl-8x4"} <= set(big["arms"]):
        a, b = big["arms"]["rl"], big["arms"]["rl-8x4"]
        lines.append(f"  - Rollouts of 8 prompts x 4 answers (`benchmarks/batch32_600s.md`, RL alone for "
                     f"{big['budget_s']:.0f} s, seeds {big['seeds']}): {b['samples_seen']:.0f} answers per seed against "
                     f"{a['samples_seen']:.0f} for 4 x 4 ({b['samples_seen'] / a['samples_seen']:.2f}x), {ci(b, 'gain')} "
                     f"against {ci(a, 'gain')}; minus 4 x 4 {ci(b, 'over_parent')}, judge's "
                     f"{ci(b, 'indep_over_parent')}: not adopted.")
    trl = extra.get("vs_trl")
    if trl and trl.get("s_per_sample_ours"):
        lines.append(f"  - Against TRL (`benchmarks/vs_trl.md`, same model, LoRA, prompts, reward and batch): "
                     f"{trl['s_per_sample_ours']:.2f} s per answer for ours, {trl['s_per_sample_grpo']:.2f} for "
                     f"`GRPOTrainer` ({trl['ratio_time_vs_grpo']:.2f}x its time), {trl['s_per_sample_rloo']:.2f} for "
                     f"`RLOOTrainer` ({trl['ratio_time_vs_rloo']:.2f}x); peak RSS {trl['ratio_rss_vs_grpo']:.2f}x GRPO's.")
    return lines


LEVERS = ("levers_600s", "levers_sft_600s", "unlabelled_600s")  # issue 32's step-4 levers, 600 s runs (pipeline_seeds.py --variant)



def levers_block(extra: dict) -> list[str]:
    """Issue 32's levers, one bullet per arm of each committed benchmarks/levers_*.json: its gain over the base and
    over the free baseline `prompt` (the reward's metric and the E5 judge), and a variant minus its parent arm."""
    lines = []
    for name in (n for n in LEVERS if n in extra):
        d = extra[name]
        sets = f", with {', '.join(d['overrides'])}" if d.get("overrides") else ""
        lines.append(f"- **Levers** (`benchmarks/{name}.md`, {d['budget_s']:.0f} s a run on {', '.join(d['cpus_of_runs'])}{sets}; "
                     "gain in 10 × cos MiniLM, the judge's in 10 × cos E5, 95% paired-bootstrap intervals):")
        for arm_name, arm in d["arms"].items():
            seeds = ", ".join(str(s) for s in arm.get("seeds", d["seeds"]))
            text = f"  - `{arm_name}` (seeds {seeds}): over the base {ci(arm, 'gain')}"
            if arm_name != "prompt" and arm.get("gain_over_prompt_mean") is not None:
                text += f"; over `prompt` {ci(arm, 'gain_over_prompt')}, judge's {ci(arm, 'indep_gain_over_prompt')}"
            sft = d.get("sft_arm", "sft")
            if arm_name not in ("prompt", sft) and sft in d["arms"] and arm.get("rl_over_sft_mean") is not None:
                text += f"; minus `{sft}` {ci(arm, 'rl_over_sft')}, judge's {ci(arm, 'indep_rl_over_sft')}"
            if arm_name in d.get("variants", {}) and arm.get("over_parent_mean") is not None:
                parent, knobs = d["variants"][arm_name]
                set_ = ", ".join(f"{k} = {v}" for k, v in knobs.items())
                text += f"; minus `{parent}` ({set_}) {ci(arm, 'over_parent')}, judge's {ci(arm, 'indep_over_parent')}"
            lines.append(text + f"; EOS rate {arm['eos_rate_after']:.2f}.")
    return lines


def speed_block(it: dict, gen: dict, threads: dict, extra: dict) -> list[str]:
    """The cost bullets from benchmarks/iteration_cost.json, generate.json, threads.json and, where committed,
    `extra`: iteration_cost_bf16.json, generate_bf16.json, data_parallel.json (name -> dict)."""
    cpu = f" on {it['cpu']}" if it.get("cpu") else ""
    lines = issue33_block(extra) + [f"- **One RL iteration** (`benchmarks/iteration_cost.md`{cpu}, {it['threads']} threads, medians of "
             f"{it['iterations_measured']} alternated iterations): {it['s_per_iter_before']:.1f} s before, "
             f"{it['s_per_iter_after']:.1f} s after ({it['speedup']:.2f}x): π_old's log-probs from generate(), "
             "the reference pass on the sampled tokens only, the exact KL every few iterations, checkpoints by time."]
    if "gain_before" in it:
        lines.append(f"  - RL alone for {it['gain_after_budget_s']:.0f} s, seeds {it['gain_after_seeds']}: gain "
                     f"{signed(it['gain_before'])} before ({it['iterations_before']:.1f} iterations per seed on average), "
                     f"{signed(it['gain_after'])} after ({it['iterations_after']:.1f}); measured in an earlier "
                     "session, on a slower CPU without native bf16.")
    bf = extra.get("iteration_cost_bf16")
    if bf:
        agree = [v["new"] for v in extra["generate_bf16"]["greedy_agreement_fp32_hf"].values()] \
            if "generate_bf16" in extra else []
        tokens = f", greedy tokens {min(agree):.0%}-{max(agree):.0%} the same as fp32's" if agree else ""
        lines.append(f"  - A bf16 base on this CPU (native bf16: avx512_bf16/AMX; `benchmarks/iteration_cost_bf16.md`): "
                     f"{bf['s_per_iter_after']:.1f} s against {bf['s_per_iter_before']:.1f} s for the fp32 path before "
                     f"({bf['speedup']:.2f}x) and {it['s_per_iter_after']:.1f} s for today's fp32 path (a separate run): "
                     f"{1 - bf['s_per_iter_after'] / it['s_per_iter_after']:.0%} faster{tokens}"
                     + ("; its learning over seeds is in the bf16 bullet above." if "speed_learning_bf16_600s" in extra
                        else ", learning not yet measured over seeds, so `DTYPE = \"auto\"` keeps fp32 on CPUs."))
    lines.append(f"- **Rollouts** (`benchmarks/generate.md`, {gen['torch_threads']} threads, fp32): the adapter merged "
                 f"for sampling is {gen['speedup_b1']:.2f}x / {gen['speedup_b8']:.2f}x / {gen['speedup_b16']:.2f}x "
                 f"faster at batch 1 / 8 / 16; batch-1 decoding reaches {gen['bound_fraction_b1']:.0%} of the "
                 f"memory-bandwidth bound ({gen['bandwidth_gbs']:.1f} GB/s measured).")
    if gen.get("speedup_b1_compiled") is not None:
        lines.append(f"  - The decode step under `torch.compile` (merged too): {gen['speedup_b1_compiled']:.2f}x / "
                     f"{gen['speedup_b8_compiled']:.2f}x at batch 1 / 8, after a one-time compile of "
                     f"{sum(gen['compile_s'].values()):.0f} s (opt-in, `COMPILE_DECODE`).")
    gb = extra.get("generate_bf16")
    if gb:
        lines.append(f"  - A bf16 base, merged (`benchmarks/generate_bf16.md`): {gb['speedup_b1']:.2f}x / "
                     f"{gb['speedup_b8']:.2f}x / {gb['speedup_b16']:.2f}x over fp32 attached; greedy tokens agree "
                     f"{gb['greedy_agreement_fp32_hf']['8']['new']:.0%} with fp32 at batch 8.")
    lines.append(f"- **A busy machine** (`benchmarks/threads.md`): with one competing busy process, batch-8 "
                 f"decoding slows {threads['busy_slowdown_default']:.1f}x with OpenMP's default wait policy and "
                 f"{threads['busy_slowdown_passive']:.1f}x with `OMP_WAIT_POLICY=PASSIVE` (the notebook's default); "
                 f"on a quiet machine passive runs at {threads['quiet_ratio_passive']:.2f}x the default at batch 8.")
    dp = extra.get("data_parallel")
    if dp:
        lines.append(f"- **Data parallel** (`benchmarks/data_parallel.md`): {dp['samples_per_s_2p1t']:.2f} samples/s "
                     f"with 2 processes x 1 thread, {dp['samples_per_s_1p1t']:.2f} with 1 x 1 "
                     f"({dp['speedup_2p_vs_1p1t']:.2f}x) and {dp['samples_per_s_1p2t']:.2f} with 1 x 2; "
                     f"{dp['allreduce_bytes_per_step'] / 1e6:.1f} MB all-reduced per optimizer step.")
    return lines


def block() -> str:
    d = json.loads((ROOT / "benchmarks" / "pipeline_seeds.json").read_text())
    load = lambda name: json.loads((ROOT / "benchmarks" / f"{name}.json").read_text())  # noqa: E731
    extra = {name: load(name) for name in ("iteration_cost_bf16", "generate_bf16", "data_parallel", "iteration_cost_issue33",
                                           "speed_learning_600s", "iteration_cost_bf16_cpu", "speed_learning_bf16_600s", "batch32_600s",
                                           "vs_trl") + LEVERS
             if (ROOT / "benchmarks" / f"{name}.json").exists()}
    return "\n".join([BEGIN, *pipeline_block(d), *levers_block(extra), *speed_block(load("iteration_cost"), load("generate"),
                                                               load("threads"), extra), END])


def replaced(text: str, new_block: str) -> str:
    """text with the part between the markers (markers included) replaced by new_block."""
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + new_block + text[end:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = replaced(text, block())
    if args.check:
        if new != text:
            print("README.md's results block differs from benchmarks/*.json: run python tools/readme_results.py")
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
