"""Section 8.2, best-of-K distillation after SFT (PIPELINE = "sft+bok"; RAFT / ReST): best_of_k, bok_step,
bok_train, the pipeline value, its knobs, and its arm in benchmarks/pipeline_seeds.py."""
import dataclasses
import hashlib
import json
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from nbimport import ROOT
from rlft_support import runs

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = json.loads((ROOT / "tests" / "tiny_params.json").read_text())
FAST = {"SFT_BATCH_SIZE": 4, "BOK_SAMPLES": 3, "BOK_PROMPTS_PER_STEP": 2, "CKPT_EVERY": 0, "EVAL_EVERY": 0,
        "RESUME": False, "SEED": 0}


@pytest.fixture
def P(cfg):
    return dataclasses.replace(cfg, **TINY, **FAST)


@pytest.fixture
def splits(nb):
    pairs = nb.load_pairs(str(ROOT / TINY["DATA_PATH"]))
    return nb.split_pairs(pairs, "train"), nb.split_pairs(pairs, "eval")


def text_score(text: str) -> float:
    """A deterministic score in [0, 10) that tells distinct texts apart (ties only between equal texts)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 10_000 / 1000


class Reward:
    """A reward_fn we control: the greedy call (B answers, the first of each step) scores `greedy`, the K samples
    text_score; every call is recorded."""

    def __init__(self, greedy: float, k: int):
        self.greedy, self.k, self.calls = greedy, k, []

    def __call__(self, prompts, responses, references):
        self.calls.append((list(prompts), list(responses), list(references)))
        sampled = len(self.calls) % 2 == 0
        return torch.tensor([text_score(r) if sampled else self.greedy for r in responses])


def lora_tensors(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def trained_a_bit(model) -> None:
    """LoRA B != 0, so the tiny policy is not the base (as after SFT)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))


def optimizer_for(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-2), params


# --- best_of_k -------------------------------------------------------------------------------------------------
def test_best_of_k_takes_the_argmax_and_keeps_it_only_above_the_margin(nb):
    scores = torch.tensor([[1.0, 3.0, 2.0], [5.0, 4.0, 0.0], [0.0, 0.5, 1.0], [2.0, 9.0, 9.5]])
    greedy = torch.tensor([2.0, 4.5, 1.0, 0.0])
    best, keep = nb.best_of_k(scores, greedy, margin=0.5)
    assert best.tolist() == [1, 0, 2, 2]
    assert keep.tolist() == [True, False, False, True]  # 3-2 > 0.5; 5-4.5 is not > 0.5; 1-1 = 0; 9.5 > 0.5
    assert nb.best_of_k(scores, greedy, margin=0.0)[1].tolist() == [True, True, False, True]


def test_sft_batch_learns_no_eos_after_an_answer_cut_by_the_cap(nb, tiny):
    _, tok = tiny
    pair = {"prompt": "Define a cat.", "reference": "A small domestic"}
    _, _, with_eos = nb.sft_batch(tok, [pair], "cpu")
    _, _, cut = nb.sft_batch(tok, [pair | {"eos": False}], "cpu")
    answer, answer_cut = with_eos[0][with_eos[0] != -100].tolist(), cut[0][cut[0] != -100].tolist()
    assert answer == answer_cut + [tok.eos_token_id] and tok.eos_token_id not in answer_cut


# --- bok_step --------------------------------------------------------------------------------------------------
def test_bok_step_trains_on_each_prompts_best_sample(nb, tiny_lora, splits, P, monkeypatch):
    model, tok = tiny_lora
    trained_a_bit(model)
    pairs = splits[0][:3]
    reward, batches = Reward(greedy=-1.0, k=P.BOK_SAMPLES), []  # every best beats the greedy answer
    real_step = nb.sft_step
    monkeypatch.setattr(nb, "sft_step", lambda m, t, batch, *a: (batches.append(batch), real_step(m, t, batch, *a))[1])
    optimizer, params = optimizer_for(model)
    before = lora_tensors(model)
    torch.manual_seed(0)
    record = nb.bok_step(model, tok, pairs, reward, optimizer, params, P, {"skipped_loss": 0, "skipped_grad": 0})
    (g_prompts, greedy, _), (s_prompts, samples, s_refs) = reward.calls
    k = P.BOK_SAMPLES
    assert g_prompts == [p["prompt"] for p in pairs] and len(greedy) == len(pairs)
    assert s_prompts == [p["prompt"] for p in pairs for _ in range(k)] and s_refs == [p["reference"] for p in pairs
                                                                                       for _ in range(k)]
    expected = [max(samples[i * k:(i + 1) * k], key=text_score) for i in range(len(pairs))]  # first max, as argmax
    assert len(batches) == 1 and [x["prompt"] for x in batches[0]] == g_prompts
    assert [x["reference"] for x in batches[0]] == expected  # trained on the argmax of the scores
    assert record["kept"] == 1.0 and record["stepped"] and record["loss"] > 0
    assert record["best"] == pytest.approx(sum(map(text_score, expected)) / len(pairs), abs=1e-5)
    assert record["greedy"] == -1.0
    assert any(not torch.equal(before[n], p) for n, p in lora_tensors(model).items())


