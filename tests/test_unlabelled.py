"""Section 8.2, prompts without a reference (UNLABELLED_FRAC, issue 32 item 4): the deterministic labelled /
unlabelled split of the TRAIN pairs, SFT and the reward model's data on the labelled share only, RL on the
unlabelled share only scored by the reward model (no PPO-ptx term there), and nothing changed at 0."""
import dataclasses
import hashlib
import json
import subprocess
import sys

import pytest
import torch

from nbimport import ROOT, notebook_config
from rlft_support.data import load_pairs, split_pairs, unlabelled_split

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = json.loads((ROOT / "tests" / "tiny_params.json").read_text())
FAST = {"PPO_BATCH_SIZE": 4, "PPO_SAMPLES_PER_PROMPT": 2, "PPO_MINIBATCH_SIZE": 4, "SFT_BATCH_SIZE": 4,
        "CKPT_EVERY": 0, "EVAL_EVERY": 0, "RESUME": False, "SEED": 0}
UNLAB = {"UNLABELLED_FRAC": 0.5, "REWARD_FN": "mlp"}


@pytest.fixture(scope="module")
def shipped():
    """(train pairs, eval pairs) of the shipped data/pairs.jsonl."""
    pairs = load_pairs(str(ROOT / "data" / "pairs.jsonl"))
    return split_pairs(pairs, "train"), split_pairs(pairs, "eval")


@pytest.fixture
def train_pairs():
    return split_pairs(load_pairs(str(ROOT / TINY["DATA_PATH"])), "train")


@pytest.fixture
def P(cfg):
    return dataclasses.replace(cfg, **TINY, **FAST)


# --- the split ---------------------------------------------------------------------------------------------------
def test_the_split_is_deterministic_disjoint_by_concept_and_train_only(shipped):
    train, eval_pairs = shipped
    labelled, unlabelled = unlabelled_split(train, 0.5)
    assert (len(labelled), len(unlabelled)) == (152, 179)  # the sha256 rule, pinned: the same on every machine
    assert unlabelled_split(train, 0.5) == (labelled, unlabelled)
    assert sorted(p["prompt"] for p in labelled + unlabelled) == sorted(p["prompt"] for p in train)  # a partition
    assert not {p["concept"] for p in labelled} & {p["concept"] for p in unlabelled}  # a concept on one side
    eval_prompts = {p["prompt"] for p in eval_pairs}
    assert not eval_prompts & {p["prompt"] for p in labelled + unlabelled}
    assert all(p["reference"] == "" for p in unlabelled) and all(p["split"] == "train" for p in unlabelled)
    assert all(p in train for p in labelled)  # the labelled pairs are untouched
    for p in unlabelled:  # the rule: the salted concept's bucket, independent of the eval split's own bucket
        bucket = int(hashlib.sha256(("unlabelled:" + p["concept"]).encode()).hexdigest()[:8], 16) % 100
        assert bucket < 50
    quarter = unlabelled_split(train, 0.25)[1]
    assert {p["prompt"] for p in quarter} < {p["prompt"] for p in unlabelled}  # nested as the share grows
    assert 0.15 < len({p["concept"] for p in quarter}) / len({p["concept"] for p in train}) < 0.35


def test_the_split_at_zero_is_the_train_pairs_and_refuses_eval_pairs_and_empty_sides(shipped):
    train, eval_pairs = shipped
    labelled, unlabelled = unlabelled_split(train, 0.0)
    assert labelled is train and unlabelled == []
    with pytest.raises(ValueError, match="TRAIN pairs only"):
        unlabelled_split(train + eval_pairs[:1], 0.5)
    with pytest.raises(ValueError, match="both must be non-empty"):
        unlabelled_split(train[:1], 0.5)


@pytest.mark.parametrize("overrides, match", [
    ({"UNLABELLED_FRAC": 1.0}, "UNLABELLED_FRAC"), ({"UNLABELLED_FRAC": -0.1}, "UNLABELLED_FRAC"),
    ({"UNLABELLED_FRAC": 0.5, "REWARD_FN": "similarity", "PIPELINE": "rl"}, "REWARD_FN='mlp'"),
    ({"UNLABELLED_FRAC": 0.5, "REWARD_FN": "mlp", "PIPELINE": "sft+rl", "SFT_RL_SPLIT": 0.2}, "SFT_RL_SPLIT")])
def test_config_refuses_what_cannot_work(overrides, match):
    with pytest.raises(ValueError, match=match):
        notebook_config(**overrides)


