"""One validation pass over the forget set: generation check, loss, MA and EL_n (docs/method.md,
"Validation", "MA", "EL_n"). The trainers and eval.py call :func:`evaluate_forget_set`.

Why it is fast, and why the numbers stay the reference's:

* MA: the greedy next token after ``x_<i`` is the argmax of the logits at position i-1 of one
  teacher-forced pass over ``x_<T`` (position ids from the attention mask, as generate builds
  them for left-padded prompts), instead of 199 one-token ``generate`` calls.
* EL_n: greedy decoding is deterministic. If the greedy token after ``x_<i`` is ``x_i``, the
  continuation from i is ``x_i`` followed by the continuation from i+1. Walking i backwards from
  T-1, only the prefixes where the model leaves the text need decoding. Those are decoded
  together, one row per (sample, prefix), starting from slices of the key/value cache of the
  true sequence (rows right-aligned so relative distances, hence local-attention windows, stay
  as in generate), and rows that are done are dropped from the batch as decoding goes.
  A memorizing model leaves the text rarely, so almost nothing is decoded.
* The output layer: for architectures whose logits are ``lm_head(hidden)``, the 50257-way
  output layer is applied tile by tile (:func:`head_argmax`) with a running argmax and
  log-sum-exp, so batch x T x vocabulary logits are never stored; MA, the first EL tokens and the
  loss come from one pass.
* Generation check: a lean beam search (:func:`lean_beam_search`) that follows generate's
  algorithm step for step but scores the vocabulary tile by tile; generate itself is used in
  bf16/fp16 and for models with logits processors or another output layer.
* BERTScore's model is loaded once per process (:func:`icu.metrics.get_bertscorer`).

Greedy tokens follow generate's conventions: ``torch.argmax`` (the first maximum on ties) of
the raw logits; once a continuation emits an eos token the rest is the pad token. Logits
processors that a model's generation_config may add (repetition penalty, suppressed tokens)
are not applied: the models ICU uses (GPT-Neo, OPT, GPT-2) have none.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from .data import EncodedSet
from .errors import IcuError
from .metrics import (
    EL_START,
    bleu as bleu_score,
    check_lengths,
    distinct_ratio,
    el_prefixes,
    extraction_likelihood,
    flag_rule,
    memorization_accuracy,
    token_entropy,
)

logger = logging.getLogger("icu")

PROMPT_LENGTH = 50
NEW_TOKENS = 50
NUM_BEAMS = 2
# unlearn.csv's columns, in order (evaluation/convert.py reads them by name)
GEN_COLUMNS = ("id", "prefix", "reference", "candidate", "bleu", "P", "R", "F1", "diff", "entropy")


# --------------------------------------------------------------------------- data


def load_forget_set(data_dir: str, exp: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows, doc_ids) of split ``exp``'s forget set under ``data_dir``.

    ``all`` is the folder data_prep.py writes for the union of the splits; when it is missing,
    the union of every ``exp*/unlearn`` set found is used (ascending doc_id, no duplicates).
    """
    import os

    from .data import load_experiment, load_set

    if exp != "all" or os.path.isdir(os.path.join(data_dir, "all")):
        rows, ids, _, _ = load_experiment(data_dir, exp, need_learn=False)
        return rows, ids
    found = sorted(
        d for d in (os.listdir(data_dir) if os.path.isdir(data_dir) else [])
        if d.startswith("exp") and os.path.isdir(os.path.join(data_dir, d, "unlearn"))
    )
    if not found:
        raise IcuError(
            f"--exp all: no {os.path.join(data_dir, 'all')} and no exp*/unlearn sets under "
            f"{data_dir!r}; run `python data_prep.py` first"
        )
    by_id: dict[int, np.ndarray] = {}
    for d in found:
        rows, ids = load_set(os.path.join(data_dir, d, "unlearn"))
        if ids is None:
            raise IcuError(
                f"{os.path.join(data_dir, d, 'unlearn')} has no _doc_ids.npy, so its targets cannot "
                "be merged with the other splits; rerun data_prep.py"
            )
        for row, i in zip(rows, ids):
            by_id.setdefault(int(i), row)
    order = sorted(by_id)
    logger.info("--exp all: union of %s (%d targets)", ", ".join(found), len(order))
    return np.stack([by_id[i] for i in order]), np.asarray(order, dtype=np.int64)


# --------------------------------------------------------------------------- model plumbing


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


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5 renames ``past_key_values`` to ``cache``; accept both."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _get_cache(out) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _eos_ids(model: torch.nn.Module) -> list[int]:
    cfg = getattr(model, "generation_config", None)
    eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _cache_layers(cache) -> Optional[list[tuple[torch.Tensor, torch.Tensor]]]:
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


# --------------------------------------------------------------------------- output layer

# Architectures whose causal-LM logits are exactly ``lm_head(last_hidden_state)``. For them the
# teacher-forced pass and the decode steps run the model body, then the output layer tile by
# tile (rows x vocabulary slices), keeping a running argmax and log-sum-exp, so the
# batch x T x vocabulary logits never exist in memory: on a CPU that is ~40% of the pass for a
# small model with GPT-2's 50257-token vocabulary. Any other model goes through its own forward.
_PLAIN_HEAD_TYPES = {"gpt_neo", "gpt2", "gptj", "gpt_neox", "opt", "llama", "mistral", "qwen2"}


