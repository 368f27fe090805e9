"""rlft_support.config: the one Config (a name per knob, one default each) and its validation (issue 35 items 6, 8)."""
import ast
import dataclasses
import inspect
import json
import math

import pytest

from nbimport import ROOT, notebook_config, notebook_parameters
from rlft_support import config
from rlft_support.config import Config

# LAYOUT section 6: the parameters cell's knobs (no default in Config), and the names moving elsewhere.
METHOD_KNOBS = set("""MODEL DEVICE DTYPE SEED RUN_DIR  LORA_R LORA_ALPHA LORA_DROPOUT LORA_TARGETS
    DATA_PATH DATA_COLUMNS EVAL_FRAC  MAX_NEW_TOKENS TEMPERATURE TOP_K TOP_P LOGITS_MODE PCA_K  EMBEDDER EVAL_N BOOTSTRAP
    REWARD_FN RM_PROMPTS RM_TEMPERATURES RM_MISMATCHED RM_HIDDEN RM_LR
    PPO_BATCH_SIZE PPO_SAMPLES_PER_PROMPT PPO_MINIBATCH_SIZE PPO_EPOCHS PPO_LR ADVANTAGE REWARD_NORM REWARD_CLIP
    PPO_CLIP PPO_VALUE_CLIP PPO_VF_COEF PPO_ENT_COEF KL_COEF GAMMA GAE_LAMBDA PTX_COEF MAX_GRAD_NORM
    PIPELINE TRAIN_BUDGET_S SFT_FRACTION SFT_LR SFT_BATCH_SIZE SFT_VAL_FRAC KL_ANCHOR RESUME  DEMO""".split())
MOVING_ELSEWHERE = ("DEMO_MAX_", "DEMO_PCA_", "DEMO_QUEUE_SIZE", "FFT_")  # DemoLimits; the FFT notebook
NAN, INF = math.nan, math.inf


@pytest.fixture(scope="module")
def params():
    return notebook_parameters()


def test_the_notebook_defaults_build_a_valid_config(params):
    cfg = notebook_config()
    assert Config.from_namespace({**params, "unrelated": 1}) == cfg  # from_namespace ignores other names
    assert all(getattr(cfg, name) == value for name, value in params.items() if hasattr(cfg, name))
    assert notebook_config(PPO_LR=1e-4).PPO_LR == 1e-4 and cfg.PPO_LR == params["PPO_LR"]
    assert notebook_config(**json.loads((ROOT / "tests" / "tiny_params.json").read_text())).MODEL == "tiny"


def test_the_fields_without_a_default_are_the_parameters_cell_method_knobs():
    assert {f.name for f in dataclasses.fields(Config) if f.default is dataclasses.MISSING} == METHOD_KNOBS
    assert len(dataclasses.fields(Config)) >= len(METHOD_KNOBS) + 40  # the support knobs, each with its default


def test_the_parameters_cell_holds_exactly_the_method_knobs(params):
    """LAYOUT section 6: the parameters cell's names are exactly Config's fields without a default (one default)."""
    assert set(params) == METHOD_KNOBS
    fields = {f.name for f in dataclasses.fields(Config)}
    assert not {n for n in fields if n.startswith(MOVING_ELSEWHERE)}


def test_support_defaults_are_todays_values_and_each_has_a_docstring(params):
    defaults = {f.name: f.default for f in dataclasses.fields(Config) if f.default is not dataclasses.MISSING}
    assert all(defaults[n] == params[n] and type(defaults[n]) is type(params[n]) for n in defaults if n in params)
    body = ast.parse(inspect.getsource(Config)).body[0].body
    documented = {a.target.id for a, doc in zip(body, body[1:]) if isinstance(a, ast.AnnAssign) and a.value is not None
                  and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)}
    assert documented == set(defaults)


def test_every_knob_has_a_range_rule():
    assert set(config.RULES) == {f.name for f in dataclasses.fields(Config)}


def test_config_is_frozen_and_refuses_unknown_names():
    cfg = notebook_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.PPO_LR = 1.0
    with pytest.raises(TypeError, match="PPO_LRR"):
        notebook_config(PPO_LRR=1e-4)  # a typo no longer passes silently
    assert dataclasses.replace(cfg, PPO_LR=1e-4).PPO_LR == 1e-4


