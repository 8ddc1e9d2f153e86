"""Ask a chat model to score every (target, policy) continuation in ``results.json``.

Works with any OpenAI-compatible ``/chat/completions`` endpoint (OpenAI itself, a local vLLM
or Ollama server) through the official ``openai`` client. Every answer is appended to a JSONL
cache as soon as it arrives, so an interrupted run resumes where it stopped and nothing is
paid for twice. At the end a per-policy summary CSV is written.

Usage::

    export OPENAI_API_KEY=...            # any non-empty value for a local server
    python -m evaluation.api --results results.json                       # OpenAI, gpt-4-turbo
    python -m evaluation.api --results results.json \
        --base_url http://localhost:8000/v1 --model meta-llama/Llama-3.1-8B-Instruct

Exit codes: 0 all judged; 1 some pairs could not be judged (rerun to resume);
2 bad input or configuration (missing key, unreachable server, malformed results file);
130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import random
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Sequence

if __package__ in (None, ""):
    # Run as ``python evaluation/api.py``: make the repository root importable so the
    # absolute imports below resolve the same way as with ``python -m evaluation.api``.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import openai  # noqa: E402
import pandas as pd  # noqa: E402
from tqdm import tqdm  # noqa: E402

from evaluation.convert import InputError, load_results  # noqa: E402
from evaluation.prompt import PROMPT_VERSION, build_messages, fingerprint, parse_score  # noqa: E402

DEFAULT_MODEL = "gpt-4-turbo"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
CACHE_NAME = "judgments.jsonl"
SUMMARY_NAME = "judge_summary.csv"
SUMMARY_COLUMNS = [
    "policy", "mean_score", "std_score", "n_scored", "n_unparsable", "n_judged", "n_missing",
    "prompt_tokens", "completion_tokens",
]


class JudgeError(Exception):
    """The run cannot go on (bad key, unreachable server, wrong model/URL): exit code 2."""


class GaveUpError(Exception):
    """Retries were exhausted on a transient error (429/5xx): exit code 1, rerun to resume."""


class _Cancelled(Exception):
    """A worker noticed that the run is being stopped."""


class _ItemFailed(Exception):
    """The server refused this one request (e.g. 400); other pairs can still be judged."""


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
    max_tokens: int = 512
    retry_unparsable: bool = False  # re-ask pairs whose cached answer had no score
    limit: int | None = None  # judge only the first N targets (a cheap trial run)

    def request_params(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens}


@dataclass
class Job:
    target_id: int | str
    policy: str
    messages: list[dict[str, str]]
    fingerprint: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (str(self.target_id), self.policy, self.fingerprint)


@dataclass
class RunReport:
    """What one call of :func:`judge` did."""

    judged: int = 0  # new answers received in this run
    cached: int = 0  # pairs already answered in the cache
    failed: list[str] = field(default_factory=list)  # one line per pair that got no answer
    prompt_tokens: int = 0  # spent in this run
    completion_tokens: int = 0
    summary: pd.DataFrame | None = None


# --------------------------------------------------------------------------------------------
# Key handling
# --------------------------------------------------------------------------------------------
def get_api_key(env_name: str = DEFAULT_KEY_ENV) -> str:
    """Read the key from the environment; it is never printed or written anywhere."""
    key = os.environ.get(env_name, "")
    if not key.strip():
        raise InputError(
            f"environment variable {env_name} is not set; export your API key there "
            f"(for a local server that needs no key, any dummy value will do)"
        )
    return key.strip()


def _redact(text: str, key: str | None) -> str:
    # Servers sometimes echo the key back in 401 messages; keep it out of our output.
    if key:
        text = text.replace(key, "***")
    return text


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------
def default_cache_path(results_path: str | Path) -> Path:
    return Path(results_path).parent / CACHE_NAME


def default_summary_path(results_path: str | Path) -> Path:
    return Path(results_path).parent / SUMMARY_NAME


def read_cache(path: str | Path) -> tuple[dict[tuple[str, str, str], dict[str, Any]], int]:
    """Load ``{(id, policy, fingerprint): record}`` and the number of unreadable lines.

    Unreadable lines (typically a line torn by a killed run) are skipped, not fatal; for a
    repeated key the last record wins.
    """
    records: dict[tuple[str, str, str], dict[str, Any]] = {}
    bad = 0
    path = Path(path)
    if not path.exists():
        return records, 0
    with path.open("rb") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                key = (str(rec["id"]), str(rec["policy"]), str(rec["fingerprint"]))
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            if isinstance(rec, dict):
                records[key] = rec
    return records, bad


class CacheWriter:
    """Append-only JSONL writer; each line is flushed and fsynced before we count it as done."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[bytes] = self.path.open("a+b")
        self._lock_exclusive()
        # A killed run may have left a torn last line without a newline; the first record we
        # write then starts on a fresh line so it is not glued onto the fragment (which stays,
        # and is skipped when reading). Nothing is written before there is an answer, so a
        # run that fails early leaves the file byte-for-byte as it was.
        self._fh.seek(0, os.SEEK_END)
        self._needs_newline = False
        if self._fh.tell() > 0:
            self._fh.seek(-1, os.SEEK_END)
            self._needs_newline = self._fh.read(1) != b"\n"

    def _lock_exclusive(self) -> None:
        # Two runs appending to the same cache would judge the same pairs twice.
        try:
            import fcntl
        except ImportError:  # not on POSIX: go without the guard
            return
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.close()
            raise JudgeError(f"cache {self.path} is in use by another running judge") from None

    def _sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if self._needs_newline:
            line = "\n" + line
            self._needs_newline = False
        self._fh.seek(0, os.SEEK_END)
        self._fh.write(line.encode("utf-8"))
        self._sync()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Jobs and one request
