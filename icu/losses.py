"""The three ICU loss terms and their combination (docs/method.md#loss).

    loss = -uw * L_unlearn + lw * L_learn + kl * L_kl

L_unlearn / L_learn are the usual causal-LM cross-entropies (labels shifted by one, -100
ignored, mean over the remaining tokens). L_kl is the cross-entropy of the current model's
distribution q against the original model's p0 on the learn input, averaged over samples and
all positions: -sum_v p0(v) log(q(v) + 1e-12). It equals KL(p0 || q) plus p0's entropy, a
constant, so its gradient is the KL's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KL_EPS = 1e-12


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM cross-entropy: logits (B, L, V) predict labels shifted by one; -100 ignored."""
    shifted = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=-100)


def kl_term(logits: torch.Tensor, reference_probs: torch.Tensor) -> torch.Tensor:
    """Mean over samples and positions of -sum_v p0(v) * log(q(v) + 1e-12), q = softmax(logits)."""
    q = torch.softmax(logits.float(), dim=-1)
    per_position = -(reference_probs.float() * torch.log(q + KL_EPS)).sum(-1)
    return per_position.mean()


def icu_loss(
    unlearn_loss: torch.Tensor,
    learn_loss: torch.Tensor,
    kl_loss: torch.Tensor,
    uw: float,
    lw: float,
    kl: float,
) -> torch.Tensor:
    """-uw * L_unlearn + lw * L_learn + kl * L_kl."""
    return -uw * unlearn_loss + lw * learn_loss + kl * kl_loss
