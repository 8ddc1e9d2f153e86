"""compare.py's outputs from the methods' rows: comparison.csv / .md (one row per method),
tradeoff.png (forgetting against general ability) and results.json (for evaluation/)."""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from ..data import atomic_write_text
from ..errors import disk_errors

logger = logging.getLogger("icu")

FORGET_COLUMNS = ("bleu", "F1", "val_loss")


def el_keys(el_n: str) -> list[str]:
    return [f"el_{n.strip()}" for n in str(el_n).split(",") if n.strip()]


def downstream_mean(values: dict[str, Any], tasks: Sequence[str]) -> Optional[float]:
    """Mean of the scored tasks' accuracies/F1s; perplexities (wikitext, pile) are on another
    scale and stay out of it."""
    from ..downstream import TASKS
    from ..downstream.tasks import PERPLEXITY

    scores = [_num(values.get(t)) for t in tasks if TASKS[t].family != PERPLEXITY]
    scores = [s for s in scores if s is not None]
    return sum(scores) / len(scores) if scores else None


def _num(value: Any) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def flat_row(row: dict, tasks: Sequence[str], els: Sequence[str], thresholds: dict[str, float]) -> dict:
    """One method's table row from its row.json content."""
    ev = row.get("eval") or {}
    out: dict[str, Any] = {"method": row["method"], "epochs": row.get("epochs"), "seconds": row.get("seconds"),
                           "ma": _num(ev.get("ma"))}
    out.update({k: _num(ev.get(k)) for k in els})
    out.update({k: _num(ev.get(k)) for k in FORGET_COLUMNS})
    out["heldout_loss"] = _num((row.get("heldout") or {}).get("loss"))
    values = (row.get("tasks") or {}).get("values") or {}
    out.update({t: _num(values.get(t)) for t in tasks})
    if tasks:
        out["downstream_mean"] = downstream_mean(values, tasks)
    forgot = None
    if out["ma"] is not None and all(out[k] is not None for k in els):
        # the stop rule's "at most" (icu.loop.stop_reason)
        forgot = out["ma"] <= thresholds["acc"] and min(out[k] for k in els) <= thresholds["el"]
    out["under_thresholds"] = forgot
    out["stop_reason"] = row.get("failed") or row.get("stop_reason")
    out["model_dir"] = row.get("model_dir")
    return out


def _cell(value: Any, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.1f}" if column == "seconds" else f"{value:.4f}"
    return str(value).replace("|", "/")


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-style table of ``df`` (floats to 4 decimals, seconds to 1)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_cell(r[c], c) for c in cols) + " |")
    return "\n".join(lines)


def _label_offset(xy: np.ndarray, i: int) -> tuple[int, int, str]:
    """Where point ``i``'s label goes (offset in points, alignment): with k earlier points within
    10% of the data's span of it, the k-th level of a stack that alternates above and below, so
    labels of points that (nearly) coincide land at different heights."""
    span = np.ptp(xy, axis=0)
    span[span == 0] = 1.0
    k = int((np.abs(xy[:i] - xy[i]) / span < 0.10).all(axis=1).sum())
    level = k // 2 + 1
    return 5, (5 + 11 * (level - 1)) if k % 2 == 0 else -(2 + 11 * level), "left"


def plot_tradeoff(df: pd.DataFrame, els: Sequence[str], thresholds: dict[str, float], path: str) -> None:
    """Forget-set EL and MA (y, lower = more forgotten) against general ability (x: held-out
    loss, else the downstream mean), one labelled point per method, the stop thresholds dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if df["heldout_loss"].notna().any():
        x_col, x_label = "heldout_loss", "held-out LM loss (lower = more general ability kept)"
    elif "downstream_mean" in df and df["downstream_mean"].notna().any():
        x_col, x_label = "downstream_mean", "downstream mean (higher = more general ability kept)"
    else:
        x_col, x_label = "val_loss", "forget-set loss (no --heldout or --tasks given)"
    el = els[0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, y_col, thr, title in ((axes[0], el, thresholds["el"], el.upper().replace("_", "")),
                                  (axes[1], "ma", thresholds["acc"], "MA")):
        sub = df[df[x_col].notna() & df[y_col].notna()]
        xy = sub[[x_col, y_col]].to_numpy(float)
        for i, (_, r) in enumerate(sub.iterrows()):
            ax.scatter([r[x_col]], [r[y_col]], color=f"C{i % 10}")
            dx, dy, ha = _label_offset(xy, i)
            ax.annotate(r["method"], (r[x_col], r[y_col]), textcoords="offset points",
                        xytext=(dx, dy), ha=ha, fontsize=9)
        ax.margins(x=0.15, y=0.1)  # room for the labels of the outermost points
        ax.axhline(thr, ls="--", color="red", alpha=0.7, label=f"stop threshold {thr:.4g}")
        ax.set_xlabel(x_label, fontsize=9)
        ax.set_ylabel(f"forget-set {title} (lower = more forgotten)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("forgetting vs general ability, one point per method", fontsize=11)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write_results_json(out_dir: str, methods: Sequence[str]) -> None:
    """Every evaluated method as a policy of evaluation/'s results.json (evaluation.convert)."""
    from evaluation.convert import InputError, convert, write_json_atomic

    policies = [(m, os.path.join(out_dir, m, "eval", "unlearn.csv")) for m in methods]
    policies = [(m, p) for m, p in policies if os.path.isfile(p)]
    if not policies:
        return
    try:
        write_json_atomic(convert(policies), os.path.join(out_dir, "results.json"))
    except InputError as exc:
        logger.warning("results.json not written: %s", exc)


def write_report(out_dir: str, rows: Sequence[dict], tasks: Sequence[str], el_n: str,
                 thresholds: dict[str, float]) -> str:
    """Write the four outputs for ``rows``; returns the markdown table."""
    els = el_keys(el_n)
    df = pd.DataFrame([flat_row(r, tasks, els, thresholds) for r in rows])
    md_cols = [c for c in df.columns if c not in ("model_dir", "under_thresholds")]
    if df["heldout_loss"].isna().all():
        md_cols.remove("heldout_loss")
    table = markdown_table(df[md_cols])
    note = (f"\n\nForget-set columns from eval.py; thresholds: MA <= {thresholds['acc']:.4g}, "
            f"{els[0].upper().replace('_', '')} <= {thresholds['el']:.4g}.\n")
    with disk_errors(out_dir):
        atomic_write_text(os.path.join(out_dir, "comparison.csv"), df.to_csv(index=False))
        atomic_write_text(os.path.join(out_dir, "comparison.md"), table + note)
        plot_tradeoff(df, els, thresholds, os.path.join(out_dir, "tradeoff.png"))
        write_results_json(out_dir, [r["method"] for r in rows])
    return table
