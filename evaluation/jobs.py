"""What is asked: the judge's settings and one job per (target, policy) of ``results.json``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evaluation.apikey import DEFAULT_KEY_ENV
from evaluation.prompt import build_messages, fingerprint

DEFAULT_MODEL = "gpt-4-turbo"
DEFAULT_MAX_TOKENS = 512
# Reasoning models spend hidden reasoning tokens out of the same budget as the answer.
DEFAULT_REASONING_MAX_TOKENS = 4096

__all__ = ["DEFAULT_KEY_ENV", "DEFAULT_MODEL", "JudgeConfig", "Job", "build_jobs"]


@dataclass
class JudgeConfig:
    """Everything that decides how the judge is called."""

    model: str = DEFAULT_MODEL
    base_url: str | None = None  # None: the client's default (OpenAI, or $OPENAI_BASE_URL)
    api_key_env: str = DEFAULT_KEY_ENV
    concurrency: int = 4
    max_retries: int = 5
    retry_base_delay: float = 1.0  # first backoff in seconds; doubles per retry
    retry_max_delay: float = 60.0
    timeout: float = 120.0
    temperature: float = 0.0  # deterministic grading makes reruns comparable
    max_tokens: int | None = None  # None: DEFAULT_MAX_TOKENS, or the reasoning default
    # Models such as OpenAI's o-series and gpt-5 reject max_tokens and temperature: send
    # max_completion_tokens and leave the temperature at the server's own.
    reasoning_model: bool = False
    retry_unparsable: bool = False  # re-ask pairs whose cached answer had no score
    limit: int | None = None  # judge only the first N targets (a cheap trial run)

    @property
    def token_budget(self) -> int:
        """The longest answer asked for (max_tokens or max_completion_tokens)."""
        if self.max_tokens is not None:
            return self.max_tokens
        return DEFAULT_REASONING_MAX_TOKENS if self.reasoning_model else DEFAULT_MAX_TOKENS

    def request_params(self) -> dict[str, Any]:
        # Part of every fingerprint: the default must stay exactly as it was, or every
        # existing cache would be asked again.
        if self.reasoning_model:
            return {"max_completion_tokens": self.token_budget}
        return {"temperature": self.temperature, "max_tokens": self.token_budget}


@dataclass
class Job:
    target_id: int | str
    policy: str
    messages: list[dict[str, str]]
    fingerprint: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (str(self.target_id), self.policy, self.fingerprint)


def build_jobs(results: dict[str, Any], cfg: JudgeConfig) -> list[Job]:
    """One job per (target, policy), in a stable order."""
    targets = results["targets"][: cfg.limit] if cfg.limit else results["targets"]
    params = cfg.request_params()
    jobs = []
    for t in targets:
        for policy in results["policies"]:
            msgs = build_messages(t["prefix"], t["reference"], t["candidates"][policy])
            jobs.append(Job(t["id"], policy, msgs, fingerprint(msgs, cfg.model, **params)))
    return jobs


def is_done(rec: dict[str, Any] | None, cfg: JudgeConfig) -> bool:
    """Whether a cached record answers its job (unparsable ones count unless asked again)."""
    if rec is None:
        return False
    return bool(rec.get("parsed")) or not cfg.retry_unparsable