# --------------------------------------------------------------------------------------------
def build_jobs(results: dict[str, Any], cfg: JudgeConfig) -> list[Job]:
    """One job per (target, policy), in a stable order."""
    targets = results["targets"][: cfg.limit] if cfg.limit else results["targets"]
    jobs = []
    for t in targets:
        for policy in results["policies"]:
            msgs = build_messages(t["prefix"], t["reference"], t["candidates"][policy])
            jobs.append(Job(t["id"], policy, msgs, fingerprint(msgs, cfg.model, **cfg.request_params())))
    return jobs


def make_client(cfg: JudgeConfig, api_key: str) -> openai.OpenAI:
    # The client's own retries are off: we retry ourselves so the policy (which errors,
    # how long, how many times) is ours and visible in one place.
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


def _backoff(attempt: int, cfg: JudgeConfig, exc: Exception) -> float:
    """Seconds to wait before retry ``attempt + 1``: the server's Retry-After, else 2^n with jitter."""
    hinted = _retry_after(exc)
    if hinted is not None:
        return min(hinted, cfg.retry_max_delay)
    delay = cfg.retry_base_delay * (2**attempt)
    # Jitter spreads concurrent workers out so they do not hit a rate limit in lockstep.
    return min(cfg.retry_max_delay, delay * random.uniform(0.5, 1.0))


_RETRYABLE = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError)
_FATAL = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)


