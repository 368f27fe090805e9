"""Section 1: model loading, dtype policy and the LoRA adapter."""
import dataclasses
import math
import re

import pytest
import torch

from conftest import CACHE_DIR, CPU, perturb_lora_b, unit_cfg
from rlft_support import config
from rlft_support import assets


def test_tiny_model_and_tokenizer(tiny):
    model, tokenizer = tiny
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == len(tokenizer)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.padding_side == "left"
    assert not model.training


def test_tiny_model_is_deterministic_under_seed(nb):
    a, _ = nb.load_base("tiny", CACHE_DIR, CPU, torch.float32, seed=3)
    b, _ = nb.load_base("tiny", CACHE_DIR, CPU, torch.float32, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_dtype_policy(monkeypatch):
    assert config.resolve_dtype("auto", CPU) == torch.float32
    monkeypatch.setattr(config, "cpu_has_bf16", lambda *a, **k: False)
    assert config.resolve_dtype("auto", CPU) == torch.float32  # a CPU without native bf16: today's fp32 path
    assert config.resolve_dtype("float32", CPU) == torch.float32
    monkeypatch.setattr(config, "cpu_has_bf16", lambda *a, **k: True)
    assert config.resolve_dtype("auto", CPU) == torch.float32  # avx512_bf16 / AMX: bf16 is opt-in until measured
    assert config.resolve_dtype("bfloat16", CPU) == torch.bfloat16
    assert config.resolve_dtype("float32", CPU) == torch.float32  # an explicit dtype always wins
    assert config.resolve_dtype("auto", torch.device("meta")) == torch.float32  # not a CPU: never bf16 from cpuinfo
    assert config.resolve_dtype("bfloat16", CPU) == torch.bfloat16
    assert config.resolve_device("cpu") == CPU
    with pytest.raises(ValueError, match=r"DTYPE='nonsense'.*'auto'.*'bfloat16'"):  # issue 35 item 8: not AttributeError
        config.resolve_dtype("nonsense", CPU)


CPUINFO_X86 = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512bw {extra} avx512_vnni
bugs\t\t: spectre_v1
"""


@pytest.mark.parametrize("extra, expected", [("avx512_bf16", True), ("amx_bf16 amx_tile", True), ("", False),
                                             ("avx512_bf16x", False)])
def test_cpu_has_bf16_reads_the_cpuinfo_flags(tmp_path, extra, expected):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO_X86.format(extra=extra))
    assert config.cpu_has_bf16(info) is expected


def test_cpu_has_bf16_never_crashes_without_flags(tmp_path):
    assert config.cpu_has_bf16(tmp_path / "missing") is False  # macOS / Windows: no /proc/cpuinfo
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")  # no x86 flags line
    assert config.cpu_has_bf16(arm) is False
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe flags : avx512_bf16\n")
    assert config.cpu_has_bf16(binary) is False  # the key is not 'flags' once garbage precedes it
    assert config.cpu_has_bf16(tmp_path) is False  # a folder, not a file


def test_lora_wraps_the_intended_modules(tiny_lora, cfg):
    model, _ = tiny_lora
    wrapped = {re.sub(r".*\.", "", n.rsplit(".lora_A", 1)[0]) for n, _ in model.named_modules() if n.endswith("lora_A")}
    assert wrapped == set(cfg.LORA_TARGETS)
    layers = model.base_model.model.config.num_hidden_layers
    count = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
    assert count == layers * len(cfg.LORA_TARGETS)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_starts_at_base_and_disabling_restores_it(tiny_lora):
    model, tokenizer = tiny_lora
    ids = tokenizer(["Define 'harbour' in one sentence."], return_tensors="pt")
    with torch.no_grad(), model.disable_adapter():
        base = model(**ids).logits
    with torch.no_grad():
        start = model(**ids).logits
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if "lora_B" in n)
    assert torch.equal(start, base)
    perturb_lora_b(model)
    with torch.no_grad():
        adapted = model(**ids).logits
        with model.disable_adapter():
            disabled = model(**ids).logits
    assert (adapted - base).abs().max() > 1e-3
    assert torch.equal(disabled, base)


def test_missing_local_folder_fails_clearly(nb, tmp_path):
    with pytest.raises(OSError):
        nb.load_base(str(tmp_path / "no-such-model"), CACHE_DIR, CPU, torch.float32)


@pytest.mark.slow
def test_packaged_smollm2_answers_in_english(nb):
    model, tokenizer = nb.load_base("packaged", CACHE_DIR, CPU, torch.float32)
    assert model.config.num_hidden_layers == 30 and "quantization_config" not in model.config.to_dict()
    prompt = nb.chat_prompt(tokenizer, "What is the capital of France?")
    ids = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    words = re.findall(r"[A-Za-z]+", answer)
    assert len(words) >= 3, answer
    assert "Paris" in answer, answer


def closed_local_port() -> int:
    """A local TCP port with nothing listening (connections are refused at once)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_hub(monkeypatch):
    """The model hub made unreachable: huggingface_hub's endpoint points at a closed local port."""
    from huggingface_hub import constants
    url = f"http://127.0.0.1:{closed_local_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    return url


def test_hub_id_without_a_network_fails_fast_naming_packaged(nb, no_hub):
    import time
    t0 = time.time()
    with pytest.raises(ConnectionError, match='"packaged"') as err:
        nb.load_base("rlft-tests/no-such-model-anywhere", CACHE_DIR, CPU, torch.float32)
    assert time.time() - t0 < 10 and "cannot be reached" in str(err.value)


def test_a_silent_network_times_out_within_the_probe_timeout(nb, no_hub, monkeypatch):
    """Packets dropped (no refusal): the connect probe itself gives up after its timeout, it does not hang."""
    import socket
    import time
    calls = []

    def silent(address, timeout=None, *args, **kwargs):
        calls.append(timeout)
        time.sleep(min(timeout, 5))
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", silent)
    t0 = time.time()
    with pytest.raises(ConnectionError, match="packaged"):
        nb.load_base("rlft-tests/no-such-model-anywhere", CACHE_DIR, CPU, torch.float32)
    assert calls and all(0 < t <= 5 for t in calls) and time.time() - t0 < 10


def test_a_hub_that_accepts_but_never_answers_fails_fast_naming_the_model(nb, no_hub, monkeypatch):
    """Issue 35 item 7: the connection opens (the kernel accepts it into the listen backlog) but no byte ever comes
    back. The whole metadata request is bounded: a ConnectionError naming the model id and "packaged" comes within
    the bound, never a hang (the load runs in a thread here so that the old behaviour fails instead of hanging)."""
    import socket
    import threading
    import time
    from huggingface_hub import constants
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)  # never accept()ed, never answered
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 2)
        monkeypatch.setenv("HF_ENDPOINT", url)
        result = {}

        def load():
            try:
                nb.load_base("rlft-tests/silent-hub-model", CACHE_DIR, CPU, torch.float32)
            except Exception as e:  # the test inspects whatever it raises
                result["error"] = e

        t0 = time.time()
        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        worker.join(30)
        assert not worker.is_alive(), "load_base hung on a hub that never answers"
    err = result.get("error")
    assert isinstance(err, ConnectionError), repr(err)
    assert "rlft-tests/silent-hub-model" in str(err) and '"packaged"' in str(err) and "local folder" in str(err)
    assert time.time() - t0 < 15


