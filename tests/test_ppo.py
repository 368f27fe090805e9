"""PPO section: GAE, the losses, log-prob bookkeeping, the reference policy, guards, and a toy task it must learn."""
import copy
import math

import pytest
import torch

from conftest import perturb_lora_b, unit_cfg
from rlft_support import fast

PROMPTS = ["Define 'harbour' in one sentence.", "Why is the sky blue?", "Name a fruit.", "Say hello.",
           "What is a glacier?", "Explain rain briefly.", "Count to three.", "Describe a cat."]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")



def trainable_snapshot(state):
    return [p.detach().clone() for p in state.trainable_parameters()]


def small_cfg(nb, **kw):
    base = dict(PPO_BATCH_SIZE=8, PPO_MINIBATCH_SIZE=4, PPO_EPOCHS=2, MAX_NEW_TOKENS=6, TEMPERATURE=1.0)
    return unit_cfg(**{**base, **kw})


def random_reward(prompts, responses, references):
    return torch.rand(len(responses)) * 10


# ----------------------------------------------------------------------------------------------- GAE
def gae_plain(rewards, values, mask, gamma, lam):
    """Reference GAE: per row, a Python loop over the valid positions only."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t] > 0]
        running, next_value = 0.0, 0.0
        for t in reversed(idx):
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            running = delta + gamma * lam * running
            adv[b, t] = running
            next_value = float(values[b, t])
    return adv


def hand_made_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1],   # full length
                         [1, 1, 1, 0, 0, 0, 0],   # stopped at EOS
                         [1, 0, 0, 0, 0, 0, 0],   # one token
                         [1, 1, 0, 1, 1, 0, 0],   # a hole: skipped, the carry passes over it
                         [0, 0, 0, 0, 0, 0, 0]],  # empty
                        dtype=torch.float32)
    return rewards, values, mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 0.0), (1.0, 1.0), (0.5, 1.0)])
def test_gae_matches_plain_loop(nb, gamma, lam):
    rewards, values, mask = hand_made_batch()
    adv, returns, deltas = nb.gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv.double(), gae_plain(rewards, values, mask, gamma, lam), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(returns, (adv + values) * mask)
    assert (adv[mask == 0] == 0).all() and (deltas[mask == 0] == 0).all()


def test_gae_edge_cases(nb):
    rewards, values, mask = hand_made_batch(1)
    mask[3] = torch.tensor([1, 1, 1, 1, 1, 0, 0.0])  # prefix masks for the closed forms
    # λ = 0: the advantage is the one-step TD residual δ_t = r_t + γ V_{t+1} − V_t (V after the last token = 0)
    adv0, _, deltas = nb.gae(rewards, values, mask, 1.0, 0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros(5, 1)], 1) * torch.cat([mask[:, 1:], torch.zeros(5, 1)], 1)
    torch.testing.assert_close(adv0, (rewards + next_values - values) * mask)
    torch.testing.assert_close(deltas, adv0)
    # λ = 1, γ = 1: Monte-Carlo — the sum of the remaining rewards minus the value; returns = reward-to-go
    adv1, returns1, _ = nb.gae(rewards, values, mask, 1.0, 1.0)
    to_go = (rewards * mask).flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(adv1, (to_go - values) * mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(returns1, to_go * mask, atol=1e-5, rtol=1e-5)


def test_masked_whiten(nb):
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, -7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0.0]])
    w = nb.masked_whiten(x, mask)
    valid = w[mask > 0]
    assert abs(valid.mean().item()) < 1e-6 and abs(valid.var(unbiased=False).item() - 1) < 1e-4
    assert (w[mask == 0] == 0).all()


# ----------------------------------------------------------------------------------------------- losses
def test_policy_loss_clipping_and_gradient_signs(nb):
    eps = 0.2
    old = torch.zeros(1, 4)
    # ratios: 1.1 (inside), 1.5 (above 1+ε), 0.5 (below 1−ε), 1.5 (above 1+ε)
    new = torch.log(torch.tensor([[1.1, 1.5, 0.5, 1.5]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, clip_frac, approx_kl = nb.policy_loss(new, old, adv, mask, eps)
    # per token: −1.1 (unclipped); −1.2 (clipped: no more gain above 1+ε); +0.8 (clipped); +1.5 (unclipped: the
    # pessimistic bound keeps the full penalty for a bad action made more likely)
    assert loss.item() == pytest.approx((-1.1 - 1.2 + 0.8 + 1.5) / 4, abs=1e-6)
    assert clip_frac.item() == pytest.approx(0.5)
    ratio = torch.tensor([1.1, 1.5, 0.5, 1.5])
    assert approx_kl.item() == pytest.approx(((ratio - 1) - ratio.log()).mean().item(), abs=1e-6)
    loss.backward()
    grad = new.grad[0]
    assert grad[0] < 0  # A > 0, inside the clip: descent raises the log-prob
    assert grad[1] == 0 and grad[2] == 0  # clipped: no gradient
    assert grad[3] > 0  # A < 0, unclipped: descent lowers the log-prob
    assert grad[0].item() == pytest.approx(-1.1 / 4, abs=1e-6)  # d(−ρA)/dlogπ = −ρA, over 4 tokens
    # masked tokens contribute nothing
    loss_m, _, _ = nb.policy_loss(new.detach(), old, adv, torch.tensor([[1, 0, 0, 0.0]]), eps)
    assert loss_m.item() == pytest.approx(-1.1, abs=1e-6)


def test_value_loss_clipping(nb):
    old = torch.zeros(1, 3)
    values = torch.tensor([[0.1, 0.5, -0.5]], requires_grad=True)
    returns = torch.tensor([[1.0, 0.0, 1.0]])
    mask = torch.ones(1, 3)
    loss, clip_frac = nb.value_loss(values, old, returns, mask, 0.2)
    # token 0: inside the clip, ½(0.1−1)²; token 1: clipped value 0.2, ½·max(0.25, 0.04) = 0.125 (unclipped wins);
    # token 2: clipped value −0.2, ½·max(2.25, 1.44) → unclipped again; make a case where clipping wins below
    expected = 0.5 * ((0.1 - 1) ** 2 + 0.5 ** 2 + 1.5 ** 2) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert clip_frac.item() == 0
    loss.backward()
    assert values.grad[0, 0] < 0 and values.grad[0, 1] > 0 and values.grad[0, 2] < 0
    # clipping active: the value overshoots the return beyond the clip — the clipped error is larger, so it is
    # used, and it is flat in V: no gradient pushes V further from V_old
    v2 = torch.tensor([[0.9]], requires_grad=True)
    loss2, clip_frac2 = nb.value_loss(v2, torch.zeros(1, 1), torch.tensor([[1.0]]), torch.ones(1, 1), 0.2)
    assert loss2.item() == pytest.approx(0.5 * 0.8 ** 2) and clip_frac2.item() == 1.0
    loss2.backward()
    assert v2.grad.item() == 0


def test_entropy_bonus_pushes_towards_uniform(nb):
    logits = torch.tensor([[3.0, 0.0, -1.0]], requires_grad=True)
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum()
    (-0.01 * entropy).backward()  # the loss term −c_H·H
    assert logits.grad[0, 0] > 0 and logits.grad[0, 2] < 0  # descent lowers the top logit, raises the bottom


def test_kl_estimators_and_token_rewards(nb):
    lp, ref = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.5, -1.0, -0.5]])
    k1, k3 = nb.kl_estimate(lp, ref, "k1"), nb.kl_estimate(lp, ref, "k3")
    torch.testing.assert_close(k1, lp - ref)
    r = (ref - lp).exp()
    torch.testing.assert_close(k3, r - 1 - r.log())
    assert (k3 >= 0).all() and k3[0, 2] == 0
    mask = torch.tensor([[1, 1, 0.0], [1, 1, 1.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.1, 0.1, 0.1]])
    rewards = nb.token_rewards(torch.tensor([5.0, -1.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1 + 5.0, 0.0], [-0.05, -0.05, -0.05 - 1.0]]))


def test_reward_normalisation_and_adaptive_kl(nb):
    stats = nb.RunningMoments()
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0])
    nb.normalise_scores(a, "running", stats)
    out = nb.normalise_scores(b, "running", stats)
    both = torch.cat([a, b]).double()
    assert stats.count == 5 and stats.mean == pytest.approx(both.mean().item())
    assert stats.var == pytest.approx(both.var(unbiased=False).item())
    torch.testing.assert_close(out, ((b - both.mean()) / both.std(unbiased=False)).float())
    batch = nb.normalise_scores(b, "batch", stats)
    assert batch.tolist() == pytest.approx([-1.0, 1.0])
    assert nb.normalise_scores(b, "none", stats).tolist() == [10.0, 20.0]
    ctl = nb.AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(12.0, 10)  # KL twice the target: the error clips at +0.2
    assert ctl.beta == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctl.update(3.0, 10)
    assert ctl.beta < 0.1 * (1 + 0.2 * 10 / 100)
    fixed = nb.AdaptiveKLController(0.1, target=0.0, horizon=100)
    fixed.update(50.0, 10)
    assert fixed.beta == 0.1


def test_group_normalisation_compares_siblings(nb):
    """'group': each score minus the mean of its own prompt's K responses, over the running σ."""
    stats = nb.RunningMoments()
    scores = torch.tensor([1.0, 3.0, 10.0, 14.0])  # prompt A: 1, 3; prompt B: 10, 14
    out = nb.normalise_scores(scores, "group", stats, group_size=2)
    sigma = scores.double().std(unbiased=False).item()
    assert out.tolist() == pytest.approx([-1 / sigma, 1 / sigma, -2 / sigma, 2 / sigma], rel=1e-5)
    assert stats.count == 4  # the running σ still learns the scale
    assert nb.repeat_each(["a", "b"], 3) == ["a", "a", "a", "b", "b", "b"]
    with pytest.raises(ValueError, match="not groups of 2"):
        nb.normalise_scores(torch.tensor([1.0, 2.0, 3.0]), "group", stats, group_size=2)
    with pytest.raises(ValueError, match="PPO_SAMPLES_PER_PROMPT"):
        unit_cfg(PPO_BATCH_SIZE=8, PPO_SAMPLES_PER_PROMPT=3)


