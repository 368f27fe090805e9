"""`make demo`: the notebook's chat demo served from a shell, base vs a trained adapter on http://127.0.0.1:7860.

    python chat.py [ADAPTER]    # a saved adapter (or run) folder; "" or none: the newest under RUN_DIR, then runs/

It loads the notebook's definition cells with `nbimport` (as nanochat's scripts/chat_cli.py loads its model) and
hands the method (generate_stream, LOGITS_MODES, escape_special_tokens, the reward model, the similarity) to
`rlft_support.demo`, which holds the page. ADAPTER arrives as sys.argv[1], never pasted into source. Ctrl-C stops it.
"""
from __future__ import annotations

import re, sys
from pathlib import Path

import torch

from nbimport import ROOT, load_notebook, notebook_config
from rlft_support import demo


def run_folder(adapter: str | Path) -> Path:
    """The run folder a served adapter belongs to, from the layout a run writes: RUN/adapter and
    RUN/ckpt-NNNNNN/adapter -> RUN. Any other adapter folder (one saved by hand) is its own run folder."""
    adapter = Path(adapter)
    if re.fullmatch(r"ckpt-\d{6,}", adapter.parent.name) and adapter.name == "adapter":
        return adapter.parent.parent
    return adapter.parent if adapter.name == "adapter" else adapter


def saved_reward_model(nb, run: str | Path):
    """The reward model the run saved (`run/reward_mlp.pt`), or None. Only that one folder: never a parent (a
    stranger's file higher up, up to /) nor another run. `nb`: the notebook module (its RewardMLP)."""
    path = Path(run) / "reward_mlp.pt"
    if not path.is_file():
        return None
    return nb.RewardMLP.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def serve_demo(notebook: str | Path = ROOT / "rlft.ipynb", block: bool = True, **overrides):
    """`make demo`: the notebook's Config (with `overrides`, e.g. DEMO_ADAPTER=...), its model, the adapter
    (DEMO_ADAPTER, else the newest under RUN_DIR, else under runs/), the reward model of that adapter's run
    (`run_folder`; none: similarity only) and the MiniLM similarity, served on 127.0.0.1. Blocks unless
    `block=False`; returns (app, url)."""
    nb, p = load_notebook(notebook), notebook_config(notebook, **overrides)
    where = [p.DEMO_ADAPTER] if p.DEMO_ADAPTER else [p.RUN_DIR, "runs"]
    adapter = next((a for a in map(demo.find_adapter, where) if a is not None), None)
    if adapter is None:
        raise FileNotFoundError(f"no saved adapter (adapter_config.json) under {' or '.join(map(str, where))}: run "
                                "`make run` first, or point DEMO_ADAPTER / ADAPTER= at a folder saved by "
                                "save_pretrained")
    device = nb.resolve_device(p.DEVICE)
    dtype = nb.resolve_dtype(p.DTYPE, device)
    base, tokenizer = nb.load_base(p.MODEL, p.CACHE_DIR, device, dtype, seed=p.SEED)
    nb.set_system_prompt(tokenizer, p.SYSTEM_PROMPT)
    judge = nb.Judge(p.JUDGE_EMBEDDER)  # the independent judge's metrics, beside the similarity
    embedder = nb.Embedder(p.EMBEDDER, device=device)
    rm = saved_reward_model(nb, run_folder(adapter))
    if rm is None:
        print(f"no reward_mlp.pt in {run_folder(adapter)}, the run of {adapter}: answers show the similarity only")
    app = demo.build_app(
        base, tokenizer, adapter=adapter, examples=None,
        stream_fn=nb.generate_stream, logits_modes=nb.LOGITS_MODES, escape_fn=nb.escape_special_tokens,
        score_fn=(lambda q, r: float(rm.score([q], [r], embedder)[0])) if rm is not None else None,
        similarity_fn=lambda r, ref: float(nb.similarity([r], [ref], embedder)[0]),
        judge_fn=lambda r, ref: judge.score([r], [ref])[0],
        limits=demo.DemoLimits(max_new_tokens=max(p.MAX_NEW_TOKENS, demo.DemoLimits.max_new_tokens)),
        sampling=dict(temperature=p.TEMPERATURE, top_k=p.TOP_K, top_p=p.TOP_P,
                      max_new_tokens=p.MAX_NEW_TOKENS, logits_mode=p.LOGITS_MODE, pca_k=p.PCA_K))
    print(f"serving base vs {adapter}")
    return demo.launch_app(app, share=p.DEMO_SHARE, port=p.DEMO_PORT or None, prevent_thread_lock=not block)


def main(argv: list[str]) -> None:
    """`python chat.py [ADAPTER]`: serve the demo (blocks until Ctrl-C)."""
    serve_demo(DEMO_ADAPTER=argv[1] if len(argv) > 1 else "")


if __name__ == "__main__":
    main(sys.argv)
