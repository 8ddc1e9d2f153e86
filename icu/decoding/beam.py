"""The generation check's beam search: a lean beam search that follows generate's algorithm step
for step but scores the vocabulary tile by tile (:func:`lean_beam_search`), and
:func:`generate_candidates`, which picks it where it reproduces generate (fp32, plain output
layer, no logits processors) and uses ``model.generate`` otherwise.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .head import top_candidates
from .hf import body_and_head, cache_kwarg, cache_layers, eos_ids, get_cache, model_device, position_ids_from_mask
from .kv_cache import preallocated_cache

PROMPT_LENGTH = 50
NEW_TOKENS = 50
NUM_BEAMS = 2

# Generation-config fields that would add a logits processor or a stopping rule that the lean
# beam search below does not implement; any of them set -> Hugging Face's generate is used.
_UNSUPPORTED_GENERATION = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,), "sequence_bias": (None,), "exponential_decay_length_penalty": (None,),
    "renormalize_logits": (None, False), "remove_invalid_values": (None, False), "max_time": (None,),
    "stop_strings": (None,), "diversity_penalty": (None, 0.0), "num_beam_groups": (None, 1),
    "constraints": (None,), "force_words_ids": (None,), "guidance_scale": (None, 1.0),
    "watermarking_config": (None,), "num_return_sequences": (None, 1), "low_memory": (None, False),
}


def _lean_beam_ok(model: torch.nn.Module) -> bool:
    """Whether :func:`lean_beam_search` reproduces generate for this model.

    Only in fp32: with bf16/fp16 logits exact ties between candidates are common, and which of
    two equal candidates a row-wide topk keeps is up to the kernel, so generate decides.
    """
    if body_and_head(model) is None or next(model.parameters()).dtype != torch.float32:
        return False
    cfg = getattr(model, "generation_config", None)
    if cfg is None:
        return True
    return all(getattr(cfg, k, None) in ok for k, ok in _UNSUPPORTED_GENERATION.items())



class _Beams:
    """Beam-search state for B prompts: ``nb`` running hypotheses and the ``nb`` best finished
    ones (B, nb, new_tokens) with their scores, updated as generate (transformers 5) does."""

    def __init__(self, B: int, nb: int, new_tokens: int, fill: int, eos: torch.Tensor,
                 length_penalty: float, early_stopping: Any, device: torch.device):
        self.nb, self.new_tokens, self.eos = nb, new_tokens, eos
        self.length_penalty, self.early_stopping = length_penalty, early_stopping
        self.running = torch.full((B, nb, new_tokens), fill, dtype=torch.long, device=device)
        self.running_scores = torch.zeros((B, nb), dtype=torch.float32, device=device)
        self.running_scores[:, 1:] = -1e9
        self.finished = self.running.clone()
        self.finished_scores = torch.full((B, nb), -1e9, dtype=torch.float32, device=device)
        self.is_finished = torch.zeros((B, nb), dtype=torch.bool, device=device)
        self.unsatisfied = torch.ones((B, 1), dtype=torch.bool, device=device)

    def advance(self, step: int, logp: torch.Tensor, top_i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step from the top K log-probabilities ``logp`` (B, nb, K) of each running beam and
        their token ids ``top_i`` (B*nb, K). Returns (which of the K candidates ended (B, K),
        the running beam each new running beam extends (B, nb))."""
        B, nb, K = logp.shape
        T = self.new_tokens
        logp = logp + self.running_scores[:, :, None]
        scores, flat = logp.view(B, nb * K).topk(K, dim=-1)
        origin = flat // K
        token = top_i.view(B, nb * K).gather(1, flat)
        cand = self.running.gather(1, origin[:, :, None].expand(B, K, T)).clone()
        cand[:, :, step] = token
        hits = torch.isin(token, self.eos) | (step + 1 >= T)
        # running beams for the next step: the best candidates that did not just end
        r_scores = scores + hits.to(torch.float32) * -1e9
        keep = r_scores.topk(nb, dim=-1).indices
        self.running = cand.gather(1, keep[:, :, None].expand(B, nb, T))
        self.running_scores = r_scores.gather(1, keep)
        running_origin = origin.gather(1, keep)
        # finished hypotheses: only the top nb candidates may end here
        did = hits & (torch.arange(K, device=logp.device) < nb)[None, :]
        self._add_finished(step, scores, cand, did)
        return hits, running_origin

    def _add_finished(self, step: int, scores: torch.Tensor, cand: torch.Tensor, did: torch.Tensor) -> None:
        """Merge the candidates that ended (``did``) into the nb best finished hypotheses."""
        B, nb, T = self.finished.shape
        f_scores = scores / float((step + 1) ** self.length_penalty)
        full = self.is_finished.all(-1, keepdim=True) & (self.early_stopping is True)
        f_scores = f_scores + full.to(torch.float32) * -1e9
        f_scores = f_scores + (~self.unsatisfied).to(torch.float32) * -1e9
        f_scores = f_scores + (~did) * -1e9
        m_scores = torch.cat([self.finished_scores, f_scores], 1)
        sel = m_scores.topk(nb, dim=-1).indices
        self.finished = torch.cat([self.finished, cand], 1).gather(1, sel[:, :, None].expand(B, nb, T))
        self.finished_scores = m_scores.gather(1, sel)
        self.is_finished = torch.cat([self.is_finished, did], 1).gather(1, sel)

    def go_on(self, step: int) -> bool:
        """The early-stopping heuristic after ``step``, then generate's loop condition."""
        lp = self.length_penalty
        best_len = self.new_tokens if self.early_stopping == "never" and lp > 0.0 else step + 1
        best_possible = self.running_scores[:, :1] / float(best_len**lp)
        worst = torch.where(self.is_finished, self.finished_scores.min(dim=1, keepdim=True).values, -1.0e9)
        self.unsatisfied = self.unsatisfied & (best_possible > worst).any(dim=-1, keepdim=True)
        return bool(self.unsatisfied.any()) and not (bool(self.is_finished.all()) and self.early_stopping is True)