def test_bok_step_trains_only_the_prompts_whose_best_clears_the_margin(nb, tiny_lora, splits, P, monkeypatch):
    model, tok = tiny_lora
    trained_a_bit(model)
    calls, batches = [0], []

    def reward(prompts, responses, references):  # prompt 0's samples score 9, prompt 1's 1; the greedy answers 5
        calls[0] += 1
        if calls[0] % 2:
            return torch.full((len(responses),), 5.0)
        return torch.tensor([9.0 if p == prompts[0] else 1.0 for p in prompts])
    monkeypatch.setattr(nb, "sft_step", lambda m, t, batch, *a: (batches.append(batch), (0.5, True))[1])
    optimizer, params = optimizer_for(model)
    record = nb.bok_step(model, tok, splits[0][:2], reward, optimizer, params, P, {})
    assert [x["prompt"] for x in batches[0]] == [splits[0][0]["prompt"]] and record["kept"] == 0.5


def test_bok_step_leaves_the_weights_alone_when_no_best_beats_the_margin(nb, tiny_lora, splits, P, monkeypatch):
    model, tok = tiny_lora
    trained_a_bit(model)
    called = []
    monkeypatch.setattr(nb, "sft_step", lambda *a: called.append(a))
    optimizer, params = optimizer_for(model)
    before = lora_tensors(model)
    reward = Reward(greedy=10.0 - P.BOK_MARGIN, k=P.BOK_SAMPLES)  # samples score < 10: never more than the margin
    record = nb.bok_step(model, tok, splits[0][:3], reward, optimizer, params, P, {})
    after = lora_tensors(model)
    assert called == [] and record["kept"] == 0.0 and record["loss"] is None and not record["stepped"]
    assert all(torch.equal(before[n], after[n]) for n in before) and optimizer.state_dict()["state"] == {}


# --- bok_train: the budget, the log -----------------------------------------------------------------------------
def test_bok_train_stops_at_its_budget_and_logs_every_step(nb, tiny_lora, splits, P, tmp_path):
    model, tok = tiny_lora
    budget = 3.0
    t0 = time.time()
    logs = nb.bok_train(model, tok, splits[0], Reward(-1.0, P.BOK_SAMPLES), P, budget_s=budget, run_path=tmp_path,
                        progress=False)
    wall = time.time() - t0
    step = max(b["elapsed_s"] - a["elapsed_s"] for a, b in zip([{"elapsed_s": 0.0}] + logs, logs))
    assert len(logs) >= 2 and wall <= budget + step + 1.0  # a step starts only while time is left
    assert logs[-2]["elapsed_s"] < budget and [r["step"] for r in logs] == list(range(1, len(logs) + 1))
    assert runs.read_log(tmp_path) == json.loads(json.dumps(logs))  # the run's log holds every record
    assert all(r["stage"] == "bok" and {"best", "greedy", "mean", "kept", "loss", "stepped"} <= set(r) for r in logs)
    assert len(nb.bok_train(model, tok, splits[0], Reward(-1.0, P.BOK_SAMPLES), P, budget_s=600, max_steps=2,
                            progress=False)) == 2


