"""SimNPO (Fan et al. 2024): NPO without the reference model, on the length-normalised
log-likelihood, with a margin gamma.

    loss = -(2/beta) * mean_i logsigmoid(-(beta/|y_i|) * log pi(y_i|x_i) - gamma) [+ lw * NLL(learn)]

No frozen model, so no KL term; --lw adds the learn NLL (off by default, as published).
"""

from __future__ import annotations

from ..losses import scored_tokens, sequence_logprob, simnpo_loss
from .base import Method, StepBatch, add_retain_terms, register


@register
class SimNPO(Method):
    name = "simnpo"
    uses = ("beta", "gamma", "lw")
    terms = ("simnpo", "learn")
    defaults = {"lw": 0.0}

    def needs_learn(self, hp) -> bool:
        return hp.lw != 0

    def loss(self, b: StepBatch, hp):
        n = scored_tokens(b.forget_labels).clamp_min(1)
        mean_logprob = sequence_logprob(b.forget_logits, b.forget_labels) / n
        simnpo = simnpo_loss(mean_logprob, hp.beta, hp.gamma)
        terms = {"simnpo": simnpo}
        return add_retain_terms(b, simnpo, terms, lw=hp.lw), terms