@torch.no_grad()
def lean_beam_search(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    new_tokens: int,
    num_beams: int,
    pad_token_id: int,
) -> torch.Tensor:
    """Beam search as ``generate(num_beams=..., do_sample=False, max_new_tokens=...)`` does it
    (transformers 5: top 2*beams candidates per step, finished hypotheses scored by
    sum log p / length**length_penalty, the early-stopping heuristic), for models whose logits
    are ``lm_head(hidden)`` and whose generation config adds no logits processor.

    It is faster than generate on small models because each step scores the vocabulary tile by
    tile (log-sum-exp and top candidates) instead of materialising and sorting full
    log-probabilities. Log-probabilities are the same numbers up to float rounding, so a beam
    choice can differ from generate's only on a near tie. Returns (B, new_tokens) ids, pad after
    a hypothesis ends.
    """
    split = body_and_head(model)
    if split is None:
        raise ValueError(f"lean beam search needs logits = lm_head(hidden); use generate for {type(model).__name__}")
    body, head = split
    cfg = model.generation_config
    length_penalty = 1.0 if cfg.length_penalty is None else float(cfg.length_penalty)
    early_stopping = False if cfg.early_stopping is None else cfg.early_stopping
    eos = torch.tensor(eos_ids(model), dtype=torch.long, device=input_ids.device)
    dev = input_ids.device
    B, nb = input_ids.shape[0], num_beams
    K = max(2, 1 + eos.numel()) * nb  # candidates kept per step, as generate
    fill = pad_token_id if pad_token_id else (int(eos[0]) if eos.numel() else -1)

    # the prompts' prefill, one copy per beam
    am = attention_mask.repeat_interleave(nb, 0).long()
    pos = position_ids_from_mask(am)
    out = body(input_ids=input_ids.repeat_interleave(nb, 0), attention_mask=am, position_ids=pos, use_cache=True)
    hidden = out.last_hidden_state[:, -1]
    layers = cache_layers(get_cache(out))
    cache = preallocated_cache(layers, new_tokens) if layers is not None else get_cache(out)
    del out
    cache_kw = cache_kwarg(body)
    next_pos = pos[:, -1] + 1

    beams = _Beams(B, nb, new_tokens, fill, eos, length_penalty, early_stopping, dev)
    batch_offset = (torch.arange(B, device=dev) * nb)[:, None]
    for step in range(new_tokens):
        top_v, top_i, lse = top_candidates(hidden, head, K)
        if not bool(torch.isfinite(lse).all()):
            raise FloatingPointError("non-finite logits")
        hits, running_origin = beams.advance(step, (top_v - lse[:, None]).view(B, nb, K), top_i)
        if not beams.go_on(step) or bool(hits.all()) or step + 1 == new_tokens:
            break
        cache.batch_select_indices((running_origin + batch_offset).flatten())
        am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
        hidden = body(
            input_ids=beams.running[:, :, step].reshape(-1, 1),
            attention_mask=am,
            position_ids=(next_pos + step)[:, None],
            use_cache=True,
            **{cache_kw: cache},
        ).last_hidden_state[:, -1]
    return beams.finished[:, 0]


