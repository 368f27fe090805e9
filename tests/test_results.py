"""Results section: the SFT baseline, and the headline/ablation scripts end to end on the tiny model."""
import json
import subprocess
import sys

import pytest
import torch

from nbimport import ROOT
from rlft_support import report

PAIRS = [{"prompt": "Name a colour.", "reference": "Blue is a colour.", "split": "train", "family": "f"},
         {"prompt": "Say hi.", "reference": "Hi there!", "split": "train", "family": "f"}]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_sft_batch_learns_only_the_reference_and_eos(nb, tiny):
    _, tok = tiny
    ids, mask, labels = nb.sft_batch(tok, PAIRS, torch.device("cpu"))
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 2
    for row, pair in enumerate(PAIRS):
        learned = labels[row][labels[row] != -100].tolist()
        assert learned[-1] == tok.eos_token_id
        assert tok.decode(learned[:-1]) == pair["reference"]
        prompt_len = len(tok(nb.chat_prompt(tok, pair["prompt"]), add_special_tokens=False)["input_ids"])
        assert (labels[row, :prompt_len] == -100).all()
        assert int(mask[row].sum()) == prompt_len + len(learned)  # padding is masked out


def test_sft_train_lowers_the_reference_loss(nb, tiny):
    model, tok = tiny
    lora = nb.add_lora(model, 8, 16, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    ids, mask, labels = nb.sft_batch(tok, PAIRS, torch.device("cpu"))

    def reference_nll():
        with torch.no_grad():
            return lora(input_ids=ids, attention_mask=mask, labels=labels).loss.item()

    before = reference_nll()
    nb.seed_everything(0)
    logs = nb.sft_train(lora, tok, nb.PromptSampler(PAIRS, 0), budget_s=60, max_steps=20, batch_size=2, lr=2e-2,
                        progress=False)
    assert [r["step"] for r in logs] == list(range(1, 21)) and all(r["loss"] > 0 for r in logs)
    assert reference_nll() < before - 0.2  # (the random 64-wide tiny model is near-uniform: ~10.9 nats at start)
    assert not lora.training


def results_markdown() -> str:
    """The results section's markdown, one line (the `# ` and line breaks of rlft.py gone)."""
    import nbformat
    cells = nbformat.read(ROOT / "rlft.ipynb", as_version=4).cells
    text = " ".join(c.source for c in cells if c.cell_type == "markdown" and c.metadata["rlft"]["section"] == "results")
    return " ".join(text.split())


def test_results_png_draws_the_pipeline_headline_the_text_quotes(tmp_path):
    """results.png of the committed benchmarks/pipeline_seeds.json: each arm's gain with its interval; each trained
    arm minus the free baseline `prompt` on the reward's metric and on the E5 judge; each arm minus SFT. Every
    figure drawn is quoted by the results section (not the old PPO-from-base headline)."""
    committed = json.loads((ROOT / "benchmarks" / "pipeline_seeds.json").read_text())
    arms, default = committed["arms"], committed["default_arm"]
    fig = report.plot_results(committed, tmp_path / "results.png")
    label = lambda a: f"{a} (default)" if a == default else a  # noqa: E731
    panels = [[(label(a), a, "gain") for a in arms]]
    if "prompt" in arms:  # the free baseline: two rows a trained arm, the reward's metric and the judge's
        panels.append([(f"{a}: {m}", a, k) for a in arms if a != "prompt"
                       for m, k in (("MiniLM", "gain_over_prompt"), ("E5 judge", "indep_gain_over_prompt"))])
    if "sft" in arms:
        panels.append([(label(a), a, "rl_over_sft") for a in arms if a not in ("sft", "prompt")])
    assert (tmp_path / "results.png").stat().st_size > 10_000 and len(fig.axes) == len(panels) == 3
    quoted = lambda m, lo, hi: f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]".replace("-", "\u2212")  # noqa: E731
    text = results_markdown()
    for ax, rows in zip(fig.axes, panels):
        assert [t.get_text() for t in ax.get_yticklabels()] == [name for name, _, _ in rows]
        drawn = [p.get_width() for p in ax.patches]
        errorbar = next(c for c in ax.containers if type(c).__name__ == "ErrorbarContainer")
        intervals = [tuple(seg[:, 0]) for seg in errorbar.lines[2][0].get_segments()]
        for (name, arm, key), mean, (lo, hi) in zip(rows, drawn, intervals):
            figures = [arms[arm][f"{key}_{f}"] for f in ("mean", "ci_low", "ci_high")]
            assert (mean, lo, hi) == pytest.approx(figures)
            assert quoted(*figures) in text, (name, quoted(*figures))  # the text quotes what is drawn
    assert "1200 s" in fig.axes[0].get_title()


