"""Membership inference as a second measure of forgetting (docs/method.md#membership-inference).

Four per-row scores, each higher for text that looks more familiar to the model, and the ROC
AUC with which each one separates the forget targets (positives) from rows the model never saw
(negatives). AUC 1: every target looks more familiar than every unseen row; 0.5: the two cannot
be told apart, which is what a forgotten target should look like.

The scores use every token the model predicts while it reads the row, in one forward pass:

* how it reads the row: a tokenizer with GPT-2's ids (GPT-2, GPT-Neo, ...) gets the row's 200
  ids themselves; any other tokenizer gets the row's text (the GPT-2 decode of the 200 ids, as
  :func:`icu.data.encode_rows` makes it) re-encoded in full, special tokens it adds included but
  never scored; rows of a batch are left-padded, with position ids from the attention mask so a
  row scores the same whatever it is batched with;
* ``loss``: minus the mean token NLL (the mean token log-probability);
* ``zlib``: ``loss`` divided by the zlib-compressed byte length of the row's text (Carlini et
  al. 2021); the text is always the GPT-2 decode of the 200-id row, UTF-8, ``zlib.compress``
  at its default level;
* ``min_k``: Min-K% Prob (Shi et al. 2023), the mean of the k lowest token log-probabilities;
* ``min_k_pp``: Min-K%++ (Zhang et al. 2024), the mean of the k lowest
  ``z_t = (log p(x_t) - mu_t) / sigma_t``, with ``mu_t = sum_v p_v log p_v`` and
  ``sigma_t^2 = sum_v p_v (log p_v)^2 - mu_t^2`` under the model's next-token distribution;

with ``k = max(1, int(0.4 * T))`` of the row's T predicted tokens. The log-softmax is taken in
float32 whatever the model's dtype. Only one batch's logits are held at a time.

:func:`membership_eval` is the entry point (model objects in, no file I/O); eval.py writes its
results to ``membership.csv`` / ``membership.json``.
"""

from __future__ import annotations

import zlib
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from .errors import IcuError

MIN_K_FRACTION = 0.4
SCORE_COLUMNS = ("loss", "zlib", "min_k", "min_k_pp")
AUC_KEYS = tuple(f"auc_{c}" for c in SCORE_COLUMNS)  # auc_loss, auc_zlib, auc_min_k, auc_min_k_pp
ROW_COLUMNS = ("kind", "id", "tokens", "zlib_bytes") + SCORE_COLUMNS
GPT2_VOCAB = 50257
# Elements per slice of the (positions, V) float32 temporaries: 8 MiB on a CPU (larger ones are
# fresh pages on every allocation and ran ~10x slower per element), 64 MiB on an accelerator.
_CPU_CHUNK_ELEMENTS = 1 << 21
_CHUNK_ELEMENTS = 1 << 24
# log p below this is exp() == 0 in float32, so clamping there changes no sum; it keeps
# 0 * (-inf) (a -inf logit) from turning mu_t and sigma_t into NaN.
_LOGP_FLOOR = -1.0e4


# --------------------------------------------------------------------------- pure functions


def min_k_count(tokens: int, fraction: float = MIN_K_FRACTION) -> int:
    """k = max(1, int(fraction * T)): how many of a row's T token values the Min-K scores average."""
    return max(1, int(fraction * int(tokens)))


def _chunk_elements(device: torch.device) -> int:
    return _CPU_CHUNK_ELEMENTS if device.type == "cpu" else _CHUNK_ELEMENTS


