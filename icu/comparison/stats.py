"""The numbers a comparison over several runs rests on, as pure functions: a run's held-out loss
at equal forgetting (read off its trajectory), means with t confidence intervals over runs, and
paired differences against a baseline method.

A trajectory is the run's validations in order: epoch e, forget-set MA_e, held-out loss H_e.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np


def crossing(ma: Sequence[float], values: Sequence[float], threshold: float) -> dict:
    """``values`` where MA first falls to ``threshold``, linearly interpolated in MA between the
    last validation above it and the first at or below it.

    Returns ``{"value", "epoch", "reached"}``: ``epoch`` is fractional (e-1 + w, with
    w = (MA_{e-1} - threshold) / (MA_{e-1} - MA_e)); when MA starts at or below the threshold
    the first point is returned (epoch 0); when it never gets there, value and epoch are NaN and
    reached is False. NaN values (a validation without held-out loss) leave a NaN result."""
    ma = np.asarray(ma, dtype=float)
    values = np.asarray(values, dtype=float)
    if ma.shape != values.shape or ma.ndim != 1:
        raise ValueError("ma and values must be 1-d sequences of one length")
    below = np.flatnonzero(ma <= threshold)
    if below.size == 0:
        return {"value": math.nan, "epoch": math.nan, "reached": False}
    e = int(below[0])
    if e == 0:
        return {"value": float(values[0]), "epoch": 0.0, "reached": True}
    w = (ma[e - 1] - threshold) / (ma[e - 1] - ma[e])  # in (0, 1]: MA_{e-1} > threshold >= MA_e
    return {"value": float(values[e - 1] + w * (values[e] - values[e - 1])), "epoch": float(e - 1 + w),
            "reached": True}


def t_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean and the half-width of its two-sided t confidence interval over the finite ``values``
    (the runs): ``{"mean", "half", "n", "sd"}``. One value gives half = NaN (no spread known)."""
    from scipy.stats import t

    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return {"mean": math.nan, "half": math.nan, "n": 0, "sd": math.nan}
    if n == 1:
        return {"mean": float(x[0]), "half": math.nan, "n": 1, "sd": math.nan}
    sd = float(x.std(ddof=1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n))
    return {"mean": float(x.mean()), "half": half, "n": n, "sd": sd}


def paired_differences(values: dict, baseline: dict, confidence: float = 0.95) -> dict:
    """``values`` and ``baseline`` map a run key (split, seed) to one number; the difference
    value - baseline on the runs both have, with its t interval (:func:`t_interval`), and
    whether the interval excludes 0."""
    keys = sorted(k for k in values if k in baseline)
    diffs = [values[k] - baseline[k] for k in keys
             if values[k] is not None and baseline[k] is not None
             and np.isfinite(values[k]) and np.isfinite(baseline[k])]
    out = t_interval(diffs, confidence)
    half = out["half"]
    out["excludes_zero"] = bool(np.isfinite(half) and abs(out["mean"]) > half)
    return out


def format_interval(mean: float, half: float, digits: int = 3) -> str:
    """``"2.134 ± 0.051"``; a lone run shows its value alone; NaN shows empty."""
    if mean is None or not np.isfinite(mean):
        return ""
    if half is None or not np.isfinite(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def best_lr(results: Sequence[dict]) -> Optional[dict]:
    """The tuning choice: among the grid runs that reached the thresholds (``reached`` True and a
    finite ``score``), the one with the lowest score (held-out loss at equal forgetting); ties go
    to the larger lr (fewer epochs). None when no run reached them."""
    ok = [r for r in results if r.get("reached") and r.get("score") is not None and np.isfinite(r["score"])]
    if not ok:
        return None
    return min(ok, key=lambda r: (r["score"], -r["lr"]))
