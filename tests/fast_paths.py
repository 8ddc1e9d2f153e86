"""The fast MA / EL path as standalone functions, for tests and bench only.

:func:`icu.forget_eval.evaluate_forget_set` runs these same steps (a teacher-forced pass per
batch, then :class:`icu.decoding.continuations.ContinuationBuilder`) inside the full validation
pass. Here they stand alone so that tests can compare MA, EL_n and the continuations
themselves with the slow reference (:mod:`reference_impl`), and so that
``bench/bench_forget_eval.py`` can time MA and EL apart from the generation check.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from icu.decoding.continuations import ContinuationBuilder, GreedyStats
from icu.decoding.forward import teacher_forced_pass
from icu.decoding.hf import eos_ids
from icu.metrics import EL_START, check_lengths, memorization_accuracy


@torch.no_grad()
def greedy_continuations(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_length: int, **builder_kw
) -> torch.Tensor:
    """(B, T-start, T-start) ids: row k = g_i for i = start + k, the greedy continuation of
    ``x_<i`` to length T (pad after an eos and past T-i); rows of uncounted prefixes are pad.
    ``builder_kw``: :class:`ContinuationBuilder`'s keywords (``pad_token_id`` required)."""
    T = int(target_length)
    x, mask = input_ids[:, :T], attention_mask[:, :T]
    preds, cache, _, _ = teacher_forced_pass(model, x, mask, use_cache=builder_kw.get("reuse_cache", True))
    b = ContinuationBuilder(model, x.shape[0], T, **builder_kw)
    b.add(range(x.shape[0]), x, mask, preds, cache)
    return b.continuations()


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
    eos = eos_ids(model) if eos_token_ids is None else list(eos_token_ids)
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
