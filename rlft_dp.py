"""The `accelerate launch` entry of a data-parallel training run (`make train-dp`): each process loads the notebook
and runs its run_pipeline as one rank (rlft_support.parallel.train_rank). The plumbing (the collective, the
local launcher launch_local) lives in rlft_support/parallel.py; this file is only the command line.

    accelerate launch rlft_dp.py train --params overrides.json
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from nbimport import load_notebook, notebook_config  # noqa: E402  (the notebook as a module, as the benchmarks import it)
from rlft_support import parallel  # noqa: E402


def train(P) -> None:
    """The notebook's training run on this process's rank (started by `accelerate launch`, see `make train-dp`):
    the model, data, embedder and reward as sections 1, 2, 4 and 6 build them, then parallel.train_rank with the
    notebook's run_pipeline.
    REWARD_FN must be "similarity" here (the reward MLP is fitted by the notebook's section 6)."""
    import torch
    nb = load_notebook()
    if P.REWARD_FN != "similarity":
        raise SystemExit(f"make train-dp: REWARD_FN={P.REWARD_FN!r}; the script entry runs REWARD_FN='similarity' "
                         "(fit the reward model in the notebook, or use NUM_PROCESSES there)")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    nb.seed_everything(P.SEED)
    model, tok = nb.load_policy(P, device)
    train_pairs = nb.split_pairs(nb.load_pairs(str(ROOT / P.DATA_PATH), P.DATA_COLUMNS, P.EVAL_FRAC), "train")
    embedder = nb.Embedder(P.EMBEDDER, device=device)
    reward_fn = nb.make_reward_fn("similarity", embedder, None, device=device)
    parallel.train_rank(nb.run_pipeline, model, tok, train_pairs, reward_fn, Path(P.RUN_DIR), P, embedder=embedder)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="rlft data-parallel entry (run it with `accelerate launch`)")
    ap.add_argument("command", choices=["train"])
    ap.add_argument("--params", default=None, help="JSON file of parameter overrides")
    args = ap.parse_args()
    train(notebook_config(**(json.loads(Path(args.params).read_text()) if args.params else {})))
