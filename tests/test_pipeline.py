"""Section 8.1, the training pipeline: SFT -> RL in one budget (run_pipeline), reset_lora, the guarded sft_train,
resume, and benchmarks/pipeline_seeds.py end to end on the tiny model."""
import dataclasses
import json
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from nbimport import ROOT, notebook_parameters
from rlft_support import report
from rlft_support import runs

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = json.loads((ROOT / "tests" / "tiny_params.json").read_text())
FAST = {"PPO_BATCH_SIZE": 4, "PPO_SAMPLES_PER_PROMPT": 2, "PPO_MINIBATCH_SIZE": 4, "SFT_BATCH_SIZE": 4,
        "CKPT_EVERY": 0, "EVAL_EVERY": 0, "RESUME": False, "SEED": 0}


@pytest.fixture
def P(cfg):
    """The notebook's Config with the tiny overrides and a small PPO batch."""
    return dataclasses.replace(cfg, **TINY, **FAST)


@pytest.fixture
def train_pairs(nb):
    return nb.split_pairs(nb.load_pairs(str(ROOT / TINY["DATA_PATH"])), "train")


def length_reward(prompts, responses, references):
    """A cheap deterministic reward (no embedder): longer answers score higher."""
    return torch.tensor([len(r) / 10.0 for r in responses])


