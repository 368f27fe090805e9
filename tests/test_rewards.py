"""Sections 5-6, rewards: the MiniLM similarity reward, the reward MLP, its data and the REWARD_FN switch."""
import inspect

import pytest
import torch
import torch.nn.functional as F

from nbimport import ROOT
from rlft_support import report

REF = "A harbour is a sheltered stretch of water where ships can anchor safely."


@pytest.fixture(scope="module")
def embedder(nb):
    return nb.Embedder("packaged")


# --- similarity ------------------------------------------------------------------------------------------

def test_similarity_of_a_text_with_itself_is_ten(nb, embedder):
    texts = [REF, "Photosynthesis turns light into chemical energy.", "ok"]
    assert torch.allclose(nb.similarity(texts, texts, embedder), torch.full((3,), 10.0), atol=1e-4)


def test_related_text_scores_higher_than_unrelated(nb, embedder):
    related = "A harbor is a protected body of water where boats are moored."
    unrelated = "The stock market closed slightly higher on Tuesday."
    s = nb.similarity([related, unrelated], [REF, REF], embedder)
    assert s[0] > 6 and s[1] < 3 and s[0] - s[1] > 4, s


def test_similarity_is_symmetric(nb, embedder):
    a = ["A cat sat on the mat.", "Water boils at 100 degrees.", REF]
    b = ["Dogs bark at night.", "Ice melts when it is warm.", "Ships anchor in a harbour."]
    assert torch.allclose(nb.similarity(a, b, embedder), nb.similarity(b, a, embedder), atol=1e-5)


def test_batched_equals_one_by_one(nb, embedder):
    responses = ["Ships anchor in a harbour.", "no", "A very long answer " * 20, "Bread is baked in an oven."]
    refs = [REF, REF, "Bread is made from flour.", "Bread is made from flour."]
    batched = nb.similarity(responses, refs, embedder)
    single = torch.cat([nb.similarity([r], [f], embedder) for r, f in zip(responses, refs)])
    assert torch.allclose(batched, single, atol=1e-4)


def test_empty_or_whitespace_responses_score_zero(nb, embedder):
    s = nb.similarity(["", "   ", "\n\t", REF], [REF] * 4, embedder)
    assert s[:3].tolist() == [0.0, 0.0, 0.0] and s[3] == pytest.approx(10.0, abs=1e-4)


def test_reference_embeddings_are_cached_and_unchanged(nb):
    emb = nb.Embedder("packaged")
    plain = emb.encode([REF, "other"])
    cached = emb.encode([REF, "other"], cache=True)
    assert REF in emb.cache and torch.allclose(plain, cached, atol=1e-6)
    assert torch.allclose(emb.encode([REF], cache=True), plain[:1], atol=1e-6)


# --- the reward MLP --------------------------------------------------------------------------------------

def test_reward_mlp_forward_takes_no_reference(nb):
    assert list(inspect.signature(nb.RewardMLP.forward).parameters) == ["self", "prompt_emb", "response_emb"]
    assert list(inspect.signature(nb.RewardMLP.score).parameters) == ["self", "prompts", "responses", "embedder"]
    linears = [m for m in nb.RewardMLP(8).modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2


def synthetic(n=800, dim=16, seed=0):
    """Unit 'embeddings' p, q and a known target 10 cos(p, q) plus a bias that depends on the prompt only."""
    g = torch.Generator().manual_seed(seed)
    p = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    q = F.normalize(p + 1.2 * torch.randn(n, dim, generator=g), dim=-1)
    y = 10 * (p * q).sum(-1) + 2 * p[:, 0]
    return p, q, y, torch.arange(n) // 4  # 4 rows per "prompt"


def test_reward_mlp_learns_a_known_synthetic_target_deterministically(nb):
    p, q, y, pid = synthetic()
    split = nb.split_by_prompt(pid, 0.15, 0.15, seed=0)
    fit = lambda: nb.fit_reward_mlp(p, q, y, split["train"], split["val"], hidden=64, lr=3e-3, max_epochs=40, patience=10, seed=3)
    rm, hist = fit()
    with torch.no_grad():
        pred = rm(p[split["test"]], q[split["test"]])
    m = report.reward_metrics(pred, y[split["test"]], pid[split["test"]], y[split["train"]].mean().item())
    assert m["mse"] < 0.15 * m["mse_constant"], m  # R^2 > 0.85 on unseen prompts
    assert m["spearman_global"] > 0.9 and m["pearson"] > 0.9, m
    assert hist["val"][hist["best_epoch"]] == min(hist["val"])
    rm2, _ = fit()
    with torch.no_grad():
        assert torch.equal(pred, rm2(p[split["test"]], q[split["test"]]))


def test_split_by_prompt_keeps_each_prompt_in_one_part(nb):
    pid = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9])
    split = nb.split_by_prompt(pid, 0.2, 0.2, seed=0)
    parts = [set(pid[split[k]].tolist()) for k in ("train", "val", "test")]
    assert all(a.isdisjoint(b) for i, a in enumerate(parts) for b in parts[i + 1:])
    assert sorted(torch.cat(list(split.values())).tolist()) == list(range(len(pid)))
    with pytest.raises(ValueError, match="too few prompts"):
        nb.split_by_prompt(torch.tensor([0, 1]), 0.5, 0.5)


