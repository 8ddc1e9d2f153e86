"""One validation pass over the forget set: generation check, loss, MA and EL_n (docs/method.md,
"Validation", "MA", "EL_n"). The trainers and eval.py call :func:`evaluate_forget_set`; the
decoding it relies on lives in :mod:`icu.decoding`.

Why it is fast, and why the numbers stay the reference's:

* MA: the greedy next token after ``x_<i`` is the argmax of the logits at position i-1 of one
  teacher-forced pass over ``x_<T`` (position ids from the attention mask, as generate builds
  them for left-padded prompts), instead of 199 one-token ``generate`` calls.
* EL_n: only the prefixes where the model leaves the text are decoded, batched across samples,
  from slices of the true sequence's key/value cache (:mod:`icu.decoding.continuations`).
* The output layer: for architectures whose logits are ``lm_head(hidden)`` it is applied tile by
  tile with a running argmax and log-sum-exp (:mod:`icu.decoding.head`), so batch x T x
  vocabulary logits are never stored; MA, the first EL tokens and the loss come from one pass.
* Generation check: a lean beam search that follows generate's algorithm step for step but
  scores the vocabulary tile by tile; generate itself is used in bf16/fp16 and for models with
  logits processors or another output layer (:mod:`icu.decoding.beam`).
* BERTScore's model is loaded once per process (:func:`icu.metrics.get_bertscorer`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from .console import bar_disabled
from .data import EncodedSet, load_experiment, load_set
from .decoding.beam import generate_candidates
from .decoding.continuations import ContinuationBuilder, GreedyStats
from .decoding.forward import teacher_forced_pass
from .decoding.hf import eos_ids, eval_mode, model_device, unwrap_model, vocab_size
from .errors import IcuError
from .metrics import (
    EL_START,
    bleu as bleu_score,
    check_lengths,
    distinct_ratio,
    el_column,
    flag_rule,
    memorization_accuracy,
    token_entropy,
)

# unwrap_model and vocab_size are imported from here by eval.py and other callers
__all__ = [
    "EVAL_SCORE_COLUMNS", "GEN_COLUMNS", "ForgetEvalResult", "eval_outputs", "GreedyStats", "evaluate_forget_set", "load_forget_set",
    "unwrap_model", "vocab_size",
]

logger = logging.getLogger("icu")

# unlearn.csv's columns, in order (evaluation/convert.py reads them by name)
GEN_COLUMNS = ("id", "prefix", "reference", "candidate", "bleu", "P", "R", "F1", "diff", "entropy")
# eval.csv's mean columns before val_loss, ma and EL
EVAL_SCORE_COLUMNS = ("bleu", "P", "R", "F1", "diff", "entropy")


def eval_outputs(per_sample: pd.DataFrame, val_loss: float, el_cols: Sequence[str]) -> tuple[pd.DataFrame, dict]:
    """eval.py's two outputs from a pass's per-sample table: unlearn.csv's frame (sorted by id;
    the reference's columns first, then ma, the EL columns, loss) and eval.csv's row (the means
    of EVAL_SCORE_COLUMNS, val_loss, ma, the EL means). compare.py builds the same two from a
    run's last validation."""
    per_sample = per_sample.sort_values("id", kind="stable")
    summary = {col: float(per_sample[col].mean()) for col in EVAL_SCORE_COLUMNS}
    summary.update(val_loss=float(val_loss), ma=float(per_sample["ma"].mean()),
                   **{c: float(per_sample[c].mean()) for c in el_cols})
    return per_sample[list(GEN_COLUMNS) + ["ma", *el_cols, "loss"]], summary


