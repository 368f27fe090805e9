"""The exported GGUF run by llama.cpp and by the notebook's generate() (issue 34): file size, load time, tokens/s, the
first answers, greedy, one prompt at a time.

llama.cpp comes from the `cyllama` wheel (requirements-bench.txt: llama.cpp prebuilt, nothing compiles; it uses
llama.cpp's own thread count). Our side loads the same GGUF through transformers' GGUF loader (`gguf_file=`) and
answers with `generate()` (temperature 0) on `--threads` torch threads.

    .venv/bin/python benchmarks/export.py                        # the newest adapter under runs/, its base
    .venv/bin/python benchmarks/export.py --adapter runs/default/adapter --type q8_0
    .venv/bin/python benchmarks/export.py --params tests/tiny_params.json --prompts 2 --new-tokens 8 --out /tmp/x

With no saved adapter (or --fresh) it exports MODEL with a fresh (untrained) LoRA. Writes benchmarks/export.json
and benchmarks/export.md (or --out).
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # nbimport.py, rlft_support
from nbimport import load_notebook, notebook_config  # noqa: E402
from rlft_support import export  # noqa: E402
from rlft_support.demo import find_adapter  # noqa: E402
sys.path.insert(0, str(ROOT / "benchmarks"))
from ppo_seeds import cpu_name  # noqa: E402


def policy(nb, p, adapter_arg: str, fresh: bool):
    """(PeftModel, tokenizer, what it is): a saved adapter over its base, or MODEL with a fresh LoRA."""
    adapter = None if fresh else find_adapter(adapter_arg or "runs")
    if adapter is not None:
        try:
            model_name = export.base_of_adapter(adapter, p.CACHE_DIR)
        except ValueError:  # a tiny-model adapter records no base: MODEL of the parameters
            model_name = p.MODEL
        model, tok = export.load_adapter_model(adapter, model_name, p.CACHE_DIR, p.SEED)
        return model, tok, model_name, str(adapter)
    base, tok = nb.load_base(p.MODEL, p.CACHE_DIR, torch.device("cpu"), torch.float32, seed=p.SEED)
    return nb.add_lora(base, p.LORA_R, p.LORA_ALPHA, p.LORA_DROPOUT, p.LORA_TARGETS), tok, p.MODEL, "fresh LoRA"


def run_llama_cpp(path: Path, tok, prompts: list[str], new_tokens: int) -> dict:
    """Load the GGUF in llama.cpp (cyllama) and answer each rendered prompt greedily; tokens counted by
    re-tokenizing each answer with `tok` (cyllama's own count was not per answer here)."""
    from cyllama import LLM
    t0 = time.perf_counter()
    llm = LLM(str(path), temperature=0.0, max_tokens=new_tokens, seed=0, add_bos=False)
    load = time.perf_counter() - t0
    answers, tokens, seconds = [], 0, 0.0
    for prompt in prompts:
        t0 = time.perf_counter()
        out = llm(prompt)
        seconds += time.perf_counter() - t0
        answers.append(out.text)
        tokens += len(tok(out.text, add_special_tokens=False)["input_ids"]) + (out.finish_reason == "stop")
    return {"load_s": load, "tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds, "answers": answers}


def run_ours(nb, folder: Path, name: str, prompts: list[str], new_tokens: int) -> dict:
    """Load the GGUF through transformers and answer each rendered prompt with the notebook's generate()."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = nb.prepare_tokenizer(AutoTokenizer.from_pretrained(folder, gguf_file=name))
    load = time.perf_counter() - t0
    answers, tokens, seconds = [], 0, 0.0
    for prompt in prompts:
        t0 = time.perf_counter()
        gen = nb.generate(model, tok, [prompt], max_new_tokens=new_tokens, temperature=0.0)
        seconds += time.perf_counter() - t0
        answers.append(gen.texts[0])
        tokens += int(gen.response_mask.sum())
    return {"load_s": load, "tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds, "answers": answers}


def write_md(result: dict, out: Path) -> None:
    """The markdown table of one run."""
    rows = ["| runtime | load (s) | tokens | seconds | tokens/s |", "|---|---:|---:|---:|---:|"]
    for side in ("llama_cpp", "ours"):
        r = result[side]
        rows.append(f"| {side} | {r['load_s']:.2f} | {r['tokens']} | {r['seconds']:.2f} | {r['tok_per_s']:.1f} |")
    lines = [f"# Exported GGUF: llama.cpp vs generate() ({result['model']}, {result['adapter']})", "",
             f"`{result['file']}`: {result['size_mb']:.1f} MB ({result['type']}), written in {result['export_s']:.1f} s; "
             f"{len(result['prompts'])} eval prompts, greedy, at most {result['new_tokens']} new tokens, one at a time (llama.cpp's "
             f"tokens: its answers re-tokenized, + EOS); {result['cpu'] or result['machine']}, torch threads "
             f"{result['threads']}, load average {result['loadavg_before'][0]:.2f} -> {result['loadavg_after'][0]:.2f}.",
             "", *rows, "", f"The same greedy answer from both on {result['same_answers']} of {len(result['prompts'])} "
             "prompts.", ""]
    for i in range(min(3, len(result["prompts"]))):
        lines += [f"- {result['questions'][i]!r}", f"  - llama.cpp: {result['llama_cpp']['answers'][i]!r}",
                  f"  - generate(): {result['ours']['answers'][i]!r}"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", default="", help="adapter or run folder (default: the newest under runs/)")
    ap.add_argument("--fresh", action="store_true", help="MODEL with a fresh LoRA, not a saved adapter")
    ap.add_argument("--type", default="f16", choices=["f16", "q8_0"])
    ap.add_argument("--prompts", type=int, default=8, help="the first N eval prompts")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of our side")
    ap.add_argument("--params", default=None, help="JSON of parameter overrides, e.g. tests/tiny_params.json")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "export"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    nb = load_notebook(ROOT / "rlft.ipynb")
    p = notebook_config(ROOT / "rlft.ipynb", **(json.loads(Path(a.params).read_text()) if a.params else {}))
    model, tok, model_name, adapter = policy(nb, p, a.adapter, a.fresh)
    pairs = nb.split_pairs(nb.load_pairs(str(ROOT / p.DATA_PATH), p.DATA_COLUMNS, p.EVAL_FRAC), "eval")[:a.prompts]
    prompts = [nb.chat_prompt(tok, pair["prompt"]) for pair in pairs]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        kind = "gguf" if a.type == "f16" else "gguf-q8_0"
        path = export.export_model(model, tok, tmp, [kind], source_gguf=export.packaged_gguf_file()
                                   if model_name == "packaged" else None)[kind]
        export_s = time.perf_counter() - t0
        load_before = os.getloadavg()
        result = {"model": model_name, "adapter": adapter, "file": path.name, "type": a.type, "export_s": export_s,
                  "size_mb": path.stat().st_size / 1e6, "new_tokens": a.new_tokens, "threads": a.threads,
                  "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpu": cpu_name(),
                  "questions": [pair["prompt"] for pair in pairs], "prompts": prompts,
                  "llama_cpp": run_llama_cpp(path, tok, prompts, a.new_tokens),
                  "ours": run_ours(nb, Path(tmp), path.name, prompts, a.new_tokens)}
        result["loadavg_before"], result["loadavg_after"] = list(load_before), list(os.getloadavg())
        result["same_answers"] = sum(x == y for x, y in zip(result["llama_cpp"]["answers"], result["ours"]["answers"]))
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    write_md(result, out)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