def test_config_rejects_bad_values(nb):
    for bad in (dict(REWARD_NORM="whiten"), dict(KL_ESTIMATOR="k2"), dict(SURROGATE_TARGET="delta"),
                dict(TEMPERATURE=0.0), dict(PPO_MINIBATCH_SIZE=16), dict(PPO_EPOCHS=0)):
        with pytest.raises(ValueError):
            unit_cfg(**bad)


# ----------------------------------------------------------------------------------------------- log-probs
def test_policy_logprobs_shift_padding_temperature(nb, tiny_lora):
    model, tok = tiny_lora
    perturb_lora_b(model)
    gen = nb.generate(model, tok, [nb.chat_prompt(tok, p) for p in PROMPTS[:3]], max_new_tokens=5, temperature=1.0)
    out = nb.policy_logprobs(model, nb.ValueHead(64), gen.sequences, gen.attention_mask, gen.prompt_len, 0.7)
    P = gen.prompt_len
    for b in range(3):  # each row alone, unpadded, through the plain HF forward
        keep = gen.attention_mask[b].bool()
        keep[P:] = True
        ids = gen.sequences[b][keep][None]
        logits = model(input_ids=ids).logits[0].float() / 0.7
        n_prompt = int(gen.attention_mask[b, :P].sum())
        logp = logits[n_prompt - 1:-1].log_softmax(-1)
        valid = gen.response_mask[b].bool()
        expected = logp.gather(-1, ids[0, n_prompt:, None])[:, 0]
        torch.testing.assert_close(out.logprobs[b][valid], expected[valid], atol=1e-4, rtol=0)
        entropy = -(logp.exp() * logp).sum(-1)
        torch.testing.assert_close(out.entropy[b][valid], entropy[valid], atol=1e-4, rtol=0)
    assert out.values.shape == out.logprobs.shape and out.values.dtype == torch.float32
    assert out.values.abs().max() < 0.5  # small init: early values near 0


