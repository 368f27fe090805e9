"""Take the model out (rlft_support/export.py): the merged Hugging Face folder loads with plain transformers (no
peft) and answers like the adapter; the GGUF loads back through transformers' GGUF loader with the f16 weights and
the same greedy tokens; Q8_0; the Modelfile; the command line; a clear error for an unsupported architecture."""
import inspect
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import CACHE_DIR, CPU, ROOT, perturb_lora_b, notebook_config
from rlft_support import export

PROMPTS = ["What is the capital of France?", "Name a colour."]


def greedy(model, tokenizer, prompt: str, n: int = 12) -> list[int]:
    """The greedy continuation (token ids) of one chat-rendered prompt, by transformers' generate."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def f16_rounded(model):
    """`model` with every 2-D weight rounded through float16, as the f16 GGUF stores it (norms stay fp32)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
    return model


@pytest.fixture
def tuned(tiny_lora, one_thread):
    """The tiny model with a LoRA whose B matrices are random (so the adapter changes its answers)."""
    lora, tokenizer = tiny_lora
    perturb_lora_b(lora, std=0.5, seed=1)
    return lora.eval(), tokenizer


def test_merged_folder_loads_without_peft_and_answers_like_the_adapter(tuned, tmp_path):
    lora, tokenizer = tuned
    with lora.disable_adapter():
        base_tokens = [greedy(lora, tokenizer, p) for p in PROMPTS]
    adapter_tokens = [greedy(lora, tokenizer, p) for p in PROMPTS]
    assert adapter_tokens != base_tokens  # the adapter is not a no-op
    written = export.export_model(lora, tokenizer, tmp_path, ["merged"])
    assert written == {"merged": tmp_path / "merged"} and hasattr(lora, "peft_config")  # merged on a copy
    script = f"""
import json, sys, torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, AutoTokenizer
{inspect.getsource(greedy)}
model = AutoModelForCausalLM.from_pretrained({str(written['merged'])!r}, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained({str(written['merged'])!r})
assert "peft" not in sys.modules, "loading the merged folder imported peft"
print(json.dumps([greedy(model, tokenizer, p) for p in {PROMPTS!r}]))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == adapter_tokens
    assert "<|im_start|>" in (written["merged"] / "chat_template.jinja").read_text()


def test_gguf_loads_back_through_transformers_with_the_same_greedy_tokens(tuned, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    lora, tokenizer = tuned
    written = export.export_model(lora, tokenizer, tmp_path, ["gguf"])
    assert set(written) == {"gguf", "Modelfile"} and written["gguf"].name == "model-f16.gguf"
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model-f16.gguf", dtype=torch.float32).eval()
    expected = f16_rounded(export.merged_model(lora))
    want, got = expected.state_dict(), back.state_dict()
    assert set(got) == set(want)
    for name in want:  # every tensor, the permuted q/k included, exactly the merged weights at f16
        assert torch.equal(got[name], want[name]), name
    assert [greedy(back, tokenizer, p) for p in PROMPTS] == [greedy(expected, tokenizer, p) for p in PROMPTS]
    # the tokenizer written from the HF tokenizer reads back as the same tokenizer
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model-f16.gguf")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello, 123 wörld!"}], tokenize=False)
    assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    modelfile = written["Modelfile"].read_text()
    assert modelfile.startswith("FROM ./model-f16.gguf\n") and "<|im_start|>{{ .Role }}" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_q8_0_gguf_is_smaller_and_close(tuned, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM
    lora, tokenizer = tuned
    written = export.export_model(lora, tokenizer, tmp_path, ["gguf", "gguf-q8_0"])
    assert written["Modelfile"].read_text().startswith("FROM ./model-f16.gguf\n")  # the first GGUF
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(written["gguf-q8_0"])).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
    assert written["gguf-q8_0"].stat().st_size < 0.7 * written["gguf"].stat().st_size
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model-q8_0.gguf", dtype=torch.float32)
    for name, w in export.merged_model(lora).state_dict().items():
        err = (back.state_dict()[name] - w).abs().max().item()
        assert err <= w.abs().max().item() / 127 + 1e-6, name  # Q8_0: at most half a step of a 32-value block


def test_qk_permutation_is_what_transformers_reverses():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)  # 3 heads of 4 rows (GQA: k has fewer heads than q)
    permuted = export.permute_qk(w, 3)
    assert not np.array_equal(permuted, w)
    proc = LlamaTensorProcessor({"num_attention_heads": 6, "num_key_value_heads": 3})
    assert np.array_equal(proc.process(permuted, "blk.0.attn_k.weight").weights, w)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
    with pytest.raises(export.ExportError, match=r"'gpt2'.*not supported.*LlamaForCausalLM.*'merged'"):
        export.write_gguf(model, None, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_cli_exports_a_saved_adapter_beside_it(tuned, tmp_path, capsys):
    lora, tokenizer = tuned
    adapter = tmp_path / "run" / "adapter"
    lora.save_pretrained(adapter)
    with pytest.raises(ValueError, match="--model"):  # the tiny model's adapter records no base model
        export.main([str(adapter), "--formats", "gguf", "--cache-dir", CACHE_DIR])
    written = export.main([str(tmp_path / "run"), "--model", "tiny", "--formats", "merged,gguf-q8_0",
                           "--cache-dir", CACHE_DIR])
    assert written["merged"] == tmp_path / "run" / "merged" and (tmp_path / "run" / "model-q8_0.gguf").is_file()
    assert "model-q8_0.gguf" in capsys.readouterr().out
    config = json.loads((adapter / "adapter_config.json").read_text())
    for base, model in ((f"{CACHE_DIR}/smollm2-135m-instruct", "packaged"), ("org/some-llama", "org/some-llama")):
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))
        assert export.base_of_adapter(adapter, CACHE_DIR) == model
    with pytest.raises(ValueError, match="export formats"):
        export.export_model(lora, tokenizer, tmp_path, ["zip"])


def test_export_formats_knob_is_checked():
    assert list(notebook_config(ROOT / "rlft.ipynb").EXPORT_FORMATS) == ["merged", "gguf"]
    assert notebook_config(ROOT / "rlft.ipynb", EXPORT_FORMATS=[]).EXPORT_FORMATS == []
    with pytest.raises(ValueError, match="EXPORT_FORMATS"):
        notebook_config(ROOT / "rlft.ipynb", EXPORT_FORMATS=["gguf", "zip"])


@pytest.mark.slow
def test_packaged_smollm2_exports_merged_and_gguf_with_its_own_metadata(nb, tmp_path, one_thread):
    import gguf
    from transformers import AutoModelForCausalLM
    base, tokenizer = nb.load_base("packaged", CACHE_DIR, CPU, torch.float32)
    lora = perturb_lora_b(nb.add_lora(base, 8, 16, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"]), std=0.02)
    with lora.disable_adapter():
        base_tokens = [greedy(lora, tokenizer, p) for p in PROMPTS]
    adapter_tokens = [greedy(lora, tokenizer, p) for p in PROMPTS]
    assert adapter_tokens != base_tokens
    source = export.packaged_gguf_file()
    written = export.export_model(lora, tokenizer, tmp_path, ["merged", "gguf"], source_gguf=source)
    merged = AutoModelForCausalLM.from_pretrained(written["merged"], dtype=torch.float32).eval()
    assert [greedy(merged, tokenizer, p) for p in PROMPTS] == adapter_tokens
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model-f16.gguf", dtype=torch.float32).eval()
    assert [greedy(back, tokenizer, p) for p in PROMPTS] == [greedy(f16_rounded(merged), tokenizer, p)
                                                            for p in PROMPTS]
    old, new = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(written["gguf"]))
    for key in ("general.name", "tokenizer.ggml.pre", "tokenizer.chat_template", "llama.rope.freq_base"):
        assert new.fields[key].contents() == old.fields[key].contents(), key
    assert new.fields["tokenizer.ggml.tokens"].contents() == old.fields["tokenizer.ggml.tokens"].contents()
    assert new.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    assert [t.name for t in new.tensors] and {t.name for t in new.tensors} == {t.name for t in old.tensors}