def test_show_committed_displays_the_tables_and_returns_the_json(tmp_path, monkeypatch):
    import IPython.display
    shown = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    (tmp_path / "a.md").write_text("| table a |")
    (tmp_path / "a.json").write_text('{"gain": 1.5}')
    assert report.show_committed(("a", "missing"), tmp_path) == {"a": {"gain": 1.5}}
    assert shown[0].data == "| table a |" and shown[1] == f"({tmp_path / 'missing.md'} not found)"


def run_script(tmp_path, name, *args):
    out = tmp_path / name
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--params", str(ROOT / "tests" / "tiny_params.json"),
           "--threads", "1", "--cache", str(tmp_path / "cache"), "--out", str(out), *args]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".md").read_text()


def test_ppo_seeds_script_end_to_end(nb, tmp_path):
    r, md = run_script(tmp_path, "ppo_seeds", "--budget", "2", "--seeds", "0", "1")
    for field in ("gain_mean", "gain_min", "gain_ci_low", "gain_ci_high", "family_gains", "kl_mean", "distinct2_ratio",
                  "eos_rate_before", "eos_rate_after", "mean_len_before", "mean_len_after", "wall_s", "peak_rss_mb"):
        assert field in r, field
    assert len(r["runs"]) == 2 and r["gain_min"] == min(r["gains"]) and r["wall_s"] > 0
    assert all(run["train"]["iterations"] >= 1 for run in r["runs"])
    assert r["gain_ci_low"] <= r["gain_mean"] <= r["gain_ci_high"]
    assert "gain, mean over seeds" in md
    again, _ = run_script(tmp_path, "ppo_seeds", "--budget", "2", "--seeds", "0", "1")  # cached: same figures
    assert again["gains"] == r["gains"]


def test_ablations_script_end_to_end(nb, tmp_path, cfg):
    r, md = run_script(tmp_path, "ablations", "--budget", "1", "--seeds", "0")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ablations import VARIANTS
    assert set(r["variants"]) == set(VARIANTS)
    for name, v in r["variants"].items():
        assert len(v["gains"]) == 1 and "gain_mean" in v and "kl_mean" in v and f"| {name} |" in md
        if name != "default":
            assert len(v["vs_default"]) == 1
    assert r["variants"]["sft"]["overrides"] == {}
    assert r["variants"]["default"]["overrides"] == {}
    assert r["variants"]["entropy"]["overrides"]["PPO_ENT_COEF"] != cfg.PPO_ENT_COEF  # flipped, never a no-op
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    report.plot_gains(ax, r["variants"], "ablations")  # the variants are plot_gains' input
    assert [t.get_text() for t in ax.get_yticklabels()] == list(r["variants"])
    plt.close(fig)


