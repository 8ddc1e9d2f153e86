"""LM loss on rows no method trained on: the "general ability" number of the toy world and of
compare.py's ``--heldout`` (the benchmark's validation rows, or the toy's held-out rows)."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from .data import encode_rows, load_train_array
from .errors import IcuError
from .losses import lm_loss
from .models import BUILTIN_GPT2, load_model, load_tokenizer


def load_heldout(path: str) -> np.ndarray:
    """An (N, 200) uint16 array of GPT-2 id rows; IcuError naming the file and the fix."""
    if not os.path.isfile(path):
        raise IcuError(
            f"--heldout {path!r} not found; save an (N, 200) uint16 array of rows no method trains "
            "on, e.g. the toy's: np.save(path, np.load('datasets/toy/train_dataset.npy')"
            "[np.load('datasets/toy/heldout_ids.npy')[:256]])"
        )
    return load_train_array(path, name=f"--heldout {path}")


@torch.no_grad()
def mean_lm_loss(
    model_path: str,
    rows: np.ndarray,
    batch_size: int = 16,
    gpt2_name: str = BUILTIN_GPT2,
    tokenizer_name: Optional[str] = None,
    device: str | torch.device = "cpu",
    dtype: Optional[str] = None,
) -> float:
    """Mean over batches of the causal-LM loss on ``rows`` (encoded as training samples, so the
    number is on the same scale as the trainer's val_loss)."""
    gpt2 = load_tokenizer(gpt2_name)
    tok = load_tokenizer(tokenizer_name or model_path)
    model = load_model(model_path, dtype=dtype, device=device)
    enc = encode_rows(rows, np.arange(len(rows)), gpt2, tok)
    losses = []
    for start in range(0, len(rows), batch_size):
        sl = slice(start, start + batch_size)
        logits = model(
            input_ids=enc.input_ids[sl].to(device), attention_mask=enc.attention_mask[sl].to(device)
        ).logits  # (B, L, V)
        losses.append(lm_loss(logits, enc.labels[sl].to(device)).item())
    del model
    return float(np.mean(losses))