def test_config_allows_sft_with_the_similarity_and_rl_with_the_mlp():
    assert notebook_config(UNLABELLED_FRAC=0.5, PIPELINE="sft").UNLABELLED_FRAC == 0.5  # no RL: nothing to score
    assert notebook_config(UNLABELLED_FRAC=0.5, PIPELINE="sft+rl", REWARD_FN="mlp").UNLABELLED_FRAC == 0.5


# --- stage_plan ----------------------------------------------------------------------------------------------------
def test_stage_plan_at_zero_changes_nothing(nb, P, train_pairs):
    for arm in ("rl", "sft", "sft+rl"):
        c = dataclasses.replace(P, PIPELINE=arm)
        sft_pairs, rl_pairs, rl_cfg = nb.stage_plan(train_pairs, c)
        assert sft_pairs == train_pairs and rl_pairs is train_pairs and rl_cfg == c  # as before the knob


@pytest.mark.parametrize("arm", ["rl", "sft", "sft+rl"])
def test_stage_plan_gives_sft_the_labelled_share_and_rl_the_unlabelled(nb, P, train_pairs, arm):
    c = dataclasses.replace(P, PIPELINE=arm, **UNLAB)
    labelled, unlabelled = unlabelled_split(train_pairs, 0.5)
    sft_pairs, rl_pairs, _ = nb.stage_plan(train_pairs, c)
    assert sft_pairs == labelled and rl_pairs == unlabelled
    assert all(p["reference"] == "" for p in rl_pairs) and not {p["prompt"] for p in sft_pairs} & {
        p["prompt"] for p in rl_pairs}


# --- the reward functions ------------------------------------------------------------------------------------------
class HashEmbedder:
    """A deterministic stand-in for the sentence embedder: text -> a unit vector [8] from its sha256."""

    def encode(self, texts, cache=False):
        rows = [torch.tensor(list(hashlib.sha256(t.encode()).digest()[:8]), dtype=torch.float32) - 127.5
                for t in texts]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def test_the_mlp_reward_never_reads_a_reference_and_the_similarity_refuses_rows_without_one(nb):
    torch.manual_seed(0)
    emb, prompts, responses = HashEmbedder(), ["What is rain?", "Define fog."], ["Water falling.", "A low cloud."]
    mlp = nb.make_reward_fn("mlp", emb, nb.RewardMLP(dim=8, hidden=4))
    scores = mlp(prompts, responses, [None, None])
    assert scores.shape == (2,) and torch.equal(scores, mlp(prompts, responses, ["anything", "else"]))
    sim = nb.make_reward_fn("similarity", emb)
    assert sim(prompts, responses, ["Water from clouds.", "Cloud at the ground."]).shape == (2,)
    for missing in ([None, "Cloud at the ground."], ["Water from clouds.", " "]):
        with pytest.raises(ValueError, match="needs a reference for every row"):
            sim(prompts, responses, missing)


def test_the_rollout_monitor_scores_only_rows_with_a_reference(nb, P):
    metrics_fn, _ = nb.make_monitors(None, [], HashEmbedder(), P)
    ro = type("Ro", (), {"texts": ["Water falling.", "A low cloud."]})()
    assert torch.isnan(torch.tensor(metrics_fn(ro, ["a", "b"], ["", ""])["similarity"]))
    both = metrics_fn(ro, ["a", "b"], ["Water falling.", "x"])["similarity"]
    assert both == pytest.approx((10.0 + nb.similarity(["A low cloud."], ["x"], HashEmbedder()).item()) / 2)
    assert metrics_fn(ro, ["a", "b"], ["Water falling.", ""])["similarity"] == pytest.approx(10.0)


