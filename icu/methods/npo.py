"""NPO (Negative Preference Optimization, Zhang et al. 2024): push the target's likelihood
below the original model's, with a loss that flattens once it is well below (unlike gradient
ascent, whose push never weakens).

    loss = (2/beta) * mean_i log(1 + (pi(y_i|x_i) / pi_ref(y_i|x_i))^beta)
           [+ lw * NLL(learn)] [+ kl * CE(p0 || p on learn)]

pi(y|x) is the whole target sequence's likelihood (a sum of token log-probabilities). Plain NPO
by default (lw = kl = 0, as published); --lw / --kl add the retain terms.
"""

from __future__ import annotations

from ..losses import npo_loss, sequence_logprob
from .base import Method, StepBatch, add_retain_terms, register


@register
class NPO(Method):
    name = "npo"
    uses = ("beta", "lw", "kl")
    terms = ("npo", "learn", "kl")
    defaults = {"lw": 0.0, "kl": 0.0}

    def needs_learn(self, hp) -> bool:
        return hp.lw != 0 or hp.kl != 0

    def needs_reference(self, hp) -> bool:
        return True

    def loss(self, b: StepBatch, hp):
        log_ratio = sequence_logprob(b.forget_logits, b.forget_labels) - b.reference_forget_logprob()
        npo = npo_loss(log_ratio, hp.beta)
        terms = {"npo": npo}
        return add_retain_terms(b, npo, terms, lw=hp.lw, kl=hp.kl), terms