def ask(client: openai.OpenAI, job: Job, cfg: JudgeConfig, stop: threading.Event) -> dict[str, Any]:
    """Send one judging request with retries and return the cache record for it."""
    attempt = 0
    while True:
        if stop.is_set():
            raise _Cancelled()
        try:
            resp = client.chat.completions.create(model=cfg.model, messages=job.messages, **cfg.request_params())
            break
        except _RETRYABLE as exc:
            # OpenAI signals an exhausted balance with a 429 too; waiting will not fix that.
            if attempt >= cfg.max_retries or getattr(exc, "code", None) == "insufficient_quota":
                stop.set()  # stop the other workers now, before they send another request
                raise
            if stop.wait(_backoff(attempt, cfg, exc)):
                raise _Cancelled() from None
            attempt += 1
        except _FATAL:
            stop.set()
            raise
        except openai.APIStatusError as exc:
            raise _ItemFailed(f"HTTP {exc.status_code}: {exc.message}") from None

    choices = getattr(resp, "choices", None)
    if not choices:
        raise _ItemFailed("the server answered without any choices")
    reply = getattr(choices[0].message, "content", None) or ""
    usage = getattr(resp, "usage", None)
    score = parse_score(reply)
    return {
        "id": job.target_id,
        "policy": job.policy,
        "fingerprint": job.fingerprint,
        "model": cfg.model,
        "served_by": getattr(resp, "model", None),
        "prompt_version": PROMPT_VERSION,
        "score": score,
        "parsed": score is not None,
        "reply": reply,
        "prompt_tokens": int(getattr(usage, "prompt_tokens", 0) or 0),
        "completion_tokens": int(getattr(usage, "completion_tokens", 0) or 0),
        "attempts": attempt + 1,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _is_done(rec: dict[str, Any] | None, cfg: JudgeConfig) -> bool:
    if rec is None:
        return False
    return bool(rec.get("parsed")) or not cfg.retry_unparsable


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def judge(
    results: dict[str, Any],
    cache_path: str | Path,
    cfg: JudgeConfig,
    *,
    client: openai.OpenAI | None = None,
    progress: bool = True,
    log: IO[str] | None = None,
) -> RunReport:
    """Judge every (target, policy) not yet answered in the cache; return what happened.

    Raises JudgeError (stop: fix the configuration) or GaveUpError (transient errors outlasted
    the retries). In both cases every answer received so far is already in the cache.
    """
    log = log if log is not None else sys.stderr
    if cfg.concurrency < 1:
        raise InputError("--concurrency must be at least 1")
    if cfg.max_retries < 0:
        raise InputError("--max_retries must be 0 or more")
    jobs = build_jobs(results, cfg)
    cached, bad = read_cache(cache_path)
    if bad:
        print(f"warning: skipped {bad} unreadable line(s) in {cache_path} "
              "(e.g. a line torn by an interrupted run)", file=log)
    pending = [j for j in jobs if not _is_done(cached.get(j.key), cfg)]
    report = RunReport(cached=len(jobs) - len(pending))
    if pending:
        key = get_api_key(cfg.api_key_env)
        client = client if client is not None else make_client(cfg, key)
        _run_pending(pending, client, cfg, Path(cache_path), report, key, progress, log)
    report.summary = summarize(results, cache_path, cfg)
    return report


def _run_pending(
    pending: list[Job], client: openai.OpenAI, cfg: JudgeConfig, cache_path: Path,
    report: RunReport, key: str, progress: bool, log: IO[str],
) -> None:
    url = str(client.base_url)
    stop = threading.Event()
    fatal: BaseException | None = None
    with CacheWriter(cache_path) as writer:
        pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="judge")
        futures: dict[Future[dict[str, Any]], Job] = {pool.submit(ask, client, j, cfg, stop): j for j in pending}
        bar = tqdm(total=len(pending), desc=f"judging ({cfg.model})", unit="pair", disable=not progress, file=log)

        def collect(fut: Future[dict[str, Any]]) -> None:
            nonlocal fatal
            job = futures[fut]
            try:
                rec = fut.result()
            except _Cancelled:
                return
            except _ItemFailed as exc:
                report.failed.append(f"target {job.target_id} / {job.policy}: {_redact(str(exc), key)}")
                bar.update(1)
                return
            except Exception as exc:  # noqa: BLE001 - classified below, then the run stops
                stop.set()
                if fatal is None:
                    fatal = exc
                return
            writer.write(rec)  # durable before it is counted
            report.judged += 1
            report.prompt_tokens += rec["prompt_tokens"]
            report.completion_tokens += rec["completion_tokens"]
            bar.update(1)

        collected: set[Future[dict[str, Any]]] = set()
        try:
            for fut in as_completed(futures):
                collected.add(fut)
                collect(fut)
                if stop.is_set():
                    break
        except KeyboardInterrupt:
            stop.set()
            fatal = fatal or KeyboardInterrupt()
        finally:
            # Queued requests are dropped; requests already in flight were paid for, so wait
            # for them (the workers stop retrying once `stop` is set) and keep their answers.
            pool.shutdown(wait=False, cancel_futures=True)
            try:
                for fut in futures:
                    if fut not in collected and not fut.cancelled():
                        collected.add(fut)
                        collect(fut)
            except KeyboardInterrupt:  # a second Ctrl-C: leave now
                stop.set()
                fatal = KeyboardInterrupt()
            bar.close()
    if fatal is not None:
        raise _describe(fatal, cfg, url, key)


def _describe(exc: BaseException, cfg: JudgeConfig, url: str, key: str) -> BaseException:
    """Turn the first fatal error into a one-line, key-free message."""
    if isinstance(exc, KeyboardInterrupt):
        return exc
    msg = _redact(getattr(exc, "message", None) or str(exc) or type(exc).__name__, key)
    msg = " ".join(msg.split())  # the report is one line, whatever the server sent
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


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------
def load_scores(results: dict[str, Any], cache_path: str | Path, cfg: JudgeConfig) -> pd.DataFrame:
    """One row per (target, policy) of ``results`` with its cached answer (NaN where none yet)."""
    cached, _ = read_cache(cache_path)
    rows = []
    for job in build_jobs(results, cfg):
        rec = cached.get(job.key)
        rows.append({
            "id": job.target_id,
            "policy": job.policy,
            "judged": rec is not None,
            "score": rec.get("score") if rec else None,
            "parsed": bool(rec.get("parsed")) if rec else False,
            "prompt_tokens": int(rec.get("prompt_tokens") or 0) if rec else 0,
            "completion_tokens": int(rec.get("completion_tokens") or 0) if rec else 0,
        })
    df = pd.DataFrame(rows)
    df["score"] = pd.to_numeric(df["score"], errors="coerce")
    return df