# --- the pipeline, end to end on the tiny model --------------------------------------------------------------------
def test_sft_then_rl_never_shows_sft_or_ptx_an_unlabelled_reference(nb, tiny_lora, P, train_pairs, tmp_path,
                                                                   monkeypatch):
    """SFT steps, the held-out stop and PPO-ptx all build their batches with sft_batch: none of them gets an
    unlabelled pair; RL's rollouts are unlabelled prompts only, scored without a reference; ptx adds nothing."""
    model, tok = tiny_lora
    labelled, unlabelled = unlabelled_split(train_pairs, 0.5)
    hidden = {p["reference"] for p in train_pairs if p["prompt"] in {q["prompt"] for q in unlabelled}}
    batches, real_batch = [], nb.sft_batch
    monkeypatch.setattr(nb, "sft_batch", lambda t, pairs, d: (batches.append(list(pairs)), real_batch(t, pairs, d))[1])
    scored = []

    def reward(prompts, responses, references):
        scored.append((list(prompts), list(references)))
        return torch.tensor([len(r) / 10.0 for r in responses])

    c = dataclasses.replace(P, PIPELINE="sft+rl", SFT_VAL_FRAC=0.25, SFT_MAX_STEPS=2, SFT_VAL_EVERY=1,
                            TRAIN_BUDGET_S=300, TRAIN_MAX_ITERS=2, PTX_COEF=0.5, **UNLAB)
    r = nb.run_pipeline(model, tok, train_pairs, reward, tmp_path / "run", c, progress=False)
    assert r.sft_steps == 2 and r.iterations == 2 and len(scored) == 2
    seen = [p for b in batches for p in b]
    assert seen and all(p in labelled for p in seen)  # SFT's batches and its held-out stop: labelled pairs only
    assert not {p["reference"] for p in seen} & hidden
    unlabelled_prompts = {p["prompt"] for p in unlabelled}
    assert all(set(prompts) <= unlabelled_prompts and set(refs) == {""} for prompts, refs in scored)
    assert all(row["ptx_loss"] == 0.0 for row in r.rl_logs)  # PPO-ptx: no reference, no term


# --- benchmarks ----------------------------------------------------------------------------------------------------
def test_the_benchmarks_reward_model_data_is_fitted_on_the_labelled_share(monkeypatch, tmp_path, train_pairs, P):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ppo_seeds
    calls = []
    monkeypatch.setattr(ppo_seeds, "reward_data", lambda nb, P, m, t, pairs, e, path: calls.append((pairs, path.name))
                        or {"pairs": pairs})
    from nbimport import load_notebook
    ctx = ppo_seeds.Context.__new__(ppo_seeds.Context)
    ctx.nb, ctx.P, ctx.cache, ctx.train_pairs, ctx.embedder, ctx._rm_data = (load_notebook(), dataclasses.replace(
        P, RM_PROMPTS=0), tmp_path, train_pairs, None, {})
    assert ctx.reward_data(None, None, 0.5)["pairs"] == unlabelled_split(train_pairs, 0.5)[0]
    assert ctx.reward_data(None, None, 0.0)["pairs"] == train_pairs and len(calls) == 2  # 0: as before
    assert [name for _, name in calls] == ["reward_data-unlabelled0.5.safetensors", "reward_data.safetensors"]
    assert ppo_seeds.NEUTRAL["UNLABELLED_FRAC"] == 0.0


def test_pipeline_seeds_runs_the_unlabelled_arms(tmp_path):
    """sft-lab (SFT on the labelled share) and sft+rl-unlab (then RL on the unlabelled share, the reward MLP) as
    --variant arms, compared with --sft-arm sft-lab; tiny model, 2 s budget (no thresholds)."""
    out = tmp_path / "unlab"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pipeline_seeds.py"), "--params", str(ROOT / "tests" / "tiny_params.json"),
           "--threads", "1", "--cache", str(tmp_path / "cache"), "--out", str(out), "--budget", "2", "--seeds", "0",
           "--set", "SFT_BATCH_SIZE=4", "--set", "PPO_BATCH_SIZE=4", "--set", "PPO_MINIBATCH_SIZE=4",
           "--set", "EVAL_LONG_MAX_NEW_TOKENS=0", "--set", "JUDGE_EMBEDDER=", "--arms", "sft-lab", "sft+rl-unlab",
           "--sft-arm", "sft-lab", "--variant", "sft-lab=sft:UNLABELLED_FRAC=0.5",
           "--variant", "sft+rl-unlab=sft+rl:UNLABELLED_FRAC=0.5,REWARD_FN=mlp"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.with_suffix(".json").read_text())
    assert set(r["arms"]) == {"sft-lab", "sft+rl-unlab"} and r["sft_arm"] == "sft-lab"
    assert r["arms"]["sft-lab"]["rl_over_sft_mean"] == 0.0  # itself
    assert isinstance(r["arms"]["sft+rl-unlab"]["rl_over_sft_mean"], float)
    assert (tmp_path / "cache" / "reward_data-unlabelled0.5.safetensors").exists()
    assert r["arms"]["sft+rl-unlab"]["iterations"] >= 1 and r["arms"]["sft-lab"]["iterations"] == 0
