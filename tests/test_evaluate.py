"""Section 4, evaluation: figures per family, bootstrap intervals, exact KL to the adapter-disabled model."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from conftest import perturb_lora_b
from nbimport import ROOT
from rlft_support import report

EVAL_TOKENS = 6


@pytest.fixture(scope="module")
def embedder(nb):
    return nb.Embedder("packaged")


@pytest.fixture(scope="module")
def eval_pairs(nb):
    return nb.split_pairs(nb.load_pairs(str(ROOT / "data" / "starter.jsonl")), "eval")


def test_evaluate_reports_every_figure_per_family_in_sane_ranges(nb, tiny_lora, embedder, eval_pairs, cfg):
    model, tok = tiny_lora
    sampled = dataclasses.replace(cfg, EVAL_MAX_NEW_TOKENS=EVAL_TOKENS, EVAL_TEMPERATURE=1.0, EVAL_BATCH_SIZE=5,
                                  BOOTSTRAP=200)
    res = nb.evaluate(model, tok, eval_pairs, embedder, sampled, with_kl=True, progress=False)
    families = sorted({p["family"] for p in eval_pairs})
    assert list(res["table"]) == families + ["overall"]
    assert [r["prompt"] for r in res["rows"]] == [p["prompt"] for p in eval_pairs]  # input order kept
    assert sum(res["table"][f]["n"] for f in families) == res["table"]["overall"]["n"] == len(eval_pairs)
    for fam, row in res["table"].items():
        assert set(row) == {"n", "similarity", "ci_low", "ci_high", "length", "eos_frac", "distinct2", "kl"}
        assert all(math.isfinite(v) for v in row.values()), (fam, row)
        assert -10 <= row["ci_low"] <= row["similarity"] <= row["ci_high"] <= 10
        assert 1 <= row["length"] <= EVAL_TOKENS
        assert 0 <= row["eos_frac"] <= 1 and 0 <= row["distinct2"] <= 1
        assert abs(row["kl"]) < 1e-5  # a fresh adapter (B = 0) is exactly the base model
    sims = [r["similarity"] for r in res["rows"]]
    assert res["table"]["overall"]["similarity"] == pytest.approx(np.mean(sims))
    assert np.std(sims) > 0  # sampled text really was scored, not a constant


def test_greedy_evaluation_is_the_default_and_deterministic(nb, tiny_lora, embedder, eval_pairs, cfg):
    model, tok = tiny_lora
    short = dataclasses.replace(cfg, EVAL_MAX_NEW_TOKENS=EVAL_TOKENS)
    a = nb.evaluate(model, tok, eval_pairs[:4], embedder, short, progress=False)
    b = nb.evaluate(model, tok, eval_pairs[:4], embedder, dataclasses.replace(short, EVAL_BATCH_SIZE=1), progress=False)
    assert a["settings"]["temperature"] == 0.0
    assert [r["response"] for r in a["rows"]] == [r["response"] for r in b["rows"]]
    assert "kl" not in a["table"]["overall"]


def test_kl_of_model_against_itself_is_zero_and_against_perturbed_adapter_positive(nb, tiny_lora, eval_pairs):
    model, tok = tiny_lora
    prompts = [nb.chat_prompt(tok, p["prompt"]) for p in eval_pairs[:4]]
    torch.manual_seed(0)
    gen = nb.generate(model, tok, prompts, max_new_tokens=EVAL_TOKENS, temperature=1.0, top_k=0, top_p=1.0)
    zero = nb.exact_kl(model, gen)
    assert zero.shape == (4,) and torch.allclose(zero, torch.zeros(4), atol=1e-6)
    perturb_lora_b(model, std=0.2, seed=1)
    kl = nb.exact_kl(model, gen)
    assert (kl > 1e-4).all(), kl
    one_by_one = torch.cat([nb.exact_kl(model, gen_row) for gen_row in single_rows(nb, model, tok, gen)])
    assert torch.allclose(kl, one_by_one, rtol=1e-3, atol=1e-5)  # left padding does not change it


def single_rows(nb, model, tok, gen):
    """Each row of a Generation re-packed alone, without left padding (same response tokens)."""
    for i in range(gen.sequences.shape[0]):
        keep = gen.attention_mask[i, :gen.prompt_len].bool()
        prompt = gen.sequences[i, :gen.prompt_len][keep]
        seq = torch.cat([prompt, gen.sequences[i, gen.prompt_len:]])[None]
        mask = torch.cat([torch.ones_like(prompt), gen.attention_mask[i, gen.prompt_len:]])[None]
        yield type("G", (), {"sequences": seq, "attention_mask": mask, "response_mask": gen.response_mask[i:i + 1],
                             "prompt_len": int(keep.sum())})


def test_full_vocabulary_logprobs_agree_with_generate(nb, tiny_lora, eval_pairs):
    """The KL's distributions are the ones generate() samples from (temperature 1): same positions, same masks."""
    model, tok = tiny_lora
    perturb_lora_b(model, std=0.2, seed=1)
    prompts = [nb.chat_prompt(tok, p["prompt"]) for p in eval_pairs[:3]]
    torch.manual_seed(0)
    gen = nb.generate(model, tok, prompts, max_new_tokens=EVAL_TOKENS, temperature=1.0, top_k=0, top_p=1.0)
    with torch.no_grad():
        logp = nb.response_log_softmax(model, gen.sequences, gen.attention_mask, gen.response_mask.shape[1])
    picked = logp.gather(-1, gen.sequences[:, gen.prompt_len:, None])[..., 0] * gen.response_mask
    assert torch.allclose(picked, gen.logprobs * gen.response_mask, atol=1e-4)


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.normal(5, 2, 30), rng.normal(5, 2, 600)
    for values in (small, large, rng.exponential(1, 50)):
        lo, hi = report.bootstrap_ci(values, n_boot=500, seed=0)
        assert lo < values.mean() < hi
    width = lambda v: np.subtract(*report.bootstrap_ci(v, 500)[::-1])
    assert width(large) < width(small) / 2  # ~ 1/sqrt(n)
    assert report.bootstrap_ci([3.0] * 5) == pytest.approx((3.0, 3.0))
    assert report.bootstrap_ci(small, seed=1) == report.bootstrap_ci(small, seed=1)  # seeded
    assert all(math.isnan(v) for v in report.bootstrap_ci([]))


