"""Loss terms every method builds from (docs/method.md#loss; the methods in docs/methods.md).

ICU combines three of them:

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


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) per sample: the sum over scored tokens (labels shifted by one, -100 ignored)
    of the token log-probabilities. logits (B, L, V), labels (B, L) -> (B,)."""
    shifted = logits[:, :-1, :].float().transpose(1, 2)  # (B, V, L-1), cross_entropy's layout
    nll = F.cross_entropy(shifted, labels[:, 1:], ignore_index=-100, reduction="none")  # (B, L-1)
    return -nll.sum(-1)


def scored_tokens(labels: torch.Tensor) -> torch.Tensor:
    """|y| per sample: the number of tokens :func:`sequence_logprob` scores. (B, L) -> (B,)."""
    return (labels[:, 1:] != -100).sum(-1)


def npo_loss(log_ratio: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO: mean over samples of (2/beta) * log(1 + exp(beta * log_ratio)), written as
    -(2/beta) * logsigmoid(-beta * log_ratio) so a large ratio cannot overflow. (B,) -> ()."""
    return (-(2.0 / beta) * F.logsigmoid(-beta * log_ratio)).mean()


def simnpo_loss(mean_logprob: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimNPO: mean over samples of -(2/beta) * logsigmoid(-beta * mean_logprob - gamma), where
    mean_logprob is log pi(y|x) / |y| (no reference model). (B,) -> ()."""
    return (-(2.0 / beta) * F.logsigmoid(-beta * mean_logprob - gamma)).mean()