def _body_and_head(model: torch.nn.Module):
    if getattr(model.config, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    head = model.get_output_embeddings()
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(head, torch.nn.Linear) or not isinstance(body, torch.nn.Module) or body is model:
        return None
    return body, head


def _vocab_major(hidden: torch.Tensor) -> bool:
    """Whether to compute a tile's logits as (W @ h.T).T: on a CPU in fp32 with few rows (a
    decode step). There ``linear``'s GEMM is erratic: on 2 cores with a 50257 x 128 head it
    takes 10-17 ms for 2, 3, 6, 7 or 11 rows but 5-6 ms for 4 or 8, while the transposed
    product takes 3-7 ms for all of them (measured; no gain from 24 rows up). The values agree
    with ``linear`` to float rounding (~1e-6), as ``linear`` itself does across batch shapes."""
    return hidden.device.type == "cpu" and hidden.dtype == torch.float32 and hidden.shape[0] <= 16


def _logits_tile(h: torch.Tensor, head: torch.nn.Linear, v0: int, vb: int, vocab_major: bool) -> torch.Tensor:
    """(rows, vb) logits of ``head`` for token ids v0..v0+vb-1, row-major either way."""
    w = head.weight[v0 : v0 + vb]
    b = None if head.bias is None else head.bias[v0 : v0 + vb]
    if vocab_major:
        t = torch.mm(w, h.t()) if b is None else torch.addmm(b[:, None], w, h.t())
        return t.t().contiguous()
    return torch.nn.functional.linear(h, w, b)


def _add_to_logsumexp(
    run_max: torch.Tensor, run_sum: torch.Tensor, logits: torch.Tensor, tile_max: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a float32 tile (rows, vb) with row maxima ``tile_max`` into the running log-sum-exp
    (max, sum of exp(x - max)). Overwrites ``logits``: a second tile-sized buffer would cost more
    than the exp itself."""
    new_max = torch.maximum(run_max, tile_max)
    run_sum = run_sum * torch.exp(run_max - new_max) + logits.sub_(new_max[:, None]).exp_().sum(-1)
    return new_max, run_sum


def head_argmax(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    labels: Optional[torch.Tensor] = None,
    tiles: Optional[tuple[int, int]] = None,
    vocab_major: Optional[bool] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """argmax of ``head(hidden)`` per row (N,) and, with ``labels`` (N,), the cross-entropy
    -log softmax(logits)[label] (N,) (NaN where the label is -100), without building (N, V);
    ``tiles`` = (rows, vocabulary slice) overrides the device's tile shape; ``vocab_major``
    forces the logits' layout (default: see :func:`_vocab_major`).

    Ties go to the lowest token id, as ``torch.argmax`` (hence generate's greedy) does: each tile
    takes its first maximum, and a later tile must be strictly larger to win.
    """
    N = hidden.shape[0]
    V = head.weight.shape[0]
    dev = hidden.device
    vm = _vocab_major(hidden) if vocab_major is None else bool(vocab_major)
    if dev.type == "cuda":  # memory is the only reason to tile on a GPU
        rb, vb = max(1, (1 << 27) // V), V
    elif N * V <= 1 << 21:  # a few rows (decode steps): one tile, fewer ops
        rb, vb = max(1, N), V
    else:  # 400 x 4096 fp32 logits (6.5 MB) stay in cache between the GEMM and the reductions
        rb, vb = 400, 4096
    if tiles is not None:  # (rows, vocabulary) per tile, for tests
        rb, vb = tiles
    preds = torch.empty(N, dtype=torch.long, device=dev)
    loss = None if labels is None else torch.empty(N, dtype=torch.float32, device=dev)
    for r0 in range(0, N, rb):
        h = hidden[r0 : r0 + rb]
        R = h.shape[0]
        best = torch.full((R,), float("-inf"), dtype=torch.float32, device=dev)
        arg = torch.zeros(R, dtype=torch.long, device=dev)
        nan = torch.zeros(R, dtype=torch.bool, device=dev)
        if labels is not None:
            lab = labels[r0 : r0 + rb]
            run_max = torch.full((R,), float("-inf"), dtype=torch.float32, device=dev)
            run_sum = torch.zeros(R, dtype=torch.float32, device=dev)
            picked = torch.full((R,), float("nan"), dtype=torch.float32, device=dev)
        for v0 in range(0, V, vb):
            logits = _logits_tile(h, head, v0, vb, vm)
            # amax is vectorised and ~20x cheaper than argmax on a CPU: take the argmax only
            # of rows whose maximum this tile raises (after the first tiles, few of them).
            val = logits.amax(-1).float()  # NaN if the row has one (argmax then points at it)
            nan |= torch.isnan(val)
            better = val > best
            if v0 == 0 or bool(better.all()):
                arg = torch.where(better, logits.argmax(-1) + v0, arg)
            elif bool(better.any()):
                rows = better.nonzero().squeeze(1)
                arg[rows] = logits[rows].argmax(-1) + v0
            best = torch.where(better, val, best)
            if labels is not None:
                lf = logits.float()
                inside = (lab >= v0) & (lab < v0 + logits.shape[1])
                if bool(inside.any()):
                    rows = inside.nonzero().squeeze(1)
                    picked[rows] = lf[rows, lab[rows] - v0]
                run_max, run_sum = _add_to_logsumexp(run_max, run_sum, lf, val)
            del logits
        if bool(nan.any()):  # torch.argmax returns a NaN's index: let it decide those rows
            rows = nan.nonzero().squeeze(1)
            arg[rows] = head(h[rows]).argmax(-1)
        preds[r0 : r0 + rb] = arg
        if labels is not None:
            loss[r0 : r0 + rb] = run_max + torch.log(run_sum) - picked
    return preds, loss


_CACHE_KW = "__cache__"  # model_step's name for the cache argument, renamed per model


def model_step(model: torch.nn.Module, labels: Optional[torch.Tensor] = None, last_only: bool = False, **kwargs):
    """One forward: (argmax (B, L) or (B,) with ``last_only``, cache or None, token losses (B, L)
    for ``labels`` aligned with the logits (-100 ignored) or None)."""
    split = _body_and_head(model)
    target = model if split is None else split[0]
    if _CACHE_KW in kwargs:
        kwargs[_cache_kwarg(target)] = kwargs.pop(_CACHE_KW)
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
        cache = _get_cache(out) if kwargs.get("use_cache") else None
        return (preds[:, 0] if last_only else preds), cache, tok
    body, head = split
    out = body(**kwargs)
    hidden = out.last_hidden_state
    if last_only:
        hidden = hidden[:, -1:]
    B, L, H = hidden.shape
    preds, tok = head_argmax(hidden.reshape(B * L, H), head, None if labels is None else labels.reshape(-1))
    cache = _get_cache(out) if kwargs.get("use_cache") else None
    preds = preds.view(B, L)
    return (preds[:, 0] if last_only else preds), cache, (None if tok is None else tok.view(B, L))


# --------------------------------------------------------------------------- MA + EL


@functools.lru_cache(maxsize=1)
def _preallocated_layer_class():
    """A DynamicLayer that writes new positions into a preallocated buffer.

    DynamicCache concatenates on every step, which copies the whole cache per token; with
    hundreds of rows that copy cost more than the model. Built on first use so that importing
    this module does not import transformers.
    """
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor, extra: int):
            super().__init__()
            R, H, P, _ = keys.shape
            self.kbuf = keys.new_empty((R, H, P + extra, keys.shape[-1]))
            self.vbuf = values.new_empty((R, H, P + extra, values.shape[-1]))
            self.kbuf[:, :, :P] = keys
            self.vbuf[:, :, :P] = values
            self.n = P
            self.device, self.dtype = keys.device, keys.dtype
            self.is_initialized = True
            self._views()

        def _views(self) -> None:
            self.keys = self.kbuf[:, :, : self.n]
            self.values = self.vbuf[:, :, : self.n]

        def update(self, key_states, value_states, *args, **kwargs):
            t = key_states.shape[-2]
            if self.n + t > self.kbuf.shape[2]:  # more steps than planned: grow
                grow = max(t, self.kbuf.shape[2] // 2)
                self.kbuf = torch.cat([self.kbuf, self.kbuf.new_empty(self.kbuf.shape[:2] + (grow, self.kbuf.shape[3]))], 2)
                self.vbuf = torch.cat([self.vbuf, self.vbuf.new_empty(self.vbuf.shape[:2] + (grow, self.vbuf.shape[3]))], 2)
            self.kbuf[:, :, self.n : self.n + t] = key_states
            self.vbuf[:, :, self.n : self.n + t] = value_states
            self.n += t
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.n

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self.kbuf = self.kbuf[indices]
            self.vbuf = self.vbuf[indices]
            self._views()

    return PreallocatedLayer


def _preallocated_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], extra: int):
    """A DynamicCache holding the given per-layer (keys, values), with room for ``extra`` more
    positions written in place (see :func:`_preallocated_layer_class`)."""
    from transformers import DynamicCache

    layer_class = _preallocated_layer_class()
    cache = DynamicCache()
    cache.layers = [layer_class(k, v, extra) for k, v in kv]
    cache.layer_class_to_replicate = None
    return cache


@dataclass
class GreedyStats:
    """What the fast EL path did (for logs and the benchmark)."""

    prefixes: int = 0  # counted (sample, prefix) pairs
    decoded_rows: int = 0  # prefixes where the model left the text, decoded
    decode_steps: int = 0  # forward calls of the decode loop
    row_steps: int = 0  # sum over those calls of the rows in the batch


def _row_budget_bytes(device: torch.device) -> int:
    """Memory for the rows' key/value caches: 1 GiB on CPU, a quarter of free GPU memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(8 << 30, max(1 << 30, free // 4)))
    return 1 << 30


def default_decode_rows(model: torch.nn.Module, T: int) -> int:
    """How many (sample, prefix) rows to decode at once: the row caches fill the budget."""
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "num_layers", None) or 12
    hidden = getattr(cfg, "hidden_size", None) or 768
    itemsize = next(model.parameters()).element_size()
    # the cache while decoding holds T-1 + T-start positions; count it twice for the copies
    per_row = 2 * 2 * layers * hidden * (2 * T) * itemsize
    return int(max(16, min(2048, _row_budget_bytes(model_device(model)) // max(per_row, 1))))


class ContinuationBuilder:
    """Greedy continuations g_i of the EL prefixes of many samples, and EL_n from them.

    For each batch (:meth:`add`), the argmax of the teacher-forced pass gives the first greedy
    token after every prefix. Prefixes where it differs from the text ("divergent") are queued
    with a copy of their slice of the batch's key/value cache, right-aligned at position T-1 so
    that query-key distances are those of generate. Queued rows are decoded together, in
    chunks of ``max_rows``, longest first, when the queue is full and at :meth:`finish`; rows
    from different batches share a decode batch, so a model that rarely diverges pays for a few
    decode calls per pass, not per batch. :meth:`finish` then builds every g_i backwards
    (g_i = x_i + g_{i+1} where the model follows the text) and scores EL_n.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        n_samples: int,
        target_length: int,
        *,
        start: int = EL_START,
        pad_token_id: int,
        eos_token_ids: Sequence[int] = (),
        max_rows: Optional[int] = None,
        reuse_cache: bool = True,
        stats: Optional[GreedyStats] = None,
    ):
        self.model = model
        self.device = model_device(model)
        self.T = int(target_length)
        self.start = int(start)
        self.K = self.T - self.start
        self.pad = int(pad_token_id)
        self.eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=self.device)
        self.max_rows = int(max_rows or default_decode_rows(model, self.T))
        self.reuse_cache = reuse_cache
        self.stats = stats if stats is not None else GreedyStats()
        N, K, T = n_samples, self.K, self.T
        self.x = torch.full((N, T), self.pad, dtype=torch.long, device=self.device)
        self.mask = torch.zeros((N, T), dtype=torch.long, device=self.device)
        self.match = torch.zeros((N, K), dtype=torch.bool, device=self.device)
        self.counted = torch.zeros((N, K), dtype=torch.bool, device=self.device)
        self.G = torch.full((N, K, K), self.pad, dtype=torch.long, device=self.device)
        self._queue: list[dict[str, Any]] = []
        self._queued = 0

    # -- collecting

    def add(self, rows: Sequence[int], x: torch.Tensor, mask: torch.Tensor, preds: torch.Tensor, cache: Any) -> None:
        """Register samples ``rows`` (positions in this builder) of one batch: ``x``/``mask``
        (B, >=T), ``preds`` the argmax of the teacher-forced pass over ``x_<T`` with
        mask-derived positions, ``cache`` its key/value cache (or None)."""
        T, K, s = self.T, self.K, self.start
        dev = self.device
        rows_t = torch.as_tensor(list(rows), dtype=torch.long, device=dev)
        x = x[:, :T].to(dev)
        mask = mask[:, :T].to(dev)
        preds = preds.to(dev)
        first = preds[:, s - 1 : T - 1]  # greedy token after x_<i, i = start..T-1
        truth = x[:, s:T]
        counted = el_prefixes(mask, T, s)
        match = first == truth
        self.x[rows_t], self.mask[rows_t] = x, mask
        self.match[rows_t], self.counted[rows_t] = match, counted
        self.G[rows_t, :, 0] = torch.where(counted, first, torch.full_like(first, self.pad))
        self.stats.prefixes += int(counted.sum())
        need = (T - torch.arange(s, T, device=dev))[None, :].expand_as(first)
        # Decode where the model leaves the text, has not ended with eos, and more than one
        # token is wanted (the first one is already known).
        todo = (counted & ~match & ~torch.isin(first, self.eos) & (need > 1)).nonzero()
        if todo.shape[0] == 0:
            return
        self.stats.decoded_rows += int(todo.shape[0])
        b, k = todo[:, 0], todo[:, 1]
        i = k + s
        P = T - 1
        src = torch.arange(P, device=dev)[None, :] - (P - i)[:, None]
        valid = src >= 0
        src = src.clamp(min=0)
        item: dict[str, Any] = {
            "sample": rows_t[b],
            "k": k,
            "first": first[b, k],
            "amask": (mask[b[:, None], src].bool() & valid).long(),
            "npos": mask.long().cumsum(1)[b, i - 1],  # real tokens in x_<i: next position id
        }
        layers = _cache_layers(cache) if self.reuse_cache else None
        if layers is not None and layers[0][0].shape[2] >= P:
            item["kv"] = [
                (
                    keys[b[:, None], :, src].permute(0, 2, 1, 3).contiguous(),
                    values[b[:, None], :, src].permute(0, 2, 1, 3).contiguous(),
                )
                for keys, values in layers
            ]
        else:
            item["ids"] = torch.where(valid, x[b[:, None], src], torch.full_like(src, self.pad))
        self._queue.append(item)
        self._queued += int(b.shape[0])
        if self._queued >= self.max_rows:
            self.flush()

    # -- decoding

    def flush(self) -> None:
        """Decode every queued row."""
        if not self._queue:
            return
        q = self._queue
        self._queue, self._queued = [], 0
        cat = {key: torch.cat([it[key] for it in q]) for key in ("sample", "k", "first", "amask", "npos")}
        kv = ids = None
        if all("kv" in it for it in q):
            kv = [
                (torch.cat([it["kv"][j][0] for it in q]), torch.cat([it["kv"][j][1] for it in q]))
                for j in range(len(q[0]["kv"]))
            ]
        else:  # some batch's cache could not be sliced: rebuild every row's cache by a prefill
            ids = torch.cat([self._ids_of(it) for it in q])
        del q
        order = torch.argsort(cat["k"], stable=True)  # longest continuations first
        for s0 in range(0, order.shape[0], self.max_rows):
            sel = order[s0 : s0 + self.max_rows]
            out = self._decode(
                None if kv is None else [(keys[sel], values[sel]) for keys, values in kv],
                None if ids is None else ids[sel],
                cat["amask"][sel],
                cat["npos"][sel],
                cat["first"][sel],
                cat["k"][sel] + self.start,
            )
            cols = torch.arange(out.shape[1], device=self.device)
            self.G[cat["sample"][sel][:, None], cat["k"][sel][:, None], cols[None, :]] = out
            del out

    def _ids_of(self, it: dict[str, Any]) -> torch.Tensor:
        """The right-aligned prefix ids of a queued item (for the prefill fallback)."""
        if "ids" in it:
            return it["ids"]
        P = self.T - 1
        i = it["k"] + self.start
        src = torch.arange(P, device=self.device)[None, :] - (P - i)[:, None]
        valid = src >= 0
        xs = self.x[it["sample"][:, None], src.clamp(min=0)]
        return torch.where(valid, xs, torch.full_like(xs, self.pad))

    def _decode(self, kv, ids, amask, npos, first, i) -> torch.Tensor:
        """Greedy continuation of rows right-aligned at T-1: (R, max(T-i)) ids, pad after eos."""
        model, T, pad = self.model, self.T, self.pad
        R = first.shape[0]
        need = T - i  # tokens per row, the known first one included
        out = torch.full((R, int(need.max())), pad, dtype=torch.long, device=self.device)
        out[:, 0] = first
        if kv is not None:
            cache = _preallocated_cache(kv, int(need.max()))
        else:  # a prefill over the right-aligned prefixes builds the rows' cache
            _, cache, _ = model_step(
                model,
                last_only=True,
                input_ids=ids,
                attention_mask=amask,
                position_ids=position_ids_from_mask(amask),
                use_cache=True,
            )
            layers = _cache_layers(cache)
            if layers is not None:
                cache = _preallocated_cache(layers, int(need.max()))
        row = torch.arange(R, device=self.device)  # output row of each batch row
        cur = first.clone()
        finished = torch.isin(cur, self.eos)
        step = 0
        while True:
            active = (~finished) & (step + 1 < need[row])
            n_active = int(active.sum())
            if n_active == 0:
                break
            if n_active < 0.9 * row.shape[0]:
                # Drop rows that are done (copying the cache costs less than a step of
                # 10% idle rows).
                keep = active.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                row, amask, npos, cur, finished, active = (
                    row[keep], amask[keep], npos[keep], cur[keep], finished[keep], active[keep]
                )
            amask = torch.cat([amask, torch.ones_like(amask[:, :1])], dim=1)
            nxt, cache, _ = model_step(
                model,
                last_only=True,
                input_ids=cur[:, None],
                attention_mask=amask,
                position_ids=(npos + step)[:, None],
                use_cache=True,
                **{_CACHE_KW: cache},
            )
            self.stats.decode_steps += 1
            self.stats.row_steps += int(row.shape[0])
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            out[row[active], step + 1] = nxt[active]
            finished = finished | torch.isin(nxt, self.eos)
            cur = nxt
            step += 1
        return out

    # -- results

    def continuations(self) -> torch.Tensor:
        """(N, K, K): row k = g_i for i = start + k (first T-i entries; pad after eos)."""
        self.flush()
        G, K = self.G, self.K
        truth = self.x[:, self.start : self.T]
        use = self.match & self.counted
        pad_tail = torch.full((G.shape[0], K - 1), self.pad, dtype=torch.long, device=self.device)
        for k in range(K - 1, -1, -1):
            mk = use[:, k]
            if not bool(mk.any()):
                continue
            tail = G[:, k + 1, : K - 1] if k + 1 < K else pad_tail
            # generate pads after an eos token: the continuation ends with x_i = eos
            ends = torch.isin(truth[:, k], self.eos)[:, None]
            tail = torch.where(ends, pad_tail, tail)
            seq = torch.cat([truth[:, k : k + 1], tail], dim=1)
            G[:, k] = torch.where(mk[:, None], seq, G[:, k])
        return G

    def finish(self, ns: Sequence[int]) -> dict[int, torch.Tensor]:
        """Per-sample EL_n (N,) float64 for each n."""
        G = self.continuations()
        return extraction_likelihood(G, self.x, self.mask, self.T, ns, self.start)


@torch.no_grad()
def greedy_continuations(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_length: int,
    *,
    start: int = EL_START,
    pad_token_id: int,
    eos_token_ids: Sequence[int] = (),
    max_rows: Optional[int] = None,
    reuse_cache: bool = True,
    stats: Optional[GreedyStats] = None,
) -> torch.Tensor:
    """(B, T-start, T-start) ids: row k = g_i for i = start + k, the greedy continuation of
    ``x_<i`` to length T (pad after an eos and past T-i); rows of uncounted prefixes are pad."""
    T = int(target_length)
    x, mask = input_ids[:, :T], attention_mask[:, :T]
    preds, cache, _, _ = teacher_forced_pass(model, x, mask, use_cache=reuse_cache)
    b = ContinuationBuilder(
        model, x.shape[0], T, start=start, pad_token_id=pad_token_id, eos_token_ids=eos_token_ids,
        max_rows=max_rows, reuse_cache=reuse_cache, stats=stats,
    )
    b.add(range(x.shape[0]), x, mask, preds, cache)
    return b.continuations()


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


@torch.no_grad()
def memorization_and_extraction(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_length: int = 200,
    el_ns: Sequence[int] = (10,),
    *,
    start: int = EL_START,
    pad_token_id: Optional[int] = None,
    eos_token_ids: Optional[Sequence[int]] = None,
    batch_size: Optional[int] = None,
    max_rows: Optional[int] = None,
    reuse_cache: bool = True,
    stats: Optional[GreedyStats] = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Per-sample MA (N,) and EL_n (N,) by the fast path, in batches of ``batch_size``
    (default: all at once). The model should be in eval mode."""
    T = int(target_length)
    check_lengths(input_ids.shape[1], T, el_ns, start)
    eos = _eos_ids(model) if eos_token_ids is None else list(eos_token_ids)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    N = input_ids.shape[0]
    bs = batch_size or N
    builder = None
    if el_ns:
        builder = ContinuationBuilder(
            model, N, T, start=start, pad_token_id=pad_token_id, eos_token_ids=eos,
            max_rows=max_rows, reuse_cache=reuse_cache, stats=stats,
        )
    mas = []
    for s in range(0, N, bs):
        x, mask = input_ids[s : s + bs, :T], attention_mask[s : s + bs, :T]
        preds, cache, _, _ = teacher_forced_pass(
            model, x, mask, use_cache=reuse_cache and builder is not None
        )
        mas.append(memorization_accuracy(preds, x.to(preds.device), mask.to(preds.device), T))
        if builder is not None:
            builder.add(range(s, s + x.shape[0]), x, mask, preds, cache)
        del cache
    el = builder.finish(el_ns) if builder is not None else {}
    return torch.cat(mas), {n: v.cpu() for n, v in el.items()}


# --------------------------------------------------------------------------- generation check


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
    if _body_and_head(model) is None or next(model.parameters()).dtype != torch.float32:
        return False
    cfg = getattr(model, "generation_config", None)
    if cfg is None:
        return True
    return all(getattr(cfg, k, None) in ok for k, ok in _UNSUPPORTED_GENERATION.items())


def _top_candidates(
    hidden: torch.Tensor, head: torch.nn.Linear, k: int, vocab_major: Optional[bool] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``head(hidden)``: the k largest logits (R, k) descending, their ids, and the
    log-sum-exp (R,), tile by tile without building (R, V). ``vocab_major``: the logits'
    layout (default: see :func:`_vocab_major`)."""
    V = head.weight.shape[0]
    R = hidden.shape[0]
    vm = _vocab_major(hidden) if vocab_major is None else bool(vocab_major)
    vb = V if hidden.device.type == "cuda" or R * V <= 1 << 21 else 4096
    top_v = torch.full((R, k), float("-inf"), dtype=torch.float32, device=hidden.device)
    top_i = torch.zeros((R, k), dtype=torch.long, device=hidden.device)
    run_max = torch.full((R,), float("-inf"), dtype=torch.float32, device=hidden.device)
    run_sum = torch.zeros(R, dtype=torch.float32, device=hidden.device)
    for v0 in range(0, V, vb):
        logits = _logits_tile(hidden, head, v0, vb, vm).float()
        tile_max = logits.amax(-1)  # vectorised, unlike max(dim) which also finds indices
        # A tile can only change the top k where it beats the current k-th value; after the
        # first tiles that is rare, and topk costs several times a max.
        rows = (tile_max > top_v[:, -1]).nonzero().squeeze(1)
        if rows.numel():
            tv, ti = logits[rows].topk(min(k, logits.shape[1]), dim=-1)
            # earlier tiles first: on equal values the lower token id stays, as in a row-wide topk
            cat_v = torch.cat([top_v[rows], tv], 1)
            cat_i = torch.cat([top_i[rows], ti + v0], 1)
            order = torch.sort(cat_v, dim=1, descending=True, stable=True).indices[:, :k]
            top_v[rows], top_i[rows] = cat_v.gather(1, order), cat_i.gather(1, order)
        run_max, run_sum = _add_to_logsumexp(run_max, run_sum, logits, tile_max)
        del logits
    return top_v, top_i, run_max + torch.log(run_sum)


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
    split = _body_and_head(model)
    if split is None:
        raise ValueError(f"lean beam search needs logits = lm_head(hidden); use generate for {type(model).__name__}")
    body, head = split
    cfg = model.generation_config
    length_penalty = 1.0 if cfg.length_penalty is None else float(cfg.length_penalty)
    early_stopping = False if cfg.early_stopping is None else cfg.early_stopping
    eos = torch.tensor(_eos_ids(model), dtype=torch.long, device=input_ids.device)
    dev = input_ids.device
    B, P = input_ids.shape
    nb = num_beams
    K = max(2, 1 + eos.numel()) * nb  # candidates kept per step, as generate
    top_mask = torch.arange(K, device=dev) < nb
    fill = pad_token_id if pad_token_id else (int(eos[0]) if eos.numel() else -1)

    ids = input_ids.repeat_interleave(nb, 0)
    am = attention_mask.repeat_interleave(nb, 0).long()
    pos = position_ids_from_mask(am)
    out = body(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True)
    hidden = out.last_hidden_state[:, -1]
    layers = _cache_layers(_get_cache(out))
    cache = _preallocated_cache(layers, new_tokens) if layers is not None else _get_cache(out)
    del out
    cache_kw = _cache_kwarg(body)
    next_pos = pos[:, -1] + 1

    running = torch.full((B, nb, new_tokens), fill, dtype=torch.long, device=dev)
    running_scores = torch.zeros((B, nb), dtype=torch.float32, device=dev)
    running_scores[:, 1:] = -1e9
    finished = running.clone()
    finished_scores = torch.full((B, nb), -1e9, dtype=torch.float32, device=dev)
    is_finished = torch.zeros((B, nb), dtype=torch.bool, device=dev)
    unsatisfied = torch.ones((B, 1), dtype=torch.bool, device=dev)
    batch_offset = (torch.arange(B, device=dev) * nb)[:, None]
    for step in range(new_tokens):
        top_v, top_i, lse = _top_candidates(hidden, head, K)
        if not bool(torch.isfinite(lse).all()):
            raise FloatingPointError("non-finite logits")
        logp = (top_v - lse[:, None]).view(B, nb, K) + running_scores[:, :, None]
        scores, flat = logp.view(B, nb * K).topk(K, dim=-1)
        origin = flat // K
        token = top_i.view(B, nb * K).gather(1, flat)
        cand = running.gather(1, origin[:, :, None].expand(B, K, new_tokens)).clone()
        cand[:, :, step] = token
        hits = torch.isin(token, eos) | (step + 1 >= new_tokens)
        # running beams for the next step: the best candidates that did not just end
        r_scores = scores + hits.to(torch.float32) * -1e9
        keep = r_scores.topk(nb, dim=-1).indices
        running = cand.gather(1, keep[:, :, None].expand(B, nb, new_tokens))
        running_scores = r_scores.gather(1, keep)
        running_origin = origin.gather(1, keep)
        # finished hypotheses: only the top nb candidates may end here
        did = hits & top_mask[None, :]
        f_scores = scores / float((step + 1) ** length_penalty)
        full = is_finished.all(-1, keepdim=True) & (early_stopping is True)
        f_scores = f_scores + full.to(torch.float32) * -1e9
        f_scores = f_scores + (~unsatisfied).to(torch.float32) * -1e9
        f_scores = f_scores + (~did) * -1e9
        m_scores = torch.cat([finished_scores, f_scores], 1)
        sel = m_scores.topk(nb, dim=-1).indices
        finished = torch.cat([finished, cand], 1).gather(1, sel[:, :, None].expand(B, nb, new_tokens))
        finished_scores = m_scores.gather(1, sel)
        is_finished = torch.cat([is_finished, did], 1).gather(1, sel)
        # the early-stopping heuristic, then generate's loop condition
        done_len = step + 1
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = new_tokens
        else:
            best_len = done_len
        best_possible = running_scores[:, :1] / float(best_len**length_penalty)
        worst = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, -1.0e9)
        unsatisfied = unsatisfied & (best_possible > worst).any(dim=-1, keepdim=True)
        go_on = bool(unsatisfied.any()) and not (bool(is_finished.all()) and early_stopping is True)
        if not go_on or bool(hits.all()) or step + 1 == new_tokens:
            break
        cache.batch_select_indices((running_origin + batch_offset).flatten())
        am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
        hidden = body(
            input_ids=running[:, :, step].reshape(-1, 1),
            attention_mask=am,
            position_ids=(next_pos + step)[:, None],
            use_cache=True,
            **{cache_kw: cache},
        ).last_hidden_state[:, -1]
    return finished[:, 0]


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


# --------------------------------------------------------------------------- the pass


@dataclass
class ForgetEvalResult:
    """Everything one validation pass computed."""

    per_sample: pd.DataFrame  # id, prefix, reference, candidate, bleu, P, R, F1, diff, entropy, ma, el_{n}, loss
    flags: np.ndarray  # int64 (N,): 1 iff F1 >= f1 and bleu >= bleu
    val_loss: float  # mean over batches of the batch LM loss
    loss_sum: float
    loss_batches: int
    ma: float  # mean MA over samples
    el: dict[int, float] = field(default_factory=dict)  # n -> mean EL_n
    stats: GreedyStats = field(default_factory=GreedyStats)
    seconds: dict[str, float] = field(default_factory=dict)  # wall clock per phase

    def summary(self) -> dict[str, float]:
        """Column means of the numeric per-sample columns, plus val_loss, ma and el_{n}."""
        out: dict[str, float] = {}
        for col in self.per_sample.columns:
            if col == "id" or not pd.api.types.is_numeric_dtype(self.per_sample[col]):
                continue
            out[col] = float(self.per_sample[col].mean())
        out["val_loss"] = float(self.val_loss)
        out["ma"] = float(self.ma)
        for n, v in self.el.items():
            out[f"el_{n}"] = float(v)
        return out


class _PhaseClock:
    """Wall-clock seconds per phase of the pass (synchronising CUDA so GPU work is counted)."""

    def __init__(self, device: torch.device):
        import time

        self._now = time.perf_counter
        self.device = device
        self.seconds: dict[str, float] = {}
        self._t = self._now()

    def mark(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = self._now()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + t - self._t
        self._t = t


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    ok = ~np.isnan(values)
    return float(values[ok].mean()) if ok.any() else float("nan")


def evaluate_forget_set(
    model: torch.nn.Module,
    tokenizer,
    gpt2_tokenizer,
    data: EncodedSet,
    *,
    scorer=None,
    batch_size: int = 8,
    target_length: int = 200,
    el_ns: Sequence[int] = (10,),
    f1: float = 0.3,
    bleu: float = 0.01,
    indices: Optional[Sequence[int]] = None,
    generation: bool = True,
    progress: bool = True,
    desc: str = "validation",
    el_start: int = EL_START,
    gen_batch_size: Optional[int] = None,
    decode_rows: Optional[int] = None,
    beam_impl: str = "auto",
) -> ForgetEvalResult:
    """The validation pass of docs/method.md#validation on ``data`` (or its ``indices``).

    ``scorer``: an object with ``score(cands, refs) -> (P, R, F1)``, e.g.
    :func:`icu.metrics.get_bertscorer`; needed when ``generation`` is True. Without the
    generation check the text columns are empty, its scores NaN and the flags 0.
    ``batch_size`` batches the teacher-forced pass (its logits are the memory peak: batch x T x
    vocabulary); the beam search runs ``gen_batch_size`` prompts at a time (default 4 x
    batch_size: per-step cost is dominated by reading the output layer, so wider is cheaper).
    ``decode_rows``: EL rows decoded at once (default: ~1 GiB of key/value cache on a CPU, a
    quarter of free memory on a GPU). ``beam_impl``: see :func:`generate_candidates`.
    The model is put in eval mode for the pass and its training mode restored afterwards.
    """
    from tqdm.auto import tqdm

    el_ns = tuple(int(n) for n in el_ns)
    indices = list(range(len(data))) if indices is None else [int(i) for i in indices]
    if len(data) == 0 or len(indices) == 0:
        raise IcuError("the forget set is empty; nothing to evaluate")
    if min(indices) < 0 or max(indices) >= len(data):
        raise IcuError(f"indices must lie in [0, {len(data)}) for a forget set of {len(data)} samples")
    if batch_size < 1:
        raise IcuError(f"batch size must be a positive integer (got {batch_size})")
    gen_batch_size = int(gen_batch_size or 4 * batch_size)
    if generation and scorer is None:
        raise ValueError("evaluate_forget_set(generation=True) needs a BERTScore scorer")
    L = data.input_ids.shape[1]
    check_lengths(L, target_length, el_ns, el_start)
    if data.labels.shape[1] != L:
        raise IcuError(
            f"labels have {data.labels.shape[1]} tokens but inputs {L}; the LM loss needs "
            "--suffix_length equal to --prefix_length"
        )
    inner = unwrap_model(model)
    top = int(data.input_ids[indices].max())
    if top >= vocab_size(inner):
        raise IcuError(
            f"token id {top} in the forget set but the model's vocabulary has {vocab_size(inner)} "
            "entries; use a model whose tokenizer covers these ids"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(inner)
    if pad_id is None:
        pad_id = eos[0] if eos else 0

    N = len(indices)
    stats = GreedyStats()
    clock = _PhaseClock(model_device(inner))
    modes = [(m, m.training) for m in {id(model): model, id(inner): inner}.values()]
    for m, _ in modes:
        m.eval()
    try:
        with torch.no_grad():
            bar = tqdm(total=N * (2 if generation else 1), desc=desc, unit="sample",
                       disable=not progress, leave=False)
            builder = None
            if el_ns:
                builder = ContinuationBuilder(
                    inner, N, target_length, start=el_start, pad_token_id=pad_id,
                    eos_token_ids=eos, max_rows=decode_rows, stats=stats,
                )
            ma, tok_loss, batch_losses = [], [], []
            bar.set_postfix_str("loss, MA, EL")
            for s in range(0, N, batch_size):
                batch = indices[s : s + batch_size]
                m_b, l_b, loss = _forward_batch(inner, data, batch, s, target_length, builder)
                ma.append(m_b)
                tok_loss.append(l_b)
                batch_losses.append(loss)
                bar.update(len(batch))
            clock.mark("forward")
            el = builder.finish(el_ns) if builder is not None else {}
            clock.mark("el_decode")
            idx = torch.as_tensor(indices, dtype=torch.long)
            prefixes = gpt2_tokenizer.batch_decode(data.prefix_ids[idx].tolist())
            references = gpt2_tokenizer.batch_decode(data.suffix_ids[idx].tolist())
            cand_ids: list[list[int]] = [[] for _ in range(N)]
            if generation:
                bar.set_postfix_str("generation")
                for s in range(0, N, gen_batch_size):
                    new = generate_candidates(inner, tokenizer, prefixes[s : s + gen_batch_size], impl=beam_impl)
                    cand_ids[s : s + new.shape[0]] = new.tolist()
                    bar.update(new.shape[0])
            bar.close()
            clock.mark("generation")
    finally:
        for m, was_training in modes:
            m.train(was_training)

    candidates = tokenizer.batch_decode(cand_ids) if generation else [""] * N
    nan = np.full(N, np.nan)
    df = pd.DataFrame(
        {
            "id": data.doc_ids[idx].numpy().astype(np.int64),
            "prefix": prefixes,
            "reference": references,
            "candidate": candidates,
            "bleu": [bleu_score(r, c) for r, c in zip(references, candidates)] if generation else nan,
            "P": nan,
            "R": nan,
            "F1": nan,
            "diff": [distinct_ratio(c) for c in cand_ids] if generation else nan,
            "entropy": [token_entropy(c) for c in cand_ids] if generation else nan,
            "ma": torch.cat(ma).numpy(),
        }
    )
    for n in el_ns:
        df[f"el_{n}"] = el[n].cpu().numpy()
    df["loss"] = torch.cat(tok_loss).numpy()
    clock.mark("text_metrics")
    if generation:
        P, R, F = scorer.score(candidates, references)
        df["P"], df["R"], df["F1"] = P, R, F
        flags = flag_rule(df["F1"].to_numpy(), df["bleu"].to_numpy(), f1, bleu)
        clock.mark("bertscore")
    else:
        flags = np.zeros(N, dtype=np.int64)
    result = ForgetEvalResult(
        per_sample=df,
        flags=flags,
        val_loss=float(np.mean(batch_losses)),
        loss_sum=float(np.sum(batch_losses)),
        loss_batches=len(batch_losses),
        ma=_nanmean(df["ma"].to_numpy()),
        el={n: _nanmean(df[f"el_{n}"].to_numpy()) for n in el_ns},
        stats=stats,
        seconds=clock.seconds,
    )
    logger.info(
        "%s: %d samples, val_loss %.4f, ma %.4f%s%s; decoded %d of %d EL prefixes; %s",
        desc, N, result.val_loss, result.ma,
        "".join(f", el_{n} {v:.4f}" for n, v in result.el.items()),
        f", {int(flags.sum())} flagged" if generation else "",
        stats.decoded_rows, stats.prefixes,
        " ".join(f"{k} {v:.1f}s" for k, v in clock.seconds.items()),
    )
    return result


def _forward_batch(
    model, data: EncodedSet, batch: list[int], offset: int, T: int, builder: Optional[ContinuationBuilder]
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Teacher-forced pass of one batch: per-sample MA and loss, the batch loss; queues the
    batch's EL prefixes in ``builder``."""
    device = model_device(model)
    idx = torch.as_tensor(batch, dtype=torch.long)
    ids = data.input_ids[idx].to(device)
    mask = data.attention_mask[idx].to(device)
    labels = data.labels[idx].to(device)
    L = ids.shape[1]
    x, xm = ids[:, :T], mask[:, :T]
    # The loss as the reference computes it: the whole input, default positions 0..L-1, the
    # attention mask. Without padding and with T == L that is the MA/EL pass itself.
    share = T == L and not bool((mask == 0).any())
    preds, cache, per_sample, loss = teacher_forced_pass(
        model, x, xm, labels=labels if share else None, use_cache=builder is not None
    )
    if not share:
        _, _, per_sample, loss = teacher_forced_pass(
            model, ids, mask, labels=labels, use_cache=False, mask_positions=False
        )
    ma = memorization_accuracy(preds, x, xm, T)
    if builder is not None:
        builder.add(range(offset, offset + len(batch)), x, xm, preds, cache)
    return ma, per_sample, loss


def lm_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(per-sample mean next-token cross-entropy (B,), batch mean over all tokens) for labels
    aligned with the inputs (-100 = ignored), as a causal LM's ``labels=`` loss is defined.

    One cross-entropy pass serves both; the batch value equals the model's own loss up to float
    summation order.
    """
    V = logits.shape[-1]
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # aligned with logits
    tok = torch.nn.functional.cross_entropy(
        logits.reshape(-1, V).float(), shifted.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shifted.shape)
    return _reduce_losses(tok, shifted != -100)


def _reduce_losses(tok: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, float]:
    n = valid.sum(1)
    tok = tok.masked_fill(~valid, 0.0)
    per_sample = (tok.sum(1) / n.clamp(min=1)).masked_fill(n == 0, float("nan"))
    total = int(n.sum())
    batch = float(tok.sum() / total) if total else float("nan")
    return per_sample.double().cpu(), batch