def summarize(results: dict[str, Any], cache_path: str | Path, cfg: JudgeConfig) -> pd.DataFrame:
    """Per policy (in results order): mean/std score, counts, and the tokens spent on it."""
    scores = load_scores(results, cache_path, cfg)
    out = []
    for policy in results["policies"]:
        s = scores[scores["policy"] == policy]
        judged = s[s["judged"]]
        valid = judged["score"].dropna()
        out.append({
            "policy": policy,
            "mean_score": float(valid.mean()) if len(valid) else math.nan,
            "std_score": float(valid.std()) if len(valid) > 1 else math.nan,
            "n_scored": int(len(valid)),
            "n_unparsable": int(len(judged) - len(valid)),
            "n_judged": int(len(judged)),
            "n_missing": int(len(s) - len(judged)),
            "prompt_tokens": int(s["prompt_tokens"].sum()),
            "completion_tokens": int(s["completion_tokens"].sum()),
        })
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS)


def write_summary(summary: pd.DataFrame, path: str | Path) -> None:
    """Write the summary CSV atomically (it is derived data, so replacing it is safe)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    summary.to_csv(tmp, index=False, float_format="%.4f")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluation.api",
        description="Score each policy's continuations with a chat model (0-10) via any "
        "OpenAI-compatible server; resumable through a JSONL cache.",
    )
    p.add_argument("--results", default="results.json", help="results.json from evaluation.convert (default: %(default)s)")
    p.add_argument("--cache", default=None, help=f"JSONL answer cache (default: {CACHE_NAME} next to --results)")
    p.add_argument("--summary", default=None, help=f"summary CSV (default: {SUMMARY_NAME} next to --results)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="judge model (default: %(default)s)")
    p.add_argument("--base_url", default=None,
                   help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (default: OpenAI)")
    p.add_argument("--api_key_env", default=DEFAULT_KEY_ENV,
                   help="environment variable holding the API key (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default: %(default)s)")
    p.add_argument("--max_retries", type=int, default=5,
                   help="retries per request on 429, 5xx and connection errors (default: %(default)s)")
    p.add_argument("--retry_base_delay", type=float, default=1.0,
                   help="first backoff in seconds, doubled per retry (default: %(default)s)")
    p.add_argument("--retry_max_delay", type=float, default=60.0, help="longest backoff (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: %(default)s)")
    p.add_argument("--max_tokens", type=int, default=512, help="longest judge answer (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="judge only the first N targets (trial run)")
    p.add_argument("--retry_unparsable", action="store_true",
                   help="ask again for pairs whose cached answer had no parsable score")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> JudgeConfig:
    return JudgeConfig(
        model=args.model, base_url=args.base_url, api_key_env=args.api_key_env,
        concurrency=args.concurrency, max_retries=args.max_retries,
        retry_base_delay=args.retry_base_delay, retry_max_delay=args.retry_max_delay,
        timeout=args.timeout, temperature=args.temperature, max_tokens=args.max_tokens,
        retry_unparsable=args.retry_unparsable, limit=args.limit,
    )


def _print_report(report: RunReport, summary_path: Path, out: IO[str]) -> None:
    assert report.summary is not None
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(report.summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"), file=out)
    total_p = int(report.summary["prompt_tokens"].sum())
    total_c = int(report.summary["completion_tokens"].sum())
    print(f"judged {report.judged} new pair(s), {report.cached} already cached, {len(report.failed)} failed", file=out)
    print(f"tokens this run: prompt {report.prompt_tokens}, completion {report.completion_tokens}; "
          f"all answers in cache: prompt {total_p}, completion {total_c}", file=out)
    print(f"summary written to {summary_path}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    results_path = Path(args.results)
    cache_path = Path(args.cache) if args.cache else default_cache_path(results_path)
    summary_path = Path(args.summary) if args.summary else default_summary_path(results_path)
    try:
        if args.limit is not None and args.limit < 1:
            raise InputError("--limit must be at least 1")
        results = load_results(results_path)
        report = judge(results, cache_path, cfg, progress=not args.no_progress)
    except (InputError, JudgeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except GaveUpError as exc:
        print(f"error: {exc}; answers so far are kept in {cache_path}, rerun to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; answers so far are kept in {cache_path}, rerun to resume", file=sys.stderr)
        return 130
    assert report.summary is not None
    write_summary(report.summary, summary_path)
    _print_report(report, summary_path, sys.stdout)
    if report.failed:
        for line in report.failed[:5]:
            print(f"failed: {line}", file=sys.stderr)
        print(f"error: {len(report.failed)} pair(s) could not be judged; rerun to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
