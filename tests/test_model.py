"""Section 1: model loading, dtype policy and the LoRA adapter."""
import re

import pytest
import torch

from conftest import CACHE_DIR, CPU, perturb_lora_b


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


def test_dtype_policy(nb):
    assert nb.resolve_dtype("auto", CPU) == torch.float32
    assert nb.resolve_dtype("bfloat16", CPU) == torch.bfloat16
    assert nb.resolve_device("cpu") == CPU


def test_lora_wraps_the_intended_modules(tiny_lora, params):
    model, _ = tiny_lora
    wrapped = {re.sub(r".*\.", "", n.rsplit(".lora_A", 1)[0]) for n, _ in model.named_modules() if n.endswith("lora_A")}
    assert wrapped == set(params["LORA_TARGETS"])
    layers = model.base_model.model.config.num_hidden_layers
    count = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
    assert count == layers * len(params["LORA_TARGETS"])
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


def test_a_local_folder_needs_no_hub(nb, no_hub, tmp_path, monkeypatch):
    import socket
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed the hub for a local folder"))
    assert nb.hub_load_kwargs(str(tmp_path)) == {}
