"""Take the tuned model out: `merged` (the LoRA merged into the base, a plain Hugging Face folder that loads with
AutoModelForCausalLM / AutoTokenizer and no peft) and `gguf` (that merged model as one GGUF file for llama.cpp,
Ollama or LM Studio, f16 or Q8_0, with an Ollama `Modelfile` beside it). `export_model` does both; the command line
(`python -m rlft_support.export ADAPTER`, `make export`) does it for any saved adapter folder.

GGUF: where the base came from the packaged SmolLM2 GGUF, that file's own metadata and tokenizer are carried over
and only the tensors and the file type change; otherwise the metadata is written from the Hugging Face config and
tokenizer (Llama-architecture models with a byte-level BPE tokenizer). llama.cpp stores Llama's q_proj / k_proj rows
in another order than Hugging Face (rotary halves interleaved per head): `permute_qk` writes them its way, and
transformers' GGUF loader undoes it on reading."""
from __future__ import annotations

import argparse, copy, json, os, sys
from pathlib import Path

import numpy as np
import torch

from rlft_support.config import EXPORT_KINDS
from rlft_support.runs import save_atomically

GGUF_TYPES = {"gguf": "f16", "gguf-q8_0": "q8_0"}  # export kind -> tensor type of the 2-D weights
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM (Llama 2/3, SmolLM/SmolLM2, TinyLlama, ...)"}
PRE_TOKENIZERS = {  # llama.cpp's name for a Hugging Face byte-level pre-tokenizer, recognised by its regex / digits
    "smollm": lambda pre: '"individual_digits":true' in pre and '"ByteLevel"' in pre,
    "llama-bpe": lambda pre: "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in pre,
    "gpt-2": lambda pre: pre.startswith('{"type":"ByteLevel"') and '"use_regex":true' in pre,
}


class ExportError(ValueError):
    """A model or tokenizer this exporter cannot write; the message says what is supported."""


def merged_model(model):
    """A plain transformers model with the LoRA folded into its weights (W + alpha/r B A): a merged COPY of a
    PeftModel (the adapter model itself is left as it is), or `model` itself when it has no adapter."""
    if not hasattr(model, "merge_and_unload"):
        return model
    return copy.deepcopy(model).merge_and_unload().eval()


def save_merged(plain, tokenizer, out: str | Path) -> Path:
    """save_pretrained of the merged model (safetensors) with its tokenizer and chat template, atomically."""
    return save_atomically(Path(out), lambda tmp: (plain.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))