# --- the pipeline value --------------------------------------------------------------------------------------------
def test_sft_then_best_of_k_runs_end_to_end_on_train_prompts_only(nb, tiny_lora, splits, P, tmp_path, monkeypatch):
    model, tok = tiny_lora
    train_pairs, eval_pairs = splits
    starts, real_train = [], nb.bok_train
    monkeypatch.setattr(nb, "bok_train", lambda m, *a, **k: (starts.append(lora_tensors(m)), real_train(m, *a, **k))[1])
    reward = Reward(-1.0, P.BOK_SAMPLES)
    Q = dataclasses.replace(P, PIPELINE="sft+bok", TRAIN_BUDGET_S=8, SFT_FRACTION=0.4, SFT_MAX_STEPS=2)
    r = nb.run_pipeline(model, tok, train_pairs, reward, tmp_path / "run", Q, progress=False)
    assert r.pipeline == "sft+bok" and r.sft_steps == 2 and r.state is None and r.iterations == 0 == len(r.rl_logs)
    assert len(r.bok_logs) >= 1 and r.samples_seen == 2 * Q.SFT_BATCH_SIZE + len(r.bok_logs) * 2 * 3
    seen = {p for prompts, _, _ in reward.calls for p in prompts}
    assert seen <= {p["prompt"] for p in train_pairs} and not seen & {p["prompt"] for p in eval_pairs}
    sft_adapter = load_file(tmp_path / "run" / "sft_adapter" / "adapter_model.safetensors")
    start = {k.replace(".default.", "."): v for k, v in starts[0].items()}
    assert all(torch.equal(start[k], v) for k, v in sft_adapter.items())  # best-of-K starts from the SFT adapter
    assert json.loads((tmp_path / "run" / "pipeline.json").read_text())["pipeline"] == "sft+bok"
    assert [x["step"] for x in runs.read_log(tmp_path / "run")] == [x["step"] for x in r.bok_logs]
    assert runs.latest_checkpoint(tmp_path / "run") is None


@pytest.mark.parametrize("bad", [{"BOK_SAMPLES": 0}, {"BOK_MARGIN": -0.1}, {"BOK_PROMPTS_PER_STEP": 0},
                                 {"BOK_MARGIN": float("nan")}])
def test_bad_best_of_k_knobs_are_named(P, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        dataclasses.replace(P, PIPELINE="sft+bok", **bad)


def test_sft_then_best_of_k_runs_in_one_process(P):
    with pytest.raises(ValueError, match="NUM_PROCESSES"):
        dataclasses.replace(P, PIPELINE="sft+bok", NUM_PROCESSES=2)


# --- its arm in benchmarks/pipeline_seeds.py ---------------------------------------------------------------------
def test_the_best_of_k_knobs_key_only_the_best_of_k_arm():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import pipeline_seeds
    from nbimport import notebook_config

    class Ctx:
        eval_dtype = None
    P = notebook_config(TRAIN_BUDGET_S=600)
    other = dataclasses.replace(P, BOK_MARGIN=1.0)
    for arm in ("sft", "rl", "sft+rl"):
        assert pipeline_seeds.config_key(Ctx, other, arm) == pipeline_seeds.config_key(Ctx, P, arm)
    assert pipeline_seeds.config_key(Ctx, other, "sft+bok") != pipeline_seeds.config_key(Ctx, P, "sft+bok")
    Ctx.variants = pipeline_seeds.parse_variants(["bok-m1=sft+bok:BOK_MARGIN=1.0"])
    assert pipeline_seeds.config_key(Ctx, P, "bok-m1") == pipeline_seeds.config_key(Ctx, other, "sft+bok")


def test_pipeline_seeds_runs_the_best_of_k_arm_end_to_end(tmp_path):
    out = tmp_path / "bok"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pipeline_seeds.py"), "--params",
           str(ROOT / "tests" / "tiny_params.json"), "--threads", "1", "--cache", str(tmp_path / "cache"), "--out",
           str(out), "--budget", "4", "--seeds", "0", "--set", "SFT_BATCH_SIZE=4", "--set", "BOK_SAMPLES=2",
           "--set", "BOK_PROMPTS_PER_STEP=2", "--set", "EVAL_LONG_MAX_NEW_TOKENS=0", "--arms", "sft+bok"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.with_suffix(".json").read_text())
    arm = r["arms"]["sft+bok"]
    assert r["default_arm"] == "sft+bok" and arm["sft_steps"] >= 1 and arm["iterations"] == 0
    assert arm["bok_steps"] >= 1 and 0 <= arm["bok_kept"] <= 1 and isinstance(arm["gain_mean"], float)
    curve = arm["runs"][0]["train"]["bok_curve"]
    assert len(curve) == arm["bok_steps"] and all({"best", "greedy", "kept"} <= set(x) for x in curve)
