"""LM loss on rows no method trained on: the "general ability" number of the toy world and of
compare.py's ``--heldout`` (the benchmark's validation rows, or the toy's held-out rows)."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from .data import EncodedSet, encode_rows, load_train_array
from .errors import IcuError
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


def row_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row mean token NLL (B,) of causal-LM logits (B, L, V) against labels (B, L) shifted by
    one, -100 ignored: each row's own loss, whatever else shares its batch."""
    shifted = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    ).view(targets.shape)  # (B, L-1), 0 where ignored
    counts = (targets != -100).sum(1).clamp(min=1)
    return nll.sum(1) / counts


@torch.no_grad()
def heldout_row_losses(model: torch.nn.Module, enc: EncodedSet, indices, batch_size: int) -> np.ndarray:
    """Per-row LM loss (len(indices),) of ``model`` on rows ``indices`` of ``enc`` (float64)."""
    from .decoding.hf import eval_mode, model_device

    device = model_device(model)
    out = []
    indices = list(indices)
    with eval_mode(model):
        for start in range(0, len(indices), batch_size):
            idx = torch.as_tensor(indices[start : start + batch_size], dtype=torch.long)
            logits = model(input_ids=enc.input_ids[idx].to(device),
                           attention_mask=enc.attention_mask[idx].to(device)).logits  # (B, L, V)
            out.append(row_losses(logits, enc.labels[idx].to(device)).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def summarize(losses: np.ndarray) -> dict[str, float]:
    """The held-out loss (mean over rows) and its standard error over rows."""
    losses = np.asarray(losses, dtype=np.float64)
    se = float(losses.std(ddof=1) / np.sqrt(len(losses))) if len(losses) > 1 else float("nan")
    return {"loss": float(losses.mean()), "se": se, "rows": int(len(losses))}


def encode_heldout(rows: np.ndarray, gpt2, tokenizer) -> EncodedSet:
    """Held-out rows encoded as training samples (so the loss is on the trainer's scale)."""
    return encode_rows(rows, np.arange(len(rows)), gpt2, tokenizer)


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
    """Mean over rows of each row's causal-LM loss on ``rows`` (encoded as training samples, as
    the trainer's ``--heldout`` encodes them, so the two give the same number)."""
    gpt2 = load_tokenizer(gpt2_name)
    tok = load_tokenizer(tokenizer_name or model_path)
    model = load_model(model_path, dtype=dtype, device=device)
    losses = heldout_row_losses(model, encode_heldout(rows, gpt2, tok), range(len(rows)), batch_size)
    del model
    return summarize(losses)["loss"]
