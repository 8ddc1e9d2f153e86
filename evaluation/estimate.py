"""What a run would cost, worked out before anything is sent (``--dry_run``).

There is no tokenizer here (the judge may be any model), so prompt tokens are estimated from
characters: about 4 per token for English, or, once the cache holds answers, the ratio those
answers' own token counts show. Completion tokens are bounded by the token budget; the mean of
the cached answers gives the likely figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluation.cache import read_cache
from evaluation.jobs import Job, JudgeConfig

CHARS_PER_TOKEN = 4.0
TOKENS_PER_MESSAGE = 4  # the chat format's role and separators around each message


@dataclass
class Estimate:
    n_requests: int  # pairs that would be sent
    n_cached: int  # pairs the cache already answers
    prompt_tokens: int
    completion_tokens_max: int  # every answer uses the whole budget
    completion_tokens_likely: int | None  # from the cached answers' mean; None without any
    chars_per_token: float  # what the prompt estimate assumed
    calibrated: bool  # chars_per_token measured on cached answers

    def cost(self, price_in: float, price_out: float) -> tuple[float, float]:
        """(likely, at most) in the prices' currency; prices are per 1M tokens."""
        completion = self.completion_tokens_likely
        if completion is None:
            completion = self.completion_tokens_max
        def dollars(out_tokens: int) -> float:
            return (self.prompt_tokens * price_in + out_tokens * price_out) / 1e6
        return dollars(completion), dollars(self.completion_tokens_max)


def prompt_chars(job: Job) -> int:
    return sum(len(m["content"]) for m in job.messages)


def _calibration(jobs: list[Job], cached: dict[Any, dict[str, Any]]) -> tuple[float | None, float | None]:
    """(characters per prompt token, mean completion tokens) over the cached answers, if any."""
    chars = tokens = out = n = 0
    for job in jobs:
        rec = cached.get(job.key)
        if rec and int(rec.get("prompt_tokens") or 0) > 0:
            chars += prompt_chars(job)
            tokens += int(rec["prompt_tokens"]) - TOKENS_PER_MESSAGE * len(job.messages)
            out += int(rec.get("completion_tokens") or 0)
            n += 1
    if n == 0 or tokens <= 0:
        return None, None
    return chars / tokens, out / n


def estimate(jobs: list[Job], pending: list[Job], cache_path: str | Path, cfg: JudgeConfig) -> Estimate:
    """Token estimate for sending ``pending`` (a subset of ``jobs``) with ``cfg``."""
    cached, _ = read_cache(cache_path)
    ratio, mean_out = _calibration(jobs, cached)
    cpt = ratio if ratio is not None else CHARS_PER_TOKEN
    prompt = sum(math.ceil(prompt_chars(j) / cpt) + TOKENS_PER_MESSAGE * len(j.messages) for j in pending)
    likely = None if mean_out is None else round(min(mean_out, cfg.token_budget) * len(pending))
    return Estimate(
        n_requests=len(pending), n_cached=len(jobs) - len(pending), prompt_tokens=prompt,
        completion_tokens_max=cfg.token_budget * len(pending), completion_tokens_likely=likely,
        chars_per_token=cpt, calibrated=ratio is not None,
    )


def describe_estimate(est: Estimate, cfg: JudgeConfig, price_in: float | None, price_out: float | None) -> list[str]:
    """The lines ``--dry_run`` prints."""
    where = cfg.base_url or "the OpenAI API"
    basis = "measured on the cached answers" if est.calibrated else "assumed"
    lines = [
        f"dry run: {est.n_requests} request(s) would be sent to {cfg.model} at {where} "
        f"({est.n_cached} pair(s) already in the cache)",
        f"estimated prompt tokens: {est.prompt_tokens:,} ({est.chars_per_token:.2f} characters per token, {basis})",
    ]
    likely = "" if est.completion_tokens_likely is None else \
        f"likely {est.completion_tokens_likely:,} (the cached answers' mean), "
    lines.append(f"estimated completion tokens: {likely}at most {est.completion_tokens_max:,} "
                 f"({cfg.token_budget} per request)")
    if price_in is None or price_out is None:
        lines.append("give --price_in and --price_out (per 1M tokens) for a cost estimate")
    else:
        cost_likely, cost_max = est.cost(price_in, price_out)
        shown = f"at most {cost_max:.4f}" if est.completion_tokens_likely is None else \
            f"likely {cost_likely:.4f}, at most {cost_max:.4f}"
        lines.append(f"estimated cost: {shown} (at {price_in:g} in / {price_out:g} out per 1M tokens)")
    lines.append("nothing was sent (--dry_run)")
    return lines