@torch.no_grad()
def generate_candidates(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    prompt_length: int = PROMPT_LENGTH,
    new_tokens: int = NEW_TOKENS,
    num_beams: int = NUM_BEAMS,
    impl: str = "auto",
) -> torch.Tensor:
    """(B, new_tokens) generated ids for the prompts: model-tokenizer encoding left-padded /
    truncated to ``prompt_length``, beam search with an attention mask. Rows that stop early
    (eos) are filled with the pad token to ``new_tokens``, as they would be in a batch where
    another row ran to the end.

    ``impl``: "hf" = ``model.generate``; "lean" = :func:`lean_beam_search`; "auto" = lean where
    it reproduces generate's algorithm (fp32, plain output layer, no logits processors), else hf.
    """
    device = model_device(model)
    enc = tokenizer(
        list(prompts),
        max_length=prompt_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
        padding_side="left",
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, am = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    if impl not in ("auto", "hf", "lean"):
        raise ValueError(f"impl must be auto, hf or lean (got {impl!r})")
    if impl == "lean" or (impl == "auto" and _lean_beam_ok(model)):
        try:
            return lean_beam_search(
                model, ids, am, new_tokens=new_tokens, num_beams=num_beams, pad_token_id=pad_id
            ).cpu()
        except FloatingPointError:  # NaN/inf logits: let generate decide what they mean
            pass
    return _hf_beam_search(model, ids, am, new_tokens=new_tokens, num_beams=num_beams, pad_id=pad_id)


def _hf_beam_search(
    model: torch.nn.Module, ids: torch.Tensor, am: torch.Tensor, *, new_tokens: int, num_beams: int, pad_id: int
) -> torch.Tensor:
    """``model.generate``'s beam search: (B, new_tokens) new ids on the CPU, pad-filled."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # generate's notes on default generation flags are noise
    try:
        out = model.generate(
            input_ids=ids,
            attention_mask=am,
            max_new_tokens=new_tokens,
            num_beams=num_beams,
            do_sample=False,
            pad_token_id=pad_id,
        )
    finally:
        hf_logging.set_verbosity(previous)
    new = out[:, ids.shape[1] :]
    if new.shape[1] < new_tokens:
        fill = torch.full((new.shape[0], new_tokens - new.shape[1]), pad_id, dtype=new.dtype, device=new.device)
        new = torch.cat([new, fill], dim=1)
    return new.cpu()
