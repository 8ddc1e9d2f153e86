"""ICU (Iterative Contrastive Unlearning): ascend on the target, descend on its paired learn
text, and keep the learn-text distribution close to the original model's.

    loss = -uw * NLL(target) + lw * NLL(learn) + kl * CE(p0 || p on the learn text)
"""

from __future__ import annotations

import torch

from ..losses import icu_loss, kl_term, lm_loss
from .base import Method, StepBatch, register


@register
class ICU(Method):
    name = "icu"
    uses = ("uw", "lw", "kl")
    terms = ("unlearn", "learn", "kl")

    def needs_learn(self, hp) -> bool:
        return True  # the learn NLL is logged even at --lw 0, as before the registry

    def needs_reference(self, hp) -> bool:
        return hp.kl != 0

    def loss(self, b: StepBatch, hp):
        # Both forwards before any loss op: the autograd graph, and so the order in which
        # gradients sum into the tied embedding, is the pre-registry code's (bit-identical).
        u_logits, l_logits = b.forget_logits, b.learn_logits
        unlearn = lm_loss(u_logits, b.forget_labels)
        learn = lm_loss(l_logits, b.learn_labels)
        if hp.kl != 0:
            kl = kl_term(l_logits, b.reference_learn_probs())
        else:
            kl = torch.zeros((), device=l_logits.device)
        total = icu_loss(unlearn, learn, kl, hp.uw, hp.lw, hp.kl)
        return total, {"unlearn": unlearn, "learn": learn, "kl": kl}
