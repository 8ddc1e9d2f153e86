"""Hugging Face plumbing shared by the decoding modules: the model inside wrappers, its device
and vocabulary, generate's position ids, the cache argument and layers across transformers
versions, eos ids, and the split into model body and output layer."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Optional

import torch


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside DDP / DeepSpeed engines and torch.compile wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module):
            model = inner
            continue
        inner = getattr(model, "module", None)
        if isinstance(inner, torch.nn.Module) and not hasattr(model, "generate"):
            model = inner
            continue
        break
    return model


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def vocab_size(model: torch.nn.Module) -> int:
    return int(model.get_input_embeddings().num_embeddings)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as generate builds them for left-padded prompts: count of real tokens before,
    pads at 1."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5 renames ``past_key_values`` to ``cache``; accept both."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def get_cache(out) -> Any:
    """The key/value cache of a model output, under either name (see :func:`cache_kwarg`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def eos_ids(model: torch.nn.Module) -> list[int]:
    """The model's eos token ids (generation config first, then model config; may be empty)."""
    cfg = getattr(model, "generation_config", None)
    eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def cache_layers(cache) -> Optional[list[tuple[torch.Tensor, torch.Tensor]]]:
    """(keys, values) per layer, each (B, heads, L, head_dim), or None when the cache is not a
    plain per-layer key/value cache we can slice."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    out = []
    for layer in layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor) or keys.dim() != 4:
            return None
        if getattr(layer, "is_sliding", False):
            return None  # a sliding cache may have dropped early positions
        out.append((keys, values))
    return out


# Architectures whose causal-LM logits are exactly ``lm_head(last_hidden_state)``. For them the
# decoding modules run the model body, then the output layer tile by tile (:mod:`.head`), so
# the batch x length x vocabulary logits never exist in memory. Any other model goes through
# its own forward.
_PLAIN_HEAD_TYPES = {"gpt_neo", "gpt2", "gptj", "gpt_neox", "opt", "llama", "mistral", "qwen2"}


def body_and_head(model: torch.nn.Module) -> Optional[tuple[torch.nn.Module, torch.nn.Linear]]:
    """(model body, output layer) when the logits are ``head(body(...).last_hidden_state)``,
    else None."""
    if getattr(model.config, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    head = model.get_output_embeddings()
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(head, torch.nn.Linear) or not isinstance(body, torch.nn.Module) or body is model:
        return None
    return body, head


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module):
    """Eval mode (no dropout) for ``models`` (e.g. a wrapper and the model inside it, each once)
    for the block; their training modes restored after."""
    modes = [(m, m.training) for m in {id(m): m for m in models}.values()]
    for m, _ in modes:
        m.eval()
    try:
        yield
    finally:
        for m, was_training in modes:
            m.train(was_training)
