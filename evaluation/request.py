"""One judging request: send it, retry what is worth retrying, and turn the answer into a record.

The client's own retries are off; the policy (which errors, how long, how many times) lives
here, in one place.
"""

from __future__ import annotations

import datetime as _dt
import random
import threading
from typing import Any

import openai

from evaluation.apikey import redact
from evaluation.errors import GaveUpError, JudgeError
from evaluation.jobs import Job, JudgeConfig
from evaluation.prompt import PROMPT_VERSION, parse_score

_RETRYABLE = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError)
_FATAL = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)


class Cancelled(Exception):
    """A worker noticed that the run is being stopped."""


class ItemFailed(Exception):
    """The server refused this one request (e.g. 400); other pairs can still be judged."""


def make_client(cfg: JudgeConfig, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=api_key, base_url=cfg.base_url, max_retries=0, timeout=cfg.timeout)


def _retry_after(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    if response is None:
        return None
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date; rare enough to fall back to our own backoff


def backoff(attempt: int, cfg: JudgeConfig, exc: Exception) -> float:
    """Seconds to wait before retry ``attempt + 1``: the server's Retry-After, else 2^n with jitter."""
    hinted = _retry_after(exc)
    if hinted is not None:
        return min(hinted, cfg.retry_max_delay)
    delay = cfg.retry_base_delay * (2**attempt)
    # Jitter spreads concurrent workers out so they do not hit a rate limit in lockstep.
    return min(cfg.retry_max_delay, delay * random.uniform(0.5, 1.0))


def ask(client: openai.OpenAI, job: Job, cfg: JudgeConfig, stop: threading.Event) -> dict[str, Any]:
    """Send one judging request with retries and return the cache record for it."""
    attempt = 0
    while True:
        if stop.is_set():
            raise Cancelled()
        try:
            resp = client.chat.completions.create(model=cfg.model, messages=job.messages, **cfg.request_params())
            break
        except _RETRYABLE as exc:
            # OpenAI signals an exhausted balance with a 429 too; waiting will not fix that.
            if attempt >= cfg.max_retries or getattr(exc, "code", None) == "insufficient_quota":
                stop.set()  # stop the other workers now, before they send another request
                raise
            if stop.wait(backoff(attempt, cfg, exc)):
                raise Cancelled() from None
            attempt += 1
        except _FATAL:
            stop.set()
            raise
        except openai.APIStatusError as exc:
            raise ItemFailed(f"HTTP {exc.status_code}: {exc.message}") from None
    return make_record(job, cfg, resp, attempt + 1)


def make_record(job: Job, cfg: JudgeConfig, resp: Any, attempts: int) -> dict[str, Any]:
    """The cache line for one answer; a reply cut at the token budget counts as truncated."""
    choices = getattr(resp, "choices", None)
    if not choices:
        raise ItemFailed("the server answered without any choices")
    reply = getattr(choices[0].message, "content", None) or ""
    finish = getattr(choices[0], "finish_reason", None)
    truncated = finish == "length"
    # A cut reply may end inside its score ("Final score: 1" of a 10): never trust it.
    score = None if truncated else parse_score(reply)
    usage = getattr(resp, "usage", None)
    return {
        "id": job.target_id,
        "policy": job.policy,
        "fingerprint": job.fingerprint,
        "model": cfg.model,
        "served_by": getattr(resp, "model", None),
        "prompt_version": PROMPT_VERSION,
        "score": score,
        "parsed": score is not None,
        "truncated": truncated,
        "finish_reason": finish,
        "reply": reply,
        "prompt_tokens": int(getattr(usage, "prompt_tokens", 0) or 0),
        "completion_tokens": int(getattr(usage, "completion_tokens", 0) or 0),
        "attempts": attempts,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def one_line(text: str, key: str | None) -> str:
    """A server message as one key-free line, whatever the server sent."""
    return " ".join(redact(text, key).split())


def refused_first(exc: ItemFailed, cfg: JudgeConfig, url: str, key: str) -> JudgeError:
    """The very first request was refused: the configuration is wrong, so stop before the rest."""
    msg = one_line(str(exc), key)
    hint = ""
    if not cfg.reasoning_model and ("max_tokens" in msg or "temperature" in msg):
        hint = "; for a model that rejects max_tokens or temperature, rerun with --reasoning_model"
    return JudgeError(f"the server at {url} refused the first request ({msg}); "
                      f"nothing else was sent{hint}")


def describe(exc: BaseException, cfg: JudgeConfig, url: str, key: str) -> BaseException:
    """Turn the first fatal error into a one-line, key-free message."""
    if isinstance(exc, KeyboardInterrupt):
        return exc
    msg = one_line(getattr(exc, "message", None) or str(exc) or type(exc).__name__, key)
    tries = cfg.max_retries + 1
    if isinstance(exc, openai.APIConnectionError):
        return JudgeError(f"cannot reach the server at {url} ({msg}) after {tries} attempt(s)")
    if isinstance(exc, openai.RateLimitError) and getattr(exc, "code", None) == "insufficient_quota":
        return JudgeError(f"the account behind {cfg.api_key_env} has no quota left at {url} ({msg})")
    if isinstance(exc, openai.AuthenticationError):
        return JudgeError(f"the server at {url} rejected the API key from {cfg.api_key_env} (HTTP 401: {msg})")
    if isinstance(exc, openai.PermissionDeniedError):
        return JudgeError(f"the server at {url} refused access (HTTP 403: {msg})")
    if isinstance(exc, openai.NotFoundError):
        return JudgeError(f"HTTP 404 from {url}: is --base_url right and does it serve model '{cfg.model}'? ({msg})")
    if isinstance(exc, openai.APIStatusError):
        return GaveUpError(f"gave up after {tries} attempt(s): HTTP {exc.status_code} from {url}: {msg}")
    return GaveUpError(f"stopped on an unexpected error: {type(exc).__name__}: {msg}")
