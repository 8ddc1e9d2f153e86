"""Greedy continuations of the EL prefixes, decoded only where the model leaves the text.

Greedy decoding is deterministic: if the greedy token after ``x_<i`` is ``x_i``, the
continuation from i is ``x_i`` followed by the continuation from i+1. Walking i backwards from
T-1, only the prefixes where the model leaves the text need decoding. Those are decoded
together, one row per (sample, prefix), starting from slices of the key/value cache of the true
sequence (rows right-aligned so relative distances, hence local-attention windows, stay as in
generate), and rows that are done are dropped from the batch as decoding goes. A memorizing
model leaves the text rarely, so almost nothing is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..metrics import EL_START, el_prefixes, extraction_likelihood
from .forward import CACHE_KW, model_step
from .hf import cache_layers, model_device, position_ids_from_mask
from .kv_cache import preallocated_cache


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


def kv_width(cfg) -> int:
    """Key (or value) numbers per position and layer: hidden size, or less with grouped-query
    attention (Llama, Mistral: num_key_value_heads x head_dim; SmolLM2-135M: 192 of 576)."""
    hidden = getattr(cfg, "hidden_size", None) or 768
    heads = getattr(cfg, "num_attention_heads", None)
    kv_heads = getattr(cfg, "num_key_value_heads", None)
    if not heads or not kv_heads:
        return hidden
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return int(kv_heads * head_dim)


def default_decode_rows(model: torch.nn.Module, T: int) -> int:
    """How many (sample, prefix) rows to decode at once: the row caches fill the budget."""
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "num_layers", None) or 12
    itemsize = next(model.parameters()).element_size()
    # the cache while decoding holds T-1 + T-start positions; count it twice for the copies
    per_row = 2 * 2 * layers * kv_width(cfg) * (2 * T) * itemsize
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
        T, s = self.T, self.start
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
        layers = cache_layers(cache) if self.reuse_cache else None
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
            cache = preallocated_cache(kv, int(need.max()))
        else:  # a prefill over the right-aligned prefixes builds the rows' cache
            _, cache, _ = model_step(
                model,
                last_only=True,
                input_ids=ids,
                attention_mask=amask,
                position_ids=position_ids_from_mask(amask),
                use_cache=True,
            )
            layers = cache_layers(cache)
            if layers is not None:
                cache = preallocated_cache(layers, int(need.max()))
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
                **{CACHE_KW: cache},
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

