"""Scores per (target, policy) from the cache, and their per-policy summary CSV."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from evaluation.cache import read_cache
from evaluation.files import write_text_atomic
from evaluation.jobs import JudgeConfig, build_jobs

SUMMARY_NAME = "judge_summary.csv"
SUMMARY_COLUMNS = [
    "policy", "mean_score", "std_score", "n_scored", "n_unparsable", "n_truncated", "n_judged",
    "n_missing", "prompt_tokens", "completion_tokens",
]
# What became of one pair: no answer yet, a score, an answer without a score, or an answer
# cut off at the token budget (raise --max_tokens; the changed fingerprint asks it again).
STATUSES = ("missing", "scored", "unparsable", "truncated")


def default_summary_path(results_path: str | Path) -> Path:
    return Path(results_path).parent / SUMMARY_NAME


def _status(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "missing"
    if rec.get("parsed"):
        return "scored"
    return "truncated" if rec.get("truncated") else "unparsable"


def load_scores(results: dict[str, Any], cache_path: str | Path, cfg: JudgeConfig) -> pd.DataFrame:
    """One row per (target, policy) of ``results`` with its cached answer (NaN where none yet)."""
    cached, _ = read_cache(cache_path)
    rows = []
    for job in build_jobs(results, cfg):
        rec = cached.get(job.key)
        status = _status(rec)
        rows.append({
            "id": job.target_id,
            "policy": job.policy,
            "status": status,
            "judged": rec is not None,
            "score": rec.get("score") if status == "scored" else None,
            "parsed": status == "scored",
            "truncated": status == "truncated",
            "prompt_tokens": int(rec.get("prompt_tokens") or 0) if rec else 0,
            "completion_tokens": int(rec.get("completion_tokens") or 0) if rec else 0,
        })
    df = pd.DataFrame(rows)
    df["score"] = pd.to_numeric(df["score"], errors="coerce")
    return df


def summarize(results: dict[str, Any], cache_path: str | Path, cfg: JudgeConfig) -> pd.DataFrame:
    """Per policy (in results order): mean/std score, counts per status, and the tokens spent."""
    scores = load_scores(results, cache_path, cfg)
    out = []
    for policy in results["policies"]:
        s = scores[scores["policy"] == policy]
        counts = s["status"].value_counts()
        valid = s.loc[s["status"] == "scored", "score"].dropna()
        out.append({
            "policy": policy,
            "mean_score": float(valid.mean()) if len(valid) else math.nan,
            "std_score": float(valid.std()) if len(valid) > 1 else math.nan,
            "n_scored": int(len(valid)),
            "n_unparsable": int(counts.get("unparsable", 0)),
            "n_truncated": int(counts.get("truncated", 0)),
            "n_judged": int(s["judged"].sum()),
            "n_missing": int(counts.get("missing", 0)),
            "prompt_tokens": int(s["prompt_tokens"].sum()),
            "completion_tokens": int(s["completion_tokens"].sum()),
        })
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS)


def write_summary(summary: pd.DataFrame, path: str | Path) -> None:
    """Write the summary CSV atomically (it is derived data, so replacing it is safe)."""
    write_text_atomic(path, summary.to_csv(index=False, float_format="%.4f"), "--summary")