# ----------------------------------------------------------------------------------------------- rollout/update
def test_reference_is_base_model_and_differs_once_lora_moves(nb, tiny_lora, cfg):
    model, tok = tiny_lora
    base, _ = nb.load_base("tiny", "~/.cache/rlft", torch.device("cpu"), torch.float32, seed=0)  # same weights
    state = nb.make_ppo_state(model, tok, small_cfg(nb))
    ro = nb.rollout(state, PROMPTS, [""] * 8, random_reward)
    args = (ro.sequences, ro.attention_mask, ro.prompt_len, 1.0)
    base_lp = nb.policy_logprobs(base, None, *args).logprobs * ro.mask
    torch.testing.assert_close(ro.ref_logprobs, base_lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(ro.logprobs, base_lp, atol=1e-6, rtol=0)  # fresh adapter: B = 0
    assert ro.kl_exact.abs().max() < 1e-5
    perturb_lora_b(model)
    ro2 = nb.rollout(state, PROMPTS, [""] * 8, random_reward)
    args2 = (ro2.sequences, ro2.attention_mask, ro2.prompt_len, 1.0)
    base_lp2 = nb.policy_logprobs(base, None, *args2).logprobs * ro2.mask
    torch.testing.assert_close(ro2.ref_logprobs, base_lp2, atol=1e-6, rtol=0)
    assert (ro2.logprobs - ro2.ref_logprobs).abs().max() > 1e-3
    assert (ro2.kl_exact > 0).all()


def test_first_minibatch_ratio_is_one_with_shuffled_minibatches(nb, tiny, cfg, monkeypatch):
    model, tok = tiny
    lora = nb.add_lora(model, cfg.LORA_R, cfg.LORA_ALPHA, 0.1, cfg.LORA_TARGETS)  # dropout 0.1
    perturb_lora_b(lora)
    torch.manual_seed(0)
    state = nb.make_ppo_state(lora, tok, small_cfg(nb, PPO_MINIBATCH_SIZE=3))
    seen, real = [], nb.minibatch_loss
    monkeypatch.setattr(nb, "minibatch_loss", lambda s, ro, idx: (seen.append(idx.tolist()), real(s, ro, idx))[1])
    stats = nb.ppo_iteration(state, PROMPTS, [""] * 8, random_reward)
    assert stats["gen_logprob_err"] < 1e-4  # generate()'s own log-probs agree with the recomputation
    assert stats["first_ratio_dev"] < 1e-5  # the policy has not moved yet: ratio 1 (dropout is off)
    assert stats["approx_kl"] > 0  # ... and it did move afterwards
    assert [len(i) for i in seen] == [3, 3, 2] * 2
    assert sorted(sum(seen[:3], [])) == list(range(8)) and seen[:3] != [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert seen[:3] != seen[3:]  # reshuffled every epoch


def test_whole_groups_keep_each_prompts_answers_in_one_minibatch(nb, tiny, cfg):
    """PPO_WHOLE_GROUPS (issue 32): a prompt's K answers (consecutive rows) never straddle two minibatches, every
    row comes once per epoch, and the prompts are still shuffled; without it, rows are shuffled one by one."""
    model, tok = tiny
    lora = nb.add_lora(model, cfg.LORA_R, cfg.LORA_ALPHA, 0.0, cfg.LORA_TARGETS)
    k, rows = 4, 32
    grouped = nb.make_ppo_state(lora, tok, small_cfg(nb, PPO_BATCH_SIZE=rows, PPO_SAMPLES_PER_PROMPT=k,
                                                     PPO_MINIBATCH_SIZE=8, PPO_WHOLE_GROUPS=True))
    torch.manual_seed(0)
    epochs = [[mb.tolist() for mb in nb.minibatches(grouped, rows)] for _ in range(3)]
    for mbs in epochs:
        assert sorted(sum(mbs, [])) == list(range(rows)) and [len(mb) for mb in mbs] == [8] * 4
        assert all(len({i // k for i in mb}) == 2 and all(mb.count(i) == 1 for i in mb) for mb in mbs)
        assert all(sorted(mb[j:j + k]) == list(range(mb[j], mb[j] + k)) for mb in mbs for j in (0, 4))
    assert epochs[0] != epochs[1] != epochs[2]  # the prompts are reshuffled every epoch
    rowwise = nb.make_ppo_state(lora, tok, small_cfg(nb, PPO_BATCH_SIZE=rows, PPO_SAMPLES_PER_PROMPT=k,
                                                     PPO_MINIBATCH_SIZE=8, PPO_WHOLE_GROUPS=False))
    split = [any(len({i // k for i in mb}) > 2 for mb in nb.minibatches(rowwise, rows)) for _ in range(5)]
    assert any(split)  # row-wise shuffling splits groups (P(no split in 5 epochs) is astronomically small)
    odd = nb.make_ppo_state(lora, tok, small_cfg(nb, PPO_BATCH_SIZE=rows, PPO_SAMPLES_PER_PROMPT=k,
                                                 PPO_MINIBATCH_SIZE=6, PPO_WHOLE_GROUPS=True))
    mbs = [mb.tolist() for mb in nb.minibatches(odd, rows)]  # 6 is no multiple of 4: rows shuffled, none lost
    assert sorted(sum(mbs, [])) == list(range(rows)) and [len(mb) for mb in mbs] == [6] * 5 + [2]


def toy_reward_setup(nb, monkeypatch):
    """A tiny model whose output can reach a 'good half' of the vocabulary, and a reward on tokens.

    The random tiny model's logits are near-uniform over 49k tokens (its final RMSNorm output has norm ~8 and
    its embeddings std 0.02, so logits have std ~0.14), and no change within LoRA's reach could move a random
    half of the vocabulary. So: final-norm weight 10 (logits spread like a trained LM's, std ~1.5), and the good
    half = tokens whose (tied) embedding has a positive projection on a fixed random direction u. Turning the
    last hidden state towards u raises the whole half — which PPO must learn from the token rewards alone.
    """
    model, tok = nb.load_base("tiny", "~/.cache/rlft", torch.device("cpu"), torch.float32, seed=0)
    with torch.no_grad():
        model.model.norm.weight.fill_(10.0)
    u = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    good = (model.model.embed_tokens.weight.detach() @ u) > 0
    last, real = {}, nb.generate

    def recording_generate(*args, **kwargs):  # the reward needs the sampled token ids, not the decoded text
        last["g"] = real(*args, **kwargs)
        return last["g"]
    monkeypatch.setattr(nb, "generate", recording_generate)

    def reward(prompts, responses, references):  # fraction of response tokens in the good half
        g = last.pop("g")
        mask = g.response_mask.float()
        return (good[g.sequences[:, g.prompt_len:]].float() * mask).sum(1) / mask.sum(1).clamp(min=1)
    return model, tok, good, reward


def run_toy(nb, model, tok, reward, iterations, cfg):
    torch.manual_seed(0)
    lora = nb.add_lora(copy.deepcopy(model), cfg.LORA_R, cfg.LORA_ALPHA, 0.0, cfg.LORA_TARGETS)
    toy_cfg = unit_cfg(PPO_BATCH_SIZE=16, PPO_MINIBATCH_SIZE=8, PPO_EPOCHS=2, PPO_LR=2e-3, MAX_NEW_TOKENS=8,
                       TEMPERATURE=1.0)
    state = nb.make_ppo_state(lora, tok, toy_cfg)
    prompts = [f"Say something, number {i}." for i in range(16)]
    return [nb.ppo_iteration(state, prompts, [""] * 16, reward)["score"] for _ in range(iterations)]


def test_toy_learning_half_vocabulary(nb, monkeypatch, cfg):
    model, tok, good, reward = toy_reward_setup(nb, monkeypatch)
    assert 0.45 < good.float().mean() < 0.55
    scores = run_toy(nb, model, tok, reward, 20, cfg)
    assert 0.35 < scores[0] < 0.65, scores  # starts near chance
    assert sum(scores[-3:]) / 3 >= 0.7, scores  # and learns
    assert run_toy(nb, model, tok, reward, 3, cfg) == scores[:3]  # deterministic under the seed


def test_nan_reward_is_skipped_and_weights_unchanged(nb, tiny_lora):
    model, tok = tiny_lora
    state = nb.make_ppo_state(model, tok, small_cfg(nb))
    nb.ppo_iteration(state, PROMPTS, [""] * 8, random_reward)  # moves the weights once
    before, stats_before = trainable_snapshot(state), state.reward_stats.state_dict()
    opt_steps = [s["step"].item() for s in state.optimizer.state.values()]

    def nan_reward(prompts, responses, references):
        scores = torch.rand(len(responses))
        scores[3] = float("nan")
        return scores
    stats = nb.ppo_iteration(state, PROMPTS, [""] * 8, nan_reward)
    assert stats["skipped"] == 1.0 and stats["skipped_reward"] == 1.0 and state.counters["skipped_reward"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainable_snapshot(state)))
    assert state.reward_stats.state_dict() == stats_before  # the NaN never reached the running statistics
    assert [s["step"].item() for s in state.optimizer.state.values()] == opt_steps
    stats = nb.ppo_iteration(state, PROMPTS, [""] * 8, random_reward)  # and training goes on
    assert stats["skipped"] == 0.0 and not all(torch.equal(a, b) for a, b in zip(before, trainable_snapshot(state)))


def test_nonfinite_loss_and_gradient_skip_the_step(nb, tiny_lora):
    model, tok = tiny_lora
    state = nb.make_ppo_state(model, tok, small_cfg(nb))
    params_ = state.trainable_parameters()
    before = trainable_snapshot(state)
    assert nb.optimizer_step(state, params_[0].sum() * float("inf")) is False
    assert state.counters["skipped_loss"] == 1
    # a finite loss (0) whose gradient is NaN: d sqrt(|x|)/dx at 0
    bad = torch.sqrt((params_[0] - params_[0].detach()).abs().sum())
    assert torch.isfinite(bad) and nb.optimizer_step(state, bad) is False
    assert state.counters["skipped_grad"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainable_snapshot(state)))
    assert all(p.grad is None for p in params_)
    assert nb.optimizer_step(state, sum((p ** 2).sum() for p in params_)) is True


@pytest.mark.parametrize("options", [dict(SURROGATE_TARGET="adv_plus_delta", KL_PREV_COEF=0.5),
                                     dict(KL_ESTIMATOR="k3", REWARD_NORM="batch", NO_EOS_PENALTY=1.0,
                                          KL_TARGET=1.0, KL_HORIZON=100, TARGET_KL=1e-12)])
def test_options_run_and_report(nb, tiny_lora, options):
    """TARGET_KL 1e-12: below any first minibatch's approx-KL (~1e-6 on the tiny model), so the stop is certain;
    at 1e-6 it came after the second minibatch for 4 of 12 seeds (a flaky test)."""
    torch.manual_seed(0)
    model, tok = tiny_lora
    state = nb.make_ppo_state(model, tok, small_cfg(nb, **options))
    stats = nb.ppo_iteration(state, PROMPTS, [""] * 8, random_reward)
    for key in ("score", "kl_ref", "entropy", "clip_frac", "approx_kl", "value_loss", "policy_loss",
                "explained_variance", "response_len", "eos_rate", "tokens_per_s", "seconds", "skipped"):
        assert key in stats and isinstance(stats[key], float), key
    if options.get("TARGET_KL"):
        assert stats["early_stop"] and stats["epochs_done"] == 1  # stopped after the first minibatch's KL
        assert state.kl_ctl.beta != options.get("KL_COEF", 0.05)  # the adaptive controller moved β


# ----------------------------------------------------------------------------------------------- issue 20: group advantage
def test_group_advantage_is_leave_one_out_by_hand(nb):
    """Rows k·K … k·K+K−1 are one prompt: A_i = R_i − mean of the OTHER rows of that prompt, on every valid token."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])  # prompt A: spread; prompt B: all equal
    mask = torch.ones(8, 5)
    mask[1, 3:] = 0  # a response that stopped early
    mask[5, 1:] = 0
    adv = nb.group_advantages(rewards, mask, 4)
    by_hand = [1 - (2 + 3 + 6) / 3, 2 - (1 + 3 + 6) / 3, 3 - (1 + 2 + 6) / 3, 6 - (1 + 2 + 3) / 3, 0, 0, 0, 0]
    for i, expected in enumerate(by_hand):
        valid = mask[i] > 0
        assert adv[i][valid].tolist() == pytest.approx([expected] * int(valid.sum()), abs=1e-6), i  # one value per response
        assert (adv[i][~valid] == 0).all()  # masked tokens get nothing
    assert adv[4:].abs().max() < 1e-6  # a prompt whose answers all score the same carries no signal
    # the baseline R_i − A_i is the mean of the siblings, never the row itself: raising R_0 by 3 raises A_0 by 3
    bumped = rewards.clone()
    bumped[0] += 3.0
    adv2 = nb.group_advantages(bumped, mask, 4)
    assert adv2[0, 0].item() == pytest.approx(adv[0, 0].item() + 3.0, abs=1e-5)
    assert adv2[1:4, 0].tolist() == pytest.approx((adv[1:4, 0] - 1.0).tolist(), abs=1e-5)  # siblings' baseline +3/3
    torch.testing.assert_close(adv2[4:], adv[4:])  # the other prompt does not see it
    with pytest.raises(ValueError, match="groups of K"):
        nb.group_advantages(rewards[:6], mask[:6], 4)


def fake_rollout(nb, scores, mask, k_logprobs=None):
    B, T = mask.shape
    lp = torch.full((B, T), -1.0) * mask
    return nb.Rollout(torch.zeros(B, T + 2, dtype=torch.long), torch.ones(B, T + 2, dtype=torch.long), 2, mask, lp,
                      (k_logprobs if k_logprobs is not None else lp), None, torch.zeros(B, T), None, scores, 0.0,
                      ["eos"] * B, [""] * B, 0.0)


def fake_state(nb, cfg):
    import types
    return types.SimpleNamespace(cfg=cfg, reward_stats=nb.RunningMoments(), kl_ctl=nb.AdaptiveKLController(
        cfg.KL_COEF, cfg.KL_TARGET, cfg.KL_HORIZON), counters={"skipped_reward": 0, "skipped_loss": 0,
                                                               "skipped_grad": 0, "clipped_reward": 0},
        comm=nb.SingleProcess())


def test_compute_advantages_group_mode(nb):
    """advantage='group': R_i = normalised score − β·Σ kl, leave-one-out, scaled by the std of the per-response values."""
    cfg = unit_cfg(PPO_BATCH_SIZE=8, PPO_SAMPLES_PER_PROMPT=4, PPO_MINIBATCH_SIZE=4, ADVANTAGE="group",
                   REWARD_NORM="running", KL_COEF=0.5)
    mask = torch.ones(8, 4)
    mask[2, 2:] = 0
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    ref = torch.full((8, 4), -1.0) * mask
    ref[0, 0] = -1.5  # row 0 moved away from the reference: kl_0 = 0.5 on one token
    state = fake_state(nb, cfg)
    ro = nb.compute_advantages(state, fake_rollout(nb, scores, mask, ref))
    sigma = scores.double().std(unbiased=False).item()
    R = (scores - scores.mean()) / sigma
    R[0] -= 0.5 * 0.5  # β · Σ_t kl_t
    loo = torch.stack([R[i] - (R.view(2, 4)[i // 4].sum() - R[i]) / 3 for i in range(8)])
    expected = loo / max(loo.std(unbiased=False).item(), nb.ADVANTAGE_STD_FLOOR)
    for i in range(8):
        valid = mask[i] > 0
        assert ro.advantages[i][valid].tolist() == pytest.approx([expected[i].item()] * int(valid.sum()), abs=1e-5)
        assert (ro.advantages[i][~valid] == 0).all()
    assert ro.advantages[4:].abs().max() < 1e-5  # the all-equal prompt: zero advantage
    assert ro.returns is None and (ro.deltas == 0).all()  # no critic, no TD residuals
    with pytest.raises(ValueError, match="PPO_SAMPLES_PER_PROMPT >= 2"):
        unit_cfg(PPO_BATCH_SIZE=8, PPO_SAMPLES_PER_PROMPT=1, ADVANTAGE="group")
    with pytest.raises(ValueError):
        unit_cfg(ADVANTAGE="critic")


def test_group_iteration_runs_no_value_head(nb, tiny_lora, monkeypatch):
    model, tok = tiny_lora
    state = nb.make_ppo_state(model, tok, small_cfg(nb, PPO_SAMPLES_PER_PROMPT=4, ADVANTAGE="group"))
    torch.manual_seed(0)
    calls = []
    monkeypatch.setattr(nb.ValueHead, "forward", lambda self, h: calls.append(1) or torch.zeros(h.shape[:2]))
    head_before = [p.detach().clone() for p in state.value_head.parameters()]
    lora_before = trainable_snapshot(state)
    stats = nb.ppo_iteration(state, nb.repeat_each(PROMPTS[:2], 4), [""] * 8, random_reward)
    assert calls == []  # neither the rollout nor the update ran the critic
    assert stats["value_loss"] == 0.0 and stats["skipped"] == 0.0 and math.isnan(stats["explained_variance"])
    assert all(torch.equal(a, b) for a, b in zip(head_before, state.value_head.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(lora_before, trainable_snapshot(state)))  # the policy learned
    for key in ("t_generate", "t_old_logprobs", "t_ref", "t_reward", "t_update"):
        assert isinstance(stats[key], float) and stats[key] >= 0, key
    assert stats["t_ref"] > 0 and stats["t_update"] > 0


# ----------------------------------------------------------------------------------------------- PPO-ptx
def ptx_setup(nb, tiny_lora, **kw):
    model, tok = tiny_lora
    torch.manual_seed(0)  # the minibatch shuffle decides which prompts share a ptx batch
    perturb_lora_b(model)
    cfg = small_cfg(nb, **{"PPO_SAMPLES_PER_PROMPT": 4, "ADVANTAGE": "group", **kw})
    state = nb.make_ppo_state(model, tok, cfg)
    prompts, refs = nb.repeat_each(PROMPTS[:2], 4), nb.repeat_each(["A harbour is a sheltered port.", "Rayleigh scattering."], 4)
    return state, prompts, refs


def test_ptx_adds_the_reference_nll_and_zero_keeps_the_loss(nb, tiny_lora):
    import dataclasses
    state, prompts, refs = ptx_setup(nb, tiny_lora)
    torch.manual_seed(0)
    ro = nb.compute_advantages(state, nb.rollout(state, prompts, refs, random_reward))
    idx = torch.tensor([0, 1, 4, 5])  # two rows of each prompt: two distinct reference answers
    loss0, stats0 = nb.minibatch_loss(state, ro, idx)
    cfg = state.cfg
    today = stats0["policy_loss"] + cfg.PPO_VF_COEF * stats0["value_loss"] - cfg.PPO_ENT_COEF * stats0["entropy"]
    assert loss0.item() == pytest.approx(today, abs=1e-6) and "ptx_loss" not in stats0  # ptx_coef = 0: unchanged
    state.cfg = dataclasses.replace(cfg, PTX_COEF=0.5)
    loss1, stats1 = nb.minibatch_loss(state, ro, idx)
    nll = nb.reference_nll(state, ro, idx)
    assert stats1["ptx_loss"] == pytest.approx(nll.item(), rel=1e-6) and nll.item() > 1.0
    assert loss1.item() == pytest.approx(loss0.item() + 0.5 * nll.item(), abs=1e-5)
    # reference_nll = the mean token NLL of the answers (labels on the answer only) of the DISTINCT prompts
    ids, attention, labels = nb.sft_batch(state.tokenizer, [{"prompt": p, "reference": r} for p, r in
                                                             [(prompts[0], refs[0]), (prompts[4], refs[4])]], "cpu")
    expected = state.policy(input_ids=ids, attention_mask=attention, labels=labels).loss
    assert nll.item() == pytest.approx(expected.item(), rel=1e-5)
    # a prompt without a reference adds nothing (its "answer" would be a bare EOS)
    ro.references = ["" if i < 4 else r for i, r in enumerate(ro.references)]
    only_second = nb.sft_batch(state.tokenizer, [{"prompt": prompts[4], "reference": refs[4]}], "cpu")
    expected2 = state.policy(input_ids=only_second[0], attention_mask=only_second[1], labels=only_second[2]).loss
    assert nb.reference_nll(state, ro, idx).item() == pytest.approx(expected2.item(), rel=1e-5)
    ro.references = [""] * 8
    assert nb.reference_nll(state, ro, idx).item() == 0.0


def constant_reward(prompts, responses, references):
    return torch.full((len(responses),), 3.0)


@pytest.mark.parametrize("ptx_coef", [0.0, 1.0])
def test_ptx_lowers_the_reference_nll(nb, tiny_lora, ptx_coef):
    """With a constant score and β = 0 the surrogate has no signal: only the ptx term can move the adapter."""
    state, prompts, refs = ptx_setup(nb, tiny_lora, PTX_COEF=ptx_coef, PPO_LR=5e-3, PPO_ENT_COEF=0.0, KL_COEF=0.0)
    ro = nb.rollout(state, prompts, refs, constant_reward)
    rows = torch.arange(8)
    with torch.no_grad():
        before = nb.reference_nll(state, ro, rows).item()
    lora_before = trainable_snapshot(state)
    for _ in range(3):
        stats = nb.ppo_iteration(state, prompts, refs, constant_reward)
    with torch.no_grad():
        after = nb.reference_nll(state, ro, rows).item()
    if ptx_coef:
        assert after < before - 0.05, (before, after)
        assert stats["ptx_loss"] > 0
    else:
        assert after == before and all(torch.equal(a, b) for a, b in zip(lora_before, trainable_snapshot(state)))


# ----------------------------------------------------------------------------------------------- KL anchor
def lora_copy(nb, model):
    return {k: v.detach().clone() for k, v in nb.lora_parameters(model).items()}


def test_anchored_reference_restores_bitwise_and_is_the_snapshot(nb, tiny_lora, tmp_path):
    model, tok = tiny_lora
    state = nb.make_ppo_state(model, tok, small_cfg(nb))
    perturb_lora_b(model, seed=0)
    gen = nb.generate(model, tok, [nb.chat_prompt(tok, p) for p in PROMPTS[:3]], max_new_tokens=5, temperature=1.0)
    args = (gen.sequences, gen.attention_mask, gen.prompt_len, 1.0)
    with torch.no_grad():
        snapshot_lp = nb.policy_logprobs(model, None, *args).logprobs  # the model whose LoRA is the snapshot
    nb.set_kl_anchor(state)
    snapshot = lora_copy(nb, model)
    perturb_lora_b(model, std=0.2, seed=1)  # training moves the live adapter on
    live = lora_copy(nb, model)
    assert any(not torch.equal(live[k], snapshot[k]) for k in live)
    with torch.no_grad(), nb.anchored_reference(state):
        anchored_lp = nb.policy_logprobs(model, None, *args).logprobs
        assert all(torch.equal(p, snapshot[k]) for k, p in nb.lora_parameters(model).items())
    assert torch.equal(anchored_lp, snapshot_lp)
    assert all(torch.equal(p, live[k]) for k, p in nb.lora_parameters(model).items())  # bitwise restore
    # an exception inside the block still restores the live adapter
    with pytest.raises(RuntimeError), nb.anchored_reference(state):
        raise RuntimeError("boom")
    assert all(torch.equal(p, live[k]) for k, p in nb.lora_parameters(model).items())
    # checkpoint round trip through safetensors, as the training run stores it
    from safetensors.torch import load_file, save_file
    save_file(nb.anchor_state_dict(state), tmp_path / "anchor.safetensors")
    other = nb.make_ppo_state(model, tok, small_cfg(nb))
    assert other.anchor is None and nb.anchor_state_dict(other) == {}
    nb.load_anchor(other, load_file(tmp_path / "anchor.safetensors"))
    assert set(other.anchor) == set(snapshot) and all(torch.equal(other.anchor[k], snapshot[k]) for k in snapshot)
    with pytest.raises(ValueError, match="does not fit"):
        nb.load_anchor(other, {"lora_A.bogus": torch.zeros(1)})
    nb.load_anchor(other, {})
    assert other.anchor is None


def test_kl_is_zero_right_after_set_kl_anchor(nb, tiny_lora):
    model, tok = tiny_lora
    perturb_lora_b(model)  # an "SFT" adapter, far from the base
    state = nb.make_ppo_state(model, tok, small_cfg(nb))
    torch.manual_seed(0)
    to_base = nb.rollout(state, PROMPTS, [""] * 8, random_reward)
    assert to_base.kl_exact.min() > 1e-4  # the base is the default reference
    nb.set_kl_anchor(state)
    ro = nb.rollout(state, PROMPTS, [""] * 8, random_reward)
    assert ro.kl_exact.abs().max() < 1e-6
    torch.testing.assert_close(ro.ref_logprobs, ro.logprobs, atol=1e-6, rtol=0)


def test_zero_beta_skips_the_reference_pass(nb, tiny_lora, monkeypatch):
    model, tok = tiny_lora
    calls, real = [], nb.policy_logprobs
    monkeypatch.setattr(nb, "policy_logprobs", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    state = nb.make_ppo_state(model, tok, small_cfg(nb, KL_COEF=0.0, PPO_MINIBATCH_SIZE=8, PPO_EPOCHS=1))
    stats = nb.ppo_iteration(state, PROMPTS, [""] * 8, random_reward)
    assert len(calls) == 2  # π_old in the rollout, one minibatch forward; no reference pass
    assert not any(kw.get("keep_dist") or kw.get("kl_from") is not None for kw in calls)  # no [B, T, V] kept
    assert stats["t_ref"] == 0.0 and math.isnan(stats["kl_ref"]) and stats["skipped"] == 0.0
    calls.clear()
    adaptive = nb.make_ppo_state(model, tok, small_cfg(nb, KL_COEF=0.0, KL_TARGET=1.0, PPO_MINIBATCH_SIZE=8,
                                                        PPO_EPOCHS=1))
    stats = nb.ppo_iteration(adaptive, PROMPTS, [""] * 8, random_reward)
    assert len(calls) == 3 and stats["t_ref"] > 0 and math.isfinite(stats["kl_ref"])  # β may grow: measured


# ----------------------------------------------------------------------------------------------- issue 16 defect 6
def test_huge_finite_reward_is_clipped_and_counted(nb, tiny_lora):
    """One 1e30 score used to set the running σ to ~1e29, so every later score normalised to ~1e-30."""
    model, tok = tiny_lora
    state = nb.make_ppo_state(model, tok, small_cfg(nb))
    torch.manual_seed(0)
    nb.ppo_iteration(state, PROMPTS, [""] * 8, random_reward)

    def huge_reward(prompts, responses, references):
        scores = torch.rand(len(responses)) * 10
        scores[3] = 1e30
        return scores
    stats = nb.ppo_iteration(state, PROMPTS, [""] * 8, huge_reward)
    assert stats["clipped_now"] == 1.0 and stats["clipped_reward"] == 1.0 and state.counters["clipped_reward"] == 1
    assert stats["skipped"] == 0.0
    assert state.reward_stats.std < 20 and abs(state.reward_stats.mean) < 20  # the statistics stay sane
    stats = nb.ppo_iteration(state, PROMPTS, [""] * 8, random_reward)
    assert stats["clipped_now"] == 0.0 and stats["clipped_reward"] == 1.0
    nxt = nb.normalise_scores(torch.rand(8) * 10, "running", state.reward_stats)
    assert 0.2 < nxt.abs().max().item() < 5  # later batches still normalise to O(1) values
    assert all(torch.isfinite(p).all() for p in state.trainable_parameters())
    # also in the very first batch, before there are running statistics
    stats0 = nb.RunningMoments()
    first = torch.rand(8, generator=torch.Generator().manual_seed(1)) * 10
    first[0] = 1e30
    clipped, n = nb.clip_scores(first, 5.0, stats0)
    assert n == 1 and clipped[0] < 50 and torch.equal(clipped[1:], first[1:])


def test_clip_scores_leaves_genuine_scores_alone(nb):
    stats = nb.RunningMoments()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # ordinary batches: never clipped, returned as the very same tensor
        batch = torch.rand(16, generator=g) * 10
        out, n = nb.clip_scores(batch, 5.0, stats)
        assert n == 0 and out is batch
        stats.update(batch)
    sparse = torch.tensor([0.0] * 7 + [1.0])  # a sparse 0/1 reward: the success is not an outlier
    assert nb.clip_scores(sparse, 5.0, nb.RunningMoments())[1] == 0
    assert nb.clip_scores(torch.tensor([0.0] * 7 + [1e30]), 0.0, stats)[1] == 0  # c = 0 turns it off


def test_a_batch_mostly_absurd_is_skipped_and_never_reaches_the_running_moments(nb, tiny_lora):
    """Issue 35 item 5: a -1e9 sentinel on 12 of 16 rows dragged the median (and so clip_scores' centre) to the
    sentinel; the running std became ~1e8 and later rewards normalised to ~1e-8 for hundreds of batches."""
    model, tok = tiny_lora
    torch.manual_seed(0)
    state = nb.make_ppo_state(model, tok, small_cfg(nb, PPO_BATCH_SIZE=16, PPO_MINIBATCH_SIZE=8))
    prompts = PROMPTS + PROMPTS
    nb.ppo_iteration(state, prompts, [""] * 16, random_reward)  # a normal batch: the running moments have data
    before, moments = trainable_snapshot(state), state.reward_stats.state_dict()

    def sentinel_reward(prompts, responses, references):
        scores = torch.rand(len(responses)) * 10
        scores[:12] = -1e9
        return scores
    stats = nb.ppo_iteration(state, prompts, [""] * 16, sentinel_reward)
    assert stats["skipped"] == 1.0 and state.counters["absurd_reward"] == 1 and state.counters["skipped_reward"] == 1
    assert state.reward_stats.state_dict() == moments  # the sentinels never reached the running statistics
    assert all(torch.equal(a, b) for a, b in zip(before, trainable_snapshot(state)))
    stats = nb.ppo_iteration(state, prompts, [""] * 16, random_reward)  # training goes on, O(1) normalised scores
    assert stats["skipped"] == 0.0 and state.reward_stats.std < 20
    assert 0.2 < nb.normalise_scores(torch.rand(8) * 10, "running", state.reward_stats).abs().max().item() < 5


def test_a_reward_that_requires_grad_is_detached_with_a_warning(nb, tiny_lora):
    """Issue 35 item 8: such a reward crashed the update with 'backward through the graph a second time'."""
    model, tok = tiny_lora
    state = nb.make_ppo_state(model, tok, small_cfg(nb))
    weight = (torch.rand(8) * 10).requires_grad_()  # e.g. a reward that hands back a parameter-like leaf tensor

    def learned_reward(prompts, responses, references):
        return weight  # (rollout runs under no_grad, so only a returned leaf still requires grad here)
    for _ in range(2):
        with pytest.warns(UserWarning, match="requires grad; its scores are detached"):
            stats = nb.ppo_iteration(state, PROMPTS, [""] * 8, learned_reward)
        assert stats["skipped"] == 0.0
    assert weight.grad is None  # nothing flowed back into the reward


def test_absurd_batch_judges_the_median_against_the_running_statistics():
    from rlft_support.guards import absurd_batch
    moments = type("Moments", (), {"count": 64, "mean": 6.0, "std": 1.5})()
    ordinary = torch.tensor([5.0, 6.5, 7.0, 4.0, 8.0, 6.0])
    assert not absurd_batch(ordinary, 5.0, moments)
    assert not absurd_batch(torch.cat([ordinary, torch.tensor([-1e9, -1e9])]), 5.0, moments)  # a minority: clipped
    assert absurd_batch(torch.tensor([-1e9] * 12 + [6.0] * 4), 5.0, moments)  # a majority: the batch is skipped
    assert not absurd_batch(torch.tensor([-1e9] * 12), 0.0, moments)  # REWARD_CLIP = 0 turns the guards off
    empty = type("Moments", (), {"count": 0, "mean": 0.0, "std": 1.0})()
    assert not absurd_batch(torch.tensor([-1e9] * 12), 5.0, empty)  # no history yet: nothing to judge against


# ----------------------------------------------------------------------------------------------- issue 16 defect 5 groundwork
def test_guarded_step_skips_nan_loss_and_leaves_parameters(nb):
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    params = list(layer.parameters())
    opt = torch.optim.AdamW(params, lr=0.1)
    before = [p.detach().clone() for p in params]
    counters = {}
    x = torch.randn(4, 3)
    nan_loss = layer(x).sum() * float("nan")
    assert nb.guarded_step(opt, params, nan_loss, 1.0, counters) is False
    assert counters == {"skipped_loss": 1}
    assert all(torch.equal(a, b) for a, b in zip(before, params)) and opt.state == {}
    assert all(p.grad is None for p in params)
    bad_grad = torch.sqrt((params[0] - params[0].detach()).abs().sum())  # finite (0), NaN gradient
    assert nb.guarded_step(opt, params, bad_grad, 1.0, counters) is False
    assert counters == {"skipped_loss": 1, "skipped_grad": 1} and all(p.grad is None for p in params)
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert nb.guarded_step(opt, params, layer(x).pow(2).sum(), 1.0, counters, scheduler=sched) is True
    assert not all(torch.equal(a, b) for a, b in zip(before, params)) and sched.last_epoch == 1
    assert all(torch.isfinite(p).all() for p in params) and all(p.grad is None for p in params)


# ----------------------------------------------------------------------------------------------- issue 19: iteration cost
def full_vocab(nb, model, sequences, attention_mask, P, tau):
    """The unchunked computation: the whole [B, T, V] log-softmax at once, in float64 (the exact value of the fp32
    logits, against which fp32 rounding over 49k terms is measured)."""
    base = model.get_base_model()
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = base.get_decoder()(input_ids=sequences, attention_mask=attention_mask,
                                position_ids=positions).last_hidden_state[:, P - 1:-1]
    log_dist = (base.get_output_embeddings()(hidden).double() / tau).log_softmax(-1)
    return (log_dist, log_dist.gather(-1, sequences[:, P:, None]).squeeze(-1).float(),
            (-(log_dist.exp() * log_dist).sum(-1)).float())


def test_chunked_log_softmax_equals_unchunked(nb, tiny_lora):
    model, tok = tiny_lora
    perturb_lora_b(model)
    torch.manual_seed(0)
    gen = nb.generate(model, tok, [nb.chat_prompt(tok, p) for p in PROMPTS[:3]], max_new_tokens=7, temperature=1.0)
    args = (gen.sequences, gen.attention_mask, gen.prompt_len, 0.7)
    with torch.no_grad():
        log_dist, lp, ent = full_vocab(nb, model, *args)
        with model.disable_adapter():
            ref_dist, ref_lp, _ = full_vocab(nb, model, *args)
        kl = (log_dist.exp() * (log_dist - ref_dist)).sum(-1).float()
        whole = nb.policy_logprobs(model, None, *args, chunk=10**6)  # one chunk: the unchunked computation
        with model.disable_adapter():
            whole_ref = nb.policy_logprobs(model, None, *args, kl_from_hidden=whole.hidden, chunk=10**6)
        # the unchunked path is the full-vocabulary formula (up to fp32 rounding of a sum of 49k terms) ...
        torch.testing.assert_close(whole.logprobs, lp, atol=1e-6, rtol=0)
        torch.testing.assert_close(whole.entropy, ent, atol=2e-5, rtol=0)
        torch.testing.assert_close(whole_ref.logprobs, ref_lp, atol=1e-6, rtol=0)
        torch.testing.assert_close(whole_ref.kl, kl, atol=1e-6, rtol=0)
        for chunk in (1, 3):  # ... and chunks give the same within 1e-6 (3 does not divide T = 7: a ragged chunk)
            cur = nb.policy_logprobs(model, None, *args, chunk=chunk)
            with model.disable_adapter():
                ref = nb.policy_logprobs(model, None, *args, kl_from_hidden=cur.hidden, chunk=chunk)
            # log-probs and entropies of the near-uniform tiny model are ~log V = 10.8, where one fp32 ulp is
            # 9.5e-7 (and BLAS rounds a 1-row head matmul differently from a 7-row one): 1e-6 plus 1e-6 relative
            torch.testing.assert_close(cur.logprobs, whole.logprobs, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(cur.entropy, whole.entropy, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(ref.logprobs, whole_ref.logprobs, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(ref.kl, whole_ref.kl, atol=1e-6, rtol=0)
    assert kl.abs().max() > 1e-4  # the adapter moved: a real KL was compared


def test_chunked_log_softmax_never_builds_the_whole_distribution(nb, tiny_lora, monkeypatch):
    model, tok = tiny_lora
    gen = nb.generate(model, tok, [nb.chat_prompt(tok, p) for p in PROMPTS[:2]], max_new_tokens=9, temperature=1.0)
    head = model.get_base_model().get_output_embeddings()
    rows, real = [], head.forward
    monkeypatch.setattr(head, "forward", lambda h: rows.append(tuple(h.shape)) or real(h))
    with torch.no_grad():
        nb.policy_logprobs(model, None, gen.sequences, gen.attention_mask, gen.prompt_len, 1.0, chunk=4)
    B, T = gen.sequences.shape[0], gen.sequences.shape[1] - gen.prompt_len
    assert all(len(shape) == 2 for shape in rows)  # flat [B*c, H] inputs (flat_head): never a strided 3-D matmul
    widths = [shape[0] // B for shape in rows]
    assert T > 4 and max(widths) == 4 and sum(widths) == T  # the head only ever sees 4 positions at once


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_head_equals_the_head_on_a_strided_slice(nb, dtype):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False).to(dtype)
    hidden = torch.randn(3, 11, 8).to(dtype)[:, 2:-1]  # a strided [3, 8, 8] slice, as policy_logprobs passes it
    out = nb.flat_head(head, hidden[:, 1:5])
    assert out.shape == (3, 4, 50) and out.dtype == dtype
    torch.testing.assert_close(out.float(), head(hidden[:, 1:5].contiguous()).float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=0)


def test_reference_nll_chunked_equals_the_full_forward(nb, tiny_lora, monkeypatch):
    model, tok = tiny_lora
    perturb_lora_b(model)
    state = nb.make_ppo_state(model, tok, small_cfg(nb))
    ro = nb.Rollout(*[None] * 3, torch.zeros(2, 1), *[None] * 10, prompts=PROMPTS[:2],
                    references=["A harbour is a sheltered port.", "Rayleigh scattering."])
    with torch.no_grad():
        nll = nb.reference_nll(state, ro, torch.arange(2))
        ids, mask, labels = nb.sft_batch(tok, [{"prompt": p, "reference": r} for p, r in zip(ro.prompts, ro.references)],
                                         torch.device("cpu"))
        expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # HF's own token-mean NLL
    torch.testing.assert_close(nll, expected, atol=1e-5, rtol=0)


def count_forwards(nb, monkeypatch):
    calls, real = [], nb.policy_logprobs
    monkeypatch.setattr(nb, "policy_logprobs", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    return calls


def test_old_logprobs_from_generate_skip_the_forward_between_monitors(nb, tiny_lora, monkeypatch):
    model, tok = tiny_lora
    state = nb.make_ppo_state(model, tok, small_cfg(nb, KL_MONITOR_EVERY=2, ADVANTAGE="group", PPO_SAMPLES_PER_PROMPT=4))
    calls, seen = count_forwards(nb, monkeypatch), {}
    real_generate = nb.generate
    monkeypatch.setattr(nb, "generate", lambda *a, **kw: seen.setdefault("g", real_generate(*a, **kw)))
    torch.manual_seed(0)
    monitored = nb.rollout(state, PROMPTS, [""] * 8, random_reward)  # iteration 0: a monitor iteration
    assert len(calls) == 2 and calls[1].get("kl_from_hidden") is not None  # π_old (for the monitors) + reference
    assert monitored.kl_exact is not None and monitored.gen_logprob_err < 1e-4 and monitored.entropy is not None
    assert torch.equal(monitored.logprobs, seen.pop("g").logprobs.float() * monitored.mask)  # π_old = generate()'s
    state.iteration, calls[:] = 1, []
    ro = nb.rollout(state, PROMPTS, [""] * 8, random_reward)
    assert len(calls) == 1 and calls[0].get("kl_from_hidden") is None  # the reference pass only, sampled tokens
    assert ro.kl_exact is None and math.isnan(ro.gen_logprob_err) and ro.entropy is None
    assert ro.timings["t_old_logprobs"] == 0.0 and ro.timings["t_ref"] > 0
    torch.testing.assert_close(ro.ref_logprobs, ro.logprobs, atol=1e-4, rtol=0)  # fresh adapter: π = π_ref
    assert torch.equal(ro.logprobs, seen.pop("g").logprobs.float() * ro.mask)


def test_iteration_stats_keep_every_key_nan_where_not_measured(nb, tiny_lora, monkeypatch):
    model, tok = tiny_lora
    prompts = nb.repeat_each(PROMPTS[:2], 4)
    state = nb.make_ppo_state(model, tok, small_cfg(nb, PPO_SAMPLES_PER_PROMPT=4, ADVANTAGE="group", KL_MONITOR_EVERY=2))
    torch.manual_seed(0)
    first = nb.ppo_iteration(state, prompts, [""] * 8, random_reward)
    second = nb.ppo_iteration(state, prompts, [""] * 8, random_reward)
    assert set(first) == set(second)
    assert first["kl_monitored"] == 1.0 and math.isfinite(first["kl_ref"]) and first["gen_logprob_err"] < 1e-4
    assert second["kl_monitored"] == 0.0 and math.isnan(second["kl_ref"]) and math.isnan(second["gen_logprob_err"])
    assert second["t_old_logprobs"] == 0.0 and math.isfinite(second["kl_ref_sampled"])
    assert second["rollout_entropy"] == second["entropy"] > 0  # from the update pass


def test_recompute_and_gae_run_the_old_policy_forward(nb, tiny_lora, monkeypatch):
    model, tok = tiny_lora
    calls = count_forwards(nb, monkeypatch)
    for kw in (dict(OLD_LOGPROBS="recompute", ADVANTAGE="group", PPO_SAMPLES_PER_PROMPT=4), dict(ADVANTAGE="gae")):
        state = nb.make_ppo_state(model, tok, small_cfg(nb, KL_MONITOR_EVERY=0, **kw))
        calls[:] = []
        ro = nb.rollout(state, PROMPTS, [""] * 8, random_reward)
        assert len(calls) == 2 and ro.kl_exact is None and ro.gen_logprob_err < 1e-4, kw  # π_old + reference
        assert ro.timings["t_old_logprobs"] > 0 and (ro.values is not None) == (kw.get("ADVANTAGE") == "gae")


def test_rollout_merged_is_passed_to_generate_only_when_set(nb, tiny_lora, monkeypatch):
    model, tok = tiny_lora
    seen, real = [], nb.generate
    monkeypatch.setattr(nb, "generate", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    for merged in (False, True):
        state = nb.make_ppo_state(model, tok, small_cfg(nb, ROLLOUT_MERGED=merged))
        nb.rollout(state, PROMPTS[:2], [""] * 2, random_reward)
    assert "merged" not in seen[0] and seen[1]["merged"] is True


def test_rollout_compiled_is_passed_to_generate_only_when_set(nb, tiny_lora, cfg, monkeypatch):
    """COMPILE_DECODE reaches generate(compiled=True); the step runs uncompiled here (the static-cache path, no
    compile time; the compiled step itself is tested in test_generate.py)."""
    model, tok = tiny_lora
    seen, real = [], nb.generate
    monkeypatch.setattr(nb, "generate", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    monkeypatch.setattr(fast, "compiled_decode_forward", lambda: fast.decode_forward)  # make_cache calls it
    for compiled in (False, True):
        state = nb.make_ppo_state(model, tok, small_cfg(nb, COMPILE_DECODE=compiled))
        nb.rollout(state, PROMPTS[:2], [""] * 2, random_reward)
    assert "compiled" not in seen[0] and seen[1]["compiled"] is True
    assert cfg.COMPILE_DECODE is False  # opt-in


def test_config_rejects_bad_iteration_cost_knobs(nb):
    for bad in (dict(OLD_LOGPROBS="cached"), dict(KL_MONITOR_EVERY=-1)):
        with pytest.raises(ValueError):
            unit_cfg(**bad)


@pytest.mark.slow
@pytest.mark.parametrize("fast", [False, True], ids=["attached-full", "merged-shared"])
def test_generate_logprobs_equal_a_recomputation_on_the_packaged_model(nb, cfg, fast):
    """OLD_LOGPROBS = "generate" rests on this: generate()'s log-probs (KV cache, one position at a time) equal a
    full recomputation within 1e-4, on the real model in fp32 with a trained-looking adapter — also on the default
    path (ROLLOUT_MERGED sampling, PREFIX_SHARING recomputation; each prompt answered twice so prompts are shared)."""
    model, tok = nb.load_base("packaged", "~/.cache/rlft", torch.device("cpu"), torch.float32)
    lora = nb.add_lora(model, cfg.LORA_R, cfg.LORA_ALPHA, 0.0, cfg.LORA_TARGETS)
    perturb_lora_b(lora, std=0.01)
    torch.manual_seed(0)
    prompts = nb.repeat_each([nb.chat_prompt(tok, p) for p in PROMPTS[:4]], 2) if fast else \
        [nb.chat_prompt(tok, p) for p in PROMPTS]
    gen = nb.generate(lora, tok, prompts, max_new_tokens=24, temperature=0.7, merged=fast)
    with torch.no_grad():
        out = nb.policy_logprobs(lora, None, gen.sequences, gen.attention_mask, gen.prompt_len, 0.7,
                                 shared_prefix=fast)
    mask = gen.response_mask.float()
    assert mask.sum() > 50
    assert ((gen.logprobs.float() - out.logprobs) * mask).abs().max() < 1e-4


# ----------------------------------------------------------------------------------------------- shared prompts
def shared_prefix_batch(nb, tok):
    """Three prompts of different lengths (so the left padding differs), answered 3, 1 and 2 times, rows mixed."""
    prompts = [nb.chat_prompt(tok, p) for p in (PROMPTS[0], PROMPTS[2], PROMPTS[5])]
    rows = [prompts[i] for i in (0, 1, 0, 2, 0, 2)]
    ids, mask = nb.encode_prompts(tok, rows, 64, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    answers = torch.randint(3, tok.vocab_size if hasattr(tok, "vocab_size") else 100, (len(rows), 5), generator=g)
    answer_mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 5, [1] * 4 + [0], [1] * 2 + [0] * 3, [1] * 5])
    return torch.cat([ids, answers], 1), torch.cat([mask, answer_mask], 1), ids.shape[1], answer_mask.float()


def test_prefix_groups_finds_the_distinct_prompts(nb, tiny_lora):
    _, tok = tiny_lora
    seq, mask, P, _ = shared_prefix_batch(nb, tok)
    first, inverse = nb.prefix_groups(seq, mask, P)
    assert len(first) == 3
    assert inverse[0] == inverse[2] == inverse[4] and inverse[3] == inverse[5] and len(set(inverse.tolist())) == 3
    assert torch.equal(seq[first[inverse], :P], seq[:, :P])  # every row's prompt is its group's


def test_shared_prefix_log_probs_and_gradients_match_the_full_forward(nb, tiny_lora, one_thread):
    """PREFIX_SHARING: each distinct prompt runs once and its KV cache serves its rows; log-probs, entropy and the
    LoRA gradients equal the full forward's up to fp32 rounding (left padding of different prompt lengths too)."""
    model, tok = tiny_lora
    perturb_lora_b(model, 0.05)
    seq, mask, P, valid = shared_prefix_batch(nb, tok)
    outs, grads = [], []
    for shared in (False, True):
        model.zero_grad()
        out = nb.policy_logprobs(model, None, seq, mask, P, 0.7, shared_prefix=shared)
        ((out.logprobs * valid).sum() + (out.entropy * valid).sum()).backward()
        outs.append(out)
        grads.append(torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_" in n]))
    full, shared = outs
    assert shared.logprobs.shape == full.logprobs.shape == valid.shape
    assert ((shared.logprobs - full.logprobs) * valid).abs().max() < 1e-4
    assert ((shared.entropy - full.entropy) * valid).abs().max() < 1e-4
    assert grads[0].abs().max() > 0 and torch.allclose(grads[1], grads[0], atol=1e-4, rtol=1e-3)


def test_prefix_sharing_reaches_every_log_prob_pass(nb, tiny_lora, monkeypatch):
    """With PREFIX_SHARING (the default) the π_old, reference and update passes all ask for shared prompts."""
    model, tok = tiny_lora
    seen, real = [], nb.policy_logprobs
    monkeypatch.setattr(nb, "policy_logprobs", lambda *a, **kw: seen.append(kw.get("shared_prefix")) or real(*a, **kw))
    for sharing in (True, False):
        seen.clear()
        state = nb.make_ppo_state(model, tok, small_cfg(nb, PREFIX_SHARING=sharing, OLD_LOGPROBS="recompute",
                                                        PPO_SAMPLES_PER_PROMPT=2, PTX_COEF=0.0))
        nb.ppo_iteration(state, nb.repeat_each(PROMPTS[:4], 2), [""] * 8, random_reward)
        assert len(seen) >= 3 and set(seen) == {sharing}


@pytest.mark.parametrize("critic", ["group", "gae"])
def test_references_as_extra_rows_equal_the_separate_ptx_pass(nb, tiny_lora, one_thread, critic):
    """PREFIX_SHARING with PPO-ptx: the references ride in the update's forward (with_reference_rows): the answers'
    log-probs, entropy and values, the PPO-ptx NLL, its token count and the gradient of the whole minibatch loss equal
    the separate passes' (PREFIX_SHARING off) up to fp32 rounding; a longer reference than the answers widens the
    rows, and rows without a reference add none."""
    import dataclasses
    state, prompts, refs = ptx_setup(nb, tiny_lora, PTX_COEF=0.5, ADVANTAGE=critic)
    refs = nb.repeat_each(["A harbour is a sheltered port where ships are safe from the storms of the open sea, "
                           "usually behind a breakwater.", ""], 4)  # longer than the 6-token answers; one blank
    torch.manual_seed(0)
    ro = nb.compute_advantages(state, nb.rollout(state, prompts, refs, random_reward))
    idx = torch.tensor([5, 0, 2, 7])
    seq, att, temp, ref_mask = nb.with_reference_rows(state, ro, idx)
    assert seq.shape[0] == 5 and ref_mask.shape[0] == 1 and seq.shape[1] > ro.sequences.shape[1]
    assert temp.flatten().tolist() == [state.cfg.TEMPERATURE] * 4 + [1.0]
    results = []
    for sharing in (True, False):
        state.cfg = dataclasses.replace(state.cfg, PREFIX_SHARING=sharing)
        state.policy.zero_grad()
        out, ptx, tokens = nb.minibatch_forward(state, ro, idx)
        loss, stats = nb.minibatch_loss(state, ro, idx)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for n, p in state.policy.named_parameters() if "lora_" in n])
        results.append((out, ptx.detach(), tokens, stats, grad))
    (a, ptx_a, tok_a, st_a, g_a), (b, ptx_b, tok_b, st_b, g_b) = results
    mask = ro.mask[idx]
    assert ((a.logprobs - b.logprobs) * mask).abs().max() < 1e-4 and ((a.entropy - b.entropy) * mask).abs().max() < 1e-4
    assert (a.values is None) == (critic == "group") and (a.values is None or (a.values - b.values).abs().max() < 1e-4)
    assert float(tok_a) == float(tok_b) > 10 and abs(ptx_a - ptx_b) < 1e-4 and ptx_a > 1.0
    assert st_a["ptx_loss"] == pytest.approx(st_b["ptx_loss"], abs=1e-4)
    assert g_b.abs().max() > 0 and torch.allclose(g_a, g_b, atol=1e-4, rtol=1e-3)