def check_architecture(config) -> str:
    """The GGUF architecture name of a transformers config; ExportError naming the supported ones otherwise."""
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_ARCHITECTURES:
        supported = "; ".join(f"{k!r}: {v}" for k, v in SUPPORTED_ARCHITECTURES.items())
        raise ExportError(f"GGUF export of model_type {kind!r} ({', '.join(getattr(config, 'architectures', None) or [])})"
                          f" is not supported; supported: {supported}. The 'merged' export works for any model.")
    scaling = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if scaling.get("rope_type", "default") != "default":
        raise ExportError(f"GGUF export: rope scaling {scaling.get('rope_type')!r} is not supported (plain RoPE only)")
    return "llama"


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """[out, in] q_proj / k_proj rows, Hugging Face order -> llama.cpp order (n_head = heads of that projection):
    per head, the two rotary halves [h, 2, d/2] become interleaved pairs [h, d/2, 2] (convert_hf_to_gguf's permute)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensors(plain, tensor_type: str):
    """Yield (GGUF name, numpy array, GGML type or None) for every weight of a Llama `plain` model: 1-D tensors
    (norms) f32, 2-D ones f16 or Q8_0 (f16 where a row does not split into 32-value blocks); lm_head left out when
    tied to the embedding (the loader then ties it back)."""
    import gguf
    config = plain.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for hf_name, tensor in plain.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"GGUF export: no llama.cpp name for the tensor {hf_name!r}")
        data = tensor.detach().to("cpu", torch.float32).numpy()
        proj = hf_name.split(".")[-2]
        if proj in heads and data.ndim == 2:
            data = permute_qk(data, heads[proj])
        if data.ndim == 1:
            yield name, data, None
        elif tensor_type == "q8_0" and data.shape[-1] % 32 == 0:
            yield name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        else:
            yield name, data.astype(np.float16), None


def bpe_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, llama.cpp token types, merges 'a b') of a byte-level BPE tokenizer, padded to vocab_size."""
    import gguf
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if state["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(state.get("decoder")):
        raise ExportError("GGUF export writes byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, ...); this "
                          f"tokenizer is {state['model']['type']} ({type(tokenizer).__name__}). Export 'merged' and "
                          "convert it with llama.cpp's convert_hf_to_gguf.py instead.")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(max(vocab_size, len(by_id))):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        kind = ("UNUSED" if i not in by_id else "NORMAL" if i not in added
                else "CONTROL" if added[i].special else "USER_DEFINED")
        types.append(int(getattr(gguf.TokenType, kind)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    return tokens, types, merges


def hf_metadata(writer, config, tokenizer) -> None:
    """The llama.* hyper-parameters and tokenizer.* fields of a GGUF, from a transformers config and tokenizer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(Path(str(getattr(config, "_name_or_path", "") or "model")).name + " (rlft, LoRA merged)")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    tokens, types, merges = bpe_vocab(tokenizer, config.vocab_size)
    pre = json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer"), separators=(",", ":"))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(next((name for name, match in PRE_TOKENIZERS.items() if match(pre)), "default"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(ids) and ids[0] == tokenizer.bos_token_id)
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


CARRY_SKIP = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version")


def carried_metadata(writer, source: str | Path, config) -> None:
    """Copy every metadata field of the GGUF `source` (the packaged base) but the file type and the header; an
    ExportError when its shapes do not describe `config` (another model's file)."""
    import gguf
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    expect = {"block_count": config.num_hidden_layers, "embedding_length": config.hidden_size,
              "attention.head_count": config.num_attention_heads}
    for key, value in expect.items():
        if reader.fields[f"{arch}.{key}"].contents() != value:
            raise ExportError(f"{source}: {arch}.{key} = {reader.fields[f'{arch}.{key}'].contents()}, but the "
                              f"model has {value}: that GGUF is not this model's base")
    for key, field in reader.fields.items():
        if key.startswith(CARRY_SKIP):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)


def write_gguf(plain, tokenizer, path: str | Path, tensor_type: str = "f16", source_gguf: str | Path | None = None):
    """Write the merged model `plain` as one GGUF file at `path` (atomically: a .tmp file renamed): 2-D weights in
    `tensor_type` ("f16" | "q8_0"), norms f32; metadata carried from `source_gguf` or written from the HF config."""
    import gguf
    arch = check_architecture(plain.config)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    if source_gguf is not None:
        carried_metadata(writer, source_gguf, plain.config)
    else:
        hf_metadata(writer, plain.config, tokenizer)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[tensor_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, data, raw_dtype in gguf_tensors(plain, tensor_type):
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path


def chatml_system(tokenizer) -> str | None:
    """The system text the chat template inserts by itself (SmolLM2: 'You are a helpful AI assistant named
    SmolLM, ...'), so Ollama's SYSTEM matches what the model was trained with; None if it inserts none."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    head = "<|im_start|>system\n"
    return text[len(head):text.index("<|im_end|>")] if text.startswith(head) else None


def write_modelfile(gguf_path: str | Path, tokenizer) -> Path:
    """An Ollama Modelfile beside the GGUF (`ollama create NAME -f Modelfile`): the ChatML template
    (<|im_start|>role\\n...<|im_end|>) when the tokenizer's chat template is ChatML, else FROM alone (Ollama then
    uses the template stored in the GGUF)."""
    gguf_path = Path(gguf_path)
    lines = [f"FROM ./{gguf_path.name}"]
    if "<|im_start|>" in (tokenizer.chat_template or ""):
        lines += ['TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}', '{{ .Content }}<|im_end|>',
                  '{{ end }}<|im_start|>assistant', '"""']
        system = chatml_system(tokenizer)
        if system:
            lines.append(f'SYSTEM """{system}"""')
        lines += ['PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"']
    out = gguf_path.with_name("Modelfile")
    out.write_text("\n".join(lines) + "\n")
    return out


def export_model(model, tokenizer, out_dir: str | Path, formats=("merged", "gguf"), *,
                 source_gguf: str | Path | None = None) -> dict[str, Path]:
    """Export `model` (a PeftModel: merged on a copy; or a plain model) under `out_dir`: "merged" -> merged/,
    "gguf" -> model-f16.gguf, "gguf-q8_0" -> model-q8_0.gguf, and an Ollama Modelfile for the first GGUF. `source_gguf`: the
    GGUF the base came from (its metadata and tokenizer are carried over). Returns {kind: path written}."""
    unknown = [f for f in formats if f not in EXPORT_KINDS]
    if unknown:
        raise ValueError(f"export formats {unknown}: expected some of {EXPORT_KINDS}")
    if not formats:
        return {}
    out_dir, written = Path(out_dir), {}
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = merged_model(model)
    for kind in formats:
        if kind == "merged":
            written[kind] = save_merged(plain, tokenizer, out_dir / "merged")
        else:
            tensor_type = GGUF_TYPES[kind]
            written[kind] = write_gguf(plain, tokenizer, out_dir / f"model-{tensor_type}.gguf", tensor_type,
                                       source_gguf)
    first_gguf = next((written[k] for k in formats if k != "merged"), None)
    if first_gguf is not None:
        written["Modelfile"] = write_modelfile(first_gguf, tokenizer)
    return written


def packaged_gguf_file() -> Path:
    """The packaged SmolLM2 GGUF (the base of MODEL = "packaged")."""
    from rlft_support.assets import PACKAGED_GGUF, packaged_gguf_folder
    return packaged_gguf_folder() / PACKAGED_GGUF


def base_of_adapter(adapter: Path, cache_dir: str) -> str:
    """MODEL of a saved adapter, from its adapter_config.json: "packaged" when its base is the converted packaged
    folder under `cache_dir`, else that folder or hub id; a ValueError when it records none (MODEL = "tiny")."""
    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter}/adapter_config.json names no base model (trained with MODEL='tiny'?): "
                         "pass --model (packaged, tiny, a folder or a hub id)")
    packaged = Path(cache_dir).expanduser() / "smollm2-135m-instruct"
    return "packaged" if Path(base).expanduser() == packaged else base


def load_adapter_model(adapter: Path, model: str, cache_dir: str, seed: int = 0):
    """(PeftModel on CPU fp32, tokenizer) of a saved adapter over its base `model` (as the notebook's MODEL)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from rlft_support.assets import packaged_tokenizer, resolve_model, tiny_llama
    if model == "tiny":
        tokenizer = packaged_tokenizer(cache_dir)
        base = tiny_llama(tokenizer, seed)
    else:
        path, hub = resolve_model(model, cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(path, **hub)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **hub)
    return PeftModel.from_pretrained(base, str(adapter)).eval(), tokenizer


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """`python -m rlft_support.export ADAPTER [--formats merged,gguf] [--model M] [--out DIR]` (`make export`)."""
    from rlft_support.demo import find_adapter
    p = argparse.ArgumentParser(description="Export a saved LoRA adapter: merged HF folder and/or GGUF.")
    p.add_argument("adapter", nargs="?", default="", help="adapter or run folder (default: the newest under runs/)")
    p.add_argument("--formats", default="merged,gguf", help=f"comma-separated, some of {EXPORT_KINDS}")
    p.add_argument("--model", default="", help="the base MODEL (default: the one adapter_config.json names)")
    p.add_argument("--out", default="", help="output folder (default: the adapter's run folder)")
    p.add_argument("--cache-dir", default="~/.cache/rlft")
    p.add_argument("--seed", type=int, default=0, help="MODEL='tiny' only: its seed")
    a = p.parse_args(argv)
    adapter = find_adapter(a.adapter or "runs")
    if adapter is None:
        raise SystemExit(f"no saved adapter (adapter_config.json) under {a.adapter or 'runs'!r}")
    model_name = a.model or base_of_adapter(adapter, a.cache_dir)
    model, tokenizer = load_adapter_model(adapter, model_name, a.cache_dir, a.seed)
    out = Path(a.out) if a.out else (adapter.parent if adapter.name == "adapter" else adapter)
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    written = export_model(model, tokenizer, out, formats,
                           source_gguf=packaged_gguf_file() if model_name == "packaged" else None)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return written


if __name__ == "__main__":
    sys.exit(main() and 0)