def test_a_local_folder_needs_no_hub(nb, no_hub, tmp_path, monkeypatch):
    import socket
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed the hub for a local folder"))
    assert assets.hub_load_kwargs(str(tmp_path)) == {}


# ---------------------------------------------------------------- the bf16 base (DTYPE="bfloat16", issue 18)
def bf16_policy(nb, cfg):
    model, tokenizer = nb.load_base("tiny", CACHE_DIR, CPU, nb.resolve_dtype("bfloat16", CPU), seed=0)
    lora = nb.add_lora(model, cfg.LORA_R, cfg.LORA_ALPHA, cfg.LORA_DROPOUT, cfg.LORA_TARGETS)
    return perturb_lora_b(lora), tokenizer


def test_bf16_base_keeps_lora_and_value_head_fp32(nb, cfg, one_thread):
    lora, tokenizer = bf16_policy(nb, cfg)
    trainable = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    frozen = [p for p in lora.parameters() if not p.requires_grad]
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)  # the base really is stored in bf16
    state = nb.make_ppo_state(lora, tokenizer, unit_cfg(PPO_BATCH_SIZE=4, PPO_MINIBATCH_SIZE=2, MAX_NEW_TOKENS=4))
    assert all(p.dtype == torch.float32 for p in state.value_head.parameters())
    gen = nb.generate(lora, tokenizer, [nb.chat_prompt(tokenizer, "Hi"), nb.chat_prompt(tokenizer, "Name a fruit.")],
                      max_new_tokens=5, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert gen.logprobs.dtype == torch.float32
    with torch.no_grad():
        out = nb.policy_logprobs(lora, state.value_head, gen.sequences, gen.attention_mask, gen.prompt_len, 1.0)
    assert out.logprobs.dtype == out.entropy.dtype == out.values.dtype == torch.float32
    mask = gen.response_mask.bool()
    assert torch.isfinite(out.logprobs[mask]).all() and (out.logprobs[mask] <= 0).all()


def test_bf16_sft_step_and_ppo_iteration_are_finite_with_fp32_grads(nb, cfg, one_thread):
    lora, tokenizer = bf16_policy(nb, cfg)
    state = nb.make_ppo_state(lora, tokenizer, unit_cfg(PPO_BATCH_SIZE=4, PPO_MINIBATCH_SIZE=2, PPO_EPOCHS=1,
                                                                     MAX_NEW_TOKENS=4))
    ids, mask, labels = nb.sft_batch(tokenizer, [{"prompt": "Hi", "reference": "Hello there."},
                                                 {"prompt": "Name a fruit.", "reference": "An apple."}], CPU)
    with nb.autocast_for(state):
        logits = lora(input_ids=ids, attention_mask=mask).logits
    valid = (labels[:, 1:] != -100).float()
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    loss = -(logp * valid).sum() / valid.sum()
    loss.backward()
    grads = [p.grad for p in state.trainable_parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    lora.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in state.trainable_parameters()]
    prompts = ["Hi", "Name a fruit.", "Say hello.", "Count to three."]
    stats = nb.ppo_iteration(state, prompts, [""] * 4, lambda p, r, refs: torch.arange(len(r), dtype=torch.float32))
    assert stats["skipped"] == 0.0
    assert all(math.isfinite(stats[k]) for k in ("policy_loss", "value_loss", "entropy", "approx_kl"))
    after = list(state.trainable_parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the update moved LoRA / the value head


def test_common_cell_sets_passive_omp_waiting_before_torch_loads():
    """rlft_support.config sets OMP_WAIT_POLICY=PASSIVE by default (idle threads sleep, issue 18) before it imports
    torch, and leaves a user's own setting alone; the notebook imports it before its first torch import. Run in
    fresh interpreters: the variable only acts before torch is first imported."""
    import json
    import os
    import subprocess
    import sys

    import nbformat
    from nbimport import ROOT
    probe = (ROOT / "rlft_support" / "config.py").read_text().split("import numpy as np")[0] \
        + "\nimport sys, json; print(json.dumps([os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules]))"
    for preset, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if preset:
            env["OMP_WAIT_POLICY"] = preset
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == [expected, False]  # set while torch is not yet loaded
    code = "\n".join(c.source for c in nbformat.read(ROOT / "rlft.ipynb", as_version=4).cells if c.cell_type == "code")
    first_torch = re.search(r"^\s*(import torch|from torch)\b", code, re.M).start()
    assert 0 <= code.find("from rlft_support.config import") < first_torch


def test_all_linear_targets_wrap_every_linear_layer_but_the_head(nb):
    """LORA_TARGETS = "all-linear" (for architectures whose module names differ from Llama's): peft wraps every
    linear layer except the output head; on the tiny Llama that is exactly the seven default names."""
    base, _ = nb.load_base("tiny", CACHE_DIR, CPU, torch.float32, seed=0)
    lora = nb.add_lora(base, 4, 8, 0.0, "all-linear")
    wrapped = {name.rsplit(".", 1)[-1] for name, m in lora.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in name and p.requires_grad for name, p in lora.named_parameters())


def test_lora_targets_that_match_nothing_are_refused(nb):
    base, _ = nb.load_base("tiny", CACHE_DIR, CPU, torch.float32, seed=0)
    with pytest.raises(ValueError, match="not_a_module"):
        nb.add_lora(base, 4, 8, 0.0, ["not_a_module"])


def test_bf16_passes_benchmark_smoke_run(tmp_path):
    """benchmarks/bf16_passes.py on the tiny model: every arm and pass timed, the JSON and table written."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "bf16p"
    subprocess.run([sys.executable, str(root / "benchmarks" / "bf16_passes.py"), "--params",
                    str(root / "tests" / "tiny_params.json"), "--runs", "1", "--threads", "1", "--batch", "2",
                    "--prompt-len", "5", "--response-len", "6", "--chunks", "4", "--out", str(out)],
                   check=True, cwd=root, timeout=300, capture_output=True)
    r = json.loads(out.with_suffix(".json").read_text())
    assert set(r["arms"]) == {"fp32", "bf16", "bf16_autocast"}
    for arm in r["arms"].values():
        assert set(arm) == {"policy_logprobs_chunk4", "whole_logits"}
        assert all(v["fwd_s"] > 0 and v["fwdbwd_s"] > 0 and len(v["fwd_runs"]) == 1 for v in arm.values())
    assert "| policy_logprobs_chunk4 |" in out.with_suffix(".md").read_text()


def test_load_policy_is_load_base_then_a_fresh_lora_of_the_config(nb, cfg):
    """load_policy(cfg, device): MODEL in DTYPE, wrapped in the LORA_* adapter, equal to the base at the start."""
    tiny_cfg = dataclasses.replace(cfg, MODEL="tiny", DTYPE="auto", LORA_R=4, LORA_ALPHA=8, LORA_TARGETS=["q_proj", "v_proj"])
    model, tok = nb.load_policy(tiny_cfg, CPU)
    base, _ = nb.load_base("tiny", CACHE_DIR, CPU, torch.float32, seed=tiny_cfg.SEED)
    assert isinstance(model, nb.PeftModel) and tok.padding_side == "left"
    lora = model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, set(lora.target_modules)) == (4, 8, {"q_proj", "v_proj"})
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)  # B = 0: exactly the base
