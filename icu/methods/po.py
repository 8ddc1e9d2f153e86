"""The reference's preference-optimization baseline: no ascent, no KL; the target's input is
taught to continue with the paired learn text's tokens, and the learn text is kept.

    loss = NLL(target input -> learn tokens) + lw * NLL(learn)
"""

from __future__ import annotations

from ..losses import lm_loss
from .base import Method, StepBatch, add_retain_terms, register


@register
class PreferenceBaseline(Method):
    name = "po"
    uses = ("lw",)
    terms = ("mismatch", "learn")

    def needs_learn(self, hp) -> bool:
        return hp.lw != 0

    def loss(self, b: StepBatch, hp):
        mismatch = lm_loss(b.forget_logits, b.learn_labels)
        terms = {"mismatch": mismatch}
        return add_retain_terms(b, mismatch, terms, lw=hp.lw), terms
