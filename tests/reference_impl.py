"""The slow, obviously-correct reference of the forget-set metrics (tests and bench only).

It follows the reference implementation's loops: one ``generate`` call per prefix for MA (one
new token) and for EL (T-i new tokens), n-grams as Python tuples, BERTScore through
``bert_score.score`` (which loads its model on every call). Padding follows the definitions of
:mod:`icu.metrics` so that the fast path can be compared sample by sample:

* MA counts position i iff x_i is real and some token of x_<i is real;
* EL counts prefix i iff some token of x_<i is real, x_i..x_{T-1} are all real, and T-i >= n;
* a continuation that emits eos is padded with the pad token to T-i tokens (generate pads the
  finished rows of a batch, and stops when every row has finished).

Never import this from the package: it exists to check :mod:`icu.forget_eval` and
:mod:`icu.decoding`.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from icu.metrics import word_tokenize

EL_START = 150


def _quiet_generate(model, **kwargs):
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "right-padding detected" on all-pad prompts, flag notes
    try:
        return model.generate(**kwargs)
    finally:
        hf_logging.set_verbosity(previous)


@torch.no_grad()
def slow_ma(model, input_ids, attention_mask, target_length: int, pad_token_id: int) -> list[float]:
    """Per-sample MA with one ``generate(max_new_tokens=1)`` per prefix length i = 1..T-1."""
    device = next(model.parameters()).device
    x = input_ids.to(device)
    mask = attention_mask.to(device)
    B = x.shape[0]
    T = target_length
    hits = [0] * B
    counted = [0] * B
    for i in range(1, T):
        out = _quiet_generate(
            model,
            input_ids=x[:, :i],
            attention_mask=mask[:, :i],
            max_new_tokens=1,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad_token_id,
        )
        pred = out[:, -1].tolist()
        for b in range(B):
            row = mask[b].tolist()
            if row[i] == 1 and any(row[:i]):
                counted[b] += 1
                hits[b] += int(pred[b] == int(x[b, i]))
    return [h / c if c else math.nan for h, c in zip(hits, counted)]


def _ngrams(seq: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(seq[j : j + n]) for j in range(len(seq) - n + 1)]


@torch.no_grad()
def slow_el(
    model,
    input_ids,
    attention_mask,
    target_length: int,
    ns: Sequence[int],
    pad_token_id: int,
    start: int = EL_START,
) -> dict[int, list[float]]:
    """Per-sample EL_n with one greedy ``generate`` per prefix i = T-1 .. start (as the
    reference loops), tuple n-grams, and the reference's match count."""
    device = next(model.parameters()).device
    x = input_ids.to(device)
    mask = attention_mask.to(device)
    B = x.shape[0]
    T = target_length
    numerator = {n: [0.0] * B for n in ns}
    counted = {n: [0] * B for n in ns}
    for i in reversed(range(start, T)):
        out = _quiet_generate(
            model,
            input_ids=x[:, :i],
            attention_mask=mask[:, :i],
            max_new_tokens=T - i,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad_token_id,
        )
        pred = out[:, i:].tolist()
        for b in range(B):
            row = mask[b].tolist()
            if not (any(row[:i]) and all(row[i:T])):
                continue
            p = pred[b] + [pad_token_id] * (T - i - len(pred[b]))
            label = x[b, i:T].tolist()
            for n in ns:
                l_ngrams = _ngrams(label, n)
                if not l_ngrams:  # the reference's ZeroDivisionError: skipped
                    continue
                unique = set(l_ngrams)
                tp = [g for g in _ngrams(p, n) if g in unique]
                numerator[n][b] += len(tp) / len(l_ngrams)
                counted[n][b] += 1
    return {n: [s / c if c else math.nan for s, c in zip(numerator[n], counted[n])] for n in ns}


def _entropy(tokens: list[int]) -> float:
    d: dict[int, int] = {}
    for t in tokens:
        d[t] = d.get(t, 0) + 1
    p = 0.0
    for t in d:
        p -= d[t] / len(tokens) * np.log2(d[t] / len(tokens))
    return float(p)