def test_reward_metrics_on_perfect_and_constant_predictions():
    t = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 9.0])
    pid = torch.tensor([0, 0, 0, 1, 1, 1])
    m = report.reward_metrics(t.clone(), t, pid, constant=t.mean().item())
    assert m["pearson"] == pytest.approx(1) and m["spearman_global"] == pytest.approx(1)
    assert m["spearman_within_prompt"] == pytest.approx(1) and m["n_prompts_within"] == 2
    assert m["mse"] == 0 and m["mse_constant"] == pytest.approx(t.var(unbiased=False).item())


# --- data, the REWARD_FN switch, the gap helper -----------------------------------------------------------

@pytest.fixture(scope="module")
def train_pairs(nb):
    return nb.split_pairs(nb.load_pairs(str(ROOT / "data" / "starter.jsonl")), "train")[:4]


def test_reward_data_is_labelled_anchored_and_cached(nb, tiny_lora, embedder, train_pairs, tmp_path, monkeypatch):
    model, tok = tiny_lora
    kw = dict(temperatures=[0.7, 1.2], n_mismatched=1, max_new_tokens=4, batch_size=3, seed=0,
              cache_path=tmp_path / "rm.pt", model_name="tiny")
    data = nb.build_reward_data(model, tok, train_pairs, embedder, **kw)
    n = len(train_pairs)
    assert data["kind"].count("generated") == 2 * n and data["kind"].count("reference") == n
    assert data["kind"].count("mismatched") == n and len(data["label"]) == 4 * n
    assert data["prompt_emb"].shape == data["response_emb"].shape == (4 * n, embedder.dim)
    refs = [i for i, k in enumerate(data["kind"]) if k == "reference"]
    assert torch.allclose(data["label"][refs], torch.full((n,), 10.0), atol=1e-4)
    again = nb.similarity(data["responses"], [train_pairs[i]["reference"] for i in data["prompt_id"]], embedder)
    assert torch.allclose(data["label"], again.cpu(), atol=1e-4)
    monkeypatch.setattr(nb, "generate", lambda *a, **k: pytest.fail("the cache was not used"))
    assert nb.build_reward_data(model, tok, train_pairs, embedder, **kw)["responses"] == data["responses"]
    with pytest.raises(pytest.fail.Exception):  # other settings -> another key -> regenerated
        nb.build_reward_data(model, tok, train_pairs, embedder, **{**kw, "n_mismatched": 2})