BAD = [  # (overrides, the knob the message must name)
    # issue 35 item 6: settings that corrupt training
    ({"MAX_GRAD_NORM": NAN}, "MAX_GRAD_NORM"), ({"MAX_GRAD_NORM": -1.0}, "MAX_GRAD_NORM"),
    ({"MAX_GRAD_NORM": 0}, "MAX_GRAD_NORM"), ({"PPO_LR": INF}, "PPO_LR"), ({"PPO_LR": 0.0}, "PPO_LR"),
    ({"PPO_LR": -1e-4}, "PPO_LR"), ({"SFT_LR": INF}, "SFT_LR"), ({"RM_LR": NAN}, "RM_LR"),
    ({"REWARD_CLIP": NAN}, "REWARD_CLIP"), ({"REWARD_CLIP": -1.0}, "REWARD_CLIP"), ({"KL_COEF": NAN}, "KL_COEF"),
    ({"KL_COEF": INF}, "KL_COEF"), ({"PTX_COEF": -0.5}, "PTX_COEF"), ({"GAMMA": 1.5}, "GAMMA"),
    ({"GAE_LAMBDA": NAN}, "GAE_LAMBDA"), ({"PPO_CLIP": 0.0}, "PPO_CLIP"), ({"KL_TARGET": NAN}, "KL_TARGET"),
    # issue 35 item 8: unclear errors later
    ({"DTYPE": "nonsense"}, "DTYPE"), ({"SFT_BATCH_SIZE": 0}, "SFT_BATCH_SIZE"), ({"SFT_VAL_FRAC": 0.99}, "SFT_VAL_FRAC"),
    ({"TRAIN_BUDGET_S": NAN}, "TRAIN_BUDGET_S"), ({"TRAIN_BUDGET_S": 0}, "TRAIN_BUDGET_S"),
    # PPOConfig.__post_init__'s rules, spelled with the knob names
    ({"REWARD_NORM": "zscore"}, "REWARD_NORM"), ({"KL_ESTIMATOR": "k2"}, "KL_ESTIMATOR"),
    ({"SURROGATE_TARGET": "delta"}, "SURROGATE_TARGET"), ({"ADVANTAGE": "critic"}, "ADVANTAGE"),
    ({"OLD_LOGPROBS": "cache"}, "OLD_LOGPROBS"), ({"TEMPERATURE": 0.0}, "TEMPERATURE"), ({"PPO_EPOCHS": 0}, "PPO_EPOCHS"),
    ({"PPO_SAMPLES_PER_PROMPT": 3}, "PPO_SAMPLES_PER_PROMPT"), ({"PPO_SAMPLES_PER_PROMPT": 0}, "PPO_SAMPLES_PER_PROMPT"),
    ({"PPO_MINIBATCH_SIZE": 0}, "PPO_MINIBATCH_SIZE"), ({"PPO_MINIBATCH_SIZE": 17}, "PPO_MINIBATCH_SIZE"),
    ({"PPO_WHOLE_GROUPS": 1}, "PPO_WHOLE_GROUPS"),
    ({"ADVANTAGE": "group", "PPO_SAMPLES_PER_PROMPT": 1}, "PPO_SAMPLES_PER_PROMPT"),
    ({"ADVANTAGE": "group", "SURROGATE_TARGET": "adv_plus_delta"}, "SURROGATE_TARGET"),
    ({"KL_MONITOR_EVERY": -1}, "KL_MONITOR_EVERY"), ({"PTX_COEF": NAN}, "PTX_COEF"),
    ({"ADVANTAGE": "group", "PPO_DEMO_BATCH_SIZE": 3}, "PPO_DEMO_BATCH_SIZE"),
    # check_pipeline_params's
    ({"PIPELINE": "rl+sft"}, "PIPELINE"), ({"KL_ANCHOR": "ref"}, "KL_ANCHOR"), ({"SFT_FRACTION": 1.5}, "SFT_FRACTION"),
    ({"SFT_FRACTION": NAN}, "SFT_FRACTION"), ({"SFT_VAL_FRAC": 1.0}, "SFT_VAL_FRAC"), ({"SFT_VAL_FRAC": -0.1}, "SFT_VAL_FRAC"),
    # check_sampling's, for the rollouts', the evaluation's and the reward data's sampling
    ({"TEMPERATURE": NAN}, "TEMPERATURE"), ({"TEMPERATURE": -1.0}, "TEMPERATURE"), ({"TOP_K": -1}, "TOP_K"),
    ({"TOP_K": 1.5}, "TOP_K"), ({"TOP_K": True}, "TOP_K"), ({"TOP_P": 0.0}, "TOP_P"), ({"TOP_P": 1.5}, "TOP_P"),
    ({"TOP_P": NAN}, "TOP_P"), ({"EVAL_TEMPERATURE": -1.0}, "EVAL_TEMPERATURE"), ({"RM_TEMPERATURES": []}, "RM_TEMPERATURES"),
    ({"RM_TEMPERATURES": [0.7, NAN]}, "RM_TEMPERATURES"),
    # the other knobs' ranges and types
    ({"LOGITS_MODE": "pca"}, "LOGITS_MODE"), ({"PPO_LOGITS_MODE": "pca"}, "PPO_LOGITS_MODE"), ({"PCA_K": 0}, "PCA_K"),
    ({"REWARD_FN": "bleu"}, "REWARD_FN"), ({"LORA_R": 0}, "LORA_R"), ({"LORA_DROPOUT": 1.0}, "LORA_DROPOUT"),
    ({"LORA_TARGETS": []}, "LORA_TARGETS"), ({"MAX_NEW_TOKENS": 0}, "MAX_NEW_TOKENS"), ({"SEED": -1}, "SEED"),
    ({"PPO_BATCH_SIZE": 16.0}, "PPO_BATCH_SIZE"), ({"EVAL_BATCH_SIZE": 0}, "EVAL_BATCH_SIZE"), ({"BOOTSTRAP": 0}, "BOOTSTRAP"),
    ({"RM_VAL_FRAC": 0.5, "RM_TEST_FRAC": 0.5}, "RM_VAL_FRAC"), ({"CKPT_EVERY_S": NAN}, "CKPT_EVERY_S"),
    ({"CKPT_KEEP": 0}, "CKPT_KEEP"), ({"NUM_PROCESSES": 0}, "NUM_PROCESSES"), ({"DEMO_PORT": 70000}, "DEMO_PORT"),
    ({"RESUME": "yes"}, "RESUME"), ({"MODEL": ""}, "MODEL"), ({"TORCH_THREADS": -1}, "TORCH_THREADS"),
]