def lora_tensors(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run(nb, model, tok, pairs, run_path, P, **overrides):
    return nb.run_pipeline(model, tok, pairs, length_reward, run_path, dataclasses.replace(P, **overrides), progress=False)


# --- reset_lora -----------------------------------------------------------------------------------------------
def test_reset_lora_reinitialises_like_peft_and_is_seeded(nb, tiny_lora):
    from peft.tuners.lora import LoraLayer
    model, tok = tiny_lora
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))  # a "trained" adapter
    assert runs.reset_lora(model, seed=3) == len(layers) > 0
    first = lora_tensors(model)
    for m in layers:
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
        assert torch.count_nonzero(b) == 0
        bound = 1 / a.shape[1] ** 0.5  # kaiming_uniform(a=√5) on [r, in]: U(±1/√in), as LoraLayer draws it
        assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound
    ids = tok(["Hello there"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert torch.equal(tuned, base)  # B = 0: the fresh adapter is the base model
    runs.reset_lora(model, seed=3)
    assert same_tensors(lora_tensors(model), first)
    runs.reset_lora(model, seed=4)
    assert not same_tensors(lora_tensors(model), first)


# --- sft_train's non-finite guard (issue 16, defect 5) ----------------------------------------------------------
def test_sft_train_skips_and_counts_non_finite_steps_and_weights_stay_finite(nb, tiny_lora, train_pairs):
    model, tok = tiny_lora
    calls = {"n": 0}
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)

    def nan_logits_on_call_2(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 2 else output

    def nan_grad_on_call_3(grad):
        return grad * float("nan") if calls["n"] == 3 else grad

    hooks = [model.get_base_model().lm_head.register_forward_hook(nan_logits_on_call_2),
             lora_b.register_hook(nan_grad_on_call_3)]
    before = lora_tensors(model)
    counters = {}
    nb.seed_everything(0)
    logs = nb.sft_train(model, tok, nb.PromptSampler(train_pairs, 0), budget_s=120, max_steps=4, batch_size=2,
                        lr=1e-2, progress=False, counters=counters)
    for h in hooks:
        h.remove()
    assert [r["stepped"] for r in logs] == [True, False, False, True]
    assert counters == {"skipped_loss": 1, "skipped_grad": 1}
    assert logs[-1]["skipped_loss"] == 1 and logs[-1]["skipped_grad"] == 1
    after = lora_tensors(model)
    assert all(torch.isfinite(v).all() for v in after.values())  # one NaN never reaches the LoRA
    assert not same_tensors(after, before)  # the finite steps did train
    ids = tok(["Hello there"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_sft_train_keeps_its_signature_for_the_benchmarks(nb, tiny_lora, train_pairs):
    model, tok = tiny_lora
    logs = nb.sft_train(model, tok, nb.PromptSampler(train_pairs, 0), budget_s=60, max_steps=2, batch_size=2,
                        lr=1e-3, max_grad_norm=1.0, progress=False)
    assert [r["step"] for r in logs] == [1, 2] and all(r["stepped"] for r in logs)


# --- SFT's held-out stop ------------------------------------------------------------------------------------------
def test_held_out_split_is_even_disjoint_and_off_at_zero(nb):
    pairs = [{"prompt": f"p{i}", "reference": "r"} for i in range(40)]
    fit, held = nb.held_out_split(pairs, 0.1)
    assert [x["prompt"] for x in held] == ["p0", "p10", "p20", "p30"] and len(fit) == 36
    assert {x["prompt"] for x in fit} | {x["prompt"] for x in held} == {x["prompt"] for x in pairs}
    assert nb.held_out_split(pairs, 0.0) == (pairs, []) and nb.held_out_split(pairs[:3], 0.5) == (pairs[:3], [])


def test_held_out_nll_is_the_token_weighted_mean_and_falls_when_trained_on(nb, tiny_lora, train_pairs):
    model, tok = tiny_lora
    pairs = train_pairs[:5]
    per_pair = []
    for x in pairs:
        ids, mask, labels = nb.sft_batch(tok, [x], "cpu")
        with torch.no_grad():
            per_pair.append((model(input_ids=ids, attention_mask=mask, labels=labels).loss.item(),
                             int((labels[:, 1:] != -100).sum())))
    want = sum(loss * n for loss, n in per_pair) / sum(n for _, n in per_pair)
    assert nb.held_out_nll(model, tok, pairs, batch_size=2) == pytest.approx(want, rel=1e-4)
    nb.sft_train(model, tok, nb.PromptSampler(pairs, 0), budget_s=60, max_steps=10, batch_size=5, lr=2e-2,
                 progress=False)
    assert nb.held_out_nll(model, tok, pairs, batch_size=2) < want - 0.1


def test_sft_stops_after_patience_and_puts_the_best_adapter_back(nb, tiny_lora, train_pairs, monkeypatch):
    model, tok = tiny_lora
    nlls, seen = iter([3.0, 2.0, 1.5, 1.7, 1.6, 9.9]), []  # checks at steps 0, 2, 4, 6, 8: lowest at step 4
    monkeypatch.setattr(nb, "held_out_nll", lambda m, *a: (seen.append(lora_tensors(m)), next(nlls))[1])
    stop = nb.HeldOutStop(model, tok, train_pairs[:2], every=2, patience=2, batch_size=2)
    logs = nb.sft_train(model, tok, nb.PromptSampler(train_pairs, 0), budget_s=60, max_steps=50, batch_size=2,
                        lr=1e-2, progress=False, stopper=stop)
    assert len(logs) == 8 and [r["step"] for r in logs if "val_nll" in r] == [2, 4, 6, 8]
    assert logs[-1]["restored_step"] == 4 and stop.best == 1.5
    assert same_tensors(lora_tensors(model), seen[2]) and not same_tensors(seen[2], seen[4])  # step 4's adapter


def test_sft_ended_by_the_budget_checks_its_last_weights_once_more(nb, tiny_lora, train_pairs, monkeypatch):
    model, tok = tiny_lora
    nlls = iter([3.0, 2.0, 1.0])  # steps 0, 4, then the last step (5, between checks): the last is kept
    monkeypatch.setattr(nb, "held_out_nll", lambda m, *a: next(nlls))
    stop = nb.HeldOutStop(model, tok, train_pairs[:2], every=4, patience=2, batch_size=2)
    logs = nb.sft_train(model, tok, nb.PromptSampler(train_pairs, 0), budget_s=60, max_steps=5, batch_size=2,
                        lr=1e-2, progress=False, stopper=stop)
    assert [r.get("val_nll") for r in logs] == [None, None, None, 2.0, 1.0] and logs[-1]["restored_step"] == 5


def test_sft_stage_trains_on_the_train_pairs_less_the_held_out_ones(nb, tiny_lora, train_pairs, P, tmp_path,
                                                                    monkeypatch):
    model, tok = tiny_lora
    sampled, real_sampler = [], nb.PromptSampler
    monkeypatch.setattr(nb, "PromptSampler", lambda pairs, seed: (sampled.append(pairs), real_sampler(pairs, seed))[1])
    logs = nb.sft_stage(model, tok, train_pairs, tmp_path, dataclasses.replace(P, SFT_VAL_FRAC=0.25, SFT_MAX_STEPS=3), 60,
                        False)
    fit, held = nb.held_out_split(train_pairs, 0.25)
    assert sampled == [fit] and held and not any(x in fit for x in held)
    assert "restored_step" in logs[-1] and (tmp_path / nb.SFT_ADAPTER / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="SFT_VAL_FRAC"):
        dataclasses.replace(P, SFT_VAL_FRAC=1.0)  # Config refuses it where it is built


# --- run_pipeline: the arms, the budget, re-runs, resume ----------------------------------------------------------
@pytest.mark.parametrize("arm", ["sft", "rl", "sft+rl"])
def test_each_arm_runs_end_to_end(nb, tiny_lora, train_pairs, P, tmp_path, monkeypatch, arm):
    model, tok = tiny_lora
    anchors, rl_starts = [], []
    real_anchor, real_iteration = nb.set_kl_anchor, nb.ppo_iteration
    monkeypatch.setattr(nb, "set_kl_anchor", lambda state: (anchors.append(lora_tensors(state.policy)),
                                                            real_anchor(state)))
    monkeypatch.setattr(nb, "ppo_iteration", lambda state, *a: (rl_starts.append(lora_tensors(state.policy)),
                                                                real_iteration(state, *a))[1])
    r = run(nb, model, tok, train_pairs, tmp_path / "run", P, PIPELINE=arm, TRAIN_BUDGET_S=300, SFT_MAX_STEPS=3,
            TRAIN_MAX_ITERS=2, CKPT_EVERY=1)
    sft_steps, iters = (0 if arm == "rl" else 3), (0 if arm == "sft" else 2)
    assert (r.pipeline, r.sft_steps, len(r.sft_logs)) == (arm, sft_steps, sft_steps)
    assert r.iterations == len(r.rl_logs) == iters
    assert r.samples_seen == sft_steps * P.SFT_BATCH_SIZE + iters * P.PPO_BATCH_SIZE
    assert (r.state is None) == (arm == "sft") and not r.resumed
    assert set(r.seconds) == {"sft", "rl", "total"} and r.seconds["total"] >= r.seconds["sft"] >= 0
    assert (tmp_path / "run" / "sft_adapter" / "adapter_model.safetensors").exists() == (arm != "rl")
    assert (runs.latest_checkpoint(tmp_path / "run") is not None) == (arm != "sft")
    meta = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert meta["pipeline"] == arm and meta["sft_steps"] == sft_steps
    if arm == "sft+rl":  # RL starts from the SFT adapter, and the KL is anchored to it
        sft_adapter = load_file(tmp_path / "run" / "sft_adapter" / "adapter_model.safetensors")
        assert len(anchors) == 1
        anchored = {k.replace(".default.", "."): v for k, v in anchors[0].items()}  # save_pretrained drops the name
        assert anchored.keys() == sft_adapter.keys()
        rl_start = {k.replace(".default.", "."): v for k, v in rl_starts[0].items()}
        for k, v in sft_adapter.items():
            assert torch.equal(anchored[k], v) and torch.equal(rl_start[k], v)  # RL's first rollout: the SFT policy
        assert torch.count_nonzero(next(v for k, v in sft_adapter.items() if "lora_B" in k)) > 0  # SFT trained
    else:
        assert anchors == []  # "rl" keeps the base as the reference; "sft" has no RL stage
    if arm == "rl":
        assert all(torch.count_nonzero(v) == 0 for k, v in rl_starts[0].items() if "lora_B" in k)  # a fresh adapter


def test_stage_plan_splits_sft_and_rl_prompts_and_scales_rl_after_sft(nb, P, train_pairs):
    """Issue 32 item 4's sft+rl levers: SFT_RL_SPLIT keeps a share of the TRAIN pairs from SFT for RL alone (never
    an eval pair; off at 0), and RL after SFT runs at PPO_LR x RL_AFTER_SFT_LR_SCALE, PTX_COEF x ..._PTX_SCALE."""
    eval_pairs = nb.split_pairs(nb.load_pairs(str(ROOT / TINY["DATA_PATH"])), "eval")
    for arm in ("rl", "sft"):  # nothing changes outside sft+rl
        levers = dataclasses.replace(P, PIPELINE=arm, SFT_RL_SPLIT=0.5, RL_AFTER_SFT_LR_SCALE=0.1)
        assert nb.stage_plan(train_pairs, levers) == (train_pairs, train_pairs, levers)
    off = dataclasses.replace(P, PIPELINE="sft+rl")
    assert nb.stage_plan(train_pairs, off) == (train_pairs, train_pairs, off)  # the defaults: today's pipeline
    on = dataclasses.replace(off, SFT_RL_SPLIT=0.25, RL_AFTER_SFT_LR_SCALE=0.2, RL_AFTER_SFT_PTX_SCALE=0.0)
    sft_pairs, rl_pairs, rl_cfg = nb.stage_plan(train_pairs, on)
    assert sorted(map(str, sft_pairs + rl_pairs)) == sorted(map(str, train_pairs))  # a partition of the train pairs
    assert not any(x in sft_pairs for x in rl_pairs) and len(rl_pairs) == round(0.25 * len(train_pairs))
    assert not any(x in rl_pairs + sft_pairs for x in eval_pairs)
    assert rl_cfg.PPO_LR == on.PPO_LR * 0.2 and rl_cfg.PTX_COEF == 0.0 and rl_cfg.SFT_LR == on.SFT_LR
    for bad in ({"SFT_RL_SPLIT": 1.0}, {"RL_AFTER_SFT_LR_SCALE": 0.0}, {"RL_AFTER_SFT_PTX_SCALE": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            dataclasses.replace(P, **bad)


def test_sft_then_rl_trains_each_stage_on_its_own_prompts(nb, tiny_lora, train_pairs, P, tmp_path, monkeypatch):
    model, tok = tiny_lora
    sampled, real_sampler = [], nb.PromptSampler
    monkeypatch.setattr(nb, "PromptSampler", lambda pairs, seed: (sampled.append(pairs), real_sampler(pairs, seed))[1])
    lrs, real_state = [], nb.make_ppo_state
    monkeypatch.setattr(nb, "make_ppo_state", lambda m, t, c: (lrs.append(c.PPO_LR), real_state(m, t, c))[1])
    on = dict(PIPELINE="sft+rl", SFT_RL_SPLIT=0.5, RL_AFTER_SFT_LR_SCALE=0.5, SFT_VAL_FRAC=0.0, TRAIN_BUDGET_S=300,
              SFT_MAX_STEPS=2, TRAIN_MAX_ITERS=1)
    run(nb, model, tok, train_pairs, tmp_path / "run", P, **on)
    sft_pairs, rl_pairs, _ = nb.stage_plan(train_pairs, dataclasses.replace(P, **on))
    assert sampled == [sft_pairs, rl_pairs] and lrs == [P.PPO_LR * 0.5]


def test_kl_anchor_base_leaves_the_reference_at_the_base(nb, tiny_lora, train_pairs, P, tmp_path, monkeypatch):
    model, tok = tiny_lora
    calls = []
    monkeypatch.setattr(nb, "set_kl_anchor", lambda state: calls.append(state))
    r = run(nb, model, tok, train_pairs, tmp_path / "run", P, PIPELINE="sft+rl", KL_ANCHOR="base",
            TRAIN_BUDGET_S=300, SFT_MAX_STEPS=1, TRAIN_MAX_ITERS=1)
    assert calls == [] and r.sft_steps == 1 and r.iterations == 1


@pytest.mark.parametrize("bad", [{"PIPELINE": "ppo"}, {"KL_ANCHOR": "ref"}, {"SFT_FRACTION": 1.5}])
def test_bad_pipeline_parameters_are_named(nb, P, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        nb.run_pipeline(None, None, [], length_reward, "unused", dataclasses.replace(P, **bad))


@pytest.mark.parametrize("arm", ["sft+rl", "sft"])
def test_the_budget_covers_every_stage(nb, tiny_lora, train_pairs, P, tmp_path, arm):
    model, tok = tiny_lora
    budget = 4.0
    t0 = time.time()
    r = run(nb, model, tok, train_pairs, tmp_path / "run", P, PIPELINE=arm, TRAIN_BUDGET_S=budget, SFT_FRACTION=0.5,
            SFT_MAX_STEPS=10**6, TRAIN_MAX_ITERS=10**6)
    wall = time.time() - t0
    sft_step = max(b["elapsed_s"] - a["elapsed_s"] for a, b in zip([{"elapsed_s": 0.0}] + r.sft_logs, r.sft_logs))
    iteration = max([x["seconds"] for x in r.rl_logs], default=0.0)
    slack = 1.0  # logging, the adapter save and the loop's own overhead on a shared machine
    assert r.sft_steps >= 2 and wall <= budget + max(sft_step, iteration) + slack
    if arm == "sft+rl":
        assert r.iterations >= 1  # the RL stage got the rest of the budget
        assert r.seconds["sft"] <= 0.5 * budget + sft_step + slack
    else:
        assert r.iterations == 0 and r.state is None


def test_rerun_starts_from_the_same_fresh_adapter(nb, tiny_lora, train_pairs, P, tmp_path, monkeypatch):
    model, tok = tiny_lora
    starts = []
    real_sft = nb.sft_train
    monkeypatch.setattr(nb, "sft_train", lambda model, *a, **k: (starts.append(lora_tensors(model)),
                                                                 real_sft(model, *a, **k))[1])
    kw = dict(PIPELINE="sft+rl", TRAIN_BUDGET_S=300, SFT_MAX_STEPS=3, TRAIN_MAX_ITERS=2)
    run(nb, model, tok, train_pairs, tmp_path / "run", P, **kw)
    trained = lora_tensors(model)
    assert not same_tensors(trained, starts[0])
    run(nb, model, tok, train_pairs, tmp_path / "run", P, **kw)  # the same kernel: "re-running the cell"
    assert len(starts) == 2 and same_tensors(starts[0], starts[1])  # not the trained adapter of the first run
    assert all(torch.count_nonzero(v) == 0 for k, v in starts[1].items() if "lora_B" in k)


def test_a_fresh_run_archives_the_previous_run_first(nb, tiny_lora, train_pairs, P, tmp_path, monkeypatch):
    model, tok = tiny_lora
    seen = []
    real_archive = runs.move_previous_run
    monkeypatch.setattr(runs, "move_previous_run", lambda path, *a, **k: (
        seen.append(sorted(p.name for p in path.iterdir()) if path.exists() else []), real_archive(path, *a, **k))[1])
    kw = dict(PIPELINE="sft+rl", TRAIN_BUDGET_S=300, SFT_MAX_STEPS=1, TRAIN_MAX_ITERS=1)
    run(nb, model, tok, train_pairs, tmp_path / "run", P, **kw)
    first = load_file(tmp_path / "run" / "sft_adapter" / "adapter_model.safetensors")
    run(nb, model, tok, train_pairs, tmp_path / "run", P, **kw | {"SEED": 1})  # another seed: another SFT adapter
    assert len(seen) == 2 and {"sft_adapter", "pipeline.json"} <= set(seen[1])  # handed over intact
    current = tmp_path / "run" / "sft_adapter"
    kept = [f for f in tmp_path.rglob("sft_adapter/adapter_model.safetensors") if f.parent != current]
    assert len(kept) == 1 and same_tensors(load_file(kept[0]), first)  # the first run's SFT adapter, moved aside
    assert not same_tensors(load_file(tmp_path / "run" / "sft_adapter" / "adapter_model.safetensors"), first)


def test_resume_continues_rl_with_the_sft_anchor_reloaded(nb, tiny_lora, train_pairs, P, tmp_path, monkeypatch, cfg):
    model, tok = tiny_lora
    anchors = []
    real_anchor = nb.set_kl_anchor
    monkeypatch.setattr(nb, "set_kl_anchor", lambda state: (anchors.append(lora_tensors(state.policy)),
                                                            real_anchor(state)))
    kw = dict(PIPELINE="sft+rl", TRAIN_BUDGET_S=300, SFT_MAX_STEPS=2, CKPT_EVERY=1)
    first = run(nb, model, tok, train_pairs, tmp_path / "run", P, TRAIN_MAX_ITERS=2, **kw)
    first_anchor = nb.anchor_state_dict(first.state)
    base, tok2 = nb.load_base("tiny", "~/.cache/rlft", torch.device("cpu"), torch.float32, seed=0)  # "a new kernel"
    fresh = nb.add_lora(base, cfg.LORA_R, cfg.LORA_ALPHA, cfg.LORA_DROPOUT, cfg.LORA_TARGETS)
    second = run(nb, fresh, tok2, train_pairs, tmp_path / "run", P, TRAIN_MAX_ITERS=4, RESUME=True, **kw)
    assert second.resumed and second.sft_logs == [] and second.sft_steps == 2
    assert second.iterations == 4 and [r["iteration"] for r in second.rl_logs] == [0, 1, 2, 3]
    assert second.samples_seen == 2 * P.SFT_BATCH_SIZE + 4 * P.PPO_BATCH_SIZE
    assert len(anchors) == 2 and same_tensors(anchors[0], anchors[1])  # the anchor is the SFT policy again
    again = nb.anchor_state_dict(second.state)
    assert again.keys() == first_anchor.keys() and all(torch.equal(again[k].cpu(), first_anchor[k].cpu())
                                                         for k in again)
    assert not same_tensors(lora_tensors(fresh), anchors[1])  # the policy itself is the RL checkpoint's


def test_a_truncated_pipeline_json_or_sft_adapter_is_named_on_resume(nb, tiny_lora, train_pairs, P, tmp_path):
    """Issue 35 item 1: a truncated pipeline.json died in a bare JSONDecodeError naming no file; a truncated
    sft_adapter in a safetensors error."""
    model, tok = tiny_lora
    kw = dict(PIPELINE="sft+rl", TRAIN_BUDGET_S=300, SFT_MAX_STEPS=2, CKPT_EVERY=1)
    run(nb, model, tok, train_pairs, tmp_path / "run", P, TRAIN_MAX_ITERS=2, **kw)
    meta_path = tmp_path / "run" / "pipeline.json"
    meta_path.write_text(meta_path.read_text()[:20])  # cut mid-object
    cfg = dataclasses.replace(P, **kw)
    with pytest.warns(UserWarning, match=r"pipeline\.json is unreadable"):
        deadline, anchor, sft_steps = runs.resume_plan(tmp_path / "run", cfg)
    assert anchor and sft_steps == 0 and deadline > time.time()  # the parameters' PIPELINE / KL_ANCHOR, no SFT seconds
    weights = tmp_path / "run" / "sft_adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(runs.CheckpointError, match=r"sft_adapter/adapter_model\.safetensors is corrupt.*RESUME = False"):
        runs.load_sft_anchor(model, tmp_path / "run")


def test_resume_counts_the_time_already_spent(nb, tiny_lora, train_pairs, P, tmp_path):
    model, tok = tiny_lora
    kw = dict(PIPELINE="sft+rl", SFT_MAX_STEPS=2, CKPT_EVERY=1, TRAIN_MAX_ITERS=4)
    first = run(nb, model, tok, train_pairs, tmp_path / "run", P, TRAIN_BUDGET_S=300, **kw | {"TRAIN_MAX_ITERS": 2})
    meta = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    spent = meta["sft_seconds"] + sum(r["seconds"] for r in first.rl_logs)
    second = run(nb, model, tok, train_pairs, tmp_path / "run", P, TRAIN_BUDGET_S=spent - 0.01, RESUME=True, **kw)
    assert second.resumed and second.iterations == 2  # the budget was spent before the kill: nothing more runs


def test_monitor_scores_a_fixed_subset_of_train_prompts(nb, tiny_lora, train_pairs, P, tmp_path, monkeypatch):
    model, tok = tiny_lora
    subset = nb.monitor_subset(train_pairs, 5)
    assert subset == nb.monitor_subset(train_pairs, 5) and len(subset) == 5
    assert all(p in train_pairs for p in subset) and nb.monitor_subset(train_pairs, 0) == []
    assert len(nb.monitor_subset(train_pairs, 10**6)) == len(train_pairs)
    seen = []
    monkeypatch.setattr(nb, "make_monitors", lambda tok, pairs, emb, cfg: (seen.append(pairs), (None, None))[1])
    run(nb, model, tok, train_pairs, tmp_path / "run", dataclasses.replace(P, EVAL_MONITOR_N=4), PIPELINE="rl", TRAIN_BUDGET_S=300,
        TRAIN_MAX_ITERS=1)
    assert seen == []  # no embedder: no monitor
    nb.run_pipeline(model, tok, train_pairs, length_reward, tmp_path / "run", dataclasses.replace(
        P, EVAL_MONITOR_N=4, PIPELINE="rl", TRAIN_BUDGET_S=300, TRAIN_MAX_ITERS=1), embedder=object(),
        progress=False)
    assert seen == [nb.monitor_subset(train_pairs, 4)] and all(p["split"] == "train" for p in seen[0])


# --- benchmarks/pipeline_seeds.py ---------------------------------------------------------------------------------
def test_the_default_config_still_finds_the_committed_headline_runs():
    """--reuse and the cache match runs by config key. The headline (pipeline_seeds.json) was run on the notebook's
    defaults, so they give its keys, and a later session finishes it. The headline before issue 33
    (pipeline_seeds_pre33_1200s.json) is found again with issue 33's three changed defaults (merged rollouts,
    shared prompts, whole groups per minibatch) at their old values, and a knob added since it, at the value that
    reproduces how those runs trained (ppo_seeds.NEUTRAL), leaves its keys as they were."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import pipeline_seeds
    from nbimport import notebook_config

    class Ctx:
        eval_dtype = None
    keys = lambda P, arms: {arm: pipeline_seeds.config_key(Ctx, P, arm) for arm in arms}  # noqa: E731
    for name, old in (("pipeline_seeds", {}), ("pipeline_seeds_pre33_1200s", {
            "ROLLOUT_MERGED": False, "PREFIX_SHARING": False, "PPO_WHOLE_GROUPS": False})):
        committed = json.loads((ROOT / "benchmarks" / f"{name}.json").read_text())
        assert committed["overrides"] == [] and committed["budget_s"] == 1200
        P = notebook_config(TRAIN_BUDGET_S=committed["budget_s"], **old)
        assert keys(P, committed["config_keys"]) == committed["config_keys"], name
        for knob in old:
            assert pipeline_seeds.config_key(Ctx, dataclasses.replace(P, **{knob: True}), "rl") \
                != committed["config_keys"]["rl"]


def test_variants_are_parsed_and_checked():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import pipeline_seeds
    assert pipeline_seeds.parse_variants(["a=rl:PTX_COEF=0,PPO_WHOLE_GROUPS=True", "b=sft+rl:SFT_RL_SPLIT=0.5"]) == {
        "a": ("rl", {"PTX_COEF": 0, "PPO_WHOLE_GROUPS": True}), "b": ("sft+rl", {"SFT_RL_SPLIT": 0.5})}
    for bad in ("rl=rl:PTX_COEF=0", "a=nonsense:PTX_COEF=0", "a=prompt:PTX_COEF=0", "a=rl:NO_SUCH_KNOB=1"):
        with pytest.raises(SystemExit):
            pipeline_seeds.parse_variants([bad])


def test_a_difference_between_arms_pairs_only_the_seeds_both_have():
    """over_sft (like over_parent) drops the seeds only one arm has: with rl seeds 0-2 and sft seeds 0-1, rl minus sft
    is the seed-0/1 average minus sft's, not rl's three seeds minus sft's two."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import pipeline_seeds

    class Ctx:
        nb = type("nb", (), {"bootstrap_ci": staticmethod(lambda diff, n, seed: (min(diff), max(diff)))})
        P = type("P", (), {"BOOTSTRAP": 10})
    run = lambda seed, score: {"seed": seed, "rows": [  # noqa: E731
        {"prompt": p, "similarity": score, "indep_similarity": score, "chrf": score} for p in ("a", "b")]}
    rl = [run(0, 1.0), run(1, 3.0), run(2, 100.0)]
    sft = [run(0, 0.0), run(1, 2.0)]
    assert [r["seed"] for r in pipeline_seeds.same_seeds(rl, sft)[0]] == [0, 1]
    out = pipeline_seeds.over_sft(Ctx, rl, sft)
    assert out["rl_over_sft_mean"] == out["indep_rl_over_sft_mean"] == out["chrf_rl_over_sft_mean"] == 1.0
    assert pipeline_seeds.over_sft(Ctx, rl, None)["rl_over_sft_mean"] is None


def test_pipeline_seeds_script_end_to_end(nb, tmp_path):
    out = tmp_path / "pipeline_seeds"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pipeline_seeds.py"),
           "--params", str(ROOT / "tests" / "tiny_params.json"), "--threads", "1", "--cache", str(tmp_path / "cache"), "--out", str(out), "--budget", "2", "--seeds", "0",
           "--set", "SFT_BATCH_SIZE=4", "--set", "PPO_BATCH_SIZE=4", "--set", "PPO_MINIBATCH_SIZE=4",
           "--arms", "prompt", "sft", "rl", "sft+rl", "rl-lever", "--variant", "rl-lever=rl:PPO_WHOLE_GROUPS=True,PTX_COEF=0"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.with_suffix(".json").read_text())
    for field in ("gain_mean", "gain_min", "gain_ci_low", "gain_ci_high", "distinct2_ratio", "rl_over_sft_mean",
                  "rl_over_sft_ci_low", "budget_s", "seeds", "threads", "machine", "arms"):
        assert field in r, field
    default = notebook_parameters()["PIPELINE"]  # the headline's default arm is the notebook's PIPELINE
    assert set(r["arms"]) == {"prompt", "sft", "rl", "sft+rl", "rl-lever"} and r["default_arm"] == default
    assert r["threads"] == 1 and r["variants"] == {"rl-lever": ["rl", {"PPO_WHOLE_GROUPS": True, "PTX_COEF": 0}]}
    lever = r["arms"]["rl-lever"]  # issue 32's levers: a variant is its parent arm with other knobs, beside it
    assert isinstance(lever["over_parent_mean"], float) and "over_parent_mean" not in r["arms"]["rl"]
    assert lever["over_parent_ci_low"] <= lever["over_parent_mean"] <= lever["over_parent_ci_high"]
    assert r["config_keys"]["rl-lever"] != r["config_keys"]["rl"] and lever["sft_steps"] == 0
    for field in ("gain_over_prompt_mean", "gain_over_prompt_ci_low", "indep_gain_over_prompt_mean",  # issue 32
                  "indep_gain_over_prompt_ci_low", "chrf_gain_over_prompt_mean", "indep_rl_over_sft_ci_low"):
        assert isinstance(r[field], float) and r[field] == r["arms"][default][field], field
    assert r["arms"]["prompt"]["gain_over_prompt_mean"] == 0.0 and r["arms"]["prompt"]["samples_seen"] == 0
    for a in r["arms"].values():
        assert set(a["gain_by_base_stop"]) == {"base_eos", "base_capped"} and isinstance(a["long_gain_mean"], float)
        assert sum(v["n"] for v in a["gain_by_base_stop"].values()) == r["eval_prompts"]
        assert "response" not in a["runs"][0]["rows"][0] and "indep_similarity" in a["runs"][0]["rows"][0]
    sidecar = [json.loads(line) for line in (tmp_path / r["responses"]).read_text().splitlines()]
    assert {(x["arm"], x["max_new_tokens"]) for x in sidecar} == {(a, c) for a in ["base", *r["arms"]] for c in (8, 128)}
    assert len(sidecar) == 2 * 6 * r["eval_prompts"] and all(
        {"response", "reference", "similarity", "indep_similarity", "chrf", "first_sentence_similarity"} <= set(x)
        for x in sidecar)
    for arm, a in r["arms"].items():
        for field in ("gain_mean", "gain_min", "gain_ci_low", "gain_ci_high", "distinct2_ratio", "rl_over_sft_mean",
                      "rl_over_sft_ci_low", "family_gains", "kl_mean", "eos_rate_after", "mean_len_after",
                      "samples_seen", "iterations", "loadavg"):
            assert field in a, (arm, field)
        assert len(a["runs"]) == 1 and (a["samples_seen"] > 0) == (arm != "prompt")
        assert len(a["loadavg"]["per_run"][0]["before"]) == 3
    assert r["arms"]["sft"]["iterations"] == 0 and r["arms"]["rl"]["sft_steps"] == 0
    assert r["arms"]["sft+rl"]["sft_steps"] >= 1 and r["arms"]["sft+rl"]["iterations"] >= 1
    assert r["arms"]["sft"]["rl_over_sft_mean"] == 0.0
    assert r["gain_mean"] == r["arms"][default]["gain_mean"]
    assert r["rl_over_sft_ci_low"] <= r["rl_over_sft_mean"] <= r["arms"][default]["rl_over_sft_ci_high"]
    md = out.with_suffix(".md").read_text()
    assert "`sft+rl`" in md and "minus `sft`" in md
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)  # every run cached now
    assert again.returncode == 0 and json.loads(out.with_suffix(".json").read_text())["gain_mean"] == r["gain_mean"]
    assert set(r["config_keys"]) == set(r["arms"]) and all(run["measured_on"]["cpu"] == r["cpus_of_runs"][0] and "commit" in run["measured_on"]
                                   for a in r["arms"].values() for run in a["runs"])
    # --reuse: a fresh cache filled from the committed output (a headline finished in a later session), no training
    cmd2 = [c if c != str(tmp_path / "cache") else str(tmp_path / "cache2") for c in cmd]
    cmd2[cmd2.index("--out") + 1] = str(tmp_path / "reused")
    reused = subprocess.run(cmd2 + ["--reuse", str(out.with_suffix(".json"))], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert reused.returncode == 0 and "5 run(s) taken" in reused.stdout, reused.stdout[-2000:] + reused.stderr[-2000:]
    r2 = json.loads((tmp_path / "reused.json").read_text())
    assert r2["gain_mean"] == r["gain_mean"] and not (tmp_path / "cache2" / "runs").exists()  # nothing retrained
    old = json.loads(out.with_suffix(".json").read_text())  # a run cached before the judge: no judged rows, no long
    for a in old["arms"].values():
        for run in a["runs"]:
            run.pop("long", None)
            run["rows"] = [{k: row[k] for k in ("prompt", "similarity", "length", "eos")} for row in run["rows"]]
    (tmp_path / "old.json").write_text(json.dumps(old))
    cmd4 = [c if c != str(tmp_path / "cache2") else str(tmp_path / "cache4") for c in cmd2]
    cmd4[cmd4.index("--out") + 1] = str(tmp_path / "from_old")
    from_old = subprocess.run(cmd4 + ["--reuse", str(tmp_path / "old.json")], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
    assert from_old.returncode == 0, from_old.stderr[-2000:]
    r4 = json.loads((tmp_path / "from_old.json").read_text())
    assert r4["gain_mean"] == r["gain_mean"] and r4["indep_gain_over_prompt_mean"] is None  # not judged: None
    assert r4["arms"][default]["long_gain_mean"] is None and r4["gain_over_prompt_mean"] == r["gain_over_prompt_mean"]
    other = subprocess.run(cmd2 + ["--reuse", str(out.with_suffix(".json")), "--set", "PPO_LR=0.1", "--arms", "sft"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)  # another config: nothing taken
    assert other.returncode == 0 and "nothing reused for it" in other.stdout
    cmd3 = list(cmd) + ["--cached-only", "--arms", "sft", "sft+rl", "--set", "PIPELINE=sft+rl"]  # another default
    cmd3[cmd3.index("--seeds") + 1:cmd3.index("--seeds") + 2] = ["0", "1"]
    cmd3[cmd3.index("--out") + 1] = str(tmp_path / "partial")
    partial = subprocess.run(cmd3, cwd=ROOT, capture_output=True, text=True, timeout=600)  # seed 1 never ran
    assert partial.returncode == 0 and "sft seed 1: not run yet" in partial.stdout, partial.stderr[-2000:]
    r3 = json.loads((tmp_path / "partial.json").read_text())
    assert set(r3["arms"]) == {"sft", "sft+rl"} and r3["arms"]["sft"]["seeds"] == [0] and r3["default_arm"] == "sft+rl"
    assert r3["gain_mean"] == r["arms"]["sft+rl"]["gain_mean"]
    # re-score one saved adapter (what the lead measures one run with): no training, the folder only read
    adapter = next((tmp_path / "cache" / "runs").glob("pipeline-sft_rl-*/sft_adapter/adapter_config.json")).parent
    before = sorted((p.name, p.stat().st_mtime) for p in adapter.iterdir())
    cmd5 = cmd2[:cmd2.index("--out")] + ["--out", str(tmp_path / "rescored"), "--adapter", str(adapter)]
    rescored = subprocess.run(cmd5, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rescored.returncode == 0, rescored.stderr[-2000:]
    r5 = json.loads((tmp_path / "rescored.json").read_text())
    assert set(r5["arms"]) == {"prompt", "adapter"} and isinstance(r5["indep_gain_over_prompt_mean"], float)
    assert (tmp_path / "rescored.responses.jsonl").exists() and sorted(
        (p.name, p.stat().st_mtime) for p in adapter.iterdir()) == before
    fig = report.plot_pipeline(r, tmp_path / "pipeline.png")  # the results section's figures of this JSON
    assert (tmp_path / "pipeline.png").stat().st_size > 10_000 and len(fig.axes) == 2
    fig = report.plot_results(r, tmp_path / "results.png")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [a + " (default)" * (a == default) for a in r["arms"]]


def test_iteration_cost_script_end_to_end_and_gains(tmp_path):
    """benchmarks/iteration_cost.py on the tiny model, 2 measured iterations per arm; then --gains adds the 300 s
    gains of two pipeline_seeds outputs to the same JSON (--iters 0: nothing re-measured)."""
    out = tmp_path / "ic"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "iteration_cost.py"), "--params",
           str(ROOT / "tests" / "tiny_params.json"), "--iters", "2", "--threads", "1", "--cache", str(tmp_path / "c"),
           "--out", str(out), "--set", "PPO_BATCH_SIZE=4", "--set", "PPO_MINIBATCH_SIZE=4"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.with_suffix(".json").read_text())
    for field in ("s_per_iter_before", "s_per_iter_after", "speedup", "phases_before", "phases_after", "threads",
                  "loadavg"):
        assert field in r, field
    assert r["threads"] == 1 and r["iterations_measured"] == 2 and len(r["records"]["before"]) == 2
    assert r["speedup"] == pytest.approx(r["s_per_iter_before"] / r["s_per_iter_after"])
    assert r["config_before"]["OLD_LOGPROBS"] == "recompute" and r["config_after"]["OLD_LOGPROBS"] == "generate"
    before, after = r["records"]["before"], r["records"]["after"]
    assert all(x["t_old_logprobs"] > 0 and x["t_checkpoint"] > 0 for x in before)  # recomputed, checkpointed
    assert all(x["t_old_logprobs"] == 0.0 for x in after)  # π_old from generate(), no monitor after iteration 0
    assert set(r["phases_before"]) == {"t_generate", "t_old_logprobs", "t_ref", "t_reward", "t_update",
                                       "t_checkpoint", "t_monitor", "iteration"}
    assert out.with_suffix(".png").stat().st_size > 5_000 and "whole iteration" in out.with_suffix(".md").read_text()
    for tag, gain in (("before", 0.4), ("after", 0.5)):  # two pipeline_seeds.py outputs, arm "rl"
        arm = {"gain_mean": gain, "gain_ci_low": gain - 0.2, "gain_ci_high": gain + 0.2, "iterations": 10.0}
        (tmp_path / f"{tag}.json").write_text(json.dumps({"budget_s": 300, "seeds": [0, 1], "arms": {"rl": arm}}))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "iteration_cost.py"), "--iters", "0", "--out", str(out),
           "--gains", str(tmp_path / "before.json"), str(tmp_path / "after.json")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    g = json.loads(out.with_suffix(".json").read_text())
    assert g["gain_before"] == 0.4 and g["gain_after"] == 0.5 and g["gain_after_ci"] == [0.3, 0.7]
    assert g["iterations_before"] == 10.0 and g["s_per_iter_before"] == r["s_per_iter_before"]
    assert "300 s RL run" in out.with_suffix(".md").read_text()
