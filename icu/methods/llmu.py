"""LLMU (Large Language Model Unlearning, Yao et al. 2023), as the reference ran it: ascend on
the target, teach the target's input to continue with the learn text's tokens instead, and keep
the learn text's distribution close to the original model's.

    loss = -uw * NLL(target) + lw * NLL(target input -> learn tokens) + kl * CE(p0 || p on learn)
"""

from __future__ import annotations

from ..losses import lm_loss
from .base import Method, StepBatch, add_retain_terms, register


@register
class LLMU(Method):
    name = "llmu"
    uses = ("uw", "lw", "kl")
    terms = ("unlearn", "mismatch", "kl")

    def needs_learn(self, hp) -> bool:
        return hp.kl != 0  # the mismatch term reuses the target's forward

    def needs_reference(self, hp) -> bool:
        return hp.kl != 0

    def loss(self, b: StepBatch, hp):
        unlearn = lm_loss(b.forget_logits, b.forget_labels)
        mismatch = lm_loss(b.forget_logits, b.learn_labels)
        terms = {"unlearn": unlearn, "mismatch": mismatch}
        return add_retain_terms(b, -hp.uw * unlearn + hp.lw * mismatch, terms, kl=hp.kl), terms