def test_paired_comparison_of_a_model_with_itself_and_with_a_shift():
    rows = [{"prompt": f"p{i}", "family": "ab"[i % 2], "similarity": float(i % 5)} for i in range(20)]
    a = {"rows": rows}
    same = report.paired_comparison(a, a, n_boot=200)
    assert same["overall"]["diff"] == 0 and same["overall"]["ci_low"] == same["overall"]["ci_high"] == 0
    b = {"rows": [dict(r, similarity=r["similarity"] + 0.5) for r in rows[::-1]]}  # order does not matter
    shifted = report.paired_comparison(a, b, n_boot=200)
    assert set(shifted) == {"a", "b", "overall"}
    for row in shifted.values():
        assert row["diff"] == pytest.approx(0.5) and row["ci_low"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same prompts"):
        report.paired_comparison(a, {"rows": rows[:-1]})


def test_distinct_n_counts_unique_word_bigrams():
    assert report.distinct_n("a b a b", 2) == pytest.approx(2 / 3)
    assert report.distinct_n("The cat sat, the cat sat.", 2) == pytest.approx(3 / 5)
    assert math.isnan(report.distinct_n("one", 2))
    assert report.mean_distinct_n(["a b a b", "x y", "one", ""], 2) == pytest.approx((2 / 3 + 1) / 2)
    assert report.mean_distinct_n(["one", ""], 2) == 0.0


def test_bad_input_gives_clear_errors(nb, tiny_lora, embedder, cfg):
    model, tok = tiny_lora
    with pytest.raises(ValueError, match="no pairs"):
        nb.evaluate(model, tok, [], embedder, cfg)
    with pytest.raises(ValueError, match="references"):
        nb.similarity(["a", "b"], ["a"], embedder)
    with pytest.raises(TypeError, match="PEFT"):
        nb.exact_kl(model.get_base_model(), None)


def test_embedding_cache_is_bounded_lru_and_skips_long_texts(nb, embedder):
    """Many distinct (and long) cached texts must not grow the cache without bound (the demo's reference field)."""
    import copy
    emb = copy.copy(embedder)
    emb.cache, emb.cache_size, emb.cache_max_chars = type(embedder.cache)(), 3, 100
    texts = [f"reference number {i}" for i in range(5)]
    plain = emb.encode(texts)
    for t in texts:
        emb.encode([t], cache=True)
    assert list(emb.cache) == texts[2:]  # the 3 most recent
    emb.encode([texts[2]], cache=True)  # a hit refreshes it
    emb.encode(["one more"], cache=True)
    assert list(emb.cache) == [texts[4], texts[2], "one more"]
    long = "word " * 1000
    assert torch.allclose(emb.encode([long], cache=True), emb.encode([long]), atol=1e-6) and long not in emb.cache
    assert torch.allclose(emb.encode(texts, cache=True), plain, atol=1e-5)  # cached or not, the same vectors
    assert len(emb.cache) == 3
