"""The judging run: every (target, policy) not yet in the cache, over a pool of worker threads.

The first pending request goes out alone: if the server refuses it (say, a newer model that
rejects ``max_tokens``), the run stops after one request instead of after every pair. The rest
then run ``concurrency`` at a time; each answer is durable in the cache before it is counted.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import openai
import pandas as pd
from tqdm import tqdm

from evaluation.apikey import get_api_key, redact
from evaluation.cache import CacheWriter, read_cache
from evaluation.errors import InputError
from evaluation.jobs import Job, JudgeConfig, build_jobs, is_done
from evaluation.request import Cancelled, ItemFailed, ask, describe, make_client, refused_first
from evaluation.summary import summarize


@dataclass
class RunReport:
    """What one call of :func:`judge` did."""

    judged: int = 0  # new answers received in this run
    cached: int = 0  # pairs already answered in the cache
    failed: list[str] = field(default_factory=list)  # one line per pair that got no answer
    prompt_tokens: int = 0  # spent in this run
    completion_tokens: int = 0
    summary: pd.DataFrame | None = None


def check_config(cfg: JudgeConfig) -> None:
    """Refuse settings no run can use, before anything is read or sent."""
    if cfg.concurrency < 1:
        raise InputError("--concurrency must be at least 1")
    if cfg.max_retries < 0:
        raise InputError("--max_retries must be 0 or more")
    if cfg.token_budget < 1:
        raise InputError("--max_tokens must be at least 1")
    if cfg.limit is not None and cfg.limit < 1:
        raise InputError("--limit must be at least 1")


def pending_jobs(results: dict[str, Any], cache_path: str | Path, cfg: JudgeConfig,
                 log: IO[str]) -> tuple[list[Job], list[Job]]:
    """All jobs of ``results`` and those the cache does not answer yet."""
    jobs = build_jobs(results, cfg)
    cached, bad = read_cache(cache_path)
    if bad:
        print(f"warning: skipped {bad} unreadable line(s) in {cache_path} "
              "(e.g. a line torn by an interrupted run)", file=log)
    return jobs, [j for j in jobs if not is_done(cached.get(j.key), cfg)]


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
    check_config(cfg)
    jobs, pending = pending_jobs(results, cache_path, cfg, log)
    report = RunReport(cached=len(jobs) - len(pending))
    if pending:
        key = get_api_key(cfg.api_key_env)
        client = client if client is not None else make_client(cfg, key)
        _Run(client, cfg, key, report).go(pending, Path(cache_path), progress, log)
    report.summary = summarize(results, cache_path, cfg)
    return report


class _Run:
    """The state one run shares between the first request, the pool and the progress bar."""

    def __init__(self, client: openai.OpenAI, cfg: JudgeConfig, key: str, report: RunReport) -> None:
        self.client, self.cfg, self.key, self.report = client, cfg, key, report
        self.url = str(client.base_url)
        self.stop = threading.Event()
        self.fatal: BaseException | None = None

    def go(self, pending: list[Job], cache_path: Path, progress: bool, log: IO[str]) -> None:
        with CacheWriter(cache_path) as self.writer, tqdm(
            total=len(pending), desc=f"judging ({self.cfg.model})", unit="pair", disable=not progress, file=log
        ) as self.bar:
            self._first(pending[0])
            if len(pending) > 1:
                self._pool(pending[1:])
        if self.fatal is not None:
            raise describe(self.fatal, self.cfg, self.url, self.key)

    def _keep(self, rec: dict[str, Any]) -> None:
        self.writer.write(rec)  # durable before it is counted
        self.report.judged += 1
        self.report.prompt_tokens += rec["prompt_tokens"]
        self.report.completion_tokens += rec["completion_tokens"]
        self.bar.update(1)

    def _first(self, job: Job) -> None:
        try:
            rec = ask(self.client, job, self.cfg, self.stop)
        except ItemFailed as exc:
            raise refused_first(exc, self.cfg, self.url, self.key) from None
        except Exception as exc:  # noqa: BLE001 - classified by describe, then the run stops
            raise describe(exc, self.cfg, self.url, self.key) from None
        self._keep(rec)

    def _collect(self, fut: Future[dict[str, Any]], job: Job) -> None:
        try:
            rec = fut.result()
        except Cancelled:
            return
        except ItemFailed as exc:
            self.report.failed.append(f"target {job.target_id} / {job.policy}: {redact(str(exc), self.key)}")
            self.bar.update(1)
            return
        except Exception as exc:  # noqa: BLE001 - classified by describe, then the run stops
            self.stop.set()
            self.fatal = self.fatal or exc
            return
        self._keep(rec)

    def _pool(self, jobs: list[Job]) -> None:
        pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix="judge")
        futures = {pool.submit(ask, self.client, j, self.cfg, self.stop): j for j in jobs}
        collected: set[Future[dict[str, Any]]] = set()
        try:
            for fut in as_completed(futures):
                collected.add(fut)
                self._collect(fut, futures[fut])
                if self.stop.is_set():
                    break
        except KeyboardInterrupt:
            self.stop.set()
            self.fatal = self.fatal or KeyboardInterrupt()
        finally:
            # Queued requests are dropped; requests already in flight were paid for, so wait
            # for them (the workers stop retrying once `stop` is set) and keep their answers.
            pool.shutdown(wait=False, cancel_futures=True)
            try:
                for fut, job in futures.items():
                    if fut not in collected and not fut.cancelled():
                        collected.add(fut)
                        self._collect(fut, job)
            except KeyboardInterrupt:  # a second Ctrl-C: leave now
                self.stop.set()
                self.fatal = KeyboardInterrupt()