@pytest.mark.parametrize("overrides, name", BAD, ids=[f"{k}={v!r}" for k, v in (next(iter(b[0].items())) for b in BAD)])
def test_a_bad_value_names_its_parameter(overrides, name):
    with pytest.raises(ValueError, match=name):
        notebook_config(**overrides)


@pytest.mark.parametrize("overrides", [
    {"TEMPERATURE": 1}, {"TRAIN_BUDGET_S": 60.5}, {"SFT_VAL_FRAC": 0.0}, {"TOP_P": 1}, {"LORA_TARGETS": "all-linear"},
    {"REWARD_FN": lambda p, r, refs: None}, {"ADVANTAGE": "gae", "PPO_SAMPLES_PER_PROMPT": 1, "REWARD_NORM": "running"},
    {"PIPELINE": "sft+rl", "KL_ANCHOR": "base"}, {"DTYPE": "bfloat16"}, {"EVAL_TEMPERATURE": 0}, {"MAX_GRAD_NORM": 0.5},
])
def test_values_in_range_pass(overrides):
    notebook_config(**overrides)


def test_the_notebooks_allowed_values_are_configs(nb):
    """The notebook imports the allowed-value lists and check_sampling from rlft_support.config: one copy each."""
    for name in ("LOGITS_MODES", "REWARD_NORMS", "KL_ESTIMATORS", "SURROGATE_TARGETS", "ADVANTAGES",
                 "OLD_LOGPROBS_SOURCES", "PIPELINES", "KL_ANCHORS", "check_sampling", "Config"):
        assert getattr(nb, name) is getattr(config, name), name
    assert not hasattr(nb, "PPOConfig") and not hasattr(nb, "ppo_config") and not hasattr(nb, "PPO_PARAMETERS")
