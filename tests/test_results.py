"""Results section: the SFT baseline, and the headline/ablation scripts end to end on the tiny model."""
import json
import subprocess
import sys

import pytest
import torch

from nbimport import ROOT

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
    nb.plot_results(r, None, tmp_path / "headline.png")
    assert (tmp_path / "headline.png").stat().st_size > 10_000


def test_ablations_script_end_to_end(nb, tmp_path, params):
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
    assert r["variants"]["entropy"]["overrides"]["PPO_ENT_COEF"] != params["PPO_ENT_COEF"]  # flipped, never a no-op
    nb.plot_results({"runs": [], "budget_s": 1}, r, tmp_path / "ablations.png")
    assert (tmp_path / "ablations.png").stat().st_size > 10_000
