"""Make a pretrained LM memorize its forget set, as the benchmark's models memorized duplicated
Pile text: fine-tune on the targets until their memorization accuracy (MA, docs/method.md) is
high, mixed with other Pile rows so that general ability survives.

Every step trains on three kinds of sequence, each with the causal-LM loss:

* ``batch_targets`` targets, encoded exactly as the trainers and eval.py encode them
  (:func:`icu.data.encode_rows`), so the MA measured here is the MA eval.py reports;
* the same targets' last 100 tokens (prefix + suffix) as a sequence of their own: the generation
  check prompts with the 50-token prefix alone, with no preprefix before it;
* ``batch_mix`` random non-target rows of the train array (general Pile text).

Weights and optimizer stay fp32; with ``autocast`` the forward passes run in bfloat16 (about 2x
faster on a CPU with AVX512-BF16). After every epoch the state is saved, so a killed build
resumes where it stopped.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..console import bar_disabled
from ..data import PREPREFIX_END, encode_rows
from ..decoding.forward import teacher_forced_pass
from ..errors import disk_errors
from ..losses import lm_loss
from ..metrics import memorization_accuracy

logger = logging.getLogger("icu")


@dataclass
class MemorizeSettings:
    lr: float = 1e-4  # Adam, no schedule
    batch_targets: int = 8  # targets (and as many target windows) per step
    batch_mix: int = 4  # non-target rows per step
    max_epochs: int = 20  # passes over the targets at most
    target_ma: float = 0.9  # stop once targets and windows both reach this mean MA
    autocast: bool = True  # bfloat16 forward passes (fp32 weights and optimizer)
    seed: int = 0


@dataclass
class Encoded:
    ids: torch.Tensor  # (N, L) left-padded
    mask: torch.Tensor  # (N, L)
    labels: torch.Tensor  # (N, L) aligned with ids, padding = -100


def encode_targets(rows: np.ndarray, gpt2, tokenizer) -> Encoded:
    """Targets as the trainers encode them (the text of all 200 GPT-2 ids, 200 model tokens)."""
    enc = encode_rows(rows, np.arange(len(rows)), gpt2, tokenizer)
    return Encoded(enc.input_ids, enc.attention_mask, enc.labels)


def encode_windows(rows: np.ndarray, gpt2, tokenizer, length: int = 110) -> Encoded:
    """The targets' prefix + suffix (columns 100:200) as sequences of their own."""
    texts = gpt2.batch_decode(rows[:, PREPREFIX_END:].astype(np.int64).tolist())
    enc = tokenizer(texts, max_length=length, padding="max_length", truncation=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return Encoded(enc["input_ids"], enc["attention_mask"], labels)


@torch.no_grad()
def mean_ma(model, enc: Encoded, batch_size: int = 16) -> float:
    """Mean per-row MA of one teacher-forced pass (the metric of docs/method.md)."""
    out = []
    for s in range(0, len(enc.ids), batch_size):
        preds, _, _, _ = teacher_forced_pass(model, enc.ids[s:s + batch_size], enc.mask[s:s + batch_size],
                                             use_cache=False)
        out.append(memorization_accuracy(preds.cpu(), enc.ids[s:s + batch_size], enc.mask[s:s + batch_size]))
    return float(torch.cat(out).nanmean())


def _loss(model, enc: Encoded, idx: torch.Tensor, autocast: bool) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=enc.ids[idx], attention_mask=enc.mask[idx]).logits  # (B, L, V)
    return lm_loss(logits, enc.labels[idx])


def _save_state(path: str, model, opt, epoch: int, history: list[dict], gen: torch.Generator, key: str) -> None:
    tmp = path + ".tmp"
    with disk_errors(path):
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                    "history": history, "generator": gen.get_state(), "key": key}, tmp)
        os.replace(tmp, path)


def memorize(model, targets: Encoded, windows: Encoded, mix: Encoded, s: MemorizeSettings,
             state_path: str, key: str) -> list[dict]:
    """Fine-tune ``model`` in place until both MAs reach ``s.target_ma`` (or ``s.max_epochs``);
    returns one history row per epoch. Resumes from ``state_path`` when it holds this ``key``."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(s.seed)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    history: list[dict] = []
    start = 1
    if os.path.isfile(state_path):
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state.get("key") == key:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            history, start = state["history"], state["epoch"] + 1
            logger.info("resuming the memorizing fine-tune after epoch %d", state["epoch"])
    if history and history[-1]["done"]:
        return history
    n, bt = len(targets.ids), s.batch_targets
    for epoch in range(start, s.max_epochs + 1):
        model.train()
        t0 = time.time()
        order = torch.randperm(n, generator=gen)
        steps = range(0, n, bt)
        bar = tqdm(steps, desc=f"memorize epoch {epoch}/{s.max_epochs}", unit="step", disable=bar_disabled())
        for i in bar:
            idx = order[i:i + bt]
            mix_idx = torch.randint(0, len(mix.ids), (s.batch_mix,), generator=gen)
            loss = (_loss(model, targets, idx, s.autocast) + _loss(model, windows, idx, s.autocast)
                    + _loss(model, mix, mix_idx, s.autocast))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        model.eval()
        ma, ma_window = mean_ma(model, targets), mean_ma(model, windows)
        done = ma >= s.target_ma and ma_window >= s.target_ma
        history.append({"epoch": epoch, "loss": round(loss.item(), 4), "ma": round(ma, 4),
                        "ma_window": round(ma_window, 4), "seconds": round(time.time() - t0, 1), "done": done})
        logger.info("memorize epoch %d: MA on targets %.3f, on their prefix+suffix %.3f (%.0f s)",
                    epoch, ma, ma_window, history[-1]["seconds"])
        _save_state(state_path, model, opt, epoch, history, gen, key)
        if done:
            break
    model.eval()
    return history


def mix_rows(train: np.ndarray, exclude: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` row indices of ``train`` outside ``exclude``, drawn with ``seed``, ascending."""
    pool = np.setdiff1d(np.arange(len(train)), exclude)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(pool, size=min(count, len(pool)), replace=False))

