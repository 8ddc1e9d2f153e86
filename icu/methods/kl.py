"""The reference's KL baseline: gradient ascent on the target while the learn text's
distribution stays close to the original model's (no learn NLL).

    loss = -uw * NLL(target) + kl * CE(p0 || p on the learn text)
"""

from __future__ import annotations

from ..losses import lm_loss
from .base import Method, StepBatch, add_retain_terms, register


@register
class KLBaseline(Method):
    name = "kl"
    uses = ("uw", "kl")
    terms = ("unlearn", "kl")

    def needs_learn(self, hp) -> bool:
        return hp.kl != 0

    def needs_reference(self, hp) -> bool:
        return hp.kl != 0

    def loss(self, b: StepBatch, hp):
        unlearn = lm_loss(b.forget_logits, b.forget_labels)
        terms = {"unlearn": unlearn}
        return add_retain_terms(b, -hp.uw * unlearn, terms, kl=hp.kl), terms