def test_make_reward_fn_switch(nb, embedder):
    prompts, responses = ["Define 'harbour' in one sentence."] * 2, ["Ships anchor in a harbour.", " "]
    refs = [REF, REF]
    sim = nb.make_reward_fn("similarity", embedder)(prompts, responses, refs)
    assert torch.allclose(sim, nb.similarity(responses, refs, embedder))
    rm = nb.RewardMLP(embedder.dim, hidden=8)
    mlp = nb.make_reward_fn("mlp", embedder, rm)
    out = mlp(prompts, responses, refs)
    assert out.shape == (2,) and out.dtype == torch.float32 and out[1] == 0  # empty response -> 0
    assert torch.equal(out, mlp(prompts, responses, ["something else", ""]))  # references are never read
    user = nb.make_reward_fn(lambda p, r, f: [len(x) for x in r], embedder)
    assert user(prompts, responses, refs).tolist() == [26.0, 1.0]
    with pytest.raises(ValueError, match="expected"):
        nb.make_reward_fn(lambda p, r, f: torch.zeros(3), embedder)(prompts, responses, refs)
    with pytest.raises(ValueError, match="REWARD_FN"):
        nb.make_reward_fn("bleu", embedder)
    with pytest.raises(ValueError, match="reward model"):
        nb.make_reward_fn("mlp", embedder)


def test_reward_and_similarity_reports_both_scores(nb, embedder):
    rm = nb.RewardMLP(embedder.dim, hidden=8)
    out = nb.reward_and_similarity(rm, embedder, ["Define 'harbour'."] * 2, [REF, "bananas"], [REF, REF])
    assert set(out) == {"mlp", "similarity", "gap"} and all(v.shape == (2,) for v in out.values())
    assert out["similarity"][0] == pytest.approx(10, abs=1e-4)
    assert torch.allclose(out["gap"], out["mlp"] - out["similarity"])


class _Payload:
    """Unpickling this object creates a marker file (what a planted `reward_data.pt` would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_cache_never_runs_and_is_regenerated(nb, tiny_lora, embedder, train_pairs, tmp_path):
    model, tok = tiny_lora
    marker, cache = tmp_path / "pwned", tmp_path / "run" / "reward_data.pt"
    cache.parent.mkdir()
    key = nb.data_key(train_pairs[:2], temperatures=[0.7], n_mismatched=1, max_new_tokens=3, seed=0, model="tiny")
    torch.save({"key": key, "payload": _Payload(marker)}, cache)  # the right key, and a payload
    kw = dict(temperatures=[0.7], n_mismatched=1, max_new_tokens=3, batch_size=2, seed=0, cache_path=cache,
              model_name="tiny")
    with pytest.warns(UserWarning, match="not a valid reward-data cache"):
        data = nb.build_reward_data(model, tok, train_pairs[:2], embedder, **kw)
    assert not marker.exists() and data["cached"] is False and len(data["label"]) == 3 * 2  # 1 sample + 2 anchors a prompt
    again = nb.build_reward_data(model, tok, train_pairs[:2], embedder, **kw)  # rewritten as safetensors
    assert again["cached"] is True and again["responses"] == data["responses"] and not marker.exists()
    assert torch.equal(again["response_emb"], data["response_emb"]) and again["kind"] == data["kind"]


def test_a_tampered_cache_with_missing_fields_is_regenerated(nb, tmp_path):
    from safetensors.torch import save_file
    path, key = tmp_path / "rd.safetensors", "k" * 16
    save_file({"label": torch.zeros(2)}, str(path), metadata={"format": nb.REWARD_DATA_FORMAT, "key": key,
                                                              "texts": "{}"})
    with pytest.warns(UserWarning, match="not a valid reward-data cache"):
        assert nb.load_reward_data(path, key) is None
    assert nb.load_reward_data(path, "another-key") is None  # another key: silently recomputed


def test_plot_reward_fit_draws_the_held_out_scatter_and_the_fit(tmp_path):
    target, pred = torch.linspace(2, 9, 12), torch.linspace(2.5, 8.5, 12)
    rm_test = {"target": target, "pred": pred, "spearman_global": 1.0}
    history = {"train": [1.0, 0.5, 0.3], "val": [1.1, 0.6, 0.7], "best_epoch": 1}
    fig = report.plot_reward_fit(rm_test, history, torch.full((12,), 0.7), tmp_path / "fit.png")
    assert (tmp_path / "fit.png").stat().st_size > 10_000
    assert fig.axes[0].get_title() == "held-out prompts: Spearman 1.00"
    assert [list(line.get_ydata()) for line in fig.axes[1].get_lines()[:2]] == [history["train"], history["val"]]
