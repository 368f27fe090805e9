"""Opt-in speed for sampling and log-probs, each exact up to rounding: LoRA merged into the base weights while
sampling (`merged_adapter`, generate(merged=True)), the decode step through torch.compile on a static KV cache
(`make_cache`, generate(compiled=True)), and the output head on a flat 2-D input (`flat_head`)."""
from __future__ import annotations

import contextlib

import torch
from transformers import DynamicCache, StaticCache


def mergeable_lora_layers(model) -> list:
    """The plain LoRA linear layers of `model` whose adapter is active (not disabled, not already merged); [] when
    there are none, or when any layer is of a kind whose update is not W + (alpha/r)·B·A (DoRA, other layer types),
    so that such a model is simply sampled with its adapter attached."""
    from peft.tuners.lora import Linear as LoraLinear, LoraLayer
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and not m.disable_adapters and not m.merged]
    plain = all(type(m) is LoraLinear and not m.fan_in_fan_out and not any(m.use_dora.get(a, False) for a in
                m.active_adapters) and not any(a in getattr(m, "lora_variant", {}) for a in m.active_adapters)
                for m in layers)
    return layers if plain else []


def merged_weight(layer) -> torch.Tensor:
    """W + Σ (alpha/r)·B·A over the layer's active adapters -> a NEW tensor [d_out, d_in] in W's dtype (one fused
    fp32 addmm per adapter: W itself is never written). layer: a plain peft LoRA Linear (`mergeable_lora_layers`)."""
    weight = layer.get_base_layer().weight
    merged = None
    for name in (a for a in layer.active_adapters if a in layer.lora_A):
        up, down = layer.lora_B[name].weight.float(), layer.lora_A[name].weight.float()  # B [d_out, r], A [r, d_in]
        merged = torch.addmm(weight.float() if merged is None else merged, up, down, alpha=layer.scaling[name])
    return weight if merged is None else merged.to(weight.dtype)


@contextlib.contextmanager
def merged_adapter(model):
    """Inside the block the LoRA update is folded into the base weights, W' = W + (alpha/r)·B·A (in fp32, stored
    in W's dtype), and those layers skip their adapter branch, so a forward pass costs what the base model's
    costs. On exit the ORIGINAL weight tensors are put back (the same storage, so the restore is bitwise exact,
    also in bf16 — unlike subtracting the update again) and the adapter is switched back on. A model without
    (plain) LoRA layers is left untouched. For sampling only (no_grad); it holds one merged copy of the adapted
    weights meanwhile (SmolLM2-135M, fp32: ~0.4 GB)."""
    layers, saved = mergeable_lora_layers(model), []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.get_base_layer().weight
                saved.append((layer, weight, weight.data, layer._disable_adapters))
                weight.data = merged_weight(layer)
                layer._disable_adapters = True  # the update is in W now; the flag alone, requires_grad untouched
        yield model
    finally:
        for layer, weight, original, flag in reversed(saved):
            weight.data = original
            layer._disable_adapters = flag


def decode_forward(net, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
    """One decode step of the compiled path: tokens [B, 1] long (the newest token of each row), positions [B, 1]
    long, mask [B, S] long (the real mask so far, this token included; the model pads it with 0 to the cache's
    width), cache: a `StaticCache`. Returns logits [B, 1, V] (the model's dtype) of the new position."""
    return net(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
               logits_to_keep=1).logits


_COMPILED_DECODE = {}


def compiled_decode_forward():
    """`decode_forward` under `torch.compile` (inductor; built once per process, compiled lazily on the first call).
    dynamic=True: the batch size (>1; batch 1 gets its own graph), the mask width and the cache length are
    symbolic, so new prompt lengths, new batch sizes and rows leaving the batch do not recompile. Guards that do
    recompile once each: merged vs attached vs disabled adapter, grad vs no-grad/inference mode, dtype."""
    if "fn" not in _COMPILED_DECODE:
        _COMPILED_DECODE["fn"] = torch.compile(decode_forward, dynamic=True)
    return _COMPILED_DECODE["fn"]


def select_cache_rows(cache, keep: torch.Tensor) -> None:
    """Keep only rows `keep` [B'] long of a KV cache: DynamicCache's own `batch_select_indices`; a StaticCache's
    layers have none, so their keys/values [B, H, L, D] are indexed here (and marked static again, like the
    tensors they replace, so the compiled step sees the same kind of input)."""
    if not isinstance(cache, StaticCache):
        return cache.batch_select_indices(keep)
    for layer in cache.layers:
        if layer.is_initialized:
            layer.keys, layer.values = layer.keys[keep], layer.values[keep]
            torch._dynamo.mark_static_address(layer.keys)
            torch._dynamo.mark_static_address(layer.values)


def flat_head(head, hidden: torch.Tensor) -> torch.Tensor:
    """head(hidden) for hidden [B, c, H] (often a strided slice) -> logits [B, c, V], the head applied to a 2-D
    [B·c, H] copy. A strided 3-D input makes torch's matmul fall back to a batched matmul over a copy of the
    [V, H] weight, once per call: in bf16 on a CPU that copy cost ~1 s per chunk of 16 positions (SmolLM2, batch
    16; benchmarks/bf16_passes_unfixed.md). The 2-D product reads the weight in place."""
    B, c, H = hidden.shape
    return head(hidden.reshape(B * c, H)).view(B, c, -1)


def make_cache(net, ids: torch.Tensor, max_new_tokens: int, compiled: bool) -> tuple:
    """The KV cache and the decode step of `decode_steps` for prompts ids [B, P] -> (cache, step_fn).
    compiled=False: (a DynamicCache, None: every step eager). compiled=True: (a `StaticCache` of P + max_new_tokens
    slots, `compiled_decode_forward()`: the prefill stays eager, every later step goes through it)."""
    if not compiled:
        return DynamicCache(config=net.config), None
    return StaticCache(config=net.config, max_cache_len=ids.shape[1] + max_new_tokens), compiled_decode_forward()
