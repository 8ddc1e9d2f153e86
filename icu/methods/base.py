"""What a method is, what it sees of a training step, and the registry.

A method owns only its loss. The loop hands it a :class:`StepBatch` (the step's forget and
paired learn tensors, forward passes computed on first use, the frozen original model's outputs
on request) and the run's hyper-parameters; it returns the loss to minimise and its named terms
for the history. It never sees the engine, the flags or the stop rule.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..errors import IcuError
from ..losses import kl_term, lm_loss, sequence_logprob

# Every loss hyper-parameter a method can read (flag dests). One not in a method's ``uses``
# but given on the command line is reported as ignored.
HYPERPARAMETERS = ("uw", "lw", "kl", "beta", "gamma")

Logits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, mask) -> (B, L, V)


class StepBatch:
    """One step's inputs. ``forget_logits`` / ``learn_logits`` run the trained model once, on
    first use; ``reference_*`` run the frozen original model (no gradient)."""

    def __init__(self, tensors: dict[str, torch.Tensor], forward: Logits, *, learn_allowed: bool,
                 reference: Optional[Logits] = None,
                 reference_learn_probs: Optional[Callable[[], torch.Tensor]] = None):
        self.forget_ids = tensors["unlearn_input_ids"]  # (B, L)
        self.forget_mask = tensors["unlearn_attention_mask"]
        self.forget_labels = tensors["unlearn_labels"]  # (B, L), -100 = not scored
        self.learn_ids = tensors["learn_input_ids"]
        self.learn_mask = tensors["learn_attention_mask"]
        self.learn_labels = tensors["learn_labels"]
        self._forward = forward
        self._learn_allowed = learn_allowed
        self._reference = reference
        self._reference_learn_probs = reference_learn_probs
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def forget_logits(self) -> torch.Tensor:
        if "forget" not in self._cache:
            self._cache["forget"] = self._forward(self.forget_ids, self.forget_mask)
        return self._cache["forget"]

    @property
    def learn_logits(self) -> torch.Tensor:
        if not self._learn_allowed:  # the declaration decides what the loop prepares
            raise RuntimeError("this method reads the learn forward but its needs_learn() said no")
        if "learn" not in self._cache:
            self._cache["learn"] = self._forward(self.learn_ids, self.learn_mask)
        return self._cache["learn"]

    def reference_learn_probs(self) -> torch.Tensor:
        """p0 = the original model's next-token distribution on the learn input (B, L, V)."""
        if self._reference_learn_probs is None:
            raise RuntimeError("this method reads the original model but its needs_reference() said no")
        return self._reference_learn_probs()

    @torch.no_grad()
    def reference_forget_logprob(self) -> torch.Tensor:
        """log pi_ref(y|x) of each forget sample under the original model (B,)."""
        if self._reference is None:
            raise RuntimeError("this method reads the original model but its needs_reference() said no")
        return sequence_logprob(self._reference(self.forget_ids, self.forget_mask), self.forget_labels)


class Method:
    """Subclass, set the class attributes, implement :meth:`loss`, decorate with ``@register``."""

    name: str = ""
    uses: tuple[str, ...] = ()  # the hyper-parameters (of HYPERPARAMETERS) the loss reads
    terms: tuple[str, ...] = ()  # named terms it reports; the history gets loss_<term>
    defaults: dict[str, float] = {}  # its own defaults for some of ``uses`` (else the flag's)

    def needs_learn(self, hp) -> bool:
        """Whether the loss reads the learn-set forward (the loop skips it otherwise)."""
        return False

    def needs_reference(self, hp) -> bool:
        """Whether the loss reads the frozen original model (the trainer builds none otherwise)."""
        return False

    def loss(self, b: StepBatch, hp) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


def add_retain_terms(b: StepBatch, total: torch.Tensor, terms: dict[str, torch.Tensor], *,
                     lw: float = 0.0, kl: float = 0.0) -> torch.Tensor:
    """``total`` + lw * NLL(learn) + kl * CE(p0 || p on learn), each term computed (and added to
    ``terms``) only when its weight is non-zero."""
    if lw != 0:
        terms["learn"] = lm_loss(b.learn_logits, b.learn_labels)
        total = total + lw * terms["learn"]
    if kl != 0:
        terms["kl"] = kl_term(b.learn_logits, b.reference_learn_probs())
        total = total + kl * terms["kl"]
    return total


_REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` selectable as ``--method cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    unknown = set(cls.uses) - set(HYPERPARAMETERS)
    if unknown:
        raise ValueError(f"method {cls.name}: unknown hyper-parameters {sorted(unknown)}")
    _REGISTRY[cls.name] = cls()
    return cls


def registered() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise IcuError(f"--method {name!r} is not known; choose one of: {', '.join(_REGISTRY)}") from None
