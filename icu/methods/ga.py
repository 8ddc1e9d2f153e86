"""Gradient ascent on the targets (Knowledge Unlearning, Jang et al. 2022; the reference's
KUMPR baseline): loss = -uw * NLL(target). No learn text, no original model."""

from __future__ import annotations

from ..losses import lm_loss
from .base import Method, StepBatch, register


@register
class GradientAscent(Method):
    name = "ga"
    uses = ("uw",)
    terms = ("unlearn",)

    def loss(self, b: StepBatch, hp):
        unlearn = lm_loss(b.forget_logits, b.forget_labels)
        return -hp.uw * unlearn, {"unlearn": unlearn}