def token_scores(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per predicted token: log p(x_t) and Min-K%++'s z_t.

    ``logits`` (B, L, V) of one forward; ``labels`` (B, L) aligned with the inputs, -100 where
    nothing is predicted. Shifted as the LM loss is: position t's logits predict label t+1.
    Returns (logp (B, L-1) float32, z (B, L-1) float32, valid (B, L-1) bool); entries that are
    not valid are 0 (whatever the logits hold there, e.g. NaN at padding).
    """
    B, L, V = logits.shape
    targets = labels[:, 1:].to(logits.device)  # (B, L-1)
    valid = targets != -100
    logp = torch.zeros(B, L - 1, dtype=torch.float32, device=logits.device)
    z = torch.zeros_like(logp)
    b_idx, t_idx = valid.nonzero(as_tuple=True)  # (n,), (n,): only predicted positions cost anything
    step = max(1, _chunk_elements(logits.device) // V)
    for s in range(0, b_idx.numel(), step):
        b, t = b_idx[s : s + step], t_idx[s : s + step]
        lsm = torch.log_softmax(logits[b, t].float(), dim=-1)  # (c, V)
        lp = lsm.gather(1, targets[b, t].unsqueeze(1)).squeeze(1)  # (c,)
        lsm.clamp_min_(_LOGP_FLOOR)  # in place from here on: no more (c, V) buffers than needed
        p = lsm.exp()
        mu = torch.linalg.vecdot(p, lsm)  # (c,) = sum_v p_v log p_v
        # two-pass variance: equals sum p (log p)^2 - mu^2 but cannot go negative by cancellation
        var = torch.linalg.vecdot(p, lsm.sub_(mu.unsqueeze(1)).square_())  # (c,)
        sigma = var.sqrt().clamp_min(torch.finfo(torch.float32).tiny)  # a one-hot distribution: not 0/0
        logp[b, t] = lp
        z[b, t] = (lp - mu) / sigma
    return logp, z, valid


def lowest_k_mean(values: torch.Tensor, valid: torch.Tensor, fraction: float = MIN_K_FRACTION) -> torch.Tensor:
    """Per row, the mean of the k = max(1, int(fraction * T)) lowest valid values.

    values, valid (B, M) -> float64 (B,) on the CPU; NaN for a row without valid values."""
    values = values.detach().double().cpu()
    valid = valid.cpu()
    counts = valid.sum(1).tolist()
    ordered = torch.where(valid, values, torch.full_like(values, float("inf"))).sort(dim=1).values  # (B, M)
    k = torch.tensor([min_k_count(t, fraction) for t in counts], dtype=torch.long)  # (B,)
    take = torch.arange(values.shape[1])[None, :] < k[:, None]  # (B, M): the k lowest
    out = torch.where(take, ordered, torch.zeros_like(ordered)).sum(1) / k.double()
    return out.masked_fill(torch.tensor(counts) == 0, float("nan"))


def row_scores(logp: torch.Tensor, z: torch.Tensor, valid: torch.Tensor, zlib_bytes: Sequence[int],
               fraction: float = MIN_K_FRACTION) -> dict[str, np.ndarray]:
    """The four scores per row from :func:`token_scores`' output (each (B, M)) and the rows'
    zlib-compressed text lengths (B,): {"tokens", "loss", "zlib", "min_k", "min_k_pp"} -> (B,)
    arrays (float64; tokens int64). NaN scores for a row with no predicted token."""
    valid = valid.cpu()
    lp = logp.detach().double().cpu()
    T = valid.sum(1)
    mean_logp = torch.where(valid, lp, torch.zeros_like(lp)).sum(1) / T.clamp(min=1)
    mean_logp = mean_logp.masked_fill(T == 0, float("nan"))  # = -mean NLL
    return {
        "tokens": T.numpy().astype(np.int64),
        "loss": mean_logp.numpy(),
        "zlib": (mean_logp / torch.as_tensor(np.asarray(zlib_bytes, dtype=np.float64))).numpy(),
        "min_k": lowest_k_mean(lp, valid, fraction).numpy(),
        "min_k_pp": lowest_k_mean(z, valid, fraction).numpy(),
    }


def zlib_length(text: str) -> int:
    """Bytes of ``zlib.compress`` (default level) of the UTF-8 text."""
    return len(zlib.compress(text.encode("utf-8")))


def roc_auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """ROC AUC of scores where higher should mean positive: the probability that a random
    positive outscores a random negative, a tie counting 1/2 (Mann-Whitney U / (n_pos n_neg),
    from average ranks). ValueError on an empty side or a NaN score."""
    pos = np.asarray(positives, dtype=np.float64).ravel()
    neg = np.asarray(negatives, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError("ROC AUC needs at least one positive and one negative score")
    scores = np.concatenate([pos, neg])
    if np.isnan(scores).any():
        raise ValueError("ROC AUC of NaN scores is undefined")
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    # tie groups of the sorted scores get the average of the 1-based ranks they span
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], scores.size]  # exclusive
    ranks = np.empty(scores.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0  # pairs a positive wins (+ ties/2)
    return float(u / (pos.size * neg.size))


# --------------------------------------------------------------------------- the model's reading


def reads_gpt2_ids(tokenizer) -> bool:
    """Whether the model reads the rows' GPT-2 ids as they are (its tokenizer maps every GPT-2
    token to GPT-2's id: GPT-2, GPT-Neo, GPT-J), rather than their text re-encoded."""
    from .models import gpt2_id_mismatches

    return gpt2_id_mismatches(tokenizer) == 0


def membership_inputs(
    rows: np.ndarray, tokenizer, gpt2_tokenizer
) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """(input ids, labels, texts) per row, unpadded: the ids as the model reads the row, the
    labels the same ids with -100 on the first token (nothing before it: with left padding a pad
    would "predict" it) and on tokens the tokenizer adds (a bos, an eos: not text), and the
    row's text (the GPT-2 decode of its 200 ids)."""
    texts = gpt2_tokenizer.batch_decode([list(map(int, r)) for r in rows])
    if reads_gpt2_ids(tokenizer):
        ids = [list(map(int, r)) for r in rows]
        labels = [[-100] + r[1:] for r in ids]
        return ids, labels, texts
    enc = tokenizer(texts, truncation=False, return_special_tokens_mask=True)
    labels = [[-100 if special or j == 0 else t for j, (t, special) in enumerate(zip(i, m))]
              for i, m in zip(enc["input_ids"], enc["special_tokens_mask"])]
    return [list(i) for i in enc["input_ids"]], labels, texts


def _left_pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([[value] * (width - len(s)) + s for s in seqs], dtype=torch.long)  # (B, width)


def _check_inputs(ids: list[list[int]], model, source: str) -> None:
    """IcuError when the model cannot read the encoded rows (an id outside its embedding, or
    more tokens than its positions)."""
    from .decoding.hf import vocab_size

    vocab = vocab_size(model)
    top = max(max(s) for s in ids if s) if any(ids) else 0
    if top >= vocab:
        raise IcuError(
            f"{source}: token id {top} as the model reads the rows, but its vocabulary has {vocab} entries; "
            "use the model's own tokenizer (--tokenizer_name) or a model whose vocabulary covers these ids"
        )
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    longest = max(len(s) for s in ids)
    if limit is not None and longest > int(limit):
        raise IcuError(
            f"{source}: a row reads as {longest} tokens but the model allows {limit} positions; "
            "membership scores use every token of the row"
        )


def _pad_id(tokenizer) -> int:
    for cand in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if cand is not None:
            return int(cand)
    return 0  # masked anyway


def _checked_rows(rows, source: str) -> np.ndarray:
    from .data import validate_token_array

    return validate_token_array(np.asarray(rows), source, vocab_size=GPT2_VOCAB)


@torch.no_grad()
def membership_scores(
    model: torch.nn.Module,
    tokenizer,
    gpt2_tokenizer,
    rows: np.ndarray,
    batch_size: int = 8,
    device: Optional[str | torch.device] = None,
    *,
    ids: Optional[Sequence[int]] = None,
    source: str = "rows",
    progress: bool = False,
) -> pd.DataFrame:
    """The four membership scores of each row: one forward pass per row, ``batch_size`` rows at
    a time.

    ``rows``: (N, 200) uint16 GPT-2 ids; ``ids``: their names in the output (default 0..N-1);
    ``device``: where the inputs go (default: the model's). ``source`` names the rows in errors.
    Returns one row per input row, in order: id, tokens (T, the predicted tokens), zlib_bytes,
    loss, zlib, min_k, min_k_pp (module docstring). IcuError on rows the model cannot read.
    """
    from tqdm.auto import tqdm

    from .decoding.hf import eval_mode, model_device, position_ids_from_mask, unwrap_model

    if batch_size < 1:
        raise IcuError(f"batch size must be a positive integer (got {batch_size})")
    rows = _checked_rows(rows, source)
    ids = np.arange(len(rows), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    if ids.shape != (len(rows),):
        raise ValueError(f"{len(ids)} ids for {len(rows)} rows")
    inner = unwrap_model(model)
    input_ids, labels, texts = membership_inputs(rows, tokenizer, gpt2_tokenizer)
    _check_inputs(input_ids, inner, source)
    device = model_device(inner) if device is None else torch.device(device)
    pad = _pad_id(tokenizer)
    zlib_bytes = [zlib_length(t) for t in texts]
    parts: list[dict[str, np.ndarray]] = []
    with eval_mode(model, inner):
        for s in tqdm(range(0, len(rows), batch_size), desc="membership", disable=not progress, leave=False):
            x = _left_pad(input_ids[s : s + batch_size], pad).to(device)  # (B, L)
            y = _left_pad(labels[s : s + batch_size], -100).to(device)  # (B, L)
            mask = _left_pad([[1] * len(r) for r in input_ids[s : s + batch_size]], 0).to(device)  # (B, L)
            kwargs = dict(input_ids=x, attention_mask=mask, use_cache=False)
            if bool((mask == 0).any()):
                # positions count real tokens only, so padding does not move a row's positions
                kwargs["position_ids"] = position_ids_from_mask(mask)
            logits = inner(**kwargs).logits  # (B, L, V)
            logp, z, valid = token_scores(logits, y)
            del logits
            parts.append(row_scores(logp, z, valid, zlib_bytes[s : s + batch_size]))
    cols = {k: np.concatenate([p[k] for p in parts]) for k in ("tokens",) + SCORE_COLUMNS}
    return pd.DataFrame({"id": ids, "tokens": cols["tokens"], "zlib_bytes": np.asarray(zlib_bytes, dtype=np.int64),
                         **{c: cols[c] for c in SCORE_COLUMNS}})


def membership_aucs(per_row: pd.DataFrame) -> dict[str, float]:
    """{auc_loss, auc_zlib, auc_min_k, auc_min_k_pp}: ROC AUC of each score, the rows of kind
    'target' positive and 'unseen' negative."""
    is_target = per_row["kind"] == "target"
    return {f"auc_{c}": roc_auc(per_row.loc[is_target, c], per_row.loc[~is_target, c]) for c in SCORE_COLUMNS}


def membership_eval(
    model: torch.nn.Module,
    tokenizer,
    gpt2_tokenizer,
    target_rows: np.ndarray,
    unseen_rows: np.ndarray,
    batch_size: int = 8,
    device: Optional[str | torch.device] = None,
    *,
    target_ids: Optional[Sequence[int]] = None,
    unseen_ids: Optional[Sequence[int]] = None,
    progress: bool = False,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Membership inference of the forget targets against rows the model never saw.

    ``target_rows``, ``unseen_rows``: (N, 200) and (M, 200) uint16 GPT-2 id rows; ``*_ids``
    name them in the output (default 0..N-1, 0..M-1). The model is left in the training mode
    it came in. Returns (per-row frame: kind 'target'/'unseen', id, tokens, zlib_bytes, loss,
    zlib, min_k, min_k_pp, targets first; {auc_loss, auc_zlib, auc_min_k, auc_min_k_pp}).
    IcuError on bad rows (shape, dtype, ids, an empty set) or rows the model cannot read.
    """
    frames = []
    for kind, rows, names in (("target", target_rows, target_ids), ("unseen", unseen_rows, unseen_ids)):
        df = membership_scores(model, tokenizer, gpt2_tokenizer, rows, batch_size, device, ids=names,
                               source=f"the {kind} rows", progress=progress)
        if int((df["tokens"] == 0).sum()):
            i = int(np.flatnonzero(df["tokens"].to_numpy() == 0)[0])
            raise IcuError(f"the {kind} rows: row {i} reads as no predicted token; it cannot be scored")
        frames.append(df.assign(kind=kind))
    per_row = pd.concat(frames, ignore_index=True)[list(ROW_COLUMNS)]
    return per_row, membership_aucs(per_row)
