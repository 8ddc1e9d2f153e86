"""Unlearning methods on the one loop: ``get_method(name)`` gives the method ``--method name``
selects. Each module below registers one method; add a method by adding a module here."""

from .base import HYPERPARAMETERS, Method, StepBatch, get_method, register, registered
from . import icu, ga, kl, llmu, po, npo, simnpo  # noqa: E402,F401  (each registers itself)

METHOD_NAMES: tuple[str, ...] = registered()

__all__ = ["HYPERPARAMETERS", "METHOD_NAMES", "Method", "StepBatch", "get_method", "register"]
