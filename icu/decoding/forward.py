"""One forward pass as the metrics need it: the greedy token at every position, the key/value
cache, and token losses, through the tiled output layer (:mod:`.head`) where the model allows.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .head import head_argmax
from .hf import body_and_head, cache_kwarg, get_cache, model_device, position_ids_from_mask

CACHE_KW = "__cache__"  # model_step's name for the cache argument, renamed per model


def model_step(model: torch.nn.Module, labels: Optional[torch.Tensor] = None, last_only: bool = False, **kwargs):
    """One forward: (argmax (B, L) or (B,) with ``last_only``, cache or None, token losses (B, L)
    for ``labels`` aligned with the logits (-100 ignored) or None). Pass the cache as
    ``**{CACHE_KW: cache}``: it is renamed to the model's argument."""
    split = body_and_head(model)
    target = model if split is None else split[0]
    if CACHE_KW in kwargs:
        kwargs[cache_kwarg(target)] = kwargs.pop(CACHE_KW)
    if split is None:
        out = model(**kwargs)
        logits = out.logits[:, -1:] if last_only else out.logits
        preds = logits.argmax(-1)
        tok = None
        if labels is not None:
            V = logits.shape[-1]
            tok = torch.nn.functional.cross_entropy(
                logits.reshape(-1, V).float(), labels.reshape(-1), ignore_index=-100, reduction="none"
            ).view(labels.shape)
        cache = get_cache(out) if kwargs.get("use_cache") else None
        return (preds[:, 0] if last_only else preds), cache, tok
    body, head = split
    out = body(**kwargs)
    hidden = out.last_hidden_state
    if last_only:
        hidden = hidden[:, -1:]
    B, L, H = hidden.shape
    preds, tok = head_argmax(hidden.reshape(B * L, H), head, None if labels is None else labels.reshape(-1))
    cache = get_cache(out) if kwargs.get("use_cache") else None
    preds = preds.view(B, L)
    return (preds[:, 0] if last_only else preds), cache, (None if tok is None else tok.view(B, L))


@torch.no_grad()
def teacher_forced_pass(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    labels: Optional[torch.Tensor] = None,
    use_cache: bool = True,
    mask_positions: bool = True,
) -> tuple[torch.Tensor, Any, Optional[torch.Tensor], Optional[float]]:
    """One forward over (left-padded) ids.

    Returns (argmax (B, L), key/value cache or None, per-sample loss (B,) or None, batch loss or
    None); the losses when ``labels`` (aligned with the inputs, -100 ignored) are given.
    ``mask_positions``: position ids from the attention mask, as generate builds them (else the
    model's default 0..L-1, as a training forward - and the reference's loss - uses).
    """
    device = model_device(model)
    attention_mask = attention_mask.to(device)
    kwargs = dict(input_ids=input_ids.to(device), attention_mask=attention_mask, use_cache=use_cache)
    if mask_positions:
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    shifted = None
    if labels is not None:
        shifted = torch.nn.functional.pad(labels.to(device)[:, 1:], (0, 1), value=-100)
    preds, cache, tok = model_step(model, labels=shifted, **kwargs)
    per_sample = loss = None
    if tok is not None:
        per_sample, loss = _reduce_losses(tok, shifted != -100)
    return preds, cache, per_sample, loss


def _reduce_losses(tok: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(per-sample mean token loss (B,) float64 on the CPU, NaN without tokens; mean over all
    valid tokens of the batch) from token losses (B, L) and their mask."""
    n = valid.sum(1)
    tok = tok.masked_fill(~valid, 0.0)
    per_sample = (tok.sum(1) / n.clamp(min=1)).masked_fill(n == 0, float("nan"))
    total = int(n.sum())
    batch = float(tok.sum() / total) if total else float("nan")
    return per_sample.double().cpu(), batch
