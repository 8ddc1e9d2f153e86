"""Ask a chat model to score every (target, policy) continuation in ``results.json``.

Works with any OpenAI-compatible ``/chat/completions`` endpoint (OpenAI itself, a local vLLM
or Ollama server) through the official ``openai`` client. Every answer is appended to a JSONL
cache as soon as it arrives, so an interrupted run resumes where it stopped and nothing is
paid for twice. At the end a per-policy summary CSV is written.

This module is only the command line; the work is done in ``evaluation.judge`` (requests,
retries, threads), ``evaluation.cache`` and ``evaluation.summary``.

Usage::

    export OPENAI_API_KEY=...            # any non-empty value for a local server
    python -m evaluation.api --results results.json                       # OpenAI, gpt-4-turbo
    python -m evaluation.api --results results.json --dry_run --price_in 10 --price_out 30
    python -m evaluation.api --results results.json --model o4-mini --reasoning_model
    python -m evaluation.api --results results.json \
        --base_url http://localhost:8000/v1 --model meta-llama/Llama-3.1-8B-Instruct

Exit codes: 0 all judged; 1 some pairs could not be judged (rerun to resume);
2 bad input or configuration (missing key, unreachable server, a refused first request,
malformed results file); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import IO, Sequence

if __package__ in (None, ""):
    # Run as ``python evaluation/api.py``: make the repository root importable so the
    # absolute imports below resolve the same way as with ``python -m evaluation.api``.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402

from evaluation.apikey import DEFAULT_KEY_ENV  # noqa: E402
from evaluation.cache import CACHE_NAME, default_cache_path  # noqa: E402
from evaluation.convert import load_results  # noqa: E402
from evaluation.errors import GaveUpError, InputError, JudgeError  # noqa: E402
from evaluation.estimate import describe_estimate, estimate  # noqa: E402
from evaluation.files import check_output_file  # noqa: E402
from evaluation.jobs import DEFAULT_MAX_TOKENS, DEFAULT_MODEL, DEFAULT_REASONING_MAX_TOKENS, JudgeConfig  # noqa: E402
from evaluation.judge import RunReport, check_config, judge, pending_jobs  # noqa: E402
from evaluation.summary import SUMMARY_NAME, default_summary_path, write_summary  # noqa: E402


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
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: 0; not sent with --reasoning_model)")
    p.add_argument("--max_tokens", type=int, default=None,
                   help=f"longest judge answer in tokens (default: {DEFAULT_MAX_TOKENS}, "
                   f"or {DEFAULT_REASONING_MAX_TOKENS} with --reasoning_model, whose hidden reasoning counts too)")
    p.add_argument("--reasoning_model", action="store_true",
                   help="the judge rejects max_tokens and temperature (OpenAI o-series, gpt-5): "
                   "send max_completion_tokens and no temperature")
    p.add_argument("--limit", type=int, default=None, help="judge only the first N targets (trial run)")
    p.add_argument("--retry_unparsable", action="store_true",
                   help="ask again for pairs whose cached answer had no parsable score (truncated ones too)")
    p.add_argument("--dry_run", action="store_true",
                   help="print the number of requests and a token (and cost) estimate; send and write nothing")
    p.add_argument("--price_in", type=float, default=None,
                   help="price per 1M prompt tokens, for the cost estimate (default: none)")
    p.add_argument("--price_out", type=float, default=None,
                   help="price per 1M completion tokens, for the cost estimate (default: none)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> JudgeConfig:
    if args.reasoning_model and args.temperature is not None:
        raise InputError("--temperature cannot be used with --reasoning_model (such models reject it); drop one")
    for flag in ("price_in", "price_out"):
        value = getattr(args, flag)
        if value is not None and not value >= 0:
            raise InputError(f"--{flag} must be 0 or more (a price per 1M tokens), got {value}")
    cfg = JudgeConfig(
        model=args.model, base_url=args.base_url, api_key_env=args.api_key_env,
        concurrency=args.concurrency, max_retries=args.max_retries,
        retry_base_delay=args.retry_base_delay, retry_max_delay=args.retry_max_delay,
        timeout=args.timeout, temperature=0.0 if args.temperature is None else args.temperature,
        max_tokens=args.max_tokens, reasoning_model=args.reasoning_model,
        retry_unparsable=args.retry_unparsable, limit=args.limit,
    )
    check_config(cfg)
    return cfg


def _print_report(report: RunReport, args: argparse.Namespace, summary_path: Path, out: IO[str]) -> None:
    assert report.summary is not None
    summary = report.summary
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"), file=out)
    total_p = int(summary["prompt_tokens"].sum())
    total_c = int(summary["completion_tokens"].sum())
    print(f"judged {report.judged} new pair(s), {report.cached} already cached, {len(report.failed)} failed", file=out)
    print(f"tokens this run: prompt {report.prompt_tokens}, completion {report.completion_tokens}; "
          f"all answers in cache: prompt {total_p}, completion {total_c}", file=out)
    if args.price_in is not None and args.price_out is not None:
        cost = (report.prompt_tokens * args.price_in + report.completion_tokens * args.price_out) / 1e6
        print(f"cost this run: {cost:.4f} (at {args.price_in:g} in / {args.price_out:g} out per 1M tokens)", file=out)
    truncated = int(summary["n_truncated"].sum())
    if truncated:
        print(f"{truncated} answer(s) were cut off at the token budget and have no score; rerun with a "
              "larger --max_tokens to ask them again", file=out)
    print(f"summary written to {summary_path}", file=out)


def _dry_run(results: dict, cache_path: Path, cfg: JudgeConfig, args: argparse.Namespace) -> int:
    jobs, pending = pending_jobs(results, cache_path, cfg, sys.stderr)
    for line in describe_estimate(estimate(jobs, pending, cache_path, cfg), cfg, args.price_in, args.price_out):
        print(line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results_path = Path(args.results)
    cache_path = Path(args.cache) if args.cache else default_cache_path(results_path)
    summary_path = Path(args.summary) if args.summary else default_summary_path(results_path)
    try:
        cfg = config_from_args(args)
        check_output_file(cache_path, "--cache")
        check_output_file(summary_path, "--summary")
        results = load_results(results_path)
        if args.dry_run:
            return _dry_run(results, cache_path, cfg, args)
        # a bar only on a terminal: in a log file its redraws pile up on one line
        report = judge(results, cache_path, cfg, progress=not args.no_progress and sys.stderr.isatty())
        assert report.summary is not None
        write_summary(report.summary, summary_path)
    except (InputError, JudgeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except GaveUpError as exc:
        print(f"error: {exc}; answers so far are kept in {cache_path}, rerun to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; answers so far are kept in {cache_path}, rerun to resume", file=sys.stderr)
        return 130
    _print_report(report, args, summary_path, sys.stdout)
    if report.failed:
        for line in report.failed[:5]:
            print(f"failed: {line}", file=sys.stderr)
        print(f"error: {len(report.failed)} pair(s) could not be judged; rerun to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
