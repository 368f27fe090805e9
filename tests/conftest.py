"""Shared fixtures: the notebook imported as a module, and the tiny model (a 2-layer Llama, real tokenizer)."""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # nbimport.py, at the repository root
from nbimport import ROOT, load_notebook, notebook_parameters  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from generate import perturb_lora_b  # noqa: E402,F401  (one definition, shared with benchmarks/generate.py)

CACHE_DIR = os.environ.get("RLFT_CACHE", "~/.cache/rlft")
CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def nb():
    """rlft.ipynb's definition cells, as a module."""
    return load_notebook(ROOT / "rlft.ipynb")


@pytest.fixture(scope="session")
def params():
    """The notebook's default parameters, read from its `parameters` cell (so tests follow the defaults)."""
    return notebook_parameters(ROOT / "rlft.ipynb")


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
def tiny_lora(nb, tiny, params):
    """The tiny model wrapped in a LoRA adapter with the default LoRA parameters."""
    model, tokenizer = tiny
    lora = nb.add_lora(model, params["LORA_R"], params["LORA_ALPHA"], params["LORA_DROPOUT"], params["LORA_TARGETS"])
    return lora, tokenizer