def headroom_module():
    """benchmarks/headroom.py as a module (its helpers are plain functions)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import headroom
    return headroom


def test_best_of_k_is_the_exact_expected_max_over_subsets():
    import itertools
    import numpy as np
    hr = headroom_module()
    scores = [3.0, -1.5, 7.25, 3.0, 0.0, 5.5]  # a tie included
    got = hr.best_of_k(scores, [1, 2, 3, 4, 5, 6])
    for k, value in got.items():
        brute = np.mean([max(c) for c in itertools.combinations(scores, k)])
        assert value == pytest.approx(brute, abs=1e-12), k
    assert got[1] == pytest.approx(np.mean(scores), abs=1e-12) and got[6] == max(scores)
    assert all(got[k] <= got[k + 1] for k in range(1, 6))
    assert hr.best_of_k([2.0] * 4, [1, 2, 4]) == {1: 2.0, 2: 2.0, 4: 2.0}
    with pytest.raises(ValueError):
        hr.best_of_k(scores, [7])
    assert hr.k_values(32) == [1, 2, 4, 8, 16, 32] and hr.k_values(6) == [1, 2, 4, 6]


def test_headroom_prompts_take_every_family_in_turn():
    hr = headroom_module()
    pairs = [{"prompt": f"{f}{i}", "family": f} for i in range(5) for f in "abcd"]
    picked = hr.balanced_prompts(pairs, 8)
    assert [p["prompt"] for p in picked] == ["a0", "b0", "c0", "d0", "a1", "b1", "c1", "d1"]  # first 2 of each
    uneven = [{"prompt": f"x{i}", "family": "x"} for i in range(6)] + [{"prompt": "y0", "family": "y"}]
    assert [p["prompt"] for p in hr.balanced_prompts(uneven, 4)] == ["x0", "x1", "x2", "y0"]
    assert hr.balanced_prompts(pairs, 0) == pairs and hr.balanced_prompts(pairs, 99) == pairs


def headroom_figures(r):
    return {m: {g: v for g, v in fig.items() if g in ("overall", "per_family")} for m, fig in r["models"].items()}


def test_headroom_script_end_to_end_and_resumes(nb, tmp_path):
    import numpy as np
    args = ("--n-prompts", "4", "--sft-budget", "2", "--k-max", "4", "--batch-rows", "8")  # 2 prompts per call
    r, md = run_script(tmp_path, "headroom", *args)
    for field in ("settings", "machine", "threads", "loadavg_before", "loadavg_after", "seconds", "models", "rows"):
        assert field in r, field
    assert r["threads"] == 1 and len(r["loadavg_before"]) == 3 and r["seconds"] > 0
    assert r["settings"]["ks"] == [1, 2, 4] and r["settings"]["n_prompts_used"] == 4
    eval_families = {p["family"] for p in nb.split_pairs(nb.load_pairs(str(ROOT / "data/starter.jsonl")), "eval")}
    assert set(r["models"]) == {"base", "sft"} and r["models"]["sft"]["train"]["iterations"] >= 1
    for name, m in r["models"].items():
        assert set(m["per_family"]) == eval_families  # every family represented
        assert sum(g["n"] for g in m["per_family"].values()) == m["overall"]["n"] == 4
        rows = [row for row in r["rows"] if row["model"] == name]
        assert m["overall"]["greedy"] == pytest.approx(np.mean([row["greedy"] for row in rows]), abs=1e-9)
        for group in [m["overall"], *m["per_family"].values()]:
            assert set(group["temperatures"]) == {"0.7", "1.0"}
            for t, v in group["temperatures"].items():
                best = [v["best_of"][k] for k in ("1", "2", "4")]
                assert all(a <= b + 1e-9 for a, b in zip(best, best[1:])), (name, t, best)
                assert best[0] == pytest.approx(v["mean_sample"], abs=1e-9)
                assert v["spread"] >= 0 and 0 <= v["sample_eos_frac"] <= 1
        for t, v in m["overall"]["temperatures"].items():
            scores = np.array([row["samples"][t] for row in rows])  # [4 prompts, 4 samples]
            assert scores.shape == (4, 4)
            assert v["mean_sample"] == pytest.approx(scores.mean(), abs=1e-9)
            assert v["spread"] == pytest.approx(scores.std(axis=1).mean(), abs=1e-9)
            assert v["best_of"]["4"] == pytest.approx(scores.max(axis=1).mean(), abs=1e-9)
    assert "| base | 0.7 |" in md and "| sft | 1.0 |" in md and "best of 4" in md
    assert (tmp_path / "headroom.png").stat().st_size > 10_000
    # A killed run: one chunk of the base model's T=1.0 samples lost. The rerun samples only that chunk again
    # (seeded per chunk, so identically), reuses the rest and the saved SFT adapter (not retrained).
    (base_dir,) = (tmp_path / "cache").glob("base-*")
    part = base_dir / "samples-T1.0.json"
    chunks = json.loads(part.read_text())
    assert sorted(chunks) == ["0", "2"]
    part.write_text(json.dumps({"0": chunks["0"]}))
    again, _ = run_script(tmp_path, "headroom", *args)
    assert headroom_figures(again) == headroom_figures(r)
    assert again["models"]["sft"]["train"] == r["models"]["sft"]["train"]
    assert json.loads(part.read_text())["0"] == chunks["0"]


def test_readme_results_block_matches_the_committed_json():
    """The README's figures are written by tools/readme_results.py from benchmarks/*.json, never retyped."""
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "readme_results.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
