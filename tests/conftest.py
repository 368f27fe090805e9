"""Shared fixtures: the notebook imported as a module, and the tiny model (a 2-layer Llama, real tokenizer)."""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # nbimport.py, at the repository root
from nbimport import ROOT, load_notebook, notebook_config  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from generate import perturb_lora_b  # noqa: E402,F401  (one definition, shared with benchmarks/generate.py)

CACHE_DIR = os.environ.get("RLFT_CACHE", "~/.cache/rlft")
CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def nb():
    """rlft.ipynb's definition cells, as a module."""
    return load_notebook(ROOT / "rlft.ipynb")


@pytest.fixture(scope="session")
def cfg():
    """The notebook's Config: its `parameters` cell and Config's defaults (so tests follow the defaults)."""
    return notebook_config(ROOT / "rlft.ipynb")


# The PPO unit tests were written for these settings (the old PPOConfig's defaults, which differed from the
# notebook's in these 9 knobs): one sample per prompt, a critic with GAE, no PPO-ptx term.
UNIT_PPO = dict(PPO_BATCH_SIZE=8, PPO_SAMPLES_PER_PROMPT=1, PPO_MINIBATCH_SIZE=4, PPO_EPOCHS=2, PPO_LR=1e-4,
                KL_COEF=0.05, REWARD_NORM="running", ADVANTAGE="gae", PTX_COEF=0.0)


def unit_cfg(**knobs):
    """The notebook's Config with UNIT_PPO, then `knobs` (by knob name) on top."""
    return notebook_config(ROOT / "rlft.ipynb", **{**UNIT_PPO, **knobs})


@pytest.fixture
def one_thread():
    """One CPU thread for the test: deterministic, and far faster than 2 spinning threads on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny(nb):
    """A fresh tiny base model (seed 0, fp32, CPU) and its tokenizer."""
    return nb.load_base("tiny", CACHE_DIR, CPU, torch.float32, seed=0)


@pytest.fixture
def tiny_lora(nb, tiny, cfg):
    """The tiny model wrapped in a LoRA adapter with the default LoRA parameters."""
    model, tokenizer = tiny
    lora = nb.add_lora(model, cfg.LORA_R, cfg.LORA_ALPHA, cfg.LORA_DROPOUT, cfg.LORA_TARGETS)
    return lora, tokenizer