def load_forget_set(data_dir: str, exp: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows, doc_ids) of split ``exp``'s forget set under ``data_dir``.

    ``all`` is the folder data_prep.py writes for the union of the splits; when it is missing,
    the union of every ``exp*/unlearn`` set found is used (ascending doc_id, no duplicates).
    """
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


@dataclass
class ForgetEvalResult:
    """Everything one validation pass computed."""

    # id, prefix, reference, candidate, bleu, P, R, F1, diff, entropy, ma, the EL columns, loss
    per_sample: pd.DataFrame
    flags: np.ndarray  # int64 (N,): 1 iff F1 >= f1 and bleu >= bleu
    val_loss: float  # mean over batches of the batch LM loss
    loss_sum: float
    loss_batches: int
    ma: float  # mean MA over samples
    el: dict[int, float] = field(default_factory=dict)  # n -> mean EL_n
    el_start: int = EL_START  # the EL definition; its columns are named el_column(n, el_start)
    stats: GreedyStats = field(default_factory=GreedyStats)
    seconds: dict[str, float] = field(default_factory=dict)  # wall clock per phase

    def summary(self) -> dict[str, float]:
        """Column means of the numeric per-sample columns, plus val_loss, ma and the EL means."""
        out: dict[str, float] = {}
        for col in self.per_sample.columns:
            if col == "id" or not pd.api.types.is_numeric_dtype(self.per_sample[col]):
                continue
            out[col] = float(self.per_sample[col].mean())
        out["val_loss"] = float(self.val_loss)
        out["ma"] = float(self.ma)
        for n, v in self.el.items():
            out[el_column(n, self.el_start)] = float(v)
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
    quarter of free memory on a GPU). ``beam_impl``: see :func:`icu.decoding.beam.generate_candidates`.
    The model is put in eval mode for the pass and its training mode restored afterwards.
    """
    from tqdm.auto import tqdm

    el_ns = tuple(int(n) for n in el_ns)
    inner = unwrap_model(model)
    indices = _checked_request(inner, data, indices, batch_size, generation, scorer, target_length, el_ns, el_start)
    gen_batch_size = int(gen_batch_size or 4 * batch_size)
    pad_id, eos = _pad_and_eos(tokenizer, inner)

    N = len(indices)
    stats = GreedyStats()
    clock = _PhaseClock(model_device(inner))
    with eval_mode(model, inner), torch.no_grad():
        bar = tqdm(total=N * (2 if generation else 1), desc=desc, unit="sample",
                   disable=bar_disabled(progress), leave=False)
        ma, tok_loss, batch_losses, el = _forward_phase(
            inner, data, indices, batch_size=batch_size, target_length=target_length, el_ns=el_ns,
            el_start=el_start, pad_id=pad_id, eos=eos, decode_rows=decode_rows, stats=stats,
            bar=bar, clock=clock,
        )
        idx = torch.as_tensor(indices, dtype=torch.long)
        prefixes = gpt2_tokenizer.batch_decode(data.prefix_ids[idx].tolist())
        references = gpt2_tokenizer.batch_decode(data.suffix_ids[idx].tolist())
        cand_ids: list[list[int]] = [[] for _ in range(N)]
        if generation:
            cand_ids = _generate_all(inner, tokenizer, prefixes, gen_batch_size, beam_impl, bar)
        bar.close()
        clock.mark("generation")

    candidates = tokenizer.batch_decode(cand_ids) if generation else [""] * N
    df = _per_sample_frame(
        data.doc_ids[idx].numpy().astype(np.int64), prefixes, references, candidates, cand_ids,
        generation, ma, el, el_ns, el_start, tok_loss,
    )
    clock.mark("text_metrics")
    flags = (_bertscore_and_flags(df, candidates, references, scorer, f1, bleu, clock)
             if generation else np.zeros(N, dtype=np.int64))
    result = ForgetEvalResult(
        per_sample=df,
        flags=flags,
        val_loss=float(np.mean(batch_losses)),
        loss_sum=float(np.sum(batch_losses)),
        loss_batches=len(batch_losses),
        ma=_nanmean(df["ma"].to_numpy()),
        el={n: _nanmean(df[el_column(n, el_start)].to_numpy()) for n in el_ns},
        el_start=el_start,
        stats=stats,
        seconds=clock.seconds,
    )
    _log_result(result, desc, generation)
    return result


def _checked_request(
    model: torch.nn.Module, data: EncodedSet, indices: Optional[Sequence[int]], batch_size: int,
    generation: bool, scorer, target_length: int, el_ns: tuple[int, ...], el_start: int,
) -> list[int]:
    """The sample indices to evaluate, after checking the request against the data and model
    (IcuError on bad input, ValueError on a caller's mistake)."""
    indices = list(range(len(data))) if indices is None else [int(i) for i in indices]
    if len(data) == 0 or len(indices) == 0:
        raise IcuError("the forget set is empty; nothing to evaluate")
    if min(indices) < 0 or max(indices) >= len(data):
        raise IcuError(f"indices must lie in [0, {len(data)}) for a forget set of {len(data)} samples")
    if batch_size < 1:
        raise IcuError(f"batch size must be a positive integer (got {batch_size})")
    if generation and scorer is None:
        raise ValueError("evaluate_forget_set(generation=True) needs a BERTScore scorer")
    L = data.input_ids.shape[1]
    check_lengths(L, target_length, el_ns, el_start)
    if data.labels.shape[1] != L:
        raise IcuError(
            f"labels have {data.labels.shape[1]} tokens but inputs {L}; the LM loss needs "
            "--suffix_length equal to --prefix_length"
        )
    top = int(data.input_ids[indices].max())
    if top >= vocab_size(model):
        raise IcuError(
            f"token id {top} in the forget set but the model's vocabulary has {vocab_size(model)} "
            "entries; use a model whose tokenizer covers these ids"
        )
    return indices