def _bert_score_reloading(cands, refs, model_path, num_layers, device):
    """``bert_score.score`` per call (model reloaded), empty strings scored 0 as bert-score does."""
    import bert_score
    from transformers.utils import logging as hf_logging

    n = len(cands)
    P, R, F = np.zeros(n), np.zeros(n), np.zeros(n)
    keep = [k for k in range(n) if cands[k].strip() and refs[k].strip()]
    if keep:
        previous = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            p, r, f = bert_score.score(
                [cands[k] for k in keep], [refs[k] for k in keep],
                model_type=model_path, num_layers=num_layers, device=str(device),
            )
        finally:
            hf_logging.set_verbosity(previous)
        P[keep], R[keep], F[keep] = p.double().numpy(), r.double().numpy(), f.double().numpy()
    return P, R, F


@torch.no_grad()
def reference_evaluate(
    model,
    tokenizer,
    gpt2_tokenizer,
    data,
    *,
    bert_path: str,
    bert_layers: Optional[int],
    batch_size: int = 8,
    target_length: int = 200,
    el_ns: Sequence[int] = (10,),
    start: int = EL_START,
    ma: bool = True,
    el: bool = True,
    generation: bool = True,
) -> dict:
    """The reference algorithm for the whole pass, batch by batch: generation check (beam search,
    BLEU, BERTScore reloading its model, diff, entropy), val_loss, slow MA, slow EL.

    Returns {"per_sample": DataFrame, "val_loss": float, "seconds": {part: seconds}}.
    """
    import time

    from nltk.translate.bleu_score import sentence_bleu

    seconds = {"generation": 0.0, "loss": 0.0, "ma": 0.0, "el": 0.0}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    rows = []
    loss_sum, loss_batches = 0.0, 0
    N = len(data)
    for s in range(0, N, batch_size):
        idx = list(range(s, min(N, s + batch_size)))
        ids = data.input_ids[idx].to(device)
        mask = data.attention_mask[idx].to(device)
        labels = data.labels[idx].to(device)
        batch_rows = [{"id": int(data.doc_ids[i])} for i in idx]
        t0 = sync()
        if generation:
            prefixes = gpt2_tokenizer.batch_decode(data.prefix_ids[idx].tolist())
            references = gpt2_tokenizer.batch_decode(data.suffix_ids[idx].tolist())
            enc = tokenizer(prefixes, max_length=50, padding="max_length", truncation=True,
                            return_tensors="pt", padding_side="left")
            out = _quiet_generate(
                model, input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device),
                max_new_tokens=50, num_beams=2, do_sample=False, pad_token_id=pad_id,
            )
            new = out[:, 50:].tolist()
            new = [c + [pad_id] * (50 - len(c)) for c in new]
            candidates = tokenizer.batch_decode(new)
            P, R, F = _bert_score_reloading(candidates, references, bert_path, bert_layers, device)
            for r in range(len(idx)):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    b = sentence_bleu([word_tokenize(references[r].lower())],
                                      word_tokenize(candidates[r].lower()))
                batch_rows[r].update(
                    prefix=prefixes[r], reference=references[r], candidate=candidates[r],
                    bleu=float(b), P=P[r], R=R[r], F1=F[r],
                    diff=len(set(new[r])) / len(new[r]), entropy=_entropy(new[r]),
                )
        t1 = sync()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        loss_sum += float(out.loss)
        loss_batches += 1
        del out
        t2 = sync()
        if ma:
            for r, v in enumerate(slow_ma(model, ids, mask, target_length, pad_id)):
                batch_rows[r]["ma"] = v
        t3 = sync()
        if el:
            res = slow_el(model, ids, mask, target_length, el_ns, pad_id, start)
            for n in el_ns:
                for r, v in enumerate(res[n]):
                    batch_rows[r][f"el_{n}"] = v
        t4 = sync()
        seconds["generation"] += t1 - t0
        seconds["loss"] += t2 - t1
        seconds["ma"] += t3 - t2
        seconds["el"] += t4 - t3
        rows.extend(batch_rows)
    df = pd.DataFrame(rows)
    return {"per_sample": df, "val_loss": loss_sum / loss_batches, "seconds": seconds}