def _pad_and_eos(tokenizer, model: torch.nn.Module) -> tuple[int, list[int]]:
    """(pad id, eos ids): the tokenizer's pad (else its eos, else the model's eos, else 0)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = eos_ids(model)
    if pad_id is None:
        pad_id = eos[0] if eos else 0
    return pad_id, eos


def _forward_phase(
    model: torch.nn.Module, data: EncodedSet, indices: list[int], *, batch_size: int, target_length: int,
    el_ns: tuple[int, ...], el_start: int, pad_id: int, eos: list[int], decode_rows: Optional[int],
    stats: GreedyStats, bar, clock: _PhaseClock,
) -> tuple[torch.Tensor, torch.Tensor, list[float], dict[int, torch.Tensor]]:
    """Teacher-forced passes batch by batch, then the EL decoding: (per-sample MA (N,),
    per-sample loss (N,), the batch losses, per-sample EL_n (N,) per n)."""
    builder = None
    if el_ns:
        builder = ContinuationBuilder(
            model, len(indices), target_length, start=el_start, pad_token_id=pad_id,
            eos_token_ids=eos, max_rows=decode_rows, stats=stats,
        )
    ma, tok_loss, batch_losses = [], [], []
    bar.set_postfix_str("loss, MA, EL")
    for s in range(0, len(indices), batch_size):
        batch = indices[s : s + batch_size]
        m_b, l_b, loss = _forward_batch(model, data, batch, s, target_length, builder)
        ma.append(m_b)
        tok_loss.append(l_b)
        batch_losses.append(loss)
        bar.update(len(batch))
    clock.mark("forward")
    el = builder.finish(el_ns) if builder is not None else {}
    clock.mark("el_decode")
    return torch.cat(ma), torch.cat(tok_loss), batch_losses, el


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


def _generate_all(model, tokenizer, prefixes: list[str], gen_batch_size: int, beam_impl: str, bar) -> list[list[int]]:
    """The generation check's candidate ids for every prefix, ``gen_batch_size`` at a time."""
    cand_ids: list[list[int]] = [[] for _ in range(len(prefixes))]
    bar.set_postfix_str("generation")
    for s in range(0, len(prefixes), gen_batch_size):
        new = generate_candidates(model, tokenizer, prefixes[s : s + gen_batch_size], impl=beam_impl)
        cand_ids[s : s + new.shape[0]] = new.tolist()
        bar.update(new.shape[0])
    return cand_ids


def _per_sample_frame(
    ids: np.ndarray, prefixes: list[str], references: list[str], candidates: list[str],
    cand_ids: list[list[int]], generation: bool, ma: torch.Tensor, el: dict[int, torch.Tensor],
    el_ns: tuple[int, ...], el_start: int, tok_loss: torch.Tensor,
) -> pd.DataFrame:
    """One row per sample: the texts, the text metrics of the candidate (NaN without the
    generation check; BERTScore's P/R/F1 filled in later), MA, EL_n (named for its
    definition: el_10 is ICU's, el_10_from1 Knowledge Unlearning's) and the loss."""
    nan = np.full(len(prefixes), np.nan)
    df = pd.DataFrame(
        {
            "id": ids,
            "prefix": prefixes,
            "reference": references,
            "candidate": candidates,
            "bleu": [bleu_score(r, c) for r, c in zip(references, candidates)] if generation else nan,
            "P": nan,
            "R": nan,
            "F1": nan,
            "diff": [distinct_ratio(c) for c in cand_ids] if generation else nan,
            "entropy": [token_entropy(c) for c in cand_ids] if generation else nan,
            "ma": ma.numpy(),
        }
    )
    for n in el_ns:
        df[el_column(n, el_start)] = el[n].cpu().numpy()
    df["loss"] = tok_loss.numpy()
    return df


def _bertscore_and_flags(
    df: pd.DataFrame, candidates: list[str], references: list[str], scorer, f1: float, bleu: float,
    clock: _PhaseClock,
) -> np.ndarray:
    """Fill BERTScore's P/R/F1 into ``df``; the flags (N,) of the flag rule."""
    P, R, F = scorer.score(candidates, references)
    df["P"], df["R"], df["F1"] = P, R, F
    flags = flag_rule(df["F1"].to_numpy(), df["bleu"].to_numpy(), f1, bleu)
    clock.mark("bertscore")
    return flags


def _log_result(result: ForgetEvalResult, desc: str, generation: bool) -> None:
    stats = result.stats
    logger.info(
        "%s: %d samples, val_loss %.4f, ma %.4f%s%s; decoded %d of %d EL prefixes; %s",
        desc, len(result.flags), result.val_loss, result.ma,
        "".join(f", el_{n} {v:.4f}" for n, v in result.el.items()),
        f", {int(result.flags.sum())} flagged" if generation else "",
        stats.decoded_rows, stats.prefixes,
        " ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()),
    )
